"""Bedrock's runtime API: JSON requests and whole answers as raw, streams as AWS
eventstream frames (eventstream.py)."""

from __future__ import annotations

from typing import Any

from .base import Wire
from .eventstream import BEDROCK_PATH, EventStreamRecorder, encode_stream, is_eventstream
from .raw import RawFamily


class EventStreamFamily(RawFamily):
    """Bedrock runtime: JSON requests and whole answers as raw; streams as eventstream."""

    name = "aws-eventstream"

    def claims(self, method: str, path: str) -> bool:
        return method.upper() == "POST" and BEDROCK_PATH.match(path) is not None

    def stream_recorder(self, path: str, request_body: Any, content_type: str) -> Any:
        if is_eventstream(content_type):
            return EventStreamRecorder(200)
        return super().stream_recorder(path, request_body, content_type)

    def encode(self, path: str, request_body: Any, response: dict[str, Any]) -> Wire | None:
        # Asked first for every recording: only eventstream answers are this family's.
        if not is_eventstream(str(response.get("content_type") or "")):
            return None
        return encode_stream(response)
