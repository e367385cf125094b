"""The Envoy ext_proc service: one gRPC stream per HTTP request.

Envoy names its processing mode in the first message of every stream (``protocol_config``):

- BUFFERED request body (recommended): answer the request headers at once (removing any
  client-supplied destination header), pick on the single body message, put the pick in the
  body answer.
- FULL_DUPLEX_STREAMED (the inference-extension mode): hold the headers answer until the body's
  end, then send it with the pick and stream the body back in chunks of at most 62,000 bytes;
  response chunks are echoed.
- NONE (headers only), or a request without a body: pick on the headers.

What the body means comes from the ``:path`` header (``request_kind``): chat and legacy
completions, the Responses API, Anthropic Messages, embeddings, rerank and score are parsed for
their prompt and affinity keys; any other path is routed by load without reading its body. The
picker answers ``GET /v1/models`` itself with the models the pool serves. A Responses API
request that stores its response has its response body read until the response's id shows (in
BUFFERED mode by switching that stream's response body to STREAMED with ``mode_override``, which
needs ``allow_mode_override: true`` in the filter), so follow-ups naming it reach its server
(see ``llmlb.responses``).

Envoy's messages arrive decoded in Rust (``ExtProcMessage``) and answers leave as serialized
``ProcessingResponse`` bytes: the common ones made once, chunk answers encoded in Rust, so no
protobuf object is built or parsed per message on the way.

The pick goes out as the ``x-gateway-destination-endpoint`` request header and as
``envoy.lb`` dynamic metadata. Whatever ends the stream (completion, client abort, upstream
error, Envoy reset), the ``finally`` releases the pick's ticket exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from llmlb._core import (
    BodyTooLargeError,
    ExtProcMessage,
    ParsedRequest,
    RecordEncoder,
    RequestStream,
    echo_response_chunk,
    parse_body,
    request_body_chunk,
    request_kind,
    stored_response_id,
)
from llmlb.decision import RECORD_FIELDS, RECORD_NAMESPACE, Decision
from llmlb.logs import RequestLog
from llmlb.metrics import Metrics
from llmlb.picking import Picker, Refusal, RequestMeta
from llmlb.responses import ResponseIdScanner, ResponseStore

log = logging.getLogger("llmlb.extproc")

DESTINATION_HEADER = "x-gateway-destination-endpoint"
# Envoy's router adds this to every response that came from an upstream; a 502/503/504 without
# it is Envoy's own local reply about the picked endpoint: it could not be reached (503), reset
# the request before answering (503), or did not answer within the route timeout (504).
UPSTREAM_TIME_HEADER = "x-envoy-upstream-service-time"
ENVOY_UPSTREAM_FAILURES = frozenset({502, 503, 504})
METADATA_NAMESPACE = "envoy.lb"
# Envoy takes body chunks up to 64 KiB per message; stay under it like the inference extension.
STREAM_CHUNK = 62_000
# Bodies (or full-duplex chunks) from this size are parsed on a worker thread, the GIL released,
# so one big body never holds up the other streams on the event loop; smaller ones cost less
# than the thread hop (parsing runs at about 2 GB/s). A compressed body may decode to far more
# than its size, so it goes to a thread sooner.
OFFLOAD_BYTES = 1024 * 1024
OFFLOAD_ENCODED_BYTES = 64 * 1024
CONTENT_ENCODING = "content-encoding"
REQUEST_ID = "x-request-id"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


@dataclass(frozen=True, slots=True)
class Observability:
    """What the picker tells about each request beyond the pick: the decision record as
    ``llmlb`` dynamic metadata (always), ``decision_header`` (a response header with the
    record's compact form; empty: off) and the request log (``None``: off)."""

    decision_header: str = ""
    request_log: RequestLog | None = None


@dataclass(frozen=True, slots=True)
class Apis:
    """What the picker knows of the APIs beyond a body: the session header to read (lowercase;
    empty: none), where stored responses are, and the models the pool serves."""

    responses: ResponseStore
    served_models: Callable[[], list[str]]
    session_header: str = ""


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """How request bodies are read: ``max_bytes`` bounds the raw and the decoded body in every
    Envoy mode (413 past it); ``max_blocks`` the prefix levels hashed (0: the policy uses none)."""

    max_bytes: int
    max_blocks: int


_parse_pool: ThreadPoolExecutor | None = None
_R = TypeVar("_R")


async def _off_loop(func: Callable[..., _R], *args: Any) -> _R:
    """Runs a Rust parse that releases the GIL on a worker thread (two at most)."""
    global _parse_pool  # noqa: PLW0603 - one pool for the process, made on first use
    if _parse_pool is None:
        _parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmlb-parse")
    return await asyncio.get_running_loop().run_in_executor(_parse_pool, func, *args)


_Mode = processing_mode_pb2.ProcessingMode
BUFFERED = _Mode.BUFFERED
BUFFERED_PARTIAL = _Mode.BUFFERED_PARTIAL
FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
NONE = _Mode.NONE
STREAMED = _Mode.STREAMED

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# The phases of Envoy's messages (``ExtProcMessage.phase``).
_REQUEST_HEADERS = ExtProcMessage.REQUEST_HEADERS
_RESPONSE_HEADERS = ExtProcMessage.RESPONSE_HEADERS
_REQUEST_BODY = ExtProcMessage.REQUEST_BODY
_RESPONSE_BODY = ExtProcMessage.RESPONSE_BODY
_REQUEST_TRAILERS = ExtProcMessage.REQUEST_TRAILERS
_RESPONSE_TRAILERS = ExtProcMessage.RESPONSE_TRAILERS
_MALFORMED = ExtProcMessage.MALFORMED


def _serialized(answer: pb.ProcessingResponse) -> bytes:
    """An answer as the transport sends it."""
    data: bytes = answer.SerializeToString()
    return data


# Answers are serialized ``ProcessingResponse`` bytes; these never change.
_HEADERS_CONTINUE = _serialized(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
# Removes a client-supplied destination header: it must never route a request.
_HEADERS_STRIP = _serialized(
    pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=pb.HeaderMutation(remove_headers=[DESTINATION_HEADER]))
        )
    )
)
_BODY_CONTINUE = _serialized(pb.ProcessingResponse(request_body=pb.BodyResponse()))
_REQUEST_TRAILERS_CONTINUE = _serialized(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
_RESPONSE_HEADERS_CONTINUE = _serialized(pb.ProcessingResponse(response_headers=pb.HeadersResponse()))
# Asks Envoy for this stream's response body (BUFFERED request mode), to learn a response's id.
_RESPONSE_HEADERS_SEND_BODY = _serialized(
    pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(), mode_override=_Mode(response_body_mode=STREAMED)
    )
)
_RESPONSE_BODY_CONTINUE = _serialized(pb.ProcessingResponse(response_body=pb.BodyResponse()))
_RESPONSE_TRAILERS_CONTINUE = _serialized(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))


def _pick_common(endpoint: str) -> pb.CommonResponse:
    mutation = pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=endpoint.encode()),
                append_action=_OVERWRITE,
            )
        ]
    )
    return pb.CommonResponse(header_mutation=mutation)


# The pick for routing (``envoy.lb``) and its decision record (``llmlb``), encoded in Rust from
# the balancer's Pick: building the Struct through the protobuf API (``Struct.update``) cost
# ~17 µs a request, a dict of the record encoded in Rust ~5 µs, this ~1 µs. Encoded as the
# ProcessingResponse.dynamic_metadata field, so it is appended to an answer's bytes.
_RECORD_METADATA = RecordEncoder(
    METADATA_NAMESPACE,
    DESTINATION_HEADER,
    RECORD_NAMESPACE,
    list(RECORD_FIELDS),
    metadata_field=pb.ProcessingResponse.DESCRIPTOR.fields_by_name["dynamic_metadata"].number,
)


class _PickResponses:
    """The answers that carry a pick: the part naming the endpoint is serialized once per
    endpoint and the request's metadata (its decision record) appended as bytes (protobuf
    merges concatenated messages), so no message is built per request."""

    def __init__(self) -> None:
        self._headers: dict[str, bytes] = {}
        self._body: dict[str, bytes] = {}

    def in_headers(self, decision: Decision) -> bytes:
        answer = self._headers.get(decision.endpoint)
        if answer is None:
            common = _pick_common(decision.endpoint)
            answer = _serialized(pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common)))
            self._headers[decision.endpoint] = answer
        return _with_pick_metadata(answer, decision)

    def in_body(self, decision: Decision) -> bytes:
        answer = self._body.get(decision.endpoint)
        if answer is None:
            common = _pick_common(decision.endpoint)
            answer = _serialized(pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)))
            self._body[decision.endpoint] = answer
        return _with_pick_metadata(answer, decision)


def _with_pick_metadata(answer: bytes, decision: Decision) -> bytes:
    """The serialized ``answer`` with the pick's dynamic metadata (see ``_RECORD_METADATA``)."""
    metadata = _RECORD_METADATA.metadata(
        decision.pick,
        decision.policy,
        decision.state,
        decision.request_id,
        decision.path,
        decision.model,
        decision.pick_seconds,
    )
    return answer + metadata


def _json_reply(status: int, body: bytes, details: str, retry_after: int | None = None) -> bytes:
    """A JSON answer Envoy gives on the picker's behalf (ImmediateResponse)."""
    headers = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
            append_action=_OVERWRITE,
        )
    ]
    if retry_after is not None:
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="retry-after", raw_value=str(retry_after).encode()),
                append_action=_OVERWRITE,
            )
        )
    return _serialized(
        pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=status),
                headers=pb.HeaderMutation(set_headers=headers),
                body=body,
                details=details,
            )
        )
    )


def models_response(models: list[str]) -> bytes:
    """``GET /v1/models`` answered by the picker: every model the pool serves, OpenAI-shaped."""
    created = int(time.time())
    listing = [{"id": m, "object": "model", "created": created, "owned_by": "llmlb"} for m in models]
    return _json_reply(200, orjson.dumps({"object": "list", "data": listing}), "llmlb_models")


def immediate_response(refusal: Refusal) -> bytes:
    """An OpenAI-shaped JSON error answered by Envoy on the picker's behalf."""
    body = orjson.dumps(
        {"error": {"message": refusal.message, "type": refusal.error_type, "code": refusal.status}}
    )
    return _json_reply(refusal.status, body, f"llmlb_{refusal.error_type}", refusal.retry_after)


def _response_headers_with(name: str, value: str, send_body: bool) -> bytes:
    """The response headers' answer adding the decision header (see ``Observability``)."""
    mutation = pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
                append_action=_OVERWRITE,
            )
        ]
    )
    answer = pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
    )
    if send_body:
        answer.mode_override.response_body_mode = STREAMED
    return _serialized(answer)


def _status(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0


class HeaderWatch:
    """Picked requests still waiting for their response headers, oldest first: a request that
    waits too long hints at a hung endpoint, which health then probes at once (see endpoints)."""

    def __init__(self) -> None:
        # Insertion order is pick order (dicts keep it), so the oldest come first.
        self._since: dict[_Stream, float] = {}

    def picked(self, stream: _Stream) -> None:
        self._since[stream] = time.monotonic()

    def answered(self, stream: _Stream) -> None:
        self._since.pop(stream, None)

    def overdue(self, after: float) -> list[str]:
        """Endpoints of requests picked more than ``after`` seconds ago and still without
        response headers; each request is reported once."""
        deadline = time.monotonic() - after
        late: list[_Stream] = []
        for stream, since in self._since.items():
            if since > deadline:
                break
            late.append(stream)
        for stream in late:
            del self._since[stream]
        return [stream.endpoint for stream in late]


def _streamed_request_body(received: list[bytes], end_of_stream: bool) -> Iterator[bytes]:
    """The request body sent back to Envoy as it came (FULL_DUPLEX_STREAMED): chunks as they
    arrived, only those over ``STREAM_CHUNK`` split, nothing joined. Lazy: each message is built
    as it is taken, so a big body's echo interleaves with other streams' work."""
    pieces = len(received)
    for n, chunk in enumerate(received, start=1):
        last_chunk = n == pieces
        if len(chunk) <= STREAM_CHUNK:
            yield request_body_chunk(chunk, end_of_stream and last_chunk)
            continue
        for start in range(0, len(chunk), STREAM_CHUNK):
            end = start + STREAM_CHUNK >= len(chunk)
            piece = chunk[start : start + STREAM_CHUNK]
            yield request_body_chunk(piece, end_of_stream and last_chunk and end)
    if not received:
        yield request_body_chunk(b"", end_of_stream)


class _Stream:
    """Per-stream state machine. ``handle`` maps one Envoy message to the answers it needs."""

    __slots__ = (
        "apis",
        "body_mode",
        "chunks",
        "closed_for_drain",
        "decision",
        "encoding",
        "endpoint",
        "failed",
        "kind",
        "learn_id",
        "limits",
        "meta",
        "observability",
        "parser",
        "picked",
        "picker",
        "pinned",
        "refused",
        "response_mode",
        "responses",
        "scanner",
        "session",
        "status",
        "task",
        "ticket",
        "watch",
    )

    def __init__(
        self,
        picker: Picker,
        responses: _PickResponses,
        watch: HeaderWatch,
        limits: BodyLimits,
        apis: Apis,
        *,
        observability: Observability,
    ) -> None:
        self.picker = picker
        self.responses = responses
        self.watch = watch
        self.limits = limits
        self.apis = apis
        self.observability = observability
        # The request's id, path and trace context, for its decision record.
        self.meta = RequestMeta()
        self.decision: Decision | None = None
        # What the body means, from :path (see request_kind).
        self.kind = "chat"
        self.session: str | None = None
        # The endpoint holding the stored response this request continues or reads.
        self.pinned: str | None = None
        # A Responses API request that stores its response: its id is learned from the answer.
        self.learn_id = False
        self.scanner: ResponseIdScanner | None = None
        # The request's Content-Encoding (None: identity); the body is decoded to be read and
        # forwarded as it came.
        self.encoding: str | None = None
        # Full duplex: the body read as it arrives, and its chunks held until the pick.
        self.parser: RequestStream | None = None
        # An immediate response ended the request: later body chunks are dropped.
        self.refused = False
        # The response status (0: none seen yet), and whether it was an error (4xx/5xx).
        self.status = 0
        self.failed = False
        self.body_mode = BUFFERED
        self.response_mode = NONE
        self.ticket = 0
        self.endpoint = ""
        self.picked = False
        self.chunks: list[bytes] = []
        # Set while the stream only waits for its end (see ExtProcService.start_draining).
        self.task: asyncio.Task[Any] | None = None
        self.closed_for_drain = False

    @property
    def done_with_picker(self) -> bool:
        """After the response headers, nothing more needs the picker: the response body does not
        pass through it (response body mode NONE), and the request is picked. Ending the gRPC
        stream with OK now lets Envoy finish the HTTP request without it."""
        return bool(self.response_mode == NONE and self.body_mode != FULL_DUPLEX)

    @property
    def echoes_response(self) -> bool:
        """Past the response headers, each response chunk is only passed back as it came
        (FULL_DUPLEX_STREAMED, no response id to read)."""
        return bool(self.response_mode == FULL_DUPLEX and self.scanner is None and self.status)

    async def _pick(self, request: ParsedRequest | None) -> Decision | bytes:
        """The decision, or the immediate response that ends the request. ``None`` picks from
        the headers alone."""
        self.picked = True
        if request is not None and self.kind == "responses" and request.ok:
            self.learn_id = request.store
            previous = request.previous_response_id
            if previous is not None and self.pinned is None:
                self.pinned = await self.apis.responses.lookup(previous)
        picker = self.picker
        if picker.synchronous:
            outcome = picker.pick_now(request, self.session, self.pinned, self.meta)
        else:
            outcome = await picker.pick(request, session=self.session, pinned=self.pinned, meta=self.meta)
        if isinstance(outcome, Refusal):
            return self._refuse(outcome)
        self.decision = outcome
        self.ticket, self.endpoint = outcome.ticket, outcome.endpoint
        self.watch.picked(self)
        return outcome

    def _refuse(self, refusal: Refusal) -> bytes:
        """Ends the request with the picker's own answer."""
        self.refused = True
        self.picked = True
        request_log = self.observability.request_log
        if request_log is not None:
            request_log.refused(self.meta, refusal)
        return immediate_response(refusal)

    async def handle(self, request: ExtProcMessage, phase: int) -> Iterable[bytes]:
        """``phase`` is ``request.phase``."""
        modes = request.body_modes
        if modes is not None:
            self.body_mode, self.response_mode = modes
        if phase == _REQUEST_HEADERS:
            return await self._request_headers(request)
        if phase == _REQUEST_BODY:
            return await self._request_body(request)
        if phase == _REQUEST_TRAILERS:
            return await self._request_trailers()
        if phase == _RESPONSE_HEADERS:
            return [self.on_response_headers(request)]
        if phase == _RESPONSE_BODY:
            if self.scanner is not None:
                await self._scan(request.body)
            if self.response_mode == FULL_DUPLEX:
                return [echo_response_chunk(request.body, request.end_of_stream)]
            return [_RESPONSE_BODY_CONTINUE]
        if phase == _RESPONSE_TRAILERS:
            return [_RESPONSE_TRAILERS_CONTINUE]
        return []

    async def _scan(self, chunk: bytes) -> None:
        """Reads the response for its id; the chunk that carries it is answered once the id
        is remembered (see ``ResponseStore.remember``)."""
        scanner = self.scanner
        assert scanner is not None
        response_id = scanner.feed(chunk)
        if response_id is not None:
            await self.apis.responses.remember(response_id, self.endpoint)
        if scanner.done:
            self.scanner = None

    async def _request_headers(self, headers: ExtProcMessage) -> list[bytes]:
        path = ""
        method = ""
        session_header = self.apis.session_header
        for key, value in headers.headers:
            if key == ":path":
                path = value.decode("latin-1")
            elif key == ":method":
                method = value.decode("latin-1")
            elif key == REQUEST_ID:
                self.meta.request_id = value.decode("latin-1")
            elif key == CONTENT_ENCODING:
                self.encoding = value.decode("latin-1")
            elif key == TRACEPARENT:
                self.meta.traceparent = value.decode("latin-1")
            elif key == TRACESTATE:
                self.meta.tracestate = value.decode("latin-1")
            elif key == session_header:
                self.session = value.decode("utf-8", "replace")
        self.meta.path = path
        # Envoy always sends :path; a client that does not gets today's chat/completions reading.
        self.kind = request_kind(path) if path else "chat"
        if self.kind == "other":
            if method == "GET" and path.split("?", 1)[0].rstrip("/") == "/v1/models":
                models = self.apis.served_models()
                if models:  # else a server answers (the pool's models are not known)
                    self.refused = True
                    self.picked = True
                    return [models_response(models)]
            stored = stored_response_id(path)
            if stored is not None:
                self.pinned = await self.apis.responses.lookup(stored)
        # No body to wait for (a GET, or Envoy sends none): pick now from headers alone.
        # STREAMED mode routes as soon as the headers are answered, so it can only pick here too.
        if headers.end_of_stream or self.body_mode in (NONE, STREAMED):
            decision = await self._pick(None)
            if isinstance(decision, bytes):
                return [decision]
            return [self.responses.in_headers(decision)]
        if self.body_mode == FULL_DUPLEX:
            return []  # held until the body is complete: the answer carries the pick
        return [_HEADERS_STRIP]

    async def _request_body(self, body: ExtProcMessage) -> Iterable[bytes]:
        if self.refused:
            return []
        if self.body_mode == FULL_DUPLEX:
            if self.picked:  # a stray chunk after the end: pass it on untouched
                return _streamed_request_body([body.body], body.end_of_stream)
            if not await self._read_chunk(body.body):
                return [self._too_large()]
            if not body.end_of_stream:
                return []
            return await self._finish_full_duplex(end_of_stream=True)
        if self.picked:
            return [_BODY_CONTINUE]
        # BUFFERED (and BUFFERED_PARTIAL): the whole body, or all Envoy would buffer, is here.
        parsed = await self._parse_whole(body.body)
        if parsed.too_large:
            return [self._too_large()]
        decision = await self._pick(parsed)
        if isinstance(decision, bytes):
            return [decision]
        return [self.responses.in_body(decision)]

    async def _parse_whole(self, body: bytes) -> ParsedRequest:
        limits = self.limits
        offload = OFFLOAD_ENCODED_BYTES if self.encoding else OFFLOAD_BYTES
        if len(body) >= offload:
            return await _off_loop(
                parse_body, body, self.encoding, limits.max_bytes, limits.max_blocks, self.kind
            )
        return parse_body(body, self.encoding, limits.max_bytes, limits.max_blocks, self.kind)

    async def _read_chunk(self, chunk: bytes) -> bool:
        """Feeds a full-duplex chunk to the parser and holds it for the echo; ``False`` once the
        body is over the limit (everything held is dropped at once)."""
        if self.parser is None:
            self.parser = RequestStream(
                self.encoding, self.limits.max_bytes, self.limits.max_blocks, self.kind
            )
        offload = OFFLOAD_ENCODED_BYTES if self.encoding else OFFLOAD_BYTES
        try:
            if len(chunk) >= offload:
                await _off_loop(self.parser.feed, chunk)
            else:
                self.parser.feed(chunk)
        except BodyTooLargeError:
            self.chunks = []
            self.parser = None
            return False
        self.chunks.append(chunk)
        return True

    def _too_large(self) -> bytes:
        return self._refuse(self.picker.refuse_too_large(self.limits.max_bytes))

    async def _finish_full_duplex(self, end_of_stream: bool) -> Iterable[bytes]:
        if self.parser is None:  # no body bytes at all
            self.parser = RequestStream(
                self.encoding, self.limits.max_bytes, self.limits.max_blocks, self.kind
            )
        parsed = self.parser.finish()
        self.parser = None
        received, self.chunks = self.chunks, []
        decision = await self._pick(parsed)
        if isinstance(decision, bytes):
            return [decision]
        return itertools.chain(
            (self.responses.in_headers(decision),), _streamed_request_body(received, end_of_stream)
        )

    def on_response_headers(self, headers: ExtProcMessage) -> bytes:
        """Notes whether the request failed (it then claims no prefix entries, see `release`)
        and whether Envoy itself answered for an endpoint it could not get a response from; the
        answer asks for the response body when a stored response's id is to be learned."""
        decision = self.decision
        if decision is None:
            return _RESPONSE_HEADERS_CONTINUE
        self.watch.answered(self)
        status = 0
        upstream_answered = False
        for key, value in headers.headers:
            if key == ":status":
                status = _status(value)
                if status < 400:
                    break  # the common case: the status comes first
            elif key == UPSTREAM_TIME_HEADER:
                upstream_answered = True
        self.status = status
        send_body = False
        if status < 400:
            send_body = self.learn_id and status == 200 and self._read_response_id()
        else:
            self.failed = True
            if status in ENVOY_UPSTREAM_FAILURES and not upstream_answered:
                self.picker.on_upstream_failure(self.endpoint)
        header = self.observability.decision_header
        if header:
            return _response_headers_with(header, decision.compact(), send_body)
        return _RESPONSE_HEADERS_SEND_BODY if send_body else _RESPONSE_HEADERS_CONTINUE

    def _read_response_id(self) -> bool:
        """Starts reading the response for its id; ``True`` if Envoy must be asked for the
        body (BUFFERED mode: the stream still ends with it)."""
        self.scanner = ResponseIdScanner()
        if self.response_mode in (FULL_DUPLEX, STREAMED):
            return False  # the chunks come anyway
        self.response_mode = STREAMED
        return True

    async def _request_trailers(self) -> Iterable[bytes]:
        if self.body_mode == FULL_DUPLEX and not self.picked:
            # The body ended with trailers rather than an end-of-stream chunk.
            answers = await self._finish_full_duplex(end_of_stream=False)
            if self.refused:
                return answers
            return itertools.chain(answers, (_REQUEST_TRAILERS_CONTINUE,))
        return [_REQUEST_TRAILERS_CONTINUE]


class StreamContext(Protocol):
    """What ``Process`` may do to its gRPC stream besides answering (see llmlb.extproc_server)."""

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """Ends the stream with this status."""

    def echo_response_bodies(self) -> None:
        """The stream's response body chunks need nothing more than an echo: the transport may
        answer them itself from now on (it does once nothing of the stream waits here)."""


class ExtProcService:
    def __init__(
        self,
        picker: Picker,
        metrics: Metrics,
        max_streams: int,
        limits: BodyLimits,
        apis: Apis,
        *,
        observability: Observability | None = None,
    ) -> None:
        self.picker = picker
        self.apis = apis
        self.observability = observability or Observability()
        self.metrics = metrics
        self.limits = limits
        self.responses = _PickResponses()
        self.watch = HeaderWatch()
        self.open_streams = 0
        # Open streams across all connections beyond which a new one is refused (grpc_max_streams).
        self.max_streams = max_streams
        self.draining = False
        # Streams past their response headers that only wait for the request to end.
        self._waiting_for_end: set[_Stream] = set()
        self._all_closed = asyncio.Event()

    def start_draining(self) -> None:
        """The picker is going away: streams that need nothing more from it end now with OK (the
        HTTP requests go on, Envoy no longer waits for the picker), the others as soon as their
        response headers pass. Their requests are released from the in-flight counts, which leave
        with this replica anyway."""
        self.draining = True
        for stream in list(self._waiting_for_end):
            if stream.task is not None:
                stream.closed_for_drain = True
                stream.task.cancel()
        if self.open_streams == 0:
            self._all_closed.set()

    async def wait_closed(self) -> None:
        """Until no stream is open (meaningful once draining)."""
        await self._all_closed.wait()

    async def Process(
        self, request_iterator: AsyncIterator[ExtProcMessage], context: StreamContext
    ) -> AsyncGenerator[bytes, None]:
        """Envoy's messages of one stream in, their answers (serialized ``ProcessingResponse``)
        out."""
        self.metrics.streams.inc()
        if self.open_streams >= self.max_streams:
            # Refused before reading a message: nothing picked, no in-flight count touched. Only
            # ext_proc streams count: gRPC health checks are answered whatever this says.
            self.metrics.stream_errors.inc(("over_capacity",))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"llmlb: {self.open_streams} ext_proc streams open (grpc_max_streams)",
            )
        self.open_streams += 1
        stream = _Stream(
            self.picker, self.responses, self.watch, self.limits, self.apis, observability=self.observability
        )
        malformed = False
        try:
            async for request in request_iterator:
                # The two messages of every request that need no pick are answered here, without
                # the coroutine hop through `handle` (a few µs each at thousands per second).
                phase = request.phase
                if phase == _RESPONSE_HEADERS and request.body_modes is None:
                    yield stream.on_response_headers(request)
                    if stream.echoes_response:
                        context.echo_response_bodies()
                    if stream.done_with_picker:
                        if self.draining:
                            return
                        stream.task = asyncio.current_task()
                        self._waiting_for_end.add(stream)
                    continue
                if phase == _MALFORMED:
                    malformed = True
                    break
                for response in await stream.handle(request, phase):
                    yield response
                if phase == _RESPONSE_BODY and stream.echoes_response:
                    context.echo_response_bodies()  # chunks that came before the hand-over took
        except asyncio.CancelledError:
            if stream.closed_for_drain:
                return  # ends the RPC with OK: see start_draining
            raise
        except Exception:
            self.metrics.stream_errors.inc(("internal",))
            log.exception("ext_proc stream failed")
            raise
        finally:
            self._waiting_for_end.discard(stream)
            self.watch.answered(stream)
            self.open_streams -= 1
            if stream.ticket:
                self.picker.release(stream.ticket, failed=stream.failed)
                request_log = self.observability.request_log
                if request_log is not None and stream.decision is not None:
                    request_log.finished(stream.decision, stream.status)
            if self.draining and self.open_streams == 0:
                self._all_closed.set()
        if malformed:  # not Envoy: ended like any gRPC server would, nothing else is lost
            self.metrics.stream_errors.inc(("malformed",))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "llmlb: malformed ProcessingRequest")
