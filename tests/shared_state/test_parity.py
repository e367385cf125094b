"""One engine for every backend: the same request sequences through embedded state, the
`--workers` shared mapping and Redis (real servers) give the same picks.

Each backend is driven the way the daemon drives it (embedded and workers: `pick` and `release`;
Redis: the commit protocol, with a real script round trip per pick). The balancers share a seed,
so even the draws among never-picked endpoints agree, and a pinned clock that every operation
advances by `STEP_MS`, so prefill backlogs drain alike however fast each backend runs; any
difference is a policy difference between backends, which is what this guards against.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import orjson
import pytest

from llmlb import Balancer
from llmlb._core import create_worker_state
from tests.shared_state.test_scripts import Replica

pytestmark = pytest.mark.redis

ENDPOINTS = ["10.7.0.1:80", "10.7.0.2:80", "10.7.0.3:80", "10.7.0.4:80"]
SEED = 11
START_MS = 1_000_000
# Operations 20 ms apart: backlogs build up within a burst and drain across a sequence.
STEP_MS = 20


def body(messages: list[dict[str, str]]) -> bytes:
    return orjson.dumps({"model": "m", "messages": messages})


def conversations(rng: random.Random) -> list[tuple[str, bytes | int]]:
    """Interleaved multi-turn conversations over shared system prompts, with releases: a list of
    ("pick", body) and ("release", index of an open request) operations."""
    systems = [f"system prompt {k}: " + "be precise. " * rng.randint(20, 200) for k in range(3)]
    sessions = [[{"role": "system", "content": rng.choice(systems)}] for _ in range(10)]
    ops: list[tuple[str, bytes | int]] = []
    open_requests = 0
    for step in range(200):
        if open_requests and rng.random() < 0.45:
            ops.append(("release", rng.randrange(open_requests)))
            open_requests -= 1
            continue
        messages = rng.choice(sessions)
        messages.append({"role": "user", "content": f"turn {step}: " + "why? " * rng.randint(1, 300)})
        ops.append(("pick", body(messages)))
        messages.append({"role": "assistant", "content": f"answer {step}"})
        open_requests += 1
    return ops


def hot_prompt(rng: random.Random) -> list[tuple[str, bytes | int]]:
    """60 concurrent requests sharing one long system prompt (the issue's reproduction)."""
    system = {"role": "system", "content": "one shared prompt " * 400}
    return [
        ("pick", body([system, {"role": "user", "content": f"q{i} " * rng.randint(5, 50)}]))
        for i in range(60)
    ]


def bad_bodies(rng: random.Random) -> list[tuple[str, bytes | int]]:
    ops: list[tuple[str, bytes | int]] = []
    for i in range(40):
        ops.append(("pick", b"not json" if i % 3 == 0 else body([{"role": "user", "content": f"x{i}"}])))
        if i % 4 == 3:
            ops.append(("release", rng.randrange(i // 2 + 1)))
    return ops


SEQUENCES: dict[str, Callable[[random.Random], list[tuple[str, bytes | int]]]] = {
    "conversations": conversations,
    "hot_prompt": hot_prompt,
    "bad_bodies": bad_bodies,
}
Pick = tuple[str, str, int]
Handle = TypeVar("Handle")  # a backend's handle on an open request: a ticket, or a request id


def run(
    balancer: Balancer,
    pick: Callable[[bytes], tuple[Handle, str, str, int]],
    release: Callable[[Handle], bool],
    ops: list[tuple[str, bytes | int]],
) -> list[Pick]:
    """Runs ``ops`` through one backend: ``pick`` gives ``(handle, endpoint, reason, depth)``,
    ``release`` ends a handle (true if it was open); ``balancer``'s clock is pinned per step."""
    picks: list[Pick] = []
    open_handles: list[Handle] = []
    for step, (op, arg) in enumerate(ops):
        balancer.pin_clock(START_MS + step * STEP_MS)
        if op == "pick":
            assert isinstance(arg, bytes)
            handle, endpoint, reason, depth = pick(arg)
            open_handles.append(handle)
            picks.append((endpoint, reason, depth))
        else:
            assert isinstance(arg, int)
            assert release(open_handles.pop(arg % len(open_handles)))
    return picks


def run_local(balancer: Balancer, ops: list[tuple[str, bytes | int]]) -> list[Pick]:
    def pick(body: bytes) -> tuple[int, str, str, int]:
        p = balancer.pick(body)
        return p.ticket, p.endpoint, p.reason, p.prefix_depth

    return run(balancer, pick, balancer.release, ops)


def run_redis(replica: Replica, ops: list[tuple[str, bytes | int]]) -> list[Pick]:
    return run(replica.balancer, replica.pick, lambda request_id: replica.release(request_id) == 1, ops)


def new_balancer() -> Balancer:
    balancer = Balancer("prefix_cache", seed=SEED)
    balancer.set_endpoints(ENDPOINTS)
    return balancer


@pytest.mark.parametrize("sequence", sorted(SEQUENCES))
def test_embedded_workers_and_redis_pick_alike(any_redis, tmp_path: Path, sequence: str) -> None:
    ops = SEQUENCES[sequence](random.Random(sequence))
    embedded = run_local(new_balancer(), ops)

    state = tmp_path / "state"
    create_worker_state(state, 1, 64, 4096, 1800)
    worker = new_balancer()
    worker.attach_workers(state, 0)
    workers = run_local(worker, ops)

    replica = Replica(any_redis.client(), "parity" + uuid.uuid4().hex[:8], "r1", seed=SEED)
    replica.balancer.set_endpoints(ENDPOINTS)
    redis = run_redis(replica, ops)

    assert len(embedded) == sum(op == "pick" for op, _ in ops)
    assert workers == embedded
    assert redis == embedded
    assert replica.commits == len(embedded), "one round trip per pick"
    # The sequences exercise what they are for.
    reasons = {reason for _, reason, _ in embedded}
    expected = {"conversations": "prefix_hit", "hot_prompt": "prefix_hit", "bad_bodies": "bad_body"}
    assert expected[sequence] in reasons, reasons
