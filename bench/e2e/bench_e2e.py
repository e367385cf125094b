"""What the picker costs end to end: wrk through a real Envoy, with and without ext_proc.

Configurations (all started once, then measured in alternating order so machine noise cancels):

- ``envoy``: Envoy routing round robin to the backends, no ext_proc filter.
- ``noop``: Envoy + a grpc.aio ext_proc that does no work (`noop_extproc.py`), BUFFERED mode:
  the floor of the Python gRPC stack.
- ``<policy>`` / ``<policy>+redis``: Envoy + ``llmlb serve`` in BUFFERED mode, embedded state or
  shared state in a loopback Redis; ``<policy>/wN`` runs ``llmlb serve --workers N``;
  ``@full-duplex`` puts Envoy in FULL_DUPLEX_STREAMED mode (request and response bodies
  stream through the picker) instead of BUFFERED.
- ``<policy>+traced``: tracing on (``tracing.otlp_endpoint``), every pick's span exported to a real
  OpenTelemetry Collector (``make otel-bin``; its own CPU is not counted as the picker's);
  ``+traced_unsampled``: the same with ``sample_ratio: 0`` (spans made but never exported).
  ``--tracing`` runs just prefix_cache with and without them, into ``results-tracing.json``.

The backends are one more Envoy serving a fixed chat-completion answer on three ports
(``direct_response``), so they cost almost nothing and the picker is what is measured. Bodies are
multi-turn chat requests of about 2 KB or 64 KB (64 distinct conversations per size, so
prefix_cache sees reuse and new prefixes). Each cell reports requests/s, latency p50/p99/p99.9
(wrk's own histogram) and the picker's CPU per request (utime+stime of its processes).

    python bench/e2e/bench_e2e.py [--seconds 5] [--rounds 1] [--conns 1,8,32] [--bodies 2k,64k]

Writes the table to stdout and the raw figures to ``bench/e2e/results.json`` (read by
``bench/check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.otel import collector_binary, start_collector  # noqa: E402
from tests.support.procs import (  # noqa: E402
    HOST,
    ManagedProcess,
    free_port,
    front_envoy_yaml,
    launch_envoy,
    process_tree_cpu,
    start_daemon,
    start_envoy_backends,
    stop_all,
    wait_until,
)
from tests.support.redis_servers import RedisServer, redis_server_binary  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
# The budget check's own run: only the two configurations compared, alternating, more rounds.
BUDGET_RESULTS = HERE / "results-budget.json"
# The tracing comparison (``--tracing``): prefix_cache plain, traced, traced but unsampled.
TRACING_RESULTS = HERE / "results-tracing.json"
BODY_SIZES = {"2k": 2_000, "64k": 64_000}
OBSERVED = ["log_level: info", "log_requests: true", "log_format: json", "decision_header: x-llmlb-decision"]
BODIES_PER_SIZE = 64
WRK_SCRIPT = r"""
local bodies = {}
local counter = 0
init = function(args)
  local dir = os.getenv("LLMLB_BENCH_BODIES")
  local i = 0
  while true do
    local f = io.open(dir .. "/" .. i .. ".json", "rb")
    if not f then break end
    local body = f:read("*a")
    f:close()
    bodies[#bodies + 1] = wrk.format("POST", "/v1/chat/completions",
      {["Content-Type"] = "application/json"}, body)
    i = i + 1
  end
end
request = function()
  counter = counter + 1
  return bodies[(counter % #bodies) + 1]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LLMLB_RESULT {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"""


def chat_bodies(size: int, count: int, seed: int = 11) -> list[bytes]:
    """`count` multi-turn chat bodies of about `size` bytes: a shared system prompt, a few turns."""
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "model",
        "cache",
        "prefix",
        "server",
        "request",
        "token",
        "answer",
        "question",
        "load",
        "route",
    ]

    def text(n_bytes: int) -> str:
        out: list[str] = []
        length = 0
        while length < n_bytes:
            word = rng.choice(words)
            out.append(word)
            length += len(word) + 1
        return " ".join(out)

    systems = [text(size // 2) for _ in range(4)]
    bodies = []
    for i in range(count):
        messages = [{"role": "system", "content": systems[i % len(systems)]}]
        for _ in range(1 + i % 3):
            messages.append({"role": "user", "content": text(size // 8)})
            messages.append({"role": "assistant", "content": text(size // 16)})
        used = len(json.dumps(messages))
        messages.append({"role": "user", "content": text(max(16, size - used - 60))})
        bodies.append(json.dumps({"model": "bench", "messages": messages}).encode())
    return bodies


@dataclass
class Setup:
    name: str
    url: str
    picker_pid: int | None
    procs: list[ManagedProcess] = field(default_factory=list)


def run_wrk(url: str, conns: int, seconds: float, bodies_dir: Path, script: Path) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script), url]
    env = {**os.environ, "LLMLB_BENCH_BODIES": str(bodies_dir)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 30, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("LLMLB_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("LLMLB_RESULT "))
            return result
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


def start_setups(
    names: list[str],
    endpoints: list[str],
    work: Path,
    redis_port: int | None,
    otlp_endpoint: str | None = None,
) -> list[Setup]:
    setups: list[Setup] = []
    for name in names:
        procs: list[ManagedProcess] = []
        picker_port: int | None = None
        picker_pid: int | None = None
        if name == "noop":
            picker_port = free_port()
            argv = [
                sys.executable,
                str(HERE / "noop_extproc.py"),
                "--listen",
                f"{HOST}:{picker_port}",
                "--endpoints",
                ",".join(endpoints),
            ]
            proc = ManagedProcess("noop", argv, work / "noop.log").start()
            procs.append(proc)
            picker_pid = proc.pid
            wait_until(lambda p=proc: "listening" in p.log_tail(5), 15.0, message="noop ext_proc up")
        elif name != "envoy":
            policy, *options = name.split("@")[0].split("+")
            policy, _, workers = policy.partition("/w")
            config = work / f"{name.replace('/', '-').replace('@', '-').replace('+', '-')}.yaml"
            lines = ["health_check_interval: 0"]
            if "redis" in options:
                assert redis_port is not None
                lines += ["pool: bench", f"lb_config: {{serviceFQDN: {HOST}, servicePort: {redis_port}}}"]
            # Everything issue 15 adds that can be on, except tracing: the decision record goes
            # out as metadata anyway; here also the response header and a JSON log line per request.
            lines += OBSERVED if "observed" in options else ["log_level: warning"]
            if "traced" in options or "traced_unsampled" in options:
                assert otlp_endpoint is not None
                ratio = 0 if "traced_unsampled" in options else 1
                lines += [f"tracing: {{otlp_endpoint: '{otlp_endpoint}', sample_ratio: {ratio}}}"]
            config.write_text("\n".join(lines) + "\n")
            extra = ["--config", str(config)]
            if workers:
                extra += ["--workers", workers]
            daemon = start_daemon(endpoints, policy, work, extra_args=extra, name=config.stem)
            procs.append(daemon.proc)
            picker_port = daemon.grpc_port
            picker_pid = daemon.proc.pid
        mode = name.partition("@")[2] or "buffered"
        config_yaml, listen_port, admin_port = front_envoy_yaml(endpoints, picker_port, mode)
        envoy = launch_envoy(
            config_yaml, listen_port, admin_port, "buffered", work, name=f"front-{len(setups)}"
        )
        procs.append(envoy.proc)
        setups.append(Setup(name, f"{envoy.url}/v1/chat/completions", picker_pid, procs))
    return setups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--conns", default="1,8,32")
    parser.add_argument("--bodies", default="2k,64k")
    parser.add_argument(
        "--configs",
        default="envoy,noop,global_least_request,prefix_cache,least_busy,global_least_request+redis,"
        "prefix_cache+redis,prefix_cache/w2,prefix_cache@full-duplex",
        help="comma-separated; llmlb ones are <policy>[/wN][+redis][+observed][+traced|+traced_unsampled]"
        "[@full-duplex]: N worker processes, state in Redis, decision header and a JSON log line per "
        "request, a span per pick to a local OpenTelemetry Collector (or sample_ratio 0), Envoy's "
        "full-duplex mode (default buffered)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--budget",
        action="store_true",
        help="the budget comparison only: noop vs prefix_cache (plain and +observed), 8 connections, "
        f"2k and 64k bodies, 5 rounds, into {BUDGET_RESULTS.name}",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="the tracing comparison only: prefix_cache plain, +traced and +traced_unsampled, 8 "
        f"connections, 2k bodies, 3 rounds, into {TRACING_RESULTS.name}",
    )
    args = parser.parse_args()
    if args.tracing:
        args.configs = "prefix_cache,prefix_cache+traced,prefix_cache+traced_unsampled"
        args.conns, args.bodies, args.rounds = "8", "2k", max(args.rounds, 3)
        if args.out == RESULTS:
            args.out = TRACING_RESULTS
    if args.budget:
        args.configs, args.conns, args.bodies = "noop,prefix_cache,prefix_cache+observed", "8", "2k,64k"
        args.rounds = max(args.rounds, 5)
        if args.out == RESULTS:
            args.out = BUDGET_RESULTS
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 1
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    needs_redis = any("+redis" in n for n in names)
    binary = redis_server_binary() if needs_redis else None
    if needs_redis and binary is None:
        print("redis-server not found: bash scripts/install-test-deps.sh", file=sys.stderr)
        return 1
    needs_collector = any("+traced" in n for n in names)
    if needs_collector and not collector_binary().exists():
        print(f"no OpenTelemetry Collector at {collector_binary()}: make otel-bin", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="llmlb-bench-e2e-"))
    script = work / "bench.lua"
    script.write_text(WRK_SCRIPT)
    for label in args.bodies.split(","):
        directory = work / f"bodies-{label}"
        directory.mkdir()
        for i, body in enumerate(chat_bodies(BODY_SIZES[label], BODIES_PER_SIZE)):
            (directory / f"{i}.json").write_bytes(body)
    conns = [int(c) for c in args.conns.split(",")]
    procs: list[ManagedProcess] = []
    redis = None
    results: list[dict[str, Any]] = []
    try:
        backend, endpoints = start_envoy_backends(3, work)
        procs.append(backend.proc)
        if binary is not None:
            redis = RedisServer(binary, work / "redis").start()
        otlp_endpoint = None
        if needs_collector:
            collector = start_collector(work / "otel")
            procs.append(collector.proc)
            otlp_endpoint = collector.endpoint
        setups = start_setups(names, endpoints, work, redis.port if redis else None, otlp_endpoint)
        for s in setups:
            procs += s.procs
        for s in setups:  # warm-up: connections, caches, the scripts in Redis
            run_wrk(s.url, 8, 1, work / f"bodies-{args.bodies.split(',')[0]}", script)
        cells = [(b, c) for b in args.bodies.split(",") for c in conns]
        total = args.rounds * len(cells) * len(setups)
        done = 0
        for round_no in range(args.rounds):
            for body, conn in cells:
                order = setups[round_no % len(setups) :] + setups[: round_no % len(setups)]
                for s in order:
                    cpu_before = process_tree_cpu(s.picker_pid) if s.picker_pid else 0.0
                    r = run_wrk(s.url, conn, args.seconds, work / f"bodies-{body}", script)
                    cpu = process_tree_cpu(s.picker_pid) - cpu_before if s.picker_pid else 0.0
                    r.update(config=s.name, body=body, conns=conn, round=round_no, picker_cpu_s=cpu)
                    results.append(r)
                    done += 1
                    rps = r["requests"] / (r["duration_us"] / 1e6)
                    print(
                        f"[{done}/{total}] {s.name:32} {body:>3} c={conn:<2} "
                        f"{rps:8.0f} req/s  p50 {r['p50_us'] / 1000:.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(0.2)
    finally:
        stop_all(reversed(procs))
        if redis is not None:
            redis.stop()
    shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(
        json.dumps({"seconds": args.seconds, "rounds": args.rounds, "results": results}, indent=1)
    )
    print(render_table(results))
    return 0


def aggregate(results: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, float]]:
    """Per (body, conns, config): summed requests/CPU, median of the rounds' percentiles."""
    grouped: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault((r["body"], r["conns"], r["config"]), []).append(r)
    out = {}
    for key, runs in grouped.items():
        requests = sum(r["requests"] for r in runs)
        seconds = sum(r["duration_us"] for r in runs) / 1e6

        def median(field_name: str, runs: list[dict[str, Any]] = runs) -> float:
            values = sorted(r[field_name] for r in runs)
            return float(values[len(values) // 2]) / 1000

        out[key] = {
            "rps": requests / seconds,
            "p50_ms": median("p50_us"),
            "p99_ms": median("p99_us"),
            "p999_ms": median("p999_us"),
            "errors": sum(r["errors"] for r in runs),
            "cpu_us": sum(r["picker_cpu_s"] for r in runs) / max(requests, 1) * 1e6,
        }
    return out


def render_table(results: list[dict[str, Any]]) -> str:
    figures = aggregate(results)
    lines = [
        "| body | conns | config | req/s | x noop | p50 ms | +p50 vs noop | p99 ms | p99.9 ms "
        "| picker CPU µs/req | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (body, conns, config), f in figures.items():
        noop = figures.get((body, conns, "noop"))
        ratio = f"{f['rps'] / noop['rps']:.2f}" if noop and config != "noop" else ""
        delta = f"{f['p50_ms'] - noop['p50_ms']:+.2f}" if noop and config != "noop" else ""
        cpu = f"{f['cpu_us']:.0f}" if config != "envoy" else ""
        lines.append(
            f"| {body} | {conns} | {config} | {f['rps']:.0f} | {ratio} | {f['p50_ms']:.2f} | {delta} | "
            f"{f['p99_ms']:.2f} | {f['p999_ms']:.2f} | {cpu} | {f['errors']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
