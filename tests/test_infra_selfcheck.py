"""Self-check of the test infrastructure: the fake upstream speaks OpenAI's wire
protocol well enough for the real SDK, failure knobs behave, and a real mitmdump
subprocess can be started and used as a forward / reverse proxy."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Proxy, async_openai_client, cassette_files, free_port, openai_client
from upstreams import (
    OpenAIUpstream,
    answer_text,
    blackhole_port,
    embedding_vector,
    refused_port,
    tool_arguments,
)

MSG = [{"role": "user", "content": "hello there"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def sse_events(body: bytes) -> list[str]:
    """`data:` payloads of a raw SSE body, in order."""
    return [
        block[len("data: ") :]
        for block in body.decode().split("\n\n")
        if block.startswith("data: ")
    ]


# -- fake upstream, directly ---------------------------------------------------


def test_chat_non_stream(upstream: OpenAIUpstream) -> None:
    with openai_client(None, upstream) as client:
        r = client.chat.completions.create(model="m1", messages=MSG)
    assert r.object == "chat.completion"
    assert r.model == "m1"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == answer_text("A", "hello there")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.total_tokens > 0
    [req] = upstream.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"].startswith("Bearer sk-test")
    assert req.json()["messages"] == MSG


def test_chat_stream(upstream: OpenAIUpstream) -> None:
    upstream.configure(n_chunks=5)
    with openai_client(None, upstream) as client:
        chunks = list(
            client.chat.completions.create(
                model="m1",
                messages=MSG,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_text("A", "hello there")
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_wire_format(upstream: OpenAIUpstream) -> None:
    body = {"model": "m", "messages": MSG, "stream": True}
    with httpx.Client(trust_env=False) as c:
        r = c.post(upstream.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.content.endswith(b"data: [DONE]\n\n")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk"
    assert "usage" not in first  # only present when include_usage is requested


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_call(upstream: OpenAIUpstream, stream: bool) -> None:
    with openai_client(None, upstream) as client:
        if not stream:
            r = client.chat.completions.create(model="m", messages=MSG, tools=TOOLS)
            assert r.choices[0].finish_reason == "tool_calls"
            call = r.choices[0].message.tool_calls[0]
            assert call.function.name == "get_weather"
            assert call.function.arguments == tool_arguments("A", "hello there")
            return
        chunks = list(
            client.chat.completions.create(model="m", messages=MSG, tools=TOOLS, stream=True)
        )
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].id.startswith("call_")
    assert deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == {"echo": "hello there", "tag": "A"}
    assert len(deltas) > 2  # arguments really arrive in pieces
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_completions(upstream: OpenAIUpstream) -> None:
    with openai_client(None, upstream) as client:
        r = client.completions.create(model="m", prompt="say hi")
        assert r.object == "text_completion"
        assert r.choices[0].text == answer_text("A", "say hi")
        assert r.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model="m", prompt="say hi", stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == answer_text("A", "say hi")
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_embeddings_float_and_base64(upstream: OpenAIUpstream) -> None:
    with openai_client(None, upstream) as client:
        default = client.embeddings.create(model="e", input=["a", "b"])
        floats = client.embeddings.create(model="e", input=["a", "b"], encoding_format="float")
    # The SDK asks for base64 when the user does not choose, and decodes it.
    assert upstream.requests[0].json()["encoding_format"] == "base64"
    assert upstream.requests[1].json()["encoding_format"] == "float"
    for resp in (default, floats):
        assert [d.embedding for d in resp.data] == [
            embedding_vector("A", "a"),
            embedding_vector("A", "b"),
        ]
        assert len(resp.data[0].embedding) == 8


def test_models_and_unknown_path(upstream: OpenAIUpstream) -> None:
    with openai_client(None, upstream) as client:
        models = client.models.list()
    assert [m.id for m in models.data] == upstream.models
    assert models.data[0].owned_by == "fake-A"
    with httpx.Client(trust_env=False) as c:
        r = c.post(upstream.url + "/v1/messages", json={"x": 1})
    assert r.status_code == 200
    assert r.json()["tag"] == "A" and r.json()["path"] == "/v1/messages"


def test_tags_distinguish_upstreams(upstream_factory: Callable[..., OpenAIUpstream]) -> None:
    a, b = upstream_factory("A"), upstream_factory("B")
    texts = []
    for up in (a, b):
        with openai_client(None, up) as client:
            r = client.chat.completions.create(model="m", messages=MSG)
            texts.append(r.choices[0].message.content)
    assert texts == [answer_text("A", "hello there"), answer_text("B", "hello there")]
    assert len(a.requests) == len(b.requests) == 1


# -- failure knobs ---------------------------------------------------------------


def test_fail_cut_stream_raises(upstream: OpenAIUpstream) -> None:
    upstream.configure(fail_mode="cut", n_chunks=6, cut_after=3)
    got: list[str] = []
    with openai_client(None, upstream) as client, pytest.raises((openai.APIError, httpx.HTTPError)):
        for c in client.chat.completions.create(model="m", messages=MSG, stream=True):
            got.append(c.choices[0].delta.content or "")
    assert len(got) == 3  # the events before the reset did arrive


def test_fail_cut_non_stream_raises(upstream: OpenAIUpstream) -> None:
    upstream.configure(fail_mode="cut")
    with openai_client(None, upstream) as client, pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MSG)


def test_fail_no_done(upstream: OpenAIUpstream) -> None:
    upstream.configure(fail_mode="no_done")
    with openai_client(None, upstream) as client:
        chunks = list(client.chat.completions.create(model="m", messages=MSG, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    body = {"model": "m", "messages": MSG, "stream": True}
    with httpx.Client(trust_env=False) as c:
        r = c.post(upstream.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200  # body ended cleanly (terminating chunk sent)...
    assert b"[DONE]" not in r.content  # ...but without the [DONE] sentinel
    assert json.loads(sse_events(r.content)[-1])["choices"][0]["finish_reason"] == "stop"


def test_fail_status_and_fail_times(upstream: OpenAIUpstream) -> None:
    upstream.configure(fail_mode="status", fail_status=429, fail_times=1)
    with openai_client(None, upstream) as client:
        with pytest.raises(openai.RateLimitError) as ei:
            client.chat.completions.create(model="m", messages=MSG, stream=True)
        assert ei.value.status_code == 429
        assert isinstance(ei.value.body, dict)
        assert set(ei.value.body) == {"message", "type", "code", "param"}
        # fail_times=1: the next request is served normally
        r = client.chat.completions.create(model="m", messages=MSG)
        assert r.choices[0].message.content == answer_text("A", "hello there")
    assert len(upstream.requests) == 2


def test_stream_delays(upstream: OpenAIUpstream) -> None:
    upstream.configure(first_event_delay=0.4, event_interval=0.1, n_chunks=3)
    with openai_client(None, upstream) as client:
        t0 = time.monotonic()
        stream = client.chat.completions.create(model="m", messages=MSG, stream=True)
        next(iter(stream))
        first = time.monotonic() - t0
        list(stream)
        total = time.monotonic() - t0
    assert first >= 0.4
    assert total >= 0.4 + 5 * 0.1  # role + 3 pieces + finish + [DONE]


def test_stop_drops_keepalive_connections(upstream_factory: Callable[..., OpenAIUpstream]) -> None:
    up = upstream_factory()
    with httpx.Client(trust_env=False) as c:
        assert c.get(up.url + "/v1/models").status_code == 200
        up.stop()
        with pytest.raises(httpx.TransportError):
            c.get(up.url + "/v1/models")


def test_many_parallel_clients(upstream: OpenAIUpstream) -> None:
    with openai_client(None, upstream, max_connections=200) as client:

        def one(i: int) -> str | None:
            msgs = [{"role": "user", "content": f"q{i}"}]
            r = client.chat.completions.create(model="m", messages=msgs)
            return r.choices[0].message.content

        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(one, range(200)))
    assert results == [answer_text("A", f"q{i}") for i in range(200)]
    assert len(upstream.requests) == 200


# -- unreachable ports -------------------------------------------------------------


def test_refused_port() -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", refused_port()), timeout=1.0)


def test_blackhole_port_hangs() -> None:
    with blackhole_port() as port:
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                socket.create_connection(("127.0.0.1", port), timeout=1.0)
            assert time.monotonic() - t0 >= 0.9


# -- real mitmdump -------------------------------------------------------------------


@pytest.fixture
def passthrough_script(tmp_path: Path) -> Path:
    """Stand-in for addons/recorder.py until the real addon exists."""
    script = tmp_path / "passthrough.py"
    script.write_text("addons = []\n")
    return script


def test_forward_proxy_through_mitmdump(
    proxy_factory: Callable[..., Proxy],
    upstream: OpenAIUpstream,
    passthrough_script: Path,
    tmp_path: Path,
) -> None:
    proxy = proxy_factory(script=passthrough_script, mode="record", options={"x_flag": True})
    assert "listening at" in proxy.log_text()
    assert proxy.ca_cert.is_file()
    assert proxy.cassette_dir == tmp_path / "cassettes" and proxy.cassette_dir.is_dir()
    assert "cassette_mode=record" in proxy.argv and "x_flag=true" in proxy.argv
    env = proxy.proxy_env()
    assert env["HTTPS_PROXY"] == env["http_proxy"] == proxy.url
    assert env["NO_PROXY"] == "" and env["SSL_CERT_FILE"] == str(proxy.ca_cert)

    with openai_client(proxy, upstream) as client:
        r = client.chat.completions.create(model="m", messages=MSG)
        chunks = list(client.chat.completions.create(model="m", messages=MSG, stream=True))
    assert r.choices[0].message.content == answer_text("A", "hello there")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert len(upstream.requests) == 2
    assert cassette_files(proxy.cassette_dir) == []
    assert proxy.stop() is not None and proxy.returncode is not None


def test_reverse_proxy_and_kill9(
    proxy_factory: Callable[..., Proxy], upstream: OpenAIUpstream, passthrough_script: Path
) -> None:
    proxy = proxy_factory(script=passthrough_script, reverse=upstream.url)
    with openai_client(None, proxy) as client:
        r = client.chat.completions.create(model="m", messages=MSG)
    assert r.choices[0].message.content == answer_text("A", "hello there")
    assert proxy.kill9() == -9
    # A fresh proxy can take over the very same port after a crash.
    again = proxy_factory(script=passthrough_script, reverse=upstream.url, port=proxy.port)
    with openai_client(None, again) as client:
        client.models.list()
    assert len(upstream.requests) == 2


def test_many_parallel_clients_through_mitmdump(
    proxy_factory: Callable[..., Proxy], upstream: OpenAIUpstream, passthrough_script: Path
) -> None:
    proxy = proxy_factory(script=passthrough_script)
    upstream.configure(event_interval=0.01)

    async def run() -> list[str]:
        async with async_openai_client(proxy, upstream) as client:

            async def one(i: int) -> str:
                stream = await client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": f"q{i}"}],
                    stream=True,
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            return await asyncio.gather(*(one(i) for i in range(200)))

    assert asyncio.run(run()) == [answer_text("A", f"q{i}") for i in range(200)]
    assert len(upstream.requests) == 200


def test_start_failure_reports_log(proxy_factory: Callable[..., Proxy], tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="exited early"):
        proxy_factory(script=tmp_path / "does-not-exist.py", port=free_port())
