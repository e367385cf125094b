"""The live status page (``GET /status`` on the admin port) rendered by a real headless Chromium.

Through real Envoy (both modes, and through the ``--workers 2`` supervisor) a few conversations
go to the backends with known ``x-request-id`` headers; then Chromium loads the page, runs its
script and the rendered DOM must show every endpoint with its health and share of the picks, and
each request's decision: its id, path, model, endpoint and reason (``prefix_hit`` on the second
turn). With ``llmlb sim`` servers (exact prefix-cache counters) and one server's cache flushed behind
llmlb's back, it shows that server's engine hit ratio far below the predicted one, in red. A page
served by a stub server checks what the live servers cannot easily show: an error
line when a fetch fails (keeping the last answers), hostile values shown as text, and the refresh
interval. A missing Chromium fails the tests with the install hint: never a silent skip.

``STATUS_SCREENSHOT=docs/status-page.png pytest tests/e2e/test_status_page.py -k prediction``
rewrites the docs' screenshot (else it goes to the test's temporary directory).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmlb.status import render
from tests.support.browser import INSTALL_HINT, Dom, dump_dom, find_chromium, png_size, screenshot
from tests.support.conversations import opening
from tests.support.procs import (
    HOST,
    Gateway,
    MakeGateway,
    ManagedProcess,
    post,
    start_daemon,
    start_envoy,
    start_sims,
    stop_all,
    wait_until,
)

SCREENSHOT_SIZE = (1280, 900)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.fail(f"no chromium or chromium-browser on PATH: {INSTALL_HINT}")
    return path


def _converse(gw: Gateway, conversations: int, turns: int) -> list[list[tuple[str, str]]]:
    """``conversations`` conversations of ``turns`` turns each; per conversation, each turn's
    (request id, address of the backend that answered)."""
    nonce = uuid.uuid4().hex[:8]
    seen = []
    for conv in range(conversations):
        messages = opening(conv, nonce)
        turns_seen = []
        for turn in range(turns):
            request_id = f"status-{nonce}-c{conv}-t{turn}"
            reply = gw.chat(messages, headers={"x-request-id": request_id})
            assert reply.status == 200, reply
            turns_seen.append((request_id, gw.address_of(reply.served_by)))
            answer = reply.json()["choices"][0]["message"]["content"]
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"turn {turn}: and then?"},
            ]
        seen.append(turns_seen)
    return seen


def _check_page(dom: Dom, gw: Gateway, seen: list[list[tuple[str, str]]], *, workers: int | None) -> None:
    assert dom.hidden("error"), dom.text("error")
    assert dom.text("policy") == "prefix_cache"
    assert dom.text("pool") == "default"
    assert dom.text("discovery") == "static up"
    assert dom.text("healthy") == f"{len(gw.backends)}/{len(gw.backends)} healthy"
    if workers is None:
        assert dom.hidden("workers-fact")
    else:
        assert dom.text("workers") == str(workers)
    assert not dom.hidden("uptime-fact")

    requests = [r for conversation in seen for r in conversation]
    picks = Counter(address for _, address in requests)
    endpoints = {row["address"]: row for row in dom.table("endpoints")}
    assert set(endpoints) == {b.address for b in gw.backends}
    for address, row in endpoints.items():
        assert row["health"] == "healthy", row
        assert row["in flight"] == "0", row
        share = 100 * picks[address] / len(requests)
        assert row["recent picks"] == f"{share:.1f}% ({picks[address]})", row
        # Prediction figures while unknown (or in a build without them): a dash, never blank or NaN.
        for figure in ("predicted hit", "engine hit"):
            assert row[figure] == "—" or row[figure].endswith("%"), row

    decisions = {row["request id"]: row for row in dom.table("decisions")}
    for conversation in seen:
        (first_id, first_at), *later = conversation
        first = decisions[first_id]
        assert first["reason"] == "least_request", first
        assert first["depth"].startswith("0/"), first
        assert first["cached"] == "0.0%", first
        for request_id, address in later:
            row = decisions[request_id]
            # The next turn follows the conversation's prefix to where the first turn went.
            assert row["reason"] == "prefix_hit", row
            assert address == first_at
            depth, levels = (int(n) for n in row["depth"].split("/"))
            assert 0 < depth <= levels, row
            assert 0 < float(row["cached"].rstrip("%")) <= 100, row
        for request_id, address in conversation:
            row = decisions[request_id]
            assert row["endpoint"] == address, row
            assert row["path"] == "/v1/chat/completions", row
            assert row["model"] == "test-model", row
            assert row["state"] == ("shared_memory" if workers else "embedded"), row
            assert row["candidates"] == str(len(gw.backends)), row
            if workers is not None:
                assert row["worker"] in {str(i) for i in range(workers)}, row
    assert len(decisions) == len(requests)

    reasons = {row["reason"]: row["picks"] for row in dom.table("reasons")}
    assert reasons == {"least_request": str(len(seen)), "prefix_hit": str(len(requests) - len(seen))}


@pytest.mark.e2e
def test_status_page_shows_endpoints_and_decisions(
    chromium: str, make_gateway: MakeGateway, mode: str
) -> None:
    gw = make_gateway("prefix_cache", mode)
    seen = _converse(gw, conversations=2, turns=2)
    assert gw.daemon is not None
    gw.daemon.wait_idle()
    dom = dump_dom(chromium, f"{gw.daemon.admin_url}/status?refresh=0")
    _check_page(dom, gw, seen, workers=None)


@pytest.mark.e2e
def test_status_page_of_the_workers_supervisor(chromium: str, make_gateway: MakeGateway) -> None:
    gw = make_gateway("prefix_cache", "buffered", daemon_args=["--workers", "2"])
    seen = _converse(gw, conversations=3, turns=2)
    assert gw.daemon is not None
    gw.daemon.wait_idle()
    dom = dump_dom(chromium, f"{gw.daemon.admin_url}/status?refresh=0")
    _check_page(dom, gw, seen, workers=2)


PREDICTION = {"prediction": {"interval": 200, "window": 60}}  # a window longer than the test


def _percent(cell: str) -> float:
    assert cell.endswith("%"), cell
    return float(cell.rstrip("%"))


@pytest.mark.e2e
def test_status_page_shows_prediction_vs_reality(chromium: str, envoy_binary: str, tmp_path: Path) -> None:
    """``llmlb sim`` servers (exact prefix-cache counters) behind Envoy; one server's cache is
    flushed behind llmlb's back before every turn after the first: the page shows its engine hit
    ratio far below the predicted one, and the two close on the others. The page as rendered here
    is the docs' screenshot."""
    sims = start_sims({name: ["--step-base-ms", "1"] for name in ("sim-a", "sim-b", "sim-c")}, tmp_path)
    procs: list[ManagedProcess] = [s.proc for s in sims]
    try:
        config = tmp_path / "llmlb.yaml"
        config.write_text(yaml.safe_dump(PREDICTION))
        addresses = [s.address for s in sims]
        daemon = start_daemon(addresses, "prefix_cache", tmp_path, extra_args=["--config", str(config)])
        procs.append(daemon.proc)
        envoy = start_envoy(addresses, daemon.grpc_port, "buffered", tmp_path)
        procs.append(envoy.proc)
        by_name = {s.name: s for s in sims}
        nonce = uuid.uuid4().hex[:8]
        conversations = [opening(c, nonce) for c in range(4)]
        home: dict[int, str] = {}  # conversation -> the sim that serves it

        def round_of_turns(turn: int) -> None:
            for c, messages in enumerate(conversations):
                reply = post(
                    envoy.url + "/v1/chat/completions",
                    {"model": "sim-model", "messages": messages, "max_tokens": 4},
                    headers={"x-request-id": f"status-{nonce}-c{c}-t{turn}"},
                )
                assert reply.status == 200, reply
                assert home.setdefault(c, reply.headers["x-sim-name"]) == reply.headers["x-sim-name"]
                messages += [
                    {"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]},
                    {"role": "user", "content": f"turn {turn}: and then?"},
                ]

        round_of_turns(0)
        flushed = by_name[Counter(home.values()).most_common(1)[0][0]]
        for turn in range(1, 4):
            # 409 only while a request still holds blocks: the turns are sequential, so it passes.
            wait_until(
                lambda: post(flushed.url + "/reset_prefix_cache", None, timeout=5.0).status == 200,
                5.0,
                message=f"{flushed.name} to flush its prefix cache",
            )
            round_of_turns(turn)
        serving = {by_name[name].address for name in home.values()}
        wait_until(
            lambda: all(
                e["predicted_hit_ratio"] is not None and e["engine_hit_ratio"] is not None
                for e in daemon.debug_endpoints()
                if e["address"] in serving
            ),
            10.0,
            message="the prediction check's figures for every endpoint that served",
        )
        url = f"{daemon.admin_url}/status?refresh=0"
        dom = dump_dom(chromium, url)
        assert dom.hidden("error"), dom.text("error")
        rows = {row["address"]: row for row in dom.table("endpoints")}
        flushed_row = rows[flushed.address]
        assert _percent(flushed_row["predicted hit"]) >= 40, flushed_row
        assert _percent(flushed_row["engine hit"]) <= _percent(flushed_row["predicted hit"]) - 30, flushed_row
        classes = {
            row["address"]: names["engine hit"].split()
            for row, names in zip(dom.table("endpoints"), dom.classes("endpoints"), strict=True)
        }
        assert "bad" in classes[flushed.address], classes
        for address in serving - {flushed.address}:
            row = rows[address]
            assert abs(_percent(row["predicted hit"]) - _percent(row["engine hit"])) <= 10, row
            assert "bad" not in classes[address], classes

        docs = os.environ.get("STATUS_SCREENSHOT")
        path = Path(docs) if docs else tmp_path / "status-page.png"
        screenshot(chromium, url, path, SCREENSHOT_SIZE)
        assert png_size(path) == SCREENSHOT_SIZE
        assert path.stat().st_size < 400_000
        if docs:
            # The committed picture: 64 colours are plenty for a page of text and make the file a
            # sixth; the octree method keeps the few red and green pixels a median cut would grey.
            from PIL import Image

            with Image.open(path) as image:
                image.convert("RGB").quantize(64, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
            assert png_size(path) == SCREENSHOT_SIZE
    finally:
        stop_all(reversed(procs))


# --------------------------------------------------------------------------------------------------
# the page against a stub server: failures, hostile values, refresh

HOSTILE = "<img src=x onerror=\"document.title='owned'\">"


class _Stub:
    """Serves the page and canned /debug answers; ``failing`` paths answer 503 once ``served``
    reaches ``fail_after`` answers of that path."""

    def __init__(self, answers: dict[str, Any], failing: dict[str, int]) -> None:
        self.answers = answers
        self.failing = failing
        self.served: Counter[str] = Counter()
        self.lock = threading.Lock()


@pytest.fixture
def stub() -> Iterator[tuple[str, _Stub]]:
    state = _Stub({}, {})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            with state.lock:
                state.served[path] += 1
                count = state.served[path]
            if path == "/status":
                self._send(200, "text/html", render(3725).encode())
            elif path in state.failing and count > state.failing[path]:
                self._send(503, "application/json", b'{"error": "no worker answered"}')
            elif path in state.answers:
                self._send(200, "application/json", json.dumps(state.answers[path]).encode())
            else:
                self._send(404, "text/plain", b"not found")

        def _send(self, status: int, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _decision(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "time": 1_780_000_000.25, "request_id": request_id, "endpoint": "10.0.0.1:8000",
        "policy": "least_busy", "reason": "least_busy", "prefix_depth": 0, "prefix_levels": 2,
        "prefix_share": 0.0, "cached_tokens": 0, "prompt_tokens": 40, "candidates": 2, "score": 0.5,
        "state": "embedded", "model": "m", "path": "/v1/chat/completions", "pick_us": 12.5, **fields,
    }  # fmt: skip


# fmt: off
ANSWERS: dict[str, Any] = {
    "/debug/config": {"lb_policy": "least_busy", "pool": "stub", "lb_config": {"password": "secret"}},
    "/debug/discovery": {"kind": "dns", "up": False, "last_error": "SERVFAIL", "endpoints": 2},
    "/debug/endpoints": [
        {"address": "10.0.0.1:8000", "inflight": 3, "local_inflight": 1, "prefill_backlog_tokens": 1200,
         "healthy": True, "in_pool": True, "labels": {"zone": "a"}, "waiting": 4, "running": 7,
         "kv_cache_usage": 0.625, "metrics_age_seconds": 0.04,
         "predicted_hit_ratio": 0.8, "engine_hit_ratio": 0.25, "prediction_accuracy": 0.31},
        {"address": "10.0.0.2:8000", "inflight": 0, "local_inflight": 0, "prefill_backlog_tokens": 0,
         "healthy": False, "in_pool": False, "labels": {}, "waiting": None, "running": None,
         "kv_cache_usage": None, "metrics_age_seconds": None},
    ],
    "/debug/decisions": [
        _decision(HOSTILE, model="<b>bold</b>", path="/v1/x?<script>alert(1)</script>"),
        _decision("plain-id", runner_up=0.25),
    ],
}
# fmt: on


def test_status_page_shows_values_as_text_and_every_figure(chromium: str, stub: tuple[str, _Stub]) -> None:
    url, state = stub
    state.answers = ANSWERS
    dom = dump_dom(chromium, f"{url}/status?refresh=0")
    assert dom.hidden("error"), dom.text("error")
    # Client-supplied values are text: no element is made of them.
    assert dom.tags_in("decisions") == {"tr", "th", "td"}
    decisions = dom.table("decisions")
    assert [row["request id"] for row in decisions] == [HOSTILE, "plain-id"]
    assert decisions[0]["model"] == "<b>bold</b>"
    assert decisions[0]["path"] == "/v1/x?<script>alert(1)</script>"
    assert decisions[0]["time (UTC)"] == "20:26:40.250"
    assert decisions[0]["score / runner-up"] == "0.500 / —"
    assert decisions[1]["score / runner-up"] == "0.500 / 0.250"
    assert decisions[1]["cached"] == "0.0%"
    assert decisions[1]["pick µs"] == "12.5"
    assert "worker" not in decisions[0]

    assert dom.text("policy") == "least_busy"
    assert dom.text("pool") == "stub"
    assert dom.text("discovery") == "dns DOWN"
    assert dom.attrs("discovery").get("title") == "SERVFAIL"
    assert dom.text("healthy") == "1/2 healthy"
    assert dom.text("uptime") == "1h 02m"
    assert dom.text("updated").endswith("refresh off")
    assert dom.attrs("updated").get("data-updates") == "1"

    first, second = dom.table("endpoints")
    assert first == {
        "address": "10.0.0.1:8000", "health": "healthy", "in flight": "3", "local": "1",
        "prefill backlog": "1,200", "waiting": "4", "running": "7", "KV cache": "62.5%",
        "metrics age": "0.04 s", "predicted hit": "80.0%", "engine hit": "25.0%",
        "recent picks": "100.0% (2)",
    }  # fmt: skip
    first_titles, second_titles = dom.titles("endpoints")
    assert first_titles["address"] == "zone=a"
    assert first_titles["engine hit"] == "accuracy 0.31 (engine / predicted)"
    assert second_titles["engine hit"] == ""
    # An engine hit ratio under half the predicted one is red.
    assert "bad" in dom.classes("endpoints")[0]["engine hit"].split()
    assert dom.titles("decisions")[0]["cached"] == "0 of 40 tokens"
    assert second["health"] == "unhealthy (left pool)"
    assert second["waiting"] == second["KV cache"] == second["predicted hit"] == "—"
    assert second["recent picks"] == "0.0% (0)"
    assert dom.table("reasons") == [{"reason": "least_busy", "picks": "2", "share": "100.0%"}]


def test_status_page_says_when_a_fetch_fails_and_keeps_the_last_answers(
    chromium: str, stub: tuple[str, _Stub]
) -> None:
    url, state = stub
    state.answers = ANSWERS
    # The first answers arrive, the later ones fail: the page keeps the last answers and says so
    # (the endpoints' second answer comes after the decisions stopped: the picks' share stays).
    state.failing = {"/debug/endpoints": 2, "/debug/decisions": 1}
    dom = dump_dom(chromium, f"{url}/status?refresh=1", budget_ms=3500)
    updates = int(dom.attrs("updated").get("data-updates") or 0)
    assert updates >= 3, dom.text("updated")
    assert dom.text("updated").endswith("every 1 s")
    assert not dom.hidden("error")
    error = dom.text("error")
    assert "debug/endpoints: HTTP 503" in error, error
    assert "debug/decisions: HTTP 503" in error, error
    endpoints = dom.table("endpoints")
    assert [row["address"] for row in endpoints] == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert endpoints[0]["recent picks"] == "100.0% (2)"
    assert len(dom.table("decisions")) == 2
    # The config is fetched until it is had, then no more.
    assert state.served["/debug/config"] == 1
    # One fetch per refresh (one more may have been answered as the page's time ran out).
    assert state.served["/debug/endpoints"] in {updates, updates + 1}


def test_status_page_with_nothing_to_fetch_says_so(chromium: str, stub: tuple[str, _Stub]) -> None:
    url, _ = stub  # every /debug path answers 404
    dom = dump_dom(chromium, f"{url}/status?refresh=0")
    assert not dom.hidden("error")
    assert "debug/endpoints: HTTP 404" in dom.text("error")
    assert dom.text("healthy") == "—"
