"""Agent-grade replay (issue 11.2, 11.3): faults on demand and recorded pacing.

A real mitmdump with the addon, the real openai SDK and httpx, fake upstreams on
loopback. Timing checks are generous lower bounds only (a recorded 300 ms gap replays
as at least 200 ms); accuracy is a benchmark figure (scripts/bench pacing), not a test.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from cassette_proxy.cassette import read_cassette
from cassette_proxy.faults import FaultError, api_family, parse_fault
from cassette_proxy.pacing import parse_pacing, schedule, split_events
from cassette_proxy.sequence import position_of
from conftest import cassette_files, openai_client, wait_for_files
from upstreams import answer_text, refused_port

pytest_plugins = ["pytester"]

SEED = Path(__file__).resolve().parent.parent / "cassettes" / "0806aef47037.json"
OFFLINE = f"http://127.0.0.1:{refused_port()}"  # a base URL nothing listens on


def chat(text: str, **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


def fault_client(proxy, fault: str | None = None, max_retries: int = 0) -> openai.OpenAI:
    """The openai SDK through the proxy at the offline upstream, sending a fault header."""
    headers = {"X-Cassette-Fault": fault} if fault else None
    client = openai_client(proxy, OFFLINE, default_headers=headers)
    return client.with_options(max_retries=max_retries)


def http_client(proxy) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, trust_env=False, timeout=30)


def arrivals(stream) -> list[float]:
    """Seconds from now until each chunk of an SDK stream arrived."""
    start = time.monotonic()
    return [time.monotonic() - start for _ in stream]


@pytest.fixture
def recorded(proxy_factory, upstream_factory, tmp_path):
    """Cassettes of one stream and one whole answer, recorded with known pacing:
    the first chunk after ~400 ms, then one every ~300 ms; the whole answer after ~400 ms."""
    up = upstream_factory("A", first_event_delay=0.4, event_interval=0.3, n_chunks=3)
    proxy = proxy_factory(mode="record")
    client = openai_client(proxy, up)
    live = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**chat("paced"), stream=True)
        if c.choices
    )
    up.configure(response_delay=0.4)  # the whole answer takes ~400 ms
    client.chat.completions.create(**chat("whole"))
    files = wait_for_files(tmp_path / "cassettes", 2)
    assert len(files) == 2
    proxy.stop()
    up.stop()
    return live


# ---- faults on demand ------------------------------------------------------------------


def test_status_fault_is_an_openai_error_with_retry_after(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto")
    with http_client(proxy) as client:
        got = client.post(
            upstream.url + "/v1/chat/completions",
            json=chat("rate limited"),
            headers={"X-Cassette-Fault": "status=429"},
        )
        assert got.status_code == 429
        assert got.headers["retry-after"] == "1"
        error = got.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "X-Cassette-Fault" in error["message"]
        bad_gateway = client.post(
            upstream.url + "/v1/embeddings",
            json={"model": "fake-embedding", "input": "x"},
            headers={"X-Cassette-Fault": "status=500"},
        )
        assert bad_gateway.status_code == 500 and "retry-after" not in bad_gateway.headers
        assert bad_gateway.json()["error"]["type"] == "server_error"
        # delay-ms alone lets the request through to the live upstream, without the header
        live = client.post(
            upstream.url + "/v1/chat/completions",
            json=chat("slow"),
            headers={"X-Cassette-Fault": "delay-ms=1"},
        )
        assert live.status_code == 200
    sent = upstream.requests_to("/v1/chat/completions")
    assert len(sent) == 1  # the 429 never reached the upstream
    assert "x-cassette-fault" not in sent[0].headers
    proxy.wait_for_log("fault POST /v1/chat/completions -> 429")


def test_status_fault_takes_each_familys_shape(proxy_factory):
    proxy = proxy_factory(mode="replay")
    with http_client(proxy) as client:
        ollama = client.post(
            OFFLINE + "/api/chat",
            json={"model": "llama3.2:3b", "messages": []},
            headers={"X-Cassette-Fault": "status=503"},
        )
        assert ollama.status_code == 503 and ollama.headers["retry-after"] == "1"
        assert isinstance(ollama.json()["error"], str)
        anthropic = client.post(
            OFFLINE + "/v1/messages",
            json={"model": "claude", "max_tokens": 5, "messages": []},
            headers={"X-Cassette-Fault": "status=429"},
        )
        assert anthropic.status_code == 429
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["type"] == "rate_limit_error"
    assert api_family("/v1/chat/completions") == "openai"


def test_openai_sdk_retries_a_429_then_gets_the_recording(proxy_factory, recorded):
    proxy = proxy_factory(mode="replay")
    # The first request of the test gets 429 (Retry-After: 1); the SDK's retry the answer.
    client = fault_client(proxy, "status=429,times=1", max_retries=2)
    answer = client.chat.completions.create(**chat("whole"))
    assert answer.choices[0].message.content == answer_text("A", "whole")
    log = proxy.wait_for_log("replay hit POST /v1/chat/completions")
    assert log.count("-> 429 (X-Cassette-Fault)") == 1

    # Without times=N every attempt fails: the SDK gives up after its retries.
    always = fault_client(proxy, "status=429", max_retries=1)
    with pytest.raises(openai.RateLimitError):
        always.chat.completions.create(**chat("whole"))
    assert proxy.log_text().count("-> 429 (X-Cassette-Fault)") == 3  # 1 + (1 try + 1 retry)


def test_delay_fault_waits_before_answering(proxy_factory, recorded):
    proxy = proxy_factory(mode="replay")
    client = fault_client(proxy, "delay-ms=400")
    start = time.monotonic()
    answer = client.chat.completions.create(**chat("whole"))
    assert time.monotonic() - start >= 0.3
    assert answer.choices[0].message.content == answer_text("A", "whole")


def test_cut_after_cuts_a_replayed_stream_abruptly(proxy_factory, recorded):
    proxy = proxy_factory(mode="replay")
    client = fault_client(proxy, "cut-after=2")
    got = []
    with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)):
        for chunk in client.chat.completions.create(**chat("paced"), stream=True):
            got.append(chunk)
    assert len(got) == 2  # exactly the first two chunks, then the connection is cut
    # The next request is whole again (another connection from the same client).
    whole = fault_client(proxy).chat.completions.create(**chat("paced"), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in whole if c.choices)
    assert text == recorded
    proxy.wait_for_log("cut after 2 chunk(s)")


def test_cut_after_cuts_a_whole_answer_mid_body(proxy_factory, recorded):
    proxy = proxy_factory(mode="replay")
    with http_client(proxy) as client, pytest.raises(httpx.RemoteProtocolError):
        client.post(
            OFFLINE + "/v1/chat/completions",
            json=chat("whole"),
            headers={"X-Cassette-Fault": "cut-after=0"},
        )
    with pytest.raises(openai.APIConnectionError):
        fault_client(proxy, "cut-after=1").chat.completions.create(**chat("whole"))
    proxy.wait_for_log("cut mid-body")


def test_a_bad_fault_header_is_a_400_that_names_it(proxy_factory, upstream):
    proxy = proxy_factory(mode="auto")
    with http_client(proxy) as client:
        for value in ("status=abc", "status=200", "wobble=1", "cut-after=1,status=500", "times=2"):
            got = client.post(
                upstream.url + "/v1/chat/completions",
                json=chat("bad"),
                headers={"X-Cassette-Fault": value},
            )
            assert got.status_code == 400, value
            assert got.json()["error"]["param"] == "X-Cassette-Fault"
            assert "X-Cassette-Fault" in got.json()["error"]["message"]
    assert upstream.requests_to("/v1/chat/completions") == []  # nothing went upstream
    assert cassette_files(proxy.cassette_dir) == []  # and nothing was recorded


def test_parse_fault_reads_every_kind_and_refuses_the_rest() -> None:
    fault = parse_fault(" status=503 , delay-ms=20, times=2 ")
    assert (fault.status, fault.delay_ms, fault.cut_after, fault.times) == (503, 20, None, 2)
    assert parse_fault("cut-after=0").cut_after == 0
    assert parse_fault("") is None
    for bad in ("status", "status=99", "status=600", "delay-ms=-1", "x=1", "status=429,status=500"):
        with pytest.raises(FaultError):
            parse_fault(bad)


# ---- the pytest marker -------------------------------------------------------------------

INNER = """
import openai, pytest

@pytest.mark.cassette_fault("status=429", "times=1")
def test_retry_logic(cassette_openai_client):
    # max_retries=2 (the SDK's default): the first answer is a 429, the retry succeeds.
    answer = cassette_openai_client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "retry"}]
    )
    assert answer.choices[0].message.content == "[A] echo: retry"

@pytest.mark.cassette_fault("status=503")
def test_gives_up(cassette_openai_client):
    with pytest.raises(openai.InternalServerError):
        cassette_openai_client.with_options(max_retries=1).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "retry"}]
        )

def test_no_marker_no_fault(cassette_headers):
    assert "X-Cassette-Fault" not in cassette_headers
"""


def test_pytest_marker_sets_the_fault_per_test(pytester, upstream, tmp_path):
    pytester.makeini(
        f"""
        [pytest]
        cassette_dir = {tmp_path / "cassettes"}
        cassette_mode = auto
        cassette_openai_base_url = {upstream.url}/v1
        """
    )
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    # The retry was forwarded (and recorded); the faults never reached the upstream.
    assert len(upstream.requests_to("/v1/chat/completions")) == 1


# ---- recorded pacing ---------------------------------------------------------------------


def test_recorded_timing_is_an_extra_field_beside_the_body(recorded, tmp_path):
    files = {p: json.loads(p.read_text()) for p in cassette_files(tmp_path / "cassettes")}
    stream = next(d for d in files.values() if d["response"]["is_streaming"])
    whole = next(d for d in files.values() if not d["response"]["is_streaming"])
    assert list(stream["response"]) == ["body", "is_streaming", "timing"]
    chunks = stream["response"]["timing"]["chunks_ms"]
    assert len(chunks) == len(stream["response"]["body"]) + 1  # the chunks and [DONE]
    assert chunks == sorted(chunks) and chunks[0] >= 300  # first chunk after ~400 ms
    assert all(b - a >= 200 for a, b in zip(chunks, chunks[1:], strict=False))  # ~300 ms
    assert whole["response"]["timing"]["total_ms"] >= 300  # the upstream took ~400 ms
    for path, doc in files.items():
        # Written as the format writes every file; our reader (and llama-stack's, which
        # takes response.body) sees the same body as before.
        assert path.read_text() == json.dumps(doc, indent=2) + "\n"
        assert read_cassette(path).response.body == doc["response"]["body"]


def test_normalized_recordings_keep_no_timing(proxy_factory, upstream, tmp_path):
    proxy = proxy_factory(mode="record", options={"cassette_normalize": True})
    list(openai_client(proxy, upstream).chat.completions.create(**chat("n"), stream=True))
    [path] = wait_for_files(tmp_path / "cassettes", 1)
    assert "timing" not in json.loads(path.read_text())["response"]


def test_recorded_pacing_is_replayed(proxy_factory, recorded):
    proxy = proxy_factory(mode="replay", options={"cassette_pacing": "recorded"})
    times = arrivals(fault_client(proxy).chat.completions.create(**chat("paced"), stream=True))
    assert times[0] >= 0.25  # recorded ~400 ms to the first chunk
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) >= 2 and all(g >= 0.2 for g in gaps)  # recorded ~300 ms apart
    start = time.monotonic()
    whole = fault_client(proxy).chat.completions.create(**chat("whole"))
    assert time.monotonic() - start >= 0.3  # sent after its recorded ~400 ms
    assert whole.choices[0].message.content == answer_text("A", "whole")
    proxy.wait_for_log("paced x1")


def test_a_speed_factor_and_a_cut_combine(proxy_factory, recorded):
    proxy = proxy_factory(mode="replay", options={"cassette_pacing": "2"})
    times = arrivals(fault_client(proxy).chat.completions.create(**chat("paced"), stream=True))
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g >= 0.1 for g in gaps)  # 300 ms twice as fast: ~150 ms
    got = []
    with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)):
        for chunk in fault_client(proxy, "cut-after=1").chat.completions.create(
            **chat("paced"), stream=True
        ):
            got.append(chunk)
    assert len(got) == 1
    proxy.wait_for_log("cut after 1 chunk(s), paced x2")


def test_pacing_off_and_cassettes_without_timing_replay_unpaced(proxy_factory, tmp_path):
    folder = tmp_path / "seed"
    folder.mkdir()
    shutil.copy(SEED, folder / SEED.name)
    assert "timing" not in json.loads(SEED.read_text())["response"]
    proxy = proxy_factory(mode="replay", cassette_dir=folder, options={"cassette_pacing": "1"})
    seed = json.loads(SEED.read_text())
    body = seed["request"]["body"]
    with http_client(proxy) as client:
        got = client.post(OFFLINE + "/v1/chat/completions", json=body)
    assert got.status_code == 200, got.text
    assert got.text.count("data: ") == len(seed["response"]["body"]) + 1
    assert "shaped replay" not in proxy.log_text()  # no timing: sent whole, as today


def test_cassette_pacing_is_validated(tmp_path, mitmdump_bin, repo_root):
    result = subprocess.run(
        [str(mitmdump_bin), "-s", str(repo_root / "addons" / "recorder.py"),
         "--listen-host", "127.0.0.1", "--listen-port", "0",
         "--set", f"confdir={tmp_path}", "--set", "cassette_pacing=fast"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "cassette_pacing must be off, recorded or a speed factor" in result.stdout


def test_schedule_keeps_every_byte_and_the_recorded_times() -> None:
    body = b": keep-alive\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert b"".join(e for e, _ in split_events(body, "text/event-stream")) == body
    timing = {"chunks_ms": [100.0, 400.0, 700.0], "total_ms": 710.0}
    pieces = schedule(body, "text/event-stream", timing, 2.0, streamed=True)
    assert b"".join(p.data for p in pieces) == body
    assert [p.at for p in pieces] == [0.05, 0.2, 0.35]  # the comment rides with chunk 1
    assert [p.at for p in schedule(body, "text/event-stream", None, 1.0, True)] == [0, 0, 0]
    assert schedule(b"{}", "application/json", timing, 1.0, streamed=False)[0].at == 0.71
    assert parse_pacing("off") is None and parse_pacing("recorded") == 1.0
    for bad in ("fast", "0", "-1", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_pacing(bad)


# ---- identical requests answered in recorded order -----------------------------------------

TEST_ID = "tests/test_agent.py::test_polls_the_job"


def poll(client: httpx.Client, base: str, test_id: str = TEST_ID, stream: bool = False):
    """One "is the job done?" request; its answer's text and the file that served it."""
    body = chat("is the job done?", stream=stream)
    got = client.post(base + "/v1/chat/completions", json=body,
                      headers={"X-Cassette-Test-Id": test_id})  # fmt: skip
    assert got.status_code == 200, got.text
    if stream:
        events = [json.loads(line[6:]) for line in got.text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
        )
    else:
        text = got.json()["choices"][0]["message"]["content"]
    return text.split("]")[0] + "]", got.headers.get("x-cassette-file")


def record_polls(proxy_factory, upstream, tags: list[str], stream: bool = False) -> None:
    proxy = proxy_factory(mode="record")
    with http_client(proxy) as client:
        for tag in tags:
            upstream.configure(tag=tag)
            poll(client, upstream.url, stream=stream)
    proxy.stop()


def test_repeated_requests_replay_in_recorded_order_then_the_last_repeats(
    proxy_factory, upstream, tmp_path
):
    record_polls(proxy_factory, upstream, ["A", "B", "C"])
    files = [p.name for p in sorted(cassette_files(tmp_path / "cassettes"), key=position_of)]
    first = files[0].removesuffix(".json")
    assert files == [f"{first}.json", f"{first}.2.json", f"{first}.3.json"]
    folder = next(p.parent for p in cassette_files(tmp_path / "cassettes"))
    # The first answer is in llama-stack's own file for the request.
    assert json.loads((folder / f"{first}.json").read_text())["response"]["body"]["__data__"][
        "choices"][0]["message"]["content"].startswith("[A]")  # fmt: skip

    proxy = proxy_factory(mode="replay")
    with http_client(proxy) as client:
        got = [poll(client, OFFLINE) for _ in range(5)]
        other_test = poll(client, OFFLINE, test_id=TEST_ID + "[other]")
    assert [text for text, _ in got] == ["[A]", "[B]", "[C]", "[C]", "[C]"]
    assert [Path(file).name for _, file in got[:3]] == files  # x-cassette-file names it
    assert other_test[0] == "[A]"  # another test id starts at the first (unscoped fallback)
    log = proxy.log_text()
    assert f"-> {Path(got[1][1])}" in log or f"{first}.2.json" in log


def test_a_new_recording_run_replaces_the_old_sequence_whole(proxy_factory, upstream, tmp_path):
    record_polls(proxy_factory, upstream, ["A", "B", "C"], stream=True)
    assert len(cassette_files(tmp_path / "cassettes")) == 3
    record_polls(proxy_factory, upstream, ["D", "E"], stream=True)
    names = [p.name for p in sorted(cassette_files(tmp_path / "cassettes"), key=position_of)]
    assert len(names) == 2 and names[1].endswith(".2.json")  # no stale third answer
    proxy = proxy_factory(mode="replay")
    with http_client(proxy) as client:
        got = [poll(client, OFFLINE, stream=True)[0] for _ in range(3)]
    assert got == ["[D]", "[E]", "[E]"]


def test_a_run_that_never_repeats_writes_what_it_wrote_before(proxy_factory, upstream, tmp_path):
    record_polls(proxy_factory, upstream, ["A"])
    [path] = cassette_files(tmp_path / "cassettes")
    assert len(path.name) == len("0" * 64 + ".json")  # the request hash, nothing more
    # And identical requests in flight at the same time stay one answer (as before).
    proxy = proxy_factory(mode="record")
    upstream.configure(response_delay=0.3)

    async def together() -> None:
        async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=30) as client:
            body = chat("same time")
            await asyncio.gather(*(client.post(upstream.url + "/v1/chat/completions", json=body)
                                   for _ in range(5)))  # fmt: skip

    asyncio.run(together())
    proxy.stop()
    assert not [p for p in cassette_files(tmp_path / "cassettes") if p.name.count(".") > 1]


def test_parallel_identical_replays_take_the_answers_in_arrival_order(
    proxy_factory, upstream, tmp_path
):
    record_polls(proxy_factory, upstream, ["A", "B", "C"])
    proxy = proxy_factory(mode="replay")

    async def together() -> list[str]:
        async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=30) as client:
            body = chat("is the job done?")
            answers = await asyncio.gather(*(
                client.post(OFFLINE + "/v1/chat/completions", json=body,
                            headers={"X-Cassette-Test-Id": TEST_ID})
                for _ in range(3)
            ))  # fmt: skip
        return sorted(a.json()["choices"][0]["message"]["content"][:3] for a in answers)

    assert asyncio.run(together()) == ["[A]", "[B]", "[C]"]  # each answer once


def test_ls_show_and_verify_know_the_later_answers(proxy_factory, upstream, tmp_path):
    from cassette_proxy.cli import cli
    from click.testing import CliRunner

    record_polls(proxy_factory, upstream, ["A", "B"])
    folder = str(tmp_path / "cassettes")
    listed = CliRunner().invoke(cli, ["ls", "-d", folder, "--json"], catch_exceptions=False)
    rows = [json.loads(line) for line in listed.output.splitlines()]  # JSON lines
    assert len(rows) == 2 and any(".2.json" in json.dumps(row) for row in rows)
    checked = CliRunner().invoke(cli, ["verify", "-d", folder], catch_exceptions=False).output
    assert "does not match" not in checked
    [first] = [p for p in cassette_files(folder) if position_of(p) == 1]
    stem = first.name.removesuffix(".json")
    for target, position in ((stem, 1), (stem + ".2", 2)):  # a name picks its own answer
        shown = CliRunner().invoke(cli, ["show", target, "-d", folder], catch_exceptions=False)
        assert f"answer    {position} of 2 (identical requests" in shown.output, shown.output
    as_json = CliRunner().invoke(cli, ["show", stem + ".2", "-d", folder, "--json"])
    assert json.loads(as_json.output)["answer"] == {"position": 2, "of": 2}


# ---- through HTTPS, HTTP/2 and reverse mode ------------------------------------------------


def test_cut_and_pacing_work_over_https_http2_and_in_reverse_mode(
    proxy_factory, tls_upstream, upstream_factory
):
    import ssl

    proxy = proxy_factory(
        mode="record", options={"ssl_verify_upstream_trusted_ca": str(tls_upstream.cert)}
    )
    verify = ssl.create_default_context(cafile=str(proxy.ca_cert))
    base = f"https://localhost:{tls_upstream.port}/v1"
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=30) as h:
        sdk = openai.OpenAI(base_url=base, api_key="sk-x", http_client=h, max_retries=0)
        live = [c.model_dump() for c in sdk.chat.completions.create(**chat("tls"), stream=True)]
    proxy.stop()
    tls_upstream.stop()
    replay = proxy_factory(mode="replay", options={"cassette_pacing": "recorded"})
    for http2 in (False, True):
        with httpx.Client(
            proxy=replay.url, verify=verify, trust_env=False, timeout=30, http2=http2
        ) as h:
            sdk = openai.OpenAI(base_url=base, api_key="sk-x", http_client=h, max_retries=0)
            again = [
                c.model_dump() for c in sdk.chat.completions.create(**chat("tls"), stream=True)
            ]
            assert again == live
            cut = sdk.with_options(max_retries=0).chat.completions.create(
                **chat("tls"), stream=True, extra_headers={"X-Cassette-Fault": "cut-after=1"}
            )
            got = []
            with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
                for chunk in cut:
                    got.append(chunk)
            assert len(got) == 1

    # Reverse mode: the proxy is the upstream's address.
    up = upstream_factory("R")
    recorder = proxy_factory(mode="record", reverse=up.url)
    sdk = openai_client(None, recorder)
    live = [c.model_dump() for c in sdk.chat.completions.create(**chat("rev"), stream=True)]
    recorder.stop()
    up.stop()
    reverse = proxy_factory(mode="replay", reverse=up.url, options={"cassette_pacing": "2"})
    sdk = openai_client(None, reverse)
    assert [c.model_dump() for c in sdk.chat.completions.create(**chat("rev"), stream=True)] == live
    cut = sdk.chat.completions.create(
        **chat("rev"), stream=True, extra_headers={"X-Cassette-Fault": "cut-after=0"}
    )
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        list(cut)


def test_sequence_names_and_positions() -> None:
    from types import SimpleNamespace

    from cassette_proxy.sequence import SequenceIndex, first_path, sibling_path

    first = Path("/c/t/0806aef47037.json")
    assert sibling_path(first, 1) == first
    assert sibling_path(first, 3) == Path("/c/t/0806aef47037.3.json")
    assert [position_of(sibling_path(first, n)) for n in (1, 2, 10)] == [1, 2, 10]
    assert first_path(sibling_path(first, 10)) == first
    # Hand-named files are never taken for a later answer.
    assert position_of(Path("chat.2.json")) == 1 and position_of(Path("x.json")) == 1
    index = SequenceIndex()
    head = SimpleNamespace(path=first)
    for n in (2, 4):  # 3 is missing: the sequence ends at 2, answers are never skipped
        index.add(SimpleNamespace(path=sibling_path(first, n)))
    assert index.length(first) == 2
    assert [index.at(head, n).path.name for n in (1, 2, 3, 9)] == [
        "0806aef47037.json", "0806aef47037.2.json", "0806aef47037.2.json", "0806aef47037.2.json",
    ]  # fmt: skip


def test_the_pacing_benchmark_runs(tmp_path):
    """``scripts/bench --only pacing`` end to end (smoke size; no timing asserted)."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(bench), "--smoke", "--only", "pacing", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["pacing"]["rows"]
    assert {r["host"] for r in rows} == {"lean+recorder", "mitmdump+recorder"}
    assert all(r["gaps"]["n"] > 0 and r["first_chunk"]["n"] > 0 for r in rows)


def test_after_the_upstream_goes_down_the_sequence_goes_on(proxy_factory, upstream):
    """auto mode: two polls recorded live, then the upstream dies: the third poll gets
    the last recorded answer, not the first again (the job does not start over)."""
    proxy = proxy_factory(mode="auto")
    with http_client(proxy) as client:
        for tag in ("A", "B"):
            upstream.configure(tag=tag)
            poll(client, upstream.url)
        wait_for_files(proxy.cassette_dir, 2)
        upstream.stop()
        later = [poll(client, upstream.url) for _ in range(2)]
    assert [text for text, _ in later] == ["[B]", "[B]"]
    assert all(file.endswith(".2.json") for _, file in later)


def test_repeats_of_a_request_with_a_query_are_kept_in_order(proxy_factory, upstream, tmp_path):
    """The n-th answer's file is named after the same first file the recording uses
    (the query is part of the name), so Azure-style ``?api-version=`` calls keep every
    answer instead of overwriting the first."""
    proxy = proxy_factory(mode="record")
    with http_client(proxy) as client:
        for tag in ["A", "B"]:
            upstream.configure(tag=tag)
            got = client.post(upstream.url + "/v1/chat/completions?api-version=2024-10-21",
                              json=chat("versioned"), headers={"X-Cassette-Test-Id": TEST_ID})
            assert got.status_code == 200
    proxy.stop()
    names = sorted(p.name for p in cassette_files(tmp_path / "cassettes"))
    assert len(names) == 2 and names[0].count(".") == 2  # <hash>.2.json sorts first

    replay = proxy_factory(mode="replay")
    with http_client(replay) as client:
        texts = []
        for _ in range(3):
            got = client.post(OFFLINE + "/v1/chat/completions?api-version=2024-10-21",
                              json=chat("versioned"), headers={"X-Cassette-Test-Id": TEST_ID})
            assert got.status_code == 200, got.text
            texts.append(got.json()["choices"][0]["message"]["content"].split("]")[0] + "]")
    assert texts == ["[A]", "[B]", "[B]"]


def test_a_rescan_keeps_later_answers_out_of_the_index(proxy_factory, upstream, tmp_path):
    """A later answer copied into a running proxy's folder (or one whose first answer is
    not there) never reorders the index nor breaks a lookup."""
    from cassette_proxy.store import CassetteStore

    record_polls(proxy_factory, upstream, ["A", "B"])
    folder = next(p.parent for p in cassette_files(tmp_path / "cassettes"))
    first, second = sorted(cassette_files(folder), key=position_of)
    store = CassetteStore(tmp_path / "cassettes")
    store.load()
    orphan = folder / ("f" * 64 + ".2.json")
    shutil.copy(second, orphan)  # a later answer without its first
    second.unlink()
    store._scanned_at = 0.0  # the rescan is rate-limited; let this one through
    assert store.refresh()
    entries = [e for es in store._index.values() for e in es]
    assert [e.path.name for e in entries] == [first.name]
    assert store.sequences.length(first) == 1  # the deleted later answer is forgotten


def test_a_later_answer_deleted_while_the_proxy_runs_gives_the_last_one_left(
    proxy_factory, upstream, tmp_path
):
    record_polls(proxy_factory, upstream, ["A", "B", "C"])
    files = sorted(cassette_files(tmp_path / "cassettes"), key=position_of)
    proxy = proxy_factory(mode="replay")
    files[2].unlink()  # <hash>.3.json, after the proxy indexed it
    with http_client(proxy) as client:
        got = [poll(client, OFFLINE)[0] for _ in range(4)]
    assert got == ["[A]", "[B]", "[B]", "[B]"]
    proxy.wait_for_log("is no longer served")
