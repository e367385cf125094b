"""Traces (``tracing``): the config section, the pick's span (attributes from the decision record,
the request's W3C context as its parent, sampling), the deferred recording, a bounded shutdown,
and the one-line error when the OpenTelemetry packages are missing. Through real Envoy:
tests/e2e/test_tracing.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmlb.config import FLOAT_BOUNDS, REDACTED, ConfigError, Tracing, effective_dict, parse_config
from llmlb.decision import RECORD_FIELDS, Decision

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llmlb.tracing import SPAN_NAME, PickTracer, span_attributes
from tests.support.procs import free_port

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"


def decision(**changes: object) -> Decision:
    values: dict[str, object] = {
        "ticket": 7,
        "endpoint": "10.0.0.2:8000",
        "policy": "prefix_cache",
        "reason": "prefix_hit",
        "prefix_depth": 2,
        "prefix_levels": 3,
        "prompt_tokens": 120,
        "cached_tokens": 80,
        "candidates": 3,
        "score": 1.25,
        "runner_up": 0.5,
        "state": "embedded",
        "pick_seconds": 42e-6,
        "time": time.time(),
        "request_id": "req-1",
        "path": "/v1/chat/completions",
        "model": "m",
        "traceparent": SAMPLED,
        "tracestate": "vendor=x",
    }
    values.update(changes)
    return Decision.of(**values)  # type: ignore[arg-type]


# --- config ------------------------------------------------------------------------------------


def test_tracing_is_off_by_default():
    config = parse_config({})
    assert config.tracing == Tracing()
    assert not config.tracing.enabled
    assert effective_dict(config)["tracing"] == {
        "otlp_endpoint": None,
        "service_name": "llmlb",
        "sample_ratio": 1.0,
        "headers": {},
    }


def test_tracing_section_parses_and_shows_with_headers_redacted(monkeypatch):
    monkeypatch.setenv("OTLP_TOKEN", "s3cret")
    raw = {
        "otlp_endpoint": "https://otel.example:4317/",
        "service_name": "picker-a",
        "sample_ratio": 0.25,
        "headers": {"authorization": "${OTLP_TOKEN}", "x-tenant": "t1"},
    }
    config = parse_config({"tracing": raw})
    tracing = config.tracing
    assert tracing.enabled
    assert tracing.otlp_endpoint == "https://otel.example:4317"
    assert tracing.sample_ratio == 0.25
    assert dict(tracing.headers) == {"authorization": "s3cret", "x-tenant": "t1"}
    assert "s3cret" not in repr(tracing)
    shown = effective_dict(config)["tracing"]
    assert shown["headers"] == {"authorization": REDACTED, "x-tenant": REDACTED}
    assert "s3cret" not in yaml.safe_dump(effective_dict(config))


def test_sample_ratio_bounds_have_one_owner():
    assert FLOAT_BOUNDS["tracing.sample_ratio"] == (0.0, 1.0)
    assert parse_config({"tracing": {"sample_ratio": 0}}).tracing.sample_ratio == 0.0


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        ([], "tracing", "must be a mapping"),
        ({"endpoint": "http://a:4317"}, "tracing.endpoint", "unknown key"),
        ({"otlp_endpoint": "127.0.0.1:4317"}, "tracing.otlp_endpoint", "http://host:port or https://"),
        ({"otlp_endpoint": "grpc://a:4317"}, "tracing.otlp_endpoint", "http://host:port or https://"),
        ({"otlp_endpoint": "http://a:4317/v1/traces"}, "tracing.otlp_endpoint", "http://host:port"),
        ({"otlp_endpoint": "http://a:99999"}, "tracing.otlp_endpoint", "port must be 1..65535"),
        ({"otlp_endpoint": ""}, "tracing.otlp_endpoint", "non-empty string"),
        ({"service_name": 3}, "tracing.service_name", "non-empty string"),
        ({"sample_ratio": 1.5}, "tracing.sample_ratio", "<= 1"),
        ({"sample_ratio": -0.1}, "tracing.sample_ratio", ">= 0"),
        ({"sample_ratio": True}, "tracing.sample_ratio", "must be a number"),
        ({"sample_ratio": float("nan")}, "tracing.sample_ratio", ">= 0"),
        ({"headers": ["a"]}, "tracing.headers", "must be a mapping"),
        ({"headers": {"Authorization": "x"}}, "tracing.headers.Authorization", "lowercase"),
        ({"headers": {"x-bin": "x"}}, "tracing.headers.x-bin", "lowercase"),
        ({"headers": {"a": 1}}, "tracing.headers.a", "must be a string"),
        ({"headers": {"a": "line\nbreak"}}, "tracing.headers.a", "printable ASCII"),
        ({"headers": {"a": "${LLMLB_TEST_UNSET_VARIABLE}"}}, "tracing.headers.a", "is not set"),
    ],
)
def test_bad_tracing_values_name_the_field(raw, field, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config({"tracing": raw})
    assert caught.value.field == field
    assert problem in caught.value.problem


# --- the span ----------------------------------------------------------------------------------


def test_attributes_are_the_decision_record_under_llmlb():
    d = decision()
    attributes = span_attributes(d)
    assert attributes == {f"llmlb.{k}": v for k, v in d.fields().items()}
    assert {k.removeprefix("llmlb.") for k in attributes} == set(RECORD_FIELDS)
    # No runner-up, no request id, no model: left out, not empty.
    lone = span_attributes(decision(runner_up=None, request_id="", model=""))
    assert set(lone) == {f"llmlb.{k}" for k in RECORD_FIELDS} - {
        "llmlb.runner_up",
        "llmlb.request_id",
        "llmlb.model",
    }


def _tracer(ratio: float = 1.0) -> tuple[PickTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    settings = Tracing(otlp_endpoint="http://127.0.0.1:1", sample_ratio=ratio)
    return PickTracer(settings, exporter=exporter, worker=1), exporter


def _record(decisions: list[Decision], ratio: float = 1.0) -> list:
    async def run() -> list:
        tracer, exporter = _tracer(ratio)
        for d in decisions:
            tracer.observe(d)
        # Deferred: nothing is made while the pick's own step runs.
        assert exporter.get_finished_spans() == ()
        await asyncio.sleep(0)
        tracer.flush()
        spans = list(exporter.get_finished_spans())
        await tracer.shutdown()
        return spans

    return asyncio.run(run())


def test_the_span_continues_the_request_trace_context():
    d = decision()
    [span] = _record([d])
    assert span.name == SPAN_NAME
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None
    assert span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.context.trace_state.to_header() == "vendor=x"
    # The pick's real times.
    assert span.end_time == int(d.time * 1e9)
    assert span.end_time - span.start_time == int(d.pick_seconds * 1e9)
    assert dict(span.attributes) == span_attributes(d)
    assert span.resource.attributes["service.name"] == "llmlb"
    assert span.resource.attributes["llmlb.worker"] == 1


@pytest.mark.parametrize(
    "traceparent", ["", "garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01"]
)
def test_without_a_valid_traceparent_the_span_starts_its_own_trace(traceparent):
    [span] = _record([decision(traceparent=traceparent, tracestate="")])
    assert span.parent is None
    assert span.context.trace_id != 0
    assert format(span.context.trace_id, "032x") != TRACE_ID


def test_sampling_follows_the_parent_else_the_ratio():
    sampled_parent = decision(request_id="sampled-parent")
    unsampled_parent = decision(traceparent=UNSAMPLED, request_id="unsampled-parent")
    no_parent = decision(traceparent="", tracestate="", request_id="no-parent")
    everything = [sampled_parent, unsampled_parent, no_parent]
    at_zero = _record(everything, ratio=0.0)
    assert [s.attributes["llmlb.request_id"] for s in at_zero] == ["sampled-parent"]
    at_one = _record(everything, ratio=1.0)
    assert [s.attributes["llmlb.request_id"] for s in at_one] == ["sampled-parent", "no-parent"]


@pytest.mark.parametrize("ratio", [0.0, 1.0])
@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        SAMPLED,
        UNSAMPLED,
        f"00-{TRACE_ID}-{PARENT_ID}-02",  # other flags, not sampled
        f"00-{TRACE_ID}-{PARENT_ID}-03",
        f"00-{'0' * 32}-{PARENT_ID}-00",  # invalid: no parent, so the ratio decides
        f"00-{TRACE_ID}-{'0' * 16}-00",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-00",
        f"01-{TRACE_ID}-{PARENT_ID}-00",
        "garbage",
    ],
)
def test_dropping_early_agrees_with_the_sampler(traceparent, ratio):
    """observe() drops picks it knows will not be sampled, before any span is made: exactly
    those the SDK's sampler would not sample anyway."""

    async def run() -> tuple[int, int]:
        tracer, exporter = _tracer(ratio)
        d = decision(traceparent=traceparent, tracestate="")
        tracer.record(d)
        tracer.flush()
        by_sampler = len(exporter.get_finished_spans())
        exporter.clear()
        tracer.observe(d)
        queued = len(tracer._pending)
        await asyncio.sleep(0)
        tracer.flush()
        assert len(exporter.get_finished_spans()) == by_sampler
        await tracer.shutdown()
        return by_sampler, queued

    by_sampler, queued = asyncio.run(run())
    if by_sampler:
        assert queued == 1


def test_ratio_zero_exports_nothing_without_a_sampled_parent():
    assert _record([decision(traceparent="", tracestate="") for _ in range(50)], ratio=0.0) == []


def test_ratio_samples_about_that_share_of_new_traces():
    spans = _record([decision(traceparent="", tracestate="") for _ in range(2000)], ratio=0.25)
    assert 350 < len(spans) < 650


def test_a_failing_span_never_reaches_the_pick(caplog):
    async def run() -> None:
        tracer, exporter = _tracer()
        tracer.observe(decision(time="not a time"))  # makes record() raise
        tracer.observe(decision())
        await asyncio.sleep(0)
        tracer.flush()
        assert len(exporter.get_finished_spans()) == 1
        await tracer.shutdown()

    asyncio.run(run())
    assert "could not record the span" in caplog.text


def test_shutdown_is_bounded_when_the_receiver_is_unreachable():
    async def run() -> float:
        tracer = PickTracer(Tracing(otlp_endpoint=f"http://127.0.0.1:{free_port()}"))
        for _ in range(100):
            tracer.observe(decision())
        await asyncio.sleep(0)
        started = time.monotonic()
        await tracer.shutdown()
        return time.monotonic() - started

    assert asyncio.run(run()) <= 5.5


# --- missing packages --------------------------------------------------------------------------


def test_check_config_without_the_packages_is_a_one_line_config_error(tmp_path, monkeypatch, capsys):
    from llmlb.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tracing": {"otlp_endpoint": "http://127.0.0.1:4317"}}))
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "tracing.otlp_endpoint" in err
    assert "pip install 'llmlb[tracing]'" in err


def test_serve_without_the_packages_exits_2_with_one_line(tmp_path):
    # A regular package named `opentelemetry` ahead on the path hides the installed one.
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named opentelemetry (test)')\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"tracing": {"otlp_endpoint": "http://127.0.0.1:4317"}}))
    # The llmlb under test, whatever the working directory.
    import llmlb

    here = str(Path(llmlb.__file__).resolve().parents[1])
    path = os.pathsep.join([str(tmp_path / "shadow"), here, os.environ.get("PYTHONPATH", "")])
    for workers in ("1", "2"):
        result = subprocess.run(
            [
                *(sys.executable, "-m", "llmlb", "serve", "--config", str(config)),
                *("--endpoints", "10.0.0.1:80", "--grpc-listen", "127.0.0.1:0"),
                *("--admin-listen", "127.0.0.1:0", "--workers", workers),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": path},
            check=False,
            cwd=Path(__file__).parent,
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "tracing.otlp_endpoint" in lines[0]
        assert "llmlb[tracing]" in lines[0]
