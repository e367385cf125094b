"""`llmlb sim` as a process: the OpenAI routes (JSON and SSE), /metrics, /_sim/*, errors, failure
injection and signals. Every sim listens on 127.0.0.1 with short steps so the file runs in seconds."""

from __future__ import annotations

import http.client
import itertools
import json
import signal
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmlb import _core
from tests.support.procs import (
    HOST,
    Sim,
    SSEStream,
    get,
    parse_metrics,
    post,
    run_llmlb,
    start_sims,
    stop_all,
    wait_until,
)

CHAT = "/v1/chat/completions"


def start_test_sims(tmp_path, **variants: list[str]) -> dict[str, Sim]:
    """One sim per variant (its extra flags), with short steps; returns when all are ready."""
    flags = {name: ["--step-base-ms", "1", *extra] for name, extra in variants.items()}
    return {s.name: s for s in start_sims(flags, tmp_path, ready_timeout=20.0)}


@pytest.fixture(scope="module")
def sims(tmp_path_factory) -> Iterator[dict[str, Sim]]:
    sims = start_test_sims(
        tmp_path_factory.mktemp("sims"),
        main=["--lora", "lora-a,lora-b", "--max-loras", "1", "--kv-blocks", "256"],
        failing=["--fail-rate", "1", "--max-running", "1e+01"],  # integral floats are accepted
        flaky=["--fail-rate", "0.5", "--seed", "7"],
        dropping=["--drop-rate", "1"],
        slow=["--slow-rate", "1", "--slow-ms", "300"],
    )
    yield sims
    stop_all(s.proc for s in sims.values())


@pytest.fixture
def sim(sims) -> Sim:
    sims["main"].reset(timeout=5.0)
    return sims["main"]


def chat_body(messages: list[dict], **extra) -> dict:
    return {"model": "sim-model", "messages": messages, **extra}


SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 20}


def test_chat_json(sim):
    reply = post(sim.url + CHAT, chat_body([SYSTEM, {"role": "user", "content": "hi"}], max_tokens=5))
    assert reply.status == 200, reply
    assert reply.headers["x-sim-name"] == "main"
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "sim-model"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "length"
    rendered = "<|system|>\n" + SYSTEM["content"] + "\n<|user|>\nhi\n"
    prompt_tokens = -(-len(rendered) // 4)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_default_output_length_ends_with_stop(sim):
    reply = post(sim.url + CHAT, chat_body([{"role": "user", "content": "hello"}]))
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_json_and_list_content(sim):
    reply = post(sim.url + "/v1/completions", {"model": "sim-model", "prompt": "x" * 40, "max_tokens": 3})
    body = reply.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "the quick brown"
    assert body["usage"]["prompt_tokens"] == 10
    parts = [{"type": "text", "text": "one"}, {"type": "image_url", "image_url": {"url": "x"}}]
    reply = post(sim.url + CHAT, chat_body([{"role": "user", "content": parts}], max_tokens=1))
    assert reply.json()["usage"]["prompt_tokens"] == len("<|user|>\none\n") // 4 + 1


def read_sse(stream: SSEStream) -> list[str]:
    return list(stream.events(limit=1000))


def test_chat_sse_one_event_per_token_then_usage_and_done(sim):
    body = chat_body(
        [{"role": "user", "content": "stream please"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    with SSEStream(sim.url + CHAT, body) as stream:
        assert stream.status == 200
        assert stream.headers["x-sim-name"] == "main"
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = read_sse(stream)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens, usage = chunks[:-1], chunks[-1]
    assert len(tokens) == 6
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
    assert text == "the quick brown fox jumps over"
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 5 + ["length"]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 6


def test_sse_without_include_usage_has_no_usage_chunk(sim):
    body = {"model": "sim-model", "prompt": "abc", "max_tokens": 2, "stream": True}
    with SSEStream(sim.url + "/v1/completions", body) as stream:
        events = read_sse(stream)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["the", " quick"]
    assert all("usage" not in c for c in chunks)


def test_tokens_stream_as_they_are_generated(sims, tmp_path):
    # 40 ms steps: the first token arrives at TTFT, the rest one step apart.
    (slow,) = start_test_sims(tmp_path, steady=["--step-base-ms", "40"]).values()
    try:
        body = chat_body([{"role": "user", "content": "x"}], max_tokens=4, stream=True)
        start = time.monotonic()
        with SSEStream(slow.url + CHAT, body) as stream:
            arrivals = []
            for _ in stream.events(limit=10):
                arrivals.append(time.monotonic() - start)
        assert len(arrivals) == 5  # 4 tokens + [DONE]
        assert arrivals[0] >= 0.035
        gaps = [b - a for a, b in itertools.pairwise(arrivals[:4])]
        assert all(g >= 0.025 for g in gaps), arrivals
    finally:
        stop_all([slow.proc])


def test_second_turn_of_a_conversation_hits_the_cache(sim):
    turn1 = [SYSTEM, {"role": "user", "content": "What is the capital of France? " * 5}]
    first = post(sim.url + CHAT, chat_body(turn1, max_tokens=4)).json()
    answer = first["choices"][0]["message"]["content"]
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And Spain?"}]
    second = post(sim.url + CHAT, chat_body(turn2, max_tokens=4)).json()
    cached1 = first["usage"]["prompt_tokens_details"]["cached_tokens"]
    cached2 = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached1 == 0
    # Every full 16-token block of the first turn's prompt is reused.
    assert cached2 == first["usage"]["prompt_tokens"] // 16 * 16
    assert cached2 > 0
    stats = sim.stats()
    assert stats["cached_tokens_total"] == cached2
    assert stats["prompt_tokens_total"] == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]


def test_metrics_page_parses_and_reports_the_load(sim):
    prompt = [{"role": "user", "content": "y" * 400}]
    post(sim.url + CHAT, chat_body(prompt, max_tokens=2))
    post(sim.url + CHAT, chat_body(prompt, max_tokens=2))
    body = chat_body([{"role": "user", "content": "long"}], max_tokens=3000, stream=True)
    with SSEStream(sim.url + CHAT, body) as stream:
        assert stream.next_event() is not None  # running now
        text = sim.metrics_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name: s for s in parse_metrics(text) if "finished_reason" not in s.labels}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge"
        assert samples[name].labels == {"engine": "0", "model_name": "sim-model"}
    assert samples["vllm:num_requests_running"].value == 1
    assert samples["vllm:num_requests_waiting"].value == 0
    # The stream holds its blocks for prompt and output: ceil((4 + 3000) / 16) of 256.
    kv = samples["vllm:kv_cache_usage_perc"].value
    assert kv == pytest.approx(188 / 256)
    assert families["vllm:prefix_cache_queries"].type == "counter"
    prompt_tokens = -(-len("<|user|>\n" + "y" * 400 + "\n") // 4)
    assert samples["vllm:prefix_cache_queries_total"].value == 2 * prompt_tokens + 4
    assert samples["vllm:prefix_cache_hits_total"].value == prompt_tokens // 16 * 16
    assert samples["vllm:prompt_tokens_total"].value == 2 * prompt_tokens + 4
    ttft = families["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    buckets = [s for s in ttft.samples if s.name.endswith("_bucket")]
    assert len(buckets) == 23  # vLLM's 22 bounds and +Inf
    assert next(s for s in ttft.samples if s.name.endswith("_count")).value == 3
    success = [s for s in parse_metrics(text) if s.name == "vllm:request_success_total"]
    assert {s.labels["finished_reason"]: s.value for s in success} == {"stop": 0, "length": 2, "abort": 0}
    engine, load = _core.parse_engine_metrics(text.encode())
    assert engine == "vllm"
    assert load.running == 1
    assert load.waiting == 0
    assert load.kv_cache_usage == pytest.approx(kv)
    assert load.max_lora == 1
    assert load.running_lora_adapters == []
    assert load.lines_skipped == 0


def test_metrics_layout_matches_prometheus_client(sim):
    text = sim.metrics_text()
    lines = text.splitlines()
    i = lines.index("# TYPE vllm:prefix_cache_hits_total counter")
    assert lines[i - 1].startswith("# HELP vllm:prefix_cache_hits_total ")
    assert lines[i + 1].startswith('vllm:prefix_cache_hits_total{engine="0",model_name="sim-model"} ')
    assert lines[i + 2].startswith("# HELP vllm:prefix_cache_hits_created ")
    assert lines[i + 3] == "# TYPE vllm:prefix_cache_hits_created gauge"
    assert (
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="sim-model"} 0.0' in lines
    )
    assert text.endswith("\n")


def test_lora_adapters_are_served_and_reported(sim):
    models = get(sim.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["sim-model", "lora-a", "lora-b"]
    assert models["data"][1]["parent"] == "sim-model"
    body = chat_body([{"role": "user", "content": "adapter"}], max_tokens=3000, stream=True)
    body["model"] = "lora-a"
    with SSEStream(sim.url + CHAT, body) as stream:
        assert json.loads(stream.next_event() or "")["model"] == "lora-a"
        other = {**body, "model": "lora-b", "max_tokens": 1}
        with SSEStream(sim.url + CHAT, other) as waiting:
            # --max-loras 1: lora-b waits while lora-a runs.
            wait_until(lambda: sim.stats()["waiting"] == 1, 5.0, message="lora-b waiting")
            _, load = _core.parse_engine_metrics(sim.metrics_text().encode())
            assert load.running_lora_adapters == ["lora-a"]
            assert load.waiting_lora_adapters == ["lora-b"]
            stream.abort()
            events = read_sse(waiting)
    assert events[-1] == "[DONE]"


def test_stats_and_reset(sim):
    post(sim.url + CHAT, chat_body([{"role": "user", "content": "z" * 200}], max_tokens=2))
    stats = sim.stats()
    assert stats["name"] == "main"
    assert stats["requests_total"] == 1
    assert stats["prompt_tokens_total"] > 0
    assert stats["kv_blocks_total"] == 256
    assert stats["kv_blocks_used"] == 0
    assert stats["kv_blocks_cached"] > 0
    assert stats["max_running_seen"] == 1
    body = chat_body([{"role": "user", "content": "busy"}], max_tokens=3000, stream=True)
    with SSEStream(sim.url + CHAT, body) as stream:
        assert stream.next_event() is not None
        busy = post(sim.url + "/_sim/reset", {})
        assert busy.status == 409
        assert "running" in busy.json()["error"]["message"]
        assert sim.stats()["kv_blocks_used"] > 0
    wait_until(lambda: sim.stats()["running"] == 0, 5.0, message="the aborted stream to leave")
    assert sim.stats()["requests_aborted"] == 1
    reply = post(sim.url + "/_sim/reset", {})
    assert reply.status == 200
    after = sim.stats()
    for key in ("requests_total", "prompt_tokens_total", "cached_tokens_total", "max_running_seen"):
        assert after[key] == 0, key
    assert after["kv_blocks_cached"] == 0
    samples = parse_metrics(sim.metrics_text())
    assert [s.value for s in samples if s.name == "vllm:prefix_cache_queries_total"] == [0]


def test_reset_prefix_cache_flushes_the_cache_and_keeps_the_counters(sim):
    """vLLM's POST /reset_prefix_cache: the next identical prompt misses, the counters go on."""
    body = chat_body([SYSTEM, {"role": "user", "content": "flush me"}], max_tokens=2)

    def counters() -> tuple[float, float]:
        samples = parse_metrics(sim.metrics_text())
        pick = {s.name: s.value for s in samples}
        return pick["vllm:prefix_cache_queries_total"], pick["vllm:prefix_cache_hits_total"]

    assert post(sim.url + CHAT, body).status == 200
    assert post(sim.url + CHAT, body).json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    queries, hits = counters()
    assert hits > 0
    reply = post(sim.url + "/reset_prefix_cache", None)
    assert reply.status == 200, reply
    assert reply.body == b""
    stats = sim.stats()
    assert (stats["kv_blocks_cached"], stats["prefix_cache_resets"]) == (0, 1)
    assert counters() == (queries, hits)  # monotonic, as vLLM's
    again = post(sim.url + CHAT, body).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert counters()[0] > queries
    assert counters()[1] == hits
    # Refused while a running request holds blocks (vLLM's engine refuses too).
    long = chat_body([{"role": "user", "content": "busy"}], max_tokens=3000, stream=True)
    with SSEStream(sim.url + CHAT, long) as stream:
        assert stream.next_event() is not None
        busy = post(sim.url + "/reset_prefix_cache", None)
        assert busy.status == 409
        assert "hold blocks" in busy.json()["error"]["message"]
    assert sim.stats()["prefix_cache_resets"] == 1


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "JSON"),
        ({"model": "sim-model"}, 400, "messages"),
        ({"model": "sim-model", "messages": []}, 400, "messages"),
        (
            {"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-9"),
        (
            {"model": "sim-model", "messages": [{"role": "user", "content": "x" * 20000}]},
            400,
            "context length",
        ),
    ],
)
def test_bad_requests(sim, body, status, needle):
    reply = post(sim.url + CHAT, body)
    assert reply.status == status, reply
    assert reply.headers["x-sim-name"] == "main"
    error = reply.json()["error"]
    assert needle in error["message"]
    assert error["code"] == status
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


def test_completions_need_a_prompt(sim):
    reply = post(sim.url + "/v1/completions", {"model": "sim-model"})
    assert reply.status == 400
    assert reply.json()["error"]["param"] == "prompt"


def test_sglang_info_routes(sim):
    for path in ("/server_info", "/get_server_info"):
        info = get(sim.url + path).json()
        assert info["model_path"] == "sim-model"
        assert info["dp_size"] == 1
    for path in ("/model_info", "/get_model_info"):
        info = get(sim.url + path).json()
        assert info["model_path"] == "sim-model"
        assert info["is_generation"] is True
    health = get(sim.url + "/health")
    assert health.status == 200
    assert health.body == b""


def test_fail_rate_one_answers_500(sims):
    failing = sims["failing"]
    for _ in range(3):
        reply = post(failing.url + CHAT, chat_body([{"role": "user", "content": "x"}]))
        assert reply.status == 500
        assert reply.headers["x-sim-name"] == "failing"
        assert reply.json()["error"]["code"] == 500
    assert failing.stats()["requests_failed"] >= 3
    assert get(failing.url + "/health").status == 200
    assert get(failing.url + "/server_info").json()["max_running_requests"] == 10


def test_failures_follow_the_seed_and_reset_reseeds(sims):
    flaky = sims["flaky"]

    def statuses() -> list[int]:
        body = chat_body([{"role": "user", "content": "x"}], max_tokens=1)
        return [post(flaky.url + CHAT, body).status for _ in range(20)]

    flaky.reset(timeout=5.0)
    first = statuses()
    assert set(first) == {200, 500}
    flaky.reset(timeout=5.0)
    assert statuses() == first


def test_drop_rate_one_closes_the_connection(sims):
    dropping = sims["dropping"]
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        post(dropping.url + CHAT, chat_body([{"role": "user", "content": "x"}]))
    assert dropping.stats()["requests_dropped"] >= 1


def test_slow_rate_one_delays_every_request(sims):
    slow = sims["slow"]
    reply = post(slow.url + CHAT, chat_body([{"role": "user", "content": "x"}], max_tokens=1))
    assert reply.status == 200
    assert reply.elapsed >= 0.3


def test_sigterm_and_sigint_exit_0_even_mid_stream(tmp_path):
    procs = start_test_sims(tmp_path, term=[], intr=[])
    body = chat_body([{"role": "user", "content": "x"}], max_tokens=30000, stream=True)
    for sim, sig in ((procs["term"], signal.SIGTERM), (procs["intr"], signal.SIGINT)):
        stream = SSEStream(sim.url + CHAT, body)
        assert stream.status == 200
        assert stream.next_event() is not None
        started = time.monotonic()
        sim.proc.send_signal(sig)
        assert sim.proc.wait(10) == 0, sim.proc.describe()
        assert time.monotonic() - started < 2.0  # in-flight requests are dropped, not awaited
        assert "[DONE]" not in read_sse(stream)  # the stream ends unfinished
        stream.abort()
        log = sim.proc.log_path.read_text()
        assert f"llmlb sim {sim.name} listening on http://{HOST}:{sim.port}" in log
        assert "Traceback" not in log


def test_bad_flags_exit_2_with_one_line():
    for args in (
        ["--port", "1", "--fail-rate", "1.5"],
        ["--fail-rate", "0"],
        ["--port", "1", "--lora", "a,,b"],
    ):
        result = run_llmlb("sim", *args)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_a_port_in_use_exits_1(sims):
    result = run_llmlb("sim", "--port", str(sims["main"].port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "cannot listen" in result.stderr
