"""Type stubs for the Rust extension ``llmlb._core``.

Calls hold the GIL except where noted; bodies of 64 KiB or more are parsed with it released.
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
    @property
    def kind(self) -> str:
        """``"chat"`` or ``"completion"``."""
    @property
    def model(self) -> str:
        """The ``model`` field, empty when absent."""
    @property
    def stream(self) -> bool: ...
    @property
    def prefix_hashes(self) -> list[int]:
        """``prefix_hashes[i]`` identifies the first ``i + 1`` prompt blocks (xxh3-64, chained)."""

def parse_request(body: bytes) -> ParsedRequest:
    """Parses a chat-completions or completions body.

    Raises:
        RequestParseError: the body is not a usable request.
    """

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
    def open_tickets(self) -> int: ...
    @property
    def prefix_entries(self) -> int: ...
    def set_endpoints(self, addresses: list[str]) -> None: ...
    def set_healthy(self, address: str, healthy: bool) -> None: ...
    def pick(self, body: bytes | None) -> tuple[int, str, str, int]:
        """Parses ``body`` and picks: ``(ticket, endpoint, reason, prefix_depth)``.

        An unusable body is picked by load with reason ``"bad_body"``; ``None`` picks from
        headers alone.

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
        self, body: bytes | None, request_id: str, seed: int, releases: list[str] = ...
    ) -> tuple[int, list[str], list[str], bytes]:
        """Parses ``body`` and encodes the pick script call: ``(prepared_id, keys, args,
        command)``, ``command`` being the same call as a RESP ``EVALSHA`` (``pick_sha``).
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
