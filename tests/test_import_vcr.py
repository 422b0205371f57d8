"""`cassette-proxy import` reads VCR.py / pytest-recording cassettes, YAML and JSON.

The cassettes are written by VCR.py itself (the real library, both serializers) around
the real openai and ollama SDKs talking to real upstreams on loopback. Imported by the
real CLI, they must be the cassettes the recording proxy writes for the same traffic
(same files, same requests), streams split into chunks, repeated requests kept as
sequences, credentials redacted, and replay offline to the SDKs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from cliproxy import CLI
from conftest import Proxy, cassette_files, ollama_client, openai_client
from upstreams import OllamaUpstream, OpenAIUpstream

vcr = pytest.importorskip("vcr")

SECRET = "sk-vcr-secret-abcdef0123456789"


def import_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "import", *args], capture_output=True, text=True, timeout=120,
        env=dict(os.environ),
    )  # fmt: skip


def traffic(
    oa: openai.OpenAI, ol: ollama.Client, upstream: OpenAIUpstream, gzip: bool = False
) -> dict[str, Any]:
    """The same calls every time; what each answered. ``gzip``: the embeddings answer
    comes compressed (VCR.py's YAML keeps it so, as bytes; its JSON cannot hold bytes)."""
    got: dict[str, Any] = {}
    chat = oa.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "from vcr"}]
    )
    got["chat"] = chat.choices[0].message.content
    stream = oa.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "streamed"}], stream=True
    )
    got["stream"] = [c.choices[0].delta.content for c in stream if c.choices]
    upstream.configure(response_encoding="gzip" if gzip else None)
    got["embedding"] = (
        oa.embeddings.create(model="fake-embedding", input="vec", encoding_format="float")
        .data[0]
        .embedding
    )
    upstream.configure(response_encoding=None)
    got["polls"] = []
    for tag in ("running", "running", "done"):
        upstream.configure(tag=tag)
        answer = oa.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "done yet?"}]
        )
        got["polls"].append(answer.choices[0].message.content)
    upstream.configure(tag="A")
    parts = ol.chat(model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}], stream=True)
    got["ollama"] = [p.message.content for p in parts]
    return got


@pytest.mark.parametrize("serializer", ["yaml", "json"])
def test_vcr_cassettes_import_as_the_proxy_records(
    tmp_path: Path,
    proxy_factory: Callable[..., Proxy],
    upstream: OpenAIUpstream,
    ollama_upstream: OllamaUpstream,
    serializer: str,
) -> None:
    # What the recording proxy writes for this traffic.
    recorder = proxy_factory(mode="record", cassette_dir=tmp_path / "recorded")
    live = traffic(
        openai_client(recorder, upstream, api_key=SECRET),
        ollama_client(recorder, ollama_upstream),
        upstream,
    )
    recorder.stop()
    assert live["polls"] == [f"[{t}] echo: done yet?" for t in ("running", "running", "done")]
    recorded = {p.name: json.loads(p.read_text()) for p in cassette_files(tmp_path / "recorded")}

    # The same traffic recorded by VCR.py, straight to the upstreams.
    suffix = "yaml" if serializer == "yaml" else "json"
    tape = tmp_path / f"session.{suffix}"
    with vcr.VCR(serializer=serializer, record_mode="all").use_cassette(str(tape)):
        direct = traffic(
            openai_client(None, upstream, api_key=SECRET),
            ollama_client(None, ollama_upstream),
            upstream,
            gzip=serializer == "yaml",
        )
    assert direct == live
    written = tape.read_text()
    if serializer == "yaml":
        assert "!!binary" in written and "gzip" in written
    assert SECRET in written  # VCR.py kept the key: the import must not
    document = (
        vcr.serializers.yamlserializer.deserialize(written)
        if serializer == "yaml"
        else (json.loads(written))
    )
    assert len(document["interactions"]) == 7  # the polls three times, as sent

    folder = tmp_path / "imported"
    out = import_cli(str(tape), "-d", str(folder))
    assert out.returncode == 0, out.stderr
    assert "7 imported, 0 skipped" in out.stderr
    imported = {p.name: json.loads(p.read_text()) for p in cassette_files(folder)}
    assert sorted(imported) == sorted(recorded)  # sequence files included
    for name, doc in imported.items():
        assert doc["request"] == recorded[name]["request"], name
        assert doc["response"]["is_streaming"] == recorded[name]["response"]["is_streaming"]
        if doc["response"]["is_streaming"]:  # split into the same chunks
            assert len(doc["response"]["body"]) == len(recorded[name]["response"]["body"])
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path

    upstream.configure(tag="B")
    upstream.clear_requests()
    ollama_upstream.configure(tag="B")
    replay = proxy_factory(mode="replay", cassette_dir=folder)
    again = traffic(
        openai_client(replay, upstream), ollama_client(replay, ollama_upstream), upstream
    )
    assert again == live
    assert upstream.requests == []


def test_a_bad_vcr_file_is_one_clear_line(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("interactions:\n- request: !!python/object/apply:os.system ['touch pwned']\n")
    out = import_cli(str(evil), "-d", str(tmp_path / "c"))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"cassette-proxy: {evil}: ")
    assert "python/object/apply" in out.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "c").exists()

    broken = tmp_path / "broken.json"
    broken.write_text('{"interactions": [{"request": {"method": "GET"}}]}')
    out = import_cli(str(broken), "-d", str(tmp_path / "c"))
    assert out.returncode == 1 and "interaction 1:" in out.stderr
    assert not (tmp_path / "c").exists()


OLD_STYLE = """\
interactions:
- request:
    body: !!python/unicode '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    headers:
      Authorization: [!!python/str 'Bearer {secret}']
      Content-Type: [application/json]
      X-Filtered: [null]
    method: POST
    uri: https://llm.example.test/v1/chat/completions?api-key={secret}
  response:
    body: {string: !!python/unicode '{"id": "c1", "object": "chat.completion", "created": 1,
        "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "hello"}}]}'}
    headers:
      Content-Type: [application/json]
    status: {code: 200, message: OK}
version: 1
"""


def test_an_old_style_vcr_cassette_with_credentials(tmp_path: Path) -> None:
    """VCR.py 1.x wrote !!python/unicode and !!python/str tags; VCR.py keeps credentials
    it was not told to filter: they never reach the imported cassette."""
    tape = tmp_path / "old.yml"
    tape.write_text(OLD_STYLE.replace("{secret}", SECRET))
    folder = tmp_path / "c"
    out = import_cli(str(tape), "-d", str(folder))
    assert out.returncode == 0, out.stderr
    assert "1 imported, 0 skipped" in out.stderr
    [path] = cassette_files(folder)
    doc = json.loads(path.read_text())
    assert SECRET not in path.read_text() and SECRET not in out.stdout + out.stderr
    assert doc["request"]["body"]["messages"][0]["content"] == "hi"
    assert doc["response"]["body"]["__data__"]["choices"][0]["message"]["content"] == "hello"
    assert doc["request"]["url"] == "https://llm.example.test/v1/chat/completions?api-key=REDACTED"
