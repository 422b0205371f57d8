"""Fake upstreams for the 2026 API surfaces (tests/test_surfaces.py).

`SurfaceUpstream` is a real HTTP/1.1 server on 127.0.0.1 (the machinery of
`upstreams.OpenAIUpstream`) that speaks, as the real servers do:

* the OpenAI Responses API: ``POST /v1/responses`` (JSON, or SSE with an ``event:`` line
  per event, compact JSON, ``sequence_number``s, no ``[DONE]``), and
  ``GET /v1/responses/{id}``, ``POST .../cancel``, ``GET .../input_items``, ``DELETE``;
* Anthropic's Messages API: ``POST /v1/messages`` (JSON, or SSE: ``message_start``, a
  ``ping``, content blocks with ``text_delta`` / ``input_json_delta``, ``message_delta``
  with the usage, ``message_stop``) and ``POST /v1/messages/count_tokens``; errors in
  Anthropic's ``{"type": "error", "error": {...}}`` shape;
* vLLM's other endpoints: ``/tokenize``, ``/detokenize``, ``/v1/rerank`` (``/rerank``,
  ``/v2/rerank``), ``/score`` (``/v1/score``), ``/pooling``, ``/classify``;
* Gemini: ``POST /v1beta/models/{model}:generateContent`` and
  ``:streamGenerateContent`` (``?alt=sse``: ``data: ...`` events ended by CRLF CRLF, as
  Google sends them; without it, one JSON array).

Ids are fresh on every call and times are the clock's, as on a real server, so a
replay that equals the live answer came from the cassette. Knobs (as in upstreams.py,
plus): ``stream_end`` picks how a stream ends: ``"normal"`` (its own end event),
``"none"`` (the body ends cleanly without it), ``"cut"`` (connection reset after
``cut_after`` events), ``"error"`` (an ``error`` event instead: Responses' in-stream
error, Anthropic's ``overloaded_error``), or ``"failed"`` / ``"incomplete"`` (Responses'
other terminal events). ``ping`` (bool, default true) sends Anthropic's ping event.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from upstreams import (
    OpenAIUpstream,
    RecordedRequest,
    _Handler,
    _StopStream,
    answer_text,
    split_pieces,
    tool_arguments,
)

STREAM_ENDS = ("normal", "none", "cut", "error", "failed", "incomplete")


def _fresh(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _words(text: str) -> int:
    return max(1, len(text.split()))


def input_text(value: Any) -> str:
    """The text of a Responses ``input``: a string, or the last user message's text."""
    if isinstance(value, str):
        return value
    for item in reversed(value if isinstance(value, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
    return ""


def anthropic_prompt(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict))
    return ""


class _SurfaceHandler(_Handler):
    server: SurfaceUpstream

    # -- plumbing --------------------------------------------------------------------

    def _send_body(self, data: bytes, content_type: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _compact(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self._send_body(data, "application/json", status)

    def _open_stream(self, content_type: str = "text/event-stream; charset=utf-8") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _close_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stream_events(self, events: list[bytes]) -> None:
        """Send each event as a chunk, honouring ``stream_end="cut"``."""
        srv = self.server
        self._open_stream()
        for i, event in enumerate(events):
            if i:
                time.sleep(srv.event_interval)
            if srv.stream_end == "cut" and i >= srv.cut_after:
                self._reset()
            self._write_chunk(event)
        if srv.stream_end == "cut":
            self._reset()
        self._close_stream()

    def _dispatch(self) -> None:
        srv = self.server
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        srv.record(RecordedRequest(self.command, self.path, headers, body))
        path, _, query = self.path.partition("?")
        try:
            req: Any = {}
            if body:
                try:
                    req = json.loads(body)
                except ValueError:
                    self._compact({"error": {"message": "body is not JSON"}}, 400)
                    return
            self._route(path.rstrip("/"), query, req)
        except _StopStream:
            pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, path: str, query: str, req: Any) -> None:
        method = self.command
        if method == "POST" and path == "/v1/responses":
            return self._responses_create(req)
        if path.startswith("/v1/responses/"):
            return self._responses_other(method, path.removeprefix("/v1/responses/"))
        if method == "POST" and path == "/v1/messages":
            return self._messages(req)
        if method == "POST" and path == "/v1/messages/count_tokens":
            return self._compact({"input_tokens": _words(anthropic_prompt(req.get("messages")))})
        vllm = {
            "/tokenize": self._tokenize,
            "/detokenize": self._detokenize,
            "/v1/rerank": self._rerank,
            "/rerank": self._rerank,
            "/v2/rerank": self._rerank,
            "/score": self._score,
            "/v1/score": self._score,
            "/pooling": self._pooling,
            "/classify": self._classify,
        }
        if method == "POST" and path in vllm:
            return vllm[path](req)
        if method == "POST" and path.startswith("/v1beta/models/"):
            return self._gemini(path.removeprefix("/v1beta/models/"), query, req)
        self._compact({"error": {"message": f"no route {method} {path}"}}, 404)

    # -- the OpenAI Responses API -----------------------------------------------------------

    def _response_object(self, req: dict[str, Any], status: str) -> dict[str, Any]:
        return {
            "id": _fresh("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "model": str(req.get("model", "fake-model")),
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": req.get("previous_response_id"),
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": req.get("tools") or [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": None,
            "metadata": {},
        }

    def _responses_create(self, req: dict[str, Any]) -> None:
        srv = self.server
        prompt = input_text(req.get("input"))
        text = answer_text(srv.tag, prompt)
        tools = req.get("tools") or []
        response = self._response_object(req, "in_progress")
        usage = {
            "input_tokens": _words(prompt),
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": _words(text),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": _words(prompt) + _words(text),
        }
        message = {
            "id": _fresh("msg_"),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }
        outputs = [message]
        if tools:
            outputs.append(
                {
                    "id": _fresh("fc_"),
                    "type": "function_call",
                    "status": "completed",
                    "call_id": _fresh("call_"),
                    "name": tools[0].get("name", "tool"),
                    "arguments": tool_arguments(srv.tag, prompt),
                }
            )
        final = {**response, "status": "completed", "output": outputs, "usage": usage}
        srv.responses[final["id"]] = (final, req)
        if not req.get("stream"):
            self._compact(final)
            return
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": response},
            {"type": "response.in_progress", "response": response},
        ]
        for index, item in enumerate(outputs):
            if item["type"] == "message":
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": index,
                        "item": {**item, "status": "in_progress", "content": []},
                    }
                )
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                events.append(
                    {
                        "type": "response.content_part.added",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "part": part,
                    }
                )
                for piece in split_pieces(text, srv.n_chunks):
                    events.append(
                        {
                            "type": "response.output_text.delta",
                            "item_id": item["id"],
                            "output_index": index,
                            "content_index": 0,
                            "delta": piece,
                            "logprobs": [],
                        }
                    )
                events.append(
                    {
                        "type": "response.output_text.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "text": text,
                        "logprobs": [],
                    }
                )
                events.append(
                    {
                        "type": "response.content_part.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "part": item["content"][0],
                    }
                )
            else:
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": index,
                        "item": {**item, "status": "in_progress", "arguments": ""},
                    }
                )
                for piece in split_pieces(item["arguments"], srv.n_chunks):
                    events.append(
                        {
                            "type": "response.function_call_arguments.delta",
                            "item_id": item["id"],
                            "output_index": index,
                            "delta": piece,
                        }
                    )
                events.append(
                    {
                        "type": "response.function_call_arguments.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "arguments": item["arguments"],
                    }
                )
            events.append(
                {"type": "response.output_item.done", "output_index": index, "item": item}
            )
        end = srv.stream_end
        if end == "error":
            events.append(
                {
                    "type": "error",
                    "code": "server_error",
                    "message": "The model failed.",
                    "param": None,
                }
            )
        elif end == "failed":
            failed = {
                **final,
                "status": "failed",
                "error": {"code": "server_error", "message": "The model failed."},
            }
            events.append({"type": "response.failed", "response": failed})
        elif end == "incomplete":
            cut = {
                **final,
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
            }
            events.append({"type": "response.incomplete", "response": cut})
        elif end != "none":
            events.append({"type": "response.completed", "response": final})
        wire = []
        for n, event in enumerate(events):
            event = {"type": event["type"], "sequence_number": n, **event}
            data = json.dumps(event, separators=(",", ":"))
            wire.append(f"event: {event['type']}\ndata: {data}\n\n".encode())
        self._stream_events(wire)

    def _responses_other(self, method: str, rest: str) -> None:
        srv = self.server
        rid, _, action = rest.partition("/")
        found = srv.responses.get(rid)
        if found is None:
            message = f"Response with id '{rid}' not found."
            error = {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            self._compact({"error": error}, 404)
            return
        response, req = found
        if method == "GET" and action == "":
            self._compact(response)
        elif method == "POST" and action == "cancel":
            response = {**response, "status": "cancelled"}
            srv.responses[rid] = (response, req)
            self._compact(response)
        elif method == "GET" and action == "input_items":
            prompt = input_text(req.get("input"))
            item = {
                "id": _fresh("msg_"),
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": prompt}],
            }
            self._compact(
                {
                    "object": "list",
                    "data": [item],
                    "first_id": item["id"],
                    "last_id": item["id"],
                    "has_more": False,
                }
            )
        elif method == "DELETE" and action == "":
            del srv.responses[rid]
            self._compact({"id": rid, "object": "response.deleted", "deleted": True})
        else:
            self._compact({"error": {"message": f"no route {method} {rest}"}}, 404)

    # -- Anthropic Messages -------------------------------------------------------------------

    def _messages(self, req: dict[str, Any]) -> None:
        srv = self.server
        if not self.headers.get("x-api-key") and not self.headers.get("authorization"):
            error = {"type": "authentication_error", "message": "x-api-key header is required"}
            self._compact({"type": "error", "error": error}, 401)
            return
        if req.get("max_tokens") is None:
            error = {"type": "invalid_request_error", "message": "max_tokens: Field required"}
            self._compact({"type": "error", "error": error, "request_id": _fresh("req_")}, 400)
            return
        prompt = anthropic_prompt(req.get("messages"))
        text = answer_text(srv.tag, prompt)
        tools = req.get("tools") or []
        model = str(req.get("model", "claude-fake"))
        mid = _fresh("msg_")
        usage_in, usage_out = _words(prompt), _words(text)
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if tools:
            content.append(
                {
                    "type": "tool_use",
                    "id": _fresh("toolu_"),
                    "name": tools[0].get("name", "tool"),
                    "input": json.loads(tool_arguments(srv.tag, prompt)),
                }
            )
        stop_reason = "tool_use" if tools else "end_turn"
        if not req.get("stream"):
            self._compact(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": usage_in,
                        "output_tokens": usage_out,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                }
            )
            return
        start = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": usage_in,
                "output_tokens": 1,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
        if srv.ping:
            events.append({"type": "ping"})
        for index, block in enumerate(content):
            if block["type"] == "text":
                events.append(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    }
                )
                for piece in split_pieces(text, srv.n_chunks):
                    events.append(
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": piece},
                        }
                    )
            else:
                events.append(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {**block, "input": {}},
                    }
                )
                arguments = json.dumps(block["input"])
                for piece in ["", *split_pieces(arguments, srv.n_chunks)]:
                    events.append(
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        }
                    )
            events.append({"type": "content_block_stop", "index": index})
        if srv.stream_end == "error":
            events.append(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            )
        else:
            events.append(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": usage_out},
                }
            )
            if srv.stream_end != "none":
                events.append({"type": "message_stop"})
        wire = [
            f"event: {e['type']}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n".encode()
            for e in events
        ]
        self._stream_events(wire)

    # -- vLLM's other endpoints ------------------------------------------------------------

    def _usage(self, n: int) -> dict[str, int]:
        return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}

    def _tokenize(self, req: dict[str, Any]) -> None:
        text = str(req.get("prompt") or json.dumps(req.get("messages")))
        tokens = [ord(c) for c in text]
        self._compact(
            {
                "count": len(tokens),
                "max_model_len": 4096,
                "tokens": tokens,
                "token_strs": list(text) if req.get("return_token_strs") else None,
            }
        )

    def _detokenize(self, req: dict[str, Any]) -> None:
        self._compact({"prompt": "".join(chr(t) for t in req.get("tokens") or [])})

    def _rerank(self, req: dict[str, Any]) -> None:
        query = str(req.get("query", ""))
        documents = req.get("documents") or []
        scored = [
            {
                "index": i,
                "document": {"text": d},
                "relevance_score": len(set(query.split()) & set(str(d).split())) / (1 + len(d)),
            }
            for i, d in enumerate(documents)
        ]
        scored.sort(key=lambda r: -r["relevance_score"])
        top = req.get("top_n") or len(scored)
        self._compact(
            {
                "id": _fresh("rerank-"),
                "model": req.get("model"),
                "usage": {"total_tokens": sum(len(str(d)) for d in documents)},
                "results": scored[:top],
            }
        )

    def _score(self, req: dict[str, Any]) -> None:
        texts = req.get("text_2") or req.get("documents") or []
        texts = texts if isinstance(texts, list) else [texts]
        data = [{"index": i, "object": "score", "score": 1 / (2 + i)} for i in range(len(texts))]
        self._compact(
            {
                "id": _fresh("score-"),
                "object": "list",
                "created": int(time.time()),
                "model": req.get("model"),
                "data": data,
                "usage": self._usage(7),
            }
        )

    def _pooling(self, req: dict[str, Any]) -> None:
        inputs = req.get("input") or []
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"index": i, "object": "pooling", "data": [[0.25, -0.5], [float(len(str(x))), 1.0]]}
            for i, x in enumerate(inputs)
        ]
        self._compact(
            {
                "id": _fresh("pool-"),
                "object": "list",
                "created": int(time.time()),
                "model": req.get("model"),
                "data": data,
                "usage": self._usage(3),
            }
        )

    def _classify(self, req: dict[str, Any]) -> None:
        inputs = req.get("input") or []
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {
                "index": i,
                "label": "positive" if "good" in str(x) else "negative",
                "probs": [0.125, 0.875],
                "num_classes": 2,
            }
            for i, x in enumerate(inputs)
        ]
        self._compact(
            {
                "id": _fresh("classify-"),
                "object": "list",
                "created": int(time.time()),
                "model": req.get("model"),
                "data": data,
                "usage": self._usage(5),
            }
        )

    # -- Gemini ---------------------------------------------------------------------------

    def _gemini(self, rest: str, query: str, req: dict[str, Any]) -> None:
        srv = self.server
        model, _, action = rest.partition(":")
        if not self.headers.get("x-goog-api-key") and "key=" not in query:
            error = {
                "code": 403,
                "message": "Method doesn't allow unregistered callers",
                "status": "PERMISSION_DENIED",
            }
            self._compact({"error": error}, 403)
            return
        contents = req.get("contents") or []
        parts = contents[-1].get("parts", []) if contents else []
        prompt = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        text = answer_text(srv.tag, prompt)
        pieces = split_pieces(text, srv.n_chunks)
        rid = _fresh("")

        def chunk(piece: str, last: bool) -> dict[str, Any]:
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": piece}], "role": "model"},
                "index": 0,
            }
            if last:
                candidate["finishReason"] = "STOP"
            used = {"promptTokenCount": _words(prompt), "totalTokenCount": _words(prompt)}
            if last:
                used = {
                    "promptTokenCount": _words(prompt),
                    "candidatesTokenCount": _words(text),
                    "totalTokenCount": _words(prompt) + _words(text),
                }
            return {
                "candidates": [candidate],
                "usageMetadata": used,
                "modelVersion": model,
                "responseId": rid,
            }

        if action == "generateContent":
            self._compact(chunk(text, True))
        elif action == "streamGenerateContent":
            chunks = [chunk(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
            if "alt=sse" in query:
                wire = [b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks]
                self._stream_events(wire)
            else:
                self._compact(chunks)
        else:
            self._compact({"error": {"code": 404, "message": f"no action {action}"}}, 404)


class SurfaceUpstream(OpenAIUpstream):
    """One fake server for Responses, Anthropic, vLLM's other endpoints and Gemini."""

    SURFACE_KNOBS = ("stream_end", "ping")

    def __init__(self, tag: str = "A", **knobs: Any) -> None:
        self.stream_end = "normal"
        self.ping = True
        self.responses: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        super().__init__(tag, **knobs)
        self.RequestHandlerClass = _SurfaceHandler  # type: ignore[assignment]

    def configure(self, **knobs: Any) -> SurfaceUpstream:
        own = {k: knobs.pop(k) for k in self.SURFACE_KNOBS if k in knobs}
        if own.get("stream_end", self.stream_end) not in STREAM_ENDS:
            raise ValueError(f"stream_end must be one of {STREAM_ENDS}")
        super().configure(**knobs)
        for k, v in own.items():
            setattr(self, k, v)
        return self


def start_surface_upstream(tag: str = "A", **knobs: Any) -> SurfaceUpstream:
    """Start a SurfaceUpstream on 127.0.0.1:<random port> in a thread."""
    return SurfaceUpstream(tag, **knobs).start()
