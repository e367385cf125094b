"""``llmlb serve --workers N``: N picker processes on one ext_proc port, one admin server.

One Python process saturates one core at a few thousand ext_proc messages per second (the gRPC
stack, not the pick). To use more cores the supervisor starts N worker processes that all bind
the gRPC port with SO_REUSEPORT; the kernel spreads Envoy's connections across them.

Shared state: the workers must pick as one replica, so in-flight counts and the prefix table
live in a file mapped by every worker (``/dev/shm``, built by the Rust core's
``create_worker_state``): picks read and update it with atomics, with no round trip. Redis
was the other option, but it would add a network round trip to every pick of a setup that has
no Redis. With Redis configured, each worker is also one Redis replica, and the mapped file
holds the local fallback state.

The supervisor owns the public admin address: ``/metrics`` holds the workers' counters and
histograms summed from prometheus_client's multiprocess files (a restarted worker's counts stay)
and their scrape-time families merged by each family's rule (``llmlb.metrics``); ``/readyz``
is ready when every worker is, ``/debug/endpoints`` adds the workers' own counts and
``/debug/discovery`` shows each worker's source. A worker that dies is started again with the
same index; the new process zeroes that index's counts, so a crash leaves no phantom load.
SIGTERM drains every worker, then the supervisor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from llmlb._core import create_worker_state
from llmlb.config import Config, parse_listen
from llmlb.metrics import MULTIPROC_ENV, AcrossWorkers, Metrics
from llmlb.status import status_page

log = logging.getLogger("llmlb.workers")

# Distinct endpoint addresses the shared directory can hold over the supervisor's life.
ENDPOINT_SLOTS = 16_384
# A worker that keeps dying is not restarted forever: this many exits within the window stop
# the whole service (exit 1) so the operator sees it.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
WORKER_START_TIMEOUT_S = 30.0
FETCH_TIMEOUT_S = 2.0
# The supervisor's own families (beside the workers' merged ones).
WORKERS_FAMILY = "llmlb_workers"
WORKER_STREAMS_FAMILY = "llmlb_worker_streams"


@dataclass
class Worker:
    index: int
    announce: Path
    process: asyncio.subprocess.Process | None = None
    admin_port: int | None = None
    exits: list[float] = field(default_factory=list)

    @property
    def admin_url(self) -> str | None:
        return f"http://127.0.0.1:{self.admin_port}" if self.admin_port else None


def merge_live_families(pages: Iterable[list[Metric]], rules: dict[str, AcrossWorkers]) -> list[Metric]:
    """The workers' scrape-time families (``rules``: name -> how samples combine; ``pages``: each
    worker's parsed ``/metrics``), merged family by family: a series only some workers have still
    lands in its own family."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for page in pages:
        for family in page:
            rule = rules.get(family.name)
            if rule is None:
                continue  # counted in the shared multiprocess directory instead
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = merged.get(key)
                if seen is None:
                    merged[key] = sample.value
                elif rule == "min":
                    merged[key] = min(seen, sample.value)
                elif rule == "max":
                    merged[key] = max(seen, sample.value)
                else:
                    merged[key] = seen + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in sorted(values[name].items()):
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _Families:
    """A collector of families made per scrape (the supervisor's own and the merged ones)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> list[Metric]:
        return self.families


def merge_endpoint_views(views: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The first worker's view (pool-wide counts are the same in all) with ``local_inflight``
    summed over the workers: this replica's own requests."""
    if not views:
        return []
    own: dict[str, int] = {}
    for view in views:
        for entry in view:
            own[entry["address"]] = own.get(entry["address"], 0) + int(entry.get("local_inflight", 0))
    merged = []
    for entry in views[0]:
        merged.append({**entry, "local_inflight": own.get(entry["address"], 0)})
    return merged


def _state_directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class Supervisor:
    def __init__(self, config: Config, serve_argv: list[str], workers: int) -> None:
        self.config = config
        self.serve_argv = serve_argv
        self.count = workers
        self.workdir = Path(tempfile.mkdtemp(prefix="llmlb-workers-", dir=_state_directory()))
        self.state_path = self.workdir / "state"
        # The workers' counters and histograms (prometheus_client's multiprocess files), kept
        # after a worker exits so a restart does not take its counts back.
        self.metrics_dir = self.workdir / "metrics"
        self.metrics_dir.mkdir()
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        self._scraped = _Families()
        self.registry.register(self._scraped)
        self._live_rules = {m.name: m.across_workers for m in Metrics(lambda: ()).live()}
        self.workers = [Worker(i, self.workdir / f"worker-{i}.admin") for i in range(workers)]
        self.stopping = False
        self.failed = False
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def _argv(self, worker: Worker) -> list[str]:
        return [
            sys.executable, "-m", "llmlb", "serve", *self.serve_argv,
            "--worker-index", str(worker.index),
            "--worker-state", str(self.state_path),
            "--worker-announce", str(worker.announce),
        ]  # fmt: skip

    async def _spawn(self, worker: Worker) -> None:
        worker.announce.unlink(missing_ok=True)
        worker.admin_port = None
        worker.process = await asyncio.create_subprocess_exec(
            *self._argv(worker),
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, MULTIPROC_ENV: str(self.metrics_dir)},
        )

    async def _wait_announced(self, worker: Worker, deadline: float) -> None:
        """Until the worker has written its internal admin port (it does once it serves)."""
        assert worker.process is not None
        while time.monotonic() < deadline:
            if self._stop.is_set():
                return  # a stop signal while starting: the workers are stopped next
            if worker.process.returncode is not None:
                raise WorkerFailed(worker.index, worker.process.returncode)
            with contextlib.suppress(OSError, ValueError):
                worker.admin_port = int(worker.announce.read_text())
                return
            await asyncio.sleep(0.05)
        raise WorkerFailed(worker.index, None)

    async def _watch(self, worker: Worker) -> None:
        """Restarts the worker whenever it exits, unless stopping or it keeps failing."""
        while not self.stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            if self.stopping:
                return
            now = time.monotonic()
            worker.exits = [t for t in worker.exits if now - t < RESTART_WINDOW_S] + [now]
            if len(worker.exits) > RESTART_LIMIT:
                exits = len(worker.exits)
                log.error(
                    "worker %d exited %d times within %.0f s; stopping", worker.index, exits, RESTART_WINDOW_S
                )
                self.failed = True
                self._stop.set()
                return
            log.warning("worker %d exited with %s; starting it again", worker.index, code)
            await asyncio.sleep(min(1.0, 0.1 * len(worker.exits)))
            await self._spawn(worker)
            with contextlib.suppress(WorkerFailed):
                await self._wait_announced(worker, time.monotonic() + WORKER_START_TIMEOUT_S)

    async def _fetch(self, worker: Worker, path: str) -> tuple[int, bytes] | None:
        if worker.admin_url is None or self._session is None:
            return None
        try:
            async with self._session.get(worker.admin_url + path) as reply:
                return reply.status, await reply.read()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _answers(self, path: str) -> dict[int, bytes]:
        """``path`` asked of every worker at once: the bodies of those answering 200, by index."""
        replies = await asyncio.gather(*(self._fetch(w, path) for w in self.workers))
        return {w.index: r[1] for w, r in zip(self.workers, replies, strict=True) if r and r[0] == 200}

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = len(await self._answers("/readyz"))
        status = 200 if ready == self.count and not self.stopping else 503
        return web.Response(status=status, text=f"{ready}/{self.count} workers ready\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        pages = {
            index: list(text_string_to_metric_families(body.decode()))
            for index, body in (await self._answers("/metrics")).items()
        }
        families = merge_live_families(pages.values(), self._live_rules)
        workers = Metric(WORKERS_FAMILY, "Worker processes answering the supervisor.", "gauge")
        workers.add_sample(WORKERS_FAMILY, {}, len(pages))
        # How evenly the kernel spreads Envoy's connections (and so the streams) over workers.
        streams = Metric(WORKER_STREAMS_FAMILY, "ext_proc streams opened, by worker.", "counter")
        for index, page in pages.items():
            opened = next(
                (s.value for f in page for s in f.samples if s.name == "llmlb_extproc_streams_total"),
                0.0,
            )
            streams.add_sample(f"{WORKER_STREAMS_FAMILY}_total", {"worker": str(index)}, opened)
        self._scraped.families = [*families, workers, streams]
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def _debug_endpoints(self, _: web.Request) -> web.Response:
        views = [orjson.loads(body) for body in (await self._answers("/debug/endpoints")).values()]
        if not views:
            return web.json_response({"error": "no worker answered"}, status=503)
        return web.Response(body=orjson.dumps(merge_endpoint_views(views)), content_type="application/json")

    async def _debug_config(self, _: web.Request) -> web.Response:
        for body in (await self._answers("/debug/config")).values():
            return web.Response(body=body, content_type="application/json")
        return web.json_response({"error": "no worker answered"}, status=503)

    async def _debug_decisions(self, _: web.Request) -> web.Response:
        """Every worker's recent decisions, newest first, as many as one worker keeps."""
        merged: list[dict[str, Any]] = []
        for index, body in (await self._answers("/debug/decisions")).items():
            merged.extend({**entry, "worker": index} for entry in orjson.loads(body))
        merged.sort(key=lambda entry: entry.get("time", 0.0), reverse=True)
        return web.Response(
            body=orjson.dumps(merged[: self.config.recent_decisions]), content_type="application/json"
        )

    async def _debug_discovery(self, _: web.Request) -> web.Response:
        """Worker 0's view (the first that answers), ``up`` only when every worker's source is
        up, and each worker's own state under ``workers`` (each runs its own source)."""
        views = [
            (index, orjson.loads(body)) for index, body in (await self._answers("/debug/discovery")).items()
        ]
        if not views:
            return web.json_response({"error": "no worker answered"}, status=503)
        merged = dict(views[0][1])
        merged["up"] = all(view.get("up") is True for _, view in views)
        merged["workers"] = [
            {"worker": index, **{k: view.get(k) for k in ("up", "last_error", "endpoints", "addresses")}}
            for index, view in views
        ]
        return web.Response(
            body=orjson.dumps(merged, option=orjson.OPT_INDENT_2), content_type="application/json"
        )

    async def _start_admin(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/debug/endpoints", self._debug_endpoints)
        app.router.add_get("/debug/config", self._debug_config)
        app.router.add_get("/debug/discovery", self._debug_discovery)
        app.router.add_get("/debug/decisions", self._debug_decisions)
        app.router.add_get("/status", status_page)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = parse_listen(self.config.admin_listen, "admin_listen")
        await web.TCPSite(runner, host, port).start()
        return runner

    def _on_signal(self) -> None:
        if self._stop.is_set():
            # A second signal: the workers cut their drains short.
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.send_signal(signal.SIGTERM)
        self._stop.set()

    async def _stop_workers(self) -> None:
        self.stopping = True
        running = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        # Each worker drains on its own (drain_grace, then up to drain_timeout); this is a backstop.
        grace = self.config.drain_grace + self.config.drain_timeout + 5.0
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), grace)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    log.warning("worker pid %d did not stop within %.0f s; killing it", process.pid, grace)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(p.wait() for p in running))

    async def run(self) -> int:
        lb = self.config.lb_config
        try:
            create_worker_state(
                self.state_path, self.count, ENDPOINT_SLOTS, lb.prefixTableSize, lb.redisKeyTTL
            )
        except RuntimeError as e:
            with contextlib.suppress(OSError):
                self.state_path.unlink(missing_ok=True)
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
                self.workdir.rmdir()
            raise SharedStateFailed(
                f"cannot make the workers' shared state: {e} "
                f"(lb_config.prefixTableSize sizes it; is {self.workdir.parent} big enough?)"
            ) from None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
        admin: web.AppRunner | None = None
        watchers: list[asyncio.Task[None]] = []
        try:
            admin = await self._start_admin()
            # Before the workers start: a SIGTERM while they start stops them all cleanly.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal)
            for worker in self.workers:
                await self._spawn(worker)
            deadline = time.monotonic() + WORKER_START_TIMEOUT_S
            for worker in self.workers:
                await self._wait_announced(worker, deadline)
            if not self._stop.is_set():
                watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
                config = self.config
                log.info(
                    "%d workers serving ext_proc on %s, admin on %s",
                    self.count,
                    config.grpc_listen,
                    config.admin_listen,
                )
            await self._stop.wait()
        finally:
            await self._stop_workers()
            for task in watchers:
                task.cancel()
            if admin is not None:
                await admin.cleanup()
            await self._session.close()
            for path in (*(w.announce for w in self.workers), self.state_path):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.workdir.rmdir()
        return 1 if self.failed else 0


class SharedStateFailed(Exception):
    """The workers' shared state file could not be made (e.g. /dev/shm is too small)."""


class WorkerFailed(Exception):
    def __init__(self, index: int, code: int | None) -> None:
        self.index = index
        self.code = code
        what = (
            f"exited with {code}"
            if code is not None
            else f"was not serving within {WORKER_START_TIMEOUT_S:.0f} s"
        )
        super().__init__(f"worker {index} {what} while starting")
