"""The ext_proc gRPC server: Envoy's connections are served by ``llmlb._core.ExtProcTransport``
on its own thread (HTTP/2, gRPC framing, health checks, TLS); here each stream's messages feed
``ExtProcService.Process``, the one ext_proc implementation, and its answers go back.

Per event-loop pass the transport's events are taken in one call (its descriptor turns
readable when some wait), each message already decoded in Rust (``ExtProcMessage``), and the
answers of the pass (serialized bytes) are sent in one call. Once a stream only echoes its
response body (``StreamContext.echo_response_bodies``), the next send hands it over and its
response chunks are answered on the transport's thread without reaching Python at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import NoReturn

import grpc

from llmlb._core import ExtProcMessage, ExtProcTransport
from llmlb.extproc import ExtProcService

log = logging.getLogger("llmlb.extproc")

_OK = grpc.StatusCode.OK.value[0]
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
_OPENED = ExtProcTransport.OPENED
_MESSAGE = ExtProcTransport.MESSAGE
_ENDED = ExtProcTransport.ENDED
_RESET = ExtProcTransport.RESET


class _Aborted(Exception):
    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Inbox:
    """One stream's messages as ``Process`` reads them, queued as they are taken."""

    __slots__ = ("_ended", "_loop", "_queue", "_waiter", "delivered")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[ExtProcMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        # Messages taken from the transport for this stream (the hand-over compares counts).
        self.delivered = 0

    @property
    def empty(self) -> bool:
        return not self._queue

    def put(self, message: ExtProcMessage) -> None:
        self._queue.append(message)
        self.delivered += 1
        self._wake()

    def end(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> ExtProcMessage:
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()


class _Context:
    """What ``Process`` may do to its stream besides answering (see ``extproc.StreamContext``)."""

    __slots__ = ("_inbox", "_server", "_stream")

    def __init__(self, server: ExtProcServer, stream: int, inbox: _Inbox) -> None:
        self._server = server
        self._stream = stream
        self._inbox = inbox

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code.value[0], details)

    def echo_response_bodies(self) -> None:
        self._server.hand_over_soon(self._stream, self._inbox)


class ExtProcServer:
    """Serves ``service`` on a bound transport (see ``bind``)."""

    def __init__(self, service: ExtProcService, transport: ExtProcTransport) -> None:
        self.service = service
        self.transport = transport
        self._streams: dict[int, tuple[_Inbox, asyncio.Task[None]]] = {}
        self._messages: list[tuple[int, bytes]] = []
        self._finishes: list[tuple[int, int, str]] = []
        # Streams to hand over with the next send (see hand_over_soon).
        self._hand_overs: dict[int, _Inbox] = {}
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1

    @property
    def port(self) -> int:
        return self.transport.port

    def start(self) -> None:
        """Takes the transport's events on the running loop from now on."""
        self._loop = asyncio.get_running_loop()
        self._fd = self.transport.wake_fd()
        self._loop.add_reader(self._fd, self._take)
        self._take()  # streams opened before the reader was in place

    def _take(self) -> None:
        loop = self._loop
        assert loop is not None
        streams = self._streams
        for stream, kind, message in self.transport.take_events():
            if kind == _MESSAGE:
                entry = streams.get(stream)
                if entry is not None:
                    assert message is not None
                    entry[0].put(message)
            elif kind == _OPENED:
                inbox = _Inbox(loop)
                task = loop.create_task(self._serve(stream, inbox))
                streams[stream] = (inbox, task)
            elif kind == _ENDED:
                entry = streams.get(stream)
                if entry is not None:
                    entry[0].end()
            elif kind == _RESET:
                entry = streams.get(stream)
                if entry is not None:
                    entry[1].cancel()

    async def _serve(self, stream: int, inbox: _Inbox) -> None:
        status, details = _OK, ""
        context = _Context(self, stream, inbox)
        try:
            async with contextlib.aclosing(self.service.Process(inbox, context)) as answers:
                async for answer in answers:
                    self._messages.append((stream, answer))
                    self._schedule_flush()
        except _Aborted as e:
            status, details = e.code, e.details
        except asyncio.CancelledError:
            # Envoy reset the stream (nobody reads the status), or the server is closing.
            status, details = _CANCELLED, "cancelled"
        except Exception:  # logged and counted by Process
            status, details = _UNKNOWN, "llmlb: internal error"
        finally:
            self._streams.pop(stream, None)
            self._finishes.append((stream, status, details))
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """The pass's answers and hand-overs in one call: the transport's thread wakes once
        for all of them."""
        self._flush_scheduled = False
        messages, finishes = self._messages, self._finishes
        hand_overs = []
        if self._hand_overs:
            streams = self._streams
            # Only streams whose every message was handled here (else Process asks again after
            # the next chunk); the transport checks the count against what it delivered.
            hand_overs = [
                (stream, inbox.delivered)
                for stream, inbox in self._hand_overs.items()
                if inbox.empty and stream in streams
            ]
            self._hand_overs = {}
        if messages or finishes or hand_overs:
            self._messages, self._finishes = [], []
            # The answers go out before the hand-overs take: no echo overtakes them.
            self.transport.send(messages, finishes, hand_overs)

    def hand_over_soon(self, stream: int, inbox: _Inbox) -> None:
        """Lets the transport echo the stream's response chunks from the pass's send on."""
        self._hand_overs[stream] = inbox
        self._schedule_flush()

    def set_serving(self, serving: bool) -> None:
        self.transport.set_serving(serving)

    def stop_accepting(self) -> None:
        """No new streams: the listener closes, connections get GOAWAY, a new stream on an
        open connection is refused with UNAVAILABLE."""
        self.transport.set_accepting(False)
        self.transport.stop_listening()

    async def close(self) -> None:
        """Cuts the streams still open (UNAVAILABLE) and stops the transport."""
        for _, task in list(self._streams.values()):
            task.cancel()
        pending = [task for _, task in self._streams.values()]
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        self._flush()
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        await asyncio.to_thread(self.transport.close)


def bind(
    service: ExtProcService,
    address: str,
    *,
    reuse_port: bool,
    max_streams_per_connection: int,
    max_message_bytes: int,
    tls: tuple[bytes, bytes, bytes | None] | None = None,
) -> ExtProcServer:
    """Listens on ``address`` (an IP literal with port). Raises OSError if it cannot."""
    transport = ExtProcTransport(
        address,
        reuse_port=reuse_port,
        max_streams_per_connection=max_streams_per_connection,
        max_message_bytes=max_message_bytes,
        tls=tls,
    )
    return ExtProcServer(service, transport)
