"""``cassette-proxy drift``: has the live upstream's answer changed shape since it was recorded?

Each cassette's request is sent again, straight to the upstream (never through a proxy,
so nothing is recorded), and the live answer's *shape* is compared with the recorded
one: field names and JSON types, recursively, values ignored; a stream's chunks by their
shapes; the status code. What changed is printed as ``+field`` (new live), ``-field``
(gone live) and ``field: int -> string``.

To keep the noise down: list items are one shape (``choices[]``), ints and floats are
both numbers, and null is no type: ``content: null`` recorded and a string live is
not drift, nor is a field that is null on one side and absent on the other (the SDKs'
typed recordings hold every optional field, null). ``--ignore`` drops a field and what is
below it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from . import eras
from .cassette import Cassette
from .families.base import is_typed
from .redact import redact_url

# Header names never sent from a cassette (a cassette holds no credentials anyway).
_HOP_HEADERS = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}

Shape = dict[str, set[str]]  # path -> JSON types seen there ("null" left out)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def shape_of(value: Any, path: str = "", into: Shape | None = None) -> Shape:
    """Every field path below ``value`` with the JSON types found there.

    The root itself is ``""``; list items are ``path[]``, all merged.
    """
    shape: Shape = {} if into is None else into
    types = shape.setdefault(path, set())
    kind = type_name(value)
    if kind != "null":
        types.add(kind)
    if isinstance(value, dict):
        for key, item in value.items():
            shape_of(item, f"{path}.{key}" if path else str(key), shape)
    elif isinstance(value, list):
        for item in value:
            shape_of(item, f"{path}[]", shape)
    return shape


def _comparable(types: set[str]) -> set[str]:
    return {"number" if t in ("int", "float") else t for t in types}


def ignored(path: str, patterns: Sequence[str]) -> bool:
    """``--ignore usage`` drops ``usage`` and all below it; ``[]`` is optional and globs
    work (``choices.logprobs``, ``*.id``)."""
    bare = path.replace("[]", "")
    for pattern in patterns:
        pattern = pattern.replace("[]", "")
        if bare == pattern or bare.startswith(pattern + "."):
            return True
        if fnmatch.fnmatchcase(bare, pattern):
            return True
    return False


def _parent(path: str) -> str:
    if path.endswith("[]"):
        return path[:-2]
    return path.rsplit(".", 1)[0] if "." in path else ""


def compare(recorded: Shape, live: Shape, ignore: Sequence[str] = ()) -> list[str]:
    """What changed from ``recorded`` to ``live``: ``+path``, ``-path``, ``path: a -> b``.

    A new or gone object is one line, not one per field below it.
    """
    changes: list[str] = []
    for path in sorted(set(recorded) | set(live)):
        if not path or ignored(path, ignore):
            continue
        parent = _parent(path)
        # Below a parent that is new, gone or of another type, the parent's line says it.
        holder = "array" if path.endswith("[]") else "object"
        # A field only ever null is as good as absent: the SDKs' typed recordings hold
        # every optional field, as null, that a server leaves out.
        if path not in live:
            if recorded[path] and holder in live.get(parent, ()):
                changes.append(f"-{path}")
            continue
        if path not in recorded:
            if live[path] and holder in recorded.get(parent, ()):
                types = "|".join(sorted(live[path])) or "null"
                changes.append(f"+{path} ({types})")
            continue
        before, after = recorded[path], live[path]
        if before and after and not (_comparable(before) & _comparable(after)):
            changes.append(f"{path}: {'|'.join(sorted(before))} -> {'|'.join(sorted(after))}")
    return changes


# ---- the recorded answer, and the live one, as shapes ----------------------------------


def recorded_objects(cassette: Cassette) -> list[Any]:
    """The recorded answer as JSON values: one, or a stream's chunks."""
    body = cassette.response.body
    if cassette.response.is_streaming and isinstance(body, list):
        out = []
        for item in body:
            if is_typed(item):
                out.append(item.get("__data__"))
            elif isinstance(item, str):
                out += parse_stream(item.encode())
            else:
                out.append(item)
        return out
    if is_typed(body):
        return [body.get("__data__")]
    if isinstance(body, list) and all(is_typed(b) for b in body):
        return [b.get("__data__") for b in body]  # a model list (maybe empty)
    return [body]


def recorded_status(cassette: Cassette) -> int:
    extra = cassette.response.model_extra or {}
    if extra.get("is_exception"):
        return int((extra.get("exception_data") or {}).get("status_code") or 500)
    if isinstance(extra.get("status"), int):
        return int(extra["status"])
    return 200


def parse_stream(raw: bytes) -> list[Any]:
    """SSE ``data:`` events or NDJSON lines as JSON values ([DONE] and comments out)."""
    out: list[Any] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith((":", "event:", "id:", "retry:")):
            continue
        if line.startswith("data:"):
            line = line[5:].strip()
            if line == "[DONE]":
                continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def stream_shape(objects: Iterable[Any]) -> Shape:
    shape: Shape = {}
    for obj in objects:
        shape_of(obj, "", shape)
    return shape


def live_objects(cassette: Cassette, raw: bytes, content_type: str) -> list[Any]:
    if content_type.startswith(("text/event-stream", "application/x-ndjson", "application/jsonl")):
        return parse_stream(raw)
    try:
        value = json.loads(raw or b"null")
    except ValueError:
        return [raw.decode("utf-8", "replace")]
    if recorded_as_list(cassette) and is_list_wrapper(value):
        # A model list is stored as its models (llama-stack's format); the wire wraps
        # them in {"object": "list", "data": [...]}: compare the models with the models,
        # however many there are (one, or none, too).
        return list(value["data"])
    return [value]


def recorded_as_list(cassette: Cassette) -> bool:
    """The recorded whole answer is a JSON list (a model list, stored as its models)."""
    return not cassette.response.is_streaming and isinstance(cassette.response.body, list)


def is_list_wrapper(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("object") == "list"
        and isinstance(value.get("data"), list)
    )


# ---- sending -------------------------------------------------------------------------


@dataclass
class Result:
    file: str
    url: str
    changes: list[str] = field(default_factory=list)
    error: str | None = None


def credentials_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Credentials from the environment: OPENAI_API_KEY as a bearer token."""
    environ = dict(os.environ) if environ is None else environ
    key = environ.get("OPENAI_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


class RedirectRefused(Exception):
    """A redirect drift does not follow; the message says where it led and why."""


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port: a redirect elsewhere is to another host."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects as drift follows them: the same method, body and headers (urllib's own
    handler turns a POST into a GET on 301/302/303, and copies ``Authorization`` to any
    host), and never to another host (or scheme, or port) while credentials are sent:
    what they unlock is the recorded upstream's, not whoever it points to."""

    max_redirections = 5

    def __init__(self, carries_credentials: bool) -> None:
        super().__init__()
        self.carries_credentials = carries_credentials

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        target = redact_url(newurl)
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise RedirectRefused(f"upstream answered {code}, a redirect to {target}: not followed")
        if self.carries_credentials and origin(newurl) != origin(req.full_url):
            raise RedirectRefused(
                f"upstream answered {code}, a redirect to another host ({target}): not "
                "followed, the request carries credentials"
            )
        headers_sent = {k: v for k, v in req.header_items() if k.lower() != "host"}
        return urllib.request.Request(
            newurl, data=req.data, headers=headers_sent, method=req.get_method()
        )


def target_url(cassette: Cassette, upstream: str | None) -> str | None:
    wire = eras.recorded_wire(cassette)
    query = f"?{urlencode(wire.query)}" if wire.query else ""
    if upstream:
        return upstream.rstrip("/") + wire.path + query
    url = cassette.request.url or ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}{wire.path}{query}"


def check(
    cassette: Cassette,
    file: str,
    *,
    upstream: str | None,
    headers: dict[str, str],
    ignore: Sequence[str],
    timeout: float,
) -> Result:
    """Send one cassette's request live and compare the answer's shape."""
    url = target_url(cassette, upstream)
    if url is None:
        return Result(file, "-", error="no HTTP URL recorded; give --upstream URL")
    wire = eras.recorded_wire(cassette)
    data = None
    send = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
    if wire.method not in ("GET", "HEAD", "DELETE") or wire.body not in ({}, None):
        data = json.dumps(wire.body).encode()
        send.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, headers=send, method=wire.method)
    # No proxy, whatever HTTP(S)_PROXY says: through a recording proxy drift would write.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        SafeRedirects(carries_credentials=bool(send.keys() - {"Content-Type"})),
    )
    shown = f"{wire.method} {url}"
    try:
        with opener.open(request, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
            content_type = answer.headers.get("content-type", "").lower()
    except RedirectRefused as e:
        return Result(file, shown, error=str(e))
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
        content_type = (e.headers.get("content-type") or "").lower()
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return Result(file, shown, error=f"upstream not reachable: {reason}")
    result = Result(file, shown)
    before = recorded_status(cassette)
    if status != before:
        result.changes.append(f"status: {before} -> {status}")
        return result  # an error's body says nothing about the answer's shape
    if before >= 400:
        return result
    streamed = bool(cassette.response.is_streaming)
    is_stream = content_type.startswith(
        ("text/event-stream", "application/x-ndjson", "application/jsonl")
    )
    if streamed != is_stream:
        was, now = ("a stream", "a whole answer") if streamed else ("a whole answer", "a stream")
        result.changes.append(f"answer: {was} -> {now} ({content_type or 'no content-type'})")
        return result
    recorded = stream_shape(recorded_objects(cassette))
    live = stream_shape(live_objects(cassette, raw, content_type))
    result.changes = compare(recorded, live, ignore)
    return result
