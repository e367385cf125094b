"""global_least_request spreads concurrent requests evenly."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.procs import Gateway, Reply, wait_until

pytestmark = pytest.mark.e2e

CONCURRENT = 30


def test_concurrent_slow_requests_spread_evenly(lr_gateway: Gateway) -> None:
    gw = lr_gateway

    def one(i: int) -> Reply:
        messages = [{"role": "user", "content": f"concurrent request {i}"}]
        return gw.chat(messages, headers={"x-test-delay-ms": "400"}, timeout=15)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        replies = list(pool.map(one, range(CONCURRENT)))
    assert [r.status for r in replies] == [200] * CONCURRENT, [r for r in replies if r.status != 200]
    counts = Counter(r.served_by for r in replies)
    share = CONCURRENT // len(gw.backends)
    for b in gw.backends:
        stats = b.stats()
        assert share - 1 <= counts[b.name] <= share + 1, f"uneven spread {dict(counts)}"
        assert stats["total"] == counts[b.name]
        assert stats["max_concurrent"] <= share + 1, f"{b.name} saw {stats['max_concurrent']} at once"
    assert gw.daemon is not None
    gw.daemon.wait_idle(5.0)


def test_busy_backends_get_no_new_requests(lr_gateway: Gateway) -> None:
    """Two long requests occupy two backends; short requests meanwhile all go to the idle third."""
    gw = lr_gateway
    with ThreadPoolExecutor(2) as pool:
        slow = [
            pool.submit(gw.chat, [{"role": "user", "content": f"long {i}"}], {"x-test-delay-ms": "1200"}, 10)
            for i in range(2)
        ]

        def two_busy() -> set[str] | None:
            names = {b.name for b in gw.backends if b.stats()["concurrent"] == 1}
            return names if len(names) == 2 else None

        busy = wait_until(two_busy, 5.0, message="the two long requests to occupy two different backends")
        (idle,) = {b.name for b in gw.backends} - busy
        for i in range(6):
            reply = gw.chat([{"role": "user", "content": f"short {i}"}])
            assert reply.status == 200, reply
            assert reply.served_by == idle, f"short request {i} went to busy {reply.served_by}"
        assert [f.result(timeout=10).status for f in slow] == [200, 200]
