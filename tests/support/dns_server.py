"""A real DNS server for the dns discovery tests: dnsmasq on a free loopback port, UDP and TCP.

- Foreground (``--keep-in-foreground``), no ``/etc/resolv.conf``, no ``/etc/hosts``, no config file,
  no pidfile; it logs to ``<workdir>/<name>.log`` and is stopped by the PID it was started with.
- Authoritative for ``llmlb.test`` only (``--local``): a name there that has no record is NXDOMAIN,
  a name with records of another type only (``txt_records``) has no A/AAAA (NOERROR, empty), and a
  name anywhere else is REFUSED.
- Records live in a ``--hostsdir`` directory in /etc/hosts format; dnsmasq re-reads it on change
  through inotify (a new, changed or deleted file: its records are replaced or dropped), so a test
  changes the answers with :meth:`DnsServer.set_records` while everything runs. Answers carry TTL 0
  (``--local-ttl``/``--neg-ttl``), and the cache holds nothing, so every query sees the file.
- Outages: :meth:`pause` (SIGSTOP: the port stays bound, queries go unanswered until :meth:`resume`)
  and :meth:`stop` + :meth:`start` (nothing listens in between; the restart reuses the port).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from tests.support.procs import HOST, ManagedProcess, wait_until

ZONE = "llmlb.test"
RECORDS_FILE = "records"


def find_dnsmasq() -> str | None:
    """dnsmasq from PATH, else Debian's /usr/sbin/dnsmasq (sbin is not on every user's PATH)."""
    found = shutil.which("dnsmasq")
    if found:
        return found
    candidate = Path("/usr/sbin/dnsmasq")
    return str(candidate) if os.access(candidate, os.X_OK) else None


def ipv6_loopback_usable() -> bool:
    """Whether ::1 can be bound here (a container may have IPv6 off)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_dns_port(hosts: Sequence[str]) -> int:
    """A port free for both UDP and TCP on every address of ``hosts`` (tried at most 50 times)."""
    for _ in range(50):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        finally:
            probe.close()
        if all(
            _bindable(host, port, kind) for host in hosts for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)
        ):
            return port
    raise AssertionError(f"no port free for UDP and TCP on {list(hosts)} in 50 tries")


def _bindable(host: str, port: int, kind: int) -> bool:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def hosts_text(records: Mapping[str, Iterable[str]]) -> str:
    """/etc/hosts lines: one per (address, name)."""
    lines = []
    for name, addresses in records.items():
        for address in addresses:
            lines.append(f"{ipaddress.ip_address(address)} {name}\n")
    return "".join(lines)


class DnsServer:
    """One dnsmasq; ``listen`` are the loopback addresses it answers on (default 127.0.0.1)."""

    def __init__(
        self,
        workdir: Path,
        *,
        listen: Sequence[str] = (HOST,),
        txt_records: Mapping[str, str] | None = None,
        name: str = "dnsmasq",
    ) -> None:
        binary = find_dnsmasq()
        assert binary, "no dnsmasq: bash scripts/install-test-deps.sh installs Debian's dnsmasq-base"
        for address in listen:
            assert ipaddress.ip_address(address).is_loopback, (
                f"tests serve DNS on loopback only, not {address}"
            )
        self.binary = binary
        self.listen = tuple(listen)
        self.txt_records = dict(txt_records or {})
        self.name = name
        self.hostsdir = workdir / f"{name}-hosts"
        self.hostsdir.mkdir(parents=True, exist_ok=True)
        # Staged next to the directory, then renamed into it: dnsmasq never reads half a file.
        self.staging = workdir / f"{name}-records.new"
        self.log_path = workdir / f"{name}.log"
        self.port = free_dns_port(self.listen)
        self.proc: ManagedProcess | None = None
        self.paused = False

    @property
    def nameserver(self) -> str:
        """``ip:port`` (``[v6]:port``) of the first listen address, as ``discovery.nameservers`` takes it."""
        return self.nameserver_on(self.listen[0])

    def nameserver_on(self, address: str) -> str:
        return (
            f"[{address}]:{self.port}"
            if ipaddress.ip_address(address).version == 6
            else f"{address}:{self.port}"
        )

    def argv(self) -> list[str]:
        argv = [
            self.binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--pid-file=",
            f"--port={self.port}",
            "--bind-interfaces",
            *(f"--listen-address={address}" for address in self.listen),
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--hostsdir={self.hostsdir}",
            f"--local=/{ZONE}/",
            "--local-ttl=0",
            "--neg-ttl=0",
            "--cache-size=0",
            # Stay root: the hosts directory is under the tests' private tmp dir (mode 0700).
            "--user=root",
            "--log-facility=-",
            "--log-queries",
        ]
        argv += [f"--txt-record={name},{text}" for name, text in self.txt_records.items()]
        return argv

    # --- records ----------------------------------------------------------------------------------

    def set_records(self, records: Mapping[str, Iterable[str]], *, wait: bool = True) -> None:
        """Replaces every record (name -> addresses; a name left out is NXDOMAIN, or has no address
        if it has a TXT record). With ``wait``, returns once the server answers accordingly."""
        records = {name: [str(ipaddress.ip_address(a)) for a in addrs] for name, addrs in records.items()}
        previous = set(self._records_now())
        self.staging.write_text(hosts_text(records))
        os.replace(self.staging, self.hostsdir / RECORDS_FILE)
        if wait and not self.paused and self.proc is not None:
            for name in set(records) | previous:
                self.wait_answer(name, records.get(name, []))

    def _records_now(self) -> list[str]:
        path = self.hostsdir / RECORDS_FILE
        if not path.exists():
            return []
        return [line.split()[1] for line in path.read_text().splitlines() if line.strip()]

    # --- queries ----------------------------------------------------------------------------------

    def query(self, qname: str, rdtype: str, timeout: float = 1.0) -> dns.message.Message:
        """One UDP query to the first listen address."""
        request = dns.message.make_query(qname, rdtype)
        return dns.query.udp(request, self.listen[0], port=self.port, timeout=timeout)

    def addresses(self, qname: str) -> set[str]:
        """Every A and AAAA address of ``qname`` (empty on NXDOMAIN or no records)."""
        found: set[str] = set()
        for rdtype in ("A", "AAAA"):
            response = self.query(qname, rdtype)
            assert response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN), dns.rcode.to_text(
                response.rcode()
            )
            for rrset in response.answer:
                found.update(record.to_text() for record in rrset)
        return found

    def wait_answer(self, qname: str, addresses: Iterable[str], timeout: float = 10.0) -> None:
        expected = {str(ipaddress.ip_address(a)) for a in addresses}
        wait_until(
            lambda: self.addresses(qname) == expected,
            timeout,
            interval=0.02,
            message=f"{self.name} to answer {qname} -> {sorted(expected)}",
        )

    # --- process ----------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> DnsServer:
        """Starts dnsmasq (again, on the same port after :meth:`stop`); returns once it answers."""
        assert self.proc is None or not self.proc.running, f"{self.name} already running"
        self.proc = ManagedProcess(self.name, self.argv(), self.log_path).start()
        self.paused = False
        try:
            wait_until(
                self._answers, timeout, interval=0.05, message=f"{self.name} to answer on port {self.port}"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if not self.proc.running:
            self.proc.fail(f"{self.name} exited")
        try:
            response = self.query(f"probe.{ZONE}", "A", timeout=0.5)
        except dns.exception.Timeout:
            return False
        return response.rcode() == dns.rcode.NXDOMAIN

    def pause(self) -> None:
        """SIGSTOP: the port stays bound, but nothing is answered (a hung server)."""
        assert self.proc is not None, f"{self.name} was never started"
        assert self.proc.running, f"{self.name} is not running"
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        assert self.proc.running, f"{self.name} is not running"
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Stops the process by its PID (continued first, so SIGTERM is not left pending)."""
        if self.proc is None:
            return
        if self.paused and self.proc.running:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False
        self.proc.stop()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
