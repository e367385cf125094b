"""Properties of request parsing and prefix hashing, through the Python binding."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import zlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmlb import (
    PREFIX_BLOCK_SIZE,
    Balancer,
    BodyTooLargeError,
    ParsedRequest,
    RequestParseError,
    RequestStream,
    parse_body,
    parse_request,
)

UNLIMITED = 2**63

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


@given(messages, st.sampled_from([None, [], [{"type": "function", "function": {"name": "f"}}]]))
def test_tools_change_every_key_but_add_no_level(msgs, tools):
    plain = parse_request(chat(msgs)).prefix_hashes
    if tools is None:
        return
    with_tools = parse_request(chat(msgs, tools=tools)).prefix_hashes
    assert len(with_tools) == len(plain)
    assert not set(with_tools) & set(plain)


@given(messages)
def test_top_level_key_order_does_not_matter(msgs):
    tools = [{"type": "function", "function": {"name": "f"}}]
    model_first = orjson.dumps({"model": "m", "tools": tools, "messages": msgs, "stream": True})
    sdk_order = orjson.dumps({"messages": msgs, "model": "m", "stream": True, "tools": tools})
    a, b = parse_request(model_first), parse_request(sdk_order)
    assert (a.prefix_hashes, a.model, a.stream) == (b.prefix_hashes, b.model, b.stream)


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
        (b'{"messages": [{"role": "user", "role": "user"}]}', "'messages[].role' appears twice"),
    ],
)
def test_bad_bodies_raise_a_clear_error(body, message):
    with pytest.raises(RequestParseError, match=re.escape(message)):
        parse_request(body)


# ---------------------------------------------------------------------------------------------
# RequestStream and parse_body: the streamed and the buffered mode, with decoding and limits.


def stream_parse(
    body: bytes, sizes: list[int], encoding: str | None = None, max_blocks: int = 1 << 20
) -> ParsedRequest:
    stream = RequestStream(encoding, UNLIMITED, max_blocks)
    i = 0
    while body:
        n = max(1, sizes[i % len(sizes)])
        stream.feed(body[:n])
        body = body[n:]
        i += 1
    return stream.finish()


def same(a: ParsedRequest, b: ParsedRequest) -> bool:
    return (a.ok, a.error, a.kind, a.model, a.stream, a.prefix_hashes) == (
        b.ok,
        b.error,
        b.kind,
        b.model,
        b.stream,
        b.prefix_hashes,
    )


@given(messages, st.lists(st.integers(1, 300), min_size=1, max_size=10))
def test_chunked_equals_one_shot(msgs, sizes):
    body = chat(msgs, stream=True)
    expected = parse_request(body)
    assert same(stream_parse(body, sizes), expected)
    assert same(parse_body(body, None, UNLIMITED, 1 << 20), expected)


@given(st.binary(max_size=512), st.lists(st.integers(1, 64), min_size=1, max_size=4))
def test_chunked_bad_bodies_give_the_one_shot_error(body, sizes):
    expected = parse_body(body, None, UNLIMITED, 64)
    streamed = stream_parse(body, sizes, max_blocks=64)
    assert same(streamed, expected)
    if not expected.ok:
        assert expected.error
        assert expected.kind is None
        assert expected.prefix_hashes == []


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return bytes(zstandard.ZstdCompressor().compress(data))


ENCODINGS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "deflate (raw)": _raw_deflate,
    "zstd": _zstd,
    "gzip, zstd": lambda data: _zstd(gzip.compress(data)),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_compressed_bodies_give_the_plain_keys(name):
    body = chat([{"role": "system", "content": "You are terse. " * 500}, {"role": "user", "content": "hi"}])
    expected = parse_request(body)
    data = ENCODINGS[name](body)
    encoding = name.removesuffix(" (raw)")
    for sizes in ([1], [7, 300], [64 * 1024], [len(data)]):
        assert same(stream_parse(data, sizes, encoding), expected), sizes
    assert same(parse_body(data, encoding, UNLIMITED, 1 << 20), expected)


def test_a_decompression_bomb_raises_body_too_large():
    bomb = gzip.compress(b" " * (64 << 20))
    assert len(bomb) < 100_000
    stream = RequestStream("gzip", 1 << 20, 64)

    def feed_all() -> None:
        for i in range(0, len(bomb), 16 * 1024):
            stream.feed(bomb[i : i + 16 * 1024])

    with pytest.raises(BodyTooLargeError, match="max_bytes"):
        feed_all()
    with pytest.raises(BodyTooLargeError):
        stream.feed(b"")
    result = stream.finish()
    assert not result.ok
    assert result.error is not None
    assert "max_bytes" in result.error
    assert not parse_body(bomb, "gzip", 1 << 20, 64).ok


def test_raw_bytes_count_against_max_bytes():
    stream = RequestStream(None, 10, 64)
    stream.feed(b'{"prompt"')
    with pytest.raises(BodyTooLargeError):
        stream.feed(b':"xxxxx"}')


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, br", "gzip, gzip, gzip"])
def test_unsupported_encoding_is_a_bad_body(encoding):
    stream = RequestStream(encoding, UNLIMITED, 64)
    stream.feed(b'{"prompt": "x"}')
    result = stream.finish()
    assert not result.ok
    assert "unsupported content encoding" in (result.error or "")


def test_corrupt_compressed_body_is_a_bad_body():
    data = bytearray(gzip.compress(chat([{"role": "user", "content": "hello " * 100}])))
    data[len(data) // 2] ^= 0xFF
    result = parse_body(bytes(data), "gzip", UNLIMITED, 64)
    assert not result.ok
    assert "could not be decoded" in (result.error or "")


def test_stream_is_single_use():
    stream = RequestStream(None, UNLIMITED, 64)
    stream.feed(b'{"prompt": "x"}')
    assert stream.bytes_fed == 15
    assert stream.finish().ok
    with pytest.raises(ValueError, match="after finish"):
        stream.feed(b"")
    with pytest.raises(ValueError, match="twice"):
        stream.finish()


def test_max_blocks_caps_the_levels():
    body = orjson.dumps({"model": "m", "prompt": "x" * (20 * PREFIX_BLOCK_SIZE)})
    full = parse_request(body).prefix_hashes
    assert len(full) > 10
    assert parse_body(body, None, UNLIMITED, 5).prefix_hashes == full[:5]
    assert stream_parse(body, [100], max_blocks=5).prefix_hashes == full[:5]


def test_balancer_takes_parsed_requests_bytes_or_none():
    body = chat([{"role": "user", "content": "hello there"}])
    balancer = Balancer("prefix_cache")
    balancer.set_endpoints(["a:1", "b:1", "c:1"])
    first = balancer.pick(parse_body(body, None, UNLIMITED, 64))
    holder = first.endpoint
    balancer.release(first.ticket)
    # The same request as bytes, parsed or streamed: a prefix hit on the same endpoint.
    for request in (body, parse_request(body), stream_parse(body, [5])):
        pick = balancer.pick(request)
        assert (pick.endpoint, pick.reason, pick.prefix_depth) == (holder, "prefix_hit", 1)
        assert (pick.prefix_levels, pick.candidates) == (1, 3)
        assert 0 < pick.cached_tokens <= pick.prompt_tokens
        balancer.release(pick.ticket)
    bad = parse_body(b"not json", None, UNLIMITED, 64)
    assert not bad.ok
    assert balancer.pick(bad).reason == "bad_body"
    assert balancer.pick(b"not json").reason == "bad_body"
    assert balancer.pick(None).reason in ("least_request", "prefix_hit")
