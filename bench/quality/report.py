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


def idle_while_queued(
    samples: list[dict[str, Any]], sims: list[str], max_running: int, interval: float
) -> tuple[float, float]:
    """(longest stretch, total) in seconds during which some simulator had nothing waiting and a
    free batch slot (waiting == 0 and running < `max_running`) while another had >= 2 waiting.

    Each sample stands for the time until the next one (the last for `interval`), so the resolution
    is one sampling interval. A sample missing a simulator judges the ones it has."""
    rows = sorted((row for row in samples if any(s in row for s in sims)), key=lambda row: row["t"])
    longest = total = stretch = 0.0
    for i, row in enumerate(rows):
        counts = [row[s] for s in sims if s in row]
        dt = rows[i + 1]["t"] - row["t"] if i + 1 < len(rows) else interval
        idle = any(waiting == 0 and running < max_running for running, waiting in counts)
        queued = any(waiting >= 2 for _, waiting in counts)
        if idle and queued:
            stretch += dt
            total += dt
            longest = max(longest, stretch)
        else:
            stretch = 0.0
    return round(longest, 2), round(total, 2)


def summarize(
    *,
    config: str,
    workload: str,
    records: list[dict[str, Any]],
    sim_stats: dict[str, dict[str, Any]],
    samples: list[dict[str, Any]],
    span: float,
    oracle: tuple[int, int] | None = None,
    max_running: int = 16,
    sample_interval: float = 0.1,
) -> dict[str, Any]:
    """The figures of one workload x configuration cell.

    `records`: one dict per request sent (fields of run.Record); `sim_stats`: each simulator's
    /_sim/stats after the cell; `samples`: rows of {"t": s, sim: (running, waiting)} taken during the
    cell every `sample_interval` s; `span`: s from the start of the cell to the last answer;
    `oracle`: (cached, prompt) tokens of the oracle over the answered requests (oracle.py);
    `max_running`: the simulators' batch size (``--max-running``).
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
    seen_running = {s: int(_stat(sim_stats[s], "max_running_seen")) for s in sims}
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
    idle_max, idle_total = idle_while_queued(samples, sims, max_running, sample_interval)
    inflight = [sum(sum(row[s]) for s in sims if s in row) for row in samples]
    oracle_rate = oracle[0] / oracle[1] if oracle and oracle[1] else None
    hit_rate = cached / prompt if prompt else None
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
        "hit_rate": round(hit_rate, 4) if hit_rate is not None else None,
        "hit_rate_sims": round(sim_cached / sim_prompt, 4) if sim_prompt else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "oracle_hit_rate": round(oracle_rate, 4) if oracle_rate is not None else None,
        "oracle_prompt_tokens": oracle[1] if oracle else None,
        "hit_over_oracle": (
            round(hit_rate / oracle_rate, 3) if hit_rate is not None and oracle_rate else None
        ),
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
        "max_running_seen": seen_running,
        "max_running_max": max(seen_running.values(), default=0),
        "max_running_mean": round(sum(seen_running.values()) / len(seen_running), 2) if seen_running else 0.0,
        "sims_per_key": round(sum(repeated) / len(repeated), 2) if repeated else None,
        "queue_avg_per_sim": busy,
        "queue_avg_max_over_mean": _ratio(list(busy.values())),
        "idle_while_queued_max_s": idle_max,
        "idle_while_queued_total_s": idle_total,
        "inflight_max": max(inflight, default=0),
        "inflight_mean": round(sum(inflight) / len(inflight), 1) if inflight else 0.0,
        "samples": len(samples),
        "samples_incomplete": sum(1 for row in samples if any(s not in row for s in sims)),
    }


def _fmt(value: Any, digits: int = 0, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.{digits}f}"


def one_line(c: dict[str, Any]) -> str:
    return (
        f"{c['config']:22} {c['workload']:20} {c['ok']:4d}/{c['requests']:<4d} ok  "
        f"hit {_fmt(c['hit_rate'], pct=True):>6} (sims {_fmt(c['hit_rate_sims'], pct=True)})  "
        f"TTFT p50 {_fmt(c['ttft_p50_ms'])} ms p99 {_fmt(c['ttft_p99_ms'])} ms  {c['rps']:.1f} req/s  "
        f"req max/mean {_fmt(c['requests_max_over_mean'], 2)}  "
        f"oracle {_fmt(c.get('oracle_hit_rate'), pct=True)}  "
        f"idle-while-queued max {_fmt(c.get('idle_while_queued_max_s'), 1)} s"
    )


# --------------------------------------------------------------------------------------------------
# a whole run

COLUMNS = (
    ("config", "configuration", None),
    ("requests", "requests", 0),
    ("errors", "errors", 0),
    ("hit_rate", "KV hit rate", "pct"),
    ("hit_rate_sims", "(sims)", "pct"),
    ("oracle_hit_rate", "oracle", "pct"),
    ("hit_over_oracle", "hit÷oracle", 2),
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
    ("idle_while_queued_max_s", "idle-while-queued max s", 1),
    ("idle_while_queued_total_s", "(total s)", 1),
)

# --------------------------------------------------------------------------------------------------
# targets: each llmlb configuration against round robin (and prefix_cache) of the same run

BASELINES = ("round_robin", "sglang_cache_aware", "sglang_round_robin")
HIT_OF_ORACLE = 0.97  # KV hit rate >= this x the oracle (workloads with reuse)
P99_OF_RR = 0.8  # TTFT p99 <= this x round robin's
MEAN_OF_RR = 1.0  # mean TTFT <= round robin's
IDLE_MAX_S = 1.0  # longest idle-while-queued stretch
REDIS_HIT_POINTS = 0.02  # prefix_cache_redis2's hit rate >= prefix_cache's - 2 points
REDIS_P99_OF_PC = 1.1  # prefix_cache_redis2's TTFT p99 <= 1.1 x prefix_cache's
# A workload that sends another workload's conversations through another API -> that workload:
# the simulator renders both to the same prompts, so the hit rates must agree.
SAME_CONVERSATIONS = {"multi_turn_responses": "multi_turn"}
SAME_HIT_POINTS = 0.02  # |hit rate - the chat workload's| <= 2 points, same configuration
# Turn k names turn k - 1's stored response: only the server holding it can answer (others: 404).
# A picker must route every turn there (no failed request); round robin's answered requests are
# mostly first turns, so TTFT against it compares different requests and is not a target.
CHAINED = ("multi_turn_responses_chained",)


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of every llmlb configuration (not a baseline) on every workload of the run.

    `pass` is True/False, or None when the comparison is missing (no round robin cell, say)."""
    by_key = {(c["workload"], c["config"]): c for c in cells}
    out: list[dict[str, Any]] = []
    for c in cells:
        if c["config"] in BASELINES:
            continue

        def add(name: str, value: float | None, op: str, bound: float, cell: dict[str, Any] = c) -> None:
            """`op`: ">=", "<=" or "±" (|value| <= bound)."""
            if value is None:
                ok = None
            elif op == "±":
                ok = abs(value) <= bound
            else:
                ok = value >= bound if op == ">=" else value <= bound
            out.append(
                {
                    "workload": cell["workload"],
                    "config": cell["config"],
                    "target": name,
                    "value": value,
                    "bound": f"within ±{bound:g}" if op == "±" else f"{op} {bound:g}",
                    "pass": ok,
                }
            )

        rr = by_key.get((c["workload"], "round_robin"), {})
        if c.get("oracle_hit_rate"):  # reuse exists (not `random`)
            add("KV hit ÷ oracle", c.get("hit_over_oracle"), ">=", HIT_OF_ORACLE)
        if c["workload"] in CHAINED:
            add("failed requests", c.get("errors"), "<=", 0)
        else:
            add("TTFT p99 ÷ round robin", _div(c.get("ttft_p99_ms"), rr.get("ttft_p99_ms")), "<=", P99_OF_RR)
            add(
                "TTFT mean ÷ round robin",
                _div(c.get("ttft_mean_ms"), rr.get("ttft_mean_ms")),
                "<=",
                MEAN_OF_RR,
            )
        add("idle-while-queued max (s)", c.get("idle_while_queued_max_s"), "<=", IDLE_MAX_S)
        if c["config"] == "prefix_cache_redis2":
            pc = by_key.get((c["workload"], "prefix_cache"), {})
            hit, pc_hit = c.get("hit_rate"), pc.get("hit_rate")
            diff = round(hit - pc_hit, 4) if hit is not None and pc_hit is not None else None
            add("KV hit - prefix_cache's", diff, ">=", -REDIS_HIT_POINTS)
            ratio = _div(c.get("ttft_p99_ms"), pc.get("ttft_p99_ms"))
            add("TTFT p99 ÷ prefix_cache's", ratio, "<=", REDIS_P99_OF_PC)
        chat = SAME_CONVERSATIONS.get(c["workload"])
        if chat is not None:
            hit, chat_hit = c.get("hit_rate"), by_key.get((chat, c["config"]), {}).get("hit_rate")
            diff = round(hit - chat_hit, 4) if hit is not None and chat_hit is not None else None
            add(f"KV hit - {chat}'s", diff, "±", SAME_HIT_POINTS)
    return out


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def target_table(rows: list[dict[str, Any]]) -> str:
    """The targets as a markdown table, with a count line."""
    if not rows:
        return "No targets: no llmlb configuration in this run.\n"
    lines = [
        "| workload | configuration | target | value | bound | result |",
        "|---|---|---|---:|---|---|",
    ]
    for t in rows:
        value = "-" if t["value"] is None else f"{t['value']:g}"
        lines.append(
            f"| `{t['workload']}` | `{t['config']}` | {t['target']} | {value} | {t['bound']} | "
            f"**{_verdict(t['pass'])}** |"
        )
    passed = sum(1 for t in rows if t["pass"] is True)
    failed = sum(1 for t in rows if t["pass"] is False)
    missing = len(rows) - passed - failed
    lines += ["", f"{passed} PASS, {failed} FAIL, {missing} n/a (targets are reported, not enforced)."]
    return "\n".join(lines) + "\n"


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
            planned = info.get("oracle_hit_rate")
            oracle_note = (
                f" Oracle hit rate over every planned request: {_fmt(planned, pct=True)}."
                if planned is not None
                else ""
            )
            lines += [f"{info.get('description', '')}. {info.get('summary', '')}.{oracle_note}", ""]
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
        "the mean (sampled every 0.1 s). oracle: the hit rate with every session pinned to one server "
        "(sessions sharing a system prompt or prefix group on the same one) and infinite caches, over "
        "the same answered requests; hit÷oracle: the measured hit rate over it. idle-while-queued: the "
        "longest stretch (and the total) during which a simulator had nothing waiting and a free batch "
        "slot while another had 2 or more requests waiting.",
        "",
    ]
    rows = results.get("targets")
    if rows is None:
        rows = targets(cells)
    lines += ["## Targets", "", target_table(rows)]
    return "\n".join(lines)


PANELS = (
    ("hit_rate", "KV-cache hit rate (black tick = oracle)", 100.0, "%"),
    ("ttft_p50_ms", "TTFT p50", 1.0, "ms"),
    ("ttft_p99_ms", "TTFT p99", 1.0, "ms"),
    ("hit_over_oracle", "KV hit rate ÷ oracle", 1.0, "x"),
    ("output_tps", "output tokens/s", 1.0, "tok/s"),
    ("requests_max_over_mean", "requests per sim: max ÷ mean", 1.0, "x"),
    ("queue_avg_max_over_mean", "queue (running+waiting): max ÷ mean", 1.0, "x"),
    ("idle_while_queued_max_s", "idle while another queues: longest", 1.0, "s"),
    ("idle_while_queued_total_s", "idle while another queues: total", 1.0, "s"),
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
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    width = 0.8 / max(len(configs), 1)
    colors = plt.get_cmap("tab10")
    for ax, (key, title, scale, unit) in zip(axes.flat, PANELS, strict=True):
        for j, config in enumerate(configs):
            xs, ys, oxs, oys = [], [], [], []
            for i, workload in enumerate(workloads):
                cell = by_key.get((workload, config), {})
                value = cell.get(key)
                x = i - 0.4 + width * (j + 0.5)
                if value is not None:
                    xs.append(x)
                    ys.append(value * scale)
                if key == "hit_rate" and cell.get("oracle_hit_rate") is not None:
                    oxs.append(x)
                    oys.append(cell["oracle_hit_rate"] * scale)
            ax.bar(xs, ys, width, label=config, color=colors(j % 10))
            if oxs:
                ax.scatter(oxs, oys, marker="_", s=120, color="black", linewidths=1.5, zorder=3)
        if key == "hit_over_oracle":
            ax.axhline(HIT_OF_ORACLE, color="grey", linestyle="--", linewidth=1)
        elif key == "idle_while_queued_max_s":
            ax.axhline(IDLE_MAX_S, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{title} ({unit})", fontsize=10)
        ax.set_xticks(range(len(workloads)))
        tilt = max(map(len, workloads), default=0) > 16  # long names would overlap
        ax.set_xticklabels(
            workloads, fontsize=8, rotation=20 if tilt else 0, ha="right" if tilt else "center"
        )
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
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
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
