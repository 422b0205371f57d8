"""Small real upstreams for the session tests: Bedrock's eventstream, OpenAI's Realtime.

``BedrockUpstream`` is an HTTP/1.1 server answering ``converse-stream`` and
``invoke-with-response-stream`` with AWS eventstream frames (chunked, one frame per
chunk, ``delay`` seconds apart), written here with its own few lines of framing so the
proxy's codec is checked against an independent one (and boto3 checks both CRCs).

``RealtimeUpstream`` is a ``websockets`` server speaking the Realtime event protocol:
``session.created`` on connect, ``session.updated`` after ``session.update``,
``conversation.item.created`` after ``conversation.item.create``, and after
``response.create`` a response whose text depends on the last user message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import websockets
from upstreams import self_signed

HOST = "127.0.0.1"


def answer_for(prompt: str) -> str:
    return f"echo: {prompt}"


# ---- Bedrock ---------------------------------------------------------------------------


def frame(event_type: str, payload: dict[str, Any]) -> bytes:
    """One eventstream message (three string headers, a JSON payload)."""
    headers = b""
    for name, value in (
        (":event-type", event_type),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ):
        n, v = name.encode(), value.encode()
        headers += bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v
    body = json.dumps(payload).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


def converse_events(prompt: str) -> list[bytes]:
    words = answer_for(prompt).split(" ")
    events = [frame("messageStart", {"role": "assistant"})]
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        events.append(frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}}))
    events += [
        frame("contentBlockStop", {"contentBlockIndex": 0}),
        frame("messageStop", {"stopReason": "end_turn"}),
        frame(
            "metadata",
            {
                "usage": {"inputTokens": 3, "outputTokens": len(words), "totalTokens": 9},
                "metrics": {"latencyMs": 12},
            },
        ),
    ]
    return events


def invoke_events(prompt: str) -> list[bytes]:
    out = []
    for word in answer_for(prompt).split(" "):
        inner = json.dumps({"type": "content_block_delta", "delta": {"text": word}})
        out.append(frame("chunk", {"bytes": base64.b64encode(inner.encode()).decode()}))
    return out


class BedrockUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__((HOST, 0), _BedrockHandler)
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.cert: Path | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.cert else 'http'}://{HOST}:{self.port}"

    def start(self) -> BedrockUpstream:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _BedrockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BedrockUpstream

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.requests.append({"path": self.path, "headers": dict(self.headers)})
        if not self.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):
            self._json(403, {"message": "missing SigV4 signature"})
            return
        if self.path.endswith("/converse-stream"):
            prompt = body["messages"][-1]["content"][0]["text"]
            self._stream(converse_events(prompt))
        elif self.path.endswith("/invoke-with-response-stream"):
            self._stream(
                invoke_events(body["prompt"]), {"x-amzn-bedrock-content-type": "application/json"}
            )
        else:
            self._json(404, {"message": f"unknown path {self.path}"})

    def _json(self, status: int, data: Any) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _stream(self, frames: list[bytes], extra: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/vnd.amazon.eventstream")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-amzn-requestid", "req-1")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        for i, data in enumerate(frames):
            if i and self.server.delay:
                time.sleep(self.server.delay)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def start_bedrock_upstream(delay: float = 0.0, tls_dir: Path | None = None) -> BedrockUpstream:
    server = BedrockUpstream(delay)
    if tls_dir is not None:
        cert, key = self_signed(tls_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.cert = cert
    return server.start()


# ---- OpenAI Realtime -----------------------------------------------------------------------


class RealtimeUpstream:
    """A Realtime server on its own thread and event loop; ``delay`` between answer events."""

    def __init__(self, delay: float = 0.0, tls_dir: Path | None = None) -> None:
        self.delay = delay
        self.cert: Path | None = None
        self._ssl: ssl.SSLContext | None = None
        if tls_dir is not None:
            cert, key = self_signed(tls_dir)
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(cert, key)
            self.cert = cert
        self.handshakes: list[dict[str, str]] = []
        self.received: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self._counter = 0

    @property
    def url(self) -> str:
        return f"{'wss' if self.cert else 'ws'}://{HOST}:{self.port}"

    def start(self) -> RealtimeUpstream:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await websockets.serve(self._session, HOST, 0, ssl=self._ssl)
            self.port = self._server.sockets[0].getsockname()[1]
            self._started.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def _id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter:04d}"

    async def _session(self, ws: Any) -> None:
        request = ws.request
        self.handshakes.append({"path": request.path, **dict(request.headers.raw_items())})
        session = {"id": self._id("sess"), "object": "realtime.session", "model": "gpt-realtime",
                   "modalities": ["text"], "instructions": ""}  # fmt: skip
        await self._send(ws, {"type": "session.created", "session": session})
        last_text = ""
        async for raw in ws:
            event = json.loads(raw)
            self.received.append(event)
            kind = event.get("type")
            if kind == "session.update":
                session.update(event.get("session") or {})
                await self._send(ws, {"type": "session.updated", "session": session})
            elif kind == "conversation.item.create":
                item = dict(event["item"])
                item.setdefault("id", self._id("item"))
                item["status"] = "completed"
                for part in item.get("content", []):
                    if part.get("type") == "input_text":
                        last_text = part["text"]
                if last_text == "drop the connection":  # a crash mid-session
                    ws.transport.abort()
                    return
                await self._send(ws, {"type": "conversation.item.created",
                                      "previous_item_id": None, "item": item})  # fmt: skip
            elif kind == "response.create":
                await self._respond(ws, answer_for(last_text))
            else:
                await self._send(ws, {"type": "error", "error": {
                    "type": "invalid_request_error", "code": "unknown_event",
                    "message": f"unknown event {kind!r}", "param": None}})  # fmt: skip

    async def _respond(self, ws: Any, text: str) -> None:
        rid, iid = self._id("resp"), self._id("item")
        await self._send(
            ws,
            {
                "type": "response.created",
                "response": {
                    "id": rid,
                    "object": "realtime.response",
                    "status": "in_progress",
                    "output": [],
                },
            },
        )
        for i, word in enumerate(text.split(" ")):
            await asyncio.sleep(self.delay)
            await self._send(ws, {"type": "response.output_text.delta", "response_id": rid,
                                  "item_id": iid, "output_index": 0, "content_index": 0,
                                  "delta": word if i == 0 else " " + word})  # fmt: skip
        await self._send(
            ws,
            {
                "type": "response.output_text.done",
                "response_id": rid,
                "item_id": iid,
                "output_index": 0,
                "content_index": 0,
                "text": text,
            },
        )
        await self._send(
            ws,
            {
                "type": "response.done",
                "response": {
                    "id": rid,
                    "object": "realtime.response",
                    "status": "completed",
                    "output": [
                        {
                            "id": iid,
                            "type": "message",
                            "role": "assistant",
                            "content": [{"type": "text", "text": text}],
                        }
                    ],
                    "usage": {"total_tokens": 5, "input_tokens": 2, "output_tokens": 3},
                },
            },
        )

    async def _send(self, ws: Any, event: dict[str, Any]) -> None:
        await ws.send(json.dumps({"event_id": self._id("event"), **event}))


def start_realtime_upstream(delay: float = 0.0, tls_dir: Path | None = None) -> RealtimeUpstream:
    return RealtimeUpstream(delay, tls_dir).start()
