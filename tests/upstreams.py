"""Fake LLM upstreams for the cassette-proxy tests.

`OpenAIUpstream` is a real HTTP/1.1 server on 127.0.0.1 that speaks the OpenAI
wire protocol the way vLLM / api.openai.com do (JSON bodies, SSE streams with
chunked transfer encoding and a final `data: [DONE]`).  It runs in a background
thread so tests can talk to it through a real mitmdump subprocess.

Answers are deterministic functions of the request and of the server's `tag`, so
a test can run two upstreams that answer the same request differently and tell
from a response (or a replayed cassette) which one produced it.

Knobs (plain attributes, read at request time, so they can be changed while the
server runs; `configure(**knobs)` sets several and rejects typos):

    tag               str    mixed into every answer / embedding / model owner
    n_chunks          int    max number of content pieces in a stream
    first_event_delay float  seconds between the response headers and the first SSE event
    event_interval    float  seconds between SSE events
    response_delay    float  seconds before anything is sent (also for non-stream)
    fail_mode         None | "cut" | "no_done" | "status"
    fail_times        int | None  fail only the next N requests (None = every request)
    fail_status       int    HTTP status for fail_mode="status"
    fail_hold         threading.Event | None  a request that takes a failure waits for it
                      (up to 30 s) before answering: orders an error after a success
    cut_after         int    SSE events sent before fail_mode="cut" resets the socket
    done_tail_delay   float  seconds between `data: [DONE]` and the end of the chunked body
    models            list[str]  ids listed by GET /v1/models
    response_encoding None | "gzip" | "deflate" | "br" | "zstd"  compress every answer
                      (streams too, flushed per event) whatever the request accepted
    extra_headers     dict[str, str]  headers added to every answer (e.g. set-cookie)
    path_prefix       str    stripped from the path before routing (a gateway's base path)
    reshape           None | callable(obj) -> obj  applied to every JSON answer and SSE
                      event before it is sent (an upstream whose answers change shape)

Request bodies sent with a content-encoding are decoded before routing (as servers
behind a decompressing front end do); `requests` keeps the bytes as they arrived.
`POST /v1/echo` answers `{"reply": X}` with X, any JSON, as it came.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import socket
import socketserver
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import brotli

try:  # zstd is in the standard library from 3.14; mitmproxy pulls in the backport
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python < 3.14
    from backports import zstd  # type: ignore[import-not-found,no-redef]
import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
EMBEDDING_DIM = 8
FAIL_MODES = (None, "cut", "no_done", "status")

_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


# --------------------------------------------------------------------------
# Deterministic answer helpers (public: tests use them to compute expectations)
# --------------------------------------------------------------------------


def answer_text(tag: str, prompt: str) -> str:
    """Text the upstream answers for `prompt` (chat: last user message)."""
    return f"[{tag}] echo: {prompt}"


def tool_arguments(tag: str, prompt: str) -> str:
    """JSON arguments string of the tool call answered when `tools` is sent."""
    return json.dumps({"echo": prompt, "tag": tag})


def embedding_vector(tag: str, item: str | list[int]) -> list[float]:
    """8-dim vector derived from sha256(tag, input); values are exact float32
    so the float and base64 encodings decode to identical Python floats."""
    digest = hashlib.sha256(f"{tag}\0{json.dumps(item)}".encode()).digest()
    raw = [u / 2**31 - 1.0 for u in struct.unpack("<8I", digest)]
    return list(struct.unpack(f"<{EMBEDDING_DIM}f", struct.pack(f"<{EMBEDDING_DIM}f", *raw)))


def split_pieces(text: str, n_chunks: int) -> list[str]:
    """Split text into at most n_chunks non-empty pieces (fewer if text is short)."""
    if not text:
        return []
    size = max(1, -(-len(text) // max(1, n_chunks)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def last_user_text(messages: Any) -> str:
    """Text of the last user message; content-part lists are joined."""
    if not isinstance(messages, list):
        return ""
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "".join(prompt)
    return json.dumps(prompt)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    method: str
    path: str  # includes the query string
    headers: dict[str, str]  # keys lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _StopStream(Exception):
    """Raised inside a handler after it deliberately reset the connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive + chunked, like uvicorn/vLLM
    server: OpenAIUpstream

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep pytest output clean

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # -- plumbing ----------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # skip trailers up to the blank line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        """Abort the TCP connection with RST (SO_LINGER 0), like a crashed server."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.close()
        self.close_connection = True
        raise _StopStream

    def end_headers(self) -> None:
        srv = self.server
        for name, value in srv.extra_headers.items():
            self.send_header(name, value)
        if srv.response_encoding:
            self.send_header("Content-Encoding", srv.response_encoding)
        super().end_headers()

    def _encoder(self) -> Any:
        """A compressor for this answer (process/flush/finish), or None for identity."""
        kind = self.server.response_encoding
        if kind is None:
            return None
        return _Compressor(kind)

    def _send_json(self, obj: Any, status: int = 200, fail: str | None = None) -> None:
        if self.server.reshape is not None and status < 400:
            obj = self.server.reshape(obj)
        data = json.dumps(obj).encode()
        if (encoder := self._encoder()) is not None:
            data = encoder.process(data) + encoder.finish()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fail == "cut":
            # promised Content-Length, deliver half, then die
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
        self.wfile.write(data)

    def _write_chunk(self, data: bytes) -> None:
        encoder = getattr(self, "_stream_encoder", None)
        if encoder is not None:
            data = encoder.process(data) + encoder.flush()
            if not data:
                return
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_sse(self, events: Iterable[dict[str, Any]], fail: str | None) -> None:
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self._stream_encoder = self._encoder()
        time.sleep(srv.first_event_delay)
        for i, event in enumerate(events):
            if i:
                time.sleep(srv.event_interval)
            if fail == "cut" and i >= srv.cut_after:
                self._reset()
            if srv.reshape is not None:
                event = srv.reshape(event)
            self._write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        if fail == "cut":
            self._reset()  # stream shorter than cut_after: still never terminate it
        if fail != "no_done":
            time.sleep(srv.event_interval)
            self._write_chunk(b"data: [DONE]\n\n")
            time.sleep(srv.done_tail_delay)
        if (encoder := self.__dict__.pop("_stream_encoder", None)) is not None:
            tail = encoder.finish()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _send_error_json(self, status: int, message: str) -> None:
        etype, code = _ERROR_TYPES.get(status, ("server_error", None))
        err = {"message": message, "type": etype, "code": code, "param": None}
        self._send_json({"error": err}, status=status)

    # -- routing -------------------------------------------------------------

    def _dispatch(self) -> None:
        srv = self.server
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        srv.record(RecordedRequest(self.command, self.path, headers, body))
        body = _decode_body(body, headers.get("content-encoding", ""))
        fail = srv.take_failure()
        if fail is not None and srv.fail_hold is not None:
            srv.fail_hold.wait(30)
        try:
            time.sleep(srv.response_delay)
            if fail == "status":
                self._send_error_json(
                    srv.fail_status, f"injected failure from upstream {srv.tag!r}"
                )
                return
            path = self.path.split("?", 1)[0].rstrip("/").removeprefix(srv.path_prefix)
            routes = {
                ("POST", "/v1/chat/completions"): self._chat,
                ("POST", "/v1/completions"): self._completions,
                ("POST", "/v1/embeddings"): self._embeddings,
                ("GET", "/v1/models"): self._models,
                ("POST", "/v1/echo"): self._echo,
            }
            route = routes.get((self.command, path))
            if route is None:
                self._send_json(
                    {
                        "object": "fake.unknown",
                        "tag": srv.tag,
                        "method": self.command,
                        "path": self.path,
                        "body": body.decode("utf-8", "replace"),
                    },
                    fail=fail,
                )
                return
            req: dict[str, Any] = {}
            if self.command == "POST":
                try:
                    req = json.loads(body)
                    assert isinstance(req, dict)
                except (ValueError, AssertionError):
                    self._send_error_json(400, "request body is not a JSON object")
                    return
            route(req, fail)
        except _StopStream:
            pass
        except (BrokenPipeError, ConnectionResetError):
            # client (or proxy) went away mid-response; nothing to clean up
            self.close_connection = True

    # -- endpoints -------------------------------------------------------------

    def _echo(self, req: dict[str, Any], fail: str | None) -> None:
        self._send_json(req.get("reply"), fail=fail)

    def _chat(self, req: dict[str, Any], fail: str | None) -> None:
        srv = self.server
        prompt = last_user_text(req.get("messages"))
        model = str(req.get("model", "fake-model"))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        tools = req.get("tools")
        tool_name: str | None = None
        if tools and req.get("tool_choice") != "none":
            first = tools[0] if isinstance(tools, list) and tools else {}
            tool_name = str((first.get("function") or {}).get("name", "tool"))
        text = answer_text(srv.tag, prompt)
        args = tool_arguments(srv.tag, prompt)
        pieces = split_pieces(args if tool_name else text, srv.n_chunks)
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(pieces),
            "total_tokens": len(prompt.split()) + len(pieces),
        }
        call_id = "call_" + hashlib.sha256(f"{srv.tag}{prompt}".encode()).hexdigest()[:24]
        finish = "tool_calls" if tool_name else "stop"

        if not req.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_name:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": tool_name, "arguments": args},
                        }
                    ],
                }
            self._send_json(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "finish_reason": finish,
                            "logprobs": None,
                        }
                    ],
                    "usage": usage,
                },
                fail=fail,
            )
            return

        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if include_usage:
                c["usage"] = None  # OpenAI sends usage: null on every chunk then
            return c

        def events() -> Iterator[dict[str, Any]]:
            yield chunk({"role": "assistant", "content": ""})
            if tool_name:
                yield chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": call_id,
                                "type": "function",
                                "function": {"name": tool_name, "arguments": ""},
                            }
                        ]
                    }
                )
                for p in pieces:
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
            else:
                for p in pieces:
                    yield chunk({"content": p})
            yield chunk({}, finish)
            if include_usage:
                yield {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }

        self._send_sse(events(), fail)

    def _completions(self, req: dict[str, Any], fail: str | None) -> None:
        srv = self.server
        prompt = _prompt_text(req.get("prompt", ""))
        model = str(req.get("model", "fake-model"))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        text = answer_text(srv.tag, prompt)
        pieces = split_pieces(text, srv.n_chunks)
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(pieces),
            "total_tokens": len(prompt.split()) + len(pieces),
        }

        def completion(
            choices: list[dict[str, Any]], usage_: dict[str, int] | None
        ) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage_,
            }

        def choice(t: str, finish_reason: str | None) -> dict[str, Any]:
            return {"text": t, "index": 0, "logprobs": None, "finish_reason": finish_reason}

        if not req.get("stream"):
            self._send_json(completion([choice(text, "stop")], usage), fail=fail)
            return

        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def events() -> Iterator[dict[str, Any]]:
            for p in pieces:
                yield completion([choice(p, None)], None)
            yield completion([choice("", "stop")], None)
            if include_usage:
                yield completion([], usage)

        self._send_sse(events(), fail)

    def _embeddings(self, req: dict[str, Any], fail: str | None) -> None:
        srv = self.server
        raw = req.get("input", "")
        items: list[Any]
        if isinstance(raw, str) or (
            isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw)
        ):
            items = [raw]
        else:
            items = list(raw) if isinstance(raw, list) else [raw]
        as_b64 = req.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(items):
            vec = embedding_vector(srv.tag, item)
            emb: Any = (
                base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_b64 else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n_tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in items)
        self._send_json(
            {
                "object": "list",
                "data": data,
                "model": str(req.get("model", "fake-embedding")),
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            },
            fail=fail,
        )

    def _models(self, req: dict[str, Any], fail: str | None) -> None:
        srv = self.server
        self._send_json(
            {
                "object": "list",
                "data": [
                    {
                        "id": m,
                        "object": "model",
                        "created": 1700000000,
                        "owned_by": f"fake-{srv.tag}",
                    }
                    for m in srv.models
                ],
            },
            fail=fail,
        )


class OpenAIUpstream(ThreadingHTTPServer):
    """Fake OpenAI-compatible server; see module docstring for the knobs."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for idle keep-alive threads
    request_queue_size = 1024  # ~200 parallel clients must not overflow the backlog
    allow_reuse_address = True

    def __init__(self, tag: str = "A", **knobs: Any) -> None:
        self.tag = tag
        self.n_chunks = 4
        self.first_event_delay = 0.0
        self.event_interval = 0.0
        self.response_delay = 0.0
        self.fail_mode: str | None = None
        self.fail_times: int | None = None
        self.fail_status = 500
        self.fail_hold: threading.Event | None = None
        self.cut_after = 2
        self.done_tail_delay = 0.0
        self.models: list[str] = ["fake-model", "fake-embedding"]
        self.response_encoding: str | None = None
        self.extra_headers: dict[str, str] = {}
        self.path_prefix = ""
        self.reshape: Any = None
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.configure(**knobs)
        super().__init__((HOST, 0), _Handler)

    def server_bind(self) -> None:
        # skip HTTPServer.server_bind's getfqdn(): reverse DNS can stall offline
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, self.server_address[1]

    def configure(self, **knobs: Any) -> OpenAIUpstream:
        known = {
            "tag", "n_chunks", "first_event_delay", "event_interval", "response_delay",
            "fail_mode", "fail_times", "fail_status", "cut_after", "models", "done_tail_delay",
            "response_encoding", "extra_headers", "path_prefix", "fail_hold", "reshape",
        }  # fmt: skip
        unknown = set(knobs) - known
        if unknown:
            raise TypeError(f"unknown upstream knob(s): {sorted(unknown)}")
        if knobs.get("fail_mode", self.fail_mode) not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}")
        for k, v in knobs.items():
            setattr(self, k, v)
        return self

    # -- bookkeeping -----------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def take_failure(self) -> str | None:
        """Fail mode for the request being handled, honouring fail_times."""
        with self._lock:
            if self.fail_mode is None:
                return None
            if self.fail_times is not None:
                if self.fail_times <= 0:
                    return None
                self.fail_times -= 1
            return self.fail_mode

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Recorded requests whose path (without query) equals `path`."""
        with self._lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Disconnects are routine here (cut streams, killed proxies); stay quiet.
        pass

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> OpenAIUpstream:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening AND drop open keep-alive connections, so a proxy that
        pooled a connection really sees the upstream as gone."""
        if self._thread is None:
            return
        self.shutdown()
        self.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> OpenAIUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_openai_upstream(tag: str = "A", **knobs: Any) -> OpenAIUpstream:
    """Start a fake OpenAI upstream on 127.0.0.1:<random port> in a thread."""
    return OpenAIUpstream(tag, **knobs).start()


# --------------------------------------------------------------------------
# Ollama's native API
# --------------------------------------------------------------------------

OLLAMA_VERSION = "0.11.4"


def _ollama_now() -> str:
    """Ollama's created_at: RFC 3339 UTC with nanoseconds; differs on every call."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def _ollama_timings(n_prompt: int, n_eval: int) -> dict[str, int]:
    """Durations in ns that change on every call, as a real server's do."""
    jitter = time.perf_counter_ns() % 1_000_000
    return {
        "total_duration": 50_000_000 + jitter,
        "load_duration": 1_000_000 + jitter // 3,
        "prompt_eval_count": n_prompt,
        "prompt_eval_duration": 2_000_000 + jitter // 5,
        "eval_count": n_eval,
        "eval_duration": 40_000_000 + jitter // 7,
    }


def _ollama_details(family: str = "llama") -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    }


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class _OllamaHandler(_Handler):
    """Ollama's wire format: JSON answers, NDJSON streams (stream defaults to true)."""

    server: OllamaUpstream

    def _send_ollama_error(self, status: int, message: str) -> None:
        self._send_json({"error": message}, status=status)

    def _send_ndjson(self, objects: Iterable[dict[str, Any]], fail: str | None) -> None:
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        sent = 0
        for i, obj in enumerate(objects):
            if fail == "no_done" and (obj.get("done") is True or obj.get("status") == "success"):
                break  # end the stream cleanly, but without its last object
            if i:
                time.sleep(srv.event_interval)
            if fail == "cut" and i >= srv.cut_after:
                self._reset()
            if srv.reshape is not None:
                obj = srv.reshape(obj)
            self._write_chunk(json.dumps(obj).encode() + b"\n")
            sent += 1
            if sent == 1 and srv.gate is not None:
                # Hold the rest until the test has seen the first line at the client.
                srv.gate_timed_out = not srv.gate.wait(srv.gate_timeout)
        if fail == "cut":
            self._reset()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _dispatch(self) -> None:
        srv = self.server
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        srv.record(RecordedRequest(self.command, self.path, headers, body))
        fail = srv.take_failure()
        try:
            time.sleep(srv.response_delay)
            if fail == "status":
                self._send_ollama_error(srv.fail_status, f"injected failure from {srv.tag!r}")
                return
            path = self.path.split("?", 1)[0].rstrip("/")
            routes = {
                ("POST", "/api/generate"): self._generate,
                ("POST", "/api/chat"): self._chat,
                ("POST", "/api/embed"): self._embed,
                ("POST", "/api/embeddings"): self._embeddings,
                ("GET", "/api/tags"): self._tags,
                ("GET", "/api/ps"): self._ps,
                ("POST", "/api/show"): self._show,
                ("POST", "/api/pull"): self._pull,
                ("GET", "/api/version"): self._version,
            }
            route = routes.get((self.command, path))
            if route is None:
                self._send_ollama_error(404, "404 page not found")
                return
            req: dict[str, Any] = {}
            if self.command == "POST":
                try:
                    req = json.loads(body or b"{}")
                    assert isinstance(req, dict)
                except (ValueError, AssertionError):
                    self._send_ollama_error(400, "invalid JSON body")
                    return
                model = req.get("model")
                if model == "missing":
                    self._send_ollama_error(404, f'model "{model}" not found, try pulling it first')
                    return
            route(req, fail)
        except _StopStream:
            pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- endpoints ---------------------------------------------------------------

    def _answer(
        self,
        req: dict[str, Any],
        fail: str | None,
        prompt: str,
        piece: Any,
        final: dict[str, Any],
        text: str | None = None,
    ) -> None:
        """Shared by generate and chat: one object, or a stream of pieces then a done object.

        ``piece(text)`` is the answer's part of an object ("" in the final one)."""
        srv = self.server
        model = str(req.get("model", "fake-model"))
        text = answer_text(srv.tag, prompt) if text is None else text
        pieces = split_pieces(text, srv.n_chunks)
        timings = _ollama_timings(len(prompt.split()), len(pieces))
        head = {"model": model}
        if req.get("stream", srv.default_stream) is False:
            whole = {**head, "created_at": _ollama_now(), **piece(text), "done": True}
            self._send_json({**whole, "done_reason": "stop", **final, **timings}, fail=fail)
            return

        def objects() -> Iterator[dict[str, Any]]:
            for p in pieces:
                yield {**head, "created_at": _ollama_now(), **piece(p), "done": False}
            done = {**head, "created_at": _ollama_now(), **piece(""), "done": True}
            yield {**done, "done_reason": "stop", **final, **timings}

        self._send_ndjson(objects(), fail)

    def _generate(self, req: dict[str, Any], fail: str | None) -> None:
        prompt = str(req.get("prompt") or "")
        self._answer(req, fail, prompt, lambda t: {"response": t}, {"context": [1, 2, 3]})

    def _chat(self, req: dict[str, Any], fail: str | None) -> None:
        srv = self.server
        prompt = last_user_text(req.get("messages"))
        tools = req.get("tools") or []
        if tools:
            # One object carries the whole tool call, as Ollama streams them.
            name = str(((tools[0] or {}).get("function") or {}).get("name", "tool"))
            call = {"function": {"name": name, "arguments": {"echo": prompt, "tag": srv.tag}}}

            def tool_piece(t: str) -> dict[str, Any]:
                message: dict[str, Any] = {"role": "assistant", "content": ""}
                if t:
                    message["tool_calls"] = [call]
                return {"message": message}

            self._answer(req, fail, prompt, tool_piece, {}, text="x")
            return
        self._answer(
            req, fail, prompt, lambda t: {"message": {"role": "assistant", "content": t}}, {}
        )

    def _embed(self, req: dict[str, Any], fail: str | None) -> None:
        raw = req.get("input", "")
        items = [raw] if isinstance(raw, str) else list(raw)
        timings = _ollama_timings(sum(len(str(x).split()) for x in items), 0)
        self._send_json(
            {
                "model": str(req.get("model", "fake-embedding")),
                "embeddings": [embedding_vector(self.server.tag, x) for x in items],
                "total_duration": timings["total_duration"],
                "load_duration": timings["load_duration"],
                "prompt_eval_count": timings["prompt_eval_count"],
            },
            fail=fail,
        )

    def _embeddings(self, req: dict[str, Any], fail: str | None) -> None:
        vector = embedding_vector(self.server.tag, str(req.get("prompt") or ""))
        self._send_json({"embedding": vector}, fail=fail)

    def _tags(self, req: dict[str, Any], fail: str | None) -> None:
        models = [
            {
                "name": m,
                "model": m,
                "modified_at": "2025-07-31T23:55:40.635067Z",
                "size": 2019393189,
                "digest": _digest(m),
                "details": _ollama_details(),
            }
            for m in self.server.models
        ]
        self._send_json({"models": models}, fail=fail)

    def _ps(self, req: dict[str, Any], fail: str | None) -> None:
        models = [
            {
                "name": m,
                "model": m,
                "size": 3367856128,
                "digest": _digest(m),
                "details": _ollama_details(),
                "expires_at": "2025-10-08T16:14:05.423042-07:00",
                "size_vram": 3367856128,
                "context_length": 4096,
            }
            for m in self.server.models[:1]
        ]
        self._send_json({"models": models}, fail=fail)

    def _show(self, req: dict[str, Any], fail: str | None) -> None:
        self._send_json(
            {
                "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
                "modelfile": f"FROM {req.get('model')}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": _ollama_details(),
                "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
                "capabilities": ["completion", "tools"],
                "modified_at": "2025-07-31T16:55:40.635067-07:00",
            },
            fail=fail,
        )

    def _pull(self, req: dict[str, Any], fail: str | None) -> None:
        if req.get("stream", True) is False:
            self._send_json({"status": "success"}, fail=fail)
            return
        digest = "sha256:" + _digest(str(req.get("model")))
        total = 4 * 1024 * 1024

        def objects() -> Iterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            for done in (0, total // 2, total):
                yield {"status": f"pulling {digest[7:19]}", "digest": digest,
                       "total": total, "completed": done}  # fmt: skip
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        self._send_ndjson(objects(), fail)

    def _version(self, req: dict[str, Any], fail: str | None) -> None:
        self._send_json({"version": OLLAMA_VERSION}, fail=fail)


class OllamaUpstream(OpenAIUpstream):
    """Fake Ollama server (native ``/api/...``); the OpenAI knobs apply, plus:

    gate          threading.Event | None  after a stream's first line, wait for it
    gate_timeout  float   how long to wait; ``gate_timed_out`` tells whether it ran out
    default_stream bool   what a chat/generate request without ``stream`` gets: True (a
                  stream, as Ollama) or False (one JSON answer, as some compatible servers)
    models        ids listed by /api/tags (the first one by /api/ps)
    """

    OLLAMA_KNOBS = ("gate", "gate_timeout", "default_stream")

    def __init__(self, tag: str = "A", **knobs: Any) -> None:
        self.default_stream = True
        self.gate: threading.Event | None = None
        self.gate_timeout = 10.0
        self.gate_timed_out = False
        super().__init__(tag, **knobs)
        self.models = knobs.get("models", ["llama3.2:3b", "all-minilm:l6-v2"])
        self.RequestHandlerClass = _OllamaHandler  # type: ignore[assignment]

    def configure(self, **knobs: Any) -> OllamaUpstream:
        own = {k: knobs.pop(k) for k in self.OLLAMA_KNOBS if k in knobs}
        super().configure(**knobs)
        for k, v in own.items():
            setattr(self, k, v)
        return self


def start_ollama_upstream(tag: str = "A", **knobs: Any) -> OllamaUpstream:
    """Start a fake Ollama upstream on 127.0.0.1:<random port> in a thread."""
    return OllamaUpstream(tag, **knobs).start()


# --------------------------------------------------------------------------
# Content encodings (answers compressed on purpose, request bodies decoded)
# --------------------------------------------------------------------------


class _Compressor:
    """One answer's compressor; ``flush`` ends a block so a stream stays a stream."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind in ("gzip", "deflate"):
            self._z = zlib.compressobj(wbits=31 if kind == "gzip" else 15)
        elif kind == "br":
            self._b = brotli.Compressor()
        elif kind == "zstd":
            self._s = zstd.ZstdCompressor()
        else:
            raise ValueError(f"unknown response_encoding {kind!r}")

    def process(self, data: bytes) -> bytes:
        if self.kind == "br":
            return self._b.process(data)
        if self.kind == "zstd":
            return self._s.compress(data)
        return self._z.compress(data)

    def flush(self) -> bytes:
        if self.kind == "br":
            return self._b.flush()
        if self.kind == "zstd":
            return self._s.flush(zstd.ZstdCompressor.FLUSH_BLOCK)
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        if self.kind == "br":
            return self._b.finish()
        if self.kind == "zstd":
            return self._s.flush(zstd.ZstdCompressor.FLUSH_FRAME)
        return self._z.flush()


def _decode_body(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if not body or encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        return brotli.decompress(body)
    if encoding == "zstd":
        return zstd.decompress(body)
    return body


# --------------------------------------------------------------------------
# Unreachable ports
# --------------------------------------------------------------------------


def refused_port() -> int:
    """A 127.0.0.1 port where nothing listens (connect -> ECONNREFUSED)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Blackhole:
    port: int
    listener: socket.socket
    fillers: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for s in [*self.fillers, self.listener]:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def blackhole_port(fillers: int = 3) -> Iterator[int]:
    """Yield a 127.0.0.1 port whose SYNs are never answered (connect() hangs).

    Linux drops incoming SYNs while a listener's accept queue is full.  A
    listen(0) socket that never accepts has a queue of ~1, so a few
    connections we keep open fill it and every later connect just times out.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(0)
    hole = Blackhole(int(listener.getsockname()[1]), listener)
    try:
        for _ in range(fillers):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((HOST, hole.port))
            hole.fillers.append(s)
        time.sleep(0.05)  # let the handshakes that fit complete
        yield hole.port
    finally:
        hole.close()


# --------------------------------------------------------------------------
# TLS: the same fake upstream over HTTPS, with a self-signed certificate
# --------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream-cert.pem", directory / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def start_tls_openai_upstream(directory: Path, tag: str = "TLS") -> OpenAIUpstream:
    """The fake OpenAI upstream over TLS; its certificate file is ``.cert``."""
    cert, key = self_signed(directory)
    server = OpenAIUpstream(tag)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.start()
    server.cert = cert  # type: ignore[attr-defined]
    return server


# --------------------------------------------------------------------------
# Scripted answers: bytes no well-behaved server sends
# --------------------------------------------------------------------------


class ScriptedUpstream(socketserver.ThreadingTCPServer):
    """Answers every HTTP/1.1 request with the bytes of ``answers[path]`` (or ``answer``),
    exactly as given (status line, headers, body), then closes the connection.

    For what the HTTP servers above never do: a close-delimited body (no length, no
    chunking) cut in the middle of an event, or JSON numbers such as ``-1e400``.
    ``requests`` holds (method, path, body) of each request.
    """

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, answer: bytes = b"", answers: dict[str, bytes] | None = None) -> None:
        self.answer = answer
        self.answers = dict(answers or {})
        self.requests: list[tuple[str, str, bytes]] = []
        self._thread: threading.Thread | None = None
        super().__init__((HOST, 0), _ScriptedHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> ScriptedUpstream:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
        self._thread = None


class _ScriptedHandler(socketserver.StreamRequestHandler):
    server: ScriptedUpstream

    def handle(self) -> None:
        head = self.rfile.readline().decode("latin-1").split()
        if len(head) < 2:
            return
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip() or 0)
        body = self.rfile.read(length) if length else b""
        method, path = head[0], head[1]
        if "://" in path:  # an absolute URI (a proxy in front): keep its path
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        self.server.requests.append((method, path, body))
        answer = self.server.answers.get(path.split("?", 1)[0], self.server.answer)
        with contextlib.suppress(OSError):
            self.wfile.write(answer)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # a clean FIN: the close ends the body


def start_scripted_upstream(
    answer: bytes = b"", answers: dict[str, bytes] | None = None
) -> ScriptedUpstream:
    """Start a ScriptedUpstream on 127.0.0.1:<random port> in a thread."""
    return ScriptedUpstream(answer, answers).start()


def http_answer(status: int, headers: dict[str, str], body: bytes) -> bytes:
    """The bytes of an HTTP/1.1 answer with exactly these headers (none added)."""
    reason = {200: "OK", 401: "Unauthorized", 404: "Not Found"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
# Credentials and uploads: token exchanges, key checks, multipart audio
# --------------------------------------------------------------------------


def _multipart_fields(content_type: str, body: bytes) -> dict[str, Any]:
    """A multipart/form-data body's fields, read with the standard library's email
    parser (not the proxy's parser): text fields as str, files as (filename, bytes)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        fields[str(name)] = (filename, data) if filename is not None else data.decode()
    return fields


def transcript_text(tag: str, audio: bytes, fields: dict[str, Any]) -> str:
    """What the upstream "heard": a function of the file's bytes and the form fields."""
    digest = hashlib.sha256(audio).hexdigest()[:16]
    extra = ",".join(f"{k}={v}" for k, v in sorted(fields.items()) if isinstance(v, str))
    return f"[{tag}] heard {len(audio)} bytes {digest} ({extra})"


def issued_token(tag: str, grant: dict[str, str], kind: str) -> str:
    """The token an identity server issues for a grant: distinctive, like a real one."""
    material = json.dumps(grant, sort_keys=True)
    return f"{kind}-{tag}-" + hashlib.sha256(f"{tag}{kind}{material}".encode()).hexdigest()


class _CredentialHandler(_Handler):
    """An identity server, an API that checks keys, and speech-to-text uploads.

    POST /identity/token, /oauth2/v2.0/token, /token  form-encoded grant (IBM IAM,
        Azure AD, Google's JWT bearer): answers access/refresh/id tokens; a grant without
        a credential field is a 400.
    POST /ml/v1/text/chat?version=...  needs ``Authorization: Bearer <issued token>`` (or
        the placeholder in ``accepted_tokens``), answers a watsonx-like chat object.
    POST /v1/chat/completions, GET /v1/models  need a key in ``accepted_keys`` (Bearer,
        x-api-key, api-key, anthropic-api-key, x-goog-api-key or ?key=); a wrong one is
        a 401 that echoes it: "Incorrect API key provided: <key>", as OpenAI does.
    POST /v1/audio/transcriptions, /v1/audio/translations  multipart with a ``file``:
        answers ``{"text": transcript_text(...)}`` (JSON, as response_format=json).
    """

    server: CredentialUpstream

    def _dispatch(self) -> None:
        srv = self.server
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        srv.record(RecordedRequest(self.command, self.path, headers, body))
        path, _, query = self.path.partition("?")
        try:
            route = {
                ("POST", "/identity/token"): self._token,
                ("POST", "/oauth2/v2.0/token"): self._token,
                ("POST", "/token"): self._token,
                ("POST", "/ml/v1/text/chat"): self._watsonx_chat,
                ("POST", "/v1/chat/completions"): self._keyed_chat,
                ("GET", "/v1/models"): self._keyed_models,
                ("POST", "/v1/audio/transcriptions"): self._transcribe,
                ("POST", "/v1/audio/translations"): self._transcribe,
            }.get((self.command, path.rstrip("/")))
            if route is None:
                self._send_error_json(404, f"no route {self.command} {path}")
                return
            route(headers, dict(parse_qsl_(query)), body)
        except _StopStream:
            pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _token(self, headers: dict[str, str], query: dict[str, str], body: bytes) -> None:
        srv = self.server
        grant = dict(parse_qsl_(body.decode()))
        if not ({"apikey", "client_secret", "assertion", "code", "refresh_token"} & set(grant)):
            self._send_json({"error": "invalid_request"}, status=400)
            return
        access = issued_token(srv.tag, grant, "access")
        with srv._lock:
            srv.issued.add(access)
        self._send_json(
            {
                "access_token": access,
                "refresh_token": issued_token(srv.tag, grant, "refresh"),
                "id_token": issued_token(srv.tag, grant, "id"),
                "token_type": "Bearer",
                "expires_in": 3600,
                "expiration": 1_900_000_000,
                "scope": grant.get("scope", "ibm openid"),
            }
        )

    def _bearer(self, headers: dict[str, str]) -> str:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def _watsonx_chat(self, headers: dict[str, str], query: dict[str, str], body: bytes) -> None:
        srv = self.server
        token = self._bearer(headers)
        if token not in srv.issued and token not in srv.accepted_tokens:
            self._send_json({"errors": [{"code": "authentication_token_not_valid"}]}, 401)
            return
        req = json.loads(body)
        prompt = last_user_text(req.get("messages"))
        self._send_json(
            {
                "id": "chat-" + hashlib.sha256(prompt.encode()).hexdigest()[:12],
                "model_id": req.get("model_id"),
                "created": 1_700_000_000,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer_text(srv.tag, prompt)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                "version": query.get("version"),
            }
        )

    def _key_of(self, headers: dict[str, str], query: dict[str, str]) -> str:
        for name in ("x-api-key", "api-key", "anthropic-api-key", "x-goog-api-key"):
            if headers.get(name):
                return headers[name]
        return self._bearer(headers) or query.get("key", "")

    def _check_key(self, headers: dict[str, str], query: dict[str, str]) -> bool:
        key = self._key_of(headers, query)
        if key in self.server.accepted_keys:
            return True
        self._send_error_json(401, f"Incorrect API key provided: {key}. You can find yours.")
        return False

    def _keyed_chat(self, headers: dict[str, str], query: dict[str, str], body: bytes) -> None:
        if self._check_key(headers, query):
            self._chat(json.loads(body), None)

    def _keyed_models(self, headers: dict[str, str], query: dict[str, str], body: bytes) -> None:
        if self._check_key(headers, query):
            self._models({}, None)

    def _transcribe(self, headers: dict[str, str], query: dict[str, str], body: bytes) -> None:
        fields = _multipart_fields(headers.get("content-type", ""), body)
        upload = fields.pop("file", None)
        if not isinstance(upload, tuple):
            self._send_error_json(400, "a file part is required")
            return
        self._send_json({"text": transcript_text(self.server.tag, upload[1], fields)})


def parse_qsl_(text: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(text, keep_blank_values=True)


class CredentialUpstream(OpenAIUpstream):
    """Fake identity server + key-checking API + speech-to-text (``_CredentialHandler``).

    accepted_keys    set[str]  API keys the chat/models routes accept
    accepted_tokens  set[str]  bearer tokens accepted besides the ones it issued
    issued           set[str]  access tokens it has issued
    """

    def __init__(self, tag: str = "A", **knobs: Any) -> None:
        self.accepted_keys: set[str] = set(knobs.pop("accepted_keys", ()))
        self.accepted_tokens: set[str] = set(knobs.pop("accepted_tokens", ()))
        self.issued: set[str] = set()
        super().__init__(tag, **knobs)
        self.RequestHandlerClass = _CredentialHandler  # type: ignore[assignment]


def start_credential_upstream(tag: str = "A", **knobs: Any) -> CredentialUpstream:
    """Start a ``CredentialUpstream`` on 127.0.0.1:<random port> in a thread."""
    return CredentialUpstream(tag, **knobs).start()
