"""Faults on demand: the ``X-Cassette-Fault`` request header.

A test asks for the bad day it wants to survive, one request at a time:

    X-Cassette-Fault: status=429            an error answer in the API family's own shape
    X-Cassette-Fault: delay-ms=1500         wait this long before answering
    X-Cassette-Fault: cut-after=3           a replayed stream cut after 3 chunks (a whole
                                            answer: cut in the middle of its body)
    X-Cassette-Fault: status=503,times=1    only the first such request fails; the next
                                            ones (a client's retries) get the real answer

The header never reaches an upstream. A value the proxy cannot read is answered with a
400 that names the header, so a typo never passes as "no fault".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAULT_HEADER = "x-cassette-fault"
FAULT_HEADER_NAME = "X-Cassette-Fault"  # as messages and docs spell it
MAX_DELAY_MS = 10 * 60 * 1000  # mitmproxy's own tcp_timeout is 600 s
# Statuses a client's retry logic waits on: they carry Retry-After, as real servers send it.
RETRY_AFTER_STATUSES = (429, 503)


class FaultError(ValueError):
    """A header value that names no fault; the message says what is wrong."""


@dataclass(frozen=True)
class Fault:
    status: int | None = None
    delay_ms: int = 0
    cut_after: int | None = None
    times: int | None = None  # only the first N such requests of this proxy run; None: all
    spec: str = ""  # the header as sent, to count ``times`` per fault

    @property
    def needs_replay(self) -> bool:
        """Whether the fault changes a replayed answer (status and delay need none)."""
        return self.cut_after is not None


def _integer(name: str, value: str, low: int, high: int) -> int:
    if not value.strip().isdigit():
        raise FaultError(f"{name} must be a whole number, not {value.strip()!r}")
    number = int(value)
    if not low <= number <= high:
        raise FaultError(f"{name} must be from {low} to {high}, not {number}")
    return number


def parse_fault(value: str) -> Fault | None:
    """The fault an ``X-Cassette-Fault`` value asks for; None for an empty value.

    Raises FaultError (a ValueError) with a readable message for anything else.
    """
    spec = value.strip()
    if not spec:
        return None
    seen: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, raw = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise FaultError(f"{item.strip()!r} is not name=value")
        if name in seen:
            raise FaultError(f"{name} is given twice")
        if name == "status":
            seen[name] = _integer(name, raw, 400, 599)
        elif name == "delay-ms":
            seen[name] = _integer(name, raw, 0, MAX_DELAY_MS)
        elif name == "cut-after":
            seen[name] = _integer(name, raw, 0, 10**9)
        elif name == "times":
            seen[name] = _integer(name, raw, 1, 10**9)
        else:
            raise FaultError(
                f"unknown fault {name!r}; use status=NNN, delay-ms=N, cut-after=N, times=N"
            )
    if "status" in seen and "cut-after" in seen:
        raise FaultError("status and cut-after cannot be combined: an error answer has no chunks")
    if set(seen) == {"times"}:
        raise FaultError("times=N needs a fault to count (status, delay-ms or cut-after)")
    return Fault(
        status=seen.get("status"),
        delay_ms=seen.get("delay-ms", 0),
        cut_after=seen.get("cut-after"),
        times=seen.get("times"),
        spec=spec,
    )


class FaultCounter:
    """How many times each fault was applied in this proxy run, for ``times=N``.

    Counted per test id, request and header value: a test's retries of one request share
    a count; another request or another test starts its own.
    """

    def __init__(self) -> None:
        self._applied: dict[tuple[Any, ...], int] = {}

    def take(self, fault: Fault, request_id: tuple[Any, ...]) -> bool:
        """Whether to apply the fault to this request now (and count it if so)."""
        if fault.times is None:
            return True
        key = (fault.spec, *request_id)
        done = self._applied.get(key, 0)
        if done >= fault.times:
            return False
        self._applied[key] = done + 1
        return True


# What each family calls an error of a status (OpenAI's ``type``/``code``, Anthropic's
# ``error.type``), as their servers send them.
_OPENAI_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", None),
    409: ("conflict", None),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def api_family(path: str) -> str:
    """Whose error shape a path gets: ``ollama`` (native /api/...), ``anthropic``
    (/v1/messages) or ``openai`` (everything else: the OpenAI-compatible servers)."""
    path = path.split("?", 1)[0].rstrip("/")
    if "/api/" in path or path.startswith("api/"):
        return "ollama"
    if path.endswith(("/messages", "/messages/count_tokens", "/messages/batches")):
        return "anthropic"
    return "openai"


def error_body(family: str, status: int, message: str) -> dict[str, Any]:
    """An error answer's JSON as the family's servers shape it."""
    if family == "ollama":
        return {"error": message}
    if family == "anthropic":
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPES.get(status, fallback)
        return {"type": "error", "error": {"type": kind, "message": message}}
    fallback = "server_error" if status >= 500 else "invalid_request_error"
    kind, code = _OPENAI_TYPES.get(status, (fallback, None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def cut_beyond_stream(cut: int, chunks: int) -> str:
    """Why ``cut-after=N`` cuts nothing: the replayed stream has N chunks or fewer."""
    return (
        f"cut-after={cut} cuts nothing: the recorded stream has {chunks} chunk(s) "
        f"(the end marker included); use cut-after=0 to {max(chunks - 1, 0)}"
    )
