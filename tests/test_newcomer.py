"""Issue 20, the tool a newcomer trusts: a strict test scope, misses that say how to
record, errors that tell the truth, `scripts/run` from anywhere, the pytest plugin's port
and its one stop. Real `cassette-proxy run`, `mitmdump -s` and `scripts/run` processes,
real upstreams, the openai SDK, httpx and curl."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest
from cliproxy import CLI, start_cli_proxy
from conftest import free_port, openai_client
from test_newuser import clean_env, cli
from upstreams import OpenAIUpstream, answer_text

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "cassettes" / "0806aef47037.json"
TEST_ID = "X-Cassette-Test-Id"
T1, T2 = "tests/test_a.py::test_one", "tests/test_a.py::test_two"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "scoped"}]}


def record_under(tmp_path: Path, upstream: OpenAIUpstream, folder: Path, test_id: str) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = openai_client(proxy.url, upstream, default_headers={TEST_ID: test_id})
    assert client.chat.completions.create(**CHAT).choices[0].message.content == answer_text(
        "A", "scoped"
    )
    assert proxy.stop() == 0


# ---- 2. cassette_test_scope ----------------------------------------------------------------


def test_strict_scope_answers_a_test_only_from_its_own_recordings(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder = tmp_path / "c"
    record_under(tmp_path, upstream, folder, T1)
    target = "http://127.0.0.1:9"  # replay: never contacted

    lenient = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay")
    other = openai_client(lenient.url, target, default_headers={TEST_ID: T2})
    assert other.chat.completions.create(**CHAT).choices[0].message.content  # today's rule
    lenient.stop()

    strict = start_cli_proxy(
        tmp_path, "-d", str(folder), "--mode", "replay", "--set", "cassette_test_scope=strict"
    )
    own = openai_client(strict.url, target, default_headers={TEST_ID: T1})
    assert own.chat.completions.create(**CHAT).choices[0].message.content == answer_text(
        "A", "scoped"
    )
    other = openai_client(strict.url, target, default_headers={TEST_ID: T2})
    with pytest.raises(openai.NotFoundError) as miss:
        other.chat.completions.create(**CHAT)
    error = miss.value.body
    assert error["code"] == "cassette_miss" and error["test_scope"] == "strict"
    assert "cassette_test_scope is strict" in error["message"]
    assert T1 in error["message"]  # the other test that has it is named
    strict.stop()
    assert "1 hits, 1 misses" in strict.output()

    bad = subprocess.run(
        [str(CLI), "run", "-d", str(folder), "--set", "cassette_test_scope=loose",
         "--listen-port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert bad.returncode != 0 and "cassette_test_scope must be one of lenient, strict" in (
        bad.stdout + bad.stderr
    )


# ---- 3. a miss says what to do ---------------------------------------------------------------


def test_a_replay_miss_names_how_to_record_it(tmp_path: Path) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "empty"), "--mode", "record")
    proxy.stop()
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "empty"), "--mode", "replay")
    got = httpx.post("http://127.0.0.1:9/v1/chat/completions", json=CHAT,
                     proxy=proxy.url, trust_env=False, timeout=30)  # fmt: skip
    proxy.stop()
    assert got.status_code == 404
    error = got.json()["error"]
    assert "--mode record-if-missing" in error["message"]
    assert "--cassette-mode=record-if-missing" in error["how_to_record"]
    assert "start the upstream" in error["message"]
    assert "upstream_offline" not in error
    assert "--mode record-if-missing" in proxy.output()  # the log line says it too


def test_record_if_missing_with_the_upstream_down_says_it_was_offline(tmp_path: Path) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--mode", "record-if-missing")
    client = openai_client(proxy.url, f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(openai.NotFoundError) as miss:
        client.chat.completions.create(**CHAT)
    proxy.stop()
    error = miss.value.body
    assert error["upstream_offline"] is True
    assert "the upstream was offline" in error["message"]
    assert "start the upstream and send the request again" in error["message"]


# ---- 4. errors that tell the truth ---------------------------------------------------------


def test_an_unknown_type_is_reported_as_that_at_start_up(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    doc = json.loads(SEED.read_text())
    for chunk in doc["response"]["body"]:
        chunk["__type__"] = "openai.types.chat.chat_completion_chunk_v2.ChatCompletionChunkV2"
    (folder / "0806aef47037.json").write_text(json.dumps(doc, indent=2))
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay")
    proxy.stop()
    out = proxy.output()
    assert (
        "unknown __type__ 'openai.types.chat.chat_completion_chunk_v2.ChatCompletionChunkV2'" in out
    )
    assert "stale" not in out and "that is expected" not in out


def test_conflicting_settings_are_refused_naming_both(tmp_path: Path) -> None:
    port = str(free_port())
    both = cli("run", "--mode", "replay", "--set", "cassette_mode=record", "-p", port, cwd=tmp_path)
    assert both.returncode == 2
    assert both.stderr.strip() == (
        "cassette-proxy: --mode replay and --set cassette_mode=record disagree; "
        "give only one of them"
    )
    folder = cli("run", "-d", "a", "--set", "cassette_dir=b", "-p", port, cwd=tmp_path)
    assert folder.returncode == 2 and "-d" not in folder.stderr.split("disagree")[1]
    assert "--cassette-dir a and --set cassette_dir=b disagree" in folder.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    reverse = cli("run", "--mode", "reverse", "-p", port, cwd=tmp_path)
    assert reverse.returncode == 2 and "for reverse mode use --reverse URL" in reverse.stderr
    # A --set alone still sets it (no --mode given): no conflict.
    proxy = start_cli_proxy(tmp_path, "--set", "cassette_mode=replay", "-d", str(tmp_path))
    proxy.stop()
    assert "# cassette-proxy replay mode" in proxy.output()


def test_one_error_prefix_and_one_exit_code_for_a_missing_folder(tmp_path: Path) -> None:
    nope = tmp_path / "nope"
    for command in ("ls", "stats", "verify"):
        for args in (["-d", str(nope)], [str(nope)]):
            done = cli(command, *args)
            assert done.returncode == 2, (command, args, done.stderr)
            assert done.stderr.startswith(f"cassette-proxy: no cassette folder at {nope}")
            assert "Error" not in done.stderr
    for args in (["show", "zzz", "-d", str(REPO / "cassettes")], ["ls", "--no-such-flag"]):
        done = cli(*args)
        assert done.returncode in (1, 2) and done.stderr.startswith("cassette-proxy: ")
        assert done.stderr.count("\n") == 1  # one line


def start_mitmweb(tmp_path: Path, folder: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port, log = free_port(), tmp_path / "mitmweb.log"
    argv = [
        str(Path(CLI).parent / "mitmweb"),
        "-s",
        str(REPO / "addons" / "recorder.py"),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"web_port={free_port()}",
        "--set",
        "web_open_browser=false",
        "--set",
        f"confdir={tmp_path / 'mitm-confdir'}",
        "--set",
        f"cassette_dir={folder}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                cwd=tmp_path)  # fmt: skip
    for _ in range(600):
        if "proxy listening" in log.read_text(errors="replace"):
            return proc, port, log
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(log.read_text())


def test_the_summary_line_reads_the_same_under_run_mitmdump_and_mitmweb(
    tmp_path: Path, proxy_factory, upstream: OpenAIUpstream
) -> None:
    folder = tmp_path / "c"
    lines = []
    for host in ("run", "mitmdump", "mitmweb"):
        if host == "run":
            proxy = start_cli_proxy(tmp_path, "-d", str(folder))
            url, stop, output = proxy.url, proxy.stop, proxy.output
        elif host == "mitmdump":
            proxy = proxy_factory(mode="auto", cassette_dir=folder)
            url, stop, output = proxy.url, proxy.stop, proxy.log_text
        else:
            proc, port, log = start_mitmweb(tmp_path, folder)
            url = f"http://127.0.0.1:{port}"
            stop, output = (lambda p=proc: (p.terminate(), p.wait(30))), log.read_text
        client = openai_client(url, upstream)
        faulty = openai_client(url, upstream, default_headers={"X-Cassette-Fault": "status=429"})
        client.chat.completions.create(**CHAT)
        with pytest.raises(openai.RateLimitError):
            faulty.chat.completions.create(**CHAT)
        stop()
        [line] = [x for x in output().splitlines() if "hits, " in x]
        lines.append(line[line.index("cassette-proxy: ") :])
    # auto with the upstream up: each host records the request again, and counts the fault.
    assert (
        lines
        == ["cassette-proxy: 0 hits, 0 misses, 1 recorded, 0 offline fallbacks, 1 faults injected"]
        * 3
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_passthrough_requests_get_their_log_line(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--mode", "passthrough")
    done = subprocess.run(
        ["curl", "-sS", "-x", proxy.url, f"{upstream.url}/v1/chat/completions",
         "-H", "content-type: application/json", "-d", json.dumps(CHAT)],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    proxy.stop()
    assert json.loads(done.stdout)["choices"][0]["message"]["content"] == answer_text("A", "scoped")
    assert "passthrough POST /v1/chat/completions (nothing recorded or replayed)" in (
        proxy.output()
    )


def test_a_log_line_names_one_hash_per_request(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    folder = tmp_path / "c"
    record_under(tmp_path, upstream, folder, T1)
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay")
    client = openai_client(proxy.url, upstream, default_headers={TEST_ID: T1})
    client.chat.completions.create(**CHAT)
    proxy.stop()
    [hit] = [x for x in proxy.output().splitlines() if " hit POST " in x]
    assert len(re.findall(r"[0-9a-f]{12,}", hit)) == 1, hit


def test_ls_shows_when_a_cassette_was_recorded_not_copied(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(SEED, folder)  # the copy's file time is now
    created = json.loads(SEED.read_text())["response"]["body"][0]["__data__"]["created"]
    done = cli("ls", "-d", str(folder), "--json")
    assert done.returncode == 0, done.stderr
    [row] = [json.loads(x) for x in done.stdout.splitlines()]
    assert datetime.fromisoformat(row["recorded"]).timestamp() == created
    assert row["recorded"][:4] == "2025" and time.localtime().tm_year != 2025


# ---- 5. scripts/run from anywhere ----------------------------------------------------------


def test_scripts_run_from_another_folder_uses_the_callers_paths(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    work = tmp_path / "project"
    work.mkdir()
    port = free_port()
    in_clone = REPO / "tests" / "cassettes"
    was_there = in_clone.exists()
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "run"), "-d", "tests/cassettes", "-p", str(port),
         "--confdir", str(tmp_path / "confdir")],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=clean_env(),
    )  # fmt: skip
    try:
        banner = proc.stdout.readline()
        while not banner.startswith("# cassette-proxy"):
            banner = proc.stdout.readline()
            assert banner, "scripts/run ended before its banner"
        assert f"cassettes in {work / 'tests' / 'cassettes'}," in banner  # absolute
        client = openai_client(f"http://127.0.0.1:{port}", upstream)
        client.chat.completions.create(**CHAT)
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(list((work / "tests" / "cassettes").glob("*.json"))) == 1
    assert in_clone.exists() == was_there  # nothing made inside the tool's own clone


def test_auto_mode_never_makes_a_folder_inside_the_clone_unasked(tmp_path: Path) -> None:
    inside = REPO / "tests" / "fixtures"
    done = subprocess.run(
        [str(REPO / "scripts" / "run"), "-p", str(free_port())],
        cwd=inside, capture_output=True, text=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert "would be made inside cassette-proxy's own clone: give -d FOLDER" in done.stderr
    assert not (inside / "cassettes").exists()


# ---- 6. the pytest plugin ------------------------------------------------------------------

pytest_plugins = ["pytester"]

ASK = """
def ask(client):
    answer = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "scoped"}])
    return answer.choices[0].message.content

def test_one(cassette_openai_client, cassette_proxy):
    assert cassette_proxy.url == "http://127.0.0.1:PORT"
    assert ask(cassette_openai_client)
"""
TWO_ASKS = (
    ASK
    + """
def test_two(cassette_openai_client):
    assert ask(cassette_openai_client)
"""
)


def test_plugin_uses_the_given_port_strict_scope_and_says_how_to_record(
    pytester: pytest.Pytester, upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    port = free_port()
    cassettes = tmp_path / "cassettes"
    pytester.makeini(
        f"[pytest]\ncassette_dir = {cassettes}\ncassette_openai_base_url = {upstream.url}/v1\n"
        f"cassette_proxy_args = --listen-port {port}\n"
    )
    pytester.makepyfile(test_inner=ASK.replace("PORT", str(port)))
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    # test_two asks what only test_one recorded: lenient answers it, strict says no, and how
    # to record it.
    pytester.makepyfile(test_inner=TWO_ASKS.replace("PORT", str(port)))
    upstream.stop()
    lenient = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--cassette-mode=replay")
    lenient.assert_outcomes(passed=2)
    strict = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--cassette-mode=replay", "--cassette-test-scope=strict"
    )
    strict.assert_outcomes(passed=1, failed=1)
    strict.stdout.fnmatch_lines(
        ["*cassette-proxy*", "*record it: start the upstream and run pytest "
         "--cassette-mode=record-if-missing*"]
    )  # fmt: skip


def test_plugin_stops_once_on_a_replay_folder_that_does_not_exist(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makeini(f"[pytest]\ncassette_dir = {tmp_path / 'nope'}\n")
    pytester.makepyfile(
        test_many="\n".join(f"def test_{i}(cassette_proxy):\n    pass\n" for i in range(5))
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--cassette-mode=replay")
    assert result.ret == 4
    text = result.stdout.str() + result.stderr.str()
    assert text.count("does not exist, and replay answers only from it") == 1, text
    assert "5 error" not in text and "passed" not in text
