"""The decision record: what one pick decided and why, in one place.

Every pick makes a ``Decision``. Its ``fields()`` are the record's one wire form: the
``llmlb`` dynamic metadata Envoy's access log reads, the ``log_requests`` line, the
``/debug/decisions`` entries and the status page; ``compact()`` is the opt-in response
header's form. Observers (``Picker.observers``: metrics, the recent-decisions ring, tracing)
receive each decision after the pick, on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmlb._core import Pick, RecordEncoder

#: The dynamic metadata namespace of the decision record (``%DYNAMIC_METADATA(llmlb:...)%``).
RECORD_NAMESPACE = "llmlb"

#: Where the picking state a decision read lives: this process, the workers' shared mapping,
#: Redis (the pool-wide view), or this replica alone because Redis did not answer.
STATE_EMBEDDED = "embedded"
STATE_SHARED_MEMORY = "shared_memory"
STATE_REDIS = "redis"
STATE_LOCAL_FALLBACK = "local_fallback"

#: The record's fields in order, with their meaning (docs/observability.md lists the same).
RECORD_FIELDS: dict[str, str] = {
    "request_id": "Envoy's x-request-id of the request",
    "endpoint": "the picked endpoint (ip:port)",
    "policy": "the balancing policy",
    "reason": "why this endpoint (the llmlb_picks_total reason)",
    "prefix_depth": "leading prefix levels of the prompt the endpoint is known to hold",
    "prefix_levels": "the prompt's prefix levels",
    "prefix_share": "predicted cached share of the prompt's tokens, 0..1",
    "cached_tokens": "prompt tokens predicted to be cached on the endpoint (estimated)",
    "prompt_tokens": "the prompt's tokens (estimated: bytes / 4)",
    "candidates": "endpoints left after the filters",
    "score": "the endpoint's total score (higher is better)",
    "runner_up": "the best other candidate's score (absent: the endpoint was alone)",
    "state": "where the picking state came from: embedded, shared_memory, redis, local_fallback",
    "model": "the request's model",
    "path": "the request's path",
    "pick_us": "time to decide, microseconds",
}

Observer = Callable[["Decision"], None]

# The record's values and rounding live in the Rust core (one owner for every form of the
# record); this one makes the dict form. The metadata form is made by the ext_proc answer.
_RECORD = RecordEncoder("", "", RECORD_NAMESPACE, list(RECORD_FIELDS))


@dataclass(slots=True)
class Decision:
    """One pick (the balancer's ``Pick``: endpoint, reason, prefix and score figures) and what
    the picker knows around it (see ``RECORD_FIELDS``)."""

    pick: Pick
    policy: str
    state: str
    pick_seconds: float
    #: Unix time the pick ended.
    time: float
    request_id: str = ""
    path: str = ""
    model: str = ""
    #: W3C trace context from the request's headers ("" if none): the pick's span continues it.
    traceparent: str = ""
    tracestate: str = ""

    @classmethod
    def of(
        cls,
        *,
        policy: str,
        state: str,
        pick_seconds: float,
        time: float,
        request_id: str = "",
        path: str = "",
        model: str = "",
        traceparent: str = "",
        tracestate: str = "",
        **figures: Any,
    ) -> Decision:
        """A decision from the pick's figures by name (tests, replays); picks make theirs from
        the balancer's ``Pick``."""
        return cls(
            Pick(**figures),
            policy,
            state,
            pick_seconds,
            time,
            request_id,
            path,
            model,
            traceparent,
            tracestate,
        )

    @property
    def ticket(self) -> int:
        return self.pick.ticket

    @property
    def endpoint(self) -> str:
        return self.pick.endpoint

    @property
    def reason(self) -> str:
        return self.pick.reason

    @property
    def prefix_depth(self) -> int:
        return self.pick.prefix_depth

    @property
    def prefix_levels(self) -> int:
        return self.pick.prefix_levels

    @property
    def prompt_tokens(self) -> int:
        return self.pick.prompt_tokens

    @property
    def cached_tokens(self) -> int:
        return self.pick.cached_tokens

    @property
    def candidates(self) -> int:
        return self.pick.candidates

    @property
    def score(self) -> float:
        return self.pick.score

    @property
    def runner_up(self) -> float | None:
        return self.pick.runner_up

    @property
    def prefix_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def fields(self) -> dict[str, Any]:
        """The record (``RECORD_FIELDS``, in order), JSON-ready; ``runner_up`` only when there
        was one."""
        return _RECORD.fields(
            self.pick, self.policy, self.state, self.request_id, self.path, self.model, self.pick_seconds
        )

    def compact(self) -> str:
        """The response header's form: ``key=value`` pairs joined by ``;``, short enough for any
        proxy's header limits, e.g. ``endpoint=10.0.0.5:8000;reason=prefix_hit;depth=3/5;...``."""
        runner_up = "-" if self.runner_up is None else f"{self.runner_up:.3f}"
        return (
            f"endpoint={self.endpoint};reason={self.reason};depth={self.prefix_depth}/"
            f"{self.prefix_levels};share={self.prefix_share:.2f};candidates={self.candidates};"
            f"score={self.score:.3f};runner_up={runner_up};state={self.state};"
            f"pick_us={self.pick_seconds * 1e6:.0f}"
        )
