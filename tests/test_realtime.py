"""OpenAI's Realtime API through the proxy: the openai SDK's realtime client (websockets)
against a small real Realtime server (session_upstreams.py), recorded as one session
cassette, then played by the proxy with the upstream stopped."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
import websockets
from cassette_proxy import sessions
from conftest import wait_for_files
from session_upstreams import answer_for, start_realtime_upstream

API_KEY = "sk-realtime-secret-0123456789abcdef"
MODEL = "gpt-realtime"


@pytest.fixture
def realtime_tls(tmp_path: Path):
    up = start_realtime_upstream(tls_dir=tmp_path)
    yield up
    up.stop()


@pytest.fixture
def realtime_slow():
    up = start_realtime_upstream(delay=0.15)
    yield up
    up.stop()


def user_item(text: str) -> dict[str, Any]:
    return {
        "type": "conversation.item.create",
        "event_id": f"evt_{uuid.uuid4().hex}",  # client-chosen: differs on every run
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    }


async def talk(
    base_url: str,
    prompts: list[str],
    proxy: str | None = None,
    cafile: Path | None = None,
    headers: dict[str, str] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """A session as an app runs it: update the session, then per prompt an item and a
    response; every server event read (as the SDK hands them, dumped to JSON)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
    options: dict[str, Any] = {"open_timeout": 20}
    if proxy != "env":  # "env": websockets' own default, HTTPS_PROXY and SSL_CERT_FILE
        options["proxy"] = proxy
    if cafile is not None:
        options["ssl"] = ssl.create_default_context(cafile=str(cafile))
    events = [] if events is None else events
    async with client.realtime.connect(
        model=MODEL, extra_headers=headers or {}, websocket_connection_options=options
    ) as conn:
        events.append(await recv(conn))  # session.created
        await conn.send(
            {
                "type": "session.update",
                "event_id": f"evt_{uuid.uuid4().hex}",
                "session": {"type": "realtime", "instructions": "be brief"},
            }
        )
        events.append(await recv(conn))
        for prompt in prompts:
            await conn.send(user_item(prompt))  # type: ignore[arg-type]
            events.append(await recv(conn))
            await conn.send({"type": "response.create"})
            while True:
                event = await recv(conn)
                events.append(event)
                if event["type"] in ("response.done", "error"):
                    break
    return events


async def recv(conn: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(conn.recv_bytes(), 20))


def text_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "response.output_text.done"]


def test_realtime_over_https_proxy_records_then_replays_offline(
    proxy_factory, realtime_tls, monkeypatch
):
    proxy = proxy_factory(options={"ssl_verify_upstream_trusted_ca": str(realtime_tls.cert)})
    base = f"https://localhost:{realtime_tls.port}/v1"
    prompts = ["hello realtime", "and again"]
    # As a user runs it: HTTPS_PROXY and mitmproxy's CA in the environment, nothing else.
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_cert))
    live = asyncio.run(talk(base, prompts, "env"))
    assert text_of(live) == [answer_for(p) for p in prompts]
    assert realtime_tls.handshakes[0]["Authorization"] == f"Bearer {API_KEY}"
    [file] = wait_for_files(proxy.cassette_dir, 1)
    assert file.parent.name == sessions.FOLDER
    text = file.read_text()
    assert API_KEY not in text
    data = json.loads(text)
    session = data[sessions.SESSION_FIELD]
    assert (
        data["request"]["url"] == f"https://localhost:{realtime_tls.port}/v1/realtime?model={MODEL}"
    )
    assert data["request"]["model"] == MODEL
    froms = [f["from"] for f in session["frames"]]
    assert froms.count("client") == 5 and froms[0] == "server"
    assert session["frames"][0]["json"]["type"] == "session.created"
    assert session["close"]["by"] == "client"
    assert "recorded WebSocket session" in proxy.log_text()

    realtime_tls.stop()
    # Offline: the proxy plays the session; new event_ids on the client frames still match.
    again = asyncio.run(talk(base, prompts, proxy.url, proxy.ca_cert))
    assert again == live
    assert "auto session https://localhost" in proxy.log_text()

    # A changed client frame: a Realtime error event naming the first difference, then a close.
    with pytest.raises(websockets.exceptions.ConnectionClosedError) as closed:
        asyncio.run(talk(base, ["hello realtime", "something else"], proxy.url, proxy.ca_cert))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == sessions.MISS_CLOSE_CODE
    assert "session miss client frame #4 (conversation.item.create)" in proxy.log_text()
    assert "event.item.content[0].text" in proxy.log_text()


def test_miss_error_event_reaches_the_sdk(proxy_factory, realtime_slow):
    """The error event itself, as the SDK reads it, before the close."""
    proxy = proxy_factory(reverse=realtime_slow.url.replace("ws://", "http://"))
    asyncio.run(talk(f"{proxy.url}/v1", ["first words"]))
    wait_for_files(proxy.cassette_dir, 1)
    realtime_slow.stop()

    async def changed() -> list[dict[str, Any]]:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=API_KEY)
        seen = []
        async with client.realtime.connect(
            model=MODEL, websocket_connection_options={"proxy": None}
        ) as conn:
            seen.append(await recv(conn))
            await conn.send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "instructions": "be long"},
                }
            )
            seen.append(await recv(conn))
            with pytest.raises(websockets.exceptions.ConnectionClosedError):
                await recv(conn)
        return seen

    created, error = asyncio.run(changed())
    assert created["type"] == "session.created"
    assert error["type"] == "error"
    assert error["error"]["code"] == "cassette_miss"
    assert error["error"]["param"] == "event.session.instructions"
    assert "client frame #1 (session.update)" in error["error"]["message"]


def test_reverse_mode_test_ids_paced_and_cut(proxy_factory, realtime_slow):
    proxy = proxy_factory(reverse=realtime_slow.url.replace("ws://", "http://"))
    base = f"{proxy.url}/v1"
    tagged = {"X-Cassette-Test-Id": "tests/test_rt.py::test_a"}
    live = asyncio.run(talk(base, ["one two three four"], headers=tagged))
    [file] = wait_for_files(proxy.cassette_dir, 1)
    assert json.loads(file.read_text())["test_id"] == "tests/test_rt.py::test_a"
    assert "X-Cassette-Test-Id" not in realtime_slow.handshakes[0]
    proxy.stop()
    realtime_slow.stop()

    replay = proxy_factory(reverse=realtime_slow.url.replace("ws://", "http://"), mode="replay")
    assert (
        asyncio.run(
            talk(
                base.replace(str(proxy.port), str(replay.port)),
                ["one two three four"],
                headers=tagged,
            )
        )
        == live
    )
    # Another test's id: nothing recorded for it, the upgrade itself is refused.
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        asyncio.run(
            talk(
                f"{replay.url}/v1",
                ["one two three four"],
                headers={"X-Cassette-Test-Id": "tests/test_rt.py::test_b"},
            )
        )
    assert refused.value.response.status_code == 404

    # status=429 on the upgrade: the handshake itself gets the error.
    with pytest.raises(websockets.exceptions.InvalidStatus) as limited:
        asyncio.run(
            talk(f"{replay.url}/v1", ["x"], headers={**tagged, "X-Cassette-Fault": "status=429"})
        )
    assert limited.value.response.status_code == 429

    # cut-after=3: three server frames, then the played connection drops (mitmproxy
    # passes an upstream's drop on to the client as a close, as it does live).
    got: list[dict[str, Any]] = []
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        asyncio.run(
            talk(
                f"{replay.url}/v1",
                ["one two three four"],
                headers={**tagged, "X-Cassette-Fault": "cut-after=3"},
                events=got,
            )
        )
    assert got == live[:3]
    assert "cut after 3 server frame(s)" in replay.log_text()

    paced = proxy_factory(
        reverse=realtime_slow.url.replace("ws://", "http://"),
        mode="replay",
        options={"cassette_pacing": "recorded"},
    )
    started = time.monotonic()
    assert asyncio.run(talk(f"{paced.url}/v1", ["one two three four"], headers=tagged)) == live
    # Four deltas 0.15 s apart were recorded: a paced replay cannot be much quicker.
    assert time.monotonic() - started >= 0.45


def _recorded(name: str, frames: list[tuple[str, Any]]) -> sessions.Recorded:
    records = [
        {"from": who, "at_ms": float(i), "json": value} for i, (who, value) in enumerate(frames)
    ]
    return sessions.Recorded(Path(name), name, records, None, None)


def test_player_tells_recordings_apart_and_never_mixes_them():
    hello = ("server", {"type": "session.created"})
    a = _recorded("a.json", [hello, ("client", {"type": "x", "v": 1}), ("server", {"r": "A"})])
    b = _recorded("b.json", [hello, ("client", {"type": "x", "v": 2}), ("server", {"r": "B"})])
    player = sessions.Player([a, b])
    assert [f["json"] for f in player.start().send] == [{"type": "session.created"}]
    step = player.client({"json": {"type": "x", "v": 2, "event_id": "anything"}})
    assert [f["json"] for f in step.send] == [{"r": "B"}]
    assert player.leader is b
    # Different first batches: the newest plays, the other is out from the start.
    c = _recorded("c.json", [("server", {"type": "other"}), ("client", {"type": "x", "v": 1})])
    player = sessions.Player([a, c])
    player.start()
    only_c = sessions.Player([c])
    only_c.start()
    miss = only_c.client({"json": {"type": "x", "v": 3}})
    assert miss.error is not None and miss.param == "event.v"
    assert player.client({"json": {"type": "x", "v": 1}}).send[0]["json"] == {"r": "A"}


def test_cli_understands_session_cassettes(proxy_factory, realtime_slow):
    from cassette_proxy.cli import cli
    from click.testing import CliRunner

    realtime_slow.delay = 0
    proxy = proxy_factory(reverse=realtime_slow.url.replace("ws://", "http://"))
    asyncio.run(talk(f"{proxy.url}/v1", ["list me", "show me"]))
    [file] = wait_for_files(proxy.cassette_dir, 1)
    proxy.stop()

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, [*args, "-d", str(proxy.cassette_dir)])
        assert result.exit_code == 0, result.output
        return result.output

    [row] = [json.loads(line) for line in run("ls", "--json").splitlines()]
    assert (row["method"], row["endpoint"], row["kind"]) == (
        "WS",
        "/v1/realtime",
        "websocket-session",
    )
    assert row["model"] == MODEL and row["prompt"] == "list me | show me"
    shown = run("show", file.name[:12])
    key = json.loads(file.read_text())[sessions.SESSION_FIELD]["key"]
    assert f"key       {key}" in shown
    assert run("show", key[:16]) == shown  # the key a session miss names finds it
    assert "frames: 5 from the client" in shown
    assert "client events: session.update, conversation.item.create, response.create" in shown
    assert f"text:\n    {answer_for('list me')}\n    {answer_for('show me')}" in shown
    assert "closed by the client (code 1000)" in shown
    assert "1 cassette(s): 0 error(s), 0 warning(s)" in run("verify")
    stats = json.loads(run("stats", "--json"))
    assert stats["by_endpoint"] == {"WS /v1/realtime": 1}
    assert stats["tokens"]["total_tokens"] == 10
    # A frame that is neither JSON, text nor binary cannot be played: verify says so.
    data = json.loads(file.read_text())
    del data["websocket_session"]["frames"][1]["json"]
    file.write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["verify", "-d", str(proxy.cassette_dir)])
    assert result.exit_code != 0 and "frame 1: no json, text or binary" in result.output


def test_browser_style_key_in_a_subprotocol_is_never_written(proxy_factory, realtime_slow):
    """A browser's client sends its key as ``openai-insecure-api-key.<key>``."""
    realtime_slow.delay = 0
    proxy = proxy_factory(reverse=realtime_slow.url.replace("ws://", "http://"))
    key = "sk-browser-insecure-0123456789"
    offered = ["realtime", f"openai-insecure-api-key.{key}"]

    async def one(url: str) -> list[dict[str, Any]]:
        async with websockets.connect(url, subprotocols=offered, proxy=None) as ws:
            first = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session.update", "session": {"note": key}}))
            return [first, json.loads(await ws.recv())]

    url = f"{proxy.url.replace('http://', 'ws://')}/v1/realtime?model={MODEL}"
    live = asyncio.run(one(url))
    assert live[1]["session"]["note"] == key  # the upstream echoed it back
    [file] = wait_for_files(proxy.cassette_dir, 1)
    text = file.read_text()
    assert key not in text
    assert json.loads(text)[sessions.SESSION_FIELD]["subprotocols"] == ["realtime"]
    proxy.stop()
    realtime_slow.stop()
    replay = proxy_factory(reverse=realtime_slow.url.replace("ws://", "http://"), mode="replay")
    # The key was scrubbed from the recorded client frame too, so the same frame now
    # differs from it: a miss, not a replay of a frame that never held the key.
    url = f"{replay.url.replace('http://', 'ws://')}/v1/realtime?model={MODEL}"
    first, error = asyncio.run(one(url))
    assert first == live[0]
    assert error["type"] == "error" and error["error"]["param"] == "event.session.note"
    assert "first difference at event.session.note" in replay.log_text()


def test_session_cut_by_the_upstream_is_not_recorded(proxy_factory, realtime_slow):
    proxy = proxy_factory(reverse=realtime_slow.url.replace("ws://", "http://"))
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        asyncio.run(talk(f"{proxy.url}/v1", ["drop the connection"]))
    proxy.wait_for_log("not recorded WebSocket session")
    assert "cut short" in proxy.log_text()
    assert not list(proxy.cassette_dir.rglob("*.json"))
