"""`llmlb sim`'s other APIs: the served model list (--models), OpenAI's Responses API (and its
per-server store), Anthropic's Messages API and embeddings, over HTTP and through the official SDKs
when they are installed. Every sim listens on 127.0.0.1 with 1 ms steps."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from llmlb.sim.responses import ResponseStore, Stored, Turn
from tests.support.procs import Sim, SSEStream, get, post, run_llmlb, start_sims, stop_all

RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
EMBEDDINGS = "/v1/embeddings"
INSTRUCTIONS = "You are a helpful assistant. " * 20
QUESTION = "What is the capital of France? " * 5


@pytest.fixture(scope="module")
def sims(tmp_path_factory) -> Iterator[dict[str, Sim]]:
    flags = {
        "two": ["--models", "a,b", "--lora", "lora-x"],
        "other": ["--models", "a,b"],
        "failing": ["--fail-rate", "1"],
    }
    started = start_sims(
        {name: ["--step-base-ms", "1", *extra] for name, extra in flags.items()},
        tmp_path_factory.mktemp("sims"),
        ready_timeout=20.0,
    )
    yield {s.name: s for s in started}
    stop_all(s.proc for s in started)


@pytest.fixture
def sim(sims) -> Sim:
    sims["two"].reset(timeout=5.0)
    return sims["two"]


def tokens(text: str) -> int:
    """Prompt tokens of a rendered prompt (4 bytes per token)."""
    return -(-len(text.encode()) // 4)


def named_events(stream: SSEStream) -> list[tuple[str, dict[str, Any]]]:
    """The stream's (event, data) pairs, read to the end."""
    events = []
    name = ""
    for _ in range(10_000):
        line = stream.resp.readline()
        if not line:
            return events
        text = line.decode().rstrip("\r\n")
        if text.startswith("event: "):
            name = text.removeprefix("event: ")
        elif text.startswith("data: "):
            events.append((name, json.loads(text.removeprefix("data: "))))
    raise AssertionError("stream longer than 10,000 lines")


# --------------------------------------------------------------------------------------------------
# served models


def test_models_lists_every_served_model_then_the_adapters(sim):
    data = get(sim.url + "/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("a", None), ("b", None), ("lora-x", "a")]
    assert sim.stats()["models"] == ["a", "b"]


UNKNOWN_MODEL = [
    ("/v1/chat/completions", {"model": "c", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/completions", {"model": "c", "prompt": "x"}),
    (RESPONSES, {"model": "c", "input": "x"}),
    (EMBEDDINGS, {"model": "c", "input": "x"}),
]


@pytest.mark.parametrize(("path", "body"), UNKNOWN_MODEL)
def test_an_unserved_model_is_404_on_every_openai_route(sim, path, body):
    reply = post(sim.url + path, body)
    assert reply.status == 404, reply
    assert reply.headers["x-sim-name"] == "two"
    assert reply.json() == {
        "error": {
            "message": "The model `c` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_an_unserved_model_is_404_on_messages_in_anthropics_shape(sim):
    # Checked before the body, as vLLM does: a misrouted request gets 404 whatever else it holds.
    reply = post(sim.url + MESSAGES, {"model": "c", "messages": []})
    assert reply.status == 404
    assert reply.headers["x-sim-name"] == "two"
    assert reply.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model `c` does not exist."},
    }


def test_each_served_model_and_adapter_answers_and_a_missing_model_is_the_base_one(sim):
    for model in ("a", "b", "lora-x"):
        reply = post(sim.url + RESPONSES, {"model": model, "input": "x", "max_output_tokens": 1})
        assert reply.status == 200, reply
        assert reply.json()["model"] == model
    assert post(sim.url + RESPONSES, {"input": "x"}).json()["model"] == "a"
    assert post(sim.url + MESSAGES, {"messages": [{"role": "user", "content": "x"}]}).json()["model"] == "a"
    assert post(sim.url + EMBEDDINGS, {"input": "x"}).json()["model"] == "a"


def test_models_flag_errors_exit_2():
    for args, needle in (
        (["--models", "a,b", "--model", "c"], "must include --model"),
        (["--models", "a,,b"], "non-empty"),
        (["--models", "a,b", "--lora", "b"], "adapter"),
    ):
        result = run_llmlb("sim", "--port", "1", *args)
        assert result.returncode == 2, result
        assert needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Responses API


def test_responses_json(sim):
    body = {"model": "a", "input": "hello", "instructions": "be nice", "max_output_tokens": 4}
    reply = post(sim.url + RESPONSES, body)
    assert reply.status == 200, reply
    assert reply.headers["x-sim-name"] == "two"
    assert reply.body.startswith(b'{"id":"resp_')
    response = reply.json()
    assert response["object"] == "response"
    assert isinstance(response["created_at"], int)
    assert response["model"] == "a"
    assert response["status"] == "completed"
    assert response["previous_response_id"] is None
    assert response["store"] is True
    (item,) = response["output"]
    assert item["type"] == "message"
    assert item["id"].startswith("msg_")
    assert (item["status"], item["role"]) == ("completed", "assistant")
    assert item["content"] == [{"type": "output_text", "text": "the quick brown fox", "annotations": []}]
    prompt = tokens("<|system|>\nbe nice\n<|user|>\nhello\n")
    assert response["usage"] == {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + 4,
    }


def test_responses_sse(sim):
    body = {"model": "b", "input": "stream please", "max_output_tokens": 3, "stream": True}
    with SSEStream(sim.url + RESPONSES, body) as stream:
        assert stream.status == 200
        assert stream.headers["x-sim-name"] == "two"
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = named_events(stream)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    created = events[0][1]["response"]
    assert next(iter(created)) == "id"
    assert (created["status"], created["output"]) == ("in_progress", [])
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == "the quick brown"
    final = events[-1][1]["response"]
    assert final["id"] == created["id"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "the quick brown"
    assert final["usage"]["output_tokens"] == 3
    # Streamed responses are stored too.
    assert get(f"{sim.url}{RESPONSES}/{final['id']}").json() == final


def test_responses_second_turn_hits_the_cache_when_the_history_is_resent(sim):
    user1 = {"role": "user", "content": QUESTION}
    first = post(sim.url + RESPONSES, {"model": "a", "instructions": INSTRUCTIONS, "input": [user1]}).json()
    # The answer's output items go back as they came (what the SDKs do), then the next question.
    items = [
        user1,
        *first["output"],
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And Spain?"}]},
    ]
    second = post(sim.url + RESPONSES, {"model": "a", "instructions": INSTRUCTIONS, "input": items}).json()
    assert first["usage"]["input_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    # Every full block of the first prompt is reused, and the answer's blocks after it.
    assert cached >= first["usage"]["input_tokens"] // 16 * 16
    assert cached > 0


def test_responses_second_turn_hits_the_cache_with_previous_response_id(sim):
    first = post(sim.url + RESPONSES, {"model": "a", "instructions": INSTRUCTIONS, "input": QUESTION}).json()
    body = {
        "model": "a",
        "instructions": INSTRUCTIONS,
        "input": "And Spain?",
        "previous_response_id": first["id"],
    }
    second = post(sim.url + RESPONSES, body).json()
    assert second["previous_response_id"] == first["id"]
    assert (
        second["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"] // 16 * 16
    )
    # The same conversation re-sent as items renders the same prompt: every full block hits.
    items = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first["output"][0]["content"][0]["text"]},
        {"role": "user", "content": "And Spain?"},
    ]
    resent = post(sim.url + RESPONSES, {"model": "a", "instructions": INSTRUCTIONS, "input": items}).json()
    assert resent["usage"]["input_tokens"] == second["usage"]["input_tokens"]
    assert (
        resent["usage"]["input_tokens_details"]["cached_tokens"] == second["usage"]["input_tokens"] // 16 * 16
    )
    # A third turn chains through the second.
    body = {
        "model": "a",
        "instructions": INSTRUCTIONS,
        "input": "And Italy?",
        "previous_response_id": second["id"],
    }
    third = post(sim.url + RESPONSES, body).json()
    assert (
        third["usage"]["input_tokens_details"]["cached_tokens"] >= second["usage"]["input_tokens"] // 16 * 16
    )


def test_an_unknown_previous_response_id_is_404(sims, sim):
    first = post(sim.url + RESPONSES, {"model": "a", "input": "hello"}).json()
    # The store is per server: the follow-up sent to another server fails as with vLLM.
    for url, response_id in ((sim.url, "resp_nope"), (sims["other"].url, first["id"])):
        body = {"model": "a", "input": "again", "previous_response_id": response_id}
        reply = post(url + RESPONSES, body)
        assert reply.status == 404, reply
        assert reply.json() == {
            "error": {
                "message": f"Response with id '{response_id}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": 404,
            }
        }


def test_get_a_stored_response(sim):
    created = post(sim.url + RESPONSES, {"model": "a", "input": "keep me"}).json()
    reply = get(f"{sim.url}{RESPONSES}/{created['id']}")
    assert reply.status == 200
    assert reply.headers["x-sim-name"] == "two"
    assert reply.json() == created
    unstored = post(sim.url + RESPONSES, {"model": "a", "input": "forget me", "store": False}).json()
    assert unstored["store"] is False
    missing = get(f"{sim.url}{RESPONSES}/{unstored['id']}")
    assert missing.status == 404
    assert missing.json()["error"]["message"] == f"Response with id '{unstored['id']}' not found."
    assert sim.stats()["responses_stored"] == 1
    post(sim.url + "/_sim/reset", {})
    assert get(f"{sim.url}{RESPONSES}/{created['id']}").status == 404


def test_function_calls_and_unknown_items_are_rendered():
    from llmlb.sim.responses import render_input

    text = render_input(
        [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x":1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"type": "reasoning", "summary": []},
        ]
    )
    assert text == (
        '<|assistant|>\n<tool_call>{"arguments":"{\\"x\\":1}","name":"f"}</tool_call>\n'
        "<|tool|>\n42\n"
        '{"summary":[],"type":"reasoning"}\n'
    )


def test_the_response_store_keeps_the_most_recent():
    store = ResponseStore(limit=2)
    for i in range(3):
        store.put(f"r{i}", Stored({"id": f"r{i}"}, Turn(None, str(i))))
    assert (store.get("r0"), len(store)) == (None, 2)
    assert store.get("r2") is not None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "a"}, "input"),
        ({"model": "a", "input": 3}, "input"),
        ({"model": "a", "input": [{"role": "user", "content": 3}]}, "input"),
        ({"model": "a", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "a", "input": "x", "instructions": ["no"]}, "instructions"),
        ({"model": "a", "input": "x", "tools": {}}, "tools"),
    ],
)
def test_bad_responses_requests_are_400(sim, body, param):
    reply = post(sim.url + RESPONSES, body)
    assert reply.status == 400, reply
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", param, 400)


# --------------------------------------------------------------------------------------------------
# Messages API


def test_messages_json(sim):
    body = {
        "model": "b",
        "max_tokens": 3,
        "system": "be nice",
        "messages": [{"role": "user", "content": "hi"}],
    }
    reply = post(sim.url + MESSAGES, body)
    assert reply.status == 200, reply
    assert reply.headers["x-sim-name"] == "two"
    message = reply.json()
    assert message["id"].startswith("msg_")
    assert message == {
        "id": message["id"],
        "type": "message",
        "role": "assistant",
        "model": "b",
        "content": [{"type": "text", "text": "the quick brown"}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {
            "input_tokens": tokens("<|system|>\nbe nice\n<|user|>\nhi\n"),
            "output_tokens": 3,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        },
    }
    del body["max_tokens"]  # the default length ends as a natural stop
    default = post(sim.url + MESSAGES, body).json()
    assert (default["stop_reason"], default["usage"]["output_tokens"]) == ("end_turn", 16)


def test_messages_sse(sim):
    body = {"model": "a", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with SSEStream(sim.url + MESSAGES, body) as stream:
        assert stream.status == 200
        assert stream.headers["x-sim-name"] == "two"
        events = named_events(stream)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert (start["role"], start["content"], start["stop_reason"]) == ("assistant", [], None)
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == "the quick brown"
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"] == {"output_tokens": 3}


def test_messages_second_turn_reads_the_cache(sim):
    system = [{"type": "text", "text": INSTRUCTIONS}]
    turn1 = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    first = post(
        sim.url + MESSAGES, {"model": "a", "max_tokens": 8, "system": system, "messages": turn1}
    ).json()
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": "And Spain?"},
    ]
    second = post(
        sim.url + MESSAGES, {"model": "a", "max_tokens": 8, "system": system, "messages": turn2}
    ).json()
    assert first["usage"]["cache_read_input_tokens"] == 0
    prompt1 = first["usage"]["input_tokens"]
    read = second["usage"]["cache_read_input_tokens"]
    assert read >= prompt1 // 16 * 16 > 0
    assert sim.stats()["cached_tokens_total"] == read


def test_messages_tool_blocks_and_images_are_rendered(sim):
    messages = [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "AAAA"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]},
    ]
    reply = post(sim.url + MESSAGES, {"model": "a", "max_tokens": 1, "messages": messages})
    assert reply.status == 200, reply
    prompt = (
        '<|user|>\n{"source":{"data":"AAAA","type":"base64"},"type":"image"}\n'
        '<|assistant|>\n<tool_call>{"input":{"x":1},"name":"f"}</tool_call>\n'
        "<|user|>\n<tool_result>42</tool_result>\n"
    )
    assert reply.json()["usage"]["input_tokens"] == tokens(prompt)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "a"},
        {"model": "a", "messages": [{"role": "system", "content": "x"}]},
        {"model": "a", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
        {"model": "a", "messages": [{"role": "user", "content": [{"text": "no type"}]}]},
    ],
)
def test_bad_messages_requests_are_400_in_anthropics_shape(sim, body):
    reply = post(sim.url + MESSAGES, body)
    assert reply.status == 400, reply
    error = reply.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]


def test_failures_take_each_routes_shape(sims):
    failing = sims["failing"]
    responses = post(failing.url + RESPONSES, {"input": "x"})
    assert (responses.status, responses.json()["error"]["type"]) == (500, "InternalServerError")
    messages = post(failing.url + MESSAGES, {"messages": [{"role": "user", "content": "x"}]})
    assert messages.status == 500
    assert messages.json()["error"]["type"] == "api_error"
    assert post(failing.url + EMBEDDINGS, {"input": "x"}).status == 500


# --------------------------------------------------------------------------------------------------
# embeddings


def test_embeddings_json_and_the_cache(sim):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    first = post(sim.url + EMBEDDINGS, {"model": "a", "input": text})
    assert first.status == 200, first
    assert first.headers["x-sim-name"] == "two"
    body = first.json()
    assert (body["object"], body["model"]) == ("list", "a")
    (item,) = body["data"]
    assert (item["object"], item["index"]) == ("embedding", 0)
    assert len(item["embedding"]) == 8
    assert sum(x * x for x in item["embedding"]) == pytest.approx(1.0, abs=1e-5)
    prompt = tokens(text)
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "total_tokens": prompt,
        "completion_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    again = post(sim.url + EMBEDDINGS, {"model": "a", "input": text}).json()
    assert again["data"][0]["embedding"] == item["embedding"]  # deterministic
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // 16 * 16 > 0
    stats = sim.stats()
    assert stats["generation_tokens_total"] == 0  # prefill only
    assert stats["requests_finished"] == 2
    assert stats["cached_tokens_total"] == again["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_embeddings_of_lists_token_ids_and_base64(sim):
    many = post(sim.url + EMBEDDINGS, {"model": "a", "input": ["one", "two", "one"]}).json()
    vectors = [d["embedding"] for d in many["data"]]
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert vectors[0] == vectors[2] != vectors[1]
    ids = post(sim.url + EMBEDDINGS, {"model": "a", "input": [1, 2, 3, 4, 5]}).json()
    assert ids["usage"]["prompt_tokens"] == 5  # one token per id
    lists = post(sim.url + EMBEDDINGS, {"model": "a", "input": [[1, 2], [3, 4, 5]]}).json()
    assert lists["usage"]["prompt_tokens"] == 5
    assert len(lists["data"]) == 2
    packed = post(sim.url + EMBEDDINGS, {"model": "a", "input": "one", "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == vectors[0]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "a"},
        {"model": "a", "input": ""},
        {"model": "a", "input": []},
        {"model": "a", "input": [[]]},
        {"model": "a", "input": [1, -2]},
        {"model": "a", "input": [{"text": "x"}]},
        {"model": "a", "input": "x", "encoding_format": "int8"},
        {"model": "a", "input": "x" * 200_000},
    ],
)
def test_bad_embeddings_requests_are_400(sim, body):
    reply = post(sim.url + EMBEDDINGS, body)
    assert reply.status == 400, reply
    assert reply.json()["error"]["type"] == "BadRequestError"


# --------------------------------------------------------------------------------------------------
# the official SDKs


def test_openai_sdk_responses_and_embeddings(sim):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=10.0)
    first = client.responses.create(model="a", instructions=INSTRUCTIONS, input=QUESTION)
    assert first.output_text.startswith("the quick brown")
    assert first.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    second = client.responses.create(
        model="a", instructions=INSTRUCTIONS, input="And Spain?", previous_response_id=first.id
    )
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(first.id).id == first.id
    events = list(client.responses.create(model="a", input="stream", stream=True, max_output_tokens=2))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "the quick"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="a", input="x", previous_response_id="resp_unknown")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="c", input="x")
    # The SDK asks for base64 unless told otherwise; both decode to the same vector.
    packed = client.embeddings.create(model="a", input="hello")
    plain = client.embeddings.create(model="a", input="hello", encoding_format="float")
    assert packed.data[0].embedding == plain.data[0].embedding
    assert len(plain.data[0].embedding) == 8


def test_anthropic_sdk_messages(sim):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=sim.url, api_key="unused", max_retries=0, timeout=10.0)
    turn1 = [{"role": "user", "content": QUESTION}]
    first = client.messages.create(model="b", max_tokens=4, system=INSTRUCTIONS, messages=turn1)
    assert first.content[0].text == "the quick brown fox"
    assert first.stop_reason == "max_tokens"
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": "And?"},
    ]
    with client.messages.stream(model="b", max_tokens=4, system=INSTRUCTIONS, messages=turn2) as stream:
        second = stream.get_final_message()
    assert second.content[0].text == "the quick brown fox"
    assert (second.usage.cache_read_input_tokens or 0) > 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="c", max_tokens=1, messages=turn1)
