"""Never lose or corrupt (issue 4): concurrency, kill -9, cut streams, bad cassettes,
bad requests, upstream errors, a full or read-only disk.

Real mitmdump, real clients (openai SDK, httpx), fake upstreams on 127.0.0.1.
Every test is bounded: a few hundred requests at most, seconds each.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import ssl
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
from cassette_proxy.cassette import TEMP_PREFIX, read_cassette, temp_prefix, write_cassette
from cassette_proxy.families import classify
from cassette_proxy.recording import new_recording
from cassette_proxy.store import live_key
from conftest import async_openai_client, cassette_files, openai_client
from upstreams import OpenAIUpstream, _decode_body, answer_text

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # Python < 3.14: mitmproxy's dependency
    from backports import zstd  # type: ignore[import-not-found,no-redef]

CHAT_PATH = "/v1/chat/completions"
FULL_KEY = re.compile(r"\b[0-9a-f]{64}\b")


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


def key_of_request(body: Any, path: str = CHAT_PATH, method: str = "POST") -> str:
    """The request key the proxy computes for a request with no query string."""
    return live_key(method, path, body, [])[0]


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob(f"{TEMP_PREFIX}*"))


def all_valid(directory: Path) -> list[Any]:
    """Every *.json below `directory` read as a cassette (raises on any invalid one)."""
    return [read_cassette(f) for f in cassette_files(directory)]


async def stream_text(client: Any, prompt: str, **extra: Any) -> str:
    stream = await client.chat.completions.create(**chat(prompt, **extra), stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def whole_text(client: Any, prompt: str) -> str:
    answer = await client.chat.completions.create(**chat(prompt))
    return answer.choices[0].message.content


def sse_events(raw: bytes) -> list[str]:
    """The data: payloads of an SSE body."""
    events = raw.decode().replace("\r\n", "\n").split("\n\n")
    return [e.removeprefix("data: ") for e in events if e.startswith("data: ")]


# ---- 1. concurrency ----------------------------------------------------------------


def test_200_parallel_clients_half_streaming_record_200_valid_cassettes(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto")
    prompts = [f"parallel {i}" for i in range(200)]

    async def everyone() -> list[str]:
        client = async_openai_client(proxy, upstream, max_connections=250)
        async with client:
            return await asyncio.gather(
                *((stream_text if i % 2 else whole_text)(client, p) for i, p in enumerate(prompts))
            )

    assert asyncio.run(everyone()) == [answer_text("A", p) for p in prompts]
    # No waiting: an answer the client has in full is already on disk.
    cassettes = all_valid(proxy.cassette_dir)
    assert len(cassettes) == 200
    assert {c.request.body["messages"][0]["content"] for c in cassettes} == set(prompts)
    assert sum(c.response.is_streaming for c in cassettes) == 100
    assert temp_files(proxy.cassette_dir) == []
    for f in cassette_files(proxy.cassette_dir):
        assert f.read_text() == json.dumps(json.loads(f.read_text()), indent=2) + "\n"

    upstream.stop()  # and all 200 come back from the cassettes, in parallel too
    assert asyncio.run(everyone()) == [answer_text("A", p) for p in prompts]
    assert len(upstream.requests) == 200


def test_the_same_request_from_20_clients_at_once_gives_one_valid_cassette(proxy_factory, upstream):
    proxy = proxy_factory(mode="record")

    async def twenty_each() -> tuple[list[Any], list[list[Any]]]:
        client = async_openai_client(proxy, upstream)
        async with client:

            async def chunks() -> list[Any]:
                stream = await client.chat.completions.create(**chat("same stream"), stream=True)
                return [c async for c in stream]

            wholes = asyncio.gather(
                *(client.chat.completions.create(**chat("same")) for _ in range(20))
            )
            streams = asyncio.gather(*(chunks() for _ in range(20)))
            return await asyncio.gather(wholes, streams)

    wholes, streams = asyncio.run(twenty_each())
    assert len(upstream.requests) == 40  # each one was forwarded
    (whole_file, stream_file) = sorted(
        cassette_files(proxy.cassette_dir),
        key=lambda f: read_cassette(f).response.is_streaming,
    )
    assert temp_files(proxy.cassette_dir) == []
    # One whole, valid answer: exactly one of the 20 a client got, never a mix.
    whole = read_cassette(whole_file).response.body["__data__"]
    assert whole in [w.model_dump(mode="json", exclude_unset=True) for w in wholes]
    recorded = [c["__data__"] for c in read_cassette(stream_file).response.body]
    assert recorded in [[c.model_dump(mode="json", exclude_unset=True) for c in s] for s in streams]
    assert len({s[0].id for s in streams}) == 20  # the 20 answers did differ


def test_200_parallel_replays_of_a_stream_each_get_the_whole_stream(proxy_factory, upstream):
    upstream.configure(n_chunks=40)
    prompt = "a stream long enough to be cut into forty pieces, " * 2
    recorder = proxy_factory(mode="record")
    live = list(
        openai_client(recorder, upstream).chat.completions.create(**chat(prompt), stream=True)
    )
    assert len(live) >= 30  # role, ~40 pieces, finish
    recorder.stop()

    proxy = proxy_factory(mode="replay", cassette_dir=recorder.cassette_dir)
    expected = [c.model_dump(mode="json", exclude_unset=True) for c in live]

    async def replays() -> list[list[dict[str, Any]]]:
        client = async_openai_client(proxy, upstream, max_connections=250)
        async with client:

            async def one() -> list[dict[str, Any]]:
                stream = await client.chat.completions.create(**chat(prompt), stream=True)
                return [c.model_dump(mode="json", exclude_unset=True) async for c in stream]

            return await asyncio.gather(*(one() for _ in range(200)))

    results = asyncio.run(replays())
    assert len(results) == 200 and all(r == expected for r in results)
    assert len(upstream.requests) == 1


# ---- 2. kill -9 -------------------------------------------------------------------


def test_kill_9_during_heavy_recording_loses_no_completed_recording(
    proxy_factory, upstream, tmp_path
):
    upstream.configure(n_chunks=6, event_interval=0.01)
    proxy = proxy_factory(mode="record")
    completed: dict[int, str] = {}

    async def heavy_load() -> None:
        client = async_openai_client(proxy, upstream, timeout=15)
        gate = asyncio.Semaphore(40)

        async def one(i: int) -> None:
            async with gate:
                if proxy.returncode is not None:
                    return
                try:
                    text = await (stream_text if i % 2 else whole_text)(client, f"crash {i}")
                except Exception:  # noqa: BLE001 - cut off by the kill
                    return
                completed[i] = text
                if len(completed) == 80:
                    proxy.kill9()  # mid-flight: ~40 requests are streaming or writing

        async with client:
            await asyncio.gather(*(one(i) for i in range(400)), return_exceptions=True)

    asyncio.run(heavy_load())
    assert proxy.returncode is not None and len(completed) >= 80
    assert len(completed) < 400  # the kill did cut the load short

    # Every answer a client got in full is on disk, whole and valid, right now.
    by_prompt = {c.request.body["messages"][0]["content"]: c for c in all_valid(proxy.cassette_dir)}
    assert {f"crash {i}" for i in completed} <= set(by_prompt)
    # What an unlucky crash mid-write leaves: temp files, here and in a test's folder,
    # named by the writer that is gone (another proxy's in-flight ones stay).
    crashed = temp_prefix(proxy.proc.pid)
    (proxy.cassette_dir / f"{crashed}planted.partial").write_text('{"request": {"meth')
    (proxy.cassette_dir / "some-test-1234").mkdir(exist_ok=True)
    (proxy.cassette_dir / "some-test-1234" / f"{crashed}x.partial").write_text("{")
    left = len(temp_files(proxy.cassette_dir))

    upstream.stop()
    restarted = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    restarted.wait_for_log("loaded from")
    assert f"removed {left} unfinished temp file(s)" in restarted.log_text()
    assert temp_files(proxy.cassette_dir) == []
    all_valid(proxy.cassette_dir)

    async def replay_completed() -> dict[int, str]:
        client = async_openai_client(restarted, upstream)
        async with client:
            texts = await asyncio.gather(
                *((stream_text if i % 2 else whole_text)(client, f"crash {i}") for i in completed)
            )
        return dict(zip(completed, texts, strict=True))

    assert asyncio.run(replay_completed()) == completed


# ---- 3. cut streams ------------------------------------------------------------------


def _not_recorded_line(proxy: Any, key: str) -> str:
    text = proxy.wait_for_log(key)
    (line,) = [ln for ln in text.splitlines() if key in ln]
    return line


@pytest.mark.parametrize("how", ["upstream reset", "no [DONE]", "client gone"])
def test_a_cut_openai_stream_leaves_no_cassette_and_logs_its_full_key(proxy_factory, upstream, how):
    proxy = proxy_factory(mode="record")
    body = chat(f"cut: {how}", stream=True)
    if how == "upstream reset":
        upstream.configure(fail_mode="cut", n_chunks=6, cut_after=3)
    elif how == "no [DONE]":
        upstream.configure(fail_mode="no_done")
    else:
        upstream.configure(n_chunks=8, event_interval=0.2)
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as http:
        with contextlib.suppress(httpx.HTTPError):
            with http.stream("POST", upstream.url + CHAT_PATH, json=body) as r:
                for _ in r.iter_raw():
                    if how == "client gone":
                        break  # the first read, then hang up
    line = _not_recorded_line(proxy, key_of_request(body))
    assert "not recorded" in line
    assert FULL_KEY.search(line)
    assert cassette_files(proxy.cassette_dir) == []
    assert temp_files(proxy.cassette_dir) == []


@pytest.mark.parametrize("fail_mode", ["cut", "no_done"])
def test_a_cut_ollama_stream_leaves_no_cassette_and_logs_its_full_key(
    proxy_factory, ollama_upstream, fail_mode
):
    proxy = proxy_factory(mode="record")
    ollama_upstream.configure(fail_mode=fail_mode, n_chunks=6, cut_after=2)
    body = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "cut"}]}
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as http:
        with contextlib.suppress(httpx.HTTPError):
            with http.stream("POST", ollama_upstream.url + "/api/chat", json=body) as r:
                for _ in r.iter_raw():
                    pass
    line = _not_recorded_line(proxy, key_of_request(body, "/api/chat"))
    assert "not recorded" in line
    assert cassette_files(proxy.cassette_dir) == []


# ---- 4. bad cassettes -----------------------------------------------------------------


def write_chat_cassette(root: Path, prompt: str, answer: str, name: str | None = None) -> Path:
    """A cassette as the proxy records it, for a chat request the openai SDK sends."""
    body = chat(prompt)
    data = {
        "id": f"chatcmpl-{prompt}",
        "object": "chat.completion",
        "created": 1,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        ],
    }
    response = classify("POST", CHAT_PATH).record(CHAT_PATH, body, 200, data)
    path, cassette = new_recording(
        root, method="POST", path=CHAT_PATH, body=body, test_id=None,
        url=f"http://127.0.0.1:9{CHAT_PATH}", headers={}, response=response,
    )  # fmt: skip
    if name is not None:
        path = root / name
    write_cassette(path, cassette)
    return path


def test_bad_cassettes_are_skipped_named_once_and_the_rest_is_served(proxy_factory, tmp_path):
    root = tmp_path / "cassettes"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    write_chat_cassette(root, "good one", "served one")
    (root / "sub").mkdir()
    write_chat_cassette(root / "sub", "good two", "served two")
    # Valid cassettes, but outside the folder: reachable only through symlinks.
    target = write_chat_cassette(outside, "outside", "never served", name="target.json")
    write_chat_cassette(outside, "outside folder", "never served either")
    bad = {
        "bad-json.json": b'{"request": {"method": "POST"',
        "bad-empty.json": b"",
        "bad-utf8.json": b'{"request": {}, "response": {"body": "\xff\xfe"}}',
        "bad-shape.json": json.dumps({"request": 5, "response": {"body": None}}).encode(),
        "bad-list.json": b"[1, 2, 3]",
        "bad-deep.json": b"[" * 100_000 + b"]" * 100_000,
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
    unknown = json.loads(write_chat_cassette(root, "typed", "x", name="bad-type.json").read_text())
    unknown["response"]["body"]["__type__"] = "acme.types.Thing"
    (root / "bad-type.json").write_text(json.dumps(unknown, indent=2) + "\n")
    with (root / "bad-huge.json").open("wb") as f:
        f.truncate(33 * 1024 * 1024)  # sparse: large on paper, cheap on disk
    (root / "bad-link-out.json").symlink_to(target)
    (root / "bad-link-loop.json").symlink_to(root / "bad-link-loop.json")
    (root / "bad-link-broken.json").symlink_to(tmp_path / "nowhere.json")
    (root / "bad-folder-link").symlink_to(outside, target_is_directory=True)
    (root / "notes.txt").write_text("not a cassette, and not *.json: ignored quietly")

    proxy = proxy_factory(mode="replay", cassette_dir=root)
    client = openai_client(proxy, "http://127.0.0.1:9")
    for prompt, answer in (("good one", "served one"), ("good two", "served two")):
        reply = client.chat.completions.create(**chat(prompt))
        assert reply.choices[0].message.content == answer
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        for prompt in ("outside", "outside folder", "typed"):
            miss = http.post(f"http://127.0.0.1:9{CHAT_PATH}", json=chat(prompt))
            assert miss.status_code == 404 and "x-cassette-miss" in miss.headers
    log = proxy.log_text()
    assert "cassettes: 2 loaded" in log
    names = [*bad, "bad-type.json", "bad-huge.json", "bad-link-out.json", "bad-link-loop.json",
             "bad-link-broken.json", "bad-folder-link"]  # fmt: skip
    for name in names:
        assert log.count(f"{root / name}:") == 1, (name, log)
    assert "too large" in log and "unknown __type__ 'acme.types.Thing'" in log
    assert "nested too deeply" in log and "symlink loop" in log and "broken symlink" in log
    assert "notes.txt" not in log
    assert proxy.returncode is None


# ---- 5. bad requests ------------------------------------------------------------------


@pytest.fixture
def http_through(proxy_factory):
    """An httpx client through a recording proxy (auto mode)."""
    proxy = proxy_factory(mode="auto")
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
        yield proxy, http


def test_non_json_and_invalid_utf8_bodies_pass_through_untouched(http_through, upstream):
    proxy, http = http_through
    for content, kind in [
        (b"hello, not json", "text/plain"),
        (b'{"model": "fake-model", "messages": "\xff\xfe"}', "application/json"),
        (b"\x00\x01\x02 binary", "application/octet-stream"),
    ]:
        r = http.post(upstream.url + CHAT_PATH, content=content, headers={"content-type": kind})
        assert r.status_code == 400  # the upstream's own answer
        assert r.json()["error"]["message"] == "request body is not a JSON object"
        assert upstream.requests[-1].body == content
        proxy.wait_for_log(f"body is not JSON ({kind})")
    assert proxy.log_text().count("passthrough POST /v1/chat/completions: body is not JSON") == 3
    assert cassette_files(proxy.cassette_dir) == []
    assert proxy.returncode is None


def test_a_50_mb_body_passes_through_with_a_reason(http_through, upstream):
    proxy, http = http_through
    body = {"model": "fake-embedding", "input": "a" * (50 * 1024 * 1024)}
    content = json.dumps(body).encode()
    r = http.post(upstream.url + "/v1/embeddings", content=content,
                  headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert upstream.requests[-1].body == content
    line = proxy.wait_for_log("over the 32 MiB a cassette may hold")
    assert "passthrough POST /v1/embeddings: the request body is 50.0 MiB" in line
    assert cassette_files(proxy.cassette_dir) == []


def test_a_multipart_upload_reaches_the_upstream_untouched_and_is_recorded(http_through, upstream):
    proxy, http = http_through
    audio = bytes(range(256)) * 64
    request = http.build_request(
        "POST",
        upstream.url + "/v1/audio/transcriptions",
        files={"file": ("speech.wav", audio, "audio/wav")},
        data={"model": "whisper-1", "language": "en"},
    )
    sent = request.read()
    r = http.send(request)
    assert r.status_code == 200 and r.json()["object"] == "fake.unknown"
    assert upstream.requests[-1].body == sent
    assert upstream.requests[-1].headers["content-type"] == request.headers["content-type"]
    # Recorded by its fields and the file's digest (issue 11.6, tests/test_uploads.py).
    proxy.wait_for_log("recorded POST /v1/audio/transcriptions")
    (recorded,) = cassette_files(proxy.cassette_dir)
    assert audio not in recorded.read_bytes()


def compress(kind: str, data: bytes) -> bytes:
    return {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstd.compress,
    }[kind](data)


ENCODINGS = ["gzip", "deflate", "br", "zstd"]


def test_encoded_request_bodies_are_recorded_decoded_and_replayed(http_through, upstream):
    proxy, http = http_through
    for kind in ENCODINGS:
        body = chat(f"sent {kind}-encoded")
        content = compress(kind, json.dumps(body).encode())
        headers = {"content-type": "application/json", "content-encoding": kind}
        r = http.post(upstream.url + CHAT_PATH, content=content, headers=headers)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == answer_text(
            "A", body["messages"][0]["content"]
        )
        assert upstream.requests[-1].body == content  # forwarded as it came
    recorded = {c.request.body["messages"][0]["content"]: c for c in all_valid(proxy.cassette_dir)}
    assert set(recorded) == {f"sent {kind}-encoded" for kind in ENCODINGS}

    upstream.stop()  # replayed: the same request, encoded or not, finds its cassette
    for kind in ENCODINGS:
        body = chat(f"sent {kind}-encoded")
        for content, headers in [
            (compress(kind, json.dumps(body).encode()), {"content-encoding": kind}),
            (json.dumps(body).encode(), {}),
        ]:
            r = http.post(upstream.url + CHAT_PATH, content=content,
                          headers={"content-type": "application/json", **headers})  # fmt: skip
            assert r.status_code == 200 and "x-cassette-file" in r.headers
            assert r.json()["choices"][0]["message"]["content"] == answer_text(
                "A", f"sent {kind}-encoded"
            )


def raw_answer(http: httpx.Client, url: str, body: Any) -> tuple[httpx.Headers, bytes]:
    """Status-checked headers and the body bytes as they came on the wire, decoded here."""
    with http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
    return r.headers, _decode_body(raw, r.headers.get("content-encoding", ""))


def test_encoded_answers_whole_and_streamed_are_recorded_decoded_and_replayed(
    http_through, upstream
):
    proxy, http = http_through
    live: dict[tuple[str, bool], bytes] = {}
    for kind in ENCODINGS:
        upstream.configure(response_encoding=kind)
        for stream in (False, True):
            body = chat(f"answer {kind}", stream=stream)
            headers, decoded = raw_answer(http, upstream.url + CHAT_PATH, body)
            assert headers["content-encoding"] == kind  # the client got it as sent
            live[kind, stream] = decoded
    cassettes = all_valid(proxy.cassette_dir)
    assert len(cassettes) == 2 * len(ENCODINGS)
    for c in cassettes:  # typed objects and chunks: decoded, never compressed bytes
        body = c.response.body
        assert (body[0] if isinstance(body, list) else body)["__type__"].startswith("openai.")

    upstream.stop()
    for (kind, stream), decoded in live.items():
        headers, replayed = raw_answer(
            http, upstream.url + CHAT_PATH, chat(f"answer {kind}", stream=stream)
        )
        assert "x-cassette-file" in headers
        if stream:
            assert [json.loads(e) for e in sse_events(replayed) if e != "[DONE]"] == [
                json.loads(e) for e in sse_events(decoded) if e != "[DONE]"
            ]
        else:
            assert json.loads(replayed) == json.loads(decoded)


class PreferH2(ssl.SSLContext):
    """A client TLS context offering h2 first, as curl, browsers and Go do.

    httpx offers ``http/1.1, h2`` in that order, and mitmproxy (lazy connect: no upstream
    ALPN to mirror yet) honours the client's order, so plain httpx ends up on HTTP/1.1.
    """

    def set_alpn_protocols(self, protocols: Any) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def test_http2_clients_record_and_replay_over_https(proxy_factory, tmp_path):
    from upstreams import self_signed

    cert, key = self_signed(tmp_path)
    upstream = OpenAIUpstream("H2")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    upstream.start()
    try:
        proxy = proxy_factory(mode="auto", options={"ssl_verify_upstream_trusted_ca": str(cert)})
        url = f"https://localhost:{upstream.port}{CHAT_PATH}"
        verify = PreferH2(ssl.PROTOCOL_TLS_CLIENT)
        verify.load_verify_locations(cafile=str(proxy.ca_cert))

        def both() -> tuple[dict[str, Any], list[str]]:
            with httpx.Client(proxy=proxy.url, verify=verify, http2=True, trust_env=False) as h:
                whole = h.post(url, json=chat("over h2"))
                assert whole.http_version == "HTTP/2" and whole.status_code == 200
                with h.stream("POST", url, json=chat("streamed over h2", stream=True)) as r:
                    assert r.http_version == "HTTP/2"
                    events = sse_events(r.read())
            return whole.json(), events

        live_whole, live_events = both()
        assert live_whole["choices"][0]["message"]["content"] == answer_text("H2", "over h2")
        assert live_events[-1] == "[DONE]"
        assert len(all_valid(proxy.cassette_dir)) == 2
    finally:
        upstream.stop()
    replayed_whole, replayed_events = both()
    assert replayed_whole == live_whole
    assert [json.loads(e) for e in replayed_events[:-1]] == [
        json.loads(e) for e in live_events[:-1]
    ]


def test_query_strings_are_part_of_the_key_but_credentials_in_them_are_not(proxy_factory, upstream):
    proxy = proxy_factory(mode="record")
    url = upstream.url + CHAT_PATH
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        r = http.post(url + "?api-version=2024-06-01&api_key=FIRSTKEY0123", json=chat("query"))
        assert r.status_code == 200
        models = http.get(upstream.url + "/v1/models?limit=2&order=desc")
        assert models.status_code == 200
    assert upstream.requests[0].path.endswith("?api-version=2024-06-01&api_key=FIRSTKEY0123")
    urls = sorted(c.request.url for c in all_valid(proxy.cassette_dir))
    assert urls == [
        f"{upstream.url}{CHAT_PATH}?api-version=2024-06-01&api_key=REDACTED",
        f"{upstream.url}/v1/models?limit=2&order=desc",
    ]
    proxy.stop()

    replay = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    with httpx.Client(proxy=replay.url, trust_env=False) as http:
        hit = http.post(url + "?api-version=2024-06-01&api_key=OTHERKEY9876", json=chat("query"))
        assert hit.status_code == 200 and hit.json() == r.json()
        assert http.get(upstream.url + "/v1/models?limit=2&order=desc").json() == models.json()
        for other in ("?api-version=2099-01-01", ""):
            miss = http.post(url + other, json=chat("query"))
            assert miss.status_code == 404 and "x-cassette-miss" in miss.headers
        assert http.get(upstream.url + "/v1/models?limit=3").status_code == 404


# ---- 6. upstream errors -----------------------------------------------------------------


def fail_once(upstream: OpenAIUpstream, status: int) -> None:
    upstream.configure(fail_mode="status", fail_status=status, fail_times=1)


def test_upstream_errors_reach_the_client_unchanged_and_only_4xx_are_recorded(
    proxy_factory, upstream
):
    upstream.configure(extra_headers={"retry-after": "7", "x-upstream": "fake"})
    proxy = proxy_factory(mode="auto")
    url = upstream.url + CHAT_PATH
    answers: dict[int, httpx.Response] = {}
    with (
        httpx.Client(trust_env=False) as direct,
        httpx.Client(proxy=proxy.url, trust_env=False) as http,
    ):
        for status in (400, 401, 404, 422, 408, 409, 429, 500, 503):
            fail_once(upstream, status)
            reference = direct.post(url, json=chat(f"error {status}"))
            fail_once(upstream, status)
            answers[status] = got = http.post(url, json=chat(f"error {status}"))
            assert got.status_code == reference.status_code == status
            assert got.content == reference.content
            for name in ("content-type", "retry-after", "x-upstream"):
                assert got.headers[name] == reference.headers[name]
    recorded = {
        c.response.model_dump()["exception_data"]["status_code"]: c
        for c in all_valid(proxy.cassette_dir)
    }
    assert sorted(recorded) == [400, 401, 404, 422]
    for status in (408, 409, 429, 500, 503):
        proxy.wait_for_log(f"upstream answered {status}")

    upstream.stop()  # the recorded errors replay as they came; the others are misses
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        for status, live in answers.items():
            again = http.post(url, json=chat(f"error {status}"))
            if status in recorded:
                assert again.status_code == status and again.json() == live.json()
            else:
                assert again.status_code == 404 and "x-cassette-miss" in again.headers


@pytest.mark.parametrize(
    ("setting", "statuses", "recorded"),
    [
        ("none", (400, 404, 500), set()),
        ("4xx,429", (400, 429, 500), {400, 429}),
        ("404, 5xx", (400, 404, 500, 503), {404, 500, 503}),
    ],
)
def test_which_errors_are_recorded_is_an_option(
    proxy_factory, upstream, setting, statuses, recorded
):
    proxy = proxy_factory(mode="record", options={"cassette_record_errors": setting})
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        for status in statuses:
            fail_once(upstream, status)
            assert http.post(upstream.url + CHAT_PATH, json=chat(f"{status}")).status_code == status
    got = {
        c.response.model_dump()["exception_data"]["status_code"]
        for c in all_valid(proxy.cassette_dir)
    }
    assert got == recorded


@pytest.mark.parametrize("setting", ["", "4xx,none", "600", "3xx", "teapot"])
def test_a_bad_record_errors_setting_is_a_clear_options_error(
    tmp_path, mitmdump_bin, repo_root, setting
):
    result = subprocess.run(
        [str(mitmdump_bin), "-s", str(repo_root / "addons" / "recorder.py"),
         "--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"confdir={tmp_path}",
         "--set", f"cassette_dir={tmp_path / 'c'}", "--set", f"cassette_record_errors={setting}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "cassette_record_errors" in result.stdout + result.stderr


# ---- 8. a full or read-only disk ------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at `where`, or a skip saying why there cannot be one here."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a full or read-only filesystem here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def record_one_whole_and_one_stream(proxy: Any, upstream: OpenAIUpstream, tag: str) -> None:
    client = openai_client(proxy, upstream)
    whole = client.chat.completions.create(**chat(f"whole {tag}"))
    assert whole.choices[0].message.content == answer_text("A", f"whole {tag}")
    streamed = client.chat.completions.create(**chat(f"stream {tag}"), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == answer_text("A", f"stream {tag}")


def test_a_full_disk_still_answers_logs_loudly_and_leaves_nothing(
    proxy_factory, upstream, tmp_path
):
    with tmpfs(tmp_path / "small", "size=64k") as root:
        filler = root / "filler.bin"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        proxy = proxy_factory(mode="record", cassette_dir=root)
        record_one_whole_and_one_stream(proxy, upstream, "disk full")
        log = proxy.wait_for_log("FAILED to record POST /v1/chat/completions key", timeout=5)
        for prompt in ("whole disk full", "stream disk full"):
            key = key_of_request(chat(prompt, **({"stream": True} if "stream" in prompt else {})))
            assert f"FAILED to record POST /v1/chat/completions key {key}" in log
        assert sorted(p.name for p in root.rglob("*")) == ["filler.bin"]

        filler.unlink()  # room again: the very next recording works
        record_one_whole_and_one_stream(proxy, upstream, "room again")
        assert len(all_valid(root)) == 2
        assert proxy.returncode is None


def test_a_read_only_cassette_dir_still_answers_logs_loudly_and_leaves_nothing(
    proxy_factory, upstream, tmp_path
):
    with tmpfs(tmp_path / "ro", "size=64k,ro") as root:
        proxy = proxy_factory(mode="record", cassette_dir=root)
        assert "not writable" in proxy.wait_for_log("not writable")
        record_one_whole_and_one_stream(proxy, upstream, "read-only")
        log = proxy.wait_for_log("FAILED to record", timeout=5)
        assert log.count("FAILED to record POST /v1/chat/completions") == 2
        assert "Read-only file system" in log
        assert list(root.rglob("*")) == []
        assert proxy.returncode is None
