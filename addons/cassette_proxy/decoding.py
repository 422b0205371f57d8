"""Decoding a content-encoded stream as it passes through, so it can be recorded.

The proxy asks the upstream for ``accept-encoding: identity`` on recorded flows, but
some front ends (CDNs, gateways) compress event streams anyway. The client still gets
the bytes exactly as the upstream sent them; the recorder gets a decoded copy, read by
read, so the cassette holds the events, not compressed bytes.
"""

from __future__ import annotations

import zlib
from typing import Any

import brotli

try:  # zstd is in the standard library from 3.14; mitmproxy depends on the backport
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python < 3.14
    from backports import zstd  # type: ignore[import-not-found,no-redef]

ENCODINGS = ("gzip", "x-gzip", "deflate", "br", "zstd")
# A body is never decoded past this: a cassette cannot hold more (cassette.py's
# MAX_CASSETTE_BYTES), and a 500 KiB gzip bomb would otherwise grow to gigabytes in
# memory and block the event loop while it does (issue 18 item 11).
MAX_DECODED_BYTES = 32 * 1024 * 1024
_STEP = 1024 * 1024  # decoded a MiB at a time, so the bound is checked as it grows


class BodyTooLarge(ValueError):
    """A content-encoded body that decodes to more than the bound; says so, for the log."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        super().__init__(
            f"the {encoding}-encoded body decodes to more than {limit // 2**20} MiB, "
            f"over the {limit // 2**20} MiB a cassette may hold"
        )


class StreamDecoder:
    """Incremental decoder for one response body; ``feed`` may return ``b""``.

    Raises BodyTooLarge once the decoded total would pass ``limit``, having decoded at
    most a step past it (never the whole of what a small input expands to).
    """

    def __init__(self, encoding: str, limit: int = MAX_DECODED_BYTES) -> None:
        self.encoding = encoding
        self.limit = limit
        self.size = 0
        self._impl: Any
        if encoding in ("gzip", "x-gzip"):
            self._impl = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header
        elif encoding == "deflate":
            self._impl = None  # zlib-wrapped or raw: decided by the first bytes
            self._pending = b""
        elif encoding == "br":
            self._impl = brotli.Decompressor()
        elif encoding == "zstd":
            self._impl = zstd.ZstdDecompressor()
        else:
            raise ValueError(f"no stream decoder for {encoding!r}")

    def feed(self, data: bytes) -> bytes:
        if self.encoding == "deflate" and self._impl is None:
            self._pending += data
            if len(self._pending) < 2:
                return b""
            # RFC 9110 says zlib-wrapped; some servers send raw deflate (as mitmproxy allows).
            head = int.from_bytes(self._pending[:2], "big")
            zlib_wrapped = (self._pending[0] & 0x0F) == 8 and head % 31 == 0
            self._impl = zlib.decompressobj(wbits=15 if zlib_wrapped else -15)
            data, self._pending = self._pending, b""
        out = bytearray()
        for piece in self._pieces(data):
            out += piece
            self.size += len(piece)
            if self.size > self.limit:
                raise BodyTooLarge(self.encoding, self.limit)
        return bytes(out)

    def _pieces(self, data: bytes) -> Any:
        """The decoded output of ``data``, at most a step at a time."""
        impl = self._impl
        if self.encoding == "br":
            yield impl.process(data, output_buffer_limit=_STEP)
            while not impl.can_accept_more_data():
                yield impl.process(b"", output_buffer_limit=_STEP)
        elif self.encoding == "zstd":
            yield impl.decompress(data, max_length=_STEP)
            while not impl.needs_input and not impl.eof:
                yield impl.decompress(b"", max_length=_STEP)
        else:  # zlib: what it could not decode within the step waits in unconsumed_tail
            yield impl.decompress(data, _STEP)
            while impl.unconsumed_tail:
                yield impl.decompress(impl.unconsumed_tail, _STEP)

    def flush(self) -> bytes:
        """Whatever is left at the end of the body."""
        if self.encoding in ("gzip", "x-gzip") or (
            self.encoding == "deflate" and self._impl is not None
        ):
            tail = bytes(self._impl.flush())
            self.size += len(tail)
            if self.size > self.limit:
                raise BodyTooLarge(self.encoding, self.limit)
            return tail
        return b""


def decoded(raw: bytes, encoding: str, limit: int = MAX_DECODED_BYTES) -> bytes:
    """A whole body without its content-encoding, decoded with the bound checked as it
    grows: raises BodyTooLarge past ``limit``. ``identity`` or no encoding: ``raw``. An
    encoding the proxy cannot decode, or bytes that are not what they claim: ``raw``, as
    mitmproxy's ``get_content(strict=False)`` has it."""
    encoding = encoding.strip().lower()
    if not raw or encoding in ("", "identity", "none"):
        return raw
    if encoding not in ENCODINGS:
        return raw
    decoder = StreamDecoder(encoding, limit)
    try:
        body = decoder.feed(raw) + decoder.flush()
    except (zlib.error, brotli.error, zstd.ZstdError):
        return raw
    return body


def message_content(message: Any, limit: int = MAX_DECODED_BYTES) -> bytes:
    """A mitmproxy request's or response's decoded body (``b""`` for none), bounded:
    raises BodyTooLarge past ``limit``. Use it for every body the proxy reads."""
    raw = message.raw_content
    if not raw:
        return b""
    return decoded(raw, message.headers.get("content-encoding", ""), limit)


def stream_decoder(encoding: str) -> StreamDecoder | None:
    """A decoder for a ``content-encoding`` value, or None if the proxy cannot decode it.

    A list of encodings (``gzip, br``) is not supported: no known server sends one.
    """
    encoding = encoding.strip().lower()
    return StreamDecoder(encoding) if encoding in ENCODINGS else None
