"""SSE responses pass through the gateway intact and unbuffered."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.procs import Gateway

pytestmark = pytest.mark.e2e

CHUNKS = 8
INTERVAL_MS = 50


def test_sse_arrives_complete_in_order(pc_gateway: Gateway) -> None:
    headers = {"x-test-stream-chunks": str(CHUNKS), "x-test-stream-interval-ms": str(INTERVAL_MS)}
    messages = [{"role": "user", "content": "stream me a story"}]
    start = time.monotonic()
    with pc_gateway.stream(messages, headers) as stream:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        served = stream.headers["x-served-by"]
        first = stream.next_event()
        first_at = time.monotonic() - start
        events = [first, *stream.events()]
    total = time.monotonic() - start
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1] if e is not None]
    assert [c["seq"] for c in chunks] == list(range(CHUNKS))
    assert {c["served_by"] for c in chunks} == {served}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # The first chunk must not wait for the last one (a buffering proxy would deliver all at once).
    assert total - first_at >= (CHUNKS - 1) * INTERVAL_MS / 1000 * 0.5, (first_at, total)
    assert pc_gateway.backend(served).stats()["completed"] == 1
