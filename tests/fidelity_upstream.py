"""A small real upstream that writes JSON the way production servers do (issue 19).

Compact JSON (no spaces, UTF-8 as is), chunked SSE streams, and the response headers
clients read: ``x-request-id``, ``openai-processing-ms``, ``x-ratelimit-*`` (OpenAI),
``request-id``, ``anthropic-ratelimit-*`` (Anthropic), plus a ``set-cookie`` that must
never be recorded. Each answer gets fresh volatile fields (ids, ``created``, request
ids) on every request; ``text`` (a knob) changes the answer itself.

Routes: ``POST .../chat/completions`` (whole or ``stream``), ``.../completions``
(pydantic-style floats, CRLF lines when streamed), ``.../embeddings``,
``.../v1/messages`` (Anthropic), ``.../odd`` (a whole answer with irregular spacing no
JSON library writes).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def pydantic_style(value: Any) -> bytes:
    """What pydantic's model_dump_json writes (vLLM): floats as ``1e-7``."""
    import orjson

    return orjson.dumps(value)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FidelityUpstream

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        n = next(self.server.counter)
        path = self.path.rstrip("/")
        if path.endswith("/v1/messages"):
            return self._messages(body, n)
        if path.endswith("/chat/completions"):
            return self._chat(body, n)
        if path.endswith("/completions"):
            return self._completion(body, n)
        if path.endswith("/embeddings"):
            return self._embeddings(body, n)
        if path.endswith("/odd"):
            text = f'{{"id" :"odd-{n}",  "object":"thing" ,"value": [1,2 , 3]}}\n'.encode()
            return self._send(200, "application/json", text, self._openai_headers(n))
        self._send(404, "application/json", b'{"error":{"message":"no route"}}', {})

    # ---- headers -----------------------------------------------------------------------

    def _openai_headers(self, n: int) -> dict[str, str]:
        return {
            "x-request-id": f"req_{self.server.run}_{n}",
            "openai-processing-ms": str(100 + n),
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": str(9999 - n),
            "x-ratelimit-reset-requests": "6ms",
            "x-custom-trace": f"trace-{n}",
            "set-cookie": f"__cf_bm=secret-cookie-{n}; path=/; HttpOnly",
        }

    def _anthropic_headers(self, n: int) -> dict[str, str]:
        return {
            "request-id": f"req_01anthropic{self.server.run}{n}",
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": str(49 - n % 49),
            "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:00Z",
            "retry-after": "3",
            "set-cookie": "session=anthropic-secret; Secure",
        }

    # ---- answers -------------------------------------------------------------------

    def _chat(self, body: dict[str, Any], n: int) -> None:
        text = self.server.text
        ident = f"chatcmpl-{self.server.run}-{n}"
        created = 1_700_000_000 + self.server.run * 1000 + n
        if not body.get("stream"):
            answer = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": body.get("model", "m"),
                "system_fingerprint": f"fp_{self.server.run}",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": {"content": [{"token": "x", "logprob": -1e-05}]},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
            return self._send(200, "application/json", compact(answer), self._openai_headers(n))
        chunks = []
        n = self.server.n_chunks
        pieces = [text[: len(text) // 2], text[len(text) // 2 :]] if n == 2 else [text] * n
        for i, piece in enumerate(pieces):
            delta: dict[str, Any] = {"content": piece}
            if i == 0:
                delta = {"role": "assistant", **delta}
            chunks.append(
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body.get("model", "m"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
            )
        chunks[-1]["choices"][0]["finish_reason"] = "stop"
        events = [b"data: " + compact(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
        self._stream(events, self._openai_headers(n))

    def _completion(self, body: dict[str, Any], n: int) -> None:
        answer = {
            "id": f"cmpl-{self.server.run}-{n}",
            "object": "text_completion",
            "created": 1_700_000_000 + n,
            "model": body.get("model", "m"),
            "choices": [
                {
                    "index": 0,
                    "text": self.server.text,
                    "logprobs": {"token_logprobs": [-1.2e-07, -0.25]},
                    "finish_reason": "stop",
                }
            ],
        }
        if not body.get("stream"):
            out = pydantic_style(answer)
            return self._send(200, "application/json", out, self._openai_headers(n))
        events = [b"data: " + pydantic_style(answer) + b"\r\n\r\n", b"data: [DONE]\r\n\r\n"]
        self._stream(events, self._openai_headers(n))

    def _embeddings(self, body: dict[str, Any], n: int) -> None:
        answer = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 1e-05]}],
            "model": body.get("model", "m"),
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }
        self._send(200, "application/json", compact(answer), self._openai_headers(n))

    def _messages(self, body: dict[str, Any], n: int) -> None:
        answer = {
            "id": f"msg_{self.server.run}_{n}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude"),
            "content": [{"type": "text", "text": self.server.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 4, "output_tokens": 2},
        }
        self._send(200, "application/json", compact(answer), self._anthropic_headers(n))

    # ---- wire ----------------------------------------------------------------------

    def _send(self, status: int, kind: str, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: list[bytes], headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        for i, event in enumerate(events):
            if i == 0 and self.server.first_event_delay:
                time.sleep(self.server.first_event_delay)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class FidelityUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Handler)
        self.counter = itertools.count()
        self.run = 1  # bump to give every volatile field a new value
        self.text = "Hello, wörld!"
        self.first_event_delay = 0.0
        self.n_chunks = 2  # chunks of a chat stream (more: each says the whole text)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
