"""Shared state in Redis: many picker replicas, one view of in-flight load and prefixes.

The engine in the Rust core decides every pick, as on embedded state; Redis only counts. Each
pick is one ``EVALSHA`` of the commit script (encoded by the core): it commits the engine's
choice unless another replica made that endpoint busier first (a guard), and answers with the
pool's fresh loads, which the next decision uses. After such a race the engine decides again on
those loads and commits again (a second round trip, only then). Prefix records travel on the
pool's stream: every replica follows it, so a conversation started through one replica finds
its server through any other. Releases are batched and ride on the next commit.

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
    SHARED_COMMIT_ATTEMPTS,
    Balancer,
    NoEndpointsError,
    OverLimitError,
    ParsedRequest,
    UnknownModelError,
    shared_scripts,
)
from llmlb.config import Config, LbConfig
from llmlb.decision import STATE_LOCAL_FALLBACK, STATE_REDIS, Decision
from llmlb.metrics import Metrics
from llmlb.picking import NO_META, Picker, Refusal, RequestMeta
from llmlb.resp import LaneClosedError, RespConnection

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
# A finished request to release in Redis: its request id, and the prompt tokens the prefill
# backlog still held of it (`Balancer.release_tokens`), which the other replicas take back.
Release = tuple[str, int]
# The stream of prefix records: records per read, and how long one read blocks at most.
STREAM_BATCH = 1000
STREAM_BLOCK_MS = 1000
# Pause after a read that returned records, so the next one returns the records of this span
# at once instead of waking once per pick: at 500 picks/s, reading record by record cost the
# picker ~200 µs of CPU per request and Redis ~50 µs; 5 ms pauses left +90 µs, 20 ms +40 µs
# (bench/redis/README.md). Other replicas' prefix records and backlogs arrive up to this much
# later; request counts do not wait for it (every commit reply carries them, and the guard
# catches a race).
STREAM_PACE_S = 0.02
# Records read at start to warm the prefix table (the stream holds about 20,000).
STREAM_WARM = 20_000

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
        balancer.enable_shared(config.pool, self.replica, self.lease_ms, self.keep_ms, self.shas["commit"])
        self.inflight_key = balancer.shared_key("inflight")
        self.picks_key = balancer.shared_key("picks")
        self.response_prefix = balancer.shared_key("response:")
        # The last stream record applied (reading resumes after it).
        self._stream_at = "0-0"
        self._follower: asyncio.Task[None] | None = None
        self.budget = lb.redisBudget / 1000
        self.timeout = lb.timeout / 1000
        self.client: Client | None = None
        # The hot-path connection (picks, releases); redis-py does everything else.
        self.lane: RespConnection | None = None
        self._reopening = False  # one reconnect at a time, however many requests notice
        self._repair: asyncio.Task[None] | None = None  # the one recovery from an error reply
        self.scripts: dict[str, Any] = {}
        self.cluster = False
        self.up = False
        self._failures = 0
        self._releases: list[Release] = []
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
            node = self.client.get_node_from_key(self.inflight_key)
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
            await self._warm_prefixes()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat")
        self._follower = asyncio.create_task(self._follow_stream(), name="redis-stream")

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._heartbeat, self._probe, self._follower, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._heartbeat, self._probe, self._follower, *self._tasks):
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
        # While Redis is away, decisions use this replica's own counts.
        self.balancer.set_remote(up)
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
        keys, args = self.balancer.heartbeat_call(16)
        lapsed = await self.scripts["heartbeat"](keys=keys, args=args)
        for lapsed_id in lapsed:
            other = _text(lapsed_id)
            keys, args = self.balancer.reap_call(other)
            reaped = await self.scripts["reap"](keys=keys, args=args)
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

    async def commit(self, command: bytes, request_id: str) -> list[Any] | str:
        """Runs one commit: the script's answer, or the fallback reason when local state must
        decide instead."""
        if not self.up:
            return "redis_down"
        started = time.perf_counter()
        try:
            lane = self._lane()
            if lane is None:
                raise LaneClosedError("the hot-path connection is reopening")
            reply = lane.call_eagerly(command, min(EAGER_READ_S, self.budget))
            if isinstance(reply, asyncio.Future):
                reply = await within(reply, self.budget)
            if isinstance(reply, hiredis.ReplyError):
                reply = await within(self._recover(reply, command), self.budget)
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

    async def _recover(self, error: hiredis.ReplyError, command: bytes) -> Any:
        """An error reply on the hot-path connection: scripts flushed (restart, failover) or the
        slot moved (cluster resharding). Load the scripts again, or follow the slot, and resend."""
        text = str(error)
        if not text.startswith(("MOVED", "ASK", "NOSCRIPT")):
            raise RedisError(text)
        # Every pick in flight gets the same error at once: one repair serves them all, instead
        # of each reopening the lane (closing the one the previous repair opened) or reloading
        # every script.
        if self._repair is None or self._repair.done():
            self._repair = self._spawn(self._repair_lane(text))
            # Its error reaches every waiter; marked seen in case all of them timed out first.
            self._repair.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._repair)
        lane = self._lane()
        if lane is None:
            raise LaneClosedError("the hot-path connection is reopening")
        return RespConnection.check(await lane.call(command))

    async def _repair_lane(self, error: str) -> None:
        if error.startswith("NOSCRIPT"):
            assert self.client is not None
            for script in self.scripts.values():
                await self.client.script_load(script.script)
        else:
            await self._open_lane()

    def send_record(self, command: bytes) -> None:
        """Adds a record to the pool's stream (a failed request's take-back; rare, off the hot
        path): its reply is only checked for errors."""
        lane = self._lane() if self.up else None
        if lane is None:
            return  # the other replicas' records of it expire with their TTL
        try:
            future = lane.call(command)
        except LaneClosedError as e:
            self._failure(e)
            return
        future.add_done_callback(self._record_sent)

    def _record_sent(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        reply = None if future.cancelled() or error is not None else future.result()
        if error is not None or isinstance(reply, hiredis.ReplyError):
            self._count_error()

    # --- the stream of prefix records ------------------------------------------------------

    async def _warm_prefixes(self) -> None:
        """Reads the stream's recent records once at start, oldest first, so this replica knows
        which server holds what the others recorded before it started."""
        assert self.client is not None
        try:
            records = await asyncio.wait_for(
                self.client.xrevrange(self.picks_key, count=STREAM_WARM), self.timeout * 3
            )
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            log.warning("could not read the pool's prefix records (%s): starting without them", _describe(e))
            return
        applied = self._apply_records(reversed(records))
        log.info("prefix table warmed from %d records of the pool's stream", applied)

    async def _follow_stream(self) -> None:
        """Applies the other replicas' prefix records as they are added."""
        block_ms = max(1, min(STREAM_BLOCK_MS, int(self.timeout * 500)))
        while not self._stopping:
            if not self.up or self.client is None:
                await asyncio.sleep(PROBE_INTERVAL)
                continue
            try:
                batches = await self.client.xread(
                    {self.picks_key: self._stream_at}, count=STREAM_BATCH, block=block_ms
                )
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                log.debug("reading the pool's prefix records: %s", _describe(e))
                await asyncio.sleep(PROBE_INTERVAL)
                continue
            for _, records in batches or ():
                self._apply_records(records)
            if batches:
                await asyncio.sleep(STREAM_PACE_S)

    def _apply_records(self, records: Any) -> int:
        applied = 0
        for record_id, fields in records:
            rid = _text(record_id)
            self._stream_at = rid
            applied += self.balancer.apply_stream_record(rid, fields)
        return applied

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def release(self, request_id: str, tokens: int = 0) -> None:
        """Queues a finished request's release; ``tokens``: what the backlog still held of it."""
        if len(self._releases) >= MAX_PENDING_RELEASES:
            del self._releases[0]
            self.metrics.redis_dropped_releases.inc()
        self._releases.append((request_id, tokens))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self.up and not self._stopping and not self._flush_scheduled and self._releases:
            self._flush_scheduled = True
            # A plain callback, not a task: releases are as frequent as picks, and every task and
            # extra loop pass here delays the picks waiting on Redis. It lingers briefly so that
            # the next pick usually carries the releases in its own script call (`take_releases`).
            asyncio.get_running_loop().call_later(RELEASE_LINGER_S, self._flush_soon)

    def take_releases(self) -> list[Release]:
        """Finished requests for the next pick's script call to release, while the hot-path
        connection is open (the pick then travels behind the picks it releases)."""
        if not self._releases or not self.up or self.lane is None or self.lane.closed:
            return []
        batch = self._releases[:RELEASE_BATCH]
        del self._releases[: len(batch)]
        return batch

    def requeue(self, batch: list[Release]) -> None:
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

    def _released(self, batch: list[Release], future: asyncio.Future[Any]) -> None:
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

    async def _recover_releases(self, batch: list[Release], error: hiredis.ReplyError) -> None:
        try:
            await asyncio.wait_for(self._recover(error, self._release_command(batch)), self.timeout)
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

    def _release_command(self, batch: list[Release]) -> bytes:
        return self.balancer.release_command(self.shas["release"], batch)

    async def _send_releases(self, batch: list[Release]) -> None:
        lane = self._lane()
        if lane is None:
            keys, args = self.balancer.release_call(batch)
            await self.scripts["release"](keys=keys, args=args)
            return
        # On the picks' connection, so a release always runs after its pick, even one whose
        # reply came too late (Redis serves one connection in order).
        command = self._release_command(batch)
        reply = await lane.call(command)
        if isinstance(reply, hiredis.ReplyError):
            await self._recover(reply, command)

    # --- stored responses (see llmlb.responses) -----------------------------------------------

    async def set_response(self, response_id: str, endpoint: str, ttl_s: int) -> None:
        """Records which endpoint holds a stored response (background work: the timeout, not the
        pick budget, bounds it)."""
        if self.client is None:
            return
        try:
            await within(
                self.client.set(self.response_prefix + response_id, endpoint, ex=ttl_s), self.timeout
            )
        except Exception as e:
            self._failure(e)

    async def get_response(self, response_id: str) -> str | None:
        """The endpoint holding a stored response, if the pool knows; waits at most redisBudget."""
        if self.client is None:
            return None
        try:
            value = await within(self.client.get(self.response_prefix + response_id), self.budget)
        except Exception as e:
            self._failure(e)
            return None
        self._success()
        return None if value is None else _text(value)

    async def pool_inflight(self, endpoints: list[str]) -> dict[str, int] | None:
        """Pool-wide counts for /debug, or None when Redis does not answer in time."""
        if not self.up or self.client is None or not endpoints:
            return None
        try:
            values = await asyncio.wait_for(self.client.hmget(self.inflight_key, endpoints), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError):
            return None
        return {e: max(0, int(v or 0)) for e, v in zip(endpoints, values, strict=True)}


class SharedPicker(Picker):
    """Picks through Redis when it answers, from local state when it does not. The engine
    decides either way; Redis counts (see the module docs)."""

    def __init__(self, balancer: Balancer, metrics: Metrics, shared: SharedState, **kwargs: Any) -> None:
        super().__init__(balancer, metrics, **kwargs)
        self.shared = shared
        self.synchronous = False  # picks through Redis wait for its answer
        self._request_ids: dict[int, str] = {}
        self._next_request = 0

    async def pick(
        self,
        request: ParsedRequest | None,
        *,
        session: str | None = None,
        pinned: str | None = None,
        meta: RequestMeta = NO_META,
    ) -> Decision | Refusal:
        if not self.shared.up:
            local = self._pick_here(request, session, pinned, meta, STATE_LOCAL_FALLBACK)
            if not isinstance(local, Refusal):
                self.metrics.fallbacks.inc(("redis_down",))
            return local
        started = time.perf_counter()
        self._next_request += 1
        request_id = str(self._next_request)
        releases = self.shared.take_releases()
        try:
            pending, command = self.balancer.prepare_shared(
                request, request_id, releases, session=session, pinned=pinned
            )
        except NoEndpointsError:
            self.shared.requeue(releases)
            return self._refuse_no_endpoints()
        except UnknownModelError as e:
            self.shared.requeue(releases)
            return self._refuse_unknown_model(str(e))
        except OverLimitError as e:
            self.shared.requeue(releases)
            return self._refuse_over_limit(str(e))
        try:
            for attempt in range(SHARED_COMMIT_ATTEMPTS):
                reply = await self.shared.commit(command, request_id)
                if isinstance(reply, str):
                    if attempt == 0:
                        self.shared.requeue(releases)
                    self.metrics.fallbacks.inc((reply,))
                    pick = self.balancer.fallback_shared(pending)
                    state = STATE_LOCAL_FALLBACK
                    break
                outcome = self.balancer.complete_shared(pending, reply)
                if isinstance(outcome, bytes):
                    # Another replica made the chosen endpoint busier first: decided again.
                    self.metrics.redis_commit_retries.inc()
                    command = outcome
                    continue
                pick = outcome
                state = STATE_REDIS
                self._request_ids[pick.ticket] = request_id
                break
            else:  # pragma: no cover - the core's last commit has no guard
                pick = self.balancer.fallback_shared(pending)
                state = STATE_LOCAL_FALLBACK
        except NoEndpointsError:
            return self._refuse_no_endpoints()
        except OverLimitError as e:
            return self._refuse_over_limit(str(e))
        except UnknownModelError as e:
            return self._refuse_unknown_model(str(e))
        finally:
            self.balancer.discard_shared(pending)
        return self._decided(pick, request, meta, state, time.perf_counter() - started)

    def release(self, ticket: int, failed: bool = False) -> None:
        tokens = 0
        if failed:
            # Its record carries the backlog tokens taken back, with the prefix levels.
            record = self.balancer.release_failed(ticket)
            if record is not None:
                self.shared.send_record(record)
        else:
            tokens = self.balancer.release_tokens(ticket) or 0
        request_id = self._request_ids.pop(ticket, None)
        if request_id is not None:
            self.shared.release(request_id, tokens)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"
