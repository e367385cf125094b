"""Where the pool's endpoints come from when they are not a static list: ``discovery`` in the config.

A source runs as one task for the life of the daemon and hands every change of its endpoint set to
``publish``; the ``DiscoveryStatus`` it is given says whether it is in touch with what it watches.
What a source never does is empty the pool because it lost touch: on an outage (DNS server down,
API server restarting, a watch cut) the last known set stays, ``status.up`` turns false, and the
error shows in ``/debug/discovery`` and the ``llmlb_discovery_*`` metrics until it recovers.

- ``dns`` (``llmlb.discovery.dns``): a name re-resolved every ``interval`` ms, A and AAAA.
- ``kubernetes`` (``llmlb.discovery.endpointslices``): a Service's EndpointSlices, list + watch.
- ``inferencePool`` (``llmlb.discovery.inferencepool``): a Gateway API Inference Extension
  InferencePool and the Ready pods its selector picks, list + watch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmlb.config import Discovery, Endpoint

#: A source's only way to change the pool: the whole discovered set, each time it changes.
Publish = Callable[[tuple[Endpoint, ...]], None]


@dataclass
class DiscoveryStatus:
    """What /debug/discovery and the ``llmlb_discovery_*`` metrics report about the source.

    A source may watch several things (an InferencePool and its pods): each reports as its own
    ``part``, and the source is up only while every part is."""

    kind: str
    target: str
    # Whether the source has produced a set at least once (the pool is not just "not yet known").
    synced: bool = False
    last_success: float | None = None  # time.time() of the last good answer
    errors: int = 0
    updates: int = 0
    endpoints: int = 0
    parts: dict[str, str | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return bool(self.parts) and all(error is None for error in self.parts.values())

    @property
    def last_error(self) -> str | None:
        return next((error for error in self.parts.values() if error is not None), None)

    def ok(self, part: str = "") -> None:
        self.parts[part] = None
        self.last_success = time.time()

    def failed(self, error: str, part: str = "") -> None:
        self.parts[part] = error
        self.errors += 1

    def view(self) -> dict[str, Any]:
        age = None if self.last_success is None else round(time.time() - self.last_success, 3)
        return {
            "kind": self.kind,
            "target": self.target,
            "up": self.up,
            "synced": self.synced,
            "last_error": self.last_error,
            "seconds_since_success": age,
            "errors": self.errors,
            "updates": self.updates,
            "endpoints": self.endpoints,
            **self.details,
        }


class DiscoveryError(Exception):
    """The source could not get an answer; the last known set stays."""


def target_of(discovery: Discovery) -> str:
    """What the source watches, in one line (logs, /debug/discovery)."""
    namespace = discovery.namespace or "(own namespace)"
    if discovery.kind == "dns":
        return f"{discovery.name}:{discovery.port}"
    if discovery.kind == "kubernetes":
        port = "" if discovery.port is None else f" port {discovery.port}"
        return f"service {namespace}/{discovery.service}{port}"
    return f"InferencePool {namespace}/{discovery.pool}"


class Source(Protocol):
    async def open(self) -> None:
        """Loads what the source needs (credentials); a ConfigError here stops the daemon (exit 2)."""

    async def run(self) -> None:
        """Publishes the set and every change of it, until cancelled; never raises on an outage."""

    async def close(self) -> None: ...


def build_source(discovery: Discovery, publish: Publish, status: DiscoveryStatus) -> Source:
    """Imports lazily: the Kubernetes client costs half a second to import, and only its users
    should pay for it."""
    if discovery.kind == "dns":
        from llmlb.discovery.dns import DnsSource

        return DnsSource(discovery, publish, status)
    if discovery.kind == "kubernetes":
        from llmlb.discovery.endpointslices import EndpointSliceSource

        return EndpointSliceSource(discovery, publish, status)
    from llmlb.discovery.inferencepool import InferencePoolSource

    return InferencePoolSource(discovery, publish, status)
