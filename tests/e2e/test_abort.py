"""A client that drops a streaming request returns the picker's in-flight count to 0."""

from __future__ import annotations

import pytest
from tests.support.procs import Gateway, metric_sum, wait_until

pytestmark = pytest.mark.e2e


def test_client_abort_releases_inflight(lr_gateway: Gateway) -> None:
    gw = lr_gateway
    daemon = gw.daemon
    assert daemon is not None
    headers = {"x-test-stream-chunks": "20", "x-test-stream-interval-ms": "100"}
    stream = gw.stream([{"role": "user", "content": "a long story, please"}], headers, timeout=10)
    try:
        assert stream.status == 200
        served = gw.address_of(stream.headers["x-served-by"])
        for _ in range(2):
            assert stream.next_event() is not None
        inflight = daemon.inflight()
        assert inflight[served] == 1, inflight
        assert sum(inflight.values()) == 1, inflight
        assert metric_sum(daemon.metrics(), "llmlb_inflight_requests", endpoint=served) == 1
    finally:
        stream.abort()
    daemon.wait_idle(5.0)
    assert metric_sum(daemon.metrics(), "llmlb_inflight_requests") == 0
    backend = gw.backend(gw.name_of(served))
    stats = wait_until(
        lambda: (s := backend.stats())["aborted"] == 1 and s,
        5.0,
        message="backend to see the upstream reset",
    )
    assert stats["concurrent"] == 0
    assert stats["completed"] == 0
