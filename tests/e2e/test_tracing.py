"""Traces through real Envoy: a request carrying a W3C ``traceparent`` gets a ``llmlb.pick`` span
at a real OTLP receiver (the OpenTelemetry Collector of ``make otel-bin``) in the request's trace,
child of the header's span, with the decision record Envoy's access log shows as its attributes.
Both Envoy modes; a TLS receiver; an unreachable receiver (requests still served, shutdown within
its bound); ``--workers 2`` (each worker exports its own spans)."""

from __future__ import annotations

import json
import math
import secrets
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmlb.decision import RECORD_FIELDS
from llmlb.tracing import SHUTDOWN_TIMEOUT_S, SPAN_NAME
from tests.support.certs import CA
from tests.support.conversations import opening
from tests.support.extproc_client import ExtProcCall, picked_header
from tests.support.otel import Collector, Span, require_collector, start_collector, wait_quiet
from tests.support.procs import Gateway, MakeGateway, free_port, start_daemon, wait_until

pytestmark = pytest.mark.e2e

SPAN_KIND_SERVER = 2


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    require_collector()
    started = start_collector(tmp_path_factory.mktemp("otel"))
    yield started
    started.stop()


def _traced(collector: Collector, **more: Any) -> dict[str, Any]:
    return {"log_format": "json", "tracing": {"otlp_endpoint": collector.endpoint, **more}}


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}", trace_id, parent_id


def _access_line(gw: Gateway, request_id: str) -> dict[str, Any]:
    """Envoy's access log line of the request (the decision record under ``llmlb``)."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        lines = gw.envoy.proc.log_path.read_text(errors="replace").splitlines()
        found[:] = [
            entry
            for line in lines
            if line.startswith("{") and (entry := json.loads(line)).get("request_id") == request_id
        ]
        return bool(found)

    wait_until(logged, 10.0, message=f"Envoy's access log line of {request_id}")
    return found[0]


def _span_of(collector: Collector, trace_id: str) -> Span:
    [span] = collector.wait_for_spans(lambda s: s.trace_id == trace_id, what=f"the span of trace {trace_id}")
    return span


def _assert_span_is_the_record(span: Span, record: dict[str, Any]) -> None:
    assert span.name == SPAN_NAME
    assert span.kind == SPAN_KIND_SERVER
    attributes = {k.removeprefix("llmlb."): v for k, v in span.attributes.items()}
    # Every field of the record, with the same values (empty strings are left out of the span).
    assert set(attributes) == {k for k, v in record.items() if v != ""}, (attributes, record)
    assert set(attributes) <= set(RECORD_FIELDS)
    for name, value in attributes.items():
        if isinstance(value, float):
            assert math.isclose(value, float(record[name]), rel_tol=1e-9), name
        else:
            assert value == record[name], name
    # The span is the pick: it lasts what the record says the pick took.
    assert abs((span.end_ns - span.start_ns) / 1e3 - record["pick_us"]) <= 1.0


def test_a_trace_reaches_the_receiver_with_the_decision(
    make_gateway: MakeGateway, mode: str, collector: Collector
) -> None:
    gw = make_gateway("prefix_cache", mode, daemon_config=_traced(collector))
    messages = opening(0, uuid.uuid4().hex)
    seen = []
    for turn in range(2):
        traceparent, trace_id, parent_id = _traceparent()
        request_id = f"trace-{uuid.uuid4()}"
        headers = {"x-request-id": request_id, "traceparent": traceparent, "tracestate": "vendor=t"}
        reply = gw.chat(messages, headers=headers)
        assert reply.status == 200, reply
        record = _access_line(gw, request_id)["llmlb"]
        span = _span_of(collector, trace_id)
        # The request's trace, continued: the span is a child of the header's span.
        assert span.parent_span_id == parent_id
        assert span.trace_state == "vendor=t"
        _assert_span_is_the_record(span, record)
        assert span.attributes["llmlb.request_id"] == request_id
        assert span.attributes["llmlb.endpoint"] == gw.address_of(reply.served_by)
        assert span.resource["service.name"] == "llmlb"
        seen.append(span)
        messages.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
        messages.append({"role": "user", "content": f"turn {turn}: and then?"})
    first, second = seen
    assert first.attributes["llmlb.reason"] == "least_request"
    assert second.attributes["llmlb.reason"] == "prefix_hit"
    assert second.attributes["llmlb.prefix_depth"] > 0


def test_unsampled_parents_and_ratio_zero_export_nothing(
    make_gateway: MakeGateway, collector: Collector
) -> None:
    gw = make_gateway("global_least_request", "buffered", daemon_config=_traced(collector, sample_ratio=0))
    not_sampled, unsampled_trace, _ = _traceparent(sampled=False)
    sampled, sampled_trace, _ = _traceparent(sampled=True)
    request_ids = [f"ratio0-{uuid.uuid4()}" for _ in range(3)]
    assert gw.chat([{"role": "user", "content": "a"}], {"traceparent": not_sampled}).status == 200
    assert gw.chat([{"role": "user", "content": "b"}], {"x-request-id": request_ids[0]}).status == 200
    # A sampled parent is followed whatever the ratio.
    assert gw.chat([{"role": "user", "content": "c"}], {"traceparent": sampled}).status == 200
    _span_of(collector, sampled_trace)
    spans = wait_quiet(collector)
    assert not [s for s in spans if s.trace_id == unsampled_trace]
    assert not [s for s in spans if s.attributes.get("llmlb.request_id") in request_ids]


def test_tls_receiver(make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CA()
    cert, key = ca.server().write(tmp_path / "tls", "otel")
    receiver = start_collector(tmp_path / "otel-tls", tls=(cert, key), name="otelcol-tls")
    try:
        assert receiver.endpoint.startswith("https://")
        # The picker trusts the test CA through the standard OTLP variable.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(ca.write(tmp_path / "tls")))
        gw = make_gateway("global_least_request", "full-duplex", daemon_config=_traced(receiver))
        traceparent, trace_id, parent_id = _traceparent()
        assert gw.chat([{"role": "user", "content": "over TLS"}], {"traceparent": traceparent}).status == 200
        span = _span_of(receiver, trace_id)
        assert span.parent_span_id == parent_id
        assert span.attributes["llmlb.policy"] == "global_least_request"
    finally:
        receiver.stop()


@pytest.fixture(params=["refused", "silent"])
def nowhere(request: pytest.FixtureRequest) -> Iterator[str]:
    """A receiver address that refuses connections, or one that accepts them (the kernel does)
    and never answers: every export there runs into its deadline."""
    if request.param == "refused":
        yield f"http://127.0.0.1:{free_port()}"
        return
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


def test_unreachable_receiver_costs_no_request_and_a_bounded_shutdown(
    make_gateway: MakeGateway, nowhere: str
) -> None:
    config = {"drain_grace": 0, "tracing": {"otlp_endpoint": nowhere}}
    gw = make_gateway("prefix_cache", "buffered", daemon_config=config)
    for i in range(20):
        traceparent, _, _ = _traceparent()
        reply = gw.chat([{"role": "user", "content": f"nobody listens {i}"}], {"traceparent": traceparent})
        assert reply.status == 200, reply
    assert gw.daemon is not None
    # Let a few exports fail (and retry) before stopping.
    time.sleep(1.5)
    started = time.monotonic()
    gw.daemon.proc.send_signal(signal.SIGTERM)
    code = gw.daemon.proc.wait(SHUTDOWN_TIMEOUT_S + 5.0)
    took = time.monotonic() - started
    log = gw.daemon.proc.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert took <= SHUTDOWN_TIMEOUT_S + 2.0, (took, log[-3000:])
    assert "Traceback" not in log, log[-3000:]


def _traced_pick(address: str, traceparent: str) -> str:
    """One header-only request with a traceparent straight on the picker's gRPC port, over a new
    connection (so the kernel may hand it to either worker); returns the endpoint picked."""
    # Not /v1/models (the picker may answer that itself): any other path is picked by load.
    values = {":method": "GET", ":path": "/v1/files", "traceparent": traceparent}
    request = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
            ),
            end_of_stream=True,
        )
    )
    with grpc.insecure_channel(address) as channel:
        call = ExtProcCall(channel)
        call.send(request)
        answer = call.recv()
        call.close()
        return picked_header(answer.request_headers.response.header_mutation)


def test_each_worker_exports_its_own_spans(backends: list[Any], tmp_path: Path, collector: Collector) -> None:
    path = tmp_path / "traced.yaml"
    path.write_text(yaml.safe_dump(_traced(collector)))
    daemon = start_daemon(
        [b.address for b in backends],
        "global_least_request",
        tmp_path,
        name="llmlb-traced-workers",
        extra_args=["--config", str(path), "--workers", "2"],
        ready_timeout=60.0,
    )
    try:
        traces: set[str] = set()
        for _ in range(40):  # 40 connections: all on one worker by chance is 2^-39
            traceparent, trace_id, _ = _traceparent()
            assert _traced_pick(daemon.grpc_address, traceparent) in daemon.endpoints
            traces.add(trace_id)

        def workers() -> set[int]:
            return {int(s.resource["llmlb.worker"]) for s in collector.spans() if s.trace_id in traces}

        wait_until(lambda: workers() == {0, 1}, 15.0, message=f"spans from both workers (have {workers()})")
        wait_until(
            lambda: len({s.trace_id for s in collector.spans()} & traces) == len(traces),
            15.0,
            message="a span for every pick",
        )
        # Each worker a process of its own.
        pids = {s.resource["process.pid"] for s in collector.spans() if s.trace_id in traces}
        assert len(pids) == 2
    finally:
        daemon.stop()
