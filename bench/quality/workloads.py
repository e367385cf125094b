"""Seeded, deterministic chat workloads for the routing-quality benchmark.

A workload is a list of :class:`Session` s. A session arrives at ``start`` (seconds from the start
of the run) and sends its turns one after another: turn ``k`` resends the whole conversation so
far (system prompt, every earlier user and assistant message, the new user message) and is sent
``think`` seconds after the answer to turn ``k - 1`` arrived. Single-turn workloads are sessions of
one turn, so their arrivals are exactly the session starts (open loop, Poisson).

Assistant messages in the history are the workload's own fixed text (as if the model had answered
with it), not what the server streamed back, so every configuration sends byte-identical prompts.

A workload speaks one API (``Workload.api``): chat completions (``POST /v1/chat/completions``,
``messages``), or OpenAI's Responses API (``POST /v1/responses``: the system prompt as
``instructions``, the conversation as ``input`` items, ``max_output_tokens``). The simulator renders
both to the same bytes (docs/sim.md), so the same conversation is the same prompt either way. Or
chained Responses: only the new message and ``previous_response_id``.

Sizes are in characters; the simulator counts about 4 characters per token and caches blocks of 16
tokens (64 characters). Every workload's text starts with a marker unique to the workload and the
session (or group), so no two workloads, and no two unrelated sessions, share a prefix by accident.

Seven workloads (the sizes assume the runner's default fleet: 4 simulators with 2048 KV blocks of 16
tokens each, i.e. 32k tokens ~ 128 KB of prompt per server; see README.md):

- ``multi_turn``: sticky chat sessions (4.5/s), each with its own ~2 KB system prompt, 3-8 turns,
  think times of ~0.6 s. The live conversations fit the fleet's cache, not one server's.
- ``shared_system``: short sessions (7.5/s, 1-4 turns) sharing 24 system prompts of 6-8 KB
  (~42k tokens in all: more than one server holds).
- ``shared_prefix``: like inference-perf's shared_prefix: 32 groups, each a ~6 KB shared prefix
  followed by a unique question *in the same user message*; single turn, 30 req/s Poisson.
- ``random``: unique 4-8 KB prompts, 20 req/s Poisson: no reuse at all (load balancing only).
- ``hot_prompt``: every session shares ONE ~4 KB system prompt; 20 sessions/s of 1-3 turns, each
  turn a unique user question: tens of requests in flight at once, all sharing one prefix, so
  every server can (and should) hold it: the case where prefix affinity piles up on its holders.
- ``multi_turn_responses``: ``multi_turn``'s conversations (built by ``multi_turn`` itself, so the
  same sessions, turns, text and arrival times), each turn a Responses API request that re-sends
  the conversation as input items.
- ``multi_turn_responses_chained``: ``multi_turn``'s sessions again, each turn after the first
  sending only its new user message with the previous turn's ``previous_response_id`` (the
  history, with the server's own answers, is in the store of the server that answered it).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

MODEL = "sim-model"
CHAT = "chat"  # POST /v1/chat/completions
RESPONSES = "responses"  # POST /v1/responses, the whole conversation re-sent as input items
# POST /v1/responses, only the new user message and the previous turn's previous_response_id: the
# history (with the server's own answers) is in the store of the server that answered
RESPONSES_CHAINED = "responses_chained"
PATHS = {CHAT: "/v1/chat/completions", RESPONSES: "/v1/responses", RESPONSES_CHAINED: "/v1/responses"}

# --------------------------------------------------------------------------------------------------
# text


def _vocabulary(seed: int = 7, size: int = 2048) -> list[str]:
    """Pseudo-words built from syllables: readable, varied, the same on every run."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "qu", "ng"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


_WORDS = _vocabulary()


def text(rng: random.Random, n_chars: int) -> str:
    """About `n_chars` characters of words drawn by `rng` (ends with a full stop)."""
    out: list[str] = []
    length = 0
    while length < n_chars:
        word = rng.choice(_WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out) + "."


def _poisson_arrivals(rng: random.Random, rate: float, duration: float, cap: int) -> list[float]:
    """Arrival times of a Poisson process of `rate` per second in [0, duration), at most `cap`."""
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration and len(times) < cap:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _between(rng: random.Random, low: int, high: int) -> int:
    return rng.randint(low, high)


# --------------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str  # the answer recorded in the history of later turns
    think: float  # seconds between the previous answer and this turn (0 for a session's first)


@dataclass(frozen=True)
class Session:
    sid: str
    start: float
    system: str | None
    turns: tuple[Turn, ...]
    key: str = ""  # what the requests share: the session, system prompt or prefix group

    def messages(self, k: int, answers: Sequence[str] | None = None) -> list[dict[str, str]]:
        """The conversation sent as turn `k` (0-based); `answers[i]`, if given, is turn i's answer
        instead of the workload's fixed text (what a chained conversation holds)."""
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for i, turn in enumerate(self.turns[:k]):
            messages.append({"role": "user", "content": turn.user})
            messages.append(
                {"role": "assistant", "content": turn.assistant if answers is None else answers[i]}
            )
        messages.append({"role": "user", "content": self.turns[k].user})
        return messages

    def body(self, k: int, max_tokens: int = 16, stream: bool = True) -> dict[str, Any]:
        """The chat-completions body of turn `k`: SSE streaming with usage in the last chunk."""
        body: dict[str, Any] = {"model": MODEL, "messages": self.messages(k), "max_tokens": max_tokens}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def input_items(self, k: int) -> list[dict[str, Any]]:
        """Turn `k`'s conversation as Responses API input items (the system prompt is not an item:
        it goes in `instructions`). Earlier answers are assistant message items with one
        `output_text` part, as a Responses client re-sends the output items it got back."""
        items: list[dict[str, Any]] = []
        for turn in self.turns[:k]:
            items.append({"role": "user", "content": turn.user})
            items.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": turn.assistant}],
                }
            )
        items.append({"role": "user", "content": self.turns[k].user})
        return items

    def responses_body(self, k: int, max_tokens: int = 16, stream: bool = True) -> dict[str, Any]:
        """The Responses API body of turn `k`: the same conversation as `body(k)` (the simulator
        renders both to the same prompt), streamed (usage in the `response.completed` event)."""
        body: dict[str, Any] = {"model": MODEL}
        if self.system is not None:
            body["instructions"] = self.system
        body["input"] = self.input_items(k)
        body["max_output_tokens"] = max_tokens
        if stream:
            body["stream"] = True
        return body

    def chained_body(
        self, k: int, previous_response_id: str | None, max_tokens: int = 16, stream: bool = True
    ) -> dict[str, Any]:
        """Turn `k` continuing the stored response `previous_response_id` (turn k - 1's answer): only
        the new user message, the instructions again (they do not carry over), `store: true`."""
        if (previous_response_id is None) != (k == 0):
            raise ValueError("turn 0 starts the chain; every later turn names the previous response")
        body: dict[str, Any] = {"model": MODEL}
        if self.system is not None:
            body["instructions"] = self.system
        body["input"] = [{"role": "user", "content": self.turns[k].user}]
        if previous_response_id is not None:
            body["previous_response_id"] = previous_response_id
        body["store"] = True
        body["max_output_tokens"] = max_tokens
        if stream:
            body["stream"] = True
        return body


@dataclass(frozen=True)
class TimedRequest:
    """One request on the workload's nominal timeline (multi-turn arrivals assume instant answers)."""

    arrival: float
    session: str
    turn: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    duration: float  # no request is sent after this many seconds
    max_requests: int  # nor more than this many
    sessions: tuple[Session, ...]
    api: str = CHAT  # CHAT, RESPONSES or RESPONSES_CHAINED: the route, and the body's shape
    conversations: str = ""  # the workload whose text this one sends (empty: its own)

    @property
    def family(self) -> str:
        """Workloads of one family send the same text (another API over the same conversations):
        a picker that served one remembers where the other's prefixes went."""
        return self.conversations or self.name

    @property
    def path(self) -> str:
        """The route the requests are posted to."""
        return PATHS[self.api]

    @property
    def chained(self) -> bool:
        """Turn k names turn k - 1's response: it needs that answer's id, and its history holds the
        server's own answers, not the workload's fixed text."""
        return self.api == RESPONSES_CHAINED

    def body(
        self,
        s: Session,
        k: int,
        max_tokens: int = 16,
        stream: bool = True,
        previous_response_id: str | None = None,
    ) -> dict[str, Any]:
        """Turn `k` of session `s` in this workload's API (`previous_response_id`: turn k - 1's
        response id, for a chained workload)."""
        if self.api == RESPONSES:
            return s.responses_body(k, max_tokens, stream)
        if self.api == RESPONSES_CHAINED:
            return s.chained_body(k, previous_response_id, max_tokens, stream)
        return s.body(k, max_tokens, stream)

    @property
    def n_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    @property
    def multi_turn(self) -> bool:
        return any(len(s.turns) > 1 for s in self.sessions)

    def requests(self, max_tokens: int = 16) -> Iterator[TimedRequest]:
        """Every request in order of nominal arrival. For multi-turn sessions the real arrival of
        turn k > 0 is later: the runner sends it `think` seconds after the previous answer. (In a
        chained workload, `previous_response_id` is a placeholder naming the turn it continues:
        the real id is known once that turn is answered.)"""
        timed: list[tuple[float, int, int]] = []
        for i, s in enumerate(self.sessions):
            t = s.start
            for k, turn in enumerate(s.turns):
                t += turn.think
                timed.append((t, i, k))
        for t, i, k in sorted(timed):
            s = self.sessions[i]
            previous = f"resp_{s.sid}_turn{k - 1}" if self.chained and k else None
            yield TimedRequest(t, s.sid, k, self.body(s, k, max_tokens, previous_response_id=previous))

    def prompt_chars(self) -> int:
        """Characters of message content over all requests (a size check, not what is sent)."""
        return sum(
            sum(len(m["content"]) for m in s.messages(k)) for s in self.sessions for k in range(len(s.turns))
        )


def _cap(sessions: list[Session], max_requests: int) -> tuple[Session, ...]:
    """Keep sessions in order of arrival until `max_requests` turns (the last one cut short)."""
    kept: list[Session] = []
    left = max_requests
    for s in sorted(sessions, key=lambda s: s.start):
        if left <= 0:
            break
        turns = s.turns[:left]
        kept.append(Session(s.sid, s.start, s.system, turns, s.key))
        left -= len(turns)
    return tuple(kept)


# --------------------------------------------------------------------------------------------------
# the workloads


def multi_turn(
    *,
    seed: int = 1,
    duration: float = 15.0,
    max_requests: int = 2000,
    session_rate: float = 4.5,
    turns: tuple[int, int] = (3, 8),
    system_chars: tuple[int, int] = (1500, 2500),
    user_chars: tuple[int, int] = (800, 1600),
    assistant_chars: tuple[int, int] = (400, 800),
    think_mean: float = 0.6,
) -> Workload:
    rng = random.Random(f"multi_turn/{seed}")
    sessions = []
    for i, start in enumerate(_poisson_arrivals(rng, session_rate, duration, max_requests)):
        sid = f"mt{i}"
        marker = f"[multi_turn {seed} session {i}] You are assistant {i}. "
        system = marker + text(rng, _between(rng, *system_chars))
        n = _between(rng, *turns)
        session_turns = tuple(
            Turn(
                user=text(rng, _between(rng, *user_chars)),
                assistant=text(rng, _between(rng, *assistant_chars)),
                think=0.0 if k == 0 else rng.expovariate(1.0 / think_mean),
            )
            for k in range(n)
        )
        sessions.append(Session(sid, start, system, session_turns, sid))
    return Workload(
        "multi_turn",
        f"chat sessions ({session_rate:g}/s, {turns[0]}-{turns[1]} turns, own system prompt, "
        f"think ~{think_mean:g} s); each turn resends the conversation",
        duration,
        max_requests,
        _cap(sessions, max_requests),
    )


def multi_turn_responses(**kwargs: Any) -> Workload:
    """`multi_turn` itself (same arguments, so the same sessions, turns, text and arrival times),
    each turn sent to the Responses API re-sending the whole conversation as input items:
    `instructions` = the system prompt, earlier answers as assistant output_text items. The prompts
    the simulator renders are byte-identical to `multi_turn`'s, so the hit rates must agree."""
    chat = multi_turn(**kwargs)
    return dataclasses.replace(
        chat,
        name="multi_turn_responses",
        description=chat.description.replace("chat sessions", "Responses API sessions", 1)
        + " as input items",
        api=RESPONSES,
        conversations=chat.name,
    )


def multi_turn_responses_chained(**kwargs: Any) -> Workload:
    """`multi_turn`'s sessions (same arguments: same sessions, user messages and arrival times),
    each turn after the first sending only its user message with `previous_response_id`: the
    server answering turn k - 1 holds the conversation, so turn k must reach it (a picker that
    learns response ids pins it there; any other server answers 404). The history holds the
    server's own answers (`--output-tokens` filler words), not the workload's fixed text, so the
    prompts are shorter than `multi_turn`'s and the hit rate is not comparable with it."""
    chat = multi_turn(**kwargs)
    return dataclasses.replace(
        chat,
        name="multi_turn_responses_chained",
        description=chat.description.replace("chat sessions", "Responses API sessions", 1).replace(
            "each turn resends the conversation", "each turn only its new message + previous_response_id"
        ),
        api=RESPONSES_CHAINED,
        conversations=chat.name,
    )


def shared_system(
    *,
    seed: int = 1,
    duration: float = 15.0,
    max_requests: int = 2000,
    n_systems: int = 24,
    system_chars: tuple[int, int] = (6000, 8000),
    session_rate: float = 7.5,
    turns: tuple[int, int] = (1, 4),
    user_chars: tuple[int, int] = (200, 600),
    assistant_chars: tuple[int, int] = (200, 600),
    think_mean: float = 0.6,
) -> Workload:
    rng = random.Random(f"shared_system/{seed}")
    systems = [
        f"[shared_system {seed} prompt {j}] You are agent {j}. " + text(rng, _between(rng, *system_chars))
        for j in range(n_systems)
    ]
    sessions = []
    for i, start in enumerate(_poisson_arrivals(rng, session_rate, duration, max_requests)):
        j = rng.randrange(n_systems)
        system = systems[j]
        n = _between(rng, *turns)
        session_turns = tuple(
            Turn(
                user=f"(user {i}) " + text(rng, _between(rng, *user_chars)),
                assistant=text(rng, _between(rng, *assistant_chars)),
                think=0.0 if k == 0 else rng.expovariate(1.0 / think_mean),
            )
            for k in range(n)
        )
        sessions.append(Session(f"ss{i}", start, system, session_turns, f"system{j}"))
    return Workload(
        "shared_system",
        f"{session_rate:g} sessions/s of {turns[0]}-{turns[1]} turns sharing {n_systems} system prompts "
        f"of {system_chars[0] // 1000}-{system_chars[1] // 1000} KB",
        duration,
        max_requests,
        _cap(sessions, max_requests),
    )


def shared_prefix(
    *,
    seed: int = 1,
    duration: float = 15.0,
    max_requests: int = 2000,
    groups: int = 32,
    prefix_chars: int = 6000,
    question_chars: tuple[int, int] = (150, 400),
    rate: float = 30.0,
) -> Workload:
    rng = random.Random(f"shared_prefix/{seed}")
    prefixes = [f"[shared_prefix {seed} group {g}] " + text(rng, prefix_chars) for g in range(groups)]
    sessions = []
    for i, start in enumerate(_poisson_arrivals(rng, rate, duration, max_requests)):
        g = rng.randrange(groups)
        question = f"(question {i}) " + text(rng, _between(rng, *question_chars))
        turn = Turn(user=f"{prefixes[g]}\n\n{question}", assistant="", think=0.0)
        sessions.append(Session(f"sp{i}", start, None, (turn,), f"group{g}"))
    return Workload(
        "shared_prefix",
        f"{rate:g} req/s, {groups} groups, each a {prefix_chars // 1000} KB shared prefix "
        "+ a unique question",
        duration,
        max_requests,
        _cap(sessions, max_requests),
    )


def random_prompts(
    *,
    seed: int = 1,
    duration: float = 15.0,
    max_requests: int = 2000,
    prompt_chars: tuple[int, int] = (4000, 8000),
    rate: float = 20.0,
) -> Workload:
    rng = random.Random(f"random/{seed}")
    sessions = []
    for i, start in enumerate(_poisson_arrivals(rng, rate, duration, max_requests)):
        prompt = f"[random {seed} request {i}] " + text(rng, _between(rng, *prompt_chars))
        sessions.append(Session(f"rn{i}", start, None, (Turn(prompt, "", 0.0),), f"rn{i}"))
    return Workload(
        "random",
        f"{rate:g} req/s of unique {prompt_chars[0] // 1000}-{prompt_chars[1] // 1000} KB prompts (no reuse)",
        duration,
        max_requests,
        _cap(sessions, max_requests),
    )


def hot_prompt(
    *,
    seed: int = 1,
    duration: float = 15.0,
    max_requests: int = 2000,
    system_chars: int = 4000,
    session_rate: float = 20.0,
    turns: tuple[int, int] = (1, 3),
    user_chars: tuple[int, int] = (1500, 3000),
    assistant_chars: tuple[int, int] = (200, 500),
    think_mean: float = 0.3,
) -> Workload:
    """One system prompt shared by every session, at a rate that keeps tens of requests in flight:
    the whole fleet can hold the prompt, so the right picker spreads the load instead of sending
    everything to the servers that cached it first."""
    rng = random.Random(f"hot_prompt/{seed}")
    system = f"[hot_prompt {seed}] You are the shared assistant. " + text(rng, system_chars)
    sessions = []
    for i, start in enumerate(_poisson_arrivals(rng, session_rate, duration, max_requests)):
        n = _between(rng, *turns)
        session_turns = tuple(
            Turn(
                user=f"(user {i} question {k}) " + text(rng, _between(rng, *user_chars)),
                assistant=text(rng, _between(rng, *assistant_chars)),
                think=0.0 if k == 0 else rng.expovariate(1.0 / think_mean),
            )
            for k in range(n)
        )
        sessions.append(Session(f"hp{i}", start, system, session_turns, "hot"))
    return Workload(
        "hot_prompt",
        f"{session_rate:g} sessions/s of {turns[0]}-{turns[1]} turns, all sharing one "
        f"{system_chars // 1000} KB system prompt, a unique question per turn (think ~{think_mean:g} s)",
        duration,
        max_requests,
        _cap(sessions, max_requests),
    )


BUILDERS: dict[str, Callable[..., Workload]] = {
    "multi_turn": multi_turn,
    "shared_system": shared_system,
    "shared_prefix": shared_prefix,
    "random": random_prompts,
    "hot_prompt": hot_prompt,
    "multi_turn_responses": multi_turn_responses,
    "multi_turn_responses_chained": multi_turn_responses_chained,
}
RATE_KEYS = {
    "multi_turn": "session_rate",
    "shared_system": "session_rate",
    "shared_prefix": "rate",
    "random": "rate",
    "hot_prompt": "session_rate",
}
DEFAULT_RATES = {
    "multi_turn": 4.5,
    "shared_system": 7.5,
    "shared_prefix": 30.0,
    "random": 20.0,
    "hot_prompt": 20.0,
}
# Variants: another API over the same conversations, at the same rate.
for _variant in ("multi_turn_responses", "multi_turn_responses_chained"):
    RATE_KEYS[_variant] = RATE_KEYS["multi_turn"]
    DEFAULT_RATES[_variant] = DEFAULT_RATES["multi_turn"]


def build(
    name: str, *, seed: int = 1, duration: float = 15.0, max_requests: int = 2000, load: float = 1.0
) -> Workload:
    """Workload `name` with its arrival rate scaled by `load` (1.0 = the tuned default)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown workload {name!r} (have {', '.join(BUILDERS)})")
    if not (load > 0 and math.isfinite(load)):
        raise ValueError(f"load must be > 0, got {load}")
    rate = {RATE_KEYS[name]: DEFAULT_RATES[name] * load}
    return BUILDERS[name](seed=seed, duration=duration, max_requests=max_requests, **rate)


def summary(w: Workload) -> str:
    sizes = [sum(len(m["content"]) for m in s.messages(k)) for s in w.sessions for k in range(len(s.turns))]
    mean = sum(sizes) / max(len(sizes), 1)
    return (
        f"{w.name}: {len(w.sessions)} sessions, {w.n_requests} requests in {w.duration:g} s, "
        f"prompt {mean / 1000:.1f} KB mean / {max(sizes, default=0) / 1000:.1f} KB max"
    )


if __name__ == "__main__":
    for workload_name in BUILDERS:
        print(summary(build(workload_name)))
