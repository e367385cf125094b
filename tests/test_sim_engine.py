"""The simulator's engine: admission, chunked prefill, step timing, LoRA slots, idling.

The engine runs on a virtual clock (its sleep advances the clock and yields), so step times and
TTFTs are exact and the tests take no real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from llmlb.sim.engine import Engine, EngineConfig, Request, TooLong


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


# 1 ms per step, 0.01 ms per prefilled token, 0.1 ms per decoding sequence; 1 byte per token.
BASE = dict(step_base_ms=1.0, prefill_ms_per_token=0.01, decode_ms_per_seq=0.1, chars_per_token=1)


def run(test: Callable[[Engine, VirtualTime], Awaitable[Any]], **config: Any) -> Any:
    async def main() -> Any:
        vt = VirtualTime()
        engine = Engine(EngineConfig(**{**BASE, **config}), clock=vt.clock, sleep=vt.sleep)
        engine.start()
        try:
            return await asyncio.wait_for(test(engine, vt), 10)
        finally:
            await engine.stop()

    return asyncio.run(main())


def submit(engine: Engine, prompt: bytes, max_tokens: int = 1, adapter: str | None = None) -> Request:
    req = engine.new_request(prompt, max_tokens, adapter)
    engine.submit(req)
    return req


async def finish(*reqs: Request) -> None:
    for req in reqs:
        await req.done()


def ms(seconds: float | None) -> float:
    assert seconds is not None
    return round(seconds * 1000, 6)


def test_ttft_grows_with_uncached_tokens():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        short = submit(engine, b"s" * 160)
        await finish(short)
        long = submit(engine, b"L" * 1600)
        await finish(long)
        assert ms(short.ttft) == 1.0 + 0.01 * 160  # one step, prefill only
        assert ms(long.ttft) == 1.0 + 0.01 * 1600
        # The same long prompt again: all but the last block is cached (16-token blocks).
        again = submit(engine, b"L" * 1600 + b"tail")
        await finish(again)
        assert again.cached_tokens == 1600
        assert ms(again.ttft) == 1.0 + 0.01 * 4

    run(test, max_batched_tokens=4096)


def test_ttft_includes_the_queue_wait():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        first = submit(engine, b"a" * 100, max_tokens=3)
        second = submit(engine, b"b" * 100, max_tokens=1)
        await finish(first, second)
        # first: prefill step (2 ms), then two decode steps (1.1 ms each).
        assert ms(first.ttft) == 2.0
        assert ms(second.ttft) == 2.0 + 1.1 + 1.1 + 2.0
        assert engine.stats.max_running_seen == 1

    run(test, max_running=1)


def test_decoding_requests_add_to_the_step_time():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        a = submit(engine, b"a" * 100, max_tokens=4)
        b = submit(engine, b"b" * 100, max_tokens=4)
        await finish(a, b)
        steps = [round(s * 1000, 6) for s in vt.sleeps]
        assert steps == [1.0 + 0.01 * 200, 1.0 + 0.2, 1.0 + 0.2, 1.0 + 0.2]
        assert a.generated == b.generated == 4
        assert engine.stats.generation_tokens == 8

    run(test)


def test_zero_output_tokens_is_a_prefill_only_request():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        first = submit(engine, b"e" * 100, max_tokens=0)
        await finish(first)
        again = submit(engine, b"e" * 100, max_tokens=0)
        await finish(again)
        assert (first.generated, first.finish_reason) == (0, "length")
        assert ms(first.ttft) == 1.0 + 0.01 * 100  # done when its prefill is
        assert again.cached_tokens == 96
        assert engine.stats.generation_tokens == 0
        assert engine.cache.used_blocks == 0  # both released

    run(test)


def test_max_running_is_respected_and_the_rest_wait():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        reqs = [submit(engine, bytes([65 + i]) * 40, max_tokens=5) for i in range(5)]
        await asyncio.sleep(0)  # the loop admits and plans its first step
        assert len(engine.running) == 2
        assert len(engine.waiting) == 3
        await finish(*reqs)
        assert engine.stats.max_running_seen == 2
        # FIFO: requests start in order.
        starts = [r.first_token_at for r in reqs]
        assert starts == sorted(starts)

    run(test, max_running=2)


def test_chunked_prefill_spends_the_budget_oldest_first():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        old = submit(engine, b"o" * 250)
        young = submit(engine, b"y" * 80)
        await finish(old, young)
        steps = [round(s * 1000, 6) for s in vt.sleeps]
        # 100 tokens a step: old takes 100, 100, then 50 + young's first 50, then young's last 30.
        assert steps == [2.0, 2.0, 2.0, 1.0 + 0.3]
        assert ms(old.ttft) == 6.0
        assert ms(young.ttft) == 7.3

    run(test, max_batched_tokens=100)


def test_an_idle_engine_does_no_work():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        await asyncio.sleep(0.05)
        assert engine.stats.steps == 0
        await finish(submit(engine, b"x" * 20, max_tokens=3))
        steps, sleeps = engine.stats.steps, len(vt.sleeps)
        assert steps == 3
        for _ in range(100):
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert (engine.stats.steps, len(vt.sleeps)) == (steps, sleeps)
        await finish(submit(engine, b"y" * 20, max_tokens=1))  # and it wakes up again
        assert engine.stats.steps == steps + 1

    run(test)


def test_a_request_that_does_not_fit_now_blocks_the_queue():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        big = submit(engine, b"B" * 100, max_tokens=28)  # 8 of the 10 blocks
        large = submit(engine, b"L" * 40, max_tokens=8)  # 3 blocks: must wait for big
        small = submit(engine, b"s" * 10, max_tokens=1)  # 1 block would fit, but does not overtake
        await asyncio.sleep(0)
        assert engine.running == [big]
        assert list(engine.waiting) == [large, small]
        await finish(big, large, small)
        assert ms(big.ttft) < ms(large.ttft) <= ms(small.ttft)

    run(test, kv_blocks=10)


def test_a_request_larger_than_the_cache_is_refused():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        with pytest.raises(TooLong):
            engine.submit(engine.new_request(b"x" * 150, 11))
        submit(engine, b"x" * 150, 10)  # exactly the 10 blocks of 16 tokens
        assert not engine.cache.fits_ever(161)

    run(test, kv_blocks=10)


def test_lora_adapters_beyond_max_loras_wait_and_others_pass_them():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        a1 = submit(engine, b"1" * 40, max_tokens=5, adapter="a")
        b1 = submit(engine, b"2" * 40, max_tokens=5, adapter="b")
        a2 = submit(engine, b"3" * 40, max_tokens=5, adapter="a")
        base = submit(engine, b"4" * 40, max_tokens=5)
        await asyncio.sleep(0)
        assert engine.running == [a1, a2, base]
        assert list(engine.waiting) == [b1]
        assert engine.running_lora == {"a": 2}
        assert engine.waiting_lora == {"b": 1}
        await finish(a1, b1, a2, base)
        assert ms(b1.ttft) > ms(a1.ttft)
        assert engine.running_lora == engine.waiting_lora == {}

    run(test, max_loras=1)


def test_aborting_frees_a_request_waiting_or_running():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        running = submit(engine, b"r" * 40, max_tokens=50)
        waiting = submit(engine, b"w" * 40, max_tokens=50)
        await asyncio.sleep(0)
        assert engine.running == [running]
        engine.abort(waiting)
        assert not engine.waiting
        assert waiting.finished
        assert waiting.finish_reason == "abort"
        engine.abort(running)
        await finish(running)
        assert running.finish_reason == "abort"
        assert running.generated < 50
        assert engine.cache.used_blocks == 0
        assert engine.stats.finished["abort"] == 2

    run(test, max_running=1)


def test_reset_needs_an_idle_engine_and_clears_cache_and_counters():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        req = submit(engine, b"p" * 100, max_tokens=3)
        with pytest.raises(RuntimeError):
            engine.reset()
        await finish(req)
        assert engine.stats.prefix_queries == 100
        engine.reset()
        assert engine.stats.prefix_queries == 0
        assert engine.cache.cached_blocks == 0
        again = submit(engine, b"p" * 100, max_tokens=3)
        await finish(again)
        assert again.cached_tokens == 0

    run(test)


def test_counters_follow_vllm():
    async def test(engine: Engine, vt: VirtualTime) -> None:
        first = engine.new_request(b"c" * 100, 2, end_reason="stop")
        engine.submit(first)
        await finish(first)
        second = submit(engine, b"c" * 100 + b"d" * 20, max_tokens=3)
        await finish(second)
        stats = engine.stats
        assert stats.prefix_queries == 220
        assert stats.prefix_hits == 96  # 6 full blocks of the first prompt
        assert stats.prompt_tokens == 220
        assert stats.generation_tokens == 5
        assert stats.finished == {"stop": 1, "length": 1, "abort": 0}
        assert sum(stats.ttft_buckets) == 2
        assert stats.ttft_sum == pytest.approx((first.ttft or 0) + (second.ttft or 0))

    run(test)
