"""Scripted upstreams for the request-lifecycle findings (issue 17).

`ScriptUpstream` is a real HTTP/1.1 server on 127.0.0.1 (optionally over TLS) that
answers the n-th request to a path with the n-th step of that path's script; once the
script is used up its last step repeats. An agent polling "is the job done?" sees
`running, 404, done` when the script says so, an SDK retrying a 503 sees the upstream
go away behind it, and a hung upstream holds its answer until the test ends.

Steps (plain functions returning a `Step`):

    say(text)             a chat completion whose content is ``text`` (an SSE stream
                          when the request asks ``stream``, ending in ``data: [DONE]``)
    fail(status)          an OpenAI-shaped error; ``close=True`` adds Connection: close
    go_away(step)         answer with ``step``, then stop listening and drop every
                          connection (the upstream is gone for good)
    hang()                read the request, answer nothing until the server stops
    sse(events)           a raw SSE body: each event's ``data:`` line, as given

`requests` keeps (method, path, headers, body) of each request as it arrived.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from upstreams import self_signed

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


Step = Callable[["_ScriptHandler", dict[str, Any]], None]


def say(text: str) -> Step:
    def step(handler: _ScriptHandler, req: dict[str, Any]) -> None:
        handler.chat(text, stream=bool(req.get("stream")))

    return step


def fail(status: int, *, close: bool = False, retry_after: str | None = None) -> Step:
    def step(handler: _ScriptHandler, req: dict[str, Any]) -> None:
        error = {"message": f"scripted {status}", "type": "invalid_request_error",
                 "param": None, "code": f"scripted_{status}"}  # fmt: skip
        headers = {"Retry-After": retry_after} if retry_after else {}
        if close:
            headers["Connection"] = "close"
            handler.close_connection = True
        handler.send_json({"error": error}, status, headers)

    return step


def go_away(then: Step) -> Step:
    def step(handler: _ScriptHandler, req: dict[str, Any]) -> None:
        # No longer listening before the answer is out: the client's next request (a
        # retry, the next poll) finds nothing there, however soon it comes.
        handler.server.stop_listening()
        then(handler, req)
        handler.wfile.flush()
        handler.close_connection = True
        threading.Thread(target=handler.server.stop, daemon=True).start()

    return step


def hang() -> Step:
    def step(handler: _ScriptHandler, req: dict[str, Any]) -> None:
        handler.server.released.wait(60)
        handler.close_connection = True

    return step


def sse(events: list[Any]) -> Step:
    """A raw SSE stream: ``data: <event>`` per event (JSON-encoded unless bytes/str)."""

    def step(handler: _ScriptHandler, req: dict[str, Any]) -> None:
        handler.open_stream()
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event)
            handler.chunk(f"data: {data}\n\n".encode())
        handler.end_stream()

    return step


class _ScriptHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptUpstream

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        path = self.path.split("?", 1)[0]
        step = self.server.next_step(Seen(self.command, self.path, headers, body), path)
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            req = {}
        try:
            step(self, req if isinstance(req, dict) else {})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST

    # -- answers ---------------------------------------------------------------------

    def send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def open_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def chat(self, text: str, stream: bool) -> None:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not stream:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            self.send_json({"id": cid, "object": "chat.completion", "created": created,
                            "model": "fake-model", "choices": [choice],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                      "total_tokens": 2}})  # fmt: skip
            return

        def event(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": "fake-model", "choices": [choice]}  # fmt: skip

        self.open_stream()
        events = [event({"role": "assistant", "content": ""})]
        events += [event({"content": word}) for word in _words(text)]
        events.append(event({}, "stop"))
        for e in events:
            time.sleep(self.server.event_interval)
            self.chunk(b"data: " + json.dumps(e).encode() + b"\n\n")
        self.chunk(b"data: [DONE]\n\n")
        self.end_stream()


def _words(text: str) -> list[str]:
    """``text`` in pieces that join back to it (one per word, spaces kept)."""
    parts = text.split(" ")
    return [p + " " for p in parts[:-1]] + [parts[-1]]


class ScriptUpstream(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, scripts: dict[str, list[Step]] | None = None) -> None:
        self.scripts: dict[str, list[Step]] = dict(scripts or {})
        self.requests: list[Seen] = []
        self.event_interval = 0.0  # seconds before each SSE event of a chat stream
        self.released = threading.Event()  # hang() waits for it
        self._taken: dict[str, int] = {}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.scheme = "http"
        self.cert: Path | None = None
        super().__init__((HOST, 0), _ScriptHandler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn(): reverse DNS can stall
        self.server_name, self.server_port = HOST, self.server_address[1]

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        # "localhost" over TLS: the certificate names it, and so does the client's URL.
        host = "localhost" if self.scheme == "https" else HOST
        return f"{self.scheme}://{host}:{self.port}"

    def script(self, path: str, steps: list[Step]) -> ScriptUpstream:
        """Answer the following requests to ``path`` with ``steps`` (from the first)."""
        with self._lock:
            self.scripts[path] = list(steps)
            self._taken[path] = 0
        return self

    def next_step(self, seen: Seen, path: str) -> Step:
        with self._lock:
            self.requests.append(seen)
            steps = self.scripts.get(path) or [fail(404)]
            n = self._taken.get(path, 0)
            self._taken[path] = n + 1
            return steps[min(n, len(steps) - 1)]

    def requests_to(self, path: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # disconnects are routine here

    def start(self) -> ScriptUpstream:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop_listening(self) -> None:
        """Stop accepting connections (a connect is refused from now on); idempotent.
        Called from a handler thread, never from the accept loop's own."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self.shutdown()
        self.server_close()
        thread.join(timeout=5)

    def stop(self) -> None:
        """Stop listening and drop every open connection (a dead upstream); idempotent."""
        self.released.set()
        self.stop_listening()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


def start_script_upstream(
    scripts: dict[str, list[Step]] | None = None, tls_dir: Path | None = None
) -> ScriptUpstream:
    """A ScriptUpstream on 127.0.0.1:<random port>; over TLS with a self-signed
    certificate (``.cert``) when ``tls_dir`` is given."""
    server = ScriptUpstream(scripts)
    if tls_dir is not None:
        cert, key = self_signed(tls_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.scheme, server.cert = "https", cert
    return server.start()
