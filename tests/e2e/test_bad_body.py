"""Bodies the picker cannot read are still routed by load, and counted."""

from __future__ import annotations

import pytest

from tests.support.procs import Gateway, get, metric_sum

pytestmark = pytest.mark.e2e

BAD_BODIES = {
    "not_json": b"this is { not json",
    "invalid_utf8": b'{"model": "test-model", "messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}',
    "no_messages": b'{"model": "test-model", "temperature": 0.5}',
    "wrong_types": b'{"model": "test-model", "messages": "should be a list"}',
}


def bad_body_count(gw: Gateway) -> float:
    assert gw.daemon is not None
    return metric_sum(gw.daemon.metrics(), "llmlb_fallbacks_total", reason="bad_body")


@pytest.mark.parametrize("kind", BAD_BODIES)
def test_bad_body_is_routed_and_counted(pc_gateway: Gateway, kind: str) -> None:
    before = bad_body_count(pc_gateway)
    reply = pc_gateway.post("/v1/chat/completions", BAD_BODIES[kind])
    assert reply.status == 200, reply
    assert reply.served_by in {b.name for b in pc_gateway.backends}
    assert bad_body_count(pc_gateway) == before + 1


def test_good_bodies_are_not_counted_as_bad(pc_gateway: Gateway) -> None:
    before = bad_body_count(pc_gateway)
    assert (
        pc_gateway.post("/v1/completions", {"model": "test-model", "prompt": "a fine prompt"}).status == 200
    )
    assert pc_gateway.chat([{"role": "user", "content": "a fine message"}]).status == 200
    assert bad_body_count(pc_gateway) == before


def test_bodyless_get_is_routed(pc_gateway: Gateway) -> None:
    # (GET /v1/models is answered by the picker itself: another path the backends do not know.)
    reply = get(pc_gateway.url + "/v1/files", timeout=10)
    assert reply.status == 404, reply
    assert reply.json()["served_by"] in {b.name for b in pc_gateway.backends}
