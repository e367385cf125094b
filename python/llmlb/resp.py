"""A minimal pipelined Redis connection for the per-request hot path.

redis-py costs about 170 µs of CPU per script call here (argument encoding, connection-pool
checkout, a task per timeout); this connection writes a pre-encoded RESP command (built by the
Rust core) and matches replies to callers in order, parsed by hiredis: about 55 µs. Commands from
concurrent requests share the connection, so they are pipelined for free. A pick reads its own
reply eagerly (`call_eagerly`), so it does not wait for a turn of a busy event loop. Everything else
(connecting to a cluster, loading scripts, heartbeats, probes) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import ssl
import time
from typing import Any, cast

import hiredis

from llmlb._core import wait_readable

# The eager-read hit rate is an exponential average over about the last 20 calls.
EAGER_RATE_WEIGHT = 0.05
EAGER_PROBE_EVERY = 64


class LaneClosedError(ConnectionError):
    """The connection is closed; pending and new commands fail with this."""


def encode(*parts: str | bytes) -> bytes:
    """A command in RESP (array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _RespProtocol(asyncio.Protocol):
    """Parses replies as bytes arrive and resolves the waiting futures right there: no reader
    task between the socket and the caller, so a reply costs one pass through the event loop's
    ready queue instead of two (under load each pass waits behind other streams' work)."""

    def __init__(self) -> None:
        self.parser = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, so no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
            while (reply := self.parser.gets()) is not False:
                future = self.pending.popleft()
                if not future.done():
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError):  # garbage, or a reply nobody asked for
            if self.transport is not None:
                self.transport.close()
            self._fail_pending()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_pending()
        if not self.lost.done():
            self.lost.set_result(None)

    def _fail_pending(self) -> None:
        self.closed = True
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(LaneClosedError("Redis connection lost"))


class RespConnection:
    def __init__(self, protocol: _RespProtocol, fd: int | None) -> None:
        self._protocol = protocol
        # The socket, for reading eagerly; None under TLS, whose bytes only the transport can read.
        self._fd = fd
        # Recent share of eager reads that got their reply in time. Below one half (a remote or
        # slow Redis) only every EAGER_PROBE_EVERY-th call waits, so the loop loses little.
        self._eager_hit_rate = 1.0
        self._calls = 0

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        database: int,
        tls: ssl.SSLContext | None,
    ) -> RespConnection:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(_RespProtocol, host, port, ssl=tls)
        sock = transport.get_extra_info("socket") if tls is None else None
        conn = cls(protocol, sock.fileno() if sock is not None else None)
        try:
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                conn.check(await conn.call(encode(*auth)))
            if database:
                conn.check(await conn.call(encode("SELECT", str(database))))
        except BaseException:
            await conn.close()
            raise
        return conn

    @property
    def closed(self) -> bool:
        transport = self._protocol.transport
        return self._protocol.closed or transport is None or transport.is_closing()

    @staticmethod
    def check(reply: Any) -> Any:
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    def call(self, command: bytes) -> asyncio.Future[Any]:
        """Sends ``command``; the future resolves to its reply (an error reply is returned as a
        ``hiredis.ReplyError`` value, not raised). Cancelling the future drops its reply."""
        if self.closed:
            raise LaneClosedError("Redis lane is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        transport = self._protocol.transport
        assert transport is not None
        try:
            transport.write(command)
        except (RuntimeError, OSError) as e:  # the transport closed under us (uvloop raises RuntimeError)
            raise LaneClosedError(f"Redis lane is closed: {e}") from None
        self._protocol.pending.append(future)
        return future

    def call_eagerly(self, command: bytes, wait_s: float) -> Any:
        """Sends ``command`` and reads the socket right here, for at most ``wait_s``, until its
        reply is in: then the reply itself (as ``call``'s future would give it), else that future.

        Under load a reply left to the event loop waits behind every other stream's callbacks
        (the pick's p99 doubled); a loopback Redis usually answers within ~100 µs, and while this
        waits (GIL released) the core is free for Redis. Bytes read here go through the same
        parser as the transport's, so replies to earlier commands resolve their futures too.
        """
        future = self.call(command)
        fd = self._fd
        self._calls += 1
        if fd is None or (self._eager_hit_rate < 0.5 and self._calls % EAGER_PROBE_EVERY):
            return future
        deadline = time.perf_counter() + wait_s
        while not future.done():
            remaining_us = int((deadline - time.perf_counter()) * 1e6)
            try:
                if remaining_us <= 0 or not wait_readable(fd, remaining_us):
                    break
                data = os.read(fd, 65536)
            except BlockingIOError:  # another reader (the transport) took the bytes first
                continue
            except OSError:  # closed under us: the transport reports it to the futures
                break
            if not data:  # end of file: left for the transport to see and report
                break
            self._protocol.data_received(data)
        hit = future.done()
        self._eager_hit_rate += (float(hit) - self._eager_hit_rate) * EAGER_RATE_WEIGHT
        return future.result() if hit else future

    async def close(self) -> None:
        self._protocol.closed = True
        if self._protocol.transport is not None:
            self._protocol.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._protocol.lost), 1.0)
