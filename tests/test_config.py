"""Config parsing: defaults, Higress compatibility, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmlb.config import (
    DEFAULT_REQUEST_TIMEOUT_S,
    FLOAT_BOUNDS,
    INT_BOUNDS,
    REDACTED,
    Config,
    ConfigError,
    effective_dict,
    effective_yaml,
    load_config,
    load_endpoints_file,
    parse_config,
    with_overrides,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted((EXAMPLES / "higress").glob("*.yaml")), ids=lambda p: p.name)
def test_higress_examples_load_unchanged(path):
    config = load_config(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.lb_policy == raw["lb_policy"]
    for key, value in raw["lb_config"].items():
        if key in ("cleanInterval", "enableDetailLog"):
            assert key in config.ignored_fields
        elif key == "password":
            assert config.lb_config.password == value
        elif key == "criticalModels":
            assert list(config.lb_config.criticalModels or ()) == value
        else:
            assert getattr(config.lb_config, key) == value


def test_example_config_loads():
    config = load_config(str(EXAMPLES / "llmlb.yaml"))
    assert [e.address for e in config.endpoints] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert config.endpoints[1].labels == {"zone": "a"}


def test_defaults_match_the_contract():
    c = parse_config({})
    assert (c.grpc_listen, c.admin_listen, c.pool, c.lb_policy) == (
        "0.0.0.0:9002",
        "127.0.0.1:9090",
        "default",
        "prefix_cache",
    )
    lb = c.lb_config
    assert (lb.timeout, lb.redisBudget, lb.database, lb.redisKeyTTL) == (3000, 25, 0, 1800)
    assert (lb.scrapeInterval, lb.staleAfter, lb.leaseTTL, lb.criticalModels) == (50, 2000, 15, None)


def test_higress_zero_means_default():
    lb = parse_config({"lb_config": {"redisKeyTTL": 0, "timeout": 0}}).lb_config
    assert (lb.redisKeyTTL, lb.timeout) == (1800, 3000)


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"lb_polcy": "prefix_cache"}, "lb_polcy", "unknown key"),
        ({"lb_policy": "nope"}, "lb_policy", "must be one of"),
        ({"lb_config": {"redisKeyTTL": -1}}, "lb_config.redisKeyTTL", ">= 0"),
        ({"lb_config": {"redisKeyTtl": 5}}, "lb_config.redisKeyTtl", "unknown key"),
        ({"lb_config": {"servicePort": "x"}}, "lb_config.servicePort", "integer"),
        ({"lb_config": {"servicePort": 70000}}, "lb_config.servicePort", "<= 65535"),
        ({"lb_config": {"timeout": True}}, "lb_config.timeout", "integer"),
        ({"lb_config": {"affinityLoadFactor": 0.5}}, "lb_config.affinityLoadFactor", ">= 1.0"),
        ({"lb_config": {"criticalModels": ["m"]}}, "lb_config.criticalModels", "least_busy"),
        ({"lb_config": {"maxRequestCount": 3}}, "lb_config.maxRequestCount", "global_least_request"),
        ({"lb_config": {"target_metric": "x"}}, "lb_config.target_metric", "least_busy"),
        ({"lb_policy": "endpoint_metrics"}, "lb_policy", "use least_busy"),
        ({"lb_policy": "metrics_based"}, "lb_policy", "use least_busy"),
        ({"lb_type": "cluster"}, "lb_type", "only 'endpoint'"),
        ({"endpoints": ["not-an-address"]}, "endpoints[0]", "ip:port"),
        ({"endpoints": ["vllm-0:8000"]}, "endpoints[0]", "not an IP address"),
        ({"endpoints": ["10.0.0.1:0"]}, "endpoints[0]", "1..65535"),
        ({"endpoints": ["10.0.0.1:80", "10.0.0.1:80"]}, "endpoints[1]", "duplicate"),
        ({"endpoints": [{"adress": "10.0.0.1:80"}]}, "endpoints[0].adress", "unknown key"),
        ({"endpoints": "10.0.0.1:80"}, "endpoints", "must be a list"),
        ({"grpc_listen": "9002"}, "grpc_listen", "host:port"),
        ({"pool": "a b"}, "pool", "letters"),
        ({"max_body_bytes": 10}, "max_body_bytes", ">= 1024"),
        ([1, 2], "(top level)", "mapping"),
    ],
)
def test_bad_configs_name_the_field(raw, field, words):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.field == field
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_password_from_environment_and_never_shown(monkeypatch):
    monkeypatch.setenv("REDIS_PW", "s3cret")
    config = parse_config({"lb_config": {"serviceFQDN": "r", "password": "${REDIS_PW}"}})
    assert config.lb_config.password == "s3cret"
    assert "s3cret" not in repr(config)
    assert "s3cret" not in effective_yaml(config)
    assert effective_dict(config)["lb_config"]["password"] == REDACTED
    monkeypatch.delenv("REDIS_PW")
    with pytest.raises(ConfigError, match=r"lb_config.password: environment variable REDIS_PW is not set"):
        parse_config({"lb_config": {"password": "${REDIS_PW}"}})


def test_effective_yaml_round_trips_to_the_same_config():
    config = parse_config(
        {
            "endpoints": ["10.0.0.1:8000", {"address": "10.0.0.2:8000", "labels": {"zone": "b"}}],
            "lb_policy": "global_least_request",
            "lb_config": {"serviceFQDN": "redis", "maxRequestCount": 7},
        }
    )
    assert parse_config(yaml.safe_load(effective_yaml(config))) == config


def test_ipv6_endpoints_are_normalised():
    config = parse_config({"endpoints": ["[0:0::1]:8000"]})
    assert config.endpoints[0].address == "[::1]:8000"


def test_flags_override_the_file_and_are_checked():
    config = with_overrides(Config(), endpoints="10.0.0.1:1, 10.0.0.2:2", policy="global_least_request")
    assert [e.address for e in config.endpoints] == ["10.0.0.1:1", "10.0.0.2:2"]
    assert config.lb_policy == "global_least_request"
    with pytest.raises(ConfigError, match="--endpoints"):
        with_overrides(Config(), endpoints="nope")
    with pytest.raises(ConfigError, match="--policy"):
        with_overrides(Config(), policy="fastest")


def test_endpoints_file_is_relative_to_the_config(tmp_path):
    (tmp_path / "eps.yaml").write_text("endpoints: [10.0.0.1:8000]\n")
    (tmp_path / "c.yaml").write_text("endpoints_file: eps.yaml\n")
    config = load_config(str(tmp_path / "c.yaml"))
    assert config.endpoints_file == str(tmp_path / "eps.yaml")


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--config: cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("lb_policy: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_policy_flag_keeps_least_busy_fields_from_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lb_policy: least_busy\nlb_config: {criticalModels: [gold], staleAfter: 700}\n")
    config = with_overrides(load_config(str(path)), policy="least_busy")
    assert config.lb_config.criticalModels == ("gold",)
    assert config.lb_config.staleAfter == 700
    with pytest.raises(ConfigError, match="only applies to lb_policy: least_busy"):
        with_overrides(load_config(str(path)), policy="prefix_cache")


def _raw(name: str, value: object) -> dict[str, object]:
    section, _, key = name.rpartition(".")
    raw: dict[str, object] = {section: {key: value}} if section else {name: value}
    if section and key in ("criticalModels", "scrapeInterval", "staleAfter", "scrapeTimeout", "metricsPort",
                           "shedRetryAfter", "queueThresholdCritical", "kvCacheThreshold",
                           "queueingThresholdLoRA", "loraAffinityThreshold"):  # fmt: skip
        raw["lb_policy"] = "least_busy"
    if key == "maxRequestCount":
        raw["lb_policy"] = "global_least_request"
    if section == "prediction":  # the window must hold two readings at either bound
        raw["prediction"] = {"interval": 100, "window": 86_400, key: value}
    if section == "discovery":
        raw["discovery"] = {"kind": "dns", "name": "models.example", "port": 8000, key: value}
    return raw


@pytest.mark.parametrize("name", sorted(INT_BOUNDS))
def test_every_integer_field_is_bounded(name):
    low, high = INT_BOUNDS[name]
    parse_config(_raw(name, low))
    parse_config(_raw(name, high))
    for bad in (high + 1, low - 1, 10**20):
        with pytest.raises(ConfigError) as err:
            parse_config(_raw(name, bad))
        assert err.value.field == name


@pytest.mark.parametrize("name", sorted(FLOAT_BOUNDS))
def test_every_number_field_is_bounded(name):
    low, high = FLOAT_BOUNDS[name]
    parse_config(_raw(name, low))
    parse_config(_raw(name, high))
    for bad in (high * 2 + 1, low - 1, float("inf"), float("nan")):
        with pytest.raises(ConfigError) as err:
            parse_config(_raw(name, bad))
        assert err.value.field == name


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("endpoints: [10.0.0.1:1]\nendpoints: [10.0.0.2:1]\n", "endpoints"),
        ("lb_config:\n  timeout: 1\n  redisKeyTTL: 2\n  timeout: 3\n", "lb_config.timeout"),
        ("endpoints:\n  - {address: 10.0.0.1:1, labels: {a: x, a: y}}\n", "endpoints[0].labels.a"),
    ],
)
def test_duplicate_keys_are_refused(tmp_path, text, field):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="duplicate key") as err:
        load_config(str(path))
    assert err.value.field == field


@pytest.mark.parametrize("labels", [[], "", False, 0, ["zone"], {"zone": ["a"]}, {1: "a"}])
def test_endpoint_labels_of_a_wrong_type_are_refused(labels):
    with pytest.raises(ConfigError, match="mapping of strings to scalars") as err:
        parse_config({"endpoints": [{"address": "10.0.0.1:1", "labels": labels}]})
    assert err.value.field == "endpoints[0].labels"


def test_endpoint_labels_absent_or_null_mean_none():
    for entry in ({"address": "10.0.0.1:1"}, {"address": "10.0.0.1:1", "labels": None}):
        assert parse_config({"endpoints": [entry]}).endpoints[0].labels == {}


def test_duplicate_keys_in_the_endpoints_file_are_refused(tmp_path):
    (tmp_path / "eps.yaml").write_text("endpoints: [10.0.0.1:1]\nendpoints: [10.0.0.2:1]\n")
    (tmp_path / "c.yaml").write_text("endpoints_file: eps.yaml\n")
    config = load_config(str(tmp_path / "c.yaml"))
    assert config.endpoints_file is not None
    with pytest.raises(ConfigError, match="duplicate key"):
        load_endpoints_file(config.endpoints_file)


def test_new_day2_defaults():
    c = parse_config({})
    assert (c.drain_grace, c.drain_timeout) == (5, DEFAULT_REQUEST_TIMEOUT_S)
    assert (c.health_check_path, c.passive_probe_after) == ("/health", 10_000)
    assert c.lb_config.maxPrefixBlocks == 1024
    assert parse_config({"health_check_path": ""}).health_check_path == ""
    with pytest.raises(ConfigError, match="health_check_path"):
        parse_config({"health_check_path": "health"})


def test_the_docs_give_every_bound():
    """docs/configuration.md states each range exactly as config.py enforces it."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for name, (low, high) in {**INT_BOUNDS, **FLOAT_BOUNDS}.items():
        if not name.startswith("lb_config."):
            continue
        shown = (f"{low:g}", f"{high:g}") if isinstance(low, float) else (f"{low:,}", f"{high:,}")
        assert f"`{name.removeprefix('lb_config.')}` {shown[0]} … {shown[1]}" in docs, name
