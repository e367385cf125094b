"""Logging: the process's log format (``log_format: text|json``) and the per-request log
(``log_requests``).

JSON lines carry ``time``, ``level``, ``logger``, ``message`` and, for request lines, the
decision record's fields (``llmlb.decision.RECORD_FIELDS``) plus ``status``. gRPC's and other
libraries' chatter stays at WARNING unless ``log_libraries`` asks for it: at ``debug`` it would
drown the picker's own lines.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from llmlb.decision import Decision
from llmlb.picking import Refusal, RequestMeta

#: Loggers of libraries kept at WARNING unless ``log_libraries`` is on.
LIBRARY_LOGGERS = ("grpc", "asyncio", "aiohttp", "kubernetes_asyncio", "urllib3", "opentelemetry")
REQUEST_LOGGER = "llmlb.requests"


_second = [-1, ""]


def utc_stamp(when: float) -> str:
    """``2026-12-06T03:04:05.678Z`` (the seconds formatted once per second)."""
    whole = int(when)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((when - whole) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (orjson: a dependency already, and the fastest encoder)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        extra: dict[str, Any] = {}
        if record.exc_info:
            extra["exception"] = self.formatException(record.exc_info)
        return self.line(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            getattr(record, "fields", None),
            extra,
        )

    def line(
        self,
        when: float,
        level: str,
        logger: str,
        message: str,
        *parts: dict[str, Any] | None,
        newline: bool = False,
    ) -> str:
        """The JSON line: ``time``, ``level``, ``logger``, ``message``, ``worker``, then ``parts``."""
        line: dict[str, Any] = {"time": utc_stamp(when), "level": level, "logger": logger, "message": message}
        if self.worker is not None:
            line["worker"] = self.worker
        for part in parts:
            if part:
                line.update(part)
        return orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE if newline else None).decode()


def configure_logging(
    level: str, log_format: str, *, libraries: bool = False, worker: int | None = None
) -> None:
    """The root handler for the whole process, once."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if libraries else logging.WARNING)


def _json_handler() -> logging.StreamHandler[Any] | None:
    """The process's handler when it writes JSON lines (``configure_logging``), else None."""
    handlers = logging.getLogger().handlers
    only = handlers[0] if len(handlers) == 1 else None
    if isinstance(only, logging.StreamHandler) and isinstance(only.formatter, JsonFormatter):
        return only
    return None


class RequestLog:
    """One ``info`` line per request when its ext_proc stream ends (``log_requests``): the
    decision record and the response status (0: none came back), or the picker's refusal.

    With ``log_format: json`` a request's line is written straight to the handler's stream, the
    line ``JsonFormatter`` makes of a record: ~3.5 µs a request instead of ~16 µs for a
    ``LogRecord`` through ``logging``, on every request's path."""

    def __init__(self) -> None:
        self.log = logging.getLogger(REQUEST_LOGGER)
        self._json = _json_handler()

    def finished(self, decision: Decision, status: int) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        handler = self._json
        if handler is not None:
            assert isinstance(handler.formatter, JsonFormatter)  # see _json_handler
            text = handler.formatter.line(
                time.time(),
                "info",
                REQUEST_LOGGER,
                "request",
                decision.fields(),
                {"status": status},
                newline=True,
            )
            handler.acquire()
            try:
                handler.stream.write(text)
                handler.flush()
            finally:
                handler.release()
            return
        self.log.info(
            "request id=%s %s model=%s -> %s reason=%s depth=%d/%d status=%d pick_us=%.0f",
            decision.request_id or "-",
            decision.path or "-",
            decision.model or "-",
            decision.endpoint,
            decision.reason,
            decision.prefix_depth,
            decision.prefix_levels,
            status,
            decision.pick_seconds * 1e6,
            extra={"fields": {**decision.fields(), "status": status}},
        )

    def refused(self, meta: RequestMeta, refusal: Refusal) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        self.log.info(
            "request id=%s %s refused status=%d %s",
            meta.request_id or "-",
            meta.path or "-",
            refusal.status,
            refusal.error_type,
            extra={
                "fields": {
                    "request_id": meta.request_id,
                    "path": meta.path,
                    "status": refusal.status,
                    "reason": refusal.error_type,
                }
            },
        )
