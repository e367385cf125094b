"""Conversations for affinity tests: distinct system prompts, each long enough to span blocks."""

from __future__ import annotations


def opening(conv: int, nonce: str) -> list[dict[str, str]]:
    """The first turn of conversation ``conv``; ``nonce`` keeps runs from sharing prefixes."""
    persona = f"You are assistant number {conv} of run {nonce}. " + f"Rule {conv}: answer briefly. " * 12
    return [
        {"role": "system", "content": persona},
        {"role": "user", "content": f"Conversation {conv} ({nonce}): tell me about topic {conv * 7919}."},
    ]


def conversation(turns: int, tag: str = "", system_repeat: int = 40) -> list[dict[str, str]]:
    """A conversation after `turns` user turns: a long system prompt (several prefix blocks),
    then alternating user and assistant messages, ending with the user's turn `turns - 1`.
    Turn n+1 extends turn n, so its prefix levels extend them too; `tag` separates runs."""
    messages = [
        {"role": "system", "content": f"{tag} You answer carefully. " + "Be thorough. " * system_repeat}
    ]
    for i in range(turns):
        messages.append({"role": "user", "content": f"{tag} question {i}: " + "tell me more, and why? " * 20})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {i}"})
    return messages
