"""No churn: a re-recorded answer that says what the file says leaves the file alone.

Upstreams put fresh ids, timestamps, fingerprints and request ids in every answer, and a
recording carries its timing and rate-limit headers: rewriting the file for those made
``git status`` show every cassette after each live run of a deterministic suite. Before
the proxy replaces a cassette, ``kept`` compares the two without their volatile parts;
when nothing else differs the old file stays (bytes and mtime). When something does,
the file is rewritten and the log names the fields that changed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("cassette_proxy")

# Keys whose values change from one run to the next while the answer stays the same,
# wherever they are in a body (a chunk's id, a tool call's id, a message's id in an
# Anthropic event). Ollama's times and durations too.
VOLATILE_KEYS = frozenset(
    {
        "id",
        "created",
        "created_at",
        "system_fingerprint",
        "request_id",
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    }
)
# Parts of the response half that describe the run, not the answer.
VOLATILE_RESPONSE = frozenset({"timing", "headers"})
MAX_NAMED = 8  # changed fields named in one log line


def _stable(value: Any) -> Any:
    """``value`` without volatile keys; a stream's ``data: {...}`` lines read as JSON."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and "{" in value:
        try:
            return {"data:": _stable(json.loads(value[5:]))}
        except ValueError:
            return value
    return value


def comparable(doc: Any) -> Any:
    """A cassette document as the no-churn rule compares it."""
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    response = out.get("response")
    if isinstance(response, dict):
        out["response"] = {k: v for k, v in response.items() if k not in VOLATILE_RESPONSE}
    return _stable(out)


def changed_fields(old: Any, new: Any, where: str = "") -> list[str]:
    """Where two comparable documents differ: dotted paths, at most MAX_NAMED + 1."""
    if type(old) is not type(new):
        return [where or "."]
    if isinstance(old, dict):
        found: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            if key not in old or key not in new:
                found.append(f"{where}.{key}" if where else str(key))
            else:
                found += changed_fields(old[key], new[key], f"{where}.{key}" if where else key)
            if len(found) > MAX_NAMED:
                break
        return found
    if isinstance(old, list):
        if len(old) != len(new):
            return [f"{where} (length {len(old)} -> {len(new)})"]
        found = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found += changed_fields(a, b, f"{where}[{i}]")
            if len(found) > MAX_NAMED:
                break
        return found
    return [] if old == new else [where or "."]


def kept(path: Path, data: bytes, doc: Any) -> os.stat_result | None:
    """The stat of ``path`` when it already holds this answer (``data``: the new file's
    bytes, ``doc``: its document), volatile fields aside: then it is not rewritten.
    None: write it (no file, an unreadable one, or a changed answer, which is logged)."""
    try:
        old_bytes = path.read_bytes()
        stat = os.stat(path)
    except OSError:
        return None
    if old_bytes == data:
        return stat
    try:
        old = json.loads(old_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    before, after = comparable(old), comparable(doc)
    if before == after:
        log.info("kept %s: the answer is the recorded one (volatile fields aside)", path.name)
        return stat
    fields = changed_fields(before, after)
    named = ", ".join(fields[:MAX_NAMED]) + (", ..." if len(fields) > MAX_NAMED else "")
    log.info("re-recorded %s: changed %s", path.name, named or "the file")
    return None
