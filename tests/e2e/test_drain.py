"""SIGTERM lets an in-flight request finish, then the daemon exits 0."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.procs import MakeGateway, wait_until

pytestmark = pytest.mark.e2e


def test_sigterm_drains_inflight_request(make_gateway: MakeGateway) -> None:
    gw = make_gateway("global_least_request", "buffered")
    assert gw.daemon is not None
    daemon = gw.daemon
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            gw.chat, [{"role": "user", "content": "drain me"}], {"x-test-delay-ms": "1500"}, 15
        )
        wait_until(
            lambda: sum(b.stats()["concurrent"] for b in gw.backends) == 1,
            5.0,
            message="the request to reach a backend",
        )
        daemon.proc.send_signal(signal.SIGTERM)
        reply = pending.result(timeout=15)
    assert reply.status == 200, reply
    assert daemon.proc.wait(10.0) == 0, daemon.proc.describe()
