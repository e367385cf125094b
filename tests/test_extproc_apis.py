"""The ext_proc protocol for the APIs beyond chat, spoken directly to a real `llmlb serve`:
stored-response ids learned from response bodies (BUFFERED asks for them with mode_override,
FULL_DUPLEX reads the echoed chunks), ``GET /v1/models`` and ``model_not_found`` answered by the
picker, and paths that are routed by load without reading the body."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tests.support.extproc_client import ExtProcCall, picked_header
from tests.support.procs import Daemon, metric_sum
from tests.test_extproc import ENDPOINTS, TIMEOUT, Mode, _start, body, headers

LABELLED = [
    {"address": ENDPOINTS[0], "labels": {"models": "alpha,alpha-lora"}},
    {"address": ENDPOINTS[1], "labels": {"models": "alpha"}},
    {"address": ENDPOINTS[2], "labels": {"models": "beta"}},
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("extproc-apis")
    # Labelled endpoints come from a file (the command line's --endpoints carries no labels).
    (workdir / "endpoints.yaml").write_text(orjson.dumps(LABELLED).decode())
    d = _start(workdir, "llmlb", {"endpoints": [], "endpoints_file": "endpoints.yaml"})
    yield d
    d.stop()


@pytest.fixture(scope="module")
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        yield ch


def _picks(daemon: Daemon, reason: str) -> float:
    return metric_sum(daemon.metrics(), "llmlb_picks_total", reason=reason)


def _fallbacks(daemon: Daemon, reason: str) -> float:
    return metric_sum(daemon.metrics(), "llmlb_fallbacks_total", reason=reason)


def _response_headers(status: int) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]
            )
        )
    )


def _response_body(data: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def _buffered_pick(channel: grpc.Channel, path: str, payload: bytes) -> tuple[ExtProcCall, str]:
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.BUFFERED, extra={":path": path}))
    call.recv()
    call.send(body(payload))
    answer = call.recv()
    endpoint = picked_header(answer.request_body.response.header_mutation)
    assert endpoint in ENDPOINTS, answer
    return call, endpoint


def _first_turn(model: str = "alpha", store: bool | None = None) -> bytes:
    request: dict[str, object] = {"model": model, "input": "hello"}
    if store is not None:
        request["store"] = store
    return orjson.dumps(request)


def test_buffered_asks_for_a_stored_response_s_body_and_learns_its_id(
    channel: grpc.Channel, daemon: Daemon
) -> None:
    call, endpoint = _buffered_pick(channel, "/v1/responses", _first_turn())
    call.send(_response_headers(200))
    answer = call.recv()
    assert answer.HasField("response_headers")
    assert answer.mode_override.response_body_mode == Mode.STREAMED
    # The SSE stream's first event carries the id, split across two chunks.
    first = b'event: response.created\ndata: {"type":"response.created","response":{"i'
    second = b'd": "resp_abc123", "status": "in_progress"}}\n\n'
    for chunk, end in ((first, False), (second, False), (b"event: response.completed\n\n", True)):
        call.send(_response_body(chunk, end))
        assert call.recv().HasField("response_body")
    call.close()
    before = _picks(daemon, "stored_response")
    for _ in range(4):  # every follow-up goes home, whatever the load elsewhere
        follow = orjson.dumps({"model": "alpha", "input": "more", "previous_response_id": "resp_abc123"})
        call, picked = _buffered_pick(channel, "/v1/responses", follow)
        assert picked == endpoint
    assert _picks(daemon, "stored_response") == before + 4
    call.close()
    # GET /v1/responses/{id} too (a headers-only request).
    call = ExtProcCall(channel, TIMEOUT)
    call.send(
        headers(
            Mode.BUFFERED, end_of_stream=True, extra={":method": "GET", ":path": "/v1/responses/resp_abc123"}
        )
    )
    assert picked_header(call.recv().request_headers.response.header_mutation) == endpoint
    call.close()


@pytest.mark.parametrize("case", ["store_false", "error_status", "chat"])
def test_no_response_body_is_asked_for_when_no_id_is_to_be_learned(channel: grpc.Channel, case: str) -> None:
    path, payload, status = {
        "store_false": ("/v1/responses", _first_turn(store=False), 200),
        "error_status": ("/v1/responses", _first_turn(), 500),
        "chat": ("/v1/chat/completions", orjson.dumps({"model": "alpha", "messages": []}), 200),
    }[case]
    call, _ = _buffered_pick(channel, path, payload)
    call.send(_response_headers(status))
    answer = call.recv()
    assert answer.HasField("response_headers")
    assert not answer.HasField("mode_override")
    call.close()


def test_full_duplex_learns_the_id_from_the_echoed_chunks(channel: grpc.Channel) -> None:
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED, extra={":path": "/v1/responses"}))
    call.send(body(_first_turn(), end_of_stream=True))
    endpoint = picked_header(call.recv().request_headers.response.header_mutation)
    while not call.recv().request_body.response.body_mutation.streamed_response.end_of_stream:
        pass
    call.send(_response_headers(200))
    answer = call.recv()
    assert not answer.HasField("mode_override")  # Envoy sends the chunks anyway
    payload = b'{"id": "resp_fd_9", "object": "response", "output": []}'
    call.send(_response_body(payload, True))
    assert call.recv().response_body.response.body_mutation.streamed_response.body == payload
    call.close()
    follow = orjson.dumps({"model": "alpha", "input": "again", "previous_response_id": "resp_fd_9"})
    call, picked = _buffered_pick(channel, "/v1/responses", follow)
    assert picked == endpoint
    call.close()


def test_requests_go_only_where_their_model_is_served(channel: grpc.Channel) -> None:
    for model, serving in (("alpha", ENDPOINTS[:2]), ("alpha-lora", ENDPOINTS[:1]), ("beta", ENDPOINTS[2:])):
        for n in range(4):
            chat = orjson.dumps({"model": model, "messages": [{"role": "user", "content": f"q{n}"}]})
            call, endpoint = _buffered_pick(channel, "/v1/chat/completions", chat)
            assert endpoint in serving, (model, endpoint)
            call.close()


def test_a_model_nobody_serves_gets_404_model_not_found(channel: grpc.Channel) -> None:
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.BUFFERED, extra={":path": "/v1/embeddings"}))
    call.recv()
    call.send(body(orjson.dumps({"model": "gamma", "input": "x"})))
    answer = call.recv().immediate_response
    assert answer.status.code == 404
    error = orjson.loads(answer.body)["error"]
    assert (error["type"], error["code"]) == ("model_not_found", 404)
    assert "gamma" in error["message"]
    call.close()


def test_get_models_is_answered_by_the_picker(channel: grpc.Channel) -> None:
    call = ExtProcCall(channel, TIMEOUT)
    call.send(headers(Mode.BUFFERED, end_of_stream=True, extra={":method": "GET", ":path": "/v1/models"}))
    answer = call.recv().immediate_response
    assert answer.status.code == 200
    listing = orjson.loads(answer.body)
    assert [m["id"] for m in listing["data"]] == ["alpha", "alpha-lora", "beta"]
    call.close()


def test_other_paths_are_routed_by_load_without_reading_the_body(
    channel: grpc.Channel, daemon: Daemon
) -> None:
    before = _fallbacks(daemon, "bad_body")
    for path in ("/v1/audio/transcriptions", "/tokenize", "/v1/images/generations"):
        call, _ = _buffered_pick(channel, path, b"--boundary\r\nnot json\x00\xff")
        call.close()
    assert _fallbacks(daemon, "bad_body") == before
    call, _ = _buffered_pick(channel, "/v1/messages", b'{"model": "alpha", "messages": 5}')
    call.close()
    assert _fallbacks(daemon, "bad_body") == before + 1
