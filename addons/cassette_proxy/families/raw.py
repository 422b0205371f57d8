"""Raw JSON: any endpoint no other family knows, recorded and replayed as it was.

Whole answers are stored as a raw dict with their ``status``; streams as the list
of their lines (llama-stack's shape for raw HTTP calls), which replay byte for byte.

A stream is whole at its family's end marker, or at the clean end of a chunked or
length-delimited body; a connection close is no proof (the tap says which it was).
The markers known here: ``data: [DONE]`` (OpenAI), Anthropic's ``message_stop``, the
Responses API's ``response.completed|failed|incomplete`` (as ``event:`` names or as
the ``type`` of the data), and an NDJSON line with ``"done": true`` (Ollama).
"""

from __future__ import annotations

import json
from typing import Any

from ..streams import LineFramer
from .base import NotRecordable, Wire, frames, json_wire
from .eventstream import EventStreamRecorder, is_eventstream

END_EVENTS = ("message_stop", "response.completed", "response.failed", "response.incomplete")


def _end_event_line(line: str) -> bool:
    """Whether an SSE line says its event ends the stream."""
    if line.startswith("event:"):
        return line[6:].strip() in END_EVENTS
    if not line.startswith("data:"):
        return False
    payload = line[5:].strip()
    if payload == "[DONE]":
        return True
    if not payload.startswith("{") or not any(name in payload for name in END_EVENTS):
        return False  # the common case, without parsing
    return _json_object(payload).get("type") in END_EVENTS


def _done_line(line: str) -> bool:
    """Whether an NDJSON line is Ollama's last object (``"done": true``)."""
    return line.startswith("{") and '"done"' in line and _json_object(line).get("done") is True


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


class RawLinesRecorder:
    """Keeps every line of an SSE or NDJSON stream; complete at an end marker (the whole
    end event, up to its blank line) or, without one, only at a clean end."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.complete = False
        self._framer = LineFramer()
        self._lines: list[str] = []
        self._in_end_event = False

    def feed(self, data: bytes) -> None:
        for line in frames(self._framer, data):
            self._lines.append(line)
            if self.complete:
                continue
            if _done_line(line):
                self.complete = True
            elif not line.strip():
                self.complete = self._in_end_event  # the blank line that ends an event
            elif _end_event_line(line):
                self._in_end_event = True

    def response(self, clean_end: bool) -> dict[str, Any]:
        if not (clean_end or self.complete):
            raise NotRecordable(
                "stream ended by a connection close before its end marker (cut short?)"
            )
        lines = list(self._lines)
        if clean_end and self._framer.tail:
            lines.append(self._framer.tail)  # never after a close: it may be half a line
        return {"status": self.status, "body": lines, "is_streaming": True}


class RawFamily:
    name = "raw"

    def claims(self, method: str, path: str) -> bool:
        return True

    def record(self, path: str, request_body: Any, status: int, data: Any) -> dict[str, Any]:
        return {"status": status, "body": data, "is_streaming": False}

    def stream_recorder(self, path: str, request_body: Any, content_type: str) -> Any:

        if is_eventstream(content_type):  # binary frames: as lines they would replay garbled
            return EventStreamRecorder(200)
        return RawLinesRecorder(200)

    def encode(self, path: str, request_body: Any, response: dict[str, Any]) -> Wire | None:
        body = response.get("body")
        status = int(response.get("status") or 200)
        if response.get("is_streaming") and isinstance(body, list):
            if not all(isinstance(line, str) for line in body):
                # A raw stream of JSON objects (as SDK-level recorders stored them).
                text = "".join(json.dumps(item) + "\n" for item in body)
                return Wire(status, "application/x-ndjson", text.encode())
            text = "\n".join(body) + "\n"
            is_sse = any(line.startswith(("data:", "event:")) for line in body)
            kind = "text/event-stream" if is_sse else "application/x-ndjson"
            return Wire(status, kind, text.encode())
        if body is None or isinstance(body, (dict, list, str, int, float, bool)):
            return json_wire(status, body)  # an answer of JSON null is an answer too
        raise NotRecordable("recorded response has no body to replay")


def error_response(status: int, data: Any) -> dict[str, Any]:
    """A 4xx answer as llama-stack stores recorded exceptions.

    Only the OpenAI-shaped ``{"error": {...}}`` fits that shape; any other error body
    is kept as a raw answer with its status, so it replays unchanged.
    """
    if isinstance(data, dict) and set(data) == {"error"} and data["error"] is not None:
        err = data["error"]
        message = err.get("message") if isinstance(err, dict) else str(err)
        return {
            "body": None,
            "is_streaming": False,
            "is_exception": True,
            "exception_data": {
                "type": "HTTPStatusError",
                "message": f"Error code: {status} - {message}",
                "status_code": status,
                "body": err,
            },
        }
    return {"status": status, "body": data, "is_streaming": False}


def encode_exception(response: dict[str, Any]) -> Wire:
    data = response.get("exception_data") or {}
    status = int(data.get("status_code") or 500)
    body = data.get("body")
    if body is None:
        body = {"message": data.get("message") or response.get("exception_message") or "error"}
    return json_wire(status, {"error": body})
