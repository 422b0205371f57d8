"""The fast lane: plain HTTP/1.1 requests answered from cassettes before mitmproxy.

A replay's answer is known as soon as its request is read, yet through mitmproxy it
passes the HTTP/1 layers, the flow and every hook: about three quarters of a replay's
CPU (docs/benchmarks.md, issue 21). The lane takes the connections of the proxy's
listening port first (``cassette-proxy run`` only: the lean master hosts it, see
``Lane.host``) and answers what it can in a few microseconds:

  intake   a request head read once per distinct head (heads repeat byte for byte),
           with mitmproxy's own parser and checks, as mitmproxy's HTTP layer would hand
           it to the addons (reverse mode's host, the Host header, ...); our test id
           header read and taken off as the Intake room does
  key      the Intake room's Keyer, once per distinct request (head and body)
  route    replay mode; auto mode while the upstream is down (the lane waits for the
           probe, as the Router does); record-if-missing where this position of the
           request is recorded (the Router's rows); anything else is not the lane's
  replay   the Replayer, as for every answer from cassettes: the same lookup, sequence
           position, counts, usage log and log line; its bytes made once per cassette
  answer   written to the socket as mitmproxy's HTTP/1 server writes it (http1.py)

Everything else is handed to mitmproxy on the same connection, with the bytes already
read, before anything of it was done: CONNECT and TLS, HTTP/2, WebSocket upgrades,
``X-Cassette-Fault``, our internal headers, paced replays, recording (record mode, a
position record-if-missing has no answer for), bodies that are chunked, large or
streamed, anything unusual in a head. Once handed over, a
connection stays with mitmproxy. ``cassette_lane=false`` turns the lane off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.free_port import get_free_port
from mitmproxy.net.http import http1, url
from mitmproxy.net.http.validate import validate_headers
from mitmproxy.proxy import mode_servers, mode_specs
from mitmproxy.utils import human

from .bodies import NotKeyable
from .keying import Keyer
from .library import Library
from .pacing import TOKEN_HEADER as REPLAY_TOKEN
from .plan import CONTROL_NAMES, INTERNAL_NAMES, SERVE, TEST_ID_HEADER, Plan
from .replayer import Replayer
from .shaping import Shaping
from .upstream import DOWN, UpstreamProbe

log = logging.getLogger("cassette_proxy")

MAX_HEAD = 64 * 1024  # a longer head is mitmproxy's to read
MAX_BODY = 1024 * 1024  # ... and so is a larger body
MEMO_SIZE = 512  # distinct heads, and distinct requests, remembered (LRU)
MEMO_MAX_HEAD = 8 * 1024  # ... heads up to this size (a longer one is read each time)
MEMO_MAX_BODY = 16 * 1024  # ... requests with bodies up to this size (at most ~12 MiB)

_TEST_ID = TEST_ID_HEADER.encode()
# A request with any of these is mitmproxy's: it is shaped (a fault), carries our
# internal tokens (a hostile client), changes protocol or has a body framed otherwise.
_NOT_OURS = (CONTROL_NAMES - {_TEST_ID}) | INTERNAL_NAMES | {
    REPLAY_TOKEN.encode(),
    b"upgrade",
    b"expect",
    b"transfer-encoding",
    b"http2-settings",
}
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")  # (a request's first byte too)
_STAND_ASIDE = ("ignore_hosts", "allow_hosts", "tcp_hosts", "emudhra", "emudhra_old")


@dataclass(frozen=True, slots=True)
class Site:
    """What the listening port is: reverse mode (a base URL) or a regular proxy."""

    reverse: tuple[str, str, int] | None  # scheme, host, port of the reverse target


@dataclass(frozen=True, slots=True, eq=False)
class Head:
    """A request head the lane may answer: the request as mitmproxy's HTTP layer hands
    it to the addons (no body), with our test id header read and taken off."""

    request: http.Request  # (a Head is its own memo key: compared by identity)
    length: int  # the body's bytes (Content-Length)
    test_id: str | None
    close: bool  # the client asked to close the connection after the answer
    host: str
    port: int
    remembered: bool  # kept in the head memo (so its requests may be kept too)


@dataclass(frozen=True, slots=True)
class Keyed:
    """A request's Plan fields as the Intake room's Keyer filled them."""

    family: Any
    key: str
    method: str
    path: str
    body: Any
    request: Any
    upstream: str | None

    def plan(self, test_id: str | None) -> Plan:
        return Plan(test_id=test_id, family=self.family, key=self.key, method=self.method,
                    path=self.path, body=self.body, request=self.request,
                    upstream=self.upstream, route=SERVE)  # fmt: skip


class Lane:
    """The lane's settings and its memos; an addon for its option."""

    def __init__(
        self,
        library: Library,
        keyer: Keyer,
        replayer: Replayer,
        shaping: Shaping,
        probe: UpstreamProbe,
    ) -> None:
        self.library = library
        self.keyer = keyer
        self.replayer = replayer
        self.shaping = shaping
        self.probe = probe
        self.enabled = True  # option cassette_lane
        self.standing_aside: list[str] = []  # mitmproxy options that take the lane's place
        self.idle_timeout = 600.0  # tcp_timeout: an idle connection is closed, as mitmproxy's
        self.max_body = MAX_BODY
        self.validate = True
        self.keep_host_header = False
        self._heads: OrderedDict[tuple[Site, bytes], Head | str] = OrderedDict()
        self._keyed: OrderedDict[tuple[Head, bytes], Keyed | None] = OrderedDict()

    # ---- the addon ---------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cassette_lane",
            bool,
            True,
            "Answer plain HTTP/1.1 replays before mitmproxy's HTTP layers (cassette-proxy "
            "run only; the same answers, several times faster). Off: every request "
            "passes mitmproxy.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "cassette_lane" in updated:
            self.enabled = bool(opts.cassette_lane)
        limits = []
        for name in ("stream_large_bodies", "body_size_limit"):
            value = getattr(opts, name, None)
            if value:
                try:
                    limits.append(human.parse_size(value) - 1)
                except ValueError as e:
                    raise exceptions.OptionsError(f"{name}: {e}") from e
        self.max_body = min([MAX_BODY, *limits])
        self.validate = bool(getattr(opts, "validate_inbound_headers", True))
        self.keep_host_header = bool(getattr(opts, "keep_host_header", False))
        self.idle_timeout = float(getattr(opts, "tcp_timeout", 600) or 600)
        # Options under which mitmproxy may not run a connection's requests through the
        # HTTP hooks at all (relayed raw, killed): such connections are all mitmproxy's.
        self.standing_aside = sorted(n for n in _STAND_ASIDE if getattr(opts, n, None))
        self._heads.clear()  # heads are read under the options: read them again
        self._keyed.clear()

    def host(self) -> None:
        """Take the listening sockets of regular and reverse (http, https) modes: called
        by the lean master, before its servers start."""
        global _hosted
        _hosted = self
        for instance in (mode_servers.RegularInstance, mode_servers.ReverseInstance):
            instance.listen = _listen  # type: ignore[method-assign]

    def done(self) -> None:
        global _hosted
        if _hosted is self:
            _hosted = None

    # ---- intake: a head, read once -------------------------------------------------------

    def head(self, site: Site, raw: bytes) -> Head | str:
        """The head's request, or why it is mitmproxy's (remembered either way)."""
        memo_key = (site, raw)
        found = self._heads.get(memo_key)
        if found is not None:
            self._heads.move_to_end(memo_key)
            return found
        remembered = len(raw) <= MEMO_MAX_HEAD
        found = self._read_head(site, raw, remembered)
        if remembered:
            self._heads[memo_key] = found
            if len(self._heads) > MEMO_SIZE:
                self._heads.popitem(last=False)
        return found

    def _read_head(self, site: Site, raw: bytes, remembered: bool) -> Head | str:
        lines = raw[:-4].split(b"\r\n")
        for line in lines:
            if b"\n" in line or b"\r" in line or not line:
                return "a bare line end or an empty line in the head"
        method, _, rest = lines[0].partition(b" ")
        target, _, version = rest.partition(b" ")
        if version != b"HTTP/1.1" or not method or not set(method) <= _METHOD_CHARS:
            return "not an HTTP/1.1 request line"
        if method in (b"CONNECT", b"HEAD"):
            return f"a {method.decode()} request"
        if target.endswith(b".crl") and b"/mitmproxy-" in target:
            return "mitmproxy's CRL"  # answered by its tlsconfig addon
        if site.reverse is not None:
            if not target.startswith(b"/"):
                return "not an origin-form target (reverse mode)"
        elif not target.startswith((b"http://", b"https://")):
            return "not an absolute-form target (regular mode)"
        try:
            request = http1.read_request_head(list(lines))
            length = http1.expected_http_body_size(request)
            if self.validate:
                validate_headers(request)
        except ValueError:
            return "a head mitmproxy refuses"  # with its own 400
        if length is None or length < 0:
            return "a body without a Content-Length"
        if length > self.max_body:
            return "a large body"
        fields = request.headers.fields
        test_ids = []
        for name, value in fields:
            lowered = name.lower()
            if lowered in _NOT_OURS:
                return f"a {lowered.decode('latin-1')} header"
            if lowered == b"connection" and b"upgrade" in value.lower():
                return "a connection upgrade"
            if lowered == _TEST_ID:
                test_ids.append(value)
        if test_ids:  # taken off, as the Intake room takes it off
            request.headers.fields = tuple((n, v) for n, v in fields if n.lower() != _TEST_ID)
        test_id = b", ".join(test_ids).decode("utf-8", "surrogateescape").strip() or None
        close = http1.connection_close(request.http_version, request.headers)
        # As mitmproxy's HTTP layer sets the request up before the addons see it.
        if site.reverse is not None:
            scheme, host, port = site.reverse
            request.data.host, request.data.port = host, port
            request.scheme = scheme
            if not self.keep_host_header:
                request.host_header = url.hostport(scheme, host, port)
        else:
            request.authority = ""
        return Head(request, length, test_id, close, request.host, request.port, remembered)

    # ---- key, route, replay ------------------------------------------------------------

    def answer(
        self, head: Head, body: bytes, verdict: str | None = None
    ) -> tuple[bytes, bool] | str | None:
        """The answer's bytes and whether to close after them, or why it is mitmproxy's;
        None: in auto mode, the upstream is to be probed first (``verdict``: its result)."""
        library = self.library  # (``not_ours`` was asked by the connection, just before)
        keyed = self._key(head, body)
        if keyed is None:
            return "a request without a key"  # the Router's refusal
        why = ""
        if library.mode == "auto":
            # The Router's auto row: from the cassettes while the upstream is down; with
            # no verdict cached, the connection waits for a probe, as the Router's would.
            verdict = verdict or self.probe.cached(head.host, head.port)
            if verdict is None:
                return None
            if verdict != DOWN:
                return f"auto mode, the upstream {verdict}"  # up or busy: forwarded
            why = "upstream offline"
        plan = keyed.plan(head.test_id)
        match = None
        if library.mode == "record-if-missing":
            # The Router's row: from the cassettes when this position of the request is
            # recorded; otherwise forwarded and recorded (or the miss, offline) by it.
            match = self.replayer.find(plan)
            if match is None:
                return "record-if-missing, no recording"
            position = library.sequencer.peek(plan)  # taken only when served below
            if not library.sequencer.recorded_at(library.store, match.entry, position):
                return "record-if-missing, a position not recorded"
        if why:
            library.counts["fallback"] += 1
        return self.replayer.answer_http1(plan, why, match)

    def not_ours(self) -> str | None:
        """Why no request is the lane's now (the mode, pacing, options), or None."""
        if not self.enabled:
            return "the lane is off"
        if self.standing_aside:
            return f"{self.standing_aside[0]} is set"
        mode = self.library.mode
        if mode not in ("replay", "auto", "record-if-missing"):
            return f"{mode} mode"
        if self.shaping.factor:
            return "paced replay"  # the ReplayShaper's
        return None

    def _key(self, head: Head, body: bytes) -> Keyed | None:
        memo_key = (head, body)
        if memo_key in self._keyed:
            self._keyed.move_to_end(memo_key)
            return self._keyed[memo_key]
        request = head.request.copy()
        request.data.content = body
        request.timestamp_end = time.time()
        plan = Plan(test_id=head.test_id)
        found: Keyed | None = None
        try:
            self.keyer.key(request, plan)
            found = Keyed(plan.family, plan.key, plan.method, plan.path, plan.body,
                          plan.request, plan.upstream)  # fmt: skip
        except NotKeyable:
            pass  # the Router's refusal, through mitmproxy
        if head.remembered and len(body) <= MEMO_MAX_BODY:
            self._keyed[memo_key] = found
            if len(self._keyed) > MEMO_SIZE:
                self._keyed.popitem(last=False)
        return found


_hosted: Lane | None = None


class LaneConnection(asyncio.Protocol):
    """One client connection: requests answered in order while they are the lane's; at
    the first that is not, the connection and its unanswered bytes go to mitmproxy."""

    def __init__(self, lane: Lane, instance: Any, site: Site) -> None:
        self.lane = lane
        self.instance = instance
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.buffer: bytes | bytearray = b""  # what is not answered yet
        self.paused = False  # the client does not read: answer nothing more for now
        self.probing: asyncio.Task[None] | None = None  # auto mode: the upstream probed
        self.eof = False
        self.loop = asyncio.get_running_loop()
        self.active = 0.0  # the loop's time of the last read
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.active = self.loop.time()
        self.idle = self.loop.call_later(self.lane.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.active = self.loop.time()
        if not self.buffer:
            self.buffer = data
        elif isinstance(self.buffer, bytearray):
            self.buffer += data  # a body or head arriving in pieces: no copy of the rest
        else:
            self.buffer = bytearray(self.buffer) + data
        if not self.paused and self.probing is None:
            self._answer_buffered()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.buffer:
            return False  # nothing pending: the transport closes
        if not self.paused and self.probing is None:
            self._hand_over("the client ended mid-request")  # mitmproxy answers it
        return True

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.probing is None:
            # Not from inside the transport's write path: closing there would report
            # the connection lost twice.
            self.loop.call_soon(self._resume)

    def connection_lost(self, exc: Exception | None) -> None:
        # A probe in flight is left to finish: other requests may be waiting on it.
        self.transport = None
        self._stop_idle()

    def _stop_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def _check_idle(self) -> None:
        """Close a connection idle for ``tcp_timeout``, as mitmproxy closes its own."""
        transport = self.transport
        if transport is None or self.idle is None:
            return
        left = self.active + self.lane.idle_timeout - self.loop.time()
        if left > 0 or self.probing is not None:
            self.idle = self.loop.call_later(max(left, 1.0), self._check_idle)
            return
        self.idle = None
        transport.close()

    def _resume(self, verdict: str | None = None) -> None:
        """Answer what came while the connection waited (a slow reader, a probe)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.resume_reading()
        self._answer_buffered(verdict)
        if not self.eof or self.transport is None or self.paused or self.probing is not None:
            return
        if self.buffer:
            self._hand_over("the client ended mid-request")
        else:
            transport.close()  # the client ended; everything is answered

    async def _probe(self, head: Head) -> None:
        try:
            verdict = await self.lane.probe.probe(head.host, head.port)
        except Exception:  # noqa: BLE001 - mitmproxy's Router probes again, and says why
            log.debug("fast lane: the upstream probe failed", exc_info=True)
            verdict = "unknown"
        finally:
            self.probing = None
        if not self.paused:
            self._resume(verdict)

    def _answer_buffered(self, verdict: str | None = None) -> None:
        lane, transport = self.lane, self.transport
        while self.buffer and transport is not None and not self.paused:
            buffer = self.buffer
            if buffer[0] not in _METHOD_CHARS:
                return self._hand_over("not plain HTTP/1")  # TLS, HTTP/2, SOCKS, ...
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                line_end = buffer.find(b"\r\n")
                if len(buffer) > MAX_HEAD:
                    return self._hand_over("a long head")
                if line_end >= 0 and not buffer[:line_end].endswith(b" HTTP/1.1"):
                    return self._hand_over("not an HTTP/1.1 request line")
                if buffer.count(b"\n") != buffer.count(b"\r\n"):
                    return self._hand_over("a bare line end in the head")  # (h11 reads them)
                return None  # the rest of the head is on its way
            body_at = end + 4
            head = lane.head(self.site, bytes(buffer[:body_at]))
            if isinstance(head, str):
                return self._hand_over(head)
            not_ours = lane.not_ours()
            if not_ours is not None:  # (before its body: mitmproxy reads that itself)
                return self._hand_over(not_ours)
            ends = body_at + head.length
            if len(buffer) < ends:
                if not isinstance(buffer, bytearray):
                    self.buffer = bytearray(buffer)
                return None  # the rest of the body is on its way
            try:
                answer = lane.answer(head, bytes(buffer[body_at:ends]), verdict)
            except Exception:  # noqa: BLE001 - as mitmproxy's addon errors: logged
                log.error("fast lane: cannot answer a request", exc_info=True)
                self.buffer = b""
                transport.close()
                return None
            verdict = None  # (for this request only)
            if answer is None:  # auto mode: the upstream is probed first
                transport.pause_reading()
                self.probing = asyncio.ensure_future(self._probe(head))
                return None
            if isinstance(answer, str):
                return self._hand_over(answer)
            self.buffer = bytes(buffer[ends:])
            data, close = answer
            transport.write(data)
            if close or head.close:
                self.buffer = b""
                transport.close()
                return None
        return None

    def _hand_over(self, why: str) -> None:
        """mitmproxy takes the connection from here, as if it had read these bytes."""
        transport = self.transport
        assert transport is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fast lane: a connection goes to mitmproxy (%s)", why)
        loop = self.loop
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self.instance.handle_stream, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        self._stop_idle()  # mitmproxy's own watchdog takes over
        if self.buffer:
            protocol.data_received(bytes(self.buffer))  # (reading is never paused here)
            self.buffer = b""
        if self.eof:
            protocol.eof_received()
        self.transport = None


def _site(instance: Any) -> Site | None:
    mode = instance.mode
    if isinstance(mode, mode_specs.RegularMode):
        return Site(None)
    if isinstance(mode, mode_specs.ReverseMode) and mode.scheme in ("http", "https"):
        host, port = mode.address
        return Site((mode.scheme, host, port))
    return None


async def _listen(instance: Any, host: str, port: int) -> list[Any]:
    """``AsyncioServerInstance.listen`` for the modes the lane serves: the port's
    connections come to the lane first."""
    lane, site = _hosted, _site(instance)
    original = mode_servers.AsyncioServerInstance.listen
    if lane is None or site is None or instance.mode.transport_protocol != "tcp":
        return await original(instance, host, port)
    loop = asyncio.get_running_loop()

    def connection() -> LaneConnection:
        return LaneConnection(lane, instance, site)

    if port == 0:  # as mitmproxy does: one port for both IPv4 and IPv6
        try:
            return [await loop.create_server(connection, host, get_free_port())]
        except OSError:
            pass
    return [await loop.create_server(connection, host, port)]
