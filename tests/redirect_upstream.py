"""A real HTTP server on loopback that answers every request with a redirect, for
`cassette-proxy drift`: it records what arrived (method, path, headers, body) and sends
the client to ``target`` + the request's path with the status it is given.

With ``relay`` set, requests whose path starts with ``/moved`` are not redirected but
relayed to that base URL (prefix stripped, method, headers and body as they came): a
redirect to the same host that still ends at a real upstream.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"


@dataclass
class Arrived:
    method: str
    path: str
    headers: dict[str, str]  # keys lower-cased
    body: bytes


class RedirectUpstream(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, target: str, status: int = 302, relay: str | None = None) -> None:
        self.target = target.rstrip("/")
        self.status = status
        self.relay = relay.rstrip("/") if relay else None
        self.arrived: list[Arrived] = []
        self._thread: threading.Thread | None = None
        super().__init__((HOST, 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def start(self) -> RedirectUpstream:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self.server_close()
            self._thread.join(5)
            self._thread = None


class _Handler(BaseHTTPRequestHandler):
    server: RedirectUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def _any(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.arrived.append(Arrived(self.command, self.path, headers, body))
        if self.server.relay and self.path.startswith("/moved"):
            self._relay(self.path.removeprefix("/moved"), headers, body)
            return
        self.send_response(self.server.status)
        self.send_header("Location", self.server.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _relay(self, path: str, headers: dict[str, str], body: bytes) -> None:
        assert self.server.relay is not None
        sent = {k: v for k, v in headers.items() if k not in ("host", "content-length")}
        request = urllib.request.Request(
            self.server.relay + path, data=body or None, headers=sent, method=self.command
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as answer:
                status, data, kind = answer.status, answer.read(), answer.headers["content-type"]
        except urllib.error.HTTPError as e:
            status, data, kind = e.code, e.read(), e.headers.get("content-type") or "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _any
