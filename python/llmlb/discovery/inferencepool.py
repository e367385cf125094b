"""``discovery.kind: inferencePool``: a Gateway API Inference Extension ``InferencePool``
(``inference.networking.k8s.io/v1``) and the pods its selector picks, both listed and watched.

Every pod that matches ``spec.selector.matchLabels``, is Ready, has an IP and is not being deleted
is an endpoint once per ``spec.targetPorts[].number``. A change of the pool's selector re-reads
the pods; a change of its ports re-derives the set. A pool that does not exist (yet, or any more)
has no endpoints. Needs get/list/watch on ``inferencepools`` and list/watch on ``pods`` in the
namespace.

Endpoint labels come from the pod: its labels (``llm-d.ai/engine-type`` names the engine, as in
llm-d), then its annotations under ``llmlb.io/`` with the prefix dropped (``llmlb.io/engine``,
``llmlb.io/models``, ``llmlb.io/metrics_port``), and ``pod``. A ``prometheus.io/port``
annotation gives ``metrics_port`` when it is not set otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping

from llmlb.config import Discovery, Endpoint
from llmlb.discovery import DiscoveryStatus, Publish
from llmlb.discovery.kube import KubeClient, KubeObject, Reflector, own_namespace

log = logging.getLogger("llmlb.discovery")

GROUP_VERSION = "inference.networking.k8s.io/v1"
LABEL_ANNOTATION_PREFIX = "llmlb.io/"
PODS_PART = "pods"


class InferencePoolSource:
    def __init__(self, discovery: Discovery, publish: Publish, status: DiscoveryStatus) -> None:
        assert discovery.pool is not None
        self.discovery = discovery
        self.namespace = discovery.namespace or own_namespace()
        self.pool = discovery.pool
        self.labels = dict(discovery.labels)
        self.publish = publish
        self.status = status
        self.client: KubeClient | None = None
        self.selector: tuple[tuple[str, str], ...] | None = None
        self.ports: tuple[int, ...] = ()
        self.pods: dict[str, KubeObject] = {}
        self._pods_task: asyncio.Task[None] | None = None
        # A new selector's pods are being listed: the last published set stands meanwhile.
        self._listing = False
        # Each pod's endpoints by its resourceVersion: a change re-derives one pod, not all.
        self._derived: dict[str, tuple[str, tuple[Endpoint, ...]]] = {}

    async def open(self) -> None:
        self.client = await KubeClient.connect(self.discovery.kubeconfig)

    async def close(self) -> None:
        await self._stop_pods()
        if self.client is not None:
            await self.client.close()

    async def run(self) -> None:
        assert self.client is not None, "open() first"
        reflector = Reflector(
            self.client,
            f"/apis/{GROUP_VERSION}/namespaces/{self.namespace}/inferencepools",
            {"fieldSelector": f"metadata.name={self.pool}"},
            self._pool_changed,
            self.status,
            part=f"InferencePool {self.namespace}/{self.pool}",
        )
        try:
            await reflector.run()
        finally:
            await self._stop_pods()

    def _pool_changed(self, pools: dict[str, KubeObject]) -> None:
        pool = pools.get(f"{self.namespace}/{self.pool}")
        spec = (pool or {}).get("spec") or {}
        match = ((spec.get("selector") or {}).get("matchLabels")) or {}
        selector = tuple(sorted((str(k), str(v)) for k, v in match.items())) if pool else None
        ports = tuple(
            sorted(
                {
                    p["number"]
                    for p in spec.get("targetPorts") or ()
                    if isinstance(p, dict) and isinstance(p.get("number"), int)
                }
            )
        )
        self.status.details["pool_found"] = pool is not None
        self.status.details["selector"] = dict(selector or ())
        self.status.details["target_ports"] = list(ports)
        if pool is None:
            log.warning(
                "discovery: InferencePool %s/%s does not exist: no endpoints", self.namespace, self.pool
            )
        elif not selector:
            log.warning(
                "discovery: InferencePool %s/%s selects no pods (empty selector)", self.namespace, self.pool
            )
        if selector != self.selector:
            self.selector = selector
            self._restart_pods()
        if ports != self.ports:
            self.ports = ports
            self._derived.clear()
        self._publish()

    def _restart_pods(self) -> None:
        if self._pods_task is not None:
            self._pods_task.cancel()
            self._pods_task = None
        self.pods = {}
        self.status.parts.pop(PODS_PART, None)
        if not self.selector:
            self._listing = False
            return
        # Until the new selector's pods are listed the pool keeps its last set: a selector change
        # moves traffic from the old pods to the new ones without a moment of no endpoints.
        self._listing = True
        assert self.client is not None
        label_selector = ",".join(f"{k}={v}" for k, v in self.selector)
        reflector = Reflector(
            self.client,
            f"/api/v1/namespaces/{self.namespace}/pods",
            {"labelSelector": label_selector},
            self._pods_changed,
            self.status,
            part=PODS_PART,
        )
        self._pods_task = asyncio.create_task(reflector.run(), name=f"watch pods {label_selector}")

    async def _stop_pods(self) -> None:
        task, self._pods_task = self._pods_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _pods_changed(self, pods: dict[str, KubeObject]) -> None:
        self.pods = pods
        self._listing = False
        self._publish()

    def _publish(self) -> None:
        self.status.details["pods"] = len(self.pods)
        if self._listing:
            return
        if not self.selector:
            self.publish(())
            return
        found: dict[str, Endpoint] = {}
        derived: dict[str, tuple[str, tuple[Endpoint, ...]]] = {}
        for key, pod in self.pods.items():
            version = str((pod.get("metadata") or {}).get("resourceVersion", ""))
            known = self._derived.get(key)
            if known is None or known[0] != version or not version:
                known = (version, endpoints_of_pod(pod, self.ports, self.labels))
            derived[key] = known
            found.update((ep.address, ep) for ep in known[1])
        self._derived = derived
        self.publish(tuple(found[address] for address in sorted(found)))


def endpoints_of_pods(
    pods: Iterable[KubeObject], ports: Iterable[int], labels: Mapping[str, str]
) -> tuple[Endpoint, ...]:
    ports = tuple(ports)
    found = {ep.address: ep for pod in pods for ep in endpoints_of_pod(pod, ports, labels)}
    return tuple(found[address] for address in sorted(found))


def endpoints_of_pod(
    pod: KubeObject, ports: tuple[int, ...], labels: Mapping[str, str]
) -> tuple[Endpoint, ...]:
    """The pod's endpoints (one per target port), or none while it is not Ready, has no IP or is
    being deleted."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if meta.get("deletionTimestamp") or not isinstance(ip, str) or not ip or not pod_ready(status):
        return ()
    own = dict(labels)
    own.update({str(k): str(v) for k, v in (meta.get("labels") or {}).items()})
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        if isinstance(key, str) and key.startswith(LABEL_ANNOTATION_PREFIX):
            own[key[len(LABEL_ANNOTATION_PREFIX) :]] = str(value)
    if "metrics_port" not in own and str(annotations.get("prometheus.io/port", "")).isdigit():
        own["metrics_port"] = str(annotations["prometheus.io/port"])
    own["pod"] = str(meta.get("name", ""))
    return tuple(Endpoint(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", own) for port in ports)


def pod_ready(status: Mapping[str, object]) -> bool:
    conditions = status.get("conditions")
    if not isinstance(conditions, list):
        return False
    return any(
        isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )
