"""Safe storage (issue 9, findings 5, 7, 12, 13b-d): what is recorded, what is kept, and
several proxies on one folder.

Real mitmdump processes, real clients (openai and ollama SDKs, httpx, curl, a raw socket
where only bytes tell), real upstreams on 127.0.0.1 (tests/upstreams.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cassette_proxy.cassette import TEMP_PREFIX, read_cassette, temp_prefix
from conftest import HOST, cassette_files, openai_client, wait_for_files, wait_until
from upstreams import (
    ScriptedUpstream,
    answer_text,
    http_answer,
    start_ollama_upstream,
    start_scripted_upstream,
)

CHAT_PATH = "/v1/chat/completions"
PROMPTS = [f"question {i}" for i in range(5)]


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


def strict_json(path: Path) -> Any:
    """A file read as JSON that refuses NaN and Infinity (json.loads accepts them)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def answers_in(directory: Path) -> dict[str, Any]:
    """prompt -> recorded response half, for every chat cassette below `directory`."""
    out = {}
    for f in cassette_files(directory):
        doc = strict_json(f)
        out[doc["request"]["body"]["messages"][0]["content"]] = doc["response"]
    return out


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedUpstream]]:
    started: list[ScriptedUpstream] = []

    def factory(answer: bytes = b"", answers: dict[str, bytes] | None = None) -> ScriptedUpstream:
        up = start_scripted_upstream(answer, answers)
        started.append(up)
        return up

    yield factory
    for up in started:
        up.stop()


# ---- 5. an error never replaces a success -----------------------------------------------


def record_five(proxy: Any, upstream: Any) -> dict[str, Any]:
    client = openai_client(proxy, upstream)
    for prompt in PROMPTS:
        got = client.chat.completions.create(**chat(prompt))
        assert got.choices[0].message.content == answer_text("A", prompt)
    wait_for_files(proxy.cassette_dir, 5)
    recorded = answers_in(proxy.cassette_dir)
    assert sorted(recorded) == PROMPTS
    return recorded


@pytest.mark.parametrize("status", [401, 404, 200])
def test_an_upstream_error_never_replaces_a_recorded_success_in_auto_mode(
    proxy_factory, upstream, status
):
    proxy = proxy_factory(mode="auto")
    recorded = record_five(proxy, upstream)
    proxy.stop()

    # A new run: the key is revoked, the model gone, or the server says so in a 200 body.
    # Each request is asked once (a second time in a run is its sequence's position 2).
    proxy = proxy_factory(mode="auto", cassette_dir=proxy.cassette_dir)
    upstream.configure(fail_mode="status", fail_status=status)
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        live = [http.post(upstream.url + CHAT_PATH, json=chat(p)) for p in PROMPTS[1:]]
    assert [r.status_code for r in live] == [status] * 4  # the client gets the live error
    assert all("injected failure" in r.json()["error"]["message"] for r in live)
    assert all("x-cassette-file" not in r.headers for r in live)
    if status != 200:  # the openai SDK too
        with pytest.raises(openai.APIStatusError) as raised:
            openai_client(proxy, upstream).chat.completions.create(**chat(PROMPTS[0]))
        assert raised.value.status_code == status
    else:
        with httpx.Client(proxy=proxy.url, trust_env=False) as http:
            assert http.post(upstream.url + CHAT_PATH, json=chat(PROMPTS[0])).status_code == 200
    proxy.wait_for_log("kept ")
    assert proxy.log_text().count("an error never replaces a success") >= 5

    # All five cassettes still hold the successes, byte for byte.
    assert answers_in(proxy.cassette_dir) == recorded
    assert len(cassette_files(proxy.cassette_dir)) == 5

    upstream.stop()
    client = openai_client(proxy, upstream)
    for prompt in PROMPTS:
        again = client.chat.completions.create(**chat(prompt))
        assert again.choices[0].message.content == answer_text("A", prompt)


def test_an_error_for_a_new_request_is_still_recorded(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto")
    record_five(proxy, upstream)
    upstream.configure(fail_mode="status", fail_status=401)
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        assert http.post(upstream.url + CHAT_PATH, json=chat("new one")).status_code == 401
    files = wait_for_files(proxy.cassette_dir, 6)
    assert len(files) == 6
    errors = [d for d in map(strict_json, files) if d["response"].get("is_exception")]
    assert [d["request"]["body"]["messages"][0]["content"] for d in errors] == ["new one"]


def test_a_record_run_replaces_a_success_with_the_error_and_warns(proxy_factory, upstream):
    first = proxy_factory(mode="record")
    record_five(first, upstream)
    first.stop()
    # A new record run: within one run a repeated request is the next answer of its
    # sequence (test_agent_replay.py); a new run replaces what an earlier one recorded.
    proxy = proxy_factory(mode="record")
    upstream.configure(fail_mode="status", fail_status=401)
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        assert http.post(upstream.url + CHAT_PATH, json=chat(PROMPTS[0])).status_code == 401
    proxy.wait_for_log("record: upstream answered 401 for POST /v1/chat/completions")
    proxy.wait_for_log("this error replaces the successful recording")  # a warning
    now = answers_in(proxy.cassette_dir)
    assert now[PROMPTS[0]]["is_exception"] is True
    assert now[PROMPTS[0]]["exception_data"]["status_code"] == 401
    assert all("is_exception" not in now[p] for p in PROMPTS[1:])


def test_record_if_missing_keeps_a_success_recorded_while_an_error_was_in_flight(
    proxy_factory, upstream
):
    """Two clients send the same request; the first one's answer is an error that
    arrives after the second one's success was recorded: the success stays."""
    hold = threading.Event()
    upstream.configure(fail_mode="status", fail_status=401, fail_times=1, fail_hold=hold)
    proxy = proxy_factory(mode="record-if-missing")
    first: list[httpx.Response] = []

    def send_first() -> None:
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
            first.append(http.post(upstream.url + CHAT_PATH, json=chat("race")))

    sender = threading.Thread(target=send_first)
    sender.start()
    try:
        wait_until(lambda: upstream.requests_to(CHAT_PATH), what="first request upstream")
        second = openai_client(proxy, upstream).chat.completions.create(**chat("race"))
        assert second.choices[0].message.content == answer_text("A", "race")
        (path,) = wait_for_files(proxy.cassette_dir, 1)
    finally:
        hold.set()
        sender.join(60)
    assert first[0].status_code == 401
    proxy.wait_for_log("kept ")
    assert "is_exception" not in strict_json(path)["response"]
    assert len(cassette_files(proxy.cassette_dir)) == 1


# ---- 7. a close-delimited stream is whole only at its end marker --------------------------


def sse_answer(body: bytes, framing: str = "close") -> bytes:
    """A 200 text/event-stream answer: close-delimited (no length, no chunking) or chunked."""
    headers = {"Content-Type": "text/event-stream", "Connection": "close"}
    if framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        half = len(body) // 2
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p)
        body += b"0\r\n\r\n"
    return http_answer(200, headers, body)


def events(*pairs: tuple[str | None, dict[str, Any] | str]) -> bytes:
    out = b""
    for name, data in pairs:
        text = data if isinstance(data, str) else json.dumps(data)
        out += (f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode()
    return out


ANTHROPIC = events(
    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "role": "assistant"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello"}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
)  # fmt: skip
MESSAGE_STOP = events(("message_stop", {"type": "message_stop"}))
CUT = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "del'


def parsed_events(text: str) -> list[tuple[str | None, Any]]:
    out = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        if data is not None:
            out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


def post_stream(proxy: Any, url: str) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        return http.post(url, json={"model": "claude-x", "stream": True, "max_tokens": 5})


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/custom/events"])
def test_a_close_delimited_stream_cut_mid_event_is_not_recorded(proxy_factory, scripted, path):
    sent = ANTHROPIC + CUT
    upstream = scripted(sse_answer(sent))
    proxy = proxy_factory(mode="auto")
    live = post_stream(proxy, upstream.url + path)
    assert live.status_code == 200
    assert live.content == sent  # passed on as it came: no newline after the half line
    proxy.wait_for_log("not recorded")
    assert cassette_files(proxy.cassette_dir) == []

    upstream.stop()
    replay = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    miss = post_stream(replay, upstream.url + path)
    assert miss.status_code == 404 and "x-cassette-miss" in miss.headers


def test_a_close_delimited_stream_of_whole_events_without_an_end_marker_is_not_recorded(
    proxy_factory, scripted
):
    """A close right after a blank line may still be a crash between two events."""
    upstream = scripted(sse_answer(ANTHROPIC))
    proxy = proxy_factory(mode="auto")
    assert post_stream(proxy, upstream.url + "/v1/custom/events").content == ANTHROPIC
    proxy.wait_for_log("before its end marker")
    assert cassette_files(proxy.cassette_dir) == []


@pytest.mark.parametrize(
    "path,sent,kind",
    [
        ("/v1/messages", ANTHROPIC + MESSAGE_STOP, "text/event-stream"),
        ("/v1/custom/events", ANTHROPIC + MESSAGE_STOP, "text/event-stream"),
        ("/v1/custom/done", events((None, {"x": 1}), (None, "[DONE]")), "text/event-stream"),
        (
            "/v1/custom/responses",
            events(("response.created", {"type": "response.created"}),
                   ("response.completed", {"type": "response.completed"})),
            "text/event-stream",
        ),
        (
            "/v1/custom/ndjson",
            b'{"response": "a", "done": false}\n{"response": "", "done": true}\n',
            "application/x-ndjson",
        ),
    ],
)  # fmt: skip
def test_a_close_delimited_stream_ending_with_its_end_marker_is_recorded_and_replays(
    proxy_factory, scripted, path, sent, kind
):
    answer = http_answer(200, {"Content-Type": kind, "Connection": "close"}, sent)
    upstream = scripted(answer)
    proxy = proxy_factory(mode="auto")
    live = post_stream(proxy, upstream.url + path)
    assert live.content == sent
    (file,) = wait_for_files(proxy.cassette_dir, 1)
    assert strict_json(file)["response"]["is_streaming"] is True

    upstream.stop()
    replay = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    again = post_stream(replay, upstream.url + path)
    assert again.status_code == 200 and "x-cassette-file" in again.headers
    if kind == "application/x-ndjson":
        assert again.content == sent
    else:
        assert parsed_events(again.text) == parsed_events(sent.decode())
    if path.startswith("/v1/custom/"):  # the raw family replays byte for byte
        assert again.content == sent


def test_a_chunked_stream_without_an_end_marker_is_recorded_at_its_clean_end(
    proxy_factory, scripted
):
    upstream = scripted(sse_answer(ANTHROPIC, framing="chunked"))
    proxy = proxy_factory(mode="auto")
    assert post_stream(proxy, upstream.url + "/v1/custom/events").content == ANTHROPIC
    (file,) = wait_for_files(proxy.cassette_dir, 1)
    upstream.stop()
    replay = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    assert post_stream(replay, upstream.url + "/v1/custom/events").content == ANTHROPIC


# ---- 12. several proxies on one folder -----------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_starting_proxy_removes_only_stale_temp_files(proxy_factory, tmp_path):
    folder = tmp_path / "cassettes"
    (folder / "a-test").mkdir(parents=True)
    in_flight = folder / f"{temp_prefix(os.getpid())}x1.partial"  # a live writer, this host
    foreign = folder / "a-test" / f"{TEMP_PREFIX}otherhost-123-x2.partial"  # another host
    crashed = folder / f"{temp_prefix(dead_pid())}x3.partial"  # its writer is gone
    old = folder / "a-test" / f"{TEMP_PREFIX}legacy.partial"  # left an hour ago
    for f in (in_flight, foreign, crashed, old):
        f.write_text('{"request": {"meth')
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))

    proxy = proxy_factory(mode="replay", cassette_dir=folder)
    proxy.wait_for_log("loaded from")
    assert "removed 2 unfinished temp file(s)" in proxy.log_text()
    assert in_flight.exists() and foreign.exists()
    assert not crashed.exists() and not old.exists()


def test_proxies_starting_on_a_folder_another_one_records_into_lose_nothing(
    proxy_factory, upstream
):
    recorder = proxy_factory(mode="auto")
    stop = threading.Event()
    done: list[str] = []

    def record() -> None:
        client = openai_client(recorder, upstream)
        i = 0
        while not stop.is_set() and i < 400:
            prompt = f"busy {i}"
            stream = i % 2 == 1
            got = client.chat.completions.create(**chat(prompt), stream=stream)
            if stream:
                list(got)
            done.append(prompt)
            i += 1

    worker = threading.Thread(target=record)
    worker.start()
    try:
        for _ in range(3):  # pytest-xdist workers starting on the same folder
            proxy_factory(mode="replay", cassette_dir=recorder.cassette_dir).stop()
    finally:
        stop.set()
        worker.join(120)
    assert len(done) >= 10
    recorder.stop()  # flushes every write
    assert "FAILED to record" not in recorder.log_text()
    recorded = {read_cassette(f).request.body["messages"][0]["content"]
                for f in cassette_files(recorder.cassette_dir)}  # fmt: skip
    assert recorded == set(done)


def test_a_running_proxy_serves_added_and_changed_cassettes_and_drops_deleted_and_corrupt_ones(
    proxy_factory, upstream, tmp_path
):
    folder = tmp_path / "shared"
    replayer = proxy_factory(mode="replay", cassette_dir=folder)  # started on an empty folder
    recorder = proxy_factory(mode="auto", cassette_dir=folder)
    client = openai_client(replayer, upstream)

    def ask(prompt: str) -> str | None:
        try:
            return client.chat.completions.create(**chat(prompt)).choices[0].message.content
        except openai.NotFoundError:
            return None

    assert ask("first") is None
    # Another proxy records: the running one serves it.
    openai_client(recorder, upstream).chat.completions.create(**chat("first"))
    assert wait_until(lambda: ask("first"), what="recorded by the other proxy") == answer_text(
        "A", "first"
    )

    # A person copies in a cassette recorded elsewhere.
    elsewhere = proxy_factory(mode="auto", cassette_dir=tmp_path / "elsewhere")
    openai_client(elsewhere, upstream).chat.completions.create(**chat("copied"))
    (made,) = wait_for_files(elsewhere.cassette_dir, 1)
    elsewhere.stop()
    shutil.copy(made, folder / "copied.json")
    assert wait_until(lambda: ask("copied"), what="copied in") == answer_text("A", "copied")

    # Edited in place: the new answer is served, not the one in memory.
    doc = json.loads((folder / "copied.json").read_text())
    doc["response"]["body"]["__data__"]["choices"][0]["message"]["content"] = "edited"
    (folder / "copied.json").write_text(json.dumps(doc, indent=2) + "\n")
    wait_until(lambda: ask("copied") == "edited", what="edited in place")

    # Deleted: no longer served.
    (folder / "copied.json").unlink()
    wait_until(lambda: ask("copied") is None, what="deleted")
    replayer.wait_for_log("no longer served")

    # Corrupted: no longer served, and the log says why.
    (first_file,) = cassette_files(folder)
    first_file.write_text('{"request": {"method": "POST", "ur')
    wait_until(lambda: ask("first") is None, what="corrupted")
    replayer.wait_for_log("cassette skipped")
    assert replayer.returncode is None


# ---- 13b. a HEAD miss has no body ----------------------------------------------------------


def raw_head(proxy: Any, url: str) -> bytes:
    with socket.create_connection((HOST, proxy.port), timeout=30) as s:
        s.sendall(f"HEAD {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_a_head_miss_is_answered_without_a_body(proxy_factory, upstream):
    proxy = proxy_factory(mode="replay")
    raw = raw_head(proxy, upstream.url + "/v1/models")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and b"x-cassette-miss" in head.lower()
    assert rest == b""  # nothing after the headers
    curl = subprocess.run(
        ["curl", "-sS", "-I", "--max-time", "30", "--proxy", proxy.url, upstream.url + "/v1/x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.startswith("HTTP/1.1 404") and "x-cassette-miss" in curl.stdout.lower()
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        get = http.get(upstream.url + "/v1/models")  # GET still says why
    assert get.status_code == 404 and get.json()["error"]["type"] == "cassette_miss"


# ---- 13c. never a file that is not JSON ---------------------------------------------------


def json_answer(text: bytes, content_type: str = "application/json") -> bytes:
    return http_answer(200, {"Content-Type": content_type, "Content-Length": str(len(text))}, text)


CHAT_OBJECT = {
    "id": "c1", "object": "chat.completion", "created": 1, "model": "fake-model",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hi"},
                 "logprobs": {"content": [{"token": "hi", "logprob": "LOGPROB",
                                           "bytes": None, "top_logprobs": []}]}}],
}  # fmt: skip


def test_an_answer_with_a_number_json_cannot_hold_passes_through_unrecorded(
    proxy_factory, scripted
):
    chat_text = json.dumps(CHAT_OBJECT).replace('"LOGPROB"', "-1e400").encode()
    chunk = json.dumps({**CHAT_OBJECT, "object": "chat.completion.chunk"}).replace(
        '"LOGPROB"', "-1e400"
    )
    stream_text = f"data: {chunk}\n\ndata: [DONE]\n\n".encode()
    upstream = scripted(
        json_answer(b'{"value": -1e400, "ok": 1}'),
        answers={
            CHAT_PATH: json_answer(chat_text),
            "/v2/chat/completions": json_answer(stream_text, "text/event-stream"),
            "/v1/custom/fine": json_answer(b'{"fine": true}'),
        },
    )
    proxy = proxy_factory(mode="auto")
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        raw = http.post(upstream.url + "/v1/custom/value", json={"q": 1})
        assert raw.content == b'{"value": -1e400, "ok": 1}'  # as the upstream sent it
        assert http.post(CHAT_URL(upstream), json=chat("hi", stream=True)).status_code == 200
        streamed = http.post(upstream.url + "/v2/chat/completions", json=chat("s", stream=True))
        assert streamed.content == stream_text
        # The request itself holds the number: its cassette would not be JSON either.
        sent = b'{"model": "m", "temperature": 1e400}'
        fine = http.post(upstream.url + "/v1/custom/fine", content=sent,
                         headers={"content-type": "application/json"})  # fmt: skip
        assert fine.json() == {"fine": True}
    got = openai_client(proxy, upstream).chat.completions.create(**chat("hi"))
    assert got.choices[0].logprobs.content[0].logprob == float("-inf")
    wait_until(lambda: proxy.log_text().count("not valid JSON") >= 5, what="5 log lines")
    for f in cassette_files(proxy.cassette_dir):
        strict_json(f)  # whatever is there is JSON
    assert cassette_files(proxy.cassette_dir) == []
    assert not list(proxy.cassette_dir.rglob(f"{TEMP_PREFIX}*"))


def CHAT_URL(upstream: Any) -> str:  # noqa: N802 - reads as a constant at the call site
    return upstream.url + CHAT_PATH


# ---- 13d. an Ollama-compatible server that answers plain JSON by default ----------------


def test_ollama_chat_without_stream_answered_with_plain_json_is_recorded_and_replays(
    proxy_factory,
):
    upstream = start_ollama_upstream("A", default_stream=False)
    body = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "plain"}]}
    try:
        proxy = proxy_factory(mode="auto")
        with httpx.Client(proxy=proxy.url, trust_env=False) as http:
            live = http.post(upstream.url + "/api/chat", json=body)
        assert live.headers["content-type"] == "application/json"
        assert live.json()["message"]["content"] == answer_text("A", "plain")
        (file,) = wait_for_files(proxy.cassette_dir, 1)
        assert strict_json(file)["response"]["is_streaming"] is False
    finally:
        upstream.stop()
    replay = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    with httpx.Client(proxy=replay.url, trust_env=False) as http:
        again = http.post(upstream.url + "/api/chat", json=body)
    assert again.status_code == 200, again.text
    assert again.headers["content-type"] == "application/json"
    assert again.json() == live.json()
    curl = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--proxy", replay.url, upstream.url + "/api/chat",
         "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(curl.stdout) == live.json()


# ---- the rules alone (pure functions, no proxy) -------------------------------------------


def test_stale_temp_keeps_live_and_foreign_writers_files(tmp_path):
    from cassette_proxy.cassette import STALE_TEMP_SECONDS, stale_temp

    live = tmp_path / f"{temp_prefix(os.getpid())}a.partial"
    gone = tmp_path / f"{temp_prefix(dead_pid())}b.partial"
    foreign = tmp_path / f"{TEMP_PREFIX}elsewhere-1-c.partial"
    for f in (live, gone, foreign):
        f.write_text("{")
    assert [stale_temp(f) for f in (live, gone, foreign)] == [False, True, False]
    later = time.time() + STALE_TEMP_SECONDS + 60
    assert [stale_temp(f, now=later) for f in (live, gone, foreign)] == [True, True, True]
    assert stale_temp(tmp_path / "vanished.partial") is False


def raw_recorder_fed(text: str, reads: int = 7) -> Any:
    from cassette_proxy.families.raw import RawLinesRecorder

    recorder = RawLinesRecorder(200)
    data = text.encode()
    step = max(1, len(data) // reads)
    for i in range(0, len(data), step):
        recorder.feed(data[i : i + step])
    return recorder


@pytest.mark.parametrize(
    "text,complete",
    [
        ((ANTHROPIC + MESSAGE_STOP).decode(), True),
        (ANTHROPIC.decode(), False),
        ((ANTHROPIC + MESSAGE_STOP[:-1]).decode(), False),  # the end event's blank line not yet
        ('data: {"type": "response.completed"}\n\n', True),
        ("event: response.incomplete\ndata: {}\n\n", True),
        ('data: {"text": "message_stop is a word"}\n\n', False),
        ("data: [DONE]\n\n", True),
        ('{"done": false}\n{"done": true}\n', True),
        ('{"done": false}\n{"done": tr', False),
    ],
)
def test_the_raw_family_knows_the_end_markers(text, complete):
    recorder = raw_recorder_fed(text)
    assert recorder.complete is complete
    if complete:
        assert recorder.response(clean_end=False)["body"][-1] in ("", '{"done": true}')
    else:
        with pytest.raises(Exception, match="before its end marker"):
            recorder.response(clean_end=False)


def test_a_half_line_is_kept_only_at_a_clean_end():
    recorder = raw_recorder_fed("data: [DONE]\n\ndata: half")
    assert recorder.response(clean_end=False)["body"] == ["data: [DONE]", ""]
    assert recorder.response(clean_end=True)["body"] == ["data: [DONE]", "", "data: half"]


def test_is_error_and_the_ollama_stream_default():
    from cassette_proxy.families.ollama import with_stream_default
    from cassette_proxy.recording import is_error

    assert is_error({"is_exception": True, "body": None})
    assert is_error({"status": 404, "body": {"detail": "x"}})
    assert is_error({"status": 200, "body": {"error": {"message": "no"}}})
    assert is_error({"body": {"__type__": "t", "__data__": {"error": "no"}}})
    assert not is_error({"body": {"__type__": "t", "__data__": {"id": "c"}}})
    assert not is_error({"status": 200, "body": {"error": None, "ok": 1}})
    assert not is_error({"body": [], "is_streaming": True})
    assert with_stream_default("/api/chat", {"model": "m"}) == {"model": "m", "stream": True}
    assert with_stream_default("/api/chat", {"stream": False}) == {"stream": False}
    assert with_stream_default("/api/embed", {"model": "m"}) == {"model": "m"}
    assert with_stream_default("/v1/chat/completions", {"model": "m"}) == {"model": "m"}


def test_store_refresh_sees_new_changed_and_removed_files(tmp_path, repo_root, monkeypatch):
    from cassette_proxy import store as store_module
    from cassette_proxy.store import CassetteStore, key_of

    monkeypatch.setattr(store_module, "RESCAN_INTERVAL", 0.0)
    monkeypatch.setattr(store_module, "RESCAN_COST_FACTOR", 0)
    monkeypatch.setattr(store_module, "HIT_CHECK_INTERVAL", 0.0)
    seed = repo_root / "cassettes" / "0806aef47037.json"
    store = CassetteStore(tmp_path)
    store.load()
    key, _ = key_of(read_cassette(seed))
    assert store.lookup(key) is None and store.refresh() is False
    shutil.copy(seed, tmp_path / "seed.json")
    assert store.refresh() is True and store.lookup(key) is not None
    assert store.refresh() is False  # nothing changed since
    entry = store.lookup(key)
    assert store.changed(entry) is False
    (tmp_path / "seed.json").write_text("{broken")
    assert store.changed(entry) is True and store.lookup(key) is None
    shutil.copy(seed, tmp_path / "seed.json")
    assert store.refresh() is True and store.lookup(key) is not None
    (tmp_path / "seed.json").unlink()
    assert store.refresh() is True and store.lookup(key) is None
