"""Prometheus metrics, kept small and allocation-free on the hot path.

A counter increment is a dict update on the event-loop thread (no locks needed: the daemon is
single-threaded), and the text exposition is rendered only when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = labels
        self.values: dict[LabelValues, float] = {}
        if not labels:
            self.values[()] = 0.0

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, labels: LabelValues = ()) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class Gauge:
    """A gauge whose samples are computed at scrape time."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...],
        collect: Callable[[], Iterable[tuple[LabelValues, float]]],
    ) -> None:
        self.name = name
        self.help = help_text
        self.label_names = labels
        self.collect = collect

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in self.collect():
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class CollectedCounter(Gauge):
    """A counter whose owner keeps the count (read at scrape time)."""

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in self.collect():
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class ValueGauge:
    """A gauge holding one value, set by the code that knows it."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_num(self.value)}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        cumulative = 0
        # counts has one more slot than buckets: the +Inf bucket, rendered below.
        for bound, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            yield f'{self.name}_bucket{{le="{_num(bound)}"}} {cumulative}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{self.name}_sum {self.sum!r}"
        yield f"{self.name}_count {self.count}"


# Pick latency is microseconds in the normal case; the top buckets catch stalls.
PICK_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025,
    0.005, 0.01, 0.025, 0.1, 1.0,
)  # fmt: skip


# Matched prefix levels: 0 (a miss), then up to 64 KiB of prompt and beyond.
PREFIX_DEPTH_BUCKETS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class Metrics:
    """Every metric the daemon exports (names are part of the contract)."""

    def __init__(self, inflight: Callable[[], Iterable[tuple[LabelValues, float]]]) -> None:
        self.picks = Counter(
            "llmlb_picks_total", "Endpoints picked, by policy, endpoint and reason.",
            ("policy", "endpoint", "reason"),
        )  # fmt: skip
        self.pick_duration = Histogram(
            "llmlb_pick_duration_seconds", "Time to parse the body and pick an endpoint.", PICK_BUCKETS
        )
        self.inflight = Gauge(
            "llmlb_inflight_requests",
            "Requests in flight per endpoint (this replica).",
            ("endpoint",),
            inflight,
        )
        self.prefix_hit_depth = Histogram(
            "llmlb_prefix_hit_depth",
            "Leading prefix levels (512-byte blocks) the picked endpoint held, per pick of a "
            "request with prefix levels (0: no match).",
            PREFIX_DEPTH_BUCKETS,
        )
        self.fallbacks = Counter(
            "llmlb_fallbacks_total", "Picks that fell back from the policy, by reason.", ("reason",)
        )
        self.redis_errors = Counter("llmlb_redis_errors_total", "Redis commands that failed or timed out.")
        self.redis_up = ValueGauge("llmlb_redis_up", "1 while shared picks go through Redis, 0 while local.")
        self.redis_duration = Histogram(
            "llmlb_redis_pick_duration_seconds", "Round trip of the shared pick script.", PICK_BUCKETS
        )
        self.redis_commit_retries = Counter(
            "llmlb_redis_commit_retries_total",
            "Shared picks decided again: another replica made the chosen endpoint busier first.",
        )
        self.reaped_requests = Counter(
            "llmlb_redis_reaped_requests_total", "In-flight requests removed with a lapsed replica's lease."
        )
        self.redis_dropped_releases = Counter(
            "llmlb_redis_dropped_releases_total", "Releases dropped while Redis was away (queue full)."
        )
        self.immediate = Counter(
            "llmlb_immediate_responses_total", "Requests answered by the picker itself, by status.", ("code",)
        )
        self.streams = Counter("llmlb_extproc_streams_total", "ext_proc streams opened by Envoy.")
        self.stream_errors = Counter(
            "llmlb_extproc_stream_errors_total",
            "ext_proc streams that ended with an error, by kind.",
            ("kind",),
        )
        self.endpoint_health_changes = Counter(
            "llmlb_endpoint_health_changes_total", "Endpoint health transitions, by new state.", ("state",)
        )
        self.endpoints_reloads = Counter(
            "llmlb_endpoints_reloads_total", "endpoints_file reloads, by result.", ("result",)
        )
        self.tls_reloads = Counter(
            "llmlb_tls_reloads_total",
            "grpc_tls certificate reloads after a file change, by result.",
            ("result",),
        )
        self.scrapes = Counter(
            "llmlb_metrics_scrapes_total",
            "Scrapes of endpoint metrics (least_busy, prediction).",
            ("endpoint",),
        )
        self.scrape_errors = Counter(
            "llmlb_metrics_scrape_errors_total",
            "Scrapes that gave no usable page (least_busy: no usable load), by endpoint and reason.",
            ("endpoint", "reason"),
        )
        self.metrics_age = Gauge(
            "llmlb_endpoint_metrics_age_seconds",
            "Age of each endpoint's last usable metrics (least_busy; -1 = none yet).",
            ("endpoint",),
            lambda: [],
        )
        self.shed = Counter(
            "llmlb_shed_requests_total",
            "least_busy: sheddable requests refused with 429 (no endpoint had room).",
        )
        self.prefix_entries = Gauge(
            "llmlb_prefix_table_entries",
            "Entries in this process's embedded prefix table (prefix_cache).",
            (),
            lambda: [],
        )
        self.responses_learned = Counter(
            "llmlb_responses_learned_total",
            "Responses API: stored response ids learned from responses (id -> endpoint).",
        )
        self.response_lookups = Counter(
            "llmlb_response_lookups_total",
            "Responses API: follow-ups naming a stored response, by whether its endpoint was known.",
            ("result",),
        )
        self.model_refreshes = Counter(
            "llmlb_model_refreshes_total",
            "GET /v1/models of endpoints (multi-model pools), by result.",
            ("result",),
        )

        # Discovery (`discovery`): filled in by the EndpointManager when a source runs.
        self.discovery_up = Gauge(
            "llmlb_discovery_up",
            "1 while the discovery source is in touch with what it watches; 0 while the last known "
            "endpoints are kept through an outage.",
            ("kind",),
            lambda: [],
        )
        self.discovery_endpoints = Gauge(
            "llmlb_discovery_endpoints",
            "Endpoints the discovery source found, last time.",
            ("kind",),
            lambda: [],
        )
        self.discovery_last_success = Gauge(
            "llmlb_discovery_last_success_timestamp_seconds",
            "Unix time of the discovery source's last good answer (0: none yet).",
            ("kind",),
            lambda: [],
        )
        self.discovery_updates = CollectedCounter(
            "llmlb_discovery_updates_total",
            "Changes of the discovered endpoint set applied.",
            ("kind",),
            lambda: [],
        )
        self.discovery_errors = CollectedCounter(
            "llmlb_discovery_errors_total",
            "Discovery reads that failed (DNS errors, API errors, broken watches).",
            ("kind",),
            lambda: [],
        )

        # Prediction vs reality (`prediction`): filled in by llmlb.prediction when it is on.
        # Tokens on the two sides are not the same unit (llmlb estimates bytes / 4, engines
        # count real tokens), so compare the ratios, not the counts.
        self.predicted_cached_tokens = CollectedCounter(
            "llmlb_predicted_cached_tokens_total",
            "Prompt tokens predicted to be in the picked endpoint's prefix cache (llmlb's estimate, "
            "prompt bytes / 4; compare ratios, not counts, with the engine's).",
            ("endpoint",),
            lambda: [],
        )
        self.predicted_prompt_tokens = CollectedCounter(
            "llmlb_predicted_prompt_tokens_total",
            "Prompt tokens of the picks that made a prediction (llmlb's estimate, prompt bytes / 4).",
            ("endpoint",),
            lambda: [],
        )
        self.engine_prefix_queries = CollectedCounter(
            "llmlb_engine_prefix_cache_queries_total",
            "Prompt tokens the engine looked up in its prefix cache, mirrored from its /metrics "
            "(vllm:prefix_cache_queries, sglang:prompt_tokens) since llmlb first read it; an engine "
            "restart restarts the delta from zero.",
            ("endpoint",),
            lambda: [],
        )
        self.engine_prefix_hits = CollectedCounter(
            "llmlb_engine_prefix_cache_hits_total",
            "Of those, tokens the engine found in its prefix cache (vllm:prefix_cache_hits, "
            "sglang:cached_tokens), mirrored the same way.",
            ("endpoint",),
            lambda: [],
        )
        self.engine_prefix_resets = CollectedCounter(
            "llmlb_engine_prefix_cache_counter_resets_total",
            "Times an engine's prefix-cache counters went down (a restart or counter reset).",
            ("endpoint",),
            lambda: [],
        )
        self.prefix_hit_ratio_predicted = Gauge(
            "llmlb_prefix_hit_ratio_predicted",
            "Predicted cached share of prompt tokens over the prediction window (absent: no "
            "predictions in it).",
            ("endpoint",),
            lambda: [],
        )
        self.prefix_hit_ratio_engine = Gauge(
            "llmlb_prefix_hit_ratio_engine",
            "Engine-reported prefix-cache hit ratio (hits / queries) over the same window (absent: "
            "no lookups or no counters).",
            ("endpoint",),
            lambda: [],
        )
        self.prefix_prediction_accuracy = Gauge(
            "llmlb_prefix_prediction_accuracy",
            "Engine hit ratio / predicted hit ratio over the window: 1 as predicted, below 1 the "
            "engine reused less than predicted (stale prefix table, flushed cache).",
            ("endpoint",),
            lambda: [],
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.picks,
            self.pick_duration,
            self.prefix_hit_depth,
            self.inflight,
            self.fallbacks,
            self.redis_errors,
            self.redis_up,
            self.redis_duration,
            self.redis_commit_retries,
            self.reaped_requests,
            self.redis_dropped_releases,
            self.immediate,
            self.streams,
            self.stream_errors,
            self.endpoint_health_changes,
            self.endpoints_reloads,
            self.tls_reloads,
            self.scrapes,
            self.scrape_errors,
            self.metrics_age,
            self.shed,
            self.prefix_entries,
            self.responses_learned,
            self.response_lookups,
            self.model_refreshes,
            self.discovery_up,
            self.discovery_endpoints,
            self.discovery_last_success,
            self.discovery_updates,
            self.discovery_errors,
            self.predicted_cached_tokens,
            self.predicted_prompt_tokens,
            self.engine_prefix_queries,
            self.engine_prefix_hits,
            self.engine_prefix_resets,
            self.prefix_hit_ratio_predicted,
            self.prefix_hit_ratio_engine,
            self.prefix_prediction_accuracy,
        ):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
