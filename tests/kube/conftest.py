"""Fixtures for the Kubernetes tests: a real kube-apiserver + etcd on 127.0.0.1.

Every test in this directory is marked ``kube`` (``pytest -m kube`` / ``-m "not kube"``).

- ``kube_cluster`` (session): a :class:`KubeCluster` started once (~3 s) and stopped at the end of
  the session. Tests may call ``restart_apiserver()`` on it, but must leave it running.
- ``kube_api`` (session): a :class:`KubeApi` with the admin token.
- ``kube_namespace`` (per test): a fresh namespace with a unique name. Namespaces are never
  deleted: without a controller manager they would stay Terminating.

The binaries come from ``make kube-bin``; when they are missing the tests FAIL with that hint
(never skip: CI must not go green by testing nothing).
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support.kube import BUILD_HINT, KubeApi, KubeCluster, kube_bin_dir, missing_binaries  # noqa: E402

_NAMESPACES = itertools.count(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.kube)


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    missing = missing_binaries()
    if missing:
        pytest.fail(f"missing {', '.join(missing)} in {kube_bin_dir()}: {BUILD_HINT}", pytrace=False)
    cluster = KubeCluster(tmp_path_factory.mktemp("kube")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_api(kube_cluster: KubeCluster) -> KubeApi:
    return kube_cluster.api()


@pytest.fixture
def kube_namespace(kube_cluster: KubeCluster, kube_api: KubeApi, request: pytest.FixtureRequest) -> str:
    if not kube_cluster.running:
        pytest.fail(f"the session's Kubernetes API server is down\n{kube_cluster.describe()}", pytrace=False)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_")).strip("-")[:40]
    name = f"t{next(_NAMESPACES)}-{slug}".rstrip("-")
    kube_api.create_namespace(name)
    return name
