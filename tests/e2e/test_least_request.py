"""global_least_request spreads concurrent requests evenly."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests.support.procs import Gateway, Reply

pytestmark = pytest.mark.e2e

CONCURRENT = 30


def test_concurrent_slow_requests_spread_evenly(lr_gateway: Gateway) -> None:
    gw = lr_gateway

    def one(i: int) -> Reply:
        messages = [{"role": "user", "content": f"concurrent request {i}"}]
        return gw.chat(messages, headers={"x-test-delay-ms": "300"}, timeout=15)

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
