"""Gateway mode against a real API server: an InferencePool and pods created through the API, llmlb
discovering them (with only the rights docs/kubernetes.md lists), and Envoy in the Inference
Extension's FULL_DUPLEX_STREAMED mode routing chat traffic to `llmlb sim` servers listening on the
pods' IPs (127.0.0.N: the whole of 127/8 is local).

While traffic flows without pause, pods turn unready, are deleted, appear, the pool's selector
changes and the API server restarts; each change must show in the picker within 2 s, and not one
request may fail: a pod's server is stopped only after the picker has let go of it."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.kube.test_discovery_endpointslices import REFLECTED_WITHIN_S, grant, wait_for_pool
from tests.support.kube import KubeApi, KubeCluster, inferencepools_path
from tests.support.procs import (
    Daemon,
    Envoy,
    ManagedProcess,
    Reply,
    free_port,
    llmlb_argv,
    metric_sum,
    post,
    start_daemon,
    start_envoy,
    stop_all,
    wait_until,
)

MODEL = "test-model"
POOL_RULES = [
    {
        "apiGroups": ["inference.networking.k8s.io"],
        "resources": ["inferencepools"],
        "verbs": ["list", "watch"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
]


@dataclass
class Traffic:
    """Chat requests through Envoy one after another, until stopped; every reply kept."""

    url: str
    replies: list[Reply] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        for i in range(100_000):
            if self.stop.is_set():
                return
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"conversation {i}"}],
                "max_tokens": 4,
            }
            try:
                self.replies.append(post(f"{self.url}/v1/chat/completions", body, timeout=10.0))
            except OSError as e:
                self.replies.append(Reply(599, {}, str(e).encode()))
            time.sleep(0.01)

    def finish(self) -> list[Reply]:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=15.0)
        return self.replies


class Pods:
    """Pods made through the API, each with a real `llmlb sim` on its IP."""

    def __init__(self, api: KubeApi, namespace: str, port: int, workdir: Path) -> None:
        self.api = api
        self.namespace = namespace
        self.port = port
        self.workdir = workdir
        self.sims: dict[str, ManagedProcess] = {}
        self.ips: dict[str, str] = {}
        self._next_ip = itertools.count(21)

    def add(self, name: str, labels: dict[str, str], *, ready: bool = True) -> str:
        ip = f"127.0.0.{next(self._next_ip)}"
        argv = llmlb_argv(
            "sim",
            "--host",
            ip,
            "--port",
            str(self.port),
            "--name",
            name,
            "--models",
            MODEL,
            "--step-base-ms",
            "1",
        )
        sim = ManagedProcess(f"sim {name}", argv, self.workdir / f"sim-{name}.log").start()
        self.sims[name] = sim
        sim.wait_ready(f"http://{ip}:{self.port}/health", timeout=30.0)
        self.api.create_pod(self.namespace, name, labels, port=self.port)
        self.api.set_pod_status(self.namespace, name, ip, ready=ready)
        self.ips[name] = ip
        return self.address(name)

    def address(self, name: str) -> str:
        return f"{self.ips[name]}:{self.port}"

    def stop_sim(self, name: str) -> None:
        self.sims.pop(name).stop()

    def stop_all(self) -> None:
        stop_all(self.sims.values())
        self.sims.clear()


@pytest.fixture
def pods(kube_api: KubeApi, kube_namespace: str, tmp_path: Path) -> Iterator[Pods]:
    made = Pods(kube_api, kube_namespace, free_port(), tmp_path)
    yield made
    made.stop_all()


def wait_pool(daemon: Daemon, expected: list[str], what: str, took: dict[str, float]) -> None:
    took[what] = wait_for_pool(daemon, expected, what)


def picks(daemon: Daemon) -> dict[str, float]:
    found: dict[str, float] = {}
    for sample in daemon.metrics():
        if sample.name == "llmlb_picks_total":
            endpoint = sample.labels["endpoint"]
            found[endpoint] = found.get(endpoint, 0.0) + sample.value
    return found


def wait_traffic_reaches(daemon: Daemon, address: str, what: str, took: dict[str, float]) -> None:
    """The new endpoint is picked for real traffic within the bound."""
    before = picks(daemon).get(address, 0.0)
    started = time.monotonic()
    wait_until(
        lambda: picks(daemon).get(address, 0.0) > before,
        REFLECTED_WITHIN_S,
        interval=0.02,
        message=f"{what}: traffic to {address}",
    )
    took[what] = time.monotonic() - started


def assert_no_new_picks(daemon: Daemon, address: str, seconds: float = 0.5) -> None:
    before = picks(daemon).get(address, 0.0)
    time.sleep(seconds)
    assert picks(daemon).get(address, 0.0) == before, f"{address} still picked after it left the pool"


def test_an_inferencepool_routes_envoy_traffic_through_every_change(
    kube_cluster: KubeCluster,
    kube_api: KubeApi,
    kube_namespace: str,
    pods: Pods,
    tmp_path: Path,
) -> None:
    ns = kube_namespace
    kube_api.install_inferencepool_crd()
    grant(kube_api, ns, "llmlb", POOL_RULES)
    app = {"app": "vllm"}
    a = pods.add("vllm-a", app)
    b = pods.add("vllm-b", app)
    pods.add("unrelated", {"app": "other"})  # same namespace, not selected
    kube_api.create_inferencepool(ns, "chat", app, [pods.port])
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "limited.kubeconfig", kube_cluster.limited_token)
    config = tmp_path / "llmlb.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "discovery": {
                    "kind": "inferencePool",
                    "namespace": ns,
                    "pool": "chat",
                    "kubeconfig": str(kubeconfig),
                },
                "health_check_interval": 1000,
            }
        )
    )
    daemon = start_daemon(
        [], "prefix_cache", tmp_path, name="llmlb-pool", extra_args=["--config", str(config)]
    )
    envoy: Envoy | None = None
    traffic: Traffic | None = None
    took: dict[str, float] = {}
    try:
        assert sorted(daemon.debug_discovery()["addresses"]) == sorted([a, b])
        envoy = start_envoy([], daemon.grpc_port, "full-duplex", tmp_path, name="envoy-gateway")
        traffic = Traffic(envoy.url).start()
        wait_traffic_reaches(daemon, a, "first traffic to a", took)
        wait_traffic_reaches(daemon, b, "first traffic to b", took)

        # A pod turning unready gets no new picks; its server keeps answering what it has.
        kube_api.set_pod_status(ns, "vllm-b", pods.ips["vllm-b"], ready=False)
        wait_pool(daemon, [a], "pod unready", took)
        assert_no_new_picks(daemon, b)

        # A new pod appears and gets traffic.
        c = pods.add("vllm-c", app)
        wait_pool(daemon, [a, c], "pod appears", took)
        wait_traffic_reaches(daemon, c, "traffic to the new pod", took)

        # A pod is deleted: out of the pool first, its server stopped only after.
        kube_api.delete_pod(ns, "vllm-a")
        wait_pool(daemon, [c], "pod deleted", took)
        wait_until(
            lambda: daemon.inflight().get(a, 0) == 0, 10.0, message="requests to the deleted pod to end"
        )
        pods.stop_sim("vllm-a")

        # The pool's selector changes: the pods are read again under the new selector.
        d = pods.add("vllm-d", {"app": "vllm-next"})
        kube_api.patch(
            inferencepools_path(ns, "chat"), {"spec": {"selector": {"matchLabels": {"app": "vllm-next"}}}}
        )
        wait_pool(daemon, [d], "selector changed", took)
        wait_traffic_reaches(daemon, d, "traffic after the selector change", took)

        # The API server restarts: the last set carries traffic meanwhile, then changes flow again.
        kube_cluster.stop_apiserver()
        try:
            wait_until(
                lambda: daemon.debug_discovery()["up"] is False, 5.0, interval=0.05, message="discovery down"
            )
            assert sorted(daemon.debug_discovery()["addresses"]) == [d]
            wait_traffic_reaches(daemon, d, "traffic while the API server is down", took)
        finally:
            kube_cluster.start_apiserver()
        e = pods.add("vllm-e", {"app": "vllm-next"})
        wait_pool(daemon, [d, e], "change after API server restart", took)
        wait_traffic_reaches(daemon, e, "traffic after the restart", took)
        # The pods watch may be back before the pool's (each retries on its own backoff; a
        # restarting API server may refuse for a moment: refusals back off further).
        wait_until(
            lambda: daemon.debug_discovery()["up"] is True, 10.0, interval=0.05, message="discovery up"
        )
    finally:
        replies = traffic.finish() if traffic is not None else []
        if envoy is not None:
            envoy.stop()
        daemon.stop()
    failed = [r for r in replies if r.status != 200]
    print(
        f"{len(replies)} requests, {len(failed)} failed; reflected after: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items())
    )
    assert len(replies) > 100
    assert not failed, f"{len(failed)} of {len(replies)} requests failed, first: {failed[0]}"
    # Never a moment without endpoints (the selector change keeps the old set until the new list).
    assert "discovery: 0 endpoints" not in daemon.proc.log_path.read_text()


def test_a_pool_that_does_not_exist_yet_has_no_endpoints_until_it_does(
    kube_cluster: KubeCluster, kube_api: KubeApi, kube_namespace: str, pods: Pods, tmp_path: Path
) -> None:
    ns = kube_namespace
    kube_api.install_inferencepool_crd()
    grant(kube_api, ns, "llmlb", POOL_RULES)
    a = pods.add("vllm-a", {"app": "vllm"}, ready=True)
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "limited.kubeconfig", kube_cluster.limited_token)
    config = tmp_path / "llmlb.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "discovery": {
                    "kind": "inferencePool",
                    "namespace": ns,
                    "pool": "later",
                    "kubeconfig": str(kubeconfig),
                },
            }
        )
    )
    daemon = start_daemon(
        [], "prefix_cache", tmp_path, name="llmlb-later", extra_args=["--config", str(config)]
    )
    try:
        view = daemon.debug_discovery()
        assert view["addresses"] == [], view
        assert view["up"] is True, view
        assert view["pool_found"] is False, view
        kube_api.create_inferencepool(ns, "later", {"app": "vllm"}, [pods.port])
        took: dict[str, float] = {}
        wait_pool(daemon, [a], "pool created", took)
        # A second target port makes every pod an endpoint twice.
        ports = [{"number": pods.port}, {"number": pods.port + 1}]
        kube_api.patch(inferencepools_path(ns, "later"), {"spec": {"targetPorts": ports}})
        wait_pool(daemon, [a, f"{pods.ips['vllm-a']}:{pods.port + 1}"], "second target port", took)
        kube_api.delete(inferencepools_path(ns, "later"))
        wait_pool(daemon, [], "pool deleted", took)
        assert metric_sum(daemon.metrics(), "llmlb_discovery_endpoints", kind="inferencePool") == 0
    finally:
        daemon.stop()
