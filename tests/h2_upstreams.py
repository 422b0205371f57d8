"""A small HTTP/2 upstream (TLS, ALPN h2) built on the ``h2`` library mitmproxy uses.

``POST /v1/chat/completions`` streams ``n_events`` SSE chunks, ``interval`` seconds
apart, then ``data: [DONE]``; a request whose last user message contains ``hang`` is
accepted and never answered (no response headers), as a stuck model server does. Every
stream of a client shares its one connection, as HTTP/2 clients (mitmproxy) use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

HOST = "127.0.0.1"


def chunk(i: int) -> bytes:
    body = {
        "id": "chatcmpl-h2",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": {"content": f"e{i} "}, "finish_reason": None}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


class H2Upstream:
    def __init__(self, cert: Path, key: Path, n_events: int = 11, interval: float = 0.25) -> None:
        self.n_events = n_events
        self.interval = interval
        self.connections = 0  # connections that carried at least one request
        self.requests: list[tuple[int, str]] = []  # (connection number, prompt)
        self.resets: list[int] = []  # stream ids the client reset
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._context.set_alpn_protocols(["h2"])
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self) -> H2Upstream:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, HOST, 0, ssl=self._context), self._loop
        )
        self._server = started.result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        number: int | None = None
        bodies: dict[int, bytes] = {}
        tasks: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        if number is None:
                            self.connections += 1
                            number = self.connections
                        bodies[event.stream_id] = b""
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        body = bodies.pop(event.stream_id, b"")
                        task = asyncio.create_task(
                            self._answer(conn, writer, event.stream_id, body, number or 0)
                        )
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets.append(event.stream_id)
                writer.write(conn.data_to_send())
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(OSError, ssl.SSLError):
                writer.close()

    async def _answer(
        self, conn: Any, writer: asyncio.StreamWriter, sid: int, body: bytes, number: int
    ) -> None:
        request = json.loads(body or b"{}")
        prompt = str((request.get("messages") or [{}])[-1].get("content", ""))
        self.requests.append((number, prompt))
        if "hang" in prompt:
            return  # accepted, never answered
        try:
            conn.send_headers(sid, [(":status", "200"), ("content-type", "text/event-stream")])
            for i in range(self.n_events):
                conn.send_data(sid, chunk(i))
                writer.write(conn.data_to_send())
                await asyncio.sleep(self.interval)
            conn.send_data(sid, b"data: [DONE]\n\n", end_stream=True)
            writer.write(conn.data_to_send())
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, OSError):
            pass
