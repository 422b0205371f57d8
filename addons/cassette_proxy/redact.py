"""Secrets never reach a cassette: credential headers, query parameters and keys in URLs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Never written, even when the user asks to record headers by name.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "set-cookie",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
    }
)
SECRET_QUERY_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "token", "access_token"})
REDACTED = "REDACTED"

# Bearer tokens and sk-style keys that end up inside a URL path.
_SECRET_IN_TEXT = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+|\b(sk|rk|pk)-[A-Za-z0-9_-]{8,}")


def is_secret_query_param(name: str) -> bool:
    return name.lower() in SECRET_QUERY_PARAMS


def keyed_query(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Query parameters that take part in the request key: all but credentials."""
    return [(k, v) for k, v in pairs if not is_secret_query_param(k)]


def redact_text(text: str) -> str:
    return _SECRET_IN_TEXT.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def redact_url(url: str) -> str:
    """The URL with credential query values and embedded keys replaced by REDACTED."""
    parts = urlsplit(url)
    query = urlencode(
        [
            (k, REDACTED if is_secret_query_param(k) else redact_text(v))
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    netloc = parts.netloc.rsplit("@", 1)[-1]  # user:password@host
    return urlunsplit((parts.scheme, netloc, redact_text(parts.path), query, parts.fragment))


def recordable_headers(headers: Mapping[str, str], wanted: Iterable[str]) -> dict[str, str]:
    """The headers the user opted into recording, minus credentials, names lower-cased."""
    names = {n.lower() for n in wanted} - SECRET_HEADERS
    return {k.lower(): redact_text(v) for k, v in headers.items() if k.lower() in names}
