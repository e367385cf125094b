"""Prediction vs reality: llmlb's predicted prefix-cache hits against what the engines reused.

Every pick predicts ``cached_tokens`` of the request's ``prompt_tokens`` to be reusable on the
chosen endpoint (the decision record). The engines count what they really reused: vLLM's
``vllm:prefix_cache_queries_total`` (prompt tokens looked up) and ``vllm:prefix_cache_hits_total``
(tokens found), SGLang's ``sglang:prompt_tokens_total`` and ``sglang:cached_tokens_total``, read
from each endpoint's ``/metrics`` (the scrape least_busy already makes, else one GET per endpoint
every ``prediction.interval``). No response body goes through the picker for this: in BUFFERED
mode Envoy sends the picker no response body, and asking for one would put every generation
through it.

Both sides are compared as hit *ratios*, never as raw token counts: llmlb's token figures are
estimates (prompt bytes / 4, see rust/src/balancer.rs ``BYTES_PER_TOKEN``) while the engines
count real tokens of the templated prompt. Over a sliding ``prediction.window``:

- predicted ratio = Δ predicted cached tokens / Δ predicted prompt tokens,
- engine ratio = Δ engine hits / Δ engine queries,
- accuracy = engine ratio / predicted ratio (1: as predicted; below 1: the engine reused less
  than predicted, e.g. a cache flushed or evicted behind llmlb's back; above 1: more).

Both deltas are taken between the same two instants (the ticks at which the engine's counters
were read), so the two ratios describe the same traffic. Engine counters are mirrored from
llmlb's first look at an endpoint on: a counter that goes down (the engine restarted) restarts
the delta from zero, so no delta is ever negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from llmlb.metrics import LabelValues, Metrics

if TYPE_CHECKING:
    from llmlb._core import EngineMetrics
    from llmlb.endpoints import EndpointManager
    from llmlb.scraper import MetricsScraper

log = logging.getLogger("llmlb.prediction")

Samples = list[tuple[LabelValues, float]]


class Prediction(Protocol):
    """What the tracker reads of a decision (``llmlb.decision.Decision``)."""

    @property
    def endpoint(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One endpoint's running totals at one tick."""

    at: float
    """``time.monotonic()`` of the tick."""
    cached: int
    prompt: int
    """Predicted totals (llmlb's estimated tokens)."""
    engine: tuple[float, float] | None
    """Mirrored engine totals ``(hits, queries)`` read since the previous tick (``None``: no
    fresh reading)."""


@dataclass(frozen=True, slots=True)
class Figures:
    """One endpoint's ratios over the window (``None``: not enough data)."""

    predicted: float | None
    engine: float | None

    @property
    def accuracy(self) -> float | None:
        """``engine / predicted``; ``None`` unless both are known and a hit was predicted."""
        if self.engine is None or not self.predicted:
            return None
        return self.engine / self.predicted


def ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class EngineCounters:
    """One endpoint's prefix-cache counters, mirrored: monotonic from llmlb's first reading.

    A reading below the last one means the engine restarted (or was reset) and counted from
    zero since: the delta is then the reading itself, as Prometheus's ``rate()`` treats a
    counter reset. A restart whose new count already passed the old one before the next reading
    cannot be seen (Prometheus has the same blind spot)."""

    __slots__ = ("hits", "queries", "raw_hits", "raw_queries", "read_at", "resets")

    def __init__(self) -> None:
        self.queries = 0.0
        self.hits = 0.0
        self.raw_queries: float | None = None
        self.raw_hits: float | None = None
        self.resets = 0
        self.read_at: float | None = None

    def update(self, queries: float, hits: float, now: float) -> None:
        if self.raw_queries is not None and self.raw_hits is not None:
            if queries < self.raw_queries or hits < self.raw_hits:
                # Both counters restart together: a drop in either is a restart of both.
                self.resets += 1
                self.queries += queries
                self.hits += hits
            else:
                self.queries += queries - self.raw_queries
                self.hits += hits - self.raw_hits
        self.raw_queries, self.raw_hits = queries, hits
        self.read_at = now


class Window:
    """An endpoint's snapshots over the last ``span`` seconds (plus the one just before, so the
    figures cover the whole span once it has filled)."""

    __slots__ = ("snapshots", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self.snapshots: deque[Snapshot] = deque()

    def add(self, snapshot: Snapshot) -> None:
        snaps = self.snapshots
        snaps.append(snapshot)
        cutoff = snapshot.at - self.span
        while len(snaps) > 2 and snaps[1].at <= cutoff:
            snaps.popleft()

    @property
    def last(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def figures(self, now: float) -> Figures:
        """The ratios between the oldest and newest snapshot; when the engine was read, both
        between the oldest and newest snapshot that hold an engine reading (the same instants)."""
        snaps = self.snapshots
        if len(snaps) < 2 or snaps[-1].at < now - self.span:
            return Figures(None, None)  # nothing recent: no figure rather than an old one
        read = [s for s in snaps if s.engine is not None]
        first, last = (read[0].engine, read[-1].engine) if read else (None, None)
        if len(read) >= 2 and first is not None and last is not None and read[-1].at >= now - self.span:
            base, head = read[0], read[-1]
            engine = ratio(last[0] - first[0], last[1] - first[1])
        else:
            base, head = snaps[0], snaps[-1]
            engine = None
        return Figures(ratio(head.cached - base.cached, head.prompt - base.prompt), engine)


class PredictionTracker:
    """Predicted totals (from the pick observer), the engines' mirrored counters and the
    sliding window, per endpoint.

    ``engine_side=False`` (workers of ``--workers N`` other than worker 0) only counts
    predictions: worker 0 reads the engines and exports the ratios for the whole replica, so the
    supervisor's sum of the workers' pages counts each engine once."""

    def __init__(
        self,
        *,
        window_s: float,
        interval_s: float,
        engine_side: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.interval_s = interval_s
        self.engine_side = engine_side
        self.clock = clock
        self._predicted: dict[str, list[int]] = {}
        self._engine: dict[str, EngineCounters] = {}
        self._windows: dict[str, Window] = {}
        # Endpoints whose pages have no counters (trtllm-serve, Triton), logged once each.
        self._uncounted: set[str] = set()
        # Reads the engines' pages when no least_busy scraper does it already.
        self.scraper: MetricsScraper | None = None
        self._task: asyncio.Task[None] | None = None

    # --- the two sides -----------------------------------------------------------------------

    def observe(self, decision: Prediction) -> None:
        """The pick observer: counts the prediction (picks whose prompt size is unknown predict
        nothing and are not counted)."""
        if decision.prompt_tokens <= 0:
            return
        tally = self._predicted.get(decision.endpoint)
        if tally is None:
            tally = self._predicted[decision.endpoint] = [0, 0]
        tally[0] += decision.cached_tokens
        tally[1] += decision.prompt_tokens

    def engine_sample(self, endpoint: str, values: EngineMetrics) -> None:
        """An endpoint's parsed ``/metrics`` page; pages without both counters are ignored."""
        queries, hits = values.prefix_cache_queries, values.prefix_cache_hits
        if queries is None or hits is None:
            if endpoint not in self._uncounted:
                self._uncounted.add(endpoint)
                log.info(
                    "%s reports no prefix-cache counters (%s): no engine hit ratio for it",
                    endpoint,
                    values.engine,
                )
            return
        counters = self._engine.get(endpoint)
        if counters is None:
            counters = self._engine[endpoint] = EngineCounters()
        counters.update(queries, hits, self.clock())

    # --- the window ---------------------------------------------------------------------------

    def tick(self, endpoints: Iterable[str]) -> None:
        """Snapshots every endpoint of the pool; forgets the ones that left it."""
        now = self.clock()
        wanted = set(endpoints)
        for table in (self._predicted, self._engine, self._windows):
            for gone in table.keys() - wanted:
                del table[gone]
        self._uncounted &= wanted
        for endpoint in wanted:
            window = self._windows.get(endpoint)
            if window is None:
                window = self._windows[endpoint] = Window(self.window_s)
            last = window.last
            cached, prompt = self._predicted.get(endpoint, (0, 0))
            counters = self._engine.get(endpoint)
            fresh = (
                counters is not None
                and counters.read_at is not None
                and (last is None or counters.read_at > last.at)
            )
            window.add(
                Snapshot(
                    at=now,
                    cached=cached,
                    prompt=prompt,
                    engine=(counters.hits, counters.queries) if fresh and counters is not None else None,
                )
            )

    def figures(self, endpoint: str) -> Figures:
        window = self._windows.get(endpoint)
        return window.figures(self.clock()) if window is not None else Figures(None, None)

    # --- running -------------------------------------------------------------------------------

    def start(self, endpoints: EndpointManager) -> None:
        if self.scraper is not None:
            # Its own scraper: a snapshot right after each batch of pages, so the engines'
            # counters are as fresh as the predictions they are compared with.
            self.scraper.on_values = self.engine_sample
            self.scraper.on_batch = lambda: self.tick(ep.address for ep in endpoints.pool)
            self.scraper.start()
        elif self.engine_side:
            self._task = asyncio.create_task(self._run(endpoints), name="prediction")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.scraper is not None:
            await self.scraper.stop()

    async def _run(self, endpoints: EndpointManager) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            addresses = [ep.address for ep in endpoints.pool]
            try:
                self.tick(addresses)
            except Exception:  # a bug must not end the loop
                log.exception("prediction tick failed")
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))

    # --- views -----------------------------------------------------------------------------------

    def wire(self, metrics: Metrics) -> None:
        """Points the metrics' collectors at this tracker (``Metrics`` owns names and help)."""
        metrics.predicted_cached_tokens.samples = lambda: self._predicted_samples(0)
        metrics.predicted_prompt_tokens.samples = lambda: self._predicted_samples(1)
        if not self.engine_side:
            return
        metrics.engine_prefix_queries.samples = lambda: self._engine_samples("queries")
        metrics.engine_prefix_hits.samples = lambda: self._engine_samples("hits")
        metrics.engine_prefix_resets.samples = lambda: self._engine_samples("resets")
        metrics.prefix_hit_ratio_predicted.samples = lambda: self._figure_samples("predicted")
        metrics.prefix_hit_ratio_engine.samples = lambda: self._figure_samples("engine")
        metrics.prefix_prediction_accuracy.samples = lambda: self._figure_samples("accuracy")

    def _predicted_samples(self, index: int) -> Samples:
        return [((endpoint,), float(tally[index])) for endpoint, tally in sorted(self._predicted.items())]

    def _engine_samples(self, field: str) -> Samples:
        return [
            ((endpoint,), float(getattr(counters, field)))
            for endpoint, counters in sorted(self._engine.items())
        ]

    def _figure_samples(self, field: str) -> Samples:
        out: Samples = []
        for endpoint in sorted(self._windows):
            value = getattr(self.figures(endpoint), field)
            if value is not None:
                out.append(((endpoint,), value))
        return out

    def view(self, endpoint: str) -> dict[str, Any]:
        """The endpoint's figures for /debug/endpoints (``None``: unknown)."""
        figures = self.figures(endpoint)
        return {
            "predicted_hit_ratio": figures.predicted,
            "engine_hit_ratio": figures.engine,
            "prediction_accuracy": figures.accuracy,
        }
