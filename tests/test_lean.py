"""The lean master (``python -m cassette_proxy.lean``, what scripts/run starts): a real
subprocess, the real openai SDK, fake upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cassette_proxy.lean import LeanMaster, _HookTable
from conftest import HOST, Proxy, cassette_files, free_port, openai_client
from mitmproxy import exceptions, hooks
from mitmproxy.options import Options

SEED = Path(__file__).resolve().parent.parent / "cassettes" / "0806aef47037.json"


def start_lean(
    tmp_path: Path,
    *sets: str,
    confdir: Path,
    cassette_dir: Path | None = None,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Proxy:
    """``python -m cassette_proxy.lean`` on a free port; waits for its listening line."""
    cdir = cassette_dir or tmp_path / "cassettes"
    cdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "cassette_proxy.lean", "--listen-port", str(port), *extra]
    for s in (f"confdir={confdir}", f"cassette_dir={cdir}", *sets):
        argv += ["--set", s]
    log_path = tmp_path / f"lean-{port}.log"
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=proc_env, cwd=tmp_path,
        )  # fmt: skip
    proxy = Proxy(proc, port, cdir, confdir, log_path, argv)
    deadline = time.monotonic() + 30
    while "listening at" not in proxy.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proxy.kill9()
            raise AssertionError(f"lean proxy did not start:\n{proxy.log_text()}")
        time.sleep(0.05)
    return proxy


@pytest.fixture
def lean(tmp_path, mitm_confdir):
    started: list[Proxy] = []

    def factory(*sets: str, **kwargs) -> Proxy:
        kwargs.setdefault("confdir", mitm_confdir)
        proxy = start_lean(tmp_path, *sets, **kwargs)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()
        print(f"---- {proxy!r} log ----\n{proxy.log_text()[-4000:]}")


def test_replays_the_seed_cassette_to_the_openai_sdk(lean, repo_root):
    proxy = lean("cassette_mode=replay", cassette_dir=repo_root / "cassettes")
    seed = json.loads(SEED.read_text())
    client = openai_client(proxy, "http://localhost:8000")
    chunks = list(client.chat.completions.create(**seed["request"]["body"]))
    assert len(chunks) == 9
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Listening on loopback only, by default (the lean master has no block_global).
    assert f"listening at {HOST}:{proxy.port}" in proxy.log_text()


def test_records_through_a_fake_upstream_then_replays_without_it(lean, upstream, tmp_path):
    recorder = lean("cassette_mode=record")
    client = openai_client(recorder, upstream)
    live = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "lean hello"}]
    )
    assert recorder.stop() == 0
    files = cassette_files(tmp_path / "cassettes")
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["request"]["body"]["messages"][0]["content"] == "lean hello"
    assert doc["request"]["headers"] == {}  # no credential in a cassette

    upstream.stop()
    replayer = lean("cassette_mode=replay")
    again = openai_client(replayer, upstream).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "lean hello"}]
    )
    assert again.choices[0].message.content == live.choices[0].message.content


def test_reverse_mode_forwards_records_and_replays(lean, upstream, tmp_path):
    proxy = lean("cassette_mode=auto", f"mode=reverse:{upstream.url}")
    client = openai_client(None, proxy)  # the proxy *is* the server to the client
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "reverse"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text and len(upstream.requests_to("/v1/chat/completions")) == 1
    deadline = time.monotonic() + 10
    while not cassette_files(tmp_path / "cassettes") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(cassette_files(tmp_path / "cassettes")) == 1
    upstream.stop()  # now offline: the same call is answered from the cassette
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "reverse"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def run_lean(*args: str, confdir: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cassette_proxy.lean", "--set", f"confdir={confdir}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_unsupported_and_unknown_options_fail_with_one_clear_line(mitm_confdir):
    done = run_lean("--set", "anticache=true", confdir=mitm_confdir)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "cassette-proxy: option anticache is not supported by the lean proxy; use --full / mitmdump"
    )
    typo = run_lean("--set", "cassete_mode=replay", confdir=mitm_confdir)
    assert typo.returncode == 2
    assert "unknown option(s): cassete_mode" in typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1
    bad = run_lean("--set", "cassette_mode=sometimes", confdir=mitm_confdir)
    assert bad.returncode == 2 and "cassette_mode must be one of" in bad.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_exits_cleanly_with_the_summary_line(lean, repo_root, sig):
    proxy = lean("cassette_mode=replay", cassette_dir=repo_root / "cassettes")
    seed = json.loads(SEED.read_text())
    client = openai_client(proxy, "http://localhost:8000")
    assert len(list(client.chat.completions.create(**seed["request"]["body"]))) == 9
    proxy.proc.send_signal(sig)
    assert proxy.proc.wait(15) == 0
    log = proxy.log_text()
    assert "cassette-proxy: 1 hits, 0 misses, 0 recorded" in log, log
    assert "Traceback" not in log


def test_the_ca_is_made_in_the_confdir_given(lean, tmp_path):
    confdir = tmp_path / "fresh-confdir"
    lean("cassette_mode=replay", confdir=confdir)
    assert (confdir / "mitmproxy-ca-cert.pem").exists()


def test_full_master_fallback_still_hosts_the_addon(lean, repo_root):
    proxy = lean("cassette_mode=replay", cassette_dir=repo_root / "cassettes", extra=("--full",))
    seed = json.loads(SEED.read_text())
    client = openai_client(proxy, "http://localhost:8000")
    assert len(list(client.chat.completions.create(**seed["request"]["body"]))) == 9
    assert proxy.stop() == 0


# ---- the hook table, in process (its contract with mitmproxy's AddonManager) ---------


class _Calls:
    def __init__(self, name: str, log: list[str], fail: Exception | None = None) -> None:
        self.name, self.log, self.fail = name, log, fail

    def running(self) -> None:
        self.log.append(self.name)
        if self.fail is not None:
            raise self.fail


def test_hook_table_keeps_mitmproxys_order_halt_and_error_rules():
    async def scenario() -> list[list[str]]:
        master = LeanMaster(Options())
        assert isinstance(master.addons, _HookTable)
        ec = master.addons.get("errorcheck")
        try:
            calls: list[str] = []
            seen = []
            master.addons.add(_Calls("a", calls, RuntimeError("boom")), _Calls("b", calls))
            await master.addons.trigger_event(hooks.RunningHook())
            seen.append(list(calls))
            master.addons.add(_Calls("c", calls, exceptions.AddonHalt()), _Calls("d", calls))
            calls.clear()
            await master.addons.trigger_event(hooks.RunningHook())
            seen.append(list(calls))
            return seen
        finally:
            ec.finish()
            await master.done()

    first, second = asyncio.run(scenario())
    assert first == ["a", "b"]  # an addon error is logged, the next addon still runs
    assert second == ["a", "b", "c"]  # AddonHalt stops the hook; new addons are seen


def test_a_socket_reads_small_only_while_other_work_waits_in_the_loop():
    """The lean proxy's reads (lean._read_fairly): big when a connection is alone, so a
    burst costs mitmproxy one pass; small while other callbacks wait, so one fast stream
    cannot hold every other client for a 256 KiB read (issue 12, the stall)."""
    from asyncio import selector_events

    from cassette_proxy import lean

    own = selector_events._SelectorSocketTransport.__dict__.get("max_size")
    lean._read_fairly()
    try:

        async def sizes() -> tuple[int, int]:
            server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            transport = writer.transport
            alone = transport.max_size
            asyncio.get_running_loop().call_soon(lambda: None)  # someone waiting
            busy = transport.max_size
            writer.close()
            server.close()
            return alone, busy

        alone, busy = asyncio.run(sizes())
        assert (alone, busy) == (lean.BIG_READ, lean.SMALL_READ)
        assert selector_events._SelectorDatagramTransport.max_size == 256 * 1024  # UDP kept
    finally:  # as asyncio had it, for the tests after this one
        if own is None:
            del selector_events._SelectorSocketTransport.max_size
        else:
            selector_events._SelectorSocketTransport.max_size = own
