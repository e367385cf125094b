"""The Redis scripts against real servers (Redis, Valkey, Redis Cluster), driven with the exact
calls the Rust core encodes: the engine decides, the commit script counts (with its guard), the
release, heartbeat and reap scripts keep the counts exact, and the picks stream carries prefix
records between replicas."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import orjson
import pytest

from llmlb import Balancer, shared_scripts

pytestmark = pytest.mark.redis

ENDPOINTS = ["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"]
LEASE_MS = 300
KEEP_MS = 60_000


def chat(*turns: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": t} for t in turns]})


def resp_parts(command: bytes) -> list[bytes]:
    """The bulk strings of a RESP array (to send a pre-encoded command through redis-py)."""
    assert command.startswith(b"*")
    head, rest = command[1:].split(b"\r\n", 1)
    parts = []
    for _ in range(int(head)):
        assert rest.startswith(b"$")
        size, rest = rest[1:].split(b"\r\n", 1)
        parts.append(rest[: int(size)])
        rest = rest[int(size) + 2 :]
    assert rest == b""
    return parts


class Replica:
    """One replica: its Balancer (the engine) encodes calls and reads replies, redis-py runs them."""

    def __init__(self, client: Any, pool: str, name: str, policy: str = "prefix_cache", **kw: Any) -> None:
        self.client = client
        self.name = name
        self.balancer = Balancer(policy, **kw)
        self.balancer.set_endpoints(ENDPOINTS)
        self.shas = {n: hashlib.sha1(t.encode()).hexdigest() for n, t in shared_scripts().items()}
        self.balancer.enable_shared(pool, name, LEASE_MS, KEEP_MS, self.shas["commit"])
        self.balancer.set_remote(True)
        self.scripts = {n: client.register_script(t) for n, t in shared_scripts().items()}
        for script in self.scripts.values():
            client.script_load(script.script)
        self.inflight_key = self.balancer.shared_key("inflight")
        self.picks_key = self.balancer.shared_key("picks")
        self.next_id = 0
        self.commits = 0
        self.last_ticket = 0
        self.tickets: dict[str, int] = {}

    def send(self, command: bytes) -> Any:
        """Runs a pre-encoded command: a script call through its redis-py Script (which routes it
        on a cluster), anything else as it is."""
        parts = resp_parts(command)
        if parts[0] != b"EVALSHA":
            return self.client.execute_command(parts[0].decode(), parts[1].decode(), *parts[2:])
        self.commits += 1
        name = next(n for n, sha in self.shas.items() if sha.encode() == parts[1])
        numkeys = int(parts[2])
        keys = [k.decode() for k in parts[3 : 3 + numkeys]]
        return self.scripts[name](keys=keys, args=parts[3 + numkeys :])

    def pick(self, body: bytes | None = None, releases: tuple[str, ...] = ()) -> tuple[str, str, str, int]:
        """``(request_id, endpoint, reason, depth)``: prepared by the engine, committed by Redis
        (deciding again after a lost guard), like the daemon does."""
        self.next_id += 1
        rid = f"{self.next_id}"
        pending, command = self.balancer.prepare_shared(body, rid, self._end(releases))
        try:
            for _ in range(3):
                outcome = self.balancer.complete_shared(pending, list(self.send(command)))
                if isinstance(outcome, bytes):
                    command = outcome
                    continue
                self.last_ticket = outcome.ticket
                self.tickets[rid] = self.last_ticket
                return rid, outcome.endpoint, outcome.reason, outcome.prefix_depth
        finally:
            self.balancer.discard_shared(pending)
        raise AssertionError("no commit after 3 attempts")

    def _end(self, rids: tuple[str, ...]) -> list[tuple[str, int]]:
        """Ends this replica's own tickets of those requests, as the daemon does: ``(request id,
        backlog tokens still held of it)`` for the release call."""
        ended = []
        for rid in rids:
            ticket = self.tickets.pop(rid, None)
            tokens = self.balancer.release_tokens(ticket) if ticket is not None else None
            ended.append((rid, tokens or 0))
        return ended

    def release(self, *rids: str) -> int:
        """Releases in Redis, and this replica's own tickets of those requests (as the daemon)."""
        keys, args = self.balancer.release_call(self._end(rids))
        return int(self.scripts["release"](keys=keys, args=args))

    def backlog(self, endpoint: str) -> int:
        return next(v[5] for v in self.balancer.endpoints() if v[0] == endpoint)

    def last_record(self) -> str:
        return str(self.client.xrevrange(self.picks_key, count=1)[0][0].decode())

    def heartbeat(self) -> list[str]:
        keys, args = self.balancer.heartbeat_call(16)
        lapsed = self.scripts["heartbeat"](keys=keys, args=args)
        return [x.decode() if isinstance(x, bytes) else x for x in lapsed]

    def reap(self, other: str) -> int:
        keys, args = self.balancer.reap_call(other)
        return int(self.scripts["reap"](keys=keys, args=args))

    def follow(self, since: str = "0-0") -> int:
        """Applies every stream record after `since` (another replica's picks)."""
        applied = 0
        for _, records in self.client.xread({self.picks_key: since}, count=10_000) or ():
            for record_id, fields in records:
                applied += self.balancer.apply_stream_record(record_id.decode(), fields)
        return applied

    def totals(self, key: str | None = None) -> dict[str, int]:
        raw = self.client.hgetall(key or self.inflight_key)
        return {k.decode(): int(v) for k, v in raw.items()}

    def own(self) -> dict[str, int]:
        raw = self.client.hgetall(self.inflight_key.replace(":inflight", f":rc:{self.name}"))
        return {k.decode(): int(v) for k, v in raw.items()}


@pytest.fixture
def pool() -> str:
    return "t" + uuid.uuid4().hex[:10]


def test_least_request_spreads_and_release_is_idempotent(any_redis, pool):
    r = Replica(any_redis.client(), pool, "r1", policy="global_least_request")
    picks = [r.pick(chat(f"q{i}")) for i in range(6)]
    assert sorted(r.totals().values()) == [2, 2, 2]
    assert r.own() == r.totals()
    assert r.commits == 6, "one round trip per pick"
    rids = [p[0] for p in picks]
    assert r.release(*rids) == 6
    assert r.release(*rids) == 0, "releasing twice is a no-op"
    assert r.release("never-picked") == 0
    assert r.totals() == {}
    assert r.own() == {}


def test_a_commit_releases_finished_requests_before_it_counts(any_redis, pool):
    r = Replica(any_redis.client(), pool, "r1", policy="global_least_request")
    first = [r.pick(chat(f"q{i}")) for i in range(3)]
    assert sorted(r.totals().values()) == [1, 1, 1]
    # The next commit carries two completions (and an unknown id, and one released twice).
    done = (first[0][0], first[1][0], "never-picked", first[0][0])
    r.pick(chat("next"), releases=done)
    assert sum(r.totals().values()) == 2
    assert r.own() == r.totals()
    assert r.release(first[0][0], first[1][0]) == 0, "already released by the commit"


def test_the_prefill_backlog_reaches_the_other_replicas_through_the_stream(any_redis, pool):
    client = any_redis.client()
    a, b = Replica(client, pool, "a"), Replica(client, pool, "b")
    rid, endpoint, _, _ = a.pick(chat("x" * 40_000))  # about 10,000 tokens
    assert b.follow() == 1
    assert 7_000 < b.backlog(endpoint) <= 10_100
    # b sends its next unique prompts elsewhere while that prefill drains.
    for i in range(2):
        assert b.pick(chat(f"short {i}"))[1] != endpoint
    # The request ends at once (refused, say): its prefill is over, and its release record takes
    # what the estimate still held of it back on b too.
    since = b.last_record()
    a.release(rid)
    assert a.backlog(endpoint) == 0
    assert b.follow(since) == 1
    assert b.backlog(endpoint) <= 30, "up to the clocks' millisecond rounding"
    # Redis keeps no backlog: the stream is its only carrier.
    prefix = f"llmlb:{{{pool}}}:"
    names = sorted(k.decode().removeprefix(prefix) for k in _keys(client, prefix + "*"))
    assert names == ["inflight", "leases", "picks", "rc:b", "rq:b"]


def test_the_guard_makes_a_stale_decision_decide_again(any_redis, pool):
    client = any_redis.client()
    a, b = Replica(client, pool, "a", policy="global_least_request"), Replica(client, pool, "b")
    # Replica b fills one endpoint while a's view (no reply yet) still thinks it is idle.
    busy = ENDPOINTS[0]
    for i in range(3):
        b.balancer.set_healthy(ENDPOINTS[1], False)
        b.balancer.set_healthy(ENDPOINTS[2], False)
        assert b.pick(chat(f"b{i}"))[1] == busy
    for endpoint in ENDPOINTS[1:]:
        a.balancer.set_healthy(endpoint, False)
    # a can only pick `busy`: its guard (its view: 0) refuses 3 in flight, and it decides again
    # on the fresh loads (still only `busy`, now with a guard of 3).
    endpoint = a.pick(chat("a"))[1]
    assert endpoint == busy
    assert a.commits == 2, "the first commit was held back; the second, on fresh loads, went ahead"
    assert a.totals()[busy] == 4
    # With room elsewhere, the second decision moves: healthy again, a's view is fresh now.
    for endpoint in ENDPOINTS[1:]:
        a.balancer.set_healthy(endpoint, True)
    assert a.pick(chat("a2"))[1] != busy
    assert a.commits == 3


def test_prefix_records_carry_affinity_between_replicas(any_redis, pool):
    client = any_redis.client()
    a, b = Replica(client, pool, "a"), Replica(client, pool, "b")
    rid, home, _, _ = a.pick(chat("a long shared conversation " * 40))
    a.release(rid)
    assert a.follow() == 0, "a replica skips its own records"
    assert b.follow() == 2, "a's commit and its release"
    _, through_b, reason, depth = b.pick(chat("a long shared conversation " * 40, "next turn"))
    assert (through_b, reason) == (home, "prefix_hit")
    assert depth > 0
    assert client.xlen(a.picks_key) == 3, "a's commit, its release, b's commit"


def test_a_failed_request_s_record_takes_back_its_claim_on_the_other_replicas(any_redis, pool):
    client = any_redis.client()
    a, b = Replica(client, pool, "a"), Replica(client, pool, "b")
    body = chat("a prompt the server refuses " * 40)
    _, refused_by, _, _ = a.pick(body)
    last_id = a.last_record()
    assert b.follow() == 1
    assert b.backlog(refused_by) > 200, "about 280 prompt tokens sent there"
    record = a.balancer.release_failed(a.last_ticket)
    assert record is not None
    a.send(record)
    assert b.follow(last_id) == 1
    # Taken back with the claim; what is left is the two clocks' millisecond rounding (a token
    # is 0.1 ms of prefill at the default rate).
    assert b.backlog(refused_by) <= 30, "taken back with the claim"
    _, endpoint, reason, _ = b.pick(body)
    assert reason != "prefix_hit", f"{endpoint} should not be followed any more"


def test_state_keys_get_their_keep_alive_ttl_from_the_commit_that_makes_them(any_redis, pool):
    """No heartbeat has run: the commit itself must leave no key that would never expire,
    including after the keys vanished (a Redis restart) while the replica kept going."""
    client = any_redis.client()
    r = Replica(client, pool, "r1")
    state = [
        r.inflight_key, r.inflight_key.replace(":inflight", ":rc:r1"),
        r.inflight_key.replace(":inflight", ":rq:r1"), r.balancer.shared_key("leases"),
    ]  # fmt: skip
    for round_ in range(2):
        first = r.pick(chat(f"one {round_}"))[0]
        r.pick(chat(f"two {round_}"))  # a second request: no TTL refresh needed, none lost
        for key in state:
            assert 0 < client.pttl(key) <= KEEP_MS, key
        client.delete(*state)  # as after a restart: the next commit recreates them with TTLs
        r.release(first)


def test_a_lapsed_replica_is_reaped_and_live_counts_stay_exact(any_redis, pool):
    client = any_redis.client()
    dead, live = Replica(client, pool, "dead"), Replica(client, pool, "live")
    for i in range(3):
        dead.pick(chat(f"dead {i}"))
    mine = [live.pick(chat(f"live {i}")) for i in range(2)]
    assert sum(live.totals().values()) == 5
    assert live.heartbeat() == [], "nobody has lapsed yet"
    deadline = time.monotonic() + 5
    lapsed: list[str] = []
    while time.monotonic() < deadline and not lapsed:
        time.sleep(LEASE_MS / 1000 / 3)
        lapsed = live.heartbeat()  # the live replica keeps renewing its own lease
    assert lapsed == ["dead"]
    assert live.reap("dead") == 3
    assert live.totals() == live.own()
    assert sum(live.totals().values()) == 2
    # The dead replica's late releases (say it was only cut off) change nothing.
    assert dead.release("1", "2", "3") == 0
    assert sum(live.totals().values()) == 2
    assert live.release(*(p[0] for p in mine)) == 2
    assert live.totals() == {}


def test_reap_spares_a_replica_that_renewed(any_redis, pool):
    client = any_redis.client()
    a, b = Replica(client, pool, "a"), Replica(client, pool, "b")
    a.pick(chat("x"))
    a.heartbeat()
    assert b.reap("a") == 0
    assert sum(b.totals().values()) == 1


def test_max_request_count_is_decided_by_the_engine_on_the_pool_wide_view(any_redis, pool):
    client = any_redis.client()
    a = Replica(client, pool, "a", policy="global_least_request", max_request_count=1)
    b = Replica(client, pool, "b", policy="global_least_request", max_request_count=1)
    for i in range(3):
        assert a.pick(chat(f"{i}"))[1] in ENDPOINTS
    # b has seen no reply yet: its view says idle, but its guard never lets a commit pass the
    # limit; the reply shows the pool full, and deciding again refuses.
    with pytest.raises(Exception, match="maxRequestCount"):
        b.pick(chat("over"))
    assert sum(a.totals().values()) == 3


def _keys(client: Any, pattern: str) -> list[bytes]:
    if hasattr(client, "get_nodes"):
        return list(client.keys(pattern, target_nodes=client.ALL_NODES))
    return list(client.keys(pattern))
