"""Answers for requests already let through: the upstream died, or never answers.

mitmproxy sends its own 502 once a connect fails, whatever an addon does in the
error hook. So when the last-moment probe in ``server_connect`` fails, the
connection is pointed at a local stand-in instead, and it answers from the
cassettes. The request carries a token header with a per-request secret: only requests the proxy
itself sent there are answered (a client's own header of that name is taken off at
intake, and an unknown token gets a 502).

An upstream that accepts a request and never answers cannot be swapped for the
stand-in any more: ``answer_in_flight`` hands mitmproxy the answer as if the
upstream had sent it (cassette_response_timeout_ms).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from mitmproxy import ctx, http
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http.http1.assemble import assemble_response
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpLayer,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)

from . import answers
from .pacing import Replay, write_replay
from .plan import TOKEN_HEADER

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024

Answer = Callable[[], "http.Response | Replay"]


class FallbackServer:
    """The local stand-in: answers the requests it is told to expect, by token."""

    def __init__(self) -> None:
        self._expected: dict[str, Answer] = {}
        self._plain: asyncio.Server | None = None
        self._tls: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.tls_address: tuple[str, int] | None = None

    async def start(self, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> None:
        if self._plain is None:
            self._plain = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.address = self._plain.sockets[0].getsockname()[:2]
        if self._tls is None and cert_pem and key_pem:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
                cert.write_bytes(cert_pem)
                key.write_bytes(key_pem)
                context.load_cert_chain(cert, key)
            context.set_alpn_protocols(["http/1.1"])
            self._tls = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
            self.tls_address = self._tls.sockets[0].getsockname()[:2]

    def expect(self, answer: Answer) -> str:
        """A token for one request the stand-in is to answer with ``answer()``."""
        token = secrets.token_hex(16)
        self._expected[token] = answer
        return token

    def route(self, flow: http.HTTPFlow, answer: Answer) -> None:
        """Send a flow whose connection is not made yet to the stand-in (its request
        body may still be on its way: a streamed body)."""
        flow.request.headers[TOKEN_HEADER] = self.expect(answer)
        address = self.tls_address if flow.request.scheme == "https" else self.address
        if address is not None:
            flow.request.host, flow.request.port = address

    def close(self) -> None:
        self._expected.clear()
        for server in (self._plain, self._tls):
            if server is not None:
                server.close()
        self._plain = self._tls = None
        self.address = self.tls_address = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            token = ""
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == TOKEN_HEADER:
                    token = value.strip()
                elif name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if length:
                await reader.readexactly(length)
            answer = self._expected.pop(token, None)
            response = answer() if answer is not None else answers.stand_in_unknown()
            if isinstance(response, Replay):  # cut or paced (shaping.py)
                await write_replay(response, writer)
                return
            response.headers["connection"] = "close"
            writer.write(assemble_response(response))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            log.warning("cassette fallback: bad request from mitmproxy: %s", e)
        finally:
            writer.close()


async def start_stand_in(stand_in: FallbackServer) -> None:
    """Start the stand-in (plain and TLS) with a certificate from mitmproxy's CA."""
    tlsconfig = ctx.master.addons.get("tlsconfig")
    pems = certificate_pems(tlsconfig.certstore) if tlsconfig else (None, None)
    await stand_in.start(*pems)


def certificate_pems(certstore: object, host: str = "localhost") -> tuple[bytes, bytes]:
    """A certificate for the TLS stand-in from mitmproxy's own certificate store."""
    entry = certstore.get_cert(host, [])  # type: ignore[attr-defined]
    key = entry.privatekey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return entry.cert.to_pem(), key


# ---- answering a flow that waits for its upstream's response headers ---------------
#
# mitmproxy routes an injected message (MessageInjected, as for WebSocket injection)
# straight to the flow's HTTP stream; these events are also the HTTP events that stream
# waits for, so it takes them as the upstream's answer: hooks run, streams are tapped,
# the client gets the answer in its own protocol (HTTP/1 or HTTP/2).


class _Headers(ResponseHeaders, events.MessageInjected):
    pass


class _Data(ResponseData, events.MessageInjected):
    pass


class _End(ResponseEndOfMessage, events.MessageInjected):
    pass


def _injected(event: events.MessageInjected, flow: http.HTTPFlow) -> events.MessageInjected:
    event.flow = flow
    event.message = None
    return event


class _StreamError(ResponseProtocolError, events.MessageInjected):
    pass


class _Route:
    """What an HTTP layer reads of an injected event's flow to find the stream: a
    connection key of our own that maps to exactly one stream (``_fail_one_stream``)."""

    def __init__(self, key: Server, client: object) -> None:
        self.server_conn = key
        self.client_conn = client


def _layers(node: layer.Layer, seen: set[int] | None = None) -> Iterator[layer.Layer]:
    """Every layer under ``node``: its child layers, a NextLayer's decided layer, and the
    layers inside each HTTP stream (a CONNECT tunnel's stack)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    yield node
    # A mode layer hands its events on to its child by rebinding ``_handle_event``.
    handed_to = getattr(getattr(node, "_handle_event", None), "__self__", None)
    for child in (getattr(node, "child_layer", None), getattr(node, "layer", None), handed_to):
        if isinstance(child, layer.Layer):
            yield from _layers(child, seen)
    for child in node.context.layers:
        yield from _layers(child, seen)
    if isinstance(node, HttpLayer):
        for stream in list(node.streams.values()):
            yield from _layers(stream, seen)


def _http_layer_of(root: layer.Layer, flow: http.HTTPFlow) -> tuple[HttpLayer, HttpStream] | None:
    """The HTTP layer and stream carrying ``flow``, inside a CONNECT tunnel too."""
    for node in _layers(root):
        if isinstance(node, HttpLayer):
            for stream in node.streams.values():
                if getattr(stream, "flow", None) is flow:
                    return node, stream
    return None


async def _fail_one_stream(handler: object, flow: http.HTTPFlow, message: str) -> bool:
    """End one stream of a multiplexed (HTTP/2) upstream connection with an error for its
    client, leaving the connection and its other streams alone. False if not found.

    mitmproxy routes an injected event by the flow's server connection, which for HTTP/2
    is the whole connection; so the event carries a route of its own, a key mapped to
    this one stream for as long as the event takes to deliver. Inside a CONNECT tunnel
    the outer HTTP layer does not know the key and hands the event to the tunnel (by the
    client connection), whose stack passes a protocol error through unchanged.
    """
    found = _http_layer_of(handler.layer, flow)  # type: ignore[attr-defined]
    if found is None:
        return False
    http_layer, stream = found
    key = Server(address=None)
    event = _StreamError(stream.stream_id, message, ErrorCode.GENERIC_SERVER_ERROR)
    event.flow = _Route(key, flow.client_conn)  # type: ignore[assignment]
    http_layer.connections[key] = stream  # type: ignore[assignment]
    try:
        await handler.server_event(event)  # type: ignore[attr-defined]
    finally:
        http_layer.connections.pop(key, None)
    return True


async def _end_one_stream(handler: object, flow: http.HTTPFlow, message: str) -> None:
    """``_fail_one_stream``; where the stream cannot be found, the old way: close the
    upstream connection (all its streams go, and the client's retries are answered)."""
    if await _fail_one_stream(handler, flow, message):
        return
    server = flow.server_conn
    log.warning("cassette fallback: no HTTP/2 stream found for the flow: upstream closed")
    if server in handler.transports:  # type: ignore[attr-defined]
        handler.close_connection(server)  # type: ignore[attr-defined]


def _stream_of(root: layer.Layer, flow: http.HTTPFlow) -> HttpStream | None:
    """The HTTP stream carrying ``flow``, if the client connection's own HTTP layer has it.

    Not found inside a CONNECT tunnel (HTTPS through the proxy): that HTTP layer sits in
    the tunnel's stream, whose passthrough turns injected body events into tunnel bytes.
    """
    for node in root.context.layers:
        if isinstance(node, HttpLayer):
            for stream in node.streams.values():
                if getattr(stream, "flow", None) is flow:
                    return stream
    return None


def can_answer_in_flight(flow: http.HTTPFlow) -> bool:
    """Whether ``answer_in_flight`` can give this flow an answer (else it can only close
    the upstream connection, and the client gets mitmproxy's 502)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
    if handler is None:
        return False
    server = flow.server_conn
    stream = _stream_of(handler.layer, flow)
    return stream is not None and server.alpn != b"h2" and server in handler.transports


def give_up_in_flight(flow: http.HTTPFlow) -> str:
    """End a flow that cannot be answered in flight: its stream alone on an HTTP/2
    upstream (the connection's other streams go on), else the upstream connection."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
    if handler is None:
        return "the client is gone"
    server = flow.server_conn
    if server.alpn == b"h2" and server in handler.transports:
        message = (
            "cassette-proxy: the upstream sent no response headers in time "
            "(cassette_response_timeout_ms); retry: it is answered from cassettes"
        )
        task = asyncio.get_running_loop().create_task(_end_one_stream(handler, flow, message))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return "ended this stream only (HTTP/2: the connection's other streams go on)"
    if server in handler.transports:
        handler.close_connection(server)
    return "closed the upstream connection (the client gets a 502; a retry is answered)"


def answer_in_flight(flow: http.HTTPFlow, response: http.Response | Replay) -> str:
    """Answer a flow whose request went upstream and whose upstream has not answered.

    The upstream connection is closed once the client has the answer (it is never
    reused). A ``Replay`` is written on its schedule and cut where it is to be cut.
    Returns what was done, for the log.
    """
    if not can_answer_in_flight(flow):
        return give_up_in_flight(flow)
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections[flow.client_conn.id]
    server = flow.server_conn
    server.state = ConnectionState.CLOSED  # never reused for another request
    task = asyncio.get_running_loop().create_task(_answer(handler, flow, response))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    whole = response.response if isinstance(response, Replay) else response
    return "answered from cassettes" if whole.status_code < 400 else "answered with an error"


_tasks: set[asyncio.Task[None]] = set()


async def _answer(
    handler: object, flow: http.HTTPFlow, answer: http.Response | Replay
) -> None:
    server = flow.server_conn
    sid = 0  # HttpLayer finds the stream by the flow; the id in the event is not used
    if isinstance(answer, Replay):
        await _answer_shaped(handler, flow, answer)
    else:
        body = answer.raw_content or b""
        await handler.server_event(_injected(_Headers(sid, answer, not body), flow))  # type: ignore[attr-defined]
        if body:
            await handler.server_event(_injected(_Data(sid, body), flow))  # type: ignore[attr-defined]
        await handler.server_event(_injected(_End(sid), flow))  # type: ignore[attr-defined]
    # Close the upstream connection once the stream is done: an error it reports then
    # has no stream left to reach (before, it would reach the client after the answer).
    for _ in range(400):
        if not flow.live:
            break
        await asyncio.sleep(0.025)
    if server in handler.transports:  # type: ignore[attr-defined]
        handler.close_connection(server)  # type: ignore[attr-defined]


async def _answer_shaped(handler: object, flow: http.HTTPFlow, replay: Replay) -> None:
    """A cut or paced answer, piece by piece on its schedule; a cut closes the client's
    connection before the end, as a dying upstream would."""
    loop = asyncio.get_running_loop()
    base = loop.time() + (replay.started - time.time())
    response = replay.response
    body = b"".join(p.data for p in replay.pieces)
    head = response.copy()
    head.headers.pop("content-length", None)
    if replay.streamed or replay.cut_mid_body:
        head.headers["transfer-encoding"] = "chunked"
    head.content = None if replay.streamed or replay.cut_mid_body else head.content
    await handler.server_event(_injected(_Headers(0, head, False), flow))  # type: ignore[attr-defined]
    pieces = replay.pieces
    if replay.cut_mid_body:
        pieces = [type(pieces[0])(pieces[0].at, body[: len(body) // 2])]
    for i, piece in enumerate(pieces):
        if replay.cut_after is not None and i >= replay.cut_after:
            break
        delay = base + piece.at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if not flow.live:
            return
        await handler.server_event(_injected(_Data(0, piece.data), flow))  # type: ignore[attr-defined]
    if replay.cut_after is not None or replay.cut_mid_body:
        handler.close_connection(flow.client_conn)  # type: ignore[attr-defined]
        return
    await handler.server_event(_injected(_End(0), flow))  # type: ignore[attr-defined]
