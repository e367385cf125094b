"""A model server that dies is taken out of rotation after one failed request, not minutes later."""

from __future__ import annotations

import time

import pytest

from tests.support.procs import Gateway, start_backends, start_daemon, start_envoy, stop_all, wait_until

pytestmark = pytest.mark.e2e


def test_a_dead_endpoint_stops_getting_traffic(tmp_path):
    backends = start_backends(3, tmp_path, prefix="d")
    daemon = envoy = None
    try:
        # Probes every 60 s: only passive detection can be quick enough for this test.
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("health_check_interval: 60000\n")
        addresses = [b.address for b in backends]
        daemon = start_daemon(addresses, "global_least_request", tmp_path, extra_args=["--config", str(cfg)])
        envoy = start_envoy(addresses, daemon.grpc_port, "buffered", tmp_path)
        gw = Gateway("global_least_request", "buffered", envoy, daemon, backends)
        assert all(gw.chat([{"role": "user", "content": f"warm {i}"}]).status == 200 for i in range(6))

        dead = backends[0]
        dead.proc.stop()
        started = time.monotonic()
        failures = 0
        for i in range(12):
            failures += gw.chat([{"role": "user", "content": f"after {i}"}], timeout=5).status != 200
        # One request finds the endpoint dead (two if it races the confirming probe); without
        # passive detection about a third of them would fail until the next probe round.
        assert failures <= 2, f"{failures} of 12 requests failed after the endpoint died"
        wait_until(
            lambda: {e["address"]: e["healthy"] for e in daemon.debug_endpoints()}[dead.address] is False,
            timeout=5,
            message="the dead endpoint marked unhealthy",
        )
        assert time.monotonic() - started < 10
        later = [gw.chat([{"role": "user", "content": f"later {i}"}]) for i in range(6)]
        assert [r.status for r in later] == [200] * 6
        assert dead.name not in {r.served_by for r in later}
    finally:
        stop_all(
            [envoy.proc if envoy else None, daemon.proc if daemon else None, *(b.proc for b in backends)]
        )
