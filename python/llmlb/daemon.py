"""``llmlb serve``: the ext_proc gRPC server and the admin HTTP server on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from llmlb._core import Balancer
from llmlb.admin import build_app
from llmlb.config import Config, ConfigError, parse_listen, prediction_enabled
from llmlb.decision import STATE_EMBEDDED, STATE_SHARED_MEMORY
from llmlb.endpoints import EndpointManager
from llmlb.extproc import Apis, BodyLimits, ExtProcService, Observability
from llmlb.extproc_server import ExtProcServer, bind
from llmlb.logs import RequestLog, configure_logging
from llmlb.metrics import Metrics
from llmlb.picking import Picker
from llmlb.responses import ResponseStore
from llmlb.shared import SharedPicker, SharedState
from llmlb.tls import TlsMaterial, TlsReloader, warn_if_exposed

if TYPE_CHECKING:
    from llmlb.prediction import PredictionTracker
    from llmlb.scraper import MetricsScraper
    from llmlb.tracing import PickTracer

log = logging.getLogger("llmlb")

# How often a worker checks that its supervisor still lives.
ORPHAN_CHECK_SECONDS = 1.0
# Room for the gRPC framing and headers around the largest body Envoy may forward.
MESSAGE_OVERHEAD = 1024 * 1024
# gRPC messages may be this many times max_body_bytes: a message over the limit (an Envoy whose
# buffer is larger than max_body_bytes, or a full-duplex chunk that grew while the picker was
# busy) is then still read and answered 413, instead of failing the stream (Envoy's 500).
MESSAGE_LIMIT_FACTOR = 2
# How long a start waits for the discovery source's first answer before serving without one.
DISCOVERY_FIRST_SYNC_S = 10.0


class StartupError(Exception):
    """The daemon cannot start (exit 1), e.g. a listen address is taken."""


class ConfigRefused(Exception):
    """The config is valid but this build cannot serve it (exit 2)."""


def check_bindable(listen: str, field: str) -> None:
    """Fails with a clear message if ``listen`` cannot be bound (gRPC's own failure is a log line
    from its C core plus a vague error).

    The probe sets SO_REUSEADDR, as gRPC's and aiohttp's own listeners do: connections of a
    previous process (killed, or a drain that cut streams) linger in TIME_WAIT for a minute and
    must not stop a restart, while a port another process listens on still fails here."""
    host, port = parse_listen(listen, field)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise StartupError(f"{field}: cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise StartupError(f"{field}: cannot listen on {listen}: {e.strerror}") from None


def resolve_listen(listen: str, field: str) -> str:
    """``listen`` with its host resolved to the IP address the listener binds (the first
    address the resolver gives, as the bind check probes)."""
    host, port = parse_listen(listen, field)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise StartupError(f"{field}: cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    return f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker ``index`` of ``llmlb serve --workers N`` (see ``llmlb.workers``)."""

    index: int
    state: str
    # Where to write the worker's internal admin port once it serves.
    announce: str


def build_balancer(config: Config) -> Balancer:
    """The Rust picking state for ``config``; a table too big for this machine is refused (exit 2)."""
    lb = config.lb_config
    try:
        return _new_balancer(config)
    except MemoryError as e:
        raise ConfigRefused(f"lb_config.prefixTableSize: {lb.prefixTableSize} entries: {e}") from None


def _new_balancer(config: Config) -> Balancer:
    lb = config.lb_config
    return Balancer(
        config.lb_policy,
        prefix_ttl_s=lb.redisKeyTTL,
        prefix_capacity=lb.prefixTableSize,
        load_factor=lb.affinityLoadFactor,
        load_floor=lb.affinityLoadFloor,
        request_tokens=lb.requestTokens,
        affinity_weight=lb.affinityWeight,
        prefill_rate=lb.prefillTokensPerSecond,
        max_request_count=lb.maxRequestCount,
        critical_models=list(lb.criticalModels) if lb.criticalModels is not None else None,
        stale_after_ms=lb.staleAfter,
        queue_threshold=lb.queueThresholdCritical,
        kv_cache_threshold=lb.kvCacheThreshold,
        lora_queue_threshold=lb.queueingThresholdLoRA,
        lora_affinity=lb.loraAffinityThreshold,
        affinity_keys=list(config.affinity_keys),
        route_unknown_models=config.unknown_model == "route",
    )


class Daemon:
    def __init__(self, config: Config, role: WorkerRole | None = None) -> None:
        self.config = config
        self.role = role
        self.balancer = build_balancer(config)
        if role is not None:
            self.balancer.attach_workers(role.state, role.index)
        self.metrics = Metrics(self._inflight_samples)
        self._export_balancer_state()
        self.endpoints = EndpointManager(
            self.balancer,
            self.metrics,
            static=config.endpoints,
            endpoints_file=config.endpoints_file,
            health_interval_ms=config.health_check_interval,
            health_timeout_ms=config.health_check_timeout,
            health_path=config.health_check_path,
            models_refresh_ms=config.models_refresh,
            discovery=config.discovery,
        )
        self.shared: SharedState | None = None
        self.scraper: MetricsScraper | None = None  # least_busy only
        # With --workers, worker 0 alone scrapes; the loads reach the others through the shared
        # state (one scrape per endpoint per interval, whatever the number of workers).
        self._scrapes = role is None or role.index == 0
        picker: Picker
        # Where the picking state lives, for the decision record (a shared picker says per pick).
        state = STATE_SHARED_MEMORY if role is not None else STATE_EMBEDDED
        if config.lb_policy == "least_busy":
            from llmlb.scraper import MetricsScraper

            # The servers' own metrics are the shared truth: every replica reads the same.
            self.scraper = MetricsScraper(config, self.balancer, self.endpoints, self.metrics)
            self.scraper.export(self.metrics)
            picker = Picker(
                self.balancer,
                self.metrics,
                self.endpoints.report_upstream_failure,
                shed_retry_after=config.lb_config.shedRetryAfter,
                state=state,
                recent_decisions=config.recent_decisions,
            )
        elif config.lb_config.serviceFQDN:
            self.shared = SharedState(config, self.balancer, self.metrics)
            picker = SharedPicker(
                self.balancer,
                self.metrics,
                self.shared,
                on_upstream_failure=self.endpoints.report_upstream_failure,
                state=state,
                recent_decisions=config.recent_decisions,
            )
        else:
            picker = Picker(
                self.balancer,
                self.metrics,
                self.endpoints.report_upstream_failure,
                state=state,
                recent_decisions=config.recent_decisions,
            )
        self.picker = picker
        self.prediction = self._build_prediction(picker)
        self.tracer = self._build_tracer(picker)
        # Only prefix_cache reads prefix levels: the other policies skip hashing altogether.
        blocks = config.lb_config.maxPrefixBlocks if self.balancer.uses_prefix else 0
        limits = BodyLimits(max_bytes=config.max_body_bytes, max_blocks=blocks)
        self.stored_responses = ResponseStore(
            config.response_ttl, config.response_store_size, self.metrics, self.shared
        )
        apis = Apis(
            responses=self.stored_responses,
            served_models=self.endpoints.served_models,
            session_header=config.session_header,
        )
        observability = Observability(
            decision_header=config.decision_header,
            request_log=RequestLog() if config.log_requests else None,
        )
        self.service = ExtProcService(
            picker, self.metrics, config.grpc_max_streams, limits, apis, observability=observability
        )
        self.ready = False
        self.admin_port = 0
        self._tls_reloader: TlsReloader | None = None
        self._remove_state_on_exit = False
        self._stop = asyncio.Event()
        # A second SIGTERM/SIGINT during a drain: stop waiting and exit now.
        self._cut = asyncio.Event()

    def _build_prediction(self, picker: Picker) -> PredictionTracker | None:
        """The prediction check (``prediction``): counts every pick's prediction and reads the
        engines' prefix-cache counters, through least_busy's scrape when there is one. With
        ``--workers``, worker 0 alone reads the engines (see ``PredictionTracker``)."""
        if not prediction_enabled(self.config):
            return None
        from llmlb.prediction import PredictionTracker
        from llmlb.scraper import MetricsScraper

        settings = self.config.prediction
        tracker = PredictionTracker(
            window_s=settings.window,
            interval_s=settings.interval / 1000,
            engine_side=self.role is None or self.role.index == 0,
        )
        tracker.wire(self.metrics)
        picker.observers.append(tracker.observe)
        if tracker.engine_side:
            if self.scraper is not None:
                self.scraper.on_values = tracker.engine_sample
            else:
                tracker.scraper = MetricsScraper(
                    self.config,
                    self.balancer,
                    self.endpoints,
                    self.metrics,
                    interval_ms=settings.interval,
                    feed_balancer=False,
                )
        return tracker

    def _build_tracer(self, picker: Picker) -> PickTracer | None:
        """A span per pick (``tracing``), made after the answer went out and exported in the
        background; with ``--workers`` each worker exports its own."""
        if not self.config.tracing.enabled:
            return None
        from llmlb.tracing import PickTracer

        tracer = PickTracer(self.config.tracing, worker=None if self.role is None else self.role.index)
        picker.observers.append(tracer.observe)
        return tracer

    def _inflight_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [((address,), float(own)) for address, _, own, *_ in self.balancer.endpoints()]

    def _export_balancer_state(self) -> None:
        """The prefix table and each endpoint's load, read from the balancer at scrape time."""
        m, balancer = self.metrics, self.balancer

        def endpoint_column(column: int) -> Callable[[], list[tuple[tuple[str, ...], float]]]:
            return lambda: [((view[0],), float(view[column])) for view in balancer.endpoints()]

        m.endpoint_inflight.samples = endpoint_column(1)
        m.endpoint_backlog.samples = endpoint_column(5)
        m.endpoint_healthy.samples = lambda: [
            ((address,), float(healthy and in_pool))
            for address, _, _, healthy, in_pool, _ in balancer.endpoints()
        ]

        # One reading per scrape for the six families (the shared table is counted in one pass):
        # entries, registered first, is collected first and takes it.
        reading: dict[str, float] = {}

        def prefix_stat(name: str) -> Callable[[], list[tuple[tuple[str, ...], float]]]:
            def sample() -> list[tuple[tuple[str, ...], float]]:
                if name == "entries" or not reading:
                    reading.clear()
                    reading.update(balancer.prefix_stats())
                return [((), reading[name])]

            return sample

        for metric, name in (
            (m.prefix_entries, "entries"),
            (m.prefix_capacity, "capacity"),
            (m.prefix_lookups, "lookups"),
            (m.prefix_hits, "hits"),
            (m.prefix_insertions, "insertions"),
            (m.prefix_evictions, "evictions"),
        ):
            metric.samples = prefix_stat(name)

    def _warn_about_config(self) -> None:
        for name in self.config.ignored_fields:
            log.warning("lb_config.%s is accepted for Higress compatibility and ignored", name)
        if self.scraper is not None and self.config.lb_config.serviceFQDN:
            log.warning(
                "least_busy decides from the servers' metrics; lb_config.serviceFQDN (Redis) is not used"
            )
        if not self.endpoints.pool and self.config.discovery is None:
            log.warning("no endpoints configured: requests get 503 until endpoints appear")

    async def _start_grpc(self) -> ExtProcServer:
        config = self.config
        limit = min(config.max_body_bytes * MESSAGE_LIMIT_FACTOR + MESSAGE_OVERHEAD, 2**31 - 1)
        if self.role is None:
            check_bindable(config.grpc_listen, "grpc_listen")
        reloader: TlsReloader | None = None
        if config.grpc_tls is not None:
            try:
                reloader = TlsReloader(config.grpc_tls, self.metrics)
            except ConfigError as e:
                raise ConfigRefused(str(e)) from None
        material = None if reloader is None else reloader.material
        try:
            server = bind(
                self.service,
                resolve_listen(config.grpc_listen, "grpc_listen"),
                # A second daemon on the same port must fail, not silently share the traffic;
                # the workers of one `--workers N` share it on purpose.
                reuse_port=self.role is not None,
                # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a peer holds further streams back.
                max_streams_per_connection=config.grpc_max_streams_per_connection,
                max_message_bytes=limit,
                tls=None if material is None else (material.cert, material.key, material.client_ca),
            )
        except OSError as e:
            raise StartupError(
                f"grpc_listen: cannot listen on {config.grpc_listen}: {e.strerror or e}"
            ) from None
        except ValueError as e:
            raise ConfigRefused(f"grpc_tls: {e}") from None
        if self.role is None or self.role.index == 0:
            warn_if_exposed(config)
        server.start()
        if reloader is not None:

            def apply(new: TlsMaterial) -> None:
                server.transport.set_tls(new.cert, new.key, new.client_ca)

            reloader.apply = apply
            # Runs until the event loop ends (asyncio cancels it then).
            reloader.start()
            self._tls_reloader = reloader
        server.set_serving(True)
        return server

    async def _start_admin(self) -> web.AppRunner:
        host, port = parse_listen(self.config.admin_listen, "admin_listen")
        app = build_app(
            self.config,
            balancer=self.balancer,
            endpoints=self.endpoints,
            metrics=self.metrics,
            is_ready=lambda: self.ready,
            shared=self.shared,
            scraper=self.scraper,
            recent=self.picker.recent,
            prediction=self.prediction,
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        if self.role is not None:
            # A worker's admin is internal: the supervisor serves admin_listen and asks each worker.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            self.admin_port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
            return runner
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise StartupError(
                f"admin_listen: cannot listen on {self.config.admin_listen}: {e.strerror}"
            ) from None
        return runner

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second stop signal: cutting the drain short")
            self._cut.set()
        self._stop.set()

    async def _probe_overdue_endpoints(self) -> None:
        """Passive health: an endpoint whose request has waited ``passive_probe_after`` for its
        response headers is probed at once (a hung server is out within one probe timeout)."""
        after = self.config.passive_probe_after / 1000
        while True:
            await asyncio.sleep(min(1.0, after / 4))
            for endpoint in set(self.service.watch.overdue(after)):
                log.info(
                    "a request to %s has had no response headers for %.1f s: probing it", endpoint, after
                )
                self.endpoints.report_upstream_failure(endpoint)

    async def _stop_if_orphaned(self) -> None:
        """A worker whose supervisor died (kill -9) drains and exits instead of serving on
        unmanaged; the last one out (worker 0) removes the shared state file."""
        parent = os.getppid()
        while True:  # polled: a parent's death has no event to wait on
            await asyncio.sleep(ORPHAN_CHECK_SECONDS)
            if os.getppid() != parent:
                break
        log.warning("the supervisor (pid %d) is gone; draining and exiting", parent)
        assert self.role is not None
        if self.role.index == 0:
            self._remove_state_on_exit = True
        self.request_stop()

    async def run(self) -> int:
        self.endpoints.load_initial()
        await self.endpoints.start_discovery()
        self._warn_about_config()
        admin = await self._start_admin()
        try:
            server = await self._start_grpc()
        except StartupError:
            await admin.cleanup()
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        orphan_watch = asyncio.create_task(self._stop_if_orphaned()) if self.role is not None else None
        header_watch = (
            asyncio.create_task(self._probe_overdue_endpoints()) if self.config.passive_probe_after else None
        )
        self.endpoints.start()
        if self.shared is not None:
            await self.shared.start()
        if self.scraper is not None and self._scrapes:
            self.scraper.start()
        if self.prediction is not None:
            self.prediction.start(self.endpoints)
        if await self._unless_stopped(self._first_sync()):
            self._turn_ready()
        await self._stop.wait()
        for watch in (orphan_watch, header_watch):
            if watch is not None:
                watch.cancel()
        await self._drain(server)
        if self.shared is not None:
            await self.shared.stop()
        if self.scraper is not None:
            await self.scraper.stop()
        if self.prediction is not None:
            await self.prediction.stop()
        await self.endpoints.stop()
        await admin.cleanup()
        if self.tracer is not None:
            await self.tracer.shutdown()
        if self._remove_state_on_exit and self.role is not None:
            state = Path(self.role.state)
            for path in (state, *state.parent.glob("worker-*.admin")):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                state.parent.rmdir()
        return 0

    async def _first_sync(self) -> None:
        await self.endpoints.wait_discovered(DISCOVERY_FIRST_SYNC_S)
        # Multi-model pools: know who serves what before the first request.
        await self.endpoints.refresh_models_once()

    async def _unless_stopped(self, work: Coroutine[None, None, None]) -> bool:
        """Runs ``work`` unless a stop signal comes first: a SIGTERM while the first discovery
        sync or model listing still waits ends the process at once instead of after the wait."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("stop signal while starting: not turning ready")
        return False

    def _turn_ready(self) -> None:
        # Everything allocated so far lives as long as the process: keep it out of the cyclic
        # collector's full passes, which would otherwise walk it (milliseconds) mid-request.
        gc.freeze()
        self.ready = True
        if self.role is not None:
            announce = Path(self.role.announce)
            announce.with_suffix(".tmp").write_text(str(self.admin_port))
            announce.with_suffix(".tmp").replace(announce)
        admin_address = (
            self.config.admin_listen if self.role is None else f"127.0.0.1:{self.admin_port} (internal)"
        )
        log.info(
            "serving ext_proc on %s (policy %s, %d endpoints), admin on %s",
            self.config.grpc_listen,
            self.config.lb_policy,
            len(self.endpoints.pool),
            admin_address,
        )

    async def _drain(self, server: ExtProcServer) -> None:
        """SIGTERM: not ready at once, new streams still served for ``drain_grace`` (so health
        checkers move traffic away first), then no new streams and up to ``drain_timeout`` for
        the open ones. Streams that need nothing more from the picker end at once (see
        ``ExtProcService.start_draining``); a second signal cuts the wait short."""
        was_ready, self.ready = self.ready, False
        server.set_serving(False)
        config = self.config
        # A picker that never turned ready was never sent traffic: nothing to move away.
        grace = config.drain_grace if was_ready else 0
        log.info(
            "draining: health NOT_SERVING; new streams served for %d s more, then up to %d s for open ones",
            grace,
            config.drain_timeout,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cut.wait(), grace)
        service = self.service
        service.start_draining()
        server.stop_accepting()
        log.info("no new streams; waiting for %d open ones", service.open_streams)
        waits = {asyncio.create_task(service.wait_closed()), asyncio.create_task(self._cut.wait())}
        await asyncio.wait(waits, timeout=config.drain_timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        cut = service.open_streams
        if cut:
            log.warning("cutting %d open streams (drain_timeout %d s)", cut, config.drain_timeout)
        await server.close()
        log.info("stopped")


def _run(main: Callable[[], Coroutine[None, None, int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main())
    code: int = uvloop.run(main())
    return code


def _configure_logging(config: Config, role: WorkerRole | None = None) -> None:
    configure_logging(
        config.log_level,
        config.log_format,
        libraries=config.log_libraries,
        worker=None if role is None else role.index,
    )


def serve(config: Config, role: WorkerRole | None = None) -> int:
    _configure_logging(config, role)

    async def main() -> int:
        return await Daemon(config, role).run()

    return _run(main)


def serve_workers(config: Config, worker_argv: list[str], workers: int) -> int:
    """Supervises ``workers`` daemon processes sharing the gRPC port and one picking state."""
    from llmlb.workers import SharedStateFailed, Supervisor, WorkerFailed

    _configure_logging(config)
    build_balancer(config)  # a config this build refuses stops here, once, not in every worker
    check_bindable(config.grpc_listen, "grpc_listen")
    check_bindable(config.admin_listen, "admin_listen")

    async def main() -> int:
        try:
            return await Supervisor(config, worker_argv, workers).run()
        except (WorkerFailed, SharedStateFailed) as e:
            raise StartupError(str(e)) from None

    return _run(main)
