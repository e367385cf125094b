"""The Kubernetes test harness itself: a real API server that enforces RBAC, validates CRDs, keeps
its objects across restarts and serves kubectl and the Python client from the written kubeconfig."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube import (
    KUBE_VERSION,
    KubeApi,
    KubeApiError,
    KubeCluster,
    endpointslices_path,
    inferencepools_path,
    pods_path,
)
from tests.support.procs import wait_until


def _condition(pod: dict[str, Any], kind: str) -> str | None:
    for condition in pod.get("status", {}).get("conditions", []):
        if condition["type"] == kind:
            return str(condition["status"])
    return None


def test_apiserver_ready_and_version(kube_cluster: KubeCluster, kube_api: KubeApi) -> None:
    reply = kube_api.request("GET", "/readyz")
    assert (reply.status, reply.body) == (200, b"ok")
    version = kube_api.version()
    assert version["gitVersion"] == KUBE_VERSION
    assert (version["major"], version["minor"]) == ("1", "37")
    assert kube_cluster.url == f"https://127.0.0.1:{kube_cluster.port}"
    # The session's cluster came up within the readiness bound (~3 s on 2 cores).
    assert 0 < kube_cluster.startup_seconds < kube_cluster.ready_timeout


def test_pod_with_loopback_ip_reads_back_ready(kube_api: KubeApi, kube_namespace: str) -> None:
    labels = {"app": "model", "pool": "p1"}
    created = kube_api.create_pod(kube_namespace, "m1", labels, {"llmlb.io/weight": "2"}, port=8000)
    assert created["status"]["phase"] == "Pending"
    assert created["metadata"]["annotations"] == {"llmlb.io/weight": "2"}

    kube_api.set_pod_status(kube_namespace, "m1", "127.0.0.5", ready=True)
    pod = kube_api.get(pods_path(kube_namespace, "m1"))
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"] == "127.0.0.5"
    assert pod["status"]["podIPs"] == [{"ip": "127.0.0.5"}]
    assert (_condition(pod, "Ready"), _condition(pod, "ContainersReady")) == ("True", "True")
    assert pod["metadata"]["labels"] == labels
    assert pod["spec"]["containers"][0]["ports"][0]["containerPort"] == 8000

    kube_api.set_pod_status(kube_namespace, "m1", "127.0.0.5", ready=False)
    assert _condition(kube_api.get(pods_path(kube_namespace, "m1")), "Ready") == "False"

    listed = kube_api.get(pods_path(kube_namespace) + "?labelSelector=pool%3Dp1")
    assert [p["metadata"]["name"] for p in listed["items"]] == ["m1"]

    kube_api.delete_pod(kube_namespace, "m1")
    assert not kube_api.exists(pods_path(kube_namespace, "m1"))


def test_rbac_is_enforced_for_the_limited_user(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str
) -> None:
    limited = kube_api.with_token(kube_cluster.limited_token)
    assert limited.request("GET", pods_path(kube_namespace)).status == 403
    # An unknown token is not authenticated at all.
    assert kube_api.with_token("not-a-token").request("GET", pods_path(kube_namespace)).status == 401

    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{kube_namespace}"
    kube_api.create(
        f"{rbac}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
    )
    kube_api.create(
        f"{rbac}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "limited-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "limited"}],
        },
    )
    # The authorizer sees new bindings through its informer: a few ms later.
    wait_until(lambda: limited.request("GET", pods_path(kube_namespace)).status == 200, 10.0,
               message="the RoleBinding to take effect")  # fmt: skip
    assert limited.request("GET", pods_path(kube_namespace) + "?watch=1&timeoutSeconds=1").status == 200
    # Only what the Role grants, only in its namespace.
    assert limited.request("GET", "/api/v1/pods").status == 403
    assert limited.request("GET", f"/api/v1/namespaces/{kube_namespace}/services").status == 403
    with pytest.raises(KubeApiError) as denied:
        limited.create_pod(kube_namespace, "nope", {"app": "x"})
    assert denied.value.status == 403
    assert denied.value.reason == "Forbidden"


def test_inferencepool_crd_validates(kube_api: KubeApi, kube_namespace: str) -> None:
    crd = kube_api.install_inferencepool_crd()
    assert crd["spec"]["names"]["kind"] == "InferencePool"
    kube_api.install_inferencepool_crd()  # idempotent

    created = kube_api.create_inferencepool(kube_namespace, "pool", {"app": "model"}, [8000, 8001])
    assert created["spec"]["targetPorts"] == [{"number": 8000}, {"number": 8001}]
    ref = kube_api.get(inferencepools_path(kube_namespace, "pool"))["spec"]["endpointPickerRef"]
    assert ref == {"group": "", "kind": "Service", "name": "llmlb", "port": {"number": 9002},
                   "failureMode": "FailClose"}  # fmt: skip

    status = {"status": {"parents": [{"parentRef": {"name": "gw"}, "conditions": []}]}}
    patched = kube_api.patch_status(inferencepools_path(kube_namespace, "pool"), status)
    assert patched["status"] == status["status"]

    def invalid(name: str, spec: dict[str, Any]) -> KubeApiError:
        obj = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
               "metadata": {"name": name}, "spec": spec}  # fmt: skip
        with pytest.raises(KubeApiError) as rejected:
            kube_api.create(inferencepools_path(kube_namespace), obj)
        assert rejected.value.status == 422, rejected.value
        return rejected.value

    selector = {"matchLabels": {"app": "model"}}
    picker = {"name": "llmlb", "port": {"number": 9002}}
    assert "targetPorts" in invalid("no-ports", {"selector": selector, "endpointPickerRef": picker}).message
    invalid("port-zero", {"selector": selector, "targetPorts": [{"number": 0}], "endpointPickerRef": picker})
    nine = [{"number": 8000 + i} for i in range(9)]
    invalid("nine-ports", {"selector": selector, "targetPorts": nine, "endpointPickerRef": picker})
    same = [{"number": 8000}, {"number": 8000}]
    assert (
        "unique"
        in invalid(
            "same-ports", {"selector": selector, "targetPorts": same, "endpointPickerRef": picker}
        ).message
    )
    ports = [{"number": 8000}]
    invalid("bad-mode", {"selector": selector, "targetPorts": ports,
                         "endpointPickerRef": {**picker, "failureMode": "Sometimes"}})  # fmt: skip
    invalid(
        "no-picker-port", {"selector": selector, "targetPorts": ports, "endpointPickerRef": {"name": "x"}}
    )
    assert [p["metadata"]["name"] for p in kube_api.get(inferencepools_path(kube_namespace))["items"]] == [
        "pool"
    ]


def test_endpointslices_take_non_loopback_addresses(kube_api: KubeApi, kube_namespace: str) -> None:
    service = kube_api.create_service(kube_namespace, "models", None, [("http", 8000)])
    assert service["spec"]["clusterIP"].startswith("10.0.0.")
    kube_api.create_endpointslice(
        kube_namespace,
        "models-1",
        "models",
        [("10.0.1.1", True, True, False), ("10.0.1.2", False, True, True)],
        [("http", 8000)],
    )
    got = kube_api.get(
        endpointslices_path(kube_namespace) + "?labelSelector=kubernetes.io%2Fservice-name%3Dmodels"
    )
    [slice_] = got["items"]
    assert [(e["addresses"], e["conditions"]) for e in slice_["endpoints"]] == [
        (["10.0.1.1"], {"ready": True, "serving": True, "terminating": False}),
        (["10.0.1.2"], {"ready": False, "serving": True, "terminating": True}),
    ]
    assert slice_["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP"}]

    with pytest.raises(ValueError, match="loopback"):
        kube_api.create_endpointslice(kube_namespace, "lo", "models", [("127.0.0.9", True, True, False)], [])
    # The API server itself refuses them (the reason the helper does).
    slice_["metadata"] = {"name": "lo", "labels": slice_["metadata"]["labels"]}
    slice_["endpoints"][0]["addresses"] = ["127.0.0.9"]
    reply = kube_api.request("POST", endpointslices_path(kube_namespace), slice_)
    assert reply.status == 422, reply

    def bump(obj: dict[str, Any]) -> None:
        obj["endpoints"][0]["conditions"]["ready"] = False

    updated = kube_api.update(endpointslices_path(kube_namespace, "models-1"), bump)
    assert updated["endpoints"][0]["conditions"]["ready"] is False
    stale = {**updated, "metadata": {**updated["metadata"], "resourceVersion": "1"}}
    with pytest.raises(KubeApiError) as conflict:
        kube_api.replace(endpointslices_path(kube_namespace, "models-1"), stale)
    assert conflict.value.status == 409


def test_restart_apiserver_keeps_objects(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str
) -> None:
    pod = kube_api.create_pod(kube_namespace, "survivor", {"app": "model"})
    kube_api.set_pod_status(kube_namespace, "survivor", "127.0.0.7", ready=True)
    port, first = kube_cluster.port, kube_cluster.apiserver
    assert first is not None

    kube_cluster.restart_apiserver()

    assert not first.running
    assert kube_cluster.apiserver is not None
    assert kube_cluster.apiserver.pid != first.pid
    assert kube_cluster.port == port
    assert kube_api.request("GET", "/readyz").body == b"ok"
    again = kube_api.get(pods_path(kube_namespace, "survivor"))
    assert again["metadata"]["uid"] == pod["metadata"]["uid"]
    assert (again["status"]["podIP"], _condition(again, "Ready")) == ("127.0.0.7", "True")
    # Still writable, RBAC and token authentication included.
    kube_api.create_pod(kube_namespace, "after", {"app": "model"})
    limited = kube_api.with_token(kube_cluster.limited_token)
    assert limited.request("GET", pods_path(kube_namespace)).status == 403


def test_kubectl_uses_the_written_kubeconfig(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str, tmp_path: Path
) -> None:
    kube_api.create_pod(kube_namespace, "m1", {"app": "model"})
    kube_api.set_pod_status(kube_namespace, "m1", "127.0.0.5", ready=True)
    admin = kube_cluster.write_kubeconfig(tmp_path / "admin.kubeconfig", kube_cluster.admin_token)

    done = kube_cluster.kubectl("get", "pods", "-n", kube_namespace, "-o", "json", kubeconfig=admin)
    assert done.returncode == 0, done.stderr
    [pod] = json.loads(done.stdout)["items"]
    assert (pod["metadata"]["name"], pod["status"]["podIP"]) == ("m1", "127.0.0.5")
    done = kube_cluster.kubectl("get", "pods", "-n", kube_namespace, kubeconfig=admin)
    assert done.returncode == 0, done.stderr
    assert "m1" in done.stdout, done.stdout
    assert "Running" in done.stdout, done.stdout

    version = kube_cluster.kubectl("version", "-o", "json", kubeconfig=admin)
    assert version.returncode == 0, version.stderr
    versions = json.loads(version.stdout)
    assert versions["clientVersion"]["gitVersion"] == versions["serverVersion"]["gitVersion"] == KUBE_VERSION

    limited = kube_cluster.write_kubeconfig(tmp_path / "limited.kubeconfig", kube_cluster.limited_token)
    denied = kube_cluster.kubectl("get", "pods", "-n", kube_namespace, kubeconfig=limited)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower(), denied.stderr


def test_python_client_uses_the_written_kubeconfig(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str, tmp_path: Path
) -> None:
    client = pytest.importorskip("kubernetes_asyncio.client")
    config = pytest.importorskip("kubernetes_asyncio.config")
    kube_api.create_pod(kube_namespace, "m1", {"app": "model"})
    path = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", kube_cluster.admin_token, kube_namespace)

    async def names() -> list[str]:
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(path), client_configuration=configuration)
        async with client.ApiClient(configuration) as api_client:
            pods = await client.CoreV1Api(api_client).list_namespaced_pod(kube_namespace, _request_timeout=10)
            return [p.metadata.name for p in pods.items]

    assert asyncio.run(asyncio.wait_for(names(), 20.0)) == ["m1"]
