"""Secrets never reach a cassette: credential headers, query parameters and keys in URLs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Never written, even when the user asks to record headers by name.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "anthropic-api-key",
        "cookie",
        "set-cookie",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
    }
)
SECRET_QUERY_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "token", "access_token"})
REDACTED = "REDACTED"

# Credential fields of a JSON request body (some gateways take the key in the body).
# Their string values are replaced before the request is keyed, so a cassette never holds
# them and a replay with another key still matches. Matched by exact name, any depth.
SECRET_BODY_FIELDS = frozenset(
    {
        "api_key", "api-key", "apikey", "x-api-key", "access_token", "refresh_token",
        "auth_token", "token", "authorization", "client_secret", "password",
    }
)  # fmt: skip

# Bearer tokens (also URL-encoded) and well-known key formats: sk-/rk-/pk- (OpenAI,
# Anthropic, ...), hf_ (Hugging Face), gsk_ (Groq), AIza (Google).
_SECRET_IN_TEXT = re.compile(
    r"(?i)(bearer(?:\s+|%20|\+))[A-Za-z0-9._~+/=-]+"
    r"|\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}"
    r"|\b(?:hf_[A-Za-z0-9]{30,}|gsk_[A-Za-z0-9]{20,}|AIza[A-Za-z0-9_-]{30,})"
)


def wire_text(text: str) -> str:
    """Text as a URL parser reading its bytes with ``errors="replace"`` sees it.

    mitmproxy decodes a request line's non-UTF-8 bytes as lone surrogates
    (``surrogateescape``); a cassette's URL cannot hold them (JSON and ``urlencode`` want
    UTF-8), so both sides of the key use U+FFFD where the wire had a bad byte.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "replace")


def is_secret_query_param(name: str) -> bool:
    return name.lower() in SECRET_QUERY_PARAMS


def keyed_query(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Query parameters that take part in the request key: all but credentials.

    Values are redacted as ``redact_url`` writes them, so the key of a live request is
    the key of its cassette.
    """
    return [
        (wire_text(k), redact_text(wire_text(v))) for k, v in pairs if not is_secret_query_param(k)
    ]


def redact_text(text: str) -> str:
    return _SECRET_IN_TEXT.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def redact_path(path: str) -> str:
    """A URL path with keys redacted segment by segment: a token never eats a ``/``."""
    return "/".join(redact_text(segment) for segment in path.split("/"))


def redact_body(body: Any) -> Any:
    """The JSON body with the string values of credential fields replaced by REDACTED.

    Returns ``body`` itself when there is nothing to replace (the common case).
    Free text (a prompt that mentions a key) is data and is left alone.
    """
    if isinstance(body, dict):
        out: dict[str, Any] | None = None
        for k, v in body.items():
            new = (
                REDACTED
                if isinstance(v, str) and isinstance(k, str) and k.lower() in SECRET_BODY_FIELDS
                else redact_body(v)
            )
            if new is not v:
                out = dict(body) if out is None else out
                out[k] = new
        return body if out is None else out
    if isinstance(body, list):
        items = [redact_body(v) for v in body]
        return body if all(a is b for a, b in zip(items, body, strict=True)) else items
    return body


def redact_strings(value: Any) -> Any:
    """Every string in a JSON value with keys and bearer tokens replaced (``redact_text``).

    Used on recorded error answers: a 401 is where an upstream echoes the key it got.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_strings(v) for v in value]
    return value


def redact_url(url: str) -> str:
    """The URL with credential query values and embedded keys replaced by REDACTED."""
    parts = urlsplit(wire_text(url))
    query = urlencode(
        [
            (k, REDACTED if is_secret_query_param(k) else redact_text(v))
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    netloc = parts.netloc.rsplit("@", 1)[-1]  # user:password@host
    return urlunsplit((parts.scheme, netloc, redact_path(parts.path), query, parts.fragment))


def recordable_headers(headers: Mapping[str, str], wanted: Iterable[str]) -> dict[str, str]:
    """The headers the user opted into recording, minus credentials, names lower-cased."""
    names = {n.lower() for n in wanted} - SECRET_HEADERS
    return {k.lower(): redact_text(v) for k, v in headers.items() if k.lower() in names}
