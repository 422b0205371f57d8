"""The request body as the key sees it: JSON, form-encoded or multipart, or why not.

A key needs a value that is the same every time the same request is sent, on the wire
and in the cassette:

- JSON (any content type, as today: clients forget the header) is the parsed value.
- ``application/x-www-form-urlencoded`` (OAuth and IAM token exchanges: Azure, IBM,
  Google) is the dict of its fields; a field sent more than once is a list, in order.
  curl's ``-d '{...}'`` sends JSON under this content type: a body that parses as a
  JSON object or array is JSON whatever the header says.
- ``multipart/form-data`` (``/v1/audio/transcriptions``, file uploads) is the dict of
  its fields; a file part is ``{"filename", "content_type", "size", "sha256"}``, never
  its bytes, and never the boundary (it changes on every request).

The cassette keeps that value as ``request.body`` (a plain dict: llama-stack's format
holds any JSON there) and says what it was parsed from with a header-like marker,
``request.headers["content-type"]`` (``RequestBody.marker``, the boundary left out).
The recorded side keys ``request.body`` exactly as the live side keys ``value``, so it
needs no marker to match; the marker is there for readers (``show``, a person). The kind
is not part of the key: a JSON body and a form with equal string fields sent to one
endpoint are taken for one request (no client sends both), which keeps every existing
JSON key, and llama-stack's, unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import HeaderParser
from typing import Any
from urllib.parse import parse_qsl

from . import redact
from .decoding import MAX_DECODED_BYTES, BodyTooLarge, message_content

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
# Multipart part headers larger than this are not a form a client sends.
MAX_PART_HEADERS = 16 * 1024


class NotKeyable(Exception):
    """A request body the key cannot be built from; the message says why, for the log."""


@dataclass(frozen=True)
class RequestBody:
    kind: str  # "json", "form" or "multipart"
    value: Any  # what the key sees and the cassette keeps (before redaction)

    @property
    def marker(self) -> str | None:
        """The content type a cassette records for a body that was not JSON."""
        return {"form": FORM, "multipart": MULTIPART}.get(self.kind)


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_body(content_type: str, content: bytes) -> RequestBody:
    """The body as the key sees it. Raises NotKeyable with a reason for the log.

    ``content`` is the decoded body (no content-encoding left).
    """
    kind = media_type(content_type)
    if not content:
        return RequestBody("json", {})
    if kind == MULTIPART:
        return RequestBody("multipart", _multipart(content_type, content))
    if kind == FORM:
        if content.lstrip()[:1] in (b"{", b"["):
            try:
                return RequestBody("json", json.loads(content))
            except (ValueError, UnicodeDecodeError, RecursionError):
                pass  # a form field may start with a brace; read it as a form
        return RequestBody("form", _form(content))
    try:
        return RequestBody("json", json.loads(content))
    except RecursionError:
        raise NotKeyable("JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise NotKeyable(f"body is not JSON ({kind or 'no content-type'})") from e


def _fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    grouped: dict[str, list[Any]] = {}
    for name, value in pairs:
        grouped.setdefault(name, []).append(value)
    return {name: values[0] if len(values) == 1 else values for name, values in grouped.items()}


def _form(content: bytes) -> dict[str, Any]:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotKeyable("form-encoded body is not UTF-8") from e
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise NotKeyable(f"form-encoded body does not parse: {e}") from e
    return _fields(pairs)


def _boundary(content_type: str) -> bytes:
    parser = HeaderParser()
    message = parser.parsestr(f"Content-Type: {content_type}\r\n\r\n")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise NotKeyable("multipart body has no boundary in its content-type")
    return boundary.encode("latin-1", "replace")


def _multipart(content_type: str, content: bytes) -> dict[str, Any]:
    """The fields of a multipart/form-data body (RFC 7578), files as their digests."""
    delimiter = b"\r\n--" + _boundary(content_type)
    sections = (b"\r\n" + content).split(delimiter)
    if len(sections) < 2:
        raise NotKeyable("multipart body does not contain its boundary")
    pairs: list[tuple[str, Any]] = []
    closed = False
    for section in sections[1:]:  # sections[0] is the preamble
        if section.startswith(b"--"):
            closed = True
            break
        line_end = section.find(b"\r\n")
        if line_end < 0 or section[:line_end].strip(b" \t"):
            raise NotKeyable("multipart body has a malformed boundary line")
        head_end = section.find(b"\r\n\r\n", line_end)
        if head_end < 0 or head_end > MAX_PART_HEADERS:
            raise NotKeyable("multipart part has no end of headers")
        head = section[line_end + 2 : head_end].decode("utf-8", "replace")
        data = section[head_end + 4 :]
        pairs.append(_part(head, data))
    if not closed:
        raise NotKeyable("multipart body is cut short (no closing boundary)")
    return _fields(pairs)


def _part(head: str, data: bytes) -> tuple[str, Any]:
    headers = HeaderParser().parsestr(head + "\r\n\r\n")
    name = headers.get_param("name", header="content-disposition")
    if not isinstance(name, str):
        raise NotKeyable("multipart part has no name")
    filename = headers.get_filename()
    part_type = headers.get("content-type")
    if filename is None and (part_type is None or media_type(part_type) == "text/plain"):
        try:
            return name, data.decode("utf-8")
        except UnicodeDecodeError:
            pass  # binary without a file name: keyed by its digest like a file
    return name, {
        "filename": filename,
        "content_type": media_type(part_type) if part_type else None,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@dataclass(frozen=True)
class KeyedParts:
    """A request's body, path and query as the key sees them and the cassette keeps them.

    ``scrubbed``: a credential value the request carried (in a header, say) was found
    and replaced elsewhere in it; such a request is not memoised by its bytes alone.
    ``secrets`` and ``marker``: what ``written_secrets`` gives for the same request.
    """

    body: Any
    path: str
    query: list[tuple[str, str]]
    kind: str
    scrubbed: bool
    secrets: frozenset[str] = frozenset()
    marker: str | None = None


def keyed_parts(
    headers: Iterable[tuple[str, str]],
    path: str,
    query: Iterable[tuple[str, str]],
    content_type: str,
    content: bytes,
) -> KeyedParts:
    """Parse the body (``parse_body``) and take the request's credentials out of it.

    Credential fields are redacted by name later, by the key (``redact_body``) on both
    sides; here a form's OAuth fields (``code``, ``assertion``) are redacted, and every
    distinctive credential value the request carried is replaced wherever it appears in
    the body, the path or the query (``redact.request_secrets``). The cassette then holds
    ``REDACTED`` where the live request had the value, and keys the same way.
    """
    parsed = parse_body(content_type, content)
    pairs, headers = list(query), list(headers)
    try:
        form = parsed.kind == "form"
        secrets = redact.request_secrets(headers, pairs, parsed.value, form=form)
        body = redact.redact_form(parsed.value) if form else parsed.value
        if not secrets:
            return KeyedParts(body, path, pairs, parsed.kind, False, secrets, parsed.marker)
        new_body = redact.scrub(body, secrets)
    except RecursionError as e:
        raise NotKeyable("JSON nested too deeply") from e
    new_path = redact.scrub(path, secrets)
    new_pairs = [(k, redact.scrub(v, secrets)) for k, v in pairs]
    changed = new_body is not body or new_path != path or new_pairs != pairs
    # Secrets from the body and query are fixed by the request's bytes (memo-safe);
    # only a header's changes what the same bytes key as.
    header_secrets = redact.request_secrets(headers, [], None) if changed else frozenset()
    scrubbed = bool(header_secrets) and (
        redact.scrub(body, header_secrets) is not body
        or redact.scrub(path, header_secrets) != path
        or any(redact.scrub(v, header_secrets) != v for _, v in pairs)
    )
    return KeyedParts(
        new_body, new_path, new_pairs, parsed.kind, scrubbed, secrets, parsed.marker
    )


def request_content(request: Any) -> bytes:
    """A mitmproxy request's decoded body, decoded with a bound (decoding.py): a body that
    decodes past it raises NotKeyable saying so, before any parse (a gzip bomb)."""
    try:
        return message_content(request)
    except BodyTooLarge as e:
        raise NotKeyable(f"the request body: {e}") from e


def message_secrets(request: Any) -> tuple[frozenset[str], str | None]:
    """``written_secrets`` of a mitmproxy request: its headers, query and decoded body
    (a body over the decoding bound: none; it is never written either)."""
    raw = request.raw_content or b""
    try:
        # A body over the bound, sent plain or encoded, is never parsed (nor written).
        content = request_content(request) if len(raw) <= MAX_DECODED_BYTES else b""
    except NotKeyable:
        content = b""
    return written_secrets(
        request.headers.items(multi=True),
        request.query.items(multi=True),
        request.headers.get("content-type", ""),
        content,
    )


def written_secrets(
    headers: Iterable[tuple[str, str]],
    query: Iterable[tuple[str, str]],
    content_type: str,
    content: bytes,
) -> tuple[frozenset[str], str | None]:
    """The request's credential values to keep out of its cassette, and the body marker.

    Computed again when a cassette is written (not on every hit): the key's memo of
    request bytes does not keep them.
    """
    try:
        parsed: RequestBody | None = parse_body(content_type, content)
    except NotKeyable:
        parsed = None
    value = parsed.value if parsed else None
    form = parsed is not None and parsed.kind == "form"
    headers, query = list(headers), list(query)
    try:
        secrets = redact.request_secrets(headers, query, value, form=form)
    except RecursionError:  # the key refused such a body already; headers still count
        secrets = redact.request_secrets(headers, query, None)
    return secrets, parsed.marker if parsed else None
