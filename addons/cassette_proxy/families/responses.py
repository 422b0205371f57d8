"""The OpenAI Responses API: ``POST .../responses``, streamed and not, typed.

A whole answer is stored as ``openai.types.responses.response.Response``; a stream as
its events, each typed by its ``type`` (``response.output_text.delta`` is a
``ResponseTextDeltaEvent``), named as llama-stack's recorder names a class:
``<module>.<qualname>``. A stream is complete only at its last event:
``response.completed``, ``response.failed``, ``response.incomplete``, or ``error``
(an error the server streamed is an answer too). A stream cut before one of them is
not recorded.

How the server wrote its events (``event:`` lines or not, compact JSON or not, its
content type) is kept in the response's optional ``wire_form``, which llama-stack's
reader ignores, so a replay sends the same bytes the server sent.

``GET .../responses/{id}``, ``.../cancel``, ``.../input_items`` and ``DELETE`` are plain
JSON and stay with the raw family: their answers replay as they were.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..cassette import typed
from ..streams import SSEFramer, sse_data
from .base import NotRecordable, Wire, frames, is_typed, json_wire

PACKAGE = "openai.types.responses."
RESPONSE = PACKAGE + "response.Response"
# The events whose class name is not the one their ``type`` spells (checked against the
# installed openai package by tests/test_surfaces.py).
EVENT_CLASSES = {
    "error": "ResponseErrorEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.image_generation_call.completed": "ResponseImageGenCallCompletedEvent",
    "response.image_generation_call.generating": "ResponseImageGenCallGeneratingEvent",
    "response.image_generation_call.in_progress": "ResponseImageGenCallInProgressEvent",
    "response.image_generation_call.partial_image": "ResponseImageGenCallPartialImageEvent",
}
# The events that end a stream: after one of them the answer is whole.
TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "error"}
)
DEFAULT_FORM = {"content_type": "text/event-stream", "event_lines": True, "json": "spaced"}
# json.dumps arguments for each JSON layout a server may use.
_JSON_FORMS: dict[str, dict[str, Any]] = {
    "compact": {"separators": (",", ":"), "ensure_ascii": False},
    "compact-ascii": {"separators": (",", ":"), "ensure_ascii": True},
    "spaced": {"separators": (", ", ": "), "ensure_ascii": True},
    "spaced-utf8": {"separators": (", ", ": "), "ensure_ascii": False},
}


def is_responses_path(path: str) -> bool:
    """``.../responses`` itself (create), not ``.../responses/{id}/...``."""
    return path.rstrip("/").endswith("/responses")


def event_type_name(event_type: str) -> str:
    """The ``__type__`` of an event: the openai SDK's class for its ``type``.

    The SDK names a class after its event (``response.output_item.added`` is
    ``ResponseOutputItemAddedEvent`` in ``response_output_item_added_event``); the few
    that differ are listed. An event newer than this table gets the name by that rule.
    """
    cls = EVENT_CLASSES.get(event_type)
    if cls is None:
        cls = "".join(p.capitalize() for p in re.split(r"[._]", event_type) if p) + "Event"
    module = re.sub(r"(?<!^)(?=[A-Z])", "_", cls).lower()
    return f"{PACKAGE}{module}.{cls}"


def json_form(payload: str, data: Any) -> str | None:
    """Which of the known JSON layouts wrote ``payload``, if any."""
    for name, options in _JSON_FORMS.items():
        if json.dumps(data, **options) == payload:
            return name
    return None


class ResponseEventsRecorder:
    """Types each event of a Responses stream; complete at its terminal event."""

    def __init__(self, content_type: str) -> None:
        self.complete = False
        self._framer = SSEFramer()
        self._events: list[dict[str, Any]] = []
        self._form: dict[str, Any] = {"content_type": content_type}

    def feed(self, data: bytes) -> None:
        for event in frames(self._framer, data):
            if self.complete:
                return  # nothing after the terminal event belongs to the answer
            name, payload = sse_data(event)
            if payload is None or payload.strip() == "[DONE]":
                continue  # a comment, a keep-alive, or a terminator some servers add
            try:
                item = json.loads(payload)
            except json.JSONDecodeError as e:
                raise NotRecordable(f"SSE data is not JSON: {e}") from e
            kind = item.get("type") if isinstance(item, dict) else None
            if not isinstance(kind, str):
                raise NotRecordable("a Responses stream event without a string 'type'")
            if name is not None and name != kind:
                raise NotRecordable(f"event name {name!r} differs from its data's type {kind!r}")
            if not self._events:
                self._form["event_lines"] = name is not None
                self._form["json"] = json_form(payload, item) or DEFAULT_FORM["json"]
            self._events.append(typed(event_type_name(kind), item))
            if kind in TERMINAL_EVENTS:
                self.complete = True

    def response(self, clean_end: bool) -> dict[str, Any]:
        if not self.complete:
            raise NotRecordable(
                "stream ended before response.completed, response.failed, "
                "response.incomplete or error"
            )
        return {"body": self._events, "is_streaming": True, "wire_form": self._form}


class ResponsesFamily:
    name = "responses"

    def claims(self, method: str, path: str) -> bool:
        return method == "POST" and is_responses_path(path)

    def record(self, path: str, request_body: Any, status: int, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or data.get("object") != "response":
            raise NotRecordable("answer is not a Responses object ({'object': 'response'})")
        return {"body": typed(RESPONSE, data), "is_streaming": False}

    def stream_recorder(
        self, path: str, request_body: Any, content_type: str
    ) -> ResponseEventsRecorder:
        if "text/event-stream" not in content_type:
            raise NotRecordable(f"unexpected stream of {content_type!r} from {path}")
        return ResponseEventsRecorder(content_type)

    def encode(self, path: str, request_body: Any, response: dict[str, Any]) -> Wire | None:
        body = response.get("body")
        if is_typed(body) and str(body["__type__"]).startswith(PACKAGE):
            return json_wire(200, body["__data__"])
        # The first chunk's type first: a chat stream is not walked twice.
        if not (isinstance(body, list) and body and is_typed(body[0])):
            return None
        if not str(body[0]["__type__"]).startswith(PACKAGE) or not all(map(is_typed, body)):
            return None
        form = {**DEFAULT_FORM, **(response.get("wire_form") or {})}
        options = _JSON_FORMS.get(str(form["json"]), _JSON_FORMS["spaced"])
        parts = []
        for event in body:
            data = event["__data__"]
            line = f"data: {json.dumps(data, **options)}\n\n"
            if form["event_lines"] and isinstance(data, dict) and "type" in data:
                line = f"event: {data['type']}\n" + line
            parts.append(line)
        return Wire(200, str(form["content_type"]), "".join(parts).encode())


# ---- what ``stats`` and ``show`` read ------------------------------------------------------


def is_responses_type(type_name: str) -> bool:
    return type_name.startswith(PACKAGE)


def final_response(datas: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The whole Response of an answer: itself, or the one its terminal event carries."""
    for data in reversed(datas):
        if data.get("object") == "response":
            return data
        if data.get("type") in TERMINAL_EVENTS and isinstance(data.get("response"), dict):
            return data["response"]
    return None


def usage_of(datas: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The usage object of an answer (a stream reports it once, in its terminal event)."""
    response = final_response(datas)
    usage = response.get("usage") if response else None
    return usage if isinstance(usage, dict) else None


def reassemble(datas: list[dict[str, Any]]) -> dict[str, Any]:
    """Text and function calls of an answer: from its final Response, else its deltas."""
    view: dict[str, Any] = {}
    response = final_response(datas)
    text, calls = "", []
    if response is not None:
        view["status"] = response.get("status")
        for item in response.get("output") or []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                for part in item.get("content") or []:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        text += part["text"]
            elif item.get("type") == "function_call":
                calls.append(
                    {"id": item.get("call_id"), "name": item.get("name"),
                     "arguments": item.get("arguments")}
                )  # fmt: skip
    else:
        arguments: dict[str, str] = {}
        for data in datas:
            if data.get("type") == "response.output_text.delta":
                text += str(data.get("delta") or "")
            elif data.get("type") == "response.function_call_arguments.delta":
                key = str(data.get("item_id"))
                arguments[key] = arguments.get(key, "") + str(data.get("delta") or "")
        calls = [{"id": k, "name": None, "arguments": v} for k, v in arguments.items()]
    errors = [d for d in datas if d.get("type") == "error"]
    if errors:
        view["error"] = {k: errors[-1].get(k) for k in ("code", "message")}
    view["text"] = text
    if calls:
        view["tool_calls"] = calls
    return view


# ---- cassette_normalize ---------------------------------------------------------------------

_ID_FIELDS = ("id", "item_id", "call_id", "response_id")


def normalize_body(body: Any, request_hash: str) -> Any:
    """A Responses answer with its fresh ids and times replaced, consistently.

    The response's id becomes ``rec-<hash12>`` (llama-stack's form), each output item's
    id (and call id) ``rec-<hash12>-<n>`` in order of appearance, wherever they appear
    (an event's ``item_id`` names the same item); ``created_at`` and ``completed_at`` of
    the response become 0. Re-recording an unchanged answer then gives the same file.
    """
    objects = body if isinstance(body, list) else [body]
    datas = [o["__data__"] for o in objects if is_typed(o) and isinstance(o["__data__"], dict)]
    short = request_hash[:12]
    names: dict[str, str] = {}
    counts = {"response": 0, "item": 0}

    def note(value: Any, response: bool = False) -> None:
        if isinstance(value, str) and value and value not in names:
            kind = "response" if response else "item"
            counts[kind] += 1
            n = counts[kind]
            if response:
                names[value] = f"rec-{short}" if n == 1 else f"rec-{short}-r{n}"
            else:
                names[value] = f"rec-{short}-{n}"

    def note_item(item: Any) -> None:
        if isinstance(item, dict):
            note(item.get("id"))
            note(item.get("call_id"))

    for data in datas:
        for response in (data, data.get("response")):
            if isinstance(response, dict) and response.get("object") == "response":
                note(response.get("id"), response=True)
                for item in response.get("output") or []:
                    note_item(item)
        note_item(data.get("item"))
        note(data.get("item_id"))

    def rewrite(value: Any) -> Any:
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        if not isinstance(value, dict):
            return value
        out = {k: rewrite(v) for k, v in value.items()}
        for field in _ID_FIELDS:
            if isinstance(out.get(field), str) and out[field] in names:
                out[field] = names[out[field]]
        if out.get("object") == "response":
            for field in ("created_at", "completed_at"):
                if out.get(field) is not None:
                    out[field] = 0
        return out

    return rewrite(body)
