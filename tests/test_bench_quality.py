"""The routing-quality benchmark (bench/quality).

Unit checks of its pure parts: the oracle hit rate (on a hand-made workload, and against the
simulator's own KV cache on every workload), the idle-while-queued metric, the targets, the
hot_prompt workload, the multi_turn_responses workload (multi_turn's conversations as Responses API
requests) and how the client reads chat and Responses answers. Then the smoke run (marker e2e):
2 simulators, the sticky multi-turn workload, round robin vs prefix_cache, a few seconds of load,
into a temporary directory. It must write the
report and show prefix_cache reusing the KV cache more than round robin, and no more than the
oracle allows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import orjson
import pytest

from llmlb.sim.kv_cache import KVCache, block_hashes, root_hash
from llmlb.sim.protocol import parse_request
from llmlb.sim.responses import ResponseStore, parse_responses

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "bench" / "quality"
RUN = QUALITY / "run.py"


def _load(name: str) -> ModuleType:
    """A module of bench/quality under a name of its own (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_quality_{name}", QUALITY / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


oracle = _load("oracle")
report = _load("report")
workloads = _load("workloads")
run = _load("run")

# --------------------------------------------------------------------------------------------------
# the oracle


def test_oracle_hand_made() -> None:
    """Blocks of 2 one-byte tokens: reuse is the longest block-aligned prefix shared with an earlier
    request of the same key, never the whole prompt."""
    requests = [
        ("a", b"abcdefg"),  # 7 tokens, full blocks ab cd ef: nothing earlier
        ("a", b"abcdefXY"),  # ab cd ef shared (the last block is never a hit anyway)
        ("b", b"abcdefgh"),  # same text, other key (another server): nothing
        ("a", b"abcd"),  # ab cd both seen, but one token must be computed: only ab
        ("a", b"abcdXXef"),  # ab cd, then XX breaks the chain (ef after it is not a hit)
        ("a", b"zzabcdef"),  # a different first block: nothing
    ]
    result = oracle.oracle(requests, block_size=2, chars_per_token=1)
    assert result.per_request == [0, 6, 0, 2, 4, 0]
    assert (result.cached_tokens, result.prompt_tokens) == (12, 7 + 8 + 8 + 4 + 8 + 8)
    assert result.hit_rate == pytest.approx(12 / 43)


def test_oracle_partial_tokens() -> None:
    """4 bytes per token, 1 token per block: a prompt of 7 bytes has 2 tokens, the second of 3 bytes,
    which does not match the 4 bytes "efgh" (as in the simulator, which hashes the bytes it has)."""
    requests = [("k", b"abcdefg"), ("k", b"abcdefgh"), ("k", b"abcdefghij")]
    result = oracle.oracle(requests, block_size=1, chars_per_token=4)
    assert result.prompt_tokens == 2 + 2 + 3
    assert result.per_request == [0, 1, 2]
    assert oracle.oracle([], block_size=16, chars_per_token=4).hit_rate is None


@pytest.mark.parametrize("name", list(workloads.BUILDERS))
def test_oracle_matches_the_simulators_cache(name: str) -> None:
    """Per request, the oracle equals what the simulator's own KV cache (llmlb.sim.kv_cache, infinite
    capacity, one cache per key, requests one after another) reports as cached, starting from the
    body the client sends (parsed and rendered by the simulator's own protocol code; a chained
    turn continues the response the simulator's own code stored for the turn before)."""
    w = workloads.build(name, seed=3, duration=3.0, max_requests=150)
    block_size, cpt, model, max_tokens = 16, 4, workloads.MODEL, 16
    caches: dict[str, KVCache] = {}
    keyed: list[tuple[str, bytes]] = []
    expected: list[int] = []
    by_sid = {s.sid: s for s in w.sessions}
    store = ResponseStore()
    chain: dict[str, tuple[str, list[str]]] = {}  # session -> (last response id, answers so far)
    for req in w.requests(max_tokens):
        key = by_sid[req.session].key
        answers = None
        if w.api == workloads.CHAT:
            prompt = parse_request(orjson.dumps(req.body), chat=True).prompt
        else:
            body = orjson.loads(orjson.dumps(req.body))
            if w.chained:
                assert body["store"] is True
                if req.turn:
                    assert body["previous_response_id"] == f"resp_{req.session}_turn{req.turn - 1}"
                    body["previous_response_id"], answers = chain[req.session]
            exchange = parse_responses(body, model, store)
            prompt = exchange.prompt
            if w.chained:  # the simulator stores the response once it completes
                done = SimpleNamespace(generated=max_tokens, prompt_tokens=1, cached_tokens=0)
                response = exchange.completed(done)
                said = [*(answers or []), response["output"][0]["content"][0]["text"]]
                chain[req.session] = (response["id"], said)
        assert prompt == oracle.prompt_bytes(by_sid[req.session].messages(req.turn, answers))
        tokens = -(-len(prompt) // cpt)
        hashes = block_hashes(prompt, root_hash(model, None), block_size * cpt, tokens // block_size)
        cache = caches.setdefault(key, KVCache(10**7, block_size))
        alloc = cache.allocate(hashes, tokens, 1)
        assert alloc is not None
        expected.append(alloc.cached_blocks * block_size)
        cache.commit(alloc, tokens)
        cache.free(alloc)
        keyed.append((key, prompt))
    result = oracle.oracle(keyed, block_size=block_size, chars_per_token=cpt)
    assert result.per_request == expected
    # the runner's oracle of the planned requests (for a chained workload it assumes the
    # simulator's answer of --output-tokens tokens) is this one
    knobs = {"block-size": block_size, "chars-per-token": cpt, "output-tokens": max_tokens}
    assert run.workload_oracle(w, None, knobs).per_request == expected
    if name == "random":
        assert result.cached_tokens == 0
    else:
        assert 0.3 < result.hit_rate < 1.0, result.hit_rate


# --------------------------------------------------------------------------------------------------
# idle-while-queued, targets, hot_prompt


def test_idle_while_queued() -> None:
    samples = [
        {"t": 0.0, "a": (16, 0), "b": (16, 3)},  # a has no free slot: not idle
        {"t": 0.1, "a": (3, 0), "b": (16, 2)},  # a idles while b queues 2
        {"t": 0.2, "a": (3, 0), "b": (16, 2)},
        {"t": 0.3, "a": (3, 0), "b": (16, 1)},  # one waiting is not a queue
        {"t": 0.4},  # nobody answered: skipped
        {"t": 0.5, "a": (0, 0), "b": (16, 5)},  # the last sample stands for one interval
    ]
    longest, total = report.idle_while_queued(samples, ["a", "b"], 16, 0.1)
    assert longest == pytest.approx(0.2)
    assert total == pytest.approx(0.3)
    assert report.idle_while_queued([], ["a"], 16, 0.1) == (0.0, 0.0)


def test_targets() -> None:
    def cell(config: str, workload: str = "w", **figures: float | None) -> dict[str, object]:
        base: dict[str, object] = {"config": config, "workload": workload, "idle_while_queued_max_s": 0.0}
        return {**base, **figures}

    cells = [
        cell("round_robin", hit_rate=0.3, ttft_p99_ms=1000, ttft_mean_ms=200, oracle_hit_rate=0.8),
        cell(
            "prefix_cache",
            hit_rate=0.79,
            hit_over_oracle=0.9875,
            oracle_hit_rate=0.8,
            ttft_p99_ms=700,
            ttft_mean_ms=150,
        ),
        cell(
            "prefix_cache_redis2",
            hit_rate=0.76,
            hit_over_oracle=0.95,
            oracle_hit_rate=0.8,
            ttft_p99_ms=760,  # 1.086 x prefix_cache
            ttft_mean_ms=210,
            idle_while_queued_max_s=1.5,
        ),
        cell("round_robin", "random", ttft_p99_ms=500, ttft_mean_ms=100, oracle_hit_rate=0.0),
        cell("prefix_cache", "random", ttft_p99_ms=400, ttft_mean_ms=101, oracle_hit_rate=0.0),
        cell("least_busy", "other", ttft_p99_ms=400, ttft_mean_ms=101),  # no round robin there
    ]
    got = {(t["workload"], t["config"], t["target"]): t["pass"] for t in report.targets(cells)}
    assert got == {
        ("w", "prefix_cache", "KV hit ÷ oracle"): True,
        ("w", "prefix_cache", "TTFT p99 ÷ round robin"): True,
        ("w", "prefix_cache", "TTFT mean ÷ round robin"): True,
        ("w", "prefix_cache", "idle-while-queued max (s)"): True,
        ("w", "prefix_cache_redis2", "KV hit ÷ oracle"): False,
        ("w", "prefix_cache_redis2", "TTFT p99 ÷ round robin"): True,
        ("w", "prefix_cache_redis2", "TTFT mean ÷ round robin"): False,
        ("w", "prefix_cache_redis2", "idle-while-queued max (s)"): False,
        ("w", "prefix_cache_redis2", "KV hit - prefix_cache's"): False,
        ("w", "prefix_cache_redis2", "TTFT p99 ÷ prefix_cache's"): True,
        ("random", "prefix_cache", "TTFT p99 ÷ round robin"): True,
        ("random", "prefix_cache", "TTFT mean ÷ round robin"): False,
        ("random", "prefix_cache", "idle-while-queued max (s)"): True,
        ("other", "least_busy", "TTFT p99 ÷ round robin"): None,
        ("other", "least_busy", "TTFT mean ÷ round robin"): None,
        ("other", "least_busy", "idle-while-queued max (s)"): True,
    }
    table = report.target_table(report.targets(cells))
    for verdict in ("**PASS**", "**FAIL**", "**n/a**"):
        assert verdict in table


def test_targets_of_the_responses_variants() -> None:
    """multi_turn_responses: the hit rate of multi_turn in the same configuration, within 2 points
    either way; the chained variant: no failed request, and no TTFT comparison with round robin
    (whose follow-ups fail)."""

    def cell(config: str, workload: str, **figures: float | None) -> dict[str, object]:
        base = {
            "config": config,
            "workload": workload,
            "idle_while_queued_max_s": 0.0,
            "oracle_hit_rate": 0.7,
        }
        return {**base, "hit_over_oracle": 1.0, "ttft_p99_ms": 100, "ttft_mean_ms": 50, **figures}

    cells = [
        cell("round_robin", "multi_turn", hit_rate=0.3, ttft_p99_ms=600, ttft_mean_ms=200),
        cell("round_robin", "multi_turn_responses", hit_rate=0.35, ttft_p99_ms=600, ttft_mean_ms=200),
        cell("round_robin", "multi_turn_responses_chained", errors=80, ttft_p99_ms=90),
        cell("prefix_cache", "multi_turn", hit_rate=0.70),
        cell("prefix_cache", "multi_turn_responses", hit_rate=0.685),
        cell("least_busy", "multi_turn", hit_rate=0.40),
        cell("least_busy", "multi_turn_responses", hit_rate=0.43),
        cell("prefix_cache", "multi_turn_responses_chained", errors=0),
        cell("least_busy", "multi_turn_responses_chained", errors=3),
    ]
    rows = report.targets(cells)
    got = {(t["workload"], t["config"], t["target"]): t["pass"] for t in rows}
    same = "KV hit - multi_turn's"
    assert got[("multi_turn_responses", "prefix_cache", same)] is True  # -0.015
    assert got[("multi_turn_responses", "least_busy", same)] is False  # +0.03: either way counts
    assert ("multi_turn", "prefix_cache", same) not in got
    assert got[("multi_turn_responses_chained", "prefix_cache", "failed requests")] is True
    assert got[("multi_turn_responses_chained", "least_busy", "failed requests")] is False
    assert not [
        t for t in rows if t["workload"] == "multi_turn_responses_chained" and "round robin" in t["target"]
    ]
    assert got[("multi_turn_responses", "prefix_cache", "TTFT p99 ÷ round robin")] is True
    bounds = {t["bound"] for t in rows if t["target"] == same}
    assert bounds == {"within ±0.02"}


def test_hot_prompt_workload() -> None:
    w = workloads.build("hot_prompt", seed=1, duration=10.0)
    assert w == workloads.build("hot_prompt", seed=1, duration=10.0)  # deterministic
    assert w != workloads.build("hot_prompt", seed=2, duration=10.0)
    assert len({s.system for s in w.sessions}) == 1  # ONE shared system prompt
    assert 3000 <= len(w.sessions[0].system or "") <= 6000
    assert {s.key for s in w.sessions} == {"hot"}
    assert {len(s.turns) for s in w.sessions} == {1, 2, 3}
    users = [t.user for s in w.sessions for t in s.turns]
    assert len(set(users)) == len(users)  # a unique question per turn
    assert w.n_requests / w.duration > 30  # tens of requests per second


def test_multi_turn_responses_workload() -> None:
    """multi_turn's conversations, turn for turn, as Responses API requests: the same sessions and
    arrivals (at any load), the system prompt as `instructions`, the history as input items with
    the same fixed answers, and the very prompt the simulator renders for the chat request."""
    for kwargs in (
        {"seed": 1, "duration": 10.0},
        {"seed": 2, "duration": 5.0, "max_requests": 40, "load": 2.0},
    ):
        chat = workloads.build("multi_turn", **kwargs)
        resp = workloads.build("multi_turn_responses", **kwargs)
        assert resp.sessions == chat.sessions
        assert (resp.duration, resp.max_requests, resp.n_requests) == (
            chat.duration,
            chat.max_requests,
            chat.n_requests,
        )
        assert (chat.api, chat.path) == (workloads.CHAT, "/v1/chat/completions")
        assert (resp.api, resp.path) == (workloads.RESPONSES, "/v1/responses")
        chat_requests, resp_requests = list(chat.requests(max_tokens=16)), list(resp.requests(max_tokens=16))
        assert [(r.arrival, r.session, r.turn) for r in resp_requests] == [
            (r.arrival, r.session, r.turn) for r in chat_requests
        ]
    by_sid = {s.sid: s for s in resp.sessions}
    assert max(len(s.turns) for s in resp.sessions) >= 3
    for c, r in zip(chat_requests, resp_requests, strict=True):
        s = by_sid[r.session]
        assert r.body["model"] == c.body["model"] == workloads.MODEL
        assert r.body["instructions"] == s.system == c.body["messages"][0]["content"]
        assert r.body["max_output_tokens"] == c.body["max_tokens"] == 16
        assert r.body["stream"] is c.body["stream"] is True
        assert "messages" not in r.body
        assert "previous_response_id" not in r.body
        items = r.body["input"]
        assert len(items) == 2 * r.turn + 1 == len(c.body["messages"]) - 1
        for item, message in zip(items, c.body["messages"][1:], strict=True):
            if message["role"] == "user":
                assert item == {"role": "user", "content": message["content"]}
            else:  # an earlier answer: the workload's fixed text, as an output item
                assert item == {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": message["content"]}],
                }
        prompt = parse_responses(r.body, workloads.MODEL, ResponseStore()).prompt
        assert prompt == parse_request(orjson.dumps(c.body), chat=True).prompt
    stream_off = resp.body(resp.sessions[0], 0, max_tokens=7, stream=False)
    assert stream_off["max_output_tokens"] == 7
    assert "stream" not in stream_off
    assert resp.family == chat.family == "multi_turn"  # one text: the runner restarts the pickers


def test_multi_turn_responses_chained_workload() -> None:
    """multi_turn's sessions again, each turn only its new user message naming the previous turn's
    response (store: true)."""
    chat = workloads.build("multi_turn", seed=1, duration=10.0)
    chained = workloads.build("multi_turn_responses_chained", seed=1, duration=10.0)
    assert chained.sessions == chat.sessions
    assert (chained.api, chained.path, chained.chained, chained.family) == (
        workloads.RESPONSES_CHAINED,
        "/v1/responses",
        True,
        "multi_turn",
    )
    s = chained.sessions[0]
    first = chained.body(s, 0, max_tokens=16)
    assert first == {
        **workloads.build("multi_turn_responses", seed=1, duration=10.0).body(s, 0),
        "store": True,
    }
    second = chained.body(s, 1, max_tokens=16, previous_response_id="resp_abc")
    assert second == {
        "model": workloads.MODEL,
        "instructions": s.system,
        "input": [{"role": "user", "content": s.turns[1].user}],
        "previous_response_id": "resp_abc",
        "store": True,
        "max_output_tokens": 16,
        "stream": True,
    }
    with pytest.raises(ValueError, match="previous response"):
        chained.body(s, 1)
    with pytest.raises(ValueError, match="previous response"):
        chained.body(s, 0, previous_response_id="resp_abc")


def test_the_client_reads_chat_and_responses_answers() -> None:
    """TTFT at the first content, token counts from the usage, for both APIs, streamed or not."""

    def record() -> Any:
        return run.Record("s", "k", 0, 0.0)

    chat = record()
    assert not run.read_event(chat, {"choices": [{"delta": {"role": "assistant"}}]}, 0.1)
    assert chat.ttft is None
    assert not run.read_event(chat, {"choices": [{"delta": {"content": "Hi"}}]}, 0.2)
    assert not run.read_event(chat, {"choices": [{"delta": {"content": " there"}}]}, 0.3)
    usage = {"prompt_tokens": 100, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}}
    assert not run.read_event(chat, {"choices": [], "usage": usage}, 0.4)
    assert (chat.ttft, chat.prompt_tokens, chat.cached_tokens, chat.completion_tokens) == (0.2, 100, 64, 2)

    resp = record()
    response = {"id": "resp_1", "status": "in_progress", "usage": None}
    for kind in ("response.created", "response.in_progress"):
        assert not run.read_event(resp, {"type": kind, "response": response}, 0.1)
    assert not run.read_event(resp, {"type": "response.content_part.added", "part": {"text": ""}}, 0.1)
    assert resp.ttft is None
    assert not run.read_event(resp, {"type": "response.output_text.delta", "delta": "Hi"}, 0.2)
    assert not run.read_event(resp, {"type": "response.output_text.delta", "delta": " there"}, 0.3)
    assert not run.read_event(resp, {"type": "response.output_text.done", "text": "Hi there"}, 0.3)
    usage = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 48}, "output_tokens": 2}
    done = {**response, "status": "completed", "usage": usage}
    assert run.read_event(resp, {"type": "response.completed", "response": done}, 0.4)  # the end
    assert (resp.ttft, resp.prompt_tokens, resp.cached_tokens, resp.completion_tokens) == (0.2, 100, 48, 2)
    assert resp.response_id == "resp_1"  # what the next turn of a chain names
    assert resp.answer is None  # the completed event above has no output
    output = [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi there"}]}
    ]
    assert run.read_event(resp, {"type": "response.completed", "response": {**done, "output": output}}, 0.4)
    assert resp.answer == "Hi there"  # what the stored conversation holds
    assert resp.error == "unfinished"  # send() settles it once the stream is over

    failed = record()
    assert run.read_event(failed, {"type": "response.failed", "response": {"error": {"code": "x"}}}, 0.2)
    assert failed.error.startswith("response.failed")

    whole = record()
    answer = {"id": "resp_2", "object": "response", "status": "completed", "usage": usage, "output": output}
    run.read_answer(whole, answer, 0.5)
    assert (whole.ttft, whole.prompt_tokens, whole.cached_tokens) == (0.5, 100, 48)
    assert (whole.response_id, whole.answer) == ("resp_2", "Hi there")
    whole_chat = record()
    run.read_answer(whole_chat, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}, 0.5)
    assert (whole_chat.ttft, whole_chat.prompt_tokens, whole_chat.cached_tokens) == (0.5, 9, 0)


# --------------------------------------------------------------------------------------------------
# the smoke run


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_quality_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable,
        str(RUN),
        "--sims",
        "2",
        "--workloads",
        "multi_turn",
        "--configs",
        "round_robin,prefix_cache",
        "--seconds",
        "5",
        "--load",
        "0.5",
        "--drain",
        "15",
        # Small caches, so that one simulator cannot keep every conversation of the run.
        "--sim-arg",
        "kv-blocks=768",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=200, env=env, cwd=ROOT, check=False)
    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr[-4000:]}"
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    cells = {c["config"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(cells) == {"round_robin", "prefix_cache"}, result.stderr[-2000:]
    for c in cells.values():
        assert c["ok"] > 0, c
        assert c["errors"] == 0, c
        assert c["hit_rate"] is not None, c
        assert c["hit_rate_sims"] is not None, c
    assert cells["round_robin"]["hit_rate"] < cells["prefix_cache"]["hit_rate"], cells
    for c in cells.values():
        # the oracle is computed from the same answered prompts the simulators tokenized
        assert c["oracle_prompt_tokens"] == c["prompt_tokens"], c
        assert c["samples"] > 10, c  # sampled every 0.1 s over >= 5 s
        assert c["idle_while_queued_max_s"] >= 0, c
        assert c["idle_while_queued_total_s"] >= c["idle_while_queued_max_s"], c
    # multi_turn's turns of one session go out one after another: nobody beats the oracle
    pc = cells["prefix_cache"]
    assert pc["oracle_hit_rate"] >= pc["hit_rate"], pc
    assert pc["hit_over_oracle"] == pytest.approx(pc["hit_rate"] / pc["oracle_hit_rate"], abs=2e-3), pc
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["workloads"]["multi_turn"]["oracle_hit_rate"] > 0
    names = {t["target"] for t in results["targets"] if t["config"] == "prefix_cache"}
    assert {"KV hit ÷ oracle", "TTFT p99 ÷ round robin", "idle-while-queued max (s)"} <= names, names
    assert all(t["pass"] in (True, False) for t in results["targets"]), results["targets"]
    md = (out / "results.md").read_text()
    assert "| `prefix_cache` |" in md
    for text in ("## Targets", "| oracle |", "hit÷oracle", "idle-while-queued max s"):
        assert text in md, text
    assert "## Targets" in result.stdout
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
