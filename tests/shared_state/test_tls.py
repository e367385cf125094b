"""Shared state over TLS (managed Redis): `tls: true` with a CA file, against a real TLS Redis."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.support.procs import ManagedProcess, free_ports, metric_sum, start_daemon, wait_until
from tests.support.redis_servers import redis_server_binary

pytestmark = pytest.mark.redis

ENDPOINTS = ["10.3.0.1:80", "10.3.0.2:80"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1; returns the CA file."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=llmlb-test-ca", cwd=directory)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=directory)  # fmt: skip
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=directory)  # fmt: skip
    return directory / "ca.pem"


def one_pick(grpc_address: str) -> str:
    mode = processing_mode_pb2.ProcessingMode
    body = orjson.dumps({"model": "test-model", "messages": [{"role": "user", "content": "over tls"}]})
    requests = [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=mode.BUFFERED),
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]
    with grpc.insecure_channel(grpc_address) as channel:
        answers = list(pb_grpc.ExternalProcessorStub(channel).Process(iter(requests), timeout=10))
    return answers[1].request_body.response.header_mutation.set_headers[0].header.raw_value.decode()


def test_shared_state_over_tls(tmp_path):
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("redis-server not found: bash scripts/install-test-deps.sh")
    ca = make_certificates(tmp_path)
    (tls_port,) = free_ports(1)
    redis = ManagedProcess(
        "redis-tls",
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(tls_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--tls-cert-file",
            str(tmp_path / "server.pem"),
            "--tls-key-file",
            str(tmp_path / "server.key"),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
        ],
        tmp_path / "redis-tls.log",
    ).start()
    daemon = None
    try:
        import redis as redis_py

        client = redis_py.Redis(host="127.0.0.1", port=tls_port, ssl=True, ssl_ca_certs=str(ca))
        wait_until(client.ping, timeout=10, message="TLS Redis answers")
        pool = "tls" + uuid.uuid4().hex[:8]
        config = tmp_path / "llmlb.yaml"
        lb = {"serviceFQDN": "127.0.0.1", "servicePort": tls_port, "tls": True, "tlsCAFile": str(ca)}
        config.write_text(json.dumps({"pool": pool, "health_check_interval": 0, "lb_config": lb}))
        daemon = start_daemon(ENDPOINTS, "prefix_cache", tmp_path, extra_args=["--config", str(config)])
        assert one_pick(daemon.grpc_address) in ENDPOINTS
        assert metric_sum(daemon.metrics(), "llmlb_redis_up") == 1
        assert metric_sum(daemon.metrics(), "llmlb_redis_errors_total") == 0
        assert client.xlen(f"llmlb:{{{pool}}}:picks"), "the pick went through Redis over TLS"
        # The same server refuses a client that does not trust its CA: the daemon fails open.
        other = tmp_path / "other"
        other.mkdir()
        wrong_ca = make_certificates(other)
        config.write_text(json.dumps({"pool": pool, "health_check_interval": 0,
                                      "lb_config": {**lb, "tlsCAFile": str(wrong_ca)}}))  # fmt: skip
        daemon.stop()
        daemon = start_daemon(ENDPOINTS, "prefix_cache", tmp_path, extra_args=["--config", str(config)],
                              name="llmlb-wrong-ca")  # fmt: skip
        assert one_pick(daemon.grpc_address) in ENDPOINTS
        assert metric_sum(daemon.metrics(), "llmlb_redis_up") == 0
        assert metric_sum(daemon.metrics(), "llmlb_redis_errors_total") >= 1
    finally:
        if daemon is not None:
            daemon.stop()
        redis.stop()
