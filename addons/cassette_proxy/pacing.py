"""Recorded pacing: when each chunk of an answer arrived, and sending a replay that way.

Recording: a ``ChunkClock`` sees the stream's bytes as the tap does and notes, for each
chunk (an SSE event with a ``data:`` line, an NDJSON line), the milliseconds since the
proxy had the whole request. The cassette keeps them in ``response.timing``:

    "timing": {"chunks_ms": [212.4, 313.0, ...], "total_ms": 920.7}

llama-stack's reader takes only ``response.body`` (and ``is_streaming``), so the field
is invisible to it; a cassette without timings is written exactly as before.

Replaying: a response an addon sets in the ``request`` hook is sent by mitmproxy in one
piece, whatever ``Response.stream`` says (checked in mitmproxy 12.3.1,
``proxy/layers/http/__init__.py``: ``send_response`` writes ``raw_content`` whole). So a
paced or cut replay is not set as ``flow.response``: the flow is pointed at
``LocalReplayServer``, an asyncio server on 127.0.0.1 in mitmproxy's own event loop,
which writes the answer's chunks on their schedule and can end the connection after
any of them. mitmproxy then streams it to the client as it would a live upstream.
Measured with ``scripts/bench pacing``: docs/benchmarks.md, "Recorded pacing".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from .families.eventstream import FrameError, FrameSplitter, is_eventstream, split_frames
from .streams import LineFramer, SSEFramer

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-cassette-replay"
PACING_OFF = "off"
PACING_RECORDED = "recorded"
MAX_TIMED_CHUNKS = 100_000  # a cassette holds at most this many chunk times
# No recorded time is waited longer than this (ms): a hand-edited or corrupt ``timing``
# (``1e300``) must not hang a paced replay for ever. A real stream this slow is rare.
MAX_TIMING_MS = 10 * 60 * 1000.0


def parse_pacing(value: str) -> float | None:
    """The speed factor option ``cassette_pacing`` asks for: None for ``off``.

    ``recorded`` is 1.0; a number is a factor (``2`` is twice as fast, ``0.5`` half).
    Raises ValueError with a readable message.
    """
    text = value.strip().lower()
    if text in ("", PACING_OFF):
        return None
    if text == PACING_RECORDED:
        return 1.0
    try:
        factor = float(text)
    except ValueError:
        raise ValueError(
            f"cassette_pacing must be off, recorded or a speed factor (2 is twice as "
            f"fast), not {value!r}"
        ) from None
    if not 0.001 <= factor <= 1000:  # also refuses nan and inf
        raise ValueError(f"cassette_pacing factor must be from 0.001 to 1000, not {value!r}")
    return factor


# ---- recording --------------------------------------------------------------------


def _is_sse(content_type: str) -> bool:
    return "text/event-stream" in content_type.lower()


def _timed(event: str, sse: bool) -> bool:
    """Whether a framed event is a chunk that gets a time (comments ride with the next)."""
    if not sse:
        return bool(event.strip())
    return any(line.startswith("data:") for line in event.split("\n"))


class ChunkClock:
    """Notes when each chunk of a stream passed through, relative to ``started`` (epoch s)."""

    def __init__(self, content_type: str, started: float) -> None:
        self._sse = _is_sse(content_type)
        self._framer: SSEFramer | LineFramer = SSEFramer(False) if self._sse else LineFramer(False)
        # AWS eventstream: every binary message is a chunk (families/eventstream.py).
        self._frames = FrameSplitter() if is_eventstream(content_type) else None
        self.started = started
        self.chunks_ms: list[float] = []
        self.total_ms: float | None = None

    def feed(self, data: bytes, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not data:
            self.total_ms = _ms(now - self.started)
            return
        if self._frames is not None:
            for _ in self._frames.feed(data):
                if len(self.chunks_ms) < MAX_TIMED_CHUNKS:
                    self.chunks_ms.append(_ms(now - self.started))
            return
        for event in self._framer.feed(data):
            if _timed(event, self._sse) and len(self.chunks_ms) < MAX_TIMED_CHUNKS:
                self.chunks_ms.append(_ms(now - self.started))

    def timing(self, now: float | None = None) -> dict[str, Any]:
        total = self.total_ms
        if total is None:
            total = _ms((time.time() if now is None else now) - self.started)
        return {"chunks_ms": list(self.chunks_ms), "total_ms": total}


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 1)


def whole_timing(started: float, finished: float) -> dict[str, Any]:
    """The timing of a whole (non-streamed) answer: how long it took."""
    return {"total_ms": _ms(finished - started)}


def with_timing(response: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """The response half with its timing, as the last field (the format's order kept)."""
    return {**{k: v for k, v in response.items() if k != "timing"}, "timing": timing}


def recorded_timing(response: Any, where: str = "") -> dict[str, Any] | None:
    """The timing a cassette's response half holds, if it is well formed; times capped
    (``bounded_timing``; ``where`` names the file in the warning)."""
    timing = getattr(response, "timing", None)
    if timing is None and isinstance(response, dict):
        timing = response.get("timing")
    if not isinstance(timing, dict):
        return None
    chunks = timing.get("chunks_ms")
    total = timing.get("total_ms")
    if chunks is not None and not (isinstance(chunks, list) and all(_number(c) for c in chunks)):
        return None
    if total is not None and not _number(total):
        return None
    if chunks is None and total is None:
        return None
    return bounded_timing(timing, where)


def bounded_timing(timing: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``timing`` with every time capped: chunk times at the recording's own total (when
    it has a sane one) and everything at ``MAX_TIMING_MS``. Logs a warning when it caps."""
    total = timing.get("total_ms")
    chunks = timing.get("chunks_ms")
    cap_total = min(total, MAX_TIMING_MS) if total is not None else MAX_TIMING_MS
    cap_chunk = cap_total if total is not None else MAX_TIMING_MS
    capped_chunks = [min(c, cap_chunk) for c in chunks] if chunks is not None else None
    if capped_chunks == chunks and (total is None or cap_total == total):
        return timing
    over = max([*(chunks or []), total or 0.0]) - cap_chunk
    if over > 1.0:  # a chunk a rounding step after the total is no news
        log.warning(
        "recorded timing%s out of bounds (total_ms %s, largest chunk %s ms): capped at "
            "%g ms (the recording's total, at most %g ms)",
            f" of {where}" if where else "", total, max(chunks) if chunks else None,
            cap_chunk, MAX_TIMING_MS,
        )  # fmt: skip
    out = dict(timing)
    if chunks is not None:
        out["chunks_ms"] = capped_chunks
    if total is not None:
        out["total_ms"] = cap_total
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


# ---- replaying ----------------------------------------------------------------------


@dataclass
class Piece:
    at: float  # seconds after the request
    data: bytes


def split_events(body: bytes, content_type: str) -> list[tuple[bytes, bool]]:
    """A wire body cut into its events (SSE) or lines (NDJSON), each with its separator,
    and whether it is a timed chunk. Joined again they are the body, byte for byte."""
    if is_eventstream(content_type):
        try:
            return [(frame, True) for frame in split_frames(body)]
        except FrameError:
            return [(body, True)] if body else []  # encoded by us: cannot happen; one piece
    sse = _is_sse(content_type)
    sep = b"\n\n" if sse else b"\n"
    parts = body.split(sep)
    events: list[tuple[bytes, bool]] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        data = part if last else part + sep
        if not data:
            continue
        text = part.decode("utf-8", "replace").replace("\r\n", "\n")
        events.append((data, _timed(text, sse)))
    return events


def schedule(
    body: bytes,
    content_type: str,
    timing: dict[str, Any] | None,
    factor: float | None,
    streamed: bool,
) -> list[Piece]:
    """The answer's body as pieces with the time each is due (seconds after the request).

    Without a factor or a timing, everything is due at once. A stream's n-th timed chunk
    is due at its recorded time; untimed events (comments) go with the next chunk; chunks
    beyond the recorded ones go with the last. A whole answer is due at its total time.
    """
    chunks = (timing or {}).get("chunks_ms") if factor else None
    total = (timing or {}).get("total_ms") if factor else None
    if not streamed:
        at = (total or 0) / 1000 / factor if factor and total else 0.0
        return [Piece(at, body)]
    events = split_events(body, content_type)
    pieces: list[Piece] = []
    pending = b""
    n = 0
    last_at = 0.0
    for data, timed in events:
        pending += data
        if not timed:
            continue
        if chunks and factor:
            recorded = chunks[min(n, len(chunks) - 1)]
            last_at = max(last_at, recorded / 1000 / factor)
        pieces.append(Piece(last_at, pending))
        pending = b""
        n += 1
    if pending:
        if pieces:
            pieces[-1].data += pending
        else:
            pieces.append(Piece(last_at, pending))
    return pieces


@dataclass
class Replay:
    """One answer for the local replay server to write: head, then pieces on time."""

    response: http.Response
    pieces: list[Piece]
    started: float  # epoch seconds the schedule counts from (the request's arrival)
    cut_after: int | None = None  # pieces (chunks) sent before the connection is cut
    cut_mid_body: bool = False  # a whole answer: cut in the middle of its body
    streamed: bool = True  # chunked, piece by piece; else one body with Content-Length


class LocalReplayServer:
    """Writes paced or cut replays; a flow is pointed here by ``redirect``."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self._replays: dict[str, Replay] = {}
        # flow -> its real (host, port, scheme), while it is pointed here
        self._targets: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[str, int, bytes]] = (
            weakref.WeakKeyDictionary()
        )

    async def start(self) -> tuple[str, int]:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.address = self._server.sockets[0].getsockname()[:2]
        assert self.address is not None
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._server = None
        self.address = None
        self._replays.clear()

    async def redirect(self, flow: http.HTTPFlow, replay: Replay) -> None:
        """Point the flow at this server, which will write ``replay`` for it.

        The request's host, port and scheme are changed in ``flow.request.data`` (not
        through the setters, which would rewrite the Host header) and put back in
        ``restore`` once the answer's headers are in.
        """
        host, port = await self.start()
        self._replays[flow.id] = replay
        request = flow.request
        self._targets[flow] = (request.data.host, request.data.port, request.data.scheme)
        request.headers[TOKEN_HEADER] = flow.id
        request.data.host, request.data.port, request.data.scheme = host, port, b"http"

    def owns(self, flow: http.HTTPFlow) -> bool:
        return flow in self._targets

    def restore(self, flow: http.HTTPFlow) -> None:
        """Give the flow back its real target (logs, mitmweb, ``-w`` files show it)."""
        self._replays.pop(flow.id, None)  # never picked up when the client went first
        target = self._targets.pop(flow, None)
        if target is not None:
            flow.request.data.host, flow.request.data.port, flow.request.data.scheme = target
            flow.request.headers.pop(TOKEN_HEADER, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await _read_request(reader)
            replay = self._replays.pop(token, None)
            if replay is None:
                writer.write(_head(http.Response.make(502, b"", {}), 0))
                return
            await write_replay(replay, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            log.info("cassette replay: connection ended early: %s", e)
        finally:
            with contextlib.suppress(OSError):
                writer.close()



async def write_replay(replay: Replay, writer: asyncio.StreamWriter) -> None:
    """Write a shaped answer on its schedule, cut where it is to be cut."""
    loop = asyncio.get_running_loop()
    # The schedule counts from the request's arrival at the proxy, in loop time.
    base = loop.time() + (replay.started - time.time())
    response = replay.response
    body = b"".join(p.data for p in replay.pieces)
    if replay.cut_mid_body:
        writer.write(_head(response, len(body)))
        await _until(loop, base + replay.pieces[0].at)
        writer.write(body[: len(body) // 2])
        await writer.drain()
        return  # closed before Content-Length is reached: the client sees a cut body
    if not replay.streamed:
        await _until(loop, base + replay.pieces[0].at)
        writer.write(_head(response, len(body)) + body)
        await writer.drain()
        return
    writer.write(_head(response, None))  # a real stream: headers first, then chunks
    await writer.drain()
    for i, piece in enumerate(replay.pieces):
        if replay.cut_after is not None and i >= replay.cut_after:
            return  # no final chunk: the stream is cut
        await _until(loop, base + piece.at)
        writer.write(b"%x\r\n%s\r\n" % (len(piece.data), piece.data))
        await writer.drain()
    if replay.cut_after is not None:
        return  # fewer chunks than cut-after: still never ended cleanly
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _read_request(reader: asyncio.StreamReader) -> str:
    """The replay token of the request mitmproxy sends; its body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    token = ""
    length = 0
    chunked = False
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == TOKEN_HEADER:
            token = value.strip()
        elif name == "content-length":
            length = int(value.strip() or 0)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return token


def _head(response: http.Response, length: int | None) -> bytes:
    """Status line and headers: Content-Length for a whole body, chunked for a stream."""
    reason = response.reason or ""
    lines = [f"HTTP/1.1 {response.status_code} {reason}".encode()]
    for name, value in response.headers.fields:
        if name.lower() in (b"content-length", b"transfer-encoding", b"connection"):
            continue
        lines.append(name + b": " + value)
    if length is None:
        lines.append(b"transfer-encoding: chunked")
    else:
        lines.append(b"content-length: " + str(length).encode())
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
