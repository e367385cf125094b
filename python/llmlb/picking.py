"""One pick, from body bytes to an answer: the balancer call plus its metrics and errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmlb._core import (
    FALLBACK_PICK_REASONS,
    Balancer,
    NoEndpointsError,
    OverLimitError,
    ParsedRequest,
    ShedError,
    UnknownModelError,
)
from llmlb.metrics import Metrics

log = logging.getLogger("llmlb.pick")

# Seconds a client should wait before retrying a 429 from maxRequestCount.
OVER_LIMIT_RETRY_AFTER = 1


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
    ) -> None:
        self.balancer = balancer
        self.shed_retry_after = shed_retry_after
        self.metrics = metrics
        self.policy = balancer.policy
        # Called when Envoy could not reach a picked endpoint, so health can re-probe it now.
        self.on_upstream_failure = on_upstream_failure
        self._debug = log.isEnabledFor(logging.DEBUG)

    async def pick(
        self, request: ParsedRequest | None, *, session: str | None = None, pinned: str | None = None
    ) -> tuple[int, str] | Refusal:
        """``(ticket, endpoint)``, or a refusal. ``None`` picks from the headers alone;
        ``session`` is the session header's value, ``pinned`` the endpoint holding the stored
        response the request continues."""
        started = time.perf_counter()
        try:
            ticket, endpoint, reason, depth = self.balancer.pick(request, session=session, pinned=pinned)
        except NoEndpointsError:
            return self._refuse_no_endpoints()
        except OverLimitError as e:
            return self._refuse_over_limit(str(e))
        except ShedError as e:
            return self._refuse_shed(str(e))
        except UnknownModelError as e:
            return self._refuse_unknown_model(str(e))
        self._record(endpoint, reason, depth, ticket, time.perf_counter() - started)
        return ticket, endpoint

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

    def _record(self, endpoint: str, reason: str, depth: int, ticket: int, seconds: float) -> None:
        self.metrics.pick_duration.observe(seconds)
        self.metrics.picks.inc((self.policy, endpoint, reason))
        if reason in FALLBACK_PICK_REASONS:
            self.metrics.fallbacks.inc((reason,))
        if self._debug:
            log.debug("picked %s reason=%s prefix_depth=%d ticket=%d", endpoint, reason, depth, ticket)
