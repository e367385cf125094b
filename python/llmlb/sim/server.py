"""The HTTP face of ``llmlb sim``: vLLM's OpenAI routes (chat, completions, responses, embeddings),
Anthropic's messages route and ``/metrics``, vLLM's ``/reset_prefix_cache``, SGLang's info routes
(for sglang-router), and ``/_sim/stats`` / ``/_sim/reset`` for benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.log import access_logger

from llmlb.sim.embeddings import embeddings_body, parse_embeddings
from llmlb.sim.engine import Engine, EngineConfig, Request
from llmlb.sim.messages import anthropic_error, parse_messages
from llmlb.sim.metrics import CONTENT_TYPE, LoraInfo, render
from llmlb.sim.protocol import (
    BadRequest,
    ErrorBody,
    Exchange,
    Responder,
    error_body,
    load_body,
    model_field,
    parse_completion,
)
from llmlb.sim.responses import ResponseStore, not_found, parse_responses

NAME_HEADER = "x-sim-name"
SHUTDOWN_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SimOptions:
    port: int
    host: str = "127.0.0.1"
    name: str = ""
    """Default ``sim-<port>``."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    output_tokens: int = 16
    models: tuple[str, ...] = ()
    """Model names served (default: just the engine's model); all of them are the engine's model."""
    loras: tuple[str, ...] = ()
    fail_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 1000.0
    drop_rate: float = 0.0
    seed: int = 0
    access_log: bool = False

    @property
    def display_name(self) -> str:
        return self.name or f"sim-{self.port}"


class Sim:
    """One simulated model server: the engine plus the aiohttp application around it."""

    def __init__(self, options: SimOptions, engine: Engine | None = None) -> None:
        self.options = options
        self.name = options.display_name
        self.model = options.engine.model
        self.served = options.models or (self.model,)
        self.engine = engine or Engine(options.engine)
        self.responses = ResponseStore()
        self.lora = LoraInfo(options.engine.max_loras) if options.loras else None
        self.rng = random.Random(options.seed)
        self.created = time.time()
        self.delayed = 0
        """Requests sleeping through --slow-ms before being queued."""
        self.closing = False
        """Shutting down: the engine is stopped, new requests get 503."""
        self.started_at = time.time()
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/completions", self.completions),
                web.post("/v1/responses", self.create_response),
                web.get("/v1/responses/{response_id}", self.get_response),
                web.post("/v1/messages", self.messages),
                web.post("/v1/embeddings", self.embeddings),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
                web.get("/_sim/stats", self.stats),
                web.post("/_sim/reset", self.reset),
                # vLLM's (dev-mode) route: empties the prefix cache, the server keeps running.
                web.post("/reset_prefix_cache", self.reset_prefix_cache),
                # SGLang's info routes, probed by sglang-router.
                web.get("/server_info", self.server_info),
                web.get("/get_server_info", self.server_info),
                web.get("/model_info", self.model_info),
                web.get("/get_model_info", self.model_info),
                web.get("/get_load", self.get_load),
                web.get("/health_generate", self.health),
            ]
        )

    # ----------------------------------------------------------------------------------------------
    # helpers

    def _json(self, data: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=orjson.dumps(data),
            status=status,
            content_type="application/json",
            headers={NAME_HEADER: self.name},
        )

    def _error(
        self,
        message: str,
        status: int,
        param: str | None = None,
        kind: str | None = None,
        shape: ErrorBody = error_body,
    ) -> web.Response:
        """An error answer, in OpenAI's shape unless the route gives its own."""
        return web.Response(
            body=shape(message, status, param, kind),
            status=status,
            content_type="application/json",
            headers={NAME_HEADER: self.name},
        )

    def _adapter(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model). Raises BadRequest (404)."""
        if model is None or model in self.served:
            return None
        if model in self.options.loras:
            return model
        raise BadRequest(f"The model `{model}` does not exist.", "model", status=404)

    # ----------------------------------------------------------------------------------------------
    # inference

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, lambda data: Responder(parse_completion(data, True), self.model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(
            request, lambda data: Responder(parse_completion(data, False), self.model)
        )

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, lambda data: parse_responses(data, self.model, self.responses))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, lambda data: parse_messages(data, self.model), anthropic_error)

    async def _generate(
        self,
        request: web.Request,
        parse: Callable[[dict[str, Any]], Exchange],
        shape: ErrorBody = error_body,
    ) -> web.StreamResponse:
        """One generation request of any API: parsed by `parse`, errors in `shape`."""
        engine = self.engine
        engine.stats.requests_total += 1
        try:
            data = load_body(await request.read())
            adapter = self._adapter(model_field(data))  # first, as vLLM: a misrouted request gets 404
            ex = parse(data)
            req = engine.new_request(
                ex.prompt,
                ex.max_tokens or self.options.output_tokens,
                adapter,
                stream=ex.stream,
                end_reason="length" if ex.max_tokens else "stop",
            )
            self._check_length(req)
        except BadRequest as e:
            engine.stats.rejected += 1
            return self._error(e.message, e.status, e.param, e.kind, shape)
        refused = await self._refuse(request, shape)
        if refused is not None:
            return refused
        engine.submit(req)
        try:
            if ex.stream:
                return await self._stream(request, req, ex)
            await req.done()
            if req.finish_reason == "abort":
                return self._error("the server is shutting down", 503, shape=shape)
            return web.Response(
                body=ex.full(req), content_type="application/json", headers={NAME_HEADER: self.name}
            )
        finally:
            engine.abort(req)  # a no-op once finished; else the client went away

    async def _refuse(self, request: web.Request, shape: ErrorBody) -> web.StreamResponse | None:
        """Failure injection for a valid request: its answer if it is dropped or failed (or the
        server is shutting down), else None once any --slow-ms delay is over."""
        engine = self.engine
        opts = self.options
        # Three draws per request whatever the rates, so a seed gives the same outcome sequence.
        drop, fail, slow = self.rng.random(), self.rng.random(), self.rng.random()
        if drop < opts.drop_rate:
            engine.stats.dropped += 1
            return _drop(request)
        if fail < opts.fail_rate:
            engine.stats.failed += 1
            return self._error("simulated failure (--fail-rate)", 500, shape=shape)
        if slow < opts.slow_rate:
            self.delayed += 1
            try:
                await asyncio.sleep(opts.slow_ms / 1000.0)
            finally:
                self.delayed -= 1
        if self.closing:
            return self._error("the server is shutting down", 503, shape=shape)
        return None

    def _check_length(self, req: Request) -> None:
        """Refuses, as vLLM does, a request whose prompt and output could never fit in the cache."""
        if self.engine.cache.fits_ever(req.prompt_tokens + req.max_tokens):
            return
        raise BadRequest(
            f"This model's maximum context length is {self.engine.config.max_model_len} tokens. However, "
            f"you requested {req.prompt_tokens + req.max_tokens} tokens ({req.prompt_tokens} in the "
            f"messages, {req.max_tokens} in the completion). Please reduce the length of the messages or "
            "completion."
        )

    async def _stream(self, request: web.Request, req: Request, ex: Exchange) -> web.StreamResponse:
        """An SSE answer: each token's event as soon as the engine produces it."""
        resp = web.StreamResponse(
            headers={
                NAME_HEADER: self.name,
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
            }
        )
        await resp.prepare(request)
        sent = 0
        for _ in range(req.max_tokens + 1):  # each pass sends at least one token, or ends
            out = await req.progress(sent)
            if out > sent:
                await resp.write((ex.head(req) if sent == 0 else b"") + ex.tokens(sent, out, req))
                sent = out
            if req.finished:
                break
        if req.finish_reason == "abort":  # shutting down: end the stream unfinished
            resp.force_close()
            return resp
        await resp.write(ex.tail(req))
        await resp.write_eof()
        return resp

    async def get_response(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        stored = self.responses.get(response_id)
        if stored is None:
            e = not_found(response_id)
            return self._error(e.message, e.status, e.param, e.kind)
        return self._json(stored.response)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """Each input is a prefill-only request (no output tokens), so it hits and fills the cache."""
        engine = self.engine
        engine.stats.requests_total += 1
        try:
            data = load_body(await request.read())
            adapter = self._adapter(model_field(data))
            parsed = parse_embeddings(data, engine.config.chars_per_token)
            reqs = [engine.new_request(p, 0, adapter, end_reason="stop") for p in parsed.prompts]
            for req in reqs:
                self._check_length(req)
        except BadRequest as e:
            engine.stats.rejected += 1
            return self._error(e.message, e.status, e.param, e.kind)
        refused = await self._refuse(request, error_body)
        if refused is not None:
            return refused
        try:
            for req in reqs:
                engine.submit(req)
            for req in reqs:
                await req.done()
            if any(req.finish_reason == "abort" for req in reqs):
                return self._error("the server is shutting down", 503)
            prompt_tokens = sum(req.prompt_tokens for req in reqs)
            cached = sum(req.cached_tokens for req in reqs)
            body = embeddings_body(parsed, parsed.model or self.model, prompt_tokens, cached)
            return web.Response(body=body, content_type="application/json", headers={NAME_HEADER: self.name})
        finally:
            for req in reqs:
                engine.abort(req)

    # ----------------------------------------------------------------------------------------------
    # the rest

    async def models(self, _: web.Request) -> web.Response:
        cfg = self.engine.config
        entry = {
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "vllm",
            "max_model_len": cfg.max_model_len,
            "permission": [],
        }
        data = [{"id": name, "root": self.model, "parent": None, **entry} for name in self.served]
        data += [
            {"id": name, "root": f"/loras/{name}", "parent": self.model, **entry}
            for name in self.options.loras
        ]
        return self._json({"object": "list", "data": data})

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200, headers={NAME_HEADER: self.name})

    async def metrics(self, _: web.Request) -> web.Response:
        engine = self.engine
        if self.lora is not None:
            self.lora.update(engine.running_lora, engine.waiting_lora, time.time())
        text = render(engine, self.lora, self.created)
        return web.Response(
            body=text.encode(), headers={NAME_HEADER: self.name, "content-type": CONTENT_TYPE}
        )

    def stats_json(self) -> dict[str, Any]:
        engine = self.engine
        s = engine.stats
        return {
            "name": self.name,
            "model": self.model,
            "models": list(self.served),
            "requests_total": s.requests_total,
            "requests_finished": sum(s.finished.values()) - s.finished.get("abort", 0),
            "requests_aborted": s.finished.get("abort", 0),
            "requests_failed": s.failed,
            "requests_dropped": s.dropped,
            "requests_rejected": s.rejected,
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "delayed": self.delayed,
            "max_running_seen": s.max_running_seen,
            "prompt_tokens_total": s.prefix_queries,
            "cached_tokens_total": s.prefix_hits,
            "prefix_cache_resets": s.prefix_cache_resets,
            "generation_tokens_total": s.generation_tokens,
            "kv_blocks_used": engine.cache.used_blocks,
            "kv_blocks_cached": engine.cache.cached_blocks,
            "kv_blocks_total": engine.cache.capacity,
            "steps": s.steps,
            "responses_stored": len(self.responses),
        }

    async def stats(self, _: web.Request) -> web.Response:
        return self._json(self.stats_json())

    async def reset(self, _: web.Request) -> web.Response:
        engine = self.engine
        if engine.busy or self.delayed:
            return self._error(
                f"cannot reset while busy ({len(engine.running)} running, {len(engine.waiting)} waiting, "
                f"{self.delayed} delayed)",
                409,
            )
        engine.reset()
        self.responses.clear()
        if self.lora is not None:
            self.lora.reset()
        self.rng = random.Random(self.options.seed)
        self.created = time.time()
        return self._json(self.stats_json())

    async def reset_prefix_cache(self, _: web.Request) -> web.Response:
        """vLLM answers 200 with no body (its engine refuses, with a log line, while running
        requests hold blocks); the sim says 409 then, so a test is never told a flush happened
        that did not. The prefix-cache counters go on counting, as vLLM's do."""
        if not self.engine.reset_prefix_cache():
            return self._error(
                f"cannot reset the prefix cache while requests hold blocks "
                f"({len(self.engine.running)} running)",
                409,
            )
        return web.Response(status=200, headers={NAME_HEADER: self.name})

    async def server_info(self, _: web.Request) -> web.Response:
        cfg = self.engine.config
        return self._json(
            {
                "model_path": self.model,
                "tokenizer_path": self.model,
                "served_model_name": self.model,
                "host": self.options.host,
                "port": self.options.port,
                "dp_size": 1,
                "tp_size": 1,
                "page_size": cfg.block_size,
                "max_running_requests": cfg.max_running,
                "chunked_prefill_size": cfg.max_batched_tokens,
                "max_total_num_tokens": cfg.max_model_len,
                "context_length": cfg.max_model_len,
                "disable_radix_cache": False,
                "enable_lora": bool(self.options.loras),
                "max_loras_per_batch": cfg.max_loras,
                "is_generation": True,
                "version": "0.0.0-llmlb-sim",
                "internal_states": [{"last_gen_throughput": 0.0, "load": len(self.engine.running)}],
            }
        )

    async def model_info(self, _: web.Request) -> web.Response:
        return self._json(
            {
                "model_path": self.model,
                "tokenizer_path": self.model,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "llmlb-sim",
                "architectures": ["LlmlbSimForCausalLM"],
            }
        )

    async def get_load(self, _: web.Request) -> web.Response:
        engine = self.engine
        tokens = engine.cache.used_blocks * engine.config.block_size
        return self._json(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": len(engine.running) + len(engine.waiting),
                    "num_waiting_reqs": len(engine.waiting),
                    "num_tokens": tokens,
                }
            ]
        )


def _not_http(record: logging.LogRecord) -> bool:
    """Drops aiohttp's traceback for bytes that are not HTTP/1 (sglang-router opens with an HTTP/2
    preface to detect gRPC workers; the 400 it gets sends it on to HTTP/1.1)."""
    return not (record.exc_info and isinstance(record.exc_info[1], BadHttpMessage))


def _drop(request: web.Request) -> web.StreamResponse:
    """Closes the connection without answering (--drop-rate)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise asyncio.CancelledError


# --------------------------------------------------------------------------------------------------
# running


class StartupError(RuntimeError):
    pass


async def serve(options: SimOptions) -> int:
    """Runs a sim until SIGTERM or SIGINT; returns the exit code."""
    if options.access_log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp.server").addFilter(_not_http)
    sim = Sim(options)
    sim.engine.start()
    runner = web.AppRunner(
        sim.app,
        access_log=access_logger if options.access_log else None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port, shutdown_timeout=SHUTDOWN_TIMEOUT_S).start()
    except OSError as e:
        await runner.cleanup()
        await sim.engine.stop()
        raise StartupError(f"cannot listen on {options.host}:{options.port}: {e.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"llmlb sim {sim.name} listening on http://{options.host}:{options.port}", file=sys.stderr, flush=True
    )
    await stop.wait()
    sim.closing = True
    await sim.engine.stop()
    sim.engine.abort_all()  # every handler answers now, so the runner's cleanup does not wait
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(runner.cleanup(), SHUTDOWN_TIMEOUT_S * 2)
    return 0


def run(options: SimOptions) -> int:
    """Runs a sim on uvloop (asyncio if uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(serve(options))
    code: int = uvloop.run(serve(options))
    return code
