"""Endpoint discovery and health.

The pool is the static ``endpoints`` list plus the ``endpoints_file`` list (re-read when the file
changes; a broken file keeps the last good pool and is counted), or what a ``discovery`` source
(DNS, EndpointSlices, InferencePool: ``llmlb.discovery``) finds, applied as it changes. An
endpoint that leaves gets no new picks; requests already sent to it finish and are released as
usual. An endpoint that joins starts healthy and has its models listed at once.

Health (active): every ``health_check_interval`` ms each endpoint gets ``GET health_check_path``
(vLLM, SGLang and trtllm-serve all answer ``/health``); a 2xx/3xx answer within
``health_check_timeout`` is a success. A server that accepts connections but never answers
(hung, or stopped with SIGSTOP: the kernel still completes the TCP handshake) therefore fails,
which a bare TCP connect probe (``health_check_path: ""``) would not notice. Two failures in a
row mark an endpoint unhealthy, one success healthy again; unhealthy endpoints are avoided
(affinity included) while any endpoint is healthy, and keep being probed.

Health (passive): Envoy's own replies about an upstream (502/503/504 without
``x-envoy-upstream-service-time``: connect failure, reset before the response, route timeout)
count as one failure and trigger a probe at once; a request still without response headers
``passive_probe_after`` ms after its pick triggers a probe at once. So a dead or hung server is
out of rotation after one bad request and one confirming probe, not after two probe intervals.

Models (multi-model pools): every ``models_refresh`` ms each endpoint gets ``GET /v1/models``; the
ids it lists (served model names and loaded LoRA adapters) are what it serves, and requests for a
model go only to endpoints serving it (see ``Balancer.set_models``). An endpoint label ``models``
(comma-separated) overrides the listing. A failed listing keeps the last one; an endpoint never
listed serves any model no listed endpoint serves. The first round runs before the picker reports
ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from llmlb._core import Balancer
from llmlb.config import ConfigError, Discovery, Endpoint, load_endpoints_file
from llmlb.discovery import DiscoveryStatus, Source, build_source, target_of
from llmlb.metrics import Metrics

log = logging.getLogger("llmlb.endpoints")

FILE_POLL_SECONDS = 1.0
UNHEALTHY_AFTER_FAILURES = 2
# Probes run concurrently, but never more than this many connections at once.
MAX_CONCURRENT_PROBES = 64


class EndpointManager:
    def __init__(
        self,
        balancer: Balancer,
        metrics: Metrics,
        *,
        static: tuple[Endpoint, ...],
        endpoints_file: str | None,
        health_interval_ms: int,
        health_timeout_ms: int,
        health_path: str = "",
        models_refresh_ms: int = 0,
        discovery: Discovery | None = None,
    ) -> None:
        self.balancer = balancer
        self.metrics = metrics
        self.static = static
        self.endpoints_file = endpoints_file
        self.health_interval = health_interval_ms / 1000
        self.health_timeout = health_timeout_ms / 1000
        # Empty: a TCP connect is the probe.
        self.health_path = health_path
        self._session: aiohttp.ClientSession | None = None
        self.from_file: tuple[Endpoint, ...] = ()
        self.labels: dict[str, Mapping[str, str]] = {}
        self.healthy: dict[str, bool] = {}
        self._failures: dict[str, int] = {}
        self._file_stamp: tuple[int, int, int] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._suspects: set[str] = set()
        self._probe_limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self.models_refresh = models_refresh_ms / 1000
        # What each endpoint serves, as last listed or labelled (absent: not known).
        self.models: dict[str, tuple[str, ...]] = {}
        self.discovered: tuple[Endpoint, ...] = ()
        self.discovery = discovery
        self.discovery_status: DiscoveryStatus | None = None
        self._source: Source | None = None
        self._synced = asyncio.Event()
        if discovery is not None:
            self.discovery_status = DiscoveryStatus(discovery.kind, target_of(discovery))
            self._export_discovery(self.discovery_status)

    def load_initial(self) -> None:
        """Reads the endpoints file once at start; errors here are fatal (exit 2)."""
        if self.endpoints_file:
            self._file_stamp = self._stamp()
            self.from_file = load_endpoints_file(self.endpoints_file)
        self._apply()

    @property
    def pool(self) -> list[Endpoint]:
        merged: dict[str, Endpoint] = {}
        for ep in (*self.static, *self.from_file, *self.discovered):
            merged.setdefault(ep.address, ep)
        return list(merged.values())

    def _apply(self) -> list[str]:
        """Hands the pool to the balancer; returns the addresses that joined."""
        pool = self.pool
        joined: list[str] = []
        self.labels = {ep.address: ep.labels for ep in pool}
        self.balancer.set_endpoints([ep.address for ep in pool])
        for address in list(self.healthy):
            if address not in self.labels:
                del self.healthy[address]
                self._failures.pop(address, None)
        for ep in pool:
            if ep.address not in self.healthy:
                # (Re-)joining endpoints start healthy until a probe says otherwise.
                self.healthy[ep.address] = True
                self.balancer.set_healthy(ep.address, True)
                joined.append(ep.address)
            labelled = _labelled_models(ep.labels)
            if labelled is not None:
                self._set_models(ep.address, labelled)
        for address in list(self.models):
            if address not in self.labels:
                del self.models[address]
        return joined

    def start(self) -> None:
        if self.endpoints_file:
            self._tasks.append(asyncio.create_task(self._watch_file(), name="endpoints-file"))
        if self.health_interval > 0:
            self._tasks.append(asyncio.create_task(self._health_loop(), name="health-checks"))
        if self.models_refresh > 0:
            self._tasks.append(asyncio.create_task(self._models_loop(), name="model-listings"))

    async def stop(self) -> None:
        if self._source is not None:
            await self._source.close()
        tasks = list(self._tasks)  # finishing tasks remove themselves from the list
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- endpoints_file --------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        assert self.endpoints_file is not None
        try:
            st = os.stat(self.endpoints_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Re-reads the file when its stamp changed; returns whether the pool was replaced."""
        stamp = self._stamp()
        if stamp == self._file_stamp:
            return False
        self._file_stamp = stamp
        assert self.endpoints_file is not None
        try:
            endpoints = load_endpoints_file(self.endpoints_file)
        except ConfigError as e:
            self.metrics.endpoints_reloads.inc(("error",))
            log.error("keeping the previous endpoints: %s", e)
            return False
        self.from_file = endpoints
        self._apply()
        self.metrics.endpoints_reloads.inc(("ok",))
        log.info("endpoints_file reloaded: %d endpoints", len(self.pool))
        return True

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(FILE_POLL_SECONDS)
            self.reload_if_changed()

    # --- discovery ---------------------------------------------------------------------------

    async def start_discovery(self) -> None:
        """Opens the source (credentials: a ConfigError here stops the daemon) and starts it."""
        if self.discovery is None or self.discovery_status is None:
            return
        source = build_source(self.discovery, self._discovered, self.discovery_status)
        await source.open()
        self._source = source
        self._tasks.append(
            asyncio.create_task(source.run(), name=f"discovery {self.discovery_status.target}")
        )

    async def wait_discovered(self, first_sync_s: float) -> None:
        """Waits up to ``first_sync_s`` for the source's first set, so the picker does not turn
        ready with an empty pool only because it asked a moment too early. A source still out of
        touch after that starts empty and fills the pool when it gets an answer."""
        status = self.discovery_status
        if status is None:
            return
        try:
            await asyncio.wait_for(self._synced.wait(), first_sync_s)
        except TimeoutError:
            log.warning(
                "discovery: no answer from %s within %.0f s (%s); starting with no endpoints",
                status.target,
                first_sync_s,
                status.last_error or "no error yet",
            )

    def _discovered(self, endpoints: tuple[Endpoint, ...]) -> None:
        """A source's new set: applied at once when it differs (order and labels included)."""
        status = self.discovery_status
        assert status is not None
        status.synced = True
        self._synced.set()
        if endpoints == self.discovered:
            return
        before = {ep.address for ep in self.discovered}
        self.discovered = endpoints
        joined = self._apply()
        status.updates += 1
        status.endpoints = len(endpoints)
        after = {ep.address for ep in endpoints}
        log.info(
            "discovery: %d endpoints (+%d -%d) from %s",
            len(endpoints),
            len(after - before),
            len(before - after),
            status.target,
        )
        if joined and self.models_refresh > 0:
            task = asyncio.create_task(self._list_joined(joined), name="list joined endpoints")
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _list_joined(self, addresses: list[str]) -> None:
        """A joining endpoint serves nothing until its models are known, so list them now."""
        await self.refresh_models_once(addresses)

    def _export_discovery(self, status: DiscoveryStatus) -> None:
        kind = (status.kind,)
        self.metrics.discovery_up.samples = lambda: [(kind, 1.0 if status.up else 0.0)]
        self.metrics.discovery_endpoints.samples = lambda: [(kind, float(status.endpoints))]
        self.metrics.discovery_last_success.samples = lambda: [(kind, status.last_success or 0.0)]
        self.metrics.discovery_updates.samples = lambda: [(kind, float(status.updates))]
        self.metrics.discovery_errors.samples = lambda: [(kind, float(status.errors))]

    # --- health ----------------------------------------------------------------------------

    async def _probe(self, address: str, limit: asyncio.Semaphore) -> bool:
        async with limit:
            if self.health_path:
                return await self._probe_http(address)
            return await self._probe_tcp(address)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Probes of one endpoint reuse a kept-alive connection; a hung server then fails on
            # the request's timeout whether or not it still accepts connections.
            connector = aiohttp.TCPConnector(limit=MAX_CONCURRENT_PROBES, limit_per_host=2)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.health_timeout)
            )
        return self._session

    async def _probe_http(self, address: str) -> bool:
        try:
            async with self._http().get(f"http://{address}{self.health_path}") as reply:
                await reply.read()
                return 200 <= reply.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return False

    async def _probe_tcp(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), self.health_timeout)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def _record(self, address: str, ok: bool) -> None:
        if address not in self.healthy:
            return  # left the pool while probing
        failures = 0 if ok else self._failures.get(address, 0) + 1
        self._failures[address] = failures
        healthy = ok or (self.healthy[address] and failures < UNHEALTHY_AFTER_FAILURES)
        if healthy != self.healthy[address]:
            self.healthy[address] = healthy
            self.balancer.set_healthy(address, healthy)
            state = "healthy" if healthy else "unhealthy"
            self.metrics.endpoint_health_changes.inc((address, state))
            log.warning("endpoint %s is now %s", address, state)

    async def check_health_once(self) -> None:
        addresses = [ep.address for ep in self.pool]
        results = await asyncio.gather(*(self._probe(a, self._probe_limit) for a in addresses))
        for address, ok in zip(addresses, results, strict=True):
            self._record(address, ok)

    def report_upstream_failure(self, address: str) -> None:
        """Envoy could not get an answer from ``address`` (connect failure, reset, timeout), or a
        request there waits too long for its response headers: count a failure and confirm with
        a probe now (a probe that succeeds clears it)."""
        if address not in self.healthy or address in self._suspects or not self.healthy[address]:
            return
        self._suspects.add(address)
        self._record(address, ok=False)
        self._tasks.append(asyncio.create_task(self._confirm(address), name=f"confirm {address}"))

    async def _confirm(self, address: str) -> None:
        try:
            self._record(address, await self._probe(address, self._probe_limit))
        finally:
            self._suspects.discard(address)
            task = asyncio.current_task()
            if task in self._tasks:
                self._tasks.remove(task)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health_once()
            except Exception:  # a probe bug must not stop health checking for good
                log.exception("health check round failed")
            await asyncio.sleep(self.health_interval)

    # --- models ----------------------------------------------------------------------------

    def _set_models(self, address: str, models: tuple[str, ...] | None) -> None:
        if models is None:
            self.models.pop(address, None)
        else:
            self.models[address] = models
        self.balancer.set_models(address, None if models is None else list(models))

    def served_models(self) -> list[str]:
        """Every model some endpoint of the pool serves, sorted (``GET /v1/models``)."""
        return sorted(
            {m for address, models in self.models.items() if address in self.labels for m in models}
        )

    async def _list_models(self, address: str) -> tuple[str, ...] | None:
        async with self._probe_limit:
            try:
                async with self._http().get(f"http://{address}/v1/models") as reply:
                    body = await reply.read()
                    if reply.status != 200:
                        return None
                return _model_ids(orjson.loads(body))
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                return None

    async def refresh_models_once(self, only: list[str] | None = None) -> None:
        """Lists the models of every endpoint (or of ``only`` these) not labelled with them."""
        if self.models_refresh <= 0:
            return
        addresses = [
            ep.address
            for ep in self.pool
            if _labelled_models(ep.labels) is None and (only is None or ep.address in only)
        ]
        results = await asyncio.gather(*(self._list_models(a) for a in addresses))
        for address, models in zip(addresses, results, strict=True):
            if address not in self.labels:
                continue  # left the pool while listing
            if models is None:
                self.metrics.model_refreshes.inc(("error",))
                continue  # keep what it served last
            self.metrics.model_refreshes.inc(("ok",))
            if self.models.get(address) != models:
                log.info("endpoint %s serves %s", address, ", ".join(models) or "no models")
                self._set_models(address, models)

    async def _models_loop(self) -> None:
        while True:
            await asyncio.sleep(self.models_refresh)
            try:
                await self.refresh_models_once()
            except Exception:  # a listing bug must not stop refreshing for good
                log.exception("model listing round failed")


def _labelled_models(labels: Mapping[str, str]) -> tuple[str, ...] | None:
    value = labels.get("models")
    if value is None:
        return None
    return tuple(m.strip() for m in str(value).split(",") if m.strip())


def _model_ids(listing: Any) -> tuple[str, ...] | None:
    """The ids of an OpenAI ``/v1/models`` answer (``{"data": [{"id": ...}, ...]}``)."""
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return None
    ids = {
        item["id"] for item in listing["data"] if isinstance(item, dict) and isinstance(item.get("id"), str)
    }
    return tuple(sorted(ids))
