"""The ext_proc transport (``llmlb._core.ExtProcTransport``) driven from a real gRPC client:
events and answers, the response-chunk hand-over, health, refusals, limits and shutdown."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmlb._core import ExtProcMessage, ExtProcTransport, echo_response_chunk
from tests.support.extproc_client import ExtProcCall

T = ExtProcTransport
WAIT_S = 5.0
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"


def _transport(**overrides: object) -> ExtProcTransport:
    settings: dict[str, object] = {
        "reuse_port": False,
        "max_streams_per_connection": 100,
        "max_message_bytes": 1 << 20,
    }
    settings.update(overrides)
    address = str(settings.pop("address", "127.0.0.1:0"))
    return ExtProcTransport(address, **settings)  # type: ignore[arg-type]


@pytest.fixture
def transport() -> Iterator[ExtProcTransport]:
    t = _transport()
    yield t
    t.close()


@pytest.fixture
def channel(transport: ExtProcTransport) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{transport.port}") as ch:
        yield ch


def _events(transport: ExtProcTransport, count: int) -> list[tuple[int, int, ExtProcMessage | None]]:
    """At least ``count`` events (waits a bounded time for them)."""
    got: list[tuple[int, int, ExtProcMessage | None]] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < count and time.monotonic() < deadline:
        got.extend(transport.take_events())
        time.sleep(0.005)
    return got


def _open(
    transport: ExtProcTransport, channel: grpc.Channel, first: pb.ProcessingRequest
) -> tuple[ExtProcCall, int]:
    """A stream with its first message taken by the service: the call and the stream's id."""
    call = ExtProcCall(channel, WAIT_S)
    call.send(first)
    (stream, _, _), _ = _events(transport, 2)
    return call, stream


def _chunk(data: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


def _answer(stream: int, answer: pb.ProcessingResponse) -> list[tuple[int, bytes]]:
    return [(stream, answer.SerializeToString())]


def _echo(chunk: pb.ProcessingRequest) -> pb.ProcessingResponse:
    body = chunk.response_body
    return pb.ProcessingResponse.FromString(echo_response_chunk(body.body, body.end_of_stream))


def test_messages_reach_the_service_in_order_and_answers_the_client(
    transport: ExtProcTransport, channel: grpc.Channel
) -> None:
    call = ExtProcCall(channel, WAIT_S)
    call.send(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    call.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * 100_000, end_of_stream=True)))
    events = _events(transport, 3)
    (stream, opened, _), (_, kind1, first), (_, kind2, second) = events
    assert (opened, kind1, kind2) == (T.OPENED, T.MESSAGE, T.MESSAGE)
    assert first is not None
    assert first.phase == ExtProcMessage.REQUEST_HEADERS
    assert second is not None
    assert (second.phase, second.body, second.end_of_stream) == (
        ExtProcMessage.REQUEST_BODY,
        b"x" * 100_000,
        True,
    )
    headers = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    body = pb.ProcessingResponse(request_body=pb.BodyResponse())
    transport.send(_answer(stream, headers) + _answer(stream, body), [])
    assert call.recv() == headers
    assert call.recv() == body
    call.close()
    assert [kind for _, kind, _ in _events(transport, 1)] == [T.ENDED]
    transport.send([], [(stream, 0, "")])


def test_after_the_hand_over_response_chunks_are_echoed_without_the_service(
    transport: ExtProcTransport, channel: grpc.Channel
) -> None:
    call, stream = _open(transport, channel, pb.ProcessingRequest(response_headers=pb.HttpHeaders()))
    # A chunk that is not yet taken by the service: the hand-over must wait for it.
    call.send(_chunk(b"early"))
    time.sleep(0.2)
    assert transport.send([], [], [(stream, 1)]) == []
    (_, kind, early) = _events(transport, 1)[0]
    assert kind == T.MESSAGE
    assert early is not None
    headers_answer = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    early_echo = echo_response_chunk(early.body, early.end_of_stream)
    # The answers of the batch go out before its hand-over takes.
    handed = transport.send([*_answer(stream, headers_answer), (stream, early_echo)], [], [(stream, 2)])
    assert handed == [stream]
    chunks = [_chunk(f"data: {n}\n\n".encode() * (n + 1)) for n in range(20)] + [_chunk(b"", end=True)]
    for chunk in chunks:
        call.send(chunk)
    # Everything answered before the hand-over comes first, then every chunk echoed in order.
    assert call.recv() == headers_answer
    assert call.recv().SerializeToString() == early_echo
    for chunk in chunks:
        assert call.recv() == _echo(chunk)
    # None of the echoed chunks reached the service; trailers still do.
    call.send(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    (_, kind, trailers) = _events(transport, 1)[0]
    assert kind == T.MESSAGE
    assert trailers is not None
    assert trailers.phase == ExtProcMessage.RESPONSE_TRAILERS
    transport.send([], [(stream, 0, "")])
    call.close()


def test_a_hand_over_of_an_unknown_stream_fails(transport: ExtProcTransport) -> None:
    assert transport.send([], [], [(12345, 0)]) == []


def test_a_client_reset_is_an_event_and_a_status_ends_the_stream(
    transport: ExtProcTransport, channel: grpc.Channel
) -> None:
    call, stream = _open(transport, channel, pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    call.call.cancel()
    assert [kind for _, kind, _ in _events(transport, 1)] == [T.RESET]
    transport.send([], [(stream, 0, "")])
    deadline = time.monotonic() + WAIT_S
    while transport.open_streams and time.monotonic() < deadline:
        time.sleep(0.01)
    assert transport.open_streams == 0


def test_the_service_status_reaches_the_client(transport: ExtProcTransport, channel: grpc.Channel) -> None:
    call, stream = _open(transport, channel, pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    transport.send([], [(stream, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "llmlb: 100% full")])
    with pytest.raises(AssertionError) as failed:
        call.recv()
    error = failed.value.args[0]
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "llmlb: 100% full"


def test_a_message_over_the_limit_ends_its_stream() -> None:
    transport = _transport(max_message_bytes=1000)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{transport.port}") as channel:
            call = ExtProcCall(channel, WAIT_S)
            call.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * 2000)))
            with pytest.raises(AssertionError) as failed:
                call.recv()
            assert failed.value.args[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            kinds = [kind for _, kind, _ in _events(transport, 2)]
            assert kinds == [T.OPENED, T.RESET]  # the service ends its side of it
    finally:
        transport.close()


def test_health_follows_serving_and_knows_its_services(
    transport: ExtProcTransport, channel: grpc.Channel
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    status = health_pb2.HealthCheckResponse
    check = health_pb2.HealthCheckRequest
    assert stub.Check(check(service=""), timeout=WAIT_S).status == status.NOT_SERVING
    transport.set_serving(True)
    for service in ("", EXT_PROC):
        assert stub.Check(check(service=service), timeout=WAIT_S).status == status.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(check(service="other"), timeout=WAIT_S)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    transport.set_serving(False)
    assert stub.Check(check(service=EXT_PROC), timeout=WAIT_S).status == status.NOT_SERVING


def test_a_transport_that_stops_accepting_refuses_new_streams(
    transport: ExtProcTransport, channel: grpc.Channel
) -> None:
    transport.set_accepting(False)
    call = ExtProcCall(channel, WAIT_S)
    call.send(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    with pytest.raises(AssertionError) as failed:
        call.recv()
    assert failed.value.args[0].code() == grpc.StatusCode.UNAVAILABLE
    assert transport.take_events() == []


def test_close_ends_open_streams_unavailable(transport: ExtProcTransport, channel: grpc.Channel) -> None:
    call = ExtProcCall(channel, WAIT_S)
    call.send(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    _events(transport, 2)
    transport.close()
    with pytest.raises(AssertionError) as failed:
        call.recv()
    assert failed.value.args[0].code() == grpc.StatusCode.UNAVAILABLE
    transport.close()  # idempotent


def test_streams_finished_before_close_keep_their_status() -> None:
    """A drain ends the streams that need nothing more with OK, then closes the transport: the
    close must not overtake those finishes with UNAVAILABLE (Envoy would cut their responses)."""
    for _ in range(5):
        transport = _transport()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{transport.port}") as channel:
                calls = [ExtProcCall(channel, WAIT_S) for _ in range(10)]
                for call in calls:
                    call.send(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
                streams = sorted({stream for stream, _, _ in _events(transport, 2 * len(calls))})
                assert len(streams) == len(calls)
                transport.send([], [(stream, 0, "") for stream in streams], [])
                transport.close()
                assert [call.call.code() for call in calls] == [grpc.StatusCode.OK] * len(calls)
        finally:
            transport.close()


def test_a_taken_port_fails_unless_both_share_it() -> None:
    first = _transport()
    try:
        address = f"127.0.0.1:{first.port}"
        with pytest.raises(OSError, match="in use"):
            _transport(address=address)
    finally:
        first.close()
    shared = [_transport(reuse_port=True)]
    try:
        shared.append(_transport(address=f"127.0.0.1:{shared[0].port}", reuse_port=True))
    finally:
        for t in shared:
            t.close()


def test_bad_addresses_and_tls_material_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="not an ip:port address"):
        _transport(address="localhost:1")
    with pytest.raises(ValueError, match="grpc_tls"):
        _transport(tls=(b"not pem", b"not pem", None))
