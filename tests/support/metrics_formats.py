"""Prometheus ``/metrics`` pages in the text format real inference servers emit, for the fake backends.

Imported two ways: as ``tests.support.metrics_formats`` by the tests, and as plain ``metrics_formats`` by
``backend.py``, which runs as a script (``python tests/support/backend.py``) and puts its own directory
first on ``sys.path`` to find this file. Keep this module standard-library only and free of imports
from ``tests``, so that both ways keep working.

`render_metrics` draws one engine's page from a `MetricsState` (the values a test wants the picker
to see) plus the backend's live numbers. The load-bearing series per engine (waiting / running / KV 0..1):

- ``vllm``: ``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``;
  also ``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``, ``vllm:lora_requests_info``.
- ``vllm-old``: the same, but KV as ``vllm:gpu_cache_usage_perc``.
- ``sglang``: ``sglang:num_queue_reqs``, ``sglang:num_running_reqs``, ``sglang:token_usage``.
- ``trtllm-serve``: ``trtllm_num_requests_waiting``, ``trtllm_num_requests_running``,
  ``trtllm_kv_cache_utilization``.
- ``triton``: ``nv_trt_llm_request_metrics{request_type="waiting"}`` and ``{request_type="scheduled"}``,
  ``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}``.

Around them sit the families the real servers also emit (counters with ``_created`` stamps, histograms,
a summary, ``process_*``/``python_gc_*``, info gauges), in each server's own style:

- vLLM (prometheus_client in one process): labels ``engine="0",model_name=...``, labels sorted by name,
  Go-style numbers (``0.0``, ``1.234e+06``), histograms as buckets/count/sum, and ``*_created`` gauge
  families after each counter and histogram. ``vllm:lora_requests_info`` (no model label; the value is
  a unix timestamp) appears only when LoRA is configured (``max_lora > 0`` or adapters listed), as TWO
  series: the current state stamped ``now`` and, AFTER it, an older stale series with other adapters,
  so a parser must keep the newest series, not the first or the last one.
- SGLang and trtllm-serve (prometheus_client in multiprocess mode): no ``process_*``/``python_*`` and
  no ``_created``; histograms come as sum/buckets/count.
- Triton (prometheus-cpp): ``model="tensorrt_llm",version="1"`` labels, C++ numbers (``0``, ``0.25``),
  counters without ``_total``, histograms as count/sum/buckets.

``MetricsState.omit`` leaves logical metrics out of the page: for vLLM, SGLang and trtllm-serve the
whole family goes; for Triton, where waiting/running and KV are series of shared families, just that
series (``request_type="waiting"`` / ``"scheduled"``, ``kv_cache_block_type="fraction"``) goes, as on
older Triton releases. ``"lora"`` only affects the vLLM engines.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENGINES = ("vllm", "vllm-old", "sglang", "trtllm-serve", "triton")
LOGICAL_METRICS = ("waiting", "running", "kv", "lora")
DEFAULT_MODEL = "test-model"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Requests the fake server "served before it started", so counters and histograms carry plausible,
# non-trivial values (and Go-style exponents) from the first scrape on.
HISTORY_REQUESTS = 1523
PROMPT_TOKENS_PER_REQUEST = 733
GENERATION_TOKENS_PER_REQUEST = 187
UPTIME_SECONDS = 5400.0
STALE_LORA_AGE_SECONDS = 90.0
STALE_LORA_ADAPTER = "stale-adapter"
KV_MAX_BLOCKS = 6239
KV_TOKENS_PER_BLOCK = 64

Labels = Mapping[str, str]

# Histogram bounds as the servers define them (trtllm-serve reuses vLLM's).
# fmt: off
_VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                      10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0)
_VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                         120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_VLLM_TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 8192.0)
_VLLM_ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0)
_SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0,
                        160.0)
_SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08,
                       0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)
_SGLANG_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                       150.0, 200.0, 250.0, 300.0, 350.0, 500.0, 1000.0)
_TRITON_FIRST_RESPONSE_BUCKETS = (100.0, 500.0, 2000.0, 5000.0)
# fmt: on


class MetricsStateError(ValueError):
    """A bad update to a :class:`MetricsState` (unknown field or wrong type); the message says which."""


@dataclass
class MetricsState:
    """What a fake backend's ``/metrics`` reports; set at run time with ``POST /_metrics``.

    ``running=None`` reports the backend's live count of concurrent inference requests. ``omit`` names
    logical metrics (:data:`LOGICAL_METRICS`) left out of the page. ``status`` and ``delay_ms`` shape
    the HTTP answer (the page is still rendered under a non-200 status); ``garbage``, when set, replaces
    the whole body verbatim.
    """

    waiting: float = 0
    running: float | None = None
    kv: float = 0.1
    running_lora: list[str] = field(default_factory=list)
    waiting_lora: list[str] = field(default_factory=list)
    max_lora: int = 0
    omit: list[str] = field(default_factory=list)
    status: int = 200
    delay_ms: int = 0
    garbage: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> MetricsState:
        """A copy with `changes` applied; raises `MetricsStateError`, applying nothing, if any is bad."""
        if not isinstance(changes, Mapping):
            raise MetricsStateError(f"expected a JSON object of MetricsState fields, got {_kind(changes)}")
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            check = _CHECKS.get(name)
            if check is None:
                known = ", ".join(_CHECKS)
                raise MetricsStateError(f"unknown MetricsState field {name!r} (known: {known})")
            clean[name] = check(name, value)
        return dataclasses.replace(self, **clean)

    @property
    def lora_configured(self) -> bool:
        return self.max_lora > 0 or bool(self.running_lora) or bool(self.waiting_lora)


# --------------------------------------------------------------------------------------------------
# validation of POST /_metrics fields


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(name: str, value: Any) -> float:
    if not _is_number(value):
        raise MetricsStateError(f"{name} must be a number, got {_kind(value)} {value!r}")
    return float(value)


def _optional_number(name: str, value: Any) -> float | None:
    return None if value is None else _number(name, value)


def _int_in(low: int, high: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise MetricsStateError(f"{name} must be an integer, got {_kind(value)} {value!r}")
        if not low <= value <= high:
            raise MetricsStateError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return check


def _adapters(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MetricsStateError(f"{name} must be a list of strings, got {_kind(value)} {value!r}")
    if any("," in v or not v for v in value):
        raise MetricsStateError(f"{name}: adapter names must be non-empty and contain no comma: {value!r}")
    return list(value)


def _omit(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MetricsStateError(f"{name} must be a list of strings, got {_kind(value)} {value!r}")
    unknown = [v for v in value if v not in LOGICAL_METRICS]
    if unknown:
        raise MetricsStateError(f"{name}: unknown metrics {unknown} (known: {', '.join(LOGICAL_METRICS)})")
    return list(value)


def _optional_text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise MetricsStateError(f"{name} must be a string or null, got {_kind(value)} {value!r}")
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "waiting": _number,
    "running": _optional_number,
    "kv": _number,
    "running_lora": _adapters,
    "waiting_lora": _adapters,
    "max_lora": _int_in(0, 1_000_000),
    "omit": _omit,
    "status": _int_in(200, 599),
    "delay_ms": _int_in(0, 600_000),
    "garbage": _optional_text,
}
assert set(_CHECKS) == {f.name for f in dataclasses.fields(MetricsState)}


# --------------------------------------------------------------------------------------------------
# number and label formatting


def go_float(value: float) -> str:
    """A float the way prometheus_client (Python) writes it: ``0.0``, ``12.5``, ``1.5e+09``, ``+Inf``."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    whole, dot, frac = text.partition(".")
    # Go switches to an exponent once the integer part has more than six digits.
    if value > 0 and dot and "e" not in text and len(whole) > 6:
        mantissa = f"{whole[0]}.{whole[1:]}{frac}".rstrip("0").rstrip(".")
        return f"{mantissa}e+{len(whole) - 1:02d}"
    return text


def cpp_float(value: float) -> str:
    """A float the way prometheus-cpp (Triton) writes it: ``0``, ``0.25``, ``1700000000``, ``+Inf``."""
    value = float(value)
    if math.isnan(value):
        return "Nan"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return format(value, ".16g")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


# --------------------------------------------------------------------------------------------------
# page writer

PYTHON_HISTOGRAM = ("bucket", "count", "sum")  # prometheus_client, one process
MULTIPROCESS_HISTOGRAM = ("sum", "bucket", "count")  # prometheus_client, PROMETHEUS_MULTIPROC_DIR
CPP_HISTOGRAM = ("count", "sum", "bucket")  # prometheus-cpp


class Page:
    """Accumulates one exposition page. `number` formats values; `created` stamps ``*_created`` families."""

    def __init__(
        self,
        number: Callable[[float], str],
        histogram_order: Sequence[str],
        created: float | None = None,
    ) -> None:
        self.number = number
        self.histogram_order = histogram_order
        self.created = created
        self.lines: list[str] = []

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def head(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Labels, value: float) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
            self.lines.append(f"{name}{{{inner}}} {self.number(value)}")
        else:
            self.lines.append(f"{name} {self.number(value)}")

    def _created_family(self, base: str, help_text: str, series: Iterable[Labels]) -> None:
        if self.created is None:
            return
        self.head(f"{base}_created", "gauge", help_text)
        for labels in series:
            self.sample(f"{base}_created", labels, self.created)

    def gauge(self, name: str, help_text: str, series: Iterable[tuple[Labels, float]]) -> None:
        self.head(name, "gauge", help_text)
        for labels, value in series:
            self.sample(name, labels, value)

    def counter(
        self, name: str, help_text: str, series: Iterable[tuple[Labels, float]], *, created: bool = True
    ) -> None:
        """`name` as exposed (with ``_total`` for prometheus_client, without it for Triton)."""
        rows = list(series)
        self.head(name, "counter", help_text)
        for labels, value in rows:
            self.sample(name, labels, value)
        if created:
            self._created_family(name.removesuffix("_total"), help_text, (labels for labels, _ in rows))

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Labels,
        *,
        bounds: Sequence[float],
        count: int,
        mean: float,
    ) -> None:
        """A histogram of `count` observations averaging `mean`, spread exponentially over `bounds`."""
        self.head(name, "histogram", help_text)
        buckets: list[tuple[str, Labels, float]] = [
            (f"{name}_bucket", {**labels, "le": self.number(le)}, _cumulative(count, le, mean))
            for le in bounds
        ]
        buckets.append((f"{name}_bucket", {**labels, "le": "+Inf"}, float(count)))
        parts: dict[str, list[tuple[str, Labels, float]]] = {
            "bucket": buckets,
            "count": [(f"{name}_count", labels, float(count))],
            "sum": [(f"{name}_sum", labels, count * mean)],
        }
        for part in self.histogram_order:
            for sample_name, sample_labels, value in parts[part]:
                self.sample(sample_name, sample_labels, value)
        self._created_family(name, help_text, [labels])

    def summary(self, name: str, help_text: str, series: Iterable[tuple[Labels, int, float]]) -> None:
        """A quantile-less summary (``_count`` and ``_sum``), as prometheus_client writes one."""
        rows = list(series)
        self.head(name, "summary", help_text)
        for labels, count, mean in rows:
            self.sample(f"{name}_count", labels, float(count))
            self.sample(f"{name}_sum", labels, count * mean)
        self._created_family(name, help_text, (labels for labels, _, _ in rows))


def _cumulative(count: int, bound: float, mean: float) -> float:
    """Observations <= `bound` of `count` spread exponentially around `mean` (monotonic in `bound`)."""
    return float(math.floor(count * (1.0 - math.exp(-bound / mean))))


# --------------------------------------------------------------------------------------------------
# the values a page shows


@dataclass(frozen=True)
class _View:
    """The numbers one render shows, derived from the state and the backend's live counts."""

    state: MetricsState
    running: float
    served: int
    now: float
    model: str

    def shows(self, metric: str) -> bool:
        return metric not in self.state.omit

    @property
    def requests(self) -> int:
        return HISTORY_REQUESTS + self.served

    @property
    def prompt_tokens(self) -> float:
        return float(self.requests * PROMPT_TOKENS_PER_REQUEST)

    @property
    def generation_tokens(self) -> float:
        return float(self.requests * GENERATION_TOKENS_PER_REQUEST)

    @property
    def started(self) -> float:
        return round(self.now - UPTIME_SECONDS, 2)


def render_metrics(
    engine: str,
    state: MetricsState,
    concurrent: float = 0,
    *,
    served: int = 0,
    model: str = DEFAULT_MODEL,
    now: float | None = None,
) -> str:
    """The ``/metrics`` page `engine` would serve in `state`.

    `concurrent` is the backend's live count of in-flight inference requests, reported as "running"
    when ``state.running`` is None. `served` (requests finished since the process started) makes the
    counters and histograms grow. `now` (default: the clock) stamps the LoRA info series and
    ``*_created``. If ``state.garbage`` is set it is returned verbatim, whatever the engine.
    """
    if state.garbage is not None:
        return state.garbage
    renderer = _RENDERERS.get(engine)
    if renderer is None:
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    running = float(concurrent) if state.running is None else state.running
    view = _View(state, running, served, time.time() if now is None else now, model)
    return renderer(view)


# --------------------------------------------------------------------------------------------------
# vLLM


def _python_runtime(page: Page, view: _View) -> None:
    """The default prometheus_client collectors: gc, platform, process."""
    gc_help = (
        ("python_gc_objects_collected_total", "Objects collected during gc", (48211.0, 9344.0, 1125.0)),
        ("python_gc_objects_uncollectable_total", "Uncollectable objects found during GC", (0.0, 0.0, 0.0)),
        (
            "python_gc_collections_total",
            "Number of times this generation was collected",
            (2871.0, 261.0, 12.0),
        ),
    )
    for name, help_text, values in gc_help:
        page.head(name, "counter", help_text)
        for generation, value in enumerate(values):
            page.sample(name, {"generation": str(generation)}, value)
    version = {
        "implementation": "CPython",
        "major": "3",
        "minor": "12",
        "patchlevel": "11",
        "version": "3.12.11",
    }
    page.gauge("python_info", "Python platform information", [(version, 1.0)])
    page.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", [({}, 43_284_316_160.0)])
    page.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", [({}, 2_371_117_056.0)])
    page.gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        [({}, view.started)],
    )
    page.counter(
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        [({}, 412.37 + view.served * 0.01)],
        created=False,
    )
    page.gauge("process_open_fds", "Number of open file descriptors.", [({}, 87.0)])
    page.gauge("process_max_fds", "Maximum number of open file descriptors.", [({}, 1_048_576.0)])


def _lora_series(state: MetricsState, now: float) -> list[tuple[Labels, float]]:
    """The current LoRA state stamped `now`, then an older stale series with different adapters."""
    current = {
        "max_lora": str(state.max_lora),
        "running_lora_adapters": ",".join(state.running_lora),
        "waiting_lora_adapters": ",".join(state.waiting_lora),
    }
    stale = {
        **current,
        "running_lora_adapters": STALE_LORA_ADAPTER,
        "waiting_lora_adapters": STALE_LORA_ADAPTER,
    }
    if stale == current:
        stale["running_lora_adapters"] = f"{STALE_LORA_ADAPTER}-old"
    return [(current, now), (stale, now - STALE_LORA_AGE_SECONDS)]


def _render_vllm(view: _View, kv_name: str) -> str:
    page = Page(go_float, PYTHON_HISTOGRAM, created=view.started + 41.7)
    _python_runtime(page, view)
    labels = {"engine": "0", "model_name": view.model}
    state = view.state
    if view.shows("running"):
        page.gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            [(labels, view.running)],
        )
    if view.shows("waiting"):
        page.gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            [(labels, state.waiting)],
        )
    if view.shows("kv"):
        kv_help = "KV-cache usage. 1 means 100 percent usage."
        if kv_name == "vllm:gpu_cache_usage_perc":
            kv_help = "GPU KV-cache usage. 1 means 100 percent usage."
        page.gauge(kv_name, kv_help, [(labels, state.kv)])
    queries = view.prompt_tokens
    page.counter(
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        [(labels, queries)],
    )
    page.counter(
        "vllm:prefix_cache_hits_total",
        "Prefix cache hits, in terms of number of cached tokens.",
        [(labels, float(math.floor(queries * 0.62)))],
    )
    page.counter(
        "vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", [(labels, 3.0)]
    )
    page.counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", [(labels, queries)])
    page.counter(
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        [(labels, view.generation_tokens)],
    )
    finished = [("stop", 0.93), ("length", 0.06), ("abort", 0.01)]
    page.counter(
        "vllm:request_success_total",
        "Count of successfully processed requests.",
        [
            ({**labels, "finished_reason": reason}, float(math.floor(view.requests * share)))
            for reason, share in finished
        ],
    )
    n = view.requests
    page.histogram(
        "vllm:request_prompt_tokens",
        "Number of prefill tokens processed.",
        labels,
        bounds=_VLLM_TOKEN_BUCKETS,
        count=n,
        mean=PROMPT_TOKENS_PER_REQUEST,
    )
    page.histogram(
        "vllm:request_generation_tokens",
        "Number of generation tokens processed.",
        labels,
        bounds=_VLLM_TOKEN_BUCKETS,
        count=n,
        mean=GENERATION_TOKENS_PER_REQUEST,
    )
    page.histogram(
        "vllm:iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        labels,
        bounds=_VLLM_ITERATION_BUCKETS,
        count=n * 40,
        mean=96.0,
    )
    page.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        labels,
        bounds=_VLLM_TTFT_BUCKETS,
        count=n,
        mean=0.087,
    )
    page.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        labels,
        bounds=_VLLM_ITL_BUCKETS,
        count=n * GENERATION_TOKENS_PER_REQUEST,
        mean=0.021,
    )
    page.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        labels,
        bounds=_VLLM_LATENCY_BUCKETS,
        count=n,
        mean=4.1,
    )
    page.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        labels,
        bounds=_VLLM_LATENCY_BUCKETS,
        count=n,
        mean=0.35,
    )
    cache_config = {
        "block_size": "16",
        "cache_dtype": "auto",
        "enable_prefix_caching": "True",
        "gpu_memory_utilization": "0.9",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(KV_MAX_BLOCKS * 4),
        "prefix_caching_hash_algo": "sha256",
        "swap_space": "4",
    }
    page.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", [(cache_config, 1.0)])
    if state.lora_configured and view.shows("lora"):
        page.gauge(
            "vllm:lora_requests_info", "Running stats on lora requests.", _lora_series(state, view.now)
        )
    page.counter(
        "http_requests_total",
        "Total number of requests by method, status and handler.",
        [
            ({"handler": "/v1/chat/completions", "method": "POST", "status": "2xx"}, float(n)),
            ({"handler": "/metrics", "method": "GET", "status": "2xx"}, 108_000.0),
        ],
    )
    page.summary(
        "http_request_size_bytes",
        "Content length of incoming requests by handler.",
        [({"handler": "/v1/chat/completions"}, n, 2930.0)],
    )
    return page.text()


# --------------------------------------------------------------------------------------------------
# SGLang

_SGLANG_MAX_TOKENS = 421_336


def _render_sglang(view: _View) -> str:
    page = Page(go_float, MULTIPROCESS_HISTOGRAM)
    state = view.state
    tokenizer = {"model_name": view.model}
    scheduler = {"engine_type": "unified", "model_name": view.model, "pp_rank": "0", "tp_rank": "0"}
    n = view.requests
    page.counter(
        "sglang:prompt_tokens_total", "Number of prefill tokens processed.", [(tokenizer, view.prompt_tokens)]
    )
    page.counter(
        "sglang:generation_tokens_total",
        "Number of generation tokens processed.",
        [(tokenizer, view.generation_tokens)],
    )
    page.counter("sglang:num_requests_total", "Number of requests processed.", [(tokenizer, float(n))])
    page.histogram(
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        tokenizer,
        bounds=_SGLANG_TTFT_BUCKETS,
        count=n,
        mean=0.31,
    )
    page.histogram(
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        tokenizer,
        bounds=_SGLANG_E2E_BUCKETS,
        count=n,
        mean=3.6,
    )
    page.histogram(
        "sglang:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        tokenizer,
        bounds=_SGLANG_ITL_BUCKETS,
        count=n * GENERATION_TOKENS_PER_REQUEST,
        mean=0.018,
    )
    if view.shows("running"):
        page.gauge("sglang:num_running_reqs", "The number of running requests.", [(scheduler, view.running)])
    page.gauge(
        "sglang:num_used_tokens",
        "The number of used tokens.",
        [(scheduler, float(math.floor(state.kv * _SGLANG_MAX_TOKENS)))],
    )
    if view.shows("kv"):
        page.gauge("sglang:token_usage", "The token usage.", [(scheduler, state.kv)])
    page.gauge(
        "sglang:gen_throughput", "The generation throughput (token/s).", [(scheduler, 41.7 * view.running)]
    )
    if view.shows("waiting"):
        page.gauge(
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            [(scheduler, state.waiting)],
        )
    page.gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", [(scheduler, 0.6180339887498949)])
    page.gauge(
        "sglang:spec_accept_length",
        "The average acceptance length of speculative decoding.",
        [(scheduler, 0.0)],
    )
    return page.text()


# --------------------------------------------------------------------------------------------------
# trtllm-serve


def _render_trtllm(view: _View) -> str:
    page = Page(go_float, MULTIPROCESS_HISTOGRAM)
    state = view.state
    labels = {"engine_type": "trtllm", "model_name": view.model}
    n = view.requests
    page.counter(
        "trtllm_request_success_total",
        "Count of successfully processed requests.",
        [
            ({**labels, "finished_reason": "stop"}, float(math.floor(n * 0.94))),
            ({**labels, "finished_reason": "length"}, float(math.ceil(n * 0.06))),
        ],
    )
    page.histogram(
        "trtllm_e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds.",
        labels,
        bounds=_VLLM_LATENCY_BUCKETS,
        count=n,
        mean=3.9,
    )
    page.histogram(
        "trtllm_time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        labels,
        bounds=_VLLM_TTFT_BUCKETS,
        count=n,
        mean=0.074,
    )
    page.histogram(
        "trtllm_time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        labels,
        bounds=_VLLM_ITL_BUCKETS,
        count=n,
        mean=0.019,
    )
    page.histogram(
        "trtllm_request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        labels,
        bounds=_VLLM_LATENCY_BUCKETS,
        count=n,
        mean=0.41,
    )
    if view.shows("running"):
        page.gauge(
            "trtllm_num_requests_running",
            "Number of requests currently running on GPU.",
            [(labels, view.running)],
        )
    if view.shows("waiting"):
        page.gauge(
            "trtllm_num_requests_waiting",
            "Number of requests waiting to be processed.",
            [(labels, state.waiting)],
        )
    if view.shows("kv"):
        page.gauge(
            "trtllm_kv_cache_utilization",
            "KV cache utilization, 1 means 100 percent usage.",
            [(labels, state.kv)],
        )
    page.gauge("trtllm_kv_cache_hit_rate", "KV cache hit rate.", [(labels, 0.57)])
    page.gauge(
        "trtllm_kv_cache_tokens_per_block",
        "Number of tokens per KV cache block.",
        [(labels, float(KV_TOKENS_PER_BLOCK))],
    )
    page.gauge(
        "trtllm_kv_cache_max_blocks", "Maximum number of KV cache blocks.", [(labels, float(KV_MAX_BLOCKS))]
    )
    return page.text()


# --------------------------------------------------------------------------------------------------
# Triton with the TensorRT-LLM backend

_TRITON_MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")
_TRITON_GPU = {"gpu_uuid": "GPU-6e1c3f0a-52b4-8d4e-9a31-7f3c2d9b0e15"}


def _render_triton(view: _View) -> str:
    page = Page(cpp_float, CPP_HISTOGRAM)
    state = view.state
    n = float(view.requests)

    def per_model(value: float) -> list[tuple[Labels, float]]:
        return [({"model": model, "version": "1"}, value) for model in _TRITON_MODELS]

    page.counter(
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        per_model(n),
    )
    page.counter(
        "nv_inference_request_failure", "Number of failed inference requests, all batch sizes", per_model(0.0)
    )
    page.counter(
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        per_model(n),
    )
    page.counter(
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        per_model(n),
    )
    page.counter(
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        per_model(n * 3_912_417.0),
    )
    page.counter(
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        per_model(n * 412.0),
    )
    page.gauge(
        "nv_inference_pending_request_count",
        "Instantaneous number of pending requests awaiting execution per-model.",
        per_model(state.waiting),
    )
    page.histogram(
        "nv_inference_first_response_histogram_ms",
        "Duration from request to first response in milliseconds",
        {"model": "tensorrt_llm", "version": "1"},
        bounds=_TRITON_FIRST_RESPONSE_BUCKETS,
        count=view.requests,
        mean=96.0,
    )

    trt = {"model": "tensorrt_llm", "version": "1"}
    requests = [
        ("context", float(math.floor(view.running / 4))),
        ("scheduled", view.running),
        ("max", 256.0),
        ("active", view.running + state.waiting),
        ("waiting", state.waiting),
    ]
    dropped = {"waiting": not view.shows("waiting"), "scheduled": not view.shows("running")}
    page.gauge(
        "nv_trt_llm_request_metrics",
        "TRT LLM request metrics",
        [({**trt, "request_type": kind}, value) for kind, value in requests if not dropped.get(kind, False)],
    )
    memory = [("pinned", 1_610_236.0), ("gpu", 876_595_200.0), ("cpu", 14_888.0)]
    page.gauge(
        "nv_trt_llm_runtime_memory_metrics",
        "TRT LLM runtime memory metrics",
        [({**trt, "memory_type": kind}, value) for kind, value in memory],
    )
    used = float(round(state.kv * KV_MAX_BLOCKS)) if math.isfinite(state.kv) else 0.0
    blocks = [
        ("max", float(KV_MAX_BLOCKS)),
        ("free", KV_MAX_BLOCKS - used),
        ("used", used),
        ("tokens_per", float(KV_TOKENS_PER_BLOCK)),
        ("fraction", state.kv),
    ]
    page.gauge(
        "nv_trt_llm_kv_cache_block_metrics",
        "TRT LLM KV cache block metrics",
        [
            ({**trt, "kv_cache_block_type": kind}, value)
            for kind, value in blocks
            if kind != "fraction" or view.shows("kv")
        ],
    )
    batcher = [
        ("micro_batch_id", 0.0),
        ("generation_requests", view.running - math.floor(view.running / 4)),
        ("total_context_tokens", float(math.floor(view.running / 4) * PROMPT_TOKENS_PER_REQUEST)),
        ("paused_requests", 0.0),
    ]
    page.gauge(
        "nv_trt_llm_inflight_batcher_metrics",
        "TRT LLM inflight_batcher-specific metrics",
        [({**trt, "inflight_batcher_specific_metric": kind}, value) for kind, value in batcher],
    )
    page.gauge(
        "nv_trt_llm_general_metrics",
        "General TRT LLM metrics",
        [
            ({**trt, "general_type": "iteration_counter"}, n * 190),
            ({**trt, "general_type": "timestamp"}, float(math.floor(view.now))),
        ],
    )

    page.gauge("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", [({}, 0.0825)])
    page.gauge("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", [({}, 540_725_813_248.0)])
    page.gauge("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", [({}, 38_117_707_776.0)])
    page.gauge(
        "nv_gpu_utilization",
        "GPU utilization rate [0.0 - 1.0)",
        [(_TRITON_GPU, 0.93 if view.running else 0.0)],
    )
    page.gauge("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", [(_TRITON_GPU, 85_899_345_920.0)])
    page.gauge("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", [(_TRITON_GPU, 77_309_411_328.0)])
    page.gauge("nv_gpu_power_usage", "GPU power usage in watts", [(_TRITON_GPU, 312.457)])
    page.gauge("nv_gpu_power_limit", "GPU power management limit in watts", [(_TRITON_GPU, 700.0)])
    page.counter(
        "nv_energy_consumption",
        "GPU energy consumption in joules since the Triton Server started",
        [(_TRITON_GPU, 1_687_264.118)],
    )
    return page.text()


_RENDERERS: dict[str, Callable[[_View], str]] = {
    "vllm": lambda view: _render_vllm(view, "vllm:kv_cache_usage_perc"),
    "vllm-old": lambda view: _render_vllm(view, "vllm:gpu_cache_usage_perc"),
    "sglang": _render_sglang,
    "trtllm-serve": _render_trtllm,
    "triton": _render_triton,
}
assert tuple(_RENDERERS) == ENGINES
