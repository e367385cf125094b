"""Which endpoint holds which stored response (the OpenAI Responses API).

vLLM keeps a stored response in the memory of the server that produced it: a follow-up naming it
(``previous_response_id``, or ``GET /v1/responses/{id}``) must reach that server, any other one
answers 404. llmlb learns the id from the response itself (its first ``"id"``: the top-level
key of a JSON response, or of the ``response`` object in the first SSE event) and remembers the
endpoint:

- in this process: an LRU map bounded by ``response_store_size`` entries, each dropped
  ``response_ttl`` seconds after it was learned;
- with Redis: also under ``llmlb:{pool}:response:<id>`` with the same TTL, so every replica finds
  responses another produced. A lookup that misses locally asks Redis within ``redisBudget``;
  Redis down means local knowledge only (the follow-up is then routed like any request).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from llmlb.metrics import Metrics

if TYPE_CHECKING:
    from llmlb.shared import SharedState

log = logging.getLogger("llmlb.responses")

# The id is in the first bytes of a response (the JSON's first key, or the first SSE event):
# a response that has not shown one by then is not scanned further.
SCAN_LIMIT = 64 * 1024
_ID_KEY = b'"id"'
_ID_VALUE = re.compile(rb'\s*:\s*"([A-Za-z0-9_.:-]{1,256})"')


class ResponseIdScanner:
    """Finds a response's id in its first body chunks, however they are split."""

    __slots__ = ("_seen", "done")

    def __init__(self) -> None:
        self._seen = b""
        self.done = False

    def feed(self, chunk: bytes) -> str | None:
        """The id once the chunks so far show it; ``None`` while they do not (``done`` turns true
        when the id was found or the scan gave up)."""
        if self.done:
            return None
        seen = self._seen + chunk[: SCAN_LIMIT - len(self._seen)]
        at = seen.find(_ID_KEY)
        if at >= 0:
            match = _ID_VALUE.match(seen, at + len(_ID_KEY))
            if match:
                self.done = True
                return match[1].decode()
            if len(seen) - at > 300:  # the key's value is not an id
                self.done = True
                return None
        self._seen = seen
        if len(seen) >= SCAN_LIMIT:
            self.done = True
        return None


class ResponseStore:
    def __init__(
        self, ttl_s: int, capacity: int, metrics: Metrics, shared: SharedState | None = None
    ) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.metrics = metrics
        self.shared = shared
        self._local: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._local)

    async def remember(self, response_id: str, endpoint: str) -> None:
        """Keeps where ``response_id`` is; with Redis, returns once the pool knows it too (or
        after ``redisBudget``, the write then lands in the background). The caller holds the
        response chunk that carries the id until then, so a client that sends its follow-up
        through another replica as soon as it has the id finds it there."""
        self._keep(response_id, endpoint, time.monotonic() + self.ttl_s)
        self.metrics.responses_learned.inc()
        shared = self.shared
        if shared is not None and shared.up:
            task = asyncio.get_running_loop().create_task(
                shared.set_response(response_id, endpoint, self.ttl_s)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.wait((task,), timeout=shared.budget)

    def _keep(self, response_id: str, endpoint: str, expires: float) -> None:
        self._local[response_id] = (endpoint, expires)
        self._local.move_to_end(response_id)
        while len(self._local) > self.capacity:
            self._local.popitem(last=False)

    def local(self, response_id: str) -> str | None:
        entry = self._local.get(response_id)
        if entry is None:
            return None
        endpoint, expires = entry
        if expires <= time.monotonic():
            del self._local[response_id]
            return None
        return endpoint

    async def lookup(self, response_id: str) -> str | None:
        """The endpoint holding ``response_id``, if known here or (with Redis) to the pool."""
        endpoint = self.local(response_id)
        shared = self.shared
        if endpoint is None and shared is not None and shared.up:
            endpoint = await shared.get_response(response_id)
            if endpoint is not None:
                # Kept here for the rest of the conversation (Redis keeps the authoritative TTL).
                self._keep(response_id, endpoint, time.monotonic() + self.ttl_s)
        self.metrics.response_lookups.inc(("found" if endpoint is not None else "unknown",))
        return endpoint
