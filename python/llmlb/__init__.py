"""llmlb: an LLM-aware endpoint picker for Envoy (gRPC ext_proc)."""

from llmlb._core import (
    PREFIX_BLOCK_SIZE,
    Balancer,
    BodyTooLargeError,
    NoEndpointsError,
    OverLimitError,
    ParsedRequest,
    RequestParseError,
    RequestStream,
    __version__,
    parse_body,
    parse_request,
    shared_scripts,
)

__all__ = [
    "PREFIX_BLOCK_SIZE",
    "Balancer",
    "BodyTooLargeError",
    "NoEndpointsError",
    "OverLimitError",
    "ParsedRequest",
    "RequestParseError",
    "RequestStream",
    "__version__",
    "parse_body",
    "parse_request",
    "shared_scripts",
]
