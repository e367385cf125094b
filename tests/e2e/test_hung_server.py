"""A model server that accepts connections but never answers (SIGSTOP) is taken out of rotation,
its conversations move, and it comes back once it answers again (SIGCONT).

The kernel completes TCP handshakes for a stopped process, so a connect probe calls it healthy:
only an HTTP health request (or the passive signals) can tell.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.conversations import conversation
from tests.support.procs import (
    Daemon,
    Envoy,
    Reply,
    Sim,
    post,
    start_daemon,
    start_envoy,
    start_sims,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.e2e

NAME_HEADER = "x-sim-name"


@dataclass
class Fleet:
    sims: dict[str, Sim]
    daemon: Daemon
    envoy: Envoy

    def ask(self, messages: list[dict[str, str]], timeout: float = 10.0) -> Reply:
        body = {"model": "sim-model", "messages": messages, "max_tokens": 4}
        return post(f"{self.envoy.url}/v1/chat/completions", body, timeout=timeout)

    def healthy(self, name: str) -> bool:
        address = self.sims[name].address
        return next(e["healthy"] for e in self.daemon.debug_endpoints() if e["address"] == address)


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Any] = []

    def make(mode: str, config: dict[str, Any]) -> Fleet:
        sims = {s.name: s for s in start_sims({"a": [], "b": []}, tmp_path)}
        started.extend(s.proc for s in sims.values())
        path = tmp_path / "llmlb.yaml"
        path.write_text(yaml.safe_dump(config))
        endpoints = [s.address for s in sims.values()]
        daemon = start_daemon(endpoints, "prefix_cache", tmp_path, extra_args=["--config", str(path)])
        started.append(daemon.proc)
        envoy = start_envoy(endpoints, daemon.grpc_port, mode, tmp_path)
        started.append(envoy.proc)
        return Fleet(sims, daemon, envoy)

    yield make
    for proc in started:  # a stopped process must run again before it can exit on SIGTERM
        proc.send_signal(signal.SIGCONT)
    stop_all(reversed(started))


def test_a_stopped_server_is_taken_out_and_its_conversation_moves(fleet_factory: Any) -> None:
    fleet = fleet_factory(
        "buffered", {"health_check_interval": 500, "health_check_timeout": 300, "passive_probe_after": 0}
    )
    first = fleet.ask(conversation(1))
    assert first.status == 200
    home = first.headers[NAME_HEADER]
    assert fleet.ask(conversation(2)).headers[NAME_HEADER] == home  # affinity
    other = next(name for name in fleet.sims if name != home)

    fleet.sims[home].proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: not fleet.healthy(home), 3.0, message=f"{home} to be marked unhealthy")
    print(f"active probes: unhealthy {time.monotonic() - stopped:.2f} s after SIGSTOP")
    for turns in (3, 4):
        reply = fleet.ask(conversation(turns), timeout=5.0)
        assert reply.status == 200, reply
        assert reply.headers[NAME_HEADER] == other

    fleet.sims[home].proc.send_signal(signal.SIGCONT)
    wait_until(lambda: fleet.healthy(home), 3.0, message=f"{home} to be healthy again")
    # Back in rotation: with the conversation now warm on `other`, a fresh one may land on it.
    served = {fleet.ask([{"role": "user", "content": f"fresh {i}"}]).headers[NAME_HEADER] for i in range(8)}
    assert home in served


@pytest.mark.parametrize("mode", ["buffered", "full-duplex"])
def test_a_request_without_response_headers_gets_its_server_probed(fleet_factory: Any, mode: str) -> None:
    # Active probes are rare here: only the passive signal can catch the hung server in time.
    fleet = fleet_factory(
        mode, {"health_check_interval": 60_000, "health_check_timeout": 300, "passive_probe_after": 1000}
    )
    first = fleet.ask(conversation(1))
    assert first.status == 200
    home = first.headers[NAME_HEADER]
    other = next(name for name in fleet.sims if name != home)

    fleet.sims[home].proc.send_signal(signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(fleet.ask, conversation(2), 15.0)  # follows affinity into the hung server
        started = time.monotonic()
        wait_until(lambda: not fleet.healthy(home), 4.0, message=f"{home} to be marked unhealthy")
        took = time.monotonic() - started
        print(f"{mode}, passive: unhealthy {took:.2f} s after the stuck request")
        assert took < 3.0
        reply = fleet.ask(conversation(3), timeout=5.0)
        assert reply.status == 200, reply
        assert reply.headers[NAME_HEADER] == other
        fleet.sims[home].proc.send_signal(signal.SIGCONT)
        assert stuck.result(timeout=15).status == 200  # it was only stopped, not lost
