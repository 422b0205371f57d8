"""Answers for requests already let through: the upstream died, or never answers.

mitmproxy sends its own 502 once a connect fails, whatever an addon does in the
error hook. So when the last-moment probe in ``server_connect`` fails, the
connection is pointed at a local stand-in instead, and it answers from the
cassettes. The request carries a token header naming the flow it belongs to.

An upstream that accepts a request and never answers cannot be swapped for the
stand-in any more: ``answer_in_flight`` hands mitmproxy the answer as if the
upstream had sent it (cassette_response_timeout_ms).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
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

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-cassette-fallback"
MAX_HEAD = 64 * 1024

Answer = Callable[[str], http.Response]


class FallbackServer:
    def __init__(self, answer: Answer) -> None:
        self._answer = answer
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

    def close(self) -> None:
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
            response = self._answer(token)
            response.headers["connection"] = "close"
            writer.write(assemble_response(response))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            log.warning("cassette fallback: bad request from mitmproxy: %s", e)
        finally:
            writer.close()


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


def answer_in_flight(flow: http.HTTPFlow, response: http.Response) -> str:
    """Answer a flow whose request went upstream and whose upstream has not answered.

    The upstream connection is closed once the client has the answer (it is never
    reused). Returns what was done, for the log.
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
    if handler is None:
        return "the client is gone"
    server = flow.server_conn
    if server.alpn == b"h2" and server in handler.transports:
        # One connection carries many streams: only this one goes, with an error for its
        # client (a retry is answered from the cassettes: the upstream is marked down).
        # The upstream's own stream stays open until it answers (then dropped) or the
        # connection ends.
        message = (
            "cassette-proxy: the upstream sent no response headers in time "
            "(cassette_response_timeout_ms); retry: it is answered from cassettes"
        )
        task = asyncio.get_running_loop().create_task(_end_one_stream(handler, flow, message))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return "ended this stream only (HTTP/2: the connection's other streams go on)"
    stream = _stream_of(handler.layer, flow)
    if stream is None or server not in handler.transports:
        # Inside a CONNECT tunnel (HTTPS through the proxy) mitmproxy turns injected body
        # events into tunnel bytes: close the upstream connection (HTTP/1: one request).
        # The client gets mitmproxy's 502; an SDK retries, and the retry is answered from
        # the cassettes (the upstream is down now).
        if server in handler.transports:
            handler.close_connection(server)
        return "closed the upstream connection (the client gets a 502; a retry is answered)"
    server.state = ConnectionState.CLOSED  # never reused for another request
    task = asyncio.get_running_loop().create_task(_answer(handler, flow, response))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return "answered from cassettes" if response.status_code < 400 else "answered with an error"


_tasks: set[asyncio.Task[None]] = set()


async def _answer(handler: object, flow: http.HTTPFlow, response: http.Response) -> None:
    server = flow.server_conn
    body = response.raw_content or b""
    sid = 0  # HttpLayer finds the stream by the flow; the id in the event is not used
    await handler.server_event(_injected(_Headers(sid, response, not body), flow))  # type: ignore[attr-defined]
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
