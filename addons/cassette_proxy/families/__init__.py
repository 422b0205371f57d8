"""The API families, asked in order; raw JSON comes last and takes the rest."""

from __future__ import annotations

import functools
from typing import Any

from .anthropic import AnthropicFamily
from .base import Family, NotRecordable, StreamRecorder, Wire, is_typed
from .bedrock import EventStreamFamily
from .ollama import OllamaFamily
from .openai import OpenAIFamily
from .raw import RawFamily, encode_exception, error_response
from .responses import ResponsesFamily

# Ollama first: its exact /api/... endpoints must win over the openai family's suffix
# match (``/api/embeddings`` ends with ``/embeddings``). Responses before OpenAI: its
# typed objects are ``openai.`` types too, which the openai family would encode as chat
# chunks. Anthropic before raw: its streams end at message_stop, not at any clean end.
# AWS eventstream first: it claims only Bedrock's paths, and its ``encode`` answers only
# for recordings marked as eventstream (any other falls through to the rest).
FAMILIES: list[Family] = [
    EventStreamFamily(),
    OllamaFamily(),
    ResponsesFamily(),
    AnthropicFamily(),
    OpenAIFamily(),
    RawFamily(),
]

__all__ = [
    "FAMILIES",
    "Family",
    "NotRecordable",
    "StreamRecorder",
    "Wire",
    "classify",
    "encode",
    "error_response",
    "is_typed",
    "unknown_type",
]

# The modules whose ``__type__`` names a family can put back on the wire. A typed object
# of any other module would otherwise reach the raw family and be replayed as its
# ``{"__type__", "__data__"}`` wrapper, which no client parses.
TYPE_MODULES = ("openai.", "ollama.")


@functools.lru_cache(maxsize=4096)  # every request asks; the families never change
def classify(method: str, path: str) -> Family:
    """The family that owns a request: the first that claims it."""
    for family in FAMILIES:
        if family.claims(method, path):
            return family
    raise AssertionError("the raw family claims every request")


def unknown_type(body: Any) -> str | None:
    """Why a recorded response body cannot be replayed: a ``__type__`` no family knows.

    Looks at the body itself and, for a stream, every chunk: cheap next to parsing.
    """
    for item in body if isinstance(body, list) else [body]:
        if is_typed(item) and not str(item["__type__"]).startswith(TYPE_MODULES):
            return f"unknown __type__ {str(item['__type__'])[:200]!r}: no family can replay it"
    return None


def encode(path: str, request_body: Any, response: dict[str, Any]) -> Wire:
    """Put a recorded response back on the wire as its upstream would have sent it."""
    if response.get("is_exception"):
        return encode_exception(response)
    odd = unknown_type(response.get("body"))
    if odd is not None:
        raise NotRecordable(odd)
    for family in FAMILIES:
        wire = family.encode(path, request_body, response)
        if wire is not None:
            return wire
    raise NotRecordable("no family can replay this response")
