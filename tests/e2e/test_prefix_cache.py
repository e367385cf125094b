"""prefix_cache keeps each multi-turn conversation on one backend and spreads conversations."""

from __future__ import annotations

import uuid

import pytest

from tests.support.conversations import opening
from tests.support.procs import Gateway

pytestmark = pytest.mark.e2e

CONVERSATIONS = 8
TURNS = 4


def test_conversations_stick_to_their_first_backend(pc_gateway: Gateway) -> None:
    gw = pc_gateway
    nonce = uuid.uuid4().hex
    conversations = [opening(c, nonce) for c in range(CONVERSATIONS)]
    home: dict[int, str] = {}
    for turn in range(TURNS):
        for c, messages in enumerate(conversations):
            reply = gw.chat(messages)
            assert reply.status == 200, reply
            served = str(reply.served_by)
            if turn == 0:
                home[c] = served
            else:
                assert served == home[c], f"conversation {c} moved at turn {turn}: {home[c]} -> {served}"
            answer = reply.json()["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": answer})
            messages.append({"role": "user", "content": f"Follow-up {turn} in conversation {c}: go on."})
    used = set(home.values())
    assert len(used) >= 2, f"all {CONVERSATIONS} conversations went to {used}"
