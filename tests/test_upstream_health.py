"""Honest upstream health (issue 9, findings 3, 9, 10, 11): replay never forwards, a busy
upstream is not offline, a hung upstream does not hang the client, and every HTTP/2
stream gets the fallback when the upstream dies.

Real mitmdump, real clients (openai SDK, httpx, curl), fake upstreams on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import async_openai_client, openai_client, wait_for_files
from upstreams import OpenAIUpstream, answer_text, refused_port

CHAT_PATH = "/v1/chat/completions"


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


# ---- a busy upstream: alive, but its accept queue is full ---------------------------


class AcceptQueueFull:
    """Make a running upstream drop new SYNs, as a live server with a full accept queue
    does: its accept loop stops, its listen queue shrinks to one and is filled."""

    def __init__(self, server: OpenAIUpstream) -> None:
        self.server = server
        self.fillers: list[socket.socket] = []

    def __enter__(self) -> AcceptQueueFull:
        self.server.shutdown()  # the accept loop stops; the listening socket stays
        self.server.socket.listen(0)
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.server.port))
            self.fillers.append(s)
        time.sleep(0.1)
        with socket.socket() as probe:  # check: a connect now hangs
            probe.settimeout(0.3)
            with pytest.raises(TimeoutError):
                probe.connect(("127.0.0.1", self.server.port))
        return self

    def release(self) -> None:
        """The server drains its queue and accepts again."""
        if not self.fillers:
            return
        self.server.socket.listen(1024)
        for s in self.fillers:
            s.close()
        self.fillers = []
        thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.server._thread = thread
        thread.start()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_a_busy_upstream_is_waited_for_not_called_offline(proxy_factory, upstream):
    # Every request probes (ttl 0), with a short probe timeout.
    proxy = proxy_factory(
        mode="auto", options={"cassette_probe_timeout_ms": 300, "cassette_probe_ttl_ms": 0}
    )
    first = openai_client(proxy, upstream).chat.completions.create(**chat("seen up"))
    assert first.choices[0].message.content == answer_text("A", "seen up")
    with AcceptQueueFull(upstream) as busy:
        threading.Timer(2.0, busy.release).start()  # busy for 2 s, then it accepts again
        # A new client connection, so the proxy must connect upstream again. Nothing is
        # recorded for this prompt: calling the upstream offline would give a 404 miss.
        client = openai_client(proxy, upstream, timeout=60)
        started = time.monotonic()
        live = client.chat.completions.create(**chat("while busy"))
        waited = time.monotonic() - started
    assert live.choices[0].message.content == answer_text("A", "while busy")
    assert waited > 1.0  # it did wait for the upstream to accept (the probe alone is 0.3 s)
    assert "is busy" in proxy.wait_for_log("is busy")
    assert len(upstream.requests_to(CHAT_PATH)) == 2


def test_a_host_seen_up_that_stops_accepting_falls_back_after_the_connect_timeout(
    proxy_factory, upstream
):
    proxy = proxy_factory(
        mode="auto", options={"cassette_probe_timeout_ms": 300, "cassette_probe_ttl_ms": 0}
    )
    live = openai_client(proxy, upstream).chat.completions.create(**chat("then gone"))
    wait_for_files(proxy.cassette_dir, 1)
    with AcceptQueueFull(upstream):  # and it never accepts again
        client = openai_client(proxy, upstream, timeout=120)
        started = time.monotonic()
        again = client.chat.completions.create(**chat("then gone"))
        waited = time.monotonic() - started
        # Waited for and not there: the next request is not held up again.
        started = time.monotonic()
        third = openai_client(proxy, upstream, timeout=120).chat.completions.create(
            **chat("then gone")
        )
        quick = time.monotonic() - started
    assert again == live == third
    assert waited < 60, waited  # the proxy's connect timeout (10 s), not mitmproxy's ~135 s
    assert quick < waited, (quick, waited)
    assert "went away" in proxy.log_text()


async def _parallel(proxy, upstream, prompts: list[str]) -> list[str]:
    client = async_openai_client(proxy, upstream, max_connections=250, timeout=120)
    async with client:

        async def one(i: int, prompt: str) -> str:
            if i % 2:
                stream = await client.chat.completions.create(**chat(prompt), stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])
            answer = await client.chat.completions.create(**chat(prompt))
            return answer.choices[0].message.content or ""

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def test_200_parallel_clients_on_a_tiny_probe_timeout_all_get_live_answers(
    proxy_factory, upstream
):
    """The issue's CI failure, provoked: 200 requests at once keep mitmproxy's event loop
    busy far longer than a 50 ms probe timeout. A live upstream is never called offline."""
    proxy = proxy_factory(
        mode="auto", options={"cassette_probe_timeout_ms": 50, "cassette_probe_ttl_ms": 0}
    )
    openai_client(proxy, upstream).chat.completions.create(**chat("seen up"))
    prompts = [f"crowd {i}" for i in range(200)]
    assert asyncio.run(_parallel(proxy, upstream, prompts)) == [
        answer_text("A", p) for p in prompts
    ]
    assert len(upstream.requests_to(CHAT_PATH)) == 201
    assert "auto miss" not in proxy.log_text()


# ---- finding 3: replay (and auto offline) never forward what they cannot key -----------


def deeply_nested() -> bytes:
    return b'{"model": "fake-model", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


UNKEYABLE = [
    (b"hello, not json", "text/plain", "body is not JSON (text/plain)"),
    (b'{"model": "fake-model", "messages": "\xff\xfe"}', "application/json", "body is not JSON"),
    (deeply_nested(), "application/json", "nested too deeply"),
]


def assert_refused(r: httpx.Response, reason: str) -> None:
    assert r.status_code == 404, r.text  # not 408/409/429/5xx: SDKs do not retry it
    error = r.json()["error"]
    assert error["type"] == "cassette_unkeyable"
    assert reason in error["message"] and "not forwarded" in error["message"]


def test_replay_never_forwards_a_request_it_cannot_key(proxy_factory, upstream):
    proxy = proxy_factory(mode="replay")
    big = json.dumps({"model": "fake-embedding", "input": "a" * (33 * 1024 * 1024)}).encode()
    cases = [*UNKEYABLE, (big, "application/json", "over the 32 MiB a cassette may hold")]
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
        for content, kind, reason in cases:
            r = http.post(upstream.url + CHAT_PATH, content=content,
                          headers={"content-type": kind})  # fmt: skip
            assert_refused(r, reason)
    assert "cassette_mode is replay" in r.json()["error"]["message"]
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-sS", "-x", proxy.url, "-H", "content-type: text/plain",
             "--data-binary", "plain text", upstream.url + CHAT_PATH],  # fmt: skip
            capture_output=True,
            check=True,
            timeout=60,
        )
        assert json.loads(out.stdout)["error"]["type"] == "cassette_unkeyable"
    assert upstream.requests == []  # nothing left the machine
    assert proxy.log_text().count("replay not forwarded POST /v1/chat/completions") == 5


def test_replay_never_forwards_a_streamed_request_body(proxy_factory, upstream):
    proxy = proxy_factory(mode="replay", options={"stream_large_bodies": "1k"})
    body = json.dumps(chat("x" * 4096)).encode()
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
        r = http.post(upstream.url + CHAT_PATH, content=body,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert_refused(r, "streamed")
    assert upstream.requests == []


def test_auto_with_the_upstream_offline_never_forwards_a_request_it_cannot_key(
    proxy_factory, upstream
):
    proxy = proxy_factory(mode="auto")
    dead = f"http://127.0.0.1:{refused_port()}"
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=60) as http:
        for content, kind, reason in UNKEYABLE:
            r = http.post(dead + CHAT_PATH, content=content, headers={"content-type": kind})
            assert_refused(r, reason)
            assert "is offline" in r.json()["error"]["message"]
        # Online, the same request still passes through to the upstream, unrecorded.
        r = http.post(upstream.url + CHAT_PATH, content=b"hello, not json",
                      headers={"content-type": "text/plain"})  # fmt: skip
    assert r.status_code == 400 and upstream.requests[-1].body == b"hello, not json"


# ---- finding 10: an upstream that accepts and never answers --------------------------


def test_a_hung_upstream_is_answered_from_cassettes_after_the_response_timeout(
    proxy_factory, upstream
):
    proxy = proxy_factory(mode="auto", options={"cassette_response_timeout_ms": 1000})
    live = openai_client(proxy, upstream).chat.completions.create(**chat("hung"))
    live_stream = [
        c.model_dump()
        for c in openai_client(proxy, upstream).chat.completions.create(
            **chat("hung stream"), stream=True
        )
    ]
    wait_for_files(proxy.cassette_dir, 2)
    upstream.configure(response_delay=120)  # accepts, reads the request, says nothing
    # The SDK's own timeout would be 600 s (x 3 attempts); 30 s here, and no retries.
    client = openai_client(proxy, upstream, timeout=30)
    started = time.monotonic()
    assert client.chat.completions.create(**chat("hung")) == live
    assert time.monotonic() - started < 25
    fresh = openai_client(proxy, upstream, timeout=30)
    replayed = [
        c.model_dump() for c in fresh.chat.completions.create(**chat("hung stream"), stream=True)
    ]
    assert replayed == live_stream
    proxy.wait_for_log("sent no response headers within 1000 ms")


def test_a_hung_upstream_gives_a_504_in_the_miss_shape_when_nothing_is_recorded(
    proxy_factory, upstream
):
    proxy = proxy_factory(mode="auto", options={"cassette_response_timeout_ms": 1000})
    upstream.configure(response_delay=120)
    client = openai_client(proxy, upstream, timeout=30)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(**chat("never recorded"))
    assert raised.value.status_code == 504
    error = raised.value.response.json()["error"]
    assert error["type"] == "cassette_upstream_timeout"
    assert "no response headers within 1000 ms" in error["message"]
    assert "no recording for POST /v1/chat/completions" in error["message"]
    assert raised.value.response.headers["x-cassette-miss"]


def test_a_bad_response_timeout_is_a_clear_options_error(tmp_path, mitmdump_bin, repo_root):
    result = subprocess.run(
        [str(mitmdump_bin), "-s", str(repo_root / "addons" / "recorder.py"),
         "--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"confdir={tmp_path}",
         "--set", f"cassette_dir={tmp_path / 'c'}", "--set", "cassette_response_timeout_ms=-5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "cassette_response_timeout_ms must be >= 0" in result.stdout + result.stderr


# ---- finding 11: every multiplexed HTTP/2 stream gets the fallback ---------------------


class PreferH2(ssl.SSLContext):
    """Offer h2 first, as curl and browsers do (httpx offers http/1.1 first)."""

    def set_alpn_protocols(self, protocols: Any) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def h2_proxy(proxy_factory, tls_upstream):
    # A long verdict cache: the proxy still believes the upstream is up after the kill.
    return proxy_factory(
        mode="auto",
        options={
            "ssl_verify_upstream_trusted_ca": str(tls_upstream.cert),
            "cassette_probe_ttl_ms": 600_000,
        },
    )


def test_every_http2_stream_gets_the_fallback_when_the_upstream_dies_httpx(
    proxy_factory, tls_upstream
):
    proxy = h2_proxy(proxy_factory, tls_upstream)
    url = f"https://localhost:{tls_upstream.port}{CHAT_PATH}"
    verify = PreferH2(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(cafile=str(proxy.ca_cert))
    prompts = [f"h2 stream {i}" for i in range(20)]

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            proxy=proxy.url, verify=verify, http2=True, trust_env=False, timeout=60
        ) as h:
            first = await h.post(url, json=chat(prompts[0]))  # one connection, then 19 more
            rest = await asyncio.gather(*(h.post(url, json=chat(p)) for p in prompts[1:]))
            return [first, *rest]

    live = asyncio.run(all_at_once())
    assert {r.http_version for r in live} == {"HTTP/2"}
    assert [r.json()["choices"][0]["message"]["content"] for r in live] == [
        answer_text("TLS", p) for p in prompts
    ]
    wait_for_files(proxy.cassette_dir, 20)
    tls_upstream.stop()
    replayed = asyncio.run(all_at_once())
    assert [r.status_code for r in replayed] == [200] * 20, [r.text[:200] for r in replayed]
    assert [r.json() for r in replayed] == [r.json() for r in live]
    assert "went away" in proxy.log_text()


def test_every_http2_stream_gets_the_fallback_when_the_upstream_dies_curl(
    proxy_factory, tls_upstream, tmp_path: Path
):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    proxy = h2_proxy(proxy_factory, tls_upstream)
    url = f"https://localhost:{tls_upstream.port}{CHAT_PATH}"
    body = tmp_path / "body.json"
    body.write_text(json.dumps(chat("curl h2")))

    def parallel(n: int) -> list[tuple[str, str, dict[str, Any] | str]]:
        outs = [tmp_path / f"out-{i}.json" for i in range(n)]
        cmd = ["curl", "-sS", "--parallel", "--parallel-max", "20", "--http2",
               "-x", proxy.url, "--cacert", str(proxy.ca_cert),
               "-H", "content-type: application/json", "--data-binary", f"@{body}",
               "-w", "%{http_code} %{http_version} %{num_connects}\\n"]  # fmt: skip
        for out in outs:
            cmd += ["-o", str(out), url]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        lines = [line.split() for line in run.stdout.splitlines() if line.strip()]
        results = []
        for (code, version, _), out in zip(lines, outs, strict=True):
            text = out.read_text()
            results.append((code, version, json.loads(text) if code == "200" else text))
        if n > 1:  # multiplexed: fewer connections than requests
            assert sum(int(line[2]) for line in lines) < n, run.stdout
        return results

    live = parallel(1)
    assert live[0][0] == "200"
    wait_for_files(proxy.cassette_dir, 1)
    tls_upstream.stop()
    replayed = parallel(20)
    assert {version for _, version, _ in replayed} == {"2"}
    assert [code for code, _, _ in replayed] == ["200"] * 20, replayed
    assert all(answer == live[0][2] for _, _, answer in replayed)
