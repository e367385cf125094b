"""In-cluster credentials, as the manifests use them: no kubeconfig, the service account's token,
CA and namespace read from /var/run/secrets/kubernetes.io/serviceaccount and the API server from
KUBERNETES_SERVICE_HOST/PORT.

The picker runs in a private mount namespace (`unshare -m`, root) with a tmpfs over /run, so the
service-account files exist only for it and nothing on the host changes."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.kube.test_discovery_endpointslices import SLICE_RULES, grant, wait_for_pool
from tests.support.kube import KubeApi, KubeCluster
from tests.support.procs import HOST, Daemon, ManagedProcess, free_ports, serve_argv

SERVICE_ACCOUNT_DIR = "/run/secrets/kubernetes.io/serviceaccount"  # /var/run -> /run


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /run"]
    return subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m (a private mount namespace)")
def test_in_cluster_credentials_and_the_pods_own_namespace(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    grant(
        kube_api,
        ns,
        "llmlb",
        SLICE_RULES,
    )
    kube_api.create_service(ns, "vllm", None, [("http", 8000)])
    kube_api.create_endpointslice(ns, "vllm-a", "vllm", [("10.0.9.1", True, True, False)], [("http", 8000)])

    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "token").write_text(kube_cluster.limited_token)
    (secrets / "namespace").write_text(ns)
    shutil.copy(kube_cluster.ca_path, secrets / "ca.crt")
    config = tmp_path / "llmlb.yaml"
    # No namespace and no kubeconfig: both come from the service account.
    config.write_text(
        yaml.safe_dump(
            {
                "discovery": {"kind": "kubernetes", "service": "vllm"},
                "health_check_interval": 0,
                "models_refresh": 0,
            }
        )
    )
    grpc_port, admin_port = free_ports(2)
    serve = serve_argv(grpc_port, admin_port, "--config", str(config))
    script = (
        f"mount -t tmpfs tmpfs /run && mkdir -p {SERVICE_ACCOUNT_DIR} "
        f"&& cp {shlex.quote(str(secrets))}/* {SERVICE_ACCOUNT_DIR}/ && exec {shlex.join(serve)}"
    )
    env = {
        "KUBERNETES_SERVICE_HOST": HOST,
        "KUBERNETES_SERVICE_PORT": str(kube_cluster.port),
        "KUBECONFIG": str(tmp_path / "no-such-kubeconfig"),  # must not be what is used
    }
    # unshare and sh exec in place: the PID stopped below is the picker's own.
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    proc = ManagedProcess("llmlb-incluster", argv, tmp_path / "llmlb.log", env=env).start()
    try:
        proc.wait_ready(f"http://{HOST}:{admin_port}/readyz", timeout=30.0)
        picker = Daemon(proc, grpc_port, admin_port, [], "prefix_cache")
        view = picker.debug_discovery()
        assert view["addresses"] == ["10.0.9.1:8000"], view
        assert view["up"] is True, view
        kube_api.create_endpointslice(
            ns, "vllm-b", "vllm", [("10.0.9.2", True, True, False)], [("http", 8000)]
        )
        wait_for_pool(picker, ["10.0.9.1:8000", "10.0.9.2:8000"], "a new slice, watched in-cluster")
    finally:
        assert proc.stop() == 0, proc.describe()
