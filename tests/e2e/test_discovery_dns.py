"""``discovery.kind: dns`` end to end: `llmlb serve` resolving a name at a real dnsmasq
(tests/support/dns_server.py), fake model servers on the addresses it resolves to (127.0.0.2,
127.0.0.3, ... and ::1, all on one port) and, where traffic matters, a real Envoy routing to the
picks. The records change while everything runs; nothing is restarted but the DNS server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dns_server import ZONE, DnsServer, find_dnsmasq, free_dns_port, ipv6_loopback_usable
from tests.support.procs import (
    Backend,
    Daemon,
    Envoy,
    Reply,
    http_request,
    launch_backends,
    metric_sum,
    start_daemon,
    start_envoy,
    stop_all,
    wait_until,
)

NAME = f"svc.{ZONE}"
# A name that exists (it has a TXT record) but has no A or AAAA: a headless Service scaled to zero.
NODATA_NAME = f"empty.{ZONE}"
INTERVAL_MS = 200
# A change must show within a few intervals; the bound is generous for a loaded 2-core box.
FOLLOW_S = 10.0
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
LABELS = {"engine": "vllm", "zone": "lo"}

pytestmark = pytest.mark.skipif(find_dnsmasq() is None, reason="no dnsmasq (make deps installs it)")


# --------------------------------------------------------------------------------------------------
# model servers on several loopback addresses, one port


def start_host_backends(hosts: Sequence[str], workdir: Path) -> list[Backend]:
    port = free_dns_port(hosts)  # free for TCP on every host
    names = ["b" + host.replace(":", "").split(".")[-1] for host in hosts]  # 127.0.0.2 -> b2, ::1 -> b1
    return launch_backends([(name, host, port) for name, host in zip(names, hosts, strict=True)], workdir)


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Backend]]:
    started = start_host_backends(HOSTS, tmp_path_factory.mktemp("dns-backends"))
    yield started
    stop_all(b.proc for b in started)


@pytest.fixture
def fresh_backends(backends: list[Backend]) -> list[Backend]:
    wait_until(lambda: all(b.stats()["concurrent"] == 0 for b in backends), 10.0, message="backends idle")
    for b in backends:
        b.reset()
    return backends


# --------------------------------------------------------------------------------------------------
# DNS server, picker, Envoy


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DnsServer]:
    server = DnsServer(tmp_path, txt_records={NODATA_NAME: "scaled to zero"})
    server.start()
    yield server
    server.stop()


def discovery_config(server: DnsServer, name: str = NAME, port: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "dns",
        "name": name,
        "port": port,
        "interval": INTERVAL_MS,
        "nameservers": [server.nameserver],
        "labels": LABELS,
        **extra,
    }


@pytest.fixture
def picker_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(discovery: dict[str, Any], policy: str = "global_least_request") -> Daemon:
        path = tmp_path / f"llmlb-dns-{len(started)}.yaml"
        settings = {"health_check_interval": 0, "models_refresh": 0, "passive_probe_after": 0}
        path.write_text(yaml.safe_dump({"discovery": discovery, **settings}))
        daemon = start_daemon(
            [], policy, tmp_path, name=f"llmlb-dns-{len(started)}", extra_args=["--config", str(path)]
        )
        started.append(daemon)
        return daemon

    yield make
    stop_all(d.proc for d in started)


@pytest.fixture
def envoy_factory(envoy_binary: str, tmp_path: Path) -> Iterator[Callable[[Daemon, list[str]], Envoy]]:
    started: list[Envoy] = []

    def make(picker: Daemon, endpoints: list[str]) -> Envoy:
        envoy = start_envoy(
            endpoints, picker.grpc_port, "buffered", tmp_path, name=f"envoy-dns-{len(started)}"
        )
        started.append(envoy)
        return envoy

    yield make
    stop_all(e.proc for e in started)


def wait_for_pool(daemon: Daemon, expected: Sequence[str], what: str) -> dict[str, Any]:
    return daemon.wait_for_pool(expected, what, FOLLOW_S)


def chat(envoy: Envoy, tag: str, delay_ms: int = 0) -> Reply:
    body = {"model": "test-model", "messages": [{"role": "user", "content": f"hello {tag}"}]}
    headers = {"x-test-delay-ms": str(delay_ms)} if delay_ms else {}
    return http_request("POST", f"{envoy.url}/v1/chat/completions", body=body, headers=headers, timeout=30.0)


def concurrent_chats(envoy: Envoy, count: int, tag: str, delay_ms: int) -> list[Reply]:
    """``count`` requests at once (each held ``delay_ms`` by the server), so global_least_request
    has to spread them over the pool."""
    replies: list[Reply | BaseException] = [RuntimeError("no reply")] * count

    def one(i: int) -> None:
        try:
            replies[i] = chat(envoy, f"{tag}-{i}", delay_ms)
        except BaseException as exc:  # reported below
            replies[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    out = []
    for reply in replies:
        assert isinstance(reply, Reply), reply
        out.append(reply)
    return out


def traffic_reaches(envoy: Envoy, expected: set[str], tag: str) -> dict[str, int]:
    """Sends batches of concurrent requests until every backend in ``expected`` served one (at most
    10 batches); every request must succeed and be served by one of ``expected``."""
    served: dict[str, int] = {}
    for batch in range(10):
        for reply in concurrent_chats(envoy, 2 * len(expected), f"{tag}-{batch}", delay_ms=300):
            assert reply.status == 200, reply
            assert reply.served_by in expected, (reply.served_by, expected)
            served[reply.served_by] = served.get(reply.served_by, 0) + 1
        if set(served) == expected:
            return served
    raise AssertionError(f"traffic reached only {served}, expected every one of {sorted(expected)}")


# --------------------------------------------------------------------------------------------------
# tests


def test_a_name_with_two_addresses_is_two_endpoints_and_both_get_traffic(
    dns_server: DnsServer,
    fresh_backends: list[Backend],
    picker_factory: Callable[..., Daemon],
    envoy_factory: Callable[[Daemon, list[str]], Envoy],
) -> None:
    b2, b3, _ = fresh_backends
    dns_server.set_records({NAME: [b2.host, b3.host]})
    picker = picker_factory(discovery_config(dns_server, port=b2.port))

    # Ready only once the first answer is in: the pool is there at once.
    view = picker.debug_discovery()
    assert sorted(view["addresses"]) == sorted([b2.address, b3.address]), view
    assert view["kind"] == "dns", view
    assert view["up"] is True, view
    assert view["last_error"] is None, view
    endpoints = {e["address"]: e for e in picker.debug_endpoints()}
    assert set(endpoints) == {b2.address, b3.address}
    for e in endpoints.values():
        assert e["labels"] == LABELS, e
    samples = picker.metrics()
    assert metric_sum(samples, "llmlb_discovery_up", kind="dns") == 1
    assert metric_sum(samples, "llmlb_discovery_endpoints", kind="dns") == 2
    assert metric_sum(samples, "llmlb_discovery_last_success_timestamp_seconds", kind="dns") > 0

    envoy = envoy_factory(picker, [b2.address, b3.address])
    served = traffic_reaches(envoy, {b2.name, b3.name}, "two")
    assert sum(served.values()) == b2.stats()["total"] + b3.stats()["total"], served


def test_added_and_removed_records_are_followed_without_a_restart(
    dns_server: DnsServer,
    fresh_backends: list[Backend],
    picker_factory: Callable[..., Daemon],
    envoy_factory: Callable[[Daemon, list[str]], Envoy],
) -> None:
    b2, b3, b4 = fresh_backends
    dns_server.set_records({NAME: [b2.host, b3.host]})
    picker = picker_factory(discovery_config(dns_server, port=b2.port))
    envoy = envoy_factory(picker, [b2.address, b3.address])
    pid = picker.proc.pid
    updates = metric_sum(picker.metrics(), "llmlb_discovery_updates_total", kind="dns")

    # A record added: the new address joins and gets traffic.
    dns_server.set_records({NAME: [b2.host, b3.host, b4.host]})
    wait_for_pool(picker, [b2.address, b3.address, b4.address], "a record added")
    traffic_reaches(envoy, {b2.name, b3.name, b4.name}, "added")
    assert metric_sum(picker.metrics(), "llmlb_discovery_updates_total", kind="dns") > updates

    # A record removed while a request to it is in flight: that request finishes, and the
    # endpoint gets no new picks.
    slow: list[Reply] = []
    holder = threading.Thread(
        target=lambda: slow.extend(concurrent_chats(envoy, 3, "slow", delay_ms=6000)), daemon=True
    )
    holder.start()
    wait_until(
        lambda: all(b.stats()["concurrent"] == 1 for b in (b2, b3, b4)),
        10.0,
        message="one slow request on each backend",
    )
    dns_server.set_records({NAME: [b3.host, b4.host]})
    wait_for_pool(picker, [b3.address, b4.address], "a record removed")
    assert b2.stats()["concurrent"] == 1, "the request to the removed endpoint was cut or finished early"
    b2_total = b2.stats()["total"]
    b2_picks = metric_sum(picker.metrics(), "llmlb_picks_total", endpoint=b2.address)
    traffic_reaches(envoy, {b3.name, b4.name}, "removed")  # asserts b2 served none of it
    holder.join(30.0)
    assert not holder.is_alive()
    assert sorted((r.status, r.served_by) for r in slow) == [(200, b2.name), (200, b3.name), (200, b4.name)]
    assert b2.stats()["total"] == b2_total
    assert metric_sum(picker.metrics(), "llmlb_picks_total", endpoint=b2.address) == b2_picks
    wait_until(
        lambda: b2.address not in {e["address"] for e in picker.debug_endpoints()},
        FOLLOW_S,
        message="the removed endpoint to leave /debug/endpoints once its request finished",
    )
    assert picker.proc.running, "the picker died"
    assert picker.proc.pid == pid  # followed, not restarted
    view = picker.debug_discovery()
    assert view["up"] is True, view
    assert view["errors"] == 0, view


def test_nxdomain_and_a_name_without_addresses_empty_the_pool_and_stay_up(
    dns_server: DnsServer, fresh_backends: list[Backend], picker_factory: Callable[..., Daemon]
) -> None:
    b2, b3, _ = fresh_backends
    # Two pickers on one server: one follows NAME (removed: NXDOMAIN), one NODATA_NAME, which
    # keeps a TXT record when its addresses go (NOERROR without answers).
    dns_server.set_records({NAME: [b2.host, b3.host], NODATA_NAME: [b2.host]})
    by_name = picker_factory(discovery_config(dns_server, port=b2.port))
    scaled = picker_factory(discovery_config(dns_server, name=NODATA_NAME, port=b2.port))
    wait_for_pool(by_name, [b2.address, b3.address], "start")
    wait_for_pool(scaled, [b2.address], "start")

    dns_server.set_records({})
    # What the server says now is what the documentation speaks of.
    assert dns_server.query(NAME, "A").rcode() == 3  # NXDOMAIN
    no_data = dns_server.query(NODATA_NAME, "A")
    assert no_data.rcode() == 0  # NOERROR ...
    assert not no_data.answer  # ... without records

    for picker, what in ((by_name, "NXDOMAIN"), (scaled, "no A/AAAA records")):
        view = wait_for_pool(picker, [], what)
        assert view["up"] is True, (what, view)
        assert view["last_error"] is None, (what, view)
        assert view["errors"] == 0, (what, view)
        assert picker.debug_endpoints() == [], what
        samples = picker.metrics()
        assert metric_sum(samples, "llmlb_discovery_up", kind="dns") == 1, what
        assert metric_sum(samples, "llmlb_discovery_endpoints", kind="dns") == 0, what
        assert metric_sum(samples, "llmlb_discovery_errors_total", kind="dns") == 0, what

    # And back, without a restart.
    dns_server.set_records({NAME: [b3.host], NODATA_NAME: [b3.host]})
    wait_for_pool(by_name, [b3.address], "the name back")
    wait_for_pool(scaled, [b3.address], "addresses back")


def test_a_name_unknown_at_start_starts_empty_and_fills_when_it_appears(
    dns_server: DnsServer, fresh_backends: list[Backend], picker_factory: Callable[..., Daemon]
) -> None:
    b2 = fresh_backends[0]
    picker = picker_factory(discovery_config(dns_server, port=b2.port))
    view = picker.debug_discovery()
    assert view["addresses"] == [], view
    assert view["up"] is True, view
    dns_server.set_records({NAME: [b2.host]})
    wait_for_pool(picker, [b2.address], "the name appearing")


@pytest.mark.parametrize("outage", ["hung", "stopped"])
def test_a_dns_outage_keeps_the_last_set_and_recovers(
    outage: str,
    dns_server: DnsServer,
    fresh_backends: list[Backend],
    picker_factory: Callable[..., Daemon],
    envoy_factory: Callable[[Daemon, list[str]], Envoy],
) -> None:
    """hung: the server keeps its port but answers nothing (SIGSTOP); stopped: nothing listens
    (queries get ICMP port unreachable), then it starts again on the same port."""
    b2, b3, b4 = fresh_backends
    dns_server.set_records({NAME: [b2.host, b3.host]})
    picker = picker_factory(discovery_config(dns_server, port=b2.port))
    envoy = envoy_factory(picker, [b2.address, b3.address])
    errors = metric_sum(picker.metrics(), "llmlb_discovery_errors_total", kind="dns")
    assert errors == 0

    if outage == "hung":
        dns_server.pause()
    else:
        dns_server.stop()
    try:
        wait_until(
            lambda: picker.debug_discovery()["up"] is False, FOLLOW_S, message="discovery to report down"
        )
        view = picker.debug_discovery()
        assert sorted(view["addresses"]) == sorted([b2.address, b3.address]), view  # the last set stays
        assert NAME in (view["last_error"] or ""), view
        samples = picker.metrics()
        assert metric_sum(samples, "llmlb_discovery_up", kind="dns") == 0
        assert metric_sum(samples, "llmlb_discovery_endpoints", kind="dns") == 2
        first = metric_sum(samples, "llmlb_discovery_errors_total", kind="dns")
        assert first > errors
        # Every failed resolution counts: the counter keeps growing while the outage lasts.
        wait_until(
            lambda: metric_sum(picker.metrics(), "llmlb_discovery_errors_total", kind="dns") > first,
            FOLLOW_S,
            message="errors_total to grow",
        )
        # Traffic still goes to the last known set.
        traffic_reaches(envoy, {b2.name, b3.name}, f"outage-{outage}")
        # A change made during the outage is seen once the server answers again.
        dns_server.set_records({NAME: [b3.host, b4.host]}, wait=False)
    finally:
        if outage == "hung":
            dns_server.resume()
        else:
            dns_server.start()
    view = wait_for_pool(picker, [b3.address, b4.address], "the records after the outage")
    wait_until(
        lambda: picker.debug_discovery()["up"] is True, FOLLOW_S, message="discovery to report up again"
    )
    view = picker.debug_discovery()
    assert view["last_error"] is None, view
    assert metric_sum(picker.metrics(), "llmlb_discovery_up", kind="dns") == 1
    traffic_reaches(envoy, {b3.name, b4.name}, f"after-{outage}")


def test_a_refused_name_is_an_outage_not_an_empty_pool(
    dns_server: DnsServer, fresh_backends: list[Backend], picker_factory: Callable[..., Daemon]
) -> None:
    """A name outside the server's zone gets REFUSED: the picker has no answer, so it must not
    conclude the name has no addresses. Never in touch at start, it waits its 10 s for a first
    answer (why this test takes that long), then starts empty and says it is down."""
    b2 = fresh_backends[0]
    assert dns_server.query("vllm.example", "A").rcode() == 5  # REFUSED
    picker = picker_factory(discovery_config(dns_server, name="vllm.example", port=b2.port))
    wait_until(lambda: picker.debug_discovery()["up"] is False, FOLLOW_S, message="discovery to report down")
    view = picker.debug_discovery()
    assert view["addresses"] == [], view
    assert "vllm.example" in (view["last_error"] or ""), view
    assert metric_sum(picker.metrics(), "llmlb_discovery_up", kind="dns") == 0


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback_usable(), reason="no IPv6 loopback (::1) on this box")


@needs_ipv6
def test_aaaa_records_and_an_ipv6_nameserver(
    tmp_path: Path,
    picker_factory: Callable[..., Daemon],
    envoy_factory: Callable[[Daemon, list[str]], Envoy],
) -> None:
    """The name has an A (127.0.0.5) and an AAAA (::1) record, the picker asks over IPv6
    ("[::1]:port"): both are endpoints, the IPv6 one bracketed, and Envoy reaches both."""
    hosts = ("127.0.0.5", "::1")
    backends = start_host_backends(hosts, tmp_path)
    server = DnsServer(tmp_path, listen=("::1", "127.0.0.1"), name="dnsmasq-v6")
    try:
        server.start()
        server.set_records({NAME: list(hosts)})
        assert server.nameserver == f"[::1]:{server.port}"
        v4, v6 = backends
        assert v6.address == f"[::1]:{v6.port}"
        picker = picker_factory(discovery_config(server, port=v4.port))
        view = picker.debug_discovery()
        assert sorted(view["addresses"]) == sorted([v4.address, v6.address]), view
        assert view["up"] is True, view
        envoy = envoy_factory(picker, [v4.address, v6.address])
        traffic_reaches(envoy, {v4.name, v6.name}, "v6")
        # The AAAA record removed: only the A one is left.
        server.set_records({NAME: [v4.host]})
        wait_for_pool(picker, [v4.address], "the AAAA record removed")
    finally:
        server.stop()
        stop_all(b.proc for b in backends)


def test_the_command_line_endpoints_replace_dns_discovery(
    dns_server: DnsServer, fresh_backends: list[Backend], tmp_path: Path
) -> None:
    b2, b3, _ = fresh_backends
    dns_server.set_records({NAME: [b2.host]})
    path = tmp_path / "llmlb-dns-cli.yaml"
    path.write_text(
        yaml.safe_dump({"discovery": discovery_config(dns_server, port=b2.port), "models_refresh": 0})
    )
    daemon = start_daemon([b3.address], "global_least_request", tmp_path, extra_args=["--config", str(path)])
    try:
        view = daemon.debug_discovery()
        # No dns source at all (not one that happens to agree): the pool is the flag's.
        assert view["kind"] == "static", view
        assert view["addresses"] == [b3.address], view
        assert [e["address"] for e in daemon.debug_endpoints()] == [b3.address]
        assert metric_sum(daemon.metrics(), "llmlb_discovery_up", kind="dns") == 0
    finally:
        daemon.stop()
