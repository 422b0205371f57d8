"""Framing a byte stream into events as it passes through.

The stream tap sees one socket read at a time, which may hold half an event or
several; a framer keeps the tail and returns only whole events.
"""

from __future__ import annotations

import codecs


class _Text:
    """UTF-8 reads to text with CRLF made LF, also when a read ends between CR and LF."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._cr = False  # the last read ended with a CR: it may be half of a CRLF

    def decode(self, data: bytes) -> str:
        text = self._decoder.decode(data)
        if self._cr:
            text, self._cr = "\r" + text, False
        if text.endswith("\r"):
            text, self._cr = text[:-1], True
        return text.replace("\r\n", "\n")


class SSEFramer:
    """Server-sent events: an event ends at a blank line."""

    def __init__(self) -> None:
        self._decoder = _Text()
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

    def __init__(self) -> None:
        self._decoder = _Text()
        self._buffer = ""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += self._decoder.decode(data)
        *lines, self._buffer = self._buffer.split("\n")
        return lines

    @property
    def tail(self) -> str:
        return self._buffer
