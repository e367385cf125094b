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
    picks = [(s.labels, s.value) for s in f["llmlb_picks"].samples]
    assert picks == [({"policy": "prefix_cache", "endpoint": "10.0.0.1:80", "reason": "prefix_hit"}, 2.0)]
    assert m.picks.get(("prefix_cache", "10.0.0.1:80", "prefix_hit")) == 2.0
    assert m.picks.get(("prefix_cache", "10.0.0.2:80", "prefix_hit")) == 0.0
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


def test_live_families_are_read_at_scrape_time():
    m = Metrics(lambda: [])
    lookups = [0.0]
    m.prefix_lookups.samples = lambda: [((), lookups[0])]
    m.endpoint_backlog.samples = lambda: [(("a:1",), 512.0)]
    lookups[0] = 7.0
    f = families(m)
    assert [(s.name, s.value) for s in f["llmlb_prefix_table_lookups"].samples] == [
        ("llmlb_prefix_table_lookups_total", 7.0)
    ]
    assert f["llmlb_prefix_table_lookups"].type == "counter"
    assert [(s.labels, s.value) for s in f["llmlb_endpoint_load_backlog_tokens"].samples] == [
        ({"endpoint": "a:1"}, 512.0)
    ]
    # A family nobody fills in is exported empty (HELP/TYPE only), never as a made-up zero.
    assert f["llmlb_discovery_up"].samples == []


def test_no_created_series():
    """``_created`` series are off: they double the scrape and no panel uses them."""
    m = Metrics(lambda: [])
    m.picks.inc(("p", "e", "r"))
    assert "_created" not in m.render()


def test_workers_merge_family_by_family():
    """A series first seen in a later worker lands in its own family, and every family combines
    by its own rule: sums of this-process counts, the min of a shared "up", the max of a shared
    view."""
    from llmlb.workers import merge_live_families

    workers = []
    for index in range(2):
        m = Metrics(lambda index=index: [(("a:1",), 1.0)] + ([(("b:2",), 4.0)] if index else []))
        m.redis_up.set(float(index))  # worker 0 lost Redis
        m.endpoint_backlog.samples = lambda index=index: [(("a:1",), 100.0 * (index + 1))]
        m.prefix_insertions.samples = lambda: [((), 3.0)]
        workers.append(m.render())
    rules = {live.name: live.across_workers for live in Metrics(lambda: []).live()}
    pages = [list(text_string_to_metric_families(text)) for text in workers]
    merged = {f.name: f for f in merge_live_families(pages, rules)}
    inflight = {s.labels["endpoint"]: s.value for s in merged["llmlb_inflight_requests"].samples}
    assert inflight == {"a:1": 2.0, "b:2": 4.0}
    assert [s.value for s in merged["llmlb_redis_up"].samples] == [0.0]
    assert [s.value for s in merged["llmlb_endpoint_load_backlog_tokens"].samples] == [200.0]
    assert [(s.name, s.value) for s in merged["llmlb_prefix_table_insertions"].samples] == [
        ("llmlb_prefix_table_insertions_total", 6.0)
    ]
    # Counted-here families come from the multiprocess directory, not from the pages.
    assert "llmlb_picks" not in merged


def test_fast_paths_count_as_the_client_does():
    """Counter.inc and Histogram.observe add to the client's value holders directly: the page
    is the one the public methods make (bucket edges included)."""
    import random

    import prometheus_client
    from prometheus_client import CollectorRegistry, generate_latest

    from llmlb.metrics import PICK_BUCKETS, Counter, Histogram

    rng = random.Random(5)
    values = [*PICK_BUCKETS, 0.0, 2.0, *(rng.uniform(0, 0.003) for _ in range(500))]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = Histogram(ours, "h", "h.", PICK_BUCKETS)
    public = prometheus_client.Histogram("h", "h.", buckets=PICK_BUCKETS, registry=theirs)
    fast_counter = Counter(ours, "c_total", "c.", ("a",))
    public_counter = prometheus_client.Counter("c_total", "c.", ("a",), registry=theirs)
    for i, value in enumerate(values):
        fast.observe(value)
        public.observe(value)
        fast_counter.inc((str(i % 3),), value)
        public_counter.labels(str(i % 3)).inc(value)
    assert fast.observe == fast._observe, "the fast path is in use"
    assert generate_latest(ours) == generate_latest(theirs)
