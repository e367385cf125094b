"""ext_proc over TLS: mTLS through a real Envoy 1.40, clients without a trusted certificate kept
out (the "fake load" reproduction), TLS without client_ca, and certificate reloading."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.support.certs import CA, Issued, replace_file, serial_of_der
from tests.support.extproc_client import ExtProcCall, bodyless_request
from tests.support.procs import (
    HOST,
    Backend,
    Daemon,
    Gateway,
    ManagedProcess,
    metric_sum,
    start_daemon,
    start_envoy,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.e2e

NOT_CONNECTED_S = 2.0  # how long a channel that must never connect is given


@dataclass
class Pki:
    directory: Path
    ca: CA
    untrusted: CA
    server: Issued
    client: Issued  # Envoy's
    rogue: Issued  # signed by the untrusted CA

    @property
    def ca_path(self) -> str:
        return str(self.directory / "ca.crt")

    def path(self, name: str) -> str:
        return str(self.directory / name)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    ca, untrusted = CA("llmlb test CA"), CA("untrusted CA")
    pki = Pki(directory, ca, untrusted, ca.server(), ca.client("envoy"), untrusted.client("rogue"))
    ca.write(directory)
    pki.server.write(directory, "tls")
    pki.client.write(directory, "envoy")
    pki.rogue.write(directory, "rogue")
    return pki


@pytest.fixture
def owned() -> Iterator[list[ManagedProcess]]:
    procs: list[ManagedProcess] = []
    yield procs
    stop_all(reversed(procs))


def tls_daemon(
    pki: Pki, workdir: Path, owned: list[ManagedProcess], endpoints: list[str], *, client_ca: bool = True
) -> Daemon:
    tls = {"cert": "pki/tls.crt", "key": "pki/tls.key"}
    if client_ca:
        tls["client_ca"] = "pki/ca.crt"
    config = workdir / "llmlb-tls.yaml"  # paths relative to the config file
    config.write_text(json.dumps({"grpc_tls": tls, "health_check_interval": 0}))
    daemon = start_daemon(
        endpoints, "global_least_request", workdir, extra_args=["--config", str(config)], name="llmlb-tls"
    )
    owned.append(daemon.proc)
    return daemon


def channel_connects(channel: grpc.Channel, timeout: float = NOT_CONNECTED_S) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    return True


def streams_total(daemon: Daemon) -> float:
    return metric_sum(daemon.metrics(), "llmlb_extproc_streams_total")


def peer_certificate_serial(daemon: Daemon, pki: Pki) -> int:
    """The serial of the certificate the daemon presents to a new connection."""
    context = ssl.create_default_context(cafile=pki.ca_path)
    context.load_cert_chain(pki.path("envoy.crt"), pki.path("envoy.key"))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((HOST, daemon.grpc_port), timeout=3) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return serial_of_der(der)


def test_mtls_through_envoy_routes_and_honours_the_pick(
    backends: list[Backend], pki: Pki, tmp_path: Path, owned: list[ManagedProcess], mode: str
) -> None:
    endpoints = [b.address for b in backends]
    daemon = tls_daemon(pki, tmp_path, owned, endpoints)
    envoy = start_envoy(
        endpoints,
        daemon.grpc_port,
        mode,
        tmp_path,
        name=f"envoy-mtls-{mode}",
        extra_args=[
            "--picker-ca", pki.ca_path,
            "--picker-cert", pki.path("envoy.crt"),
            "--picker-key", pki.path("envoy.key"),
        ],
    )  # fmt: skip
    owned.append(envoy.proc)
    gw = Gateway("global_least_request", mode, envoy, daemon, backends)
    gw.reset()
    for i in range(6):
        before = gw.picks()
        reply = gw.chat([{"role": "user", "content": f"over mTLS {i}"}])
        assert reply.status == 200, reply
        served = gw.address_of(reply.served_by)
        after = gw.picks()
        assert after.get(served, 0) == before.get(served, 0) + 1, (before, after, served)
        assert sum(after.values()) == sum(before.values()) + 1
    assert {b.name for b in backends} == {b.name for b in backends if b.stats()["total"] > 0}
    daemon.wait_idle()


def test_clients_without_a_trusted_certificate_cannot_fake_load(
    pki: Pki, tmp_path: Path, owned: list[ManagedProcess]
) -> None:
    # Before grpc_tls, 300 plaintext streams that sent request headers and stayed open raised
    # every endpoint's in-flight count to 100 with no real traffic. Now they cannot even connect.
    endpoints = ["10.12.0.1:8000", "10.12.0.2:8000", "10.12.0.3:8000"]
    daemon = tls_daemon(pki, tmp_path, owned, endpoints)
    attackers = {
        "plaintext": grpc.insecure_channel(daemon.grpc_address),
        "tls, no certificate": grpc.secure_channel(
            daemon.grpc_address, grpc.ssl_channel_credentials(pki.ca.cert_pem)
        ),
        "certificate from an untrusted CA": grpc.secure_channel(
            daemon.grpc_address,
            grpc.ssl_channel_credentials(pki.ca.cert_pem, pki.rogue.key_pem, pki.rogue.cert_pem),
        ),
    }
    try:
        for name, channel in attackers.items():
            assert not channel_connects(channel), f"{name}: connected"
            calls = [ExtProcCall(channel, timeout=3.0) for _ in range(10)]
            for call in calls:
                call.send(bodyless_request())  # a GET: picked on the headers alone
            for call in calls:
                with pytest.raises(AssertionError, match="UNAVAILABLE"):
                    call.recv(timeout=5.0)
        assert streams_total(daemon) == 0
        assert daemon.inflight() == dict.fromkeys(endpoints, 0)
    finally:
        for channel in attackers.values():
            channel.close()
    # The same fake stream from a client with Envoy's certificate is served (and counted): the
    # check above is the certificate, nothing else.
    good = grpc.secure_channel(
        daemon.grpc_address,
        grpc.ssl_channel_credentials(pki.ca.cert_pem, pki.client.key_pem, pki.client.cert_pem),
    )
    with good:
        call = ExtProcCall(good)
        call.send(bodyless_request())
        assert call.recv().HasField("request_headers")
        assert sum(daemon.inflight().values()) == 1
        call.close()
        daemon.wait_idle()


def test_tls_without_client_ca_takes_tls_clients_only(
    pki: Pki, tmp_path: Path, owned: list[ManagedProcess]
) -> None:
    daemon = tls_daemon(pki, tmp_path, owned, ["10.12.0.1:8000"], client_ca=False)
    with grpc.insecure_channel(daemon.grpc_address) as plaintext:
        assert not channel_connects(plaintext)
    with grpc.secure_channel(daemon.grpc_address, grpc.ssl_channel_credentials(pki.ca.cert_pem)) as tls:
        assert channel_connects(tls, timeout=5.0)
        call = ExtProcCall(tls)
        call.send(bodyless_request())
        assert call.recv().HasField("request_headers")
        call.close()
    daemon.wait_idle()


def test_certificates_are_reloaded_and_a_broken_replacement_is_refused(
    pki: Pki, tmp_path: Path, owned: list[ManagedProcess]
) -> None:
    daemon = tls_daemon(pki, tmp_path, owned, ["10.12.0.1:8000"])
    assert peer_certificate_serial(daemon, pki) == pki.server.serial
    # An established connection keeps working across the change.
    channel = grpc.secure_channel(
        daemon.grpc_address,
        grpc.ssl_channel_credentials(pki.ca.cert_pem, pki.client.key_pem, pki.client.cert_pem),
    )
    with channel:
        assert channel_connects(channel, timeout=5.0)
        fresh = pki.ca.server()
        assert fresh.serial != pki.server.serial
        fresh.write(pki.directory, "tls")
        started = time.monotonic()
        wait_until(
            lambda: peer_certificate_serial(daemon, pki) == fresh.serial,
            10.0,
            interval=0.2,
            message="a new connection to present the new certificate",
        )
        assert time.monotonic() - started < 5.0
        assert metric_sum(daemon.metrics(), "llmlb_tls_reloads_total", result="ok") == 1
        # Garbage in place of the certificate: the last good one stays, one error is counted.
        replace_file(pki.directory / "tls.crt", b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        wait_until(
            lambda: metric_sum(daemon.metrics(), "llmlb_tls_reloads_total", result="error") == 1,
            10.0,
            interval=0.2,
            message="the broken certificate to be reported",
        )
        assert peer_certificate_serial(daemon, pki) == fresh.serial
        time.sleep(2.5)  # more polls of the same broken file: still one error
        assert metric_sum(daemon.metrics(), "llmlb_tls_reloads_total", result="error") == 1
        assert "grpc_tls.cert" in daemon.proc.log_tail(200)
        call = ExtProcCall(channel)
        call.send(bodyless_request())
        assert call.recv().HasField("request_headers")
        call.close()
    daemon.wait_idle()
    assert daemon.proc.running
