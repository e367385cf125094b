"""The configuration file: schema, defaults, validation and the effective view.

Every field is documented in docs/configuration.md. A Higress ``ai-load-balancer`` plugin config
(``lb_type`` + ``lb_policy`` + ``lb_config``) is valid as it stands. Unknown keys are errors, so a
typo never silently changes behaviour; every error names the field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmlb._core import balancer_defaults

POLICIES = ("global_least_request", "prefix_cache", "least_busy")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: Decisions kept for /debug/decisions and the status page (``recent_decisions``).
DEFAULT_RECENT_DECISIONS = 100

# Higress fields llmlb accepts but does not need: its counters cannot leak, so nothing to clean,
# and decisions are always visible in /metrics and debug logs.
IGNORED_HIGRESS_FIELDS = ("cleanInterval", "enableDetailLog")

# Model-server engines whose metrics least_busy reads (an endpoint label `engine` picks one).
ENGINES = ("vllm", "sglang", "trtllm-serve", "triton")
# lb_config fields that only mean something to least_busy.
LEAST_BUSY_FIELDS = (
    "criticalModels", "scrapeInterval", "staleAfter", "scrapeTimeout", "metricsPath", "metricsPort", "engine",
    "queueThresholdCritical", "kvCacheThreshold", "queueingThresholdLoRA", "loraAffinityThreshold",
    "shedRetryAfter",
)  # fmt: skip
# Higress's later metrics policy; llmlb's least_busy covers it (see docs/configuration.md).
HIGRESS_METRICS_POLICIES = ("endpoint_metrics", "metrics_based")
HIGRESS_METRICS_FIELDS = ("metric_policy", "target_metric", "rate_limit")


# The longest request the generated Envoy route allows (its `timeout`), in seconds. A drain must
# not cut a request Envoy would still let finish, so it is also drain_timeout's default.
DEFAULT_REQUEST_TIMEOUT_S = 300

# Inclusive bounds of every numeric field, in the field's own unit: one place, so check-config,
# serve and docs/configuration.md agree, and no value can make the process abort (an allocation
# of a huge table, a sleep longer than the event loop accepts, a Redis TTL that overflows).
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "max_body_bytes": (1024, 2**30),
    "grpc_max_streams_per_connection": (1, 1_000_000),
    "grpc_max_streams": (1, 1_000_000),
    "health_check_interval": (0, 3_600_000),
    "health_check_timeout": (1, 60_000),
    "passive_probe_after": (0, 3_600_000),
    "drain_grace": (0, 3600),
    "drain_timeout": (0, 86_400),
    "discovery.interval": (100, 3_600_000),
    "models_refresh": (0, 3_600_000),
    "recent_decisions": (0, 100_000),
    "response_ttl": (1, 31_536_000),
    # About 150 bytes an entry.
    "response_store_size": (1, 10_000_000),
    "lb_config.servicePort": (1, 65535),
    "lb_config.timeout": (0, 600_000),
    "lb_config.redisBudget": (1, 60_000),
    "lb_config.database": (0, 65535),
    "lb_config.redisKeyTTL": (0, 31_536_000),
    "lb_config.leaseTTL": (1, 86_400),
    "lb_config.scrapeInterval": (1, 3_600_000),
    "lb_config.staleAfter": (1, 86_400_000),
    "lb_config.scrapeTimeout": (1, 600_000),
    "lb_config.metricsPort": (1, 65535),
    "lb_config.shedRetryAfter": (0, 3600),
    "lb_config.maxRequestCount": (0, 1_000_000),
    "lb_config.affinityLoadFloor": (0, 1_000_000),
    # About 52 bytes an entry: 2^24 entries is 832 MiB.
    "lb_config.prefixTableSize": (1, 2**24),
    # Blocks of 512 bytes of prompt: 65,536 is 32 MiB of prompt.
    "lb_config.maxPrefixBlocks": (1, 65_536),
    # prediction: ms between readings of the engines' counters, s the ratios look back.
    "prediction.interval": (100, 3_600_000),
    "prediction.window": (1, 86_400),
}
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "lb_config.queueThresholdCritical": (0.0, 1e9),
    "lb_config.queueingThresholdLoRA": (0.0, 1e9),
    "lb_config.kvCacheThreshold": (0.0, 1.0),
    "lb_config.loraAffinityThreshold": (0.0, 1.0),
    "lb_config.affinityLoadFactor": (1.0, 1000.0),
    # The load model: prompt tokens one request in flight weighs; what a cached token is worth;
    # how fast one endpoint is assumed to prefill (its backlog drains at this rate).
    "lb_config.requestTokens": (0.0, 1e6),
    "lb_config.affinityWeight": (0.0, 100.0),
    "lb_config.prefillTokensPerSecond": (1.0, 1e7),
    # tracing: the share of traces started here that are sampled (a sampled parent always is).
    "tracing.sample_ratio": (0.0, 1.0),
}
# Longest accepted string value (model names, paths, hosts): far beyond any real one.
MAX_STRING = 4096
#: Default ``max_body_bytes`` (64 MiB); ``llmlb envoy-config`` uses it too (one owner).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Where a request's affinity key may come from; ``affinity_keys`` lists them in precedence order.
AFFINITY_KEYS = ("prompt_cache_key", "conversation", "session_header", "safety_identifier", "user")
UNKNOWN_MODEL_CHOICES = ("reject", "route")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


class ConfigError(ValueError):
    """A configuration problem, always naming the field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


@dataclass(frozen=True)
class Endpoint:
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


# The picking defaults have one owner, the Rust core (`BalancerConfig::default`).
_PICKING = balancer_defaults()


@dataclass(frozen=True)
class LbConfig:
    """``lb_config``: Higress field names, plus llmlb's own tuning knobs."""

    serviceFQDN: str | None = None
    servicePort: int = 6379
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs
    timeout: int = 3000
    redisBudget: int = 25
    database: int = 0
    tls: bool = False
    tlsCAFile: str | None = None
    redisKeyTTL: int = int(_PICKING["redisKeyTTL"])
    criticalModels: tuple[str, ...] | None = None
    scrapeInterval: int = 50
    staleAfter: int = int(_PICKING["staleAfter"])
    scrapeTimeout: int = 500
    metricsPath: str = "/metrics"
    metricsPort: int | None = None
    engine: str | None = None
    queueThresholdCritical: float = _PICKING["queueThresholdCritical"]
    kvCacheThreshold: float = _PICKING["kvCacheThreshold"]
    queueingThresholdLoRA: float = _PICKING["queueingThresholdLoRA"]
    loraAffinityThreshold: float = _PICKING["loraAffinityThreshold"]
    shedRetryAfter: int = 1
    leaseTTL: int = 15
    maxRequestCount: int = int(_PICKING["maxRequestCount"])
    affinityLoadFactor: float = _PICKING["affinityLoadFactor"]
    affinityLoadFloor: int = int(_PICKING["affinityLoadFloor"])
    prefixTableSize: int = int(_PICKING["prefixTableSize"])
    requestTokens: float = _PICKING["requestTokens"]
    affinityWeight: float = _PICKING["affinityWeight"]
    prefillTokensPerSecond: float = _PICKING["prefillTokensPerSecond"]
    maxPrefixBlocks: int = 1024


@dataclass(frozen=True)
class GrpcTls:
    """``grpc_tls``: ext_proc over TLS; with ``client_ca``, clients must present a certificate."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True)
class Prediction:
    """``prediction``: predicted prefix-cache hits checked against the engines' own counters
    (see docs/observability.md). ``enabled`` ``None`` (``auto`` in the file) means: on with
    ``lb_policy: prefix_cache``, the one policy that predicts hits (:func:`prediction_enabled`)."""

    enabled: bool | None = None
    # ms between readings of each endpoint's /metrics (least_busy's own scrape serves instead).
    interval: int = 5000
    # s of the sliding window the ratios are computed over.
    window: int = 60


def prediction_enabled(config: Config) -> bool:
    """Whether the prediction check runs: as configured, else with prefix_cache only (the
    other policies predict no hits, so the check would cost a GET per endpoint for one side)."""
    enabled = config.prediction.enabled
    return config.lb_policy == "prefix_cache" if enabled is None else enabled


_PREDICTION_KEYS = ("enabled", "interval", "window")
#: ``prediction.enabled: auto`` (the default): on with prefix_cache, off with the other policies.
PREDICTION_AUTO = "auto"


def _section(raw: Any, name: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """A config section that is a mapping of only ``keys`` (``None``: empty, the defaults)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(name, f"must be a mapping ({', '.join(keys)})")
    for key in raw:
        if key not in keys:
            raise ConfigError(f"{name}.{key}", f"unknown key (allowed: {', '.join(keys)})")
    return raw


def parse_prediction(raw: Any) -> Prediction:
    raw = _section(raw, "prediction", _PREDICTION_KEYS)
    values: dict[str, Any] = {}
    enabled = raw.get("enabled")
    if enabled is not None and enabled != PREDICTION_AUTO:
        if not isinstance(enabled, bool):
            raise ConfigError("prediction.enabled", f"must be true, false or auto, got {enabled!r}")
        values["enabled"] = enabled
    for key in ("interval", "window"):
        if raw.get(key) is not None:
            values[key] = _bounded_int(raw[key], f"prediction.{key}")
    prediction = Prediction(**values)
    if prediction.window * 1000 < 2 * prediction.interval:
        raise ConfigError(
            "prediction.window",
            f"must span at least two readings (2 x interval = {2 * prediction.interval} ms), "
            f"got {prediction.window} s",
        )
    return prediction


@dataclass(frozen=True)
class Tracing:
    """``tracing``: a span per pick exported over OTLP/gRPC (see docs/observability.md#traces).
    ``otlp_endpoint`` ``None`` (the default) means tracing is off."""

    otlp_endpoint: str | None = None
    service_name: str = "llmlb"
    sample_ratio: float = 1.0
    # Sent with every export (e.g. an auth token); "${ENV_NAME}" values read the environment.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None


_TRACING_KEYS = ("otlp_endpoint", "service_name", "sample_ratio", "headers")
_OTLP_URL = re.compile(r"^https?://(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::\d{1,5})?/?$")
# gRPC metadata keys: lowercase, and not the binary ("-bin") kind.
_METADATA_KEY = re.compile(r"^[a-z0-9_.-]+$")


def parse_tracing(raw: Any) -> Tracing:
    raw = _section(raw, "tracing", _TRACING_KEYS)
    values: dict[str, Any] = {}
    if raw.get("otlp_endpoint") is not None:
        url = _str(raw["otlp_endpoint"], "tracing.otlp_endpoint")
        if not _OTLP_URL.match(url):
            raise ConfigError(
                "tracing.otlp_endpoint",
                f"must be http://host:port or https://host:port (an OTLP/gRPC receiver), got {url!r}",
            )
        port = url.rstrip("/").rsplit(":", 1)[-1]
        if port.isdigit() and not 1 <= int(port) <= 65535:
            raise ConfigError("tracing.otlp_endpoint", f"port must be 1..65535, got {port}")
        values["otlp_endpoint"] = url.rstrip("/")
    if raw.get("service_name") is not None:
        values["service_name"] = _str(raw["service_name"], "tracing.service_name")
    if raw.get("sample_ratio") is not None:
        values["sample_ratio"] = _bounded_float(raw["sample_ratio"], "tracing.sample_ratio")
    headers = raw.get("headers")
    if headers is not None:
        if not isinstance(headers, Mapping):
            raise ConfigError("tracing.headers", "must be a mapping of header name to value")
        parsed: dict[str, str] = {}
        for name, value in headers.items():
            where = f"tracing.headers.{name}"
            if not isinstance(name, str) or not _METADATA_KEY.match(name) or name.endswith("-bin"):
                raise ConfigError(where, "must be a lowercase header name (letters, digits, _ . -)")
            if not isinstance(value, str):
                raise ConfigError(where, f"must be a string, got {value!r}")
            expanded = _env_expand(_str(value, where), where)
            if not all(" " <= c <= "~" for c in expanded):
                raise ConfigError(where, "must be printable ASCII (a gRPC metadata value)")
            parsed[name] = expanded
        values["headers"] = parsed
    return Tracing(**values)


DISCOVERY_KINDS = ("dns", "kubernetes", "inferencePool")
#: Which ``discovery`` fields each kind takes (``labels`` is for every kind).
DISCOVERY_FIELDS: dict[str, tuple[str, ...]] = {
    "dns": ("name", "port", "interval", "nameservers"),
    "kubernetes": ("namespace", "service", "port", "kubeconfig"),
    "inferencePool": ("namespace", "pool", "kubeconfig"),
}
_DISCOVERY_REQUIRED: dict[str, tuple[str, ...]] = {
    "dns": ("name", "port"),
    "kubernetes": ("service",),
    "inferencePool": ("pool",),
}
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class Discovery:
    """``discovery``: where the pool's endpoints come from instead of a static list."""

    kind: str
    # dns: the name re-resolved every `interval` ms (A and AAAA), the port every address gets,
    # and the servers asked ("ip" or "ip:port"; none: the system's resolv.conf).
    name: str | None = None
    port: int | str | None = None
    interval: int = 5000
    nameservers: tuple[str, ...] = ()
    # kubernetes / inferencePool: namespace (default: the pod's own, else "default").
    namespace: str | None = None
    service: str | None = None
    pool: str | None = None
    # Default: in-cluster service account, then $KUBECONFIG, then ~/.kube/config.
    kubeconfig: str | None = None
    # Labels every discovered endpoint gets (the pod's own labels win for inferencePool).
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    grpc_listen: str = "0.0.0.0:9002"
    grpc_tls: GrpcTls | None = None
    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS of every gRPC connection, and open ext_proc streams
    # across all connections (beyond it a new stream gets RESOURCE_EXHAUSTED).
    grpc_max_streams_per_connection: int = 1000
    grpc_max_streams: int = 10_000
    admin_listen: str = "127.0.0.1:9090"
    pool: str = "default"
    endpoints: tuple[Endpoint, ...] = ()
    endpoints_file: str | None = None
    discovery: Discovery | None = None
    lb_type: str = "endpoint"
    lb_policy: str = "prefix_cache"
    lb_config: LbConfig = field(default_factory=LbConfig)
    log_level: str = "info"
    # Observability (docs/observability.md): log line format; one info line per request; gRPC
    # and other libraries' logs (off: WARNING and up only); the opt-in response header carrying
    # the decision record ("": off); decisions kept for /debug/decisions and /status.
    log_format: str = "text"
    log_requests: bool = False
    log_libraries: bool = False
    decision_header: str = ""
    recent_decisions: int = DEFAULT_RECENT_DECISIONS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    health_check_interval: int = 5000
    health_check_timeout: int = 1000
    health_check_path: str = "/health"
    passive_probe_after: int = 10_000
    drain_grace: int = 5
    drain_timeout: int = DEFAULT_REQUEST_TIMEOUT_S
    # Affinity keys, most binding first (see docs/configuration.md); "" turns the header off.
    affinity_keys: tuple[str, ...] = AFFINITY_KEYS
    session_header: str = "x-session-id"
    # Multi-model pools: ms between GET /v1/models of each endpoint (0: off; label `models` wins),
    # and what a request for a model no endpoint serves gets.
    models_refresh: int = 30_000
    unknown_model: str = "reject"
    # Responses API: which endpoint holds a stored response, kept this many seconds / entries.
    response_ttl: int = 86_400
    response_store_size: int = 100_000
    prediction: Prediction = field(default_factory=Prediction)
    tracing: Tracing = field(default_factory=Tracing)
    # Set while loading: Higress fields that were accepted and ignored (warned once at start).
    ignored_fields: tuple[str, ...] = ()


# --- value checkers -------------------------------------------------------------------------


def _int(value: Any, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be <= {maximum}, got {value}")
    return value


def _bounded_int(value: Any, name: str, key: str | None = None) -> int:
    """An integer within ``INT_BOUNDS[key]`` (``key`` defaults to ``name``)."""
    low, high = INT_BOUNDS[key or name]
    return _int(value, name, low, high)


def _bounded_float(value: Any, name: str, key: str | None = None) -> float:
    low, high = FLOAT_BOUNDS[key or name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    if not value >= low:  # also refuses nan
        raise ConfigError(name, f"must be >= {low}, got {value}")
    if not value <= high:  # also refuses inf
        raise ConfigError(name, f"must be <= {high:g}, got {value}")
    return float(value)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_STRING:
        raise ConfigError(name, f"must be at most {MAX_STRING} characters, got {len(value)}")
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


def parse_listen(value: Any, name: str) -> tuple[str, int]:
    """``host:port`` for a listener (a hostname such as ``localhost`` is allowed)."""
    text = _str(value, name)
    m = _HOST_PORT.match(text)
    if not m:
        raise ConfigError(name, f"must be host:port, got {text!r}")
    port = int(m["port"])
    if not 0 <= port <= 65535:
        raise ConfigError(name, f"port must be 0..65535, got {port}")
    return (m["v6"] or m["host"]), port


def parse_endpoint_address(value: Any, name: str) -> str:
    """An endpoint is an IP literal and port: Envoy's ORIGINAL_DST routing needs an IP."""
    text = _str(value, name).strip()
    m = _HOST_PORT.match(text)
    if not m:
        raise ConfigError(name, f"must be ip:port (or [ipv6]:port), got {text!r}")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(name, f"port must be 1..65535, got {port}")
    host = m["v6"] or m["host"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            name, f"{host!r} is not an IP address (Envoy routes picks to ip:port; resolve names first)"
        ) from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_endpoint(value: Any, name: str) -> Endpoint:
    if isinstance(value, str):
        return Endpoint(parse_endpoint_address(value, name))
    if isinstance(value, Mapping):
        unknown = set(value) - {"address", "labels"}
        if unknown:
            raise ConfigError(f"{name}.{sorted(unknown)[0]}", "unknown key (allowed: address, labels)")
        if "address" not in value:
            raise ConfigError(f"{name}.address", "is required")
        return Endpoint(
            parse_endpoint_address(value["address"], f"{name}.address"),
            parse_labels(value.get("labels"), f"{name}.labels"),
        )
    raise ConfigError(name, f'must be "ip:port" or {{address: ip:port, labels: {{...}}}}, got {value!r}')


def parse_labels(value: Any, name: str) -> dict[str, str]:
    """Endpoint labels: a mapping of strings to scalars, kept as strings. Only an absent (null)
    value means none: ``[]``, ``""`` or ``false`` is a mistake, not an empty mapping."""
    labels = {} if value is None else value
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in labels.items()
    ):
        raise ConfigError(name, "must be a mapping of strings to scalars")
    return {k: str(v) for k, v in labels.items()}


def parse_endpoints(value: Any, name: str) -> tuple[Endpoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(name, "must be a list")
    out: list[Endpoint] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        ep = parse_endpoint(item, f"{name}[{i}]")
        if ep.address in seen:
            raise ConfigError(f"{name}[{i}]", f"duplicate endpoint {ep.address}")
        seen.add(ep.address)
        out.append(ep)
    return tuple(out)


def load_yaml(text: str, field_name: str, path: str) -> Any:
    """Parses YAML, refusing a key given twice in one mapping (PyYAML would silently keep the
    last, so ``endpoints:`` twice would drop the first list)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(field_name, f"{path} is not valid YAML: {_one_line(e)}") from None
    if node is None:
        return None
    _refuse_duplicate_keys(node, "")
    try:
        return yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as e:  # pragma: no cover - compose already parsed it
        raise ConfigError(field_name, f"{path} is not valid YAML: {_one_line(e)}") from None


def _refuse_duplicate_keys(node: yaml.Node, where: str) -> None:
    # Iterative: a deeply nested document must not exhaust the stack.
    stack = [(node, where)]
    seen_nodes: set[int] = set()
    while stack:
        current, at = stack.pop()
        if id(current) in seen_nodes:  # an alias: already checked where it was defined
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in current.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                name = f"{at}.{key}" if at else key
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(name, f"duplicate key (lines {lines[key]} and {line})")
                lines[key] = line
                stack.append((value_node, name))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(current.value))


def load_endpoints_file(path: str) -> tuple[Endpoint, ...]:
    """An endpoints file holds the same list as ``endpoints``, bare or under an ``endpoints`` key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("endpoints_file", f"cannot read {path}: {_one_line(e)}") from None
    data = load_yaml(text, "endpoints_file", path)
    if isinstance(data, Mapping):
        unknown = set(data) - {"endpoints"}
        if unknown:
            raise ConfigError(f"endpoints_file.{sorted(unknown)[0]}", "unknown key (allowed: endpoints)")
        data = data.get("endpoints")
    return parse_endpoints(data if data is not None else [], "endpoints_file")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# --- lb_config --------------------------------------------------------------------------------

_LB_FIELDS = {f.name: f for f in dataclasses.fields(LbConfig)}


def _env_expand(value: str, name: str) -> str:
    """``${NAME}`` takes the value from the environment; a missing variable is an error."""
    m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)
    if not m:
        return value
    env = os.environ.get(m[1])
    if env is None:
        raise ConfigError(name, f"environment variable {m[1]} is not set")
    return env


def parse_lb_config(raw: Any, policy: str) -> tuple[LbConfig, tuple[str, ...]]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("lb_config", "must be a mapping")
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        name = f"lb_config.{key}"
        if key in IGNORED_HIGRESS_FIELDS:
            ignored.append(str(key))
            continue
        if key in HIGRESS_METRICS_FIELDS:
            raise ConfigError(
                name, "belongs to Higress's endpoint_metrics policy; use lb_policy: least_busy instead"
            )
        if key not in _LB_FIELDS:
            raise ConfigError(name, f"unknown key (known: {', '.join(sorted(_LB_FIELDS))})")
        if value is None:
            continue  # an empty value means the default
        values[key] = _lb_value(str(key), value, name)
    if "serviceFQDN" in values and "servicePort" not in raw:
        values.setdefault("servicePort", 6379)
    if policy != "least_busy":
        for key in LEAST_BUSY_FIELDS:
            if key in values:
                raise ConfigError(f"lb_config.{key}", "only applies to lb_policy: least_busy")
    if values.get("maxRequestCount") and policy != "global_least_request":
        raise ConfigError("lb_config.maxRequestCount", "only applies to lb_policy: global_least_request")
    return LbConfig(**values), tuple(ignored)


def _lb_value(key: str, value: Any, name: str) -> Any:
    if name in INT_BOUNDS:
        number = _bounded_int(value, name)
        # Higress treats 0 as "use the default" for these two.
        if key == "timeout":
            return number or LbConfig.timeout
        if key == "redisKeyTTL":  # seconds (the Higress code's unit, whatever its README says)
            return number or LbConfig.redisKeyTTL
        return number
    if name in FLOAT_BOUNDS:
        return _bounded_float(value, name)
    if key in ("serviceFQDN", "username", "tlsCAFile"):
        return _str(value, name)
    if key == "metricsPath":
        return _url_path(value, name)
    if key == "engine":
        return _choice(value, name, ENGINES)
    if key == "tls":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if key == "password":
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return _env_expand(_str(value, name), name)
    if key == "criticalModels":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(name, "must be a list of model names")
        return tuple(_str(v, f"{name}[{i}]") for i, v in enumerate(value))
    raise AssertionError(key)  # pragma: no cover - every field is handled above


_URL_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")


def _url_path(value: Any, name: str) -> str:
    """An absolute URL path of printable ASCII (what goes into an HTTP request line)."""
    path = _str(value, name)
    if not _URL_PATH.match(path):
        raise ConfigError(
            name, f"must be a URL path starting with '/' (printable ASCII, no spaces), got {path!r}"
        )
    return path


# --- grpc_tls ----------------------------------------------------------------------------------

_GRPC_TLS_KEYS = ("cert", "key", "client_ca")


def parse_grpc_tls(raw: Any) -> GrpcTls | None:
    """Paths only: whether the files hold usable PEM is checked when serving (``llmlb.tls``)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("grpc_tls", "must be a mapping with cert, key and optionally client_ca")
    for key in raw:
        if key not in _GRPC_TLS_KEYS:
            raise ConfigError(f"grpc_tls.{key}", f"unknown key (allowed: {', '.join(_GRPC_TLS_KEYS)})")
    for key in ("cert", "key"):
        if raw.get(key) is None:
            raise ConfigError(f"grpc_tls.{key}", "is required (a PEM file path)")
    client_ca = raw.get("client_ca")
    return GrpcTls(
        cert=_str(raw["cert"], "grpc_tls.cert"),
        key=_str(raw["key"], "grpc_tls.key"),
        client_ca=None if client_ca is None else _str(client_ca, "grpc_tls.client_ca"),
    )


# --- discovery ---------------------------------------------------------------------------------


def parse_discovery(raw: Any) -> Discovery | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("discovery", f"must be a mapping with a kind ({', '.join(DISCOVERY_KINDS)})")
    kind = _choice(raw.get("kind"), "discovery.kind", DISCOVERY_KINDS)
    allowed = ("kind", "labels", *DISCOVERY_FIELDS[kind])
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"discovery.{key}", f"unknown key for kind {kind} (allowed: {', '.join(allowed)})"
            )
    for key in _DISCOVERY_REQUIRED[kind]:
        if raw.get(key) is None:
            raise ConfigError(f"discovery.{key}", f"is required for kind {kind}")
    values: dict[str, Any] = {"kind": kind}
    for key in ("name", "service", "pool", "namespace", "kubeconfig"):
        if raw.get(key) is not None:
            values[key] = _str(raw[key], f"discovery.{key}")
    for key in ("service", "pool", "namespace"):
        if key in values and not _K8S_NAME.match(values[key]):
            raise ConfigError(f"discovery.{key}", f"must be a Kubernetes object name, got {values[key]!r}")
    if "name" in values:
        name = values["name"].rstrip(".")
        if len(name) > 253 or not all(re.fullmatch(r"[A-Za-z0-9_-]{1,63}", p) for p in name.split(".")):
            raise ConfigError("discovery.name", f"must be a DNS name, got {values['name']!r}")
    if raw.get("port") is not None:
        values["port"] = _discovery_port(raw["port"], kind)
    if raw.get("interval") is not None:
        values["interval"] = _bounded_int(raw["interval"], "discovery.interval")
    if raw.get("nameservers") is not None:
        servers = raw["nameservers"]
        if not isinstance(servers, list) or not servers:
            raise ConfigError("discovery.nameservers", 'must be a list of "ip" or "ip:port"')
        values["nameservers"] = tuple(
            _nameserver(v, f"discovery.nameservers[{i}]") for i, v in enumerate(servers)
        )
    values["labels"] = parse_labels(raw.get("labels"), "discovery.labels")
    return Discovery(**values)


def _discovery_port(value: Any, kind: str) -> int | str:
    """A port number, or for ``kubernetes`` also the name of the EndpointSlice port."""
    if isinstance(value, str) and kind == "kubernetes" and not value.isdigit():
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?", value):
            raise ConfigError("discovery.port", f"must be a port number or a port name, got {value!r}")
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    what = "a port number or a port name" if kind == "kubernetes" else "a port number"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError("discovery.port", f"must be {what} (1..65535), got {value!r}")
    return value


def _nameserver(value: Any, name: str) -> str:
    text = _str(value, name)
    host, port = (text, "53")
    m = _HOST_PORT.match(text)
    if m:
        host, port = m["v6"] or m["host"], m["port"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(name, f'must be "ip" or "ip:port", got {text!r}') from None
    if not 1 <= int(port) <= 65535:
        raise ConfigError(name, f"port must be 1..65535, got {port}")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# --- the whole file ---------------------------------------------------------------------------

_TOP_FIELDS = {f.name for f in dataclasses.fields(Config)} - {"ignored_fields"}
_TOP_INTS = tuple(k for k in INT_BOUNDS if "." not in k)


def parse_config(raw: Any) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("(top level)", "the config must be a YAML mapping")
    for key in raw:
        if key not in _TOP_FIELDS:
            raise ConfigError(str(key), f"unknown key (known: {', '.join(sorted(_TOP_FIELDS))})")
    values: dict[str, Any] = {}
    if "lb_type" in raw and raw["lb_type"] != "endpoint":
        raise ConfigError(
            "lb_type", f"only 'endpoint' is supported (llmlb picks endpoints), got {raw['lb_type']!r}"
        )
    policy = raw.get("lb_policy", "prefix_cache")
    if policy in HIGRESS_METRICS_POLICIES:
        raise ConfigError(
            "lb_policy",
            f"{policy!r} (Higress endpoint_metrics) is not supported; use least_busy, which picks "
            "from the same engine metrics with staleness handling",
        )
    values["lb_policy"] = _choice(policy, "lb_policy", POLICIES)
    values["lb_config"], values["ignored_fields"] = parse_lb_config(raw.get("lb_config"), policy)
    for key in ("grpc_listen", "admin_listen"):
        if key in raw:
            parse_listen(raw[key], key)
            values[key] = raw[key]
    values["grpc_tls"] = parse_grpc_tls(raw.get("grpc_tls"))
    if "pool" in raw:
        pool = _str(raw["pool"], "pool")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", pool):
            raise ConfigError("pool", f"may hold only letters, digits, '_', '.', '-'; got {pool!r}")
        values["pool"] = pool
    values["endpoints"] = parse_endpoints(raw.get("endpoints"), "endpoints")
    if raw.get("endpoints_file") is not None:
        values["endpoints_file"] = _str(raw["endpoints_file"], "endpoints_file")
    values["discovery"] = parse_discovery(raw.get("discovery"))
    if values["discovery"] is not None:
        for key in ("endpoints", "endpoints_file"):
            if values.get(key):
                raise ConfigError(key, "cannot be combined with discovery (one source of endpoints)")
    if "log_level" in raw:
        values["log_level"] = _choice(str(raw["log_level"]).lower(), "log_level", LOG_LEVELS)
    if "log_format" in raw:
        values["log_format"] = _choice(str(raw["log_format"]).lower(), "log_format", LOG_FORMATS)
    for key in ("log_requests", "log_libraries"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ConfigError(key, f"must be true or false, got {raw[key]!r}")
            values[key] = raw[key]
    if raw.get("decision_header") not in (None, ""):
        header = _str(raw["decision_header"], "decision_header").lower()
        if header and not _HEADER_NAME.match(header):
            raise ConfigError("decision_header", f"must be an HTTP header name, got {header!r}")
        values["decision_header"] = header
    for key in _TOP_INTS:
        if key in raw:
            values[key] = _bounded_int(raw[key], key)
    if "affinity_keys" in raw:
        keys = raw["affinity_keys"]
        if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
            raise ConfigError("affinity_keys", f"must be a list of: {', '.join(AFFINITY_KEYS)}")
        for i, key in enumerate(keys):
            _choice(key, f"affinity_keys[{i}]", AFFINITY_KEYS)
        if len(set(keys)) != len(keys):
            raise ConfigError("affinity_keys", "lists a key twice")
        values["affinity_keys"] = tuple(keys)
    if "session_header" in raw:
        header = (
            "" if raw["session_header"] is None else _str(raw["session_header"], "session_header").lower()
        )
        if header and not _HEADER_NAME.match(header):
            raise ConfigError("session_header", f"must be an HTTP header name, got {header!r}")
        values["session_header"] = header
    if "unknown_model" in raw:
        values["unknown_model"] = _choice(raw["unknown_model"], "unknown_model", UNKNOWN_MODEL_CHOICES)
    if "health_check_path" in raw:
        # An empty path (or null) means TCP connect probes only.
        path = raw["health_check_path"]
        values["health_check_path"] = "" if path in (None, "") else _url_path(path, "health_check_path")
    values["prediction"] = parse_prediction(raw.get("prediction"))
    values["tracing"] = parse_tracing(raw.get("tracing"))
    return Config(**values)


def load_config(path: str) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("--config", f"cannot read {path}: {_one_line(e)}") from None
    config = parse_config(load_yaml(text, "--config", path))
    if config.endpoints_file:
        # Relative endpoint files are relative to the config file, not the working directory.
        resolved = Path(path).parent / config.endpoints_file
        config = dataclasses.replace(config, endpoints_file=str(resolved))
    if config.discovery is not None and config.discovery.kubeconfig:
        resolved = Path(path).parent / Path(config.discovery.kubeconfig).expanduser()
        config = dataclasses.replace(
            config, discovery=dataclasses.replace(config.discovery, kubeconfig=str(resolved))
        )
    if config.grpc_tls is not None:
        tls = config.grpc_tls
        here = Path(path).parent
        config = dataclasses.replace(
            config,
            grpc_tls=GrpcTls(
                cert=str(here / tls.cert),
                key=str(here / tls.key),
                client_ca=None if tls.client_ca is None else str(here / tls.client_ca),
            ),
        )
    return config


def with_overrides(
    config: Config,
    *,
    endpoints: str | None = None,
    policy: str | None = None,
    grpc_listen: str | None = None,
    admin_listen: str | None = None,
    log_level: str | None = None,
) -> Config:
    """Applies command-line flags over the file."""
    changes: dict[str, Any] = {}
    if endpoints is not None:
        items = [e for e in endpoints.split(",") if e.strip()]
        changes["endpoints"] = parse_endpoints(items, "--endpoints")
        # The flag replaces the file's discovery (endpoints_file still adds to it, as before).
        changes["discovery"] = None
    if policy is not None:
        changes["lb_policy"] = _choice(policy, "--policy", POLICIES)
        lb = dataclasses.asdict(config.lb_config)
        raw_lb = {k: v for k, v in lb.items() if v != getattr(LbConfig(), k)}
        parse_lb_config(raw_lb, policy)  # re-check policy-specific fields under the new policy
    if grpc_listen is not None:
        parse_listen(grpc_listen, "--grpc-listen")
        changes["grpc_listen"] = grpc_listen
    if admin_listen is not None:
        parse_listen(admin_listen, "--admin-listen")
        changes["admin_listen"] = admin_listen
    if log_level is not None:
        changes["log_level"] = _choice(log_level.lower(), "--log-level", LOG_LEVELS)
    return dataclasses.replace(config, **changes)


REDACTED = "<redacted>"


def effective_dict(config: Config) -> dict[str, Any]:
    """The config with every default filled in, secrets redacted: for check-config and /debug."""
    lb = dataclasses.asdict(config.lb_config)
    if config.lb_policy != "least_busy":  # shown only where they mean something
        for key in LEAST_BUSY_FIELDS:
            lb.pop(key, None)
    if lb.get("password") is not None:
        lb["password"] = REDACTED
    if lb.get("criticalModels") is not None:
        lb["criticalModels"] = list(lb["criticalModels"])
    return {
        "grpc_listen": config.grpc_listen,
        "grpc_tls": None if config.grpc_tls is None else dataclasses.asdict(config.grpc_tls),
        "grpc_max_streams_per_connection": config.grpc_max_streams_per_connection,
        "grpc_max_streams": config.grpc_max_streams,
        "admin_listen": config.admin_listen,
        "pool": config.pool,
        "endpoints": [
            {"address": e.address, "labels": dict(e.labels)} if e.labels else e.address
            for e in config.endpoints
        ],
        "endpoints_file": config.endpoints_file,
        "discovery": _discovery_dict(config.discovery),
        "lb_type": config.lb_type,
        "lb_policy": config.lb_policy,
        "lb_config": lb,
        "log_level": config.log_level,
        "log_format": config.log_format,
        "log_requests": config.log_requests,
        "log_libraries": config.log_libraries,
        "decision_header": config.decision_header,
        "recent_decisions": config.recent_decisions,
        "max_body_bytes": config.max_body_bytes,
        "health_check_interval": config.health_check_interval,
        "health_check_timeout": config.health_check_timeout,
        "health_check_path": config.health_check_path,
        "passive_probe_after": config.passive_probe_after,
        "drain_grace": config.drain_grace,
        "drain_timeout": config.drain_timeout,
        "affinity_keys": list(config.affinity_keys),
        "session_header": config.session_header,
        "models_refresh": config.models_refresh,
        "unknown_model": config.unknown_model,
        "response_ttl": config.response_ttl,
        "response_store_size": config.response_store_size,
        "prediction": {
            **dataclasses.asdict(config.prediction),
            "enabled": PREDICTION_AUTO if config.prediction.enabled is None else config.prediction.enabled,
        },
        "tracing": {
            "otlp_endpoint": config.tracing.otlp_endpoint,
            "service_name": config.tracing.service_name,
            "sample_ratio": config.tracing.sample_ratio,
            # Header values are credentials more often than not.
            "headers": {name: REDACTED for name in config.tracing.headers},
        },
    }


def _discovery_dict(discovery: Discovery | None) -> dict[str, Any] | None:
    """Only the fields the kind takes, so the effective view shows what applies."""
    if discovery is None:
        return None
    view = dataclasses.asdict(discovery)
    out: dict[str, Any] = {"kind": discovery.kind}
    for key in DISCOVERY_FIELDS[discovery.kind]:
        out[key] = list(view[key]) if key == "nameservers" else view[key]
    out["labels"] = dict(discovery.labels)
    return out


def effective_yaml(config: Config) -> str:
    return yaml.safe_dump(effective_dict(config), sort_keys=False, default_flow_style=False)
