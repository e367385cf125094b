"""A client-supplied x-gateway-destination-endpoint never decides the upstream."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.procs import DEST_HEADER, HOST, Gateway, free_port, wait_until

pytestmark = pytest.mark.e2e


def test_spoof_does_not_move_a_pinned_conversation(pc_gateway: Gateway) -> None:
    gw = pc_gateway
    messages = [
        {"role": "system", "content": f"You are the spoof-test assistant {uuid.uuid4().hex}. " * 10},
        {"role": "user", "content": "first question of the pinned conversation"},
    ]
    reply = gw.chat(messages)
    assert reply.status == 200, reply
    home = gw.backend(reply.served_by)
    others = [b for b in gw.backends if b is not home]
    for turn, target in enumerate(others * 2):
        messages.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
        messages.append({"role": "user", "content": f"follow-up {turn}"})
        reply = gw.chat(messages, headers={DEST_HEADER: target.address})
        assert reply.status == 200, reply
        assert reply.served_by == home.name, f"spoof to {target.name} moved the conversation"
        assert home.stats()["last_headers"].get(DEST_HEADER) in (None, home.address)
    assert all(b.stats()["total"] == 0 for b in others)


def test_spoof_does_not_pull_traffic_to_a_busy_backend(lr_gateway: Gateway) -> None:
    gw = lr_gateway
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gw.chat, [{"role": "user", "content": "slow"}], {"x-test-delay-ms": "1000"}, 10)
        busy = wait_until(
            lambda: [b for b in gw.backends if b.stats()["concurrent"] == 1],
            5.0,
            message="the slow request to reach a backend",
        )[0]
        for i in range(6):
            reply = gw.chat(
                [{"role": "user", "content": f"spoofed {i}"}], headers={DEST_HEADER: busy.address}
            )
            assert reply.status == 200, reply
            assert reply.served_by != busy.name, (
                "least-request followed the spoofed header to the busy backend"
            )
        assert slow.result(timeout=10).status == 200
    assert busy.stats()["total"] == 1


def test_spoof_to_a_dead_port_still_succeeds(lr_gateway: Gateway) -> None:
    dead = f"{HOST}:{free_port()}"
    names = {b.name for b in lr_gateway.backends}
    for i in range(5):
        reply = lr_gateway.chat([{"role": "user", "content": f"dead spoof {i}"}], headers={DEST_HEADER: dead})
        assert reply.status == 200, reply
        assert reply.served_by in names
