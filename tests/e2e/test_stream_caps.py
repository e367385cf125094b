"""The ext_proc stream caps against a real `llmlb serve`: grpc_max_streams (total, refused with
RESOURCE_EXHAUSTED before any pick) and grpc_max_streams_per_connection (HTTP/2
SETTINGS_MAX_CONCURRENT_STREAMS: the peer holds further streams back)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.extproc_client import ExtProcCall, bodyless_request
from tests.support.procs import Daemon, metric_sum, start_daemon, wait_until

pytestmark = pytest.mark.e2e

ENDPOINTS = ["10.13.0.1:8000", "10.13.0.2:8000", "10.13.0.3:8000"]


def capped_daemon(tmp_path: Path, **caps: int) -> Iterator[Daemon]:
    config = tmp_path / "caps.yaml"
    config.write_text(json.dumps({"health_check_interval": 0, **caps}))
    daemon = start_daemon(
        ENDPOINTS, "global_least_request", tmp_path, extra_args=["--config", str(config)], name="llmlb-caps"
    )
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def total_capped(tmp_path: Path) -> Iterator[Daemon]:
    yield from capped_daemon(tmp_path, grpc_max_streams=3)


@pytest.fixture
def connection_capped(tmp_path: Path) -> Iterator[Daemon]:
    yield from capped_daemon(tmp_path, grpc_max_streams_per_connection=2)


def counters(daemon: Daemon) -> tuple[float, float, int]:
    samples = daemon.metrics()
    return (
        metric_sum(samples, "llmlb_extproc_streams_total"),
        metric_sum(samples, "llmlb_extproc_stream_errors_total", kind="over_capacity"),
        sum(daemon.inflight().values()),
    )


def test_the_stream_beyond_grpc_max_streams_is_refused(total_capped: Daemon) -> None:
    daemon = total_capped
    # Two connections: the cap counts streams across connections.
    with (
        grpc.insecure_channel(daemon.grpc_address) as one,
        grpc.insecure_channel(daemon.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)]) as two,
    ):
        calls = [ExtProcCall(ch) for ch in (one, one, two)]
        for call in calls:
            call.send(bodyless_request())
            assert call.recv().HasField("request_headers")
        assert counters(daemon) == (3, 0, 3)
        for channel in (one, two):
            extra = ExtProcCall(channel, timeout=5.0)
            extra.send(bodyless_request())
            with pytest.raises(AssertionError, match="RESOURCE_EXHAUSTED"):
                extra.recv()
        # Refused before a pick: in flight counts only the first three.
        assert counters(daemon) == (5, 2, 3)
        calls[0].close()
        wait_until(lambda: sum(daemon.inflight().values()) == 2, 5.0, message="the first stream to end")
        again = ExtProcCall(one)
        again.send(bodyless_request())
        assert again.recv().HasField("request_headers")  # room again
        assert counters(daemon) == (6, 2, 3)
        for call in (*calls[1:], again):
            call.close()
        daemon.wait_idle()


def test_a_third_stream_on_one_connection_is_held_back_not_failed(connection_capped: Daemon) -> None:
    daemon = connection_capped
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        # Streams opened while the channel still connects are started in no set order once it is
        # ready, so the third could take a slot first: connect, then open them one by one.
        grpc.channel_ready_future(channel).result(timeout=10.0)
        first, second = ExtProcCall(channel, timeout=10.0), ExtProcCall(channel, timeout=10.0)
        for call in (first, second):
            call.send(bodyless_request())
            assert call.recv().HasField("request_headers")
        third = ExtProcCall(channel, timeout=10.0)
        third.send(bodyless_request())
        # The client's HTTP/2 stack keeps the third stream waiting: the daemon never sees it.
        assert third.nothing_within(1.0)
        assert counters(daemon) == (2, 0, 2)
        first.close()
        assert third.recv(timeout=5.0).HasField("request_headers")  # served once a slot frees
        assert metric_sum(daemon.metrics(), "llmlb_extproc_streams_total") == 3
        assert metric_sum(daemon.metrics(), "llmlb_extproc_stream_errors_total") == 0
        second.close()
        third.close()
        daemon.wait_idle()
