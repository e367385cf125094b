"""least_busy's eyes: each endpoint's Prometheus metrics, polled every ``scrapeInterval``.

The scraping itself runs in the Rust core, on one background thread (``PageScraper``): each
endpoint on its own timer, a request on a kept-alive connection bounded by ``scrapeTimeout``
and ``MAX_PAGE_BYTES``, the page parsed where it lands (vLLM, SGLang, trtllm-serve, Triton
names). A slow endpoint delays only its own next scrape (no pile-up of requests to it), and
its metrics age until they are stale (``staleAfter``), which makes least_busy avoid it. This
class keeps the Rust scraper's targets in step with the pool and, every interval, drains the
outcomes in one call: loads go to the balancer, failures to the error counter and the log.
(The asyncio scraper it replaces cost ~255 µs of Python a scrape: half a core for 100
endpoints at 50 ms, see bench/scale.)

The same pages carry the engines' prefix-cache counters: ``on_values`` (set when ``prediction``
is on) receives every parsed page, so one scrape serves least_busy and the prediction check.
With another policy, the prediction tracker runs its own scraper at its own interval that feeds
nothing to the balancer (``feed_balancer=False``).

An endpoint's engine comes from its label ``engine`` (or ``llm-d.ai/engine-type``), else from
``lb_config.engine``, else it is detected from the first page and remembered. The queue and
KV-cache gauges are required: a page without either (or a failed scrape) leaves the endpoint's
last values to go stale. ``running`` and the LoRA families are optional.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmlb._core import Balancer, EngineMetrics, PageScraper
from llmlb.config import Config, parse_listen
from llmlb.endpoints import EndpointManager
from llmlb.metrics import Metrics

log = logging.getLogger("llmlb.scraper")

ENGINE_LABELS = ("engine", "llm-d.ai/engine-type")
METRICS_PORT_LABEL = "metrics_port"
# A metrics page larger than this is refused rather than read (vLLM's is ~100 KB).
MAX_PAGE_BYTES = 8 * 1024 * 1024
POOL_SYNC_SECONDS = 0.25
# How often the scrapes are taken from the Rust scraper: a scrape waits at most this long before
# its load reaches the balancer (one cheap call when there is nothing).
DRAIN_SECONDS = 0.05


@dataclass
class ScrapeState:
    """What /debug/endpoints shows of an endpoint's scraping."""

    engine: str | None = None
    last_error: str | None = None
    last_success: float | None = None  # time.monotonic()
    scrapes: int = 0


class MetricsScraper:
    def __init__(
        self,
        config: Config,
        balancer: Balancer,
        endpoints: EndpointManager,
        metrics: Metrics,
        *,
        interval_ms: int | None = None,
        feed_balancer: bool = True,
    ) -> None:
        lb = config.lb_config
        self.balancer = balancer
        self.endpoints = endpoints
        self.metrics = metrics
        self.interval = (lb.scrapeInterval if interval_ms is None else interval_ms) / 1000
        self.timeout = lb.scrapeTimeout / 1000
        self.stale_after = lb.staleAfter / 1000
        self.path = lb.metricsPath
        self.port = lb.metricsPort
        self.default_engine = lb.engine
        # False: pages only go to ``on_values`` (the prediction check with another policy).
        self.feed_balancer = feed_balancer
        self.states: dict[str, ScrapeState] = {}
        self._pages: PageScraper | None = None
        self._targets: list[tuple[str, str, str | None]] = []
        self._task: asyncio.Task[None] | None = None
        # Every parsed page, usable or not for least_busy (the prediction check's counters).
        self.on_values: Callable[[str, EngineMetrics], None] | None = None
        # After each drain that brought scrapes (the prediction check's own scraper ticks then,
        # so its snapshots pair the engines' counters with the predictions of the same moment).
        self.on_batch: Callable[[], None] | None = None

    def url(self, address: str) -> str:
        host, port = parse_listen(address, "endpoint")
        host = f"[{host}]" if ":" in host else host
        # An endpoint label (a pod annotation, with discovery) names its own metrics port.
        labelled = self.endpoints.labels.get(address, {}).get(METRICS_PORT_LABEL, "")
        if labelled.isdigit() and 1 <= int(labelled) <= 65535:
            port = int(labelled)
        elif self.port:
            port = self.port
        return f"http://{host}:{port}{self.path}"

    def _configured_engine(self, address: str) -> str | None:
        """The engine named by a label or ``lb_config.engine`` (``None``: detect it)."""
        labels = self.endpoints.labels.get(address, {})
        for key in ENGINE_LABELS:
            if labels.get(key):
                return labels[key]
        return self.default_engine

    def engine_for(self, address: str) -> str | None:
        state = self.states.get(address)
        return self._configured_engine(address) or (state.engine if state else None)

    def start(self) -> None:
        self._pages = PageScraper(self.interval, self.timeout, MAX_PAGE_BYTES)
        self._task = asyncio.create_task(self._run(), name="scraper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pages is not None:
            self._pages.close()
            self._pages = None

    def sync(self) -> None:
        """The Rust scraper's targets follow the pool: new endpoints start, removed ones stop
        (and their state goes)."""
        assert self._pages is not None, "start() first"
        wanted = [ep.address for ep in self.endpoints.pool]
        targets = [(a, self.url(a), self._configured_engine(a)) for a in wanted]
        if targets == self._targets:
            return
        for address in self._pages.set_targets(targets):
            log.warning(
                "endpoint %s: unknown engine %r (expected vllm, sglang, trtllm-serve or triton); "
                "detecting it from its metrics page instead",
                address,
                self._configured_engine(address),
            )
        self._targets = targets
        for address in self.states.keys() - set(wanted):
            del self.states[address]
        for address in wanted:
            self.states.setdefault(address, ScrapeState())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sync = 0.0
        while True:
            try:
                if loop.time() >= next_sync:
                    self.sync()
                    next_sync = loop.time() + POOL_SYNC_SECONDS
                self.apply()
            except Exception:  # a bug must not end the scraping
                log.exception("applying scrapes failed")
            await asyncio.sleep(DRAIN_SECONDS)

    def apply(self) -> None:
        """Hands every scrape since the last call to the balancer, ``on_values`` and the
        counters."""
        assert self._pages is not None, "start() first"
        outcomes = self._pages.drain()
        for address, values, reason, detail in outcomes:
            state = self.states.get(address)
            if state is None:  # left the pool since
                continue
            state.scrapes += 1
            self.metrics.scrapes.inc((address,))
            if values is None:
                self._failed(address, state, str(reason), str(detail))
                continue
            state.engine = state.engine or values.engine
            self._use(address, state, values)
        if outcomes and self.on_batch is not None:
            self.on_batch()

    def _use(self, address: str, state: ScrapeState, values: EngineMetrics) -> None:
        if self.on_values is not None:
            self.on_values(address, values)
        if not self.feed_balancer:
            return
        if values.waiting is None or values.kv_cache_usage is None:
            missing = [
                n for n, v in (("queue", values.waiting), ("kv_cache", values.kv_cache_usage)) if v is None
            ]
            detail = f"no {' or '.join(missing)} gauge ({state.engine})"
            self._failed(address, state, "missing_metrics", detail)
            return
        self.balancer.set_load(
            address,
            waiting=values.waiting,
            running=values.running if values.running is not None else 0.0,
            kv_cache=values.kv_cache_usage,
            running_lora=list(values.running_lora_adapters),
            waiting_lora=list(values.waiting_lora_adapters),
            max_lora=values.max_lora or 0,
        )
        state.last_success = time.monotonic()
        state.last_error = None

    def _failed(self, address: str, state: ScrapeState, reason: str, detail: str) -> None:
        self.metrics.scrape_errors.inc((address, reason))
        if state.last_error != detail:
            log.warning("metrics of %s: %s (%s)", address, detail, reason)
        state.last_error = detail

    def views(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: last values, their age and the scrape state (for /debug/endpoints)."""
        out: dict[str, dict[str, Any]] = {}
        for address, waiting, running, kv_cache, age, picks in self.balancer.endpoint_loads():
            state = self.states.get(address, ScrapeState())
            out[address] = {
                "waiting": waiting,
                "running": running,
                "kv_cache_usage": kv_cache,
                "metrics_age_seconds": age,
                "metrics_stale": age is None or age > self.stale_after,
                "picks_since_scrape": picks,
                "engine": self.engine_for(address) or state.engine,
                "last_scrape_error": state.last_error,
            }
        return out

    def age_samples(self) -> list[tuple[tuple[str, ...], float]]:
        """``llmlb_endpoint_metrics_age_seconds``: -1 before the first successful scrape."""
        return [
            ((address,), -1.0 if age is None else age)
            for address, *_, age, _ in self.balancer.endpoint_loads()
        ]

    def export(self, metrics: Metrics) -> None:
        """The scraped figures as metrics (read at scrape time; absent until an endpoint's first
        usable scrape)."""

        def column(index: int) -> Callable[[], list[tuple[tuple[str, ...], float]]]:
            return lambda: [
                ((load[0],), float(value))
                for load in self.balancer.endpoint_loads()
                if (value := load[index]) is not None
            ]

        metrics.endpoint_waiting.samples = column(1)
        metrics.endpoint_running.samples = column(2)
        metrics.endpoint_kv_cache.samples = column(3)
        metrics.metrics_age.samples = self.age_samples
