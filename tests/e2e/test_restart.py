"""A picker restarted right after a crash serves again within 2 s (TIME_WAIT must not block it)."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.support.procs import HOST, MakeGateway, ManagedProcess, get, wait_until

pytestmark = pytest.mark.e2e

TIME_WAIT = "06"  # the TCP state column of /proc/net/tcp
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def time_wait_sockets(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is `port` (gRPC listens dual-stack: IPv6 table too)."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            next(table)
            for line in table:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == TIME_WAIT:
                    count += 1
    return count


def test_restart_right_after_kill_9_serves_within_2s(make_gateway: MakeGateway) -> None:
    gw = make_gateway("global_least_request", "buffered")
    assert gw.daemon is not None
    old = gw.daemon.proc
    for i in range(20):
        assert gw.chat([{"role": "user", "content": f"warm {i}"}]).status == 200
    # A connection whose bytes the picker has read, like Envoy's between two requests: when the
    # picker dies, the kernel closes its side first, so that side lingers in TIME_WAIT (~60 s).
    with socket.create_connection((HOST, gw.daemon.grpc_port), timeout=2.0) as client:
        client.sendall(H2_PREFACE + EMPTY_SETTINGS)
        assert client.recv(9), "the picker answers with its SETTINGS frame"
        time.sleep(0.1)
        old.send_signal(signal.SIGKILL)
        old.wait(5.0)
        # Read to the FIN: closing with unread bytes would send a reset instead, and no TIME_WAIT.
        for _ in range(1000):
            if not client.recv(65536):
                break
    wait_until(lambda: time_wait_sockets(gw.daemon.grpc_port) > 0, 2.0, message="a TIME_WAIT socket")

    started = time.monotonic()
    new = ManagedProcess(old.name + "-restarted", old.argv, old.log_path).start()
    gw.daemon.proc = new
    new.wait_ready(f"{gw.daemon.admin_url}/readyz", timeout=2.0)
    reply = wait_until(
        lambda: (
            (r := gw.chat([{"role": "user", "content": "after restart"}], timeout=2.0)).status == 200 and r
        ),
        2.0 - (time.monotonic() - started),
        interval=0.05,
        message="a request through Envoy to succeed after the restart",
    )
    assert reply.status == 200
    took = time.monotonic() - started
    print(f"serving again {took:.2f} s after the restart")
    assert took < 2.0


def test_a_port_in_use_still_fails_with_one_line(make_gateway: MakeGateway) -> None:
    gw = make_gateway("global_least_request", "buffered")
    assert gw.daemon is not None
    # The same command again while the first picker listens: a clear error, exit 1.
    second = ManagedProcess("second", gw.daemon.proc.argv, gw.daemon.proc.log_path.with_name("second.log"))
    second.start()
    assert second.wait(20.0) == 1
    log = second.log_path.read_text()
    assert f"grpc_listen: cannot listen on {HOST}:{gw.daemon.grpc_port}" in log or "admin_listen" in log
    assert "Traceback" not in log
    assert get(f"{gw.daemon.admin_url}/readyz").status == 200
