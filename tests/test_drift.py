"""`cassette-proxy drift`: cassettes recorded through a real `cassette-proxy run` from a
real upstream on loopback, then checked against that upstream while it answers as it
did, after its answers change shape, when it fails, and when it is gone."""

from __future__ import annotations

import hashlib
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cassette_proxy import drift
from cliproxy import CLI, start_cli_proxy
from conftest import cassette_files, ollama_client, openai_client
from upstreams import OllamaUpstream, OpenAIUpstream


def run_drift(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run(
        [str(CLI), "drift", *args], capture_output=True, text=True, timeout=120,
        env=base | (env or {}),
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def record(tmp_path: Path, upstream: OpenAIUpstream) -> Path:
    """Four cassettes: a chat, a streamed chat, embeddings, the model list."""
    folder = tmp_path / "cassettes"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = openai_client(proxy.url, upstream)
    messages = [{"role": "user", "content": "how are you"}]
    client.chat.completions.create(model="fake-model", messages=messages)
    stream = client.chat.completions.create(model="fake-model", messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    client.embeddings.create(model="fake-embedding", input="x", encoding_format="float")
    assert [m.id for m in client.models.list()] == ["fake-model", "fake-embedding"]
    assert proxy.stop() == 0
    assert len(cassette_files(folder)) == 4
    return folder


def reshaped(obj: Any) -> Any:
    """The upstream after an upgrade: chat answers lose `created`, gain `service_tier`,
    report total_tokens as a string; stream chunks gain a reasoning delta."""
    if not isinstance(obj, dict) or not str(obj.get("object", "")).startswith("chat.completion"):
        return obj
    obj = {k: v for k, v in obj.items() if k != "created"}
    obj["service_tier"] = "default"
    if isinstance(obj.get("usage"), dict):
        obj["usage"] = {**obj["usage"], "total_tokens": str(obj["usage"]["total_tokens"])}
    for choice in obj.get("choices") or []:
        if "delta" in choice:
            choice["delta"] = {**choice["delta"], "reasoning": "hm"}
    return obj


def test_no_drift_then_drift_by_field_and_type_then_ignored(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder = record(tmp_path, upstream)
    before = snapshot(folder)
    # A proxy variable pointing nowhere: drift goes straight to the upstream.
    dead = {"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}

    same = run_drift("-d", str(folder), env=dead)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout == ""
    assert same.stderr.strip() == "4 cassette(s): 0 drifted, 4 unchanged"

    upstream.configure(reshape=reshaped)
    changed = run_drift("-d", str(folder), env=dead)
    assert changed.returncode == 1, changed.stderr
    blocks = _blocks(changed.stdout, folder)
    assert len(blocks) == 2  # the chat and the stream; embeddings and models unchanged
    whole = next(lines for head, lines in blocks.items() if "stream" not in head)
    assert whole == [
        "-created",
        "+service_tier (string)",
        "usage.total_tokens: int -> string",
    ]
    streamed = next(lines for head, lines in blocks.items() if "stream" in head)
    assert streamed == ["+choices[].delta.reasoning (string)", "-created", "+service_tier (string)"]
    assert "2 drifted, 2 unchanged" in changed.stderr

    quiet = run_drift(
        "-d", str(folder), "--ignore", "created", "--ignore", "service_tier",
        "--ignore", "usage", "--ignore", "choices.delta.reasoning",
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stdout
    assert snapshot(folder) == before  # drift never writes


def _blocks(out: str, folder: Path) -> dict[str, list[str]]:
    """`drift  FILE  URL` heads and their indented change lines; a streamed cassette's
    head is marked by the streamed chat's request (it asked for stream: true)."""
    blocks: dict[str, list[str]] = {}
    head = ""
    for line in out.splitlines():
        if line.startswith("drift  "):
            file = line.split()[1]
            streamed = '"stream": true' in (folder / file).read_text()
            head = f"{file} {'stream' if streamed else 'whole'}"
            blocks[head] = []
        elif line.startswith("  "):
            blocks[head].append(line.strip())
    return blocks


def test_status_upstream_credentials_and_a_dead_upstream(
    tmp_path: Path, upstream: OpenAIUpstream, upstream_factory: Any
) -> None:
    folder = record(tmp_path, upstream)
    chat = [p for p in cassette_files(folder) if '"messages"' in p.read_text()]

    other = upstream_factory("B")
    upstream.clear_requests()
    env_key = run_drift(*map(str, chat), "--upstream", other.url, env={"OPENAI_API_KEY": "sk-env"})
    assert env_key.returncode == 0, env_key.stdout + env_key.stderr
    assert upstream.requests == []  # --upstream: the recorded host is not asked
    sent = other.requests_to("/v1/chat/completions")
    assert len(sent) == 2 and {r.headers["authorization"] for r in sent} == {"Bearer sk-env"}

    other.clear_requests()
    header = run_drift(
        *map(str, chat), "--upstream", other.url, "--header", "Authorization: Bearer sk-flag",
        env={"OPENAI_API_KEY": "sk-env"},
    )  # fmt: skip
    assert header.returncode == 0
    assert {r.headers["authorization"] for r in other.requests} == {"Bearer sk-flag"}
    other.clear_requests()
    assert run_drift(*map(str, chat), "--upstream", other.url).returncode == 0
    assert all("authorization" not in r.headers for r in other.requests)  # none given

    other.configure(fail_mode="status", fail_status=503)
    failing = run_drift(*map(str, chat), "--upstream", other.url)
    assert failing.returncode == 1
    assert failing.stdout.count("  status: 200 -> 503") == 2

    other.stop()
    gone = run_drift(*map(str, chat), "--upstream", other.url)
    assert gone.returncode == 1 and "upstream not reachable" in gone.stdout
    assert "2 not checked" in gone.stderr


def test_an_ollama_stream_is_compared_chunk_by_chunk(
    tmp_path: Path, ollama_upstream: OllamaUpstream
) -> None:
    folder = tmp_path / "cassettes"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = ollama_client(proxy.url, ollama_upstream)
    parts = client.chat(model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}],
                        stream=True)  # fmt: skip
    assert "".join(p.message.content or "" for p in parts)
    proxy.stop()
    [cassette] = cassette_files(folder)
    assert run_drift(str(cassette)).returncode == 0

    def renamed(obj: Any) -> Any:
        if isinstance(obj, dict) and obj.get("done") is True:
            obj = {**obj, "eval_count": str(obj.get("eval_count"))}
        return obj

    ollama_upstream.configure(reshape=renamed)
    out = run_drift(str(cassette))
    assert out.returncode == 1
    assert out.stdout.splitlines()[1:] == ["  eval_count: int -> string"]


def test_bad_usage_is_exit_2(tmp_path: Path) -> None:
    assert run_drift("-d", str(tmp_path), "--header", "no colon").returncode == 2
    assert run_drift("-d", str(tmp_path), "--upstream", "ftp://x").returncode == 2
    assert run_drift(str(tmp_path / "missing.json")).returncode == 2


@pytest.mark.parametrize(
    ("recorded", "live", "changes"),
    [
        ({"a": 1, "b": {"c": "x"}}, {"a": 1.5, "b": {"c": "y"}}, []),  # values, int/float
        ({"a": None}, {"a": "now text"}, []),  # null is no type
        ({"a": 1}, {"a": 1, "b": {"c": 1}}, ["+b (object)"]),  # one line for a new object
        ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": True}]}, ["+a[].y (bool)"]),
        ({"a": [], "b": 1}, {"a": [1], "b": [1]}, ["+a[] (int)", "b: int -> array"]),
        ({"u": {"p": 1, "q": 2}}, {}, ["-u"]),
        ({"a": 1, "refusal": None}, {"a": 1}, []),  # null recorded, absent live
        ({"a": 1}, {"a": 1, "extra": None}, []),
    ],
)
def test_compare_shapes(recorded: Any, live: Any, changes: list[str]) -> None:
    assert drift.compare(drift.shape_of(recorded), drift.shape_of(live)) == changes


def test_ignore_paths() -> None:
    assert drift.ignored("usage.total_tokens", ["usage"])
    assert drift.ignored("choices[].logprobs.content", ["choices.logprobs"])
    assert drift.ignored("data[].id", ["*.id"])
    assert not drift.ignored("usage_extra", ["usage"])


def test_a_progress_bar_on_a_terminal_only(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    folder = record(tmp_path, upstream)
    piped = run_drift("-d", str(folder))
    assert piped.stderr == "4 cassette(s): 0 drifted, 4 unchanged\n"  # no bar when piped

    leader, follower = pty.openpty()  # stderr on a terminal
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.Popen([str(CLI), "drift", "-d", str(folder)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not data:
            break
        seen += data
    os.close(leader)
    assert proc.wait(60) == 0
    text = seen.decode(errors="replace")
    assert "drift" in text and "100%" in text
    assert "4 cassette(s): 0 drifted, 4 unchanged" in text
