"""Test scoping with ``X-Cassette-Test-Id`` (issue 3), through a real mitmdump.

A client names its test in the header; the proxy removes it before forwarding, writes
it as the cassette's ``test_id`` in a folder derived from it, and on replay prefers that
test's cassettes, then unscoped ones, then (deterministically) any other test's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from cassette_proxy import keys
from cassette_proxy.store import safe_folder
from conftest import cassette_files, openai_client, wait_for_files
from hypothesis import given, settings
from hypothesis import strategies as st
from upstreams import answer_text

HEADER = "X-Cassette-Test-Id"
T1 = "tests/integration/test_chat.py::test_one[ollama/llama3.2:3b]"
T2 = "tests/integration/test_chat.py::test_two"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "scoped"}]}


def chat(proxy, upstream, test_id: str | None) -> str:
    headers = {HEADER: test_id} if test_id is not None else None
    client = openai_client(proxy, upstream, default_headers=headers)
    return client.chat.completions.create(**CHAT).choices[0].message.content


def test_header_is_stripped_and_becomes_the_test_id_and_folder(proxy_factory, upstream):
    proxy = proxy_factory(mode="record")
    assert chat(proxy, upstream, T1) == answer_text("A", "scoped")
    (sent,) = upstream.requests_to("/v1/chat/completions")
    assert HEADER.lower() not in sent.headers
    (path,) = wait_for_files(proxy.cassette_dir, 1)
    doc = json.loads(path.read_text())
    assert doc["test_id"] == T1
    assert list(doc)[0] == "test_id"  # the format's key order
    assert path.parent == Path(proxy.cassette_dir) / safe_folder(T1)
    assert path.name == keys.recording_hash("POST", "/v1/chat/completions", CHAT, T1) + ".json"
    assert doc["request"]["headers"] == {}


def test_replay_prefers_own_then_unscoped_then_any_test(proxy_factory, upstream_factory):
    # The same request recorded by three "tests", each from an upstream answering differently.
    answers = {None: "A", T1: "B", T2: "C"}
    for test_id, tag in answers.items():
        up = upstream_factory(tag)
        recorder = proxy_factory(mode="record")
        assert chat(recorder, up, test_id) == answer_text(tag, "scoped")
        recorder.stop()
        up.stop()
    folder = Path(recorder.cassette_dir)
    assert len(cassette_files(folder)) == 3

    replay = proxy_factory(mode="replay")
    target = "http://127.0.0.1:9"  # never contacted in replay mode
    assert chat(replay, target, T1) == answer_text("B", "scoped")
    assert chat(replay, target, T2) == answer_text("C", "scoped")
    assert chat(replay, target, None) == answer_text("A", "scoped")  # unscoped first
    assert chat(replay, target, "tests/other.py::test_x") == answer_text("A", "scoped")
    replay.stop()

    # Recorded only under test ids: still answered, always by the same one (sorted ids).
    for path in cassette_files(folder):
        if json.loads(path.read_text()).get("test_id") is None:
            path.unlink()
    replay = proxy_factory(mode="replay")
    assert {chat(replay, target, None) for _ in range(3)} == {answer_text("B", "scoped")}
    assert chat(replay, target, T2) == answer_text("C", "scoped")


def test_a_miss_lists_the_test_ids_recorded_for_the_path(proxy_factory, upstream):
    recorder = proxy_factory(mode="record")
    chat(recorder, upstream, T1)
    chat(recorder, upstream, T2)
    wait_for_files(recorder.cassette_dir, 2)
    recorder.stop()
    replay = proxy_factory(mode="replay")
    other = {**CHAT, "messages": [{"role": "user", "content": "never recorded"}]}
    with httpx.Client(proxy=replay.url, trust_env=False) as http:
        r = http.post(
            "http://127.0.0.1:9/v1/chat/completions", json=other, headers={HEADER: "mine"}
        )
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["test_ids"] == sorted([T1, T2])
    assert T1 in error["message"] and T2 in error["message"]
    assert "this request's test id: mine" in error["message"]


@pytest.mark.parametrize(
    "test_id",
    [
        "../../../../etc/passwd",
        "/etc/passwd",
        "..",
        ".",
        "a/../../b",
        "x\x00y",
        "\\..\\..\\windows",
        "t" * 5000,
        "tests/a.py::test[" + "é" * 40 + "]",
    ],
)
def test_safe_folder_stays_inside_cassette_dir(tmp_path, test_id):
    root = tmp_path / "cassettes"
    name = safe_folder(test_id)
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert len(name.encode()) <= 100
    folder = (root / name).resolve()
    assert folder.parent == root.resolve()
    folder.mkdir(parents=True)  # a real file system accepts it


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_safe_folder_property(test_id):
    name = safe_folder(test_id)
    assert os.path.basename(name) == name and name not in (".", "..")
    assert not name.startswith(".") and "\x00" not in name and len(name) <= 90
    assert safe_folder(test_id) == name  # stable across runs


def test_distinct_test_ids_get_distinct_folders():
    # Ids that slug alike (only punctuation differs) still get their own folder.
    assert safe_folder("tests/a.py::t[1]") != safe_folder("tests/a.py::t(1)")


def test_a_hostile_test_id_header_cannot_write_outside(proxy_factory, upstream, tmp_path):
    proxy = proxy_factory(mode="record", cassette_dir=tmp_path / "deep" / "cassettes")
    hostile = "../../../escaped"
    assert chat(proxy, upstream, hostile) == answer_text("A", "scoped")
    (path,) = wait_for_files(proxy.cassette_dir, 1)
    root = Path(proxy.cassette_dir).resolve()
    assert path.resolve().is_relative_to(root)
    assert json.loads(path.read_text())["test_id"] == hostile  # kept verbatim in the file
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()


def test_an_empty_header_is_no_test_id(proxy_factory, upstream):
    proxy = proxy_factory(mode="record")
    chat(proxy, upstream, "")
    (path,) = wait_for_files(proxy.cassette_dir, 1)
    assert path.parent == Path(proxy.cassette_dir)
    assert "test_id" not in json.loads(path.read_text())
