"""The harness itself, without llmlb: fake backends directly and through a plain ORIGINAL_DST Envoy.

If these fail, the other e2e failures say nothing about llmlb.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import (
    DEST_HEADER,
    HOST,
    Backend,
    Envoy,
    SSEStream,
    free_ports,
    launch_envoy,
    post,
)

pytestmark = pytest.mark.e2e

# Envoy routing on a client-set header, no ext_proc: only the harness is under test here.
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
PLAIN_ORIGINAL_DST = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': {hcm}
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ['*']
              routes:
              - match: {{prefix: /}}
                route: {{cluster: pool, timeout: 30s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: pool
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    original_dst_lb_config: {{use_http_header: true, http_header_name: {header}}}
"""


@pytest.fixture(scope="module")
def plain_envoy(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    workdir: Path = tmp_path_factory.mktemp("harness")
    listen, admin = free_ports(2)
    config = PLAIN_ORIGINAL_DST.format(admin=admin, listen=listen, header=DEST_HEADER, hcm=HCM)
    envoy = launch_envoy(config, listen, admin, "none", workdir, name="envoy-plain")
    yield envoy
    envoy.stop()


def chat_body(text: str, stream: bool = False) -> dict[str, object]:
    return {"model": "test-model", "messages": [{"role": "user", "content": text}], "stream": stream}


def test_backend_answers_and_counts(backends: list[Backend]) -> None:
    b = backends[0]
    b.reset()
    reply = post(f"{b.url}/v1/chat/completions", chat_body("hello"))
    assert reply.status == 200, reply
    assert reply.served_by == b.name
    assert reply.json()["served_by"] == b.name
    with SSEStream(f"{b.url}/v1/completions", {"prompt": "x", "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(stream.events())
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["seq"] for e in events[:-1]] == list(range(5))
    stats = b.stats()
    assert stats["total"] == 2
    assert stats["concurrent"] == 0


def test_backend_accepts_chunked_body(backends: list[Backend]) -> None:
    b = backends[1]
    b.reset()
    payload = json.dumps(chat_body("y" * 200_000)).encode()
    conn = http.client.HTTPConnection(HOST, b.port, timeout=10)
    try:
        pieces = iter([payload[:70_000], payload[70_000:]])
        conn.request("POST", "/v1/chat/completions", body=pieces, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    finally:
        conn.close()
    stats = b.stats()
    assert stats["last_chunked"] is True
    assert stats["last_body_bytes"] == len(payload)


def test_envoy_routes_by_header(plain_envoy: Envoy, backends: list[Backend]) -> None:
    for b in backends:
        reply = post(f"{plain_envoy.url}/v1/chat/completions", chat_body("hi"), {DEST_HEADER: b.address})
        assert reply.status == 200, reply
        assert reply.served_by == b.name
        assert b.stats()["last_headers"][DEST_HEADER] == b.address


def test_envoy_streams_sse(plain_envoy: Envoy, backends: list[Backend]) -> None:
    b = backends[2]
    headers = {DEST_HEADER: b.address, "x-test-stream-chunks": "4", "x-test-stream-interval-ms": "20"}
    with SSEStream(f"{plain_envoy.url}/v1/chat/completions", chat_body("s", stream=True), headers) as stream:
        assert stream.status == 200
        assert stream.headers["x-served-by"] == b.name
        events = list(stream.events())
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["seq"] for e in events[:-1]] == [0, 1, 2, 3]
