"""cassette-proxy benchmark: replay, record, time to first token, cold start, soak.

Everything runs side by side on 127.0.0.1 in one go (``scripts/bench``; ``--smoke`` for
a seconds-long check without timing claims). Each proxy is a real subprocess; the
upstreams are ``bench/upstream.py`` processes; the load generator is ``wrk`` (or
``bench/loadgen.py`` when wrk is missing). On a 2-core machine the load generator, the
proxy and the upstream share the CPU: absolute numbers are lower than on a bigger box,
ratios between hosts measured back to back in the same run are what the targets use.

Hosts compared (all quiet: errors only on the terminal, as ``mitmdump -q``):
  mitmdump+baseline  mitmdump -s bench/baseline_addon.py (same bytes from memory)
  mitmdump+recorder  mitmdump -s addons/recorder.py (the addon as a mitmproxy script)
  lean+baseline      the baseline addon in cassette-proxy's lean master
  lean+recorder      python -m cassette_proxy.lean, as scripts/run starts it
  direct             the fast upstream itself, no proxy: the limit

The ``peers`` section (bench/peers.py) measures replay against Proxay, Talkback and
mitmproxy's own server replay, all in reverse mode (issue 21).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from corpus import make_cassettes  # noqa: E402
from pacing_bench import section_pacing  # noqa: E402
from peers import dechunk, section_peers  # noqa: E402

HOST = "127.0.0.1"
PY = sys.executable
MITMDUMP = str(Path(sys.executable).parent / "mitmdump")
RECORDER = str(ROOT / "addons" / "recorder.py")
BASELINE = str(BENCH / "baseline_addon.py")
OPTIMIZED = {"PYTHONOPTIMIZE": "1"}  # as scripts/run starts the lean proxy
N_DISTINCT = 64  # distinct recorded requests the replay load rotates through


# ---- processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        """CPU seconds the process has used so far (all its threads, user and system)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Bench:
    work: Path
    smoke: bool
    confdir: Path
    procs: list[Proc] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    before: str = ""  # --before: the addons/ folder of an older checkout, measured too

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int = 0
    ) -> Proc:
        port = port or free_port()
        log = self.work / f"{name}.log"
        full_env = {**os.environ, **self.env, **(env or {})}
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
            full_env.pop(var, None)
        argv = [a.replace("{port}", str(port)) for a in argv]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=self.work,
            )
        p = Proc(name, proc, port, log)
        self.procs.append(p)
        return p

    def proxy(
        self, name: str, host: str, sets: list[str], env: dict[str, str] | None = None
    ) -> Proc:
        """Start one of the hosts with ``sets`` (name=value) and wait until it listens."""
        common = [f"confdir={self.confdir}"]
        if host == "mitmdump":
            script = sets[0]
            argv = [MITMDUMP, "-q", "--listen-host", HOST, "--listen-port", "{port}"]
            if script != "none":
                argv += ["-s", script]
            for s in common + sets[1:]:
                argv += ["--set", s]
            p = self.spawn(name, argv, env)
        elif host == "lean-recorder":
            argv = [PY, "-m", "cassette_proxy.lean", "-q", "--listen-port", "{port}"]
            for s in common + sets:
                argv += ["--set", s]
            p = self.spawn(name, argv, {**OPTIMIZED, **(env or {})})
        else:  # lean host for any addon script (or none)
            script = sets[0]
            argv = [
                PY,
                str(BENCH / "host.py"),
                script,
                "termlog_verbosity=error",
                f"listen_host={HOST}",
                "listen_port={port}",
                *common,
                *sets[1:],
            ]
            p = self.spawn(name, argv, {**OPTIMIZED, **(env or {})})
        wait_listening(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()


def wait_listening(p: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise RuntimeError(f"{p.name} exited early:\n{p.log.read_text(errors='replace')}")
        try:
            socket.create_connection((HOST, p.port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{p.name} not listening after {timeout}s")


def start_upstream(b: Bench, name: str, *args: str) -> Proc:
    port = free_port()
    argv = [PY, str(BENCH / "upstream.py"), "--port", str(port), *args]
    p = b.spawn(name, argv, port=port)
    wait_listening(p)
    return p


# ---- HTTP helpers (setup, TTFT, cold start) -----------------------------------------


def post(
    proxy_port: int | None, url: str, body: str, timeout: float = 30.0
) -> tuple[int, bytes, float]:
    """One POST (through a forward proxy when proxy_port is set); status, body, first-byte s."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    target_port = proxy_port or parts.port
    target = url if proxy_port else parts.path
    data = body.encode()
    request = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    ).encode() + data
    with socket.create_connection((HOST, target_port), timeout=timeout) as s:
        t = time.monotonic()
        s.sendall(request)
        raw = b""
        first = None
        while not _complete(raw):
            buf = s.recv(65536)
            if not buf:
                break
            raw += buf
            if first is None and b"data:" in raw:
                first = time.monotonic() - t
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    if b"transfer-encoding: chunked" in head.lower():
        rest = dechunk(rest)
    return status, rest, first if first is not None else time.monotonic() - t


def _complete(raw: bytes) -> bool:
    """Whether a whole HTTP/1.1 response is in ``raw`` (content-length or chunked)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    lower = head.lower()
    m = re.search(rb"content-length:\s*(\d+)", lower)
    if m:
        return len(rest) >= int(m.group(1))
    if b"transfer-encoding: chunked" in lower:
        return rest.endswith(b"\r\n0\r\n\r\n") or rest == b"0\r\n\r\n"
    return False


def chat_body(text: str, stream: bool) -> str:
    msg = {"model": "bench-model", "messages": [{"role": "user", "content": text}]}
    return json.dumps({**msg, "stream": stream})


# ---- load generation --------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def _lua(path: str, authority: str, bodies: list[str] | None, counter_body: bool) -> str:
    if counter_body:
        # Every request its own body (so record mode records each one).
        body = (
            'string.format(\'{"model": "bench-model", "messages": [{"role": '
            '"user", "content": "Record %s-%d-%d"}], "stream": %s}\', run, id, n, stream)'
        )
        return (
            "local n = 0\nlocal id = 0\nlocal stream = os.getenv('BENCH_STREAM') or 'false'\n"
            "local run = os.getenv('BENCH_RUN') or '0'\n"
            "setup = function(thread) id = id + 1; thread:set('id', id) end\n"
            "request = function()\n  n = n + 1\n"
            f"  return wrk.format('POST', '{path}', "
            f"{{['Host']='{authority}', ['Content-Type']='application/json'}}, {body})\nend\n"
        )
    items = ",\n".join("[==[" + b + "]==]" for b in bodies or [])
    return (
        f"local bodies = {{\n{items}\n}}\nlocal i = math.random(#bodies)\n"
        "request = function()\n  i = i % #bodies + 1\n"
        f"  return wrk.format('POST', '{path}', "
        f"{{['Host']='{authority}', ['Content-Type']='application/json'}}, bodies[i])\nend\n"
    )


def load(
    b: Bench,
    port: int,
    path: str,
    authority: str,
    conns: int,
    seconds: float,
    bodies: list[str] | None = None,
    counter_body: bool = False,
    stream: bool = False,
) -> dict[str, Any]:
    """Drive CONNS keep-alive connections for SECONDS; rps, p50/p99 ms, errors."""
    if shutil.which("wrk") and not os.environ.get("BENCH_NO_WRK"):
        script = b.work / f"load-{port}-{conns}.lua"
        script.write_text(_lua(path, authority, bodies, counter_body))
        env = {**os.environ, "BENCH_STREAM": "true" if stream else "false"}
        env["BENCH_RUN"] = str(time.monotonic_ns())  # record mode: every body new
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{conns}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                f"http://{HOST}:{port}/",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=seconds + 60,
        ).stdout
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
        p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
        return {
            "rps": float(rps.group(1)) if rps else 0.0,
            "requests": int(total.group(1)) if total else 0,
            "errors": (int(errs.group(1)) if errs else 0)
            + (sum(int(x) for x in sock.groups()) if sock else 0),
            "p50_ms": _ms(p50.group(1)) if p50 else float("nan"),
            "p99_ms": _ms(p99.group(1)) if p99 else float("nan"),
            "tool": "wrk",
        }
    if counter_body:
        bodies = [chat_body(f"Record {i} {time.monotonic_ns()}", stream) for i in range(20000)]
    bodies_file = b.work / f"bodies-{port}.json"
    bodies_file.write_text(json.dumps(bodies))
    out = subprocess.run(
        [
            PY,
            str(BENCH / "loadgen.py"),
            f"http://{HOST}:{port}",
            path,
            str(conns),
            str(seconds),
            str(bodies_file),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "tool": "loadgen.py"}


# ---- sections -----------------------------------------------------------------------


def record_replay_set(b: Bench, upstream: Proc, cassettes: Path) -> tuple[list[str], list[str]]:
    """Record N_DISTINCT plain and streamed chats through the lean proxy; their bodies."""
    rec = b.proxy(
        "setup-record", "lean-recorder", [f"cassette_dir={cassettes}", "cassette_mode=record"]
    )
    url = f"http://{HOST}:{upstream.port}/v1/chat/completions"
    n = 4 if b.smoke else N_DISTINCT
    plain = [chat_body(f"Question {i}: what is {i} plus {i}?", False) for i in range(n)]
    streamed = [chat_body(f"Question {i}: count to {i}.", True) for i in range(n)]
    for body in plain + streamed:
        status, _, _ = post(rec.port, url, body)
        assert status == 200, f"recording for the benchmark failed: {status}"
    rec.stop()
    b.procs.remove(rec)
    return plain, streamed


def section_replay(b: Bench, up: Proc, cassettes: Path, out: dict[str, Any]) -> None:
    plain, streamed = record_replay_set(b, up, cassettes)
    # The baseline answers with the very bytes a replay sends, from memory.
    replay = b.proxy(
        "setup-replay", "lean-recorder", [f"cassette_dir={cassettes}", "cassette_mode=replay"]
    )
    url = f"http://{HOST}:{up.port}/v1/chat/completions"
    for kind, body in (("json", plain[0]), ("sse", streamed[0])):
        status, data, _ = post(replay.port, url, body)
        assert status == 200, f"replay for the benchmark failed: {status}"
        (b.work / f"{kind}.body").write_bytes(data)
        b.env[f"BENCH_{kind.upper()}_BODY"] = str(b.work / f"{kind}.body")
    out["sizes"] = {
        "json_bytes": len((b.work / "json.body").read_bytes()),
        "sse_bytes": len((b.work / "sse.body").read_bytes()),
    }
    replay.stop()
    b.procs.remove(replay)

    sets = [f"cassette_dir={cassettes}", "cassette_mode=replay"]
    hosts = {
        "mitmdump+baseline": b.proxy("md-base", "mitmdump", [BASELINE]),
        "mitmdump+recorder": b.proxy("md-rec", "mitmdump", [RECORDER, *sets]),
        "lean+baseline": b.proxy("lean-base", "lean", [BASELINE]),
        "lean+recorder": b.proxy("lean-rec", "lean-recorder", sets),
    }
    conns_list = [16] if b.smoke else [1, 16, 64]
    rows = []
    targets = [*hosts.items(), ("direct", up)]
    for kind, bodies in (("json", plain), ("sse", streamed)):
        for conns in conns_list:
            trials = interleaved(b, targets, conns, url, up, bodies=bodies)
            for name, r in trials.items():
                rows.append({"kind": kind, "conns": conns, "host": name, **r})
                show("replay", kind, conns, name, r)
    for p in hosts.values():
        p.stop()
        b.procs.remove(p)
    out["replay"] = rows


def section_ablation(b: Bench, up: Proc, out: dict[str, Any]) -> None:
    """What each part of the lean master buys, with the baseline addon (plain JSON, c16)."""
    url = f"http://{HOST}:{up.port}/v1/chat/completions"
    bodies = [chat_body(f"Question {i}: what is {i} plus {i}?", False) for i in range(8)]
    no_o = {"PYTHONOPTIMIZE": ""}
    hosts = [
        ("mitmdump (36 addons), -O", b.proxy("ab-md", "mitmdump", [BASELINE], OPTIMIZED)),
        ("lean, mitmproxy's dispatch, no -O", b.proxy("ab-1", "lean", [BASELINE, "--slow"], no_o)),
        ("lean, hook table, no -O", b.proxy("ab-2", "lean", [BASELINE], no_o)),
        ("lean, hook table, -O", b.proxy("ab-3", "lean", [BASELINE])),
    ]
    trials = interleaved(b, hosts, 16, url, up, bodies=bodies)
    rows = []
    for name, p in hosts:
        p.stop()
        b.procs.remove(p)
        rows.append({"host": name, **trials[name]})
        show("ablation", "json", 16, name, trials[name])
    out["ablation"] = rows


ROUNDS = 3  # interleaved rounds per measurement; the median is reported


def interleaved(
    b: Bench,
    targets: list[tuple[str, Proc]],
    conns: int,
    url: str,
    up: Proc,
    bodies: list[str] | None = None,
    stream: bool = False,
) -> dict[str, dict[str, Any]]:
    """Load each target in turn, ROUNDS times (2 s each; 1 round of 1 s in smoke), so
    that a burst of other work on the machine hits one trial, not one host; the median
    trial (by rps) of each target is its result, all trials are kept."""
    rounds, seconds = (1, 1) if b.smoke else (ROUNDS, 2)
    counter = bodies is None
    trials: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in targets}
    for i in range(rounds):
        for name, p in targets:
            path = "/v1/chat/completions" if name == "direct" else url
            authority = f"{HOST}:{up.port}"
            if i == 0 and not b.smoke:  # warm up: connections, caches, code paths
                load(b, p.port, path, authority, conns, 1, bodies, counter, stream)
            cpu = p.cpu_s()
            trial = load(b, p.port, path, authority, conns, seconds, bodies, counter, stream)
            # The process's CPU per request: steadier than req/s on a shared machine.
            used = p.cpu_s() - cpu
            trial["cpu_us_per_req"] = round(used / trial["requests"] * 1e6) if trial[
                "requests"
            ] else float("nan")
            trials[name].append(trial)
    result = {}
    for name, rs in trials.items():
        ordered = sorted(rs, key=lambda r: r["rps"])
        mid = ordered[len(ordered) // 2]
        total = {"requests": sum(r["requests"] for r in rs), "errors": sum(r["errors"] for r in rs)}
        cpu = sorted(r["cpu_us_per_req"] for r in rs)[len(rs) // 2]  # the median trial's
        result[name] = {**mid, **total, "trials_rps": [round(r["rps"], 1) for r in rs],
                        "cpu_us_per_req": cpu}  # fmt: skip
    return result


def show(
    section: str, kind: str, conns: int, name: str, r: dict[str, Any], extra: str = ""
) -> None:
    trials = "/".join(f"{x:.0f}" for x in r.get("trials_rps", []))
    cpu = r.get("cpu_us_per_req")
    print(
        f"  {section} {kind:4} c={conns:<3} {name:26} {r['rps']:8.0f} req/s  "
        f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  err {r['errors']}"
        f"  cpu {cpu} us/req  [{trials}]{extra}",
        flush=True,
    )


# What section_record measures: each answer kind, its upstream's chunk count (None: JSON).
RECORD_KINDS = (("json", None), ("sse40", 40), ("sse100", 100))
KIND_NAMES = {"json": "plain JSON", "sse": "SSE, 100 chunks", "sse40": "SSE, 40 chunks",
              "sse100": "SSE, 100 chunks"}  # fmt: skip


def count_cassettes(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.json")) if folder.exists() else 0


def section_record(b: Bench, ups: dict[int, Proc], out: dict[str, Any]) -> None:
    """Recording against the very same proxy in passthrough mode (`cassette-proxy run`,
    i.e. ``python -m cassette_proxy.lean``, with ``cassette_mode=passthrough``), side by
    side: each kind of answer at 1, 16 and 64 connections, every request a new body
    (so each recording writes a new cassette)."""
    rows = []
    conns_list = [16] if b.smoke else [1, 16, 64]
    for kind, chunks in RECORD_KINDS:
        if b.smoke and kind == "sse100":
            continue
        up = ups[chunks or 100]
        url = f"http://{HOST}:{up.port}/v1/chat/completions"
        hosts: list[tuple[str, Proc]] = []
        folders: dict[str, Path] = {}
        variants = [("lean+recorder passthrough", "passthrough", {}),
                    ("lean+recorder record", "record", {})]  # fmt: skip
        if b.before:
            variants.append(("before: lean+recorder record", "record", before_env(b)))
        for name, mode, env in variants:
            tag = f"rec-{kind}-{mode}-{len(folders)}"
            folder = folders[name] = b.work / tag
            sets = [f"cassette_dir={folder}", f"cassette_mode={mode}"]
            hosts.append((name, b.proxy(tag, "lean-recorder", sets, env)))
        for conns in conns_list:
            before = {name: count_cassettes(folder) for name, folder in folders.items()}
            trials = interleaved(b, hosts, conns, url, up, bodies=None, stream=kind != "json")
            for name, _ in hosts:
                written = count_cassettes(folders[name]) - before[name]
                r = trials[name]
                mode = name.rsplit(" ", 1)[1]
                rows.append({"kind": kind, "conns": conns, "host": name, "mode": mode,
                             "cassettes": written, **r})  # fmt: skip
                show("record", kind, conns, name, r, f"  cassettes {written}")
        for _, p in hosts:
            p.stop()
            b.procs.remove(p)
    out["record"] = rows


def before_env(b: Bench) -> dict[str, str]:
    """The environment that makes a proxy import the package of the --before checkout."""
    return {"PYTHONPATH": os.pathsep.join([b.before, os.environ.get("PYTHONPATH", "")])}


def fetch_big(port: int, url: str, body: str, folder: Path, timeout: float = 600.0) -> dict:
    """One big POST through the proxy, read to the end; for a stream, whether its own
    cassette (a new file in folder holding this request's body) was in place the moment
    ``data: [DONE]`` arrived."""
    from urllib.parse import urlsplit

    data = body.encode()
    request = (
        f"POST {url} HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + data
    received = bytearray()
    at_done = None
    known = set(folder.rglob("*.json")) if folder.exists() else set()
    marker = json.loads(body)["messages"][0]["content"].encode()
    t = time.monotonic()
    length = None  # the body's end: content-length, or the last chunk of a chunked body
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(request)
        while True:
            buf = s.recv(1 << 20)
            if not buf:
                break
            received += buf
            if at_done is None and b"data: [DONE]" in received[-(len(buf) + 16) :]:
                new = set(folder.rglob("*.json")) - known
                at_done = any(marker in f.read_bytes()[:8192] for f in new)
            if length is None and b"\r\n\r\n" in received:
                head, _, _ = bytes(received[:65536]).partition(b"\r\n\r\n")
                m = re.search(rb"content-length:\s*(\d+)", head.lower())
                length = len(head) + 4 + int(m.group(1)) if m else -1
            if length is not None and length >= 0 and len(received) >= length:
                break
            if length == -1 and received.endswith(b"\r\n0\r\n\r\n"):
                break
    status = int(bytes(received[:16]).split(b" ", 2)[1]) if received else 0
    return {"status": status, "bytes": len(received), "seconds": time.monotonic() - t,
            "cassette_in_place_at_done": at_done}  # fmt: skip


def replay_latencies(port: int, url: str, bodies: list[str], stop: Any, min_s: float) -> list:
    """Sequential replays on one keep-alive connection until ``stop`` is set (and at
    least ``min_s`` seconds); each one's latency in ms."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    headers = {"content-type": "application/json"}
    out: list[float] = []
    t0 = time.monotonic()
    i = 0
    while not stop.is_set() or time.monotonic() - t0 < min_s:
        t = time.monotonic()
        conn.request("POST", url, bodies[i % len(bodies)], headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"replay during the stall test got {resp.status}")
        out.append((time.monotonic() - t) * 1000)
        i += 1
    conn.close()
    return out


def section_stall(
    b: Bench, cassettes: Path, out: dict[str, Any], label: str = "stall", env: Any = None
) -> None:
    """Another client's replay latency while one huge stream and one huge answer are
    recorded, against the same client's latency with nothing being recorded (rounds
    interleaved: idle, busy, idle, busy, ...). One proxy in auto mode: the client's
    requests go to an upstream that is not there, so they are answered from cassettes
    (the host is not in the key); the big ones go to the live upstream and are recorded.
    (Not record-if-missing: there the same request again is its sequence's next position,
    forwarded and recorded.)"""
    import threading

    chunks, mb = (2000, 1.0) if b.smoke else (60000, 25.0)
    up = start_upstream(b, "big-upstream", "--big-chunks", str(chunks), "--big-json-mb", str(mb))
    url = f"http://{HOST}:{up.port}/v1/chat/completions"
    offline = f"http://{HOST}:{free_port()}/v1/chat/completions"  # nothing listens there
    folder = b.work / f"{label}-cassettes"
    shutil.copytree(cassettes, folder)
    p = b.proxy(label, "lean-recorder", [f"cassette_dir={folder}",
                                         "cassette_mode=auto"], env)  # fmt: skip
    bodies = [chat_body(f"Question {i}: what is {i} plus {i}?", False)
              for i in range(4 if b.smoke else N_DISTINCT)]  # fmt: skip
    never = threading.Event()
    never.set()
    replay_latencies(p.port, offline, bodies, never, 1.0)  # warm: every request is a hit
    # The upstream makes its big answers once: not inside a measured round.
    for body in (chat_body("BIG-STREAM warm-up", True), chat_body("BIG-JSON warm-up", False)):
        fetch_big(up.port, "/v1/chat/completions", body, folder)
    rounds = 1 if b.smoke else 3
    idle: list[dict[str, Any]] = []
    busy: list[dict[str, Any]] = []
    for i in range(rounds):
        lat = replay_latencies(p.port, offline, bodies, never, 3.0 if not b.smoke else 1.0)
        idle.append({"n": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
                     "max_ms": max(lat)})  # fmt: skip
        stop = threading.Event()
        results: dict[str, dict[str, Any]] = {}

        def big(what: str, body: str, results: dict[str, Any] = results) -> None:
            results[what] = fetch_big(p.port, url, body, folder)

        tag = f"{i} {time.monotonic_ns()}"
        threads = [
            threading.Thread(target=big, args=("stream", chat_body(f"BIG-STREAM {tag}", True))),
            threading.Thread(target=big, args=("json", chat_body(f"BIG-JSON {tag}", False))),
        ]
        before = count_cassettes(folder)
        lat_box: list[list[float]] = []

        def measure(box: list[list[float]] = lat_box, stop: Any = stop) -> None:
            box.append(replay_latencies(p.port, offline, bodies, stop, 0.5))

        client = threading.Thread(target=measure)
        t = time.monotonic()
        client.start()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        window = time.monotonic() - t
        stop.set()
        client.join()
        lat = lat_box[0]
        written = count_cassettes(folder) - before
        row = {"n": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
               "max_ms": max(lat), "window_s": window, "cassettes": written,
               "stream": results.get("stream"), "json": results.get("json")}  # fmt: skip
        busy.append(row)
        print(
            f"  {label} round {i}: idle p50 {idle[-1]['p50_ms']:.2f} p99 {idle[-1]['p99_ms']:.2f}"
            f" max {idle[-1]['max_ms']:.1f} ms; recording p50 {row['p50_ms']:.2f} p99 "
            f"{row['p99_ms']:.2f} max {row['max_ms']:.1f} ms over {window:.1f} s, "
            f"{written} cassettes; stream {results['stream']['seconds']:.1f} s "
            f"(its cassette in place at [DONE]: "
            f"{results['stream']['cassette_in_place_at_done']}), json "
            f"{results['json']['seconds']:.1f} s",
            flush=True,
        )
    p.stop()
    b.procs.remove(p)
    up.stop()
    b.procs.remove(up)

    def median(rows: list[dict[str, Any]], k: str) -> float:
        return sorted(r[k] for r in rows)[len(rows) // 2]

    out[label] = {
        "chunks": chunks, "json_mb": mb, "idle": idle, "busy": busy,
        "idle_p99_ms": median(idle, "p99_ms"), "busy_p99_ms": median(busy, "p99_ms"),
        "idle_p50_ms": median(idle, "p50_ms"), "busy_p50_ms": median(busy, "p50_ms"),
    }  # fmt: skip


def section_record_soak(b: Bench, up: Proc, out: dict[str, Any]) -> None:
    """10,000 recordings (plain and streamed, 256 distinct requests recorded over and
    over, 16 connections) through one recording proxy; its RSS along the way."""
    url = f"http://{HOST}:{up.port}/v1/chat/completions"
    bodies = [chat_body(f"Soak {i}: say {i}.", i % 2 == 1) for i in range(256)]
    folder = b.work / "soak-record"
    p = b.proxy("record-soak", "lean-recorder", [f"cassette_dir={folder}",
                                                 "cassette_mode=record"])  # fmt: skip
    target = 300 if b.smoke else 10000
    seconds = 1 if b.smoke else 3
    warm = load(b, p.port, url, f"{HOST}:{up.port}", 16, seconds, bodies)
    before = p.rss_mb()
    done, errors, t = 0, 0, time.monotonic()
    samples = [before]
    while done < target:
        r = load(b, p.port, url, f"{HOST}:{up.port}", 16, seconds, bodies)
        done += r["requests"]
        errors += r["errors"]
        samples.append(p.rss_mb())
    after = p.rss_mb()
    files = count_cassettes(folder)
    p.stop()
    b.procs.remove(p)
    out["record_soak"] = {
        "warmup_requests": warm["requests"], "recordings": done, "errors": errors,
        "seconds": time.monotonic() - t, "cassettes": files, "rss_before_mb": before,
        "rss_after_mb": after, "rss_samples_mb": samples, "growth_mb": after - before,
    }  # fmt: skip
    print(
        f"  record soak {done} recordings ({files} cassette files): RSS {before:.1f} MB -> "
        f"{after:.1f} MB ({after - before:+.1f} MB), errors {errors}",
        flush=True,
    )


def section_ttft(b: Bench, out: dict[str, Any]) -> None:
    """First SSE event: upstream sends it after 200 ms, then one every 20 ms."""
    events = 10
    slow = start_upstream(
        b, "slow-upstream", "--chunks", str(events), "--first-ms", "200", "--every-ms", "20"
    )
    url = f"http://{HOST}:{slow.port}/v1/chat/completions"
    targets = {
        "direct": None,
        "lean+recorder passthrough": b.proxy(
            "ttft-lean-pass",
            "lean-recorder",
            [f"cassette_dir={b.work / 'ttft-pass'}", "cassette_mode=passthrough"],
        ),
        "lean+recorder record": b.proxy(
            "ttft-lean",
            "lean-recorder",
            [f"cassette_dir={b.work / 'ttft-lean'}", "cassette_mode=record"],
        ),
        "mitmdump+recorder record": b.proxy(
            "ttft-md",
            "mitmdump",
            [RECORDER, f"cassette_dir={b.work / 'ttft-md'}", "cassette_mode=record"],
        ),
    }
    n = 3 if b.smoke else 25
    samples: dict[str, list[float]] = {k: [] for k in targets}
    for i in range(n + 1):
        for name, p in targets.items():
            _, data, first = post(p.port if p else None, url, chat_body(f"TTFT {name} {i}", True))
            assert b"[DONE]" in data, f"{name}: stream did not finish"
            if i:  # the first round warms connections and code paths
                samples[name].append(first * 1000)
    rows = []
    direct, passing = samples["direct"], samples["lean+recorder passthrough"]
    for name, xs in samples.items():
        row = {"target": name, "n": len(xs), "p50_ms": _pct(xs, 0.5), "p99_ms": _pct(xs, 0.99)}
        row["added_p50_ms"] = row["p50_ms"] - _pct(direct, 0.5)
        row["added_p99_ms"] = row["p99_ms"] - _pct(direct, 0.99)
        # What recording adds to the very same proxy (its own cost is in both).
        row["recording_p50_ms"] = row["p50_ms"] - _pct(passing, 0.5)
        rows.append(row)
        print(
            f"  ttft {name:26} p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
            f"added p50 {row['added_p50_ms']:+6.1f} ms  p99 {row['added_p99_ms']:+6.1f} ms  "
            f"(vs passthrough p50 {row['recording_p50_ms']:+5.1f} ms)",
            flush=True,
        )
    for p in [*[t for t in targets.values() if t], slow]:
        p.stop()
        b.procs.remove(p)
    out["ttft"] = {"first_event_ms": 200, "every_ms": 20, "events": events, "rows": rows}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _probe_request(folder: Path) -> tuple[str, str]:
    """A request that some cassette in folder answers: (url, body)."""
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        req = doc["request"]
        varied_by_test_id = "[variant-" in (doc.get("test_id") or "")
        if req.get("endpoint") == "/v1/chat/completions" and not varied_by_test_id:
            return "http://localhost:8000/v1/chat/completions", json.dumps(req["body"])
    raise RuntimeError("no chat cassette to probe with")


def cold_start(b: Bench, host: str, folder: Path, cache: Path, url: str, body: str) -> tuple:
    """Start a proxy over folder; seconds until the first replay is served, and RSS then."""
    env = {"CASSETTE_PROXY_CACHE_DIR": str(cache)}
    t = time.monotonic()
    if host == "lean+recorder":
        argv = [PY, "-m", "cassette_proxy.lean", "-q", "--listen-port", "{port}"]
        env.update(OPTIMIZED)
    else:
        argv = [MITMDUMP, "-q", "-s", RECORDER, "--listen-host", HOST, "--listen-port", "{port}"]
    for s in [f"confdir={b.confdir}", f"cassette_dir={folder}", "cassette_mode=replay"]:
        argv += ["--set", s]
    p = b.spawn(f"cold-{host}", argv, env)
    status = 0
    while time.monotonic() - t < 120:
        try:
            status, _, _ = post(p.port, url, body, timeout=60)
            break
        except OSError:
            time.sleep(0.01)
    served = time.monotonic() - t
    rss = p.rss_mb()
    p.stop()
    b.procs.remove(p)
    assert status == 200, f"cold start probe got {status} ({p.log})"
    return served, rss


def section_cold(b: Bench, out: dict[str, Any]) -> None:
    """A first start (no index cache) and a restart, 3 times each (median reported)."""
    sizes = [200] if b.smoke else [1000, 10000]
    repeats = 1 if b.smoke else 3
    rows = []
    for n in sizes:
        folder = b.work / f"cold-{n}"
        t = time.monotonic()
        nbytes = make_cassettes(folder, n)
        made = time.monotonic() - t
        url, body = _probe_request(folder)
        for host in ("lean+recorder",) if b.smoke else ("lean+recorder", "mitmdump+recorder"):
            runs: dict[str, list[tuple[float, float]]] = {"first start": [], "restart": []}
            for i in range(repeats):
                cache = b.work / f"index-cache-{host}-{n}-{i}"
                for start in ("first start", "restart"):
                    runs[start].append(cold_start(b, host, folder, cache, url, body))
            for start, results in runs.items():
                seconds = sorted(r[0] for r in results)
                served = seconds[len(seconds) // 2]
                rss = max(r[1] for r in results)
                row = {"cassettes": n, "bytes": nbytes, "host": host, "start": start,
                       "seconds": served, "rss_mb": rss,
                       "trials_s": [round(r[0], 2) for r in results]}  # fmt: skip
                rows.append(row)
                print(
                    f"  cold {n:6} cassettes ({nbytes / 1e6:5.1f} MB, made in {made:4.1f} s) "
                    f"{host:18} {start:11} first replay after {served:5.2f} s, RSS {rss:5.1f} MB"
                    f"  [{'/'.join(f'{x:.2f}' for x in row['trials_s'])}]",
                    flush=True,
                )
        shutil.rmtree(folder, ignore_errors=True)
    out["cold_start"] = rows


def section_soak(b: Bench, up: Proc, cassettes: Path, out: dict[str, Any]) -> None:
    url = f"http://{HOST}:{up.port}/v1/chat/completions"
    plain = [
        chat_body(f"Question {i}: what is {i} plus {i}?", False)
        for i in range(4 if b.smoke else N_DISTINCT)
    ]
    streamed = [
        chat_body(f"Question {i}: count to {i}.", True) for i in range(4 if b.smoke else N_DISTINCT)
    ]
    bodies = plain + streamed
    p = b.proxy("soak", "lean-recorder", [f"cassette_dir={cassettes}", "cassette_mode=replay"])
    target = 500 if b.smoke else 20000
    warm = load(b, p.port, url, f"{HOST}:{up.port}", 16, 1 if b.smoke else 2, bodies)
    before = p.rss_mb()
    done, errors, t = 0, 0, time.monotonic()
    samples = [before]
    while done < target:
        r = load(b, p.port, url, f"{HOST}:{up.port}", 16, 1 if b.smoke else 2, bodies)
        done += r["requests"]
        errors += r["errors"]
        samples.append(p.rss_mb())
    after = p.rss_mb()
    p.stop()
    b.procs.remove(p)
    out["soak"] = {
        "warmup_requests": warm["requests"],
        "replays": done,
        "errors": errors,
        "seconds": time.monotonic() - t,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "rss_samples_mb": samples,
        "growth_mb": after - before,
    }
    print(
        f"  soak {done} replays (mixed plain/streamed): RSS {before:.1f} MB -> {after:.1f} MB "
        f"({after - before:+.1f} MB), errors {errors}",
        flush=True,
    )


def section_profile(b: Bench, up: Proc, cassettes: Path, out: dict[str, Any]) -> None:
    """py-spy over the lean proxy under load: where the CPU goes, replaying and recording."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        out["profile"] = {"skipped": "py-spy is not installed"}
        return
    url = f"http://{HOST}:{up.port}/v1/chat/completions"
    bodies = [chat_body(f"Question {i}: what is {i} plus {i}?", False) for i in range(N_DISTINCT)]
    out["profile"] = {}
    for what, sets, lua_src in (
        ("replay json c16", ["cassette_mode=replay", f"cassette_dir={cassettes}"],
         _lua(url, f"{HOST}:{up.port}", bodies, False)),
        ("record json c16", ["cassette_mode=record", f"cassette_dir={b.work / 'profile-rec'}"],
         _lua(url, f"{HOST}:{up.port}", None, True)),
        ("record sse c16", ["cassette_mode=record", f"cassette_dir={b.work / 'profile-sse'}"],
         _lua(url, f"{HOST}:{up.port}", None, True)),
    ):  # fmt: skip
        p = b.proxy("profile", "lean-recorder", sets)
        raw = b.work / "profile.txt"
        lua = b.work / "profile.lua"
        lua.write_text(lua_src)
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c16", "-d12s", "-s", str(lua), f"http://{HOST}:{p.port}/"],
            stdout=subprocess.DEVNULL,
            env={
                **os.environ,
                "BENCH_RUN": "profile",
                "BENCH_STREAM": "true" if "sse" in what else "false",
            },  # fmt: skip
        )
        time.sleep(1.5)
        subprocess.run(
            [spy, "record", "-p", str(p.proc.pid), "-d", "8", "-r", "250", "-f", "raw",
             "-o", str(raw)],
            capture_output=True, timeout=60,
        )  # fmt: skip
        wrk.wait()
        p.stop()
        b.procs.remove(p)
        summary = summarize_profile(raw) if raw.exists() else {"skipped": "py-spy failed"}
        out["profile"][what] = summary
        print(f"  profile {what}: {summary.get('areas_pct', summary)}", flush=True)


# Where a sample's time goes, by the innermost frame that names one of these areas.
AREAS = [
    (
        "cassette addon: key (json.loads, redaction, normal form, canonical JSON, sha256)",
        ("Keyer.key",),
    ),
    ("cassette addon: lookup + cached answer + Response", ("Replayer.answer",)),
    # Recording, most specific first (a stack is counted in the first area it matches).
    (
        "record: cassette text (orjson + fix-ups, or json)",
        ("dumps_indented", "Cassette.to_json", "_fix_small_floats", "_plain_json", "plain ("),
    ),
    ("record: store index of the new cassette", ("CassetteStore.add",)),
    ("record: cassette model, redaction, file name", ("Scribe.cassette",)),
    ("record: temp file, write, rename", ("write_cassette",)),
    (
        "record: stream chunks (framing, orjson per chunk)",
        ("SSEChunkRecorder.", "NDJSONRecorder.", "RawLinesRecorder."),
    ),
    (
        "record: the rest (answer parse, fsync thread, hooks)",
        (
            "Scribe.",
            "Recorder.",
            "sync_cassette",
            "Tap.",
            "CassetteWriter.",
        ),
    ),
    (
        "cassette addon: other hooks + probe",
        ("Intake.", "Router.", "Fallback.", "ReplayShaper.", "UpstreamProbe"),
    ),
    ("hook dispatch (lean _HookTable)", ("_HookTable.",)),
    ("mitmproxy HTTP/1 layers + connection handling", ("mitmproxy/proxy/",)),
    ("asyncio event loop + sockets", ("asyncio/", "selectors.py")),
]


# Leaf frames of waiting, not working: the event loop's select, idle writer threads.
IDLE_FRAMES = ("EpollSelector.select", "_worker (concurrent/futures/thread.py:89)")


def summarize_profile(raw: Path) -> dict[str, Any]:
    total = idle_samples = 0
    areas: dict[str, int] = {name: 0 for name, _ in AREAS}
    areas["other"] = 0
    frames: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        parts = stack.split(";")
        if any(idle in parts[-1] for idle in IDLE_FRAMES):
            idle_samples += count
            continue
        total += count
        frames[parts[-1]] = frames.get(parts[-1], 0) + count
        for name, needles in AREAS:  # first matching area, outermost-first semantics
            if any(any(x in f for x in needles) for f in parts[4:]):
                areas[name] += count
                break
        else:
            areas["other"] += count
    top = sorted(frames.items(), key=lambda kv: -kv[1])[:15]
    return {
        "samples": total,
        "idle_samples": idle_samples,
        "areas_pct": {k: round(100 * v / total, 1) for k, v in areas.items()} if total else {},
        "top_self_pct": [[f, round(100 * c / total, 1)] for f, c in top] if total else [],
    }


# ---- report -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import mitmproxy.version

    wrk = shutil.which("wrk")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "load_generator": (
            subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines()
            or ["wrk"]
        )[0]
        if wrk
        else "bench/loadgen.py",
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def ratios(out: dict[str, Any]) -> dict[str, Any]:
    """The target ratios, from rows of this one run."""
    res: dict[str, Any] = {}

    def rps(rows: list[dict[str, Any]], **match: Any) -> float:
        for r in rows:
            if all(r.get(k) == v for k, v in match.items()):
                return float(r["rps"]) or float("nan")
        return float("nan")

    def cpu(rows: list[dict[str, Any]], **match: Any) -> float:
        for r in rows:
            if all(r.get(k) == v for k, v in match.items()):
                return float(r.get("cpu_us_per_req") or "nan")
        return float("nan")

    rep = out.get("replay", [])
    for kind in ("json", "sse"):
        for conns in sorted({r["conns"] for r in rep}):
            m = {"kind": kind, "conns": conns}
            res[f"replay {kind} c{conns}: lean+recorder / lean+baseline"] = rps(
                rep, host="lean+recorder", **m
            ) / rps(rep, host="lean+baseline", **m)
            res[f"replay {kind} c{conns}: mitmdump+recorder / mitmdump+baseline"] = rps(
                rep, host="mitmdump+recorder", **m
            ) / rps(rep, host="mitmdump+baseline", **m)
            res[f"replay {kind} c{conns}: lean+recorder / mitmdump+recorder"] = rps(
                rep, host="lean+recorder", **m
            ) / rps(rep, host="mitmdump+recorder", **m)
    rec = out.get("record", [])
    for kind in ("json", "sse40", "sse100"):
        for conns in sorted({r["conns"] for r in rec}):
            m = {"kind": kind, "conns": conns}
            res[f"record {kind} c{conns}: record / passthrough (same lean proxy)"] = rps(
                rec, host="lean+recorder record", **m
            ) / rps(rec, host="lean+recorder passthrough", **m)
            res[f"record {kind} c{conns}: proxy CPU per request, passthrough / record"] = cpu(
                rec, host="lean+recorder passthrough", **m
            ) / cpu(rec, host="lean+recorder record", **m)
    for label in ("stall", "stall_before"):
        if label in out:
            st = out[label]
            res[f"{label}: replay p99 while recording big / idle p99"] = (
                st["busy_p99_ms"] / st["idle_p99_ms"]
            )
    for kind in ("json", "sse40", "sse100"):
        for conns in sorted({r["conns"] for r in rec}):
            m = {"kind": kind, "conns": conns}
            res[f"record {kind} c{conns}: before: record / passthrough (same lean proxy)"] = rps(
                rec, host="before: lean+recorder record", **m
            ) / rps(rec, host="lean+recorder passthrough", **m)
    return {k: round(v, 3) for k, v in res.items() if v == v}  # NaN: not measured


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny sizes, no claims")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "latest.json"))
    ap.add_argument(
        "--only",
        default="replay,record,stall,ttft,cold,soak,profile,pacing",
        help="comma-separated sections (peers: only when asked, it installs from npm)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--before",
        default="",
        help="also measure recording with the addons/ folder of an older checkout "
        "(git archive REV addons | tar -x -C DIR; pass DIR/addons)",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))

    work = Path(tempfile.mkdtemp(prefix="cassette-bench-"))
    confdir = work / "confdir"
    from mitmproxy.certs import CertStore

    CertStore.from_store(confdir, "mitmproxy", 2048)  # the CA once, before any proxy
    b = Bench(
        work, args.smoke, confdir, before=str(Path(args.before).resolve()) if args.before else ""
    )
    b.env["CASSETTE_PROXY_CACHE_DIR"] = str(work / "index-cache")  # never the user's cache
    out: dict[str, Any] = {"smoke": args.smoke, "machine": machine(), "started": time.time()}
    t0 = time.monotonic()
    try:
        up = start_upstream(b, "upstream", "--chunks", "100")
        cassettes = work / "replay-cassettes"
        print(
            f"benchmark in {work} ({'smoke' if args.smoke else 'full'}), "
            f"load generator: {out['machine']['load_generator']}",
            flush=True,
        )
        if {"replay", "soak", "profile"} & only:
            if "replay" in only:
                section_replay(b, up, cassettes, out)
                if not args.smoke:
                    section_ablation(b, up, out)
            else:
                record_replay_set(b, up, cassettes)
        if "record" in only:
            ups = {100: up, 40: start_upstream(b, "upstream-40", "--chunks", "40")}
            section_record(b, ups, out)
        if "stall" in only:
            if not cassettes.exists():
                record_replay_set(b, up, cassettes)
            section_stall(b, cassettes, out)
            if b.before:
                section_stall(b, cassettes, out, "stall_before", before_env(b))
        if "ttft" in only:
            section_ttft(b, out)
        if "cold" in only:
            section_cold(b, out)
        if "soak" in only:
            section_soak(b, up, cassettes, out)
            section_record_soak(b, up, out)
        if "profile" in only and not args.smoke and shutil.which("wrk"):
            section_profile(b, up, cassettes, out)
        if "pacing" in only:
            section_pacing(b, out, start_upstream, chat_body, RECORDER)
        if "peers" in only:
            section_peers(
                b, out, start_upstream, load, wait_listening, chat_body, RECORDER, Path(PY).parent
            )
    finally:
        b.stop_all()
        out["seconds"] = time.monotonic() - t0
        out["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        out["ratios"] = ratios(out)
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nratios (this run):")
    for k, v in out["ratios"].items():
        print(f"  {k:66} {v:6.3f}")
    print(f"\nwrote {path} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
