"""`llmlb serve --workers N`: processes sharing one ext_proc port (SO_REUSEPORT) and one picking
state (a mapped file), behind one admin address.

The kernel assigns each gRPC connection to a worker, so every turn here uses a new connection
and the tests keep going (bounded) until both workers have served streams. A worker is
identified through the supervisor's `llmlb_worker_streams_total{worker}`.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tests.support.conversations import opening
from tests.support.extproc_client import ExtProcCall, picked_header
from tests.support.procs import (
    Daemon,
    get,
    metric_sum,
    post,
    start_backends,
    start_daemon,
    start_envoy,
    stop_all,
    wait_until,
)

ENDPOINTS = ["10.12.0.1:8000", "10.12.0.2:8000", "10.12.0.3:8000"]
TIMEOUT = 10.0
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
# New connections tried before giving up on reaching both workers (each lands on one at random,
# so 40 all on the same worker has probability 2^-39).
MAX_CONNECTIONS = 40


def _start(
    tmp_path: Path, name: str, endpoints: list[str] = ENDPOINTS, policy: str = "prefix_cache"
) -> Daemon:
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({"health_check_interval": 0}))
    return start_daemon(endpoints, policy, tmp_path, name=name,
                        extra_args=["--config", str(config), "--workers", "2"])  # fmt: skip


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = _start(tmp_path_factory.mktemp("workers"), "llmlb-workers")
    yield d
    d.stop()


def worker_streams(daemon: Daemon) -> dict[str, float]:
    return {s.labels["worker"]: s.value for s in daemon.metrics() if s.name == "llmlb_worker_streams_total"}


def open_pick(daemon: Daemon, messages: list[dict[str, str]]) -> tuple[ExtProcCall, grpc.Channel, str]:
    """A request picked on a fresh connection and still in flight (stream open)."""
    # A local subchannel pool: otherwise gRPC shares one TCP connection between channels.
    channel = grpc.insecure_channel(daemon.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])
    call = ExtProcCall(channel, TIMEOUT)
    call.send(
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":method", raw_value=b"POST")])
            ),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=BUFFERED),
        )
    )
    call.recv()
    data = orjson.dumps({"model": "m", "messages": messages})
    call.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True)))
    endpoint = picked_header(call.recv().request_body.response.header_mutation)
    return call, channel, endpoint


def finish(call: ExtProcCall, channel: grpc.Channel) -> None:
    call.close()
    channel.close()


def test_conversations_follow_their_prefix_across_workers(daemon: Daemon) -> None:
    nonce = uuid.uuid4().hex[:8]
    picks: dict[int, list[str]] = {}
    conv = 0
    while conv < MAX_CONNECTIONS // 3 or min(worker_streams(daemon).values(), default=0) == 0:
        assert conv < MAX_CONNECTIONS, f"every connection reached one worker: {worker_streams(daemon)}"
        history = opening(conv, nonce)
        for turn in range(3):
            call, channel, endpoint = open_pick(daemon, history)
            finish(call, channel)
            picks.setdefault(conv, []).append(endpoint)
            history = [*history, {"role": "assistant", "content": f"answer {turn}"},
                       {"role": "user", "content": f"and then {turn}?"}]  # fmt: skip
        conv += 1
    streams = worker_streams(daemon)
    assert len(streams) == 2, streams
    assert min(streams.values()) > 0, streams
    # With a state per worker, a turn reaching the other worker would be a fresh least-request
    # pick (1 in 3 to match); shared, every turn follows the first.
    assert all(len(set(endpoints)) == 1 for endpoints in picks.values()), picks
    assert len({endpoints[0] for endpoints in picks.values()}) > 1, "new conversations still spread"
    daemon.wait_idle()
    # The supervisor's decisions: both workers', newest first, from the shared mapping.
    decisions = get(f"{daemon.admin_url}/debug/decisions").json()
    assert {d["worker"] for d in decisions} == {0, 1}, decisions
    assert {d["state"] for d in decisions} == {"shared_memory"}
    times = [d["time"] for d in decisions]
    assert times == sorted(times, reverse=True)
    assert len(decisions) <= 100  # recent_decisions: as many as one worker keeps
    # The prefix table is the workers' shared one: every turn looked it up, later turns hit.
    samples = daemon.metrics()
    assert metric_sum(samples, "llmlb_prefix_table_lookups_total") == 3 * conv
    assert metric_sum(samples, "llmlb_prefix_table_hits_total") >= 2 * conv
    entries = metric_sum(samples, "llmlb_prefix_table_entries")
    assert 0 < entries <= metric_sum(samples, "llmlb_prefix_table_insertions_total")
    assert metric_sum(samples, "llmlb_prefix_table_capacity") >= entries


def test_in_flight_counts_are_pool_wide(daemon: Daemon) -> None:
    nonce = uuid.uuid4().hex[:8]
    before = worker_streams(daemon)
    held = []
    try:
        i = 0
        while i < 6 or min(worker_streams(daemon)[w] - before[w] for w in before) == 0:
            assert i < MAX_CONNECTIONS, "every connection reached one worker"
            held.append(open_pick(daemon, opening(1000 + i, nonce)))
            i += 1
            if i % 3 == 0:
                # Least request over all workers' requests: an exact spread at every multiple of 3.
                counts = daemon.inflight()
                assert sorted(counts.values()) == [i // 3] * 3, counts
        views = daemon.debug_endpoints()
        assert sum(v["local_inflight"] for v in views) == len(held), views
    finally:
        for call, channel, _ in held:
            finish(call, channel)
    daemon.wait_idle()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def test_a_killed_worker_is_replaced_and_leaves_no_phantom_load(tmp_path: Path) -> None:
    daemon = _start(tmp_path, "llmlb-kill", policy="global_least_request")
    held = []
    try:
        workers = _children(daemon.proc.pid)
        assert len(workers) == 2, workers
        nonce = uuid.uuid4().hex[:8]
        while len(held) < 4 or min(worker_streams(daemon).values(), default=0) == 0:
            assert len(held) < MAX_CONNECTIONS, "every connection reached one worker"
            held.append(open_pick(daemon, opening(len(held), nonce)))
        assert sum(daemon.inflight().values()) == len(held)
        assert metric_sum(daemon.metrics(), "llmlb_picks_total") == len(held)
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        # Streams of the dead worker fail at the client; the others stay open.
        wait_until(lambda: len(_children(daemon.proc.pid)) == 2 and victim not in _children(daemon.proc.pid),
                   timeout=15, message="the supervisor starts a replacement worker")  # fmt: skip
        wait_until(lambda: get(f"{daemon.admin_url}/readyz").status == 200, timeout=15, message="ready again")
        alive = [h for h in held if h[0].nothing_within(0.3)]
        assert 0 < len(alive) < len(held), "the held streams were spread over both workers"
        assert sum(daemon.inflight().values()) == len(alive), daemon.debug_endpoints()
        # Counters live in the supervisor's multiprocess directory: the dead worker's stay counted.
        assert metric_sum(daemon.metrics(), "llmlb_picks_total") == len(held)
    finally:
        for call, channel, _ in held:
            finish(call, channel)
        wait_until(lambda: sum(daemon.inflight().values()) == 0, timeout=5, message="all released")
        code = daemon.stop()
    assert code == 0


def _state_files(workers: list[int]) -> set[str]:
    """The shared state file named on the workers' command lines."""
    return {
        arg
        for pid in workers
        for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "llmlb-workers-" in arg and arg.endswith("state")
    }


def test_sigterm_stops_every_worker_and_removes_the_state(tmp_path: Path) -> None:
    daemon = _start(tmp_path, "llmlb-stop")
    workers = _children(daemon.proc.pid)
    state_files = _state_files(workers)
    assert len(workers) == 2, workers
    assert len(state_files) == 1, state_files
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert not any(Path(p).exists() for p in state_files)


def test_workers_behind_envoy_route_every_request(tmp_path: Path) -> None:
    backends = start_backends(3, tmp_path, prefix="w")
    daemon = _start(tmp_path, "llmlb-envoy", endpoints=[b.address for b in backends])
    envoy = start_envoy([b.address for b in backends], daemon.grpc_port, "buffered", tmp_path)
    try:
        served = set()
        for i in range(30):
            reply = post(
                f"{envoy.url}/v1/chat/completions", {"model": "test-model", "messages": opening(i, "envoy")}
            )
            assert reply.status == 200, reply
            served.add(reply.served_by)
        assert served == {b.name for b in backends}
        samples = daemon.metrics()
        assert metric_sum(samples, "llmlb_picks_total") == 30
        assert metric_sum(samples, "llmlb_workers") == 2
    finally:
        stop_all([envoy.proc, daemon.proc, *(b.proc for b in backends)])


def test_merged_endpoint_views_sum_the_workers_own_counts() -> None:
    from llmlb.workers import merge_endpoint_views

    view0 = [{"address": "a:1", "inflight": 5, "local_inflight": 2, "healthy": True}]
    view1 = [{"address": "a:1", "inflight": 5, "local_inflight": 3, "healthy": True}]
    assert merge_endpoint_views([view0, view1]) == [
        {"address": "a:1", "inflight": 5, "local_inflight": 5, "healthy": True}
    ]
    assert merge_endpoint_views([]) == []


def test_workers_of_a_killed_supervisor_drain_exit_and_remove_the_state(tmp_path: Path) -> None:
    daemon = _start(tmp_path, "llmlb-orphans")
    workers = _children(daemon.proc.pid)
    state_files = _state_files(workers)
    assert len(workers) == 2, workers
    assert len(state_files) == 1, state_files
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=15,
               message="orphaned workers exit")  # fmt: skip
    assert not any(Path(p).exists() for p in state_files), state_files


def test_the_supervisor_answers_debug_discovery_for_every_worker(daemon: Daemon) -> None:
    view = get(f"{daemon.admin_url}/debug/discovery", timeout=TIMEOUT).json()
    assert view["kind"] == "static", view
    assert view["up"] is True, view
    assert sorted(view["addresses"]) == sorted(ENDPOINTS), view
    assert [w["worker"] for w in view["workers"]] == [0, 1], view
    assert all(sorted(w["addresses"]) == sorted(ENDPOINTS) and w["up"] is True for w in view["workers"]), view
