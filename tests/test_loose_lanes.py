"""Issue 18, items 1-5: loose rules in their lane, paging words, stream_options,
model lists per upstream, Gemini's native model list.

Real mitmdump processes, real clients (openai SDK, httpx) and real upstreams on
loopback; a few pure-function checks beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest
from cassette_proxy import matching
from cassette_proxy.redact import is_credential_name, keyed_query
from conftest import cassette_files, openai_client, wait_for_files
from upstreams import answer_text

CHAT = "/v1/chat/completions"


def get(proxy: Any, url: str, **kw: Any) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        return http.get(url, **kw)


def chat(proxy: Any, upstream: Any, text: str) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        return http.post(upstream.url + CHAT, json=body)


def llama_stack_file(folder: Path, name: str, method: str, url: str, endpoint: str,
                     body: Any, answer: Any) -> Path:  # fmt: skip
    """A recording as llama-stack's recorder writes it: an SDK call (base URL + the
    endpoint label, so the version segment doubles), no query, a raw answer."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "request": {"method": method, "url": url, "headers": {}, "body": body,
                    "endpoint": endpoint, "model": ""},
        "response": {"body": answer, "is_streaming": False, "status": 200},
        "id_normalization_mapping": {},
    }  # fmt: skip
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


# ---- item 1: query_not_recorded and volatile_text_ignored stay in their lane ----------------


def test_a_page_never_recorded_is_a_miss_not_the_first_page(proxy_factory, upstream):
    recorder = proxy_factory(mode="record")
    first = get(recorder, f"{upstream.url}/v1/files")
    assert first.status_code == 200 and first.json()["path"] == "/v1/files"
    wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    replay = proxy_factory(mode="replay")
    assert get(replay, f"{upstream.url}/v1/files").json() == first.json()
    page2 = get(replay, f"{upstream.url}/v1/files", params={"after": "file-2"})
    assert page2.status_code == 404 and "x-cassette-miss" in page2.headers
    # A default query the proxy recorded without is not forgotten for its own files either.
    versioned = get(replay, f"{upstream.url}/v1/files", params={"version": "2024"})
    assert versioned.status_code == 404


def test_a_llama_stack_recording_forgets_a_default_query_but_never_a_page(proxy_factory, tmp_path):
    folder = tmp_path / "ls"
    answer = {"object": "list", "data": [{"id": "file-1"}], "has_more": True}
    llama_stack_file(folder, "files", "GET", "http://127.0.0.1:9/v1/v1/files", "/v1/files",
                     {}, answer)  # fmt: skip
    replay = proxy_factory(mode="replay", cassette_dir=folder)
    hit = get(replay, "http://127.0.0.1:9/v1/files", params={"version": "2023-10-25"})
    assert hit.status_code == 200 and hit.json() == answer
    replay.wait_for_log("(loose: query_not_recorded)")
    for paging in ({"after": "file-1"}, {"version": "1", "page": "2"}, {"cursor": "c2"},
                   {"limit": "5"}, {"order": "asc"}, {"before": "file-9"}):  # fmt: skip
        miss = get(replay, "http://127.0.0.1:9/v1/files", params=paging)
        assert miss.status_code == 404, paging


def test_credit_scores_and_long_decimals_are_prompts_not_search_noise(proxy_factory, upstream):
    recorder = proxy_factory(mode="record")
    recorded = ["What does a credit score: 580 mean?", "Is 1.000004 > 1.000001?"]
    for text in recorded:
        assert chat(recorder, upstream, text).status_code == 200
    wait_for_files(recorder.cassette_dir, 2)
    recorder.stop()
    replay = proxy_factory(mode="replay")
    for text in recorded:
        again = chat(replay, upstream, text)
        assert again.json()["choices"][0]["message"]["content"] == answer_text("A", text)
    for text in ("What does a credit score: 820 mean?", "Is 1.000001 > 1.000004?"):
        r = chat(replay, upstream, text)
        assert r.status_code == 404, (text, r.text[:300])


def test_volatile_text_still_matches_llama_stack_file_search_results(proxy_factory, tmp_path):
    folder = tmp_path / "ls"
    uuid = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
    prompt = f"[1] document_id: {uuid}, score: 0.8123 text"
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    answer = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "found"}}]}  # fmt: skip
    llama_stack_file(folder, "search", "POST", "http://127.0.0.1:9/v1/v1/chat/completions",
                     CHAT, body, answer)  # fmt: skip
    replay = proxy_factory(mode="replay", cassette_dir=folder)
    asked = {**body, "messages": [{"role": "user", "content": prompt.replace("0.8123", "0.79")}]}
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        r = http.post("http://127.0.0.1:9" + CHAT, json=asked)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "found"
    replay.wait_for_log("(loose: volatile_text_ignored)")


def test_the_rules_themselves_keep_paging_and_plain_scores():
    f = matching.form(matching.Request("GET", "/v1/files", {}, (("after", "x"), ("v", "1"))))
    assert matching.query_not_recorded(f).query == (("after", "x"),)
    a = matching.form(matching.Request("POST", CHAT, {"m": "credit score: 580"}))
    b = matching.form(matching.Request("POST", CHAT, {"m": "credit score: 820"}))
    assert matching.volatile_text_ignored(a) != matching.volatile_text_ignored(b)
    assert matching.LLAMA_STACK_RULES == {"volatile_text_ignored", "query_not_recorded"}


# ---- item 2: paging words are not credential words ------------------------------------------


@pytest.mark.parametrize(
    "name", ["pageToken", "nextToken", "next_token", "continuation_token", "nextPageToken",
             "page_token", "NextContinuationToken"],
)  # fmt: skip
def test_paging_tokens_are_not_credentials(name):
    assert not is_credential_name(name)
    assert keyed_query([(name, "p2")]) == [(name, "p2")]


@pytest.mark.parametrize(
    "name", ["token", "access_token", "refresh_token", "session_token", "apiKey", "x-api-key"]
)
def test_credential_tokens_still_are(name):
    assert is_credential_name(name)


# ---- items 2 and 5: Gemini's native model list, paged by pageToken ---------------------------


def gemini_models(obj: Any) -> Any:
    """The fake upstream's echo of an unknown route, turned into Gemini's native
    ``GET /v1beta/models`` answer: two pages, chained by ``nextPageToken``."""
    if not (isinstance(obj, dict) and obj.get("object") == "fake.unknown"):
        return obj
    url = urlsplit(obj["path"])
    if not url.path.endswith("/v1beta/models"):
        return obj
    page = parse_qs(url.query).get("pageToken", [""])[0]
    if page == "":
        return {"models": [{"name": "models/gemini-a"}], "nextPageToken": "tok-page-2"}
    if page == "tok-page-2":
        return {"models": [{"name": "models/gemini-b"}]}
    return {"error": {"code": 400, "message": "bad page"}}


def test_gemini_native_models_pages_are_recorded_and_each_replays(proxy_factory, upstream_factory):
    up = upstream_factory("G", reshape=gemini_models)
    url = f"{up.url}/v1beta/models"
    recorder = proxy_factory(mode="record")
    page1 = get(recorder, url)
    page2 = get(recorder, url, params={"pageToken": page1.json()["nextPageToken"]})
    assert page1.json()["models"] == [{"name": "models/gemini-a"}]
    assert page2.json()["models"] == [{"name": "models/gemini-b"}]
    files = wait_for_files(recorder.cassette_dir, 2)
    recorder.stop()
    assert len(cassette_files(recorder.cassette_dir)) == 2  # two pages, two keys
    written = "".join(f.read_text() for f in files)
    assert "tok-page-2" in written and "REDACTED" not in written
    replay = proxy_factory(mode="replay")
    assert get(replay, url).json() == page1.json()
    again = get(replay, url, params={"pageToken": "tok-page-2"})
    assert again.status_code == 200 and again.json() == page2.json()


def test_gemini_native_models_are_not_an_openai_list():
    from cassette_proxy.families import classify

    assert classify("GET", "/v1beta/models").name != "openai"
    assert classify("GET", "/v1beta/openai/models").name == "openai"
    assert classify("GET", "/v1/models").name == "openai"


# ---- item 3: a stream recorded without usage never answers a request asking for it -----------


def test_a_stream_without_usage_does_not_answer_a_request_for_usage(proxy_factory, upstream):
    messages = [{"role": "user", "content": "count"}]
    recorder = proxy_factory(mode="record")
    client = openai_client(recorder, upstream)
    assert all(c.usage is None for c in client.chat.completions.create(
        model="fake-model", messages=messages, stream=True))  # fmt: skip
    wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    replay = proxy_factory(mode="replay")
    client = openai_client(replay, upstream)
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(
            model="fake-model", messages=messages, stream=True,
            stream_options={"include_usage": True}))  # fmt: skip
    # Not asking for it is answered, as recorded.
    chunks = list(client.chat.completions.create(
        model="fake-model", messages=messages, stream=True,
        stream_options={"include_usage": False}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer_text("A", "count")


# ---- item 4: model lists merged per upstream ------------------------------------------------


def test_model_lists_are_merged_per_upstream_only(proxy_factory, upstream_factory, tmp_path):
    a = upstream_factory("A", models=["only-a", "shared"])
    b = upstream_factory("B", models=["only-b", "shared"])
    merged = tmp_path / "merged"
    for up in (a, b):
        recorder = proxy_factory(mode="record", cassette_dir=tmp_path / up.tag)
        assert [m.id for m in openai_client(recorder, up).models.list()] == up.models
        wait_for_files(recorder.cassette_dir, 1)
        recorder.stop()
        (merged / up.tag).mkdir(parents=True)
        for f in cassette_files(recorder.cassette_dir):
            (merged / up.tag / f.name).write_bytes(f.read_bytes())
    replay = proxy_factory(mode="replay", cassette_dir=merged)
    for up in (a, b):
        models = {m.id: m.owned_by for m in openai_client(replay, up).models.list()}
        assert models == {m: f"fake-{up.tag}" for m in up.models}
    # An upstream with no list of its own gets every upstream's, merged.
    c = upstream_factory("C", models=["never-asked"])
    models = sorted(m.id for m in openai_client(replay, c).models.list())
    assert models == ["only-a", "only-b", "shared"]
    again = {m.id: m.owned_by for m in openai_client(replay, a).models.list()}
    assert again == {m: "fake-A" for m in a.models}  # and A still gets A's alone
