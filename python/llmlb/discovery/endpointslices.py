"""``discovery.kind: kubernetes``: the EndpointSlices of a Service (label
``kubernetes.io/service-name``), listed and watched.

An endpoint whose ``ready`` condition is true (or unset, which the API defines as ready) is in the
pool. Terminating endpoints get no new picks, as kube-proxy treats them: only when no endpoint is
ready do the ones still ``serving`` while terminating take traffic, so a rollout of the last pods
does not turn into 503s. ``port`` picks the slice port by name or number; without it a slice's
only port is used. Needs list and watch on ``endpointslices.discovery.k8s.io`` in the namespace.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from llmlb.config import Discovery, Endpoint
from llmlb.discovery import DiscoveryStatus, Publish
from llmlb.discovery.kube import KubeClient, KubeObject, Reflector, own_namespace

log = logging.getLogger("llmlb.discovery")


class EndpointSliceSource:
    def __init__(self, discovery: Discovery, publish: Publish, status: DiscoveryStatus) -> None:
        assert discovery.service is not None
        self.discovery = discovery
        self.namespace = discovery.namespace or own_namespace()
        self.service = discovery.service
        self.port = discovery.port
        self.labels = dict(discovery.labels)
        self.publish = publish
        self.status = status
        self.client: KubeClient | None = None
        self._warned: set[str] = set()

    async def open(self) -> None:
        self.client = await KubeClient.connect(self.discovery.kubeconfig)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def run(self) -> None:
        assert self.client is not None, "open() first"
        reflector = Reflector(
            self.client,
            f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices",
            {"labelSelector": f"kubernetes.io/service-name={self.service}"},
            self._changed,
            self.status,
            part=f"EndpointSlices of service {self.namespace}/{self.service}",
        )
        await reflector.run()

    def _changed(self, slices: dict[str, KubeObject]) -> None:
        self.status.details["slices"] = len(slices)
        self.publish(endpoints_of_slices(slices.values(), self.port, self.labels, self._warn_once))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("discovery: %s", message)


def endpoints_of_slices(
    slices: Iterable[KubeObject],
    port: int | str | None,
    labels: Mapping[str, str],
    warn: Any = lambda message: None,
) -> tuple[Endpoint, ...]:
    ready: dict[str, Endpoint] = {}
    draining: dict[str, Endpoint] = {}
    for piece in slices:
        family = piece.get("addressType")
        if family not in ("IPv4", "IPv6"):
            continue  # FQDN slices name hosts, and Envoy routes picks to IPs
        name = (piece.get("metadata") or {}).get("name", "?")
        number = slice_port(piece.get("ports") or [], port)
        if number is None:
            which = f"matching {port!r}" if port else "to use (it has several: set discovery.port)"
            warn(f"EndpointSlice {name} has no TCP port {which}")
            continue
        for item in piece.get("endpoints") or ():
            if not isinstance(item, dict):
                continue
            conditions = item.get("conditions") or {}
            is_ready = conditions.get("ready") is not False  # unset means ready
            serving = conditions.get("serving")
            serving = is_ready if serving is None else serving is True
            terminating = conditions.get("terminating") is True
            own = dict(labels)
            for key, value in (("zone", item.get("zone")), ("node", item.get("nodeName"))):
                if isinstance(value, str) and value:
                    own[key] = value
            target = item.get("targetRef") or {}
            if target.get("kind") == "Pod" and isinstance(target.get("name"), str):
                own["pod"] = target["name"]
            for ip in item.get("addresses") or ():
                if not isinstance(ip, str):
                    continue
                address = f"[{ip}]:{number}" if family == "IPv6" else f"{ip}:{number}"
                if is_ready and not terminating:
                    ready[address] = Endpoint(address, own)
                elif serving and terminating:
                    draining[address] = Endpoint(address, own)
    chosen = ready or draining
    return tuple(chosen[address] for address in sorted(chosen))


def slice_port(ports: Iterable[Any], wanted: int | str | None) -> int | None:
    """The port number of the slice port that ``wanted`` names (by name or number); with nothing
    wanted, the only TCP port."""
    tcp = [
        p
        for p in ports
        if isinstance(p, dict) and p.get("protocol", "TCP") == "TCP" and isinstance(p.get("port"), int)
    ]
    if wanted is None:
        return tcp[0]["port"] if len(tcp) == 1 else None
    for p in tcp:
        if (isinstance(wanted, str) and p.get("name") == wanted) or p["port"] == wanted:
            return int(p["port"])
    return None
