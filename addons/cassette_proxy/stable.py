"""Stable re-recordings: llama-stack's response normalisation (option ``cassette_normalize``).

Upstreams put fresh ids, timestamps and timings in every answer, so recording the same
answer twice changes the file. With the option on, the top level of each typed object
is normalised as llama-stack's recorder does since Oct 2025, and re-recording an
unchanged answer leaves an empty git diff:

* ``id`` -> ``"rec-" + hash[:12]`` and ``created`` -> ``0`` (not for ``object == "model"``,
  where the id is the model's name);
* ``created_at`` -> ``"1970-01-01T00:00:00.000000Z"`` (Ollama);
* ``total_duration``, ``load_duration``, ``prompt_eval_duration``, ``eval_duration`` -> ``0``
  when present and not null (Ollama).

Responses API answers (``openai.types.responses``) are normalised throughout:
``families.responses.normalize_body``. Raw answers (untyped) and recorded errors are
left as they are, as llama-stack does.
"""

from __future__ import annotations

from typing import Any

from .families import responses

RESPONSES = responses.PACKAGE
EPOCH = "1970-01-01T00:00:00.000000Z"
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def normalize_data(data: dict[str, Any], request_hash: str) -> dict[str, Any]:
    """One typed object's ``__data__``, normalised at its top level (a new dict)."""
    data = dict(data)
    if data.get("object") != "model":
        if "id" in data:
            data["id"] = f"rec-{request_hash[:12]}"
        if "created" in data:
            data["created"] = 0
    if "created_at" in data:
        data["created_at"] = EPOCH
    for name in DURATIONS:
        if data.get(name) is not None:
            data[name] = 0
    return data


def normalize_response(response: dict[str, Any], request_hash: str) -> dict[str, Any]:
    """The response half with every typed object normalised; anything else unchanged."""
    body = response.get("body")
    first = body[0] if isinstance(body, list) and body else body
    if isinstance(first, dict) and str(first.get("__type__", "")).startswith(RESPONSES):
        # Responses: ids nested in events and items, and a float created_at (not a date).
        return {**response, "body": responses.normalize_body(body, request_hash)}

    def one(obj: Any) -> Any:
        if isinstance(obj, dict) and "__type__" in obj and isinstance(obj.get("__data__"), dict):
            return {
                "__type__": obj["__type__"],
                "__data__": normalize_data(obj["__data__"], request_hash),
            }
        return obj

    if isinstance(body, list):
        return {**response, "body": [one(x) for x in body]}
    return {**response, "body": one(body)}
