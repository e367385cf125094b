"""`grpc_tls` and the ext_proc stream caps: validation, the PEM checks behind exit code 2, and the
certificate reloader's decisions (no sockets: the reloader is polled by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmlb.config import Config, ConfigError, GrpcTls, effective_dict, load_config, parse_config
from llmlb.metrics import Metrics
from llmlb.tls import TlsMaterial, TlsReloader, check_files
from tests.support.certs import CA, replace_file, serial_of


def llmlb(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmlb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@pytest.fixture
def tls_dir(tmp_path: Path, ca: CA) -> Path:
    """ca.crt, tls.crt/tls.key (server) and a config file using them by relative paths."""
    ca.write(tmp_path)
    ca.server().write(tmp_path, "tls")
    (tmp_path / "llmlb.yaml").write_text(
        yaml.safe_dump(
            {
                "grpc_listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "endpoints": ["127.0.0.1:1"],
                "grpc_tls": {"cert": "tls.crt", "key": "tls.key", "client_ca": "ca.crt"},
            }
        )
    )
    return tmp_path


# --- config ------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = parse_config({})
    assert config.grpc_tls is None
    assert config.grpc_max_streams_per_connection == 1000
    assert config.grpc_max_streams == 10_000
    shown = effective_dict(config)
    assert shown["grpc_tls"] is None
    assert (shown["grpc_max_streams_per_connection"], shown["grpc_max_streams"]) == (1000, 10_000)


def test_grpc_tls_parses_and_client_ca_is_optional() -> None:
    config = parse_config({"grpc_tls": {"cert": "/a.crt", "key": "/a.key"}})
    assert config.grpc_tls == GrpcTls("/a.crt", "/a.key", None)
    config = parse_config({"grpc_tls": {"cert": "/a.crt", "key": "/a.key", "client_ca": "/ca.crt"}})
    assert config.grpc_tls == GrpcTls("/a.crt", "/a.key", "/ca.crt")


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"grpc_tls": "yes"}, "grpc_tls", "mapping"),
        ({"grpc_tls": {"key": "k"}}, "grpc_tls.cert", "required"),
        ({"grpc_tls": {"cert": "c"}}, "grpc_tls.key", "required"),
        ({"grpc_tls": {"cert": "c", "key": "k", "ca": "x"}}, "grpc_tls.ca", "unknown key"),
        ({"grpc_tls": {"cert": "", "key": "k"}}, "grpc_tls.cert", "non-empty string"),
        ({"grpc_tls": {"cert": "c", "key": 5}}, "grpc_tls.key", "non-empty string"),
        ({"grpc_tls": {"cert": "c", "key": "k", "client_ca": ["x"]}}, "grpc_tls.client_ca", "string"),
        ({"grpc_max_streams": 0}, "grpc_max_streams", ">= 1"),
        ({"grpc_max_streams": 1_000_001}, "grpc_max_streams", "<= 1000000"),
        ({"grpc_max_streams": "10"}, "grpc_max_streams", "integer"),
        ({"grpc_max_streams": True}, "grpc_max_streams", "integer"),
        ({"grpc_max_streams_per_connection": 0}, "grpc_max_streams_per_connection", ">= 1"),
        ({"grpc_max_streams_per_connection": 10**6 + 1}, "grpc_max_streams_per_connection", "<= 1000000"),
        ({"grpc_max_streams_per_connection": 2.5}, "grpc_max_streams_per_connection", "integer"),
    ],
)
def test_bad_values_name_the_field(raw: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.field == field
    assert words in str(info.value)


@pytest.mark.parametrize("value", [1, 2, 1_000_000])
def test_stream_caps_accept_their_bounds(value: int) -> None:
    config = parse_config({"grpc_max_streams": value, "grpc_max_streams_per_connection": value})
    assert config.grpc_max_streams == config.grpc_max_streams_per_connection == value


def test_paths_are_relative_to_the_config_file(tls_dir: Path) -> None:
    config = load_config(str(tls_dir / "llmlb.yaml"))
    assert config.grpc_tls == GrpcTls(
        str(tls_dir / "tls.crt"), str(tls_dir / "tls.key"), str(tls_dir / "ca.crt")
    )
    check_files(config.grpc_tls)


def test_check_config_shows_the_paths_only(tls_dir: Path) -> None:
    result = llmlb("check-config", str(tls_dir / "llmlb.yaml"))
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["grpc_tls"] == {
        "cert": str(tls_dir / "tls.crt"),
        "key": str(tls_dir / "tls.key"),
        "client_ca": str(tls_dir / "ca.crt"),
    }
    assert "BEGIN" not in result.stdout  # paths, never the PEM contents


# --- unusable files: exit 2, one line naming the field -----------------------------------------


def _break(tls_dir: Path, ca: CA, how: str) -> str:
    """Spoils one file; returns the field the error must name."""
    if how == "missing cert":
        (tls_dir / "tls.crt").unlink()
        return "grpc_tls.cert"
    if how == "garbage cert":
        (tls_dir / "tls.crt").write_text("not a certificate\n")
        return "grpc_tls.cert"
    if how == "key as cert":
        (tls_dir / "tls.crt").write_bytes((tls_dir / "tls.key").read_bytes())
        return "grpc_tls.cert"
    if how == "missing key":
        (tls_dir / "tls.key").unlink()
        return "grpc_tls.key"
    if how == "garbage key":
        (tls_dir / "tls.key").write_bytes(b"\x00\x01garbage")
        return "grpc_tls.key"
    if how == "key of another cert":
        (tls_dir / "tls.key").write_bytes(ca.server().key_pem)
        return "grpc_tls.key"
    if how == "encrypted key":
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key((tls_dir / "tls.key").read_bytes(), None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        (tls_dir / "tls.key").write_bytes(encrypted)
        return "grpc_tls.key"
    if how == "garbage client_ca":
        (tls_dir / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
        return "grpc_tls.client_ca"
    if how == "missing client_ca":
        (tls_dir / "ca.crt").unlink()
        return "grpc_tls.client_ca"
    raise AssertionError(how)


BREAKAGES = [
    "missing cert",
    "garbage cert",
    "key as cert",
    "missing key",
    "garbage key",
    "key of another cert",
    "encrypted key",
    "garbage client_ca",
    "missing client_ca",
]


@pytest.mark.parametrize("how", BREAKAGES)
def test_unusable_files_are_config_errors(tls_dir: Path, ca: CA, how: str) -> None:
    field = _break(tls_dir, ca, how)
    config = load_config(str(tls_dir / "llmlb.yaml"))
    assert config.grpc_tls is not None
    with pytest.raises(ConfigError) as info:
        check_files(config.grpc_tls)
    assert info.value.field == field


@pytest.mark.parametrize("how", ["missing cert", "garbage key", "garbage client_ca", "encrypted key"])
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_unusable_files_exit_2_with_one_line(tls_dir: Path, ca: CA, how: str, command: str) -> None:
    field = _break(tls_dir, ca, how)
    config = str(tls_dir / "llmlb.yaml")
    result = llmlb(*(["serve", "--config", config] if command == "serve" else ["check-config", config]))
    assert result.returncode == 2, result.stderr
    assert one_line_error(result).startswith(f"llmlb: error: {field}: ")


# --- the reloader ------------------------------------------------------------------------------


def _reloader(tls_dir: Path) -> tuple[TlsReloader, Metrics, list[TlsMaterial]]:
    config = load_config(str(tls_dir / "llmlb.yaml"))
    assert config.grpc_tls is not None
    metrics = Metrics(lambda: [])
    applied: list[TlsMaterial] = []
    return TlsReloader(config.grpc_tls, metrics, applied.append), metrics, applied


def test_a_change_is_taken_once_it_has_settled(tls_dir: Path, ca: CA) -> None:
    reloader, metrics, applied = _reloader(tls_dir)
    assert not reloader.poll()
    fresh = ca.server()
    fresh.write(tls_dir, "tls")
    assert not reloader.poll()  # seen once: wait one more look (a pair is rarely written at once)
    assert reloader.poll()
    assert serial_of(reloader.material.cert) == fresh.serial
    assert metrics.tls_reloads.get(("ok",)) == 1
    assert applied == [reloader.material]  # new connections take the new certificates, once
    assert not reloader.poll()
    assert len(applied) == 1


def test_a_broken_replacement_keeps_the_old_certificates(tls_dir: Path, ca: CA) -> None:
    reloader, metrics, applied = _reloader(tls_dir)
    before = reloader.material
    replace_file(tls_dir / "tls.crt", b"garbage\n")
    for _ in range(5):
        assert not reloader.poll()
    assert reloader.material == before
    assert applied == []
    assert metrics.tls_reloads.get(("error",)) == 1  # counted (and logged) once per broken version
    assert metrics.tls_reloads.get(("ok",)) == 0
    fixed = ca.server()
    fixed.write(tls_dir, "tls")
    reloader.poll()
    assert reloader.poll()
    assert serial_of(reloader.material.cert) == fixed.serial
    assert metrics.tls_reloads.get(("ok",)) == 1


def test_half_replaced_pair_is_not_reported_when_completed_in_time(tls_dir: Path, ca: CA) -> None:
    reloader, metrics, _ = _reloader(tls_dir)
    fresh = ca.server()
    replace_file(tls_dir / "tls.crt", fresh.cert_pem)  # the key follows before the next look
    assert not reloader.poll()
    replace_file(tls_dir / "tls.key", fresh.key_pem)
    assert not reloader.poll()
    assert reloader.poll()
    assert metrics.tls_reloads.get(("error",)) == 0
    assert serial_of(reloader.material.cert) == fresh.serial


def test_config_without_tls_needs_no_files() -> None:
    assert Config().grpc_tls is None


# --- the startup warning -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "tls", "warns"),
    [
        ("0.0.0.0:9002", None, True),
        ("10.0.0.5:9002", {"cert": "c", "key": "k"}, True),  # TLS alone does not say who may connect
        ("0.0.0.0:9002", {"cert": "c", "key": "k", "client_ca": "ca"}, False),
        ("[::]:9002", None, True),
        ("127.0.0.1:9002", None, False),
        ("[::1]:9002", None, False),
        ("localhost:9002", None, False),
    ],
)
def test_exposed_listener_without_client_certificates_warns(
    caplog: pytest.LogCaptureFixture, listen: str, tls: dict[str, str] | None, warns: bool
) -> None:
    from llmlb.tls import warn_if_exposed

    config = parse_config({"grpc_listen": listen, **({"grpc_tls": tls} if tls else {})})
    with caplog.at_level("WARNING", logger="llmlb.tls"):
        warn_if_exposed(config)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (1 if warns else 0)
    if warns:
        text = warnings[0].getMessage()
        assert "fake load" in text
        assert "grpc_tls.client_ca" in text
        assert "network policy" in text
