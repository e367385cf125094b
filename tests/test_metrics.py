"""The /metrics exposition is valid Prometheus text with the contract's metric names."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from llmlb.metrics import Metrics


def families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render())}


def test_contract_metrics_are_present_and_parse():
    m = Metrics(lambda: [(("10.0.0.1:80",), 3.0), (('we"ird\\',), 0.0)])
    m.picks.inc(("prefix_cache", "10.0.0.1:80", "prefix_hit"))
    m.picks.inc(("prefix_cache", "10.0.0.1:80", "prefix_hit"))
    m.fallbacks.inc(("bad_body",))
    for seconds in (0.000004, 0.00003, 2.0):
        m.pick_duration.observe(seconds)
    f = families(m)
    for name in ("llmlb_picks", "llmlb_pick_duration_seconds", "llmlb_inflight_requests",
                 "llmlb_fallbacks", "llmlb_redis_errors"):  # fmt: skip
        assert name in f, name
    picks = {tuple(s.labels.values()): s.value for s in f["llmlb_picks"].samples if s.name.endswith("_total")}
    assert picks == {("prefix_cache", "10.0.0.1:80", "prefix_hit"): 2.0}
    inflight = {s.labels["endpoint"]: s.value for s in f["llmlb_inflight_requests"].samples}
    assert inflight == {"10.0.0.1:80": 3.0, 'we"ird\\': 0.0}
    hist = {s.name: s for s in f["llmlb_pick_duration_seconds"].samples if "le" not in s.labels}
    assert hist["llmlb_pick_duration_seconds_count"].value == 3
    buckets = {s.labels["le"]: s.value for s in f["llmlb_pick_duration_seconds"].samples if "le" in s.labels}
    assert buckets["1e-05"] == 1
    assert buckets["0.0001"] == 2
    assert buckets["+Inf"] == 3
    redis = [s for s in f["llmlb_redis_errors"].samples if s.name == "llmlb_redis_errors_total"]
    assert redis[0].value == 0
