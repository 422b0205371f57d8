"""Ollama's native API: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``,
``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/pull``, ``/api/version``.

Answers are typed with the ``ollama._types`` class that parses them, as llama-stack's
recorder stored them. Streams are NDJSON (``application/x-ndjson``, one JSON object per
line); one is complete only when its last object says so: ``"done": true`` for
generate and chat, ``"status": "success"`` for pull. Anything else (a cut stream, an
``{"error": ...}`` line) is not recorded.
"""

from __future__ import annotations

import json
from typing import Any

from ..cassette import FiniteList, typed
from ..streams import LineBytesFramer, json_payload
from ..wireform import FIELD, StreamForm
from .base import NotRecordable, Wire, is_typed, json_wire

PREFIX = "ollama._types."
GENERATE = PREFIX + "GenerateResponse"
CHAT = PREFIX + "ChatResponse"
EMBED = PREFIX + "EmbedResponse"
EMBEDDINGS = PREFIX + "EmbeddingsResponse"
LIST = PREFIX + "ListResponse"
PROCESS = PREFIX + "ProcessResponse"
PROGRESS = PREFIX + "ProgressResponse"
SHOW = PREFIX + "ShowResponse"
NDJSON = "application/x-ndjson"


def _done(obj: dict[str, Any]) -> bool:
    return obj.get("done") is True


def _pulled(obj: dict[str, Any]) -> bool:
    return obj.get("status") == "success"


# endpoint -> (wire method, __type__ of the answer or None for raw JSON, end of a stream)
ENDPOINTS: dict[str, tuple[str, str | None, Any]] = {
    "/api/generate": ("POST", GENERATE, _done),
    "/api/chat": ("POST", CHAT, _done),
    "/api/embed": ("POST", EMBED, None),
    "/api/embeddings": ("POST", EMBEDDINGS, None),
    "/api/tags": ("GET", LIST, None),
    "/api/ps": ("GET", PROCESS, None),
    "/api/show": ("POST", SHOW, None),
    "/api/pull": ("POST", PROGRESS, _pulled),
    "/api/version": ("GET", None, None),  # no class in ollama._types: stored as raw JSON
}


def with_stream_default(path: str, body: Any) -> Any:
    """The body of a request to a streaming endpoint with ``stream`` spelled out.

    The Ollama server streams unless told otherwise, and the key says so
    (``equivalence.normal_form``). A recording that leaves ``stream`` out is read as an
    SDK call (``eras.recorded_wire`` guesses ``stream`` from the answer), so a plain
    JSON answer to a request without ``stream`` (Ollama-compatible servers that do not
    stream by default) would never replay: the proxy writes what it asked.
    """
    if isinstance(body, dict) and "stream" not in body and "/api/" in path:
        endpoint = endpoint_of(path)
        if endpoint is not None and ENDPOINTS[endpoint][2] is not None:
            return {**body, "stream": True}
    return body


def endpoint_of(path: str) -> str | None:
    """The Ollama endpoint a wire path is (any prefix before ``/api/`` is allowed)."""
    path = path.rstrip("/")
    for endpoint in ENDPOINTS:
        if path.endswith(endpoint):
            return endpoint
    return None


class NDJSONRecorder:
    """Types each line of an Ollama stream; complete once the last object ends it.

    Works on the raw bytes and reads each line with orjson (see SSEChunkRecorder).
    """

    def __init__(self, type_name: str, is_end: Any) -> None:
        self.type_name = type_name
        self.is_end = is_end
        self.complete = False
        self._framer = LineBytesFramer()
        self._objects: list[dict[str, Any]] = []
        self._finite = True  # every line read by orjson (see cassette.FiniteList)
        self._form = StreamForm()  # how the server wrote its lines (wireform)

    def feed(self, data: bytes) -> None:
        self._form.feed(data)
        for line in self._framer.feed(data):
            self._take(line)

    def _take(self, line: bytes) -> None:
        if not line.strip() and not line.decode("utf-8", "replace").strip():
            return
        try:
            obj, finite = json_payload(line)
            self._finite = self._finite and finite
        except json.JSONDecodeError as e:
            raise NotRecordable(f"NDJSON line is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise NotRecordable("NDJSON line is not a JSON object")
        if "error" in obj:
            raise NotRecordable("the upstream sent an error inside the stream")
        self._form.see(len(self._objects), line, obj)
        self._objects.append(typed(self.type_name, obj))
        self.complete = bool(self.is_end(obj))  # only the last object counts

    def response(self, clean_end: bool) -> dict[str, Any]:
        tail = self._framer.tail
        if tail.strip() and (clean_end or _whole_object(tail)):
            # A last line without its newline. After a close, only a whole JSON object
            # (no cut can leave one: an object ends at its closing brace) is taken.
            self._take(tail)
        if not self.complete:
            raise NotRecordable("stream ended before its last object said it was done")
        body = FiniteList(self._objects) if self._finite else self._objects
        response: dict[str, Any] = {"body": body, "is_streaming": True}
        form = self._form.form()
        if form is not None:
            response[FIELD] = form
        return response


def _whole_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class OllamaFamily:
    name = "ollama"

    def claims(self, method: str, path: str) -> bool:
        endpoint = endpoint_of(path)
        return endpoint is not None and ENDPOINTS[endpoint][0] == method.upper()

    def record(self, path: str, request_body: Any, status: int, data: Any) -> dict[str, Any]:
        endpoint = endpoint_of(path)
        type_name = ENDPOINTS[endpoint][1] if endpoint else None
        if type_name is None:
            return {"status": status, "body": data, "is_streaming": False}
        if not isinstance(data, dict):
            raise NotRecordable("answer is not a JSON object")
        return {"body": typed(type_name, data), "is_streaming": False}

    def stream_recorder(self, path: str, request_body: Any, content_type: str) -> NDJSONRecorder:
        endpoint = endpoint_of(path)
        if endpoint is None or "ndjson" not in content_type:
            raise NotRecordable(f"unexpected stream of {content_type!r} from {path}")
        _, type_name, is_end = ENDPOINTS[endpoint]
        if type_name is None or is_end is None:
            raise NotRecordable(f"{endpoint} does not stream")
        return NDJSONRecorder(type_name, is_end)

    def encode(self, path: str, request_body: Any, response: dict[str, Any]) -> Wire | None:
        body = response.get("body")
        if isinstance(body, list) and body and all(is_typed(x) for x in body):
            if not str(body[0]["__type__"]).startswith(PREFIX):
                return None
            values = [_wire_data(x) for x in body]
            lines = "".join(json.dumps(v) + "\n" for v in values)
            return Wire(200, NDJSON, lines.encode(), events=values, framing="ndjson")
        if is_typed(body) and str(body["__type__"]).startswith(PREFIX):
            return json_wire(200, _wire_data(body))
        return None


def _wire_data(obj: dict[str, Any]) -> Any:
    """The JSON Ollama sends for a typed object.

    ``ShowResponse`` dumped by pydantic says ``modelinfo``; the wire (and the client's
    parser) says ``model_info``.
    """
    data = obj["__data__"]
    if obj["__type__"] == SHOW and isinstance(data, dict) and "modelinfo" in data:
        data = {("model_info" if k == "modelinfo" else k): v for k, v in data.items()}
    return data
