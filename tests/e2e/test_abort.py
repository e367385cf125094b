"""In-flight accounting: every way a request ends returns the picker's count to 0."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.support.procs import HOST, Gateway, metric_sum, wait_until

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


def test_abort_while_backend_thinks_releases_inflight(lr_gateway: Gateway) -> None:
    """Non-streaming: the client gives up while the backend is still working on the answer."""
    daemon = lr_gateway.daemon
    assert daemon is not None
    conn = http.client.HTTPConnection(HOST, lr_gateway.envoy.port, timeout=5)
    try:
        body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "think hard"}]})
        conn.request("POST", "/v1/chat/completions", body, {"x-test-delay-ms": "1000"})
        wait_until(lambda: sum(daemon.inflight().values()) == 1, 3.0, message="the request to be in flight")
    finally:
        conn.close()
    daemon.wait_idle(5.0)


def test_upstream_error_releases_inflight(lr_gateway: Gateway) -> None:
    reply = lr_gateway.chat([{"role": "user", "content": "fail please"}], headers={"x-test-status": "500"})
    assert reply.status == 500, reply
    assert reply.served_by in {b.name for b in lr_gateway.backends}
    assert lr_gateway.daemon is not None
    lr_gateway.daemon.wait_idle(5.0)
