"""How long one big request body holds up other streams in the picker, measured at the picker.

A `llmlb serve` (prefix_cache, embedded state) gets ext_proc streams straight from this script,
no Envoy and no model servers, so the figures are the picker's own: small picks are timed on
one stream after another (request headers + body -> the pick) while a second stream sends one
big body, in Envoy's full-duplex mode (64 KiB chunks, echoed back) or buffered mode (one
message). Reported: the small picks' latency before and during the big body (p50, p99, max),
the big body's own time, and the picker's peak RSS growth.

    python bench/stall/bench_stall.py [--size-mib 60] [--rounds 3] [--python PATH]

`--python` runs the picker under another interpreter (e.g. an older build's venv) to compare.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.extproc_client import ExtProcCall
from tests.support.procs import HOST, ManagedProcess, free_ports

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
CHUNK = 64 * 1024
UNLIMITED = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]


def headers_message(mode: int) -> pb.ProcessingRequest:
    headers = pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
                base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"),
            ]
        )
    )
    return pb.ProcessingRequest(
        request_headers=headers,
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode, response_body_mode=0),
    )


def small_pick(channel: grpc.Channel, i: int) -> float:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"small {i}"}]}).encode()
    started = time.perf_counter()
    call = ExtProcCall(channel, timeout=30)
    call.send(headers_message(BUFFERED))
    call.recv()
    call.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    call.recv()
    took = time.perf_counter() - started
    call.close()
    return took


def big_body(address: str, size: int, mode: int, out: Any, ready: Any) -> None:
    """Runs in its own process: the client's own work on the big body (serialising it holds the
    GIL) must not delay the small picks being timed. Sets `ready` once the body is built."""
    head = b'{"model": "m", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    body = head + b"a" * (size - len(head) - len(tail)) + tail
    with grpc.insecure_channel(address, options=UNLIMITED) as channel:
        ready.set()
        out.put(_send_big(channel, body, mode))


def _send_big(channel: grpc.Channel, body: bytes, mode: int) -> float:
    started = time.perf_counter()
    call = ExtProcCall(channel, timeout=120)
    call.send(headers_message(mode))
    if mode == BUFFERED:
        call.recv()
        call.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
        call.recv()
    else:
        for start in range(0, len(body), CHUNK):
            piece = body[start : start + CHUNK]
            last = start + CHUNK >= len(body)
            call.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=piece, end_of_stream=last)))
        got = 0
        while got < len(body):  # the headers answer, then the body echoed back
            response = call.recv()
            if response.HasField("request_body"):
                got += len(response.request_body.response.body_mutation.streamed_response.body)
    took = time.perf_counter() - started
    call.close()
    return took


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def quantiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"p50 {statistics.median(ordered) * 1000:6.2f} ms  p99 {p99 * 1000:6.2f} ms  "
        f"max {ordered[-1] * 1000:6.2f} ms  (n={len(ordered)})"
    )


def run(python: str, size: int, rounds: int, workdir: Path) -> None:
    grpc_port, admin_port = free_ports(2)
    argv = [
        python, "-m", "llmlb", "serve", "--endpoints", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
        "--policy", "prefix_cache", "--grpc-listen", f"{HOST}:{grpc_port}",
        "--admin-listen", f"{HOST}:{admin_port}", "--log-level", "warning",
    ]  # fmt: skip
    config = workdir / "bench-stall.yaml"
    config.write_text(f"max_body_bytes: {2 * size}\nhealth_check_interval: 0\n")
    if "--python" not in sys.argv:  # an older build may not know these fields
        argv += ["--config", str(config)]
    picker = ManagedProcess("llmlb", argv, workdir / "bench-stall-llmlb.log").start()
    try:
        picker.wait_ready(f"http://{HOST}:{admin_port}/readyz", timeout=30)
        with grpc.insecure_channel(f"{HOST}:{grpc_port}", options=UNLIMITED) as channel:
            for i in range(50):
                small_pick(channel, i)  # warm up
            for mode, name in ((FULL_DUPLEX, "full-duplex"), (BUFFERED, "buffered")):
                quiet: list[float] = []
                busy: list[float] = []
                big: list[float] = []
                rss_before = peak_rss_mb(picker.pid)
                for _ in range(rounds):
                    quiet += [small_pick(channel, i) for i in range(200)]
                    results: Any = multiprocessing.Queue()
                    ready = multiprocessing.Event()
                    sender = multiprocessing.Process(
                        target=big_body, args=(f"{HOST}:{grpc_port}", size, mode, results, ready)
                    )
                    sender.start()
                    ready.wait(60)  # the sender has built its body and starts sending now
                    i = 0
                    while sender.is_alive() and i < 100_000:
                        busy.append(small_pick(channel, i))
                        i += 1
                    big.append(results.get(timeout=120))
                    sender.join(120)
                print(f"{name}, {size >> 20} MiB body, {rounds} rounds:")
                print(f"  small picks, quiet:           {quantiles(quiet)}")
                print(f"  small picks, during the body: {quantiles(busy)}")
                print(f"  big body: {statistics.median(big) * 1000:.0f} ms (median); "
                      f"peak RSS +{peak_rss_mb(picker.pid) - rss_before:.0f} MB")  # fmt: skip
    finally:
        picker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", default=sys.executable, help="interpreter whose llmlb serves")
    args = parser.parse_args()
    workdir = Path("/tmp")
    run(args.python, args.size_mib << 20, args.rounds, workdir)


if __name__ == "__main__":
    main()
