"""The oracle KV hit rate of a workload: "sessions pinned, infinite cache".

Every session is pinned to one server, and sessions that share a system prompt or a prefix group
share that server (so the pinning key is the workload's affinity key: the session in
``multi_turn``, the system prompt in ``shared_system`` and ``hot_prompt``, the group in
``shared_prefix``; every ``random`` request is its own key). Caches are infinite, so nothing is ever
evicted. A request then reuses the longest block-aligned prefix it shares with any EARLIER request
of the same key (earlier = sent earlier; the oracle ignores that the simulator cannot hit a block
still being prefilled by a concurrent request), and what counts as cached mirrors ``llmlb sim``
exactly (llmlb/sim/protocol.py and kv_cache.py):

- the prompt is the chat rendered as ``"<|role|>\\ncontent\\n"`` per message, UTF-8
  (``render_chat``, imported from the simulator itself);
- it has ``ceil(bytes / chars_per_token)`` tokens; only its first ``tokens // block_size`` blocks
  (``block_size * chars_per_token`` bytes each) are cacheable, block i identified by the chain of
  blocks 0..i;
- a hit is a run of leading blocks, never the whole prompt: at most ``(tokens - 1) // block_size``
  blocks, as the simulator (and vLLM) always compute one token.

The oracle hit rate is Σ cached ÷ Σ prompt tokens over the requests given (the runner gives the
answered requests of a cell, in the order they were sent), the same ratio as the measured hit rate,
so a configuration's hit rate divided by it says how much of the reachable reuse it got.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmlb.sim.protocol import render_chat


def prompt_bytes(messages: Sequence[dict[str, Any]]) -> bytes:
    """The bytes the simulator tokenizes for a chat request."""
    return render_chat(list(messages)).encode()


def block_chain(prompt: bytes, block_size: int, chars_per_token: int) -> tuple[int, list[bytes]]:
    """(prompt tokens, chained digests of the full blocks), as the simulator counts and hashes them."""
    tokens = -(-len(prompt) // chars_per_token)
    block_bytes = block_size * chars_per_token
    digests: list[bytes] = []
    parent = b""
    for i in range(tokens // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(prompt[i * block_bytes : (i + 1) * block_bytes])
        parent = h.digest()
        digests.append(parent)
    return tokens, digests


@dataclass
class Oracle:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    per_request: list[int] = field(default_factory=list)  # cached tokens of each request, in order

    @property
    def hit_rate(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


def oracle(
    requests: Iterable[tuple[str, bytes]], *, block_size: int = 16, chars_per_token: int = 4
) -> Oracle:
    """The oracle over `requests`: (pinning key, rendered prompt) in the order they were sent."""
    if block_size < 1 or chars_per_token < 1:
        raise ValueError("block_size and chars_per_token must be at least 1")
    seen: dict[str, set[bytes]] = {}
    result = Oracle()
    for key, prompt in requests:
        tokens, digests = block_chain(prompt, block_size, chars_per_token)
        held = seen.setdefault(key, set())
        limit = min(len(digests), max(tokens - 1, 0) // block_size)
        hit = 0
        while hit < limit and digests[hit] in held:
            hit += 1
        held.update(digests)
        result.prompt_tokens += tokens
        result.cached_tokens += hit * block_size
        result.per_request.append(hit * block_size)
    return result
