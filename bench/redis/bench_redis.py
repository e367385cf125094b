"""What shared state in Redis costs per pick, through a real Envoy at a fixed request rate.

Runs the same open-loop load (default 500 requests/s of multi-turn chat bodies, ~2 KB) through
Envoy (buffered mode) + `llmlb serve --policy prefix_cache` against three fake backends, once
with embedded state and once with Redis on loopback, alternating rounds so machine noise
cancels. Reports, per configuration: client latency p50/p99, the daemon's pick time p50/p99
(`llmlb_pick_duration_seconds`, which includes the Redis round trip), and Redis round trips per
request (`INFO commandstats`: EVALSHA calls, everything else). Prints a markdown table.

    python bench/redis/bench_redis.py [--rate 500] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.procs import (  # noqa: E402
    parse_metrics,
    process_tree_cpu,
    start_backends,
    start_daemon,
    start_envoy,
    start_envoy_backends,
    stop_all,
)
from tests.support.redis_servers import RedisServer, redis_server_binary  # noqa: E402


def conversation_bodies(count: int, seed: int = 7) -> list[bytes]:
    """Multi-turn chat bodies of about 2 KB: sessions that resend their history."""
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
    ]
    bodies = []
    sessions: list[list[dict[str, str]]] = []
    while len(bodies) < count:
        if not sessions or rng.random() < 0.3:
            system = " ".join(rng.choice(words) for _ in range(120))
            sessions.append([{"role": "system", "content": f"Session {len(sessions)}. {system}"}])
        history = rng.choice(sessions)
        history.append({"role": "user", "content": " ".join(rng.choice(words) for _ in range(40))})
        bodies.append(json.dumps({"model": "bench", "messages": history[-8:]}).encode())
        history.append({"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(30))})
    return bodies


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> tuple[list[float], int]:
    """Sends at a fixed rate regardless of responses; returns latencies (s) and failures."""
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(body: bytes) -> None:
            nonlocal failures
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        failures += 1
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                failures += 1
                return
            latencies.append(time.perf_counter() - started)

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(bodies[i % len(bodies)])))
        await asyncio.gather(*tasks)
    return latencies, failures


def run_hey(url: str, body: bytes, rate: float, seconds: float, work: Path) -> tuple[list[float], int]:
    """Runs ``hey`` (Go, so the client costs little CPU) and returns per-request latencies."""
    body_file = work / "hey-body.json"
    body_file.write_bytes(body)
    csv_file = work / "hey.csv"
    connections = 10
    with csv_file.open("w") as out:
        subprocess.run(
            ["hey", "-z", f"{seconds}s", "-q", str(rate / connections), "-c", str(connections), "-m", "POST",
             "-T", "application/json", "-D", str(body_file), "-o", "csv", url],
            stdout=out, check=True, timeout=seconds + 60,
        )  # fmt: skip
    latencies, failures = [], 0
    for line in csv_file.read_text().splitlines()[1:]:
        fields = line.split(",")
        if len(fields) > 6 and fields[6] == "200":
            latencies.append(float(fields[0]))
        else:
            failures += 1
    return latencies, failures


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def pick_buckets(admin_url: str) -> dict[float, float]:
    """Cumulative counts of ``llmlb_pick_duration_seconds`` by upper bound."""
    text = urllib.request.urlopen(f"{admin_url}/metrics").read().decode()
    return {
        float(s.labels["le"]): s.value
        for s in parse_metrics(text)
        if s.name == "llmlb_pick_duration_seconds_bucket"
    }


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Quantile q by linear interpolation inside its bucket, as Prometheus's histogram_quantile
    does (the lowest bucket starts at 0)."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if not total:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in ordered:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (cumulative - lower_count) if cumulative > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, cumulative
    return float("nan")


def evalsha_calls(server: RedisServer) -> int:
    """EVALSHA calls so far: the daemon's only per-request Redis command (commands run inside
    scripts are counted separately by Redis, so they do not inflate this)."""
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="llmlb serve --workers N for both daemons")
    parser.add_argument(
        "--backends",
        choices=("envoy", "python"),
        default="envoy",
        help="envoy: one Envoy answering a fixed completion (costs almost no CPU, so the picker is what "
        "is measured); python: the tests' fake OpenAI servers",
    )
    parser.add_argument(
        "--client",
        choices=("python", "hey"),
        default="python",
        help="python: open-loop asyncio client, varied bodies; hey: Go load generator (apt install hey), "
        "10 connections at rate/10 each, one body",
    )
    args = parser.parse_args()
    binary = redis_server_binary()
    if binary is None:
        print("redis-server not found: bash scripts/install-test-deps.sh", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="llmlb-bench-redis-"))
    bodies = conversation_bodies(4000)
    redis = RedisServer(binary, work / "redis").start()
    redis_pid = redis.pid
    assert redis_pid is not None
    if args.backends == "envoy":
        backend_envoy, addresses = start_envoy_backends(3, work)
        backend_procs = [backend_envoy.proc]
    else:
        backends = start_backends(3, work, prefix="rb")
        addresses = [b.address for b in backends]
        backend_procs = [b.proc for b in backends]
    cfg_embedded = work / "embedded.yaml"
    cfg_embedded.write_text("health_check_interval: 0\nlog_level: warning\n")
    cfg_redis = work / "redis.yaml"
    cfg_redis.write_text(
        "health_check_interval: 0\nlog_level: warning\npool: bench\n"
        f"lb_config: {{serviceFQDN: 127.0.0.1, servicePort: {redis.port}}}\n"
    )
    setups = {}
    procs = list(backend_procs)
    try:
        for name, cfg in (("embedded", cfg_embedded), ("redis", cfg_redis)):
            extra = ["--config", str(cfg), "--workers", str(args.workers)]
            daemon = start_daemon(addresses, "prefix_cache", work, extra_args=extra, name=name)
            envoy = start_envoy(addresses, daemon.grpc_port, "buffered", work, name=f"envoy-{name}")
            procs += [daemon.proc, envoy.proc]
            setups[name] = (daemon, envoy)
        latencies: dict[str, list[float]] = {n: [] for n in setups}
        counts: dict[str, dict[str, int]] = {n: dict.fromkeys(("fail", "req", "evalsha"), 0) for n in setups}
        cpu = dict.fromkeys(setups, 0.0)
        redis_cpu = dict.fromkeys(setups, 0.0)
        buckets: dict[str, dict[float, float]] = {n: {} for n in setups}
        for _, envoy in setups.values():  # warm-up: caches, connections
            asyncio.run(open_loop(f"{envoy.url}/v1/chat/completions", bodies, args.rate, 1.0))
        for _ in range(args.rounds):
            for name, (daemon, envoy) in setups.items():
                before_buckets = pick_buckets(daemon.admin_url)
                before_calls = evalsha_calls(redis)
                before_cpu = process_tree_cpu(daemon.proc.pid)
                before_redis_cpu = process_tree_cpu(redis_pid)
                url = f"{envoy.url}/v1/chat/completions"
                if args.client == "hey":
                    lat, fail = run_hey(url, bodies[0], args.rate, args.seconds, work)
                else:
                    lat, fail = asyncio.run(open_loop(url, bodies, args.rate, args.seconds))
                time.sleep(0.3)  # let the last releases land
                after_calls = evalsha_calls(redis)
                cpu[name] += process_tree_cpu(daemon.proc.pid) - before_cpu
                redis_cpu[name] += process_tree_cpu(redis_pid) - before_redis_cpu
                for bound, cumulative in pick_buckets(daemon.admin_url).items():
                    delta = cumulative - before_buckets.get(bound, 0.0)
                    buckets[name][bound] = buckets[name].get(bound, 0.0) + delta
                latencies[name] += lat
                c = counts[name]
                c["fail"] += fail
                c["req"] += int(args.rate * args.seconds)
                c["evalsha"] += after_calls - before_calls
        for name, (daemon, _) in setups.items():
            text = urllib.request.urlopen(f"{daemon.admin_url}/metrics").read().decode()
            fallbacks = [line for line in text.splitlines() if line.startswith("llmlb_fallbacks_total{")]
            print(f"{name}: {fallbacks or 'no fallbacks'}", file=sys.stderr)
        evalsha = redis.client().info("commandstats").get("cmdstat_evalsha", {})
        inside = evalsha.get("usec_per_call", 0)
        print(f"Redis time inside EVALSHA: {inside:.1f} µs per call", file=sys.stderr)
    finally:
        stop_all(procs)
        redis.stop()

    print(f"\n{args.rounds} rounds x {args.seconds:.0f} s at {args.rate:.0f} requests/s, alternating\n")
    print("| state | requests | failed | client p50 ms | client p99 ms | pick p50 ms | pick p99 ms "
          "| EVALSHA per request | picker CPU µs per request | Redis CPU µs per request |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for name in setups:
        lat, c = latencies[name], counts[name]
        p50 = bucket_quantile(buckets[name], 0.5) * 1000
        p99 = bucket_quantile(buckets[name], 0.99) * 1000
        summary[name] = (statistics.median(lat) * 1000, pct(lat, 0.99) * 1000)
        print(
            f"| {name} | {c['req']} | {c['fail']} | {summary[name][0]:.2f} | {summary[name][1]:.2f} | "
            f"{p50:.3g} | {p99:.3g} | {c['evalsha'] / c['req']:.3f} | {cpu[name] / c['req'] * 1e6:.0f} | "
            f"{redis_cpu[name] / c['req'] * 1e6:.0f} |"
        )
    e, s = summary["embedded"], summary["redis"]
    print(
        f"\nRedis adds {s[0] - e[0]:+.2f} ms at the client p50 and {s[1] - e[1]:+.2f} ms at p99 "
        f"(budget: <= 0.5 ms p50, <= 2 ms p99)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
