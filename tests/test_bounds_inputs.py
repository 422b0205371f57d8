"""Issue 18 item 11: compression bombs. Bodies are decoded with a bound (32 MiB, what a
cassette may hold) checked as they grow, before any parse: a live answer over it passes
through as sent, unrecorded, and the log says so; a request over it in replay gets the
over-size refusal. Real mitmdump, httpx, a scripted upstream on loopback."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import httpx
import pytest
from conftest import cassette_files
from upstreams import http_answer, refused_port, start_scripted_upstream

CHAT = "/v1/chat/completions"
PAD = 40 * 2**20  # decodes past the 32 MiB bound from about 40 KiB of gzip


def bomb_json() -> bytes:
    answer = {
        "id": "chatcmpl-bomb",
        "object": "chat.completion",
        "model": "fake-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "pad": "0" * PAD,
    }  # fmt: skip
    return json.dumps(answer).encode()


def chat_request() -> dict[str, object]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "bomb"}]}


@pytest.fixture
def scripted():
    started = []

    def start(answer: bytes):
        up = start_scripted_upstream(answer)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


def raw_answer(proxy_url: str, url: str, **kwargs: object) -> tuple[httpx.Response, bytes]:
    """The answer and its body's bytes exactly as they came (no decoding)."""
    with httpx.Client(proxy=proxy_url, trust_env=False, timeout=60) as http:
        with http.stream("POST", url, **kwargs) as response:
            return response, b"".join(response.iter_raw())


def test_a_whole_answer_bomb_passes_through_unrecorded_and_the_log_says_so(proxy_factory, scripted):
    body = gzip.compress(bomb_json())
    assert len(body) < 200 * 1024
    headers = {"content-type": "application/json", "content-encoding": "gzip",
               "content-length": str(len(body))}  # fmt: skip
    upstream = scripted(http_answer(200, headers, body))
    proxy = proxy_factory(mode="auto")
    response, raw = raw_answer(proxy.url, upstream.url + CHAT, json=chat_request())
    assert response.status_code == 200
    assert raw == body  # the client gets the answer exactly as the upstream sent it
    text = proxy.wait_for_log("not recorded")
    assert "the answer: the gzip-encoded body decodes to more than 32 MiB" in text
    assert "passed through as sent" in text
    assert cassette_files(proxy.cassette_dir) == []


def test_a_streamed_answer_bomb_passes_through_unrecorded(proxy_factory, scripted):
    event = {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model",
             "choices": [{"index": 0, "delta": {"content": "0" * PAD}}]}  # fmt: skip
    sse = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
    body = gzip.compress(sse)
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip",
               "content-length": str(len(body))}  # fmt: skip
    upstream = scripted(http_answer(200, headers, body))
    proxy = proxy_factory(mode="auto")
    request = {**chat_request(), "stream": True}
    response, raw = raw_answer(proxy.url, upstream.url + CHAT, json=request)
    assert response.status_code == 200 and raw == body
    text = proxy.wait_for_log("not recorded")
    assert "stream not recordable: the gzip-encoded body decodes to more than 32 MiB" in text
    assert cassette_files(proxy.cassette_dir) == []


def test_a_request_bomb_in_replay_gets_the_over_size_refusal(proxy_factory):
    proxy = proxy_factory(mode="replay")
    body = gzip.compress(json.dumps({**chat_request(), "pad": "0" * PAD}).encode())
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
        response = http.post(
            f"http://127.0.0.1:{refused_port()}{CHAT}",
            content=body,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "cassette_unkeyable"
    assert "decodes to more than 32 MiB, over the 32 MiB a cassette may hold" in error["reason"]
    assert "not forwarded" in proxy.wait_for_log("decodes to more than 32 MiB")


def test_a_request_bomb_in_auto_is_forwarded_unrecorded(proxy_factory, scripted):
    answer = json.dumps({"id": "c", "object": "chat.completion", "choices": []}).encode()
    upstream = scripted(
        http_answer(
            200, {"content-type": "application/json", "content-length": str(len(answer))}, answer
        )  # fmt: skip
    )
    proxy = proxy_factory(mode="auto")
    body = gzip.compress(json.dumps({**chat_request(), "pad": "0" * PAD}).encode())
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
        response = http.post(
            upstream.url + CHAT,
            content=body,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
    assert response.status_code == 200 and response.content == answer
    assert upstream.requests[0][2] == body  # forwarded exactly as sent
    assert "passthrough POST /v1/chat/completions" in proxy.wait_for_log("decodes to more")
    assert cassette_files(proxy.cassette_dir) == []


def test_decoding_stops_at_the_bound_without_growing_past_it():
    from cassette_proxy.decoding import MAX_DECODED_BYTES, BodyTooLarge, StreamDecoder, decoded

    squeeze = zlib.compressobj(wbits=31)  # gzip
    zeros = bytes(2**20)
    bomb = b"".join(squeeze.compress(zeros) for _ in range(256)) + squeeze.flush()
    assert len(bomb) < 512 * 1024  # 256 MiB of zeros
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            decoded(bomb, "gzip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_DECODED_BYTES + 8 * 2**20
    # A stream fed in pieces: the same bound over the whole body.
    decoder = StreamDecoder("gzip", limit=4 * 2**20)
    with pytest.raises(BodyTooLarge):
        for at in range(0, len(bomb), 4096):
            decoder.feed(bomb[at : at + 4096])
    # Under the bound, bytes that are not what they claim: as they came.
    assert decoded(gzip.compress(b'{"a": 1}'), "gzip") == b'{"a": 1}'
    assert decoded(b"not gzip", "gzip") == b"not gzip"
