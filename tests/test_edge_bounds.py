"""Issue 18, items 12-15: hostile file names, unbounded timings, streams that are not
UTF-8, and a cut-after beyond the stream.

Real mitmdump processes, real clients (httpx, the openai SDK) and real upstreams on
loopback (tests/upstreams.py, and tests/raw_upstream.py for bytes that are not UTF-8).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from cassette_proxy import pacing
from cassette_proxy.printable import printable
from conftest import cassette_files, openai_client, wait_for_files
from raw_upstream import RawUpstream
from upstreams import answer_text

CHAT = "/v1/chat/completions"


def chat(proxy: Any, upstream: Any, text: str, stream: bool = False, **kw: Any) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=20) as http:
        return http.post(upstream.url + CHAT, json=body, **kw)


# ---- item 12: a CR/LF in a cassette's file name ---------------------------------------------


@pytest.mark.parametrize("pacing", ["off", "recorded"])
def test_a_file_name_with_crlf_reaches_no_header_and_no_log_line(
    proxy_factory, upstream, tmp_path, pacing
):
    recorder = proxy_factory(mode="record")
    live = chat(recorder, upstream, "hi")
    assert live.status_code == 200
    [recorded] = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    folder = tmp_path / "hostile"
    folder.mkdir()
    name = "x\r\nSet-Cookie: session=attacker\r\nX-Pad: 1.json"
    (folder / name).write_bytes(recorded.read_bytes())
    replay = proxy_factory(mode="replay", cassette_dir=folder, options={"cassette_pacing": pacing})
    r = chat(replay, upstream, "hi")
    assert r.status_code == 200 and r.json() == live.json()
    assert "set-cookie" not in r.headers and "x-pad" not in r.headers
    assert r.headers["x-cassette-file"] == printable(name)
    assert "\\r\\nSet-Cookie: session=attacker" in r.headers["x-cassette-file"]
    replay.wait_for_log("Set-Cookie: session=attacker")
    lines = replay.log_text().splitlines()
    assert not any(line.lstrip().lower().startswith(("set-cookie", "x-pad")) for line in lines)


def test_printable_escapes_controls_only():
    assert printable("t/abc.json") == "t/abc.json"
    assert printable("a\r\nb\x1bc\u2028") == "a\\r\\nb\\x1bc\\u2028"


# ---- item 13: recorded timing is bounded ----------------------------------------------------


def test_an_absurd_recorded_timing_is_capped_with_a_warning(proxy_factory, upstream):
    recorder = proxy_factory(mode="record")
    live = chat(recorder, upstream, "count", stream=True)
    assert live.status_code == 200
    [path] = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    doc = json.loads(path.read_text())
    timing = doc["response"]["timing"]
    assert timing["chunks_ms"] and timing["total_ms"] < 60_000
    timing["chunks_ms"] = [1e300 for _ in timing["chunks_ms"]]
    path.write_text(json.dumps(doc))
    replay = proxy_factory(mode="replay", options={"cassette_pacing": "recorded"})
    started = time.monotonic()
    again = chat(replay, upstream, "count", stream=True)  # 20 s client timeout
    assert again.status_code == 200 and again.content == live.content
    assert time.monotonic() - started < 20
    replay.wait_for_log("out of bounds")
    assert f"recorded timing of {path.name}" in replay.log_text()


def test_recorded_timing_caps_at_the_total_and_at_the_maximum():
    capped = pacing.recorded_timing({"timing": {"chunks_ms": [5, 1e300], "total_ms": 50}})
    assert capped == {"chunks_ms": [5, 50], "total_ms": 50}
    assert pacing.recorded_timing({"timing": {"total_ms": 1e300}}) == {
        "total_ms": pacing.MAX_TIMING_MS
    }
    assert pacing.recorded_timing({"timing": {"chunks_ms": [1e300]}}) == {
        "chunks_ms": [pacing.MAX_TIMING_MS]
    }
    sane = {"timing": {"chunks_ms": [1.0, 2.0], "total_ms": 3.0}}
    assert pacing.recorded_timing(sane) == sane["timing"]


# ---- item 14: streamed answers that are not UTF-8 --------------------------------------------

CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"caf\xe9"},"finish_reason":null}]}\n\n'
    b"data: [DONE]\n\n"
)
NDJSON = (
    b'{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant",'
    b'"content":"caf\xe9"},"done":false}\n'
    b'{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant",'
    b'"content":""},"done":true}\n'
)


@pytest.fixture
def latin1_upstream():
    up = RawUpstream(
        {
            CHAT: ("text/event-stream", CHUNK),
            "/api/chat": ("application/x-ndjson", NDJSON),
            "/v1/events": ("text/event-stream", b'data: {"a": "caf\xe9"}\n\ndata: [DONE]\n\n'),
            "/v1/whole": ("application/json", b'{"a": "caf\xe9"}'),
        }
    )
    yield up
    up.stop()


def test_streams_that_are_not_utf8_are_refused_like_whole_answers(proxy_factory, latin1_upstream):
    up = latin1_upstream
    recorder = proxy_factory(mode="record")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.Client(proxy=recorder.url, trust_env=False, timeout=20) as http:
        for path, expected in ((CHAT, CHUNK), ("/api/chat", NDJSON)):
            r = http.post(up.url + path, json=body)
            assert r.status_code == 200 and r.content == expected  # the client got the bytes
        r = http.post(up.url + "/v1/events", json={"x": 1})
        assert r.content.endswith(b"data: [DONE]\n\n") and b"\xe9" in r.content
        whole = http.post(up.url + "/v1/whole", json={"x": 2})
        assert whole.content == b'{"a": "caf\xe9"}'
    recorder.wait_for_log("POST /v1/whole")
    for path in (CHAT, "/api/chat", "/v1/events"):
        text = recorder.wait_for_log(f"not recorded POST {path} ")
        [line] = [x for x in text.splitlines() if f"not recorded POST {path} " in x]
        assert "not valid UTF-8" in line, line
    time.sleep(0.5)  # a cassette would be written by now (the log line comes after)
    recorder.stop()
    written = [f.read_bytes() for f in cassette_files(recorder.cassette_dir)]
    assert written == [], written  # nothing recorded with U+FFFD in place of the bytes
    assert "not recorded POST /v1/whole" in recorder.log_text()


def test_utf8_streams_are_still_recorded_exactly(proxy_factory, upstream):
    recorder = proxy_factory(mode="record")
    client = openai_client(recorder, upstream)
    text = "café ☕ — naïve"
    chunks = list(client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": text}], stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer_text("A", text)
    [path] = wait_for_files(recorder.cassette_dir, 1)
    assert "U+FFFD" not in path.read_text() and "\ufffd" not in path.read_text()


# ---- item 15: cut-after=N at or beyond the stream's length ------------------------------------


def test_cut_after_beyond_the_stream_says_so(proxy_factory, upstream):
    recorder = proxy_factory(mode="record")
    live = chat(recorder, upstream, "count", stream=True)
    [path] = wait_for_files(recorder.cassette_dir, 1)
    recorder.stop()
    chunks = len(json.loads(path.read_text())["response"]["body"]) + 1  # and data: [DONE]
    replay = proxy_factory(mode="replay")
    for n in (chunks, chunks + 50):
        r = chat(
            replay, upstream, "count", stream=True, headers={"X-Cassette-Fault": f"cut-after={n}"}
        )
        assert r.status_code == 400, r.text[:300]
        error = r.json()["error"]
        assert error["code"] == "cassette_bad_fault"
        assert f"has {chunks} chunk(s)" in error["message"]
        replay.wait_for_log(f"fault 'cut-after={n}' not applied")
    assert "cut after" not in replay.log_text()
    # Below the length the cut happens, as before.
    with pytest.raises(httpx.HTTPError):
        chat(replay, upstream, "count", stream=True, headers={"X-Cassette-Fault": "cut-after=1"})
    replay.wait_for_log("cut after 1 chunk(s)")
    assert chat(replay, upstream, "count", stream=True).content == live.content
