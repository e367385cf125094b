"""What the metrics cost a pick (pytest-benchmark; budgets in bench/check.py).

A pick counts itself in three families (``Picker._count``): ``llmlb_picks_total`` (labelled),
``llmlb_pick_duration_seconds`` and ``llmlb_prefix_hit_depth`` (histograms). Measured three ways:
through prometheus_client as the daemon runs it, in its multiprocess mode (``--workers``: values
in mapped files), and a plain dict-and-list baseline, the least any in-process counter can cost,
so the report shows what the library adds.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import values

from llmlb.metrics import MULTIPROC_ENV, PICK_BUCKETS, PREFIX_DEPTH_BUCKETS, Metrics

REPEAT = 200
LABELS = ("prefix_cache", "10.0.0.1:8000", "prefix_hit")


def _picks(metrics: Metrics) -> Callable[[], None]:
    picks, duration, depth = metrics.picks, metrics.pick_duration, metrics.prefix_hit_depth

    def run() -> None:
        for _ in range(REPEAT):
            duration.observe(0.00004)
            picks.inc(LABELS)
            depth.observe(3)

    return run


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus_client's multiprocess values for metrics made inside (as in a worker)."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())


def test_metrics_per_pick(benchmark: Any) -> None:
    metrics = Metrics(lambda: [])
    benchmark.group = "metrics"
    benchmark.extra_info.update(id="metrics/pick", repeat=REPEAT, calls=0)
    benchmark(_picks(metrics))
    assert metrics.picks.get(LABELS) >= REPEAT


def test_metrics_per_pick_multiprocess(benchmark: Any, multiprocess: None, tmp_path: Path) -> None:
    metrics = Metrics(lambda: [])
    benchmark.group = "metrics"
    benchmark.extra_info.update(id="metrics/pick_multiprocess", repeat=REPEAT, calls=0)
    benchmark(_picks(metrics))
    assert any(tmp_path.glob("counter_*.db")), "values went to the multiprocess files"
    assert metrics.picks.get(LABELS) >= REPEAT


def test_metrics_per_pick_dict_baseline(benchmark: Any) -> None:
    """The same three updates as bare dict/list arithmetic (no exposition, no locking)."""
    counts: dict[tuple[str, ...], float] = {}
    duration = [0] * (len(PICK_BUCKETS) + 1)
    depth = [0] * (len(PREFIX_DEPTH_BUCKETS) + 1)
    sums = [0.0, 0.0]

    def run() -> None:
        for _ in range(REPEAT):
            duration[bisect.bisect_left(PICK_BUCKETS, 0.00004)] += 1
            sums[0] += 0.00004
            counts[LABELS] = counts.get(LABELS, 0.0) + 1.0
            depth[bisect.bisect_left(PREFIX_DEPTH_BUCKETS, 3)] += 1
            sums[1] += 3

    benchmark.group = "metrics"
    benchmark.extra_info.update(id="metrics/pick_dict_baseline", repeat=REPEAT, calls=0)
    benchmark(run)
    assert counts[LABELS] >= REPEAT
