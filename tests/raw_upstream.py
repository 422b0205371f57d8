"""A tiny real HTTP/1.1 upstream on 127.0.0.1 that answers each path with fixed bytes.

For answers the fake OpenAI server cannot give: bytes that are not UTF-8 in a stream or a
whole answer. ``answers`` maps a path to (content type, body bytes); a streamed content
type is sent chunked, one event per chunk.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        found = self.server.answers.get(path)  # type: ignore[attr-defined]
        if found is None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        content_type, body = found
        self.send_response(200)
        self.send_header("content-type", content_type)
        if content_type.startswith(("text/event-stream", "application/x-ndjson")):
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            sep = b"\n\n" if content_type.startswith("text/event-stream") else b"\n"
            for part in body.split(sep):
                if part:
                    data = part + sep
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer


class RawUpstream(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, answers: dict[str, tuple[str, bytes]]) -> None:
        self.answers = answers
        super().__init__((HOST, 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
