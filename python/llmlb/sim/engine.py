"""Continuous batching over a paged KV cache: one engine loop per simulated model server.

Admission takes waiting requests in FIFO order while fewer than ``max_running`` run and the cache can
hold a request's blocks (prompt and output); a request whose LoRA adapter cannot join the batch (already
``max_loras`` other adapters running) is skipped and keeps its place, while one whose blocks do not fit
stops admission (no overtaking), as in vLLM's scheduler. The prefix-cache hit is taken at admission.

Each step, running requests still prefilling share ``max_batched_tokens`` prompt tokens (chunked prefill,
oldest first), and every request done prefilling decodes one token. A step lasts ``step_base_ms +
prefill_ms_per_token * prefill tokens + decode_ms_per_seq * decoding sequences``; the loop sleeps that
long, then emits the step's tokens: a request's first token comes at the end of the step that finishes
its prefill. With nothing running or waiting the loop awaits an event (no polling).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from llmlb.sim.kv_cache import Allocation, KVCache, block_hashes, root_hash

# vLLM's bounds for vllm:time_to_first_token_seconds.
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# fmt: on
FINISH_REASONS = ("stop", "length", "abort")
ADMISSION_SCAN_LIMIT = 256
"""Waiting requests looked at per step when LoRA-blocked ones are skipped (bounds a step's work)."""
MAX_TIMING_DEBT_S = 0.05
"""Timers oversleep (libuv counts milliseconds); later steps sleep less to make up, up to this much."""


@dataclass(frozen=True)
class EngineConfig:
    model: str = "sim-model"
    block_size: int = 16
    kv_blocks: int = 2048
    max_running: int = 16
    max_batched_tokens: int = 2048
    step_base_ms: float = 2.0
    prefill_ms_per_token: float = 0.02
    decode_ms_per_seq: float = 0.1
    chars_per_token: int = 4
    max_loras: int = 2

    @property
    def max_model_len(self) -> int:
        """Tokens (prompt + output) a request may have: the whole cache."""
        return self.kv_blocks * self.block_size


class TooLong(ValueError):
    """The request's prompt and output need more blocks than the whole cache has."""


class Request:
    """One inference request inside the engine. The server waits on :meth:`progress`."""

    __slots__ = (
        "_chunk",
        "_waiter",
        "aborted",
        "adapter",
        "alloc",
        "arrival",
        "cached_tokens",
        "computed",
        "end_reason",
        "finish_reason",
        "finished",
        "first_token_at",
        "generated",
        "hashes",
        "max_tokens",
        "prompt_tokens",
        "stream",
    )

    def __init__(
        self,
        prompt_tokens: int,
        hashes: list[bytes],
        max_tokens: int,
        adapter: str | None,
        *,
        stream: bool,
        end_reason: str,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.hashes = hashes
        self.max_tokens = max_tokens
        self.adapter = adapter
        self.stream = stream
        self.alloc: Allocation | None = None
        self.arrival = 0.0
        self.cached_tokens = 0
        self.computed = 0
        """Prompt tokens in the cache (hit at admission plus prefilled)."""
        self.generated = 0
        self.first_token_at: float | None = None
        self.end_reason = end_reason
        """The finish reason when all `max_tokens` are out: "length" or "stop"."""
        self.aborted = False
        self.finished = False
        self.finish_reason = ""
        self._chunk = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    async def progress(self, seen: int) -> int:
        """Waits until more than `seen` tokens are out or the request finished; returns tokens out.
        Only streaming requests are woken per token."""
        while self.generated == seen and not self.finished:
            await self._wait()
        return self.generated

    async def done(self) -> None:
        """Waits until the request finished (all tokens out, or aborted)."""
        while not self.finished:
            await self._wait()

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        await waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


class Stats:
    """Counters since start (or the last reset), read by /metrics and /_sim/stats."""

    def __init__(self) -> None:
        self.requests_total = 0
        """Inference requests received (every outcome)."""
        self.failed = 0
        self.dropped = 0
        self.rejected = 0
        self.prefix_queries = 0
        """Prompt tokens of admitted requests (vllm:prefix_cache_queries_total)."""
        self.prefix_hits = 0
        """Of which found in the cache (vllm:prefix_cache_hits_total)."""
        self.prefix_cache_resets = 0
        """Successful ``POST /reset_prefix_cache`` calls."""
        self.prompt_tokens = 0
        """Prompt tokens of requests whose prefill completed (vllm:prompt_tokens_total)."""
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft_buckets = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.max_running_seen = 0
        self.steps = 0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_buckets[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds


class Engine:
    """The simulated scheduler and model runner; see the module docstring."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.cache = KVCache(config.kv_blocks, config.block_size)
        self._clock = clock or time.monotonic
        self._sleep = sleep or asyncio.sleep
        self.stats = Stats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.running_lora: dict[str, int] = {}
        self.waiting_lora: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._block_bytes = config.block_size * config.chars_per_token

    # ----------------------------------------------------------------------------------------------
    # requests

    def new_request(
        self,
        prompt: bytes,
        max_tokens: int,
        adapter: str | None = None,
        *,
        stream: bool = False,
        end_reason: str = "length",
    ) -> Request:
        """A request for `prompt` (UTF-8 bytes), its tokens and block hashes computed; it ends with
        `end_reason` once `max_tokens` are out (0: when its prefill completes, with no token)."""
        prompt_tokens = -(-len(prompt) // self.config.chars_per_token)
        full = prompt_tokens // self.config.block_size
        hashes = block_hashes(prompt, root_hash(self.config.model, adapter), self._block_bytes, full)
        return Request(prompt_tokens, hashes, max_tokens, adapter, stream=stream, end_reason=end_reason)

    def submit(self, req: Request) -> None:
        """Queues `req`. Raises TooLong if it could never fit in the cache."""
        if req.prompt_tokens < 1:
            raise ValueError("empty prompt")
        if not self.cache.fits_ever(req.prompt_tokens + req.max_tokens):
            raise TooLong(f"{req.prompt_tokens} + {req.max_tokens} tokens exceed {self.config.max_model_len}")
        req.arrival = self._clock()
        self.waiting.append(req)
        if req.adapter is not None:
            self.waiting_lora[req.adapter] = self.waiting_lora.get(req.adapter, 0) + 1
        self._wakeup.set()

    def abort(self, req: Request) -> None:
        """Drops an unfinished request (its client went away): out of the queue now, or out of the
        batch at the end of the current step."""
        if req.finished:
            return
        if req.alloc is None:
            try:
                self.waiting.remove(req)
            except ValueError:
                return
            _dec(self.waiting_lora, req.adapter)
            self._finish(req, "abort")
        else:
            req.aborted = True  # taken out of the batch by the loop after this step

    def abort_all(self) -> None:
        """Drops every request (shutting down; call after :meth:`stop`)."""
        while self.waiting:
            req = self.waiting.popleft()
            _dec(self.waiting_lora, req.adapter)
            self._finish(req, "abort")
        running, self.running = self.running, []
        for req in running:
            req.aborted = True
            self._release(req)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache``: forgets every cached prefix block, counters untouched.
        Refused (``False``, nothing changed) while a running request holds blocks, as in vLLM."""
        if self.cache.used_blocks:
            return False
        self.cache.reset()
        self.stats.prefix_cache_resets += 1
        return True

    def reset(self) -> None:
        """Drops the whole cache and every counter. Raises RuntimeError unless idle."""
        if self.busy:
            raise RuntimeError("requests are running or waiting")
        self.cache.reset()
        self.stats = Stats()

    # ----------------------------------------------------------------------------------------------
    # the loop

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="sim-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise

    async def run(self) -> None:
        ideal = self._clock()
        while True:
            if not self.running and not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                ideal = self._clock()
            self._admit()
            step = self._plan()
            ideal += step
            await self._sleep(max(0.0, ideal - self._clock()))
            now = self._clock()
            if now - ideal > MAX_TIMING_DEBT_S:
                ideal = now
            self._apply(now)

    def _admit(self) -> None:
        cfg = self.config
        waiting = self.waiting
        running = self.running
        skipped: list[Request] = []
        scanned = 0
        while waiting and len(running) < cfg.max_running and scanned < ADMISSION_SCAN_LIMIT:
            req = waiting[0]
            scanned += 1
            adapter = req.adapter
            lora = self.running_lora
            if adapter is not None and adapter not in lora and len(lora) >= cfg.max_loras:
                skipped.append(waiting.popleft())
                continue
            alloc = self.cache.allocate(req.hashes, req.prompt_tokens, req.max_tokens)
            if alloc is None:
                break
            waiting.popleft()
            req.alloc = alloc
            req.cached_tokens = req.computed = alloc.cached_blocks * cfg.block_size
            running.append(req)
            if adapter is not None:
                _dec(self.waiting_lora, adapter)
                self.running_lora[adapter] = self.running_lora.get(adapter, 0) + 1
            self.stats.prefix_queries += req.prompt_tokens
            self.stats.prefix_hits += req.cached_tokens
        if skipped:
            waiting.extendleft(reversed(skipped))
        self.stats.max_running_seen = max(self.stats.max_running_seen, len(running))

    def _plan(self) -> float:
        """Gives this step's prefill chunks; returns the step's duration in seconds."""
        cfg = self.config
        budget = cfg.max_batched_tokens
        prefill = 0
        decoding = 0
        for req in self.running:
            left = req.prompt_tokens - req.computed
            if left > 0:
                chunk = left if left < budget else budget
                req._chunk = chunk
                budget -= chunk
                prefill += chunk
            else:
                req._chunk = 0
                decoding += 1
        ms = cfg.step_base_ms + cfg.prefill_ms_per_token * prefill + cfg.decode_ms_per_seq * decoding
        return ms / 1000.0

    def _apply(self, now: float) -> None:
        """The step is over: its prefill chunks are in the cache, its tokens out."""
        stats = self.stats
        stats.steps += 1
        done = False
        for req in self.running:
            if req.aborted:
                done = True
                continue
            chunk = req._chunk
            if chunk:
                req.computed += chunk
                req._chunk = 0
                assert req.alloc is not None
                self.cache.commit(req.alloc, req.computed)
                if req.computed < req.prompt_tokens:
                    continue
                req.first_token_at = now
                stats.observe_ttft(now - req.arrival)
                stats.prompt_tokens += req.prompt_tokens
            elif req.computed < req.prompt_tokens:
                continue  # no budget left for it this step
            if req.max_tokens:  # 0: prefill only (an embedding), done once the prompt is in
                req.generated += 1
                stats.generation_tokens += 1
            if req.generated >= req.max_tokens:
                req.finished = True
                done = True
            if req.stream or req.finished:
                req._wake()
        if done:
            keep = []
            for req in self.running:
                if req.finished or req.aborted:
                    self._release(req)
                else:
                    keep.append(req)
            self.running = keep

    def _release(self, req: Request) -> None:
        assert req.alloc is not None
        self.cache.free(req.alloc)
        _dec(self.running_lora, req.adapter)
        self._finish(req, "abort" if req.aborted else req.end_reason)

    def _finish(self, req: Request, reason: str) -> None:
        req.finished = True
        req.finish_reason = reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        req._wake()


def _dec(counts: dict[str, int], key: str | None) -> None:
    if key is None:
        return
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
