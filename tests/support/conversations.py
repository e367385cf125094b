"""Conversations for affinity tests: distinct system prompts, each long enough to span blocks."""

from __future__ import annotations


def opening(conv: int, nonce: str) -> list[dict[str, str]]:
    """The first turn of conversation ``conv``; ``nonce`` keeps runs from sharing prefixes."""
    persona = f"You are assistant number {conv} of run {nonce}. " + f"Rule {conv}: answer briefly. " * 12
    return [
        {"role": "system", "content": persona},
        {"role": "user", "content": f"Conversation {conv} ({nonce}): tell me about topic {conv * 7919}."},
    ]
