"""Properties of request parsing and prefix hashing, through the Python binding."""

from __future__ import annotations

import contextlib
import json
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmlb import PREFIX_BLOCK_SIZE, RequestParseError, parse_request

roles = st.sampled_from(["system", "user", "assistant", "tool"])
texts = st.text(max_size=3 * PREFIX_BLOCK_SIZE)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), min_size=1, max_size=8)


def chat(msgs: list[dict[str, str]], model: str = "m", **extra: object) -> bytes:
    return orjson.dumps({"model": model, "messages": msgs, **extra})


@given(messages, messages)
def test_an_extended_conversation_shares_every_prefix_hash(first, more):
    short = parse_request(chat(first)).prefix_hashes
    long = parse_request(chat(first + more)).prefix_hashes
    assert long[: len(short)] == short
    assert len(long) > len(short)


@given(messages)
def test_key_order_whitespace_and_escaping_do_not_change_hashes(msgs):
    expected = parse_request(chat(msgs)).prefix_hashes
    reordered = [{"content": m["content"], "role": m["role"]} for m in msgs]
    spaced = json.dumps({"messages": reordered, "model": "m"}, indent=2, ensure_ascii=True).encode()
    assert parse_request(spaced).prefix_hashes == expected


@given(st.lists(texts, min_size=2, max_size=5, unique=True))
def test_message_order_matters(contents):
    msgs = [{"role": "user", "content": c} for c in contents]
    assert parse_request(chat(msgs)).prefix_hashes[-1] != parse_request(chat(msgs[::-1])).prefix_hashes[-1]


@given(texts)
def test_repeated_blocks_do_not_cancel(text):
    msg = {"role": "user", "content": text}
    hashes = parse_request(chat([msg, msg])).prefix_hashes
    assert len(set(hashes)) == len(hashes)


@given(messages, st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_models_never_share_keys(msgs, a, b):
    if a == b:
        return
    ha = set(parse_request(chat(msgs, model=a)).prefix_hashes)
    hb = set(parse_request(chat(msgs, model=b)).prefix_hashes)
    assert not ha & hb


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash(body):
    try:
        parsed = parse_request(body)
    except RequestParseError:
        return
    assert parsed.kind in ("chat", "completion")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=30,
    )
)
def test_arbitrary_json_never_crashes(value):
    for body in (
        json.dumps(value).encode(),
        json.dumps({"model": "m", "messages": value}).encode(),
        json.dumps({"prompt": value}).encode(),
    ):
        with contextlib.suppress(RequestParseError):
            parse_request(body)


def test_long_system_prompt_matches_partially():
    shared = "You are a careful assistant. " * 200  # ~5.8 KB: about 11 blocks
    a = parse_request(chat([{"role": "system", "content": shared + "Variant A"}])).prefix_hashes
    b = parse_request(chat([{"role": "system", "content": shared + "Variant B"}])).prefix_hashes
    common = sum(1 for x, y in zip(a, b, strict=True) if x == y)
    assert common == len(a) - 1 >= 10


def test_completion_prompts():
    a = parse_request(b'{"model": "m", "prompt": "hello world"}')
    assert a.kind == "completion"
    assert len(a.prefix_hashes) == 1
    longer = parse_request(orjson.dumps({"model": "m", "prompt": "x" * (4 * PREFIX_BLOCK_SIZE)}))
    assert len(longer.prefix_hashes) == 5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"not json", "not a JSON object"),
        (b'{"model": "m"}', "neither 'messages' nor 'prompt'"),
        (b'{"messages": {}}', "'messages' must be an array"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "'messages[].content' must be"),
        (b'{"messages": [], "model": "m",}', "not valid JSON"),
    ],
)
def test_bad_bodies_raise_a_clear_error(body, message):
    with pytest.raises(RequestParseError, match=re.escape(message)):
        parse_request(body)
