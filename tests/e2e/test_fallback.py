"""With --fallback, a dead picker degrades to Envoy's own load balancing; without, it fails."""

from __future__ import annotations

import pytest
from tests.support.procs import MODES, MakeGateway

pytestmark = pytest.mark.e2e


def test_fallback_round_robin_survives_the_picker(make_gateway: MakeGateway) -> None:
    # BUFFERED only: with FULL_DUPLEX, Envoy's fail-open is racy when the picker is unreachable.
    gw = make_gateway("global_least_request", "buffered", fallback="round_robin")
    assert gw.daemon is not None
    before = gw.picks()
    reply = gw.chat([{"role": "user", "content": "picker up"}])
    assert reply.status == 200, reply
    assert (
        gw.picks().get(gw.address_of(reply.served_by), 0) == before.get(gw.address_of(reply.served_by), 0) + 1
    )
    assert gw.daemon.stop() == 0
    replies = [gw.chat([{"role": "user", "content": f"picker down {i}"}], timeout=5) for i in range(6)]
    assert [r.status for r in replies] == [200] * 6, replies
    assert len({r.served_by for r in replies}) >= 2, "round robin should use more than one backend"


@pytest.mark.parametrize("mode", MODES)
def test_strict_without_picker_fails(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("global_least_request", mode, daemon=False)
    for i in range(3):
        reply = gw.chat([{"role": "user", "content": f"no picker {i}"}], timeout=5)
        assert reply.status >= 500, reply
    assert all(b.stats()["total"] == 0 for b in gw.backends)
