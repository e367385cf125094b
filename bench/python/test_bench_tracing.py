"""What tracing costs per pick (pytest-benchmark; docs/observability.md#traces quotes the figures).

    pytest bench/python/test_bench_tracing.py --benchmark-enable

- ``observe``: the part on the pick's path (queue the decision, schedule the loop callback; or,
  under an unsampled parent, drop it);
- ``record/unsampled``: making the span of a pick that is not sampled (``sample_ratio: 0``, no
  sampled parent), in the loop callback after the answer went out;
- ``record/sampled``: making a sampled span with the decision's attributes and queueing it for
  the export thread (the exporter here drops it);
- ``export/otlp_grpc``: the export thread's share per span: OTLP protobuf encoding and one gRPC
  call per batch of 64 to a real OpenTelemetry Collector (``make otel-bin``; skipped without it).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmlb.config import Tracing
from llmlb.decision import Decision
from llmlb.tracing import MAX_EXPORT_BATCH, PickTracer, build_exporter

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.otel import collector_binary, start_collector  # noqa: E402

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _decision(traceparent: str = "") -> Decision:
    return Decision.of(
        ticket=1,
        endpoint="10.0.0.2:8000",
        policy="prefix_cache",
        reason="prefix_hit",
        prefix_depth=3,
        prefix_levels=4,
        prompt_tokens=512,
        cached_tokens=384,
        candidates=3,
        score=1.234567,
        runner_up=0.5,
        state="embedded",
        pick_seconds=40e-6,
        time=time.time(),
        request_id="5f0c8a4e-1f6e-4a51-9a53-2b7f7c1b2d10",
        path="/v1/chat/completions",
        model="meta-llama/Llama-3.1-8B-Instruct",
        traceparent=traceparent,
    )


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _tracer(loop: asyncio.AbstractEventLoop, ratio: float, exporter: SpanExporter) -> PickTracer:
    return PickTracer(
        Tracing(otlp_endpoint="http://127.0.0.1:1", sample_ratio=ratio), exporter=exporter, loop=loop
    )


@pytest.mark.parametrize("parent", ["sampled", "unsampled"])
def test_observe(benchmark: Any, loop: asyncio.AbstractEventLoop, parent: str) -> None:
    """The pick's path, worst case: every pick schedules its own callback (a pick under an
    unsampled parent is dropped at once instead)."""
    tracer = _tracer(loop, 1.0, _Drop())
    decision = _decision(TRACEPARENT if parent == "sampled" else TRACEPARENT[:-2] + "00")
    pending = tracer._pending

    def observe() -> None:
        tracer.observe(decision)
        pending.clear()

    benchmark.group = "tracing"
    benchmark(observe)
    tracer.provider.shutdown()


@pytest.mark.parametrize("sampled", [False, True], ids=["unsampled", "sampled"])
def test_record(benchmark: Any, loop: asyncio.AbstractEventLoop, sampled: bool) -> None:
    tracer = _tracer(loop, 1.0 if sampled else 0.0, _Drop())
    decision = _decision()
    benchmark.group = "tracing"
    benchmark(tracer.record, decision)
    tracer.provider.shutdown()


def test_export_per_span(benchmark: Any, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    """One exported batch of MAX_EXPORT_BATCH spans; extra_info gives the cost per span."""
    if not collector_binary().exists():
        pytest.skip("no OpenTelemetry Collector: make otel-bin")
    spans_tracer = _tracer(loop, 1.0, InMemorySpanExporter())
    memory = spans_tracer.processor.span_exporter
    for _ in range(MAX_EXPORT_BATCH):
        spans_tracer.record(_decision(TRACEPARENT))
    spans_tracer.flush()
    assert isinstance(memory, InMemorySpanExporter)
    batch = list(memory.get_finished_spans())
    assert len(batch) == MAX_EXPORT_BATCH
    collector = start_collector(tmp_path / "otel")
    try:
        exporter = build_exporter(Tracing(otlp_endpoint=collector.endpoint))
        assert exporter.export(batch) == SpanExportResult.SUCCESS  # connect once
        benchmark.group = "tracing"
        benchmark.extra_info.update(spans=MAX_EXPORT_BATCH)
        assert benchmark(exporter.export, batch) == SpanExportResult.SUCCESS
        exporter.shutdown()
    finally:
        collector.stop()
        spans_tracer.provider.shutdown()
