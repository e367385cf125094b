"""Fixtures for the Python-side benchmarks of the llmlb core (see bench/README.md)."""

from __future__ import annotations

import pytest
from bench_bodies import bodies


@pytest.fixture(scope="session")
def chat_bodies() -> dict[str, bytes]:
    """The generated chat bodies by size label ("1KB", "32KB", "1MB"), same bytes as criterion's."""
    return bodies()
