"""The command line: exit codes and one-line errors (no tracebacks) for what operators get wrong."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml


def llmlb(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmlb", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("flag", ["--grpc-listen", "--admin-listen"])
def test_a_listen_address_in_use_exits_1(flag):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--admin-listen" if flag == "--grpc-listen" else "--grpc-listen"
        result = llmlb("serve", "--endpoints", "10.0.0.1:80", flag, f"127.0.0.1:{port}", other, "127.0.0.1:0")
    assert result.returncode == 1
    assert flag.lstrip("-").replace("-", "_") in one_line_error(result)


def test_bad_flags_exit_2_with_one_line():
    result = llmlb("serve", "--endpoints", "nope")
    assert result.returncode == 2
    assert "--endpoints" in one_line_error(result)
    result = llmlb("serve", "--policy", "fastest")
    assert result.returncode == 2
    assert "--policy" in one_line_error(result)
    result = llmlb("envoy-config", "--fallback", "round_robin")
    assert result.returncode == 2
    assert "--fallback" in one_line_error(result)
    result = llmlb("serve", "--no-such-flag")
    assert result.returncode == 2
    assert "--no-such-flag" in one_line_error(result)


def test_check_config_prints_every_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lb_policy: global_least_request\nendpoints: [10.0.0.1:8000]\n")
    result = llmlb("check-config", str(path))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["lb_policy"] == "global_least_request"
    assert effective["grpc_listen"] == "0.0.0.0:9002"
    assert effective["lb_config"]["redisKeyTTL"] == 1800
    assert effective["lb_config"]["leaseTTL"] == 15


def test_least_busy_thresholds_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lb_policy: least_busy\nlb_config: {criticalModels: [m], kvCacheThreshold: 0.9}\n")
    assert llmlb("check-config", str(path)).returncode == 0
    path.write_text("lb_policy: least_busy\nlb_config: {kvCacheThreshold: 1.5}\n")
    result = llmlb("check-config", str(path))
    assert result.returncode == 2
    assert "lb_config.kvCacheThreshold" in one_line_error(result)
    path.write_text("lb_policy: prefix_cache\nlb_config: {scrapeInterval: 100}\n")
    result = llmlb("check-config", str(path))
    assert result.returncode == 2
    assert "only applies to lb_policy: least_busy" in one_line_error(result)


def test_version_and_help():
    result = llmlb("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("llmlb ")
    assert llmlb("serve", "--help").returncode == 0
    assert llmlb().returncode == 2
