"""Our own error answers: what the proxy says when it cannot answer from a recording.

Pure functions from facts to words, so the wording is in one place and the addon only
gathers the facts. A miss says what happened and what to do about it: how to record the
request (which depends on the mode, and on whether the upstream was there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PREFIX = "cassette-proxy: "
MISS_START = f"{PREFIX}no recording for"  # how every miss message begins


@dataclass(frozen=True)
class Miss:
    """What is known about a request no recording answers."""

    method: str
    path: str
    key: str
    mode: str
    rules_tried: Sequence[str]
    nearest: tuple[str, str] | None  # (file, first difference)
    test_id: str | None = None
    own: int = 0  # recordings of this path under the request's own test id
    shown: Sequence[str] = ()  # a few other test ids recorded for the path
    others: int = 0  # how many other test ids
    broken: str | None = None  # the matching cassette, unreadable: "file: why"
    offline: str = ""  # why the upstream was not asked ("upstream offline"), or ""
    scope: str = "lenient"  # cassette_test_scope


def how_to_record(mode: str, offline: str = "") -> str:
    """The one sentence a miss ends with: how to get this request recorded."""
    if offline:
        # record-if-missing and auto would have recorded it, had the upstream been up.
        return (
            "to record it: start the upstream and send the request again "
            f"(cassette_mode {mode} records a miss once the upstream answers)"
        )
    if mode == "replay":
        return (
            "to record it: start the upstream and run with --mode record-if-missing "
            "(pytest: --cassette-mode=record-if-missing), or --mode record to record all again"
        )
    return "to record it: start the upstream and send the request again"


def miss_message(miss: Miss) -> str:
    """The miss's one line: what was asked, what is near, why, and how to record it."""
    parts = [f"{MISS_START} {miss.method} {miss.path} (key {miss.key})"]
    if miss.offline:
        parts.append(f"the upstream was offline ({miss.offline}), so it could not be recorded")
    if miss.broken:
        parts.append(f"the matching cassette is unreadable: {miss.broken}")
    parts.append(f"tried {', '.join(miss.rules_tried)}")
    if miss.nearest is not None:
        where, diff = miss.nearest
        parts.append(f"nearest recording {where} differs first at {diff}")
    else:
        parts.append("nothing is recorded for this path")
    if miss.test_id:
        has = f"has {miss.own} recording(s)" if miss.own else "has no recording"
        parts.append(f"this request's test id: {miss.test_id} ({has} for this path)")
    if miss.others:
        more = f" (+{miss.others - len(miss.shown)} more)" if miss.others > len(miss.shown) else ""
        label = "other test ids" if miss.test_id else "test ids"
        parts.append(f"{miss.others} {label} recorded for this path: {', '.join(miss.shown)}{more}")
    if miss.scope == "strict" and miss.test_id and miss.others:
        parts.append("cassette_test_scope is strict: other tests' recordings do not answer it")
    parts.append(how_to_record(miss.mode, miss.offline))
    return "; ".join(parts)


def miss_error(miss: Miss) -> dict[str, Any]:
    """The miss as an OpenAI-shaped ``error`` object (the 404's body holds ``{"error": ...}``)."""
    error: dict[str, Any] = {
        "type": "cassette_miss",
        "code": "cassette_miss",
        "param": None,
        "method": miss.method,
        "path": miss.path,
        "request_key": miss.key,
        "rules_tried": list(miss.rules_tried),
    }
    if miss.nearest is not None:
        error["nearest"] = {"file": miss.nearest[0], "first_difference": miss.nearest[1]}
    error["test_ids"] = list(miss.shown)
    error["other_test_ids"] = miss.others
    if miss.test_id:
        error["test_id"] = miss.test_id
        error["test_id_recordings"] = miss.own
    if miss.offline:
        error["upstream_offline"] = True
    error["test_scope"] = miss.scope
    error["how_to_record"] = how_to_record(miss.mode, miss.offline)
    error["message"] = miss_message(miss)
    return error


def summary_line(counts: Mapping[str, int]) -> str:
    """The one line a proxy prints when it stops, under every host (run, mitmdump, mitmweb)."""
    return (
        f"{PREFIX}{counts.get('hit', 0)} hits, {counts.get('miss', 0)} misses, "
        f"{counts.get('recorded', 0)} recorded, {counts.get('fallback', 0)} offline fallbacks, "
        f"{counts.get('fault', 0)} faults injected"
    )


def pytest_miss_hint(mode: str) -> str:
    """What the pytest plugin adds to a test that failed on a cassette miss."""
    if mode == "replay":
        how = (
            "record it: start the upstream and run pytest --cassette-mode=record-if-missing "
            "(or --cassette-mode=record to record every test again)"
        )
    else:
        how = (
            f"record it: start the upstream and run pytest again (--cassette-mode={mode} "
            "records a request whenever the upstream answers)"
        )
    return f"a request of this test had no recording (cassette_miss); {how}"
