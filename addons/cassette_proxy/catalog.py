"""Reading a folder of cassettes for people: what each one holds, whether it is sound.

The proxy's store keeps only what a lookup needs; the CLI (``ls``, ``show``, ``stats``,
``verify``, ``prune``) needs more: the model, the chunk count, the tokens used, the
answer put back together, and whether the file's name is the hash of its request.
Everything here reads files and never writes them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import keys, matching
from .cassette import TEMP_PREFIX, Cassette, CassetteError, read_cassette
from .families import anthropic, eventstream, responses
from .families.base import is_typed
from .sequence import first_path
from .store import key_of, request_body_of, wire_path_of

# Packages whose types the proxy's families replay. A type from one of them that cannot
# be imported here is "not checked" (the package is not installed), not an error.
KNOWN_TYPE_PACKAGES = ("openai", "ollama")


def cassette_paths(root: Path) -> list[Path]:
    """Every ``*.json`` below ``root`` as the store sees them: dot folders and temp files out."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".json") and not name.startswith(TEMP_PREFIX):
                found.append(Path(dirpath) / name)
    return found


@dataclass
class Item:
    """One file: its cassette, or why it is not one."""

    path: Path
    rel: str
    size: int
    cassette: Cassette | None = None
    error: str | None = None


def load_item(path: Path, root: Path) -> Item:
    try:
        rel = str(path.relative_to(root)) if root.is_dir() else path.name
    except ValueError:
        rel = str(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    try:
        return Item(path, rel, size, cassette=read_cassette(path))
    except CassetteError as e:
        return Item(path, rel, size, error=str(e))


# ---- what a cassette holds ---------------------------------------------------------


def typed_objects(cassette: Cassette) -> list[dict[str, Any]]:
    """The typed objects of the response: one, or a stream's chunks, or none (raw)."""
    body = cassette.response.body
    if is_typed(body):
        return [body]
    if isinstance(body, list):
        return [x for x in body if is_typed(x)]
    return []


def recorded_at(cassette: Cassette) -> float | None:
    """When the answer was made, from the answer itself (``created``, ``created_at``):
    a copied or checked-out file keeps it, where its modification time does not. None
    when the answer has no time (raw answers, normalised recordings: 0)."""
    body = cassette.response.body
    datas = [o.get("__data__") for o in typed_objects(cassette)]
    if not datas and isinstance(body, dict):
        datas = [body.get("body") if isinstance(body.get("body"), dict) else body]
    for data in datas[:1]:
        if not isinstance(data, dict):
            continue
        for name in ("created", "created_at"):
            value = data.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                seconds = value / 1000 if value > 1e11 else value  # some servers write ms
                return float(seconds) if seconds < 4.1e9 else None  # past 2100: not a time
            if isinstance(value, str) and not value.startswith("1970"):
                # Ollama writes nanoseconds; Python reads at most microseconds.
                value = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
                try:
                    return datetime.fromisoformat(value).timestamp()
                except ValueError:
                    continue
    return None


def short_type(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


@dataclass
class Summary:
    """One row of ``ls``, one unit of ``stats``."""

    method: str
    endpoint: str
    model: str
    kind: str  # the response's class (ChatCompletionChunk, ...), "error", "raw" or "raw-stream"
    streamed: bool
    chunks: int  # objects in a stream (0 when not streamed)
    test_id: str | None
    status: int
    usage: dict[str, int] = field(default_factory=dict)


def model_of(cassette: Cassette) -> str:
    request = cassette.request
    if request.model:
        return request.model
    body = request_body_of(request)
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return body["model"]
    return eventstream.bedrock_model(wire_path_of(request)) or ""


def summarize(cassette: Cassette) -> Summary:
    response = cassette.response
    extra = response.model_extra or {}
    body = response.body
    session = _session_of(cassette)
    if session is not None:  # a WebSocket session (sessions.py)
        frames = session.get("frames") if isinstance(session.get("frames"), list) else []
        return Summary(
            method="WS",
            endpoint=wire_path_of(cassette.request),
            model=model_of(cassette),
            kind=SESSION_KIND,
            streamed=True,
            chunks=len(frames),
            test_id=cassette.test_id,
            status=101,
            usage=_session_usage(frames),
        )
    objects = typed_objects(cassette)
    status = 200
    if extra.get("is_exception"):
        kind = "error"
        status = int((extra.get("exception_data") or {}).get("status_code") or 500)
    elif objects:
        kind = short_type(str(objects[0]["__type__"]))
    elif eventstream.is_eventstream(str(extra.get("content_type") or "")):
        kind = EVENTSTREAM_KIND
    elif response.is_streaming:
        kind = "raw-stream"
    else:
        kind = "raw"
    if isinstance(extra.get("status"), int):
        status = extra["status"]
    chunks = len(body) if response.is_streaming and isinstance(body, list) else 0
    return Summary(
        method=cassette.request.method.upper(),
        endpoint=wire_path_of(cassette.request),
        model=model_of(cassette),
        kind=kind,
        streamed=bool(response.is_streaming),
        chunks=chunks,
        test_id=cassette.test_id,
        status=status,
        usage=usage_of(objects) or _raw_usage(cassette),
    )


# Token counters as the APIs name them: OpenAI's usage object, Ollama's eval counts.
_OPENAI_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
_OLLAMA_USAGE = {"prompt_eval_count": "prompt_tokens", "eval_count": "completion_tokens"}


def usage_of(objects: list[dict[str, Any]]) -> dict[str, int]:
    """Tokens the recorded answer says it used (a stream reports them once, at its end)."""
    total: dict[str, int] = {}
    if objects and responses.is_responses_type(str(objects[0].get("__type__"))):
        # Responses: input/output tokens, in the Response (a stream's terminal event).
        datas = [o["__data__"] for o in objects if isinstance(o.get("__data__"), dict)]
        objects = [{"__data__": {"usage": _as_openai_usage(responses.usage_of(datas))}}]
    for obj in objects:
        data = obj.get("__data__")
        if not isinstance(data, dict):
            continue
        usage = data.get("usage")
        if isinstance(usage, dict):
            for name in _OPENAI_USAGE:
                if isinstance(usage.get(name), int):
                    total[name] = total.get(name, 0) + usage[name]
        for name, as_name in _OLLAMA_USAGE.items():
            if isinstance(data.get(name), int):
                total[as_name] = total.get(as_name, 0) + data[name]
    if total and "total_tokens" not in total:
        total["total_tokens"] = total.get("prompt_tokens", 0) + total.get("completion_tokens", 0)
    return total


def _as_openai_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    names = {"input_tokens": "prompt_tokens", "output_tokens": "completion_tokens"}
    return {names.get(k, k): v for k, v in (usage or {}).items()}


def _raw_usage(cassette: Cassette) -> dict[str, int]:
    """Tokens of a raw recording whose API is known: Anthropic's Messages, Bedrock's."""
    if anthropic.is_messages_path(wire_path_of(cassette.request)):
        return anthropic.usage_of(cassette.response.body)
    if eventstream.is_eventstream(str((cassette.response.model_extra or {}).get("content_type"))):
        return eventstream.usage_of(cassette.response.body)
    return {}


# ---- WebSocket sessions (sessions.py) and AWS eventstream (families/eventstream.py) --------

SESSION_KIND = "websocket-session"
EVENTSTREAM_KIND = "eventstream"


def _session_of(cassette: Cassette) -> dict[str, Any] | None:
    data = (cassette.model_extra or {}).get("websocket_session")
    return data if isinstance(data, dict) else None


def session_key_of(cassette: Cassette) -> str | None:
    """A WebSocket session's key (sessions.session_key), if the cassette is one."""
    session = _session_of(cassette)
    return str(session.get("key")) if session is not None else None


def _server_events(frames: list[Any]) -> list[dict[str, Any]]:
    return [
        f["json"]
        for f in frames
        if isinstance(f, dict) and f.get("from") == "server" and isinstance(f.get("json"), dict)
    ]


def _session_usage(frames: list[Any]) -> dict[str, int]:
    """Tokens of a Realtime session: the sum of its ``response.done`` usages."""
    total: dict[str, int] = {}
    names = {"input_tokens": "prompt_tokens", "output_tokens": "completion_tokens",
             "total_tokens": "total_tokens"}  # fmt: skip
    for event in _server_events(frames):
        usage = (
            (event.get("response") or {}).get("usage")
            if event.get("type") == "response.done"
            else None
        )
        if isinstance(usage, dict):
            for name, ours in names.items():
                if isinstance(usage.get(name), int):
                    total[ours] = total.get(ours, 0) + usage[name]
    return total


def _session_view(session: dict[str, Any]) -> dict[str, Any]:
    frames = session.get("frames") if isinstance(session.get("frames"), list) else []
    events = _server_events(frames)
    texts = [
        str(e.get("text") or e.get("transcript") or "")
        for e in events
        if e.get("type")
        in (
            "response.output_text.done",
            "response.text.done",
            "response.output_audio_transcript.done",
            "response.audio_transcript.done",
        )  # fmt: skip
    ]
    client = [f for f in frames if isinstance(f, dict) and f.get("from") == "client"]
    view: dict[str, Any] = {
        "kind": SESSION_KIND,
        "chunks": len(frames),
        "status": 101,
        "frames": {"client": len(client), "server": len(frames) - len(client)},
        "client_events": [
            (f.get("json") or {}).get("type", "?")
            if isinstance(f.get("json"), dict)
            else ("binary" if "binary" in f else "text")
            for f in client
        ],
        "text": "\n".join(t for t in texts if t),
        "close": session.get("close"),
    }
    usage = _session_usage(frames)
    if usage:
        view["usage"] = usage
    return view


def _session_prompt(session: dict[str, Any]) -> str:
    """The user text a session's client sent (conversation.item.create), joined."""
    parts = []
    for f in session.get("frames") or []:
        event = f.get("json") if isinstance(f, dict) and f.get("from") == "client" else None
        if isinstance(event, dict) and event.get("type") == "conversation.item.create":
            item = event.get("item") or {}
            if isinstance(item, dict):
                parts.append(_text_of(item.get("content")))
    return " | ".join(p for p in parts if p)


# ---- the answer put back together (``show``) ----------------------------------------------


def reassemble(cassette: Cassette) -> dict[str, Any]:
    """The response made readable: streamed text and tool calls joined, errors spelled out."""
    response = cassette.response
    extra = response.model_extra or {}
    session = _session_of(cassette)
    if session is not None:
        return _session_view(session)
    if eventstream.is_eventstream(str(extra.get("content_type") or "")):
        return {"kind": EVENTSTREAM_KIND, "chunks": len(response.body or []),
                "status": extra.get("status"), **eventstream.reassemble(response.body)}  # fmt: skip
    if extra.get("is_exception"):
        data = extra.get("exception_data") or {}
        return {
            "kind": "error",
            "status": data.get("status_code"),
            "message": data.get("message") or extra.get("exception_message"),
        }
    objects = typed_objects(cassette)
    if not objects and _is_anthropic_message(cassette):
        return _anthropic_view(response.body, bool(response.is_streaming), extra.get("status"))
    if not objects:
        return _raw_view(response.body, bool(response.is_streaming), extra.get("status"))
    kind = short_type(str(objects[0]["__type__"]))
    datas = [o.get("__data__") or {} for o in objects]
    view: dict[str, Any] = {"kind": kind}
    if response.is_streaming:
        view["chunks"] = len(objects)
    if kind == "Model":
        view["models"] = [d.get("id") for d in datas]
    elif kind in ("ChatCompletionChunk", "ChatCompletion", "Completion"):
        view["choices"] = _openai_choices(datas)
    elif kind == "CreateEmbeddingResponse":
        vectors = datas[0].get("data") or []
        view["embeddings"] = len(vectors)
        first = vectors[0].get("embedding") if vectors and isinstance(vectors[0], dict) else None
        view["dimensions"] = len(first) if isinstance(first, list) else None
    elif responses.is_responses_type(str(objects[0]["__type__"])):
        view["kind"] = "Response"
        view.update(responses.reassemble(datas))
    elif kind in ("ChatResponse", "GenerateResponse"):
        view.update(_ollama_answer(datas))
    elif kind == "EmbedResponse":
        vectors = datas[0].get("embeddings") or []
        view["embeddings"] = len(vectors)
        view["dimensions"] = len(vectors[0]) if vectors else None
    else:
        view["data"] = datas[0] if len(datas) == 1 else datas
    usage = usage_of(objects)
    if usage:
        view["usage"] = usage
    return view


def _anthropic_view(body: Any, streamed: bool, status: Any) -> dict[str, Any]:
    view: dict[str, Any] = {"kind": "anthropic-message"}
    if isinstance(status, int):
        view["status"] = status
    if streamed and isinstance(body, list):
        view["lines"] = len(body)
    view.update(anthropic.reassemble(body))
    usage = anthropic.usage_of(body)
    if usage:
        view["usage"] = usage
    return view


def _is_anthropic_message(cassette: Cassette) -> bool:
    """A Messages answer (not count_tokens, not an error body) kept as raw HTTP."""
    body = cassette.response.body
    if not wire_path_of(cassette.request).rstrip("/").endswith("/v1/messages"):
        return False
    if isinstance(body, dict):
        return body.get("type") == "message"
    return bool(cassette.response.is_streaming) and isinstance(body, list)


def _openai_choices(datas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join chat deltas / completion texts by choice index; tool calls by their index."""
    choices: dict[int, dict[str, Any]] = {}
    for data in datas:
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            slot = choices.setdefault(int(choice.get("index") or 0), {"text": ""})
            part = choice.get("delta") or choice.get("message") or {}
            if isinstance(choice.get("text"), str):
                slot["text"] += choice["text"]
            if isinstance(part, dict):
                if isinstance(part.get("content"), str):
                    slot["text"] += part["content"]
                for name in ("reasoning_content", "reasoning"):
                    if isinstance(part.get(name), str):
                        slot["reasoning"] = slot.get("reasoning", "") + part[name]
                for call in part.get("tool_calls") or []:
                    _merge_tool_call(slot.setdefault("tool_calls", {}), call)
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]
    out = []
    for index in sorted(choices):
        slot = choices[index]
        calls = slot.pop("tool_calls", None)
        if calls:
            slot["tool_calls"] = [calls[i] for i in sorted(calls)]
        out.append({"index": index, **slot})
    return out


def _merge_tool_call(calls: dict[int, dict[str, Any]], call: Any) -> None:
    if not isinstance(call, dict):
        return
    index = call.get("index")
    if not isinstance(index, int):
        index = len(calls)  # a whole message lists its calls without an index
    slot = calls.setdefault(index, {"id": None, "name": "", "arguments": ""})
    if call.get("id"):
        slot["id"] = call["id"]
    function = call.get("function") or {}
    if isinstance(function.get("name"), str):
        slot["name"] += function["name"]
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        slot["arguments"] += arguments
    elif arguments is not None:
        slot["arguments"] += json.dumps(arguments)


def _ollama_answer(datas: list[dict[str, Any]]) -> dict[str, Any]:
    text, thinking, calls, done_reason = "", "", [], None
    for data in datas:
        message = data.get("message") or {}
        if isinstance(data.get("response"), str):
            text += data["response"]
        if isinstance(message, dict):
            text += message.get("content") or ""
            thinking += message.get("thinking") or ""
            calls += message.get("tool_calls") or []
        done_reason = data.get("done_reason") or done_reason
    view: dict[str, Any] = {"text": text}
    if thinking:
        view["thinking"] = thinking
    if calls:
        view["tool_calls"] = calls
    if done_reason:
        view["done_reason"] = done_reason
    return view


def _raw_view(body: Any, streamed: bool, status: Any) -> dict[str, Any]:
    view: dict[str, Any] = {"kind": "raw-stream" if streamed else "raw"}
    if isinstance(status, int):
        view["status"] = status
    if streamed and isinstance(body, list) and all(isinstance(x, str) for x in body):
        view["lines"] = len(body)
        text = _text_of_sse_lines(body)
        if text:
            view["text"] = text
        view["body"] = body
    else:
        view["body"] = body
    return view


def _text_of_sse_lines(lines: list[str]) -> str:
    """Text deltas of a raw SSE stream (Anthropic messages, Gemini interactions, ...)."""
    text = ""
    for line in lines:
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        delta = event.get("delta") if isinstance(event, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("text"), str):
            text += delta["text"]
    return text


# ---- verify: does it parse, do its types load, is its name its hash -----------------------


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


_type_cache: dict[str, Any] = {}


def load_type(type_name: str) -> Any:
    """The class a ``__type__`` names, or None when its package is not installed.

    Raises LookupError when the package is there but the class is not, or when the
    package is not one the proxy knows.
    """
    if type_name in _type_cache:
        return _type_cache[type_name]
    module_name, _, class_name = type_name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if type_name.split(".", 1)[0] in KNOWN_TYPE_PACKAGES:
            _type_cache[type_name] = None
            return None
        raise LookupError(f"unknown type {type_name} ({e})") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise LookupError(f"unknown type {type_name} (no {class_name} in {module_name})")
    _type_cache[type_name] = cls
    return cls


def check_types(cassette: Cassette, findings: Findings) -> None:
    unchecked: set[str] = set()
    for i, obj in enumerate(typed_objects(cassette)):
        type_name = str(obj["__type__"])
        try:
            cls = load_type(type_name)
        except LookupError as e:
            findings.errors.append(str(e))
            return
        if cls is None:
            unchecked.add(type_name.split(".", 1)[0])
            continue
        validate = getattr(cls, "model_validate", None)
        if validate is None:
            continue
        data = obj["__data__"]
        where = f"object {i}" if cassette.response.is_streaming else "response"
        if not isinstance(data, dict):
            findings.errors.append(f"{where}: __data__ of {short_type(type_name)} is not an object")
            return
        try:
            validate(data)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError or the class's own
            # The SDKs build responses without validation (``construct``), so a field out
            # of the schema still replays to them: worth knowing, not a broken file.
            first = str(e).splitlines()
            findings.warnings.append(
                f"{where} loads only leniently as {short_type(type_name)}: {' '.join(first[:3])}"
            )
            return
    for package in sorted(unchecked):
        findings.warnings.append(f"types of {package} not checked: {package} is not installed")


def expected_names(cassette: Cassette) -> set[str]:
    """File names (without ``.json``) a recorder could have given this cassette.

    The name is llama-stack's request hash: of the URL's path (the endpoint field when
    there is no URL), the body and, in newer files, the test id (present even when
    null); full hex, its first 12 characters in old files, or
    ``models-<hash>-<digest8>`` for model lists.
    """
    request = cassette.request
    url = request.url or ""
    endpoint = urlsplit(url).path if "://" in url else ""
    endpoint = endpoint or request.endpoint or "/"
    body = request_body_of(request)
    hashes = {keys.recording_hash(request.method, endpoint, body)}
    if cassette.test_id is not None:
        hashes.add(keys.recording_hash(request.method, endpoint, body, cassette.test_id))
    if "test_id" in cassette.model_fields_set and cassette.test_id is None:
        hashes.add(_hash_with_null_test_id(request.method, endpoint, body))
    query = matching.recorded_query(url)
    if query:  # the proxy names a request with a query by it too (matching.file_stem)
        hashes.add(matching.file_stem(request.method, endpoint, body, query, cassette.test_id))
    names = set(hashes) | {h[:12] for h in hashes}
    objects = typed_objects(cassette)
    if objects and short_type(str(objects[0]["__type__"])) == "Model":
        ids = sorted(str((o.get("__data__") or {}).get("id")) for o in objects)
        digest = hashlib.sha256("|".join(ids).encode()).hexdigest()[:8]
        names |= {f"models-{h}-{digest}" for h in hashes}
    return names


def _hash_with_null_test_id(method: str, endpoint: str, body: Any) -> str:
    normalized = {
        "method": method.upper(),
        "endpoint": endpoint,
        "body": keys.round_floats(body),
        "test_id": None,
    }
    return hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()


def verify_item(item: Item) -> Findings:
    findings = Findings()
    if item.cassette is None:
        findings.errors.append(item.error or "not a cassette")
        return findings
    cassette = item.cassette
    session = _session_of(cassette)
    if session is not None:
        return _verify_session(item, session, findings)
    if eventstream.is_eventstream(str((cassette.response.model_extra or {}).get("content_type"))):
        for i, chunk in enumerate(cassette.response.body or []):
            try:
                eventstream.encode_frame(chunk)
            except eventstream.FrameError as e:
                findings.errors.append(f"eventstream message {i} cannot be replayed: {e}")
                break
    try:
        key_of(cassette)
    except Exception as e:  # noqa: BLE001 - any failure to key it means the proxy cannot serve it
        findings.errors.append(f"request cannot be keyed: {e}")
    check_types(cassette, findings)
    stem = first_path(item.path).name.removesuffix(".json")  # <hash>.<n>.json: answer n
    if stem not in expected_names(cassette):
        expected = f" (expected {expected_name(cassette, stem)})"
        if stem.startswith("models-"):
            findings.warnings.append(
                f"name does not match the hash of its request and model ids{expected}"
            )
        else:
            findings.warnings.append(f"name does not match the hash of its request{expected}")
    return findings


def _verify_session(item: Item, session: dict[str, Any], findings: Findings) -> Findings:
    """A session cassette: its frames playable, its name the recorder's."""
    from . import sessions  # mitmproxy's: only for the folders that hold sessions

    problem = sessions.check_session(session)
    if problem is not None:
        findings.errors.append(f"WebSocket session cannot be played: {problem}")
        return findings
    expected = sessions.session_file(Path("."), session["key"], session["frames"]).name
    if item.path.name != expected:
        findings.warnings.append(
            f"name does not match its URL and client frames (expected {expected})"
        )
    if item.path.parent.name != sessions.FOLDER:
        findings.warnings.append(
            f"a session is played only from {sessions.FOLDER}/ below the cassette folder"
        )
    return findings


def iter_items(root: Path) -> Iterator[Item]:
    for path in cassette_paths(root):
        yield load_item(path, root)


def expected_name(cassette: Cassette, stem: str) -> str:
    """The one name to suggest for a misnamed file: the recorder's own choice (hash with
    the test id when there is one), in the same form (12 or 64 hex, models-) as ``stem``."""
    request = cassette.request
    url = request.url or ""
    endpoint = (urlsplit(url).path if "://" in url else "") or request.endpoint or "/"
    body = request_body_of(request)
    primary = keys.recording_hash(request.method, endpoint, body, cassette.test_id)

    short = len(stem) == 12  # llama-stack's older 12-hex names

    def rank(name: str) -> tuple[bool, bool, bool, str]:
        return (
            name.startswith("models-") != stem.startswith("models-"),
            (len(name) == 12) != short,
            primary not in name and primary[:12] != name,
            name,
        )

    return min(expected_names(cassette), key=rank) + ".json"


def prompt_of(cassette: Cassette) -> str:
    """The start of what was asked: the last user message, or the input / prompt field."""
    session = _session_of(cassette)
    if session is not None:
        return " ".join(_session_prompt(session).split())
    body = request_body_of(cassette.request)
    if not isinstance(body, dict):
        return ""
    text = ""
    messages = body.get("messages")
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        chosen = users[-1] if users else (messages[-1] if messages else None)
        text = _text_of(chosen.get("content") if isinstance(chosen, dict) else chosen)
    for name in ("input", "prompt"):
        if not text and name in body:
            value = body[name]
            if isinstance(value, list) and value and isinstance(value[-1], dict):
                users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
                value = (users or value)[-1].get("content")
            text = _text_of(value)
    return " ".join(text.split())


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type"):
                parts.append(f"[{part['type']}]")
        return " ".join(parts)
    return "" if content is None else json.dumps(content)[:200]
