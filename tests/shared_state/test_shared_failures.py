"""Shared state when Redis fails: fail-open picking, recovery, and credentials.

Traffic goes through real Envoys (``llmlb envoy-config``, buffered mode) to three fake backends;
the Redis servers are private to each test (``make_redis_server``), except the session ACL server.

Redis Cluster is not covered by the outage test: the fixtures can kill or restart single nodes but
cannot restart a whole cluster (stop every node, start them empty and re-form the cluster), and
killing one master is a different scenario (a third of the slots gone, the others answering), so
that variant is left out rather than approximated. Standalone Redis covers the outage semantics.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shared_state.conftest import ACL_PASSWORD, ACL_USERNAME, MakeRedisServer
from tests.shared_state.shared_helpers import (
    LR,
    PC,
    LoadResult,
    OpenRequest,
    Replica,
    abort_all,
    fallbacks,
    new_pool,
    percentile,
    pool_keys,
    run_load,
    target_of,
    warm_up,
    write_config,
)
from tests.support.procs import Backend, Reply, get, wait_until
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    """Replicas a test starts; stopped at its end (their logs attached on failure)."""
    started: list[Replica] = []
    yield started
    for r in started:
        r.stop()


def _start(
    replicas: list[Replica],
    name: str,
    backends: list[Backend],
    workdir: Path,
    *,
    policy: str,
    pool: str,
    port: int,
    envoy: bool = True,
    log_level: str = "info",
    **lb: object,
) -> Replica:
    config = write_config(
        workdir / f"{name}-{pool}.yaml",
        pool=pool,
        policy=policy,
        port=port,
        **lb,  # type: ignore[arg-type]
    )
    replica = Replica.start(
        name,
        [b.address for b in backends],
        policy=policy,
        pool=pool,
        config_path=config,
        workdir=workdir,
        envoy=envoy,
        log_level=log_level,
    )
    replicas.append(replica)
    return replica


def _chat(conv: int, turn: int, nonce: str) -> list[dict[str, str]]:
    system = f"Load test {nonce}, conversation {conv}. " + "Keep answers short. " * 10
    messages = [{"role": "system", "content": system}]
    for t in range(turn):
        messages += [
            {"role": "user", "content": f"question {t} in conversation {conv}"},
            {"role": "assistant", "content": f"answer {t} in conversation {conv}"},
        ]
    return [*messages, {"role": "user", "content": f"question {turn} in conversation {conv}"}]


# --------------------------------------------------------------------------------------------------
# 4. Redis stopped during load

WORKERS = 10
LOAD_SECONDS = 6.0
STOP_AT = 1.5
RESTART_AT = 3.0
PACE = 0.01  # s between a worker's requests: keeps the 2-core machine short of saturation
REDIS_REASONS = ("redis_down", "redis_slow", "redis_error")
OUTAGE_P99_BOUND = 0.2  # s; Higress would add its 3 s Redis timeout to every pick


def test_redis_stopped_during_load_fails_open_and_shared_picks_resume(
    make_redis_server: MakeRedisServer,
    backends: list[Backend],
    workdir: Path,
    replicas: list[Replica],
) -> None:
    server: RedisServer = make_redis_server("redis")
    pool = new_pool()
    a = _start(replicas, "outage-A", backends, workdir, policy=PC, pool=pool, port=server.port)
    b = _start(replicas, "outage-B", backends, workdir, policy=PC, pool=pool, port=server.port, envoy=False)
    for r in (a, b):
        r.wait_redis_up()
    warm_up([a])
    samples = a.metrics()
    fallbacks_before = fallbacks(samples)
    reasons_before = _fallback_reasons(a)
    errors_before = a.metric("llmlb_redis_errors_total")
    nonce = uuid.uuid4().hex[:8]

    def send(i: int) -> Reply:
        time.sleep(PACE)
        return a.chat(_chat(i % 13, (i // 13) % 3, nonce), timeout=5.0)

    t0 = time.monotonic()
    result: list[LoadResult] = []
    loader = threading.Thread(target=lambda: result.append(run_load(send, WORKERS, LOAD_SECONDS, t0=t0)))
    loader.start()
    try:
        time.sleep(max(0.0, t0 + STOP_AT - time.monotonic()))
        server.stop()
        down_at = time.monotonic() - t0
        time.sleep(max(0.0, t0 + RESTART_AT - time.monotonic()))
        server.restart()
        restarted_at = time.monotonic() - t0
        # llmlb_redis_up returns to 1 within a few seconds, while the load goes on.
        wait_until(
            lambda: a.metric("llmlb_redis_up") == 1.0,
            3.0,
            message=f"A's llmlb_redis_up back to 1 after the restart\n{a.describe(20)}",
        )
        up_again_after = time.monotonic() - t0 - restarted_at
        # Picks go through Redis again: the stream of prefix records reappears (commits add to it).
        wait_until(
            lambda: any(k.endswith(":picks") for k in pool_keys(target_of("redis", server), pool)),
            3.0,
            message="prefix records written again after the restart",
        )
    finally:
        loader.join(LOAD_SECONDS + 40)
    assert result, "the load thread did not finish"
    load = result[0]
    statuses = load.statuses
    failed = [s for s in statuses if s != 200]
    assert statuses, "no requests were sent"
    assert not failed, f"{len(failed)} of {len(statuses)} client requests failed: {load.errors}"
    samples = a.metrics()
    assert fallbacks(samples) > fallbacks_before, f"no redis_* fallbacks counted: {a.redis_state()}"
    # Once the outage is detected the circuit is open: picks do not even try Redis (redis_down),
    # rather than each paying an error or a timeout (redis_error / redis_slow).
    reasons = {r: _fallback_reasons(a).get(r, 0) - reasons_before.get(r, 0) for r in REDIS_REASONS}
    assert reasons["redis_down"] >= 0.9 * sum(reasons.values()), f"fallbacks during the outage: {reasons}"
    assert a.metric("llmlb_redis_errors_total") > errors_before, a.redis_state()
    # No per-request wait while Redis was down (the circuit is open; a pick does not wait on it).
    outage = load.during(down_at, restarted_at)
    before = load.during(0.3, down_at)
    assert len(outage) >= 20, f"only {len(outage)} requests during the outage"
    p99 = percentile(outage, 99)
    points = (("p50", outage, 50), ("p99", outage, 99), ("max", outage, 100), ("p99 before", before, 99))
    ms = {name: round(percentile(values, q) * 1000, 1) for name, values, q in points}
    print(
        f"{len(statuses)} requests; outage {down_at:.2f}-{restarted_at:.2f}s: {len(outage)} requests, "
        f"latency ms {ms}; redis_up again {up_again_after:.2f}s after the restart"
    )
    assert p99 < OUTAGE_P99_BOUND, f"latency during the Redis outage over {len(outage)} requests (ms): {ms}"
    assert up_again_after < 3.0
    # B sees A's requests pool-wide again.
    b.wait_redis_up(3.0)
    held: list[OpenRequest] = []
    try:
        held = [a.open_slow(3000, f"after{i}") for i in range(3)]

        def b_sees_them() -> bool:
            pool_b, local_b, shared = b.views()
            return shared and sum(pool_b.values()) == 3 and sum(local_b.values()) == 0

        wait_until(b_sees_them, 2.5, message=f"B's pool-wide view to count A's 3 held requests: {b.views()}")
    finally:
        abort_all(held)


# --------------------------------------------------------------------------------------------------
# one slow answer: fail open for that pick only, no leaked count

PAUSE_MS = 150  # > redisBudget (25 ms), < timeout (1000 ms)


def test_one_pick_over_budget_falls_back_without_opening_the_circuit_or_leaking(
    make_redis_server: MakeRedisServer,
    backends: list[Backend],
    workdir: Path,
    replicas: list[Replica],
) -> None:
    """The docstring of llmlb.shared: the circuit opens after two failures in a row (or one
    connection failure); one pick that overruns ``redisBudget`` falls back alone. Redis is made slow
    for one pick with CLIENT PAUSE (longer than the budget, shorter than ``timeout``)."""
    server = make_redis_server("redis")
    pool = new_pool()
    a = _start(replicas, "slow-A", backends, workdir, policy=LR, pool=pool, port=server.port)
    a.wait_redis_up()
    warm_up([a])
    a.wait_pool_idle()
    before = _fallback_reasons(a)
    admin = server.client()
    try:
        admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        started = time.monotonic()
        reply = a.chat([{"role": "user", "content": "one slow pick"}], timeout=5.0)
        elapsed = time.monotonic() - started
        up_right_after = a.metric("llmlb_redis_up")
        after_one = _fallback_reasons(a)
        # Blocks until Redis lets clients go again (it unpauses on its next cron tick, so up to
        # 100 ms after PAUSE_MS).
        assert admin.ping()
    finally:
        admin.close()
    assert reply.status == 200, reply
    assert elapsed < 0.2, f"the request waited {elapsed * 1000:.0f} ms on a paused Redis"
    assert after_one.get("redis_slow", 0) - before.get("redis_slow", 0) == 1, after_one
    assert up_right_after == 1.0, (
        f"one pick over budget opened the circuit (llmlb_redis_up {up_right_after}): "
        f"{a.redis_state()}\n{a.daemon.proc.describe(6)}"
    )
    # Once Redis answers, picks are shared at once (no redis_down fallbacks), and nothing leaks.
    for i in range(5):
        assert a.chat([{"role": "user", "content": f"after the pause {i}"}]).status == 200
    after = _fallback_reasons(a)
    assert after == after_one, f"fallbacks after Redis answered again: {after} (before: {after_one})"
    wait_until(
        lambda: not any(a.views()[0].values()),
        3.0,
        message=f"pool-wide in-flight back to 0 after the slow pick: {a.views()}",
    )


def _fallback_reasons(replica: Replica) -> dict[str, float]:
    return {
        s.labels.get("reason", ""): s.value for s in replica.metrics() if s.name == "llmlb_fallbacks_total"
    }


# --------------------------------------------------------------------------------------------------
# 5. ACL user and password


def test_acl_user_works_and_a_wrong_password_fails_open_without_leaking_it(
    redis_acl_server: RedisServer,
    backends: list[Backend],
    workdir: Path,
    replicas: list[Replica],
) -> None:
    server = redis_acl_server
    wrong = f"wr0ng-{uuid.uuid4().hex[:12]}"
    good = _start(
        replicas, "acl-good", backends, workdir, policy=PC, pool=new_pool(), port=server.port,
        username=ACL_USERNAME, password=ACL_PASSWORD, log_level="debug",
    )  # fmt: skip
    bad = _start(
        replicas, "acl-wrong", backends, workdir, policy=PC, pool=new_pool(), port=server.port,
        username=ACL_USERNAME, password=wrong, log_level="debug",
    )  # fmt: skip
    nonce = uuid.uuid4().hex[:8]
    for r in (good, bad):
        for i in range(6):
            reply = r.chat(_chat(i, 0, nonce))
            assert reply.status == 200, (r.name, reply)

    # The right credentials: picks go through Redis.
    good.wait_redis_up()
    assert good.metric("llmlb_redis_errors_total") == 0, good.redis_state()
    assert fallbacks(good.metrics()) == 0, good.redis_state()
    keys = pool_keys(target_of("redis", server), good.pool)
    assert any(k.endswith(":picks") for k in keys), f"no prefix records written by the ACL user: {keys}"

    # A wrong password: fail open, counted.
    samples = bad.metrics()
    assert bad.metric("llmlb_redis_up") == 0, bad.redis_state()
    assert bad.metric("llmlb_redis_errors_total") > 0, bad.redis_state()
    assert _fallback_reasons(bad).get("redis_down", 0) > 0, bad.redis_state()
    assert sum(s.value for s in samples if s.name == "llmlb_picks_total") >= 6
    assert not pool_keys(target_of("redis", server), bad.pool), "a replica with a wrong password wrote keys"

    # Neither password shows anywhere the daemon writes or serves.
    for r, secret in ((good, ACL_PASSWORD), (bad, wrong)):
        for where, text in (
            ("log file", r.log_text()),
            ("/debug/config", r.config_text()),
            ("/metrics", r.metrics_text()),
            ("/debug/endpoints", str(r.debug())),
        ):
            assert secret not in text, f"replica {r.name}: the password appears in its {where}"
        assert r.config_text().count(ACL_USERNAME) >= 1, "the username should still be shown"


# --------------------------------------------------------------------------------------------------
# the decision record says where each pick's state came from


def test_decision_record_names_redis_then_the_local_fallback(
    make_redis_server: MakeRedisServer,
    backends: list[Backend],
    workdir: Path,
    replicas: list[Replica],
) -> None:
    server: RedisServer = make_redis_server("redis")
    a = _start(replicas, "state-A", backends, workdir, policy=PC, pool=new_pool(), port=server.port)
    a.wait_redis_up()
    nonce = uuid.uuid4().hex[:8]

    def latest_state(request_id: str) -> str | None:
        decisions = get(f"{a.daemon.admin_url}/debug/decisions").json()
        return next((d["state"] for d in decisions if d["request_id"] == request_id), None)

    reply = a.chat(_chat(0, 0, nonce), headers={"x-request-id": f"through-redis-{nonce}"})
    assert reply.status == 200, reply
    assert latest_state(f"through-redis-{nonce}") == "redis"
    server.stop()
    # The first pick after the stop finds Redis gone; later ones do not try it (redis_down).
    for i in range(20):
        request_id = f"local-{i}-{nonce}"
        reply = a.chat(_chat(1, i % 3, nonce), headers={"x-request-id": request_id}, timeout=5.0)
        assert reply.status == 200, reply
        if a.metric("llmlb_redis_up") == 0.0:
            break
    reply = a.chat(_chat(2, 0, nonce), headers={"x-request-id": f"after-{nonce}"}, timeout=5.0)
    assert reply.status == 200, reply
    assert latest_state(f"after-{nonce}") == "local_fallback"
