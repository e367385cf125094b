"""Bad configs exit 2 with one line naming the field; a Higress plugin config is valid as it is."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.procs import HOST, free_ports, run_llmlb, start_daemon

pytestmark = pytest.mark.e2e

BAD_CONFIGS = {
    "unknown_key": ("lb_polcy: prefix_cache\n", "lb_polcy"),
    "unknown_policy": ("lb_policy: nope\n", "lb_policy"),
    "negative_ttl": ("lb_policy: prefix_cache\nlb_config:\n  redisKeyTTL: -1\n", "redisKeyTTL"),
    "bad_endpoint": ("lb_policy: global_least_request\nendpoints:\n  - not-an-address\n", "endpoints"),
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
