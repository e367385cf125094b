"""The hot-path Redis connection against a real Redis: eager reads of a pick's own reply."""

from __future__ import annotations

import asyncio

import pytest

from llmlb import resp
from llmlb.resp import RespConnection, encode
from tests.support.redis_servers import RedisServer

# A real slow command: a script that keeps Redis busy for ARGV[1] ms.
BUSY = "local t = redis.call('TIME'); local until_us = t[1] * 1e6 + t[2] + ARGV[1] * 1000\n" \
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= until_us\nreturn 'done'"  # fmt: skip


def busy(ms: int) -> bytes:
    return encode("EVAL", BUSY, "0", str(ms))


async def connect(server: RedisServer) -> RespConnection:
    return await RespConnection.open(
        server.host, server.port, username=None, password=None, database=0, tls=None
    )


def test_a_prompt_reply_comes_back_from_the_call_itself(redis_server):
    async def run() -> None:
        conn = await connect(redis_server)
        try:
            earlier = conn.call(encode("ECHO", "first"))
            reply = conn.call_eagerly(encode("ECHO", "second"), 0.5)
            assert reply == b"second", "not an awaitable: the reply, read on the spot"
            assert earlier.done(), "replies read eagerly resolve earlier commands' futures too"
            assert earlier.result() == b"first"
            error = conn.call_eagerly(encode("NOSUCHCOMMAND"), 0.5)
            assert "unknown command" in str(error).lower(), "error replies are values, as from call()"
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_slow_reply_is_left_to_the_event_loop(redis_server):
    async def run() -> None:
        conn = await connect(redis_server)
        try:
            pending = conn.call_eagerly(busy(300), 0.001)
            assert isinstance(pending, asyncio.Future), "gave up after its window, left a future"
            assert await asyncio.wait_for(pending, 5.0) == b"done"
            assert conn.call_eagerly(encode("PING"), 0.5) == b"PONG", "the stream stays in step"
        finally:
            await conn.close()

    asyncio.run(run())


def test_after_repeated_misses_calls_stop_waiting_then_probe_back(redis_server, monkeypatch):
    monkeypatch.setattr(resp, "EAGER_PROBE_EVERY", 8)

    async def run() -> None:
        conn = await connect(redis_server)
        try:
            for _ in range(20):  # misses drive the hit rate below one half (0.95**14 < 0.5)
                pending = conn.call_eagerly(busy(15), 0.0005)
                assert isinstance(pending, asyncio.Future)
                await asyncio.wait_for(pending, 5.0)
            # A fast Redis again, but the connection no longer waits: most calls return futures
            # without reading, only every 8th probes...
            results = []
            for _ in range(400):
                reply = conn.call_eagerly(encode("PING"), 0.5)
                eager = not isinstance(reply, asyncio.Future)
                results.append(eager)
                if not eager:
                    assert await asyncio.wait_for(reply, 5.0) == b"PONG"
            assert not all(results[:8]), "a slow connection stops waiting"
            # ...and the probes' hits bring eager reads back.
            assert all(results[-20:]), f"eager reads never resumed: {results}"
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_closed_connection_fails_the_eager_call(redis_server):
    async def run() -> None:
        conn = await connect(redis_server)
        await conn.close()
        with pytest.raises(resp.LaneClosedError):
            conn.call_eagerly(encode("PING"), 0.5)

    asyncio.run(run())
