"""Compressed request bodies (gzip, deflate, zstd) are decoded to be read, so they keep their
prefix affinity, and are forwarded exactly as they came; a decompression bomb gets 413.

Reproduction: a gzip body (`Content-Encoding: gzip`, as some SDKs send) was counted as
`bad_body` and scattered by load.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import zstandard

from tests.support.conversations import conversation
from tests.support.procs import Gateway, MakeGateway, metric_sum

pytestmark = pytest.mark.e2e

CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped, as RFC 9110 defines "deflate"
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def chat(turns: int, tag: str) -> dict[str, Any]:
    return {"model": "test-model", "messages": conversation(turns, tag)}


def fallbacks(gw: Gateway) -> float:
    assert gw.daemon is not None
    return metric_sum(gw.daemon.metrics(), "llmlb_fallbacks_total", reason="bad_body")


def hits(gw: Gateway) -> float:
    assert gw.daemon is not None
    return metric_sum(gw.daemon.metrics(), "llmlb_picks_total", reason="prefix_hit")


def send(gw: Gateway, body: bytes, encoding: str | None) -> Any:
    headers = {"content-encoding": encoding} if encoding else {}
    reply = gw.post("/v1/chat/completions", body, headers=headers)
    assert reply.status == 200, reply
    return reply


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_compressed_conversation_keeps_its_affinity_and_arrives_unchanged(
    pc_gateway: Gateway, codec: str
) -> None:
    compress = CODECS[codec]
    bad_before, hits_before = fallbacks(pc_gateway), hits(pc_gateway)
    homes = set()
    for turns in (1, 2, 3):
        body = compress(json.dumps(chat(turns, f"{codec} {pc_gateway.mode}")).encode())
        reply = send(pc_gateway, body, codec)
        homes.add(reply.served_by)
        stats = pc_gateway.backend(reply.served_by).stats()
        assert stats["last_body_sha256"] == hashlib.sha256(body).hexdigest(), "forwarded as it came"
        assert stats["last_headers"].get("content-encoding") == codec
    assert len(homes) == 1, homes
    assert fallbacks(pc_gateway) == bad_before
    assert hits(pc_gateway) == hits_before + 2


def test_compressed_and_plain_turns_share_one_prefix(pc_gateway: Gateway) -> None:
    tag = f"mixed {pc_gateway.mode}"
    first = send(pc_gateway, json.dumps(chat(1, tag)).encode(), None)
    second = send(pc_gateway, gzip.compress(json.dumps(chat(2, tag)).encode()), "gzip")
    assert second.served_by == first.served_by


def test_a_decompression_bomb_gets_413(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("prefix_cache", mode, daemon_config={"max_body_bytes": 8 * 1024 * 1024})
    # 64 MiB of JSON whitespace inside a valid request: about 64 KiB compressed.
    inflated = b'{"model": "test-model", "messages": [' + b" " * (64 * 1024 * 1024) + b"]}"
    bomb = gzip.compress(inflated, compresslevel=9)
    assert len(bomb) < 1024 * 1024
    reply = gw.post("/v1/chat/completions", bomb, headers={"content-encoding": "gzip"}, timeout=30)
    assert reply.status == 413, reply
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == 413
    assert "larger than 8388608 bytes" in error["message"]
    assert all(b.stats()["total"] == 0 for b in gw.backends), "never reached a model server"


def test_an_unknown_encoding_is_routed_by_load_and_forwarded(pc_gateway: Gateway) -> None:
    body = b"\x8b\x00 not really brotli"
    bad_before = fallbacks(pc_gateway)
    reply = send(pc_gateway, body, "br")
    stats = pc_gateway.backend(reply.served_by).stats()
    assert stats["last_body_sha256"] == hashlib.sha256(body).hexdigest()
    assert fallbacks(pc_gateway) == bad_before + 1
