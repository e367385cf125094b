"""Smoke run of the routing-quality benchmark (bench/quality/run.py): 2 simulators, the sticky
multi-turn workload, round robin vs prefix_cache, a few seconds of load, into a temporary directory.
It must write the report and show prefix_cache reusing the KV cache more than round robin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "quality" / "run.py"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_quality_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable,
        str(RUN),
        "--sims",
        "2",
        "--workloads",
        "multi_turn",
        "--configs",
        "round_robin,prefix_cache",
        "--seconds",
        "5",
        "--load",
        "0.5",
        "--drain",
        "15",
        # Small caches, so that one simulator cannot keep every conversation of the run.
        "--sim-arg",
        "kv-blocks=768",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=200, env=env, cwd=ROOT, check=False)
    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr[-4000:]}"
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    cells = {c["config"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(cells) == {"round_robin", "prefix_cache"}, result.stderr[-2000:]
    for c in cells.values():
        assert c["ok"] > 0, c
        assert c["errors"] == 0, c
        assert c["hit_rate"] is not None, c
        assert c["hit_rate_sims"] is not None, c
    assert cells["round_robin"]["hit_rate"] < cells["prefix_cache"]["hit_rate"], cells
    assert "| `prefix_cache` |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
