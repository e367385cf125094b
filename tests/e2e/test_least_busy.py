"""least_busy through a real Envoy: routing by the servers' live Prometheus metrics.

The backends serve /metrics in each engine's exact format and take new values at run time
(`Backend.set_metrics`); the daemon scrapes every 50 ms and counts metrics older than 600 ms as
stale. Each test sets the fleet's load, waits until the daemon has scraped it (its
/debug/endpoints shows the values), then sends requests through Envoy and checks where they went.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import (
    Backend,
    Daemon,
    Envoy,
    Reply,
    get,
    metric_sum,
    post,
    start_backends,
    start_daemon,
    start_envoy,
    stop_all,
    wait_until,
)

STALE_AFTER_MS = 600
REQUESTS = 12


def _config(tmp_path: Path, name: str, **lb: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    lb_config = {"scrapeInterval": 50, "staleAfter": STALE_AFTER_MS, **lb}
    path.write_text(
        # models_refresh 0: the fake backends answer any model name these tests use (critical,
        # sheddable, adapters), while their /v1/models lists only one.
        json.dumps(
            {
                "health_check_interval": 0,
                "models_refresh": 0,
                "lb_policy": "least_busy",
                "lb_config": lb_config,
            }
        )
    )
    return path


class Fleet:
    """Backends + a least_busy daemon + Envoy (buffered unless told otherwise)."""

    def __init__(self, backends: list[Backend], daemon: Daemon, envoy: Envoy) -> None:
        self.backends = backends
        self.daemon = daemon
        self.envoy = envoy
        self.by_address = {b.address: b for b in backends}

    def chat(self, model: str = "test-model") -> Reply:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        return post(f"{self.envoy.url}/v1/chat/completions", body)

    def served(self, count: int = REQUESTS, model: str = "test-model") -> dict[str, int]:
        """Sends `count` requests one after another; how many each backend served."""
        counts = {b.name: 0 for b in self.backends}
        for _ in range(count):
            reply = self.chat(model)
            assert reply.status == 200, reply
            counts[reply.served_by or "?"] += 1
        return counts

    def views(self) -> dict[str, dict[str, Any]]:
        return {v["address"]: v for v in self.daemon.debug_endpoints()}

    def set_load(self, loads: dict[str, dict[str, Any]]) -> None:
        """Sets each named backend's metrics and waits until the daemon has scraped them all."""
        for backend in self.backends:
            if backend.name in loads:
                backend.set_metrics(**loads[backend.name])

        def scraped() -> bool:
            views = self.views()
            for backend in self.backends:
                want = loads.get(backend.name, {})
                view = views[backend.address]
                if "waiting" in want and view.get("waiting") != want["waiting"]:
                    return False
                if "kv" in want and view.get("kv_cache_usage") != pytest.approx(want["kv"]):
                    return False
            return True

        wait_until(scraped, timeout=5, message=f"the daemon scraped {loads}")

    def stop(self) -> None:
        stop_all([self.envoy.proc, self.daemon.proc, *(b.proc for b in self.backends)])


def _fleet(tmp_path: Path, name: str, engine: str = "vllm", mode: str = "buffered", **lb: Any) -> Fleet:
    backends = start_backends(3, tmp_path, prefix=f"{name}-", engine=engine)
    try:
        addresses = [b.address for b in backends]
        config = _config(tmp_path, name, **lb)
        daemon = start_daemon(
            addresses, "least_busy", tmp_path, name=name, extra_args=["--config", str(config)]
        )
        envoy = start_envoy(addresses, daemon.grpc_port, mode, tmp_path, name=f"envoy-{name}")
    except BaseException:
        stop_all(b.proc for b in backends)
        raise
    return Fleet(backends, daemon, envoy)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = _fleet(tmp_path_factory.mktemp("least_busy"), "lb", criticalModels=["gold", "sql-lora"])
    yield f
    f.stop()


def _names(fleet: Fleet) -> list[str]:
    return [b.name for b in fleet.backends]


def test_traffic_follows_the_idle_server_and_follows_it_again_when_the_load_flips(fleet: Fleet) -> None:
    a, b, c = _names(fleet)
    fleet.set_load(
        {a: {"waiting": 30, "kv": 0.9}, b: {"waiting": 0, "kv": 0.1}, c: {"waiting": 25, "kv": 0.8}}
    )
    counts = fleet.served(model="gold")
    assert counts[b] >= REQUESTS - 1, counts
    fleet.set_load({a: {"waiting": 0, "kv": 0.1}, b: {"waiting": 30, "kv": 0.9}})
    counts = fleet.served(model="gold")
    assert counts[a] >= REQUESTS - 1, counts
    samples = fleet.daemon.metrics()
    assert (
        metric_sum(samples, "llmlb_picks_total", policy="least_busy", reason="least_busy") >= 2 * REQUESTS - 2
    )


def test_sheddable_requests_get_429_when_all_are_saturated_while_critical_ones_are_routed(
    fleet: Fleet,
) -> None:
    a, b, c = _names(fleet)
    fleet.set_load({n: {"waiting": 20, "kv": 0.95} for n in (a, b, c)})
    refused = fleet.chat(model="bronze")
    assert refused.status == 429, refused
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == 429
    assert "not critical" in error["message"]
    assert fleet.chat(model="gold").status == 200, "critical models are never shed"
    assert metric_sum(fleet.daemon.metrics(), "llmlb_shed_requests_total") >= 1
    # Room again on one server: sheddable traffic goes there.
    fleet.set_load({c: {"waiting": 1, "kv": 0.3}})
    counts = fleet.served(4, model="bronze")
    assert counts[c] == 4, counts


def test_a_server_whose_metrics_fail_stops_getting_traffic_once_stale(fleet: Fleet) -> None:
    a, b, c = _names(fleet)
    fleet.set_load({a: {"waiting": 0, "kv": 0.1}, b: {"waiting": 4, "kv": 0.5}, c: {"waiting": 4, "kv": 0.5}})
    backend_a = next(x for x in fleet.backends if x.name == a)
    backend_a.set_metrics(status=500)  # its last good values said "idle"
    try:
        wait_until(lambda: fleet.views()[backend_a.address]["metrics_stale"], timeout=5,
                   message=f"{a}'s metrics go stale")  # fmt: skip
        counts = fleet.served(model="gold")
        assert counts[a] == 0, counts
        view = fleet.views()[backend_a.address]
        assert "500" in (view["last_scrape_error"] or ""), view
        errors = metric_sum(
            fleet.daemon.metrics(), "llmlb_metrics_scrape_errors_total", endpoint=backend_a.address
        )
        assert errors >= 1
    finally:
        backend_a.set_metrics(status=200)


def test_debug_endpoints_show_the_last_values_and_their_age(fleet: Fleet) -> None:
    a = _names(fleet)[0]
    fleet.set_load({a: {"waiting": 3, "kv": 0.25, "running": 2}})
    view = fleet.views()[next(x for x in fleet.backends if x.name == a).address]
    assert (view["waiting"], view["kv_cache_usage"], view["running"]) == (3, pytest.approx(0.25), 2)
    assert 0 <= view["metrics_age_seconds"] < STALE_AFTER_MS / 1000
    assert view["engine"] == "vllm"
    assert view["metrics_stale"] is False


def test_garbage_metrics_never_crash_the_daemon(fleet: Fleet) -> None:
    pages = ["<html><body>502 Bad Gateway</body></html>", "vllm:num_requests_waiting{ 1 2 3\n\x00\xff junk",
             "", "# only comments\n"]  # fmt: skip
    try:
        for page in pages:
            for backend in fleet.backends:
                backend.set_metrics(garbage=page)
            wait_until(lambda: all(v["metrics_stale"] for v in fleet.views().values()), timeout=5,
                       message="every endpoint's metrics go stale")  # fmt: skip
            # Nothing fresh anywhere: picks fall back to least in flight, and are counted.
            counts = fleet.served(3, model="gold")
            assert sum(counts.values()) == 3
            assert get(f"{fleet.daemon.admin_url}/healthz").status == 200
        samples = fleet.daemon.metrics()
        assert metric_sum(samples, "llmlb_fallbacks_total", reason="stale_metrics") >= 3
        assert metric_sum(samples, "llmlb_metrics_scrape_errors_total", reason="parse") >= 1
    finally:
        for backend in fleet.backends:
            backend.set_metrics(garbage=None)
    assert fleet.daemon.proc.running


def test_lora_requests_go_to_the_server_with_the_adapter_loaded(fleet: Fleet) -> None:
    a, b, c = _names(fleet)
    fleet.set_load({
        a: {"waiting": 0, "kv": 0.1, "max_lora": 2, "running_lora": []},
        b: {"waiting": 2, "kv": 0.3, "max_lora": 2, "running_lora": ["sql-lora"]},
        c: {"waiting": 0, "kv": 0.1, "max_lora": 2, "running_lora": ["other"]},
    })  # fmt: skip
    try:
        counts = fleet.served(model="sql-lora")
        assert counts[b] >= REQUESTS - 1, counts
        # A base-model request ignores adapters and goes by load.
        assert fleet.served(4, model="gold")[b] == 0
    finally:
        fleet.set_load({n: {"max_lora": 0, "running_lora": []} for n in (a, b, c)})


ENGINE_CASES = [("vllm-old", "buffered"), ("sglang", "full-duplex"), ("trtllm-serve", "buffered"),
                ("triton", "buffered")]  # fmt: skip


@pytest.mark.parametrize(("engine", "mode"), ENGINE_CASES)
def test_every_engine_format_routes_to_the_idle_server(tmp_path: Path, engine: str, mode: str) -> None:
    f = _fleet(tmp_path, engine.replace("-", ""), engine=engine, mode=mode)
    try:
        a, b, c = _names(f)
        f.set_load(
            {a: {"waiting": 9, "kv": 0.7}, b: {"waiting": 8, "kv": 0.6}, c: {"waiting": 0, "kv": 0.05}}
        )
        counts = f.served()
        assert counts[c] >= REQUESTS - 1, counts
        assert f.views()[f.backends[0].address]["engine"] == engine.removesuffix("-old")
    finally:
        f.stop()


def test_a_slow_metrics_endpoint_delays_only_its_own_scrapes(tmp_path: Path) -> None:
    backends = start_backends(2, tmp_path, prefix="slow-")
    slow, fast = backends
    config = _config(tmp_path, "slow", scrapeTimeout=200)
    daemon = start_daemon([b.address for b in backends], "least_busy", tmp_path, name="slow",
                          extra_args=["--config", str(config)])  # fmt: skip
    try:
        slow.set_metrics(delay_ms=1500)
        for b in backends:
            b.reset()
        wait_until(
            lambda: fast.stats()["metrics_scrapes"] >= 20, timeout=10, message="the fast endpoint is scraped"
        )
        fast_count, slow_count = fast.stats()["metrics_scrapes"], slow.stats()["metrics_scrapes"]
        # At most one scrape of an endpoint is in flight: the slow one is asked about once per
        # 200 ms timeout (+50 ms interval), not every 50 ms.
        assert slow_count <= fast_count / 3, (slow_count, fast_count)
        timeouts = metric_sum(daemon.metrics(), "llmlb_metrics_scrape_errors_total", reason="timeout")
        assert timeouts >= 1
        views = {v["address"]: v for v in daemon.debug_endpoints()}
        assert views[slow.address]["metrics_stale"] is True
        assert views[fast.address]["metrics_stale"] is False
    finally:
        stop_all([daemon.proc, *(b.proc for b in backends)])


def test_workers_scrape_and_route_by_load_too(tmp_path: Path) -> None:
    backends = start_backends(3, tmp_path, prefix="w-")
    config = _config(tmp_path, "workers")
    addresses = [b.address for b in backends]
    daemon = start_daemon(addresses, "least_busy", tmp_path, name="workers",
                          extra_args=["--config", str(config), "--workers", "2"])  # fmt: skip
    envoy = start_envoy(addresses, daemon.grpc_port, "buffered", tmp_path, name="envoy-workers")
    fleet = Fleet(backends, daemon, envoy)
    try:
        a, b, c = _names(fleet)
        fleet.set_load(
            {a: {"waiting": 20, "kv": 0.9}, b: {"waiting": 0, "kv": 0.1}, c: {"waiting": 20, "kv": 0.9}}
        )
        counts = fleet.served()
        assert counts[b] >= REQUESTS - 1, counts
        # Worker 0 scrapes for both (the loads reach worker 1 through the shared state): each
        # server is scraped once per 50 ms interval, not once per worker.
        assert metric_sum(daemon.metrics(), "llmlb_workers") == 2
        for backend in backends:
            backend.reset()
        started = time.monotonic()
        time.sleep(2.0)
        elapsed = time.monotonic() - started
        for backend in backends:
            scrapes = backend.stats()["metrics_scrapes"]
            assert 0.6 * elapsed / 0.05 <= scrapes <= 1.3 * elapsed / 0.05 + 2, (backend.name, scrapes)
    finally:
        fleet.stop()
