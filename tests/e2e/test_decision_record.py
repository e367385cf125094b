"""The decision record through real Envoy: the access log line of a request carries the picker's
record (``llmlb`` dynamic metadata) and its request id; the opt-in response header, the request
log and /debug/decisions show the same decision."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from llmlb.decision import RECORD_FIELDS
from tests.support.conversations import opening
from tests.support.procs import Gateway, MakeGateway, get, wait_until

pytestmark = pytest.mark.e2e

DECISION_HEADER = "x-llmlb-decision"
OBSERVED = {"decision_header": DECISION_HEADER, "log_requests": True, "log_format": "json"}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def _access_line(gw: Gateway, request_id: str) -> dict[str, Any]:
    """Envoy writes the access log line when the request ends, maybe after the reply reached us."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [e for e in _json_lines(gw.envoy.proc.log_path) if e.get("request_id") == request_id]
        return bool(found)

    wait_until(logged, 10.0, message=f"Envoy's access log line of {request_id}")
    return found[0]


def _conversation(gw: Gateway, turns: int) -> list[tuple[dict[str, Any], Any]]:
    """``turns`` turns of one conversation: each turn's (record from the access log, reply)."""
    messages = opening(0, uuid.uuid4().hex)
    seen = []
    for turn in range(turns):
        request_id = f"test-{uuid.uuid4()}"
        reply = gw.chat(messages, headers={"x-request-id": request_id})
        assert reply.status == 200, reply
        line = _access_line(gw, request_id)
        seen.append((line, reply))
        messages.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
        messages.append({"role": "user", "content": f"turn {turn}: and then?"})
    return seen


def test_access_log_carries_the_decision_record(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("prefix_cache", mode, daemon_config=OBSERVED)
    (first, first_reply), (second, second_reply) = _conversation(gw, 2)
    for line, reply in ((first, first_reply), (second, second_reply)):
        record = line["llmlb"]
        assert isinstance(record, dict), line
        # Every field of the record, under the names docs and dashboards use.
        assert set(record) >= set(RECORD_FIELDS) - {"runner_up"}, line
        assert record["request_id"] == line["request_id"]
        assert record["endpoint"] == line["upstream"] == gw.address_of(reply.served_by)
        assert record["policy"] == "prefix_cache"
        assert record["state"] == "embedded"
        assert record["candidates"] == len(gw.backends)
        assert record["path"] == "/v1/chat/completions"
        assert record["model"] == "test-model"
        assert record["prompt_tokens"] > 0
        assert record["pick_us"] > 0
    assert first["llmlb"]["reason"] == "least_request"
    assert first["llmlb"]["prefix_depth"] == 0
    assert first["llmlb"]["cached_tokens"] == 0
    # The next turn holds the first turn's prefix where it went.
    assert second["llmlb"]["reason"] == "prefix_hit"
    assert second["llmlb"]["endpoint"] == first["llmlb"]["endpoint"]
    assert 0 < second["llmlb"]["prefix_depth"] <= second["llmlb"]["prefix_levels"]
    assert 0 < second["llmlb"]["prefix_share"] <= 1
    # The winner beat the others on score (it holds the prefix).
    assert second["llmlb"]["score"] > second["llmlb"]["runner_up"]


def test_header_log_and_debug_page_tell_the_same_decision(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("prefix_cache", mode, daemon_config=OBSERVED)
    [(line, reply)] = _conversation(gw, 1)
    record = line["llmlb"]
    header = reply.headers[DECISION_HEADER]
    pairs = dict(part.split("=", 1) for part in header.split(";"))
    assert pairs["endpoint"] == record["endpoint"]
    assert pairs["reason"] == record["reason"]
    assert pairs["candidates"] == str(record["candidates"])
    assert pairs["state"] == "embedded"

    assert gw.daemon is not None
    daemon_log = gw.daemon.proc.log_path
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [
            e
            for e in _json_lines(daemon_log)
            if e.get("logger") == "llmlb.requests" and e.get("request_id") == record["request_id"]
        ]
        return bool(found)

    wait_until(logged, 10.0, message="the picker's request log line")
    (logged_line,) = found
    assert logged_line["level"] == "info"
    assert logged_line["endpoint"] == record["endpoint"]
    assert logged_line["reason"] == record["reason"]
    assert logged_line["status"] == 200
    assert logged_line["path"] == "/v1/chat/completions"
    assert logged_line["model"] == "test-model"

    decisions = get(f"{gw.daemon.admin_url}/debug/decisions").json()
    mine = [d for d in decisions if d["request_id"] == record["request_id"]]
    assert len(mine) == 1, decisions
    assert mine[0]["endpoint"] == record["endpoint"]


def test_no_header_unless_asked(make_gateway: MakeGateway, mode: str) -> None:
    gw = make_gateway("global_least_request", mode)
    reply = gw.chat([{"role": "user", "content": "hi"}])
    assert reply.status == 200, reply
    assert DECISION_HEADER not in reply.headers
