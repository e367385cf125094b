//! The Redis Lua scripts: the one source of their text. Every key a script touches is passed in
//! `KEYS` and carries the pool's hash tag, so each call runs on one Redis Cluster slot. Values
//! travel in `ARGV`. The daemon loads them once and runs them by `EVALSHA`.
//!
//! Data model (see docs/shared-state.md):
//! - `llmlb:{pool}:inflight`      hash endpoint -> pool-wide in-flight count (sum of live replicas)
//! - `llmlb:{pool}:rc:<replica>`  hash endpoint -> this replica's in-flight count
//! - `llmlb:{pool}:rq:<replica>`  hash request id -> endpoint, one field per open request
//! - `llmlb:{pool}:leases`        zset replica -> lease expiry (ms, Redis clock)
//! - `llmlb:{pool}:p:<model>:<h>` string endpoint that last served the prefix `h` (TTL)
//!
//! A request is counted in the pool total, its replica's hash and its request hash in one
//! script, and uncounted only by removing its request id, so release is idempotent and counts
//! never go negative. A replica whose lease lapses is reaped: its counts are subtracted from the
//! total and its hashes deleted, so a crashed replica leaves no phantom load.

/// Pick (and count) an endpoint.
///
/// `KEYS`: 1 inflight, 2 replica counts, 3 replica requests, 4 leases, 5.. prefix levels (the
/// request's chained prefix keys, shortest first; none for least-request).
/// `ARGV`: 1 replica, 2 request id, 3 random seed, 4 lease ms, 5 keep ms (safety TTL of the
/// hashes), 6 max requests per endpoint (0 = off), 7 prefix TTL ms, 8 load factor, 9 load floor,
/// 10 candidate count n, 11..10+n candidate endpoints, 11+n release count r, then r request ids
/// of this replica's finished requests, released first exactly as `RELEASE` does (so a
/// completion rides on the next pick instead of costing a call of its own).
///
/// Returns `{endpoint, in-flight before, prefix depth}`; endpoint `""` when the least-loaded
/// candidate is at the max.
pub const PICK: &str = r"
local replica, rid = ARGV[1], ARGV[2]
local seed = tonumber(ARGV[3])
local lease_ms, keep_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_count, prefix_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local factor, floor_ = tonumber(ARGV[8]), tonumber(ARGV[9])
local n = tonumber(ARGV[10])
local cands, index = {}, {}
for i = 1, n do cands[i] = ARGV[10 + i]; index[cands[i]] = i end
for j = 1, tonumber(ARGV[11 + n] or '0') do
  local done = ARGV[11 + n + j]
  local ended = redis.call('HGET', KEYS[3], done)
  if ended then
    redis.call('HDEL', KEYS[3], done)
    if redis.call('HINCRBY', KEYS[2], ended, -1) <= 0 then redis.call('HDEL', KEYS[2], ended) end
    if redis.call('HINCRBY', KEYS[1], ended, -1) <= 0 then redis.call('HDEL', KEYS[1], ended) end
  end
end
local raw = redis.call('HMGET', KEYS[1], unpack(cands))
local counts, total, min = {}, 0, nil
for i = 1, n do
  local c = tonumber(raw[i]) or 0
  if c < 0 then c = 0 end
  counts[i] = c
  total = total + c
  if min == nil or c < min then min = c end
end

-- Uniform choice among the candidates accepted by `ok`, lowest count first, seeded tie-break.
local function least(ok)
  local best, ties = nil, 0
  for i = 1, n do
    if ok(i) then
      if best == nil or counts[i] < counts[best] then best, ties = i, 1
      elseif counts[i] == counts[best] then ties = ties + 1 end
    end
  end
  if best == nil then return nil end
  local k = seed % ties
  for i = 1, n do
    if ok(i) and counts[i] == counts[best] then
      if k == 0 then return i end
      k = k - 1
    end
  end
end

local chosen, depth = nil, 0
local levels = #KEYS - 4
if levels > 0 then
  -- Bounded load: an endpoint at or above the bound does not get affinity.
  local bound = math.ceil(factor * (total + 1) / n)
  if bound < floor_ then bound = floor_ end
  -- Deepest recorded level by binary search (levels are written together, shortest first).
  local lo, hi = 0, levels
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if redis.call('EXISTS', KEYS[4 + mid]) == 1 then lo = mid else hi = mid - 1 end
  end
  -- The deepest holder that is a candidate and under the bound; a few shallower levels are
  -- tried when the deepest holder is overloaded or gone.
  local level = lo
  while level > 0 and level > lo - 8 do
    local holder = redis.call('GET', KEYS[4 + level])
    local i = holder and index[holder]
    if i and counts[i] < bound then chosen, depth = i, level; break end
    level = level - 1
  end
  if chosen == nil then
    chosen = least(function(i) return counts[i] < bound end) or least(function(i) return true end)
  end
else
  chosen = least(function(i) return true end)
end

if max_count > 0 and counts[chosen] >= max_count then
  return {'', counts[chosen], 0}
end
local endpoint = cands[chosen]
for level = 1, levels do
  redis.call('SET', KEYS[4 + level], endpoint, 'PX', prefix_ttl)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HINCRBY', KEYS[1], endpoint, 1)
redis.call('HSET', KEYS[3], rid, endpoint)
-- Keep-alive TTLs are set when a key may have just been made (the first request of this replica
-- on this endpoint, or a new lease) and renewed by the heartbeat: not four writes per pick.
if redis.call('HINCRBY', KEYS[2], endpoint, 1) == 1 then
  for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], keep_ms) end
end
if redis.call('ZADD', KEYS[4], now + lease_ms, replica) == 1 then redis.call('PEXPIRE', KEYS[4], keep_ms) end
return {endpoint, counts[chosen], depth}
";

/// Release requests (idempotent: an unknown request id is a no-op).
///
/// `KEYS`: 1 inflight, 2 replica counts, 3 replica requests. `ARGV`: request ids.
/// Returns how many were released.
pub const RELEASE: &str = r"
local released = 0
for _, rid in ipairs(ARGV) do
  local endpoint = redis.call('HGET', KEYS[3], rid)
  if endpoint then
    redis.call('HDEL', KEYS[3], rid)
    if redis.call('HINCRBY', KEYS[2], endpoint, -1) <= 0 then redis.call('HDEL', KEYS[2], endpoint) end
    if redis.call('HINCRBY', KEYS[1], endpoint, -1) <= 0 then redis.call('HDEL', KEYS[1], endpoint) end
    released = released + 1
  end
end
return released
";

/// Renew this replica's lease and list lapsed replicas for reaping.
///
/// `KEYS`: 1 leases, 2 replica counts, 3 replica requests, 4 inflight.
/// `ARGV`: 1 replica, 2 lease ms, 3 keep ms, 4 max replicas to list.
/// Returns the ids of replicas whose lease has lapsed (never this one).
pub const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], tonumber(ARGV[3])) end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, r in ipairs(lapsed) do if r ~= ARGV[1] then out[#out + 1] = r end end
return out
";

/// Reap one lapsed replica: subtract its counts from the pool total and delete its state.
///
/// `KEYS`: 1 leases, 2 inflight, 3 its counts, 4 its requests. `ARGV`: 1 its id.
/// Returns the number of its requests that were still counted. Does nothing if the replica
/// renewed its lease in the meantime.
pub const REAP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if expiry and expiry > now then return 0 end
local counts = redis.call('HGETALL', KEYS[3])
local reaped = 0
for i = 1, #counts, 2 do
  local c = tonumber(counts[i + 1])
  if c > 0 then
    reaped = reaped + c
    if redis.call('HINCRBY', KEYS[2], counts[i], -c) <= 0 then redis.call('HDEL', KEYS[2], counts[i]) end
  end
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
return reaped
";

/// Take back prefix levels that a failed request claimed: each key that still names the
/// endpoint is deleted (another endpoint's later claim is left alone).
///
/// `KEYS`: the levels. `ARGV`: 1 endpoint. Returns how many were deleted.
pub const FORGET: &str = r"
local forgotten = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    forgotten = forgotten + 1
  end
end
return forgotten
";

/// Every script with its name, for loading and for tests.
pub const ALL: [(&str, &str); 5] = [
    ("pick", PICK),
    ("release", RELEASE),
    ("heartbeat", HEARTBEAT),
    ("reap", REAP),
    ("forget", FORGET),
];
