"""Never leak (issue 4): no credential reaches any byte under cassette_dir, and no test
id can make the proxy write outside it. Real mitmdump, httpx, fake upstreams."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
from cassette_proxy.cassette import read_cassette
from conftest import cassette_files
from upstreams import answer_text

CHAT_PATH = "/v1/chat/completions"
# A gateway that takes the key in the path (and a bearer token, URL-encoded).
GATEWAY = "/gw/sk-PATHKEYSECRET0123456789/auth/Bearer%20PATHBEARERSECRET0123"
RECORDED_HEADERS = [
    "authorization", "api-key", "x-api-key", "proxy-authorization", "cookie",
    "x-forwarded-authorization", "x-request-tag",
]  # fmt: skip


def secrets(n: int) -> dict[str, Any]:
    """Every kind of credential a request can carry; n makes a second, different set."""
    return {
        "headers": {
            "Authorization": f"Bearer sk-proj-HEADERAUTHSECRET{n}0123456789",
            "api-key": f"AZUREAPIKEYSECRET{n}0123456789",
            "x-api-key": f"sk-ant-XAPIKEYSECRET{n}0123456789",
            "Proxy-Authorization": f"Basic PROXYAUTHSECRET{n}0123456789",
            "Cookie": f"session=COOKIESECRET{n}0123456789",
            "x-forwarded-authorization": f"Bearer FORWARDEDSECRET{n}0123456789",
            "x-request-tag": "kept",
        },
        "query": (
            f"?key=QUERYKEYSECRET{n}0123&api_key=QUERYAPIKEYSECRET{n}0123"
            f"&token=QUERYTOKENSECRET{n}0123&api-version=2024-06-01"
        ),
        "path": f"/gw/sk-PATHKEYSECRET{n}0123456789/auth/Bearer%20PATHBEARERSECRET{n}0123",
        "body": {"api_key": f"BODYAPIKEYSECRET{n}0123", "metadata": {"token": f"BODYTOKEN{n}0123"}},
    }


def needles(n: int) -> list[str]:
    """The distinctive part of every secret of set n."""
    return [
        f"{name}SECRET{n}0123"
        for name in (
            "HEADERAUTH", "AZUREAPIKEY", "XAPIKEY", "PROXYAUTH", "COOKIE", "FORWARDED",
            "QUERYKEY", "QUERYAPIKEY", "QUERYTOKEN", "PATHKEY", "PATHBEARER", "BODYAPIKEY",
        )
    ] + [f"BODYTOKEN{n}0123"]  # fmt: skip


def sse_data(text: str) -> list[Any]:
    events = text.replace("\r\n", "\n").split("\n\n")
    return [json.loads(e[6:]) for e in events if e.startswith("data: {")]


def every_byte_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_no_credential_reaches_any_byte_under_cassette_dir(proxy_factory, upstream_factory):
    upstream = upstream_factory(
        "A",
        path_prefix=secrets(1)["path"],
        extra_headers={"set-cookie": "sid=SETCOOKIESECRET0123456789; HttpOnly"},
    )
    echoing = upstream_factory("sk-ECHOEDKEYSECRET0123456789")  # says its key in a 401
    echoing.configure(fail_mode="status", fail_status=401)
    proxy = proxy_factory(mode="auto", options={"cassette_record_headers": RECORDED_HEADERS})

    def send(n: int, target: Any, stream: bool = False) -> httpx.Response:
        s = secrets(n)
        path = s["path"] if target is upstream else ""
        body = {**s["body"], "model": "fake-model", "stream": stream,
                "messages": [{"role": "user", "content": "secrets"}]}  # fmt: skip
        with httpx.Client(proxy=proxy.url, trust_env=False) as http:
            return http.post(
                f"{target.url}{path}{CHAT_PATH}{s['query']}", json=body, headers=s["headers"]
            )

    live = [send(1, upstream), send(1, upstream, stream=True), send(1, echoing)]
    assert [r.status_code for r in live] == [200, 200, 401]
    assert live[0].headers["set-cookie"].startswith("sid=SETCOOKIESECRET")  # passed through
    assert "sk-ECHOEDKEYSECRET" in live[2].text  # the client sees what the upstream said
    # The upstream got every credential: the proxy only keeps them out of cassettes.
    first = upstream.requests[0]
    assert first.headers["authorization"] == secrets(1)["headers"]["Authorization"]
    assert "PATHKEYSECRET1" in first.path and "QUERYAPIKEYSECRET1" in first.path
    assert b"BODYAPIKEYSECRET1" in first.body

    cassettes = [read_cassette(f) for f in cassette_files(proxy.cassette_dir)]
    assert len(cassettes) == 3
    written = every_byte_under(proxy.cassette_dir)
    for needle in [*needles(1), "SETCOOKIESECRET", "ECHOEDKEYSECRET", "sk-proj", "sk-ant"]:
        assert needle.encode() not in written, needle
    for c in cassettes:
        # x-forwarded-authorization is a credential by its name: never written.
        assert c.request.headers == {"x-request-tag": "kept"}
        assert "key=REDACTED&api_key=REDACTED&token=REDACTED&api-version=2024-06-01" in (
            c.request.url or ""
        )
        assert c.request.body["api_key"] == "REDACTED"
        assert c.request.body["metadata"] == {"token": "REDACTED"}
    gateway = [c for c in cassettes if "/gw/" in (c.request.url or "")]
    assert len(gateway) == 2
    for c in gateway:
        assert "/gw/REDACTED/auth/Bearer%20REDACTED/v1/chat/completions?" in (c.request.url or "")
        assert c.request.endpoint == "/gw/REDACTED/auth/Bearer%20REDACTED/v1/chat/completions"

    # Offline, the same requests with other credentials find the same cassettes.
    upstream.stop()
    echoing.stop()
    again = [send(2, upstream), send(2, upstream, stream=True), send(2, echoing)]
    assert [r.status_code for r in again] == [200, 200, 401]
    assert all("x-cassette-file" in r.headers for r in again)
    assert again[0].json() == live[0].json()
    assert sse_data(again[1].text) == sse_data(live[1].text)
    assert "REDACTED" in again[2].json()["error"]["message"]
    assert answer_text("A", "secrets") in again[0].text


TEST_IDS = [
    "../../escape-up",
    "/tmp/cassette-abs-escape",
    "..",
    "/",
    "a/../../../b",
    "C:\\Windows\\System32\\escape",
    "x" * 5000,
    "tests/unit/test_ok.py::test_it[param-1]",
]


def raw_request(proxy_url: str, upstream_url: str, test_id: bytes, prompt: str) -> bytes:
    """A request written byte by byte (httpx refuses a NUL in a header, as it should)."""
    body = json.dumps(
        {"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}
    ).encode()
    head = (
        (
            f"POST {upstream_url}{CHAT_PATH} HTTP/1.1\r\nHost: {upstream_url[7:]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode()
        + b"X-Cassette-Test-Id: "
        + test_id
        + b"\r\n\r\n"
    )
    host, port = proxy_url[7:].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_no_test_id_can_write_outside_cassette_dir(proxy_factory, upstream, tmp_path):
    root = tmp_path / "deep" / "cassettes"
    proxy = proxy_factory(mode="record", cassette_dir=root)
    before = {p for p in tmp_path.rglob("*") if root not in p.parents}
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        for i, test_id in enumerate(TEST_IDS):
            r = http.post(
                upstream.url + CHAT_PATH,
                json={"model": "fake-model", "messages": [{"role": "user", "content": f"id {i}"}]},
                headers={"X-Cassette-Test-Id": test_id},
            )
            assert r.status_code == 200
    # Bytes httpx refuses to send: a NUL, and invalid UTF-8 (mitmproxy hands it over as
    # lone surrogates).
    odd = [
        raw_request(proxy.url, upstream.url, b"evil\x00/../../nul", "nul id"),
        raw_request(proxy.url, upstream.url, b"../\xff\xfe/bad-utf8", "bad utf-8 id"),
    ]
    assert proxy.returncode is None  # crashes nothing

    after = {p for p in tmp_path.rglob("*") if root not in p.parents}
    assert {p for p in after - before if not p.name.startswith("mitmdump-")} == set()
    assert not Path("/tmp/cassette-abs-escape").exists()
    files = cassette_files(root)
    resolved = root.resolve()
    assert all(f.resolve().is_relative_to(resolved) for f in files)
    assert all(f.parent.parent == root for f in files)  # one folder per test id, one level
    recorded_ids = {read_cassette(f).test_id for f in files}
    assert set(TEST_IDS) <= recorded_ids
    accepted = sum(answer.startswith(b"HTTP/1.1 200") for answer in odd)
    assert len(files) == len(TEST_IDS) + accepted  # accepted ones are recorded below root
    assert len({f.parent.name for f in files}) == len(files)  # no two ids share a folder
    assert all(len(f.parent.name) <= 90 for f in files)

    # And each test id finds its own recording again.
    upstream.stop()
    replay = proxy_factory(mode="replay", cassette_dir=root)
    with httpx.Client(proxy=replay.url, trust_env=False) as http:
        for i, test_id in enumerate(TEST_IDS):
            r = http.post(
                upstream.url + CHAT_PATH,
                json={"model": "fake-model", "messages": [{"role": "user", "content": f"id {i}"}]},
                headers={"X-Cassette-Test-Id": test_id},
            )
            assert r.status_code == 200 and r.headers["x-cassette-file"].startswith(
                next(f.parent.name for f in files if read_cassette(f).test_id == test_id)
            )
