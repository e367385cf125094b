"""Shared state in Redis: many picker replicas, one view of in-flight load and prefixes.

Each pick is one ``EVALSHA`` of the pick script (encoded by the Rust core), which reads the
candidates' pool-wide counts, chooses, counts the request under this replica and request id,
and records the prefix levels. Releases are batched: one ``EVALSHA`` per event-loop turn.

Failure semantics: a pick never waits longer than ``redisBudget`` ms. On an error or a timeout
the pick comes from this replica's local state (fail-open), and after two failures in a row (or
one connection failure) the circuit opens: picks stop waiting on Redis at all while a background
probe pings it; when it answers, shared picks resume. Releases that could not be sent are kept
and retried, so nothing leaks while Redis is away; after a Redis restart (keys gone) they are
no-ops and the shared view rebuilds from new picks. See docs/shared-state.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import random
import socket
import ssl
import sys
import time
from collections.abc import Awaitable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llmlb._core import (
    PICK_FIXED_KEYS,
    Balancer,
    NoEndpointsError,
    OverLimitError,
    ParsedRequest,
    shared_scripts,
)
from llmlb.config import Config, LbConfig
from llmlb.metrics import Metrics
from llmlb.picking import Picker, Refusal
from llmlb.resp import LaneClosedError, RespConnection, encode

log = logging.getLogger("llmlb.shared")

# Consecutive failures (timeouts or errors) that open the circuit; a refused connection opens
# it at once.
FAILURES_TO_OPEN = 2
PROBE_INTERVAL = 0.5
RELEASE_BATCH = 512
# Seconds a finished request waits for a pick to carry its release before it is sent alone.
RELEASE_LINGER_S = 0.002
# Connections to Redis per replica: concurrent picks wait for a free one (within the budget)
# rather than opening connections without bound.
MAX_CONNECTIONS = 64
# How long a pick reads its reply off the socket before leaving it to the event loop: a loopback
# Redis answers well within it; a remote or slow one costs the loop at most this per pick.
EAGER_READ_S = 0.0003
# Releases kept while Redis is unreachable; past this the oldest are dropped (and counted): their
# replica's lease keeps them counted until the replica ends, so a bound is needed.
MAX_PENDING_RELEASES = 100_000

Client = Any  # redis.asyncio.Redis | RedisCluster: redis-py's typing does not unify them


if sys.version_info >= (3, 11):

    async def within(awaitable: Awaitable[Any], seconds: float) -> Any:
        """``asyncio.wait_for`` without its extra hop through the event loop: under load each
        hop is a full pass over the ready callbacks, which is what a pick waits on."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10
    within = asyncio.wait_for


def replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"


def lease_timings(lb: LbConfig) -> tuple[int, int, float]:
    """``(lease_ms, keep_ms, heartbeat_s)`` from ``leaseTTL``.

    The lease is two thirds of ``leaseTTL`` and renewed six times per ``leaseTTL``, and every
    heartbeat reaps lapsed leases, so a dead replica's share is gone within ``leaseTTL``. The
    hashes themselves expire after ten ``leaseTTL`` without any activity in the pool.
    """
    lease_ms = lb.leaseTTL * 1000 * 2 // 3
    return lease_ms, lb.leaseTTL * 1000 * 10, lb.leaseTTL / 6


class SharedState:
    """The Redis connection, its scripts, the circuit breaker, heartbeats and batched releases."""

    def __init__(self, config: Config, balancer: Balancer, metrics: Metrics) -> None:
        lb = config.lb_config
        assert lb.serviceFQDN is not None
        self.lb = lb
        self.balancer = balancer
        self.metrics = metrics
        self.replica = replica_id()
        self.lease_ms, self.keep_ms, self.heartbeat_s = lease_timings(lb)
        self.shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in shared_scripts().items()}
        balancer.enable_shared(config.pool, self.replica, self.lease_ms, self.keep_ms, self.shas["pick"])
        self.keys = balancer.shared_keys()
        self.budget = lb.redisBudget / 1000
        self.timeout = lb.timeout / 1000
        self.client: Client | None = None
        # The hot-path connection (picks, releases); redis-py does everything else.
        self.lane: RespConnection | None = None
        self._reopening = False  # one reconnect at a time, however many requests notice
        self.scripts: dict[str, Any] = {}
        self.cluster = False
        self.up = False
        self._failures = 0
        self._releases: list[str] = []
        self._flush_scheduled = False
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # --- connection ------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        lb = self.lb
        kwargs: dict[str, Any] = {
            "host": lb.serviceFQDN,
            "port": lb.servicePort,
            "username": lb.username,
            "password": lb.password,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            # No CLIENT SETINFO on connect: Redis < 7.2 rejects it, filling its error stats.
            "lib_name": None,
            "lib_version": None,
        }
        if lb.tls:
            kwargs["ssl"] = True
            if lb.tlsCAFile:
                kwargs["ssl_ca_certs"] = lb.tlsCAFile
        return kwargs

    async def _connect(self) -> None:
        """Connects, detects Redis Cluster, loads the scripts. Raises on failure."""
        kwargs = self._client_kwargs()
        probe = aioredis.Redis(db=self.lb.database, single_connection_client=True, **kwargs)
        try:
            info = await probe.info("cluster")
        finally:
            await probe.aclose()
        self.cluster = bool(info.get("cluster_enabled"))
        client: Client
        if self.cluster:
            client = RedisCluster(max_connections=MAX_CONNECTIONS, **kwargs)
            await client.initialize()
        else:
            # A pool takes the connection class instead of Redis()'s `ssl` switch.
            pool_kwargs = {k: v for k, v in kwargs.items() if k != "ssl"}
            if self.lb.tls:
                pool_kwargs["connection_class"] = aioredis.SSLConnection
            pool = aioredis.BlockingConnectionPool(
                max_connections=MAX_CONNECTIONS, timeout=None, db=self.lb.database, **pool_kwargs
            )
            client = aioredis.Redis(connection_pool=pool)
        scripts = {name: client.register_script(text) for name, text in shared_scripts().items()}
        for script in scripts.values():
            # Load once up front (on a cluster: on every primary); EVALSHA reloads by itself on
            # NOSCRIPT (after a restart or a failover).
            await client.script_load(script.script)
        old, self.client, self.scripts = self.client, client, scripts
        if old is not None:
            with contextlib.suppress(Exception):
                await old.aclose()
        await self._open_lane()

    async def _open_lane(self) -> None:
        """(Re)opens the hot-path connection to the node serving this pool's slot."""
        assert self.client is not None
        host, port = self.lb.serviceFQDN, self.lb.servicePort
        if self.cluster:
            node = self.client.get_node_from_key(self.keys["inflight"])
            host, port = node.host, node.port
        tls = ssl.create_default_context(cafile=self.lb.tlsCAFile) if self.lb.tls else None
        lane = await RespConnection.open(
            str(host),
            int(port),
            username=self.lb.username,
            password=self.lb.password,
            database=0 if self.cluster else self.lb.database,
            tls=tls,
        )
        old, self.lane = self.lane, lane
        if old is not None:
            await old.close()

    def _lane(self) -> RespConnection | None:
        """The open hot-path connection, reopened in the background when it was lost."""
        if self.lane is not None and not self.lane.closed:
            return self.lane
        if self.client is not None and not self._reopening:
            self._reopening = True
            self._spawn(self._reopen_lane())
        return None

    async def _reopen_lane(self) -> None:
        try:
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._open_lane(), self.timeout)
        finally:
            self._reopening = False

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self._connect(), self.timeout)
            await self._beat()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._count_error()
            log.warning("Redis %s:%s unavailable (%s): picking from local state until it answers",
                        self.lb.serviceFQDN, self.lb.servicePort, _describe(e))  # fmt: skip
            self._open_circuit()
        else:
            self._set_up(True)
            log.info("shared state on Redis %s:%s (%s), replica %s", self.lb.serviceFQDN, self.lb.servicePort,
                     "cluster" if self.cluster else "single", self.replica)  # fmt: skip
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat")

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._heartbeat, self._probe, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._heartbeat, self._probe, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.up and self._releases:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_releases(self._releases[:]), self.timeout)
        if self.lane is not None:
            await self.lane.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    # --- circuit breaker -------------------------------------------------------------------

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.metrics.redis_up.set(1.0 if up else 0.0)

    def _count_error(self) -> None:
        self.metrics.redis_errors.inc()

    def _failure(self, error: BaseException) -> None:
        self._count_error()
        self._failures += 1
        # asyncio.TimeoutError is the builtin TimeoutError, an OSError since Python 3.11: a slow
        # reply must not count as a refused connection.
        timed_out = isinstance(error, (RedisTimeoutError, asyncio.TimeoutError, TimeoutError))
        refused = isinstance(error, (RedisConnectionError, OSError)) and not timed_out
        if self.up and (refused or self._failures >= FAILURES_TO_OPEN):
            log.warning("Redis failing (%s): picking from local state until it answers", _describe(error))
            self._open_circuit()

    def _success(self) -> None:
        self._failures = 0

    def _open_circuit(self) -> None:
        self._set_up(False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_loop(), name="redis-probe")

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                if self.client is None:
                    await asyncio.wait_for(self._connect(), self.timeout)
                else:
                    await asyncio.wait_for(self.client.ping(), self.timeout)
                await self._beat()
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                log.debug("Redis probe failed: %s", _describe(e))
                with contextlib.suppress(Exception):
                    if not isinstance(e, asyncio.TimeoutError):
                        # Reconnect from scratch next time: topology or credentials may differ.
                        await asyncio.wait_for(self._connect(), self.timeout)
                continue
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                if self.lane is None or self.lane.closed:
                    await asyncio.wait_for(self._open_lane(), self.timeout)
            self._failures = 0
            self._set_up(True)
            log.warning("Redis is back: shared picks resume")
            self._schedule_flush()
            return

    # --- heartbeats and reaping ------------------------------------------------------------

    async def _beat(self) -> None:
        assert self.client is not None
        k = self.keys
        lapsed = await self.scripts["heartbeat"](
            keys=[k["leases"], k["replica_counts"], k["replica_requests"], k["inflight"]],
            args=[self.replica, self.lease_ms, self.keep_ms, 16],
        )
        for lapsed_id in lapsed:
            other = _text(lapsed_id)
            counts, requests = self.balancer.replica_keys(other)
            reaped = await self.scripts["reap"](
                keys=[k["leases"], k["inflight"], counts, requests], args=[other]
            )
            if reaped:
                log.warning("reaped replica %s: %s requests it left counted", other, reaped)
            self.metrics.reaped_requests.inc(amount=float(reaped))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if not self.up:
                continue
            try:
                await asyncio.wait_for(self._beat(), self.timeout)
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                self._failure(e)

    # --- picks and releases ----------------------------------------------------------------

    async def pick_shared(
        self, prepared: tuple[int, list[str], list[str], bytes], request_id: str
    ) -> list[Any] | str:
        """The script's answer, or the fallback reason when local state must decide."""
        if not self.up:
            return "redis_down"
        _, keys, args, command = prepared
        started = time.perf_counter()
        try:
            lane = self._lane()
            if lane is not None:
                reply = lane.call_eagerly(command, min(EAGER_READ_S, self.budget))
                if isinstance(reply, asyncio.Future):
                    reply = await within(reply, self.budget)
                if isinstance(reply, hiredis.ReplyError):
                    reply = await within(self._recover("pick", reply, keys, args), self.budget)
            else:
                reply = await within(self.scripts["pick"](keys=keys, args=args), self.budget)
        except asyncio.TimeoutError as e:
            # The script may still have run: release the request id (a no-op if it did not).
            self.release(request_id)
            self._failure(e)
            return "redis_slow"
        except Exception as e:  # any failure here must fall back, never fail the request
            self.release(request_id)
            self._failure(e)
            return "redis_error"
        self.metrics.redis_duration.observe(time.perf_counter() - started)
        self._success()
        return list(reply)

    async def _recover(self, name: str, error: hiredis.ReplyError, keys: list[str], args: list[Any]) -> Any:
        """An error reply on the hot-path connection: scripts flushed (restart, failover) or the
        slot moved (cluster resharding). redis-py handles both; the lane follows."""
        text = str(error)
        if text.startswith(("MOVED", "ASK")) and not self._reopening:
            self._reopening = True
            self._spawn(self._reopen_lane())
        elif not text.startswith("NOSCRIPT"):
            raise RedisError(text)
        return await self.scripts[name](keys=keys, args=args)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release(self, request_id: str) -> None:
        if len(self._releases) >= MAX_PENDING_RELEASES:
            del self._releases[0]
            self.metrics.redis_dropped_releases.inc()
        self._releases.append(request_id)
        self._schedule_flush()

    def forget(self, endpoint: str, keys: list[str]) -> None:
        """Takes back the prefix levels a failed request claimed (rare: off the hot path)."""
        if self.up and self.client is not None:
            self._spawn(self._forget(endpoint, keys))

    async def _forget(self, endpoint: str, keys: list[str]) -> None:
        try:
            await asyncio.wait_for(self.scripts["forget"](keys=keys, args=[endpoint]), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._failure(e)

    def _schedule_flush(self) -> None:
        if self.up and not self._stopping and not self._flush_scheduled and self._releases:
            self._flush_scheduled = True
            # A plain callback, not a task: releases are as frequent as picks, and every task and
            # extra loop pass here delays the picks waiting on Redis. It lingers briefly so that
            # the next pick usually carries the releases in its own script call (`take_releases`).
            asyncio.get_running_loop().call_later(RELEASE_LINGER_S, self._flush_soon)

    def take_releases(self) -> list[str]:
        """Finished requests for the next pick's script call to release, while the hot-path
        connection is open (the pick then travels behind the picks it releases)."""
        if not self._releases or not self.up or self.lane is None or self.lane.closed:
            return []
        batch = self._releases[:RELEASE_BATCH]
        del self._releases[: len(batch)]
        return batch

    def requeue(self, batch: list[str]) -> None:
        """Releases whose pick call failed or may not have run (releasing twice is harmless)."""
        if batch:
            self._releases[:0] = batch
            self._schedule_flush()

    def _flush_soon(self) -> None:
        """Writes this turn's releases as script calls on the picks' connection; their replies are
        checked in a callback. Without that connection, the task path (redis-py) sends them."""
        self._flush_scheduled = False
        if not self.up or not self._releases:
            return
        lane = self._lane()
        if lane is None:
            self._flush_scheduled = True
            self._spawn(self._flush())
            return
        while self._releases:
            batch = self._releases[:RELEASE_BATCH]
            try:
                future = lane.call(self._release_command(batch))
            except LaneClosedError as e:
                self._failure(e)
                self._schedule_flush()  # the lane is reopening: retried next turn, or on recovery
                return
            del self._releases[: len(batch)]
            future.add_done_callback(functools.partial(self._released, batch))

    def _released(self, batch: list[str], future: asyncio.Future[Any]) -> None:
        """A release call's reply: on a lost connection or an error reply the batch is queued
        again (releases are idempotent); NOSCRIPT and MOVED go through redis-py's recovery."""
        if future.cancelled():
            error: BaseException | None = LaneClosedError("release cancelled")
        else:
            error = future.exception()
        if error is not None:
            self._releases[:0] = batch
            self._failure(error)
            self._schedule_flush()
            return
        reply = future.result()
        if isinstance(reply, hiredis.ReplyError):
            self._spawn(self._recover_releases(batch, reply))

    async def _recover_releases(self, batch: list[str], error: hiredis.ReplyError) -> None:
        try:
            await asyncio.wait_for(
                self._recover("release", error, self._release_keys(), list(batch)), self.timeout
            )
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._releases[:0] = batch
            self._failure(e)

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # let this turn's other releases join the batch
            while self.up and self._releases:
                batch = self._releases[:RELEASE_BATCH]
                try:
                    await asyncio.wait_for(self._send_releases(batch), self.timeout)
                except (RedisError, OSError, asyncio.TimeoutError) as e:
                    self._failure(e)
                    return  # kept in the queue; retried when the circuit closes
                del self._releases[: len(batch)]
        finally:
            self._flush_scheduled = False

    def _release_keys(self) -> list[str]:
        """KEYS of the release script (see rust/src/shared/scripts.rs)."""
        k = self.keys
        return [k["inflight"], k["replica_counts"], k["replica_requests"]]

    def _release_command(self, batch: list[str]) -> bytes:
        return encode("EVALSHA", self.shas["release"], "3", *self._release_keys(), *batch)

    async def _send_releases(self, batch: list[str]) -> None:
        keys = self._release_keys()
        lane = self._lane()
        if lane is None:
            await self.scripts["release"](keys=keys, args=batch)
            return
        # On the picks' connection, so a release always runs after its pick, even one whose
        # reply came too late (Redis serves one connection in order).
        reply = await lane.call(self._release_command(batch))
        if isinstance(reply, hiredis.ReplyError):
            await self._recover("release", reply, keys, batch)

    async def pool_inflight(self, endpoints: list[str]) -> dict[str, int] | None:
        """Pool-wide counts for /debug, or None when Redis does not answer in time."""
        if not self.up or self.client is None or not endpoints:
            return None
        try:
            values = await asyncio.wait_for(self.client.hmget(self.keys["inflight"], endpoints), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError):
            return None
        return {e: max(0, int(v or 0)) for e, v in zip(endpoints, values, strict=True)}


class SharedPicker(Picker):
    """Picks through Redis when it answers, from local state when it does not."""

    def __init__(self, balancer: Balancer, metrics: Metrics, shared: SharedState, **kwargs: Any) -> None:
        super().__init__(balancer, metrics, **kwargs)
        self.shared = shared
        self._request_ids: dict[int, str] = {}
        # Ticket -> (endpoint, keys of the prefix levels its pick claimed in Redis).
        self._claimed: dict[int, tuple[str, list[str]]] = {}
        self._next_request = 0

    async def pick(self, request: ParsedRequest | None) -> tuple[int, str] | Refusal:
        started = time.perf_counter()
        self._next_request += 1
        request_id = str(self._next_request)
        releases = self.shared.take_releases()
        try:
            prepared = self.balancer.prepare_shared(request, request_id, random.getrandbits(31), releases)
        except NoEndpointsError:
            self.shared.requeue(releases)
            return self._refuse_no_endpoints()
        try:
            reply = await self.shared.pick_shared(prepared, request_id)
            if isinstance(reply, str):
                self.shared.requeue(releases)
                self.metrics.fallbacks.inc((reply,))
                ticket, endpoint, reason, depth = self.balancer.fallback_shared(prepared[0])
            else:
                endpoint = _text(reply[0])
                if not endpoint:  # prepared pick discarded in `finally`
                    least = int(reply[1])
                    return self._refuse_over_limit(
                        f"every endpoint is at maxRequestCount ({least} in flight on the least loaded)"
                    )
                depth = int(reply[2])
                ticket, reason = self.balancer.commit_shared(prepared[0], endpoint, depth)
                self._request_ids[ticket] = request_id
                claimed = prepared[1][PICK_FIXED_KEYS + depth :]
                if claimed:
                    self._claimed[ticket] = (endpoint, claimed)
        except NoEndpointsError:
            return self._refuse_no_endpoints()
        except OverLimitError as e:
            return self._refuse_over_limit(str(e))
        finally:
            self.balancer.discard_shared(prepared[0])
        self._record(endpoint, reason, depth, ticket, time.perf_counter() - started)
        return ticket, endpoint

    def release(self, ticket: int, failed: bool = False) -> None:
        self.balancer.release(ticket, failed)
        request_id = self._request_ids.pop(ticket, None)
        if request_id is not None:
            self.shared.release(request_id)
        claimed = self._claimed.pop(ticket, None)
        if failed and claimed is not None:
            self.shared.forget(*claimed)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"
