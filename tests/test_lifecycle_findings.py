"""The request-lifecycle findings of issue 17, one or more end-to-end tests each.

Each test states the rule the issue's design puts in one room, and checks it with a real
mitmdump process, real clients (the openai SDK, httpx, curl) and small real upstreams on
127.0.0.1 whose answers follow a script (tests/lifecycle_upstreams.py): a polled
endpoint answering ``running, 404, done``, an upstream that answers 503 and goes away,
an HTTPS upstream that hangs, streams that end in an error.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from cassette_proxy.sequence import first_path, position_of
from conftest import cassette_files, openai_client, wait_for_files, wait_until
from lifecycle_upstreams import (
    CHAT_PATH,
    ScriptUpstream,
    fail,
    go_away,
    hang,
    say,
    sse,
    start_script_upstream,
)
from surface_upstreams import start_surface_upstream
from upstreams import answer_text

POLL = "is the job done?"
TOKEN_HEADER = "X-Cassette-Fallback"  # addons/cassette_proxy/fallback.py TOKEN_HEADER


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
def scripted():
    """`scripted(scripts, tls_dir=None) -> ScriptUpstream`; all stopped at teardown."""
    started: list[ScriptUpstream] = []

    def factory(scripts: dict[str, list[Any]] | None = None, tls_dir: Path | None = None):
        up = start_script_upstream(scripts, tls_dir)
        started.append(up)
        return up

    yield factory
    for up in started:
        up.stop()


def http_client(proxy, **kwargs: Any) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, trust_env=False, timeout=30, **kwargs)


def poll(http: httpx.Client, base: str, stream: bool = False) -> str:
    """One "is the job done?" request: the answer's text, or its status when an error."""
    got = http.post(base + CHAT_PATH, json=chat(POLL, stream=stream))
    if got.status_code != 200:
        return str(got.status_code)
    if not stream:
        return got.json()["choices"][0]["message"]["content"]
    events = [json.loads(line[6:]) for line in got.text.splitlines() if line.startswith("data: {")]
    if any("error" in e for e in events):
        return "error event"
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def sdk_poll(client: openai.OpenAI) -> str:
    answer = client.chat.completions.create(**chat(POLL))
    return answer.choices[0].message.content or ""


def sequence_files(folder: Path) -> list[Path]:
    return sorted(cassette_files(folder), key=lambda p: (first_path(p).name, position_of(p)))


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


def ca_context(proxy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy.ca_cert))


# ---- 1. the stand-in token is ours alone -----------------------------------------------


def test_replay_never_forwards_a_request_that_carries_the_stand_in_header(proxy_factory, upstream):
    """Finding 1 (replay): a client's own `X-Cassette-Fallback` header does not open the
    way upstream; nothing is forwarded in replay, whatever a client sends."""
    proxy = proxy_factory(mode="replay")
    client = openai_client(proxy, upstream, default_headers={TOKEN_HEADER: "anything"})
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(**chat("never recorded"))
    assert raised.value.response.json()["error"]["type"] == "cassette_miss"
    out = curl("-x", proxy.url, "-H", f"{TOKEN_HEADER}: anything", "-H",
               "content-type: application/json", "--data-binary",
               json.dumps(chat("never recorded either")), upstream.url + CHAT_PATH)  # fmt: skip
    assert json.loads(out.stdout)["error"]["type"] == "cassette_miss", out.stdout
    assert upstream.requests == []  # nothing left the machine


def test_auto_records_a_request_that_carries_the_stand_in_header_and_strips_it(
    proxy_factory, upstream, tmp_path
):
    """Finding 1 (auto): a client's `X-Cassette-Fallback` header is stripped before the
    request goes upstream, and the answer is recorded as any other."""
    proxy = proxy_factory(mode="auto")
    out = curl("-x", proxy.url, "-H", f"{TOKEN_HEADER}: anything", "-H",
               "content-type: application/json", "--data-binary",
               json.dumps(chat("with a stray header")), upstream.url + CHAT_PATH)  # fmt: skip
    live = json.loads(out.stdout)
    assert live["choices"][0]["message"]["content"] == answer_text("A", "with a stray header")
    [sent] = upstream.requests_to(CHAT_PATH)
    recorded = wait_for_files(proxy.cassette_dir, 1, timeout=5)
    # The internal header never leaks upstream, and the answer is recorded.
    assert (TOKEN_HEADER.lower() in sent.headers, len(recorded)) == (False, 1)
    proxy.stop()
    upstream.stop()
    replay = proxy_factory(mode="replay")
    again = openai_client(replay, upstream).chat.completions.create(**chat("with a stray header"))
    assert again.choices[0].message.content == live["choices"][0]["message"]["content"]


def test_auto_offline_answers_a_request_that_carries_the_stand_in_header_from_cassettes(
    proxy_factory, upstream
):
    """Finding 1 (auto, upstream offline): a client's `X-Cassette-Fallback` header does
    not take the request past the cassettes; it gets the recorded answer."""
    proxy = proxy_factory(mode="auto", options={"cassette_probe_ttl_ms": 0})
    live = openai_client(proxy, upstream).chat.completions.create(**chat("offline later"))
    wait_for_files(proxy.cassette_dir, 1)
    upstream.stop()
    client = openai_client(proxy, upstream, default_headers={TOKEN_HEADER: "anything"})
    assert client.chat.completions.create(**chat("offline later")) == live


# ---- 2. an answer is recorded at its own position, errors included -----------------------


def test_a_4xx_inside_a_sequence_is_recorded_at_its_own_position_in_auto_mode(
    proxy_factory, scripted
):
    """Finding 2 (auto): live `running, 404, done` is recorded as three positions and
    replays as `running, 404, done`; the 404 is never "kept" over another position."""
    up = scripted({CHAT_PATH: [say("running"), fail(404), say("done")]})
    proxy = proxy_factory(mode="auto")
    with http_client(proxy) as http:
        live = [poll(http, up.url) for _ in range(3)]
    assert live == ["running", "404", "done"]
    proxy.stop()
    up.stop()
    replay = proxy_factory(mode="replay")
    with http_client(replay) as http:
        assert [poll(http, up.url) for _ in range(3)] == ["running", "404", "done"]
    assert " kept " not in proxy.log_text()


def test_a_record_run_logs_a_4xx_inside_a_sequence_at_its_own_file(
    proxy_factory, scripted, tmp_path
):
    """Finding 2 (record): the 404 at position 2 is written to `<h>.2.json`, and the log
    does not say it "replaces the successful recording <h>.json" (nothing was replaced)."""
    up = scripted({CHAT_PATH: [say("running"), fail(404), say("done")]})
    proxy = proxy_factory(mode="record")
    with http_client(proxy) as http:
        assert [poll(http, up.url) for _ in range(3)] == ["running", "404", "done"]
    proxy.stop()
    files = sequence_files(tmp_path / "cassettes")
    assert [position_of(p) for p in files] == [1, 2, 3]
    first = files[0].name
    up.stop()
    replay = proxy_factory(mode="replay")
    with http_client(replay) as http:  # each answer at its own position (as on main)
        assert [poll(http, up.url) for _ in range(3)] == ["running", "404", "done"]
    log = proxy.log_text()
    assert f"replaces the successful recording {first}" not in log, log
    assert "replaces the successful recording" not in log  # a fresh folder: nothing replaced


# ---- 3. an old sequence goes only when a whole new one is there --------------------------


def test_an_interrupted_re_record_keeps_the_rest_of_the_old_sequence(proxy_factory, scripted):
    """Finding 3: run 1 records `running, running, done`; in run 2 the first live poll is
    recorded, then the upstream dies: polls 2 and 3 still get the old `running, done`,
    and `done` is still there for the next run."""
    up = scripted({CHAT_PATH: [say("running"), say("running"), say("done")]})
    first_run = proxy_factory(mode="record")
    with http_client(first_run) as http:
        assert [poll(http, up.url) for _ in range(3)] == ["running", "running", "done"]
    first_run.stop()

    up.script(CHAT_PATH, [go_away(say("running again"))])
    proxy = proxy_factory(mode="auto", options={"cassette_probe_ttl_ms": 0})
    client = openai_client(proxy, up.url)
    got = [sdk_poll(client) for _ in range(3)]
    assert got == ["running again", "running", "done"], got
    proxy.stop()

    replay = proxy_factory(mode="replay")
    with http_client(replay) as http:
        assert [poll(http, up.url) for _ in range(3)][-1] == "done"


# ---- 4. a failed forwarded attempt gives its position back -------------------------------


def test_a_retry_after_a_hung_https_upstream_gets_the_same_position(
    proxy_factory, scripted, tmp_path
):
    """Finding 4 (hung HTTPS upstream): the attempt that timed out (the client gets a 502
    inside the tunnel) takes no position, so the SDK's retry gets `running`, the next
    call `done`; and the log does not call the failed attempt a hit."""
    up = scripted({CHAT_PATH: [say("running"), say("done")]}, tls_dir=tmp_path)
    trust = {"ssl_verify_upstream_trusted_ca": str(up.cert)}
    recorder = proxy_factory(mode="record", options=trust)
    with http_client(recorder, verify=ca_context(recorder)) as http:
        assert [poll(http, up.url) for _ in range(2)] == ["running", "done"]
    recorder.stop()

    up.script(CHAT_PATH, [hang()])
    options = {**trust, "cassette_response_timeout_ms": 800, "cassette_probe_ttl_ms": 60_000}
    proxy = proxy_factory(mode="auto", options=options)
    with http_client(proxy, verify=ca_context(proxy)) as http:
        client = openai.OpenAI(base_url=up.url + "/v1", api_key="sk-x", http_client=http,
                               max_retries=2)  # fmt: skip
        got = [sdk_poll(client) for _ in range(2)]
    proxy.wait_for_log("sent no response headers within 800 ms")
    assert got == ["running", "done"], got
    hits = [line for line in proxy.log_text().splitlines() if "auto hit " in line]
    assert len(hits) == 2, hits  # one per answer the client got


def test_a_retry_after_a_503_from_an_upstream_that_then_went_away_gets_the_same_position(
    proxy_factory, scripted
):
    """Finding 4 (503, then gone): the forwarded attempt answered 503 (not recorded) takes
    no position, so the SDK's retry, answered from cassettes, gets `running`."""
    up = scripted({CHAT_PATH: [say("running"), say("done")]})
    recorder = proxy_factory(mode="record")
    with http_client(recorder) as http:
        assert [poll(http, up.url) for _ in range(2)] == ["running", "done"]
    recorder.stop()

    up.script(CHAT_PATH, [go_away(fail(503, close=True, retry_after="0"))])
    proxy = proxy_factory(mode="auto", options={"cassette_probe_ttl_ms": 0})
    client = openai_client(proxy, up.url).with_options(max_retries=2)
    got = [sdk_poll(client) for _ in range(2)]
    assert got == ["running", "done"], got
    assert len(up.requests_to(CHAT_PATH)) == 2 + 1  # two recorded, one 503


# ---- 5. an error never replaces a success, streamed or not -------------------------------


def test_a_responses_stream_ending_in_an_error_event_keeps_the_recorded_success(
    proxy_factory, tmp_path
):
    """Finding 5 (Responses stream): a new run's stream that ends in an `error` event
    reaches the client, and the recorded `response.completed` stream stays."""
    surface = start_surface_upstream("A")
    try:
        first = proxy_factory(mode="auto")
        client = openai_client(first, surface)
        good = [e.model_dump() for e in client.responses.create(
            model="fake-model", input="summarise", stream=True)]  # fmt: skip
        assert good[-1]["type"] == "response.completed"
        first.stop()

        surface.configure(stream_end="error")
        second = proxy_factory(mode="auto")
        bad = list(openai_client(second, surface).responses.create(
            model="fake-model", input="summarise", stream=True))  # fmt: skip
        assert bad[-1].type == "error"  # the client saw the error live
        second.stop()
    finally:
        surface.stop()
    replay = openai_client(proxy_factory(mode="replay"), surface)
    again = [e.model_dump() for e in replay.responses.create(
        model="fake-model", input="summarise", stream=True)]  # fmt: skip
    assert again[-1]["type"] == "response.completed", again[-1]
    assert again == good


def anthropic_client(proxy, upstream) -> anthropic.Anthropic:
    http = httpx2.Client(proxy=proxy.url, trust_env=False, timeout=30.0)
    return anthropic.Anthropic(base_url=upstream.url, api_key="sk-ant-lifecycle-0000",
                               http_client=http, max_retries=0)  # fmt: skip


def test_a_messages_stream_ending_in_an_error_event_keeps_the_recorded_success(proxy_factory):
    """Finding 5 (a guard beside it: passes on main too): an Anthropic Messages stream
    ending in an `error` event reaches the anthropic SDK as the error, and the recorded
    `message_stop` stream stays."""
    surface = start_surface_upstream("A")
    ask = {"model": "claude-fake", "max_tokens": 64, "stream": True,
           "messages": [{"role": "user", "content": "summarise"}]}  # fmt: skip
    try:
        first = proxy_factory(mode="auto")
        good = [e.model_dump() for e in anthropic_client(first, surface).messages.create(**ask)]
        assert good[-1]["type"] == "message_stop"
        first.stop()

        surface.configure(stream_end="error")
        second = proxy_factory(mode="auto")
        with pytest.raises(anthropic.APIStatusError):  # the error event, live
            list(anthropic_client(second, surface).messages.create(**ask))
        second.stop()
    finally:
        surface.stop()
    replay = proxy_factory(mode="replay")
    assert [
        e.model_dump() for e in anthropic_client(replay, surface).messages.create(**ask)
    ] == good


RAW_PATH = "/v1/agents/run"  # no family knows it: recorded raw, line by line


def raw_stream(http: httpx.Client, base: str) -> str:
    """A raw SSE request's answer: its ``data:`` lines' JSON objects, joined."""
    got = http.post(base + RAW_PATH, json={"task": "summarise", "stream": True})
    assert got.status_code == 200, got.text
    lines = [line[6:] for line in got.text.splitlines() if line.startswith("data: {")]
    return " ".join(
        "error event" if "error" in (obj := json.loads(line)) else obj["text"] for line in lines
    )


def test_a_raw_sse_stream_of_an_error_keeps_the_recorded_success(proxy_factory, scripted):
    """Finding 5 (raw SSE `{"error": ...}`): on an endpoint recorded raw, a new run's
    stream of an error event reaches the client, and the recorded success stays."""
    up = scripted({RAW_PATH: [sse([{"status": "ok", "text": "all good"}, "[DONE]"])]})
    first = proxy_factory(mode="auto")
    with http_client(first) as http:
        assert raw_stream(http, up.url) == "all good"
    first.stop()

    error = {"error": {"message": "the model failed", "type": "server_error", "code": 500}}
    up.script(RAW_PATH, [sse([error, "[DONE]"])])
    second = proxy_factory(mode="auto")
    with http_client(second) as http:
        assert raw_stream(http, up.url) == "error event"  # the client sees it live
    second.stop()
    up.stop()

    replay = proxy_factory(mode="replay")
    with http_client(replay) as http:
        assert raw_stream(http, up.url) == "all good"


@pytest.mark.parametrize("size", ["small", "spooled"])
def test_a_chat_stream_of_an_error_keeps_the_recorded_success(proxy_factory, scripted, size):
    """Finding 5 (a guard beside it: passes on main too): a chat stream whose event is
    an error, small or big enough to be written as it passes (spool.py), reaches the
    client and leaves the recorded successful stream as it was."""
    up = scripted({CHAT_PATH: [say("all good")]})
    first = proxy_factory(mode="auto")
    with http_client(first) as http:
        assert poll(http, up.url, stream=True) == "all good"
    first.stop()

    message = "the model failed" + (" (trace)" * 20_000 if size == "spooled" else "")
    error = {"error": {"message": message, "type": "server_error", "code": 500}}
    up.script(CHAT_PATH, [sse([error, "[DONE]"])])
    second = proxy_factory(mode="auto")
    with http_client(second) as http:
        assert poll(http, up.url, stream=True) == "error event"  # reaches the client
    second.stop()
    up.stop()

    replay = proxy_factory(mode="replay")
    with http_client(replay) as http:
        assert poll(http, up.url, stream=True) == "all good"


# ---- 6. every answer served from cassettes is shaped alike -------------------------------


def _fallback_setup(proxy_factory, scripted, path: str, pacing: str):
    """A recorded stream (~0.3 s between events), then the upstream goes away (the proxy
    still believes it up) or hangs (cassette_response_timeout_ms): the next request is
    answered from cassettes on the fallback path."""
    up = scripted({CHAT_PATH: [say("one two three"), hang()]})
    up.event_interval = 0.3
    options: dict[str, Any] = {"cassette_pacing": pacing}
    if path == "went away":
        options["cassette_probe_ttl_ms"] = 600_000  # the "up" verdict outlives the upstream
    else:
        options["cassette_response_timeout_ms"] = 800
    proxy = proxy_factory(mode="auto", options=options)
    client = openai_client(proxy, up.url)
    live = [c.model_dump() for c in client.chat.completions.create(**chat("shape me"),
                                                                    stream=True)]  # fmt: skip
    wait_for_files(proxy.cassette_dir, 1)
    if path == "went away":
        up.stop()
    return proxy, up, live


@pytest.mark.parametrize("path", ["went away", "hung"])
def test_cut_after_applies_when_auto_falls_back_to_cassettes(proxy_factory, scripted, path):
    """Finding 6 (cut-after): an answer served from cassettes because the upstream went
    away or hung is cut as the fault asks, as any replayed answer is."""
    proxy, up, live = _fallback_setup(proxy_factory, scripted, path, "off")
    client = openai_client(proxy, up.url, default_headers={"X-Cassette-Fault": "cut-after=1"})
    got = []
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        for chunk in client.chat.completions.create(**chat("shape me"), stream=True):
            got.append(chunk.model_dump())
    assert got == live[:1]
    assert "not applied" not in proxy.log_text()


@pytest.mark.parametrize("path", ["went away", "hung"])
def test_recorded_pacing_applies_when_auto_falls_back_to_cassettes(proxy_factory, scripted, path):
    """Finding 6 (pacing): with cassette_pacing=recorded, an answer served from cassettes
    because the upstream went away or hung comes at the recorded pace. The recorded
    first-to-last chunk spread is ~1.2 s; a lower bound only (a slow machine is slower)."""
    proxy, up, live = _fallback_setup(proxy_factory, scripted, path, "recorded")
    client = openai_client(proxy, up.url)
    arrivals, got = [], []
    for chunk in client.chat.completions.create(**chat("shape me"), stream=True):
        arrivals.append(time.monotonic())
        got.append(chunk.model_dump())
    assert got == live
    assert arrivals[-1] - arrivals[0] >= 0.6, arrivals


@pytest.mark.parametrize("mode", ["auto", "record"])
def test_a_status_fault_on_a_streamed_request_body_reaches_no_upstream(
    proxy_factory, upstream, tmp_path, mode
):
    """Finding 6 (status fault, streamed request body): with stream_large_bodies, a
    `status=503` fault is what the client gets, and the upstream sees nothing."""
    proxy = proxy_factory(mode=mode, options={"stream_large_bodies": "1k"})
    body = tmp_path / "big.json"
    body.write_text(json.dumps(chat("x" * 8192)))
    out = curl("-o", str(tmp_path / "answer"), "-w", "%{http_code}", "-x", proxy.url,
               "-H", "X-Cassette-Fault: status=503", "-H", "content-type: application/json",
               "--data-binary", f"@{body}", upstream.url + CHAT_PATH)  # fmt: skip
    assert out.stdout == "503", (out.stdout, (tmp_path / "answer").read_text()[:300])
    assert upstream.requests_to(CHAT_PATH) == []


# ---- 7. the key memo is keyed on everything that changes the key -------------------------


def test_the_same_body_with_and_without_a_credential_gets_two_keys(
    proxy_factory, upstream, tmp_path
):
    """Finding 7: the same body bytes sent anonymously, then with a bearer token that also
    appears in the body, are two requests (the token is scrubbed from the second's key);
    no orphan `<h>.2.json`, and both replay."""
    token = "tok-lifecycle-7f3a9c2e5b1d48aa"
    body = json.dumps(chat(f"remember {token} for me")).encode()
    kind = {"content-type": "application/json"}
    auth = {**kind, "authorization": f"Bearer {token}"}
    proxy = proxy_factory(mode="record")
    with http_client(proxy) as http:
        anonymous = http.post(upstream.url + CHAT_PATH, content=body, headers=kind)
        authorised = http.post(upstream.url + CHAT_PATH, content=body, headers=auth)
    assert anonymous.status_code == authorised.status_code == 200
    proxy.stop()
    upstream.stop()
    files = cassette_files(tmp_path / "cassettes")
    orphans = [p.name for p in files if not first_path(p).exists()]
    assert orphans == [], [p.name for p in files]
    replay = proxy_factory(mode="replay")
    with http_client(replay) as http:
        again = http.post(upstream.url + CHAT_PATH, content=body, headers=auth)
        assert again.status_code == 200, again.text
        assert http.post(upstream.url + CHAT_PATH, content=body, headers=kind).status_code == 200


# ---- 8. a new recording replaces only its own upstream's entry ---------------------------


def test_host_affinity_survives_a_recording_against_the_other_host(
    proxy_factory, upstream_factory, tmp_path
):
    """Finding 8: a folder with `serverA/<h>.json` and `serverB/<h>.json`; once server B's
    live answer is recorded, server A's request (A offline) is still answered by A's."""
    a, b = upstream_factory("A"), upstream_factory("B")
    merged = tmp_path / "merged"
    for up in (a, b):
        recorder = proxy_factory(mode="record", cassette_dir=tmp_path / up.tag)
        openai_client(recorder, up).chat.completions.create(**chat("who are you?"))
        wait_for_files(recorder.cassette_dir, 1)
        recorder.stop()
        shutil.copytree(recorder.cassette_dir, merged / f"server{up.tag}")
    a.stop()
    proxy = proxy_factory(mode="auto", cassette_dir=merged, options={"cassette_probe_ttl_ms": 0})
    live_b = openai_client(proxy, b).chat.completions.create(**chat("who are you?"))
    assert live_b.choices[0].message.content == answer_text("B", "who are you?")
    proxy.wait_for_log("auto recorded")
    from_a = openai_client(proxy, a).chat.completions.create(**chat("who are you?"))
    assert from_a.choices[0].message.content == answer_text("A", "who are you?")


# ---- 9. record-if-missing forwards a position that has no recording ----------------------


def test_record_if_missing_records_a_polling_sequence(proxy_factory, scripted, tmp_path):
    """Finding 9: in record-if-missing, a poll whose position has no recording is
    forwarded and recorded: the agent sees `running, running, done`, all three are
    written, and a second run replays them without the upstream."""
    up = scripted({CHAT_PATH: [say("running"), say("running"), say("done")]})
    proxy = proxy_factory(mode="record-if-missing")

    def curl_poll() -> str:
        out = curl("-x", proxy.url, "-H", "content-type: application/json",
                   "--data-binary", json.dumps(chat(POLL)), up.url + CHAT_PATH)  # fmt: skip
        return json.loads(out.stdout)["choices"][0]["message"]["content"]

    seen: list[str] = []
    while len(seen) < 5 and "done" not in seen:
        seen.append(curl_poll())
    assert seen == ["running", "running", "done"], seen
    assert len(up.requests_to(CHAT_PATH)) == 3
    proxy.stop()
    up.stop()
    assert [position_of(p) for p in sequence_files(tmp_path / "cassettes")] == [1, 2, 3]
    again = proxy_factory(mode="record-if-missing")
    with http_client(again) as http:
        assert [poll(http, up.url) for _ in range(3)] == ["running", "running", "done"]
    assert wait_until(lambda: again.log_text().count("record-if-missing hit") == 3)
