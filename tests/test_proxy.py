"""Acceptance tests of the core proxy (issue 2): a real mitmdump with the addon,
real clients (openai SDK, httpx, curl), fake upstreams that speak the wire protocol."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import cassette_files, openai_client, wait_for_files
from upstreams import answer_text, blackhole_port, refused_port

CHAT = "openai.types.chat.chat_completion.ChatCompletion"
CHUNK = "openai.types.chat.chat_completion_chunk.ChatCompletionChunk"
COMPLETION = "openai.types.completion.Completion"
EMBEDDINGS = "openai.types.create_embedding_response.CreateEmbeddingResponse"
MODEL = "openai.types.model.Model"
SEED = Path(__file__).resolve().parent.parent / "cassettes" / "0806aef47037.json"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def only_cassette(directory: Path) -> dict:
    files = cassette_files(directory)
    assert len(files) == 1, files
    return load(files[0])


def chat_kwargs(text: str = "hello there", **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


def stream_text(stream) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


# ---- recording ----------------------------------------------------------------------


def test_records_every_openai_family_and_replays_it_offline(proxy_factory, upstream, tmp_path):
    proxy = proxy_factory(mode="auto")
    client = openai_client(proxy, upstream)

    live_chat = client.chat.completions.create(**chat_kwargs("non streamed"))
    live_stream = stream_text(
        client.chat.completions.create(**chat_kwargs("streamed"), stream=True)
    )
    live_completion = client.completions.create(model="fake-model", prompt="once upon")
    live_completion_stream = "".join(
        c.choices[0].text
        for c in client.completions.create(model="fake-model", prompt="a time", stream=True)
    )
    live_emb_b64 = client.embeddings.create(model="fake-embedding", input=["alpha", "beta"])
    live_emb_float = client.embeddings.create(
        model="fake-embedding", input="gamma", encoding_format="float"
    )
    live_models = [m.id for m in client.models.list()]
    assert live_stream == answer_text("A", "streamed")

    files = wait_for_files(proxy.cassette_dir, 7)
    assert len(files) == 7
    by_type: dict[str, list[dict]] = {}
    for f in files:
        doc = load(f)
        assert f.name == f"{len(f.stem) == 64 and f.stem}.json"  # full-hex hash names
        assert doc["request"]["headers"] == {}
        body = doc["response"]["body"]
        first = body[0] if isinstance(body, list) else body
        by_type.setdefault(first["__type__"], []).append(doc)
        # Written exactly as json.dumps(indent=2) + newline.
        assert f.read_text() == json.dumps(doc, indent=2) + "\n"
    assert len(by_type[CHAT]) == 1 and not by_type[CHAT][0]["response"]["is_streaming"]
    assert len(by_type[CHUNK]) == 1 and by_type[CHUNK][0]["response"]["is_streaming"]
    assert len(by_type[COMPLETION]) == 2
    assert len(by_type[EMBEDDINGS]) == 2
    assert len(by_type[MODEL]) == 1
    models_doc = by_type[MODEL][0]
    assert models_doc["request"]["method"] == "GET"
    assert [m["__data__"]["id"] for m in models_doc["response"]["body"]] == live_models
    # base64 embeddings are stored as the floats the SDK parses.
    for doc in by_type[EMBEDDINGS]:
        for item in doc["response"]["body"]["__data__"]["data"]:
            assert all(isinstance(x, float) for x in item["embedding"])

    upstream.stop()  # refused from now on: auto mode serves from cassettes
    client = openai_client(proxy, upstream)
    assert client.chat.completions.create(**chat_kwargs("non streamed")) == live_chat
    assert (
        stream_text(client.chat.completions.create(**chat_kwargs("streamed"), stream=True))
        == live_stream
    )
    assert client.completions.create(model="fake-model", prompt="once upon") == live_completion
    assert live_completion_stream == "".join(
        c.choices[0].text
        for c in client.completions.create(model="fake-model", prompt="a time", stream=True)
    )
    emb = client.embeddings.create(model="fake-embedding", input=["alpha", "beta"])
    assert [d.embedding for d in emb.data] == [d.embedding for d in live_emb_b64.data]
    emb = client.embeddings.create(model="fake-embedding", input="gamma", encoding_format="float")
    assert emb == live_emb_float
    assert [m.id for m in client.models.list()] == live_models
    assert proxy.log_text().count("hit ") >= 7


def test_replayed_response_names_its_cassette(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto")
    body = chat_kwargs("which file")
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        live = http.post(f"{upstream.url}/v1/chat/completions", json=body)
        assert live.status_code == 200 and "x-cassette-file" not in live.headers
        (recorded,) = wait_for_files(proxy.cassette_dir, 1)
        upstream.stop()
        replayed = http.post(f"{upstream.url}/v1/chat/completions", json=body)
    assert replayed.status_code == 200
    assert replayed.headers["x-cassette-file"] == recorded.name
    assert replayed.json() == live.json()


# ---- offline fallback -------------------------------------------------------------


def test_auto_falls_back_for_a_refused_port(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto")
    live = openai_client(proxy, upstream).chat.completions.create(**chat_kwargs("refused"))
    wait_for_files(proxy.cassette_dir, 1)
    # Host and port are not in the key: another, dead address gets the same answer.
    dead = f"http://127.0.0.1:{refused_port()}"
    again = openai_client(proxy, dead).chat.completions.create(**chat_kwargs("refused"))
    assert again == live
    assert len(upstream.requests) == 1


def test_auto_falls_back_within_probe_timeout_when_syn_is_dropped(proxy_factory, upstream):
    timeout_ms = 300
    proxy = proxy_factory(mode="auto", options={"cassette_probe_timeout_ms": timeout_ms})
    live = openai_client(proxy, upstream).chat.completions.create(**chat_kwargs("blackhole"))
    wait_for_files(proxy.cassette_dir, 1)
    with blackhole_port() as port:
        client = openai_client(proxy, f"http://127.0.0.1:{port}", timeout=60)
        started = time.monotonic()
        again = client.chat.completions.create(**chat_kwargs("blackhole"))
        elapsed = time.monotonic() - started
    assert again == live
    # The bound: the probe timeout plus one second, not mitmproxy's ~135 s.
    assert elapsed < timeout_ms / 1000 + 1.0, elapsed


def test_no_502_window_when_upstream_dies_while_up_verdict_is_cached(proxy_factory, upstream):
    # A long verdict cache: the proxy still believes the upstream is up.
    proxy = proxy_factory(mode="auto", options={"cassette_probe_ttl_ms": 600_000})
    client = openai_client(proxy, upstream)
    live = client.chat.completions.create(**chat_kwargs("window"))
    live_stream = stream_text(client.chat.completions.create(**chat_kwargs("w2"), stream=True))
    wait_for_files(proxy.cassette_dir, 2)
    upstream.stop()
    # The very first request after the death is answered from the cassette.
    assert client.chat.completions.create(**chat_kwargs("window")) == live
    fresh = openai_client(proxy, upstream)
    assert (
        stream_text(fresh.chat.completions.create(**chat_kwargs("w2"), stream=True)) == live_stream
    )
    assert "went away" in proxy.log_text()


def test_reverse_mode_with_the_upstream_down(proxy_factory, upstream, tmp_path):
    cassettes = tmp_path / "rev"
    recorder = proxy_factory(mode="record", reverse=upstream.url, cassette_dir=cassettes)
    live = openai_client(None, recorder).chat.completions.create(**chat_kwargs("reverse"))
    recorder.stop()
    upstream.stop()
    dead = f"http://127.0.0.1:{refused_port()}"
    proxy = proxy_factory(reverse=dead, cassette_dir=cassettes)
    assert "connection_strategy" not in " ".join(proxy.argv)  # the addon sets it itself
    assert openai_client(None, proxy).chat.completions.create(**chat_kwargs("reverse")) == live


# ---- modes --------------------------------------------------------------------------


def test_forced_replay_never_contacts_a_live_upstream(proxy_factory, upstream_factory, tmp_path):
    a = upstream_factory("A")
    recorder = proxy_factory(mode="record")
    recorded = openai_client(recorder, a).chat.completions.create(**chat_kwargs("forced"))
    recorded_stream = stream_text(
        openai_client(recorder, a).chat.completions.create(**chat_kwargs("f2"), stream=True)
    )
    wait_for_files(recorder.cassette_dir, 2)
    recorder.stop()

    b = upstream_factory("B")  # alive, and would answer differently
    assert answer_text("A", "forced") != answer_text("B", "forced")
    proxy = proxy_factory(mode="replay", cassette_dir=recorder.cassette_dir)
    client = openai_client(proxy, b)
    assert client.chat.completions.create(**chat_kwargs("forced")) == recorded
    assert stream_text(client.chat.completions.create(**chat_kwargs("f2"), stream=True)) == (
        recorded_stream
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**chat_kwargs("never recorded"))
    assert b.requests == []


def test_record_mode_always_forwards_and_replaces(proxy_factory, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = proxy_factory(mode="record")
    openai_client(proxy, a).chat.completions.create(**chat_kwargs("twice"))
    wait_for_files(proxy.cassette_dir, 1)
    second = openai_client(proxy, b).chat.completions.create(**chat_kwargs("twice"))
    assert second.choices[0].message.content == answer_text("B", "twice")
    assert len(a.requests) == len(b.requests) == 1
    # Asked again in the same run: kept as the request's second answer (issue 11.1).
    first, later = sorted(wait_for_files(proxy.cassette_dir, 2), key=lambda p: len(p.name))
    assert later.name == first.name.removesuffix(".json") + ".2.json"
    proxy.stop()
    proxy = proxy_factory(mode="record")  # a new recording run replaces the sequence whole
    openai_client(proxy, b).chat.completions.create(**chat_kwargs("twice"))
    wait_for_files(proxy.cassette_dir, 2)
    proxy.stop()  # the old run's later answer goes when this complete run ends (issue 17.3)
    doc = only_cassette(proxy.cassette_dir)  # same request: the same file, replaced
    assert doc["response"]["body"]["__data__"]["choices"][0]["message"]["content"] == (
        answer_text("B", "twice")
    )


def test_record_if_missing(proxy_factory, upstream):
    proxy = proxy_factory(mode="record-if-missing")
    client = openai_client(proxy, upstream)
    first = client.chat.completions.create(**chat_kwargs("rim"))
    wait_for_files(proxy.cassette_dir, 1)
    client.chat.completions.create(**chat_kwargs("rim, another"))  # a miss: forwarded
    assert len(upstream.requests) == 2
    assert len(wait_for_files(proxy.cassette_dir, 2)) == 2
    proxy.stop()
    proxy = proxy_factory(mode="record-if-missing", cassette_dir=proxy.cassette_dir)
    client = openai_client(proxy, upstream)
    assert client.chat.completions.create(**chat_kwargs("rim")) == first  # a hit
    assert len(upstream.requests) == 2
    # Asked again in this run: its second position has no recording, so it is forwarded
    # and recorded there (issue 17, finding 9), never the first answer again.
    client.chat.completions.create(**chat_kwargs("rim"))
    assert len(upstream.requests) == 3
    assert len(wait_for_files(proxy.cassette_dir, 3)) == 3


def test_passthrough_is_a_plain_proxy(proxy_factory, upstream):
    proxy = proxy_factory(mode="passthrough")
    client = openai_client(proxy, upstream)
    client.chat.completions.create(**chat_kwargs("plain"))
    stream_text(client.chat.completions.create(**chat_kwargs("plain"), stream=True))
    assert len(upstream.requests) == 2
    time.sleep(0.3)
    assert cassette_files(proxy.cassette_dir) == []


def test_bad_mode_is_a_clear_options_error(tmp_path, mitmdump_bin, repo_root):
    result = subprocess.run(
        [str(mitmdump_bin), "-s", str(repo_root / "addons" / "recorder.py"),
         "--listen-host", "127.0.0.1", "--listen-port", "0",
         "--set", f"confdir={tmp_path}", "--set", "cassette_mode=bogus"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "cassette_mode must be one of" in result.stdout + result.stderr


# ---- the seed, misses, secrets, cut streams -------------------------------------------


def test_seed_cassette_replays_to_the_openai_sdk_as_9_chunks_with_the_tool_call(
    proxy_factory, repo_root
):
    proxy = proxy_factory(mode="replay", cassette_dir=repo_root / "cassettes")
    seed = load(SEED)
    client = openai_client(proxy, "http://localhost:8000")
    chunks = list(client.chat.completions.create(**seed["request"]["body"]))
    assert len(chunks) == 9
    assert [c.model_dump(mode="json", exclude_unset=True) for c in chunks] == [
        c["__data__"] for c in seed["response"]["body"]
    ]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(arguments) == {"location": "San Francisco, CA"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_seed_answers_in_auto_mode_with_nothing_listening(proxy_factory, repo_root):
    proxy = proxy_factory(cassette_dir=repo_root / "cassettes")
    seed = load(SEED)
    client = openai_client(proxy, f"http://127.0.0.1:{refused_port()}")
    assert len(list(client.chat.completions.create(**seed["request"]["body"]))) == 9


def test_miss_is_a_non_retryable_error_naming_the_nearest_recording(proxy_factory, repo_root):
    proxy = proxy_factory(mode="replay", cassette_dir=repo_root / "cassettes")
    body = load(SEED)["request"]["body"] | {"temperature": 0.5}
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        r = http.post("http://localhost:8000/v1/chat/completions", json=body)
    assert 400 <= r.status_code < 500 and r.status_code not in (408, 409, 429)
    error = r.json()["error"]
    assert error["method"] == "POST"
    assert error["path"] == "/v1/chat/completions"
    assert len(error["request_key"]) == 64 and error["request_key"] in error["message"]
    assert error["nearest"] == {"file": "0806aef47037.json", "first_difference": "body.temperature"}
    assert "body.temperature" in error["message"]
    # The SDK does not retry it (max_retries=2 would make 3 requests on a retryable status).
    client = openai_client(proxy, "http://localhost:8000").with_options(max_retries=2)
    with pytest.raises(openai.NotFoundError, match="no recording"):
        client.chat.completions.create(**body)
    assert proxy.log_text().count("no recording for POST") == 2


SECRETS = {
    "authorization": "Bearer sk-live-AUTHSECRET0123456789",
    "api-key": "APIKEYSECRET0123456789",
    "x-api-key": "XAPIKEYSECRET0123456789",
    "cookie": "session=COOKIESECRET0123456789",
    "proxy-authorization": "Basic PROXYSECRET0123456789",
}


def test_no_credential_reaches_a_cassette(proxy_factory, upstream):
    proxy = proxy_factory(
        mode="record",
        options={"cassette_record_headers": [*SECRETS, "x-request-tag"]},
    )
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        for stream in (False, True):
            r = http.post(
                f"{upstream.url}/v1/chat/completions?api_key=QUERYSECRET0123456789&v=1",
                json=chat_kwargs("secrets", stream=stream),
                headers={**SECRETS, "x-request-tag": "kept"},
            )
            assert r.status_code == 200
    # The upstream did get the credentials: the proxy only keeps them out of cassettes.
    assert upstream.requests[0].headers.get("authorization") == SECRETS["authorization"]
    files = wait_for_files(proxy.cassette_dir, 2)
    assert len(files) == 2
    written = b"".join(p.read_bytes() for p in proxy.cassette_dir.rglob("*") if p.is_file())
    for needle in [*SECRETS.values(), "QUERYSECRET0123456789", "AUTHSECRET", "sk-live"]:
        assert needle.encode() not in written, needle
    for f in files:
        assert load(f)["request"]["headers"] == {"x-request-tag": "kept"}
        assert "api_key=REDACTED" in load(f)["request"]["url"]


@pytest.mark.parametrize("fail_mode", ["cut", "no_done"])
def test_a_cut_stream_leaves_no_cassette(proxy_factory, upstream, fail_mode):
    proxy = proxy_factory(mode="record")
    upstream.configure(fail_mode=fail_mode, n_chunks=6)
    with pytest.raises(openai.APIError) if fail_mode == "cut" else _no_error():
        stream_text(
            openai_client(proxy, upstream).chat.completions.create(
                **chat_kwargs("cut me"), stream=True
            )
        )
    proxy.wait_for_log("not recorded")
    time.sleep(0.3)
    assert cassette_files(proxy.cassette_dir) == []
    assert not list(proxy.cassette_dir.rglob(".cassette-tmp-*"))


def test_client_gone_mid_stream_leaves_no_cassette(proxy_factory, upstream):
    proxy = proxy_factory(mode="record")
    upstream.configure(n_chunks=8, event_interval=0.2)
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as http:
        with http.stream(
            "POST", f"{upstream.url}/v1/chat/completions", json=chat_kwargs("bye", stream=True)
        ) as r:
            next(r.iter_raw())  # the first chunk, then hang up
    proxy.wait_for_log("not recorded")
    time.sleep(0.3)
    assert cassette_files(proxy.cassette_dir) == []


def test_stream_is_complete_when_the_sdk_hangs_up_after_done(proxy_factory, upstream):
    # The upstream holds back its final chunk terminator after [DONE]: the SDK has
    # hung up by then, mitmproxy reports an error, and the stream is still complete.
    upstream.configure(done_tail_delay=1.0)
    proxy = proxy_factory(mode="record")
    text = stream_text(
        openai_client(proxy, upstream).chat.completions.create(**chat_kwargs("tail"), stream=True)
    )
    (f,) = wait_for_files(proxy.cassette_dir, 1)
    chunks = load(f)["response"]["body"]
    assert (
        "".join(
            c["__data__"]["choices"][0]["delta"].get("content") or ""
            for c in chunks
            if c["__data__"]["choices"]
        )
        == text
    )


def test_curl_through_the_proxy(proxy_factory, upstream):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    proxy = proxy_factory(mode="auto")
    body = json.dumps(chat_kwargs("curl"))
    cmd = ["curl", "-sS", "-x", proxy.url, "-H", "content-type: application/json",
           "-d", body, f"{upstream.url}/v1/chat/completions"]  # fmt: skip
    live = json.loads(subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout)
    wait_for_files(proxy.cassette_dir, 1)
    upstream.stop()
    out = subprocess.run([*cmd[:-1], "-i", cmd[-1]], capture_output=True, check=True, timeout=30)
    head, _, payload = out.stdout.partition(b"\r\n\r\n")
    assert b"x-cassette-file" in head.lower()
    assert json.loads(payload) == live


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unknown_json_endpoint_is_recorded_and_replayed_raw(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto")
    body = {"model": "fake-model", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        live = http.post(f"{upstream.url}/v1/messages", json=body)
        (f,) = wait_for_files(proxy.cassette_dir, 1)
        doc = load(f)
        assert doc["response"]["status"] == 200
        assert doc["response"]["body"] == live.json()  # raw JSON, no __type__
        upstream.stop()
        replayed = http.post(f"{upstream.url}/v1/messages", json=body)
    assert replayed.status_code == 200 and replayed.json() == live.json()
    assert replayed.headers["x-cassette-file"] == f.name


def test_record_mode_fails_fast_when_upstream_is_unreachable(proxy_factory):
    proxy = proxy_factory(mode="record")
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        r = http.post(f"http://127.0.0.1:{refused_port()}/v1/chat/completions", json=chat_kwargs())
    assert r.status_code == 502 and "unreachable" in r.text


def test_record_if_missing_with_upstream_down_answers_hits_and_explains_misses(
    proxy_factory, repo_root
):
    proxy = proxy_factory(mode="record-if-missing", cassette_dir=repo_root / "cassettes")
    client = openai_client(proxy, f"http://127.0.0.1:{refused_port()}")
    seed = load(SEED)
    assert len(list(client.chat.completions.create(**seed["request"]["body"]))) == 9
    with pytest.raises(openai.NotFoundError, match="nearest recording"):
        client.chat.completions.create(**chat_kwargs("never"))


def test_answer_from_the_stand_in_looks_like_any_replay(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto", options={"cassette_probe_ttl_ms": 600_000})
    body = chat_kwargs("stand-in")
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        live = http.post(f"{upstream.url}/v1/chat/completions", json=body)
        wait_for_files(proxy.cassette_dir, 1)
    upstream.stop()
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        first = http.post(f"{upstream.url}/v1/chat/completions", json=body)
        second = http.post(f"{upstream.url}/v1/chat/completions", json=body)
    assert first.json() == second.json() == live.json()
    assert "connection" not in first.headers  # the stand-in's own "close" stays behind
    assert "went away" in proxy.log_text()
