"""The recording path of issue 12: a cassette's temp file is opened while its request is
upstream, the index follows the answer, fsyncs go in batches. What must still hold: no
temp file outlives its request, a recording lands even if its temp file is taken away,
and what was just recorded is found by the very next request."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cassette_proxy.cassette import (
    TEMP_PREFIX,
    make_cassette,
    open_temp,
    read_cassette,
    sync_cassettes,
    write_cassette,
)
from conftest import cassette_files, openai_client, wait_until

CHAT_PATH = "/v1/chat/completions"


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **extra}


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(f"{TEMP_PREFIX}*"))


def a_cassette(text: str) -> Any:
    return make_cassette(
        test_id=None, method="POST", url="http://h" + CHAT_PATH, headers={},
        body=chat(text), endpoint=CHAT_PATH, model="gpt-test",
        response={"body": {"answer": text}, "is_streaming": False},
    )  # fmt: skip


def test_answers_not_recorded_give_their_temp_files_back(proxy_factory, upstream):
    """Every forwarded request gets a temp file while upstream; a 503, a 429, a cut
    stream and a kept success leave none behind, and no cassette but the success."""
    proxy = proxy_factory(mode="auto")
    folder = proxy.cassette_dir
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        assert http.post(upstream.url + CHAT_PATH, json=chat("kept")).status_code == 200
        wait_until(lambda: len(cassette_files(folder)) == 1, what="the first cassette")
    proxy.stop()  # a new run: "kept" is asked at its first position again
    proxy = proxy_factory(mode="auto", cassette_dir=folder)
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        for status in (503, 429, 401):  # not recorded, not recorded, kept (a success is)
            upstream.configure(fail_mode="status", fail_status=status)
            prompt = "kept" if status == 401 else f"status {status}"
            assert http.post(upstream.url + CHAT_PATH, json=chat(prompt)).status_code == status
        upstream.configure(fail_mode="cut", cut_after=2, n_chunks=6)
        with pytest.raises(openai.APIError):
            client = openai_client(proxy, upstream)
            for _ in client.chat.completions.create(**chat("cut"), stream=True):
                pass
    proxy.wait_for_log("stream cut short")
    wait_until(lambda: not temp_files(folder), what="the temp files to be given back")
    assert [read_cassette(f).request.body["messages"][0]["content"]
            for f in cassette_files(folder)] == ["kept"]  # fmt: skip
    assert "upstream answered 503" in proxy.log_text()


def test_a_recording_lands_though_its_temp_file_was_taken_away_meanwhile(
    proxy_factory, upstream
):
    """Another proxy starting on the folder removes temp files older than ten minutes;
    a request upstream that long loses its temp file. Its answer is recorded all the
    same, with a new one, and replays."""
    proxy = proxy_factory(mode="record")
    folder = proxy.cassette_dir
    upstream.configure(response_delay=2.0)
    result: dict[str, Any] = {}

    def ask() -> None:
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
            result["answer"] = http.post(upstream.url + CHAT_PATH, json=chat("slow one"))

    asker = threading.Thread(target=ask)
    asker.start()
    taken = wait_until(lambda: temp_files(folder), what="the request's temp file")
    for temp in taken:
        temp.unlink()  # as a starting proxy does with a stale one
    asker.join(60)
    assert result["answer"].status_code == 200
    files = wait_until(lambda: cassette_files(folder), what="the cassette")
    assert len(files) == 1
    assert read_cassette(files[0]).request.body == chat("slow one")
    assert not temp_files(folder)
    proxy.stop()

    upstream.stop()
    replay = proxy_factory(mode="replay")
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        again = http.post(upstream.url + CHAT_PATH, json=chat("slow one"))
    assert again.status_code == 200
    assert again.json() == result["answer"].json()


def test_what_was_just_recorded_answers_the_next_request(proxy_factory, upstream):
    """The index is updated after the answer has gone out, before the next request,
    however fast they come: in record-if-missing the same request again is its sequence's
    second position (forwarded and recorded beside the first, never over it), and the
    third is answered from what the first two just recorded."""
    proxy = proxy_factory(mode="record-if-missing")
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        for i in range(10):
            first = http.post(upstream.url + CHAT_PATH, json=chat(f"q{i}"))
            second = http.post(upstream.url + CHAT_PATH, json=chat(f"q{i}"))
            assert first.status_code == second.status_code == 200
            assert "x-cassette-file" not in second.headers  # forwarded: position 2
    proxy.stop()
    names = sorted(p.name for p in cassette_files(proxy.cassette_dir))
    assert len(names) == 20 and sum(n.endswith(".2.json") for n in names) == 10
    proxy = proxy_factory(mode="record-if-missing", cassette_dir=proxy.cassette_dir)
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        for i in range(10):
            for _ in range(2):
                again = http.post(upstream.url + CHAT_PATH, json=chat(f"q{i}"))
                assert "x-cassette-file" in again.headers
    asked = [r for r in upstream.requests if r.path == CHAT_PATH]
    assert len(asked) == 20


def test_a_temp_file_opened_beforehand_is_used_or_replaced(tmp_path):
    """write_cassette with a temp file from open_temp: used when it is there, a new one
    when it was removed; nothing left behind either way."""
    path = tmp_path / "a.json"
    write_cassette(path, a_cassette("one"), durable=False, temp=open_temp(tmp_path))
    assert read_cassette(path).response.body == {"answer": "one"}
    temp = open_temp(tmp_path)
    os.unlink(temp[1])
    write_cassette(path, a_cassette("two"), durable=False, temp=temp)
    assert read_cassette(path).response.body == {"answer": "two"}
    assert not temp_files(tmp_path)


def test_many_cassettes_are_flushed_together(tmp_path):
    """sync_cassettes of several files (one syncfs per file system on Linux) reports
    success for each; one file (fsync file by file) too."""
    paths = []
    for i in range(5):
        (tmp_path / f"f{i}").mkdir()
        paths.append(tmp_path / f"f{i}" / "c.json")
        write_cassette(paths[-1], a_cassette(str(i)), durable=False)
    assert sync_cassettes(paths) == [None] * 5
    assert sync_cassettes(paths[:1]) == [None]
    missing = tmp_path / "gone" / "c.json"
    assert isinstance(sync_cassettes([missing])[0], OSError)


def test_a_test_whose_answers_are_not_recorded_leaves_no_folder(proxy_factory, upstream):
    """A test's folder is made by its first cassette, not by its first request."""
    proxy = proxy_factory(mode="record")
    upstream.configure(fail_mode="status", fail_status=503)
    headers = {"x-cassette-test-id": "tests/test_x.py::test_unlucky"}
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        for i in range(3):
            answer = http.post(upstream.url + CHAT_PATH, json=chat(f"n{i}"), headers=headers)
            assert answer.status_code == 503
    wait_until(lambda: proxy.log_text().count("not recorded") >= 3, what="3 log lines")
    wait_until(lambda: not temp_files(proxy.cassette_dir), what="no temp file")
    assert [p.name for p in proxy.cassette_dir.iterdir()] == []


def test_the_same_bytes_as_json_are_not_the_form_request(proxy_factory, upstream):
    """The key's memo of request bytes knows the content type: form bytes sent as JSON
    are not the recorded form (they cannot be keyed at all), even right after it."""
    sent = b"grant_type=client_credentials&scope=models"
    form_type = {"content-type": "application/x-www-form-urlencoded"}
    json_type = {"content-type": "application/json"}
    recorder = proxy_factory(mode="record")
    with httpx.Client(proxy=recorder.url, trust_env=False, timeout=30) as http:
        recorded = http.post(upstream.url + CHAT_PATH, content=sent, headers=form_type)
    wait_until(lambda: cassette_files(recorder.cassette_dir), what="the cassette")
    recorder.stop()
    replay = proxy_factory(mode="replay")
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        hit = http.post(upstream.url + CHAT_PATH, content=sent, headers=form_type)
        as_json = http.post(upstream.url + CHAT_PATH, content=sent, headers=json_type)
    assert hit.status_code == recorded.status_code and "x-cassette-file" in hit.headers
    assert as_json.status_code == 404
    assert as_json.headers.get("x-cassette-miss") == "unkeyable"


def test_a_streamed_request_body_never_takes_our_headers_upstream(proxy_factory, upstream):
    """With stream_large_bodies, mitmproxy sends the headers before the request hook:
    X-Cassette-Test-Id and X-Cassette-Fault come off in requestheaders."""
    proxy = proxy_factory(mode="record", options={"stream_large_bodies": "1k"})
    body = chat("x" * 4096)
    ours = {"x-cassette-test-id": "tests/test_big.py::test_it", "x-cassette-fault": "delay-ms=10"}
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
        answer = http.post(upstream.url + CHAT_PATH, json=body, headers=ours)
    assert answer.status_code == 200
    [seen] = [r for r in upstream.requests if r.path == CHAT_PATH]
    assert {k.lower() for k in seen.headers} & set(ours) == set()
    assert len(seen.body) > 4096  # the body itself went through whole


@pytest.mark.parametrize(
    "data",
    [
        {"id": "x", "choices": [{"message": {"content": "no key here"}}]},
        {"access_token": "tok-123", "token_type": "Bearer", "expires_in": 3600},
        {"data": [{"credentials": {"value": "v"}}, {"apiKey": "k"}]},
        {"\\u0061pi_key": "escaped name"},
        {"usage": {"prompt_tokens": 3, "max_tokens": 9}, "logprobs": [{"token": "a"}]},
    ],
)
def test_an_answer_is_redacted_alike_whether_its_bytes_are_given_or_not(data):
    """redact_answer skips the body's walk when its bytes name no credential field: the
    result is the same as the walk's, for answers with and without such fields."""
    from cassette_proxy.redact import redact_answer

    raw = json.dumps(data).encode()
    parsed = json.loads(raw)
    whole = {"body": {"__type__": "x.Y", "__data__": parsed}, "is_streaming": False,
             "timing": {"seconds": 0.1}}  # fmt: skip
    stream = {"body": [{"__type__": "x.Y", "__data__": parsed}] * 2, "is_streaming": True}
    for response in (whole, stream):
        assert redact_answer(response, frozenset(), raw) == redact_answer(response, frozenset())
    assert redact_answer(whole, frozenset({"no key here"}), raw) == redact_answer(
        whole, frozenset({"no key here"})
    )


class HeldStream:
    """An SSE upstream that sends its first event, then holds the rest until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:  # the proxy's reachability probe connects (and closes) first
            conn, _ = self.server.accept()
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))  # fmt: skip
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
            conn.sendall(_chunk(b'data: {"id": "1", "object": "chat.completion.chunk", '
                                b'"choices": []}\n\n'))  # fmt: skip
            self.release.wait(60)  # longer than the client waits for a read
            conn.sendall(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("mode", ["passthrough", "record"])
def test_a_stream_passes_as_it_comes_in_every_mode(proxy_factory, mode):
    """passthrough buffered streams (mitmproxy's default): a client got its first token
    with the last. Every mode passes a stream on event by event: here the upstream sends
    the rest only once the client has the first event."""
    upstream = HeldStream()
    proxy = proxy_factory(mode=mode)
    url = f"http://127.0.0.1:{upstream.port}{CHAT_PATH}"
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=15) as http:
        with http.stream("POST", url, json=chat("held", stream=True)) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            upstream.release.set()  # only now: a buffering proxy times out above instead
            rest = [line for line in lines if line.startswith("data: ")]
    assert first.startswith("data: {") and rest == ["data: [DONE]"]
