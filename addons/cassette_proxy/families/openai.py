"""OpenAI-compatible APIs (vLLM, OpenAI, Azure, Ollama's /v1, ...).

Chat completions, completions, embeddings and the model list, streamed (SSE ending
in ``data: [DONE]``) and not. The endpoint is recognised by its last segments, so
any base path (``/v1``, ``/openai/v1``, ``/v1beta/openai``) works.
"""

from __future__ import annotations

import base64
import gc
import json
import struct
from typing import Any

from ..cassette import FiniteList, typed
from ..streams import NotUTF8, SSEBytesFramer, json_payload, sse_payload
from ..wireform import FIELD, StreamForm
from .base import NotRecordable, Wire, is_typed, json_wire

CHAT = "openai.types.chat.chat_completion.ChatCompletion"
CHAT_CHUNK = "openai.types.chat.chat_completion_chunk.ChatCompletionChunk"
COMPLETION = "openai.types.completion.Completion"
EMBEDDINGS = "openai.types.create_embedding_response.CreateEmbeddingResponse"
MODEL = "openai.types.model.Model"
BIG_STREAM = 5000  # chunks: above this, the collector waits while they are read


def endpoint_kind(path: str) -> str | None:
    """Which OpenAI endpoint a wire path is: chat, completions, embeddings or models."""
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/models"):
        return "models"
    return None


def is_gemini_native_models(path: str) -> bool:
    """Gemini's native model list (``/v1beta/models``, ``/v1alpha/models``): a version
    segment right before ``models``, where Gemini's OpenAI-compatible API has ``openai``
    (``/v1beta/openai/models``). Its answer is ``{"models": [...]}``, not an OpenAI list."""
    parts = path.rstrip("/").split("/")
    return len(parts) >= 2 and parts[-2] in ("v1beta", "v1alpha")


def wants_base64(request_body: Any) -> bool:
    return isinstance(request_body, dict) and request_body.get("encoding_format") == "base64"


def decode_embedding(value: Any) -> Any:
    """base64 little-endian float32 (the openai SDK's default) to floats, losslessly."""
    if not isinstance(value, str):
        return value
    raw = base64.b64decode(value)
    if len(raw) % 4:
        raise NotRecordable("base64 embedding is not a whole number of float32 values")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def encode_embedding(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    return base64.b64encode(struct.pack(f"<{len(value)}f", *value)).decode("ascii")


def asks_for_usage(request_body: Any) -> bool:
    """Whether a streamed request asked for the usage chunk (``stream_options``)."""
    options = request_body.get("stream_options") if isinstance(request_body, dict) else None
    return isinstance(options, dict) and bool(options.get("include_usage"))


def without_usage(chunks: list[Any]) -> list[Any]:
    """A recorded stream as sent to a request that did not ask for usage: no usage-only
    chunk (``choices: []`` with a usage), and no usage on the others. A recording made
    with ``include_usage`` may answer such a request (a loose match): its usage chunk
    would break clients that read ``chunk.choices[0]``. ``usage: null`` stays as
    recorded (llama-stack's chunks carry it whatever was asked)."""
    out = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("usage") is None:
            out.append(chunk)
        elif chunk.get("choices") != []:
            out.append({k: v for k, v in chunk.items() if k != "usage"})
    return out


class SSEChunkRecorder:
    """Types each ``data:`` event of an OpenAI stream; complete once ``[DONE]`` is seen.

    While the stream passes, only frames it (raw bytes, decoding only unusual events) and
    keeps each event's data; the chunks are read (orjson) once, at its end. Chunks read
    as they came kept a growing heap of objects alive during a long stream, which the
    garbage collector walked again and again (issue 12: the stall while a 60,000-chunk
    stream was recorded). A big stream is also written as it passes (``spool.py``): the
    tap reads its chunks with ``read``, a batch at a time, and drops them once written.
    """

    def __init__(self, chunk_type: str) -> None:
        self.chunk_type = chunk_type
        self.complete = False
        self._framer = SSEBytesFramer()
        self._payloads: list[bytes | str] = []
        self.size = 0  # bytes of event data kept so far
        self._ends = StreamForm()  # the stream's line ends (wireform)

    @property
    def payloads(self) -> list[bytes | str]:
        """Each chunk's event data, as it came (``read`` reads one)."""
        return self._payloads

    def feed(self, data: bytes) -> None:
        self._ends.feed(data)
        for event in self._framer.feed(data):
            try:
                name, payload = sse_payload(event)
            except NotUTF8 as e:  # issue 18.14: refused, never stored with U+FFFD
                raise NotRecordable(f"SSE data is not JSON: {e}") from e
            if payload is None:
                continue  # a comment or keep-alive
            if payload[:1] not in (b"{", "{"):  # a chunk is an object: only then look
                text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
                if text.strip() == "[DONE]":
                    self.complete = True
                    continue
            if name not in (None, "message"):
                raise NotRecordable(f"named SSE event {name!r} does not fit a typed chunk list")
            self._payloads.append(payload)
            self.size += len(payload)

    def data(self) -> bytes:
        """The events' data as it came, one event a line (``redact.names_credentials``)."""
        return b"\n".join(p if isinstance(p, bytes) else p.encode() for p in self._payloads)

    def read(self, payload: bytes | str) -> tuple[dict[str, Any], bool]:
        """One event's data as its typed chunk, and whether orjson read it (see
        ``json_payload``). Raises NotRecordable for data that is not a chunk."""
        try:
            chunk, by_orjson = json_payload(payload)
        except json.JSONDecodeError as e:
            raise NotRecordable(f"SSE data is not JSON: {e}") from e
        if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
            raise NotRecordable("the upstream sent an error inside the stream")
        return {"__type__": self.chunk_type, "__data__": chunk}, by_orjson  # typed()

    def response(self, clean_end: bool) -> dict[str, Any]:
        if not self.complete:
            raise NotRecordable("stream ended without data: [DONE]")
        chunks: list[dict[str, Any]] = []
        finite = True  # every chunk read by orjson (see cassette.FiniteList)
        # Reading many chunks in one go: no collection in the middle of it.
        pause = len(self._payloads) > BIG_STREAM and gc.isenabled()
        if pause:
            gc.disable()
        form = StreamForm()
        form.crlf = self._ends.crlf
        try:
            read, see = self.read, form.see
            for i, payload in enumerate(self._payloads):
                chunk, by_orjson = read(payload)
                chunks.append(chunk)
                see(i, payload, chunk["__data__"])
                finite = finite and by_orjson
        finally:
            if pause:
                gc.enable()
        response = {"body": FiniteList(chunks) if finite else chunks, "is_streaming": True}
        wire_form = form.form()
        if wire_form is not None:
            response[FIELD] = wire_form
        return response

    def wire_form(self) -> dict[str, Any] | None:
        """The stream's layout and line ends, from its first chunk (a stream written as
        it passed, ``spool.py``: its chunks are gone; no verbatim chunk texts)."""
        form = StreamForm()
        form.crlf = self._ends.crlf
        if self._payloads:
            first = self._payloads[0]
            try:
                form.see(0, first, json_payload(first)[0])
            except ValueError:
                pass
        return form.form(texts=False)


class OpenAIFamily:
    name = "openai"

    def claims(self, method: str, path: str) -> bool:
        kind = endpoint_kind(path)
        if kind == "models":
            return method == "GET" and not is_gemini_native_models(path)
        return kind is not None and method == "POST"

    def record(self, path: str, request_body: Any, status: int, data: Any) -> dict[str, Any]:
        kind = endpoint_kind(path)
        if not isinstance(data, dict):
            raise NotRecordable("answer is not a JSON object")
        if kind == "models":
            models = data.get("data")
            if data.get("object") != "list" or not isinstance(models, list):
                # Another API's list under a ``/models`` path (Gemini's native
                # ``{"models": [...]}``, Anthropic's ``{"data", "has_more"}``): recorded
                # as the raw JSON it is, and replayed as it came.
                return {"status": status, "body": data, "is_streaming": False}
            return {"body": [typed(MODEL, m) for m in models], "is_streaming": False}
        if kind == "embeddings":
            # Stored as floats, as the SDK parses them; re-encoded on replay if asked.
            data = dict(data)
            data["data"] = [
                {**item, "embedding": decode_embedding(item.get("embedding"))}
                if isinstance(item, dict)
                else item
                for item in data.get("data") or []
            ]
            return {"body": typed(EMBEDDINGS, data), "is_streaming": False}
        type_name = CHAT if kind == "chat" else COMPLETION
        return {"body": typed(type_name, data), "is_streaming": False}

    def stream_recorder(self, path: str, request_body: Any, content_type: str) -> SSEChunkRecorder:
        kind = endpoint_kind(path)
        if "text/event-stream" not in content_type or kind not in ("chat", "completions"):
            raise NotRecordable(f"unexpected stream of {content_type!r} from {path}")
        return SSEChunkRecorder(CHAT_CHUNK if kind == "chat" else COMPLETION)

    def encode(self, path: str, request_body: Any, response: dict[str, Any]) -> Wire | None:
        body = response.get("body")
        if isinstance(body, list) and body and all(is_typed(x) for x in body):
            if not str(body[0]["__type__"]).startswith("openai."):
                return None
            if body[0]["__type__"] == MODEL and not response.get("is_streaming"):
                return json_wire(200, {"object": "list", "data": [m["__data__"] for m in body]})
            chunks = [c["__data__"] for c in body]
            if not asks_for_usage(request_body):
                chunks = without_usage(chunks)
            events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
            body_bytes = (events + "data: [DONE]\n\n").encode()
            return Wire(200, "text/event-stream", body_bytes, events=chunks, framing="sse")
        if body == [] and endpoint_kind(path) == "models":
            return json_wire(200, {"object": "list", "data": []})
        streamed = endpoint_kind(path) in ("chat", "completions")
        if body == [] and response.get("is_streaming") and streamed:
            # A stream of no chunk.
            return Wire(200, "text/event-stream", b"data: [DONE]\n\n", events=[], framing="sse")
        if is_typed(body) and str(body["__type__"]).startswith("openai."):
            data = body["__data__"]
            if body["__type__"] == EMBEDDINGS:
                # Each request gets the encoding it asks for, whichever one was recorded
                # (llama-stack kept base64 strings when its caller asked for base64).
                recode = encode_embedding if wants_base64(request_body) else decode_embedding
                data = dict(data)
                data["data"] = [
                    {**item, "embedding": recode(item.get("embedding"))}
                    if isinstance(item, dict)
                    else item
                    for item in data.get("data") or []
                ]
            return json_wire(200, data)
        return None
