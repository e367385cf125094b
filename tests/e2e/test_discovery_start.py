"""A stop signal while the picker still waits for discovery's first answer ends it at once.

At start llmlb waits up to 10 s for the discovery source's first set before it turns ready.
A rolling update or a crash loop sends SIGTERM in that window; the process must not sit out
the rest of the wait (nor, never having been ready, a drain_grace).
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.procs import HOST, ManagedProcess, free_ports, get, serve_argv, wait_until

pytestmark = pytest.mark.e2e

# The first-sync wait is 10 s: an exit well inside that shows the signal cut it short.
EXIT_WITHIN_S = 6.0


@pytest.fixture
def silent_nameserver() -> Iterator[str]:
    """A UDP port that receives DNS queries and never answers: every resolution times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    try:
        yield f"{HOST}:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _answers(url: str) -> bool:
    try:
        get(url, timeout=1.0)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_the_first_discovery_sync_exits_at_once(
    tmp_path: Path, silent_nameserver: str, workers: int
) -> None:
    config = tmp_path / "llmlb.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "drain_grace": 30,  # would hold a never-ready picker 30 s if it were applied
                "discovery": {
                    "kind": "dns",
                    "name": "vllm.test",
                    "port": 8000,
                    "interval": 1000,
                    "nameservers": [silent_nameserver],
                },
            }
        )
    )
    grpc_port, admin_port = free_ports(2)
    argv = serve_argv(grpc_port, admin_port, "--config", str(config), "--workers", str(workers))
    proc = ManagedProcess("llmlb", argv, tmp_path / "llmlb.log").start()
    try:
        admin = f"http://{HOST}:{admin_port}"
        wait_until(lambda: _answers(f"{admin}/healthz"), 20.0, message="admin endpoint up")
        assert get(f"{admin}/readyz", timeout=2.0).status == 503, "ready before discovery answered"
        time.sleep(0.5)  # well inside the 10 s first-sync wait, past the worker start
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_WITHIN_S + 5) == 0, proc.describe()
        took = time.monotonic() - started
        assert took < EXIT_WITHIN_S, f"took {took:.1f} s to stop while starting\n{proc.describe()}"
    finally:
        proc.stop()
