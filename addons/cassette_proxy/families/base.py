"""What every API family provides: classify a request, type a response, re-encode it.

A family is one module. The proxy asks the families in order; the raw JSON family
comes last and takes whatever the others did not claim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..streams import NotUTF8

NO_DATA: Any = object()  # a Wire whose body is not one JSON value


@dataclass
class Wire:
    """A response as it goes back on the wire."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    # What the body was written from, for ``wireform``: a whole answer's JSON value
    # (``NO_DATA`` when the body is not one), or a stream's chunk values with its framing
    # ("sse": ``data: <json>`` events ending in ``data: [DONE]``; "ndjson": one a line).
    data: Any = field(default=NO_DATA, repr=False)
    events: list[Any] | None = field(default=None, repr=False)
    framing: str = ""

    @property
    def has_data(self) -> bool:
        return self.data is not NO_DATA


def json_wire(status: int, data: Any) -> Wire:
    return Wire(status, "application/json", json.dumps(data).encode(), data=data)


class NotRecordable(Exception):
    """A response the family cannot store faithfully; the message says why."""


def frames(framer: Any, data: bytes) -> list[Any]:
    """``framer.feed(data)``; a stream that is not UTF-8 is NotRecordable (issue 18.14:
    refused as a whole answer with those bytes is, never stored with U+FFFD)."""
    try:
        return framer.feed(data)
    except NotUTF8 as e:
        raise NotRecordable(f"stream is {e}") from e


class StreamRecorder(Protocol):
    """Collects a stream's chunks as they pass through the tap."""

    complete: bool  # the stream's own end marker was seen ([DONE], "done": true)

    def feed(self, data: bytes) -> None:
        """Take one socket read. Raises NotRecordable when the stream cannot be stored."""

    def response(self, clean_end: bool) -> dict[str, Any]:
        """The cassette's response half. Raises NotRecordable when incomplete."""


class Family(Protocol):
    name: str

    def claims(self, method: str, path: str) -> bool:
        """Whether this family knows the endpoint."""

    def record(self, path: str, request_body: Any, status: int, data: Any) -> dict[str, Any]:
        """The response half for a whole (non-streamed) JSON answer."""

    def stream_recorder(self, path: str, request_body: Any, content_type: str) -> StreamRecorder:
        """A recorder for a streamed answer. Raises NotRecordable for unknown stream kinds."""

    def encode(self, path: str, request_body: Any, response: dict[str, Any]) -> Wire | None:
        """The wire form of a recorded response, or None if the shape is not this family's."""


def is_typed(obj: Any) -> bool:
    return isinstance(obj, dict) and "__type__" in obj and "__data__" in obj


def type_module(response: dict[str, Any]) -> str | None:
    """The top-level module of the response's ``__type__`` (openai, ollama), if typed."""
    body = response.get("body")
    first = body[0] if isinstance(body, list) and body else body
    if is_typed(first):
        return str(first["__type__"]).split(".", 1)[0]
    return None
