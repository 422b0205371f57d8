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


class StreamDecoder:
    """Incremental decoder for one response body; ``feed`` may return ``b""``."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
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
        if self.encoding == "br":
            return bytes(self._impl.process(data))
        return bytes(self._impl.decompress(data))

    def flush(self) -> bytes:
        """Whatever is left at the end of the body."""
        if self.encoding in ("gzip", "x-gzip") or (
            self.encoding == "deflate" and self._impl is not None
        ):
            return bytes(self._impl.flush())
        return b""


def stream_decoder(encoding: str) -> StreamDecoder | None:
    """A decoder for a ``content-encoding`` value, or None if the proxy cannot decode it.

    A list of encodings (``gzip, br``) is not supported: no known server sends one.
    """
    encoding = encoding.strip().lower()
    return StreamDecoder(encoding) if encoding in ENCODINGS else None
