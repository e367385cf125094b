"""OpenAI's embeddings route as vLLM serves it: ``POST /v1/embeddings``. Each input is a prefill-only
request in the engine (so it uses and fills the KV cache); its embedding is a few floats derived
from its bytes."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from llmlb.sim.protocol import BadRequest, model_field

DIMENSIONS = 8
MAX_INPUTS = 2048
"""Inputs in one request (OpenAI's limit)."""


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str | None
    prompts: list[bytes]
    base64: bool


def _token_bytes(ids: list[Any], width: int) -> bytes:
    """Token ids as prompt bytes: `width` (chars per token) bytes each, so a list of n ids is n
    tokens and equal lists share their blocks (ids are taken modulo 256 ** width)."""
    if not ids:
        raise BadRequest("input cannot contain an empty list of tokens", "input")
    if not all(type(i) is int and i >= 0 for i in ids):
        raise BadRequest("token ids must be non-negative integers", "input")
    modulus = 256**width
    return b"".join((i % modulus).to_bytes(width, "big") for i in ids)


def _prompts(value: Any, width: int) -> list[bytes]:
    """`input`: a string, a list of strings, a list of token ids or a list of token-id lists."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(type(i) is int for i in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise BadRequest("input must be a string or a non-empty list", "input")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"input has {len(items)} items; at most {MAX_INPUTS} are allowed", "input")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise BadRequest("input cannot contain an empty string", "input")
            prompts.append(item.encode())
        elif isinstance(item, list):
            prompts.append(_token_bytes(item, width))
        else:
            raise BadRequest("input items must be strings or lists of token ids", "input")
    return prompts


def parse_embeddings(data: dict[str, Any], chars_per_token: int) -> EmbeddingRequest:
    """An embeddings request. Raises BadRequest."""
    model = model_field(data)
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64", None):
        raise BadRequest("encoding_format must be float or base64", "encoding_format")
    return EmbeddingRequest(model, _prompts(data.get("input"), chars_per_token), encoding == "base64")


def embedding(prompt: bytes) -> list[float]:
    """A deterministic unit vector of DIMENSIONS floats from the input's bytes."""
    digest = hashlib.blake2b(prompt, digest_size=4 * DIMENSIONS).digest()
    raw = [n / 2**31 - 1.0 for n in struct.unpack(f">{DIMENSIONS}I", digest)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    # Rounded through float32, so the float and base64 encodings give the same numbers.
    return list(struct.unpack(f"<{DIMENSIONS}f", struct.pack(f"<{DIMENSIONS}f", *(x / norm for x in raw))))


def embeddings_body(request: EmbeddingRequest, model: str, prompt_tokens: int, cached_tokens: int) -> bytes:
    data = []
    for i, prompt in enumerate(request.prompts):
        vector: list[float] | str = embedding(prompt)
        if request.base64:  # little-endian float32, as OpenAI's SDK decodes it
            vector = base64.b64encode(struct.pack(f"<{DIMENSIONS}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return orjson.dumps(
        {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": cached_tokens},
            },
        }
    )
