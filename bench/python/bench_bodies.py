"""Deterministic OpenAI chat bodies for the benchmarks.

A byte-for-byte mirror of the generator in bench/rust/core.rs, so the Python and the criterion
benchmarks measure the same bytes (check.py compares the fingerprints both sides report).
"""

from __future__ import annotations

MASK = (1 << 64) - 1

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BODY_HEAD = b'{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":['
BODY_TAIL = b'],"max_tokens":512,"temperature":0.7,"stream":true}'

# (label, target size in bytes, seed)
BODY_SIZES: list[tuple[str, int, int]] = [
    ("1KB", 1024, 1),
    ("32KB", 32 * 1024, 32),
    ("1MB", 1024 * 1024, 1024),
]

# fmt: off
WORDS: list[bytes] = [w.encode() for w in [
    "the", "model", "request", "server", "cache", "prefix", "token", "latency", "and", "of", "to", "in",
    "is", "that", "for", "with", "as", "on", "this", "be", "are", "we", "can", "it", "an", "by", "from",
    "at", "or", "not", "which", "will", "should", "would", "could", "please", "answer", "question",
    "explain", "summary", "document", "section", "example", "function", "value", "result", "because",
    "however", "therefore", "system", "user", "assistant", "response", "context", "window", "memory",
    "throughput", "endpoint", "cluster", "replica", "balancer", "routing", "policy", "healthy", "load",
    "queue", "batch", "stream", "output", "input", "small", "large", "quickly", "carefully", "first",
    "second", "finally", "also", "other", "more", "than", "each", "every", "some", "about", "into",
    "over", "after", "before", "while", "café", "naïve", "résumé", "façade", "über", "déjà",
]]
# fmt: on

NEWLINES = b"\\n\\n"  # the JSON escape, as it appears in the body
QUOTE = b'\\"'


class Mix:
    """splitmix64."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n


class TextGen:
    def __init__(self) -> None:
        self.words_left = 0
        self.sentences_left = 0
        self.quote_left = 0
        self.first = True

    def token(self, rng: Mix) -> bytes:
        tok = bytearray()
        capitalize = False
        if self.words_left == 0:
            if self.sentences_left == 0:
                self.sentences_left = 2 + rng.below(5)
                if not self.first:
                    tok += NEWLINES
            else:
                tok += b" "
            self.sentences_left -= 1
            self.words_left = 6 + rng.below(14)
            capitalize = True
        else:
            tok += b" "
        word = WORDS[rng.below(len(WORDS))]
        if self.quote_left == 0 and self.words_left > 3 and rng.below(48) == 0:
            tok += QUOTE
            self.quote_left = 2 + rng.below(2)
        if capitalize:
            word = word[:1].upper() + word[1:]
        tok += word
        if self.quote_left > 0:
            self.quote_left -= 1
            if self.quote_left == 0:
                tok += QUOTE
        self.words_left -= 1
        if self.words_left == 0:
            if self.quote_left > 0:
                tok += QUOTE
                self.quote_left = 0
            tok += b"?" if rng.below(8) == 0 else b"."
        elif rng.below(12) == 0:
            tok += b","
        self.first = False
        return bytes(tok)


def _message(out: bytearray, rng: Mix, role: str, length: int) -> None:
    out += b'{"role":"' + role.encode() + b'","content":"'
    text = TextGen()
    written = 0
    while True:
        tok = text.token(rng)
        if written + len(tok) > length:
            break
        out += tok
        written += len(tok)
    out += b'"}'


def _overhead(role: str) -> int:
    return len(b'{"role":"","content":""}') + len(role)


def chat_body(target: int, seed: int) -> bytes:
    """About `target` bytes: a system prompt, user/assistant turns, a final user turn."""
    rng = Mix(seed)
    out = bytearray(BODY_HEAD)
    system = min(max(target // 8, 200), 4000)
    _message(out, rng, "system", system)
    user_oh, asst_oh = _overhead("user"), _overhead("assistant")
    while True:
        remaining = max(target - (len(out) + len(BODY_TAIL)), 0)
        user = 2000 + rng.below(14_000) if rng.below(10) == 0 else 100 + rng.below(700)
        assistant = 300 + rng.below(2500)
        if remaining < user + assistant + user_oh + asst_oh + 2 + 300:
            out += b","
            _message(out, rng, "user", max(remaining - (user_oh + 1), 0))
            break
        out += b","
        _message(out, rng, "user", user)
        out += b","
        _message(out, rng, "assistant", assistant)
    out += BODY_TAIL
    return bytes(out)


def bodies() -> dict[str, bytes]:
    return {label: chat_body(size, seed) for label, size, seed in BODY_SIZES}


def endpoint_addresses(n: int) -> list[str]:
    """The same endpoint addresses as the criterion benches use."""
    return [f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}:8000" for i in range(n)]
