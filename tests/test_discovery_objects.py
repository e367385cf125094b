"""How Kubernetes objects become endpoints: EndpointSlice conditions and ports, InferencePool pods.

The sources' list/watch against a real API server is tested in tests/kube/; these pin the rules
on objects shaped as the API returns them."""

from __future__ import annotations

from typing import Any

from llmlb.discovery.endpointslices import endpoints_of_slices, slice_port
from llmlb.discovery.inferencepool import endpoints_of_pods


def endpoint(
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    pod: str | None = None,
    zone: str | None = None,
) -> dict[str, Any]:
    conditions = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    item: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if pod:
        item["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "models"}
    if zone:
        item["zone"] = zone
    return item


def endpoint_slice(name: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None,
                   family: str = "IPv4") -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": name, "namespace": "models"},
        "addressType": family,
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints,
    }


def addresses(found: tuple[Any, ...]) -> list[str]:
    return [ep.address for ep in found]


def test_ready_endpoints_of_every_slice_are_the_pool() -> None:
    slices = [
        endpoint_slice("a", [endpoint("10.1.0.2", pod="vllm-0", zone="z1"), endpoint("10.1.0.1")]),
        endpoint_slice("b", [endpoint("10.1.0.3", ready=None)]),  # unset means ready (API docs)
    ]
    found = endpoints_of_slices(slices, None, {"engine": "vllm"})
    assert addresses(found) == ["10.1.0.1:8000", "10.1.0.2:8000", "10.1.0.3:8000"]
    assert dict(found[1].labels) == {"engine": "vllm", "pod": "vllm-0", "zone": "z1"}


def test_unready_and_terminating_endpoints_get_no_new_picks() -> None:
    slices = [
        endpoint_slice(
            "a",
            [
                endpoint("10.1.0.1"),
                endpoint("10.1.0.2", ready=False),
                endpoint("10.1.0.3", ready=False, serving=True, terminating=True),
            ],
        )
    ]
    assert addresses(endpoints_of_slices(slices, None, {})) == ["10.1.0.1:8000"]


def test_serving_terminating_endpoints_carry_traffic_only_when_none_is_ready() -> None:
    # The last pods of a rollout: better their remaining minutes than a 503 for everything.
    slices = [
        endpoint_slice(
            "a",
            [
                endpoint("10.1.0.2", ready=False),
                endpoint("10.1.0.3", ready=False, serving=True, terminating=True),
                endpoint("10.1.0.4", ready=False, serving=False, terminating=True),
            ],
        )
    ]
    assert addresses(endpoints_of_slices(slices, None, {})) == ["10.1.0.3:8000"]


def test_the_port_is_chosen_by_name_or_number() -> None:
    ports = [
        {"name": "http", "port": 8000},
        {"name": "metrics", "port": 9400},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    assert slice_port(ports, "metrics") == 9400
    assert slice_port(ports, 8000) == 8000
    assert slice_port(ports, "dns") is None  # UDP is not what Envoy sends requests to
    assert slice_port(ports, None) is None  # several TCP ports: ambiguous
    assert slice_port([{"port": 8000}], None) == 8000
    warnings: list[str] = []
    slices = [endpoint_slice("a", [endpoint("10.1.0.1")], ports)]
    assert addresses(endpoints_of_slices(slices, "metrics", {})) == ["10.1.0.1:9400"]
    assert endpoints_of_slices(slices, None, {}, warnings.append) == ()
    assert warnings == ["EndpointSlice a has no TCP port to use (it has several: set discovery.port)"]


def test_ipv6_slices_give_bracketed_addresses_and_fqdn_slices_are_skipped() -> None:
    slices = [
        endpoint_slice("v6", [endpoint("fd00::7")], family="IPv6"),
        endpoint_slice("names", [endpoint("vllm-0.example")], family="FQDN"),
    ]
    assert addresses(endpoints_of_slices(slices, None, {})) == ["[fd00::7]:8000"]


def pod(
    name: str,
    ip: str | None,
    *,
    ready: bool = True,
    deleting: bool = False,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "models", "labels": labels or {"app": "vllm"}}
    if annotations:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-12-05T12:00:00Z"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_ready_pods_with_an_ip_are_endpoints_once_per_target_port() -> None:
    pods = [
        pod("a", "10.2.0.1"),
        pod("b", "10.2.0.2", ready=False),
        pod("c", None),  # scheduled, no IP yet
        pod("d", "10.2.0.4", deleting=True),  # being deleted: no new picks
    ]
    assert addresses(endpoints_of_pods(pods, [8000, 8001], {})) == ["10.2.0.1:8000", "10.2.0.1:8001"]


def test_pod_labels_and_llmlb_annotations_become_endpoint_labels() -> None:
    pods = [
        pod(
            "vllm-0",
            "10.2.0.1",
            labels={"app": "vllm", "llm-d.ai/engine-type": "vllm"},
            annotations={
                "llmlb.io/models": "meta-llama/Llama-3.1-8B,lora-a",
                "prometheus.io/port": "9400",
                "unrelated.example/x": "y",
            },
        ),
        pod("sgl-0", "10.2.0.2", annotations={"llmlb.io/engine": "sglang", "llmlb.io/metrics_port": "30001"}),
    ]
    found = {ep.address: dict(ep.labels) for ep in endpoints_of_pods(pods, [8000], {"zone": "a"})}
    assert found["10.2.0.1:8000"] == {
        "zone": "a",
        "app": "vllm",
        "llm-d.ai/engine-type": "vllm",
        "models": "meta-llama/Llama-3.1-8B,lora-a",
        "metrics_port": "9400",
        "pod": "vllm-0",
    }
    assert found["10.2.0.2:8000"]["engine"] == "sglang"
    assert found["10.2.0.2:8000"]["metrics_port"] == "30001"
