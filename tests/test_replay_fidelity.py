"""Issue 19: a replay a client cannot tell from the live answer.

The same body bytes (whole answers and stream chunks, compact JSON as servers write it),
the same headers clients read (request ids, rate limits), no churn of unchanged files,
uploads keyed by the file, OGX's Tavily recordings answering Tavily's HTTP search.
Real proxies, real clients (httpx, curl, the openai and anthropic SDKs) and a real
upstream on loopback (tests/fidelity_upstream.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from cassette_proxy.cassette import read_cassette
from conftest import cassette_files, openai_client, wait_for_files
from fidelity_upstream import FidelityUpstream

FIXTURES = Path(__file__).parent / "fixtures" / "llama-stack"
TAVILY_FIXTURE = FIXTURES / "0f1241e957d1016bf65c80a3de2a51e9a786eb96687e88389b3173ad193b621e.json"


@pytest.fixture
def fidelity() -> Iterator[FidelityUpstream]:
    server = FidelityUpstream()
    yield server
    server.stop()


def _client(proxy: Any) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, trust_env=False, timeout=30)


# What each call sends: (path, body). Every family's whole answers and both OpenAI streams.
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ),
    ("/v1/completions", {"model": "m", "prompt": "once"}),
    ("/v1/completions", {"model": "m", "prompt": "once", "stream": True}),
    ("/v1/embeddings", {"model": "m", "input": "abc"}),
    ("/v1/messages", {"model": "claude", "max_tokens": 8, "messages": []}),
    ("/v1/odd", {"x": 1}),
]


def test_every_answer_replays_the_bytes_the_client_got_live(
    proxy_factory: Callable[..., Any], fidelity: FidelityUpstream, tmp_path: Path
) -> None:
    recorder = proxy_factory(mode="record")
    live = []
    with _client(recorder) as client:
        for path, body in CALLS:
            answer = client.post(fidelity.url + path, json=body)
            assert answer.status_code == 200, answer.text
            live.append(answer.content)
    files = wait_for_files(recorder.cassette_dir, len(CALLS))
    recorder.stop()
    fidelity.stop()  # nothing below may reach it

    # Each cassette keeps llama-stack's typed form; the wire form is beside it.
    forms = {}
    for file in files:
        cassette = read_cassette(file)
        response = cassette.response.model_dump()
        endpoint = cassette.request.endpoint or ""
        forms[(endpoint, cassette.response.is_streaming)] = response.get("wire_form")
        if endpoint.endswith(("/chat/completions", "/completions", "/embeddings")):
            body = response["body"]
            first = body[0] if isinstance(body, list) else body
            assert first["__type__"].startswith("openai.types.") and "__data__" in first
    # Python's compact json (its float -1e-05 is not pydantic's -1e-5); chunks without a
    # float read as pydantic's (orjson) layout, tried first: the same bytes either way.
    assert forms[("/v1/chat/completions", False)] == {"json": "compact"}
    assert forms[("/v1/chat/completions", True)] == {"json": "orjson"}
    assert forms[("/v1/completions", False)] == {"json": "orjson"}
    assert forms[("/v1/completions", True)] == {"json": "orjson", "eol": "\r\n"}
    assert "text" in forms[("/v1/odd", False)]

    replayer = proxy_factory(mode="replay")
    with _client(replayer) as client:
        for (path, body), expected in zip(CALLS, live, strict=True):
            answer = client.post(fidelity.url + path, json=body)
            assert answer.status_code == 200, answer.text
            assert answer.content == expected, path


def test_a_hand_edited_text_form_sends_the_value_not_stale_text(
    proxy_factory: Callable[..., Any], fidelity: FidelityUpstream
) -> None:
    """A verbatim text is sent only while it still says what the cassette's body says."""
    recorder = proxy_factory(mode="record")
    with _client(recorder) as client:
        assert client.post(fidelity.url + "/v1/odd", json={"x": 1}).status_code == 200
    [file] = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    doc = json.loads(file.read_text())
    doc["response"]["body"]["value"] = [4, 5]
    file.write_text(json.dumps(doc, indent=2) + "\n")
    replayer = proxy_factory(mode="replay")
    with _client(replayer) as client:
        answer = client.post(fidelity.url + "/v1/odd", json={"x": 1})
    assert answer.json()["value"] == [4, 5]


def test_request_ids_and_rate_limits_replay_as_recorded(
    proxy_factory: Callable[..., Any], fidelity: FidelityUpstream
) -> None:
    recorder = proxy_factory(mode="record", options={"cassette_answer_headers": ["X-Custom-Trace"]})
    client = openai_client(recorder, fidelity.url)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    live_id = raw.request_id
    live_headers = dict(raw.headers)
    assert live_id and live_id.startswith("req_")
    claude = anthropic.Anthropic(
        base_url=fidelity.url,
        api_key="sk-ant-test-000000000000",
        http_client=httpx2.Client(proxy=recorder.url, trust_env=False),
        max_retries=0,
    )
    message = claude.messages.create(model="claude", max_tokens=8, messages=[])
    live_anthropic_id = message._request_id
    assert live_anthropic_id and live_anthropic_id.startswith("req_01")
    files = wait_for_files(recorder.cassette_dir, 2)
    recorder.stop()
    fidelity.stop()

    text = "".join(f.read_text() for f in files)
    assert "secret-cookie" not in text and "anthropic-secret" not in text
    assert "set-cookie" not in text

    replayer = proxy_factory(mode="replay")
    client = openai_client(replayer, fidelity.url)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.request_id == live_id
    assert raw.parse()._request_id == live_id
    for name in (
        "openai-processing-ms",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-custom-trace",  # added by the option
    ):
        assert raw.headers[name] == live_headers[name], name
    assert "set-cookie" not in raw.headers
    claude = anthropic.Anthropic(
        base_url=fidelity.url,
        api_key="sk-ant-test-000000000000",
        http_client=httpx2.Client(proxy=replayer.url, trust_env=False),
        max_retries=0,
    )
    again = claude.messages.with_raw_response.create(model="claude", max_tokens=8, messages=[])
    assert again.parse()._request_id == live_anthropic_id
    assert again.headers["anthropic-ratelimit-requests-remaining"]
    assert again.headers["retry-after"] == "3"
    assert "set-cookie" not in again.headers


def test_an_unchanged_answer_leaves_its_file_untouched(
    proxy_factory: Callable[..., Any], fidelity: FidelityUpstream
) -> None:
    """Auto mode re-records on every live run: volatile fields (ids, created, fingerprint,
    request ids, rate limits, timing) leave the file as it was; a changed answer is
    rewritten and the log names what changed."""
    calls = CALLS[:2] + CALLS[5:6]  # chat whole and streamed, an Anthropic message

    def suite_run() -> Any:  # one run of a test suite: a proxy of its own, auto mode
        proxy = proxy_factory()
        with _client(proxy) as client:
            for path, body in calls:
                assert client.post(fidelity.url + path, json=body).status_code == 200
        return proxy

    first = suite_run()
    files = wait_for_files(first.cassette_dir, len(calls))
    first.stop()
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}

    fidelity.run = 2  # every id, created, fingerprint and request id changes
    second = suite_run()
    second.stop()
    assert second.log_text().count("volatile fields aside") == len(calls), second.log_text()
    for f in files:
        assert (f.read_bytes(), f.stat().st_mtime_ns) == before[f], f.name
    assert sorted(cassette_files(first.cassette_dir)) == sorted(files)

    fidelity.text = "A different answer"
    third = suite_run()
    third.stop()
    log = third.log_text()
    assert "re-recorded" in log and "choices[0].message.content" in log, log
    changed = [f for f in files if f.read_bytes() != before[f][0]]
    assert len(changed) == 3  # the two chat answers and the message say the new text
    assert all("A differe" in f.read_text() for f in changed)  # streamed in halves


def test_an_upload_replays_whatever_content_type_the_client_gave_its_part(
    proxy_factory: Callable[..., Any], upstream_factory: Any, tmp_path: Path
) -> None:
    from upstreams import start_credential_upstream

    upstream = start_credential_upstream("UP")
    try:
        recorder = proxy_factory(mode="record")
        wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))
        sdk = openai_client(recorder, upstream.url)
        live = sdk.audio.transcriptions.create(
            model="whisper-1", file=("clip.wav", wav, "audio/x-wav")
        )
        wait_for_files(recorder.cassette_dir, 1)
        recorder.stop()
    finally:
        upstream.shutdown()
        upstream.server_close()
    replayer = proxy_factory(mode="replay")
    audio = tmp_path / "clip.wav"
    audio.write_bytes(wav)

    def curl(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "curl", "-sS", "--proxy", replayer.url, "-w", "\n%{http_code}",
                "-H", "Authorization: Bearer sk-test-cassette-0000",
                "-F", f"file=@{path};type=application/octet-stream",
                "-F", "model=whisper-1",
                f"{upstream.url}/v1/audio/transcriptions",
            ],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    done = curl(audio)
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", done.stdout + done.stderr
    assert json.loads(body)["text"] == live.text

    (tmp_path / "other").mkdir()
    moved = tmp_path / "other" / "clip.wav"  # the same name, other bytes
    moved.write_bytes(wav + b"\x01")
    done = curl(moved)
    body, _, status = done.stdout.rpartition("\n")
    assert status != "200"
    sent, recorded = hashlib.sha256(wav + b"\x01").hexdigest(), hashlib.sha256(wav).hexdigest()
    assert "body.file.sha256" in body and sent in body and recorded in body, body


def test_ogx_tavily_recording_answers_tavily_http_search(
    proxy_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """OGX's provider posts {api_key, query} to Tavily and keeps {"query", "top_k":
    results} as json.dumps text: from the replayed answer it builds the recorded text."""
    folder = tmp_path / "ogx"
    folder.mkdir()
    shutil.copy(TAVILY_FIXTURE, folder / TAVILY_FIXTURE.name)
    recorded = json.loads(TAVILY_FIXTURE.read_text())
    query = recorded["request"]["kwargs"]["query"]
    proxy = proxy_factory(mode="replay", cassette_dir=folder)
    log = proxy.wait_for_log("cassettes:")
    assert "not served" not in log.split("cassettes:")[-1].splitlines()[0]
    trust = ssl.create_default_context(cafile=proxy.ca_cert)
    with httpx.Client(proxy=proxy.url, verify=trust, trust_env=False) as client:
        answer = client.post(
            "https://api.tavily.com/search",
            json={"api_key": "tvly-dev-abcdef1234567890", "query": query},
        )
    assert answer.status_code == 200, answer.text
    data = answer.json()
    content = json.dumps({"query": data["query"], "top_k": data["results"]})
    assert content == recorded["response"]["body"]["__data__"]["content"]
    with httpx.Client(proxy=proxy.url, verify=trust, trust_env=False) as client:
        miss = client.post(
            "https://api.tavily.com/search",
            json={"api_key": "tvly-dev-abcdef1234567890", "query": "something else"},
        )
    assert miss.status_code != 200


def _first_event_after(port: int, url: str, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request through the proxy to its first SSE event."""
    data = json.dumps(body).encode()
    head = (
        f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\ncontent-type: application/json"
        f"\r\ncontent-length: {len(data)}\r\nconnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        start = time.monotonic()
        s.sendall(head + data)
        seen = b""
        while b"data: " not in seen:
            more = s.recv(65536)
            assert more, seen
            seen += more
        return time.monotonic() - start


def test_a_fresh_proxy_answers_its_first_request_on_time(
    proxy_factory: Callable[..., Any], fidelity: FidelityUpstream, tmp_path: Path
) -> None:
    """Nothing starts on a fresh proxy's first request: not the CA mitmproxy read again
    once the port listened (a 4096-bit CA here: its key check took 0.6 s on the test
    machine, on the event loop), nor threads or servers made on first use. The margins
    are generous: 0.15 s over what the upstream (or the recording) takes."""
    from mitmproxy.certs import CertStore

    confdir = tmp_path / "ca4096"
    CertStore.from_store(confdir, "mitmproxy", 4096)  # made once, read by each proxy
    fidelity.first_event_delay = 0.3
    url = fidelity.url + "/v1/chat/completions"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    recorder = proxy_factory(mode="record", confdir=confdir)
    first_recorded = _first_event_after(recorder.port, url, chat)  # right after it listens
    assert 0.3 <= first_recorded < 0.3 + 0.15, first_recorded
    [file] = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    recorded = read_cassette(file).response.model_dump()["timing"]["chunks_ms"][0] / 1000
    assert 0.3 <= recorded < 0.45

    replayer = proxy_factory(
        mode="replay", confdir=confdir, options={"cassette_pacing": "recorded"}
    )
    first_replayed = _first_event_after(replayer.port, url, chat)
    assert recorded - 0.02 <= first_replayed < recorded + 0.15, (first_replayed, recorded)


def test_a_big_stream_written_as_it_passes_replays_its_bytes(
    proxy_factory: Callable[..., Any], fidelity: FidelityUpstream
) -> None:
    """Over 128 KiB a chat stream is written to its cassette as it passes (spool.py):
    its wire form is in the file's tail, and the replay sends the live bytes."""
    fidelity.n_chunks = 1500  # ~270 KB of compact chunks
    body = {"model": "m", "messages": [{"role": "user", "content": "big"}], "stream": True}
    recorder = proxy_factory(mode="record", options={"termlog_verbosity": "debug"})
    with _client(recorder) as client:
        live = client.post(fidelity.url + "/v1/chat/completions", json=body).content
    [file] = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    assert len(live) > 200_000
    assert "written at its end" not in recorder.log_text()  # it was spooled
    assert read_cassette(file).response.model_dump()["wire_form"] == {"json": "orjson"}
    replayer = proxy_factory(mode="replay")
    with _client(replayer) as client:
        again = client.post(fidelity.url + "/v1/chat/completions", json=body).content
    assert again == live


def test_a_big_stream_written_as_it_passes_does_not_churn(
    proxy_factory: Callable[..., Any], fidelity: FidelityUpstream, tmp_path: Path
) -> None:
    """A spooled stream (over 128 KiB) equal to its recording but for ids and created
    leaves the file as it was; one with another text is rewritten."""
    fidelity.n_chunks = 1500
    body = {"model": "m", "messages": [{"role": "user", "content": "big"}], "stream": True}

    def suite_run() -> None:
        proxy = proxy_factory()  # auto
        with _client(proxy) as client:
            assert client.post(fidelity.url + "/v1/chat/completions", json=body).status_code == 200
        proxy.stop()

    suite_run()
    [file] = cassette_files(tmp_path / "cassettes")  # proxy_factory's folder
    before = (file.read_bytes(), file.stat().st_mtime_ns)
    fidelity.run = 2
    suite_run()
    assert (file.read_bytes(), file.stat().st_mtime_ns) == before
    fidelity.text = "Changed"
    suite_run()
    assert file.read_bytes() != before[0]
