"""Issue 10, the tool as a new user meets it: each finding through real commands and
real processes (`cassette-proxy` and `scripts/run` subprocesses, real upstreams)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from cliproxy import _PROXY_VARS, CLI, start_cli_proxy
from conftest import cassette_files, free_port, openai_client, wait_for_files
from mitmproxy import io
from upstreams import OpenAIUpstream, answer_text

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "cassettes" / "0806aef47037.json"
CORPUS = REPO / "tests" / "fixtures" / "llama-stack"


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _PROXY_VARS} | extra


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=clean_env(**env))  # fmt: skip


def chat(client, prompt: str, stream: bool = False) -> str:  # noqa: ANN001
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        answer = client.chat.completions.create(model="fake-model", messages=messages)
        return answer.choices[0].message.content
    chunks = client.chat.completions.create(model="fake-model", messages=messages, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def record_prompts(tmp_path: Path, upstream: OpenAIUpstream, folder: Path, *prompts: str) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = openai_client(proxy.url, upstream)
    for prompt in prompts:
        assert chat(client, prompt) == answer_text("A", prompt)
    assert proxy.stop() == 0


# ---- 1. prune cannot empty a folder --------------------------------------------------


def test_prune_refuses_a_log_that_names_none_of_this_folder(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder = tmp_path / "cassettes"
    record_prompts(tmp_path, upstream, folder, "one", "two", "three")
    assert len(cassette_files(folder)) == 3

    # The issue's own command: a log naming a file this folder does not have.
    bogus = tmp_path / "x.log"
    bogus.write_text("hit\tdeadbeef.json\n")
    refused = cli("prune", "-d", str(folder), "-u", str(bogus), "--yes")
    assert refused.returncode == 1
    assert "name none of the 3 cassette(s)" in refused.stderr
    assert len(cassette_files(folder)) == 3

    # A session's log, then prune with -d forgotten (run from elsewhere) or wrong.
    used = tmp_path / "used.log"
    proxy = start_cli_proxy(
        tmp_path, "-d", str(folder), "--mode", "replay", "--usage-log", str(used)
    )
    assert chat(openai_client(proxy.url, upstream), "one") == answer_text("A", "one")
    proxy.stop()
    [line] = used.read_text().splitlines()
    assert line.split("\t")[2] == str(folder.resolve())  # the folder names are relative to
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cassettes").mkdir(parents=True)
    for p in cassette_files(folder):
        shutil.copy(p, elsewhere / "cassettes")
    wrong = cli("prune", "-u", str(used), "--yes", cwd=elsewhere)  # -d defaults to cassettes
    assert wrong.returncode == 1
    assert f"were written for {folder.resolve()}" in wrong.stderr
    assert len(cassette_files(elsewhere / "cassettes")) == 3

    # The right folder: how many go and how many stay, said before anything goes.
    dry = cli("prune", str(folder), "-u", str(used))  # the folder as an argument, too
    assert dry.returncode == 0 and "2 unused, 1 used" in dry.stderr
    done = cli("prune", "-d", str(folder), "-u", str(used), "--yes")
    assert done.returncode == 0, done.stderr
    said = done.stderr.splitlines()
    assert said[0] == f"2 of 3 cassette(s) in {folder} go, 1 stay"
    assert said[-1] == "2 removed, 1 kept"
    assert len(cassette_files(folder)) == 1


# ---- 2 + 3. one entry point; the banner once it listens; port taken in one line -------


def _start_script(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"scripts-run-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(REPO / "scripts" / "run"), "--confdir", str(tmp_path / "conf"), *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=clean_env(PYTHONUNBUFFERED="1", **env),
        )  # fmt: skip
    return proc, log


def _wait_for(log: Path, needle: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if needle in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in output:\n{log.read_text(errors='replace')}")


def test_scripts_run_is_cassette_proxy_run(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    folder = tmp_path / "cassettes"
    record_prompts(tmp_path, upstream, folder, "via script")
    port = free_port()
    # --mode is the cassette mode, the folder comes from CASSETTE_DIR, the port from PORT.
    proc, log = _start_script(
        tmp_path, "--mode", "replay", CASSETTE_DIR=str(folder), PORT=str(port)
    )
    try:
        out = _wait_for(log, "export HTTPS_PROXY", proc)
        assert f"# cassette-proxy replay mode, cassettes in {folder}, lean master at " in out
        assert f"export HTTP_PROXY=http://127.0.0.1:{port}" in out
        assert "client connect" not in out
        client = openai_client(f"http://127.0.0.1:{port}", upstream)
        upstream.stop()
        assert chat(client, "via script") == answer_text("A", "via script")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert "cassette-proxy: 1 hits, 0 misses, 0 recorded" in log.read_text()
    # mitmproxy's proxy modes are refused with a pointer to --reverse.
    wrong, wlog = _start_script(tmp_path, "--mode", "reverse:http://127.0.0.1:8000")
    assert wrong.wait(60) == 2
    assert "for reverse mode use --reverse http://127.0.0.1:8000" in wlog.read_text()


def test_a_taken_port_is_one_line_and_no_banner(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = cli("run", "--listen-port", str(port), "--confdir", str(tmp_path / "c"),
                    "-d", str(tmp_path / "k"))  # fmt: skip
    assert taken.returncode == 1
    out = taken.stdout + taken.stderr
    errors = [line for line in out.splitlines() if "already in use" in line]
    assert len(errors) == 1 and "--listen-port" in errors[0] and "PORT=" in errors[0]
    assert "--mode regular@" not in out and "Error logged during startup" not in out
    assert "export " not in out and "# cassette-proxy " not in out  # banner only once listening

    typo = cli("run", "--set", "cassette_mode=replya", "--confdir", str(tmp_path / "c"),
               "-d", str(tmp_path / "k"))  # fmt: skip
    assert typo.returncode == 2 and "cassette_mode must be one of" in typo.stderr
    assert "export " not in typo.stdout and "loaded from" not in typo.stdout


# ---- 4. a missing folder: replay refuses it, recording creates it ----------------------


def test_a_missing_folder_stops_replay_and_is_created_for_recording(tmp_path: Path) -> None:
    missing = tmp_path / "tests" / "cassettes"
    replay = cli("run", "--mode", "replay", "-d", str(missing), "--confdir", str(tmp_path / "c"))
    assert replay.returncode == 2
    assert f"cassette folder {missing} does not exist" in replay.stderr
    assert replay.stderr.count("\n") == 1 and not missing.exists()

    proxy = start_cli_proxy(tmp_path, "-d", str(missing), "--mode", "record")
    assert missing.is_dir()
    assert f"created cassette folder {missing}" in proxy.output()
    proxy.stop()


def test_mitmdump_script_users_get_the_same_refusal(tmp_path: Path) -> None:
    mitmdump = CLI.parent / "mitmdump"
    missing = tmp_path / "none"
    run = subprocess.run(
        [str(mitmdump), "-s", str(REPO / "addons" / "recorder.py"), "--listen-host",
         "127.0.0.1", "--listen-port", str(free_port()), "--set", f"confdir={tmp_path / 'c'}",
         "--set", "cassette_mode=replay", "--set", f"cassette_dir={missing}"],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert run.returncode != 0
    assert f"cassette folder {missing} does not exist" in run.stdout + run.stderr


# ---- 7. files follow the umask ---------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_recorded_cassettes_follow_the_umask(
    tmp_path: Path, upstream: OpenAIUpstream, umask: int, mode: int
) -> None:
    folder = tmp_path / "cassettes"
    port = free_port()
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(CLI), "run", "-p", str(port), "-d", str(folder), "--confdir",
             str(tmp_path / "c")],
            stdout=out, stderr=subprocess.STDOUT, env=clean_env(PYTHONUNBUFFERED="1"),
            preexec_fn=lambda: os.umask(umask),
        )  # fmt: skip
    try:
        _wait_for(log, "export HTTP_PROXY", proc)
        client = openai_client(f"http://127.0.0.1:{port}", upstream)
        assert chat(client, "whole") and chat(client, "streamed", stream=True)
        files = wait_for_files(folder, 2)
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(files) == 2
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {mode}


# ---- 8. mitmweb's mark for a replay is :vhs: -------------------------------------------


def test_replayed_flows_are_marked_vhs(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    folder = tmp_path / "cassettes"
    record_prompts(tmp_path, upstream, folder, "marked")
    flows = tmp_path / "replay.flows"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay", "--full",
                            "--set", f"save_stream_file={flows}")  # fmt: skip
    assert chat(openai_client(proxy.url, upstream), "marked") == answer_text("A", "marked")
    proxy.stop()
    with flows.open("rb") as f:
        [flow] = list(io.FlowReader(f).stream())
    assert flow.marked == ":vhs:"
    assert flow.comment.startswith("cassette: ")


# ---- 5 + 6. folder arguments everywhere; ls, show, verify for people -------------------


def test_every_reading_command_takes_paths_and_d(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    shutil.copytree(CORPUS, folder)
    shutil.copy(SEED, folder)
    for command in ("ls", "stats", "verify"):
        by_arg = cli(command, str(folder))
        by_d = cli(command, "-d", str(folder))
        assert by_arg.returncode == by_d.returncode, (command, by_arg.stderr)
        assert by_arg.stdout == by_d.stdout and by_arg.stdout, command
    shown = cli("show", "0806aef4", "-d", str(tmp_path / "nope"))
    assert shown.returncode == 1
    one = cli("ls", str(folder / "0806aef47037.json"), "--json")
    assert [json.loads(x)["file"] for x in one.stdout.splitlines()] == ["0806aef47037.json"]


def test_ls_whole_names_when_piped_sorted_by_time_with_prompts(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder = tmp_path / "cassettes"
    record_prompts(tmp_path, upstream, folder, "first question", "second question")
    files = cassette_files(folder)
    first = next(p for p in files if "first question" in p.read_text())
    second = next(p for p in files if p != first)
    os.utime(first, (1_700_000_000, 1_700_000_000))  # older: listed first
    os.utime(second, (1_700_000_100, 1_700_000_100))

    listed = cli("ls", "-d", str(folder))
    rows = listed.stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [first.name, second.name]  # whole names (64 hex)
    assert rows[0].rstrip().endswith("first question")
    assert "RECORDED" in listed.stdout.splitlines()[0]
    as_json = [json.loads(x) for x in cli("ls", "-d", str(folder), "--json").stdout.splitlines()]
    assert [r["file"] for r in as_json] == [first.name, second.name]  # agrees with the table
    assert as_json[0]["prompt"] == "first question" and as_json[0]["recorded"]

    # A name pasted from the table, or its start, or a name cut with an ellipsis, shows.
    for target in (first.name, first.name[:10], first.name[:10] + "…"):
        assert cli("show", target, "-d", str(folder)).returncode == 0, target
    none = cli("show", "ffffffffffff", "-d", str(folder))
    assert none.returncode == 1 and "no cassette matches ffffffffffff" in none.stderr
    common = os.path.commonprefix([first.name, second.name])
    if len(common) < 4:  # both names start alike only by chance; make them
        shutil.copy(first, folder / (first.name[:4] + "0" * 60 + ".json"))
        common = first.name[:4]
    many = cli("show", common, "-d", str(folder))
    assert many.returncode == 1 and many.stderr.startswith("cassette-proxy: ambiguous: ")


def test_ls_on_a_terminal_shows_a_pasteable_unique_prefix(tmp_path: Path) -> None:
    import pty

    folder = tmp_path / "c"
    shutil.copytree(CORPUS, folder)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([str(CLI), "ls", "-d", str(folder)], stdout=follower,
                            stderr=subprocess.DEVNULL, env=clean_env(COLUMNS="400"))  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        seen += data
    os.close(leader)
    proc.wait(30)
    prefixes = [line.split()[0] for line in seen.decode().splitlines()[1:] if line.strip()]
    assert len(prefixes) == len(cassette_files(folder))
    for prefix in prefixes:
        assert not prefix.endswith("…")
        if prefix.endswith(".json"):
            continue
        shown = cli("show", prefix, "-d", str(folder))
        assert shown.returncode == 0, (prefix, shown.stderr)


def test_verify_names_each_file_once_with_the_expected_name(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(SEED, folder / "renamed.json")
    shutil.copy(SEED, folder)
    out = cli("verify", str(folder)).stdout
    lines = [line for line in out.splitlines() if "renamed.json" in line]
    assert len(lines) == 1
    assert "(expected 0806aef47037" in lines[0]  # the hash the recorder writes (full hex)
    assert "answers the same request as" in lines[0]


# ---- 10. logs that say what happened ----------------------------------------------------


def test_record_mode_with_the_upstream_down_says_so(tmp_path: Path) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--mode", "record")
    port = free_port()  # nothing listens there
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                        json={"model": "m", "messages": []}, proxy=proxy.url, trust_env=False)
    assert answer.status_code == 502
    proxy.stop()
    out = proxy.output()
    assert f"upstream 127.0.0.1:{port} is unreachable; answered 502, nothing recorded" in out
    assert "not JSON" not in out


def test_stopping_mid_stream_is_not_called_a_client_disconnect(
    tmp_path: Path, upstream_factory
) -> None:  # noqa: ANN001
    slow = upstream_factory("A", n_chunks=30, event_interval=0.2)
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--mode", "record")
    got_first = threading.Event()

    def client() -> None:
        body = {"model": "m", "stream": True,
                "messages": [{"role": "user", "content": " ".join("w" * 30)}]}  # fmt: skip
        try:
            with httpx.stream("POST", f"{slow.url}/v1/chat/completions", json=body,
                              proxy=proxy.url, trust_env=False, timeout=60) as r:  # fmt: skip
                for _ in r.iter_lines():
                    got_first.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=client)
    thread.start()
    assert got_first.wait(30)
    assert proxy.stop(signal.SIGINT) == 0
    thread.join(30)
    out = proxy.output()
    assert "stream cut short (the proxy was stopped)" in out
    assert "Client disconnected" not in out


def test_an_upstream_certificate_failure_logs_the_options_to_use(
    tmp_path: Path, tls_upstream: OpenAIUpstream
) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--mode", "record")
    ca = tmp_path / "mitm-confdir" / "mitmproxy-ca-cert.pem"
    answer = httpx.get(f"https://localhost:{tls_upstream.port}/v1/models", proxy=proxy.url,
                       verify=str(ca), trust_env=False)  # fmt: skip
    assert answer.status_code == 502
    proxy.stop()
    [line] = [x for x in proxy.output().splitlines() if "TLS to upstream" in x]
    assert "ssl_verify_upstream_trusted_ca=" in line and "ssl_insecure=true" in line


# ---- 11. the unservable files, summarised ------------------------------------------------


def test_unservable_files_are_summarised_by_kind(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    # A provider call (OGX's pdf processor); its Tavily web_search is served (issue 19).
    tool = CORPUS / "268e65efffed6ba43c3c66d97dddf134f48456bf3a9ac1ba5ecf38fe50c39044.json"
    for i in range(7):
        shutil.copy(tool, folder / f"tool-{i}.json")
    shutil.copy(SEED, folder)
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay")
    proxy.stop()
    lines = proxy.output().splitlines()
    [head] = [x for x in lines if "read but not served" in x]
    assert "7 recording(s)" in head and "tool-level" in head and "that is expected" in head
    [kind] = [x for x in lines if "a tool or provider call" in x]
    assert "7 a tool or provider call" in kind and "and 4 more (-v lists all)" in kind
    assert sum(f"tool-{i}.json" in kind for i in range(7)) == 3
    assert f"cassettes: 8 loaded from {folder} (7 not served)" in proxy.output()

    verbose = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay", "-v")
    verbose.stop()
    assert all(f"tool-{i}.json" in verbose.output() for i in range(7))


# ---- issue 12: `run` is optimised by itself ---------------------------------------------


def test_run_re_executes_itself_optimised(tmp_path: Path) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"))
    try:
        environ = Path(f"/proc/{proxy.proc.pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{proxy.proc.pid}/cmdline").read_bytes().split(b"\0")
    finally:
        proxy.stop()
    assert b"PYTHONOPTIMIZE=1" in environ
    assert b"cassette_proxy.cli" in cmdline


# ---- 9. a recipe's empty credential is logged with its reason -----------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_an_empty_bearer_over_http2_is_logged_with_its_reason(
    tmp_path: Path, tls_upstream: OpenAIUpstream
) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--set",
                            f"ssl_verify_upstream_trusted_ca={tls_upstream.cert}")  # fmt: skip
    ca = tmp_path / "mitm-confdir" / "mitmproxy-ca-cert.pem"
    # The README's HTTPS recipe with OPENAI_API_KEY unset: "Bearer " and a trailing space.
    curl = subprocess.run(
        ["curl", "-sS", "-x", proxy.url, "--cacert", str(ca), "-H", "authorization: Bearer ",
         f"https://localhost:{tls_upstream.port}/v1/models"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert curl.returncode != 0
    proxy.wait_for("HTTP/2 protocol error", timeout=30)
    proxy.stop()
    [line] = [x for x in proxy.output().splitlines() if "HTTP/2 protocol error" in x]
    assert "whitespace" in line
    assert "client connect" not in proxy.output()


# ---- 9. the README's Node and Java recipes, run as pasted --------------------------------


def readme_block(after: str, lang: str, nth: int = 0) -> str:
    """The nth ```lang block after the text ``after`` of the client recipes (moved from
    the README to docs/clients.md by issue 20)."""
    text = (REPO / "docs" / "clients.md").read_text()
    rest = text[text.index(after):]
    blocks = rest.split(f"```{lang}\n")[1:]
    return blocks[nth].split("```", 1)[0]


NODE_DIR = REPO / "tests" / "node"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_readme_node_recipe_runs_as_pasted(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
    app = readme_block("**Node 20**", "js").replace("http://127.0.0.1:8000", upstream.url)
    script = NODE_DIR / f"readme-app-{os.getpid()}.mjs"  # beside node_modules
    script.write_text(app)
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"))
    env = {k: v for k, v in proxy.env().items() if k != "OPENAI_API_KEY"}  # none set
    try:
        for _ in range(2):  # recorded, then replayed with the upstream gone
            out = subprocess.run(["node", str(script)], capture_output=True, text=True,
                                 env=env, timeout=60)  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines()[-1] == answer_text("A", "hi")
            upstream.stop()
    finally:
        script.unlink()
        proxy.stop()
    assert "2 hits" in proxy.output()


@pytest.mark.skipif(shutil.which("java") is None or shutil.which("keytool") is None,
                    reason="no JDK")  # fmt: skip
def test_the_readme_java_recipe_runs_as_pasted(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"))
    ca = tmp_path / "mitm-confdir" / "mitmproxy-ca-cert.pem"
    commands = readme_block("**Java**", "sh").replace("~/.mitmproxy/mitmproxy-ca-cert.pem", str(ca))
    source = readme_block("**Java**", "java")
    source = source.replace("8080", str(proxy.port)).replace("http://127.0.0.1:8000", upstream.url)
    (tmp_path / "Chat.java").write_text(source)
    try:
        run = subprocess.run(["bash", "-euc", commands], cwd=tmp_path, capture_output=True,
                             text=True, timeout=180, env=clean_env())  # fmt: skip
    finally:
        proxy.stop()
    assert run.returncode == 0, run.stderr
    status, _, body = run.stdout.strip().partition(" ")
    assert status == "200"
    assert json.loads(body)["choices"][0]["message"]["content"] == answer_text("A", "hi")
    assert "1 recorded" in proxy.output()
