"""TLS for the ext_proc gRPC server (``grpc_tls``): loading, checking and reloading the PEM files.

The ext_proc transport (Rust, rustls) is given the certificates at start and again whenever
:meth:`TlsReloader.poll` (once a second, from the event loop) has seen the files change, stay
unchanged for one more poll (so a half-written file or a certificate replaced before its key is
not taken for a broken one), and load cleanly. A change therefore reaches new connections
within about two seconds; open connections keep the certificates they were made with. A broken
replacement keeps the old certificates: one error in the log and
``llmlb_tls_reloads_total{result="error"}`` per broken version of the files.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmlb.config import Config, ConfigError, GrpcTls, parse_listen

if TYPE_CHECKING:
    from llmlb.metrics import Metrics

log = logging.getLogger("llmlb.tls")

#: Seconds between two looks (stat) at the certificate files.
POLL_INTERVAL_S = 1.0

# What identifies one version of a file without reading it (None: the file is missing).
_Signature = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one consistent, checked version of the ``grpc_tls`` files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


class _FilesChanged(Exception):
    """A file changed while it was being loaded; the next poll tries again."""


def _no_password() -> str:
    raise ValueError("the key is encrypted (a passphrase-protected key is not supported)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(field, f"cannot read {path}: {e.strerror or _one_line(e)}") from None


def _check(tls: GrpcTls) -> None:
    """Lets OpenSSL parse the files the way the TLS stack will: each problem names its field."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=tls.cert)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError("grpc_tls.cert", f"{tls.cert}: not a PEM certificate ({_one_line(e)})") from None
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(
            "grpc_tls.key", f"{tls.key}: not a PEM private key matching grpc_tls.cert ({_one_line(e)})"
        ) from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ConfigError(
                "grpc_tls.client_ca", f"{tls.client_ca}: not a PEM CA certificate ({_one_line(e)})"
            ) from None


def load_material(tls: GrpcTls) -> TlsMaterial:
    """Reads and checks the ``grpc_tls`` files. Raises :class:`ConfigError` naming the field."""
    material = _read_all(tls)
    _check(tls)
    if _read_all(tls) != material:
        raise _FilesChanged
    return material


def _read_all(tls: GrpcTls) -> TlsMaterial:
    return TlsMaterial(
        cert=_read(tls.cert, "grpc_tls.cert"),
        key=_read(tls.key, "grpc_tls.key"),
        client_ca=None if tls.client_ca is None else _read(tls.client_ca, "grpc_tls.client_ca"),
    )


def check_files(tls: GrpcTls) -> TlsMaterial:
    """For ``serve`` and ``check-config``: usable files, or a :class:`ConfigError` naming the field."""
    for _ in range(3):
        try:
            return load_material(tls)
        except _FilesChanged:
            continue
    raise ConfigError("grpc_tls", "the certificate files keep changing while being read")


def _signature(tls: GrpcTls) -> _Signature:
    result: list[tuple[int, int, int, int] | None] = []
    for path in (tls.cert, tls.key, tls.client_ca):
        if path is None:
            continue
        try:
            st = os.stat(path)  # follows symlinks: a Kubernetes secret swaps its ..data link
        except OSError:
            result.append(None)
        else:
            result.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(result)


class TlsReloader:
    """Holds the current certificates and hands new ones to ``apply`` when the files change."""

    def __init__(
        self, tls: GrpcTls, metrics: Metrics, apply: Callable[[TlsMaterial], None] | None = None
    ) -> None:
        self.tls = tls
        self.metrics = metrics
        self.apply = apply
        signature = _signature(tls)
        self.material = check_files(tls)
        self._applied = signature  # the files' signature when self.material was read
        self._candidate: _Signature | None = None  # a change seen once, waiting to settle
        self._failed: _Signature | None = None  # a broken version already reported
        self._task: asyncio.Task[None] | None = None

    def poll(self) -> bool:
        """One look at the files; True when new certificates were taken."""
        signature = _signature(self.tls)
        if signature == self._applied:
            self._candidate = None
            return False
        if signature != self._candidate:
            self._candidate = signature  # changed since the last look: let it settle first
            return False
        if signature == self._failed:
            return False
        try:
            material = load_material(self.tls)
        except _FilesChanged:
            self._candidate = None
            return False
        except ConfigError as e:
            self._failed = signature
            self.metrics.tls_reloads.inc(("error",))
            log.error("grpc_tls: keeping the current certificates; the changed files are unusable: %s", e)
            return False
        if self.apply is not None:
            try:
                self.apply(material)
            except ValueError as e:  # OpenSSL took the files, the TLS stack did not
                self._failed = signature
                self.metrics.tls_reloads.inc(("error",))
                log.error("grpc_tls: keeping the current certificates; the changed files are unusable: %s", e)
                return False
        self.material = material
        self._applied = signature
        self._candidate = None
        self._failed = None
        self.metrics.tls_reloads.inc(("ok",))
        log.info("grpc_tls: reloaded the certificates (new connections use them)")
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmlb-tls-reload")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                self.poll()
            except Exception:  # never let a surprise stop the reloading for good
                log.exception("grpc_tls: certificate reload check failed")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(config: Config) -> None:
    """One warning at start when anyone who reaches the ext_proc port may open streams."""
    host, _ = parse_listen(config.grpc_listen, "grpc_listen")
    if _is_loopback(host) or (config.grpc_tls is not None and config.grpc_tls.client_ca is not None):
        return
    log.warning(
        "ext_proc on %s accepts streams from any client that can connect%s: such a client can fake "
        "load (hold streams open so that every endpoint looks busy) and skew every pick, though it "
        "reads no request data. Require client certificates (grpc_tls.client_ca, mTLS), or let only "
        "Envoy reach this port (a network policy or firewall); see docs/security.md",
        config.grpc_listen,
        "" if config.grpc_tls is None else " (TLS without grpc_tls.client_ca)",
    )
