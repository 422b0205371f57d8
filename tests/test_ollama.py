"""Ollama's native API through a real mitmdump (issue 3): the real ollama client and a
fake upstream that speaks Ollama's wire format (NDJSON streams, ``"done": true``)."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from conftest import cassette_files, ollama_client, wait_for_files
from upstreams import answer_text, embedding_vector, start_ollama_upstream

T = "ollama._types."
MSG = [{"role": "user", "content": "hi there"}]


def docs(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in cassette_files(directory)]


def by_endpoint(directory: Path) -> dict[tuple[str, bool], dict[str, Any]]:
    return {(d["request"]["endpoint"], d["response"]["is_streaming"]): d for d in docs(directory)}


def dumps(objects: Any) -> list[dict[str, Any]]:
    return [o.model_dump(mode="json", exclude_unset=True) for o in objects]


STREAMS = {
    "generate": lambda c: c.generate(model="llama3.2:3b", prompt="tell a story", stream=True),
    "chat": lambda c: c.chat(model="llama3.2:3b", messages=MSG, stream=True),
    "pull": lambda c: c.pull("llama3.2:3b", stream=True),
}
LAST = {"generate": {"done": True}, "chat": {"done": True}, "pull": {"status": "success"}}


@pytest.mark.parametrize("kind", sorted(STREAMS))
def test_stream_passes_through_unbuffered_is_recorded_and_replays_as_ndjson(proxy_factory, kind):
    gate = threading.Event()
    upstream = start_ollama_upstream("A", gate=gate, gate_timeout=10.0)
    try:
        proxy = proxy_factory(mode="auto")
        client = ollama_client(proxy, upstream)
        stream = STREAMS[kind](client)
        first = next(stream)
        # The upstream holds everything after its first line until we open the gate: the
        # first object reached the client through the proxy while the stream was open.
        gate.set()
        live = [first, *stream]
        assert not upstream.gate_timed_out
        assert live[-1].model_dump(exclude_unset=True).items() >= LAST[kind].items()
        assert len(live) >= 3

        (path,) = wait_for_files(proxy.cassette_dir, 1)
        doc = json.loads(path.read_text())
        assert doc["response"]["is_streaming"] is True
        recorded = doc["response"]["body"]
        assert [o["__data__"] for o in recorded] == dumps(live)
        assert {o["__type__"] for o in recorded} == {
            T + ("ProgressResponse" if kind == "pull" else kind.title() + "Response")
        }

        upstream.stop()
        replay = proxy_factory(mode="replay")
        with httpx.Client(proxy=replay.url, trust_env=False) as http:
            wire = http.post(f"{upstream.url}/api/{kind}", json=doc["request"]["body"])
        assert wire.headers["content-type"] == "application/x-ndjson"
        lines = wire.text.splitlines()
        assert [json.loads(line) for line in lines] == [o["__data__"] for o in recorded]
        assert wire.text.endswith("\n")
        replayed = list(STREAMS[kind](ollama_client(replay, upstream)))
        assert dumps(replayed) == dumps(live)
    finally:
        upstream.stop()


def test_every_native_endpoint_records_and_replays_to_the_ollama_client(
    proxy_factory, ollama_upstream
):
    proxy = proxy_factory(mode="auto")
    client = ollama_client(proxy, ollama_upstream)
    calls = {
        "generate": lambda: client.generate(model="llama3.2:3b", prompt="why is the sky blue"),
        "chat": lambda: client.chat(model="llama3.2:3b", messages=MSG),
        "chat-tools": lambda: client.chat(
            model="llama3.2:3b",
            messages=MSG,
            tools=[{"type": "function", "function": {"name": "get_weather"}}],
        ),
        "embed": lambda: client.embed(model="all-minilm:l6-v2", input=["a", "b"]),
        "embeddings": lambda: client.embeddings(model="all-minilm:l6-v2", prompt="a"),
        "tags": client.list,
        "ps": client.ps,
        "show": lambda: client.show("llama3.2:3b"),
        "pull": lambda: client.pull("llama3.2:3b"),
    }
    live = {
        name: call().model_dump(mode="json", exclude_unset=True) for name, call in calls.items()
    }
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        live_version = http.get(f"{ollama_upstream.url}/api/version").json()
    assert live["generate"]["response"] == answer_text("A", "why is the sky blue")
    assert live["chat-tools"]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert live["embed"]["embeddings"][1] == embedding_vector("A", "b")

    wait_for_files(proxy.cassette_dir, len(calls) + 1)
    recorded = by_endpoint(Path(proxy.cassette_dir))
    types = {k[0]: v["response"]["body"].get("__type__") for k, v in recorded.items()}
    assert types == {
        "/api/generate": T + "GenerateResponse",
        "/api/chat": T + "ChatResponse",
        "/api/embed": T + "EmbedResponse",
        "/api/embeddings": T + "EmbeddingsResponse",
        "/api/tags": T + "ListResponse",
        "/api/ps": T + "ProcessResponse",
        "/api/show": T + "ShowResponse",
        "/api/pull": T + "ProgressResponse",
        "/api/version": None,  # no ollama._types class: raw JSON with its status
    }
    assert recorded[("/api/tags", False)]["request"]["method"] == "GET"
    assert recorded[("/api/version", False)]["response"]["status"] == 200

    ollama_upstream.stop()  # auto mode: refused, so everything comes from cassettes
    replayed = {
        name: call().model_dump(mode="json", exclude_unset=True) for name, call in calls.items()
    }
    assert replayed == live
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        assert http.get(f"{ollama_upstream.url}/api/version").json() == live_version
    assert proxy.log_text().count("hit ") >= len(calls) + 1


def test_curl_style_request_hits_what_the_ollama_client_recorded(proxy_factory, ollama_upstream):
    """The ollama client always sends stream:false and tools:[]; a hand-written request
    that leaves them out means the same call to the server and gets the same answer."""
    proxy = proxy_factory(mode="auto")
    live = ollama_client(proxy, ollama_upstream).chat(model="llama3.2:3b", messages=MSG)
    sent = ollama_upstream.requests_to("/api/chat")[0].json()
    assert sent["stream"] is False and sent["tools"] == []
    wait_for_files(proxy.cassette_dir, 1)
    ollama_upstream.stop()
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        r = http.post(
            f"{ollama_upstream.url}/api/chat",
            json={"model": "llama3.2:3b", "messages": MSG, "stream": False},
        )
        assert r.status_code == 200 and "x-cassette-file" in r.headers
        assert r.json()["message"]["content"] == live.message.content
        # Without "stream", the Ollama server streams: that is a different request.
        r = http.post(
            f"{ollama_upstream.url}/api/chat", json={"model": "llama3.2:3b", "messages": MSG}
        )
        assert r.status_code == 404 and "x-cassette-miss" in r.headers


@pytest.mark.parametrize("fail_mode", ["cut", "no_done"])
def test_an_unfinished_ollama_stream_leaves_no_cassette(proxy_factory, fail_mode):
    upstream = start_ollama_upstream("A", fail_mode=fail_mode, cut_after=2)
    try:
        proxy = proxy_factory(mode="record")
        client = ollama_client(proxy, upstream)
        objects = None
        with contextlib.suppress(httpx.HTTPError):  # cut: the connection dies mid-stream
            objects = list(client.generate(model="llama3.2:3b", prompt="x", stream=True))
        if fail_mode == "no_done":  # ends cleanly, but its last object is not done
            assert objects and not objects[-1].done
        else:
            assert objects is None
        # The proxy logs its decision where it would otherwise schedule the write.
        proxy.wait_for_log("not recorded")
        assert cassette_files(proxy.cassette_dir) == []
    finally:
        upstream.stop()


def test_ollama_error_is_recorded_and_replayed_with_its_status(proxy_factory, ollama_upstream):
    proxy = proxy_factory(mode="auto")
    client = ollama_client(proxy, ollama_upstream)
    with pytest.raises(ollama.ResponseError) as live:
        client.chat(model="missing", messages=MSG)
    assert live.value.status_code == 404
    (path,) = wait_for_files(proxy.cassette_dir, 1)
    doc = json.loads(path.read_text())
    assert doc["response"]["is_exception"] is True
    assert doc["response"]["exception_data"]["status_code"] == 404
    ollama_upstream.stop()
    with pytest.raises(ollama.ResponseError) as replayed:
        client.chat(model="missing", messages=MSG)
    assert replayed.value.status_code == 404
    assert replayed.value.error == live.value.error


def test_curl_style_error_without_stream_field_replays(proxy_factory, ollama_upstream):
    # No "stream" in the body: the server's default (a stream) applies, and a recorded
    # error must be found again under that same key.
    proxy = proxy_factory(mode="auto")
    body = {"model": "missing", "messages": MSG}
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        live = http.post(f"{ollama_upstream.url}/api/chat", json=body)
        assert live.status_code == 404
        wait_for_files(proxy.cassette_dir, 1)
        ollama_upstream.stop()
        replayed = http.post(f"{ollama_upstream.url}/api/chat", json=body)
    assert replayed.status_code == 404
    assert replayed.headers.get("x-cassette-file")
    assert replayed.json() == live.json()
