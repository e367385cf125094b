"""Envoy routes where the picker says, in both Envoy modes."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.support.procs import Gateway

pytestmark = pytest.mark.e2e


def test_debug_view_lists_the_endpoints(lr_gateway: Gateway) -> None:
    assert lr_gateway.daemon is not None
    view = lr_gateway.daemon.debug_endpoints()
    assert sorted(e["address"] for e in view) == sorted(b.address for b in lr_gateway.backends)
    for entry in view:
        assert entry["healthy"] is True, entry
        assert entry["inflight"] == 0, entry
        assert entry["local_inflight"] == 0, entry


def test_served_by_matches_the_pick(lr_gateway: Gateway) -> None:
    gw = lr_gateway
    seen: Counter[str] = Counter()
    before = gw.picks()
    for i in range(24):
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        body = (
            {"model": "test-model", "messages": [{"role": "user", "content": f"routing check {i}"}]}
            if i % 2
            else {"model": "test-model", "prompt": f"routing check {i}"}
        )
        reply = gw.post(path, body)
        assert reply.status == 200, reply
        after = gw.picks()
        grown = {ep: n - before.get(ep, 0) for ep, n in after.items() if n != before.get(ep, 0)}
        assert grown == {gw.address_of(reply.served_by): 1}, f"request {i}: served by {reply.served_by}"
        before = after
        seen[str(reply.served_by)] += 1
    assert set(seen) == {b.name for b in gw.backends}, f"sequential picks never reached some backend: {seen}"
    assert {b.name: b.stats()["total"] for b in gw.backends} == dict(seen)
