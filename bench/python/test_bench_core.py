"""The llmlb core through its Python bindings (pytest-benchmark).

The same cases as the criterion benches in bench/rust/core.rs, so `bench/check.py` can subtract
the Rust-side time from the Python-side time and report the cost of crossing into Rust.

    pytest bench/python --benchmark-enable            # measure
    pytest bench/python --benchmark-disable           # quick smoke run (each case runs once)

Each benchmark carries `extra_info`: `id`, the criterion id of the same work; `repeat`, units of
that work per benchmarked call (sub-microsecond work is looped to amortise the harness);
`calls`, Python->Rust calls per unit; and `bytes` when it handles a body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from bench_bodies import BODY_SIZES, MODEL, endpoint_addresses

import llmlb

SIZES = [label for label, _, _ in BODY_SIZES]
TARGET_BYTES = {label: size for label, size, _ in BODY_SIZES}
ENDPOINT_COUNTS = [8, 1000]
# Bodies of other conversations picked before timing, so the prefix table holds ~100k entries
# (each 32 KB body records ~80 levels), like the criterion setup.
WARM_CONVERSATIONS = 1250


def _fingerprint(body: bytes) -> dict[str, Any]:
    parsed = llmlb.parse_request(body)
    return {"bytes": len(body), "levels": len(parsed.prefix_hashes), "last_hash": parsed.prefix_hashes[-1]}


@pytest.mark.parametrize("size", SIZES)
def test_parse_hash(benchmark: Any, chat_bodies: dict[str, bytes], size: str) -> None:
    body = chat_bodies[size]
    benchmark.group = "parse_hash"
    repeat = 20 if len(body) < 4096 else 1
    benchmark.extra_info.update(id=f"parse_hash/{size}", repeat=repeat, calls=1, **_fingerprint(body))

    parsed = benchmark(_repeat(llmlb.parse_request, body, repeat))

    assert parsed.kind == "chat"
    assert parsed.model == MODEL
    assert parsed.stream is True
    # ~512 bytes of prompt per level, plus one closing block per message.
    assert len(body) // 600 <= len(parsed.prefix_hashes) <= len(body) // 256 + 1
    assert abs(len(body) - TARGET_BYTES[size]) <= 64


def _balancer(policy: str, n: int) -> tuple[llmlb.Balancer, list[str]]:
    balancer = llmlb.Balancer(policy)
    addresses = endpoint_addresses(n)
    balancer.set_endpoints(addresses)
    return balancer, addresses


def _repeat(fn: Callable[[Any], Any], arg: Any, n: int) -> Callable[[], Any]:
    """`n` calls of `fn(arg)` per benchmarked call, so the harness's own per-call cost (a few
    hundred ns of `*args` handling and timer reads) does not swamp sub-microsecond work. The loop
    costs ~10 ns per call, much like a caller's own code would. Returns the last result."""
    loop = range(n)

    def run() -> Any:
        result = None
        for _ in loop:
            result = fn(arg)
        return result

    return run


def _pick_release(balancer: llmlb.Balancer, body: bytes | None, n: int) -> Callable[[], bool]:
    """`n` times pick(body) + release(ticket) per benchmarked call."""
    pick, release = balancer.pick, balancer.release
    loop = range(n)

    def run() -> bool:
        released = False
        for _ in loop:
            released = release(pick(body).ticket)
        return released

    return run


def _assert_settled(balancer: llmlb.Balancer, n: int) -> None:
    assert balancer.open_tickets == 0
    views = balancer.endpoints()
    assert len(views) == n
    assert all(inflight == 0 for _, inflight, *_ in views)


@pytest.mark.parametrize("n", ENDPOINT_COUNTS)
def test_pick_global_least_request(benchmark: Any, n: int) -> None:
    """pick(None) + release: no body, so the Rust side is exactly criterion's pick with no hashes."""
    balancer, addresses = _balancer("global_least_request", n)
    pick = balancer.pick(None)
    assert pick.endpoint in addresses
    assert (pick.reason, pick.prefix_depth) == ("least_request", 0)
    assert balancer.release(pick.ticket)

    benchmark.group = "pick"
    repeat = 20 if n < 100 else 2
    benchmark.extra_info.update(id=f"pick/global_least_request/{n}", endpoints=n, repeat=repeat, calls=2)
    assert benchmark(_pick_release(balancer, None, repeat)) is True

    _assert_settled(balancer, n)


@pytest.mark.parametrize("n", ENDPOINT_COUNTS)
def test_pick_prefix_cache(benchmark: Any, chat_bodies: dict[str, bytes], n: int) -> None:
    """pick(32 KB body) + release with the conversation's prefix already held by one endpoint."""
    body = chat_bodies["32KB"]
    balancer, addresses = _balancer("prefix_cache", n)
    for i in range(WARM_CONVERSATIONS):
        other = body.replace(MODEL.encode(), f"warm/model-{i:05d}".encode(), 1)
        balancer.release(balancer.pick(other).ticket)
    assert balancer.prefix_entries >= 90_000

    levels = len(llmlb.parse_request(body).prefix_hashes)
    first = balancer.pick(body)
    holder = first.endpoint
    balancer.release(first.ticket)
    pick = balancer.pick(body)
    assert (pick.endpoint, pick.reason, pick.prefix_depth) == (holder, "prefix_hit", levels)
    assert pick.endpoint in addresses
    balancer.release(pick.ticket)

    benchmark.group = "pick"
    benchmark.extra_info.update(
        id=f"pick/prefix_cache/{n}", endpoints=n, repeat=1, calls=2, **_fingerprint(body)
    )
    assert benchmark(_pick_release(balancer, body, 1)) is True

    _assert_settled(balancer, n)
    last = balancer.pick(body)
    assert (last.endpoint, last.reason, last.prefix_depth) == (holder, "prefix_hit", levels)


def test_call_overhead(benchmark: Any) -> None:
    """`release(0)`: an unknown ticket, about the least work a call can do."""
    balancer, _ = _balancer("global_least_request", 8)
    benchmark.group = "call"
    repeat = 200
    benchmark.extra_info.update(id="release/unknown_ticket", repeat=repeat, calls=1)
    assert benchmark(_repeat(balancer.release, 0, repeat)) is False
