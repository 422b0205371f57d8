"""Big recordings that must not stall the proxy (issue 12), end to end: a real mitmdump
with the addon, the fake OpenAI upstream, the openai SDK and raw sockets.

A big stream is written as it passes (spool.py): its cassette is byte for byte what the
whole-cassette writer writes for the same content, it is in place when ``data: [DONE]``
reaches the client, it replays, and a stream cut short leaves neither a cassette nor a
temp file. No timing asserts: only what is on disk and what the client got.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from cassette_proxy.cassette import TEMP_PREFIX, read_cassette, write_cassette
from conftest import HOST, cassette_files, openai_client

# Enough chunks for the stream's event data to pass spool.SPOOL_BYTES (128 KiB) early on.
PROMPT = "".join(f"word{i} " for i in range(1200))  # ~8,000 characters, echoed back
N_CHUNKS = 4000
SECRET = "sk-live-spool-secret-0123456789"


def big_stream(client: Any, prompt: str = PROMPT, **kwargs: Any) -> tuple[str, list[Any]]:
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            **kwargs,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def temp_files(folder: Path) -> list[Path]:
    return list(folder.rglob(f"{TEMP_PREFIX}*"))


def only_cassette(folder: Path) -> Path:
    files = cassette_files(folder)
    assert len(files) == 1, files
    return files[0]


def assert_whole_writer_text(path: Path, tmp_path: Path) -> None:
    """The file is what write_cassette (the whole-cassette writer) writes for its content."""
    again = tmp_path / "rewritten.json"
    write_cassette(again, read_cassette(path), durable=False)
    assert path.read_bytes() == again.read_bytes()
    doc = json.loads(path.read_bytes())
    assert path.read_text() == json.dumps(doc, indent=2) + "\n"


def test_a_big_stream_is_recorded_as_it_passes_byte_exact_and_replays(
    proxy_factory, upstream_factory, tmp_path
):
    up = upstream_factory("A", n_chunks=N_CHUNKS)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record", options={"termlog_verbosity": "debug"})
    text, chunks = big_stream(openai_client(proxy, up))
    assert text == f"[A] echo: {PROMPT}"
    path = only_cassette(folder)
    assert "stream not written as it passed" not in proxy.log_text()
    assert "no longer written as it passes" not in proxy.log_text()
    assert_whole_writer_text(path, tmp_path)
    cassette = read_cassette(path)
    body = cassette.response.body
    assert len(body) == len(chunks) > 2000
    assert [c["__data__"] for c in body] == [c.model_dump(exclude_unset=True) for c in chunks]
    assert "timing" in cassette.response.model_dump()  # recorded pacing, after the chunks
    assert temp_files(folder) == []
    proxy.stop()

    replay = proxy_factory(mode="replay")
    again, replayed = big_stream(openai_client(replay, up))
    assert again == text
    assert [c.model_dump() for c in replayed] == [c.model_dump() for c in chunks]
    assert "hit" in replay.log_text()


def with_long_digit_id(obj: Any) -> Any:
    """A chunk id with a run of 19 digits, as uuid4 hex gives about once in 1,000."""
    if isinstance(obj, dict) and "id" in obj:
        obj = {**obj, "id": "chatcmpl-6744961469434386963b0837"}
    return obj


def test_a_big_stream_whose_id_holds_a_long_digit_run_is_still_written_as_it_passes(
    proxy_factory, upstream_factory, tmp_path
):
    """19+ digits inside a string are no integer orjson could misread: the spool keeps
    them (it once gave up on such a stream and left it to the whole writer)."""
    up = upstream_factory("A", n_chunks=N_CHUNKS, reshape=with_long_digit_id)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record", options={"termlog_verbosity": "debug"})
    text, chunks = big_stream(openai_client(proxy, up))
    assert {c.id for c in chunks} == {"chatcmpl-6744961469434386963b0837"}
    path = only_cassette(folder)
    assert "stream not written as it passed" not in proxy.log_text()
    assert "no longer written as it passes" not in proxy.log_text()
    assert_whole_writer_text(path, tmp_path)
    body = read_cassette(path).response.body
    assert [c["__data__"] for c in body] == [c.model_dump(exclude_unset=True) for c in chunks]


def test_a_big_stream_s_cassette_is_in_place_when_done_reaches_the_client(
    proxy_factory, upstream_factory, tmp_path
):
    up = upstream_factory("A", n_chunks=N_CHUNKS, done_tail_delay=0.5)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record")
    body = json.dumps({"model": "fake-model", "stream": True,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()  # fmt: skip
    request = (
        f"POST {up.url}/v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{up.port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    received = b""
    seen_at_done = None
    with socket.create_connection((HOST, proxy.port), timeout=60) as s:
        s.sendall(request)
        while not received.endswith(b"0\r\n\r\n"):
            data = s.recv(1 << 16)
            if not data:
                break
            received += data
            if seen_at_done is None and b"data: [DONE]" in received:
                seen_at_done = [(p, p.read_bytes()) for p in cassette_files(folder)]
    assert seen_at_done is not None and len(seen_at_done) == 1
    path, text = seen_at_done[0]
    assert text == path.read_bytes()  # whole at that moment, not written any further
    assert len(read_cassette(path).response.body) > 2000


def test_a_big_stream_with_secrets_and_normalisation_matches_the_whole_writer(
    proxy_factory, upstream_factory, tmp_path
):
    """The key in every chunk (scrubbed chunk by chunk) and the ids normalised."""
    up = upstream_factory("A", n_chunks=N_CHUNKS)
    up.configure(reshape=lambda event: {**event, "system_fingerprint": f"fp {SECRET} fp"})
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(
        mode="record", options={"cassette_normalize": True, "termlog_verbosity": "debug"}
    )
    text, _ = big_stream(openai_client(proxy, up, api_key=SECRET))
    assert text == f"[A] echo: {PROMPT}"
    path = only_cassette(folder)
    raw = path.read_text()
    assert SECRET not in raw
    assert "stream not written as it passed" not in proxy.log_text()
    assert_whole_writer_text(path, tmp_path)
    body = read_cassette(path).response.body
    assert {c["__data__"]["system_fingerprint"] for c in body} == {"fp REDACTED fp"}
    assert {c["__data__"]["id"] for c in body} == {body[0]["__data__"]["id"]}
    assert body[0]["__data__"]["id"].startswith("rec-")
    assert {c["__data__"]["created"] for c in body} == {0}
    assert temp_files(folder) == []


def test_a_secret_split_across_chunks_of_a_big_stream_is_scrubbed(
    proxy_factory, upstream_factory, tmp_path
):
    """The upstream echoes the key one piece per chunk: the spool gives up and the
    stream is scrubbed as a whole at its end, as a small stream is."""
    up = upstream_factory("A", n_chunks=N_CHUNKS)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record", options={"termlog_verbosity": "debug"})
    prompt = PROMPT + f" my key is {SECRET} " + PROMPT
    text, _ = big_stream(openai_client(proxy, up, api_key=SECRET), prompt=prompt)
    assert SECRET in text  # the client got the answer as it came
    path = only_cassette(folder)
    assert SECRET not in path.read_text()
    assert "stream no longer written as it passes: a secret in the stream" in proxy.log_text()
    assert_whole_writer_text(path, tmp_path)
    recorded = "".join(
        c["__data__"]["choices"][0]["delta"].get("content") or ""
        for c in read_cassette(path).response.body
        if c["__data__"]["choices"]
    )
    assert recorded == f"[A] echo: {PROMPT} my key is REDACTED {PROMPT}"
    assert temp_files(folder) == []


def test_a_big_stream_cut_midway_leaves_no_cassette_and_no_temp_file(
    proxy_factory, upstream_factory, tmp_path
):
    up = upstream_factory("A", n_chunks=N_CHUNKS, fail_mode="cut", cut_after=3000)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record")
    client = openai_client(proxy, up)
    got = 0
    try:
        for _ in client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": PROMPT}], stream=True
        ):
            got += 1
    except Exception:  # noqa: BLE001 - the SDK reports the cut its own way
        pass
    assert got >= 1000  # the spool had started (its data was past SPOOL_BYTES)
    proxy.wait_for_log("stream cut short", timeout=30)
    assert cassette_files(folder) == []
    assert temp_files(folder) == []


def test_a_proxy_killed_mid_stream_leaves_a_temp_file_the_next_start_removes(
    proxy_factory, upstream_factory, tmp_path
):
    up = upstream_factory("A", n_chunks=N_CHUNKS, event_interval=0.002)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record")
    client = openai_client(proxy, up, timeout=10)
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    deadline = time.monotonic() + 60
    for _ in stream:
        if temp_files(folder) or time.monotonic() > deadline:
            break
    assert len(temp_files(folder)) == 1  # the stream's cassette, being written
    proxy.kill9()
    stream.close()
    assert cassette_files(folder) == []
    again = proxy_factory(mode="record")
    again.wait_for_log("removed 1 unfinished temp file(s)")
    assert temp_files(folder) == []


# ---- a big whole answer: recorded in the worker process (writer.py) -------------------


def padded(obj: dict[str, Any]) -> dict[str, Any]:
    """An answer over writer.OFFLOAD_BYTES (256 KiB): non-ASCII text, small floats, and
    the request's key echoed (it must not reach the cassette)."""
    rows = [{"i": i, "t": "caf\u00e9 \U0001f600 tok", "f": -i * 1e-7} for i in range(8000)]
    return {**obj, "system_fingerprint": f"fp {SECRET} fp", "padding": rows}


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the worker, multiprocessing's tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def worker_pids(proxy: Any) -> list[int]:
    pids = []
    for pid in children(proxy.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(check: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def big_answer(client: Any, prompt: str) -> Any:
    return client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": prompt}]
    )


def test_a_big_json_answer_is_recorded_in_the_worker_byte_exact_and_replays(
    proxy_factory, upstream_factory, tmp_path
):
    up = upstream_factory("A", reshape=padded)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record", options={"cassette_normalize": True})
    live = big_answer(openai_client(proxy, up, api_key=SECRET), "big one")
    assert live.system_fingerprint == f"fp {SECRET} fp"  # the client got it as it came
    assert worker_pids(proxy)  # recorded in the worker process
    path = only_cassette(folder)
    raw = path.read_text()
    assert SECRET not in raw
    assert_whole_writer_text(path, tmp_path)
    response = read_cassette(path).response.model_dump()
    data = response["body"]["__data__"]
    assert response["body"]["__type__"] == "openai.types.chat.chat_completion.ChatCompletion"
    assert data["system_fingerprint"] == "fp REDACTED fp"
    assert data["id"].startswith("rec-") and data["created"] == 0  # cassette_normalize
    assert data["padding"] == padded({})["padding"]
    assert data["choices"] == [c.model_dump(exclude_unset=True) for c in live.choices]
    assert temp_files(folder) == []
    assert "FAILED" not in proxy.log_text()
    proxy.stop()

    replay = proxy_factory(mode="replay")
    again = big_answer(openai_client(replay, up, api_key=SECRET), "big one")
    assert again.choices == live.choices
    assert again.model_dump()["padding"] == padded({})["padding"]
    assert again.system_fingerprint == "fp REDACTED fp"


def test_a_big_json_answer_reaches_the_client_when_the_worker_dies(
    proxy_factory, upstream_factory, tmp_path
):
    up = upstream_factory("A", reshape=padded)
    folder = tmp_path / "cassettes"
    proxy = proxy_factory(mode="record")
    client = openai_client(proxy, up)
    big_answer(client, "first")
    assert len(cassette_files(folder)) == 1
    workers = worker_pids(proxy)
    assert len(workers) == 1
    import os
    import signal

    os.kill(workers[0], signal.SIGKILL)  # the OOM killer, say
    assert wait_until(lambda: not alive(workers[0]))
    second = big_answer(client, "second")
    assert second.model_dump()["padding"] == padded({})["padding"]  # the whole answer
    proxy.wait_for_log("FAILED to record")
    assert "the recording worker process died" in proxy.log_text()
    assert len(cassette_files(folder)) == 1  # none for the second
    assert temp_files(folder) == []
    big_answer(client, "third")  # a new worker
    assert len(cassette_files(folder)) == 2
    assert temp_files(folder) == []


def test_the_worker_process_ends_with_the_proxy(proxy_factory, upstream_factory, tmp_path):
    up = upstream_factory("A", reshape=padded)
    proxy = proxy_factory(mode="record")
    big_answer(openai_client(proxy, up), "stopped")
    workers = worker_pids(proxy)
    assert workers
    proxy.stop()
    assert wait_until(lambda: not any(alive(p) for p in workers))

    killed = proxy_factory(mode="record")
    big_answer(openai_client(killed, up), "killed")
    workers = worker_pids(killed)
    assert workers
    killed.kill9()
    assert wait_until(lambda: not any(alive(p) for p in workers))  # no orphan left


def test_the_worker_writes_what_the_proxy_writes_for_a_small_answer(tmp_path):
    """writer.record_whole against the steps of the proxy's own path (``_new_cassette``,
    ``write_cassette``), in-process: the same bytes, the same refusals."""
    from cassette_proxy.cassette import plain
    from cassette_proxy.families import classify
    from cassette_proxy.pacing import with_timing
    from cassette_proxy.recording import DEFAULT_RECORDED_ERRORS, new_recording, whole_response
    from cassette_proxy.redact import redact_answer
    from cassette_proxy.stable import normalize_response
    from cassette_proxy.writer import WholeAnswer, record_whole

    path = "/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    secrets = frozenset({SECRET})
    answer = padded({"id": "chatcmpl-1", "object": "chat.completion", "created": 5,
                     "model": "m", "choices": []})  # fmt: skip
    content = json.dumps(answer).encode()
    where = {"method": "POST", "path": path, "body": body, "test_id": "t",
             "url": "http://h:1/v1/chat/completions", "headers": {}}  # fmt: skip

    def job(content: bytes, status: int = 200, digest: str | None = None) -> WholeAnswer:
        stand_in = redact_answer({"body": None, "is_streaming": False}, secrets)
        _, frame = new_recording(tmp_path, **where, response=stand_in)
        return WholeAnswer(content, status, "POST", path, body, DEFAULT_RECORDED_ERRORS,
                           plain(frame), secrets, digest, {"total_ms": 1e-05},
                           temp=str(tmp_path / "out.partial"))  # fmt: skip

    for digest in (None, "ab" * 32):
        response = whole_response(classify("POST", path), path, body, 200, answer)
        if digest:
            response = normalize_response(response, digest)
        response = with_timing(response, {"total_ms": 1e-05})
        _, want = new_recording(tmp_path, **where, response=redact_answer(response, secrets))
        result = record_whole(job(content, digest=digest))
        assert result.outcome == "done"
        assert (tmp_path / "out.partial").read_bytes() == want.to_json_bytes()
        assert result.head == {"is_streaming": False, "timing": {"total_ms": 1e-05}}

    assert record_whole(job(b"<html>")).reason == "answer is not JSON"
    assert record_whole(job(content, status=500)).reason == "upstream answered 500"
    assert record_whole(job(b'{"error": {"message": "no"}}', 400)).outcome == "ordinary"
    models = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
    models_job = job(models.encode())
    models_job.path = "/v1/models"
    models_job.method = "GET"
    assert record_whole(models_job).outcome == "ordinary"  # merged with its siblings
    assert record_whole(job(b'{"choices": [], "x": 1e400}')).outcome == "not_json_value"


def test_cassette_proxy_run_records_a_big_answer_and_a_big_stream(upstream_factory, tmp_path):
    """The CLI's own host (the lean master): its worker process starts and records."""
    from cliproxy import start_cli_proxy

    up = upstream_factory("A", n_chunks=N_CHUNKS)
    folder = tmp_path / "cassettes"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    try:
        client = openai_client(proxy.url, up)
        text, _ = big_stream(client)
        assert text == f"[A] echo: {PROMPT}"
        up.configure(reshape=padded)
        big_answer(client, "through the CLI")
        files = cassette_files(folder)
        assert len(files) == 2
        for path in files:
            assert_whole_writer_text(path, tmp_path)
        assert worker_pids(proxy)
        assert temp_files(folder) == []
        assert "FAILED" not in proxy.output()
    finally:
        proxy.stop()
