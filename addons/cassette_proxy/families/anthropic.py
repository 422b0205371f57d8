"""Anthropic's Messages API: ``POST .../v1/messages`` and ``.../v1/messages/count_tokens``.

Served by Anthropic, and by vLLM and Ollama too. Kept as llama-stack keeps raw HTTP
calls: a whole answer as ``{"status", "body", "is_streaming": false}``, a stream as the
list of its lines (``event: ...``, ``data: ...``, ``""``), pings included, which replay
byte for byte. A stream is complete only at ``message_stop``: one cut before it, or
ended by an ``error`` event (Anthropic's ``overloaded_error`` is a try-again-later), is
not recorded.
"""

from __future__ import annotations

import json
from typing import Any

from ..streams import LineFramer
from .base import NotRecordable, Wire, frames

END_EVENT = "message_stop"


def is_messages_path(path: str) -> bool:
    path = path.rstrip("/")
    return path.endswith("/v1/messages") or path.endswith("/v1/messages/count_tokens")


class MessagesStreamRecorder:
    """Keeps every line of a Messages stream; complete once ``message_stop`` is whole."""

    def __init__(self) -> None:
        self.complete = False
        self._framer = LineFramer()
        self._lines: list[str] = []
        self._event: str | None = None  # the event being read: its name, or its data's type

    def feed(self, data: bytes) -> None:
        for line in frames(self._framer, data):
            if self.complete:
                return  # nothing after message_stop belongs to the answer
            self._lines.append(line)
            if line.startswith("event:"):
                self._event = line[6:].strip()
            elif line.startswith("data:") and self._event is None:
                self._event = _data_type(line[5:])
            elif line == "":
                self.complete = self._event == END_EVENT
                self._event = None

    def response(self, clean_end: bool) -> dict[str, Any]:
        if not self.complete:
            raise NotRecordable("stream ended before message_stop")
        return {"body": list(self._lines), "is_streaming": True}


class AnthropicFamily:
    name = "anthropic"

    def claims(self, method: str, path: str) -> bool:
        return method == "POST" and is_messages_path(path)

    def record(self, path: str, request_body: Any, status: int, data: Any) -> dict[str, Any]:
        return {"status": status, "body": data, "is_streaming": False}

    def stream_recorder(
        self, path: str, request_body: Any, content_type: str
    ) -> MessagesStreamRecorder:
        if "text/event-stream" not in content_type:
            raise NotRecordable(f"unexpected stream of {content_type!r} from {path}")
        return MessagesStreamRecorder()

    def encode(self, path: str, request_body: Any, response: dict[str, Any]) -> Wire | None:
        body = response.get("body")
        if not (is_messages_path(path) and response.get("is_streaming") and isinstance(body, list)):
            return None  # whole answers replay as the raw family replays them
        if not body or not all(isinstance(line, str) for line in body):
            return None
        text = "\n".join(body) + "\n"
        if body[-1] != "":
            text += "\n"  # the last event needs its blank line, or an SSE reader drops it
        status = int(response.get("status") or 200)
        return Wire(status, "text/event-stream", text.encode())


def _data_type(payload: str) -> str | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data.get("type") if isinstance(data, dict) else None


# ---- what ``stats`` and ``show`` read ------------------------------------------------------


def events_of(body: Any) -> list[dict[str, Any]]:
    """The JSON data of each event of a recorded stream (lines), or the whole message."""
    if isinstance(body, dict):
        return [body]
    events = []
    for line in body if isinstance(body, list) else []:
        if isinstance(line, str) and line.startswith("data:"):
            try:
                data = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(data, dict):
                events.append(data)
    return events


def usage_of(body: Any) -> dict[str, int]:
    """Tokens of a message: its usage, or a stream's (message_start, then message_delta).

    Input tokens include the cached ones (``cache_creation_input_tokens``,
    ``cache_read_input_tokens``), which Anthropic counts apart.
    """
    usage: dict[str, Any] = {}
    for event in events_of(body):
        if event.get("type") == "message" and isinstance(event.get("usage"), dict):
            usage.update(event["usage"])
        elif event.get("type") == "message_start":
            message = event.get("message") or {}
            if isinstance(message, dict) and isinstance(message.get("usage"), dict):
                usage.update(message["usage"])
        elif event.get("type") == "message_delta" and isinstance(event.get("usage"), dict):
            usage.update({k: v for k, v in event["usage"].items() if v is not None})
    names = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    prompt = sum(usage[n] for n in names if isinstance(usage.get(n), int))
    total: dict[str, int] = {}
    if any(isinstance(usage.get(n), int) for n in names):
        total["prompt_tokens"] = prompt
    if isinstance(usage.get("output_tokens"), int):
        total["completion_tokens"] = usage["output_tokens"]
    if total:
        total["total_tokens"] = total.get("prompt_tokens", 0) + total.get("completion_tokens", 0)
    return total


def reassemble(body: Any) -> dict[str, Any]:
    """Text, thinking and tool uses (with their input JSON joined and parsed)."""
    blocks: dict[int, dict[str, Any]] = {}
    view: dict[str, Any] = {}
    for event in events_of(body):
        kind = event.get("type")
        if kind == "message":
            for i, block in enumerate(event.get("content") or []):
                if isinstance(block, dict):
                    blocks[i] = dict(block)
            view["stop_reason"] = event.get("stop_reason")
        elif kind == "message_start" and isinstance(event.get("message"), dict):
            view["id"] = event["message"].get("id")
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            block = dict(event["content_block"])
            if block.get("type") in ("tool_use", "server_tool_use"):
                block["partial_json"] = ""
            blocks[int(event.get("index") or 0)] = block
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            block = blocks.setdefault(int(event.get("index") or 0), {"type": "text"})
            delta = event["delta"]
            for field, into in (("text", "text"), ("thinking", "thinking"),
                                ("partial_json", "partial_json")):  # fmt: skip
                if isinstance(delta.get(field), str):
                    block[into] = block.get(into, "") + delta[field]
        elif kind == "message_delta" and isinstance(event.get("delta"), dict):
            view["stop_reason"] = event["delta"].get("stop_reason")
        elif kind == "error":
            view["error"] = event.get("error")
    text = thinking = ""
    calls = []
    for index in sorted(blocks):
        block = blocks[index]
        if block.get("type") == "text":
            text += str(block.get("text") or "")
        elif block.get("type") in ("thinking", "redacted_thinking"):
            thinking += str(block.get("thinking") or "")
        elif block.get("type") in ("tool_use", "server_tool_use"):
            tool_input = block.get("input")
            partial = block.get("partial_json")
            if partial:
                try:
                    tool_input = json.loads(partial)
                except ValueError:
                    tool_input = partial  # cut short: shown as it came
            calls.append({"id": block.get("id"), "name": block.get("name"), "input": tool_input})
    view["text"] = text
    if thinking:
        view["thinking"] = thinking
    if calls:
        view["tool_calls"] = calls
    return view
