"""``discovery`` in the config file, through the public loaders (``load_config``/``parse_config``,
``with_overrides``, ``llmlb check-config`` and ``serve``): what each kind requires and accepts, and
one clear error, naming the field, for each mistake (docs/configuration.md "## Discovery")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmlb.config import (
    DISCOVERY_FIELDS,
    DISCOVERY_KINDS,
    INT_BOUNDS,
    ConfigError,
    Discovery,
    effective_dict,
    load_config,
    parse_config,
    with_overrides,
)

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support.procs import HOST, free_ports, run_llmlb  # noqa: E402

# The smallest valid block of each kind.
MINIMAL: dict[str, dict[str, Any]] = {
    "dns": {"kind": "dns", "name": "vllm-headless.models.svc.cluster.local", "port": 8000},
    "kubernetes": {"kind": "kubernetes", "service": "vllm"},
    "inferencePool": {"kind": "inferencePool", "pool": "vllm-pool"},
}
# A valid value for every discovery field (for "the field belongs to another kind" errors).
SAMPLE_VALUES: dict[str, Any] = {
    "name": "models.example",
    "port": 8000,
    "interval": 1000,
    "nameservers": ["10.0.0.10"],
    "namespace": "models",
    "service": "vllm",
    "pool": "vllm-pool",
    "kubeconfig": "kubeconfig.yaml",
}


def discovery_of(block: Any, **top: Any) -> Discovery | None:
    return parse_config({"discovery": block, **top}).discovery


def error_of(block: Any, **top: Any) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config({"discovery": block, **top})
    return err.value


def with_kind(kind: str, **fields: Any) -> dict[str, Any]:
    return {**MINIMAL[kind], **fields}


# --- what each kind requires and defaults to --------------------------------------------------------


def test_the_minimal_block_of_each_kind_and_its_defaults() -> None:
    dns = discovery_of(MINIMAL["dns"])
    assert dns == Discovery(kind="dns", name="vllm-headless.models.svc.cluster.local", port=8000)
    assert dns.interval == 5000  # documented default
    assert dns.nameservers == ()  # the system's resolv.conf
    assert dns.labels == {}
    kube = discovery_of(MINIMAL["kubernetes"])
    assert kube == Discovery(kind="kubernetes", service="vllm")
    assert kube.port is None  # the slice's only port
    assert kube.namespace is None  # the pod's own, else default
    assert kube.kubeconfig is None
    pool = discovery_of(MINIMAL["inferencePool"])
    assert pool == Discovery(kind="inferencePool", pool="vllm-pool")


def test_no_discovery_block_or_null_means_none() -> None:
    assert parse_config({}).discovery is None
    assert parse_config({"discovery": None}).discovery is None


@pytest.mark.parametrize(
    ("kind", "field"),
    [("dns", "name"), ("dns", "port"), ("kubernetes", "service"), ("inferencePool", "pool")],
)
def test_each_kind_requires_its_fields(kind: str, field: str) -> None:
    block = dict(MINIMAL[kind])
    del block[field]
    err = error_of(block)
    assert err.field == f"discovery.{field}"
    assert err.problem == f"is required for kind {kind}"
    # An explicit null is the same as leaving it out.
    assert error_of({**block, field: None}).problem == f"is required for kind {kind}"


@pytest.mark.parametrize(
    "block", [{}, {"kind": None}, {"kind": "consul"}, {"kind": "DNS", "name": "a", "port": 1}]
)
def test_the_kind_must_be_one_of_the_three(block: dict[str, Any]) -> None:
    err = error_of(block)
    assert err.field == "discovery.kind"
    assert "must be one of dns, kubernetes, inferencePool" in err.problem


@pytest.mark.parametrize("block", ["dns", ["dns"], 5, True])
def test_the_block_must_be_a_mapping(block: Any) -> None:
    err = error_of(block)
    assert err.field == "discovery"
    assert "must be a mapping with a kind" in err.problem


# --- unknown fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (kind, field)
        for kind in DISCOVERY_KINDS
        for field in sorted(
            {f for fields in DISCOVERY_FIELDS.values() for f in fields} - set(DISCOVERY_FIELDS[kind])
        )
    ],
)
def test_a_field_of_another_kind_is_refused_by_name(kind: str, field: str) -> None:
    err = error_of(with_kind(kind, **{field: SAMPLE_VALUES[field]}))
    assert err.field == f"discovery.{field}"
    allowed = ", ".join(("kind", "labels", *DISCOVERY_FIELDS[kind]))
    assert err.problem == f"unknown key for kind {kind} (allowed: {allowed})"


@pytest.mark.parametrize("kind", DISCOVERY_KINDS)
def test_an_unknown_field_is_refused_by_name(kind: str) -> None:
    err = error_of(with_kind(kind, refresh=5))
    assert str(err).startswith("discovery.refresh: unknown key for kind")


@pytest.mark.parametrize("kind", DISCOVERY_KINDS)
def test_every_field_of_a_kind_is_accepted_together(kind: str) -> None:
    fields = {f: SAMPLE_VALUES[f] for f in DISCOVERY_FIELDS[kind]}
    fields.update(labels={"engine": "vllm"})
    found = discovery_of({**fields, "kind": kind})
    assert found is not None
    for field in DISCOVERY_FIELDS[kind]:
        value = getattr(found, field)
        assert value is not None, field
    assert found.labels == {"engine": "vllm"}


# --- wrong types and values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field", "value", "problem"),
    [
        ("dns", "name", 123, "must be a non-empty string, got 123"),
        ("dns", "name", "", "must be a non-empty string, got ''"),
        ("dns", "name", ["a"], "must be a non-empty string"),
        ("dns", "name", "has space.example", "must be a DNS name"),
        ("dns", "name", "a..b", "must be a DNS name"),
        ("dns", "name", "a" * 64 + ".example", "must be a DNS name"),
        ("dns", "name", ".".join(["abcdefghi"] * 26), "must be a DNS name"),  # 259 > 253 characters
        ("dns", "name", "http://vllm.example", "must be a DNS name"),
        ("kubernetes", "service", "VLLM", "must be a Kubernetes object name"),
        ("kubernetes", "service", "vllm_1", "must be a Kubernetes object name"),
        ("kubernetes", "service", "-vllm", "must be a Kubernetes object name"),
        ("kubernetes", "namespace", "Models", "must be a Kubernetes object name"),
        ("kubernetes", "namespace", 7, "must be a non-empty string"),
        ("inferencePool", "pool", "pool/x", "must be a Kubernetes object name"),
        ("inferencePool", "namespace", "", "must be a non-empty string"),
        ("kubernetes", "kubeconfig", 1, "must be a non-empty string"),
        ("inferencePool", "kubeconfig", "", "must be a non-empty string"),
        ("dns", "interval", "5s", "must be an integer, got '5s'"),
        ("dns", "interval", 1.5, "must be an integer"),
        ("dns", "interval", True, "must be an integer, got True"),
    ],
)
def test_wrong_types_and_values_name_the_field(kind: str, field: str, value: Any, problem: str) -> None:
    err = error_of(with_kind(kind, **{field: value}))
    assert err.field == f"discovery.{field}"
    assert problem in err.problem


def test_names_that_are_dns_names_are_accepted() -> None:
    for name in (
        "vllm",
        "vllm-headless.models.svc.cluster.local.",
        "_http._tcp.vllm.example",
        "a" * 63 + ".x",
    ):
        found = discovery_of(with_kind("dns", name=name))
        assert found is not None
        assert found.name == name


def test_interval_bounds() -> None:
    low, high = INT_BOUNDS["discovery.interval"]
    assert (low, high) == (100, 3_600_000)  # what docs/configuration.md says
    for ok in (low, 5000, high):
        found = discovery_of(with_kind("dns", interval=ok))
        assert found is not None
        assert found.interval == ok
    for bad, problem in (
        (low - 1, f"must be >= {low}, got 99"),
        (high + 1, f"must be <= {high}"),
        (0, ">="),
        (-5, ">="),
    ):
        err = error_of(with_kind("dns", interval=bad))
        assert err.field == "discovery.interval"
        assert problem in err.problem


# --- ports --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(8000, 8000), ("8000", 8000), (1, 1), (65535, 65535)])
def test_dns_port_is_a_number(value: Any, expected: int) -> None:
    found = discovery_of(with_kind("dns", port=value))
    assert found is not None
    assert found.port == expected


@pytest.mark.parametrize("value", ["http", 0, 65536, -1, "0", 8000.0, True, "80 ", [80]])
def test_dns_port_must_be_a_number_in_range(value: Any) -> None:
    err = error_of(with_kind("dns", port=value))
    assert err.field == "discovery.port"
    assert err.problem.startswith("must be a port number (1..65535), got ")
    assert "port name" not in err.problem  # dns has no port names


@pytest.mark.parametrize(
    ("value", "expected"), [("http", "http"), ("grpc-metrics", "grpc-metrics"), (8000, 8000), ("8000", 8000)]
)
def test_kubernetes_port_is_a_name_or_a_number(value: Any, expected: int | str) -> None:
    found = discovery_of(with_kind("kubernetes", port=value))
    assert found is not None
    assert found.port == expected


@pytest.mark.parametrize(
    "value", ["HTTP", "-http", "http-", "a" * 16, "http_metrics", 0, 70000, True, 8000.5]
)
def test_kubernetes_port_must_be_a_port_name_or_number(value: Any) -> None:
    err = error_of(with_kind("kubernetes", port=value))
    assert err.field == "discovery.port"
    assert "must be a port number or a port name" in err.problem


def test_inference_pool_takes_its_ports_from_the_pool() -> None:
    err = error_of(with_kind("inferencePool", port=8000))
    assert err.field == "discovery.port"
    assert "unknown key for kind inferencePool" in err.problem


# --- nameservers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("10.0.0.10", "10.0.0.10:53"),
        ("10.0.0.10:5353", "10.0.0.10:5353"),
        ("::1", "[::1]:53"),
        ("[::1]:5353", "[::1]:5353"),
        ("[fd00:0:0::10]:53", "[fd00::10]:53"),
        ("fd00::10", "[fd00::10]:53"),
        ("::1:53", "[::1:53]:53"),  # an IPv6 address, not ::1 port 53 (that is "[::1]:53")
    ],
)
def test_nameservers_are_ip_or_ip_port(given: str, normalised: str) -> None:
    found = discovery_of(with_kind("dns", nameservers=[given, "127.0.0.1"]))
    assert found is not None
    assert found.nameservers == (normalised, "127.0.0.1:53")


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        ("10.0.0.10", "discovery.nameservers", 'must be a list of "ip" or "ip:port"'),
        ([], "discovery.nameservers", 'must be a list of "ip" or "ip:port"'),
        ({"a": 1}, "discovery.nameservers", 'must be a list of "ip" or "ip:port"'),
        (["dns.example"], "discovery.nameservers[0]", 'must be "ip" or "ip:port"'),
        (["10.0.0.1", "localhost:53"], "discovery.nameservers[1]", 'must be "ip" or "ip:port"'),
        (["10.0.0.10:0"], "discovery.nameservers[0]", "port must be 1..65535, got 0"),
        (["10.0.0.10:65536"], "discovery.nameservers[0]", "port must be 1..65535, got 65536"),
        ([53], "discovery.nameservers[0]", "must be a non-empty string"),
        ([""], "discovery.nameservers[0]", "must be a non-empty string"),
    ],
)
def test_bad_nameservers_name_the_entry(value: Any, field: str, problem: str) -> None:
    err = error_of(with_kind("dns", nameservers=value))
    assert err.field == field
    assert problem in err.problem


# --- labels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISCOVERY_KINDS)
def test_labels_are_strings_for_every_kind(kind: str) -> None:
    found = discovery_of(with_kind(kind, labels={"engine": "vllm", "gpus": 8, "spot": True, "ratio": 0.5}))
    assert found is not None
    assert found.labels == {"engine": "vllm", "gpus": "8", "spot": "True", "ratio": "0.5"}
    nothing: tuple[dict[str, str] | None, ...] = (None, {})
    for none in nothing:
        empty = discovery_of(with_kind(kind, labels=none))
        assert empty is not None
        assert empty.labels == {}


@pytest.mark.parametrize(
    "labels",
    [
        ["engine"],
        [],
        "",
        False,
        0,
        "engine=vllm",
        {"engine": None},
        {"engine": ["a"]},
        {1: "a"},
        {"a": {"b": 1}},
    ],
)
def test_labels_must_be_a_mapping_of_strings_to_scalars(labels: Any) -> None:
    err = error_of(with_kind("dns", labels=labels))
    assert err.field == "discovery.labels"
    assert err.problem == "must be a mapping of strings to scalars"


# --- one source of endpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISCOVERY_KINDS)
def test_discovery_excludes_static_endpoints_and_an_endpoints_file(kind: str) -> None:
    err = error_of(MINIMAL[kind], endpoints=["10.0.0.1:8000"])
    assert str(err) == "endpoints: cannot be combined with discovery (one source of endpoints)"
    err = error_of(MINIMAL[kind], endpoints_file="endpoints.yaml")
    assert str(err) == "endpoints_file: cannot be combined with discovery (one source of endpoints)"


def test_the_endpoints_flag_replaces_discovery(tmp_path: Path) -> None:
    path = tmp_path / "llmlb.yaml"
    path.write_text(yaml.safe_dump({"discovery": MINIMAL["dns"]}))
    config = load_config(str(path))
    assert config.discovery is not None
    flagged = with_overrides(config, endpoints="10.0.0.1:8000,10.0.0.2:8000")
    assert flagged.discovery is None
    assert [e.address for e in flagged.endpoints] == ["10.0.0.1:8000", "10.0.0.2:8000"]
    # Other flags leave discovery alone.
    assert with_overrides(config, policy="global_least_request").discovery == config.discovery


# --- kubeconfig paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kubernetes", "inferencePool"])
def test_a_relative_kubeconfig_is_relative_to_the_config_file(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "llmlb"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not where the config is
    path = conf_dir / "llmlb.yaml"
    path.write_text(yaml.safe_dump({"discovery": with_kind(kind, kubeconfig="creds/kubeconfig")}))
    config = load_config(str(path))
    assert config.discovery is not None
    assert config.discovery.kubeconfig is not None
    assert Path(config.discovery.kubeconfig) == conf_dir / "creds" / "kubeconfig"

    absolute = tmp_path / "abs" / "kubeconfig"
    path.write_text(yaml.safe_dump({"discovery": with_kind(kind, kubeconfig=str(absolute))}))
    loaded = load_config(str(path)).discovery
    assert loaded is not None
    assert loaded.kubeconfig == str(absolute)

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path.write_text(yaml.safe_dump({"discovery": with_kind(kind, kubeconfig="~/.kube/other")}))
    loaded = load_config(str(path)).discovery
    assert loaded is not None
    assert loaded.kubeconfig == str(tmp_path / "home" / ".kube" / "other")


def test_no_kubeconfig_stays_unset(tmp_path: Path) -> None:
    path = tmp_path / "llmlb.yaml"
    path.write_text(yaml.safe_dump({"discovery": MINIMAL["kubernetes"]}))
    loaded = load_config(str(path)).discovery
    assert loaded is not None
    assert loaded.kubeconfig is None


# --- the effective view ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DISCOVERY_KINDS)
def test_the_effective_view_shows_only_the_kinds_fields(kind: str) -> None:
    view = effective_dict(parse_config({"discovery": MINIMAL[kind]}))["discovery"]
    assert list(view) == ["kind", *DISCOVERY_FIELDS[kind], "labels"]
    assert view["kind"] == kind
    if kind == "dns":
        assert view["interval"] == 5000
        assert view["nameservers"] == []


# --- the command line -----------------------------------------------------------------------------------


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"kind": "dns", "name": "vllm.example"}, "discovery.port: is required for kind dns"),
        (
            {"kind": "dns", "name": "vllm.example", "port": 80, "service": "x"},
            "discovery.service: unknown key for kind dns",
        ),
        (
            {"kind": "dns", "name": "vllm.example", "port": 80, "interval": 50},
            "discovery.interval: must be >= 100, got 50",
        ),
        (
            {"kind": "kubernetes", "service": "vllm", "port": "HTTP"},
            "discovery.port: must be a port number or a port name",
        ),
        ({"kind": "inferencePool"}, "discovery.pool: is required for kind inferencePool"),
        ({"kind": "etcd"}, "discovery.kind: must be one of dns, kubernetes, inferencePool"),
    ],
)
def test_check_config_refuses_a_bad_discovery_block_with_exit_2(
    tmp_path: Path, block: dict[str, Any], message: str
) -> None:
    path = tmp_path / "llmlb.yaml"
    path.write_text(yaml.safe_dump({"discovery": block}))
    result = run_llmlb("check-config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert one_line_error(result.stderr).startswith(f"llmlb: error: {message}")


def test_check_config_prints_the_effective_discovery(tmp_path: Path) -> None:
    path = tmp_path / "llmlb.yaml"
    block = {
        "kind": "dns",
        "name": "vllm.example",
        "port": "8000",
        "nameservers": ["::1"],
        "labels": {"gpus": 8},
    }
    path.write_text(yaml.safe_dump({"discovery": block}))
    result = run_llmlb("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["discovery"] == {
        "kind": "dns",
        "name": "vllm.example",
        "port": 8000,
        "interval": 5000,
        "nameservers": ["[::1]:53"],
        "labels": {"gpus": "8"},
    }


def test_check_config_refuses_discovery_with_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "llmlb.yaml"
    path.write_text(yaml.safe_dump({"discovery": MINIMAL["dns"], "endpoints": ["10.0.0.1:8000"]}))
    result = run_llmlb("check-config", str(path))
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        "llmlb: error: endpoints: cannot be combined with discovery (one source of endpoints)"
    )


@pytest.mark.parametrize("kind", ["kubernetes", "inferencePool"])
def test_serve_refuses_a_kubeconfig_it_cannot_load_with_exit_2(tmp_path: Path, kind: str) -> None:
    """Documented: "One that cannot be loaded is a config error (exit 2)"."""
    path = tmp_path / "llmlb.yaml"
    path.write_text(yaml.safe_dump({"discovery": with_kind(kind, kubeconfig="missing/kubeconfig")}))
    grpc_port, admin_port = free_ports(2)
    result = run_llmlb(
        "serve",
        "--config",
        str(path),
        "--grpc-listen",
        f"{HOST}:{grpc_port}",
        "--admin-listen",
        f"{HOST}:{admin_port}",
        timeout=60.0,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmlb: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("llmlb: error: discovery.kubeconfig: cannot load Kubernetes credentials")
    assert str(tmp_path / "missing" / "kubeconfig") in errors[0]  # resolved next to the config


@pytest.mark.parametrize("kind", ["kubernetes", "inferencePool"])
def test_check_config_loads_the_kubeconfig_it_names(tmp_path: Path, kind: str) -> None:
    """check-config catches what serve would refuse: a named kubeconfig that cannot be loaded."""
    path = tmp_path / "llmlb.yaml"
    path.write_text(yaml.safe_dump({"discovery": with_kind(kind, kubeconfig="missing/kubeconfig")}))
    result = run_llmlb("check-config", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert one_line_error(result.stderr).startswith(
        "llmlb: error: discovery.kubeconfig: cannot load Kubernetes credentials"
    )
    kubeconfig = tmp_path / "missing" / "kubeconfig"
    kubeconfig.parent.mkdir()
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    result = run_llmlb("check-config", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
