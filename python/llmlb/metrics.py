"""Every metric the daemon exports (names are part of the contract), through prometheus_client.

Two kinds:

- **Counted here** (picks, pick time, fallbacks, ...): prometheus_client counters and
  histograms. Each labelled child is cached on first use, so an increment on the hot path is a
  dict lookup plus the client's own add (``bench/python/test_bench_metrics.py`` measures it).
  Under ``--workers`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers, so these
  values live in per-process files the supervisor sums: a restarted worker's counts stay counted.
- **Read at scrape time** (:class:`Live`): numbers some other part keeps (discovery, the prefix
  table, prediction, endpoint load). Their owner sets ``samples``; across workers the supervisor
  merges each family by its ``across_workers`` rule (sum, or min/max for a fact every worker sees
  the same).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

LabelValues = tuple[str, ...]
Samples = Callable[[], Iterable[tuple[LabelValues, float]]]
AcrossWorkers = Literal["sum", "min", "max"]

#: Set by the ``--workers`` supervisor for its workers (prometheus_client's multiprocess mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# `_created` series double what is scraped and say nothing an operator uses here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def _no_samples() -> Iterable[tuple[LabelValues, float]]:
    return ()


class Counter:
    """A counter kept here; ``inc`` with the label values in declaration order.

    The hot path adds to the child's value holder directly (the one ``Counter.inc`` adds to,
    in-process or multiprocess), skipping the public method's checks: llmlb only adds
    positive amounts. A prometheus_client without that holder gets the public method."""

    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, labels: tuple[str, ...] = ()
    ) -> None:
        self._metric = prometheus_client.Counter(name, help_text, labels, registry=registry)
        self._adders: dict[LabelValues, Callable[[float], None]] = {}
        if not labels:
            self._adders[()] = _adder(self._metric)

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        add = self._adders.get(labels)
        if add is None:
            add = self._adders[labels] = _adder(self._metric.labels(*labels))
        add(amount)

    def get(self, labels: LabelValues = ()) -> float:
        if labels not in self._adders:
            return 0.0
        value: float = self._metric.labels(*labels)._value.get() if labels else self._metric._value.get()
        return value


def _adder(counter: prometheus_client.Counter) -> Callable[[float], None]:
    holder = getattr(counter, "_value", None)
    add = getattr(holder, "inc", None)
    return add if callable(add) else counter.inc


class Histogram:
    """A histogram; ``observe`` finds the bucket by bisection and adds to the bucket's and the
    sum's value holders directly (see ``Counter``), else uses the public method."""

    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, buckets: tuple[float, ...]
    ) -> None:
        self._metric = prometheus_client.Histogram(name, help_text, buckets=buckets, registry=registry)
        bounds = getattr(self._metric, "_upper_bounds", None)
        holders = getattr(self._metric, "_buckets", None)
        total = getattr(self._metric, "_sum", None)
        if bounds is not None and holders is not None and total is not None and len(bounds) == len(holders):
            self._bounds = list(bounds)
            self._bucket_adds = [holder.inc for holder in holders]
            self._sum_add = total.inc
            self.observe = self._observe
        else:
            self.observe = self._metric.observe

    def _observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (the last is +Inf), as the client does.
        self._bucket_adds[bisect.bisect_left(self._bounds, amount)](1.0)
        self._sum_add(amount)


class Live:
    """A family read at scrape time from ``samples`` (set by the part that keeps the numbers)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        *,
        kind: Literal["gauge", "counter"] = "gauge",
        across_workers: AcrossWorkers = "sum",
    ) -> None:
        self.name = name.removesuffix("_total") if kind == "counter" else name
        self.help = help_text
        self.kind = kind
        self.label_names = labels
        self.across_workers: AcrossWorkers = across_workers
        self.samples: Samples = _no_samples
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.help, self.kind)]

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.help, self.kind)
        sample_name = self.name + "_total" if self.kind == "counter" else self.name
        for values, value in self.samples():
            family.add_sample(sample_name, dict(zip(self.label_names, values, strict=True)), value)
        yield family


class ValueGauge(Live):
    """A gauge holding one value, set by the code that knows it."""

    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, across_workers: AcrossWorkers = "sum"
    ) -> None:
        super().__init__(registry, name, help_text, across_workers=across_workers)
        self.value = 0.0
        self.samples = lambda: (((), self.value),)

    def set(self, value: float) -> None:
        self.value = value


# Pick latency is microseconds in the normal case; the top buckets catch stalls.
PICK_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025,
    0.005, 0.01, 0.025, 0.1, 1.0,
)  # fmt: skip


# Matched prefix levels: 0 (a miss), then up to 64 KiB of prompt and beyond.
PREFIX_DEPTH_BUCKETS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class Metrics:
    """The daemon's metrics, in one registry of their own (one per process)."""

    def __init__(self, inflight: Samples) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.picks = Counter(
            r, "llmlb_picks_total", "Endpoints picked, by policy, endpoint and reason.",
            ("policy", "endpoint", "reason"),
        )  # fmt: skip
        self.pick_duration = Histogram(
            r, "llmlb_pick_duration_seconds", "Time to parse the body and pick an endpoint.", PICK_BUCKETS
        )
        self.prefix_hit_depth = Histogram(
            r,
            "llmlb_prefix_hit_depth",
            "Leading prefix levels (512-byte blocks) the picked endpoint held, per pick of a "
            "request with prefix levels (0: no match).",
            PREFIX_DEPTH_BUCKETS,
        )
        self.inflight = Live(
            r, "llmlb_inflight_requests", "Requests in flight per endpoint (this replica).", ("endpoint",)
        )
        self.inflight.samples = inflight
        self.fallbacks = Counter(
            r, "llmlb_fallbacks_total", "Picks that fell back from the policy, by reason.", ("reason",)
        )
        self.redis_errors = Counter(r, "llmlb_redis_errors_total", "Redis commands that failed or timed out.")
        self.redis_up = ValueGauge(
            r, "llmlb_redis_up", "1 while shared picks go through Redis, 0 while local.", across_workers="min"
        )
        self.redis_duration = Histogram(
            r, "llmlb_redis_pick_duration_seconds", "Round trip of the shared pick script.", PICK_BUCKETS
        )
        self.redis_commit_retries = Counter(
            r,
            "llmlb_redis_commit_retries_total",
            "Shared picks decided again: another replica made the chosen endpoint busier first.",
        )
        self.reaped_requests = Counter(
            r,
            "llmlb_redis_reaped_requests_total",
            "In-flight requests removed with a lapsed replica's lease.",
        )
        self.redis_dropped_releases = Counter(
            r, "llmlb_redis_dropped_releases_total", "Releases dropped while Redis was away (queue full)."
        )
        self.immediate = Counter(
            r,
            "llmlb_immediate_responses_total",
            "Requests answered by the picker itself, by status.",
            ("code",),
        )
        self.streams = Counter(r, "llmlb_extproc_streams_total", "ext_proc streams opened by Envoy.")
        self.stream_errors = Counter(
            r,
            "llmlb_extproc_stream_errors_total",
            "ext_proc streams that ended with an error, by kind.",
            ("kind",),
        )
        self.endpoint_health_changes = Counter(
            r,
            "llmlb_endpoint_health_changes_total",
            "Endpoint health transitions, by endpoint and new state.",
            ("endpoint", "state"),
        )
        self.endpoints_reloads = Counter(
            r, "llmlb_endpoints_reloads_total", "endpoints_file reloads, by result.", ("result",)
        )
        self.tls_reloads = Counter(
            r,
            "llmlb_tls_reloads_total",
            "grpc_tls certificate reloads after a file change, by result.",
            ("result",),
        )
        self.scrapes = Counter(
            r,
            "llmlb_metrics_scrapes_total",
            "Scrapes of endpoint metrics (least_busy, prediction).",
            ("endpoint",),
        )
        self.scrape_errors = Counter(
            r,
            "llmlb_metrics_scrape_errors_total",
            "Scrapes that gave no usable page (least_busy: no usable load), by endpoint and reason.",
            ("endpoint", "reason"),
        )
        self.shed = Counter(
            r,
            "llmlb_shed_requests_total",
            "least_busy: sheddable requests refused with 429 (no endpoint had room).",
        )
        self.responses_learned = Counter(
            r,
            "llmlb_responses_learned_total",
            "Responses API: stored response ids learned from responses (id -> endpoint).",
        )
        self.response_lookups = Counter(
            r,
            "llmlb_response_lookups_total",
            "Responses API: follow-ups naming a stored response, by whether its endpoint was known.",
            ("result",),
        )
        self.model_refreshes = Counter(
            r,
            "llmlb_model_refreshes_total",
            "GET /v1/models of endpoints (multi-model pools), by result.",
            ("result",),
        )

        # Endpoint load as picks see it (every worker; every replica while Redis answers): the
        # same view in every worker, so the supervisor takes the largest, not the sum.
        self.endpoint_inflight = Live(
            r,
            "llmlb_endpoint_load_inflight_requests",
            "Requests in flight per endpoint as picks see them (every worker; every replica through Redis).",
            ("endpoint",),
            across_workers="max",
        )
        self.endpoint_backlog = Live(
            r,
            "llmlb_endpoint_load_backlog_tokens",
            "Estimated prompt tokens sent to the endpoint and not yet prefilled (prefix_cache's load model).",
            ("endpoint",),
            across_workers="max",
        )
        self.endpoint_healthy = Live(
            r,
            "llmlb_endpoint_healthy",
            "1 while the endpoint is in the pool and healthy, 0 while it is not.",
            ("endpoint",),
            across_workers="min",
        )
        # least_busy: the servers' own figures, last scrape.
        self.endpoint_waiting = Live(
            r,
            "llmlb_endpoint_waiting_requests",
            "least_busy: requests waiting in the endpoint's queue, last scrape.",
            ("endpoint",),
            across_workers="max",
        )
        self.endpoint_running = Live(
            r,
            "llmlb_endpoint_running_requests",
            "least_busy: requests the endpoint is running, last scrape.",
            ("endpoint",),
            across_workers="max",
        )
        self.endpoint_kv_cache = Live(
            r,
            "llmlb_endpoint_kv_cache_usage_ratio",
            "least_busy: share of the endpoint's KV cache in use (0-1), last scrape.",
            ("endpoint",),
            across_workers="max",
        )
        self.metrics_age = Live(
            r,
            "llmlb_endpoint_metrics_age_seconds",
            "Age of each endpoint's last usable metrics (least_busy; -1 = none yet).",
            ("endpoint",),
            across_workers="min",
        )

        # The prefix table (prefix_cache). With --workers the table is shared: its size is the
        # same in every worker; lookups and insertions are each worker's own.
        self.prefix_entries = Live(
            r,
            "llmlb_prefix_table_entries",
            "Entries in the prefix table (with --workers, the table the workers share).",
            across_workers="max",
        )
        self.prefix_capacity = Live(
            r, "llmlb_prefix_table_capacity", "Entries the prefix table holds at most.", across_workers="max"
        )
        self.prefix_lookups = Live(
            r,
            "llmlb_prefix_table_lookups_total",
            "Requests with prefix levels looked up in the prefix table.",
            kind="counter",
        )
        self.prefix_hits = Live(
            r,
            "llmlb_prefix_table_hits_total",
            "Lookups where some endpoint held the request's first prefix level.",
            kind="counter",
        )
        self.prefix_insertions = Live(
            r,
            "llmlb_prefix_table_insertions_total",
            "Prefix levels newly stored in the prefix table (picks here and, with Redis, other replicas').",
            kind="counter",
        )
        self.prefix_evictions = Live(
            r,
            "llmlb_prefix_table_evictions_total",
            "Insertions that took the place of another entry (the table was full).",
            kind="counter",
        )

        # Discovery (`discovery`): filled in by the EndpointManager when a source runs. Each
        # worker runs its own source: the pool is up only while every worker's is.
        self.discovery_up = Live(
            r,
            "llmlb_discovery_up",
            "1 while the discovery source is in touch with what it watches; 0 while the last known "
            "endpoints are kept through an outage.",
            ("kind",),
            across_workers="min",
        )
        self.discovery_endpoints = Live(
            r,
            "llmlb_discovery_endpoints",
            "Endpoints the discovery source found, last time.",
            ("kind",),
            across_workers="min",
        )
        self.discovery_last_success = Live(
            r,
            "llmlb_discovery_last_success_timestamp_seconds",
            "Unix time of the discovery source's last good answer (0: none yet).",
            ("kind",),
            across_workers="min",
        )
        self.discovery_updates = Live(
            r,
            "llmlb_discovery_updates_total",
            "Changes of the discovered endpoint set applied.",
            ("kind",),
            kind="counter",
        )
        self.discovery_errors = Live(
            r,
            "llmlb_discovery_errors_total",
            "Discovery reads that failed (DNS errors, API errors, broken watches).",
            ("kind",),
            kind="counter",
        )

        # Prediction vs reality (`prediction`): filled in by llmlb.prediction when it is on.
        # Tokens on the two sides are not the same unit (llmlb estimates bytes / 4, engines
        # count real tokens), so compare the ratios, not the counts. With --workers only worker
        # 0 reads the engines, so the sum counts each engine once.
        self.predicted_cached_tokens = Live(
            r,
            "llmlb_predicted_cached_tokens_total",
            "Prompt tokens predicted to be in the picked endpoint's prefix cache (llmlb's estimate, "
            "prompt bytes / 4; compare ratios, not counts, with the engine's).",
            ("endpoint",),
            kind="counter",
        )
        self.predicted_prompt_tokens = Live(
            r,
            "llmlb_predicted_prompt_tokens_total",
            "Prompt tokens of the picks that made a prediction (llmlb's estimate, prompt bytes / 4).",
            ("endpoint",),
            kind="counter",
        )
        self.engine_prefix_queries = Live(
            r,
            "llmlb_engine_prefix_cache_queries_total",
            "Prompt tokens the engine looked up in its prefix cache, mirrored from its /metrics "
            "(vllm:prefix_cache_queries, sglang:prompt_tokens) since llmlb first read it; an engine "
            "restart restarts the delta from zero.",
            ("endpoint",),
            kind="counter",
        )
        self.engine_prefix_hits = Live(
            r,
            "llmlb_engine_prefix_cache_hits_total",
            "Of those, tokens the engine found in its prefix cache (vllm:prefix_cache_hits, "
            "sglang:cached_tokens), mirrored the same way.",
            ("endpoint",),
            kind="counter",
        )
        self.engine_prefix_resets = Live(
            r,
            "llmlb_engine_prefix_cache_counter_resets_total",
            "Times an engine's prefix-cache counters went down (a restart or counter reset).",
            ("endpoint",),
            kind="counter",
        )
        self.prefix_hit_ratio_predicted = Live(
            r,
            "llmlb_prefix_hit_ratio_predicted",
            "Predicted cached share of prompt tokens over the prediction window (absent: no "
            "predictions in it).",
            ("endpoint",),
        )
        self.prefix_hit_ratio_engine = Live(
            r,
            "llmlb_prefix_hit_ratio_engine",
            "Engine-reported prefix-cache hit ratio (hits / queries) over the same window (absent: "
            "no lookups or no counters).",
            ("endpoint",),
        )
        self.prefix_prediction_accuracy = Live(
            r,
            "llmlb_prefix_prediction_accuracy",
            "Engine hit ratio / predicted hit ratio over the window: 1 as predicted, below 1 the "
            "engine reused less than predicted (stale prefix table, flushed cache).",
            ("endpoint",),
        )

    def live(self) -> list[Live]:
        """The families read at scrape time (what the ``--workers`` supervisor merges)."""
        return [m for m in vars(self).values() if isinstance(m, Live)]

    def render(self) -> str:
        return generate_latest(self.registry).decode()
