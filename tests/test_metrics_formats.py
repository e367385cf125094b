"""The fake backends' /metrics pages: each engine's exact Prometheus text, with values set at run time.

Unit tests of `tests/support/metrics_formats.py`, plus one real backend process driven over HTTP.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from tests.support.metrics_formats import (
    ENGINES,
    MetricsState,
    MetricsStateError,
    cpp_float,
    go_float,
    render_metrics,
)
from tests.support.procs import get, post, start_backends, stop_all, wait_until

NOW = 1_752_345_678.25
MODEL = "test-model"

# Where each engine reports the three load gauges: (metric name, labels the series must carry).
GAUGES: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
    "vllm": {
        "waiting": ("vllm:num_requests_waiting", {"engine": "0", "model_name": MODEL}),
        "running": ("vllm:num_requests_running", {"engine": "0", "model_name": MODEL}),
        "kv": ("vllm:kv_cache_usage_perc", {"engine": "0", "model_name": MODEL}),
    },
    "vllm-old": {
        "waiting": ("vllm:num_requests_waiting", {"engine": "0", "model_name": MODEL}),
        "running": ("vllm:num_requests_running", {"engine": "0", "model_name": MODEL}),
        "kv": ("vllm:gpu_cache_usage_perc", {"engine": "0", "model_name": MODEL}),
    },
    "sglang": {
        "waiting": ("sglang:num_queue_reqs", {"model_name": MODEL}),
        "running": ("sglang:num_running_reqs", {"model_name": MODEL}),
        "kv": ("sglang:token_usage", {"model_name": MODEL}),
    },
    "trtllm-serve": {
        "waiting": ("trtllm_num_requests_waiting", {"model_name": MODEL, "engine_type": "trtllm"}),
        "running": ("trtllm_num_requests_running", {"model_name": MODEL, "engine_type": "trtllm"}),
        "kv": ("trtllm_kv_cache_utilization", {"model_name": MODEL, "engine_type": "trtllm"}),
    },
    "triton": {
        "waiting": ("nv_trt_llm_request_metrics", {"model": "tensorrt_llm", "request_type": "waiting"}),
        "running": ("nv_trt_llm_request_metrics", {"model": "tensorrt_llm", "request_type": "scheduled"}),
        "kv": (
            "nv_trt_llm_kv_cache_block_metrics",
            {"model": "tensorrt_llm", "kv_cache_block_type": "fraction"},
        ),
    },
}
assert tuple(GAUGES) == ENGINES


def parse(text: str) -> list[Sample]:
    """Every sample, after checking that prometheus_client parses the page into typed families only."""
    families = list(text_string_to_metric_families(text))
    untyped = [f.name for f in families if f.type in ("unknown", "untyped")]
    assert not untyped, f"samples outside any # TYPE'd family: {untyped}"
    samples = [s for f in families for s in f.samples]
    keys = [(s.name, tuple(sorted(s.labels.items()))) for s in samples]
    assert len(keys) == len(set(keys)), "duplicate series"
    return samples


def values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]


def gauge(samples: list[Sample], engine: str, metric: str) -> float | None:
    """The engine's value for a logical metric, None when the series is absent (must be unique)."""
    name, labels = GAUGES[engine][metric]
    found = values(samples, name, **labels)
    assert len(found) <= 1, (engine, metric, found)
    return found[0] if found else None


def render(engine: str, concurrent: float = 0, served: int = 0, **state: Any) -> str:
    return render_metrics(engine, MetricsState(**state), concurrent, served=served, now=NOW)


# --------------------------------------------------------------------------------------------------
# the pages


@pytest.mark.parametrize("engine", ENGINES)
def test_each_page_parses_and_carries_the_state(engine: str) -> None:
    text = render(engine, concurrent=9, waiting=7, running=3, kv=0.42)
    assert text.endswith("\n")
    assert all(line.strip() for line in text.splitlines()), "no blank lines"
    samples = parse(text)
    assert gauge(samples, engine, "waiting") == 7
    assert gauge(samples, engine, "running") == 3
    assert gauge(samples, engine, "kv") == pytest.approx(0.42)
    # The gauges sit among many other families, as on the real servers.
    assert len({s.name for s in samples}) > 15


@pytest.mark.parametrize("engine", ENGINES)
def test_defaults_report_the_live_request_count_no_queue_and_a_tenth_of_the_cache(engine: str) -> None:
    samples = parse(render(engine, concurrent=4))
    assert (gauge(samples, engine, "waiting"), gauge(samples, engine, "running")) == (0, 4)
    assert gauge(samples, engine, "kv") == pytest.approx(0.1)
    assert gauge(parse(render(engine, concurrent=0)), engine, "running") == 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("omitted", ["waiting", "running", "kv"])
def test_an_omitted_metric_is_left_out_and_the_rest_stays(engine: str, omitted: str) -> None:
    samples = parse(render(engine, concurrent=2, waiting=5, kv=0.5, omit=[omitted]))
    expected = {"waiting": 5.0, "running": 2.0, "kv": 0.5}
    for metric, value in expected.items():
        assert gauge(samples, engine, metric) == (None if metric == omitted else pytest.approx(value))
    name = GAUGES[engine][omitted][0]
    if engine == "triton":  # a series of a shared family: the family stays
        assert values(samples, name)
    else:
        assert not values(samples, name)
        assert f"# TYPE {name} " not in render(engine, omit=[omitted])


def test_vllm_old_names_the_kv_gauge_gpu_cache_usage_perc() -> None:
    new, old = parse(render("vllm", kv=0.3)), parse(render("vllm-old", kv=0.3))
    assert values(new, "vllm:kv_cache_usage_perc") == [0.3]
    assert not values(new, "vllm:gpu_cache_usage_perc")
    assert values(old, "vllm:gpu_cache_usage_perc") == [0.3]
    assert not values(old, "vllm:kv_cache_usage_perc")


@pytest.mark.parametrize("engine", ["vllm", "vllm-old"])
def test_vllm_prefix_cache_counters_grow_with_served_requests(engine: str) -> None:
    before, after = parse(render(engine, served=0)), parse(render(engine, served=10))
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        (b,), (a,) = values(before, name), values(after, name)
        assert 0 < b < a, name
    (queries,), (hits,) = (
        values(after, "vllm:prefix_cache_queries_total"),
        values(after, "vllm:prefix_cache_hits_total"),
    )
    assert hits <= queries
    # prometheus_client stamps each counter with a *_created gauge family.
    assert values(after, "vllm:prefix_cache_queries_created")


def test_vllm_page_has_the_surrounding_families() -> None:
    text = render("vllm")
    samples = parse(text)
    for name in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert values(samples, f"{name}_bucket", le="+Inf") == values(samples, f"{name}_count")
    assert values(samples, "vllm:prompt_tokens_total")
    assert values(samples, "process_start_time_seconds") == [pytest.approx(NOW - 5400, abs=1)]
    assert len(values(samples, "python_gc_objects_collected_total")) == 3
    assert 'vllm:num_requests_waiting{engine="0",model_name="test-model"} 0.0\n' in text


@pytest.mark.parametrize("engine", ENGINES)
def test_histograms_are_cumulative_and_end_at_their_count(engine: str) -> None:
    families = list(text_string_to_metric_families(render(engine, served=37)))
    histograms = [f for f in families if f.type == "histogram"]
    assert histograms
    for family in histograms:
        buckets = [s for s in family.samples if s.name.endswith("_bucket")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts), family.name
        assert buckets[-1].labels["le"] == "+Inf"
        (count,) = [s.value for s in family.samples if s.name.endswith("_count")]
        assert counts[-1] == count, family.name


def test_each_engine_writes_numbers_its_own_way() -> None:
    assert (
        'sglang:num_queue_reqs{engine_type="unified",model_name="test-model",pp_rank="0",tp_rank="0"} 3.0'
        in render("sglang", waiting=3)
    )
    assert 'trtllm_num_requests_waiting{engine_type="trtllm",model_name="test-model"} 3.0' in (
        render("trtllm-serve", waiting=3)
    )
    triton = render("triton", waiting=3, kv=0.25)
    assert 'nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3\n' in triton
    assert 'kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.25\n' in triton
    assert "_created" not in triton + render("sglang") + render("trtllm-serve")


@pytest.mark.parametrize(
    "value", [0.0, 1.0, 0.1, 3.25, 123456.0, 1234567.0, 1e6, 43_284_316_160.0, 1.752345678123e9, 1e-5, 5e22]
)
def test_number_formatting_matches_the_client_libraries(value: float) -> None:
    assert go_float(value) == floatToGoString(value)  # type: ignore[no-untyped-call]
    assert float(go_float(value)) == value
    assert float(cpp_float(value)) == value
    assert go_float(math.inf) == cpp_float(math.inf) == "+Inf"


def test_triton_kv_block_counts_follow_the_fraction() -> None:
    samples = parse(render("triton", kv=0.5))
    (used,), (free,), (total,) = (
        values(samples, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type=kind)
        for kind in ("used", "free", "max")
    )
    assert used + free == total
    assert used / total == pytest.approx(0.5, abs=1e-3)


# --------------------------------------------------------------------------------------------------
# LoRA


def lora_series(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.name == "vllm:lora_requests_info"]


@pytest.mark.parametrize("engine", ["vllm", "vllm-old"])
def test_lora_info_has_a_current_and_an_older_stale_series(engine: str) -> None:
    samples = parse(render(engine, running_lora=["a", "b"], waiting_lora=["c"], max_lora=4))
    series = lora_series(samples)
    assert len(series) == 2
    newest = max(series, key=lambda s: s.value)
    stale = min(series, key=lambda s: s.value)
    assert newest.labels == {"running_lora_adapters": "a,b", "waiting_lora_adapters": "c", "max_lora": "4"}
    assert newest.value == pytest.approx(NOW)
    assert stale.value < newest.value
    assert stale.labels["running_lora_adapters"] != "a,b"
    assert series[-1] is stale, "the stale series comes last, so 'last one wins' is wrong"


def test_lora_info_appears_only_when_lora_is_configured() -> None:
    assert not lora_series(parse(render("vllm")))
    idle = lora_series(parse(render("vllm", max_lora=2)))
    assert max(idle, key=lambda s: s.value).labels["running_lora_adapters"] == ""
    assert lora_series(parse(render("vllm", waiting_lora=["x"])))
    assert not lora_series(parse(render("vllm", max_lora=2, omit=["lora"])))
    for engine in ("sglang", "trtllm-serve", "triton"):
        assert "lora" not in render(engine, max_lora=2, running_lora=["x"])


def test_the_stale_lora_series_never_collides_with_the_current_one() -> None:
    state: dict[str, Any] = {
        "running_lora": ["stale-adapter"],
        "waiting_lora": ["stale-adapter"],
        "max_lora": 1,
    }
    series = lora_series(parse(render("vllm", **state)))
    assert len({tuple(sorted(s.labels.items())) for s in series}) == 2


# --------------------------------------------------------------------------------------------------
# garbage, status, and state updates


@pytest.mark.parametrize("engine", ENGINES)
def test_garbage_replaces_the_page_verbatim(engine: str) -> None:
    for junk in ("<html><body>502 Bad Gateway</body></html>", "", "vllm:x{ 1 2\n\x00\xff"):
        assert render(engine, garbage=junk) == junk


def test_status_and_delay_leave_the_page_alone() -> None:
    assert render("vllm", status=503, delay_ms=20) == render("vllm")


def test_unknown_engine_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        render_metrics("tgi", MetricsState())


def test_updates_apply_a_subset_and_return_a_copy() -> None:
    state = MetricsState()
    new = state.updated({"waiting": 4, "running_lora": ["a"], "garbage": "x", "running": 2})
    assert (new.waiting, new.running_lora, new.garbage, new.running, new.kv) == (4, ["a"], "x", 2, 0.1)
    assert state == MetricsState()
    assert new.updated({"running": None, "garbage": None}).running is None
    assert MetricsState().to_json() == {
        "waiting": 0,
        "running": None,
        "kv": 0.1,
        "running_lora": [],
        "waiting_lora": [],
        "max_lora": 0,
        "omit": [],
        "status": 200,
        "delay_ms": 0,
        "garbage": None,
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"queue": 1}, "unknown MetricsState field 'queue'"),
        ({"waiting": "3"}, "waiting must be a number"),
        ({"waiting": True}, "waiting must be a number"),
        ({"running": [1]}, "running must be a number"),
        ({"kv": None}, "kv must be a number"),
        ({"max_lora": 1.5}, "max_lora must be an integer"),
        ({"max_lora": -1}, "max_lora must be between"),
        ({"running_lora": "a,b"}, "running_lora must be a list of strings"),
        ({"waiting_lora": ["a,b"]}, "no comma"),
        ({"omit": ["queue"]}, "unknown metrics"),
        ({"status": "500"}, "status must be an integer"),
        ({"status": 99}, "status must be between"),
        ({"delay_ms": -5}, "delay_ms must be between"),
        ({"garbage": 5}, "garbage must be a string or null"),
    ],
)
def test_bad_updates_are_refused_with_a_message_and_change_nothing(
    changes: dict[str, Any], message: str
) -> None:
    state = MetricsState(waiting=1)
    with pytest.raises(MetricsStateError, match=message):
        state.updated({"waiting": 9, **changes})
    assert state == MetricsState(waiting=1)


# --------------------------------------------------------------------------------------------------
# a real backend process


def scrape(url: str) -> tuple[int, str]:
    reply = get(f"{url}/metrics")
    return reply.status, reply.text()


def test_a_backend_serves_the_metrics_set_over_http(tmp_path: Path) -> None:
    (backend,) = start_backends(1, tmp_path, engine="sglang")
    try:
        status, text = scrape(backend.url)
        assert status == 200
        samples = parse(text)
        assert (gauge(samples, "sglang", "waiting"), gauge(samples, "sglang", "running")) == (0, 0)
        assert gauge(samples, "sglang", "kv") == pytest.approx(0.1)

        state = backend.set_metrics(waiting=5, kv=0.7, running=2)
        assert (state["waiting"], state["kv"], state["running"], state["status"]) == (5, 0.7, 2, 200)
        status, text = scrape(backend.url)
        samples = parse(text)
        assert [gauge(samples, "sglang", m) for m in ("waiting", "running", "kv")] == [5, 2, 0.7]
        assert get(f"{backend.url}/_metrics").json() == state

        # Bad updates: 400 with a message, state unchanged.
        for body, message in [
            ({"queue": 1}, "unknown MetricsState field"),
            ({"kv": "high"}, "kv must be a number"),
            ([1, 2], "expected a JSON object"),
            ("{not json", "not JSON"),
        ]:
            reply = post(f"{backend.url}/_metrics", body)
            assert reply.status == 400, reply
            assert message in reply.json()["error"]
        assert get(f"{backend.url}/_metrics").json() == state

        # Status and garbage; /_reset clears the scrape count but not the metrics state.
        backend.set_metrics(status=503)
        status, text = scrape(backend.url)
        assert status == 503
        assert gauge(parse(text), "sglang", "waiting") == 5
        backend.set_metrics(status=200, garbage="<html>oops</html>")
        reply = get(f"{backend.url}/metrics")
        assert (reply.status, reply.text()) == (200, "<html>oops</html>")
        assert backend.stats()["metrics_scrapes"] == 4
        backend.reset()
        assert backend.stats()["metrics_scrapes"] == 0
        assert get(f"{backend.url}/_metrics").json()["garbage"] == "<html>oops</html>"

        # running=None reports the live count of in-flight inference requests.
        backend.set_metrics(garbage=None, running=None, omit=["kv"])
        slow = threading.Thread(
            target=post,
            args=(f"{backend.url}/v1/chat/completions", {"messages": []}),
            kwargs={"headers": {"x-test-delay-ms": "1500"}},
        )
        slow.start()
        try:
            wait_until(
                lambda: gauge(parse(scrape(backend.url)[1]), "sglang", "running") == 1,
                timeout=5,
                message="running = 1 while a request is in flight",
            )
            assert gauge(parse(scrape(backend.url)[1]), "sglang", "kv") is None
        finally:
            slow.join(10)
        assert gauge(parse(scrape(backend.url)[1]), "sglang", "running") == 0
    finally:
        stop_all(b.proc for b in [backend])


def test_a_backend_without_an_engine_has_no_metrics(tmp_path: Path) -> None:
    (backend,) = start_backends(1, tmp_path, prefix="n", engine="none")
    try:
        assert get(f"{backend.url}/metrics").status == 404
        assert backend.set_metrics(waiting=1)["waiting"] == 1
        assert backend.stats()["metrics_scrapes"] == 0
    finally:
        stop_all([backend.proc])
