"""Which wire bodies mean the same request, so they get the same key.

Clients differ in what they spell out: the ollama client always sends ``stream`` and
``tools: []``, curl leaves them out; the openai SDK asks for base64 embeddings when the
caller did not choose; ``stream: false`` and no ``stream`` are the same OpenAI call. The
key is computed from a *normal form* of the body, on both sides (the wire request and the
recorded one), so these differences never cause a miss and lookup stays one dict hit.

Weaker, loose matches (a field forgotten) are not here: they are tried only after an
exact miss, and live in ``matching.LOOSE_RULES``.
"""

from __future__ import annotations

from typing import Any


def _is_ollama(path: str, *endpoints: str) -> bool:
    if "/api/" not in path:  # the common case, checked once per request: keep it cheap
        return False
    return any(path.endswith("/api/" + e) for e in endpoints)


def _is_openai(path: str, suffix: str) -> bool:
    return "/api/" not in path and path.rstrip("/").endswith(suffix)


def _falsy(value: Any) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


FILE_PART = frozenset({"filename", "content_type", "size", "sha256"})  # bodies._part's


def _file_part(value: Any) -> bool:
    return type(value) is dict and "sha256" in value and value.keys() == FILE_PART


def _without_part_types(body: dict[str, Any]) -> dict[str, Any]:
    """A multipart body with each file part's content type left out: it is the client's
    guess (curl -F says application/octet-stream where the openai SDK says audio/x-wav
    for the same WAV); the server reads the bytes (sha256), field names and file name."""

    def one(value: Any) -> Any:
        if _file_part(value):
            return {k: v for k, v in value.items() if k != "content_type"}
        if type(value) is list and any(map(_file_part, value)):
            return [one(v) for v in value]
        return value

    return {k: one(v) for k, v in body.items()}


def _has_file_part(body: dict[str, Any]) -> bool:
    for value in body.values():
        if type(value) is dict and "sha256" in value:
            return True
        if type(value) is list and value and type(value[0]) is dict and "sha256" in value[0]:
            return True
    return False


def normal_form(path: str, body: Any) -> Any:
    """The body with client defaults made explicit or dropped, as the server reads it."""
    if not isinstance(body, dict):
        return body
    if _has_file_part(body):
        body = _without_part_types(body)
    if _is_ollama(path, "generate", "chat", "pull", "push"):
        body = dict(body)
        # The Ollama server streams unless told otherwise; clients differ in spelling it.
        body["stream"] = body.get("stream") is not False
        if body.get("tools") == []:
            del body["tools"]
        if body.get("insecure") is False:
            del body["insecure"]
        if isinstance(body.get("messages"), list):
            # The ollama client drops empty fields of each message before sending it.
            body["messages"] = [
                {k: v for k, v in m.items() if not _falsy(v)} if isinstance(m, dict) else m
                for m in body["messages"]
            ]
        return body
    if _is_openai(path, "/embeddings"):
        # The answer is stored as floats and re-encoded as the request asks (base64 or not).
        return {k: v for k, v in body.items() if k != "encoding_format"}
    if _is_openai(path, "/completions") and body.get("stream") is False:
        return {k: v for k, v in body.items() if k != "stream"}
    return body
