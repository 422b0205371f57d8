"""Issue 21: the fast lane answers as mitmproxy would, byte for byte, or hands over.

Two `cassette-proxy run` processes on the same cassettes, one with the lane (the
default) and one with ``cassette_lane=false``, get the same raw HTTP/1.1 requests on real
sockets; every answer's bytes (status line, headers, body, chunk framing) must be the
same. The lane's own debug lines (``-v``) say when a connection went to mitmproxy, so the
tests also know the lane, not mitmproxy, answered.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from cliproxy import CliProxy, start_cli_proxy
from conftest import HOST, LANE_OFF, free_port
from fidelity_upstream import FidelityUpstream

pytestmark = pytest.mark.skipif(LANE_OFF, reason="CASSETTE_TEST_LANE=off: no lane to compare")

FIXTURES = Path(__file__).parent / "fixtures"
HANDED = "fast lane: a connection goes to mitmproxy"
SEQUENCE_FIRST = "ed9e9b34008d.json"  # a llama-stack recording, given a second answer below


# ---- raw HTTP/1.1 on a socket ---------------------------------------------------------


def read_answer(sock: socket.socket, pending: bytearray) -> bytes:
    """One whole answer's raw bytes (head, body, chunk framing) from ``sock``."""

    def fill(n: int) -> None:
        while len(pending) < n:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed after {len(pending)} bytes: {bytes(pending)!r}")
            pending.extend(data)

    def take(n: int) -> bytes:
        fill(n)
        out = bytes(pending[:n])
        del pending[:n]
        return out

    while (end := pending.find(b"\r\n\r\n")) < 0:
        fill(len(pending) + 1)
    head = take(end + 4)
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
    if b"content-length" in fields:
        return head + take(int(fields[b"content-length"]))
    if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        body = b""
        while True:
            while (line_end := pending.find(b"\r\n")) < 0:
                fill(len(pending) + 1)
            size_line = take(line_end + 2)
            size = int(size_line.split(b";")[0], 16)
            body += size_line + take(size + 2)
            if size == 0:
                return head + body
    raise AssertionError(f"an answer without a length: {head!r}")


def read_until_quiet(sock: socket.socket, quiet: float = 1.0) -> bytes:
    """Everything the server writes until it closes or says nothing for ``quiet`` s."""
    sock.settimeout(quiet)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def exchange(port: int, requests: list[bytes], *, one_connection: bool = True) -> list[bytes]:
    """Send each request and read its answer: on one keep-alive connection, or one each."""
    answers = []
    sock, pending = None, bytearray()
    try:
        for raw in requests:
            if sock is None or not one_connection:
                if sock is not None:
                    sock.close()
                sock, pending = socket.create_connection((HOST, port), timeout=30), bytearray()
            sock.sendall(raw)
            answers.append(read_answer(sock, pending))
    finally:
        if sock is not None:
            sock.close()
    return answers


def http_request(
    method: str,
    target: str,
    host: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Capture:
    """A plain HTTP server that keeps each request's raw bytes and answers 404: real
    clients are pointed at it (as their proxy) to learn what they send."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                pending = bytearray()
                try:
                    self.requests.append(read_message(conn, pending))
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")  # fmt: skip
                except (OSError, ConnectionError):
                    pass

    def close(self) -> None:
        self.sock.close()


def read_message(sock: socket.socket, pending: bytearray) -> bytes:
    """A request's raw bytes: the head, and a Content-Length body."""
    while (end := pending.find(b"\r\n\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-head")
        pending.extend(data)
    head = bytes(pending[: end + 4])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(pending) < end + 4 + length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        pending.extend(data)
    return bytes(pending[: end + 4 + length])


def fixture_requests(ca: Path) -> list[tuple[str, bytes]]:
    """What the recording's own client (openai, ollama, httpx) sends for each fixture
    recording, through a proxy, in plain http: the conformance test's calls, captured."""
    from test_llama_stack_conformance import REPLAYABLE, load, reissue

    out = []
    for row in REPLAYABLE:
        doc = load(row["filename"])
        doc["request"]["url"] = doc["request"]["url"].replace("https://", "http://", 1)
        capture = Capture()
        try:
            with contextlib.suppress(Exception):  # the capture's 404, as each client takes it
                reissue(SimpleNamespace(url=capture.url, ca_cert=ca), doc)
        finally:
            capture.close()
        assert capture.requests, row["filename"]
        out += [(row["filename"], raw) for raw in capture.requests]
    return out


# ---- the two proxies -------------------------------------------------------------------


def cassettes(tmp_path: Path) -> Path:
    """Every fixture recording in one folder, plus a second answer for one of them."""
    folder = tmp_path / "cassettes"
    for sub in FIXTURES.iterdir():
        if sub.is_dir():
            shutil.copytree(sub, folder / sub.name)
    first = folder / "llama-stack" / SEQUENCE_FIRST
    doc = json.loads(first.read_text())
    doc["response"]["body"]["__data__"]["response"] = "the second answer"
    (first.parent / SEQUENCE_FIRST.replace(".json", ".2.json")).write_text(json.dumps(doc))
    return folder


@pytest.fixture
def pair(tmp_path: Path, mitm_confdir: Path) -> Iterator[Any]:
    """Start a lane-on and a lane-off proxy on the same cassettes, same arguments."""
    started: list[CliProxy] = []

    def start(*args: str) -> tuple[CliProxy, CliProxy]:
        lane = start_cli_proxy(tmp_path / f"on{len(started)}", "-v", *args, confdir=mitm_confdir)
        started.append(lane)
        off = start_cli_proxy(
            tmp_path / f"off{len(started)}", "-v", *args, "--set", "cassette_lane=false",
            confdir=mitm_confdir,
        )  # fmt: skip
        started.append(off)
        return lane, off

    for sub in ("on0", "off1", "on2", "off3", "on4", "off5"):
        (tmp_path / sub).mkdir()
    yield start
    for proxy in started:
        proxy.stop()


def summary(proxy: CliProxy) -> str:
    proxy.stop()
    lines = [line for line in proxy.output().splitlines() if line.startswith("cassette-proxy: ")]
    assert lines, proxy.output()
    return lines[-1]


# ---- the differential test -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replay", "record-if-missing"])
def test_every_fixture_answers_the_same_bytes_from_the_lane(
    pair: Any, tmp_path: Path, mitm_confdir: Path, mode: str
) -> None:
    folder = cassettes(tmp_path)
    lane, off = pair("--mode", mode, "-d", str(folder))
    requests = fixture_requests(mitm_confdir / "mitmproxy-ca-cert.pem")
    assert len(requests) >= 40
    raw = [r for _, r in requests]
    # Twice over: the second pass is answered from the lane's memos, and the sequence
    # fixture gets its second answer.
    # (record-if-missing: one connection each first, as a repeat past the recorded
    # answers is forwarded by mitmproxy, which keeps its connection from then on.)
    for one_connection in (True, False) if mode == "replay" else (False, True):
        got = exchange(lane.port, raw, one_connection=one_connection)
        want = exchange(off.port, raw, one_connection=one_connection)
        for (name, _), a, b in zip(requests, got, want, strict=True):
            assert a == b, f"{name}: lane {a[:300]!r}\n   mitmproxy {b[:300]!r}"
    statuses = {a.split(b" ", 2)[1] for a in got}
    assert b"200" in statuses
    # Every one of those was the lane's: no connection was handed over (in
    # record-if-missing, but for a request repeated past its recorded answers).
    handed = [ln for ln in lane.output().splitlines() if HANDED in ln]
    if mode == "replay":
        assert not handed, handed
    assert all("(record-if-missing, a position not recorded)" in ln for ln in handed)
    assert len(handed) <= len(requests) // 4 + 1, len(handed)  # repeats, then one
    seq = [a for (name, _), a in zip(requests, got, strict=True) if name == SEQUENCE_FIRST]
    assert seq and b"the second answer" in seq[0]
    # The same counts, hit lines and summary.
    hit_lines = [ln.split("] ", 1)[-1] for ln in lane.output().splitlines() if " hit " in ln]
    off_lines = [ln.split("] ", 1)[-1] for ln in off.output().splitlines() if " hit " in ln]
    assert all(line.startswith(f"{mode} hit ") for line in hit_lines)
    assert hit_lines == off_lines and len(hit_lines) == 2 * len(requests)
    assert summary(lane) == summary(off)


def test_reverse_mode_streams_and_misses_answer_the_same_bytes(
    pair: Any, tmp_path: Path, mitm_confdir: Path
) -> None:
    folder = cassettes(tmp_path)
    base = "http://0.0.0.0:11434"
    lane, off = pair("--mode", "replay", "-d", str(folder), "--reverse", base)
    requests = []
    for name, raw in fixture_requests(mitm_confdir / "mitmproxy-ca-cert.pem"):
        head, _, body = raw.partition(b"\r\n\r\n")
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.split(b" ")
        if not target.startswith(b"http://0.0.0.0:11434/"):
            continue
        origin = target[len(b"http://0.0.0.0:11434") :]
        line = b" ".join([method, origin, version])
        requests.append((name, line + b"\r\n" + rest + b"\r\n\r\n" + body))
    # A miss, and a request whose test id no recording has.
    requests.append(("miss", http_request("POST", "/api/chat", "x", b'{"model": "none"}')))
    assert len(requests) >= 10
    raw = [r for _, r in requests]
    got, want = exchange(lane.port, raw), exchange(off.port, raw)
    for (name, _), a, b in zip(requests, got, want, strict=True):
        assert a == b, f"{name}: lane {a[:300]!r}\n   mitmproxy {b[:300]!r}"
    assert any(b"404" in a.split(b"\r\n", 1)[0] for a in got)  # the miss, from the lane too
    assert HANDED not in lane.output()


# ---- handing over: what is not the lane's goes to mitmproxy, answered the same ----------


def test_a_fault_mid_connection_goes_to_mitmproxy_with_the_connection(
    pair: Any, tmp_path: Path, mitm_confdir: Path
) -> None:
    folder = cassettes(tmp_path)
    lane, off = pair("--mode", "replay", "-d", str(folder))
    requests = fixture_requests(mitm_confdir / "mitmproxy-ca-cert.pem")
    hit = next(r for name, r in requests if b"localhost:11434" in r and name != SEQUENCE_FIRST)
    fault = hit.replace(b"\r\n\r\n", b"\r\nX-Cassette-Fault: status=503\r\n\r\n", 1)
    hostile = hit.replace(b"\r\n\r\n", b"\r\nX-Cassette-Fallback: forged\r\n\r\n", 1)
    raw = [hit, fault, hit, hostile]
    got, want = exchange(lane.port, raw), exchange(off.port, raw)
    assert got == want
    assert got[1].startswith(b"HTTP/1.1 503")
    assert got[0] == got[2] == got[3] and got[0].startswith(b"HTTP/1.1 200")
    assert f"{HANDED} (a x-cassette-fault header)" in lane.output()
    assert summary(lane) == summary(off)


def test_pipelined_split_and_closing_requests(
    pair: Any, tmp_path: Path, mitm_confdir: Path
) -> None:
    folder = cassettes(tmp_path)
    lane, off = pair("--mode", "replay", "-d", str(folder))
    captured = fixture_requests(mitm_confdir / "mitmproxy-ca-cert.pem")
    requests = [r for name, r in captured if name != SEQUENCE_FIRST][:3]
    for proxy in (lane, off):
        # Three requests in one write: three answers, in order.
        with socket.create_connection((HOST, proxy.port), timeout=30) as sock:
            sock.sendall(b"".join(requests))
            pending = bytearray()
            answers = [read_answer(sock, pending) for _ in requests]
        assert answers == exchange(proxy.port, requests, one_connection=False)
        # A request a few bytes at a time.
        with socket.create_connection((HOST, proxy.port), timeout=30) as sock:
            for i in range(0, len(requests[0]), 7):
                sock.sendall(requests[0][i : i + 7])
                time.sleep(0.001)
            assert read_answer(sock, bytearray()) == answers[0]
        # Connection: close is answered, then the connection ends.
        closing = requests[0].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        with socket.create_connection((HOST, proxy.port), timeout=30) as sock:
            sock.sendall(closing)
            pending = bytearray()
            assert read_answer(sock, pending) == answers[0]
            assert sock.recv(10) == b""
    assert HANDED not in lane.output()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET http://localhost:11434/api/tags HTTP/1.0\r\nHost: localhost:11434\r\n\r\n",
        b"HEAD http://localhost:11434/api/tags HTTP/1.1\r\nHost: localhost:11434\r\n\r\n",
        b"POST http://localhost:11434/api/chat HTTP/1.1\r\nHost: localhost:11434\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b"11\r\n{\"model\": \"none\"}\r\n0\r\n\r\n",
        b"GET /api/tags HTTP/1.1\r\nHost: localhost:11434\r\n\r\n",  # origin-form to a proxy
        b"GET http://localhost:11434/api/tags HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://localhost:11434/api/tags HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET http://localhost:11434/api/tags HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\nab",
        b"GET http://localhost:11434/api/tags HTTP/1.1\nHost: a\n\n",
    ],
    ids=["http1.0", "head", "chunked-body", "origin-form", "two-hosts", "space-colon",
         "two-lengths", "bare-newlines"],  # fmt: skip
)
def test_unusual_requests_are_mitmproxys_and_answered_the_same(
    pair: Any, tmp_path: Path, raw: bytes
) -> None:
    folder = cassettes(tmp_path)
    lane, off = pair("--mode", "replay", "-d", str(folder))
    answers = []
    for proxy in (lane, off):
        with socket.create_connection((HOST, proxy.port), timeout=30) as sock:
            sock.sendall(raw)
            answers.append(read_until_quiet(sock))
    assert answers[0] == answers[1] and answers[0].startswith(b"HTTP/1.")
    # Two Host headers pass mitmproxy's checks: the lane answers those itself.
    assert (HANDED in lane.output()) == (b"Host: b" not in raw)


def test_https_through_the_lane_port_is_mitmproxys(
    pair: Any, tmp_path: Path, mitm_confdir: Path
) -> None:
    from test_llama_stack_conformance import REPLAYABLE, load, reissue

    folder = cassettes(tmp_path)
    lane, off = pair("--mode", "replay", "-d", str(folder))
    ca = mitm_confdir / "mitmproxy-ca-cert.pem"
    rows = [r for r in REPLAYABLE if load(r["filename"])["request"]["url"].startswith("https://")]
    assert len(rows) >= 5
    for row in rows:
        doc = load(row["filename"])
        on = reissue(SimpleNamespace(url=lane.url, ca_cert=ca), doc)
        assert on == reissue(SimpleNamespace(url=off.url, ca_cert=ca), doc), row["filename"]
        assert "cassette_miss" not in json.dumps(on)
    assert f"{HANDED} (a CONNECT request)" in lane.output()
    assert summary(lane) == summary(off)


# ---- auto mode: the lane answers while the upstream is known to be down ----------------


def test_auto_mode_with_the_upstream_down(pair: Any, tmp_path: Path) -> None:
    folder = tmp_path / "recorded"
    upstream = FidelityUpstream()
    try:
        recorder = start_cli_proxy(tmp_path, "--mode", "record", "-d", str(folder),
                                   "--reverse", upstream.url)  # fmt: skip
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.Client(base_url=recorder.url, trust_env=False, timeout=30) as client:
            live = client.post("/v1/chat/completions", json=body).content
        recorder.stop()
        url = upstream.url
    finally:
        upstream.stop()
    lane, off = pair("--mode", "auto", "-d", str(folder), "--reverse", url)
    raw = http_request("POST", "/v1/chat/completions", "x", json.dumps(body).encode())
    got, want = exchange(lane.port, [raw] * 5), exchange(off.port, [raw] * 5)
    assert got == want
    assert all(a.endswith(live) for a in got)
    # The first waited for the lane's probe (the upstream is down); all were the lane's.
    assert HANDED not in lane.output()
    lane_summary, off_summary = summary(lane), summary(off)
    assert lane_summary == off_summary and "5 offline fallbacks" in lane_summary


def test_auto_mode_with_the_upstream_up_records_through_mitmproxy(tmp_path: Path) -> None:
    upstream = FidelityUpstream()
    try:
        lane = start_cli_proxy(tmp_path, "-v", "--mode", "auto", "-d", str(tmp_path / "c"),
                               "--reverse", upstream.url)  # fmt: skip
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        raw = http_request("POST", "/v1/chat/completions", "x", json.dumps(body).encode())
        first, second = exchange(lane.port, [raw, raw])
        assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
        assert f"{HANDED} (auto mode, the upstream up)" in lane.output()
        result = summary(lane)
    finally:
        upstream.stop()
    assert "2 recorded" in result or "1 recorded" in result, result
    assert list((tmp_path / "c").rglob("*.json"))


# ---- real clients ------------------------------------------------------------------------


def test_openai_sdk_and_curl_through_the_lane(tmp_path: Path, mitm_confdir: Path) -> None:
    import subprocess

    import openai

    folder = tmp_path / "recorded"
    upstream = FidelityUpstream()
    try:
        recorder = start_cli_proxy(tmp_path, "--mode", "record", "-d", str(folder),
                                   "--reverse", upstream.url, confdir=mitm_confdir)  # fmt: skip
        client = openai.OpenAI(base_url=recorder.url + "/v1", api_key="sk-test-lane-0000")
        hi = [{"role": "user", "content": "hi"}]
        live = client.chat.completions.create(model="m", messages=hi)
        stream = client.chat.completions.create(model="m", messages=hi, stream=True)
        live_stream = [c.model_dump() for c in stream]
        recorder.stop()
        url = upstream.url
    finally:
        upstream.stop()
    replay = start_cli_proxy(tmp_path, "-v", "--mode", "replay", "-d", str(folder),
                             "--reverse", url, "--usage-log", str(tmp_path / "used.log"),
                             confdir=mitm_confdir)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=replay.url + "/v1", api_key="sk-test-lane-0000")
        for _ in range(3):
            again = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            assert again.model_dump() == live.model_dump()
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            assert [c.model_dump() for c in stream] == live_stream
        out = subprocess.run(
            ["curl", "-s", "-i", "-X", "POST", replay.url + "/v1/chat/completions",
             "-H", "content-type: application/json",
             "-H", "authorization: Bearer sk-test-lane-0000",
             "--data", json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})],
            capture_output=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert out.startswith(b"HTTP/1.1 200") and b"x-cassette-file:" in out
    finally:
        result = summary(replay)
    assert HANDED not in replay.output()
    assert "7 hits, 0 misses" in result
    used = (tmp_path / "used.log").read_text().splitlines()
    assert len(used) == 7 and all(line.startswith("hit\t") for line in used)
    assert "sk-test-lane" not in replay.output()


def test_the_lane_port_is_free_again_after_stop(tmp_path: Path, mitm_confdir: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    proxy = start_cli_proxy(tmp_path, "--mode", "replay", "-d", str(folder), confdir=mitm_confdir)
    port = proxy.port
    assert summary(proxy).startswith("cassette-proxy: 0 hits")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
    assert free_port() > 0


# ---- the pure parts ----------------------------------------------------------------------


def test_http1_encode_frames_a_chunked_answer_as_mitmproxy_does() -> None:
    from cassette_proxy import http1
    from mitmproxy import http

    whole = http.Response.make(200, b"abc", {"content-type": "text/plain"})
    data, close = http1.encode(whole)
    assert data == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nabc"
    assert close is False
    chunked = http.Response.make(200, b"", {"transfer-encoding": "chunked"})
    chunked.set_content(None)
    chunked.raw_content = b"hello"
    data, _ = http1.encode(chunked)
    assert data.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    closing = http.Response.make(503, b"", {"connection": "close"})
    assert http1.encode(closing)[1] is True


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", None),
        (b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n", "not an HTTP/1.1 request line"),
        (b"get /x HTTP/1.1\r\nHost: a\r\n\r\n", "not an HTTP/1.1 request line"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", "a CONNECT request"),
        (b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n", "not an origin-form target"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", "a upgrade header"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nX-Cassette-Fault: status=500\r\n\r\n", "fault"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nx-cassette-fallback: t\r\n\r\n", "fallback"),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", "Length"),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n", "a large body"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", "mitmproxy refuses"),
    ],
)
def test_which_heads_are_the_lanes(head: bytes, why: str | None) -> None:
    from cassette_proxy.addon import CassetteRecorder
    from cassette_proxy.lane import Site

    lane = CassetteRecorder().lane
    got = lane.head(Site(("http", "up.example", 8000)), head)
    if why is None:
        assert not isinstance(got, str)
        want = ("up.example", 8000, "up.example:8000")
        assert (got.host, got.port, got.request.host_header) == want
    else:
        assert isinstance(got, str) and why in got, got
    assert lane.head(Site(("http", "up.example", 8000)), head) is got  # remembered


# ---- the bad day: a client gone mid-probe, slow readers, idle clients, options ----------


def silent_port() -> tuple[int, list[socket.socket]]:
    """A port whose listen queue is full: connects to it hang (an upstream that drops SYNs),
    so a probe of it takes its whole timeout."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = [listener]
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((HOST, port))
        held.append(s)
    time.sleep(0.1)
    return port, held


def recorded_chat(tmp_path: Path, body: dict[str, Any]) -> Path:
    """A folder with one chat completion recorded from a live upstream."""
    folder = tmp_path / "recorded"
    upstream = FidelityUpstream()
    try:
        recorder = start_cli_proxy(tmp_path, "--mode", "record", "-d", str(folder),
                                   "--reverse", upstream.url)  # fmt: skip
        with httpx.Client(base_url=recorder.url, trust_env=False, timeout=30) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        recorder.stop()
    finally:
        upstream.stop()
    return folder


def test_a_client_gone_mid_probe_leaves_the_others_answered(tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    folder = recorded_chat(tmp_path, body)
    port, held = silent_port()
    try:
        proxy = start_cli_proxy(tmp_path, "-v", "--mode", "auto", "-d", str(folder),
                                "--reverse", f"http://{HOST}:{port}",
                                "--set", "cassette_probe_timeout_ms=1500")  # fmt: skip
        raw = http_request("POST", "/v1/chat/completions", "x", json.dumps(body).encode())
        gone = socket.create_connection((HOST, proxy.port))
        gone.sendall(raw)  # its connection waits for the probe ...
        time.sleep(0.3)
        waiting = socket.create_connection((HOST, proxy.port), timeout=20)
        waiting.sendall(raw)  # ... and so does this one, on the same probe
        time.sleep(0.3)
        gone.close()  # the first client gives up while the probe runs
        answer = read_answer(waiting, bytearray())
        waiting.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        for s in held:
            s.close()
    result = summary(proxy)
    assert "1 offline fallbacks" in result or "2 offline fallbacks" in result, result
    assert "Traceback" not in proxy.output()


def test_a_slow_reader_gets_every_pipelined_answer_then_the_close(
    pair: Any, tmp_path: Path
) -> None:
    folder = cassettes(tmp_path)
    big = folder / "llama-stack" / "ed9e9b34008d.json"
    doc = json.loads(big.read_text())
    doc["response"]["body"]["__data__"]["response"] = "x" * 3_000_000  # ~3 MB answer
    big.write_text(json.dumps(doc))
    (big.parent / "ed9e9b34008d.2.json").unlink()
    request = json.dumps(doc["request"]["body"]).encode()
    raw = http_request("POST", "http://localhost:11434/api/generate", "localhost:11434", request)
    closing = raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    lane, off = pair("--mode", "replay", "-d", str(folder))
    answers = []
    for proxy in (lane, off):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, proxy.port))
        sock.sendall(raw + raw + closing)
        time.sleep(1.0)  # the proxy's writes back up: it pauses, then resumes
        data = b""
        sock.settimeout(30)
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        answers.append(data)
    assert answers[0] == answers[1]
    assert answers[0].count(b"HTTP/1.1 200 OK") == 3 and len(answers[0]) > 9_000_000
    assert "Exception in callback" not in lane.output() and HANDED not in lane.output()


def test_an_idle_connection_is_closed_after_tcp_timeout(pair: Any, tmp_path: Path) -> None:
    folder = cassettes(tmp_path)
    lane, off = pair("--mode", "replay", "-d", str(folder), "--set", "tcp_timeout=2")
    for proxy in (lane, off):
        with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
            started = time.monotonic()
            assert sock.recv(10) == b""  # closed by the proxy, not by our timeout
            assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("option", "raw"),
    [
        ("ignore_hosts=nothing.example", b"GET http://localhost:11434/api/tags HTTP/1.1\r\n"
         b"Host: localhost:11434\r\n\r\n"),
        ("cassette_lane=false", b"GET http://localhost:11434/api/tags HTTP/1.1\r\n"
         b"Host: localhost:11434\r\n\r\n"),
        (None, b"GET http://c.pki.goog/mitmproxy-1234.crl HTTP/1.1\r\nHost: c.pki.goog\r\n\r\n"),
    ],
    ids=["ignore_hosts", "lane-off", "mitmproxy-crl"],
)
def test_what_mitmproxy_would_do_otherwise_is_left_to_it(
    tmp_path: Path, mitm_confdir: Path, option: str | None, raw: bytes
) -> None:
    folder = cassettes(tmp_path)
    args = ["-v", "--mode", "replay", "-d", str(folder)]
    if option:
        args += ["--set", option]
    proxy = start_cli_proxy(tmp_path, *args, confdir=mitm_confdir)
    try:
        answer = exchange(proxy.port, [raw])[0]
    finally:
        proxy.stop()
    assert answer.startswith(b"HTTP/1.1 ")
    reason = {"ignore_hosts": "ignore_hosts is set", "cassette_lane": "the lane is off",
              None: "mitmproxy's CRL"}[option.split("=")[0] if option else None]  # fmt: skip
    assert f"{HANDED} ({reason})" in proxy.output()


def test_record_if_missing_forwards_a_position_not_recorded(tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    upstream = FidelityUpstream()
    try:
        folder = tmp_path / "c"
        first = start_cli_proxy(tmp_path, "--mode", "record", "-d", str(folder),
                                "--reverse", upstream.url)  # fmt: skip
        raw = http_request("POST", "/v1/chat/completions", "x", json.dumps(body).encode())
        recorded = exchange(first.port, [raw])[0]
        first.stop()
        proxy = start_cli_proxy(tmp_path, "-v", "--mode", "record-if-missing", "-d",
                                str(folder), "--reverse", upstream.url)  # fmt: skip
        again, live = exchange(proxy.port, [raw, raw])  # position 1 recorded, 2 is not
        result = summary(proxy)
    finally:
        upstream.stop()
    assert again.partition(b"\r\n\r\n")[2] == recorded.partition(b"\r\n\r\n")[2]
    assert b"x-cassette-file" in again
    assert live.startswith(b"HTTP/1.1 200") and b"x-cassette-file" not in live.lower()
    assert f"{HANDED} (record-if-missing, a position not recorded)" in proxy.output()
    assert "1 hits" in result and "1 recorded" in result, result
    assert len(list(folder.rglob("*.json"))) == 2  # the second answer, as <hash>.2.json
