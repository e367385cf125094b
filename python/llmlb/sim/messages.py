"""Anthropic's Messages API as vLLM and SGLang serve it: ``POST /v1/messages``, JSON or SSE, with
Anthropic's error shape.

The prompt is rendered like a chat template: ``system`` first, then the tools, then each message
``"<|role|>\\n" + its blocks' text + "\\n"``, so turn n+1's prompt starts with turn n's prompt plus
its answer.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import orjson

from llmlb.sim.protocol import (
    BadRequest,
    Exchange,
    canonical_json,
    completion_text,
    model_field,
    positive_int,
    render_message,
    render_system,
    sse_event,
    token_text,
)

if TYPE_CHECKING:
    from llmlb.sim.engine import Request

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    500: "api_error",
    503: "overloaded_error",
}


def anthropic_error(message: str, status: int, param: str | None = None, kind: str | None = None) -> bytes:
    """Anthropic's error body (it has no `param`; `kind` is OpenAI's and not used)."""
    error = {"type": ERROR_TYPES.get(status, "api_error"), "message": message}
    return orjson.dumps({"type": "error", "error": error})


def _blocks_text(content: Any, param: str) -> str:
    """A string, or content blocks: text as is, tool calls and results in tags, others (images) as
    their JSON."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{param}: content must be a string or a list of blocks", param)
    texts = []
    for block in content:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{param}: each content block must be an object with a type", param)
        kind = block["type"]
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"{param}: a text block's text must be a string", param)
            texts.append(text)
        elif kind == "tool_use":
            call = {"name": block.get("name"), "input": block.get("input")}
            texts.append(f"<tool_call>{canonical_json(call)}</tool_call>")
        elif kind == "tool_result":
            result = block.get("content")
            inner = "" if result is None else _blocks_text(result, param)
            texts.append(f"<tool_result>{inner}</tool_result>")
        else:
            texts.append(canonical_json(block))
    return "\n".join(texts)


def render_messages(system: Any, tools: Any, messages: Any) -> str:
    if system is not None:
        system = _blocks_text(system, "system")
    out = render_system(system, tools)
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty list", "messages")
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("messages: each message must be an object", "messages")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest("messages: each message's role must be user or assistant", "messages")
        out += render_message(role, _blocks_text(message.get("content"), "messages"))
    return out


def parse_messages(data: dict[str, Any], default_model: str) -> MessagesExchange:
    """A Messages request. Raises BadRequest."""
    model = model_field(data)
    max_tokens = positive_int(data, "max_tokens")
    prompt = render_messages(data.get("system"), data.get("tools"), data.get("messages"))
    return MessagesExchange(model, default_model, prompt.encode(), max_tokens, data.get("stream") is True)


class MessagesExchange(Exchange):
    """A Messages request and its answers. `input_tokens` counts the prompt tokens not read from the
    cache, as Anthropic's usage does (their sum with `cache_read_input_tokens` is the prompt)."""

    def __init__(
        self, model: str | None, default_model: str, prompt: bytes, max_tokens: int | None, stream: bool
    ) -> None:
        super().__init__(model, default_model, prompt, max_tokens, stream)
        self.id = f"msg_{uuid.uuid4().hex}"

    def stop_reason(self) -> str:
        # As the OpenAI routes do: a length the client set ends as a limit, the default one naturally.
        return "end_turn" if self.max_tokens is None else "max_tokens"

    @staticmethod
    def usage(req: Request, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": req.prompt_tokens - req.cached_tokens,
            "output_tokens": output_tokens,
            "cache_read_input_tokens": req.cached_tokens,
            "cache_creation_input_tokens": 0,
        }

    def message(self, req: Request, content: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.name,
            "content": content,
            "stop_reason": self.stop_reason() if done else None,
            "stop_sequence": None,
            "usage": self.usage(req, req.generated if done else 0),
        }

    def full(self, req: Request) -> bytes:
        text = {"type": "text", "text": completion_text(req.generated)}
        return orjson.dumps(self.message(req, [text], done=True))

    def head(self, req: Request) -> bytes:
        return sse_event(
            "message_start", {"type": "message_start", "message": self.message(req, [], done=False)}
        ) + sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )

    def tokens(self, start: int, end: int, req: Request) -> bytes:
        return b"".join(
            sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": token_text(i)},
                },
            )
            for i in range(start, end)
        )

    def tail(self, req: Request) -> bytes:
        delta = {"stop_reason": self.stop_reason(), "stop_sequence": None}
        return b"".join(
            (
                sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                sse_event(
                    "message_delta",
                    {"type": "message_delta", "delta": delta, "usage": {"output_tokens": req.generated}},
                ),
                sse_event("message_stop", {"type": "message_stop"}),
            )
        )
