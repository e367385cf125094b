"""Prediction vs reality through real Envoy: two `llmlb sim` servers (whose prefix-cache counters
are exact) behind `llmlb serve --policy prefix_cache` with a short prediction window.

- Multi-turn conversations: the predicted and the engine-reported hit ratios are both high and
  close on every endpoint.
- One server's cache is flushed behind llmlb's back (vLLM's POST /reset_prefix_cache) before every
  round: there the engine's ratio collapses while the predicted one stays high, so the accuracy
  falls; the other server's stays near 1.
- A server's counters go back to zero (POST /_sim/reset, as a restart): the mirrored counters
  never go down, the reset is counted, and the ratios stay within 0..1.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.procs import (
    MODES,
    Daemon,
    Envoy,
    Sim,
    metric_sum,
    post,
    start_daemon,
    start_envoy,
    start_sims,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.e2e

INTERVAL_MS = 200
WINDOW_S = 4
CONVERSATIONS = 6
MAX_TOKENS = 4


class Fleet:
    def __init__(self, sims: list[Sim], daemon: Daemon, envoys: dict[str, Envoy]) -> None:
        self.sims = {s.address: s for s in sims}
        self.daemon = daemon
        self.envoys = envoys

    def by_name(self, name: str) -> Sim:
        return next(s for s in self.sims.values() if s.name == name)

    def chat(self, messages: list[dict[str, str]], mode: str = "buffered") -> tuple[str, str]:
        """One turn through Envoy in ``mode``: ``(sim name, answer)``."""
        reply = post(
            self.envoys[mode].url + "/v1/chat/completions",
            {"model": "sim-model", "messages": messages, "max_tokens": MAX_TOKENS},
            timeout=10.0,
        )
        assert reply.status == 200, reply
        return reply.headers["x-sim-name"], reply.json()["choices"][0]["message"]["content"]

    def figures(self) -> dict[str, dict[str, Any]]:
        """Per sim name: predicted_hit_ratio, engine_hit_ratio, prediction_accuracy."""
        keys = ("predicted_hit_ratio", "engine_hit_ratio", "prediction_accuracy")
        return {
            self.sims[view["address"]].name: {k: view[k] for k in keys}
            for view in self.daemon.debug_endpoints()
        }

    def counter(self, name: str, sim: Sim) -> float:
        return metric_sum(self.daemon.metrics(), name, endpoint=sim.address)

    def settle(self) -> dict[str, dict[str, Any]]:
        """The figures once two more readings have been taken (the last requests included)."""
        time.sleep(2.5 * INTERVAL_MS / 1000)
        return self.figures()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, envoy_binary: str) -> Iterator[Fleet]:
    workdir: Path = tmp_path_factory.mktemp("prediction")
    sims = start_sims({"sim-a": ["--step-base-ms", "1"], "sim-b": ["--step-base-ms", "1"]}, workdir)
    procs = [s.proc for s in sims]
    try:
        config = workdir / "llmlb.yaml"
        config.write_text(yaml.safe_dump({"prediction": {"interval": INTERVAL_MS, "window": WINDOW_S}}))
        endpoints = [s.address for s in sims]
        daemon = start_daemon(endpoints, "prefix_cache", workdir, extra_args=["--config", str(config)])
        procs.append(daemon.proc)
        envoys = {}
        for mode in MODES:
            envoys[mode] = start_envoy(endpoints, daemon.grpc_port, mode, workdir, name=f"envoy-{mode}")
            procs.append(envoys[mode].proc)
        yield Fleet(sims, daemon, envoys)
    finally:
        stop_all(reversed(procs))


def opening(conv: int, nonce: str) -> list[dict[str, str]]:
    """A long system prompt (several of llmlb's 512-byte prefix blocks and many engine blocks)."""
    system = f"Run {nonce}, assistant {conv}. " + f"Rule {conv}: be thorough and exact. " * 24
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Conversation {conv}: " + "tell me more, and why? " * 20},
    ]


def follow_up(messages: list[dict[str, str]], answer: str, turn: int) -> None:
    messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": f"Turn {turn}: " + "go on, in more depth please. " * 16})


def converse(
    fleet: Fleet, conversations: list[list[dict[str, str]]], turns: int, mode: str = "buffered"
) -> dict[int, str]:
    """``turns`` turns of every conversation, round by round; each conversation's server."""
    home: dict[int, str] = {}
    for turn in range(turns):
        for c, messages in enumerate(conversations):
            served, answer = fleet.chat(messages, mode)
            assert home.setdefault(c, served) == served, f"conversation {c} moved at turn {turn}"
            follow_up(messages, answer, turn)
    return home


@pytest.mark.parametrize("mode", MODES)
def test_predicted_and_engine_hit_ratios_agree(fleet: Fleet, mode: str) -> None:
    # Nothing from an earlier test in the window: only this test's turns are compared.
    time.sleep(WINDOW_S + 2 * INTERVAL_MS / 1000)
    nonce = uuid.uuid4().hex
    conversations = [opening(c, nonce) for c in range(CONVERSATIONS)]
    home = converse(fleet, conversations, turns=6, mode=mode)
    figures = fleet.settle()
    print(f"figures after multi-turn conversations ({mode}):", figures)
    for name in set(home.values()):
        f = figures[name]
        assert 0.5 <= f["predicted_hit_ratio"] <= 1.0, (name, f)
        assert 0.5 <= f["engine_hit_ratio"] <= 1.0, (name, f)
        # Each level's own size makes the prediction close (0.99 measured; a 512-byte block a
        # level over-predicted short messages: 0.83).
        assert abs(f["predicted_hit_ratio"] - f["engine_hit_ratio"]) <= 0.1, (name, f)
        assert 0.9 <= f["prediction_accuracy"] <= 1.1, (name, f)
    samples = fleet.daemon.metrics()
    for sim in fleet.sims.values():
        if sim.name not in home.values():
            continue
        for metric in ("llmlb_prefix_hit_ratio_predicted", "llmlb_prefix_hit_ratio_engine"):
            assert metric_sum(samples, metric, endpoint=sim.address) > 0.5, (metric, sim.name)
        assert metric_sum(samples, "llmlb_predicted_prompt_tokens_total", endpoint=sim.address) > 0
        assert metric_sum(samples, "llmlb_engine_prefix_cache_hits_total", endpoint=sim.address) > 0


def test_a_cache_flushed_behind_llmlbs_back_shows_as_low_accuracy(fleet: Fleet) -> None:
    nonce = uuid.uuid4().hex
    conversations = [opening(c, nonce) for c in range(CONVERSATIONS)]
    home = converse(fleet, conversations, turns=3)  # warm: every conversation has a home
    counts = {name: list(home.values()).count(name) for name in set(home.values())}
    assert len(counts) == 2, f"all conversations on one server: {home}"
    flushed = fleet.by_name(max(counts, key=lambda name: counts[name]))
    kept = next(s for s in fleet.sims.values() if s is not flushed)
    before = fleet.settle()
    print("figures before the flush:", before)

    def flush() -> None:
        # 409 only while a request still holds blocks: the rounds are sequential, so it passes.
        wait_until(
            lambda: post(flushed.url + "/reset_prefix_cache", None, timeout=5.0).status == 200,
            5.0,
            message=f"{flushed.name} to flush its prefix cache",
        )

    # Rounds until the window holds nothing from before the first flush.
    started = time.monotonic()
    turn = 3
    while time.monotonic() - started < WINDOW_S + 1.0:
        flush()
        for c, messages in enumerate(conversations):
            served, answer = fleet.chat(messages)
            assert served == home[c], f"conversation {c} moved after the flush"
            follow_up(messages, answer, turn)
        turn += 1
        time.sleep(0.2)
    after = fleet.settle()
    print(f"figures after flushing {flushed.name} before each of {turn - 3} rounds:", after)
    f, k = after[flushed.name], after[kept.name]
    assert f["predicted_hit_ratio"] >= 0.5, f  # llmlb still predicts hits there...
    assert f["engine_hit_ratio"] <= 0.15, f  # ...which the engine no longer has
    assert f["prediction_accuracy"] <= 0.3, f
    assert k["engine_hit_ratio"] >= 0.5, k
    assert 0.9 <= k["prediction_accuracy"] <= 1.1, k
    assert flushed.stats()["prefix_cache_resets"] >= turn - 3


def test_an_engine_counter_reset_never_makes_a_negative_delta(fleet: Fleet) -> None:
    sim = fleet.by_name("sim-b")
    nonce = uuid.uuid4().hex
    conversations = [opening(c, nonce) for c in range(CONVERSATIONS)]
    home = converse(fleet, conversations, turns=2)
    mine = [c for c, name in home.items() if name == sim.name]
    assert mine, f"no conversation on {sim.name}: {home}"
    fleet.settle()
    names = ("llmlb_engine_prefix_cache_queries_total", "llmlb_engine_prefix_cache_hits_total")
    seen = [tuple(fleet.counter(n, sim) for n in names)]
    resets = fleet.counter("llmlb_engine_prefix_cache_counter_resets_total", sim)
    sim.reset(timeout=10.0)  # zeroes the engine's counters, as a restart does
    assert sim.stats()["prompt_tokens_total"] == 0
    wait_until(
        lambda: fleet.counter("llmlb_engine_prefix_cache_counter_resets_total", sim) == resets + 1,
        5.0,
        message="llmlb to count the counter reset",
    )
    for turn in range(2, 5):
        for c in mine:
            _, answer = fleet.chat(conversations[c])
            follow_up(conversations[c], answer, turn)
        fleet.settle()
        seen.append(tuple(fleet.counter(n, sim) for n in names))
    print(f"mirrored (queries, hits) of {sim.name} across its counter reset:", seen)
    assert seen == sorted(seen), seen  # monotonic across the reset
    assert seen[-1][0] > seen[0][0]
    # Everything the engine counted after the reset is in the mirror, nothing before it twice.
    stats = sim.stats()
    grown = (seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1])
    assert grown == (stats["prompt_tokens_total"], stats["cached_tokens_total"]), (grown, stats)
    f = fleet.figures()[sim.name]
    assert f["engine_hit_ratio"] is not None, f
    assert 0.0 <= f["engine_hit_ratio"] <= 1.0, f


def test_least_busy_feeds_the_check_from_its_own_scrape(fleet: Fleet, tmp_path: Path) -> None:
    """With least_busy the engine side comes from its scrape (no GET of the check's own): traffic
    sent straight to a sim shows in that daemon's engine ratio; least_busy predicts no hits."""
    config = tmp_path / "least-busy.yaml"
    config.write_text(
        yaml.safe_dump({"prediction": {"enabled": True, "interval": INTERVAL_MS, "window": 30}})
    )
    endpoints = list(fleet.sims)
    daemon = start_daemon(
        endpoints, "least_busy", tmp_path, extra_args=["--config", str(config)], name="llmlb-least-busy"
    )
    try:
        sim = fleet.by_name("sim-a")
        messages = opening(0, uuid.uuid4().hex)
        body = {"model": "sim-model", "messages": messages, "max_tokens": MAX_TOKENS}
        time.sleep(2 * INTERVAL_MS / 1000)  # a first reading before the traffic
        for _ in range(5):  # the same prompt five times: the last four hit all but its tail
            assert post(sim.url + "/v1/chat/completions", body).status == 200

        def engine_ratio() -> float | None:
            view = next(v for v in daemon.debug_endpoints() if v["address"] == sim.address)
            ratio: float | None = view["engine_hit_ratio"]
            return ratio

        ratio = wait_until(engine_ratio, 5.0, message="an engine hit ratio from least_busy's scrape")
        print("least_busy, five identical prompts straight to sim-a: engine hit ratio", ratio)
        assert 0.6 <= ratio < 1.0
        view = next(v for v in daemon.debug_endpoints() if v["address"] == sim.address)
        assert view["predicted_hit_ratio"] is None  # no picks through this daemon
        assert view["prediction_accuracy"] is None
    finally:
        daemon.stop()
