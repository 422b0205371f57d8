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
    cut_after         int    SSE events sent before fail_mode="cut" resets the socket
    done_tail_delay   float  seconds between `data: [DONE]` and the end of the chunked body
    models            list[str]  ids listed by GET /v1/models
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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

    def _send_json(self, obj: Any, status: int = 200, fail: str | None = None) -> None:
        data = json.dumps(obj).encode()
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
        time.sleep(srv.first_event_delay)
        for i, event in enumerate(events):
            if i:
                time.sleep(srv.event_interval)
            if fail == "cut" and i >= srv.cut_after:
                self._reset()
            self._write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        if fail == "cut":
            self._reset()  # stream shorter than cut_after: still never terminate it
        if fail != "no_done":
            time.sleep(srv.event_interval)
            self._write_chunk(b"data: [DONE]\n\n")
            time.sleep(srv.done_tail_delay)
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
        fail = srv.take_failure()
        try:
            time.sleep(srv.response_delay)
            if fail == "status":
                self._send_error_json(
                    srv.fail_status, f"injected failure from upstream {srv.tag!r}"
                )
                return
            path = self.path.split("?", 1)[0].rstrip("/")
            routes = {
                ("POST", "/v1/chat/completions"): self._chat,
                ("POST", "/v1/completions"): self._completions,
                ("POST", "/v1/embeddings"): self._embeddings,
                ("GET", "/v1/models"): self._models,
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
        self.cut_after = 2
        self.done_tail_delay = 0.0
        self.models: list[str] = ["fake-model", "fake-embedding"]
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
