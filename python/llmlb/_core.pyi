"""Type stubs for the Rust extension ``llmlb._core``.

Calls hold the GIL except where noted; bodies of 64 KiB or more are parsed with it released.
"""

from typing import Final

__version__: Final[str]
#: Bytes of canonical prompt per prefix block.
PREFIX_BLOCK_SIZE: Final[int]

class RequestParseError(ValueError):
    """The body is not a usable OpenAI request (not UTF-8, not JSON, no prompt, wrong types)."""

class NoEndpointsError(RuntimeError):
    """The pool has no endpoints."""

class OverLimitError(RuntimeError):
    """The best endpoint already has ``maxRequestCount`` requests in flight."""

class ParsedRequest:
    @property
    def kind(self) -> str:
        """``"chat"`` or ``"completion"``."""
    @property
    def model(self) -> str:
        """The ``model`` field, empty when absent."""
    @property
    def stream(self) -> bool: ...
    @property
    def prefix_hashes(self) -> list[int]:
        """``prefix_hashes[i]`` identifies the first ``i + 1`` prompt blocks (xxh3-64, chained)."""

def parse_request(body: bytes) -> ParsedRequest:
    """Parses a chat-completions or completions body.

    Raises:
        RequestParseError: the body is not a usable request.
    """

class Balancer:
    """Embedded picking state: pool, in-flight counts, tickets, prefix table, policy."""

    def __init__(
        self,
        policy: str,
        *,
        prefix_ttl_s: int = 1800,
        prefix_capacity: int = 262_144,
        load_factor: float = 1.25,
        load_floor: int = 2,
        max_request_count: int = 0,
    ) -> None:
        """Raises ValueError for an unknown policy or a load_factor below 1."""
    @property
    def policy(self) -> str: ...
    @property
    def open_tickets(self) -> int: ...
    @property
    def prefix_entries(self) -> int: ...
    def set_endpoints(self, addresses: list[str]) -> None: ...
    def set_healthy(self, address: str, healthy: bool) -> None: ...
    def pick(self, body: bytes | None) -> tuple[int, str, str, int]:
        """Parses ``body`` and picks: ``(ticket, endpoint, reason, prefix_depth)``.

        An unusable body is picked by load with reason ``"bad_body"``; ``None`` picks from
        headers alone.

        Raises:
            NoEndpointsError: the pool is empty.
            OverLimitError: ``max_request_count`` is reached on the best endpoint.
        """
    def release(self, ticket: int) -> bool:
        """Ends a pick's request; ``False`` if the ticket is unknown or already released."""
    def endpoints(self) -> list[tuple[str, int, bool, bool]]:
        """``[(address, inflight, healthy, in_pool)]``."""
