"""Two picker replicas behind one Envoy (`--picker A --picker B`): both serve, and stopping one
(SIGTERM, its default drain) does not fail requests: they go on through the other."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import (
    Backend,
    Daemon,
    ManagedProcess,
    Reply,
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


def test_two_pickers_share_the_streams_and_survive_a_stop(
    backends: list[Backend], tmp_path: Path, owned: list[ManagedProcess], mode: str
) -> None:
    endpoints = [b.address for b in backends]
    pickers = []
    for name in ("a", "b"):
        daemon = start_daemon(endpoints, "global_least_request", tmp_path, name=f"picker-{name}")
        owned.append(daemon.proc)
        pickers.append(daemon)
    first, second = pickers
    envoy = start_envoy(
        endpoints, first.grpc_port, mode, tmp_path, picker_ports=[second.grpc_port], name=f"envoy-two-{mode}"
    )
    owned.append(envoy.proc)
    wait_until(
        lambda: set(picker_health(envoy.admin_url).values()) == {"healthy"},
        5.0,
        message="both pickers healthy in Envoy",
    )
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
