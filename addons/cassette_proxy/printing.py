"""What reaches the terminal and the log: lines redacted as a cassette is.

mitmdump's flow printer (the ``dumper`` addon, ``cassette-proxy run --full``) is handed
a copy of each flow with the same credentials redacted as in a cassette; a request's path
in a log line is shown as its cassette would hold it (``shown_path``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .bodies import message_secrets
from .decoding import BodyTooLarge, message_content
from .redact import (
    REDACTED,
    guard_log_lines,
    is_secret_header,
    is_secret_query_param,
    redact_body,
    redact_line,
    redact_path,
    redact_text,
    redact_url,
    scrub,
    wire_text,
)


def shown_path(request: Any) -> str:
    """A mitmproxy request's path (no query) for a log line or an error message, with
    credentials out as its cassette would have them: ``redact_path``, then every
    credential value the request carried (headers, query, body) wherever it stands."""
    path = wire_text(request.path.partition("?")[0])
    try:
        secrets, _ = message_secrets(request)
    except Exception:  # noqa: BLE001 - a line is never worth a crash: the key shapes only
        secrets = frozenset()
    return redact_line(scrub(redact_path(path), secrets))


# ---- flow lines on the terminal -------------------------------------------------------
#
# mitmdump without -q prints one line per flow with the full URL (``?key=...``), and its
# headers from ``flow_detail=2`` on. The terminal is scrollback, CI logs and pasted bug
# reports: the printer (mitmproxy's ``dumper`` addon) is handed a copy of each flow with
# the same credentials redacted as in a cassette.


def printable_flow(flow: Any) -> Any:
    """A copy of an HTTP flow for printing, redacted as its cassette is: credentials in
    the URL and headers; in bodies, credential fields by name (``"password"``, an issued
    ``access_token``), OAuth form fields, keys in text, and the request's own credential
    values. A body that decodes past the bound (decoding.py) is not shown."""

    copy = flow.copy()
    request = copy.request
    secrets, _ = message_secrets(request)
    request.url = scrub(redact_url(flow.request.url), secrets)
    for message in (request, copy.response):
        if message is None:
            continue
        for name in list(message.headers.keys()):
            if is_secret_header(name):
                message.headers[name] = REDACTED
            else:
                message.headers[name] = scrub(redact_text(message.headers[name]), secrets)
        if not message.raw_content:
            continue
        try:
            content = message_content(message)
        except BodyTooLarge as e:
            message.headers.pop("content-encoding", None)
            message.raw_content = f"[body not shown: {e}]".encode()
            continue
        text = content.decode("utf-8", "replace")
        message.headers.pop("content-encoding", None)
        message.raw_content = printable_text(
            text, message.headers.get("content-type", ""), secrets
        ).encode()
    return copy


def printable_text(text: str, content_type: str, secrets: frozenset[str]) -> str:
    """A body's text as a cassette would hold it: JSON (whole, or the lines of a stream)
    with credential fields redacted by name, a form's credential fields, then keys in
    text and the request's credential values anywhere."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        pairs = parse_qsl(text, keep_blank_values=True)
        text = urlencode([(k, REDACTED if is_secret_query_param(k) else v) for k, v in pairs])
    else:
        try:
            value = json.loads(text)
        except ValueError:
            text = "\n".join(_printable_line(line) for line in text.split("\n"))
        else:
            redacted = redact_body(value)
            if redacted is not value:
                text = json.dumps(redacted, ensure_ascii=False)
    return scrub(redact_text(text), secrets)


def _printable_line(line: str) -> str:
    """One line of a stream (``data: {...}`` or NDJSON) with its JSON redacted by name."""
    head, payload = ("", line)
    if line.startswith("data:"):
        head, payload = line[:5], line[5:]
    if payload.strip()[:1] not in ("{", "["):
        return line
    try:
        value = json.loads(payload)
    except ValueError:
        return line
    redacted = redact_body(value)
    if redacted is value:
        return line
    return head + (" " if head else "") + json.dumps(redacted, ensure_ascii=False)


def guard_flow_lines(master: Any) -> None:
    """Make mitmdump's flow printer (if loaded) print ``printable_flow`` copies, and
    every log line pass ``redact_line`` (``guard_log_lines``)."""
    guard_log_lines()
    dumper = master.addons.get("dumper") if master is not None else None
    if dumper is None or getattr(dumper, "cassette_redacts", False):
        return
    original = dumper.echo_flow

    def echo_flow(flow: Any) -> None:
        try:
            shown = printable_flow(flow)
        except Exception:  # noqa: BLE001 - print nothing rather than a credential
            return
        original(shown)

    dumper.echo_flow = echo_flow
    dumper.cassette_redacts = True
