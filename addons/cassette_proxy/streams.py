"""Framing a byte stream into events as it passes through.

The stream tap sees one socket read at a time, which may hold half an event or
several; a framer keeps the tail and returns only whole events.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from .jsontext import orjson_reads_alike

# Content types of answers that are streams: passed on as they arrive, never buffered.
STREAM_TYPES = (
    "text/event-stream",
    "application/x-ndjson",
    "application/jsonl",
    "application/vnd.amazon.eventstream",  # AWS (Bedrock): families/eventstream.py
)

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; json alone works, slower
    orjson = None  # type: ignore[assignment]


class NotUTF8(json.JSONDecodeError):
    """A stream's bytes are not UTF-8: it is refused as a whole answer with the same
    bytes is (not JSON), never recorded with U+FFFD in place of what was sent. A
    JSONDecodeError, so every stream recorder reports it as data that is not JSON."""

    def __init__(self, error: UnicodeDecodeError) -> None:
        bad = error.object[error.start : error.start + 4]
        text = bytes(bad).decode("latin-1")
        message = f"not valid UTF-8 (bytes {bytes(bad)!r})"
        super().__init__(message, text, 0)
        self.args = (message,)  # without json's "line 1 column 1": no position is meant


def utf8(data: bytes) -> str:
    """``data`` decoded as UTF-8, strictly: raises NotUTF8 (a ValueError)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUTF8(e) from None


class _Text:
    """UTF-8 reads to text with CRLF made LF, also when a read ends between CR and LF.
    Bytes that are not UTF-8 raise NotUTF8 (a character split across reads is fine)."""

    def __init__(self, strict: bool = True) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict" if strict else "replace")
        self._cr = False  # the last read ended with a CR: it may be half of a CRLF

    def decode(self, data: bytes) -> str:
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError as e:
            raise NotUTF8(e) from None
        if self._cr:
            text, self._cr = "\r" + text, False
        if text.endswith("\r"):
            text, self._cr = text[:-1], True
        return text.replace("\r\n", "\n")


class SSEFramer:
    """Server-sent events: an event ends at a blank line."""

    def __init__(self, strict: bool = True) -> None:
        # strict: bytes that are not UTF-8 raise NotUTF8 (what is recorded); else U+FFFD.
        self._decoder = _Text(strict)
        self._buffer = ""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += self._decoder.decode(data)
        *events, self._buffer = self._buffer.split("\n\n")
        return [e for e in events if e.strip()]

    @property
    def tail(self) -> str:
        return self._buffer


def sse_data(event: str) -> tuple[str | None, str | None]:
    """The ``event:`` name and the joined ``data:`` lines of one SSE event."""
    name = None
    data: list[str] = []
    for line in event.split("\n"):
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
    return name, ("\n".join(data) if data else None)


class LineFramer:
    """Newline-delimited JSON (Ollama) and, for raw recordings, the lines of any stream."""

    def __init__(self, strict: bool = True) -> None:
        # strict: bytes that are not UTF-8 raise NotUTF8 (what is recorded); else U+FFFD.
        self._decoder = _Text(strict)
        self._buffer = ""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += self._decoder.decode(data)
        *lines, self._buffer = self._buffer.split("\n")
        return lines

    @property
    def tail(self) -> str:
        return self._buffer


class _Bytes:
    """CRLF made LF in raw reads, also when a read ends between CR and LF (no decoding:
    a newline byte is never part of a multi-byte UTF-8 character)."""

    def __init__(self) -> None:
        self._cr = False

    def normalize(self, data: bytes) -> bytes:
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        return data.replace(b"\r\n", b"\n") if b"\r" in data else data


class SSEBytesFramer:
    """SSEFramer's events, as bytes: the recorder's hot path decodes only what it must."""

    def __init__(self) -> None:
        self._lines = _Bytes()
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + self._lines.normalize(data)
        if b"\n\n" not in buffer:
            self._buffer = buffer
            return []
        *events, self._buffer = buffer.split(b"\n\n")
        return [e for e in events if e.strip()]


class LineBytesFramer:
    """LineFramer's lines, as bytes; ``tail`` is the unfinished last line."""

    def __init__(self) -> None:
        self._lines = _Bytes()
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + self._lines.normalize(data)
        if b"\n" not in buffer:
            self._buffer = buffer
            return []
        *lines, self._buffer = buffer.split(b"\n")
        return lines

    @property
    def tail(self) -> bytes:
        return self._buffer


def sse_payload(event: bytes) -> tuple[str | None, bytes | str | None]:
    """``sse_data`` of a bytes event: the common one-line ``data: ...`` event without
    decoding it; any other as ``sse_data`` reads its decoded text."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return None, event[6:]
    return sse_data(utf8(event))


def json_payload(payload: bytes | str) -> tuple[Any, bool]:
    """``json.loads`` of one event's data or one line, as decoded text (bytes that are
    not UTF-8 raise NotUTF8), through orjson where it reads the same value (about 5
    times faster); and whether orjson read it (then it holds no NaN or infinity: see
    cassette.FiniteList).

    orjson refuses what it would read differently (NaN, bad UTF-8, lone surrogates,
    deep nesting): json then decides, so the value and the error are json's.
    Raises json.JSONDecodeError (a ValueError).
    """
    if isinstance(payload, bytes):
        if orjson is not None and orjson_reads_alike(payload):
            try:
                return orjson.loads(payload), True
            except orjson.JSONDecodeError:
                pass
        payload = utf8(payload)
    return json.loads(payload), False
