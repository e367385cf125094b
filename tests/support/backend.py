"""A fake OpenAI-compatible inference server for end-to-end tests.

Run it as ``python tests/support/backend.py --port P --name b1 [--engine vllm]``. It runs as a script,
not as part of the ``tests`` package, so it does not depend on how ``tests`` is importable: its only
local import is the sibling ``metrics_formats.py``, found by putting this file's own directory first on
``sys.path`` (keep both files standard-library + aiohttp only). It binds 127.0.0.1 only.

Every answer names the server: response header ``x-served-by`` and field ``served_by`` (also in each
SSE chunk). Per-request knobs, as request headers:

- ``x-test-delay-ms``: sleep this long before answering.
- ``x-test-stream-chunks`` (default 5) and ``x-test-stream-interval-ms`` (default 5): SSE pacing
  when the JSON body has ``"stream": true``.
- ``x-test-status``: answer with this HTTP status (JSON error body) instead of 200.

Bookkeeping at ``GET /_stats`` (``POST /_reset`` clears it); only inference requests
(``POST /v1/chat/completions`` and ``POST /v1/completions``) count in ``total``, ``concurrent`` and
``max_concurrent``, so health probes and scrapes by the picker do not disturb the tests' counts.
``metrics_scrapes`` counts ``GET /metrics``; ``by_path`` counts requests by ``"METHOD /path"``, any
other path included (answered 404).
Request bodies may be chunked (full-duplex Envoy drops Content-Length); aiohttp sets TCP_NODELAY on
accepted connections, so there are no delayed-ACK stalls.

Prometheus metrics: ``GET /metrics`` serves the page of the engine chosen with ``--engine`` (``vllm``,
the default, ``vllm-old``, ``sglang``, ``trtllm-serve``, ``triton``; ``none`` has no /metrics route, so
scrapes get 404), in that engine's exact text format (see ``metrics_formats.py``). What it reports is a
``MetricsState``, set at run time with ``POST /_metrics`` and a JSON object holding any subset of its
fields; the answer is the whole new state (``GET /_metrics`` reads it), or 400 with a message on an
unknown field or a wrong type, leaving the state unchanged:

- ``waiting`` (0), ``kv`` (0.1, a 0..1 fraction), ``running`` (null = this server's live count of
  concurrent inference requests);
- ``running_lora`` / ``waiting_lora`` (adapter names) and ``max_lora`` (0): LoRA info, vLLM only,
  emitted once ``max_lora > 0`` or adapters are listed;
- ``omit``: logical metrics (``waiting``, ``running``, ``kv``, ``lora``) left out of the page;
- ``status`` (200): the scrape's HTTP status; the page is still rendered under another status, so a
  scraper has to look at the status, not just parse the body;
- ``delay_ms`` (0): sleep this long before answering a scrape;
- ``garbage`` (null): when a string, the body verbatim instead of the page (e.g. an HTML error page).

``POST /_reset`` does NOT reset the metrics state (only the counters above): a test that changes the
metrics puts them back itself, e.g. with ``POST /_metrics`` and the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

# This file runs as a script: find the sibling metrics_formats.py through our own directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_formats import (
    CONTENT_TYPE,
    ENGINES,
    MetricsState,
    MetricsStateError,
    render_metrics,
)

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_BODY = 64 * 1024 * 1024
MODEL = "test-model"


class Stats:
    """Counters of one backend; read and reset over HTTP."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.concurrent = 0
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.max_concurrent = self.concurrent
        self.aborted = 0
        self.completed = 0
        self.by_path: dict[str, int] = {}
        self.last_body_bytes = -1
        self.last_body_sha256 = ""
        self.last_chunked = False
        self.last_headers: dict[str, str] = {}
        self.tags: list[str] = []
        self.metrics_scrapes = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "total": self.total,
            "concurrent": self.concurrent,
            "max_concurrent": self.max_concurrent,
            "aborted": self.aborted,
            "completed": self.completed,
            "by_path": self.by_path,
            "last_body_bytes": self.last_body_bytes,
            "last_body_sha256": self.last_body_sha256,
            "last_chunked": self.last_chunked,
            "last_headers": self.last_headers,
            "tags": self.tags,
            "metrics_scrapes": self.metrics_scrapes,
        }


def _int_header(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.headers.get(name, default))
    except ValueError:
        return default


def _last_text(payload: Any) -> str:
    """The last user text of a chat or completions request, for a deterministic reply."""
    if not isinstance(payload, dict):
        return ""
    messages = payload.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        return content if isinstance(content, str) else json.dumps(content)
    prompt = payload.get("prompt")
    return prompt if isinstance(prompt, str) else ""


class Backend:
    def __init__(self, name: str, engine: str = "vllm") -> None:
        self.name = name
        self.engine = engine
        self.stats = Stats(name)
        self.started = time.time()
        self.metrics_state = MetricsState()  # not reset by POST /_reset
        self.served = 0  # inference requests finished since start (never reset): grows the counters

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        if self.engine != "none":
            app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/_metrics", self.get_metrics_state)
        app.router.add_post("/_metrics", self.set_metrics_state)
        app.router.add_get("/_stats", self.get_stats)
        app.router.add_post("/_reset", self.reset_stats)
        for path in INFERENCE_PATHS:
            app.router.add_post(path, self.inference)
        # Last: any other path is counted in by_path (so a test can tell it never arrived) and 404s.
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    def _count_path(self, request: web.Request) -> None:
        key = f"{request.method} {request.path}"
        self.stats.by_path[key] = self.stats.by_path.get(key, 0) + 1

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"x-served-by": self.name}
        headers.update(extra or {})
        return headers

    async def health(self, request: web.Request) -> web.Response:
        self._count_path(request)
        return web.json_response({"status": "ok", "served_by": self.name}, headers=self._headers())

    async def models(self, request: web.Request) -> web.Response:
        self._count_path(request)
        body = {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": int(self.started), "owned_by": "test"}],
            "served_by": self.name,
        }
        return web.json_response(body, headers=self._headers())

    async def unknown(self, request: web.Request) -> web.Response:
        self._count_path(request)
        error = {"error": {"message": f"no such path {request.path}", "type": "test", "code": 404}}
        return web.json_response({**error, "served_by": self.name}, status=404, headers=self._headers())

    async def metrics(self, request: web.Request) -> web.Response:
        """The engine's Prometheus page for the current MetricsState (status, delay and garbage too)."""
        self._count_path(request)
        self.stats.metrics_scrapes += 1
        state = self.metrics_state
        if state.delay_ms > 0:
            await asyncio.sleep(state.delay_ms / 1000)
        text = render_metrics(self.engine, state, self.stats.concurrent, served=self.served, model=MODEL)
        content_type = CONTENT_TYPE
        if state.garbage is not None and state.garbage.lstrip().startswith("<"):
            content_type = "text/html; charset=utf-8"
        body = b"" if state.status in (204, 304) else text.encode()
        headers = self._headers({"content-type": content_type})
        return web.Response(body=body, status=state.status, headers=headers)

    async def get_metrics_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.metrics_state.to_json(), headers=self._headers())

    async def set_metrics_state(self, request: web.Request) -> web.Response:
        """Set any subset of the MetricsState fields from a JSON object; 400 (nothing changed) if bad."""
        try:
            changes = json.loads(await request.read())
            self.metrics_state = self.metrics_state.updated(changes)
        except ValueError as exc:  # bad JSON, bad UTF-8 or a MetricsStateError
            message = str(exc) if isinstance(exc, MetricsStateError) else f"body is not JSON: {exc}"
            return web.json_response({"error": message}, status=400, headers=self._headers())
        return web.json_response(self.metrics_state.to_json(), headers=self._headers())

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json(), headers=self._headers())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response(self.stats.as_json(), headers=self._headers())

    async def inference(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        self._count_path(request)
        stats.total += 1
        stats.concurrent += 1
        stats.max_concurrent = max(stats.max_concurrent, stats.concurrent)
        stats.last_headers = {k.lower(): v for k, v in request.headers.items()}
        stats.last_chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        tag = request.headers.get("x-test-tag")
        if tag is not None:
            stats.tags.append(tag)
        try:
            body = await request.read()
            stats.last_body_bytes = len(body)
            stats.last_body_sha256 = hashlib.sha256(body).hexdigest()
            delay = _int_header(request, "x-test-delay-ms", 0)
            if delay > 0:
                await asyncio.sleep(delay / 1000)
            status = _int_header(request, "x-test-status", 200)
            try:
                payload: Any = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                payload = None
            if status != 200:
                error = {"error": {"message": "x-test-status", "type": "test", "code": status}}
                return web.json_response(
                    {**error, "served_by": self.name}, status=status, headers=self._headers()
                )
            if isinstance(payload, dict) and payload.get("stream") is True:
                response, finished = await self._stream(request, payload)
            else:
                response, finished = self._complete(request, payload), True
            if finished:
                stats.completed += 1
                self.served += 1
            else:
                stats.aborted += 1
            return response
        except asyncio.CancelledError:
            stats.aborted += 1
            raise
        finally:
            stats.concurrent -= 1

    def _reply_text(self, payload: Any) -> str:
        digest = hashlib.sha1(_last_text(payload).encode()).hexdigest()[:8]
        return f"answer {digest} from {self.name}"

    def _complete(self, request: web.Request, payload: Any) -> web.Response:
        chat = request.path == "/v1/chat/completions"
        text = self._reply_text(payload)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {
            "id": f"cmpl-{self.name}-{self.stats.total}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
            "served_by": self.name,
        }
        return web.json_response(body, headers=self._headers())

    async def _stream(self, request: web.Request, payload: Any) -> tuple[web.StreamResponse, bool]:
        """Send the SSE answer; returns (response, False) if the client went away mid-stream."""
        chat = request.path == "/v1/chat/completions"
        chunks = max(1, _int_header(request, "x-test-stream-chunks", 5))
        interval = max(0, _int_header(request, "x-test-stream-interval-ms", 5)) / 1000
        response = web.StreamResponse(
            headers=self._headers({"content-type": "text/event-stream", "cache-control": "no-cache"})
        )
        await response.prepare(request)
        ident = f"cmpl-{self.name}-{self.stats.total}"
        text = self._reply_text(payload)
        try:
            for seq in range(chunks):
                piece = f"{text} [{seq}]"
                choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if seq == chunks - 1 else None}
                if chat:
                    choice["delta"] = {"content": piece}
                else:
                    choice["text"] = piece
                chunk = {
                    "id": ident,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "model": MODEL,
                    "choices": [choice],
                    "seq": seq,
                    "served_by": self.name,
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if interval and seq < chunks - 1:
                    await asyncio.sleep(interval)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            return response, False
        return response, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--engine",
        default="vllm",
        choices=[*ENGINES, "none"],
        help="whose /metrics format to serve (none: no /metrics route, 404)",
    )
    args = parser.parse_args()
    backend = Backend(args.name, args.engine)
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(
            backend.app(),
            host=args.host,
            port=args.port,
            print=None,
            access_log=None,
            shutdown_timeout=1.0,
            handle_signals=True,
            # Record bodies as they came over the wire (like vLLM's server, which does not
            # decode a Content-Encoding): tests check compressed bodies arrive unchanged.
            auto_decompress=False,
        )


if __name__ == "__main__":
    main()
