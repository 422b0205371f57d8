"""Reading every era of llama-stack's format, and matching a wire request to a recorded
SDK call (issue 3). Pure functions and the store, in process; the end-to-end proof with
real clients is test_llama_stack_conformance.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cassette_proxy import eras, keys, matching
from cassette_proxy.cassette import Cassette
from cassette_proxy.families import encode
from cassette_proxy.stable import EPOCH, normalize_response
from cassette_proxy.store import CassetteStore, key_of

CHUNK = "openai.types.chat.chat_completion_chunk.ChatCompletionChunk"
CHAT = "openai.types.chat.chat_completion.ChatCompletion"
MODEL = "openai.types.model.Model"
EMB = "openai.types.create_embedding_response.CreateEmbeddingResponse"


def sdk_cassette(
    url: str, endpoint: str, body: Any, response: Any, streaming: bool = False, **top: Any
) -> Cassette:
    """A recording as llama-stack's inference recorder wrote it (an SDK call)."""
    doc = {
        **top,
        "request": {
            "method": "POST",
            "url": url,
            "headers": {},
            "body": body,
            "endpoint": endpoint,
            "model": body.get("model", ""),
        },
        "response": {"body": response, "is_streaming": streaming},
    }
    return Cassette.model_validate(doc)


def typed(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"__type__": name, "__data__": data}


def wire_key(method: str, path: str, body: Any, query: list[tuple[str, str]] | None = None):
    return keys.request_key(method, path, body, query)


MSGS = [{"role": "user", "content": "hi"}]
ANSWER = typed(CHAT, {"id": "x", "object": "chat.completion", "choices": []})


@pytest.mark.parametrize(
    ("url", "wire_path"),
    [
        ("http://localhost:8000/v1/v1/chat/completions", "/v1/chat/completions"),
        ("https://x.openai.azure.com/openai/v1/v1/chat/completions", "/openai/v1/chat/completions"),
        ("https://us-south.ml.cloud.ibm.com/ml/v1/v1/chat/completions", "/ml/v1/chat/completions"),
        (
            "https://bedrock-runtime.us-west-2.amazonaws.com/openai/v1/v1/chat/completions",
            "/openai/v1/chat/completions",
        ),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai/v1/chat/completions",
            "/v1beta/openai/chat/completions",
        ),
        (
            "__databricks__/serving-endpoints/v1/chat/completions",
            "/serving-endpoints/chat/completions",
        ),
    ],
)
def test_doubled_version_in_the_url_is_the_sdk_wire_path(url, wire_path):
    cassette = sdk_cassette(url, "/v1/chat/completions", {"model": "m", "messages": MSGS}, ANSWER)
    assert key_of(cassette) == (
        wire_key("POST", wire_path, {"model": "m", "messages": MSGS}),
        wire_path,
    )


def test_a_wire_recording_keeps_its_path_even_when_it_looks_doubled():
    # The proxy writes endpoint == URL path: nothing to undo, whatever the path is.
    doc = sdk_cassette("http://h/v1/v1/chat/completions", "/v1/v1/chat/completions", {}, ANSWER)
    assert key_of(doc)[1] == "/v1/v1/chat/completions"


def test_extra_body_is_merged_and_extra_query_goes_to_the_query_string():
    body = {
        "model": "m",
        "messages": MSGS,
        "extra_body": {"project_id": "p1", "guided_choice": ["a", "b"]},
        "extra_query": {"api-version": "2025-01-01", "flag": True},
        "extra_headers": {"x-h": "1"},
        "timeout": 30,
    }
    cassette = sdk_cassette("http://h/v1/v1/chat/completions", "/v1/chat/completions", body, ANSWER)
    on_the_wire = {"model": "m", "messages": MSGS, "project_id": "p1", "guided_choice": ["a", "b"]}
    query = [("api-version", "2025-01-01"), ("flag", "true")]
    assert key_of(cassette)[0] == wire_key("POST", "/v1/chat/completions", on_the_wire, query)


def test_model_list_recorded_as_post_is_a_get_with_its_extra_query():
    models = [typed(MODEL, {"id": "a", "object": "model", "created": 1, "owned_by": "o"})]
    plain = sdk_cassette("http://h/v1/v1/models", "/v1/models", {}, models)
    assert key_of(plain)[0] == wire_key("GET", "/v1/models", {})
    watsonx = sdk_cassette(
        "https://w/ml/v1/v1/models", "/v1/models", {"extra_query": {"project_id": "p"}}, models
    )
    assert key_of(watsonx)[0] == wire_key("GET", "/ml/v1/models", {}, [("project_id", "p")])


def test_openai_embeddings_match_whatever_encoding_the_sdk_asks_for():
    data = {
        "object": "list",
        "model": "e",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    # The caller set nothing (the SDK then sends base64), or asked for floats.
    for recorded in (
        {"model": "e", "input": "x"},
        {"model": "e", "input": "x", "encoding_format": "float"},
    ):
        cassette = sdk_cassette(
            "http://h/v1/v1/embeddings", "/v1/embeddings", recorded, typed(EMB, data)
        )
        for wire in (
            {"model": "e", "input": "x", "encoding_format": "base64"},
            {"model": "e", "input": "x", "encoding_format": "float"},
        ):
            assert key_of(cassette)[0] == wire_key("POST", "/v1/embeddings", wire)
    # ...and the answer is put back in the encoding the wire request asked for.
    response = {"body": typed(EMB, data), "is_streaming": False}
    as_b64 = json.loads(encode("/v1/embeddings", {"encoding_format": "base64"}, response).body)
    assert isinstance(as_b64["data"][0]["embedding"], str)
    as_floats = json.loads(encode("/v1/embeddings", {}, response).body)
    assert as_floats["data"][0]["embedding"] == [0.5, -0.25]
    # A recording that kept base64 strings (its caller asked for base64) still gives floats.
    kept = {**data, "data": [{**data["data"][0], "embedding": as_b64["data"][0]["embedding"]}]}
    again = encode("/v1/embeddings", {}, {"body": typed(EMB, kept), "is_streaming": False})
    assert json.loads(again.body)["data"][0]["embedding"] == [0.5, -0.25]


def test_ollama_client_defaults_and_the_embeddings_label():
    gen = typed("ollama._types.GenerateResponse", {"model": "m", "response": "r", "done": True})
    # llama-stack stored what the caller passed; the client also sends stream:false.
    recorded = sdk_cassette(
        "http://localhost:11434/api/generate",
        "/api/generate",
        {"model": "m", "prompt": "p", "options": {"temperature": 0.0}},
        gen,
    )
    wire = {"model": "m", "prompt": "p", "stream": False, "options": {"temperature": 0.0}}
    assert key_of(recorded)[0] == wire_key("POST", "/api/generate", wire)
    chat = typed("ollama._types.ChatResponse", {"model": "m", "message": {"role": "assistant"}})
    recorded = sdk_cassette(
        "http://localhost:11434/api/chat",
        "/api/chat",
        {"model": "m", "messages": MSGS, "stream": False},
        chat,
    )
    wire = {"model": "m", "messages": MSGS, "tools": [], "stream": False}
    assert key_of(recorded)[0] == wire_key("POST", "/api/chat", wire)
    # Without "stream", the Ollama server streams: another request.
    assert key_of(recorded)[0] != wire_key("POST", "/api/chat", {"model": "m", "messages": MSGS})
    embed = typed("ollama._types.EmbedResponse", {"model": "m", "embeddings": [[0.1]]})
    recorded = sdk_cassette(
        "http://localhost:11434/api/embeddings",
        "/api/embeddings",
        {"model": "m", "input": ["a"]},
        embed,
    )
    assert key_of(recorded) == (
        wire_key("POST", "/api/embed", {"model": "m", "input": ["a"]}),
        "/api/embed",
    )


def test_ollama_pull_recorded_without_its_model_answers_any_pull(tmp_path):
    progress = typed("ollama._types.ProgressResponse", {"status": "success"})
    write(
        tmp_path / "3877ecf1bc62.json",
        sdk_cassette("http://localhost:11434/api/pull", "/api/pull", {}, progress),
    )
    store = CassetteStore(tmp_path)
    store.load()
    wire = {"model": "llama3.2:3b", "insecure": False, "stream": False}
    exact = keys.request_key("POST", "/api/pull", wire)
    assert store.lookup(exact) is None
    entry = store.lookup(exact, None, matching.loose_keys_for("POST", "/api/pull", wire))
    assert entry is not None and entry.path.name == "3877ecf1bc62.json"


def write(path: Path, cassette: Cassette | dict[str, Any]) -> Path:
    doc = cassette if isinstance(cassette, dict) else cassette.model_dump(exclude_unset=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def chunk(text: str) -> dict[str, Any]:
    return typed(
        CHUNK,
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}}],
        },
    )


def test_stream_options_only_matter_when_an_exact_recording_exists(tmp_path):
    url, ep = (
        "https://bedrock-runtime.x.amazonaws.com/openai/v1/v1/chat/completions",
        "/v1/chat/completions",
    )
    with_usage = {
        "model": "m",
        "messages": MSGS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    write(tmp_path / "a.json", sdk_cassette(url, ep, with_usage, [chunk("usage")], True))
    store = CassetteStore(tmp_path)
    store.load()
    path = "/openai/v1/chat/completions"
    plain = {"model": "m", "messages": MSGS, "stream": True}
    loose = matching.loose_keys_for("POST", path, plain)
    found = store.lookup(wire_key("POST", path, plain), None, loose)
    assert found is not None and found.path.name == "a.json"
    write(tmp_path / "b.json", sdk_cassette(url, ep, plain, [chunk("plain")], True))
    store.load()
    for body, name in ((plain, "b.json"), (with_usage, "a.json")):
        found = store.lookup(
            wire_key("POST", path, body), None, matching.loose_keys_for("POST", path, body)
        )
        assert found is not None and found.path.name == name


def test_every_file_name_era_and_legacy_files_without_test_id_load(tmp_path):
    base = {"model": "m", "messages": MSGS}
    for i, name in enumerate(
        [
            "0806aef47037.json",
            "a" * 64 + ".json",
            f"models-{'b' * 64}-0da7d1b1.json",
            "sub/dir/odd-name.json",
        ]
    ):
        body = {**base, "n": i}
        legacy = sdk_cassette(
            "http://h/v1/v1/chat/completions", "/v1/chat/completions", body, ANSWER
        )
        write(tmp_path / name, legacy)
    store = CassetteStore(tmp_path)
    report = store.load()
    assert (report.loaded, report.bad, report.unservable) == (4, [], [])
    # A legacy file (no test_id) answers a request from any test.
    entry = store.lookup(
        wire_key("POST", "/v1/chat/completions", {**base, "n": 2}), "tests/t.py::x"
    )
    assert entry is not None and entry.path.name.startswith("models-")


def test_model_lists_of_the_same_request_are_merged_by_id_and_sorted(tmp_path):
    def models(*ids_owners: tuple[str, str]) -> list[dict[str, Any]]:
        return [
            typed(MODEL, {"id": i, "object": "model", "created": 0, "owned_by": o})
            for i, o in ids_owners
        ]

    url = "http://localhost:11434/v1/v1/models"
    write(
        tmp_path / "models-h-1.json",
        sdk_cassette(url, "/v1/models", {}, models(("z", "1"), ("a", "1"))),
    )
    write(
        tmp_path / "models-h-2.json",
        sdk_cassette(url, "/v1/models", {}, models(("m", "2"), ("a", "2"))),
    )
    write(
        tmp_path / "models-h-3.json",
        sdk_cassette(url, "/v1/models", {}, models(("q", "3")), test_id="tests/t.py::other"),
    )
    store = CassetteStore(tmp_path)
    store.load()
    entry = store.lookup(wire_key("GET", "/v1/models", {}))
    assert entry is not None
    response = store.read(entry).response.model_dump()
    data = [m["__data__"] for m in response["body"]]
    # Union by id, sorted; the later file wins a shared id; another test's list stays apart.
    assert [(m["id"], m["owned_by"]) for m in data] == [("a", "2"), ("m", "2"), ("z", "1")]
    wire = json.loads(encode("/v1/models", {}, response).body)
    assert wire["object"] == "list" and [m["id"] for m in wire["data"]] == ["a", "m", "z"]


def test_ollama_tag_lists_merge_by_model(tmp_path):
    def tags(*names: str) -> dict[str, Any]:
        return typed("ollama._types.ListResponse", {"models": [{"model": n} for n in names]})

    url = "http://localhost:11434/api/tags"
    write(tmp_path / "models-t-1.json", sdk_cassette(url, "/api/tags", {}, tags("b", "a")))
    write(tmp_path / "models-t-2.json", sdk_cassette(url, "/api/tags", {}, tags("c")))
    store = CassetteStore(tmp_path)
    store.load()
    entry = store.lookup(wire_key("GET", "/api/tags", {}))
    body = store.read(entry).response.body
    assert [m["model"] for m in body["__data__"]["models"]] == ["a", "b", "c"]


def test_id_normalization_mapping_is_applied_on_read(tmp_path):
    doc = sdk_cassette(
        "http://h/v1/v1/chat/completions",
        "/v1/chat/completions",
        {"model": "m", "messages": MSGS},
        typed(CHAT, {"id": "chatcmpl-REAL", "choices": []}),
        id_normalization_mapping={"rec-abc": "chatcmpl-REAL"},
    )
    write(tmp_path / "x.json", doc)
    store = CassetteStore(tmp_path)
    store.load()
    entry = store.lookup(key_of(doc)[0])
    assert store.read(entry).response.body["__data__"]["id"] == "rec-abc"
    assert "chatcmpl-REAL" in (tmp_path / "x.json").read_text()  # the file is not rewritten


def test_raw_http_recordings_and_recorded_exceptions_replay_as_recorded():
    raw = Cassette.model_validate(
        {
            "test_id": "t",
            "request": {
                "test_id": "t",
                "url": "http://h:1/v1/messages",
                "method": "POST",
                "payload": {"model": "m", "stream": False},
            },
            "response": {"status": 201, "body": {"id": "msg"}, "is_streaming": False},
        }
    )
    assert key_of(raw) == (
        wire_key("POST", "/v1/messages", {"model": "m", "stream": False}),
        "/v1/messages",
    )
    wire = encode("/v1/messages", {}, raw.response.model_dump())
    assert (wire.status, json.loads(wire.body)) == (201, {"id": "msg"})
    lines = ["event: message_start", 'data: {"type": "message_start"}', ""]
    sse = encode("/v1/messages", {}, {"body": lines, "is_streaming": True})
    assert sse.content_type == "text/event-stream" and sse.body.decode().split("\n")[:3] == lines
    error = {
        "body": None,
        "is_streaming": False,
        "is_exception": True,
        "exception_data": {
            "type": "BadRequestError",
            "status_code": 400,
            "message": "Error code: 400",
            "body": {"code": "BadRequest", "message": "Invalid image", "param": None, "type": None},
        },
    }
    wire = encode("/openai/v1/chat/completions", {}, error)
    assert wire.status == 400 and json.loads(wire.body) == {
        "error": error["exception_data"]["body"]
    }


def test_unreachable_recordings_are_named_with_a_reason():
    tool = Cassette.model_validate(
        {
            "request": {
                "test_id": "t",
                "provider": "tavily",
                "tool_name": "web_search",
                "kwargs": {},
            },
            "response": {"body": {"x": 1}},
        }
    )
    assert "tool" in eras.unservable_reason(tool)
    vertex = sdk_cassette("vertexai:///generate_content", "/generate_content", {"model": "g"}, {})
    assert "vertexai" in eras.unservable_reason(vertex)
    stale = sdk_cassette(
        "http://h/v1/chat/completions", "/chat/completions", {"model": "m"}, [chunk("x")], True
    )
    assert eras.unservable_reason(stale).startswith("stale")
    mislabelled = sdk_cassette(
        "http://h/v1/v1/completions", "/v1/completions", {"model": "m"}, [chunk("x")], True
    )
    assert eras.unservable_reason(mislabelled).startswith("stale")
    assert (
        eras.unservable_reason(
            sdk_cassette("http://h/v1/v1/chat/completions", "/v1/chat/completions", {}, ANSWER)
        )
        is None
    )


def test_normalize_is_llama_stacks_newer_normalisation():
    response = {
        "body": [
            typed(
                CHUNK,
                {"id": "chatcmpl-1", "created": 1750000000, "object": "chat.completion.chunk"},
            ),
            typed(MODEL, {"id": "llama", "created": 5, "object": "model"}),
            typed(
                "ollama._types.GenerateResponse",
                {
                    "created_at": "2025-08-01T23:14:08.08Z",
                    "total_duration": 5,
                    "load_duration": 1,
                    "prompt_eval_duration": 2,
                    "eval_duration": 3,
                    "eval_count": 7,
                    "context": None,
                },
            ),
            "raw line",
        ],
        "is_streaming": True,
    }
    out = normalize_response(response, "0123456789abcdef" * 4)["body"]
    assert out[0]["__data__"] == {
        "id": "rec-0123456789ab",
        "created": 0,
        "object": "chat.completion.chunk",
    }
    assert out[1]["__data__"] == {"id": "llama", "created": 5, "object": "model"}
    assert out[2]["__data__"] == {
        "created_at": EPOCH,
        "total_duration": 0,
        "load_duration": 0,
        "prompt_eval_duration": 0,
        "eval_duration": 0,
        "eval_count": 7,
        "context": None,
    }
    assert out[3] == "raw line"
    assert response["body"][0]["__data__"]["id"] == "chatcmpl-1"  # the input is not modified
