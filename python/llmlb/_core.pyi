"""Type stubs for the Rust extension ``llmlb._core``.

Calls hold the GIL except where noted; bodies (and ``RequestStream`` chunks) of 64 KiB or more
are parsed with it released.
"""

import os
from typing import Any, ClassVar, Final, final

from typing_extensions import Self

__all__ = [
    "EXT_PROC_SERVICE",
    "FALLBACK_PICK_REASONS",
    "PICK_REASONS",
    "PREFIX_BLOCK_SIZE",
    "SHARED_COMMIT_ATTEMPTS",
    "Balancer",
    "BodyTooLargeError",
    "EngineMetrics",
    "ExtProcMessage",
    "ExtProcTransport",
    "MetricsParseError",
    "NoEndpointsError",
    "OverLimitError",
    "PageScraper",
    "ParsedRequest",
    "Pick",
    "RecordEncoder",
    "RequestParseError",
    "RequestStream",
    "ShedError",
    "UnknownModelError",
    "__version__",
    "balancer_defaults",
    "create_worker_state",
    "echo_response_chunk",
    "parse_body",
    "parse_engine_metrics",
    "parse_request",
    "request_body_chunk",
    "request_kind",
    "shared_scripts",
    "stored_response_id",
    "wait_readable",
]

__version__: Final[str]
#: Bytes of canonical prompt per prefix block.
PREFIX_BLOCK_SIZE: Final[int]
#: The gRPC service name of ext_proc (what Envoy's gRPC health checks ask for).
EXT_PROC_SERVICE: Final[str]
#: Commit attempts of one shared (Redis) pick; the last goes ahead unguarded.
SHARED_COMMIT_ATTEMPTS: Final[int]
#: Every pick reason (``llmlb_picks_total{reason}``), and those that fell back from the policy.
PICK_REASONS: Final[list[str]]
FALLBACK_PICK_REASONS: Final[list[str]]

class RequestParseError(ValueError):
    """The body is not a usable OpenAI request (not UTF-8, not JSON, no prompt, wrong types)."""

class BodyTooLargeError(ValueError):
    """The body, raw or decoded, is larger than ``max_bytes``."""

class MetricsParseError(ValueError):
    """The page is not a usable metrics page: no sample at all (an HTML error page, say), none of
    a known engine's metrics (auto-detection), or a sample that matters is not UTF-8."""

class NoEndpointsError(RuntimeError):
    """The pool has no endpoints."""

class OverLimitError(RuntimeError):
    """The best endpoint already has ``maxRequestCount`` requests in flight."""

class UnknownModelError(RuntimeError):
    """No endpoint serves the request's model."""

class ShedError(RuntimeError):
    """least_busy: the model is sheddable and no endpoint has room for it."""

@final
class ParsedRequest:
    """A parsed request body, or why it is unusable (``ok`` is ``False``). Immutable; the
    levels stay in Rust, so ``Balancer.pick(parsed)`` does not copy them through Python."""

    @property
    def ok(self) -> bool:
        """Whether the body is a usable request."""
    @property
    def error(self) -> str | None:
        """Why the body is unusable (the parse error's text); ``None`` when ``ok``."""
    @property
    def too_large(self) -> bool:
        """The raw or the decoded body passed ``max_bytes`` (a decompression bomb included)."""
    @property
    def kind(self) -> str | None:
        """The body's shape: ``"chat"`` or ``"completion"`` (a chat-shaped parse says which of
        the two the body is), ``"responses"``, ``"messages"``, ``"embeddings"``, ``"rerank"``,
        ``"score"`` or ``"other"``; ``None`` when not ``ok``."""
    @property
    def model(self) -> str:
        """The ``model`` field, empty when absent (or not ``ok``)."""
    @property
    def prompt_bytes(self) -> int:
        """The prompt's size: its canonical bytes (every message, past the level cap too) plus the
        ``tools`` JSON and the system part (Messages ``system``, Responses ``instructions``); 0
        when not ``ok``. The load model estimates tokens from it."""
    @property
    def stream(self) -> bool:
        """The ``stream`` field (``False`` when absent or not ``ok``)."""
    @property
    def prefix_hashes(self) -> list[int]:
        """``prefix_hashes[i]`` identifies the model, the tools, the system part and the first
        ``i + 1`` prompt blocks (xxh3-64, chained); empty when not ``ok``. A new list on each
        access."""

    # Affinity fields, as given: ``None`` when absent, ``null``, longer than 1024 bytes (UTF-8),
    # or not ``ok``. A repeated key: the last value counts.
    @property
    def prompt_cache_key(self) -> str | None:
        """``prompt_cache_key`` (chat, completion, responses)."""
    @property
    def conversation(self) -> str | None:
        """Responses ``conversation``: the string, or the object's ``id``."""
    @property
    def safety_identifier(self) -> str | None:
        """``safety_identifier`` (chat, completion, responses)."""
    @property
    def user(self) -> str | None:
        """``user`` (chat, completion, responses, embeddings, rerank, score); for messages,
        ``metadata.user_id``."""
    @property
    def previous_response_id(self) -> str | None:
        """Responses ``previous_response_id``."""
    @property
    def store(self) -> bool:
        """Responses ``store`` (``True`` when absent or ``null``); ``True`` for every other kind
        and when not ``ok``."""

def request_kind(path: str) -> str:
    """The request kind of a path (query string and a trailing ``/`` ignored):
    ``/v1/chat/completions`` ``"chat"``, ``/v1/completions`` ``"completion"``, ``/v1/responses``
    ``"responses"``, ``/v1/messages`` ``"messages"``, ``/v1/embeddings`` ``"embeddings"``,
    ``/v1/rerank``, ``/rerank``, ``/v2/rerank`` ``"rerank"``, ``/v1/score``, ``/score``
    ``"score"``; anything else ``"other"``."""

def stored_response_id(path: str) -> str | None:
    """The ``{id}`` of ``/v1/responses/{id}`` or ``/v1/responses/{id}/...`` (query string
    ignored); ``None`` for any other path."""

def parse_request(body: bytes, kind: str = "chat") -> ParsedRequest:
    """Parses a whole body of the ``kind`` shape (a ``request_kind`` name; ``"chat"`` parses
    chat-completions and completions bodies) with no size limit, no level cap, no decoding.

    Raises:
        RequestParseError: the body is not a usable request.
        ValueError: an unknown ``kind``.
    """

def parse_body(
    body: bytes, encoding: str | None, max_bytes: int, max_blocks: int, kind: str = "chat"
) -> ParsedRequest:
    """Decodes and parses a whole body (Envoy's buffered mode): the same code as a
    ``RequestStream`` fed the body in one chunk. Never raises for a bad body: the result is then
    not ``ok`` (too large, unsupported or corrupt encoding, not a usable request).

    ``encoding`` is the ``Content-Encoding`` header value (``None``: identity): ``gzip``,
    ``x-gzip``, ``deflate`` (zlib or raw), ``zstd``, ``identity``, or a list of up to two of them
    in the order applied. ``max_bytes`` bounds the raw and the decoded bytes alike;
    ``max_blocks`` the prefix levels.

    ``kind`` (a ``request_kind`` name) picks the body's shape: which keys are read and how the
    prompt is hashed. ``"chat"`` (or ``"completion"``: the same shape) reads chat-completions and
    completions bodies; an ``"other"`` body is neither decoded nor parsed, only counted against
    ``max_bytes``.

    Raises:
        ValueError: an unknown ``kind`` (never for a bad body).
    """

@final
class RequestStream:
    """A request body fed chunk by chunk (Envoy's FULL_DUPLEX_STREAMED mode), decoded and parsed
    as it arrives in bounded memory; see ``parse_body`` for the arguments.

    Raises:
        OverflowError: a negative ``max_bytes`` or ``max_blocks``.
        ValueError: an unknown ``kind``.
    """

    def __new__(cls, encoding: str | None, max_bytes: int, max_blocks: int, kind: str = "chat") -> Self: ...
    def feed(self, chunk: bytes) -> None:
        """Decodes and parses the next chunk (GIL released for chunks of 64 KiB or more). A
        problem in the body itself is kept for ``finish``.

        Raises:
            BodyTooLargeError: the raw or the decoded bytes passed ``max_bytes``; the stream is
                dead from then on (every later ``feed`` raises it, ``finish`` gives a result
                that is not ``ok``).
            ValueError: called after ``finish``.
        """
    def finish(self) -> ParsedRequest:
        """The parsed request; never raises for a bad body (the result is then not ``ok``).

        Raises:
            ValueError: called twice.
        """
    @property
    def bytes_fed(self) -> int:
        """Raw bytes fed so far (0 once finished)."""
    @property
    def retained_bytes(self) -> int:
        """Heap bytes the parser and decoder buffers hold now (0 once finished)."""

@final
class EngineMetrics:
    """A model server's load from its ``/metrics`` page. A field whose metric family is absent
    (or holds only NaN or negative values) is ``None``."""

    @property
    def engine(self) -> str:
        """``"vllm"``, ``"sglang"``, ``"trtllm-serve"`` or ``"triton"``."""
    @property
    def waiting(self) -> float | None:
        """Requests queued, summed over the family's series (engines, models)."""
    @property
    def running(self) -> float | None:
        """Requests running, summed over the family's series."""
    @property
    def kv_cache_usage(self) -> float | None:
        """KV-cache usage in ``[0, 1]``, the largest of the family's series. vLLM: from
        ``kv_cache_usage_perc``, else the older ``gpu_cache_usage_perc``."""
    @property
    def running_lora_adapters(self) -> list[str]:
        """vLLM only: from the newest ``vllm:lora_requests_info`` series."""
    @property
    def waiting_lora_adapters(self) -> list[str]: ...
    @property
    def max_lora(self) -> int | None: ...
    @property
    def prefix_cache_queries(self) -> float | None:
        """Prompt tokens looked up in the prefix cache since the server started (a counter, summed
        over series). vLLM: ``prefix_cache_queries`` (else ``gpu_prefix_cache_queries``); SGLang:
        ``prompt_tokens``. ``None`` for trtllm-serve and Triton (no such counter)."""
    @property
    def prefix_cache_hits(self) -> float | None:
        """Of those, tokens found in the cache (a counter). vLLM: ``prefix_cache_hits`` (else
        ``gpu_prefix_cache_hits``); SGLang: ``cached_tokens`` summed over ``cache_source``."""
    @property
    def lines_skipped(self) -> int:
        """Malformed lines ignored."""

@final
class ExtProcTransport:
    """The ext_proc gRPC server's transport: Envoy's connections and streams served on a Rust
    thread (HTTP/2, gRPC framing, health checks, TLS); the event loop takes the streams'
    messages in batches (``take_events``) and sends the answers (``send``)."""

    OPENED: ClassVar[int]
    MESSAGE: ClassVar[int]
    ENDED: ClassVar[int]
    RESET: ClassVar[int]

    def __new__(
        cls,
        address: str,
        *,
        reuse_port: bool,
        max_streams_per_connection: int,
        max_message_bytes: int,
        tls: tuple[bytes, bytes, bytes | None] | None = None,
    ) -> Self:
        """Binds ``address`` (``ip:port`` or ``[ip]:port``) and serves; health NOT_SERVING until
        ``set_serving(True)``.

        Raises:
            OSError: the address cannot be bound.
            ValueError: an unusable address or TLS material.
        """
    @property
    def port(self) -> int: ...
    @property
    def open_streams(self) -> int: ...
    def wake_fd(self) -> int:
        """Turns readable when events wait."""
    def take_events(self) -> list[tuple[int, int, ExtProcMessage | None]]:
        """``(stream, kind, message)`` since the last call, oldest first; ``message`` only for
        MESSAGE (the ``ProcessingRequest`` decoded)."""
    def send(
        self,
        messages: list[tuple[int, bytes]],
        finishes: list[tuple[int, int, str]],
        hand_overs: list[tuple[int, int]] = ...,
    ) -> list[int]:
        """Answers (serialized ``ProcessingResponse``) in order, then ``(stream, grpc_status,
        message)`` for the streams that end (unknown or ended streams are skipped), then
        ``(stream, delivered)`` hand-overs: the stream's response body chunks are echoed in
        Rust from now on if the service has taken all ``delivered`` messages counted for it.
        Returns the streams handed over (the others: try again later)."""
    def set_serving(self, serving: bool) -> None: ...
    def set_accepting(self, accepting: bool) -> None:
        """False: new ext_proc streams are refused with UNAVAILABLE."""
    def set_tls(self, cert: bytes, key: bytes, client_ca: bytes | None = None) -> None:
        """New connections use these PEM files. Raises ValueError if they are unusable."""
    def stop_listening(self) -> None:
        """Closes the listener and sends GOAWAY; open streams go on."""
    def close(self) -> None:
        """Ends the open streams with UNAVAILABLE and stops the thread; idempotent."""

@final
class ExtProcMessage:
    """One ``ProcessingRequest`` as the ext_proc service reads it, decoded in Rust."""

    MALFORMED: ClassVar[int]
    NONE: ClassVar[int]
    REQUEST_HEADERS: ClassVar[int]
    RESPONSE_HEADERS: ClassVar[int]
    REQUEST_BODY: ClassVar[int]
    RESPONSE_BODY: ClassVar[int]
    REQUEST_TRAILERS: ClassVar[int]
    RESPONSE_TRAILERS: ClassVar[int]

    @staticmethod
    def decode(message: bytes) -> ExtProcMessage:
        """Decodes serialized ``ProcessingRequest`` bytes (phase MALFORMED if they are not)."""
    @property
    def phase(self) -> int:
        """One of the phase constants (NONE: the message carries none)."""
    @property
    def headers(self) -> tuple[tuple[str, bytes], ...]:
        """A headers phase's ``(key, raw value)`` pairs in order; empty otherwise."""
    @property
    def body(self) -> bytes:
        """A body phase's chunk; empty otherwise."""
    @property
    def end_of_stream(self) -> bool: ...
    @property
    def body_modes(self) -> tuple[int, int] | None:
        """``(request_body_mode, response_body_mode)`` of ``protocol_config``, if sent."""

def echo_response_chunk(body: bytes, end_of_stream: bool) -> bytes:
    """The ``ProcessingResponse`` echoing a response body chunk (FULL_DUPLEX_STREAMED)."""

def request_body_chunk(body: bytes, end_of_stream: bool) -> bytes:
    """The ``ProcessingResponse`` passing a request body chunk on (FULL_DUPLEX_STREAMED)."""

@final
class PageScraper:
    """The endpoints' ``/metrics`` pages scraped on a background thread: each endpoint on its
    own timer (a slow one delays only its own scrapes), kept-alive connections, each exchange
    bounded by ``timeout_s`` and ``max_page_bytes``, the page parsed on that thread."""

    def __new__(cls, interval_s: float, timeout_s: float, max_page_bytes: int) -> Self:
        """Starts the thread.

        Raises:
            ValueError: an interval or timeout that is not a positive number of seconds.
            OSError: the thread could not be started.
        """
    def set_targets(self, targets: list[tuple[str, str, str | None]]) -> list[str]:
        """Scrapes exactly these ``(address, url, engine)`` from now on (``engine`` ``None``:
        detected from the first page); unchanged targets keep their timer and connection.
        Returns the addresses whose engine name is unknown (detected instead)."""
    def drain(self) -> list[tuple[str, EngineMetrics | None, str | None, str | None]]:
        """Every scrape since the last drain, oldest first: ``(address, metrics, reason,
        detail)``; on failure ``metrics`` is ``None`` and ``reason`` is ``http_status``,
        ``timeout``, ``connect``, ``too_large`` or ``parse``."""
    def close(self) -> None:
        """Stops the thread (scrapes in flight are abandoned); idempotent."""

def parse_engine_metrics(text: bytes, engine: str | None = None) -> tuple[str, EngineMetrics]:
    """Reads a Prometheus text-format ``/metrics`` page: ``(engine, metrics)``.

    ``engine`` is ``"vllm"``, ``"sglang"``, ``"trtllm-serve"`` (or ``"trtllm"``), ``"triton"`` (or
    ``"triton-trtllm"``), in any case; ``None`` detects it from the page (the first of vLLM, SGLang,
    trtllm-serve, Triton whose metrics are present). A missing metric family is never an error.
    Pages of 16 KiB or more are parsed with the GIL released.

    Raises:
        MetricsParseError: no samples at all, no known engine's metrics, or not UTF-8.
        ValueError: ``engine`` is not a known engine name.
    """

def wait_readable(fd: int, timeout_us: int) -> bool:
    """Waits (GIL released) up to ``timeout_us`` µs for ``fd`` to be readable; ``OSError`` on a
    bad descriptor."""

def shared_scripts() -> dict[str, str]:
    """The Redis Lua scripts by name: ``commit``, ``release``, ``heartbeat``, ``reap``."""

@final
class Pick:
    """A counted pick and the figures of its decision record."""

    def __new__(
        cls,
        *,
        ticket: int,
        endpoint: str,
        reason: str,
        prefix_depth: int = 0,
        prefix_levels: int = 0,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        candidates: int = 1,
        score: float = 0.0,
        runner_up: float | None = None,
    ) -> Self:
        """A pick from its figures (tests and replays; the balancer makes the real ones).

        Raises:
            ValueError: an unknown ``reason``.
        """
    @property
    def ticket(self) -> int: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def prefix_depth(self) -> int:
        """Leading prefix levels the endpoint holds, of the request's ``prefix_levels``."""
    @property
    def prefix_levels(self) -> int: ...
    @property
    def prompt_tokens(self) -> int:
        """The request's estimated prompt tokens (0: unknown)."""
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens predicted to be cached on the endpoint."""
    @property
    def candidates(self) -> int:
        """Candidates left after the filters."""
    @property
    def score(self) -> float:
        """The endpoint's total score."""
    @property
    def runner_up(self) -> float | None:
        """The best other candidate's total score (``None``: the endpoint was alone)."""

@final
class RecordEncoder:
    """The decision record of picks, fields in the order of ``names`` (``RECORD_FIELDS``): values
    and rounding are the Rust core's, the same in every form.

    Raises:
        ValueError: a name that is no record field, or a ``metadata_field`` past 15.
    """

    def __new__(
        cls,
        route_namespace: str,
        route_key: str,
        record_namespace: str,
        names: list[str],
        metadata_field: int = 0,
    ) -> Self:
        """``metadata_field`` (1..15): ``metadata()`` as that field of the enclosing answer, ready
        to append to its bytes; 0: the bare Struct."""
    def metadata(
        self, pick: Pick, policy: str, state: str, request_id: str, path: str, model: str, pick_seconds: float
    ) -> bytes:
        """The answer's dynamic metadata (``google.protobuf.Struct`` wire format): the route
        namespace with ``{route_key: endpoint}``, the record namespace with the record."""
    def fields(
        self, pick: Pick, policy: str, state: str, request_id: str, path: str, model: str, pick_seconds: float
    ) -> dict[str, Any]:
        """The record as a dict in field order (``runner_up`` left out when there was none)."""

@final
class Balancer:
    """The picking engine of one replica: pool, tickets, policy, and the seam to where in-flight
    load and prefix holders live (this process, the workers' shared mapping, or Redis)."""

    def __new__(
        cls,
        policy: str,
        *,
        prefix_ttl_s: int | None = None,
        prefix_capacity: int | None = None,
        load_factor: float | None = None,
        load_floor: int | None = None,
        request_tokens: float | None = None,
        affinity_weight: float | None = None,
        prefill_rate: float | None = None,
        max_request_count: int | None = None,
        critical_models: list[str] | None = None,
        stale_after_ms: int | None = None,
        queue_threshold: float | None = None,
        kv_cache_threshold: float | None = None,
        lora_queue_threshold: float | None = None,
        lora_affinity: float | None = None,
        affinity_keys: list[str] | None = None,
        route_unknown_models: bool | None = None,
        seed: int | None = None,
    ) -> Self:
        """A setting left ``None`` takes its default (``balancer_defaults()``). ``seed`` makes the
        draws among never-picked endpoints reproducible. ``affinity_keys``: where a request's
        affinity key comes from, first present wins (``prompt_cache_key``, ``conversation``,
        ``session_header``, ``safety_identifier``, ``user``); ``route_unknown_models``: a model
        no endpoint serves is routed by load instead of refused.

        Raises:
            ValueError: an unknown policy or affinity key, a load_factor below 1, a negative load
                weight, or a prefill_rate that is not positive.
            MemoryError: the prefix table cannot be reserved.
        """
    @property
    def policy(self) -> str: ...
    @property
    def uses_prefix(self) -> bool:
        """Whether the policy reads prefix levels (only then are they worth hashing)."""
    @property
    def open_tickets(self) -> int: ...
    @property
    def prefix_entries(self) -> int: ...
    def prefix_stats(self) -> dict[str, int]:
        """The prefix table's ``entries`` and ``capacity`` (with ``--workers``, the shared table)
        and this process's ``lookups``, ``hits``, ``insertions`` and ``evictions`` since it
        started."""
    def pin_clock(self, ms: int | None) -> None:
        """Pins the balancer's clock at ``ms`` (replays and tests: decisions that depend on time,
        such as prefill backlogs and prefix expiry, then repeat exactly); ``None`` unpins it."""
    def set_endpoints(self, addresses: list[str]) -> None: ...
    def set_healthy(self, address: str, healthy: bool) -> None: ...
    def set_models(self, address: str, models: list[str] | None) -> None:
        """Sets the models (and LoRA adapters) an endpoint serves; ``None``: not known."""
    def models_of(self, address: str) -> list[str] | None:
        """The models an endpoint is known to serve."""
    def pick(
        self,
        request: ParsedRequest | bytes | None,
        *,
        session: str | None = None,
        pinned: str | None = None,
    ) -> Pick:
        """Decides and counts a pick.

        ``request``: a ``ParsedRequest`` (read in place), a body (parsed here without a size
        limit, level cap or decoding), or ``None`` to pick from the headers alone. An unusable
        body is picked by load with reason ``"bad_body"``. ``session``: the session header's
        value (an affinity key); ``pinned``: the endpoint holding the stored response the
        request refers to (picked while it is in the pool and healthy).

        Raises:
            NoEndpointsError: the pool is empty.
            OverLimitError: ``max_request_count`` is reached on the best endpoint.
            ShedError: least_busy, a sheddable model, and no endpoint has room.
            UnknownModelError: no endpoint serves the request's model.
        """
    def set_load(
        self,
        address: str,
        *,
        waiting: float,
        running: float,
        kv_cache: float,
        running_lora: list[str],
        waiting_lora: list[str],
        max_lora: int,
    ) -> None:
        """Records an endpoint's freshly scraped load (least_busy), stamped now."""
    def endpoint_loads(
        self,
    ) -> list[tuple[str, float | None, float | None, float | None, float | None, int]]:
        """``(address, waiting, running, kv_cache, age_seconds, picks_since_scrape)`` per pool endpoint."""
    def enable_shared(self, pool: str, replica: str, lease_ms: int, keep_ms: int, commit_sha: str) -> None:
        """Turns on shared picks for ``pool`` as replica ``replica``."""
    def set_remote(self, on: bool) -> None:
        """While Redis answers (``True``), decisions use the pool-wide loads of its replies; else
        this replica's own counts."""
    def prepare_shared(
        self,
        request: ParsedRequest | bytes | None,
        request_id: str,
        releases: list[tuple[str, int]] = ...,
        *,
        session: str | None = None,
        pinned: str | None = None,
    ) -> tuple[int, bytes]:
        """Decides a shared pick and encodes its commit: ``(pending_id, RESP EVALSHA)``;
        ``releases`` (finished requests: ``(request id, tokens from release_tokens)``) ride on
        it. Every pending id must be completed, fall back or be discarded.

        Raises:
            RuntimeError: shared state is not enabled.
            NoEndpointsError, OverLimitError, UnknownModelError: as ``pick``.
        """
    def complete_shared(self, pending_id: int, reply: list[Any]) -> Pick | bytes:
        """Reads a commit's reply ``[committed, [requests...], stream id]``: the pick,
        or the next commit to send after a race lost on the guard.

        Raises:
            NoEndpointsError, OverLimitError: deciding again found no endpoint.
        """
    def fallback_shared(self, pending_id: int) -> Pick:
        """Redis did not answer: counts the pending decision here only (like ``pick``).

        Raises:
            ValueError: an unknown pending id.
        """
    def discard_shared(self, pending_id: int) -> None:
        """Forgets a pending pick (a no-op if already used)."""
    def release_call(self, releases: list[tuple[str, int]]) -> tuple[list[str], list[bytes]]:
        """The release script call for a batch: ``(KEYS, ARGV)`` for redis-py."""
    def release_command(self, sha: str, releases: list[tuple[str, int]]) -> bytes:
        """The same release call as a RESP ``EVALSHA`` of ``sha``."""
    def heartbeat_call(self, max_listed: int) -> tuple[list[str], list[bytes]]:
        """The heartbeat script call, listing up to ``max_listed`` lapsed replicas."""
    def reap_call(self, other: str) -> tuple[list[str], list[bytes]]:
        """The reap script call for a lapsed replica."""
    def shared_key(self, name: str) -> str:
        """A key of the pool: ``inflight``, ``leases`` or ``picks``.

        Raises:
            ValueError: another name.
        """
    def apply_stream_record(self, record_id: str, fields: dict[bytes, bytes]) -> bool:
        """Applies one record of the pool's stream (its id and fields): another replica's commit,
        release, reap or take-back: a commit's tokens to the endpoint's prefill backlog, its levels
        to the prefix table, and request counts to the view if the latest reply did not count
        them yet. ``False`` if it changed nothing (this replica's own records,
        garbled ones)."""
    def release(self, ticket: int) -> bool:
        """Ends a pick's request; ``False`` if the ticket is unknown or already released."""
    def release_tokens(self, ticket: int) -> int | None:
        """Ends a pick's request like ``release``, returning the prompt tokens the backlog still
        held of it (for its release record, so the other replicas take them back too); ``None``
        if the ticket is unknown or already released."""
    def release_failed(self, ticket: int) -> bytes | None:
        """Ends a request that failed (an error answer), taking back the prefix levels its pick
        claimed. With shared state, returns the stream record (RESP ``XADD``) that tells the
        other replicas; else (or if nothing was claimed) ``None``."""
    def endpoints(self) -> list[tuple[str, int, int, bool, bool, int]]:
        """``[(address, inflight, own_inflight, healthy, in_pool, backlog)]``: ``inflight`` and
        ``backlog`` (prompt tokens sent and not yet prefilled, estimated) as decisions see them
        (every worker, or every replica through Redis), ``own_inflight`` this process's."""
    def attach_workers(self, path: str | os.PathLike[str], worker: int) -> None:
        """Shares counts, prefill backlogs and prefix entries with the other workers through
        ``path``."""

def balancer_defaults() -> dict[str, float]:
    """The picking defaults (their one owner), by config name: ``redisKeyTTL``,
    ``prefixTableSize``, ``affinityLoadFactor``, ``affinityLoadFloor``, ``requestTokens``,
    ``affinityWeight``, ``prefillTokensPerSecond``, ``maxRequestCount``, ``staleAfter``,
    ``queueThresholdCritical``, ``kvCacheThreshold``, ``queueingThresholdLoRA``,
    ``loraAffinityThreshold``."""

def create_worker_state(
    path: str | os.PathLike[str], workers: int, slots: int, prefix_capacity: int, prefix_ttl_s: int
) -> int:
    """Creates the state file shared by ``llmlb serve --workers N``; returns its size in bytes."""
