"""A real OTLP receiver for the tracing tests: the OpenTelemetry Collector that
``scripts/build-otel-collector.sh`` (``make otel-bin``) builds once into a cache directory, with an
OTLP/gRPC receiver on a free 127.0.0.1 port (plaintext, or TLS with a test certificate) and the
file exporter writing every span it receives to a JSON-lines file that :meth:`Collector.spans`
reads back. Started by :class:`ManagedProcess` (stopped by PID, bounded waits).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.procs import HOST, ManagedProcess, free_port, wait_until

OTELCOL_VERSION = "v0.161.0"
OTELCOL_NAME = "otelcol-llmlb"
READY_LINE = "Everything is ready"


def collector_binary() -> Path:
    """Where ``make otel-bin`` puts the collector (``$LLMLB_CACHE``, default ``~/.cache/llmlb``)."""
    cache = Path(os.environ.get("LLMLB_CACHE") or Path.home() / ".cache" / "llmlb")
    return cache / f"otelcol-{OTELCOL_VERSION}" / OTELCOL_NAME


def require_collector() -> Path:
    """The collector binary, or a skip naming how to build it."""
    binary = collector_binary()
    if not os.access(binary, os.X_OK):
        pytest.skip(f"no OpenTelemetry Collector at {binary}: run `make otel-bin` (~2 min cold)")
    return binary


@dataclass
class Span:
    """One received span, flattened: ids as hex, attributes and resource as plain dicts."""

    trace_id: str
    span_id: str
    parent_span_id: str
    trace_state: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _value(v: dict[str, Any]) -> Any:
    """An OTLP JSON AnyValue as a Python value (int64s are strings in OTLP JSON)."""
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "stringValue" in v:
        return v["stringValue"]
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def _attributes(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in items or []}


def parse_spans(text: str) -> list[Span]:
    """Spans of the file exporter's output (one ``{"resourceSpans": [...]}`` object a line; a
    line still being written is skipped)."""
    spans = []
    for line in text.splitlines():
        try:
            batch = json.loads(line)
        except ValueError:
            continue
        for resource_spans in batch.get("resourceSpans", []):
            resource = _attributes(resource_spans.get("resource", {}).get("attributes"))
            for scope in resource_spans.get("scopeSpans", []):
                for s in scope.get("spans", []):
                    spans.append(
                        Span(
                            trace_id=s.get("traceId", ""),
                            span_id=s.get("spanId", ""),
                            parent_span_id=s.get("parentSpanId", ""),
                            trace_state=s.get("traceState", ""),
                            name=s.get("name", ""),
                            kind=int(s.get("kind", 0)),
                            start_ns=int(s.get("startTimeUnixNano", 0)),
                            end_ns=int(s.get("endTimeUnixNano", 0)),
                            attributes=_attributes(s.get("attributes")),
                            resource=resource,
                        )
                    )
    return spans


class Collector:
    """A running collector: ``endpoint`` is what ``tracing.otlp_endpoint`` takes."""

    def __init__(self, proc: ManagedProcess, port: int, spans_path: Path, tls: bool) -> None:
        self.proc = proc
        self.port = port
        self.spans_path = spans_path
        self.tls = tls

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    def spans(self) -> list[Span]:
        try:
            return parse_spans(self.spans_path.read_text(errors="replace"))
        except FileNotFoundError:
            return []

    def wait_for_spans(self, predicate: Any, timeout: float = 15.0, what: str = "spans") -> list[Span]:
        """Waits until ``predicate(span)`` holds for at least one received span; returns those."""
        return wait_until(  # type: ignore[no-any-return]
            lambda: [s for s in self.spans() if predicate(s)],
            timeout,
            interval=0.1,
            message=f"{what} at the collector ({len(self.spans())} spans received)",
        )

    def stop(self) -> int | None:
        return self.proc.stop()


def start_collector(
    workdir: Path, *, tls: tuple[Path, Path] | None = None, name: str = "otelcol"
) -> Collector:
    """The collector on a free port, ready (its "Everything is ready" log line, then a TCP
    connect); ``tls``: (cert, key) PEM files for its OTLP/gRPC receiver."""
    binary = require_collector()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    spans_path = workdir / f"{name}-spans.json"
    grpc: dict[str, Any] = {"endpoint": f"{HOST}:{port}"}
    if tls is not None:
        grpc["tls"] = {"cert_file": str(tls[0]), "key_file": str(tls[1])}
    config = {
        "receivers": {"otlp": {"protocols": {"grpc": grpc}}},
        "exporters": {"file": {"path": str(spans_path), "flush_interval": "100ms"}},
        "service": {
            "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}},
            # No internal metrics endpoint (it would bind :8888 and collide between collectors).
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}},
        },
    }
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    proc = ManagedProcess(name, [str(binary), "--config", str(config_path)], workdir / f"{name}.log").start()

    def ready() -> bool:
        if not proc.running:
            proc.fail(f"{name} exited before it was ready")
        if READY_LINE not in proc.log_path.read_text(errors="replace"):
            return False
        with socket.create_connection((HOST, port), timeout=1.0):
            return True

    try:
        wait_until(ready, 20.0, message=f"{name} ready on {HOST}:{port}")
    except BaseException:
        proc.stop()
        raise
    return Collector(proc, port, spans_path, tls is not None)


def wait_quiet(collector: Collector, settle: float = 1.5, timeout: float = 15.0) -> list[Span]:
    """The spans once no new one has arrived for ``settle`` s (to assert on what did NOT come)."""
    deadline = time.monotonic() + timeout
    seen = len(collector.spans())
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(collector.spans())
        if now != seen:
            seen, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            break
    return collector.spans()
