"""``discovery.kind: dns``: a name (typically a headless Service) resolved every ``interval`` ms.

Every A and AAAA address of the name, with ``port``, is an endpoint. Works inside and outside
Kubernetes and needs no API permissions. The servers asked are ``nameservers`` if given, else the
system's (``/etc/resolv.conf``, with its search list, so a short in-cluster name works).

An answer that the name has no address (NXDOMAIN, or no A/AAAA records: a headless Service
scaled to zero) is an answer: the pool becomes empty. A server that does not answer, or answers
SERVFAIL/REFUSED, is an outage: the last set stays.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from llmlb.config import Discovery, Endpoint, parse_listen
from llmlb.discovery import DiscoveryStatus, Publish, target_of

log = logging.getLogger("llmlb.discovery")

# One resolution may take at most this long (or the interval, if shorter).
MAX_LIFETIME_S = 2.0


class DnsSource:
    def __init__(self, discovery: Discovery, publish: Publish, status: DiscoveryStatus) -> None:
        assert discovery.name is not None
        assert isinstance(discovery.port, int)
        self.name = discovery.name
        self.port = discovery.port
        self.interval = discovery.interval / 1000
        self.labels = dict(discovery.labels)
        self.publish = publish
        self.status = status
        self.target = target_of(discovery)
        self.resolver = dns.asyncresolver.Resolver(configure=not discovery.nameservers)
        if discovery.nameservers:
            servers: list[str | dns.nameserver.Nameserver] = []
            for server in discovery.nameservers:
                host, port = parse_listen(server, "discovery.nameservers")
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self.resolver.nameservers = servers
        self.resolver.lifetime = min(MAX_LIFETIME_S, self.interval)
        # Search domains only where resolv.conf gave them (a short name inside a cluster).
        self.search = not discovery.nameservers

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def resolve_once(self) -> tuple[Endpoint, ...]:
        """The endpoints the name has now; raises ``dns.exception.DNSException`` on an outage."""
        answers = await asyncio.gather(self._addresses("A"), self._addresses("AAAA"))
        ips = sorted({ip for family in answers for ip in family}, key=lambda ip: (ip.version, ip))
        return tuple(
            Endpoint(f"[{ip}]:{self.port}" if ip.version == 6 else f"{ip}:{self.port}", self.labels)
            for ip in ips
        )

    async def _addresses(self, rdtype: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        try:
            answer = await self.resolver.resolve(
                self.name, rdtype, search=self.search, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return []
        return [ipaddress.ip_address(record.address) for record in answer]

    async def run(self) -> None:
        while True:
            try:
                endpoints = await self.resolve_once()
            except dns.exception.DNSException as e:
                if self.status.up or not self.status.parts:
                    log.warning("discovery: resolving %s failed, keeping the last set: %s", self.target, e)
                self.status.failed(f"resolving {self.name}: {e}")
            else:
                if not self.status.up and self.status.parts:
                    log.info("discovery: %s resolves again", self.target)
                self.status.ok()
                self.publish(endpoints)
            await asyncio.sleep(self.interval)
