"""The Redis scripts against real servers (Redis, Valkey, Redis Cluster), driven with the exact
keys and arguments the Rust core encodes."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import orjson
import pytest

from llmlb import Balancer, shared_scripts
from llmlb._core import PICK_FIXED_KEYS

pytestmark = pytest.mark.redis

ENDPOINTS = ["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"]
LEASE_MS = 300
KEEP_MS = 60_000


def chat(*turns: str) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": t} for t in turns]})


class Replica:
    """One replica's view of the scripts: its Balancer encodes calls, redis-py runs them."""

    def __init__(self, client: Any, pool: str, name: str, policy: str = "prefix_cache", **kw: Any) -> None:
        self.client = client
        self.name = name
        self.balancer = Balancer(policy, **kw)
        self.balancer.set_endpoints(ENDPOINTS)
        pick_sha = hashlib.sha1(shared_scripts()["pick"].encode()).hexdigest()
        self.balancer.enable_shared(pool, name, LEASE_MS, KEEP_MS, pick_sha)
        self.keys = self.balancer.shared_keys()
        self.scripts = {n: client.register_script(t) for n, t in shared_scripts().items()}
        self.next_id = 0

    def pick(
        self, body: bytes | None = None, seed: int = 0, releases: tuple[str, ...] = ()
    ) -> tuple[str, str, int, int]:
        """``(request_id, endpoint, count_before, depth)``; ``releases`` ride on the same call."""
        self.next_id += 1
        rid = f"{self.next_id}"
        prepared, keys, args, command = self.balancer.prepare_shared(body, rid, seed, list(releases))
        assert command.startswith(b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)))
        self.balancer.discard_shared(prepared)
        endpoint, before, depth = self.scripts["pick"](keys=keys, args=args)
        endpoint = endpoint.decode() if isinstance(endpoint, bytes) else endpoint
        return rid, endpoint, int(before), int(depth)

    def release(self, *rids: str) -> int:
        k = self.keys
        keys = [k["inflight"], k["replica_counts"], k["replica_requests"]]
        return int(self.scripts["release"](keys=keys, args=list(rids)))

    def heartbeat(self) -> list[str]:
        k = self.keys
        keys = [k["leases"], k["replica_counts"], k["replica_requests"], k["inflight"]]
        lapsed = self.scripts["heartbeat"](keys=keys, args=[self.name, LEASE_MS, KEEP_MS, 16])
        return [x.decode() if isinstance(x, bytes) else x for x in lapsed]

    def reap(self, other: str) -> int:
        counts, requests = self.balancer.replica_keys(other)
        keys = [self.keys["leases"], self.keys["inflight"], counts, requests]
        return int(self.scripts["reap"](keys=keys, args=[other]))

    def totals(self) -> dict[str, int]:
        raw = self.client.hgetall(self.keys["inflight"])
        return {k.decode(): int(v) for k, v in raw.items()}

    def own(self) -> dict[str, int]:
        raw = self.client.hgetall(self.keys["replica_counts"])
        return {k.decode(): int(v) for k, v in raw.items()}


@pytest.fixture
def pool() -> str:
    return "t" + uuid.uuid4().hex[:10]


def test_least_request_spreads_and_release_is_idempotent(any_redis, pool):
    r = Replica(any_redis.client(), pool, "r1", policy="global_least_request")
    picks = [r.pick(seed=i) for i in range(6)]
    assert sorted(r.totals().values()) == [2, 2, 2]
    assert r.own() == r.totals()
    rids = [p[0] for p in picks]
    assert r.release(*rids) == 6
    assert r.release(*rids) == 0, "releasing twice is a no-op"
    assert r.release("never-picked") == 0
    assert r.totals() == {}
    assert r.own() == {}


def test_a_pick_releases_finished_requests_before_it_counts(any_redis, pool):
    r = Replica(any_redis.client(), pool, "r1", policy="global_least_request")
    first = [r.pick(seed=i) for i in range(3)]
    assert sorted(r.totals().values()) == [1, 1, 1]
    # The next pick carries two completions (and an unknown id, and one released twice).
    done = (first[0][0], first[1][0], "never-picked", first[0][0])
    _, endpoint, before, _ = r.pick(seed=0, releases=done)
    assert before == 0, "the released requests were uncounted before the choice"
    assert endpoint in (first[0][1], first[1][1])
    assert sum(r.totals().values()) == 2
    assert r.own() == r.totals()
    assert r.release(first[0][0], first[1][0]) == 0, "already released by the pick"


def test_prefix_affinity_and_bounded_load(any_redis, pool):
    r = Replica(any_redis.client(), pool, "r1", load_floor=2)
    rid, home, _, depth = r.pick(chat("hello"))
    assert depth == 0
    r.release(rid)
    held = [r.pick(chat("hello", "more"))]
    assert held[0][1:] == (home, 0, 1)
    # The floor lets a second concurrent request share the warm endpoint...
    held.append(r.pick(chat("hello", "x")))
    assert held[-1][1] == home
    # ...but at the bound (max(2, ceil(1.25 * 3 / 3)) = 2) affinity yields to an idle endpoint.
    _, other, before, depth = r.pick(chat("hello", "third"))
    assert other != home
    assert (before, depth) == (0, 0)
    assert r.release(*(p[0] for p in held)) == 2


def test_forget_takes_back_only_what_still_names_the_endpoint(any_redis, pool):
    client = any_redis.client()
    r = Replica(client, pool, "r1")
    rid, home, _, _ = r.pick(chat("a"))
    r.release(rid)
    # The next turn claims two more levels on the same endpoint, then fails there.
    prepared, keys, args, _ = r.balancer.prepare_shared(chat("a", "b", "c"), "x", 0, [])
    r.balancer.discard_shared(prepared)
    endpoint, _, depth = r.scripts["pick"](keys=keys, args=args)
    assert (endpoint.decode(), int(depth)) == (home, 1)
    claimed = keys[PICK_FIXED_KEYS + int(depth) :]
    assert len(claimed) == 2
    # Meanwhile another endpoint claimed the last level: that claim is not ours to take back.
    client.set(claimed[-1], "10.9.9.9:80")
    assert r.scripts["forget"](keys=claimed, args=[home]) == 1
    assert client.get(claimed[0]) is None
    assert client.get(claimed[-1]) == b"10.9.9.9:80"
    assert client.get(keys[PICK_FIXED_KEYS]) == home.encode(), "the level held before stays"


def test_prefix_keys_are_namespaced_and_expire(any_redis, pool):
    client = any_redis.client()
    r = Replica(client, pool, "r1", prefix_ttl_s=60)
    r.pick(chat("a", "b", "c"))
    prefix_keys = [k.decode() for k in _keys(client, f"llmlb:{{{pool}}}:p:*")]
    assert len(prefix_keys) == 3
    for key in prefix_keys:
        assert 0 < client.pttl(key) <= 60_000
    other_model = orjson.dumps({"model": "other", "messages": [{"role": "user", "content": "a"}]})
    r.pick(other_model)
    tags = {k.decode().split(":")[3] for k in _keys(client, f"llmlb:{{{pool}}}:p:*")}
    assert len(tags) == 2, "each model has its own key namespace"


def test_state_keys_get_their_keep_alive_ttl_from_the_pick_that_makes_them(any_redis, pool):
    """No heartbeat has run: the pick itself must leave no key that would never expire, including
    after the keys vanished (a Redis restart) while the replica kept going."""
    client = any_redis.client()
    r = Replica(client, pool, "r1", policy="global_least_request")
    k = r.keys
    state = [k["inflight"], k["replica_counts"], k["replica_requests"], k["leases"]]
    for _ in range(2):
        first, _, _, _ = r.pick()
        r.pick()  # a second request on some endpoint: no TTL refresh needed, none lost
        for key in state:
            assert 0 < client.pttl(key) <= KEEP_MS, key
        client.delete(*state)  # as after a restart: the next pick recreates them with TTLs
        r.release(first)


def test_a_lapsed_replica_is_reaped_and_live_counts_stay_exact(any_redis, pool):
    client = any_redis.client()
    dead, live = Replica(client, pool, "dead"), Replica(client, pool, "live")
    for i in range(3):
        dead.pick(chat(f"dead {i}"), seed=i)
    mine = [live.pick(chat(f"live {i}"), seed=i) for i in range(2)]
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


def test_max_request_count_refuses_without_counting(any_redis, pool):
    r = Replica(any_redis.client(), pool, "r1", policy="global_least_request", max_request_count=1)
    for i in range(3):
        assert r.pick(seed=i)[1]
    _, endpoint, before, _ = r.pick()
    assert (endpoint, before) == ("", 1)
    assert sum(r.totals().values()) == 3


def test_scripts_reload_after_script_flush(any_redis, pool):
    client = any_redis.client()
    r = Replica(client, pool, "r1")
    r.pick(chat("before"))
    client.script_flush()  # on a cluster: every primary
    assert r.pick(chat("after"))[1] in ENDPOINTS  # NOSCRIPT -> loaded again -> ran


def _keys(client: Any, pattern: str) -> list[bytes]:
    if hasattr(client, "get_nodes"):
        return list(client.keys(pattern, target_nodes=client.ALL_NODES))
    return list(client.keys(pattern))
