"""OpenAI's Responses API as vLLM serves it: ``POST /v1/responses`` (JSON or SSE), the per-server
store behind ``previous_response_id`` and ``GET /v1/responses/{id}``.

The prompt is rendered like a chat template: ``instructions`` as the system message, then the tools,
then the conversation items, each ``"<|role|>\\n" + text + "\\n"``. A turn's prompt therefore starts
with the previous turn's prompt plus its answer, whether the client re-sends the whole history as
items or names ``previous_response_id`` (the stored conversation, then the new input). The new
request's instructions and tools replace the stored ones, as in OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
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

STORE_LIMIT = 10_000
"""Responses a sim keeps for previous_response_id and GET (the most recent)."""


@dataclass(frozen=True)
class Turn:
    """One stored response's part of a conversation: its input items and its answer, rendered;
    `parent` is the turn it followed (shared, so a long conversation is stored once)."""

    parent: Turn | None
    text: str

    def history(self) -> str:
        """The whole conversation up to and including this turn."""
        parts = []
        turn: Turn | None = self
        while turn is not None:
            parts.append(turn.text)
            turn = turn.parent
        return "".join(reversed(parts))


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    turn: Turn


class ResponseStore:
    """This server's stored responses, the most recent `limit` (older ones are forgotten)."""

    def __init__(self, limit: int = STORE_LIMIT) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> Stored | None:
        return self._items.get(response_id)

    def put(self, response_id: str, stored: Stored) -> None:
        self._items[response_id] = stored
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def not_found(response_id: str) -> BadRequest:
    return BadRequest(
        f"Response with id '{response_id}' not found.",
        "previous_response_id",
        status=404,
        kind="invalid_request_error",
    )


# --------------------------------------------------------------------------------------------------
# rendering


def _content_text(content: Any) -> str:
    """A message's content: a string, or parts whose text parts are kept (others as their JSON)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("a message's content must be a string or a list of parts", "input")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise BadRequest("each content part must be an object", "input")
        if part.get("type") in ("input_text", "output_text", "text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest("a text part's text must be a string", "input")
            texts.append(text)
        else:  # images, files: their JSON, so different ones make different prompts
            texts.append(canonical_json(part))
    return "\n".join(texts)


def render_item(item: Any) -> str:
    """One input (or output) item of a conversation."""
    if not isinstance(item, dict):
        raise BadRequest("each input item must be an object", "input")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if not isinstance(role, str):
            raise BadRequest("each message needs a string role", "input")
        return render_message(role, _content_text(item.get("content")))
    if kind == "function_call":
        call = {"name": item.get("name"), "arguments": item.get("arguments")}
        return render_message("assistant", f"<tool_call>{canonical_json(call)}</tool_call>")
    if kind == "function_call_output":
        output = item.get("output")
        return render_message("tool", output if isinstance(output, str) else canonical_json(output))
    return canonical_json(item) + "\n"


def render_input(value: Any) -> str:
    """`input`: a string (one user message) or a list of items."""
    if isinstance(value, str):
        return render_message("user", value)
    if isinstance(value, list):
        return "".join(render_item(item) for item in value)
    raise BadRequest("input must be a string or a list of items", "input")


# --------------------------------------------------------------------------------------------------
# requests and answers


def parse_responses(data: dict[str, Any], default_model: str, store: ResponseStore) -> ResponsesExchange:
    """A Responses request. Raises BadRequest (404 for an unknown previous_response_id)."""
    model = model_field(data)
    if "input" not in data:
        raise BadRequest("input is required", "input")
    max_tokens = positive_int(data, "max_output_tokens")
    previous_id = data.get("previous_response_id")
    parent: Turn | None = None
    if previous_id is not None:
        if not isinstance(previous_id, str):
            raise BadRequest("previous_response_id must be a string", "previous_response_id")
        stored = store.get(previous_id)
        if stored is None:
            raise not_found(previous_id)
        parent = stored.turn
    store_it = data.get("store", True)
    if not isinstance(store_it, bool):
        raise BadRequest("store must be a boolean", "store")
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("instructions must be a string", "instructions")
    system = render_system(instructions, data.get("tools"))
    new_input = render_input(data["input"])
    prompt = system + (parent.history() if parent is not None else "") + new_input
    if not prompt:
        raise BadRequest("the input cannot be empty", "input")
    return ResponsesExchange(
        data,
        model=model,
        default_model=default_model,
        prompt=prompt.encode(),
        max_tokens=max_tokens,
        store=store if store_it else None,
        parent=parent,
        new_input=new_input,
    )


class ResponsesExchange(Exchange):
    """A Responses request and its answers; stores the response when it completes."""

    def __init__(
        self,
        data: dict[str, Any],
        *,
        model: str | None,
        default_model: str,
        prompt: bytes,
        max_tokens: int | None,
        store: ResponseStore | None,
        parent: Turn | None,
        new_input: str,
    ) -> None:
        super().__init__(model, default_model, prompt, max_tokens, data.get("stream") is True)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.store = store
        self.parent = parent
        self.new_input = new_input
        self.request = data
        self.sequence = 0

    def response(self, req: Request, status: str) -> dict[str, Any]:
        """The Response object ("id" first); `output` and `usage` only once completed."""
        done = status == "completed"
        data = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": self.name,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": data.get("instructions"),
            "max_output_tokens": self.max_tokens,
            "output": [self.output_item(req.generated)] if done else [],
            "parallel_tool_calls": data.get("parallel_tool_calls", True),
            "previous_response_id": data.get("previous_response_id"),
            "store": self.store is not None,
            "temperature": data.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": data.get("tool_choice", "auto"),
            "tools": data.get("tools") or [],
            "top_p": data.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": self.usage(req) if done else None,
            "metadata": data.get("metadata") or {},
        }

    def output_item(self, tokens: int) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "status": "completed",
            "role": "assistant",
            "content": [self.text_part(completion_text(tokens))],
        }

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": []}

    @staticmethod
    def usage(req: Request) -> dict[str, Any]:
        return {
            "input_tokens": req.prompt_tokens,
            "input_tokens_details": {"cached_tokens": req.cached_tokens},
            "output_tokens": req.generated,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": req.prompt_tokens + req.generated,
        }

    def completed(self, req: Request) -> dict[str, Any]:
        """The final Response object, stored (unless `store` is false)."""
        response = self.response(req, "completed")
        if self.store is not None:
            answer = render_item(response["output"][0])
            self.store.put(self.id, Stored(response, Turn(self.parent, self.new_input + answer)))
        return response

    def full(self, req: Request) -> bytes:
        return orjson.dumps(self.completed(req))

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(kind, data)

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def head(self, req: Request) -> bytes:
        item = {**self.output_item(0), "status": "in_progress", "content": []}
        return b"".join(
            (
                self._event("response.created", response=self.response(req, "in_progress")),
                self._event("response.in_progress", response=self.response(req, "in_progress")),
                self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", **self._at(), part=self.text_part("")),
            )
        )

    def tokens(self, start: int, end: int, req: Request) -> bytes:
        return b"".join(
            self._event("response.output_text.delta", **self._at(), delta=token_text(i), logprobs=[])
            for i in range(start, end)
        )

    def tail(self, req: Request) -> bytes:
        response = self.completed(req)
        item = response["output"][0]
        part = item["content"][0]
        return b"".join(
            (
                self._event("response.output_text.done", **self._at(), text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **self._at(), part=part),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event("response.completed", response=response),
            )
        )
