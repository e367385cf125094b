"""The generated gateway routes only the inference API, and Envoy's own error replies carry the
OpenAI error shape while the picker's own replies keep their body (real Envoy 1.40, both modes)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.procs import HOST, Gateway, MakeGateway, Reply, free_port, http_request, metric_sum

pytestmark = pytest.mark.e2e

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "routes"}]}

# Paths the model servers answer but that are not the inference API (metrics, the simulator's
# controls, health), plus spellings that try to reach around the /v1/ prefix.
UNROUTED = [
    ("GET", "/metrics"),
    ("POST", "/_sim/reset"),
    ("GET", "/health"),
    ("GET", "/"),
    ("POST", "/v1"),
    ("GET", "/v1/../metrics"),
    ("GET", "/v1/%2E%2E/metrics"),
    ("GET", "//metrics"),
    ("GET", "/V1/models"),
]


def assert_openai_error(reply: Reply, status: int, error_type: str | None = None) -> dict[str, object]:
    assert reply.status == status, reply
    assert reply.headers.get("content-type") == "application/json", reply.headers
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["code"] == status
    assert isinstance(error["message"], str)
    if error_type is not None:
        assert error["type"] == error_type, error
    return error  # type: ignore[no-any-return]


def backend_paths(gw: Gateway) -> dict[str, int]:
    totals: dict[str, int] = {}
    for b in gw.backends:
        for key, n in b.stats()["by_path"].items():
            totals[key] = totals.get(key, 0) + n
    return totals


def picker_streams(gw: Gateway) -> float:
    assert gw.daemon is not None
    return metric_sum(gw.daemon.metrics(), "llmlb_extproc_streams_total")


def test_only_the_inference_api_is_routed(lr_gateway: Gateway) -> None:
    gw = lr_gateway
    streams = picker_streams(gw)
    for method, path in UNROUTED:
        reply = http_request(method, gw.url + path, body={} if method == "POST" else None, timeout=5)
        error = assert_openai_error(reply, 404, "invalid_request_error")
        assert "no route for" in str(error["message"]), error
        assert "/v1/" in str(error["message"])
    # Envoy answered itself: no backend saw any of them, and the picker was never asked.
    assert backend_paths(gw) == {}
    assert picker_streams(gw) == streams
    assert gw.daemon is not None
    assert all(v == 0 for v in gw.daemon.inflight().values())
    # The inference API still goes through the picker to a backend.
    reply = gw.post("/v1/chat/completions", CHAT)
    assert reply.status == 200, reply
    models = http_request("GET", gw.url + "/v1/models", timeout=5)
    assert models.status == 200, models
    assert models.json()["object"] == "list"
    assert picker_streams(gw) == streams + 2


@pytest.mark.parametrize("mode", ["buffered"])
def test_route_prefix_slash_forwards_everything(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("global_least_request", mode, envoy_args=["--route-prefix", "/"])
    metrics = http_request("GET", gw.url + "/metrics", timeout=5)
    assert metrics.status == 200, metrics
    assert "vllm:num_requests_waiting" in metrics.text()
    other = http_request("POST", gw.url + "/_sim/reset", body={}, timeout=5)
    assert other.status == 404, other  # the backend's own 404: it got there
    assert other.json()["served_by"] in {b.name for b in gw.backends}
    assert backend_paths(gw) == {"GET /metrics": 1, "POST /_sim/reset": 1}


def test_several_route_prefixes(make_gateway: MakeGateway) -> None:
    gw = make_gateway(
        "global_least_request", "buffered", envoy_args=["--route-prefix", "/v1/", "--route-prefix", "/health"]
    )
    assert http_request("GET", gw.url + "/health", timeout=5).status == 200
    assert gw.post("/v1/chat/completions", CHAT).status == 200
    assert_openai_error(http_request("GET", gw.url + "/metrics", timeout=5), 404, "invalid_request_error")
    assert "GET /metrics" not in backend_paths(gw)


def test_body_over_the_limit_is_a_413_json_error(make_gateway: MakeGateway) -> None:
    # Buffered mode only: full-duplex streams bodies and Envoy sets no limit there.
    gw = make_gateway("global_least_request", "buffered", max_body_bytes=4096)
    big = {"model": "test-model", "messages": [{"role": "user", "content": "x" * 8192}]}
    error = assert_openai_error(gw.post("/v1/chat/completions", big), 413, "invalid_request_error")
    assert "4096 bytes" in str(error["message"])
    assert all(b.stats()["total"] == 0 for b in gw.backends)
    assert gw.post("/v1/chat/completions", CHAT).status == 200


def test_picker_down_is_a_500_json_error(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("global_least_request", mode, daemon=False)
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/models", None)):
        reply = http_request("POST" if body else "GET", gw.url + path, body=body, timeout=5)
        error = assert_openai_error(reply, 500, "server_error")
        assert "picker" in str(error["message"])
    assert all(b.stats()["total"] == 0 for b in gw.backends)


def test_the_pickers_own_429_keeps_its_body(make_gateway: MakeGateway, mode: str, tmp_path: Path) -> None:
    config = tmp_path / "max-request-count.yaml"
    config.write_text(json.dumps({"lb_policy": "global_least_request", "lb_config": {"maxRequestCount": 1}}))
    gw = make_gateway("global_least_request", mode, daemon_args=["--config", str(config)])
    assert gw.daemon is not None
    slow_headers = {"x-test-delay-ms": "2000"}
    with ThreadPoolExecutor(len(gw.backends)) as pool:
        slow = [pool.submit(gw.post, "/v1/chat/completions", CHAT, slow_headers, 10) for _ in gw.backends]
        deadline = time.monotonic() + 5
        while sum(gw.daemon.inflight().values()) < len(gw.backends):
            assert time.monotonic() < deadline, gw.daemon.inflight()
            time.sleep(0.05)
        reply = gw.post("/v1/chat/completions", CHAT, timeout=5)
        assert [f.result(timeout=10).status for f in slow] == [200] * len(gw.backends)
    error = assert_openai_error(reply, 429, "rate_limit_exceeded")
    # Exactly the picker's body (its message, its retry-after), not Envoy's rewrite of it.
    assert str(error["message"]).startswith("llmlb: "), error
    assert "maxRequestCount" in str(error["message"])
    assert reply.headers.get("retry-after") == "1"


def test_upstream_connect_failure_is_a_503_json_error(make_gateway: MakeGateway, tmp_path: Path) -> None:
    # A picked endpoint that refuses connections: Envoy's own 503 (UF), in the OpenAI shape.
    dead = f"{HOST}:{free_port()}"
    config = tmp_path / "dead.yaml"
    config.write_text(json.dumps({"health_check_interval": 0}))
    gw = make_gateway(
        "global_least_request", "buffered", daemon_args=["--config", str(config), "--endpoints", dead]
    )
    error = assert_openai_error(gw.post("/v1/chat/completions", CHAT, timeout=5), 503, "service_unavailable")
    assert "upstream connect error" in str(error["message"])
