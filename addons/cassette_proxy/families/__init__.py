"""The API families, asked in order; raw JSON comes last and takes the rest."""

from __future__ import annotations

from typing import Any

from .base import Family, NotRecordable, StreamRecorder, Wire
from .ollama import OllamaFamily
from .openai import OpenAIFamily
from .raw import RawFamily, encode_exception, error_response

# Ollama first: its exact /api/... endpoints must win over the openai family's suffix
# match (``/api/embeddings`` ends with ``/embeddings``).
FAMILIES: list[Family] = [OllamaFamily(), OpenAIFamily(), RawFamily()]

__all__ = [
    "FAMILIES",
    "Family",
    "NotRecordable",
    "StreamRecorder",
    "Wire",
    "classify",
    "encode",
    "error_response",
]


def classify(method: str, path: str) -> Family:
    """The family that owns a request: the first that claims it."""
    for family in FAMILIES:
        if family.claims(method, path):
            return family
    raise AssertionError("the raw family claims every request")


def encode(path: str, request_body: Any, response: dict[str, Any]) -> Wire:
    """Put a recorded response back on the wire as its upstream would have sent it."""
    if response.get("is_exception"):
        return encode_exception(response)
    for family in FAMILIES:
        wire = family.encode(path, request_body, response)
        if wire is not None:
            return wire
    raise NotRecordable("no family can replay this response")
