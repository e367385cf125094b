"""``discovery.kind: kubernetes`` against a real API server: a Service's EndpointSlices, listed and
watched by `llmlb serve` with a token that may do nothing but list and watch them.

EndpointSlice addresses may not be loopback, so these endpoints are data only (10.x, never
connected to: health checks and model listing are off); traffic through Envoy to discovered pods
is tests/kube/test_discovery_inferencepool.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube import KubeApi, KubeCluster, endpointslices_path
from tests.support.procs import Daemon, metric_sum, start_daemon, wait_until

# Every change must show in the picker's pool within this long (the issue's bound).
REFLECTED_WITHIN_S = 2.0
# The rights `discovery.kind: kubernetes` needs (docs/kubernetes.md#rbac).
SLICE_RULES = [
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
]


def grant(
    api: KubeApi, namespace: str, name: str, rules: list[dict[str, Any]], user: str = "limited"
) -> None:
    """A Role with ``rules`` bound to ``user`` (the cluster's token without groups)."""
    api.create(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": rules,
        },
    )
    api.create(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        },
    )


def wait_for_pool(daemon: Daemon, expected: list[str], what: str) -> float:
    """Waits until the picker's pool is exactly ``expected``; returns how long that took."""
    started = time.monotonic()
    daemon.wait_for_pool(expected, what, REFLECTED_WITHIN_S)
    return time.monotonic() - started


def start_picker(tmp_path: Path, discovery_config: dict[str, Any], name: str = "llmlb-k8s") -> Daemon:
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "discovery": discovery_config,
                "health_check_interval": 0,
                "models_refresh": 0,
                "passive_probe_after": 0,
            }
        )
    )
    return start_daemon([], "prefix_cache", tmp_path, name=name, extra_args=["--config", str(config)])


@pytest.fixture
def picker_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(discovery_config: dict[str, Any], name: str = "llmlb-k8s") -> Daemon:
        daemon = start_picker(tmp_path, discovery_config, name)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


def slice_endpoints(*items: tuple[str, bool, bool, bool]) -> list[tuple[str, bool, bool, bool]]:
    return list(items)


def test_endpointslices_are_followed_with_only_list_and_watch_rights(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str, tmp_path: Path, picker_factory: Any
) -> None:
    ns = kube_namespace
    grant(
        kube_api,
        ns,
        "llmlb",
        SLICE_RULES,
    )
    kube_api.create_service(ns, "vllm", None, [("http", 8000), ("metrics", 9400)])
    kube_api.create_endpointslice(
        ns,
        "vllm-a",
        "vllm",
        [("10.0.1.1", True, True, False), ("10.0.1.2", False, False, False)],
        [("http", 8000), ("metrics", 9400)],
    )
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "limited.kubeconfig", kube_cluster.limited_token)
    picker = picker_factory(
        {
            "kind": "kubernetes",
            "namespace": ns,
            "service": "vllm",
            "port": "http",
            "kubeconfig": str(kubeconfig),
            "labels": {"engine": "vllm"},
        }
    )
    # Ready at start: the first list happened before /readyz said so.
    view = picker.debug_discovery()
    assert view["addresses"] == ["10.0.1.1:8000"], view
    assert view["up"] is True, view
    assert view["kind"] == "kubernetes"
    endpoints = {e["address"]: e for e in picker.debug_endpoints()}
    assert endpoints["10.0.1.1:8000"]["labels"] == {"engine": "vllm"}

    took: dict[str, float] = {}
    path = endpointslices_path(ns, "vllm-a")

    def set_endpoints(*items: tuple[str, bool, bool, bool]) -> None:
        def change(obj: dict[str, Any]) -> None:
            obj["endpoints"] = [
                {"addresses": [ip], "conditions": {"ready": r, "serving": s, "terminating": t}}
                for ip, r, s, t in items
            ]

        kube_api.update(path, change)

    set_endpoints(("10.0.1.1", True, True, False), ("10.0.1.2", True, True, False))
    took["turns ready"] = wait_for_pool(
        picker, ["10.0.1.1:8000", "10.0.1.2:8000"], "an endpoint turning ready"
    )

    kube_api.create_endpointslice(ns, "vllm-b", "vllm", [("10.0.1.3", True, True, False)], [("http", 8000)])
    took["second slice"] = wait_for_pool(
        picker, ["10.0.1.1:8000", "10.0.1.2:8000", "10.0.1.3:8000"], "a second slice"
    )

    # Terminating (ready false, still serving): no new picks while others are ready.
    set_endpoints(("10.0.1.1", True, True, False), ("10.0.1.2", False, True, True))
    took["terminating"] = wait_for_pool(picker, ["10.0.1.1:8000", "10.0.1.3:8000"], "a terminating endpoint")

    kube_api.delete(endpointslices_path(ns, "vllm-b"))
    took["slice deleted"] = wait_for_pool(picker, ["10.0.1.1:8000"], "a deleted slice")

    # Another service's slices in the same namespace are not ours.
    kube_api.create_endpointslice(ns, "other-a", "other", [("10.0.9.9", True, True, False)], [("http", 8000)])
    time.sleep(0.3)
    assert picker.debug_discovery()["addresses"] == ["10.0.1.1:8000"]
    print("reflected after: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items()))


def test_an_api_server_outage_keeps_the_last_set_and_says_so(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str, tmp_path: Path, picker_factory: Any
) -> None:
    ns = kube_namespace
    kube_api.create_service(ns, "vllm", None, [("http", 8000)])
    kube_api.create_endpointslice(ns, "vllm-a", "vllm", [("10.0.2.1", True, True, False)], [("http", 8000)])
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "admin.kubeconfig")
    picker = picker_factory(
        {"kind": "kubernetes", "namespace": ns, "service": "vllm", "kubeconfig": str(kubeconfig)}
    )
    assert picker.debug_discovery()["addresses"] == ["10.0.2.1:8000"]
    errors_before = metric_sum(picker.metrics(), "llmlb_discovery_errors_total", kind="kubernetes")

    kube_cluster.stop_apiserver()
    try:
        wait_until(
            lambda: picker.debug_discovery()["up"] is False,
            5.0,
            interval=0.05,
            message="discovery to report down",
        )
        view = picker.debug_discovery()
        assert view["addresses"] == ["10.0.2.1:8000"], view  # the last known set stays
        assert view["last_error"], view
        samples = picker.metrics()
        assert metric_sum(samples, "llmlb_discovery_up", kind="kubernetes") == 0
        assert metric_sum(samples, "llmlb_discovery_errors_total", kind="kubernetes") > errors_before
        assert metric_sum(samples, "llmlb_discovery_endpoints", kind="kubernetes") == 1
    finally:
        kube_cluster.start_apiserver()

    # Back: a change made now shows within the bound, and the source reports up again.
    kube_api.create_endpointslice(ns, "vllm-b", "vllm", [("10.0.2.2", True, True, False)], [("http", 8000)])
    took = wait_for_pool(
        picker, ["10.0.2.1:8000", "10.0.2.2:8000"], "a change after the API server restarted"
    )
    assert picker.debug_discovery()["up"] is True
    assert metric_sum(picker.metrics(), "llmlb_discovery_up", kind="kubernetes") == 1
    print(f"after the restart, a change showed in {took * 1000:.0f} ms")


def test_missing_rights_are_reported_not_fatal(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str, tmp_path: Path, picker_factory: Any
) -> None:
    # A token without the Role: the picker starts (after its first-sync wait), empty, and says why.
    ns = kube_namespace
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "limited.kubeconfig", kube_cluster.limited_token)
    started = time.monotonic()
    picker = picker_factory(
        {"kind": "kubernetes", "namespace": ns, "service": "vllm", "kubeconfig": str(kubeconfig)}
    )
    view = picker.debug_discovery()
    assert view["up"] is False, view
    assert "403" in view["last_error"], view
    assert view["addresses"] == []
    print(f"started without rights after {time.monotonic() - started:.1f} s")
    # Granting the rights later is enough: the retries pick it up.
    grant(
        kube_api,
        ns,
        "llmlb",
        SLICE_RULES,
    )
    kube_api.create_endpointslice(ns, "vllm-a", "vllm", [("10.0.3.1", True, True, False)], [("http", 8000)])
    wait_until(
        # Refusals (403) are asked again less and less often, at most every 5 s.
        lambda: picker.debug_discovery()["addresses"] == ["10.0.3.1:8000"],
        10.0,
        message="rights granted later",
    )
    assert picker.debug_discovery()["up"] is True


def test_a_kubeconfig_that_cannot_be_loaded_is_a_config_error(tmp_path: Path) -> None:
    from tests.support.procs import run_llmlb

    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {"discovery": {"kind": "kubernetes", "service": "vllm", "kubeconfig": str(tmp_path / "nope")}}
        )
    )
    result = run_llmlb(
        "serve", "--config", str(config), "--grpc-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"
    )
    assert result.returncode == 2, result
    assert "discovery.kubeconfig" in result.stderr
    assert "Traceback" not in result.stderr
