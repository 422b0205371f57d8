"""What the proxy writes (issue 3): every typed object loads through its ``__type__`` class,
and with ``cassette_normalize`` a re-recording of an unchanged answer is byte-identical."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from conftest import cassette_files, ollama_client, openai_client
from openai.types.completion import Completion
from openai.types.completion_choice import CompletionChoice
from pydantic import ValidationError

MSG = [{"role": "user", "content": "hello"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def settle(directory: Path, n: int, timeout: float = 10.0) -> list[Path]:
    """The cassette files once ``n`` exist and their content stopped changing."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        files = cassette_files(directory)
        state = [(f, f.stat().st_mtime_ns) for f in files]
        if len(files) >= n and state == previous:
            return files
        previous = state
        time.sleep(0.2)
    return cassette_files(directory)


def drive_every_family(proxy, openai_up, ollama_up) -> int:
    """One call of every kind the proxy records; returns how many cassettes to expect."""
    oa = openai_client(proxy, openai_up)
    oa.chat.completions.create(model="fake-model", messages=MSG)
    list(oa.chat.completions.create(model="fake-model", messages=MSG, stream=True))
    list(
        oa.chat.completions.create(
            model="fake-model",
            messages=MSG,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    oa.completions.create(model="fake-model", prompt="once")
    list(oa.completions.create(model="fake-model", prompt="twice", stream=True))
    oa.embeddings.create(model="fake-embedding", input=["a", "b"])  # base64 on the wire
    oa.embeddings.create(model="fake-embedding", input="c", encoding_format="float")
    list(oa.models.list())
    ol = ollama_client(proxy, ollama_up)
    ol.generate(model="llama3.2:3b", prompt="p")
    list(ol.generate(model="llama3.2:3b", prompt="p", stream=True))
    ol.chat(model="llama3.2:3b", messages=MSG)
    list(ol.chat(model="llama3.2:3b", messages=MSG, stream=True))
    list(ol.chat(model="llama3.2:3b", messages=MSG, tools=TOOLS, stream=True))
    ol.embed(model="all-minilm:l6-v2", input="x")
    ol.embeddings(model="all-minilm:l6-v2", prompt="x")
    ol.list()
    ol.ps()
    ol.show("llama3.2:3b")
    ol.pull("llama3.2:3b")
    list(ol.pull("llama3.2:3b", stream=True))
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        http.get(f"{ollama_up.url}/api/version").raise_for_status()
        # an unknown JSON endpoint: the raw family
        http.post(f"{openai_up.url}/v1/rerank", json={"q": "x"}).raise_for_status()
    return 22


def typed_objects(doc: dict[str, Any]) -> list[dict[str, Any]]:
    body = doc["response"]["body"]
    items = body if isinstance(body, list) else [body]
    return [x for x in items if isinstance(x, dict) and "__type__" in x]


def load_type(name: str) -> Any:
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)


class StreamedChoice(CompletionChoice):
    finish_reason: Literal["stop", "length", "content_filter"] | None = None  # type: ignore[assignment]


class StreamedCompletion(Completion):
    """A streamed completion chunk: ``finish_reason`` is null until the last one.

    The openai SDK parses stream chunks without validation, and its ``Completion`` type
    does not allow that null; llama-stack's recorder patches ``CompletionChoice`` the same
    way before loading. Every other object is validated by the vanilla class."""

    choices: list[StreamedChoice]  # type: ignore[assignment]


def validate(obj: dict[str, Any], streamed: bool) -> None:
    cls = load_type(obj["__type__"])
    try:
        cls.model_validate(obj["__data__"])
    except ValidationError as e:
        nulls = [err for err in e.errors() if err["loc"][-1] == "finish_reason"]
        if not (cls is Completion and streamed and len(nulls) == len(e.errors())):
            raise
        StreamedCompletion.model_validate(obj["__data__"])


@pytest.mark.parametrize("normalize", [False, True], ids=["as-recorded", "normalized"])
def test_every_written_cassette_loads_through_its_type(
    proxy_factory, upstream, ollama_upstream, normalize
):
    proxy = proxy_factory(mode="record", options={"cassette_normalize": normalize})
    expected = drive_every_family(proxy, upstream, ollama_upstream)
    files = settle(proxy.cassette_dir, expected)
    assert len(files) == expected
    seen: dict[str, int] = {}
    untyped = 0
    for path in files:
        doc = json.loads(path.read_text())
        objects = typed_objects(doc)
        if not objects:
            untyped += 1  # raw JSON (/api/version, /v1/rerank), stored with its status
            assert doc["response"]["status"] == 200
            continue
        for obj in objects:
            validate(obj, doc["response"]["is_streaming"])
            seen[obj["__type__"]] = seen.get(obj["__type__"], 0) + 1
    assert untyped == 2
    short = {name.rsplit(".", 1)[-1] for name in seen}
    assert short == {
        "ChatCompletion", "ChatCompletionChunk", "Completion", "CreateEmbeddingResponse", "Model",
        "GenerateResponse", "ChatResponse", "EmbedResponse", "EmbeddingsResponse",
        "ListResponse", "ProcessResponse", "ShowResponse", "ProgressResponse",
    }  # fmt: skip


def test_normalized_re_recording_is_byte_identical(
    proxy_factory, upstream, ollama_upstream, tmp_path
):
    def record(normalize: bool, folder: str) -> dict[str, bytes]:
        proxy = proxy_factory(
            mode="record",
            cassette_dir=tmp_path / folder,
            options={"cassette_normalize": normalize},
        )
        oa = openai_client(proxy, upstream)
        oa.chat.completions.create(model="fake-model", messages=MSG)
        list(oa.chat.completions.create(model="fake-model", messages=MSG, stream=True))
        ol = ollama_client(proxy, ollama_upstream)
        list(ol.generate(model="llama3.2:3b", prompt="p", stream=True))
        ol.chat(model="llama3.2:3b", messages=MSG)
        files = settle(proxy.cassette_dir, 4)
        proxy.stop()
        return {str(f.relative_to(proxy.cassette_dir)): f.read_bytes() for f in files}

    first, second = record(True, "norm-1"), record(True, "norm-2")
    assert len(first) == 4 and first == second
    text = b"".join(first.values())
    assert b'"id": "rec-' in text and b'"created_at": "1970-01-01T00:00:00.000000Z"' in text
    # Without the option the same answers differ (fresh ids, times, durations).
    raw_1, raw_2 = record(False, "raw-1"), record(False, "raw-2")
    assert raw_1.keys() == raw_2.keys() == first.keys()
    assert all(raw_1[name] != raw_2[name] for name in raw_1)
