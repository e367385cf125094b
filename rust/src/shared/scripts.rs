//! The Redis Lua scripts: the one source of their text. They hold no policy: the engine in
//! `balancer` decides every pick (see `shared::picks`); the scripts only count, guard, release
//! and publish atomically. Every key a script touches is passed in `KEYS` and carries the pool's
//! hash tag, so each call runs on one Redis Cluster slot. Values travel in `ARGV`. The daemon
//! loads them once and runs them by `EVALSHA`.
//!
//! Data model (see docs/shared-state.md):
//! - `llmlb:{pool}:inflight`      hash endpoint -> pool-wide requests in flight (live replicas)
//! - `llmlb:{pool}:rc:<replica>`  hash endpoint -> this replica's requests in flight
//! - `llmlb:{pool}:rq:<replica>`  hash request id -> endpoint, one per open request
//! - `llmlb:{pool}:leases`        zset replica -> lease expiry (ms, Redis clock)
//! - `llmlb:{pool}:picks`         stream of what changed, so every replica's view stays fresh
//!   between its own round trips (`shared::Record`): a commit (`r` replica, `e` endpoint, `t`
//!   the prompt tokens it adds to the endpoint's prefill backlog, `l` the prompt's prefix keys,
//!   8 bytes each little-endian), released or reaped requests (`r`, `d`: lines `endpoint TAB
//!   requests`, a release's with `TAB tokens`: what the backlog still held of it), a failed request taking back its prefix keys and the backlog tokens still held
//!   of it (`r`, `e`, `t`, `l`, `f`). The backlogs live only in the stream: each replica sums
//!   them from the records it reads, so every replica's estimate is the same.
//!
//! A request is counted in the pool totals, its replica's hashes and its request hash in one
//! script, and uncounted only by removing its request id, so release is idempotent and counts
//! never go negative. A replica whose lease lapses is reaped: its counts are subtracted from the
//! totals and its hashes deleted, so a crashed replica leaves no phantom load.

/// The release logic shared by `COMMIT` and `RELEASE` (a macro, so both scripts are built from
/// the one text at compile time): `release(rid, tokens)` uncounts one open request of this
/// replica (unknown ids are a no-op; `tokens`: what the backlog still held of it, for the other
/// replicas) and `publish_releases()` adds one stream record for them.
/// Expects `KEYS`: 1 inflight, 2 replica counts, 3 replica requests, and `stream`, `replica`,
/// `maxlen` and `keep_ms` set.
macro_rules! release_lua {
    () => {
        r"
local released = {}
local function uncount(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then redis.call('HDEL', key, field) end
end
local function release(rid, tokens)
  local endpoint = redis.call('HGET', KEYS[3], rid)
  if not endpoint then return 0 end
  redis.call('HDEL', KEYS[3], rid)
  uncount(KEYS[2], endpoint)
  uncount(KEYS[1], endpoint)
  local line = endpoint .. '\t1'
  if tokens and tokens ~= '' and tokens ~= '0' then line = line .. '\t' .. tokens end
  released[#released + 1] = line
  return 1
end
local function publish_releases()
  if #released > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'r', replica, 'd', table.concat(released, '\n'))
    -- A stream made here (the keys were lost, say in a Redis restart) must not live forever.
    if redis.call('PTTL', stream) == -1 then redis.call('PEXPIRE', stream, keep_ms) end
  end
  return #released
end
"
    };
}

/// Commit a pick the engine decided, unless its endpoint got busier meanwhile (a guard).
///
/// `KEYS`: 1 inflight, 2 replica counts, 3 replica requests, 4 leases, 5 picks stream.
/// `ARGV`: 1 replica, 2 request id, 3 lease ms, 4 keep ms (safety TTL of the hashes), 5 the
/// chosen endpoint, 6 guard: the most requests the endpoint may already have for the commit to
/// go ahead (empty: no guard), 7 the prompt tokens the request adds to the endpoint's backlog
/// and 8 its prefix keys, both for the stream (empty: none), 9 the stream's approximate maximum
/// length, 10 candidate count n,
/// 11..10+n candidates, then a release count r and r pairs (request id, backlog tokens still
/// held of it) of this replica's finished requests, released first (so a completion rides on
/// the next pick instead of costing a call of its own).
///
/// Returns `{committed (1 or 0), {requests per candidate}, stream id}`,
/// read after the commit: the engine's view of the pool as of that point of the stream (for the
/// next decision, and, when the guard held the commit back, for deciding again).
pub const COMMIT: &str = concat!(
    r"
local replica, rid, endpoint = ARGV[1], ARGV[2], ARGV[5]
local lease_ms, keep_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local guard, tokens = tonumber(ARGV[6]), ARGV[7]
local levels, maxlen = ARGV[8], ARGV[9]
local n = tonumber(ARGV[10])
local stream = KEYS[5]
",
    release_lua!(),
    r"
for j = 1, tonumber(ARGV[11 + n] or '0') do release(ARGV[10 + n + 2 * j], ARGV[11 + n + 2 * j]) end
publish_releases()
local committed, at = 0, nil
if not guard or (tonumber(redis.call('HGET', KEYS[1], endpoint)) or 0) <= guard then
  committed = 1
  redis.call('HINCRBY', KEYS[1], endpoint, 1)
  redis.call('HSET', KEYS[3], rid, endpoint)
  at = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'r', replica, 'e', endpoint, 't', tokens, 'l', levels)
  -- Keep-alive TTLs are set when a key may have just been made (this replica's first request
  -- on this endpoint, or a new lease) and renewed by the heartbeat: not five writes per pick.
  if redis.call('HINCRBY', KEYS[2], endpoint, 1) == 1 then
    for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], keep_ms) end
    redis.call('PEXPIRE', stream, keep_ms)
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if redis.call('ZADD', KEYS[4], now + lease_ms, replica) == 1 then
    redis.call('PEXPIRE', KEYS[4], keep_ms)
    redis.call('PEXPIRE', stream, keep_ms)
  end
else
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  at = last[1] and last[1][1] or '0-0'
end
local cands = {}
for i = 1, n do cands[i] = ARGV[10 + i] end
local requests = {}
if n > 0 then
  local r = redis.call('HMGET', KEYS[1], unpack(cands))
  for i = 1, n do requests[i] = tonumber(r[i]) or 0 end
end
return {committed, requests, at}
"
);

/// Release requests (idempotent: an unknown request id is a no-op).
///
/// `KEYS`: 1 inflight, 2 replica counts, 3 replica requests, 4 picks stream. `ARGV`: 1 replica,
/// 2 the stream's approximate maximum length, 3 keep ms, then pairs (request id, backlog tokens
/// still held of it). Returns how many were released.
pub const RELEASE: &str = concat!(
    r"
local replica, maxlen, keep_ms, stream = ARGV[1], ARGV[2], tonumber(ARGV[3]), KEYS[4]
",
    release_lua!(),
    r"
for i = 4, #ARGV - 1, 2 do release(ARGV[i], ARGV[i + 1]) end
return publish_releases()
"
);

/// Renew this replica's lease and list lapsed replicas for reaping.
///
/// `KEYS`: 1 leases, 2 replica counts, 3 replica requests, 4 inflight, 5 picks stream.
/// `ARGV`: 1 replica, 2 lease ms, 3 keep ms, 4 max replicas to list.
/// Returns the ids of replicas whose lease has lapsed (never this one).
pub const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
for k = 1, 5 do redis.call('PEXPIRE', KEYS[k], tonumber(ARGV[3])) end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, r in ipairs(lapsed) do if r ~= ARGV[1] then out[#out + 1] = r end end
return out
";

/// Reap one lapsed replica: subtract its counts from the pool totals, delete its state, and
/// tell the other replicas (a stream record of what was subtracted).
///
/// `KEYS`: 1 leases, 2 inflight, 3 its counts, 4 its requests, 5 picks stream. `ARGV`: 1 its id,
/// 2 the stream's approximate maximum length.
/// Returns the number of its requests that were still counted. Does nothing if the replica
/// renewed its lease in the meantime.
pub const REAP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if expiry and expiry > now then return 0 end
local counts = redis.call('HGETALL', KEYS[3])
local reaped, lines = 0, {}
for i = 1, #counts, 2 do
  local endpoint, c = counts[i], tonumber(counts[i + 1])
  if c > 0 then
    reaped = reaped + c
    lines[#lines + 1] = endpoint .. '\t' .. c
    if redis.call('HINCRBY', KEYS[2], endpoint, -c) <= 0 then redis.call('HDEL', KEYS[2], endpoint) end
  end
end
if #lines > 0 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[1], 'd', table.concat(lines, '\n'))
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
return reaped
";

/// Every script with its name, for loading and for tests.
pub const ALL: [(&str, &str); 4] = [
    ("commit", COMMIT),
    ("release", RELEASE),
    ("heartbeat", HEARTBEAT),
    ("reap", REAP),
];
