"""A big stream's cassette, written while the stream passes.

mitmproxy's stream tap is synchronous, and a stream's cassette must be in place before
its end marker reaches the client: whatever is left to do at ``data: [DONE]`` is done
on the event loop, with every other client waiting. For a 60,000-chunk stream, reading
the chunks, scrubbing them and writing 31 MB of text there took ~0.7 s (issue 12).

So a big stream is written as it comes: each batch of chunks (one socket read) is read,
put in its cassette form (the same steps as the whole cassette: normalisation, secrets
out) and appended to the temp file as the very bytes it has inside the cassette; then
the chunks are dropped (nothing piles up for the garbage collector to walk). At the end
only the cassette's last lines are written, and the file renamed.

The file is ``json.dumps(cassette, indent=2) + "\\n"`` byte for byte: the text around the
chunks comes from that same serializer, given the cassette with a placeholder for its
chunk list (``split_around``); each batch is ``json.dumps(batch, indent=2)`` moved to the
chunk list's depth (``chunk_block``). Anything a batch cannot be sure of (a chunk json
read instead of orjson, a secret split across chunks) gives up the spool, and the
stream is recorded the ordinary way, from its kept event data, at its end.
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
import weakref
from pathlib import Path
from typing import Any

from .cassette import (
    MAX_CASSETTE_BYTES,
    CassetteError,
    FiniteList,
    dumps_indented_bytes,
    open_temp,
)
from .redact import SplitSecretWatch

# A stream whose event data passes this many bytes is written as it passes; a smaller one
# is written at its end, in one go (less work per chunk; its end takes well under 1 ms).
SPOOL_BYTES = 128 * 1024
# Chunks are read and written this many at a time (per call, the fixed costs dominate).
SPOOL_BATCH = 32
# The placeholder for the chunk list in the cassette the text around it is taken from.
PLACEHOLDER = f"cassette-proxy-chunks-{_secrets.token_hex(12)}"
_MARK = f'"{PLACEHOLDER}"'.encode()
_BUFFER = 256 * 1024  # bytes written to the temp file at a time


class SpoolError(Exception):
    """The spool gave up; the stream is recorded the ordinary way at its end."""


def split_around(text: bytes) -> tuple[bytes, bytes, bytes]:
    """A cassette's text whose chunk list is ``[PLACEHOLDER]``, cut around it: the text
    up to the list's first element, that element's indentation, and the rest (from the
    newline after the element). Raises SpoolError for any other shape."""
    at = text.find(_MARK)
    if at < 0 or text.find(_MARK, at + 1) >= 0:
        raise SpoolError("the placeholder is not in the cassette text exactly once")
    line = text.rfind(b"\n", 0, at) + 1
    indent = text[line:at]
    if len(indent) < 2 or indent.strip(b" ") or not text[:line].endswith(b"[\n"):
        raise SpoolError("the chunk list is not where a stream's chunks go")
    return text[:line], indent, text[at + len(_MARK) :]


def chunk_block(chunks: list[Any], indent: bytes) -> bytes:
    """``chunks`` as they are written inside a cassette's chunk list whose elements are
    indented by ``indent``: ``json.dumps(chunks, indent=2)`` without its brackets, each
    line moved right. ``chunks`` must be plain JSON read by orjson (``FiniteList``)."""
    text = dumps_indented_bytes(FiniteList(chunks), allow_nan=False)
    extra = indent[2:]  # json.dumps indents a list's elements by 2
    return extra + text[2:-2].replace(b"\n", b"\n" + extra)


class StreamSpool:
    """The temp file of one stream's cassette, filled a batch of chunks at a time."""

    def __init__(
        self, folder: Path, head: bytes, indent: bytes, temp: tuple[int, str] | None = None
    ) -> None:
        self.folder = folder
        self.head = head
        self.indent = indent
        self.count = 0  # chunks written
        self.size = len(head)
        # What each batch goes through, as the whole cassette would (set by the addon).
        self.digest: str | None = None  # cassette_normalize's request hash, when on
        self.error = False  # a chunk that reports an error was written (recording.py)
        self.secrets: frozenset[str] = frozenset()
        self.watch = SplitSecretWatch(frozenset())
        # The temp file opened while the request was upstream, or a new one.
        fd, name = temp if temp is not None else open_temp(folder)
        self.temp = Path(name)
        # A spool dropped without finish or discard (a flow gone without its hooks) still
        # removes its temp file; a killed proxy's is removed by the next start (stale_temp).
        self._cleanup = weakref.finalize(self, _remove, self.temp)
        try:
            self._file = os.fdopen(fd, "wb", buffering=_BUFFER)
        except BaseException:
            os.close(fd)
            self.discard()
            raise
        self._write(head)

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except BaseException:
            self.discard()
            raise

    def add(self, chunks: list[Any]) -> None:
        """Append chunks in their cassette form. Raises CassetteError when the cassette
        would grow over MAX_CASSETTE_BYTES, OSError when the disk refuses."""
        if not chunks:
            return
        block = chunk_block(chunks, self.indent)
        if self.count:
            block = b",\n" + block
        self.size += len(block)
        if self.size > MAX_CASSETTE_BYTES:
            self.discard()
            raise CassetteError(f"the stream's cassette would be over {MAX_CASSETTE_BYTES} bytes")
        self._write(block)
        self.count += len(chunks)

    def finish(self, tail: bytes, path: Path) -> None:
        """Write the cassette's last lines and rename the file to ``path`` (no fsync:
        ``sync_cassette`` follows, off the loop). Raises OSError; nothing is left then."""
        if self.size + len(tail) > MAX_CASSETTE_BYTES:
            self.discard()
            raise CassetteError(f"the stream's cassette would be over {MAX_CASSETTE_BYTES} bytes")
        try:
            self._file.write(tail)
            self._file.close()
            if _unchanged(path, self.temp):
                self.discard()  # the same answer is on disk: the file stays (churn.py)
                return
            os.replace(self.temp, path)
        except BaseException:
            self.discard()
            raise
        self._cleanup.detach()

    def discard(self) -> None:
        """Close and remove the temp file (a cut stream, or the spool given up)."""
        try:
            file = getattr(self, "_file", None)
            if file is not None and not file.closed:
                file.close()
        except OSError:
            pass
        self._cleanup()


def _unchanged(path: Path, temp: Path) -> bool:
    """Whether ``path`` holds the answer just written to ``temp``, volatile fields aside."""
    if not path.exists():
        return False
    from .churn import kept  # churn logs

    try:
        data = temp.read_bytes()
        return kept(path, data, json.loads(data)) is not None
    except (OSError, ValueError):
        return False


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

