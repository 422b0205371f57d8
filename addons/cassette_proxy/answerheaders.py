"""The upstream's response headers that clients read, recorded and replayed.

The openai SDK's ``response.request_id`` is ``x-request-id``; Anthropic's is
``request-id``; retry logic reads ``retry-after``; code that logs or budgets reads the
rate-limit headers. They are kept in the cassette's optional ``response.headers``
(names lower-case; llama-stack's reader ignores the field) and sent again on replay.

Only the names listed here (``RECORDED`` and the ``RECORDED_PREFIXES``) plus those the
option ``cassette_answer_headers`` adds are kept; a credential header or a cookie never,
whatever the option says, and values go through ``redact_text``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .redact import is_secret_header, redact_text

FIELD = "headers"
RECORDED = frozenset(
    {
        "x-request-id",  # OpenAI, vLLM: the openai SDK's request_id
        "request-id",  # Anthropic: the anthropic SDK's _request_id
        "openai-processing-ms",
        "openai-version",
        "openai-model",
        "retry-after",
        "retry-after-ms",
    }
)
RECORDED_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
# Never recorded nor replayed, whatever the option says: cookies, and the headers that
# describe this very message (the replay writes its own).
NEVER = frozenset(
    {
        "set-cookie",
        "set-cookie2",
        "cookie",
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
        "proxy-authenticate",
        "www-authenticate",
    }
)


def is_recordable(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether an answer header of this name is recorded (``extra``: the option's names)."""
    name = name.lower()
    if name in NEVER or is_secret_header(name):
        return False
    if name in RECORDED or name.startswith(RECORDED_PREFIXES):
        return True
    return name in {n.lower() for n in extra}


def recorded_headers(headers: Mapping[str, str], extra: Iterable[str] = ()) -> dict[str, str]:
    """The answer's headers worth recording, names lower-case, in the order they came
    (a repeated header: its values joined with ", ", as HTTP allows)."""
    wanted = {n.lower() for n in extra}
    out: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if not is_recordable(low, wanted):
            continue
        value = redact_text(value)
        out[low] = f"{out[low]}, {value}" if low in out else value
    return out


def with_headers(wire: Any, response: Mapping[str, Any]) -> Any:
    """The wire (``families.Wire``) with the response half's recorded headers added; the
    family's own headers win. A recorded name that may not be sent is left out."""
    recorded = response.get(FIELD)
    if not isinstance(recorded, dict) or not recorded:
        return wire
    headers = {
        str(k).lower(): str(v)
        for k, v in recorded.items()
        if isinstance(v, (str, int)) and is_recordable(str(k), [str(k)])
    }
    if not headers:
        return wire
    headers.update(wire.headers)
    return dataclasses.replace(wire, headers=headers)
