"""Our own answers: every response the proxy makes up rather than replays or forwards.

A miss, a refusal to forward, the upstream timeout, record mode's unreachable upstream,
an injected fault and a bad fault header. Each is a non-retryable status where a retry
cannot help (the openai SDKs retry 408, 409, 429 and 5xx), in the API family's shape
where a client parses it. The wording is pure functions from facts to words: a miss says
what happened and what to do about it (how to record the request, which depends on the
mode and on whether the upstream was there).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import matching

if TYPE_CHECKING:  # the wording is read by the CLI too, which must not load mitmproxy
    from mitmproxy import http
from .faults import FAULT_HEADER_NAME, RETRY_AFTER_STATUSES, api_family, error_body

FILE_HEADER = "x-cassette-file"  # a replayed answer's cassette
MISS_HEADER = "x-cassette-miss"  # our own error answer: the request key, or why none
MISS_STATUS = 404  # the openai SDKs retry 408, 409, 429 and 5xx; a miss must not be retried
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


def _json(
    status: int, error: dict[str, Any], headers: dict[str, str], head: bool = False
) -> http.Response:
    body = b"" if head else json.dumps({"error": error})  # HEAD: no body
    return _response(status, body, {"content-type": "application/json", **headers})


def miss(
    store: Any, plan: Any, mode: str, scope: str, broken: str | None = None
) -> tuple[http.Response, str]:
    """The 404 for a request no cassette answers, and its message: the facts gathered
    from the store (the nearest recording, the rules tried, the test ids of the path)."""
    request = plan.request or matching.Request(plan.method, plan.path, plan.body)
    nearest = matching.nearest(store, request, plan.test_id)
    own, shown, others = matching.test_id_summary(store, request, plan.test_id)
    facts = Miss(
        method=plan.method,
        path=plan.path,
        key=plan.key,
        mode=mode,
        rules_tried=matching.rules_tried(request),
        nearest=(store.relative(nearest[0].path), nearest[1]) if nearest else None,
        test_id=plan.test_id,
        own=own,
        shown=shown,
        others=others,
        broken=broken,
        offline=plan.why,
        scope=scope,
    )
    error = miss_error(facts)
    response = _json(MISS_STATUS, error, {MISS_HEADER: plan.key}, head=plan.method == "HEAD")
    return response, error["message"]


def refusal(method: str, shown: str, why: str, where: str) -> http.Response:
    """A request that has no key (or whose body is streamed), where nothing may be
    forwarded: the 404 saying why. ``shown``: its path redacted (printing.shown_path)."""
    message = (
        f"cassette-proxy: {method} {shown} cannot be answered from cassettes: "
        f"{why}; {where}, so it was not forwarded"
    )
    error = {
        "message": message,
        "type": "cassette_unkeyable",
        "code": "cassette_unkeyable",
        "param": None,
        "method": method,
        "path": shown,
        "reason": why,
    }
    return _json(MISS_STATUS, error, {MISS_HEADER: "unkeyable"})


def upstream_timeout(miss_answer: http.Response, timeout_ms: int) -> http.Response:
    """The miss error, as a 504 saying the upstream did not answer in time."""
    try:
        body = json.loads(miss_answer.content or b"{}")
        error = body["error"]
    except (ValueError, KeyError, TypeError):
        return miss_answer
    error["type"] = error["code"] = "cassette_upstream_timeout"
    miss_message = str(error.get("message", "")).removeprefix("cassette-proxy: ")
    error["message"] = (
        f"cassette-proxy: the upstream sent no response headers within {timeout_ms} ms "
        f"(cassette_response_timeout_ms) and {miss_message}"
    )
    miss_answer.status_code = 504
    miss_answer.content = json.dumps(body).encode()
    return miss_answer


def unreachable_in_record(host: str, port: int) -> http.Response:
    """record mode: the upstream cannot be reached, and nothing is replayed."""
    return _response(
        502,
        f"cassette-proxy: upstream {host}:{port} is unreachable and cassette_mode is record",
        {"content-type": "text/plain", MISS_HEADER: "unreachable"},
    )


def stand_in_unknown() -> http.Response:
    """The stand-in got a request it was not expecting (a stale or forged token)."""
    return _response(
        502, b"cassette-proxy: upstream offline", {"content-type": "text/plain"}
    )


def fault(path: str, status: int) -> http.Response:
    """The injected error answer for a request path (``X-Cassette-Fault: status=``)."""
    message = f"cassette-proxy: fault injected by {FAULT_HEADER_NAME} (status={status})"
    headers = {"content-type": "application/json", "x-cassette-fault-injected": f"status={status}"}
    if status in RETRY_AFTER_STATUSES:
        headers["retry-after"] = "1"
    body = json.dumps(error_body(api_family(path), status, message))
    return _response(status, body, headers)


def bad_fault(path: str, value: str, problem: str) -> http.Response:
    """The 400 for a header value that names no fault (never retried by the SDKs)."""
    message = f"cassette-proxy: bad X-Cassette-Fault header {value[:200]!r}: {problem}"
    body = error_body(api_family(path), 400, message)
    if isinstance(body.get("error"), dict) and "code" in body["error"]:
        body["error"].update(type="cassette_bad_fault", code="cassette_bad_fault",
                             param="X-Cassette-Fault")  # fmt: skip
    return _response(400, json.dumps(body), {"content-type": "application/json"})


def _response(status: int, body: str | bytes, headers: dict[str, str]) -> http.Response:
    """``http.Response.make``, mitmproxy imported only when an answer is made."""
    from mitmproxy import http

    return http.Response.make(status, body, headers)
