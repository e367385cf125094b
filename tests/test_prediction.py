"""The prediction check's arithmetic: mirrored engine counters (restarts), the sliding window,
the tracker's ratios and metrics, the config block, and the counters read from real pages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llmlb._core import parse_engine_metrics
from llmlb.config import ConfigError, Prediction, effective_dict, parse_config, prediction_enabled
from llmlb.daemon import Daemon
from llmlb.metrics import Metrics
from llmlb.prediction import EngineCounters, Figures, PredictionTracker, Snapshot, Window
from llmlb.sim.engine import Engine, EngineConfig
from llmlb.sim.metrics import render
from tests.support.procs import metric_sum, parse_metrics


@dataclass
class Pick:
    endpoint: str
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Page:
    prefix_cache_queries: float | None
    prefix_cache_hits: float | None
    engine: str = "vllm"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- mirrored counters ------------------------------------------------------------------------


def test_counters_mirror_deltas_from_the_first_reading():
    c = EngineCounters()
    c.update(5000, 4000, now=1.0)  # history before llmlb looked: not counted
    assert (c.queries, c.hits, c.resets) == (0, 0, 0)
    c.update(5100, 4090, now=2.0)
    c.update(5100, 4090, now=3.0)
    assert (c.queries, c.hits, c.resets) == (100, 90, 0)


@pytest.mark.parametrize(("queries", "hits"), [(30, 20), (30, 5000), (6000, 10)])
def test_a_counter_going_down_is_a_restart_counted_from_zero(queries, hits):
    c = EngineCounters()
    c.update(5000, 4000, now=1.0)
    c.update(5100, 4090, now=2.0)
    c.update(queries, hits, now=3.0)  # either counter below its last reading: both restarted
    assert c.resets == 1
    assert (c.queries, c.hits) == (100 + queries, 90 + hits)
    c.update(queries + 10, hits + 1, now=4.0)
    assert (c.queries, c.hits, c.resets) == (110 + queries, 91 + hits, 1)


def test_mirrored_counters_never_go_down():
    readings = [(0, 0), (50, 40), (80, 60), (10, 2), (0, 0), (40, 30), (41, 30), (5, 5)]
    c = EngineCounters()
    seen = []
    for t, (q, h) in enumerate(readings):
        c.update(q, h, now=float(t))
        seen.append((c.queries, c.hits))
    assert seen == sorted(seen)
    assert c.resets == 3
    assert seen[-1] == (80 + 10 + 40 + 1 + 5, 60 + 2 + 30 + 5)


# --- the window ---------------------------------------------------------------------------------


def snap(at: float, cached: int, prompt: int, hits: float | None = None, queries: float | None = None):
    engine = None if hits is None or queries is None else (hits, queries)
    return Snapshot(at=at, cached=cached, prompt=prompt, engine=engine)


def test_window_ratios_are_deltas_between_the_same_snapshots():
    w = Window(span=10.0)
    w.add(snap(0.0, 0, 0, 0, 0))
    w.add(snap(5.0, 800, 1000, 450, 500))
    w.add(snap(10.0, 1600, 2000, 900, 1000))
    f = w.figures(now=10.0)
    assert f == Figures(predicted=0.8, engine=0.9)
    assert f.accuracy == pytest.approx(0.9 / 0.8)


def test_window_forgets_what_is_older_than_its_span():
    w = Window(span=10.0)
    w.add(snap(0.0, 0, 0, 0, 0))
    w.add(snap(10.0, 1000, 1000, 1000, 1000))  # all hits in the first ten seconds
    w.add(snap(20.0, 2000, 2000, 1000, 2000))  # predicted hits, the engine missed
    assert [s.at for s in w.snapshots] == [10.0, 20.0]
    f = w.figures(now=20.0)
    assert f == Figures(predicted=1.0, engine=0.0)
    assert f.accuracy == 0.0


def test_window_keeps_one_snapshot_before_the_span_so_it_covers_all_of_it():
    w = Window(span=10.0)
    for t in range(0, 31, 3):
        w.add(snap(float(t), t * 10, t * 20))
    assert w.snapshots[0].at <= 30 - 10 < w.snapshots[1].at


def test_window_with_nothing_recent_or_no_traffic_has_no_figures():
    w = Window(span=10.0)
    assert w.figures(now=0.0) == Figures(None, None)
    w.add(snap(0.0, 0, 0, 0, 0))
    assert w.figures(now=0.0) == Figures(None, None)  # one snapshot: no delta
    w.add(snap(5.0, 0, 0, 0, 0))
    assert w.figures(now=5.0) == Figures(None, None)  # no prompts, no lookups: no ratio
    w.add(snap(6.0, 10, 20, 3, 4))
    assert w.figures(now=6.0) == Figures(0.5, 0.75)
    assert w.figures(now=16.1) == Figures(None, None)  # stale: no old figure shown as current


def test_window_engine_ratio_spans_only_snapshots_with_a_reading():
    w = Window(span=100.0)
    w.add(snap(0.0, 0, 0))  # no engine reading yet
    w.add(snap(1.0, 100, 100, 0, 0))
    w.add(snap(2.0, 200, 300))  # the scrape failed this tick
    w.add(snap(3.0, 260, 400, 30, 60))
    f = w.figures(now=3.0)
    # Both ratios between t=1 and t=3 (the same instants), not from t=0.
    assert f == Figures(predicted=160 / 300, engine=0.5)
    w2 = Window(span=100.0)
    w2.add(snap(0.0, 0, 0))
    w2.add(snap(1.0, 50, 100))
    assert w2.figures(now=1.0) == Figures(predicted=0.5, engine=None)


def test_accuracy_needs_a_predicted_hit():
    assert Figures(predicted=0.0, engine=0.5).accuracy is None
    assert Figures(predicted=None, engine=0.5).accuracy is None
    assert Figures(predicted=0.5, engine=None).accuracy is None
    assert Figures(predicted=0.5, engine=0.25).accuracy == 0.5


# --- the tracker ---------------------------------------------------------------------------------


def test_tracker_compares_predictions_with_engine_readings_per_endpoint():
    clock = Clock()
    t = PredictionTracker(window_s=30, interval_s=1, clock=clock)
    metrics = Metrics(lambda: [])
    t.wire(metrics)
    eps = ["10.0.0.1:8000", "10.0.0.2:8000"]
    for ep in eps:
        t.engine_sample(ep, Page(1000, 500))  # type: ignore[arg-type]
    t.tick(eps)
    for _ in range(10):
        clock.now += 1
        t.observe(Pick(eps[0], prompt_tokens=100, cached_tokens=90))
        t.observe(Pick(eps[1], prompt_tokens=100, cached_tokens=90))
        t.observe(Pick(eps[1], prompt_tokens=0, cached_tokens=0))  # size unknown: no prediction
        qa, ha = 1000 + 120 * (clock.now - 1000), 500 + 108 * (clock.now - 1000)  # hits 90 %
        qb, hb = 1000 + 120 * (clock.now - 1000), 500 + 12 * (clock.now - 1000)  # hits 10 %
        t.engine_sample(eps[0], Page(qa, ha))  # type: ignore[arg-type]
        t.engine_sample(eps[1], Page(qb, hb))  # type: ignore[arg-type]
        t.tick(eps)
    a, b = t.figures(eps[0]), t.figures(eps[1])
    assert a.predicted == pytest.approx(0.9)
    assert a.engine == pytest.approx(0.9)
    assert a.accuracy == pytest.approx(1.0)
    assert b.predicted == pytest.approx(0.9)
    assert b.engine == pytest.approx(0.1)
    assert b.accuracy == pytest.approx(0.1 / 0.9)
    assert t.view(eps[1]) == {
        "predicted_hit_ratio": b.predicted,
        "engine_hit_ratio": b.engine,
        "prediction_accuracy": b.accuracy,
    }

    samples = parse_metrics(metrics.render())
    for name, want in [
        ("llmlb_predicted_prompt_tokens_total", 1000),
        ("llmlb_predicted_cached_tokens_total", 900),
        ("llmlb_engine_prefix_cache_queries_total", 1200),
    ]:
        assert metric_sum(samples, name, endpoint=eps[1]) == want, name
    assert metric_sum(samples, "llmlb_engine_prefix_cache_hits_total", endpoint=eps[1]) == 120
    assert metric_sum(samples, "llmlb_prefix_hit_ratio_engine", endpoint=eps[0]) == pytest.approx(0.9)
    assert metric_sum(samples, "llmlb_prefix_prediction_accuracy", endpoint=eps[1]) == pytest.approx(1 / 9)

    # An endpoint leaving the pool takes its figures and series with it.
    t.tick(eps[:1])
    assert t.figures(eps[1]) == Figures(None, None)
    assert all(s.labels.get("endpoint") != eps[1] for s in parse_metrics(metrics.render()))


def test_tracker_ignores_pages_without_counters_and_stale_readings():
    clock = Clock()
    t = PredictionTracker(window_s=30, interval_s=1, clock=clock)
    ep = "10.0.0.1:8000"
    t.engine_sample(ep, Page(None, 5))  # type: ignore[arg-type]  # trtllm-serve: no counters
    for _ in range(3):
        clock.now += 1
        t.observe(Pick(ep, prompt_tokens=100, cached_tokens=50))
        t.tick([ep])
    assert t.figures(ep) == Figures(predicted=0.5, engine=None)
    # A reading is used by the next tick only: ticks after it see no fresh reading.
    clock.now += 0.5
    t.engine_sample(ep, Page(100, 10))  # type: ignore[arg-type]
    clock.now += 0.5
    t.tick([ep])
    clock.now += 1
    t.tick([ep])
    assert [s.engine for s in t._windows[ep].snapshots][-2:] == [(0, 0), None]


def test_workers_other_than_the_first_only_count_predictions():
    t = PredictionTracker(window_s=30, interval_s=1, engine_side=False)
    metrics = Metrics(lambda: [])
    t.wire(metrics)
    t.observe(Pick("10.0.0.1:8000", prompt_tokens=10, cached_tokens=4))
    names = {s.name for s in parse_metrics(metrics.render())}
    assert "llmlb_predicted_cached_tokens_total" in names
    assert "llmlb_engine_prefix_cache_queries_total" not in names
    assert "llmlb_prefix_hit_ratio_predicted" not in names


# --- config ----------------------------------------------------------------------------------------


def test_prediction_is_on_by_default_with_prefix_cache_only():
    assert prediction_enabled(parse_config({}))
    assert not prediction_enabled(parse_config({"lb_policy": "least_busy"}))
    assert not prediction_enabled(parse_config({"lb_policy": "global_least_request"}))
    on = parse_config({"lb_policy": "least_busy", "prediction": {"enabled": True}})
    assert prediction_enabled(on)
    off = parse_config({"prediction": {"enabled": False}})
    assert not prediction_enabled(off)
    assert parse_config({}).prediction == Prediction(enabled=None, interval=5000, window=60)
    assert effective_dict(parse_config({}))["prediction"] == {
        "enabled": "auto",
        "interval": 5000,
        "window": 60,
    }
    assert effective_dict(off)["prediction"]["enabled"] is False
    assert parse_config({"prediction": {"enabled": "auto"}}).prediction.enabled is None


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        ({"prediction": {"enabled": "yes"}}, "prediction.enabled", "true, false or auto"),
        ({"prediction": {"windows": 5}}, "prediction.windows", "unknown key"),
        ({"prediction": [1]}, "prediction", "mapping"),
        ({"prediction": {"interval": 5000, "window": 9}}, "prediction.window", "two readings"),
        ({"prediction": {"interval": 50}}, "prediction.interval", ">= 100"),
    ],
)
def test_prediction_config_errors_name_the_field(raw, field, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        parse_config(raw)
    assert err.value.field == field


# --- wiring ------------------------------------------------------------------------------------------


def test_one_scrape_serves_least_busy_and_the_check():
    config = parse_config(
        {"lb_policy": "least_busy", "endpoints": ["127.0.0.1:1"], "prediction": {"enabled": True}}
    )
    daemon = Daemon(config)
    tracker = daemon.prediction
    assert tracker is not None
    assert daemon.scraper is not None
    assert daemon.scraper.on_values == tracker.engine_sample
    assert tracker.scraper is None  # no GET of its own
    assert tracker.observe in daemon.picker.observers


def test_other_policies_read_the_engines_themselves_or_not_at_all():
    daemon = Daemon(parse_config({"endpoints": ["127.0.0.1:1"]}))  # prefix_cache: on
    assert daemon.prediction is not None
    assert daemon.prediction.scraper is not None
    assert daemon.scraper is None
    assert Daemon(parse_config({"lb_policy": "global_least_request"})).prediction is None


# --- the counters on real pages ----------------------------------------------------------------


def test_the_sims_page_gives_the_counters_the_tracker_reads():
    engine = Engine(EngineConfig())
    engine.stats.prefix_queries, engine.stats.prefix_hits = 12_345, 6_789
    page = render(engine, None, created=1.7e9)
    kind, values = parse_engine_metrics(page.encode())
    assert kind == "vllm"
    assert (values.prefix_cache_queries, values.prefix_cache_hits) == (12_345, 6_789)
