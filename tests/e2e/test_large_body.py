"""An 8 MiB request body is picked on and arrives intact."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.support.procs import Gateway

pytestmark = pytest.mark.e2e

SIZE = 8 * 1024 * 1024


def test_8mib_body_routes_intact(pc_gateway: Gateway) -> None:
    text = os.urandom(SIZE // 2).hex()
    body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": text}]}).encode()
    assert len(body) > SIZE
    reply = pc_gateway.post("/v1/chat/completions", body, timeout=60)
    assert reply.status == 200, reply
    stats = pc_gateway.backend(reply.served_by).stats()
    assert stats["last_body_bytes"] == len(body)
    assert stats["last_body_sha256"] == hashlib.sha256(body).hexdigest()
