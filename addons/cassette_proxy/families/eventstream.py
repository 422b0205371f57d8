"""AWS eventstream (``application/vnd.amazon.eventstream``): Bedrock's streaming answers.

A message on the wire is::

    total length (u32) | headers length (u32) | prelude CRC32 (of the 8 bytes before)
    headers            | payload             | message CRC32 (of everything before it)

all big-endian; each header is ``name length (u8) | name | type (u8) | value``.

A recorded stream keeps one chunk per message, decoded: its headers (a string header as
its string, any other as ``{"type": ..., "value": ...}``) and its payload (the JSON value
when it is JSON, else ``payload_base64``). The response half says what it is with
``"content_type": "application/vnd.amazon.eventstream"``; replay encodes valid frames
again (JSON payloads written compactly, as AWS writes them). Pure: no mitmproxy here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import uuid
import zlib
from typing import Any
from urllib.parse import unquote

from .base import NotRecordable, Wire

CONTENT_TYPE = "application/vnd.amazon.eventstream"
PRELUDE = 12  # two lengths and the prelude CRC
MAX_FRAME = 16 * 1024 * 1024  # AWS's own limit on one message

# Bedrock runtime's endpoints (model ids may hold ``:`` and ``/``, URL-encoded or not).
BEDROCK_PATH = re.compile(
    r"^/model/.+/(converse|converse-stream|invoke|invoke-with-response-stream)$"
)

# header value type byte -> name; the names are what a cassette shows
_TYPES = {
    0: "bool",  # true
    1: "bool",  # false
    2: "byte",
    3: "short",
    4: "integer",
    5: "long",
    6: "bytes",
    7: "string",
    8: "timestamp",
    9: "uuid",
}
_FIXED = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}
_BY_NAME = {"byte": 2, "short": 3, "integer": 4, "long": 5, "timestamp": 8}


class FrameError(ValueError):
    """Bytes that are not a valid eventstream message; the message says where."""


def is_eventstream(content_type: str) -> bool:
    return content_type.strip().lower().startswith(CONTENT_TYPE)


# ---- decoding ------------------------------------------------------------------------


def frame_length(buffer: bytes | bytearray) -> int | None:
    """The length of the message at the start of ``buffer``, once its prelude is in."""
    if len(buffer) < PRELUDE:
        return None
    total, headers_len, crc = struct.unpack_from(">III", buffer)
    if zlib.crc32(bytes(buffer[:8])) != crc:
        raise FrameError("prelude CRC mismatch")
    if total < PRELUDE + 4 + headers_len or total > MAX_FRAME:
        raise FrameError(f"bad message length {total} (headers {headers_len})")
    return total


def decode_frame(frame: bytes) -> dict[str, Any]:
    """One whole message as a chunk: ``{"headers": {...}, "payload": ...}``."""
    total, headers_len, _ = struct.unpack_from(">III", frame)
    if total != len(frame):
        raise FrameError(f"message length {total}, {len(frame)} bytes given")
    (crc,) = struct.unpack_from(">I", frame, total - 4)
    if zlib.crc32(frame[:-4]) != crc:
        raise FrameError("message CRC mismatch")
    headers = _decode_headers(frame[PRELUDE : PRELUDE + headers_len])
    payload = frame[PRELUDE + headers_len : total - 4]
    if not payload:
        return {"headers": headers, "payload_base64": ""}
    try:
        return {"headers": headers, "payload": json.loads(payload, parse_constant=_no_constant)}
    except (ValueError, UnicodeDecodeError):
        return {"headers": headers, "payload_base64": base64.b64encode(payload).decode("ascii")}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # kept as bytes: a cassette cannot hold NaN


def _decode_headers(data: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    i = 0
    try:
        while i < len(data):
            n = data[i]
            name = data[i + 1 : i + 1 + n].decode("utf-8")
            i += 1 + n
            kind = data[i]
            i += 1
            value: Any
            if kind in (0, 1):
                value = {"type": "bool", "value": kind == 0}
            elif kind in _FIXED:
                fmt = _FIXED[kind]
                (number,) = struct.unpack_from(fmt, data, i)
                i += struct.calcsize(fmt)
                value = {"type": _TYPES[kind], "value": number}
            elif kind in (6, 7):
                (length,) = struct.unpack_from(">H", data, i)
                raw = data[i + 2 : i + 2 + length]
                if len(raw) != length:
                    raise FrameError(f"header {name!r} is cut short")
                i += 2 + length
                if kind == 7:
                    value = raw.decode("utf-8")
                else:
                    value = {"type": "bytes", "value": base64.b64encode(raw).decode("ascii")}
            elif kind == 9:
                raw = data[i : i + 16]
                i += 16
                value = {"type": "uuid", "value": str(uuid.UUID(bytes=raw))}
            else:
                raise FrameError(f"header {name!r} has unknown type {kind}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, FrameError):
            raise
        raise FrameError(f"bad headers: {e}") from None
    return headers


class FrameSplitter:
    """Whole messages out of socket reads (a read may hold half of one, or several)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while True:
            total = frame_length(self._buffer)
            if total is None or len(self._buffer) < total:
                return frames
            frames.append(bytes(self._buffer[:total]))
            del self._buffer[:total]

    @property
    def tail(self) -> bytes:
        return bytes(self._buffer)


def split_frames(body: bytes) -> list[bytes]:
    """A whole eventstream body as its messages; raises FrameError on a partial one."""
    splitter = FrameSplitter()
    frames = splitter.feed(body)
    if splitter.tail:
        raise FrameError(f"{len(splitter.tail)} bytes after the last whole message")
    return frames


# ---- encoding ------------------------------------------------------------------------


def encode_frame(chunk: dict[str, Any]) -> bytes:
    """A recorded chunk as a valid message (CRCs worked out). Raises FrameError."""
    if not isinstance(chunk, dict) or not isinstance(chunk.get("headers", {}), dict):
        raise FrameError("an eventstream chunk is an object with headers")
    headers = b"".join(_encode_header(k, v) for k, v in chunk.get("headers", {}).items())
    if "payload_base64" in chunk:
        try:
            payload = base64.b64decode(chunk["payload_base64"], validate=True)
        except (binascii.Error, TypeError) as e:
            raise FrameError(f"payload_base64 is not base64: {e}") from None
    else:
        value = chunk.get("payload")
        payload = b"" if value is None else json.dumps(value, separators=(",", ":")).encode()
    total = PRELUDE + len(headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _encode_header(name: str, value: Any) -> bytes:
    raw_name = name.encode("utf-8")
    if len(raw_name) > 255:
        raise FrameError(f"header name too long: {name[:40]!r}")
    head = bytes([len(raw_name)]) + raw_name
    if isinstance(value, str):
        data = value.encode("utf-8")
        return head + bytes([7]) + struct.pack(">H", len(data)) + data
    if not isinstance(value, dict) or "type" not in value:
        raise FrameError(f"header {name!r}: a string or {{type, value}}")
    kind, v = value["type"], value.get("value")
    try:
        if kind == "bool":
            return head + bytes([0 if v else 1])
        if kind in _BY_NAME:
            code = _BY_NAME[kind]
            return head + bytes([code]) + struct.pack(_FIXED[code], int(v))
        if kind == "bytes":
            data = base64.b64decode(v, validate=True)
            return head + bytes([6]) + struct.pack(">H", len(data)) + data
        if kind == "uuid":
            return head + bytes([9]) + uuid.UUID(str(v)).bytes
    except (struct.error, binascii.Error, TypeError, ValueError) as e:
        raise FrameError(f"header {name!r}: {e}") from None
    raise FrameError(f"header {name!r} has unknown type {kind!r}")


# ---- recording and replay, as a family -------------------------------------------------


class EventStreamRecorder:
    """Keeps each message of an eventstream answer as a decoded chunk.

    The format has no end marker: a stream is whole only at a clean end (chunked or
    length-delimited) with no partial message left over.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.complete = False
        self._splitter = FrameSplitter()
        self.chunks: list[dict[str, Any]] = []

    def feed(self, data: bytes) -> None:
        try:
            for frame in self._splitter.feed(data):
                self.chunks.append(decode_frame(frame))
        except FrameError as e:
            raise NotRecordable(f"eventstream: {e}") from None

    def response(self, clean_end: bool) -> dict[str, Any]:
        if not clean_end:
            raise NotRecordable("eventstream ended by a connection close (cut short?)")
        if self._splitter.tail:
            raise NotRecordable("eventstream ended inside a message (cut short?)")
        return {
            "status": self.status,
            "body": self.chunks,
            "is_streaming": True,
            "content_type": CONTENT_TYPE,
        }


def encode_stream(response: dict[str, Any]) -> Wire:
    body = response.get("body")
    if not isinstance(body, list):
        raise NotRecordable("an eventstream recording holds a list of messages")
    try:
        frames = b"".join(encode_frame(chunk) for chunk in body)
    except FrameError as e:
        raise NotRecordable(f"eventstream chunk cannot be encoded: {e}") from None
    return Wire(int(response.get("status") or 200), CONTENT_TYPE, frames)


# ---- what the CLI shows (catalog.py) --------------------------------------------------


def bedrock_model(path: str) -> str | None:
    """The model id a Bedrock runtime path names (``/model/<id>/converse-stream``)."""
    if BEDROCK_PATH.match(path) is None:
        return None
    return unquote(path.removeprefix("/model/").rsplit("/", 1)[0])


def _payloads(body: Any) -> list[tuple[str, Any]]:
    out = []
    for chunk in body if isinstance(body, list) else []:
        if isinstance(chunk, dict) and isinstance(chunk.get("headers"), dict):
            out.append((str(chunk["headers"].get(":event-type", "")), chunk.get("payload")))
    return out


def _inner(payload: Any) -> Any:
    """InvokeModelWithResponseStream's chunk: ``{"bytes": base64 of the model's JSON}``."""
    if isinstance(payload, dict) and isinstance(payload.get("bytes"), str):
        try:
            return json.loads(base64.b64decode(payload["bytes"]))
        except (ValueError, binascii.Error):
            return None
    return None


def usage_of(body: Any) -> dict[str, int]:
    """Tokens of a Converse stream (its ``metadata`` event), OpenAI's names."""
    for event, payload in _payloads(body):
        usage = payload.get("usage") if event == "metadata" and isinstance(payload, dict) else None
        if isinstance(usage, dict):
            names = {"inputTokens": "prompt_tokens", "outputTokens": "completion_tokens",
                     "totalTokens": "total_tokens"}  # fmt: skip
            return {ours: usage[k] for k, ours in names.items() if isinstance(usage.get(k), int)}
    return {}


def reassemble(body: Any) -> dict[str, Any]:
    """The text of a Converse stream (or of an invoke stream's decoded chunks), the
    event types in order, and the stop reason."""
    text, events, stop = [], [], None
    for event, payload in _payloads(body):
        events.append(event)
        if event == "contentBlockDelta" and isinstance(payload, dict):
            delta = payload.get("delta") or {}
            text.append(str(delta.get("text") or ""))
        elif event == "messageStop" and isinstance(payload, dict):
            stop = payload.get("stopReason")
        elif event == "chunk":
            inner = _inner(payload)
            delta = inner.get("delta") if isinstance(inner, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                text.append(delta["text"])
            elif isinstance(inner, dict) and isinstance(inner.get("outputText"), str):
                text.append(inner["outputText"])
    view: dict[str, Any] = {"events": events, "text": "".join(text)}
    if stop is not None:
        view["stop_reason"] = stop
    usage = usage_of(body)
    if usage:
        view["usage"] = usage
    return view
