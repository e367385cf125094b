"""What pod churn costs the picker, against a real API server (the tests' kube-apiserver + etcd).

An InferencePool selects N Ready pods (status written through the API, as a kubelet would; no
model servers: health checks and model listing are off, so only discovery runs). `llmlb serve`
follows the pool. Then pods change at a fixed rate, each change one of: a pod turns unready, turns
ready again, is deleted, is created Ready. Reported per rate: the picker's CPU (seconds of CPU per
second, so 0.01 = 1 % of a core), how many pool updates it applied, how long after a change the
picker's pool showed it (p50/p99/max, read from /debug/discovery), and its RSS.

    python bench/discovery/bench_churn.py [--pods 200] [--rates 0,1,10] [--seconds 20]

Needs `make kube-bin` (the API server binaries) first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.kube import KubeCluster, pods_path
from tests.support.procs import Daemon, get, metric_sum, process_tree_cpu, start_daemon

PORT = 8000


def pool_addresses(daemon: Daemon) -> set[str]:
    reply = get(f"{daemon.admin_url}/debug/discovery", timeout=5.0)
    return set(reply.json()["addresses"])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Churn:
    def __init__(self, cluster: KubeCluster, namespace: str, pods: int) -> None:
        self.api = cluster.api()
        self.namespace = namespace
        self.ips = (f"127.{1 + i // 250}.{i % 250}.1" for i in itertools.count())
        self.ready: dict[str, str] = {}  # name -> ip, Ready
        self.unready: dict[str, str] = {}
        self.names = (f"vllm-{i}" for i in itertools.count())
        for _ in range(pods):
            self.create()

    def create(self) -> str:
        name, ip = next(self.names), next(self.ips)
        self.api.create_pod(self.namespace, name, {"app": "vllm"}, port=PORT)
        self.api.set_pod_status(self.namespace, name, ip, ready=True)
        self.ready[name] = ip
        return f"+{ip}:{PORT}"

    def step(self, i: int) -> str:
        """One change; returns the address it adds (+) or removes (-) from the pool."""
        kind = i % 4
        if kind == 0 and self.ready:
            name, ip = next(iter(self.ready.items()))
            del self.ready[name]
            self.unready[name] = ip
            self.api.set_pod_status(self.namespace, name, ip, ready=False)
            return f"-{ip}:{PORT}"
        if kind == 1 and self.unready:
            name, ip = next(iter(self.unready.items()))
            del self.unready[name]
            self.ready[name] = ip
            self.api.set_pod_status(self.namespace, name, ip, ready=True)
            return f"+{ip}:{PORT}"
        if kind == 2 and self.ready:
            name, ip = next(iter(self.ready.items()))
            del self.ready[name]
            self.api.delete(pods_path(self.namespace, name), grace_period=0)
            return f"-{ip}:{PORT}"
        return self.create()


def measure(daemon: Daemon, churn: Churn, rate: float, seconds: float, *, lag: bool) -> dict[str, Any]:
    """One pass at ``rate``; with ``lag``, each change is followed by polling /debug/discovery
    until it shows (which costs the picker CPU too, so CPU is read from passes without it)."""
    pid = daemon.proc.pid
    updates_before = metric_sum(daemon.metrics(), "llmlb_discovery_updates_total", kind="inferencePool")
    cpu_before = process_tree_cpu(pid)
    started = time.monotonic()
    lags: list[float] = []
    changes = 0
    if rate > 0:
        for i in range(int(rate * seconds)):
            due = started + i / rate
            time.sleep(max(0.0, due - time.monotonic()))
            change = churn.step(i)
            changed_at = time.monotonic()
            changes += 1
            address, adds = change[1:], change[0] == "+"
            for _ in range(2000 if lag else 0):  # up to ~2 s at 1 ms
                if (address in pool_addresses(daemon)) == adds:
                    lags.append(time.monotonic() - changed_at)
                    break
                time.sleep(0.001)
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    elapsed = time.monotonic() - started
    cpu = process_tree_cpu(pid) - cpu_before
    updates = (
        metric_sum(daemon.metrics(), "llmlb_discovery_updates_total", kind="inferencePool") - updates_before
    )
    lags.sort()
    if lag:
        return {
            "rate_per_s": rate,
            "changes": changes,
            "lag_ms_p50": round(statistics.median(lags) * 1000, 1) if lags else None,
            "lag_ms_p99": round(lags[int(len(lags) * 0.99)] * 1000, 1) if lags else None,
            "lag_ms_max": round(lags[-1] * 1000, 1) if lags else None,
            "lag_missing": changes - len(lags),
        }
    return {
        "rate_per_s": rate,
        "seconds": round(elapsed, 1),
        "changes": changes,
        "updates_applied": int(updates),
        "cpu_cores": round(cpu / elapsed, 4),
        "cpu_ms_per_change": round(cpu * 1000 / changes, 2) if changes else None,
        "pool_size": len(pool_addresses(daemon)),
        "rss_mb": round(rss_mb(pid), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--rates", default="0,1,10", help="changes per second, comma-separated (0: idle)")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmlb-churn-") as tmp:
        work = Path(tmp)
        with KubeCluster(work / "kube") as cluster:
            api = cluster.api()
            api.install_inferencepool_crd()
            api.create_namespace("churn")
            churn = Churn(cluster, "churn", args.pods)
            api.create_inferencepool("churn", "chat", {"app": "vllm"}, [PORT])
            kubeconfig = cluster.write_kubeconfig(work / "kubeconfig")
            config = work / "llmlb.yaml"
            config.write_text(yaml.safe_dump({
                "discovery": {"kind": "inferencePool", "namespace": "churn", "pool": "chat",
                              "kubeconfig": str(kubeconfig)},
                "health_check_interval": 0, "models_refresh": 0, "passive_probe_after": 0,
            }))  # fmt: skip
            daemon = start_daemon(
                [], "prefix_cache", work, name="llmlb-churn", extra_args=["--config", str(config)]
            )
            try:
                rates = [float(rate) for rate in args.rates.split(",")]
                cpu = [measure(daemon, churn, rate, args.seconds, lag=False) for rate in rates]
                lags = [measure(daemon, churn, rate, args.seconds, lag=True) for rate in rates if rate > 0]
            finally:
                daemon.stop()
    print(json.dumps({"pods": args.pods, "cpu": cpu, "lag": lags}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
