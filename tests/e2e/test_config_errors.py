"""Bad configs exit 2 with one line naming the field; a Higress plugin config is valid as it is."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmlb.config import FLOAT_BOUNDS, INT_BOUNDS, LEAST_BUSY_FIELDS
from tests.support.procs import HOST, free_ports, get, run_llmlb, start_daemon, wait_until

pytestmark = pytest.mark.e2e

BAD_CONFIGS = {
    "unknown_key": ("lb_polcy: prefix_cache\n", "lb_polcy"),
    "unknown_policy": ("lb_policy: nope\n", "lb_policy"),
    "negative_ttl": ("lb_policy: prefix_cache\nlb_config:\n  redisKeyTTL: -1\n", "redisKeyTTL"),
    "bad_endpoint": ("lb_policy: global_least_request\nendpoints:\n  - not-an-address\n", "endpoints"),
    # Used to pass check-config and then abort `serve` with a Rust allocation backtrace.
    "huge_table": ("lb_config:\n  prefixTableSize: 99999999999\n", "lb_config.prefixTableSize"),
    # Used to pass silently, keeping only the second list.
    "duplicate_key": ("endpoints: [127.0.0.1:1]\nendpoints: [127.0.0.1:2]\n", "endpoints: duplicate key"),
    "duplicate_nested": ("lb_config:\n  redisKeyTTL: 5\n  redisKeyTTL: 6\n", "lb_config.redisKeyTTL"),
    "infinite_factor": ("lb_config:\n  affinityLoadFactor: .inf\n", "lb_config.affinityLoadFactor"),
    "huge_drain": ("drain_timeout: 99999999999\n", "drain_timeout"),
}

HIGRESS = """\
lb_type: endpoint
lb_policy: prefix_cache
lb_config:
  serviceFQDN: redis.static
  servicePort: 6379
  username: default
  password: '123456'
  redisKeyTTL: 60
"""


def assert_one_line_error(result: subprocess.CompletedProcess[str], field: str) -> None:
    output = f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    assert result.returncode == 2, output
    assert "Traceback" not in result.stderr + result.stdout, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert field in lines[0], output


@pytest.mark.parametrize("kind", BAD_CONFIGS)
def test_check_config_rejects(tmp_path: Path, kind: str) -> None:
    text, field = BAD_CONFIGS[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    assert_one_line_error(run_llmlb("check-config", str(path), timeout=20), field)


@pytest.mark.parametrize("kind", BAD_CONFIGS)
def test_serve_rejects(tmp_path: Path, kind: str) -> None:
    text, field = BAD_CONFIGS[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    grpc_port, admin_port = free_ports(2)
    args = ("serve", "--config", str(path), "--grpc-listen", f"{HOST}:{grpc_port}")
    try:
        result = run_llmlb(*args, "--admin-listen", f"{HOST}:{admin_port}", timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"llmlb serve accepted the bad config {kind!r} and kept running")
    assert_one_line_error(result, field)


def test_higress_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "higress.yaml"
    path.write_text(HIGRESS)
    result = run_llmlb("check-config", str(path), timeout=20)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["lb_policy"] == "prefix_cache"
    assert effective["lb_config"]["redisKeyTTL"] == 60
    assert effective["lb_config"]["serviceFQDN"] == "redis.static"
    assert "grpc_listen" in effective, "defaults should be filled in"


def test_daemon_starts_with_higress_config(tmp_path: Path, backends: list) -> None:
    path = tmp_path / "higress.yaml"
    path.write_text(HIGRESS)
    endpoints = [b.address for b in backends]
    daemon = start_daemon(endpoints, "prefix_cache", tmp_path, extra_args=["--config", str(path)])
    try:
        assert sorted(e["address"] for e in daemon.debug_endpoints()) == sorted(endpoints)
    finally:
        assert daemon.stop() == 0, daemon.proc.describe()


def _extremes(pick: int) -> dict[str, Any]:
    """A config with every bounded field at its lowest (pick 0) or highest (pick 1) value."""
    config: dict[str, Any] = {"lb_config": {}}
    for name, bounds in {**INT_BOUNDS, **FLOAT_BOUNDS}.items():
        if name in ("max_body_bytes",) and pick == 1:
            continue  # a 1 GiB gRPC receive limit is legal but says nothing more here
        if name.startswith("discovery."):
            continue  # discovery replaces the static endpoints this test serves (its own tests)
        section, _, key = name.rpartition(".")
        (config.setdefault(section, {}) if section else config)[key] = bounds[pick]
    config["lb_config"] = {
        k: v for k, v in config["lb_config"].items() if k not in LEAST_BUSY_FIELDS and k != "maxRequestCount"
    }
    return config


def _ready(admin_url: str) -> bool:
    try:
        return get(f"{admin_url}/readyz", timeout=2.0).status == 200
    except OSError:
        return False


@pytest.mark.parametrize("pick", [0, 1], ids=["lowest", "highest"])
@pytest.mark.parametrize("workers", [1, 2])
def test_every_value_in_bounds_serves_and_stops_cleanly(
    tmp_path: Path, backends: list, pick: int, workers: int
) -> None:
    """No accepted value can abort the process: all fields at their bounds at once, prefix table
    and --workers shared state included."""
    path = tmp_path / "extremes.yaml"
    path.write_text(yaml.safe_dump(_extremes(pick)))
    assert run_llmlb("check-config", str(path), timeout=20).returncode == 0
    daemon = start_daemon(
        [b.address for b in backends],
        "prefix_cache",
        tmp_path,
        extra_args=["--config", str(path), "--workers", str(workers)],
        ready_timeout=60.0,
    )
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not _ready(daemon.admin_url), 10.0, message="draining")
    if pick == 1:
        # drain_grace is an hour here: the second signal cuts the drain short. With the lowest
        # values the first one is enough, and a second one could land after the event loop has
        # closed (default action: killed by the signal).
        daemon.proc.send_signal(signal.SIGTERM)
    try:
        code = daemon.proc.wait(30.0)
    finally:
        daemon.proc.stop()
    log = daemon.proc.log_path.read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "panicked" not in log, log[-3000:]
