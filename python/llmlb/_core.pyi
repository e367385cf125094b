"""Type stubs for the Rust extension ``llmlb._core``.

Calls hold the GIL except where noted; bodies (and ``RequestStream`` chunks) of 64 KiB or more
are parsed with it released.
"""

import os
from typing import Final

__version__: Final[str]
#: Bytes of canonical prompt per prefix block.
PREFIX_BLOCK_SIZE: Final[int]
#: KEYS of the Redis pick script before its prefix levels.
PICK_FIXED_KEYS: Final[int]

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

class ShedError(RuntimeError):
    """least_busy: the model is sheddable and no endpoint has room for it."""

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
        """``"chat"`` or ``"completion"``; ``None`` when not ``ok``."""
    @property
    def model(self) -> str:
        """The ``model`` field, empty when absent (or not ``ok``)."""
    @property
    def stream(self) -> bool:
        """The ``stream`` field (``False`` when absent or not ``ok``)."""
    @property
    def prefix_hashes(self) -> list[int]:
        """``prefix_hashes[i]`` identifies the model, the tools and the first ``i + 1`` prompt
        blocks (xxh3-64, chained); empty when not ``ok``. A new list on each access."""

def parse_request(body: bytes) -> ParsedRequest:
    """Parses a whole chat-completions or completions body (no size limit, no level cap, no
    decoding).

    Raises:
        RequestParseError: the body is not a usable request.
    """

def parse_body(body: bytes, encoding: str | None, max_bytes: int, max_blocks: int) -> ParsedRequest:
    """Decodes and parses a whole body (Envoy's buffered mode): the same code as a
    ``RequestStream`` fed the body in one chunk. Never raises for a bad body: the result is then
    not ``ok`` (too large, unsupported or corrupt encoding, not a usable request).

    ``encoding`` is the ``Content-Encoding`` header value (``None``: identity): ``gzip``,
    ``x-gzip``, ``deflate`` (zlib or raw), ``zstd``, ``identity``, or a list of up to two of them
    in the order applied. ``max_bytes`` bounds the raw and the decoded bytes alike;
    ``max_blocks`` the prefix levels.
    """

class RequestStream:
    """A request body fed chunk by chunk (Envoy's FULL_DUPLEX_STREAMED mode), decoded and parsed
    as it arrives in bounded memory; see ``parse_body`` for the arguments.

    Raises:
        OverflowError: a negative ``max_bytes`` or ``max_blocks``.
    """

    def __init__(self, encoding: str | None, max_bytes: int, max_blocks: int) -> None: ...
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
    def lines_skipped(self) -> int:
        """Malformed lines ignored."""

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
    """The Redis Lua scripts by name: ``pick``, ``release``, ``heartbeat``, ``reap``, ``forget``."""

class Balancer:
    """Embedded picking state: pool, in-flight counts, tickets, prefix table, policy."""

    def __init__(
        self,
        policy: str,
        *,
        prefix_ttl_s: int = 1800,
        prefix_capacity: int = 262_144,
        load_factor: float = 1.5,
        load_floor: int = 8,
        max_request_count: int = 0,
        critical_models: list[str] | None = None,
        stale_after_ms: int = 2000,
        queue_threshold: float = 5.0,
        kv_cache_threshold: float = 0.8,
        lora_queue_threshold: float = 128.0,
        lora_affinity: float = 0.999,
    ) -> None:
        """Raises ValueError for an unknown policy or a load_factor below 1."""
    @property
    def policy(self) -> str: ...
    @property
    def uses_prefix(self) -> bool:
        """Whether the policy reads prefix levels (only then are they worth hashing)."""
    @property
    def open_tickets(self) -> int: ...
    @property
    def prefix_entries(self) -> int: ...
    def set_endpoints(self, addresses: list[str]) -> None: ...
    def set_healthy(self, address: str, healthy: bool) -> None: ...
    def pick(self, request: ParsedRequest | bytes | None) -> tuple[int, str, str, int]:
        """Picks for a parsed request: ``(ticket, endpoint, reason, prefix_depth)``. ``bytes``
        are parsed here (as ``parse_request``: no size limit, no level cap, no decoding).

        A request that is not ``ok`` (or unusable bytes) is picked by load with reason
        ``"bad_body"``; ``None`` picks from headers alone.

        Raises:
            NoEndpointsError: the pool is empty.
            OverLimitError: ``max_request_count`` is reached on the best endpoint.
            ShedError: least_busy, a sheddable model, and no endpoint has room.
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
    def enable_shared(self, pool: str, replica: str, lease_ms: int, keep_ms: int, pick_sha: str) -> None:
        """Turns on shared-state picks for ``pool`` as replica ``replica``."""
    def prepare_shared(
        self,
        request: ParsedRequest | bytes | None,
        request_id: str,
        seed: int,
        releases: list[str] = ...,
    ) -> tuple[int, list[str], list[str], bytes]:
        """Encodes the pick script call for ``request`` (as ``pick`` takes it): ``(prepared_id,
        keys, args, command)``, ``command`` being the same call as a RESP ``EVALSHA``
        (``pick_sha``).
        ``releases`` are request ids of finished requests the call releases first.

        Every prepared id must be committed, fall back or be discarded.

        Raises:
            NoEndpointsError: no candidate endpoints.
        """
    def commit_shared(self, prepared_id: int, endpoint: str, depth: int) -> tuple[int, str]:
        """Counts a shared pick locally: ``(ticket, reason)``."""
    def fallback_shared(self, prepared_id: int) -> tuple[int, str, str, int]:
        """Picks from local state instead (like ``pick``)."""
    def discard_shared(self, prepared_id: int) -> None:
        """Forgets a prepared pick (no-op if already used)."""
    def shared_keys(self) -> dict[str, str]:
        """``inflight``, ``leases``, ``replica_counts``, ``replica_requests`` key names."""
    def replica_keys(self, replica: str) -> tuple[str, str]:
        """``(counts, requests)`` key names of another replica (to reap it)."""
    def release(self, ticket: int, failed: bool = False) -> bool:
        """Ends a pick's request; ``False`` if the ticket is unknown or already released. A
        ``failed`` request (an error answer) also takes back the prefix levels its pick claimed."""
    def endpoints(self) -> list[tuple[str, int, int, bool, bool]]:
        """``[(address, inflight, own_inflight, healthy, in_pool)]``: ``inflight`` across every
        worker attached to the same state, ``own_inflight`` this process's."""
    def attach_workers(self, path: str | os.PathLike[str], worker: int) -> None:
        """Shares counts and prefix entries with the other workers through ``path``."""

def create_worker_state(
    path: str | os.PathLike[str], workers: int, slots: int, prefix_capacity: int, prefix_ttl_s: int
) -> int:
    """Creates the state file shared by ``llmlb serve --workers N``; returns its size in bytes."""
