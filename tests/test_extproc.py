"""The ext_proc wire protocol, spoken directly to a real `llmlb serve` over gRPC (no Envoy).

These pin down the message-level contract that the end-to-end tests exercise through Envoy:
what each processing mode answers and when, chunking, immediate responses and ticket release.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.extproc_client import DEST, ExtProcCall, picked_header
from tests.support.procs import Daemon, metric_sum, start_daemon, wait_until

Mode = processing_mode_pb2.ProcessingMode
ENDPOINTS = ["10.11.0.1:8000", "10.11.0.2:8000", "10.11.0.3:8000"]
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
TIMEOUT = 10.0


def _start(tmp_path: Path, name: str, config: dict) -> Daemon:
    path = tmp_path / f"{name}.yaml"
    # No health probes: the endpoints here are unroutable addresses that must stay "healthy".
    path.write_text(json.dumps({"health_check_interval": 0, **config}))
    endpoints = config.get("endpoints", ENDPOINTS)
    return start_daemon(endpoints, config.get("lb_policy", "prefix_cache"), tmp_path, name=name,
                        extra_args=["--config", str(path)])  # fmt: skip


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = _start(tmp_path_factory.mktemp("extproc"), "llmlb", {"endpoints": ENDPOINTS})
    yield d
    d.stop()


@pytest.fixture(scope="module")
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    limit = 64 * 1024 * 1024
    with grpc.insecure_channel(
        daemon.grpc_address,
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    ) as ch:
        yield ch


def headers(body_mode: int, response_mode: int = Mode.NONE, *, end_of_stream: bool = False,
            extra: dict[str, str] | None = None) -> pb.ProcessingRequest:  # fmt: skip
    values = {":method": "POST", ":path": "/v1/chat/completions", **(extra or {})}
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
            ),
            end_of_stream=end_of_stream,
        ),
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=body_mode, response_body_mode=response_mode
        ),
    )


def body(data: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def metadata_pick(response: pb.ProcessingResponse) -> str:
    return response.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value


def test_buffered_strips_client_header_then_picks_in_the_body_answer(channel):
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.BUFFERED, extra={DEST: "6.6.6.6:1"}))
    first = call.recv()
    assert list(first.request_headers.response.header_mutation.remove_headers) == [DEST]
    call.send(body(CHAT))
    answer = call.recv()
    endpoint = picked_header(answer.request_body.response.header_mutation)
    assert endpoint in ENDPOINTS
    assert metadata_pick(answer) == endpoint
    call.close()


def test_full_duplex_holds_headers_until_the_body_ends_and_streams_it_back(channel):
    payload = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 150_000}]})
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED))
    call.send(body(payload[:70_000], end_of_stream=False))
    assert call.nothing_within(0.3), "the headers answer must wait for the whole body"
    call.send(body(payload[70_000:], end_of_stream=False))
    call.send(body(b"", end_of_stream=True))
    first = call.recv()
    assert picked_header(first.request_headers.response.header_mutation) in ENDPOINTS
    assert metadata_pick(first) in ENDPOINTS
    echoed = b""
    while True:
        chunk = call.recv().request_body.response.body_mutation.streamed_response
        assert len(chunk.body) <= 62_000
        echoed += chunk.body
        if chunk.end_of_stream:
            break
    assert echoed == payload
    # Response chunks are echoed as they come.
    call.send(pb.ProcessingRequest(response_headers=pb.HttpHeaders()))
    assert call.recv().HasField("response_headers")
    call.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: 1\n\n", end_of_stream=False)))
    echo = call.recv().response_body.response.body_mutation.streamed_response
    assert (echo.body, echo.end_of_stream) == (b"data: 1\n\n", False)
    call.close()


def test_headers_only_modes_pick_on_the_headers(channel):
    for request in (headers(Mode.NONE), headers(Mode.BUFFERED, end_of_stream=True)):
        call = ExtProcCall(channel, TIMEOUT)
        call.send(request)
        answer = call.recv()
        assert picked_header(answer.request_headers.response.header_mutation) in ENDPOINTS
        call.close()


def test_large_buffered_body_is_accepted(channel):
    big = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "y" * (9 * 1024 * 1024)}]})
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.BUFFERED))
    call.recv()
    call.send(body(big))
    assert picked_header(call.recv().request_body.response.header_mutation) in ENDPOINTS
    call.close()


def test_a_cancelled_stream_releases_its_pick(channel, daemon):
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.BUFFERED))
    call.recv()
    call.send(body(CHAT))
    endpoint = picked_header(call.recv().request_body.response.header_mutation)
    assert daemon.inflight()[endpoint] == 1
    call.cancel()
    wait_until(lambda: daemon.inflight()[endpoint] == 0, timeout=5, message="in-flight back to 0")


def test_a_finished_stream_releases_its_pick(channel, daemon):
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.NONE))
    endpoint = picked_header(call.recv().request_headers.response.header_mutation)
    call.send(pb.ProcessingRequest(response_headers=pb.HttpHeaders(end_of_stream=True)))
    call.recv()
    call.close()
    wait_until(lambda: daemon.inflight()[endpoint] == 0, timeout=5, message="in-flight back to 0")


def test_a_malformed_message_ends_its_stream_with_invalid_argument_and_releases_its_pick(channel, daemon):
    # Raw bytes on the ext_proc method: what a broken client, not Envoy, might send.
    process = channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ProcessingResponse.FromString,
    )
    truncated_body = b"\x22\x05\x01"
    answers = process(iter([headers(Mode.NONE).SerializeToString(), truncated_body]), timeout=TIMEOUT)
    endpoint = picked_header(next(answers).request_headers.response.header_mutation)
    with pytest.raises(grpc.RpcError) as failed:
        next(answers)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in failed.value.details()
    wait_until(lambda: daemon.inflight()[endpoint] == 0, timeout=5, message="in-flight back to 0")
    assert metric_sum(daemon.metrics(), "llmlb_extproc_stream_errors_total", kind="malformed") == 1
    # The daemon goes on serving other streams.
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.NONE))
    assert picked_header(call.recv().request_headers.response.header_mutation) in ENDPOINTS
    call.cancel()


def test_grpc_health_is_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _immediate(daemon: Daemon) -> pb.ImmediateResponse:
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        call = ExtProcCall(ch, TIMEOUT)
        call.send(headers(Mode.BUFFERED))
        call.recv()
        call.send(body(CHAT))
        answer = call.recv()
        call.close()
    assert answer.HasField("immediate_response"), answer
    return answer.immediate_response


def test_no_endpoints_answers_503_in_openai_error_shape(tmp_path):
    d = _start(tmp_path, "empty", {"endpoints": []})
    try:
        reply = _immediate(d)
    finally:
        d.stop()
    assert reply.status.code == 503
    error = orjson.loads(reply.body)["error"]
    assert error["code"] == 503
    assert error["type"] == "service_unavailable"
    assert "no model-server endpoints" in error["message"]


def test_max_request_count_answers_429_with_retry_after(tmp_path):
    d = _start(
        tmp_path,
        "capped",
        {
            "endpoints": ENDPOINTS[:1],
            "lb_policy": "global_least_request",
            "lb_config": {"maxRequestCount": 1},
        },
    )
    try:
        with grpc.insecure_channel(d.grpc_address) as ch:
            holder = ExtProcCall(ch, TIMEOUT)
            holder.send(headers(Mode.NONE))
            holder.recv()  # one request in flight on the only endpoint
            reply = _immediate(d)
            holder.close()
    finally:
        d.stop()
    assert reply.status.code == 429
    sent = {h.header.key: h.header.raw_value for h in reply.headers.set_headers}
    assert sent["retry-after"] == b"1"
    assert orjson.loads(reply.body)["error"]["code"] == 429
