"""`cassette-proxy run` as a subprocess: client lines, one log line per interaction,
the exit summary, the usage log, and `prune` driven by that log."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import httpx
from cassette_proxy.cli import cli
from click.testing import CliRunner
from cliproxy import CLI, start_cli_proxy
from conftest import cassette_files, openai_client
from mitmproxy import io
from upstreams import OpenAIUpstream, answer_text

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "cassettes" / "0806aef47037.json"


def chat(client, prompt: str, stream: bool = False) -> str:  # noqa: ANN001
    if not stream:
        answer = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": prompt}]
        )
        return answer.choices[0].message.content
    chunks = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": prompt}], stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_run_prints_client_lines_logs_each_interaction_and_sums_up(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder, usage_log = tmp_path / "cassettes", tmp_path / "used.log"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--usage-log", str(usage_log))
    ca = str(tmp_path / "mitm-confdir" / "mitmproxy-ca-cert.pem")
    assert proxy.exports() == {
        "HTTP_PROXY": proxy.url,
        "HTTPS_PROXY": proxy.url,
        "http_proxy": proxy.url,
        "https_proxy": proxy.url,
        "SSL_CERT_FILE": ca,
        "NODE_EXTRA_CA_CERTS": ca,
        "CURL_CA_BUNDLE": ca,
    }
    client = openai_client(proxy.url, upstream)
    assert chat(client, "one") == answer_text("A", "one")
    assert chat(client, "two", stream=True) == answer_text("A", "two")
    upstream.stop()  # offline: both answered from the cassettes just written
    assert chat(client, "one") == answer_text("A", "one")
    assert chat(client, "two", stream=True) == answer_text("A", "two")
    missed = httpx.post(
        f"{upstream.url}/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "never"}]},
        proxy=proxy.url,
        trust_env=False,
    )
    assert missed.status_code == 404

    assert proxy.stop() == 0
    out = proxy.output()
    assert "cassette-proxy: 2 hits, 1 misses, 2 recorded, 3 offline fallbacks" in out
    assert "# cassette-proxy auto mode, cassettes in" in out
    # quiet by default: no connect/disconnect chatter, one line per interaction
    assert "client connect" not in out and "client disconnect" not in out
    # One hash per line: the file, named by its request's hash (issue 20).
    recorded = re.findall(r"auto recorded POST /v1/chat/completions -> (\S+)", out)
    hits = re.findall(r"auto hit POST /v1/chat/completions -> (\S+) \(fallback", out)
    assert len(recorded) == 2 and sorted(recorded) == sorted(hits)
    assert len(re.findall(r"auto miss no recording for POST /v1/chat/completions", out)) == 1
    for file in recorded:
        assert len([line for line in out.splitlines() if f"-> {file}" in line]) == 2  # rec., hit

    names = sorted(p.name for p in cassette_files(folder))
    assert sorted(recorded) == names
    lines = usage_log.read_text().splitlines()
    assert sorted(lines) == sorted(
        [f"recorded\t{n}\t{folder.resolve()}" for n in names]
        + [f"fallback\t{n}\t{folder.resolve()}" for n in names]
    )


def test_run_reverse_mode_and_replay(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    folder = tmp_path / "cassettes"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--reverse", upstream.url)
    exports = proxy.exports()
    assert exports.pop("OPENAI_API_KEY", "sk-placeholder") == "sk-placeholder"
    assert exports == {"OPENAI_BASE_URL": f"{proxy.url}/v1"}
    assert f"# reverse proxy to {upstream.url}: send requests to {proxy.url} instead" in (
        proxy.output()
    )
    assert chat(openai_client(None, proxy), "rev") == answer_text("A", "rev")
    assert proxy.stop(signal.SIGINT) == 0
    assert "0 hits, 0 misses, 1 recorded" in proxy.output()

    upstream.configure(tag="B")  # live answers change; replay must not ask
    upstream.clear_requests()
    proxy = start_cli_proxy(
        tmp_path, "-d", str(folder), "--reverse", upstream.url, "--mode", "replay"
    )
    assert chat(openai_client(None, proxy), "rev") == answer_text("A", "rev")
    assert upstream.requests == []
    assert proxy.stop() == 0
    assert "1 hits, 0 misses, 0 recorded" in proxy.output()


def test_run_full_master_takes_mitmdump_options(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    flows = tmp_path / "traffic.flows"
    proxy = start_cli_proxy(
        tmp_path,
        "-d",
        str(tmp_path / "c"),
        "--full",
        "--quiet",
        "--set",
        f"save_stream_file={flows}",
    )
    assert "full master" in proxy.output()
    assert chat(openai_client(proxy.url, upstream), "full") == answer_text("A", "full")
    assert proxy.stop() == 0
    assert "0 hits, 0 misses, 1 recorded" in proxy.output()
    # In the full master the addon comes after mitmproxy's flow writer, which saves the
    # flow in its response hook: the mark set when the answer's headers came is there.
    with flows.open("rb") as f:
        [flow] = list(io.FlowReader(f).stream())
    [cassette] = cassette_files(tmp_path / "c")
    assert flow.marked == ":red_circle:"
    assert flow.comment == f"cassette: recording {cassette.name}"


def test_run_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(CLI), "run", "--confdir", str(tmp_path / "conf"), "-d", str(tmp_path), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    lean_only = run("--set", "anticache=true")
    assert lean_only.returncode == 2
    assert "anticache is not supported by the lean proxy; use --full" in lean_only.stderr
    unknown = run("--set", "no_such_option=1")
    assert unknown.returncode == 2 and "no_such_option" in unknown.stderr
    bad = run("--set", "cassette_mode=sometimes")
    assert bad.returncode == 2 and "cassette_mode must be one of" in bad.stderr
    not_a_pair = run("--set", "oops")
    assert not_a_pair.returncode == 2 and "'oops' is not NAME=VALUE" in not_a_pair.stderr

    holder = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"))
    taken = run("--listen-port", str(holder.port))
    assert taken.returncode == 1 and "address already in use" in taken.stdout + taken.stderr
    holder.stop()


def test_prune_removes_what_a_logged_session_did_not_use(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder, usage_log = tmp_path / "cassettes", tmp_path / "used.log"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = openai_client(proxy.url, upstream)
    for prompt in ("keep", "drop"):
        chat(client, prompt)
    proxy.stop()
    (folder / "old").mkdir()
    shutil.copy(SEED, folder / "old")
    by_prompt = {
        json.loads(p.read_text())["request"]["body"]["messages"][0]["content"]: p
        for p in cassette_files(folder)
        if p.parent == folder
    }

    # a session that only asks for "keep", replayed, with a usage log
    proxy = start_cli_proxy(
        tmp_path, "-d", str(folder), "--mode", "replay", "--usage-log", str(usage_log)
    )
    assert chat(openai_client(proxy.url, upstream), "keep") == answer_text("A", "keep")
    proxy.stop()
    assert usage_log.read_text() == f"hit\t{by_prompt['keep'].name}\t{folder.resolve()}\n"

    runner = CliRunner()
    args = ["prune", "-d", str(folder), "--usage-log", str(usage_log)]
    dry = runner.invoke(cli, args, prog_name="cassette-proxy")
    assert dry.exit_code == 0
    assert sorted(dry.stdout.splitlines()) == sorted(
        [f"would remove {by_prompt['drop'].name}", "would remove old/0806aef47037.json"]
    )
    assert "2 unused, 1 used; nothing removed (dry run: add --yes)" in dry.stderr
    assert len(cassette_files(folder)) == 3

    done = runner.invoke(cli, [*args, "--yes"], prog_name="cassette-proxy")
    assert done.exit_code == 0 and "2 removed, 1 kept" in done.stderr
    assert cassette_files(folder) == [by_prompt["keep"]]
    assert not (folder / "old").exists()  # emptied test folders go too

    empty = tmp_path / "empty.log"
    empty.write_text("")
    refused = runner.invoke(cli, ["prune", "-d", str(folder), "-u", str(empty), "--yes"])
    assert refused.exit_code == 1 and "refusing to prune everything" in refused.stderr
    assert cassette_files(folder) == [by_prompt["keep"]]
