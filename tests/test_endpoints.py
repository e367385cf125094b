"""Endpoint discovery (static + file, reloaded on change) and TCP health probing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from llmlb import Balancer
from llmlb.endpoints import EndpointManager
from llmlb.metrics import Metrics


def manager(balancer: Balancer, *, static=(), endpoints_file=None) -> EndpointManager:
    from llmlb.config import parse_endpoints

    return EndpointManager(
        balancer,
        Metrics(lambda: []),
        static=parse_endpoints(list(static), "endpoints"),
        endpoints_file=endpoints_file,
        health_interval_ms=0,
        health_timeout_ms=500,
    )


def pool(balancer: Balancer) -> list[str]:
    return [address for address, _, _, _, in_pool, _ in balancer.endpoints() if in_pool]


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_file_endpoints_merge_with_static_and_reload_on_change(tmp_path):
    eps = tmp_path / "eps.yaml"
    eps.write_text("endpoints: [10.0.0.2:80, {address: 10.0.0.3:80, labels: {engine: vllm}}]\n")
    b = Balancer("global_least_request")
    m = manager(b, static=["10.0.0.1:80", "10.0.0.2:80"], endpoints_file=str(eps))
    m.load_initial()
    assert pool(b) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    assert m.labels["10.0.0.3:80"] == {"engine": "vllm"}
    assert not m.reload_if_changed()

    eps.write_text("- 10.0.0.4:80\n")
    bump_mtime(eps)
    assert m.reload_if_changed()
    assert pool(b) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80"]
    assert m.metrics.endpoints_reloads.get(("ok",)) == 1


def test_a_broken_file_keeps_the_last_good_pool(tmp_path):
    eps = tmp_path / "eps.yaml"
    eps.write_text("- 10.0.0.1:80\n")
    b = Balancer("prefix_cache")
    m = manager(b, endpoints_file=str(eps))
    m.load_initial()
    for broken in ("- not-an-endpoint\n", "endpoints: [unclosed\n", "{other: 1}\n"):
        eps.write_text(broken)
        bump_mtime(eps)
        assert not m.reload_if_changed()
        assert pool(b) == ["10.0.0.1:80"]
    assert m.metrics.endpoints_reloads.get(("error",)) == 3
    eps.unlink()
    assert not m.reload_if_changed()
    assert pool(b) == ["10.0.0.1:80"]


def test_requests_in_flight_survive_removal(tmp_path):
    eps = tmp_path / "eps.yaml"
    eps.write_text("- 10.0.0.1:80\n")
    b = Balancer("global_least_request")
    m = manager(b, endpoints_file=str(eps))
    m.load_initial()
    pick = b.pick(b'{"prompt": "x"}')
    ticket, endpoint = pick.ticket, pick.endpoint
    eps.write_text("- 10.0.0.2:80\n")
    bump_mtime(eps)
    m.reload_if_changed()
    # Still counted after it left the pool, until it ends.
    assert ("10.0.0.1:80", 1, 1, True, False) in [v[:5] for v in b.endpoints()]
    assert b.release(ticket)
    assert all(address != "10.0.0.1:80" for address, *_ in b.endpoints())
    assert endpoint == "10.0.0.1:80"


@pytest.mark.timeout(30)
def test_health_probes_mark_down_after_two_failures_and_up_after_one_success():
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        live = f"127.0.0.1:{port}"
        b = Balancer("global_least_request")
        m = manager(b, static=[live])
        m.load_initial()
        await m.check_health_once()
        assert m.healthy[live]
        server.close()
        await server.wait_closed()
        await m.check_health_once()
        assert m.healthy[live], "one failure is not enough"
        await m.check_health_once()
        assert not m.healthy[live]
        assert b.endpoints()[0][3] is False
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        await m.check_health_once()
        assert m.healthy[live]
        assert b.endpoints()[0][3] is True
        assert m.metrics.endpoint_health_changes.get((live, "unhealthy")) == 1
        assert m.metrics.endpoint_health_changes.get((live, "healthy")) == 1
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
