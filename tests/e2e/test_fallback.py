"""With --fallback, a dead picker degrades to Envoy's own load balancing; without, it fails."""

from __future__ import annotations

import pytest

from tests.support.procs import DEST_HEADER, MODES, MakeGateway

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("picker", ["stopped", "never_started"])
def test_fallback_round_robin_survives_the_picker(make_gateway: MakeGateway, picker: str) -> None:
    # BUFFERED only: with FULL_DUPLEX, Envoy's fail-open is racy when the picker is unreachable.
    gw = make_gateway("global_least_request", "buffered", fallback="round_robin", daemon=picker == "stopped")
    if gw.daemon is not None:
        before = gw.picks()
        reply = gw.chat([{"role": "user", "content": "picker up"}])
        assert reply.status == 200, reply
        picked = gw.address_of(reply.served_by)
        assert gw.picks().get(picked, 0) == before.get(picked, 0) + 1
        assert gw.daemon.stop() == 0
    # Failing open must not hand routing to the client: the spoofed header is stripped.
    spoof = {DEST_HEADER: gw.backends[0].address}
    replies = [gw.chat([{"role": "user", "content": f"picker down {i}"}], spoof, timeout=5) for i in range(6)]
    assert [r.status for r in replies] == [200] * 6, replies
    assert len({r.served_by for r in replies}) >= 2, f"not round robin: {[r.served_by for r in replies]}"


@pytest.mark.parametrize("mode", MODES)
def test_strict_without_picker_fails(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("global_least_request", mode, daemon=False)
    for i in range(3):
        reply = gw.chat([{"role": "user", "content": f"no picker {i}"}], timeout=5)
        assert reply.status >= 500, reply
    assert all(b.stats()["total"] == 0 for b in gw.backends)
