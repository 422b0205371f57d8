"""The API families, asked in order; raw JSON comes last and takes the rest."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from .. import answerheaders, tools, wireform
from .anthropic import AnthropicFamily
from .base import Family, NotRecordable, StreamRecorder, Wire, is_typed, json_wire
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
    "encode_value",
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
    if tools.is_tool_result(body):
        return None  # OGX's web_search, replayed as Tavily's answer (tools.py)
    for item in body if isinstance(body, list) else [body]:
        if is_typed(item) and not str(item["__type__"]).startswith(TYPE_MODULES):
            return f"unknown __type__ {str(item['__type__'])[:200]!r}: no family can replay it"
    return None


def encode(path: str, request_body: Any, response: dict[str, Any]) -> Wire:
    """Put a recorded response back on the wire as its upstream would have sent it: its
    JSON written as the upstream wrote it (``wireform``), with the answer's recorded
    headers (``answerheaders``)."""
    wire = encode_value(path, request_body, response)
    form = response.get(wireform.FIELD)
    if isinstance(form, dict):
        wire = with_wire_form(wire, form)
    return answerheaders.with_headers(wire, response)


def encode_value(path: str, request_body: Any, response: dict[str, Any]) -> Wire:
    """``encode`` in json.dumps's layout, without recorded headers: what a replay sends
    (``Wire.data`` / ``Wire.events``), before how it is written."""
    if response.get("is_exception"):
        return encode_exception(response)
    body = response.get("body")
    if tools.is_tool_result(body):
        if not path.rstrip("/").endswith(tools.SEARCH_PATH):
            raise NotRecordable("a tool's result answers only Tavily's search (tools.py)")
        try:  # OGX's recorded web_search, answered as Tavily's HTTP search
            return json_wire(200, tools.tavily_answer(body["__data__"]))
        except ValueError as e:
            raise NotRecordable(str(e)) from e
    odd = unknown_type(body)
    if odd is not None:
        raise NotRecordable(odd)
    for family in FAMILIES:
        wire = family.encode(path, request_body, response)
        if wire is not None:
            return wire
    raise NotRecordable("no family can replay this response")


def with_wire_form(wire: Wire, form: dict[str, Any]) -> Wire:
    """The wire's body written as ``form`` says (the bytes the upstream sent)."""
    if wire.events is not None and wire.framing in ("sse", "ndjson"):
        eol = wireform.eol(form)
        chunks = wireform.chunk_bytes(wire.events, form)
        if wire.framing == "sse":
            sep = eol.encode()
            parts = [b"data: " + c + sep + sep for c in chunks]
            parts.append(b"data: [DONE]" + sep + sep)
        else:
            parts = [c + eol.encode() for c in chunks]
        return dataclasses.replace(wire, body=b"".join(parts))
    if wire.has_data:
        body = wireform.whole_bytes(wire.data, form)
        if body is not None:
            return dataclasses.replace(wire, body=body)
    return wire
