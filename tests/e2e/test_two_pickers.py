"""Two picker replicas behind one Envoy (`--picker A --picker B`): both serve, and stopping one
(SIGTERM, its default drain) does not fail requests: they go on through the other."""

from __future__ import annotations

import http.client
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import (
    Backend,
    Daemon,
    Envoy,
    ManagedProcess,
    Reply,
    SSEStream,
    get,
    metric_sum,
    post,
    start_daemon,
    start_envoy,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.e2e

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "two pickers"}]}
# How long requests keep flowing after one picker is told to stop: past its health check's
# detection (2 failed checks 1 s apart) and its own exit.
AFTER_STOP_S = 4.0


@pytest.fixture
def owned() -> Iterator[list[ManagedProcess]]:
    procs: list[ManagedProcess] = []
    yield procs
    stop_all(reversed(procs))


def streams(daemon: Daemon) -> float:
    return metric_sum(daemon.metrics(), "llmlb_extproc_streams_total")


def picker_health(admin_url: str) -> dict[str, str]:
    """llmlb_picker host -> Envoy's health flags for it."""
    flags = {}
    for line in get(f"{admin_url}/clusters", timeout=5).text().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "llmlb_picker" and parts[2] == "health_flags":
            flags[parts[1]] = parts[3]
    return flags


def two_pickers(
    backends: list[Backend], workdir: Path, owned: list[ManagedProcess], mode: str, policy: str
) -> tuple[Daemon, Daemon, Envoy]:
    """Pickers A and B behind one Envoy (`--picker A --picker B`), both healthy in it."""
    endpoints = [b.address for b in backends]
    pickers = []
    for name in ("a", "b"):
        daemon = start_daemon(endpoints, policy, workdir, name=f"picker-{name}")
        owned.append(daemon.proc)
        pickers.append(daemon)
    first, second = pickers
    envoy = start_envoy(
        endpoints, first.grpc_port, mode, workdir, picker_ports=[second.grpc_port], name=f"envoy-two-{mode}"
    )
    owned.append(envoy.proc)
    wait_until(
        lambda: set(picker_health(envoy.admin_url).values()) == {"healthy"},
        5.0,
        message="both pickers healthy in Envoy",
    )
    return first, second, envoy


def test_two_pickers_share_the_streams_and_survive_a_stop(
    backends: list[Backend], tmp_path: Path, owned: list[ManagedProcess], mode: str
) -> None:
    first, second, envoy = two_pickers(backends, tmp_path, owned, mode, "global_least_request")
    url = f"{envoy.url}/v1/chat/completions"
    for _ in range(12):
        reply = post(url, CHAT)
        assert reply.status == 200, reply
    assert streams(first) > 0
    assert streams(second) > 0
    assert streams(first) + streams(second) >= 12

    replies: list[Reply | Exception] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                replies.append(post(url, CHAT, timeout=5))
            except OSError as e:
                replies.append(e)
            time.sleep(0.01)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(replies) >= 10, 5.0, message="load to flow")
        first.proc.send_signal(signal.SIGTERM)
        stopped_at = len(replies)
        assert first.proc.wait(15) == 0
        time.sleep(AFTER_STOP_S)
    finally:
        done.set()
        thread.join(10)
    after = replies[stopped_at:]
    assert len(after) >= 20, f"too few requests after the stop: {len(after)}"
    failed = [r for r in replies if not (isinstance(r, Reply) and r.status == 200)]
    assert failed == [], f"{len(failed)} of {len(replies)} failed: {failed[:3]}"
    flags = picker_health(envoy.admin_url)
    assert flags[first.grpc_address] != "healthy", flags
    assert flags[second.grpc_address] == "healthy", flags
    before = streams(second)
    assert post(url, CHAT).status == 200
    assert streams(second) == before + 1


STREAM_CHUNKS = 10
STREAM_HEADERS = {"x-test-stream-chunks": str(STREAM_CHUNKS), "x-test-stream-interval-ms": "40"}


def test_a_rolling_restart_under_streaming_load_fails_and_truncates_nothing(
    backends: list[Backend], tmp_path: Path, owned: list[ManagedProcess], mode: str
) -> None:
    """The issue's acceptance test: restart one of two pickers (SIGTERM with the default drain,
    then start it again on the same port) while clients stream responses without pause."""
    first, _, envoy = two_pickers(backends, tmp_path, owned, mode, "prefix_cache")
    outcomes: list[str] = []  # "ok", or what went wrong
    done = threading.Event()

    def client(n: int) -> None:
        for turn in range(10_000):
            if done.is_set():
                return
            body = {"model": "test-model", "stream": True,
                    "messages": [{"role": "user", "content": f"client {n} turn {turn}"}]}  # fmt: skip
            try:
                with SSEStream(f"{envoy.url}/v1/chat/completions", body, STREAM_HEADERS, timeout=10) as s:
                    events = list(s.events(limit=STREAM_CHUNKS + 5)) if s.status == 200 else []
                    if s.status != 200:
                        outcomes.append(f"status {s.status}")
                    elif len(events) != STREAM_CHUNKS + 1 or events[-1] != "[DONE]":
                        outcomes.append(f"truncated after {len(events)} events")
                    else:
                        outcomes.append("ok")
            except (OSError, http.client.HTTPException) as e:
                outcomes.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(outcomes) >= 12, 10.0, message="streaming load to flow")
        old = first.proc
        old.send_signal(signal.SIGTERM)
        assert old.wait(30) == 0, old.describe()
        restarted = ManagedProcess(old.name + "-again", old.argv, old.log_path).start()
        owned.append(restarted)
        restarted.wait_ready(f"{first.admin_url}/readyz", timeout=5.0)
        wait_until(
            lambda: picker_health(envoy.admin_url).get(first.grpc_address) == "healthy",
            10.0,
            message="the restarted picker back in rotation",
        )
        served_before = streams(first)
        wait_until(lambda: streams(first) > served_before + 5, 10.0, message="the restarted picker to serve")
    finally:
        done.set()
        for t in threads:
            t.join(15)
    problems = [o for o in outcomes if o != "ok"]
    print(f"{mode}: {len(outcomes)} streamed responses across the restart, {len(problems)} failed or cut")
    assert len(outcomes) >= 50, f"only {len(outcomes)} streams"
    assert problems == [], f"{len(problems)} of {len(outcomes)} streams failed: {problems[:5]}"
