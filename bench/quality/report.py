"""Figures, the markdown tables and the chart of the routing-quality benchmark.

``summarize`` turns one cell's per-request records (plus the simulators' own counters and samples
of their running/waiting counts) into the figures; ``markdown`` and ``chart`` render a whole run.
Run it on its own to re-render an existing results.json:

    python bench/quality/report.py bench/quality/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# one cell


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def _stat(stats: dict[str, Any], *keys: str) -> float:
    """The first of `keys` present in a /_sim/stats answer (names differ slightly between versions)."""
    for key in keys:
        if key in stats and stats[key] is not None:
            return float(stats[key])
    return 0.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _ratio(values: list[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0.0
    return round(max(values) / mean, 2) if mean > 0 else None


def summarize(
    *,
    config: str,
    workload: str,
    records: list[dict[str, Any]],
    sim_stats: dict[str, dict[str, Any]],
    samples: list[dict[str, Any]],
    span: float,
) -> dict[str, Any]:
    """The figures of one workload x configuration cell.

    `records`: one dict per request sent (fields of run.Record); `sim_stats`: each simulator's
    /_sim/stats after the cell; `samples`: rows of {"t": s, sim: (running, waiting)} taken during the
    cell; `span`: s from the start of the cell to the last answer.
    """
    ok = [r for r in records if r["error"] is None]
    prompt = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r["cached_tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    latencies = [r["latency"] for r in ok if r["latency"] is not None]
    sims = sorted(sim_stats)
    per_sim = {s: int(_stat(sim_stats[s], "requests_total", "requests")) for s in sims}
    client_per_sim: dict[str, int] = {}
    for r in ok:
        client_per_sim[r["sim"] or "?"] = client_per_sim.get(r["sim"] or "?", 0) + 1
    sim_prompt = sum(_stat(sim_stats[s], "prompt_tokens_total", "prompt_tokens") for s in sims)
    sim_cached = sum(_stat(sim_stats[s], "cached_tokens_total", "cached_tokens") for s in sims)
    max_running = {s: int(_stat(sim_stats[s], "max_running_seen")) for s in sims}
    # time-averaged queue (running + waiting) per simulator over the samples taken under load
    busy: dict[str, float] = {}
    for s in sims:
        seen = [row[s][0] + row[s][1] for row in samples if s in row]
        busy[s] = round(sum(seen) / len(seen), 2) if seen else 0.0
    # stickiness: how many simulators served each key (session / system prompt / prefix group) that
    # was requested more than once
    served: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for r in ok:
        counts[r["key"]] = counts.get(r["key"], 0) + 1
        served.setdefault(r["key"], set()).add(r["sim"] or "?")
    repeated = [len(served[k]) for k, n in counts.items() if n > 1]
    errors: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            kind = r["error"].split(":")[0][:60]
            errors[kind] = errors.get(kind, 0) + 1
    span = max(span, 1e-9)
    return {
        "config": config,
        "workload": workload,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "hit_rate": round(cached / prompt, 4) if prompt else None,
        "hit_rate_sims": round(sim_cached / sim_prompt, 4) if sim_prompt else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p90_ms": _ms(percentile(ttfts, 90)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "ttft_mean_ms": _ms(sum(ttfts) / len(ttfts)) if ttfts else None,
        "latency_p50_ms": _ms(percentile(latencies, 50)),
        "latency_p99_ms": _ms(percentile(latencies, 99)),
        "span_s": round(span, 2),
        "rps": round(len(ok) / span, 2),
        "output_tps": round(sum(r["completion_tokens"] for r in ok) / span, 1),
        "requests_per_sim": per_sim,
        "requests_per_sim_client": client_per_sim,
        "requests_max_over_mean": _ratio([float(v) for v in per_sim.values()]),
        "max_running_seen": max_running,
        "max_running_max": max(max_running.values(), default=0),
        "max_running_mean": round(sum(max_running.values()) / len(max_running), 2) if max_running else 0.0,
        "sims_per_key": round(sum(repeated) / len(repeated), 2) if repeated else None,
        "queue_avg_per_sim": busy,
        "queue_avg_max_over_mean": _ratio(list(busy.values())),
    }


def _fmt(value: Any, digits: int = 0, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.{digits}f}"


def one_line(c: dict[str, Any]) -> str:
    return (
        f"{c['config']:22} {c['workload']:14} {c['ok']:4d}/{c['requests']:<4d} ok  "
        f"hit {_fmt(c['hit_rate'], pct=True):>6} (sims {_fmt(c['hit_rate_sims'], pct=True)})  "
        f"TTFT p50 {_fmt(c['ttft_p50_ms'])} ms p99 {_fmt(c['ttft_p99_ms'])} ms  {c['rps']:.1f} req/s  "
        f"req max/mean {_fmt(c['requests_max_over_mean'], 2)}"
    )


# --------------------------------------------------------------------------------------------------
# a whole run

COLUMNS = (
    ("config", "configuration", None),
    ("requests", "requests", 0),
    ("errors", "errors", 0),
    ("hit_rate", "KV hit rate", "pct"),
    ("hit_rate_sims", "(sims)", "pct"),
    ("ttft_p50_ms", "TTFT p50 ms", 0),
    ("ttft_p99_ms", "TTFT p99 ms", 0),
    ("ttft_mean_ms", "TTFT mean ms", 0),
    ("latency_p50_ms", "latency p50 ms", 0),
    ("rps", "req/s", 1),
    ("output_tps", "out tok/s", 0),
    ("sims_per_key", "sims per key", 2),
    ("requests_max_over_mean", "req/sim max÷mean", 2),
    ("max_running_max", "max running (max)", 0),
    ("max_running_mean", "(mean)", 1),
    ("queue_avg_max_over_mean", "queue max÷mean", 2),
)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    cells = results["cells"]
    lines = [
        "# Routing quality",
        "",
        f"{meta.get('date', '')}, {meta.get('machine', '')}; {meta.get('sims', '?')} simulators; "
        f"{meta.get('seconds', '?')} s of load per cell; run took {meta.get('elapsed_s', '?')} s.",
        "",
        "Simulator knobs: " + ", ".join(f"`--{k} {v:g}`" for k, v in meta.get("sim_knobs", {}).items()) + ".",
        "",
    ]
    lines += [f"Note: {n}" for n in meta.get("notes", [])]
    order = list(dict.fromkeys(c["workload"] for c in cells))
    for workload in order:
        info = meta.get("workloads", {}).get(workload, {})
        lines += ["", f"## {workload}", ""]
        if info:
            lines += [f"{info.get('description', '')}. {info.get('summary', '')}.", ""]
        lines.append("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
        lines.append("|" + "|".join("---" if kind is None else "---:" for _, _, kind in COLUMNS) + "|")
        for c in cells:
            if c["workload"] != workload:
                continue
            row = []
            for key, _, kind in COLUMNS:
                value = c.get(key)
                if kind is None:
                    row.append(f"`{value}`")
                elif kind == "pct":
                    row.append(_fmt(value, pct=True))
                else:
                    row.append(_fmt(value, int(kind)))
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "KV hit rate: cached ÷ prompt tokens over the answered requests, from the `usage` of each "
        "stream; (sims): the same from the simulators' own counters. TTFT: client side, to the first "
        "content chunk. req/s and out tok/s: answered requests and completion tokens over the span from "
        "the start of the cell to the last answer. sims per key: how many simulators served the requests "
        "of one session, system prompt or prefix group (mean over those sent more than once; 1.00 = "
        "perfectly sticky). req/sim max÷mean: the busiest simulator's request count "
        "over the mean (1.00 = even). max running: the largest `max_running_seen` of the simulators "
        "(and their mean). queue max÷mean: time-averaged running+waiting of the busiest simulator over "
        "the mean (sampled every 0.5 s).",
        "",
    ]
    return "\n".join(lines)


PANELS = (
    ("hit_rate", "KV-cache hit rate", 100.0, "%"),
    ("ttft_p50_ms", "TTFT p50", 1.0, "ms"),
    ("ttft_p99_ms", "TTFT p99", 1.0, "ms"),
    ("output_tps", "output tokens/s", 1.0, "tok/s"),
    ("requests_max_over_mean", "requests per sim: max ÷ mean", 1.0, "x"),
    ("queue_avg_max_over_mean", "queue (running+waiting): max ÷ mean", 1.0, "x"),
)


def chart(results: dict[str, Any], path: Path) -> None:
    """A panel per metric; in each, bars grouped by workload, one colour per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    configs = list(dict.fromkeys(c["config"] for c in cells))
    by_key = {(c["workload"], c["config"]): c for c in cells}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    width = 0.8 / max(len(configs), 1)
    colors = plt.get_cmap("tab10")
    for ax, (key, title, scale, unit) in zip(axes.flat, PANELS, strict=True):
        for j, config in enumerate(configs):
            xs, ys = [], []
            for i, workload in enumerate(workloads):
                value = by_key.get((workload, config), {}).get(key)
                if value is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(value * scale)
            ax.bar(xs, ys, width, label=config, color=colors(j % 10))
        ax.set_title(f"{title} ({unit})", fontsize=10)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if key.startswith("ttft"):
            ax.set_yscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(configs), fontsize=9)
    meta = results.get("meta", {})
    fig.suptitle(
        f"llmlb routing quality: {meta.get('sims', '?')} simulated vLLM servers, "
        f"{meta.get('seconds', '?')} s per cell",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description="re-render results.md and results.png from results.json")
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    (args.results.parent / "results.md").write_text(markdown(results))
    chart(results, args.results.parent / "results.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
