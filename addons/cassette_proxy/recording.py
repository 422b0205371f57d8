"""Turning one finished interaction into a cassette and its file name.

Shared by the proxy (``CassetteRecorder._write``) and ``cassette-proxy import``, so a
cassette imported from a flow or HAR file is the same file, under the same name, as
the one the proxy would have recorded from the same traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import keys
from .cassette import Cassette, make_cassette
from .families import Family, NotRecordable, error_response
from .store import safe_folder

# Answers that say "try again later" are never frozen into a cassette.
UNRECORDED_ERRORS = frozenset({408, 409, 429})


def whole_response(family: Family, path: str, body: Any, status: int, data: Any) -> dict[str, Any]:
    """The response half for a whole (non-streamed) JSON answer.

    Raises NotRecordable (with the reason) for answers that must not be recorded:
    5xx, 408/409/429, 1xx/3xx, or a body the family cannot type.
    """
    if 200 <= status < 300:
        return family.record(path, body, status, data)
    if 400 <= status < 500 and status not in UNRECORDED_ERRORS:
        return error_response(status, data)
    raise NotRecordable(f"upstream answered {status}")


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
) -> tuple[Path, Cassette]:
    """The cassette for one interaction and the file it belongs in below ``root``.

    ``url`` and ``headers`` must already be redacted. The name is the documented
    request hash; a test's cassettes go in a folder of their own.
    """
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
    return recording_path(root, method, path, body, test_id), cassette


def recording_path(root: Path, method: str, path: str, body: Any, test_id: str | None) -> Path:
    """Where the recording of a request goes: ``[<test folder>/]<request hash>.json``."""
    name = keys.recording_hash(method, path, body, test_id) + ".json"
    return (root / safe_folder(test_id) if test_id else root) / name
