"""A stand-in OpenAI-compatible backend for trying cassette-proxy without a GPU.

``python -m cassette_proxy.demo --port 8001`` answers chat completions (streamed
and not) by echoing the last user message, and lists one model. It exists for the
README walkthrough; point the proxy at your real vLLM / Ollama / OpenAI instead.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "demo-model"


def _reply(request: dict[str, Any]) -> str:
    messages = request.get("messages") or [{}]
    last = messages[-1].get("content", "")
    return f"You said: {last}" if isinstance(last, str) else "You said something."


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        print(f"demo upstream: {self.command} {self.path}", flush=True)

    def _json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "demo"}
            self._json({"object": "list", "data": [model]})
        else:
            self._json({"error": {"message": f"no route {self.path}", "type": "not_found"}}, 404)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json({"error": {"message": f"no route {self.path}", "type": "not_found"}}, 404)
            return
        text = _reply(request)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": MODEL}
        if not request.get("stream"):
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            self._json({**base, "object": "chat.completion", "choices": [choice]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        words = text.split(" ")
        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
        for i, delta in enumerate(deltas + [{}]):
            finish = "stop" if i == len(deltas) else None
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            time.sleep(0.05)  # so the stream visibly streams
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), DemoHandler)
    print(f"demo upstream on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
