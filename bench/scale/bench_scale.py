"""Gateway mode at scale: llmlb side by side with the llm-d endpoint picker (the EPP, Go).

Every picker runs behind the same Envoy config shape (``llmlb envoy-config``), the same backends,
the same load, measured in alternating order. Pickers:

- ``epp``: the EPP binary from ``../shared/anchors/epp-linux-amd64.gz`` (file discovery, its
  chart's default scorers; FULL_DUPLEX_STREAMED both ways, the only mode it supports). Left out
  when the binary is absent (CI) or with ``--no-epp``.
- ``llmlb@full-duplex`` / ``llmlb@buffered``: ``llmlb serve --policy prefix_cache`` behind Envoy in
  that mode.

Shapes (each a wrk run of ``--seconds``; CPU is utime+stime of the picker's process tree):

- ``small``: 2 KB chat, small JSON answer, 8 connections: requests/s and CPU per request.
- ``stream``: 2 KB chat answered by 1,000 SSE chunks; ``chunk`` CPU is its extra CPU over a
  one-chunk answer divided by the extra ext_proc messages (Envoy's own ``stream_msgs_sent``).
- ``big400k`` / ``big4m``: a 400 KB (about 100k tokens) and a 4 MB prompt, small answer.
- ``agentic``: the 400 KB prompt answered by 1,000 SSE chunks, sent back to back: Envoy reads
  several chunks at once, so a request costs ~130-220 ext_proc messages, not 1,000.
- ``agentic-paced``: the same, one chunk a millisecond, as a model server streams tokens: each
  chunk reaches Envoy alone and costs its own ext_proc message (~1,000 a request, the count the
  issue's table was measured at). 8 connections; each request takes over a second, so each run
  lasts at least 15 s.
- ``idle``: 100 idle model servers (one Envoy serving a vLLM /metrics page on 100 ports), no
  traffic; the picker scrapes each every 50 ms (llmlb: ``least_busy``, with 1 and 2 workers):
  cores used.
- ``memory``: RSS of the picker (all processes) before, at the peak and after: 500 concurrent
  streamed answers of 5,000 chunks each, then 4 MB prompts back to back.

Latency added is p50 through the picker minus p50 through Envoy alone (no ext_proc) at the
same shape. The report (``--label`` names the run: ``before``/``after``) goes to
``bench/scale/results-<label>.json`` and prints as a table with each llmlb figure's ratio to the
EPP's; ``--smoke`` is the short CI variant (no EPP, small shapes, 1 s runs, checks only that
every figure was measured and no request failed).

    python bench/scale/bench_scale.py [--label after] [--rounds 3] [--seconds 5] [--shapes ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.e2e.bench_e2e import chat_bodies  # noqa: E402

from tests.support.procs import (  # noqa: E402
    HOST,
    Envoy,
    ManagedProcess,
    backend_envoy_yaml,
    free_port,
    free_ports,
    front_envoy_yaml,
    launch_backends,
    launch_envoy,
    process_tree_cpu,
    start_daemon,
    stop_all,
    wait_until,
)

HERE = Path(__file__).resolve().parent
EPP_ARCHIVE = ROOT.parent / "shared" / "anchors" / "epp-linux-amd64.gz"
PICKERS = ("epp", "llmlb@full-duplex", "llmlb@buffered")
# ``--baseline DIR``: another llmlb source tree (its extension built in place) measured in the
# same run as ``before@MODE``, for before/after tables.
BASELINE_PICKERS = ("before@full-duplex", "before@buffered")
_baseline: Path | None = None


def _is_llmlb(name: str) -> bool:
    return name.startswith(("llmlb", "before"))


SHAPES = ("small", "stream", "big400k", "big4m", "agentic", "agentic-paced", "idle", "memory")
# The SSE answers of the streamed shapes (the test backend's knobs, see tests/support/backend.py).
STREAM_CHUNKS = 1_000
MEMORY_STREAMS = 500
MEMORY_CHUNKS = 5_000
IDLE_SERVERS = 100
# The model the test backend serves (llmlb learns it and refuses any other with 404).
BACKEND_MODEL = "test-model"

WRK_SCRIPT = r"""
local body
local headers = {["Content-Type"] = "application/json"}
init = function(args)
  local f = io.open(os.getenv("LLMLB_BENCH_BODY"), "rb")
  body = f:read("*a")
  f:close()
  local chunks = os.getenv("LLMLB_BENCH_CHUNKS")
  if chunks ~= nil and chunks ~= "" then
    headers["x-test-stream-chunks"] = chunks
    headers["x-test-stream-interval-ms"] = os.getenv("LLMLB_BENCH_INTERVAL_MS")
  end
end
request = function()
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LLMLB_RESULT {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,' ..
    '"error_kinds":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True)
class Shape:
    """One load: the body (bytes of the prompt), SSE chunks in the answer (0: plain JSON),
    wrk's connections, the backend's pause between chunks, and the shortest run that completes
    enough requests to measure (CPU is counted in 10 ms ticks)."""

    name: str
    prompt_bytes: int
    chunks: int
    conns: int
    interval_ms: int = 0
    min_seconds: float = 0.0


REQUEST_SHAPES = {
    "small": Shape("small", 2_000, 0, 8),
    "stream1": Shape("stream1", 2_000, 1, 8),
    "stream": Shape("stream", 2_000, STREAM_CHUNKS, 8),
    "big400k": Shape("big400k", 400_000, 0, 4),
    "big4m": Shape("big4m", 4_000_000, 0, 2),
    "agentic": Shape("agentic", 400_000, STREAM_CHUNKS, 4),
    "agentic-paced": Shape("agentic-paced", 400_000, STREAM_CHUNKS, 8, interval_ms=1, min_seconds=15),
}


@dataclass(frozen=True)
class Run:
    """How long and how often each measurement runs, and where its files go."""

    work: Path
    seconds: float
    rounds: int
    smoke: bool
    log: Callable[[str], None]


@dataclass
class Picker:
    """A picker under test behind its own front Envoy (``url``); ``pid`` is the picker's."""

    name: str
    url: str
    pid: int | None
    envoy: Envoy
    procs: list[ManagedProcess] = field(default_factory=list)


def epp_binary(work: Path) -> Path | None:
    if not EPP_ARCHIVE.exists():
        return None
    binary = work / "epp"
    with gzip.open(EPP_ARCHIVE) as packed, binary.open("wb") as out:
        shutil.copyfileobj(packed, out)
    binary.chmod(0o755)
    return binary


def start_epp(binary: Path, endpoints: list[str], work: Path, name: str) -> tuple[ManagedProcess, int]:
    """The EPP with file discovery and its chart's default scorers (see ../shared/anchors)."""
    lines = ["endpoints:"]
    for i, endpoint in enumerate(endpoints):
        host, port = endpoint.rsplit(":", 1)
        lines += [f"  - name: e{i}", f'    address: "{host}"', f'    port: "{port}"']
    (work / f"{name}-endpoints.yaml").write_text("\n".join(lines) + "\n")
    (work / f"{name}.yaml").write_text(
        f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{name: file-discovery, type: file-discovery,
   parameters: {{path: {work / f"{name}-endpoints.yaml"}, watchFile: false}}}}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- {{type: metrics-data-source, parameters: {{scheme: http, path: /metrics, insecureSkipVerify: true}}}}
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
dataLayer:
  discovery:
    pluginRef: file-discovery
"""
    )
    grpc_port, health_port, metrics_port = free_ports(3)
    argv = [
        str(binary),
        "--config-file",
        str(work / f"{name}.yaml"),
        "--pool-name",
        "p",
        "--pool-namespace",
        "p",
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
        "--secure-serving=false",
        "--health-checking",
        "--tracing=false",
        "--zap-encoder",
        "json",
        "--metrics-endpoint-auth=false",
        "--enable-pprof=false",
        "--v=1",
    ]
    proc = ManagedProcess(name, argv, work / f"{name}.log").start()
    wait_until(lambda: _accepts(grpc_port), 20.0, message="EPP gRPC port open")
    return proc, grpc_port


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_picker(
    name: str, endpoints: list[str], work: Path, *, policy: str = "prefix_cache", workers: int = 1
) -> Picker:
    """``name`` is ``epp``, ``llmlb@MODE`` or ``envoy`` (no picker)."""
    procs: list[ManagedProcess] = []
    pid: int | None = None
    port: int | None = None
    mode = "full-duplex"
    tag = f"{name.replace('@', '-')}-{policy}-w{workers}-{len(endpoints)}"
    if name == "epp":
        binary = epp_binary(work)
        assert binary is not None
        proc, port = start_epp(binary, endpoints, work, tag)
        procs.append(proc)
        pid = proc.pid
    elif _is_llmlb(name):
        mode = name.partition("@")[2] or "buffered"
        config = work / f"{tag}.yaml"
        config.write_text("health_check_interval: 0\nlog_level: warning\n")
        extra = ["--config", str(config)] + (["--workers", str(workers)] if workers > 1 else [])
        env = None
        if name.startswith("before"):
            assert _baseline is not None
            env = {"PYTHONPATH": str(_baseline / "python")}
        daemon = start_daemon(endpoints, policy, work, extra_args=extra, name=tag, env=env)
        procs.append(daemon.proc)
        pid, port = daemon.proc.pid, daemon.grpc_port
    config_yaml, listen, admin = front_envoy_yaml(endpoints, port, mode)
    if name == "epp":
        # The EPP answers gRPC health on its own port, not the ext_proc one.
        config_yaml = config_yaml.replace("grpc_health_check", "_unused_grpc_health_check")
        import yaml

        doc = yaml.safe_load(config_yaml)
        for cluster in doc["static_resources"]["clusters"]:
            cluster.pop("health_checks", None)
        config_yaml = yaml.safe_dump(doc, sort_keys=False)
    envoy = launch_envoy(config_yaml, listen, admin, mode, work, name=f"front-{tag}")
    procs.append(envoy.proc)
    return Picker(name, f"{envoy.url}/v1/chat/completions", pid, envoy, procs)


def envoy_counters(envoy: Envoy, pattern: str) -> dict[str, int]:
    """Envoy's counters whose names match ``pattern`` (its admin ``/stats?filter=``)."""
    with urllib.request.urlopen(f"{envoy.admin_url}/stats?filter={pattern}", timeout=5) as reply:
        text = reply.read().decode()
    counters: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            counters[name] = int(value)
    return counters


def envoy_messages(envoy: Envoy) -> int:
    """ext_proc messages Envoy sent to the picker so far (its ``stream_msgs_sent`` counter)."""
    counters = envoy_counters(envoy, "ext_proc")
    return sum(v for k, v in counters.items() if k.endswith("ext_proc.stream_msgs_sent"))


# Why requests failed, from the front Envoy's counters: the picker's side (its ext_proc streams)
# or the backends' (Envoy could not reach them in time: the test backends saturate first).
FAILURE_COUNTERS = {
    "ext_proc_streams_failed": "ext_proc.streams_failed",
    "ext_proc_message_timeouts": "ext_proc.message_timeouts",
    "ext_proc_failure_mode_allowed": "ext_proc.failure_mode_allowed",
    "backend_connect_timeouts": "cluster.pool.upstream_cx_connect_timeout",
    "backend_pending_ejected": "cluster.pool.upstream_rq_pending_failure_eject",
}


def failure_counts(envoy: Envoy) -> dict[str, int]:
    counters = envoy_counters(envoy, "ext_proc|cluster.pool.upstream")
    return {
        key: sum(v for name, v in counters.items() if name.endswith(suffix))
        for key, suffix in FAILURE_COUNTERS.items()
    }


def shape_for(name: str, smoke: bool) -> Shape:
    """The shape as run: the smoke run's 1 s runs cannot hold a paced answer of 1,000 chunks
    (over a second each), so there it is 50 chunks."""
    shape = REQUEST_SHAPES[name]
    return dataclasses.replace(shape, chunks=50, min_seconds=0) if smoke and shape.interval_ms else shape


def start_wrk(url: str, shape: Shape, seconds: float, work: Path) -> subprocess.Popen[str]:
    body = work / f"body-{shape.prompt_bytes}-{shape.chunks > 0}.json"
    if not body.exists():
        payload = json.loads(chat_bodies(shape.prompt_bytes, 1)[0])
        payload["model"] = BACKEND_MODEL
        if shape.chunks:
            payload["stream"] = True
        body.write_bytes(json.dumps(payload).encode())
    script = work / "scale.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    env = {
        **os.environ,
        "LLMLB_BENCH_BODY": str(body),
        "LLMLB_BENCH_CHUNKS": str(shape.chunks) if shape.chunks else "",
        "LLMLB_BENCH_INTERVAL_MS": str(shape.interval_ms),
    }
    argv = ["wrk", "-t1", f"-c{shape.conns}", f"-d{seconds:g}s", "--timeout", "60s", "-s", str(script), url]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wrk_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    for line in stdout.splitlines():
        if line.startswith("LLMLB_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("LLMLB_RESULT "))
            return result
    raise RuntimeError(f"wrk gave no result (exit {proc.returncode}):\n{stdout}\n{stderr}")


def run_wrk(url: str, shape: Shape, seconds: float, work: Path) -> dict[str, Any]:
    return wrk_result(start_wrk(url, shape, seconds, work), seconds + 90)


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (llmlb's workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(entry) != pid and int(stat[1]) != pid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def measure(picker: Picker, shape: Shape, seconds: float, work: Path) -> dict[str, Any]:
    assert picker.pid is not None or picker.name == "envoy"
    cpu0 = process_tree_cpu(picker.pid) if picker.pid else 0.0
    msgs0 = envoy_messages(picker.envoy) if picker.pid else 0
    r = run_wrk(picker.url, shape, max(seconds, shape.min_seconds), work)
    r["cpu_s"] = process_tree_cpu(picker.pid) - cpu0 if picker.pid else 0.0
    r["messages"] = envoy_messages(picker.envoy) - msgs0 if picker.pid else 0
    r.update(picker=picker.name, shape=shape.name)
    return r


def idle_cores(pid: int, seconds: float) -> float:
    cpu0, t0 = process_tree_cpu(pid), time.monotonic()
    time.sleep(seconds)
    return (process_tree_cpu(pid) - cpu0) / (time.monotonic() - t0)


def memory_shapes(smoke: bool) -> list[Shape]:
    """Many long streamed answers at once, then 4 MB prompts back to back on one connection."""
    chunks, streams = (50, 20) if smoke else (MEMORY_CHUNKS, MEMORY_STREAMS)
    return [Shape("memory-streams", 2_000, chunks, streams), Shape("memory-4m", 4_000_000, 0, 1)]


def memory_run(picker: Picker, work: Path, seconds: float, smoke: bool) -> dict[str, Any]:
    """RSS before, at the peak of each load, and after."""
    assert picker.pid is not None
    before = rss_bytes(picker.pid)
    peaks: dict[str, int] = {}
    errors = 0
    by_load: dict[str, dict[str, int]] = {}
    for shape in memory_shapes(smoke):
        peak = 0
        failures = failure_counts(picker.envoy)
        proc = start_wrk(picker.url, shape, seconds, work)
        deadline = time.monotonic() + seconds + 90
        while proc.poll() is None and time.monotonic() < deadline:
            peak = max(peak, rss_bytes(picker.pid))
            time.sleep(0.25)
        result = wrk_result(proc, max(1.0, deadline - time.monotonic()))
        after = failure_counts(picker.envoy)
        by_load[shape.name] = {
            "requests": result["requests"],
            **result.get("error_kinds", {}),
            **{key: after[key] - failures[key] for key in after},
        }
        errors += result["errors"]
        peaks[shape.name] = peak
    time.sleep(2.0)
    return {
        "picker": picker.name,
        "shape": "memory",
        "rss_before": before,
        "rss_peak_streams": peaks["memory-streams"],
        "rss_peak_4m": peaks["memory-4m"],
        "rss_after": rss_bytes(picker.pid),
        "errors": errors,
        "by_load": by_load,
    }


def stream_backends(work: Path, count: int = 3) -> tuple[list[ManagedProcess], list[str]]:
    """The streamed shapes need a server that answers in chunks: tests/support/backend.py."""
    places = [(f"s{i}", HOST, port) for i, port in enumerate(free_ports(count), start=1)]
    backends = launch_backends(places, work, "--engine", "vllm")
    return [b.proc for b in backends], [b.address for b in backends]


def request_runs(pickers: list[str], shapes: list[str], run: Run) -> list[dict[str, Any]]:
    work, seconds, rounds, log = run.work, run.seconds, run.rounds, run.log
    # Plain answers come from an Envoy backend, streamed ones from the aiohttp test backend.
    requested = [s for s in shapes if s in REQUEST_SHAPES and s != "stream1"]
    plain = [s for s in requested if not REQUEST_SHAPES[s].chunks]
    streamed = [s for s in requested if REQUEST_SHAPES[s].chunks]
    if "stream" in streamed:
        streamed.insert(0, "stream1")
    results: list[dict[str, Any]] = []
    procs: list[ManagedProcess] = []
    try:
        for group, backend_kind in ((plain, "envoy"), (streamed, "aiohttp")):
            if not group:
                continue
            if backend_kind == "envoy":
                ports, admin = free_ports(3), free_port()
                backend = launch_envoy(
                    backend_envoy_yaml(ports, admin), ports[0], admin, "backend", work, name="backends"
                )
                procs.append(backend.proc)
                endpoints = [f"{HOST}:{p}" for p in ports]
            else:
                backend_procs, endpoints = stream_backends(work)
                procs += backend_procs
            setups = [start_picker(name, endpoints, work) for name in ["envoy", *pickers]]
            for s in setups:
                procs += s.procs
            warm_up = REQUEST_SHAPES["small" if backend_kind == "envoy" else "stream1"]
            for s in setups:
                run_wrk(s.url, warm_up, 1, work)
            for round_no in range(rounds):
                for shape_name in group:
                    order = setups[round_no % len(setups) :] + setups[: round_no % len(setups)]
                    for s in order:
                        r = measure(s, shape_for(shape_name, run.smoke), seconds, work)
                        r["round"] = round_no
                        results.append(r)
                        rps = r["requests"] / (r["duration_us"] / 1e6)
                        cpu = r["cpu_s"] / max(r["requests"], 1) * 1e6
                        log(
                            f"{s.name:20} {shape_name:13} {rps:8.0f} req/s  {cpu:9.0f} µs CPU/req  "
                            f"p50 {r['p50_us'] / 1000:.2f} ms  errors {r['errors']}"
                        )
            stop_all(reversed(procs))
            procs = []
    finally:
        stop_all(reversed(procs))
    return results


def idle_runs(pickers: list[str], run: Run) -> list[dict[str, Any]]:
    work, smoke, log = run.work, run.smoke, run.log
    seconds = 2.0 if smoke else max(run.seconds, 10.0)
    servers = 10 if smoke else IDLE_SERVERS
    ports, admin = free_ports(servers), free_port()
    backend = launch_envoy(
        backend_envoy_yaml(ports, admin), ports[0], admin, "backend", work, name="idle-backends"
    )
    endpoints = [f"{HOST}:{p}" for p in ports]
    results = []
    try:
        variants = [(p, 1) for p in pickers if p == "epp"]
        for kind in ("llmlb", "before"):
            if any(p.startswith(kind) for p in pickers):
                variants += [(f"{kind}@buffered", 1), (f"{kind}@buffered", 2)]
        for name, workers in variants:
            picker = start_picker(name, endpoints, work, policy="least_busy", workers=workers)
            try:
                assert picker.pid is not None
                time.sleep(2.0 if smoke else 5.0)  # every endpoint scraped, steady state
                cores = idle_cores(picker.pid, seconds)
            finally:
                stop_all(reversed(picker.procs))
            label = name if name == "epp" else f"{name.partition('@')[0]}/w{workers}"
            results.append({"picker": label, "shape": "idle", "servers": servers, "cores": cores})
            log(f"{label:20} idle     {servers} servers: {cores:.3f} cores")
    finally:
        backend.proc.stop()
    return results


def memory_runs(pickers: list[str], run: Run) -> list[dict[str, Any]]:
    work, smoke, log = run.work, run.smoke, run.log
    seconds = 2.0 if smoke else max(run.seconds * 4, 20.0)
    backend_procs, endpoints = stream_backends(work)
    results = []
    try:
        for name in pickers:
            picker = start_picker(name, endpoints, work)
            try:
                r = memory_run(picker, work, seconds, smoke)
            finally:
                stop_all(reversed(picker.procs))
            results.append(r)
            mib = 1 << 20
            log(
                f"{name:20} memory   RSS {r['rss_before'] / mib:.0f} MiB -> peak "
                f"{r['rss_peak_streams'] / mib:.0f} (streams) / {r['rss_peak_4m'] / mib:.0f} (4 MB "
                f"prompts) -> after {r['rss_after'] / mib:.0f} MiB"
            )
    finally:
        stop_all(backend_procs)
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per picker: the figures the targets name."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["picker"], r["shape"]), []).append(r)

    def per_request(picker: str, shape: str) -> tuple[float, float, float, float]:
        runs = by.get((picker, shape), [])
        requests = sum(r["requests"] for r in runs)
        seconds = sum(r["duration_us"] for r in runs) / 1e6
        if not requests:
            return (0.0, 0.0, 0.0, 0.0)
        p50 = sorted(r["p50_us"] for r in runs)[len(runs) // 2]
        return (
            sum(r["cpu_s"] for r in runs) / requests * 1e6,
            requests / seconds,
            float(p50),
            sum(r["messages"] for r in runs) / requests,
        )

    out: dict[str, dict[str, float]] = {}
    pickers = sorted({p for p, _ in by})
    for picker in pickers:
        figures: dict[str, float] = {}
        for shape in REQUEST_SHAPES:
            cpu, rps, p50, msgs = per_request(picker, shape)
            if rps:
                figures[f"{shape}.cpu_us"] = cpu
                figures[f"{shape}.rps"] = rps
                figures[f"{shape}.messages"] = msgs
                envoy_p50 = per_request("envoy", shape)[2]
                if picker != "envoy" and envoy_p50:
                    figures[f"{shape}.added_p50_us"] = p50 - envoy_p50
        one = per_request(picker, "stream1")
        many = per_request(picker, "stream")
        if one[1] and many[1]:
            extra = many[3] - one[3]
            figures["chunk.cpu_us"] = (many[0] - one[0]) / extra if extra > 0.5 else 0.0
        for r in by.get((picker, "idle"), []):
            figures["idle.cores"] = r["cores"]
        for r in by.get((picker, "memory"), []):
            for key in ("rss_before", "rss_peak_streams", "rss_peak_4m", "rss_after"):
                figures[f"memory.{key}_mib"] = r[key] / (1 << 20)
            highest = max(r["rss_peak_streams"], r["rss_peak_4m"], r["rss_after"])
            figures["memory.growth_mib"] = (highest - r["rss_before"]) / (1 << 20)
        out[picker] = figures
    return out


ROWS = [
    ("small.cpu_us", "2 KB chat, small answer: CPU µs/request", 0),
    ("small.rps", "2 KB chat: requests/s at 8 connections", 0),
    ("small.added_p50_us", "2 KB chat: p50 added over Envoy alone, µs", 0),
    ("chunk.cpu_us", "per streamed response chunk: CPU µs", 1),
    ("stream.cpu_us", "2 KB chat, 1,000 streamed chunks: CPU µs/request", 0),
    ("stream.added_p50_us", "2 KB chat, 1,000 chunks: p50 added, µs", 0),
    ("big400k.cpu_us", "400 KB prompt: CPU µs/request", 0),
    ("big400k.added_p50_us", "400 KB prompt: p50 added, µs", 0),
    ("big4m.cpu_us", "4 MB prompt: CPU µs/request", 0),
    ("big4m.added_p50_us", "4 MB prompt: p50 added, µs", 0),
    ("agentic.cpu_us", "agentic (400 KB + 1,000 chunks): CPU µs/request", 0),
    ("agentic.added_p50_us", "agentic: p50 added, µs", 0),
    ("agentic.messages", "agentic: ext_proc messages/request", 0),
    ("agentic-paced.cpu_us", "agentic, chunks paced 1 ms: CPU µs/request", 0),
    ("agentic-paced.added_p50_us", "agentic, paced: p50 added, µs", 0),
    ("agentic-paced.messages", "agentic, paced: ext_proc messages/request", 0),
    ("idle.cores", "100 idle model servers, 50 ms scrapes: cores", 3),
    ("memory.rss_before_mib", "RSS before, MiB", 0),
    ("memory.rss_peak_streams_mib", "RSS peak, 500 streams x 5,000 chunks, MiB", 0),
    ("memory.rss_peak_4m_mib", "RSS peak, 4 MB prompts back to back, MiB", 0),
    ("memory.rss_after_mib", "RSS after, MiB", 0),
    ("memory.growth_mib", "RSS growth (max - before), MiB", 0),
]


def render(summary: dict[str, dict[str, float]]) -> str:
    order = (
        "epp",
        "before@full-duplex",
        "llmlb@full-duplex",
        "before@buffered",
        "llmlb@buffered",
        "before/w1",
        "llmlb/w1",
        "before/w2",
        "llmlb/w2",
    )
    columns = [p for p in order if p in summary]
    epp = summary.get("epp", {})
    head = "| figure | " + " | ".join(columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for key, label, digits in ROWS:
        cells = []
        for column in columns:
            value = summary[column].get(key)
            if value is None:
                cells.append("")
                continue
            text = f"{value:,.{digits}f}"
            reference = epp.get(key) if column != "epp" else None
            if reference is None and key == "idle.cores" and column != "epp":
                reference = epp.get("idle.cores")
            if reference and not key.endswith("added_p50_us") and not key.startswith("memory.rss"):
                text += f" ({value / reference:.2f}x)"
            cells.append(text)
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--pickers", default=",".join(PICKERS))
    parser.add_argument("--no-epp", action="store_true")
    parser.add_argument(
        "--baseline", type=Path, help="another llmlb tree (extension built in place), run as before@MODE"
    )
    parser.add_argument("--smoke", action="store_true", help="CI: no EPP, small shapes, 1 s runs, 1 round")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 1
    pickers = [p for p in args.pickers.split(",") if p]
    if args.baseline is not None:
        global _baseline  # noqa: PLW0603 - set once, from the command line
        _baseline = args.baseline.resolve()
        if not (_baseline / "python" / "llmlb").is_dir():
            print(f"--baseline {args.baseline}: no python/llmlb there", file=sys.stderr)
            return 2
        pickers += [p for p in BASELINE_PICKERS if p not in pickers]
    shapes = [s for s in args.shapes.split(",") if s]
    if args.smoke:
        args.no_epp, args.seconds, args.rounds = True, 1.0, 1
    if args.no_epp or not EPP_ARCHIVE.exists():
        if "epp" in pickers:
            print(f"EPP left out ({'--no-epp' if args.no_epp else f'no {EPP_ARCHIVE}'})", file=sys.stderr)
        pickers = [p for p in pickers if p != "epp"]
    work = Path(tempfile.mkdtemp(prefix="llmlb-bench-scale-"))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    run = Run(work, args.seconds, args.rounds, args.smoke, log)
    results: list[dict[str, Any]] = []
    request_shapes = [s for s in shapes if s in REQUEST_SHAPES]
    if request_shapes:
        results += request_runs(pickers, request_shapes, run)
    if "idle" in shapes:
        results += idle_runs(pickers, run)
    if "memory" in shapes:
        results += memory_runs(pickers, run)
    shutil.rmtree(work, ignore_errors=True)
    summary = summarize(results)
    if not args.smoke:  # the smoke run's figures are not worth keeping
        out = HERE / f"results-{args.label}.json"
        report = {"label": args.label, "seconds": args.seconds, "rounds": args.rounds}
        out.write_text(json.dumps({**report, "summary": summary, "results": results}, indent=1))
    print(render(summary))
    failed = [r for r in results if r.get("errors")]
    for r in failed:
        log(f"FAILED requests: {r['picker']} {r['shape']}: {r['errors']} errors {r.get('by_load', '')}")
    if args.smoke:
        missing = [p for p in pickers if not summary.get(p)]
        if missing:
            log(f"no figures for {missing}")
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
