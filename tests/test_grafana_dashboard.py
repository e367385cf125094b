"""deploy/grafana/llmlb-dashboard.json: every query names only metrics llmlb exports, and the
families an operator needs most each have a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmlb.metrics import Metrics
from llmlb.workers import WORKER_STREAMS_FAMILY, WORKERS_FAMILY

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "llmlb-dashboard.json"
METRIC = re.compile(r"\bllmlb_[a-z0-9_]+\b")
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_samples() -> set[str]:
    """Every sample name llmlb can export: a worker's (or single process's) families, each by
    its type's sample names, plus the --workers supervisor's own."""
    families = [(f.name, f.type) for f in Metrics(lambda: []).registry.collect()]
    families += [(WORKERS_FAMILY, "gauge"), (WORKER_STREAMS_FAMILY, "counter")]
    return {name + suffix for name, kind in families for suffix in SAMPLE_SUFFIXES[kind]}


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [
        ("variable " + v["name"], v["query"]["query"])
        for v in dashboard["templating"]["list"]
        if isinstance(v.get("query"), dict)
    ]
    return found


def test_every_query_names_an_exported_metric() -> None:
    exported = exported_samples()
    unknown = [
        (title, name) for title, expr in queries() for name in METRIC.findall(expr) if name not in exported
    ]
    assert not unknown, f"queries name metrics llmlb does not export: {unknown}"
    assert all(METRIC.search(expr) for _, expr in queries()), "a query without an llmlb metric"


def test_the_main_families_have_panels() -> None:
    used = {name for _, expr in queries() for name in METRIC.findall(expr)}
    for needed in (
        "llmlb_picks_total",
        "llmlb_pick_duration_seconds_bucket",
        "llmlb_inflight_requests",
        "llmlb_endpoint_load_backlog_tokens",
        "llmlb_endpoint_healthy",
        "llmlb_prefix_table_entries",
        "llmlb_prefix_table_evictions_total",
        "llmlb_prefix_hit_depth_bucket",
        "llmlb_prefix_hit_ratio_predicted",
        "llmlb_prefix_hit_ratio_engine",
        "llmlb_prefix_prediction_accuracy",
        "llmlb_redis_up",
        "llmlb_discovery_up",
    ):
        assert needed in used, needed


def test_panels_do_not_overlap_and_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for y in range(grid["y"], grid["y"] + grid["h"]):
            for x in range(grid["x"], grid["x"] + grid["w"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
