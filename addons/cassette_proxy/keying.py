"""Keying: a mitmproxy request -> its key and the request as recorded, in a Plan.

A service of the Intake room. The same request bytes always give the same key, so the
work (parse, redact, normal form, hash) is memoised: a test suite re-sends the same
requests, and the key's work was the biggest part of the addon's time per hit
(docs/benchmarks.md). The memo is keyed on everything that changes the key: method,
path and query, the body's content type and encoding, the body's bytes, and the
request's credential headers (a credential value found in the body is scrubbed out of
it, so the same body keys differently with and without that header).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mitmproxy import http

from . import matching
from .bodies import NotKeyable, keyed_parts, request_content
from .cassette import MAX_CASSETTE_BYTES
from .families import classify
from .plan import Plan
from .redact import is_secret_header
from .store import live_key

KEY_MEMO_SIZE = 512  # request bytes -> key, for requests sent again (at most this many)
KEY_MEMO_MAX_BODY = 64 * 1024  # ... with bodies up to this size
_BODY_TYPE_NAMES = frozenset({b"content-type", b"content-encoding"})


class Keyer:
    def __init__(self) -> None:
        self._memo: OrderedDict[tuple[Any, ...], tuple[str, str, Any, Any]] = OrderedDict()
        self._upstreams: dict[tuple[Any, ...], str] = {}
        self._secret_names: dict[bytes, bool] = {}

    def key(self, request: http.Request, plan: Plan) -> None:
        """Fill in the plan's key and request as recorded. Raises NotKeyable (with the
        reason) for a request that cannot be keyed: it is not recorded, nor replayed."""
        path, has_query, _ = request.path.partition("?")
        why = not_keyable(request)
        if why is not None:
            raise NotKeyable(why)
        # One pass over the raw fields: what the memo's key and the upstream need.
        typed, credentials, host_field = [], [], None
        secret_names = self._secret_names
        for name, value in request.headers.fields:
            lowered = name.lower()
            if lowered in _BODY_TYPE_NAMES:
                typed.append((lowered, value))
            elif lowered == b"host":
                host_field = value
            else:
                secret = secret_names.get(lowered)
                if secret is None:
                    secret = self._is_secret(lowered)
                if secret:
                    credentials.append((lowered, value))
        memo_key = (request.method, request.path, tuple(typed), tuple(credentials),
                    request.raw_content)  # fmt: skip
        memo = self._memo.get(memo_key)
        host = self._upstream_of(request, host_field)
        if memo is not None:
            self._memo.move_to_end(memo_key)
            key, path, body, query = memo
            _fill(plan, request.method, key, path, body, query, host)
            return
        # JSON, form-encoded or multipart; the request's own credential values out.
        parts = keyed_parts(
            request.headers.items(multi=True),
            path,
            request.query.items(multi=True) if has_query else [],
            request.headers.get("content-type", ""),
            request_content(request),  # bounded: NotKeyable past it (a gzip bomb)
        )
        try:
            # Credentials never reach a cassette, nor the key (store.live_key).
            key, path, body, query = live_key(request.method, parts.path, parts.body, parts.query)
        except RecursionError:
            raise NotKeyable("JSON nested too deeply") from None
        _fill(plan, request.method, key, path, body, query, host)
        plan.secrets, plan.marker = parts.secrets, parts.marker
        if len(request.raw_content or b"") <= KEY_MEMO_MAX_BODY:
            self._memo[memo_key] = (key, path, body, query)
            if len(self._memo) > KEY_MEMO_SIZE:
                self._memo.popitem(last=False)

    def _is_secret(self, name: bytes) -> bool:
        """Whether a header (lower-cased) holds a credential; remembered per name."""
        if len(self._secret_names) > 4096:
            self._secret_names.clear()
        secret = self._secret_names[name] = is_secret_header(name.decode("latin-1"))
        return secret

    def _upstream_of(self, request: http.Request, host_field: bytes | None) -> str | None:
        """The upstream as the recorded URL names it (pretty_url's host), for host
        affinity; remembered per authority, as mitmproxy parses and checks it each time."""
        seen = (request.data.authority, host_field, request.host, request.port)
        upstream = self._upstreams.get(seen)
        if upstream is None:
            upstream = matching.upstream(request.pretty_host, request.port)
            if len(self._upstreams) >= 1024:
                self._upstreams.clear()
            self._upstreams[seen] = upstream
        return upstream


def _fill(
    plan: Plan, method: str, key: str, path: str, body: Any, query: Any, host: str | None
) -> None:
    method = method.upper()
    plan.family = classify(method, path)
    plan.key, plan.method, plan.path, plan.body = key, method, path, body
    plan.request = matching.Request(method, path, body, tuple(query))
    plan.upstream = host


def not_keyable(request: http.Request) -> str | None:
    """Why a request body cannot be keyed and recorded (it then passes through)."""
    if request.raw_content is None:
        return "the request body is streamed (stream_large_bodies)"
    if len(request.raw_content) > MAX_CASSETTE_BYTES:
        return (
            f"the request body is {len(request.raw_content) / 2**20:.1f} MiB, over the "
            f"{MAX_CASSETTE_BYTES // 2**20} MiB a cassette may hold"
        )
    return None
