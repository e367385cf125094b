"""SIGTERM drains: not ready at once, new streams served for drain_grace, open requests finish.

Buffered mode: once a request's response headers have passed, the picker is no longer needed
(the response body does not go through it), so the drain ends those streams with OK and exits
while the responses still stream. Full-duplex mode: response chunks pass through the picker, so
the drain waits for the responses to end, up to drain_timeout.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.procs import Gateway, MakeGateway, get, wait_until

pytestmark = pytest.mark.e2e

CHUNKS = 30
INTERVAL_MS = 100  # a 3 s streamed response


def read_stream(gw: Gateway, name: str) -> list[str]:
    headers = {"x-test-stream-chunks": str(CHUNKS), "x-test-stream-interval-ms": str(INTERVAL_MS)}
    with gw.stream([{"role": "user", "content": f"drain {name}"}], headers, timeout=20) as stream:
        assert stream.status == 200
        return list(stream.events(limit=CHUNKS + 5))


def start_streams(gw: Gateway, pool: ThreadPoolExecutor, count: int) -> list[Future[list[str]]]:
    futures = [pool.submit(read_stream, gw, str(i)) for i in range(count)]
    wait_until(
        lambda: sum(b.stats()["concurrent"] for b in gw.backends) == count,
        5.0,
        message=f"{count} streams to reach the backends",
    )
    return futures


def assert_complete(events: list[str]) -> None:
    assert len(events) == CHUNKS + 1, events[-3:]
    assert events[-1] == "[DONE]"


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor")
        return int(stub.Check(request, timeout=2.0).status)


def test_buffered_drain_serves_the_grace_then_exits_without_cutting_responses(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway("global_least_request", "buffered", daemon_config={"drain_grace": 2})
    assert gw.daemon is not None
    daemon = gw.daemon
    with ThreadPoolExecutor(4) as pool:
        streams = start_streams(gw, pool, 3)
        signalled = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: get(f"{daemon.admin_url}/readyz").status == 503, 0.5, message="readyz 503")
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(lambda: health_status(daemon.grpc_address) == not_serving, 0.5, message="NOT_SERVING")
        # Inside drain_grace a new request is still picked and served.
        reply = gw.chat([{"role": "user", "content": "during the grace"}])
        assert reply.status == 200, reply
        assert time.monotonic() - signalled < 2.0
        # The streams passed their response headers: the picker exits at the end of the grace,
        # while their responses are still streaming...
        assert daemon.proc.wait(10.0) == 0, daemon.proc.describe()
        exited = time.monotonic() - signalled
        assert 2.0 <= exited < 2.9, exited
        assert not any(f.done() for f in streams)
        # ...and every one of them still arrives whole.
        for future in streams:
            assert_complete(future.result(timeout=15))
    assert "cutting" not in daemon.proc.log_path.read_text()


def test_full_duplex_drain_waits_for_responses_to_end(make_gateway: MakeGateway) -> None:
    gw = make_gateway("global_least_request", "full-duplex", daemon_config={"drain_grace": 0})
    assert gw.daemon is not None
    with ThreadPoolExecutor(4) as pool:
        streams = start_streams(gw, pool, 2)
        signalled = time.monotonic()
        gw.daemon.proc.send_signal(signal.SIGTERM)
        for future in streams:
            assert_complete(future.result(timeout=15))
        assert gw.daemon.proc.wait(10.0) == 0, gw.daemon.proc.describe()
        assert time.monotonic() - signalled >= 2.0  # it waited for the 3 s responses


def test_drain_timeout_bounds_the_wait(make_gateway: MakeGateway) -> None:
    config = {"drain_grace": 0, "drain_timeout": 1}
    gw = make_gateway("global_least_request", "full-duplex", daemon_config=config)
    assert gw.daemon is not None
    with ThreadPoolExecutor(2) as pool:
        streams = start_streams(gw, pool, 1)
        signalled = time.monotonic()
        gw.daemon.proc.send_signal(signal.SIGTERM)
        assert gw.daemon.proc.wait(10.0) == 0, gw.daemon.proc.describe()
        assert 1.0 <= time.monotonic() - signalled < 2.5
        # Cut mid-response: the client sees a truncated stream, as the timeout said.
        try:
            events = streams[0].result(timeout=10)
        except OSError:
            events = []
        assert len(events) < CHUNKS + 1
    assert "cutting 1 open streams" in gw.daemon.proc.log_path.read_text()


def test_a_second_signal_cuts_the_drain_short(make_gateway: MakeGateway) -> None:
    gw = make_gateway("global_least_request", "buffered", daemon_config={"drain_grace": 30})
    assert gw.daemon is not None
    gw.daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: get(f"{gw.daemon.admin_url}/readyz").status == 503, 2.0, message="readyz 503")
    gw.daemon.proc.send_signal(signal.SIGTERM)
    assert gw.daemon.proc.wait(5.0) == 0
