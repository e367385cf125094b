"""`llmlb serve --workers 2` with shared state in Redis: every worker is one replica.

No Envoy: streams are opened directly, each on its own connection, until both workers hold some
(the kernel assigns connections to workers). The pool-wide counts in Redis must be exact across
the two workers, each worker must hold its own lease, and everything must be released.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import orjson
import pytest

from tests.shared_state.shared_helpers import ExtProcStream, inflight_hash, new_pool, target_of, write_config
from tests.support.procs import metric_sum, start_daemon, stop_all, wait_until
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

ENDPOINTS = ["10.13.0.1:8000", "10.13.0.2:8000", "10.13.0.3:8000"]
MAX_CONNECTIONS = 40


def test_workers_are_replicas_with_exact_pool_wide_counts(redis_server: RedisServer, tmp_path: Path) -> None:
    pool = new_pool()
    config = write_config(
        tmp_path / "w.yaml", pool=pool, policy="global_least_request", port=redis_server.port
    )
    daemon = start_daemon(ENDPOINTS, "global_least_request", tmp_path, name="workers-redis",
                          extra_args=["--config", str(config), "--workers", "2"])  # fmt: skip
    target = target_of("redis", redis_server)
    held: list[tuple[ExtProcStream, grpc.Channel]] = []

    def worker_streams() -> list[float]:
        return [s.value for s in daemon.metrics() if s.name == "llmlb_worker_streams_total"]

    try:
        wait_until(lambda: metric_sum(daemon.metrics(), "llmlb_redis_up") == 1, timeout=10,
                   message="both workers on Redis")  # fmt: skip
        nonce = uuid.uuid4().hex[:6]
        while len(held) < 6 or min(worker_streams()) == 0:
            assert len(held) < MAX_CONNECTIONS, f"every connection reached one worker: {worker_streams()}"
            channel = grpc.insecure_channel(
                daemon.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            stream = ExtProcStream(channel)
            body = orjson.dumps(
                {"model": "test-model", "messages": [{"role": "user", "content": f"{nonce} {len(held)}"}]}
            )
            stream.pick(body)
            held.append((stream, channel))
        counts = inflight_hash(target, pool)
        assert sum(counts.values()) == len(held), counts
        assert max(counts.values()) - min(counts.values()) <= 1, (
            f"least request across both workers: {counts}"
        )
        leases = target.client().zrange(f"llmlb:{{{pool}}}:leases", 0, -1)
        assert len(leases) == 2, f"one lease per worker: {leases}"
        views = daemon.debug_endpoints()
        assert all(v["shared_view"] for v in views)
        assert sum(v["local_inflight"] for v in views) == len(held)
    finally:
        for stream, channel in held:
            stream.cancel()
            channel.close()
    try:
        wait_until(lambda: sum(inflight_hash(target, pool).values()) == 0, timeout=10,
                   message="every release reached Redis")  # fmt: skip
    finally:
        stop_all([daemon.proc])
