"""Traces: a span per pick, exported over OTLP/gRPC (``tracing`` in the config).

A :class:`PickTracer` is a ``Picker`` observer. On the pick's own path it only queues the decision;
the span is made in a callback the event loop runs after the pick's answer went to Envoy, and a
``BatchSpanProcessor`` thread exports the spans. The span ``llmlb.pick`` (kind SERVER) continues
the W3C trace context of the request's ``traceparent``/``tracestate`` headers, spans the pick's
real start and end, and carries the decision record (``Decision.fields()``) as ``llmlb.*``
attributes. Sampling is ``ParentBased(TraceIdRatioBased(sample_ratio))``: a sampled parent is
always followed, an unsampled one never, and ``sample_ratio`` decides for requests without one.

This module imports OpenTelemetry (the ``llmlb[tracing]`` extra); import it only when tracing is
on (``llmlb serve`` and ``check-config`` first turn a missing install into a config error).
See docs/observability.md#traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
from typing import Any

import grpc
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from llmlb.config import Tracing
from llmlb.decision import RECORD_NAMESPACE, Decision

log = logging.getLogger("llmlb.tracing")

#: The pick's span.
SPAN_NAME = "llmlb.pick"
#: Prefix of the span's attributes: the decision record's field names under it.
ATTRIBUTE_PREFIX = f"{RECORD_NAMESPACE}."
#: Spans one export sends at most; spans waiting for export at most (more are dropped, counted by
#: the SDK's warning): a receiver that is down costs bounded memory.
MAX_EXPORT_BATCH = 64
MAX_QUEUE = 2048
#: ms between exports of a part-filled batch.
EXPORT_DELAY_MS = 1000
#: s one export may take (retries included) before it is given up.
EXPORT_TIMEOUT_S = 4.0
#: s a shutdown waits for the last spans to go out; past it they are dropped.
SHUTDOWN_TIMEOUT_S = 5.0

_PROPAGATOR = TraceContextTextMapPropagator()
_ROOT = Context()
# A well-formed version-00 traceparent whose sampled flag is clear: ParentBased never samples
# under it, so such a pick is dropped before any span is made (see ``PickTracer.observe``).
_UNSAMPLED_PARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f][02468ace]")


def span_attributes(decision: Decision) -> dict[str, AttributeValue]:
    """The decision record as span attributes: ``llmlb.<field>`` for each of ``fields()`` (the
    record's one owner), leaving out empty strings (no request id, no model)."""
    return {ATTRIBUTE_PREFIX + name: value for name, value in decision.fields().items() if value != ""}


def parent_context(traceparent: str, tracestate: str) -> Context:
    """The remote parent from W3C headers; a missing or malformed ``traceparent`` is no parent
    (the span starts a trace of its own)."""
    if not traceparent:
        return _ROOT
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier, context=_ROOT)


def build_exporter(settings: Tracing) -> OTLPSpanExporter:
    """OTLP/gRPC to ``otlp_endpoint``: plaintext for ``http://``, TLS for ``https://`` (trusting
    the system's roots, or ``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`` /
    ``OTEL_EXPORTER_OTLP_CERTIFICATE``), with ``headers`` on every export."""
    assert settings.otlp_endpoint is not None
    secure = settings.otlp_endpoint.startswith("https://")
    credentials: grpc.ChannelCredentials | None = None
    if secure:
        ca_file = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE") or os.environ.get(
            "OTEL_EXPORTER_OTLP_CERTIFICATE"
        )
        if ca_file:
            with open(ca_file, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        else:
            credentials = grpc.ssl_channel_credentials()
    return OTLPSpanExporter(
        endpoint=settings.otlp_endpoint,
        insecure=not secure,
        credentials=credentials,
        headers=dict(settings.headers) or None,
        timeout=EXPORT_TIMEOUT_S,
    )


class PickTracer:
    """Turns decisions into exported spans, off the pick's path (see the module's docstring)."""

    def __init__(
        self,
        settings: Tracing,
        *,
        worker: int | None = None,
        exporter: SpanExporter | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.settings = settings
        attributes: dict[str, Any] = {"service.name": settings.service_name, "process.pid": os.getpid()}
        if worker is not None:
            attributes["llmlb.worker"] = worker
        self.processor = BatchSpanProcessor(
            exporter if exporter is not None else build_exporter(settings),
            max_queue_size=MAX_QUEUE,
            schedule_delay_millis=EXPORT_DELAY_MS,
            max_export_batch_size=MAX_EXPORT_BATCH,
            export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
        )
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create(attributes),
            # Our own bounded shutdown, not an unbounded one at interpreter exit.
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("llmlb")
        self._loop = loop or asyncio.get_running_loop()
        self._pending: list[Decision] = []
        self._closed = False
        # Picks without a parent are never sampled at ratio 0.
        self._drop_roots = settings.sample_ratio == 0.0

    def observe(self, decision: Decision) -> None:
        """The ``Picker`` observer, on the pick's path: queue the decision; the loop makes the
        spans of everything queued in one callback once the current step (the answer to Envoy)
        is done. A pick that certainly goes unsampled (an unsampled parent; no parent at
        ratio 0) is dropped here, before any work."""
        if self._closed:
            return
        traceparent = decision.traceparent
        if (self._drop_roots and not traceparent) or (
            traceparent and _UNSAMPLED_PARENT.fullmatch(traceparent) is not None
        ):
            return
        self._pending.append(decision)
        if len(self._pending) == 1:
            self._loop.call_soon(self._emit)

    def _emit(self) -> None:
        pending, self._pending = self._pending, []
        for decision in pending:
            try:
                self.record(decision)
            except Exception:  # a tracing bug must never cost a request
                log.exception("could not record the span of a pick")

    def record(self, decision: Decision) -> None:
        """Makes (and, if sampled, queues for export) the span of one decision."""
        end_ns = int(decision.time * 1e9)
        span = self.tracer.start_span(
            SPAN_NAME,
            context=parent_context(decision.traceparent, decision.tracestate),
            kind=SpanKind.SERVER,
            start_time=end_ns - int(decision.pick_seconds * 1e9),
            record_exception=False,
            set_status_on_exception=False,
        )
        if span.is_recording():
            span.set_attributes(span_attributes(decision))
        span.end(end_time=end_ns)

    def flush(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Exports what is queued now (blocking; for tests and benchmarks)."""
        self._emit()
        return self.processor.force_flush(int(timeout_s * 1000))

    async def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Sends the spans still queued, waiting at most ``timeout_s``: an unreachable receiver
        loses them instead of holding up the exit (the export thread is a daemon thread)."""
        if self._closed:
            return
        self._emit()
        self._closed = True
        done: asyncio.Future[None] = self._loop.create_future()

        def mark_done() -> None:
            if not done.done():
                done.set_result(None)

        def stop() -> None:
            try:
                self.provider.shutdown()
            except Exception:
                log.exception("tracing shutdown failed")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is already gone
                    self._loop.call_soon_threadsafe(mark_done)

        threading.Thread(target=stop, name="llmlb-tracing-shutdown", daemon=True).start()
        finished, _ = await asyncio.wait({done}, timeout=timeout_s)
        if not finished:
            log.warning("tracing: spans not exported within %.0f s of shutdown were dropped", timeout_s)
