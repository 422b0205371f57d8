"""Every era of llama-stack's recorder, read as it is: the wire request a cassette answers.

llama-stack patched SDK methods, so what its older and newer recorders stored is an SDK
call: the keyword arguments, ``base_url + endpoint`` as the URL (which doubles the version
segment), and always POST. The proxy sees the wire. This module turns any recorded
request (SDK call, raw-HTTP call, or the proxy's own wire recording) into the wire
request a real client sends for it, so that one key (``keys.request_key``) matches both
sides with a single dict lookup. It also says which files no client can ever reach
(tool calls, SDK-only recordings, mislabelled pre-Aug-2025 files), and merges model
lists the way llama-stack does. Files are never rewritten: all of this happens on read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import tools
from .cassette import Cassette

# Endpoints that are GET on the wire; llama-stack recorded them as POST with ``{}``.
GET_SUFFIXES = ("/models", "/api/tags", "/api/ps", "/api/version")
# Ollama calls where the client always sends ``stream`` (default false).
OLLAMA_STREAMABLE = ("/api/generate", "/api/chat", "/api/pull", "/api/push")
# Arguments of the openai SDK that are not part of the JSON body.
SDK_ONLY_ARGS = ("extra_headers", "timeout")
# The openai SDK types that fit each endpoint; anything else under it is mislabelled.
OPENAI_TYPES_BY_KIND = {
    "chat": ("ChatCompletion", "ChatCompletionChunk"),
    "completions": ("Completion",),
    "embeddings": ("CreateEmbeddingResponse",),
    "models": ("Model",),
}
MODEL = "openai.types.model.Model"
# llama-stack hides Databricks workspaces as ``__databricks__/<path>``.
DATABRICKS = "__databricks__"


@dataclass(frozen=True)
class WireRequest:
    """What a real client puts on the wire for a recorded call."""

    method: str
    path: str
    body: Any
    query: list[tuple[str, str]]


def _url_parts(url: str | None) -> tuple[str, str, str]:
    """(scheme, path, query) of a recorded URL; Databricks' masked URLs are paths."""
    url = url or ""
    if url.startswith(DATABRICKS):
        parts = urlsplit("http://databricks" + url[len(DATABRICKS) :])
        return "https", parts.path, parts.query
    if url.startswith("/"):  # a bare path (hand-written cassettes)
        parts = urlsplit(url)
        return "http", parts.path, parts.query
    if "://" not in url:
        return "", "", ""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.path, parts.query


def _typed_names(cassette: Cassette) -> list[str]:
    body = cassette.response.body
    items = body if isinstance(body, list) else [body]
    return [str(x["__type__"]) for x in items if isinstance(x, dict) and "__type__" in x]


def is_sdk_call(cassette: Cassette) -> bool:
    """A recording of an SDK method (llama-stack's inference recorder), not of the wire.

    The proxy writes ``endpoint`` equal to the URL's path; llama-stack wrote the SDK's
    endpoint label after a base URL, so the URL path is longer than the label.
    """
    request = cassette.request
    endpoint = request.endpoint or ""
    _, path, _ = _url_parts(request.url)
    return bool(endpoint) and path != endpoint and path.endswith(endpoint)


def wire_path(cassette: Cassette) -> str:
    """The path a real client requests for this recording."""
    request = cassette.request
    endpoint = request.endpoint or ""
    _, path, _ = _url_parts(request.url)
    if not path:
        path = endpoint or "/"
    if is_sdk_call(cassette) and endpoint.startswith("/v1/"):
        # url = base_url + "/v1/<resource>"; the SDK requests base_url + "/<resource>":
        # /v1/v1/chat/completions, /openai/v1/v1/..., /v1beta/openai/v1/models.
        path = path[: -len(endpoint)] + endpoint[len("/v1") :]
    if path.endswith("/api/embeddings") and _is_embed_call(cassette):
        # llama-stack labelled ollama's embed() as /api/embeddings; the client POSTs /api/embed.
        path = path[: -len("/api/embeddings")] + "/api/embed"
    return path


def _is_embed_call(cassette: Cassette) -> bool:
    names = _typed_names(cassette)
    if names:
        return names[0].endswith(".EmbedResponse")
    body = cassette.request.body
    return isinstance(body, dict) and "input" in body and "prompt" not in body


def recorded_body(cassette: Cassette) -> Any:
    """The request body as stored: ``body``, or ``payload`` in raw-HTTP recordings."""
    request = cassette.request
    body = request.body
    if body is None:
        body = (request.model_extra or {}).get("payload")
    return {} if body is None else body


def recorded_wire(cassette: Cassette) -> WireRequest:
    """The wire request for a recording of any era. Total: never raises for a cassette."""
    tool = tools.tavily_request(cassette)
    if tool is not None:  # OGX's tool-level web_search: Tavily's HTTP search (tools.py)
        return WireRequest(tool[0], tool[1], tool[2], [])
    request = cassette.request
    _, _, query_text = _url_parts(request.url)
    query = parse_qsl(query_text, keep_blank_values=True)
    path = wire_path(cassette)
    body = recorded_body(cassette)
    method = (request.method or "POST").upper()
    if is_sdk_call(cassette) and isinstance(body, dict):
        body = dict(body)
        for arg in SDK_ONLY_ARGS:
            body.pop(arg, None)
        extra_query = body.pop("extra_query", None)
        if isinstance(extra_query, dict):
            query += [(str(k), _query_value(v)) for k, v in extra_query.items() if v is not None]
        extra_body = body.pop("extra_body", None)
        if isinstance(extra_body, dict):
            body = {**body, **extra_body}  # the openai SDK merges it at the top level
    if path.endswith(OLLAMA_STREAMABLE) and isinstance(body, dict) and "stream" not in body:
        # llama-stack's Ollama URLs carry no base path, so an SDK call cannot be told from a
        # wire recording by its URL; but whether the answer streamed says what was asked:
        # the ollama client's default is false, the server's (for curl) is true.
        # A recorded error says nothing either way; it comes from a wire recording (curl,
        # the server's default), as llama-stack recorded no Ollama exceptions.
        response = cassette.response
        failed = bool(getattr(response, "is_exception", False)) or int(
            getattr(response, "status", None) or 200
        ) >= 400
        body = {**body, "stream": failed or bool(response.is_streaming)}
    if method == "POST" and path.endswith(GET_SUFFIXES) and body in ({}, None):
        if written_by_llama_stack(cassette):
            method = "GET"  # GET /v1/models, /api/tags, /api/ps recorded as POST {}
            body = {}
    return WireRequest(method, path, body, query)


def written_by_llama_stack(cassette: Cassette) -> bool:
    """Whether a recording is llama-stack's, whose recorder wrote every call as POST.

    Only then does ``POST {}`` to a GET endpoint mean the GET. The proxy writes the wire's
    method, so its own recording of a stray ``POST /v1/models {}`` (answered 405) keeps
    it, and never answers ``GET /v1/models``. The files are told apart by what only
    llama-stack's recorder writes: an SDK call's URL (the base URL plus the endpoint
    label, longer than the label); a typed answer (the proxy's families type these
    endpoints' answers only for a GET, so its POST answers are raw or errors); or a
    recorded exception with llama-stack's ``category`` and ``provider`` fields.
    """
    if is_sdk_call(cassette):
        return True
    if _typed_names(cassette):
        return True
    extra = cassette.response.model_extra or {}
    data = extra.get("exception_data")
    return isinstance(data, dict) and ("category" in data or "provider" in data)


def recorded_by_llama_stack(cassette: Cassette) -> bool:
    """Whether llama-stack's recorder wrote this file (the loose rules made for what that
    recorder dropped apply to its files only, ``matching.LLAMA_STACK_RULES``).

    What only that recorder writes: an SDK call's URL (``is_sdk_call``); the request's
    ``provider_metadata``; a raw-HTTP call's ``payload``; a recorded exception with
    ``category`` or ``provider``. The proxy writes the wire (URL path equal to the
    endpoint, ``body``) and none of these.
    """
    if is_sdk_call(cassette):
        return True
    extra = cassette.request.model_extra or {}
    if "provider_metadata" in extra or (cassette.request.body is None and "payload" in extra):
        return True
    data = (cassette.response.model_extra or {}).get("exception_data")
    return isinstance(data, dict) and ("category" in data or "provider" in data)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def unservable_reason(cassette: Cassette) -> str | None:
    """Why no client can reach this recording, or None if it is wire-replayable."""
    request = cassette.request
    extra = request.model_extra or {}
    if "websocket_session" in (cassette.model_extra or {}):
        return "a WebSocket session (played by sessions.py, not answered as HTTP)"
    if not request.url:
        if tools.tavily_request(cassette) is not None:
            return None  # answers POST https://api.tavily.com/search (tools.py)
        if "tool_name" in extra or "provider" in extra:
            return "a tool or provider call, not an HTTP request"
        if not request.endpoint:
            return "no URL and no endpoint"
    elif _url_parts(request.url)[0] not in ("http", "https"):
        shown = request.url.split(":", 1)[0]
        return f"an SDK-level recording ({shown}:), not an HTTP request"
    endpoint = request.endpoint or ""
    if is_sdk_call(cassette) and not endpoint.startswith(("/v1/", "/api/")):
        return f"stale: endpoint label {endpoint!r} is relative to the base URL (pre-Aug-2025)"
    kind = _openai_kind(wire_path(cassette))
    names = [n for n in _typed_names(cassette) if n.startswith("openai.")]
    if kind and names:
        short = names[0].rsplit(".", 1)[-1]
        if short not in OPENAI_TYPES_BY_KIND[kind] and short in _KNOWN_OPENAI_TYPES:
            return f"stale: a {short} recorded under the {kind} endpoint"
    return None


_KNOWN_OPENAI_TYPES = {name for names in OPENAI_TYPES_BY_KIND.values() for name in names}


def unknown_openai_type(cassette: Cassette) -> str | None:
    """An answer typed with an openai class the proxy does not know for its endpoint
    (a newer SDK's, a typo): not stale, an error worth reporting at start-up."""
    kind = _openai_kind(wire_path(cassette))
    names = [n for n in _typed_names(cassette) if n.startswith("openai.")]
    if not kind or not names:
        return None
    short = names[0].rsplit(".", 1)[-1]
    if short in _KNOWN_OPENAI_TYPES:
        return None
    return (
        f"unknown __type__ {names[0][:200]!r} for the {kind} endpoint (written by a newer "
        f"SDK?): expected one of {', '.join(OPENAI_TYPES_BY_KIND[kind])}; not served"
    )


def _openai_kind(path: str) -> str | None:
    if path.startswith("/api/") or "/api/" in path:
        return None
    for suffix, kind in (
        ("/chat/completions", "chat"),
        ("/completions", "completions"),
        ("/embeddings", "embeddings"),
        ("/models", "models"),
    ):
        if path.rstrip("/").endswith(suffix):
            return kind
    return None


# ---- model lists: all recordings of the same request are merged ---------------------


def model_list_field(cassette: Cassette) -> str | None:
    """How a model list is merged: ``"id"`` (openai Model list), ``"model"`` (ollama tags)."""
    body = cassette.response.body
    if cassette.response.is_streaming:
        return None
    if isinstance(body, list) and body and all(_is_type(x, MODEL) for x in body):
        return "id"
    if _is_type(body, "ollama._types.ListResponse"):
        return "model"
    return None


def _is_type(obj: Any, name: str) -> bool:
    return isinstance(obj, dict) and obj.get("__type__") == name and "__data__" in obj


def merge_model_lists(cassettes: list[Cassette], field: str) -> dict[str, Any]:
    """One response half holding the union of the lists, by ``field``, sorted by it.

    As llama-stack merges ``models-<hash>-<digest>.json`` files: a later file wins when two
    hold the same id.
    """
    seen: dict[str, Any] = {}
    for cassette in cassettes:
        body = cassette.response.body
        if field == "id":
            for item in body:
                seen[str(item["__data__"].get("id"))] = item
        else:
            for item in body["__data__"].get("models") or []:
                seen[str(item.get("model"))] = item
    ordered = [seen[k] for k in sorted(seen)]
    first = cassettes[0].response.model_dump()
    if field == "id":
        first["body"] = ordered
    else:
        data = dict(first["body"]["__data__"])
        data["models"] = ordered
        first["body"] = {"__type__": first["body"]["__type__"], "__data__": data}
    return first


# ---- id_normalization_mapping ---------------------------------------------------------


def apply_id_mapping(cassette: Cassette) -> Cassette:
    """Put normalised ids back, as llama-stack does on read: each original string becomes
    its normalised form. The mapping is ``{}`` in every known file, so this is rarely work."""
    mapping = (cassette.model_extra or {}).get("id_normalization_mapping") or {}
    if not isinstance(mapping, dict) or not mapping:
        return cassette
    text = json.dumps(cassette.response.model_dump())
    for normalized, original in mapping.items():
        if isinstance(normalized, str) and isinstance(original, str) and original:
            # Compared as JSON string contents, so quotes and escapes match too.
            text = text.replace(json.dumps(original)[1:-1], json.dumps(normalized)[1:-1])
    response = type(cassette.response).model_validate(json.loads(text))
    return cassette.model_copy(update={"response": response})
