"""OpenAI request bodies in (the prompt as one string), vLLM-shaped response bodies out; and what every
API's request has in common (:class:`Exchange`, :class:`BadRequest`, the filler words)."""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from llmlb.sim.engine import Request

# One word per generated token.
# fmt: off
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "runs",
         "far", "away", "into", "woods", "where", "it", "finds", "an", "old", "oak", "tree", "by",
         "river", "that", "flows", "past", "hills", "under", "blue", "sky")
# fmt: on


class BadRequest(ValueError):
    """The body is not a usable request; answered 400 (or `status`) in the route's error shape.
    `kind` overrides the error type the status implies."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.kind = kind


ErrorBody = Callable[[str, int, "str | None", "str | None"], bytes]
"""An API's error body from (message, status, param, kind)."""


class Exchange(ABC):
    """One generation request in some API's dialect: what the engine runs and how the answer is
    written, as one JSON body or as SSE events while the tokens come out."""

    def __init__(
        self, model: str | None, default_model: str, prompt: bytes, max_tokens: int | None, stream: bool
    ) -> None:
        self.name = model or default_model
        """The model the answer names (the server has checked `model`)."""
        self.prompt = prompt
        """The rendered prompt, UTF-8."""
        self.max_tokens = max_tokens
        """As requested (None: the server's default, and the answer ends as a natural stop)."""
        self.stream = stream

    @abstractmethod
    def full(self, req: Request) -> bytes:
        """The JSON answer of a finished request."""

    def head(self, req: Request) -> bytes:
        """SSE events before the first token's (sent with it, once the cache hit is known)."""
        return b""

    @abstractmethod
    def tokens(self, start: int, end: int, req: Request) -> bytes:
        """SSE events of generated tokens `start` .. `end - 1`."""

    @abstractmethod
    def tail(self, req: Request) -> bytes:
        """SSE events after the last token (the request finished, not aborted)."""


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
        out.append(render_message(role, text))
    return "".join(out)


def render_message(role: str, text: str) -> str:
    """One message as the sims' chat template renders it (every API's prompt uses it)."""
    return f"<|{role}|>\n{text}\n"


def render_system(system: str | None, tools: Any) -> str:
    """What a chat template puts first: the system message, then the tools (as JSON)."""
    out = "" if system is None else render_message("system", system)
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("tools must be a list", "tools")
        if tools:
            out += render_message("tools", canonical_json(tools))
    return out


def load_body(body: bytes) -> dict[str, Any]:
    """A request body: a JSON object. Raises BadRequest."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def model_field(data: dict[str, Any]) -> str | None:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    return model


def positive_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is not None and (type(value) is not int or value < 1):
        raise BadRequest(f"{key} must be a positive integer", key)
    return value


def parse_request(body: bytes, chat: bool) -> ParsedRequest:
    """A chat-completions (`chat`) or completions body. Raises BadRequest."""
    return parse_completion(load_body(body), chat)


def parse_completion(data: dict[str, Any], chat: bool) -> ParsedRequest:
    """A chat-completions (`chat`) or completions request. Raises BadRequest."""
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
    model = model_field(data)
    max_tokens = positive_int(data, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = positive_int(data, "max_tokens")
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


def error_body(message: str, status: int, param: str | None = None, kind: str | None = None) -> bytes:
    kind = kind or ERROR_TYPES.get(status, "InternalServerError")
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


class Responder(Exchange):
    """A chat-completions or completions request and its vLLM-shaped answers."""

    def __init__(self, parsed: ParsedRequest, default_model: str) -> None:
        super().__init__(parsed.model, default_model, parsed.prompt, parsed.max_tokens, parsed.stream)
        self.chat = parsed.chat
        self.include_usage = parsed.include_usage
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def full(self, req: Request) -> bytes:
        text = completion_text(req.generated)
        finish_reason = req.finish_reason
        choice: dict[str, Any]
        if self.chat:
            message = {"role": "assistant", "content": text, "tool_calls": []}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        choice["stop_reason"] = None
        return orjson.dumps(self._envelope(self.object, [choice], usage=request_usage(req)))

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.name,
            "choices": choices,
            **extra,
        }

    def tokens(self, start: int, end: int, req: Request) -> bytes:
        reason = req.finish_reason if req.finished else None
        return b"".join(self.token_event(i, reason if i == end - 1 else None) for i in range(start, end))

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

    def tail(self, req: Request) -> bytes:
        if not self.include_usage:
            return DONE_EVENT
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return (
            b"data: " + orjson.dumps(self._envelope(obj, [], usage=request_usage(req))) + b"\n\n" + DONE_EVENT
        )


def request_usage(req: Request) -> dict[str, Any]:
    return usage(req.prompt_tokens, req.generated, req.cached_tokens)


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """A named SSE event (`event:` then `data:`), as OpenAI's Responses and Anthropic's APIs send."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def canonical_json(value: Any) -> str:
    """`value` as compact JSON with sorted keys: how the sims render structured prompt parts."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


DONE_EVENT = b"data: [DONE]\n\n"
