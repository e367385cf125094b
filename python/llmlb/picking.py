"""One pick, from body bytes to an answer: the balancer call plus its metrics and errors."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from llmlb._core import (
    FALLBACK_PICK_REASONS,
    Balancer,
    NoEndpointsError,
    OverLimitError,
    ParsedRequest,
    Pick,
    ShedError,
    UnknownModelError,
)
from llmlb.config import DEFAULT_RECENT_DECISIONS
from llmlb.decision import STATE_EMBEDDED, Decision, Observer
from llmlb.metrics import Metrics

log = logging.getLogger("llmlb.pick")

# Seconds a client should wait before retrying a 429 from maxRequestCount.
OVER_LIMIT_RETRY_AFTER = 1


@dataclass(slots=True)
class RequestMeta:
    """What a pick's decision record takes from the request's headers."""

    request_id: str = ""
    path: str = ""
    traceparent: str = ""
    tracestate: str = ""


NO_META = RequestMeta()


@dataclass(frozen=True, slots=True)
class Refusal:
    """The picker answers the request itself (ImmediateResponse)."""

    status: int
    error_type: str
    message: str
    retry_after: int | None = None


class Picker:
    """Picks from this replica's embedded state; called once per request from the event loop."""

    def __init__(
        self,
        balancer: Balancer,
        metrics: Metrics,
        on_upstream_failure: Callable[[str], None] = lambda endpoint: None,
        *,
        shed_retry_after: int = 1,
        state: str = STATE_EMBEDDED,
        recent_decisions: int = DEFAULT_RECENT_DECISIONS,
    ) -> None:
        self.balancer = balancer
        # Where decisions read their state (see llmlb.decision); a shared picker says per pick.
        self.state = state
        # Called with every decision, after the pick: metrics, tracing, request logs.
        self.observers: list[Observer] = []
        self.recent: deque[Decision] = deque(maxlen=recent_decisions)
        self.shed_retry_after = shed_retry_after
        self.metrics = metrics
        self.policy = balancer.policy
        # Called when Envoy could not reach a picked endpoint, so health can re-probe it now.
        self.on_upstream_failure = on_upstream_failure
        self._debug = log.isEnabledFor(logging.DEBUG)

    async def pick(
        self,
        request: ParsedRequest | None,
        *,
        session: str | None = None,
        pinned: str | None = None,
        meta: RequestMeta = NO_META,
    ) -> Decision | Refusal:
        """The decision (its ``ticket`` ends the request, see ``release``), or a refusal.
        ``None`` picks from the headers alone; ``session`` is the session header's value,
        ``pinned`` the endpoint holding the stored response the request continues."""
        return self._pick_here(request, session, pinned, meta, self.state)

    #: ``pick_now`` decides without waiting (no round trip): callers may skip the coroutine.
    synchronous = True

    def pick_now(
        self, request: ParsedRequest | None, session: str | None, pinned: str | None, meta: RequestMeta
    ) -> Decision | Refusal:
        """``pick`` without the coroutine, for pickers that never wait (``synchronous``)."""
        return self._pick_here(request, session, pinned, meta, self.state)

    def _pick_here(
        self,
        request: ParsedRequest | None,
        session: str | None,
        pinned: str | None,
        meta: RequestMeta,
        state: str,
    ) -> Decision | Refusal:
        """Picks from this process's view (``state`` says which, for the record)."""
        started = time.perf_counter()
        try:
            pick = self.balancer.pick(request, session=session, pinned=pinned)
        except NoEndpointsError:
            return self._refuse_no_endpoints()
        except OverLimitError as e:
            return self._refuse_over_limit(str(e))
        except ShedError as e:
            return self._refuse_shed(str(e))
        except UnknownModelError as e:
            return self._refuse_unknown_model(str(e))
        return self._decided(pick, request, meta, state, time.perf_counter() - started)

    def release(self, ticket: int, failed: bool = False) -> None:
        """Ends a picked request; a ``failed`` one (an error answer) also takes back the prefix
        entries its pick claimed."""
        if failed:
            self.balancer.release_failed(ticket)
        else:
            self.balancer.release(ticket)

    def refuse_too_large(self, max_bytes: int) -> Refusal:
        self.metrics.immediate.inc(("413",))
        return Refusal(
            413,
            "invalid_request_error",
            f"llmlb: the request body (decoded, if compressed) is larger than {max_bytes} bytes",
        )

    def _refuse_no_endpoints(self) -> Refusal:
        self.metrics.immediate.inc(("503",))
        return Refusal(503, "service_unavailable", "llmlb: no model-server endpoints are available")

    def _refuse_unknown_model(self, message: str) -> Refusal:
        self.metrics.immediate.inc(("404",))
        return Refusal(404, "model_not_found", f"llmlb: {message}")

    def _refuse_over_limit(self, message: str) -> Refusal:
        self.metrics.immediate.inc(("429",))
        return Refusal(429, "rate_limit_exceeded", f"llmlb: {message}", OVER_LIMIT_RETRY_AFTER)

    def _refuse_shed(self, message: str) -> Refusal:
        self.metrics.immediate.inc(("429",))
        self.metrics.shed.inc()
        return Refusal(429, "rate_limit_exceeded", f"llmlb: {message}", self.shed_retry_after)

    def _decided(
        self, pick: Pick, request: ParsedRequest | None, meta: RequestMeta, state: str, seconds: float
    ) -> Decision:
        """Counts the pick in the metrics and tells the observers."""
        decision = Decision(
            pick,
            self.policy,
            state,
            seconds,
            time.time(),
            meta.request_id,
            meta.path,
            request.model if request is not None and request.ok else "",
            meta.traceparent,
            meta.tracestate,
        )
        metrics = self.metrics
        metrics.pick_duration.observe(seconds)
        metrics.picks.inc((self.policy, pick.endpoint, pick.reason))
        if pick.prefix_levels:
            metrics.prefix_hit_depth.observe(pick.prefix_depth)
        if pick.reason in FALLBACK_PICK_REASONS:
            metrics.fallbacks.inc((pick.reason,))
        self.recent.append(decision)
        for observe in self.observers:
            observe(decision)
        if self._debug:
            log.debug("picked %s", decision.fields())
        return decision
