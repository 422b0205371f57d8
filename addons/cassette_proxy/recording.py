"""Turning one finished interaction into a cassette and its file name.

Shared by the proxy (``CassetteRecorder._write``) and ``cassette-proxy import``, so a
cassette imported from a flow or HAR file is the same file, under the same name, as
the one the proxy would have recorded from the same traffic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import answerheaders, matching, wireform
from .cassette import Cassette, make_cassette
from .families import Family, NotRecordable, encode_value, error_response, is_typed
from .families.ollama import with_stream_default
from .redact import (
    recordable_headers,
    redact_answer,
    redact_body,
    redact_path,
    redact_strings,
    scrub,
)
from .store import safe_folder

# Answers that say "try again later" are never frozen into a cassette by default.
UNRECORDED_ERRORS = frozenset({408, 409, 429})
# ``cassette_record_errors=4xx``, the default: a client error is an answer worth
# replaying (llama-stack records them as exceptions); a 5xx or a retry-later is not.
DEFAULT_RECORDED_ERRORS = frozenset(range(400, 500)) - UNRECORDED_ERRORS


def recorded_errors(spec: str) -> frozenset[int]:
    """The error statuses ``cassette_record_errors`` asks to record.

    A comma-separated list of: ``none`` (no error is recorded), ``4xx`` (every 4xx but
    the retryable 408, 409 and 429), ``5xx`` (every 5xx), or a status from 400 to 599
    (``4xx,429`` adds 429). Raises ValueError with a readable message.
    """
    items = [item.strip().lower() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("cassette_record_errors is empty; use none to record no error")
    if "none" in items:
        if len(items) > 1:
            raise ValueError("cassette_record_errors: none cannot be combined with statuses")
        return frozenset()
    statuses: set[int] = set()
    for item in items:
        if item == "4xx":
            statuses |= DEFAULT_RECORDED_ERRORS
        elif item == "5xx":
            statuses |= set(range(500, 600))
        elif item.isdigit() and 400 <= int(item) <= 599:
            statuses.add(int(item))
        else:
            raise ValueError(
                f"cassette_record_errors: {item!r} is not none, 4xx, 5xx or a status 400-599"
            )
    return frozenset(statuses)


def whole_response(
    family: Family,
    path: str,
    body: Any,
    status: int,
    data: Any,
    errors: frozenset[int] = DEFAULT_RECORDED_ERRORS,
) -> dict[str, Any]:
    """The response half for a whole (non-streamed) JSON answer.

    Raises NotRecordable (with the reason) for answers that must not be recorded: an
    error status not in ``errors`` (by default 5xx and 408/409/429), 1xx/3xx, or a body
    the family cannot type. Recorded errors have keys and bearer tokens redacted: a 401
    is where an upstream echoes the credential it was sent.

    A 2xx whose body is ``{"error": ...}`` is an error all the same: kept as the raw
    answer it is (not typed as the family's success object), and ``is_error`` says so.
    """
    if 200 <= status < 300 and _error_body(data):
        return {"status": status, "body": redact_strings(data), "is_streaming": False}
    if 200 <= status < 300:
        return family.record(path, body, status, data)
    if status in errors:
        return error_response(status, redact_strings(data))
    raise NotRecordable(f"upstream answered {status}")


def _error_body(data: Any) -> bool:
    return isinstance(data, dict) and data.get("error") is not None


def is_error(response: dict[str, Any]) -> bool:
    """Whether a response half is an error: a recorded exception, a status of 400 or
    more, an ``{"error": ...}`` body (some servers answer errors with a 200), or a
    stream with an error event in it (``chunk_is_error``)."""
    if response.get("is_exception"):
        return True
    status = response.get("status")
    if isinstance(status, int) and status >= 400:
        return True
    body = response.get("body")
    if response.get("is_streaming") and isinstance(body, list):
        # An error ends a stream: its last events say (a recorder of 60,000 chunks need
        # not walk them all to know).
        return any(chunk_is_error(chunk) for chunk in last_events(body))
    return _error_body(body["__data__"] if is_typed(body) else body)


def last_events(chunks: list[Any], n: int = 3) -> list[Any]:
    """A stream's last ``n`` chunks that carry something: a raw stream's blank lines,
    ``event:`` lines and ``data: [DONE]`` left out."""
    found: list[Any] = []
    for chunk in reversed(chunks):
        if isinstance(chunk, str) and not chunk.startswith("data:") or chunk == "data: [DONE]":
            continue
        found.append(chunk)
        if len(found) == n:
            break
    return found


def chunk_is_error(chunk: Any) -> bool:
    """A stream chunk that reports an error: ``{"error": ...}`` (OpenAI-compatible
    servers, Ollama), ``type: error`` (Anthropic, the Responses API), or a failed
    Responses stream (``response.failed``)."""
    data = chunk["__data__"] if is_typed(chunk) else chunk
    if isinstance(data, str) and data.startswith("data:"):  # a raw SSE line (families/raw)
        try:
            data = json.loads(data[5:])
        except ValueError:
            return False
    if not isinstance(data, dict):
        return False
    return _error_body(data) or data.get("type") in ("error", "response.failed")


def interaction(
    root: Path,
    *,
    method: str,
    path: str,
    body: Any,
    test_id: str | None,
    url: str,
    request_headers: Mapping[str, str],
    record_headers: Iterable[str],
    marker: str | None,
    secrets: frozenset[str],
    response: dict[str, Any],
    raw: bytes | None = None,
    file: Path | None = None,
    answer_headers: Mapping[str, str] | None = None,
    header_names: Iterable[str] = (),
) -> tuple[Path, Cassette]:
    """One interaction the proxy saw -> its cassette and the file of its first answer.

    ``path`` and ``body`` are the request as its key saw it (``matching.live_request``:
    credential fields redacted); ``url`` is redacted. Every credential value the request
    carried (``secrets``) is scrubbed from all that is written; ``marker`` names what the
    body was parsed from (bodies.py). ``raw``: the answer's bytes ``response`` was read
    from (and its ``wire_form``). ``file``: the name worked out when the answer began,
    used when scrubbing changed nothing of what names the file. ``answer_headers``: the
    answer's headers, of which those clients read are kept (``header_names`` adds names).
    """
    headers = recordable_headers(request_headers, record_headers)
    if marker:
        headers["content-type"] = marker
    written = scrub(path, secrets), scrub(body, secrets), scrub(url, secrets)
    unchanged = written[0] is path and written[1] is body and written[2] is url
    return new_recording(
        root,
        method=method,
        path=written[0],
        body=written[1],
        test_id=test_id,
        url=written[2],
        headers=scrub(headers, secrets),
        response=redact_answer(response, secrets, raw),
        file=file if unchanged else None,
        body_redacted=True,
        raw=raw,
        answer_headers=answer_headers,
        header_names=header_names,
    )


def new_recording(
    root: Path,
    *,
    method: str,
    path: str,
    body: Any,
    test_id: str | None,
    url: str,
    headers: dict[str, str],
    response: dict[str, Any],
    file: Path | None = None,
    body_redacted: bool = False,
    raw: bytes | None = None,
    answer_headers: Mapping[str, str] | None = None,
    header_names: Iterable[str] = (),
) -> tuple[Path, Cassette]:
    """The cassette for one interaction and the file it belongs in below ``root``.

    ``url`` and ``headers`` must already be redacted; credential fields of the body and
    keys in the path are redacted here (the proxy keys requests the same way). The name
    is the documented request hash (with the URL's query, if it has one: ``matching.
    file_stem``); a test's cassettes go in a folder of their own. An Ollama request
    without ``stream`` is written with the server's default made explicit
    (``families.ollama.with_stream_default``). ``file``: that name, when the caller
    has worked it out already for this very request (the proxy, when the answer began).
    ``body_redacted``: the body went through ``redact_body`` already (the proxy's key).
    ``raw``: a whole answer's bytes as they came, for its ``wire_form`` (a stream's
    recorder gives its own). ``answer_headers``: the answer's headers, of which those
    clients read are kept (``answerheaders``; ``header_names`` adds names).
    """
    body = with_stream_default(path, body if body_redacted else redact_body(body))
    path = redact_path(path)
    response = answer_extras(path, body, response, raw, answer_headers, header_names)
    model = body.get("model") if isinstance(body, dict) else None
    cassette = make_cassette(
        test_id=test_id,
        method=method,
        url=url,
        headers=headers,
        body=body,
        endpoint=path,
        model=model if isinstance(model, str) else None,
        response=response,
    )
    if file is not None:
        return file, cassette
    query = matching.recorded_query(url)
    return recording_path(root, method, path, body, test_id, query), cassette


def answer_extras(
    path: str,
    body: Any,
    response: dict[str, Any],
    raw: bytes | None = None,
    answer_headers: Mapping[str, str] | None = None,
    header_names: Iterable[str] = (),
) -> dict[str, Any]:
    """The response half with what makes a replay the live answer: how its JSON was
    written (``wire_form``) and the headers clients read; verbatim texts that no longer
    read as the recorded value (normalised, redacted) left out (``wireform.settle``)."""
    if raw is not None and not response.get("is_streaming") and wireform.FIELD not in response:
        form = wireform.whole_form(raw)
        if form is not None:
            response = {**response, wireform.FIELD: form}
    if answer_headers is not None and answerheaders.FIELD not in response:
        headers = answerheaders.recorded_headers(answer_headers, header_names)
        if headers:
            response = {**response, answerheaders.FIELD: headers}
    form = response.get(wireform.FIELD)
    if isinstance(form, dict) and ("text" in form or "chunks" in form):
        try:
            wire = encode_value(path, body, response)
            sent = wire.events if wire.events is not None else wire.data
        except (NotRecordable, ValueError, TypeError):
            sent = None
        response = wireform.settle(response, sent)
    return response


def recording_path(
    root: Path,
    method: str,
    path: str,
    body: Any,
    test_id: str | None,
    query: Iterable[tuple[str, str]] = (),
) -> Path:
    """Where the recording of a request goes: ``[<test folder>/]<request hash>.json``."""
    name = matching.file_stem(method, path, body, query, test_id) + ".json"
    return (root / safe_folder(test_id) if test_id else root) / name
