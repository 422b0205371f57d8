"""Our own answers: every response the proxy makes up rather than replays or forwards.

A miss, a refusal to forward, the upstream timeout, record mode's unreachable upstream,
an injected fault and a bad fault header. Each is a non-retryable status where a retry
cannot help (the openai SDKs retry 408, 409, 429 and 5xx), in the API family's shape
where a client parses it, and names what to do.
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http

from . import matching
from .faults import FAULT_HEADER_NAME, RETRY_AFTER_STATUSES, api_family, error_body

FILE_HEADER = "x-cassette-file"  # a replayed answer's cassette
MISS_HEADER = "x-cassette-miss"  # our own error answer: the request key, or why none
MISS_STATUS = 404  # the openai SDKs retry 408, 409, 429 and 5xx; a miss must not be retried


def _json(
    status: int, error: dict[str, Any], headers: dict[str, str], head: bool = False
) -> http.Response:
    body = b"" if head else json.dumps({"error": error})  # HEAD: no body
    return http.Response.make(status, body, {"content-type": "application/json", **headers})


def miss(store: Any, plan: Any, broken: str | None = None) -> tuple[http.Response, str]:
    """The 404 for a request no cassette answers, and its message: the nearest recording
    and its first difference, the rules tried, and which test ids recorded the path."""
    message = f"cassette-proxy: no recording for {plan.method} {plan.path} (key {plan.key})"
    error: dict[str, Any] = {
        "type": "cassette_miss",
        "code": "cassette_miss",
        "param": None,
        "method": plan.method,
        "path": plan.path,
        "request_key": plan.key,
    }
    if broken:
        message += f"; the matching cassette is unreadable: {broken}"
    request = plan.request or matching.Request(plan.method, plan.path, plan.body)
    tried = matching.rules_tried(request)
    error["rules_tried"] = tried
    message += f"; tried {', '.join(tried)}"
    nearest = matching.nearest(store, request, plan.test_id)
    if nearest is not None:
        entry, diff = nearest
        where = store.relative(entry.path)
        error["nearest"] = {"file": where, "first_difference": diff}
        message += f"; nearest recording {where} differs first at {diff}"
    else:
        message += "; nothing is recorded for this path"
    # Which tests recorded this path: a wrong or missing X-Cassette-Test-Id shows here.
    # A real suite records hundreds of tests per path: a count and a few, not all.
    own, shown, others = matching.test_id_summary(store, request, plan.test_id)
    error["test_ids"] = shown
    error["other_test_ids"] = others
    if plan.test_id:
        error["test_id"] = plan.test_id
        error["test_id_recordings"] = own
        has = f"has {own} recording(s)" if own else "has no recording"
        message += f"; this request's test id: {plan.test_id} ({has} for this path)"
    if others:
        more = f" (+{others - len(shown)} more)" if others > len(shown) else ""
        label = "other test ids" if plan.test_id else "test ids"
        message += f"; {others} {label} recorded for this path: {', '.join(shown)}{more}"
    error["message"] = message
    response = _json(MISS_STATUS, error, {MISS_HEADER: plan.key}, head=plan.method == "HEAD")
    return response, message


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
    return http.Response.make(
        502,
        f"cassette-proxy: upstream {host}:{port} is unreachable and cassette_mode is record",
        {"content-type": "text/plain", MISS_HEADER: "unreachable"},
    )


def stand_in_unknown() -> http.Response:
    """The stand-in got a request it was not expecting (a stale or forged token)."""
    return http.Response.make(
        502, b"cassette-proxy: upstream offline", {"content-type": "text/plain"}
    )


def fault(path: str, status: int) -> http.Response:
    """The injected error answer for a request path (``X-Cassette-Fault: status=``)."""
    message = f"cassette-proxy: fault injected by {FAULT_HEADER_NAME} (status={status})"
    headers = {"content-type": "application/json", "x-cassette-fault-injected": f"status={status}"}
    if status in RETRY_AFTER_STATUSES:
        headers["retry-after"] = "1"
    body = json.dumps(error_body(api_family(path), status, message))
    return http.Response.make(status, body, headers)


def bad_fault(path: str, value: str, problem: str) -> http.Response:
    """The 400 for a header value that names no fault (never retried by the SDKs)."""
    message = f"cassette-proxy: bad X-Cassette-Fault header {value[:200]!r}: {problem}"
    body = error_body(api_family(path), 400, message)
    if isinstance(body.get("error"), dict) and "code" in body["error"]:
        body["error"].update(type="cassette_bad_fault", code="cassette_bad_fault",
                             param="X-Cassette-Fault")  # fmt: skip
    return http.Response.make(400, json.dumps(body), {"content-type": "application/json"})
