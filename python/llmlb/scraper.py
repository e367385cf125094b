"""least_busy's eyes: each endpoint's Prometheus metrics, polled every ``scrapeInterval``.

One loop per endpoint: scrape (bounded by ``scrapeTimeout``), hand the parsed load to the Rust
balancer, sleep out the rest of the interval. A slow endpoint therefore delays only its own next
scrape (no pile-up of requests to it), and its metrics age until they are stale (``staleAfter``),
which makes least_busy avoid it. All loops share one HTTP client with a bounded connection
pool. Parsing and extraction (vLLM, SGLang, trtllm-serve, Triton names) happen in the Rust core.

The same pages carry the engines' prefix-cache counters: ``on_values`` (set when ``prediction``
is on) receives every parsed page, so one scrape serves least_busy and the prediction check.
With another policy, the prediction tracker reads pages through :meth:`MetricsScraper.read`
alone (no per-endpoint loops, nothing handed to the balancer).

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

import aiohttp

from llmlb._core import Balancer, EngineMetrics, MetricsParseError, parse_engine_metrics
from llmlb.config import Config, parse_listen
from llmlb.endpoints import EndpointManager
from llmlb.metrics import Metrics

log = logging.getLogger("llmlb.scraper")

ENGINE_LABELS = ("engine", "llm-d.ai/engine-type")
METRICS_PORT_LABEL = "metrics_port"
# Connections to all endpoints together; each endpoint has at most one scrape in flight.
MAX_CONNECTIONS = 256
# A metrics page larger than this is refused rather than read (vLLM's is ~100 KB).
MAX_PAGE_BYTES = 8 * 1024 * 1024
POOL_SYNC_SECONDS = 0.25


@dataclass
class ScrapeState:
    """What /debug/endpoints shows of an endpoint's scraping."""

    engine: str | None = None
    last_error: str | None = None
    last_success: float | None = None  # time.monotonic()
    scrapes: int = 0


class MetricsScraper:
    def __init__(
        self, config: Config, balancer: Balancer, endpoints: EndpointManager, metrics: Metrics
    ) -> None:
        lb = config.lb_config
        self.balancer = balancer
        self.endpoints = endpoints
        self.metrics = metrics
        self.interval = lb.scrapeInterval / 1000
        self.timeout = lb.scrapeTimeout / 1000
        self.stale_after = lb.staleAfter / 1000
        self.path = lb.metricsPath
        self.port = lb.metricsPort
        self.default_engine = lb.engine
        self.states: dict[str, ScrapeState] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # Every parsed page, usable or not for least_busy (the prediction check's counters).
        self.on_values: Callable[[str, EngineMetrics], None] | None = None

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

    def engine_for(self, address: str) -> str | None:
        labels = self.endpoints.labels.get(address, {})
        for key in ENGINE_LABELS:
            if labels.get(key):
                return labels[key]
        state = self.states.get(address)
        return self.default_engine or (state.engine if state else None)

    def open(self) -> None:
        """The HTTP client, for :meth:`read` without the per-endpoint loops."""
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=2, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=True
        )

    def start(self) -> None:
        self.open()
        self._sync_task = asyncio.create_task(self._sync_loop(), name="scraper-sync")

    async def stop(self) -> None:
        tasks = [t for t in (self._sync_task, *self._loops.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops.clear()
        if self._session is not None:
            await self._session.close()

    def forget(self, wanted: set[str]) -> None:
        """Drops the scrape state of endpoints no longer in the pool (reads without loops)."""
        for address in self.states.keys() - wanted:
            del self.states[address]

    def sync(self) -> None:
        """One loop per endpoint in the pool: start the new, stop the removed."""
        wanted = {ep.address for ep in self.endpoints.pool}
        for address in list(self._loops):
            if address not in wanted:
                self._loops.pop(address).cancel()
                self.states.pop(address, None)
        for address in wanted - self._loops.keys():
            self.states.setdefault(address, ScrapeState())
            self._loops[address] = asyncio.create_task(self._endpoint_loop(address), name=f"scrape {address}")

    async def _sync_loop(self) -> None:
        while True:
            self.sync()
            await asyncio.sleep(POOL_SYNC_SECONDS)

    async def _endpoint_loop(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.scrape(address)
            except Exception:  # a bug must not end this endpoint's scraping
                log.exception("scraping %s failed", address)
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def read(self, address: str) -> EngineMetrics | None:
        """One GET and parse of ``address``'s page (failures counted and logged)."""
        state = self.states.setdefault(address, ScrapeState())
        state.scrapes += 1
        self.metrics.scrapes.inc((address,))
        page = await self._fetch(address, state)
        if page is None:
            return None
        engine = self.engine_for(address)
        try:
            detected, values = parse_engine_metrics(page, engine)
        except (MetricsParseError, ValueError) as e:
            self._failed(address, state, "parse", str(e))
            return None
        state.engine = state.engine or detected
        return values

    async def scrape(self, address: str) -> bool:
        """One scrape of ``address``; ``True`` when it produced a usable load."""
        values = await self.read(address)
        if values is None:
            return False
        if self.on_values is not None:
            self.on_values(address, values)
        state = self.states.setdefault(address, ScrapeState())
        if values.waiting is None or values.kv_cache_usage is None:
            missing = [
                n for n, v in (("queue", values.waiting), ("kv_cache", values.kv_cache_usage)) if v is None
            ]
            return self._failed(
                address, state, "missing_metrics", f"no {' or '.join(missing)} gauge ({state.engine})"
            )
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
        return True

    async def _fetch(self, address: str, state: ScrapeState) -> bytes | None:
        assert self._session is not None, "start() first"
        try:
            async with self._session.get(self.url(address)) as reply:
                if reply.status != 200:
                    self._failed(address, state, "http_status", f"HTTP {reply.status}")
                    return None
                page = await reply.content.read(MAX_PAGE_BYTES + 1)
                if len(page) > MAX_PAGE_BYTES:
                    self._failed(address, state, "too_large", f"page over {MAX_PAGE_BYTES} bytes")
                    return None
                return page
        except TimeoutError:
            self._failed(address, state, "timeout", f"no answer within {self.timeout * 1000:.0f} ms")
        except (aiohttp.ClientError, OSError) as e:
            self._failed(address, state, "connect", str(e) or type(e).__name__)
        return None

    def _failed(self, address: str, state: ScrapeState, reason: str, detail: str) -> bool:
        self.metrics.scrape_errors.inc((address, reason))
        if state.last_error != detail:
            log.warning("metrics of %s: %s (%s)", address, detail, reason)
        state.last_error = detail
        return False

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
