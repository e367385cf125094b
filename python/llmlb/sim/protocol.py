"""OpenAI request bodies in (the prompt as one string), vLLM-shaped response bodies out."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

# One word per generated token.
# fmt: off
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "runs",
         "far", "away", "into", "woods", "where", "it", "finds", "an", "old", "oak", "tree", "by",
         "river", "that", "flows", "past", "hills", "under", "blue", "sky")
# fmt: on


class BadRequest(ValueError):
    """The body is not a usable request; answered 400 (or `status`) in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


@dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    model: str | None
    prompt: bytes
    """The rendered prompt, UTF-8."""
    max_tokens: int | None
    stream: bool
    include_usage: bool


def render_chat(messages: Any) -> str:
    """``"<|role|>\\ncontent\\n"`` per message; list contents keep their text parts, joined by newlines."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object", "messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest("each message needs a string role", "messages")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(p, str) for p in parts):
                raise BadRequest("a text part's text must be a string", "messages")
            text = "\n".join(parts)  # type: ignore[arg-type]
        else:
            raise BadRequest("message content must be a string, a list of parts or null", "messages")
        out.append(f"<|{role}|>\n{text}\n")
    return "".join(out)


def parse_request(body: bytes, chat: bool) -> ParsedRequest:
    """A chat-completions (`chat`) or completions body. Raises BadRequest."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    if chat:
        prompt = render_chat(data.get("messages"))
    else:
        raw = data.get("prompt")
        if isinstance(raw, list) and len(raw) == 1:
            raw = raw[0]
        if not isinstance(raw, str):
            raise BadRequest("prompt must be a string (or a list of one string)", "prompt")
        if not raw:
            raise BadRequest("the prompt cannot be empty", "prompt")
        prompt = raw
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    max_tokens = data.get("max_completion_tokens") if chat else None
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = data.get("max_tokens"), "max_tokens"
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise BadRequest(f"{param} must be a positive integer", param)
    stream = data.get("stream") is True
    options = data.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return ParsedRequest(chat, model, prompt.encode(), max_tokens, stream, include_usage)


ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    409: "ConflictError",
    503: "ServiceUnavailableError",
}


def error_body(message: str, status: int, param: str | None = None) -> bytes:
    kind = ERROR_TYPES.get(status, "InternalServerError")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})


def token_text(i: int) -> str:
    """Generated token `i`: a word, with a leading space after the first."""
    word = WORDS[i % len(WORDS)]
    return word if i == 0 else " " + word


def completion_text(tokens: int) -> str:
    return "".join(token_text(i) for i in range(tokens))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class Responder:
    """Builds one request's response bodies (JSON, or SSE events)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def full(self, tokens: int, finish_reason: str, usage_: dict[str, Any]) -> bytes:
        text = completion_text(tokens)
        choice: dict[str, Any]
        if self.chat:
            message = {"role": "assistant", "content": text, "tool_calls": []}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        choice["stop_reason"] = None
        return orjson.dumps(self._envelope(self.object, [choice], usage=usage_))

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def token_event(self, i: int, finish_reason: str | None) -> bytes:
        """The SSE event of generated token `i` (the first also carries the assistant role)."""
        text = token_text(i)
        choice: dict[str, Any]
        if self.chat:
            delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        if finish_reason is not None:
            choice["stop_reason"] = None
        return b"data: " + orjson.dumps(self._envelope(obj, [choice])) + b"\n\n"

    def usage_event(self, usage_: dict[str, Any]) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return b"data: " + orjson.dumps(self._envelope(obj, [], usage=usage_)) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
