"""The canonical request key: which recorded interaction answers a request.

A key is built from the method, the wire path, the canonical JSON body and the
query parameters. Host and port are left out so that a cassette recorded against
one address replays against another. Each rule is a plain function, testable alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .equivalence import normal_form

# llama-stack rounds floats to 5 places before hashing; so do we, so that float
# noise below 1e-5 (and 0 vs 0.0 from clients in other languages) still matches.
FLOAT_PLACES = 5


def canonical_json(value: Any) -> Any:
    """Keys sorted (by the dump), floats rounded; nulls kept (``{"a": null}`` is not
    ``{}``: ignoring them is a loose rule, ``matching.null_insensitive``).

    Integral floats become ints: JavaScript sends ``0`` where Python sends ``0.0``.
    """
    if isinstance(value, dict):
        return {k: canonical_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical_json(v) for v in value]
    if isinstance(value, float):
        rounded = round(value, FLOAT_PLACES)
        if rounded.is_integer():
            return int(rounded)
        return rounded
    return value


def dumps_canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def request_key(
    method: str, path: str, body: Any, query: list[tuple[str, str]] | None = None
) -> str:
    """The exact key of a request as the proxy matches it (``matching.exact_key``).

    The body is taken in its normal form (``equivalence.normal_form``): client defaults
    such as Ollama's ``stream: false`` / ``tools: []`` do not change the key. A JSON
    ``null`` body is keyed as no body.
    """
    body = {} if body is None else body
    return hash_form(method, path, canonical_json(normal_form(path, body)), query)


def hash_form(
    method: str, path: str, canonical_body: Any, query: list[tuple[str, str]] | None
) -> str:
    """sha256 of method, path, a body already canonical (``canonical_json``) and query."""
    material: dict[str, Any] = {
        "method": method.upper(),
        "path": path,
        "body": canonical_body,
    }
    if query:
        material["query"] = sorted(query)
    return hashlib.sha256(dumps_canonical(material).encode()).hexdigest()


def round_floats(value: Any) -> Any:
    """llama-stack's float rounding (5 places), keeping everything else as it is."""
    if isinstance(value, dict):
        return {k: round_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v) for v in value]
    if isinstance(value, float):
        return round(value, FLOAT_PLACES)
    return value


def recording_hash(method: str, endpoint: str, body: Any, test_id: str | None = None) -> str:
    """llama-stack's documented request hash, which names cassette files.

    sha256 of ``{"method", "endpoint", "body"}`` dumped with ``sort_keys=True``, where
    ``endpoint`` is the URL's path; newer recorders round floats and add the test id.
    """
    normalized: dict[str, Any] = {
        "method": method.upper(),
        "endpoint": endpoint,
        "body": round_floats(body),
    }
    if test_id is not None:
        normalized["test_id"] = test_id
    return hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()


def first_difference(a: Any, b: Any, where: str = "body") -> str | None:
    """A readable path to the first place where two canonical JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                return f"{where}.{k} (only in the recording)"
            if k not in b:
                return f"{where}.{k} (only in the request)"
            diff = first_difference(a[k], b[k], f"{where}.{k}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            diff = first_difference(x, y, f"{where}[{i}]")
            if diff:
                return diff
        if len(a) != len(b):
            return f"{where} (length {len(a)} in the request, {len(b)} in the recording)"
        return None
    if a != b:
        return where
    return None
