"""Matching (issue 9: findings 1, 2, 4, 6, 8, 13a, 15b, 15c, "matching in one place";
issue 10.11: the miss message's size).

First the rules alone (``matching``'s pure functions), then each finding end to end: a
real mitmdump, real clients (the openai SDK, httpx, curl) and real upstreams on loopback.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cassette_proxy import eras, keys, matching
from cassette_proxy.cassette import Cassette, read_cassette, write_cassette
from cassette_proxy.families.openai import without_usage
from cassette_proxy.recording import new_recording
from cassette_proxy.store import CassetteStore, key_of
from conftest import PYTHON_BIN, cassette_files, openai_client, wait_for_files
from upstreams import answer_text, embedding_vector

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# A real llama-stack recording (a streamed tool call with ``"strict": null``) and its
# twin, built from it: the same request without ``strict``, a different answer. This is
# the shape of the 17 pairs llama-stack's own recordings hold (same test id, bodies
# differing only by a null field, different answers).
NULL_PAIR = FIXTURES / "null-pair"
WITH_NULL = NULL_PAIR / "8733b9b2c1c165ce97a2548f2eb8e221429318a57340229e19487fe9b1f6bf57.json"
WITHOUT_NULL = NULL_PAIR / "6b1ed28b34463cbdfc49c693c796361e09c75456aa86d0b823c37d007ea1ece7.json"
# OGX's watsonx recording: extra_body.project_id is the real project's, no query.
WATSONX = (
    FIXTURES
    / "llama-stack"
    / "4d5f7df57851017e001b77776bf2e65383c2f273f8fe1169042e0fc94f0d7dc2.json"
)
HEADER = "X-Cassette-Test-Id"
CHAT = "/v1/chat/completions"


def req(body: Any, query: tuple[tuple[str, str], ...] = (), path: str = CHAT) -> matching.Request:
    return matching.Request("POST", path, body, query)


def form(body: Any, query: tuple[tuple[str, str], ...] = (), path: str = CHAT) -> matching.Form:
    return matching.form(req(body, query, path))


# ---- the rules, one by one ----------------------------------------------------------------


def test_the_exact_key_keeps_nulls():
    tool = {"type": "function", "function": {"name": "f"}}
    nulled = {"type": "function", "function": {"name": "f", "strict": None}}
    a = matching.exact_key(req({"model": "m", "tools": [tool]}))
    b = matching.exact_key(req({"model": "m", "tools": [nulled]}))
    assert a != b


def test_null_insensitive_drops_nulls_at_any_depth():
    f = form({"a": None, "b": [{"c": None, "d": 1}], "e": {"f": None}})
    assert matching.null_insensitive(f).body == {"b": [{"d": 1}], "e": {}}


def test_stream_options_ignored_only_for_streamed_completions():
    streamed = form({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert matching.stream_options_ignored(streamed).body == {"model": "m", "stream": True}
    whole = form({"model": "m", "stream_options": {"include_usage": True}})
    assert matching.stream_options_ignored(whole) == whole
    other = form({"stream": True, "stream_options": {}}, path="/v1/echo")
    assert matching.stream_options_ignored(other) == other


def test_pull_model_ignored_only_for_ollama_pull():
    pull = form({"model": "llama3", "insecure": False}, path="/api/pull")
    assert "model" not in matching.pull_model_ignored(pull).body
    chat = form({"model": "llama3"}, path="/api/chat")
    assert matching.pull_model_ignored(chat) == chat


def test_project_id_ignored_in_body_and_query():
    f = form({"model": "m", "project_id": "real"}, (("project_id", "real"), ("v", "1")))
    g = matching.project_id_ignored(f)
    assert g.body == {"model": "m"} and g.query == (("v", "1"),)


def test_volatile_text_ignored_rewrites_what_llama_stack_rewrites():
    text = (
        "score: 0.8123, attributes: {'a': 1} document_id: "
        "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b <|0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b|> "
        "pi is 3.14159265"
    )
    other = text.replace("0.8123", "0.7").replace("{'a': 1}", "{'b': 2}").replace("0f1e", "aaaa")
    one = matching.volatile_text_ignored(form({"messages": [{"content": text}]}))
    two = matching.volatile_text_ignored(form({"messages": [{"content": other}]}))
    assert one == two
    assert "3.14159" in one.body["messages"][0]["content"]
    plain = form({"messages": [{"content": "no numbers here"}]})
    assert matching.volatile_text_ignored(plain) == plain


def test_query_not_recorded_is_a_request_side_rule():
    f = form({"model": "m"}, (("version", "2023-10-25"),))
    assert matching.query_not_recorded(f).query == ()
    rule = next(r for r in matching.LOOSE_RULES if r.name == "query_not_recorded")
    assert rule.recording(f) == f  # a recording keeps its query


def test_loose_keys_combine_the_rules_that_apply_fewest_first():
    body = {"model": "m", "project_id": "dummy", "seed": None}
    keys_ = matching.loose_keys(req(body, (("version", "1"),)))
    names = [n for _, n in keys_]
    assert names[0] == ""  # the exact key, among the recordings' loose forms
    assert names[1:4] == ["null_insensitive", "project_id_ignored", "query_not_recorded"]
    assert names[-1] == "null_insensitive+project_id_ignored+query_not_recorded"
    recorded = req({"model": "m"})
    assert matching.exact_key(recorded) in {k for k, _ in keys_}


def test_rules_tried_names_exact_and_the_loose_rules_that_apply():
    assert matching.rules_tried(req({"model": "m"})) == ["exact"]
    tried = matching.rules_tried(req({"model": "m", "seed": None}, (("v", "1"),)))
    assert tried == ["exact", "null_insensitive", "query_not_recorded"]


def test_file_stem_is_llama_stacks_hash_without_a_query_and_names_the_query_with_one():
    body = {"model": "m"}
    assert matching.file_stem("GET", "/v1/files", body, [], None) == keys.recording_hash(
        "GET", "/v1/files", body
    )
    batch = matching.file_stem("GET", "/v1/files", body, [("purpose", "batch")], None)
    tune = matching.file_stem("GET", "/v1/files", body, [("purpose", "fine-tune")], None)
    assert len({batch, tune, keys.recording_hash("GET", "/v1/files", body)}) == 3
    # A JSON null body is named as no body, as `cassette-proxy verify` reads it.
    assert matching.file_stem("POST", "/x", None, [], None) == keys.recording_hash("POST", "/x", {})


def test_upstream_of_a_recorded_url():
    assert matching.upstream_of("http://127.0.0.1:8000/v1/x") == "127.0.0.1:8000"
    assert matching.upstream_of("https://API.openai.com/v1/x") == "api.openai.com:443"
    assert matching.upstream_of("/v1/x") is None


def entry(name: str, test_id: str | None, upstream: str | None = None) -> Any:
    from cassette_proxy.store import Entry

    return Entry("k", Path(name), test_id, "POST", CHAT, upstream=upstream)


def test_choose_prefers_own_test_then_same_host_then_unscoped_then_lowest_test_id():
    own_far = entry("own-far", "t", "b:1")
    other_near = entry("other-near", "u", "a:1")
    unscoped_far = entry("unscoped-far", None, "b:1")
    other_far = entry("other-far", "a", "b:1")
    every = [other_far, unscoped_far, other_near, own_far]
    assert matching.choose(every, "t", "a:1") is own_far
    assert matching.choose(every, "x", "a:1") is other_near
    assert matching.choose([other_far, unscoped_far], "x", "a:1") is unscoped_far
    assert matching.choose([other_far, entry("z", "z", "b:1")], None, None) is other_far
    assert matching.choose([], "t") is None


def cassette(url: str, endpoint: str, body: Any, response: dict[str, Any]) -> Cassette:
    request = {"method": "POST", "url": url, "headers": {}, "body": body, "endpoint": endpoint}
    return Cassette.model_validate({"request": request, "response": response})


def test_post_means_get_only_in_llama_stacks_files():
    tags = {"body": {"__type__": "ollama._types.ListResponse", "__data__": {"models": []}}}
    llama_stack = cassette("http://localhost:11434/api/tags", "/api/tags", {}, tags)
    assert eras.written_by_llama_stack(llama_stack)
    assert eras.recorded_wire(llama_stack).method == "GET"
    sdk = cassette("http://h/v1/v1/models", "/v1/models", {}, {"body": []})
    assert eras.recorded_wire(sdk).method == "GET"
    data = {"type": "HTTPStatusError", "message": "405", "status_code": 405, "body": {}}
    error = {"body": None, "is_exception": True, "exception_data": data}
    stray = cassette("http://127.0.0.1:9/v1/models", "/v1/models", {}, error)
    assert not eras.written_by_llama_stack(stray)
    assert eras.recorded_wire(stray).method == "POST"
    raw = cassette("http://127.0.0.1:9/api/tags", "/api/tags", {}, {"status": 405, "body": {}})
    assert eras.recorded_wire(raw).method == "POST"


def test_without_usage_drops_the_usage_chunk_and_usage_values():
    chunks = [
        {"choices": [], "prompt_filter_results": []},  # Azure's first chunk: kept
        {"choices": [{"delta": {"content": "a"}}], "usage": None},
        {"choices": [{"delta": {}}], "usage": {"total_tokens": 3}},
        {"choices": [], "usage": {"total_tokens": 3}},
    ]
    assert without_usage(chunks) == [
        {"choices": [], "prompt_filter_results": []},
        {"choices": [{"delta": {"content": "a"}}], "usage": None},
        {"choices": [{"delta": {}}]},
    ]


def test_nearest_prefers_the_same_test_then_the_same_model_then_the_longest_prefix(tmp_path):
    def record(test_id: str | None, body: dict[str, Any]) -> None:
        path, c = new_recording(
            tmp_path, method="POST", path=CHAT, body=body, test_id=test_id,
            url="http://h" + CHAT, headers={}, response={"body": {}, "is_streaming": False},
        )  # fmt: skip
        write_cassette(path, c, durable=False)

    msgs = [{"role": "user", "content": c} for c in "abc"]
    record("other", {"model": "m", "messages": [{"role": "user", "content": "z"}, *msgs[1:]]})
    record("mine", {"model": "m", "messages": [*msgs[:2], {"role": "user", "content": "x"}]})
    record("third", {"model": "n", "messages": msgs})
    store = CassetteStore(tmp_path)
    store.load()
    near = matching.nearest(store, req({"model": "m", "messages": msgs}), "mine")
    assert near is not None and near[0].test_id == "mine"
    assert near[1] == "body.messages[2].content"
    # No recording of its own: the same model ("third" has another) before the longest
    # common prefix ("third" has every message the request has).
    near = matching.nearest(store, req({"model": "m", "messages": msgs}), "nobody")
    assert near is not None and near[0].test_id == "mine"


def test_find_names_the_rule_on_either_side(tmp_path):
    def record(body: dict[str, Any]) -> None:
        path, c = new_recording(
            tmp_path, method="POST", path=CHAT, body=body, test_id=None,
            url="http://h" + CHAT, headers={}, response={"body": {}, "is_streaming": False},
        )  # fmt: skip
        write_cassette(path, c, durable=False)

    record({"model": "m", "seed": None})
    store = CassetteStore(tmp_path)
    store.load()
    recorded = req({"model": "m", "seed": None})
    found = matching.find(store, recorded, matching.exact_key(recorded), None)
    assert found is not None and found.rule == "exact"
    # The recording holds a null the request leaves out: a rule on the recording's side.
    plain = req({"model": "m"})
    found = matching.find(store, plain, matching.exact_key(plain), None)
    assert found is not None and found.rule == "null_insensitive"
    # A default query on top: query_not_recorded is for llama-stack's files only (issue
    # 18.1), so the proxy's own recording does not answer it.
    asked = req({"model": "m", "seed": None, "n": None}, (("version", "1"),))
    assert matching.find(store, asked, matching.exact_key(asked), None) is None
    other = req({"model": "other"})
    assert matching.find(store, other, matching.exact_key(other), None) is None


# ---- end to end -------------------------------------------------------------------------------


def copy_into(folder: Path, *files: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def sdk_via(proxy: Any, base_url: str, headers: dict[str, str] | None = None, **kw: Any):
    verify = ssl.create_default_context(cafile=str(proxy.ca_cert))
    http = httpx.Client(
        proxy=proxy.url, verify=verify, trust_env=False, timeout=60, headers=headers or {}
    )
    return openai.OpenAI(
        base_url=base_url, api_key="sk-test-0000", http_client=http, max_retries=0, **kw
    )


def tool_args(client: openai.OpenAI, body: dict[str, Any]) -> str:
    kwargs = {k: v for k, v in body.items()}
    stream = client.chat.completions.create(**kwargs)
    args = ""
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            args += call.function.arguments or ""
    return args


def test_a_null_only_pair_each_replays_its_own_answer(proxy_factory, tmp_path):
    """Finding 1: two recordings of one test whose bodies differ only by ``strict: null``."""
    folder = copy_into(tmp_path / "pair", WITH_NULL, WITHOUT_NULL)
    proxy = proxy_factory(mode="replay", cassette_dir=folder)
    doc = json.loads(WITH_NULL.read_text())
    client = sdk_via(proxy, "http://0.0.0.0:11434/v1", {HEADER: doc["test_id"]})
    with_null = doc["request"]["body"]
    without_null = json.loads(WITHOUT_NULL.read_text())["request"]["body"]
    assert "strict" in with_null["tools"][0]["function"]
    assert "strict" not in without_null["tools"][0]["function"]
    assert tool_args(client, with_null) == '{"city":"Tokyo"}'
    assert tool_args(client, without_null) == '{"city":"Osaka"}'
    log = proxy.wait_for_log(WITHOUT_NULL.name)
    assert f"{WITH_NULL.name} (exact)" in log and f"{WITHOUT_NULL.name} (exact)" in log


def test_a_null_where_the_recording_has_no_field_matches_loosely(proxy_factory, tmp_path):
    """Finding 1, the loose side: the client sends ``null``, the recording left it out."""
    folder = copy_into(tmp_path / "one", WITHOUT_NULL)
    proxy = proxy_factory(mode="replay", cassette_dir=folder)
    doc = json.loads(WITH_NULL.read_text())
    client = sdk_via(proxy, "http://0.0.0.0:11434/v1", {HEADER: doc["test_id"]})
    assert tool_args(client, doc["request"]["body"]) == '{"city":"Osaka"}'
    proxy.wait_for_log(f"{WITHOUT_NULL.name} (loose: null_insensitive)")


def curl(proxy: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "", "-x", proxy.url, "--max-time", "30", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def verify(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PYTHON_BIN / "cassette-proxy"), "verify", str(folder)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_two_queries_get_two_files_and_each_replays_its_own(proxy_factory, upstream):
    """Finding 2: ``?purpose=batch`` and ``?purpose=fine-tune`` are two keys and two files."""
    recorder = proxy_factory(mode="record")
    purposes = ("batch", "fine-tune")
    with httpx.Client(proxy=recorder.url, trust_env=False, timeout=30) as http:
        for purpose in purposes:
            r = http.get(f"{upstream.url}/v1/files", params={"purpose": purpose})
            assert r.status_code == 200 and r.json()["path"].endswith(purpose)
        assert http.get(f"{upstream.url}/v1/models").status_code == 200
    files = wait_for_files(recorder.cassette_dir, 3)
    recorder.stop()
    assert len(files) == 3
    # Without a query, the name is llama-stack's hash, as before.
    assert keys.recording_hash("GET", "/v1/models", {}) + ".json" in {f.name for f in files}
    checked = verify(recorder.cassette_dir)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "does not match" not in checked.stdout + checked.stderr
    replay = proxy_factory(mode="replay")
    for purpose in purposes:
        r = curl(replay, f"{upstream.url}/v1/files?purpose={purpose}")
        assert r.returncode == 0 and json.loads(r.stdout)["path"].endswith(purpose)


def test_one_embedding_replays_in_the_encoding_each_request_asks_for(proxy_factory, upstream):
    """Finding 4: base64 to the openai SDK, then floats to httpx, from one cassette."""
    recorder = proxy_factory(mode="record")
    openai_client(recorder, upstream).embeddings.create(model="fake-embedding", input="hi")
    wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    replay = proxy_factory(mode="replay")
    vector = embedding_vector("A", "hi")
    got = openai_client(replay, upstream).embeddings.create(model="fake-embedding", input="hi")
    assert got.data[0].embedding == pytest.approx(vector, rel=1e-6)
    body = {"model": "fake-embedding", "input": "hi"}
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        floats = http.post(f"{upstream.url}/v1/embeddings", json=body).json()
        assert floats["data"][0]["embedding"] == pytest.approx(vector, rel=1e-6)
        b64 = {**body, "encoding_format": "base64"}
        encoded = http.post(f"{upstream.url}/v1/embeddings", json=b64).json()
        assert isinstance(encoded["data"][0]["embedding"], str)
        again = http.post(f"{upstream.url}/v1/embeddings", json=body).json()
        assert isinstance(again["data"][0]["embedding"], list)


def test_a_stray_post_to_models_never_answers_the_get(proxy_factory, upstream):
    """Finding 6: ``POST /v1/models {}`` answered 405 is recorded as a POST."""
    upstream.configure(fail_mode="status", fail_status=405, fail_times=1)
    recorder = proxy_factory(mode="record")
    r = curl(recorder, "-X", "POST", "-H", "content-type: application/json", "-d", "{}",
             "-o", "/dev/null", "-w", "%{http_code}", f"{upstream.url}/v1/models")  # fmt: skip
    assert r.stdout == "405"
    files = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    assert key_of(read_cassette(files[0]))[0] == keys.request_key("POST", "/v1/models", {})
    replay = proxy_factory(mode="replay")
    got = curl(replay, "-i", f"{upstream.url}/v1/models")
    assert " 404" in got.stdout.splitlines()[0] and "x-cassette-miss" in got.stdout.lower()
    post = curl(replay, "-X", "POST", "-H", "content-type: application/json", "-d", "{}",
                "-o", "/dev/null", "-w", "%{http_code}", f"{upstream.url}/v1/models")  # fmt: skip
    assert post.stdout == "405"


def test_a_usage_recording_replays_without_usage_to_a_request_that_did_not_ask(
    proxy_factory, upstream
):
    """Finding 8: the README's one-liner (``c.choices[0].delta.content``) works."""
    recorder = proxy_factory(mode="record")
    messages = [{"role": "user", "content": "count"}]
    client = openai_client(recorder, upstream)
    stream = client.chat.completions.create(
        model="fake-model", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    assert [c for c in stream][-1].usage is not None
    wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    replay = proxy_factory(mode="replay")
    client = openai_client(replay, upstream)
    chunks = list(
        client.chat.completions.create(model="fake-model", messages=messages, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == answer_text("A", "count")
    assert all(c.usage is None for c in chunks)
    replay.wait_for_log("(loose: stream_options_ignored)")
    asked = client.chat.completions.create(
        model="fake-model", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    last = list(asked)[-1]
    assert last.choices == [] and last.usage is not None


def test_a_json_null_body_is_recorded_and_replays(proxy_factory, upstream):
    """Finding 13a: the live key and the recording agree on a ``null`` body."""
    recorder = proxy_factory(mode="record")
    headers = {"content-type": "application/json"}
    with httpx.Client(proxy=recorder.url, trust_env=False, timeout=30) as http:
        live = http.post(f"{upstream.url}/v1/thing", content=b"null", headers=headers)
    assert live.status_code == 200
    files = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    assert len(files) == 1
    checked = verify(recorder.cassette_dir)
    assert checked.returncode == 0 and "does not match" not in checked.stdout
    replay = proxy_factory(mode="replay")
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        again = http.post(f"{upstream.url}/v1/thing", content=b"null", headers=headers)
    assert again.status_code == 200 and again.json() == live.json()
    assert again.headers["x-cassette-file"] == files[0].name


def test_ogx_watsonx_recording_replays_under_a_dummy_project_and_a_default_query(
    proxy_factory, tmp_path
):
    """Finding 15b: recorded with a real project_id and no query; CI sends a dummy
    project and the watsonx client's ``?version=``."""
    folder = copy_into(tmp_path / "ogx", WATSONX)
    proxy = proxy_factory(mode="replay", cassette_dir=folder)
    doc = json.loads(WATSONX.read_text())
    client = sdk_via(
        proxy,
        "https://us-south.ml.cloud.ibm.com/ml/v1",
        {HEADER: doc["test_id"]},
        default_query={"version": "2023-10-25"},
    )
    kwargs = {k: v for k, v in doc["request"]["body"].items() if k != "extra_body"}
    chunks = list(client.chat.completions.create(**kwargs, extra_body={"project_id": "ci-dummy"}))
    recorded = [c["__data__"] for c in doc["response"]["body"]]
    assert [c.model_dump(mode="json", exclude_unset=True) for c in chunks] == recorded
    proxy.wait_for_log("(loose: project_id_ignored+query_not_recorded)")


def test_host_affinity_same_request_recorded_against_two_upstreams(
    proxy_factory, upstream_factory, tmp_path
):
    """Design: the same request recorded against two upstreams (two folders merged into
    one) replays each host's own answer, model lists included: a list is merged with the
    lists of its own upstream only (issue 18.4)."""
    a = upstream_factory("A", models=["shared", "only-a"])
    b = upstream_factory("B", models=["shared", "only-b"])
    merged = tmp_path / "merged"
    messages = [{"role": "user", "content": "hello"}]
    for up in (a, b):
        recorder = proxy_factory(mode="record", cassette_dir=tmp_path / up.tag)
        client = openai_client(recorder, up)
        client.chat.completions.create(model="fake-model", messages=messages)
        client.models.list()
        wait_for_files(recorder.cassette_dir, 2)
        recorder.stop()
        shutil.copytree(recorder.cassette_dir, merged / up.tag)
    replay = proxy_factory(mode="replay", cassette_dir=merged)
    for up in (a, b):
        client = openai_client(replay, up)
        got = client.chat.completions.create(model="fake-model", messages=messages)
        assert got.choices[0].message.content == answer_text(up.tag, "hello")
        models = {m.id: m.owned_by for m in client.models.list()}
        assert sorted(models) == sorted(["shared", f"only-{up.tag.lower()}"])
        assert set(models.values()) == {f"fake-{up.tag}"}


def test_the_nearest_recording_is_the_requests_own_test(proxy_factory, upstream):
    """Finding 15c: the own test's recording differing at messages[2] beats another
    test's differing at messages[0] that shares more top-level fields."""

    def user(text: str) -> dict[str, str]:
        return {"role": "user", "content": text}

    recorder = proxy_factory(mode="record")
    url = f"{upstream.url}/v1/chat/completions"
    theirs = {"model": "m", "messages": [user("x"), user("b"), user("c")], "temperature": 0.5}
    mine = {"model": "m", "messages": [user("a"), user("b"), user("c")], "temperature": 0.7}
    with httpx.Client(proxy=recorder.url, trust_env=False, timeout=30) as http:
        assert http.post(url, json=theirs, headers={HEADER: "t-other"}).status_code == 200
        assert http.post(url, json=mine, headers={HEADER: "t-mine"}).status_code == 200
    wait_for_files(recorder.cassette_dir, 2)
    recorder.stop()
    replay = proxy_factory(mode="replay")
    asked = {"model": "m", "messages": [user("a"), user("b"), user("d")], "temperature": 0.5}
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        r = http.post(url, json=asked, headers={HEADER: "t-mine"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["nearest"]["file"].startswith("t-mine")
    assert error["nearest"]["first_difference"] == "body.messages[2].content"


def test_a_miss_counts_test_ids_and_shows_a_few(proxy_factory, tmp_path):
    """Issue 10.11: 30 tests recorded the path; the miss says whether the request's own
    test has recordings, counts the others and names five; it says which rules it tried."""
    folder = tmp_path / "many"
    for i in range(30):
        body = {"model": "m", "messages": [{"role": "user", "content": f"prompt {i}"}]}
        path, c = new_recording(
            folder, method="POST", path=CHAT, body=body, test_id=f"tests/t.py::test_{i:02d}",
            url="http://127.0.0.1:9" + CHAT, headers={}, response={"body": {}, "status": 200},
        )  # fmt: skip
        write_cassette(path, c, durable=False)
    assert len(cassette_files(folder)) == 30
    replay = proxy_factory(mode="replay", cassette_dir=folder)
    asked = {"model": "m", "messages": [{"role": "user", "content": "new"}], "seed": None}
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        r = http.post("http://127.0.0.1:9" + CHAT, json=asked, headers={HEADER: "tests/t.py::x"})
        own = http.post(
            "http://127.0.0.1:9" + CHAT, json=asked, headers={HEADER: "tests/t.py::test_03"}
        )
    error = r.json()["error"]
    assert error["rules_tried"] == ["exact", "null_insensitive"]
    assert len(error["test_ids"]) == 5 and error["other_test_ids"] == 30
    assert error["test_id_recordings"] == 0
    message = error["message"]
    assert "this request's test id: tests/t.py::x (has no recording for this path)" in message
    assert "30 other test ids recorded for this path" in message and "(+25 more)" in message
    assert "test_29" not in message and len(message) < 1200
    own_error = own.json()["error"]
    assert own_error["test_id_recordings"] == 1 and own_error["other_test_ids"] == 29
    assert "tests/t.py::test_03 (has 1 recording(s) for this path)" in own_error["message"]
    assert "tried exact, null_insensitive" in message
