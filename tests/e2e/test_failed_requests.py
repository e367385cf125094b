"""Requests that fail claim no prefix entries, and one request claims a bounded number.

Reproduction: 25 large requests that the server refused (400) were recorded as prefixes and, in
a small table, displaced a live conversation's affinity.
"""

from __future__ import annotations

import pytest

from tests.support.conversations import conversation
from tests.support.procs import Gateway, MakeGateway, metric_sum, wait_until

pytestmark = pytest.mark.e2e


def turns(n: int) -> list[dict[str, str]]:
    return conversation(n, "failed requests")


def prefix_hits(gw: Gateway) -> float:
    assert gw.daemon is not None
    return metric_sum(gw.daemon.metrics(), "llmlb_picks_total", reason="prefix_hit")


def test_refused_requests_leave_no_prefix_entries(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("prefix_cache", mode)
    daemon = gw.daemon
    assert daemon is not None
    home = gw.chat(turns(1)).served_by
    assert gw.chat(turns(2)).served_by == home
    entries = metric_sum(gw.daemon.metrics(), "llmlb_prefix_table_entries")
    # 25 oversized prompts (about 1 MB, 2,000 blocks each) that the servers refuse.
    for i in range(25):
        big = [{"role": "user", "content": f"document {i}: " + f"lorem {i} ipsum " * 60_000}]
        reply = gw.chat(big, headers={"x-test-status": "400"}, timeout=30)
        assert reply.status == 400, reply
    # The picker releases a request when its stream ends, just after the client has the answer.
    wait_until(
        lambda: metric_sum(daemon.metrics(), "llmlb_prefix_table_entries") == entries,
        5.0,
        message="the refused requests' prefix entries to be taken back",
    )
    hits = prefix_hits(gw)
    reply = gw.chat(turns(3))
    assert reply.status == 200
    assert reply.served_by == home
    assert prefix_hits(gw) == hits + 1, "the conversation's next turn still finds its prefix"


def test_one_request_claims_at_most_max_prefix_blocks(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("prefix_cache", mode, daemon_config={"lb_config": {"maxPrefixBlocks": 16}})
    assert gw.daemon is not None
    before = metric_sum(gw.daemon.metrics(), "llmlb_prefix_table_entries")
    long_prompt = [{"role": "user", "content": "x" * 200_000}]  # about 400 blocks of 512 bytes
    assert gw.chat(long_prompt).status == 200
    after = metric_sum(gw.daemon.metrics(), "llmlb_prefix_table_entries")
    assert 0 < after - before <= 16
