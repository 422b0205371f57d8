"""Replay against peers (issue 21; ``scripts/bench --only peers``; docs/benchmarks.md).

Five record/replay tools, all in reverse mode (a base URL), record the same two requests
from the bench's own upstream (``bench/upstream.py --chunks 40``): a chat completion
(JSON) and a 40-chunk SSE stream. Then the upstream is stopped and each tool, restarted
in replay mode on the port it recorded on, is checked (does it answer the bytes the
upstream sent?) and loaded with ``wrk`` (one thread; ``bench/loadgen.py`` without wrk)
at 1 and 16 connections, 3 interleaved rounds, the median round reported.

  cassette-proxy run          the lean master, as a user starts it (--reverse, --mode replay)
  mitmdump + recorder         mitmdump -s addons/recorder.py, the addon as a script
  mitmproxy --server-replay   a flow file written by ``mitmdump -w``, served with
                              server_replay_reuse (repeated requests replay),
                              server_replay_extra=404 (a miss shows, never goes upstream)
                              and connection_strategy=lazy (reverse mode connects to the
                              upstream as a client connects, by default: it is gone)
  Proxay, Talkback            from npm, into a scratch folder kept between runs
                              (``BENCH_NPM_DIR``); left out, with a one-line note, where
                              node or npm is missing or the install fails

The peers are Proxay, Talkback and mitmproxy's server replay: each tool's ratio is to
the best of those in the same column.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
CHUNKS = 40
PROXAY = ("proxay", "1.9.0")
TALKBACK = ("talkback", "4.2.0")
PEERS = ("Proxay", "Talkback", "mitmproxy --server-replay")
KINDS = ("json", "sse")
CONNS = (1, 16)
ROUNDS = 3

# Talkback is a library: this starts its server. Request headers are matched as
# Talkback does by default; the bench sends the same headers recording and replaying.
TALKBACK_MAIN = """\
const talkback = require("talkback");
const [mode, host, port, path] = process.argv.slice(2);
const opts = {
  host, port: Number(port), path, silent: true, summary: false,
  record: mode === "record" ? talkback.Options.RecordMode.NEW
                            : talkback.Options.RecordMode.DISABLED,
  fallbackMode: talkback.Options.FallbackMode.NOT_FOUND,
};
talkback(opts).start(() => {});
"""


@dataclass
class Tool:
    name: str
    record: list[str]  # argv, "{port}" replaced by the tool's port
    replay: list[str]
    env: dict[str, str]


# ---- the Node peers ------------------------------------------------------------------


def npm_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "cassette-bench-npm"
    return Path(os.environ.get("BENCH_NPM_DIR") or default)


def install_node_peers(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Proxay and Talkback at their pinned versions in ``folder``; their entry points, and
    a one-line note for each one that cannot be had."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if os.environ.get("BENCH_NO_NODE") or not node or not npm:
        return {}, ["Proxay and Talkback left out: node or npm is not installed"]
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    notes: list[str] = []
    for package, version in (PROXAY, TALKBACK):
        # A folder each: npm would prune one package while installing the other.
        prefix = folder / f"{package}-{version}"
        meta = prefix / "node_modules" / package / "package.json"
        if not (meta.exists() and json.loads(meta.read_text()).get("version") == version):
            try:
                done = subprocess.run(
                    [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                     "--loglevel=error", f"{package}@{version}"],
                    capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                failed = done.returncode != 0
                lines = [x for x in done.stderr.splitlines() if "complete log" not in x]
                why = (lines or ["no output"])[0]  # npm's first line names the cause
            except (OSError, subprocess.TimeoutExpired) as e:
                failed, why = True, str(e)
            if failed or not meta.exists():
                notes.append(f"{package} {version} left out: npm install failed ({why[:160]})")
                continue
        found[package] = meta.parent
    return found, notes


def node_tools(work: Path, packages: dict[str, Path], upstream: str) -> list[Tool]:
    node = shutil.which("node") or "node"
    tools = []
    if "proxay" in packages:
        main = str(packages["proxay"] / "dist" / "cli.js")
        if not Path(main).exists():  # the package's own bin entry, wherever it points
            bin_entry = json.loads((packages["proxay"] / "package.json").read_text())["bin"]
            main = str(packages["proxay"] / (bin_entry if isinstance(bin_entry, str)
                                             else bin_entry["proxay"]))  # fmt: skip
        tapes = str(work / "proxay-tapes")
        tools.append(Tool(
            f"Proxay {PROXAY[1]}",
            [node, main, "--mode", "record", "--host", upstream, "--tapes-dir", tapes,
             "--port", "{port}"],
            [node, main, "--mode", "replay", "--tapes-dir", tapes, "--port", "{port}"],
            {},
        ))  # fmt: skip
    if "talkback" in packages:
        script = work / "talkback-main.js"
        script.write_text(TALKBACK_MAIN)
        tapes = str(work / "talkback-tapes")
        # Resolve `require("talkback")` from the scratch folder.
        env = {"NODE_PATH": str(packages["talkback"].parent)}
        tools.append(Tool(
            f"Talkback {TALKBACK[1]}",
            [node, str(script), "record", upstream, "{port}", tapes],
            [node, str(script), "replay", upstream, "{port}", tapes],
            env,
        ))  # fmt: skip
    return tools


# ---- the Python tools ------------------------------------------------------------------


def python_tools(
    work: Path, venv_bin: Path, recorder: str, confdir: Path, upstream: str
) -> list[Tool]:
    mitmdump = str(venv_bin / "mitmdump")
    common = [mitmdump, "-q", "--listen-host", HOST, "--listen-port", "{port}",
              "--mode", f"reverse:{upstream}", "--set", f"confdir={confdir}"]  # fmt: skip
    lean = [str(venv_bin / "cassette-proxy"), "run", "-q", "--listen-port", "{port}",
            "--reverse", upstream, "--confdir", str(confdir),
            "-d", str(work / "lean-cassettes")]  # fmt: skip
    addon = [*common, "-s", recorder, "--set", f"cassette_dir={work / 'addon-cassettes'}"]
    flows = str(work / "server-replay.flows")
    return [
        Tool("cassette-proxy run", [*lean, "--mode", "record"], [*lean, "--mode", "replay"], {}),
        Tool(
            "mitmdump + recorder",
            [*addon, "--set", "cassette_mode=record"],
            [*addon, "--set", "cassette_mode=replay"],
            {},
        ),
        Tool(
            "mitmproxy --server-replay",
            [*common, "-w", flows],
            [
                *common,
                "--server-replay",
                flows,
                "--set",
                "server_replay_reuse=true",
                "--set",
                "server_replay_extra=404",
                "--set",
                "connection_strategy=lazy",
            ],
            {},
        ),  # fmt: skip
    ]


# ---- one request, as wrk sends it -------------------------------------------------------


def request_bytes(port: int, body: str) -> bytes:
    """The request wrk sends (bench.py's Lua script): the same headers, so tools that
    match on headers (Talkback) find what they recorded."""
    data = body.encode()
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def fetch(port: int, body: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """POST one request; status, headers (lower-case names) and the body, de-chunked."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(request_bytes(port, body))
        raw = b""
        while True:
            head, sep, rest = raw.partition(b"\r\n\r\n")
            if sep and _complete(head, rest):
                break
            buf = s.recv(65536)
            if not buf:
                break
            raw += buf
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1]) if lines and " " in lines[0] else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        rest = dechunk(rest)
    return status, headers, rest


def _headers(head: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out[name.strip().lower()] = value.strip().lower()
    return out


def _complete(head: bytes, rest: bytes) -> bool:
    h = _headers(head)
    if b"content-length" in h:
        return len(rest) >= int(h[b"content-length"])
    if b"chunked" in h.get(b"transfer-encoding", b""):
        return rest.endswith(b"0\r\n\r\n")
    return False  # read to the end of the connection


def dechunk(data: bytes) -> bytes:
    out, i = [], 0
    while i < len(data):
        j = data.find(b"\r\n", i)
        if j < 0:
            break
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[j + 2 : j + 2 + size])
        i = j + 2 + size + 2
    return b"".join(out)


def compare(expected: bytes, status: int, headers: dict[str, str], got: bytes) -> dict[str, Any]:
    """How a replayed answer compares with the bytes the upstream sent."""
    framing = "chunked" if "chunked" in headers.get("transfer-encoding", "") else "content-length"
    verdict = {"status": status, "bytes": len(got), "framing": framing}
    if status != 200:
        return {**verdict, "same": False, "note": f"status {status}"}
    if got == expected:
        return {**verdict, "same": True, "note": "same bytes"}
    try:
        if json.loads(got) == json.loads(expected):
            sizes = f"{len(got)} vs {len(expected)}"
            return {**verdict, "same": False, "note": f"same JSON, re-formatted ({sizes} bytes)"}
    except ValueError:
        pass
    return {**verdict, "same": False, "note": f"DIFFERENT bytes ({len(got)} vs {len(expected)})"}


# ---- the section ------------------------------------------------------------------------


def section_peers(
    b: Any,
    out: dict[str, Any],
    start_upstream: Callable[..., Any],
    load: Callable[..., dict[str, Any]],
    wait_listening: Callable[..., None],
    chat_body: Callable[[str, bool], str],
    recorder: str,
    venv_bin: Path,
) -> None:
    t0 = time.monotonic()
    work = b.work / "peers"
    work.mkdir(exist_ok=True)
    up = start_upstream(b, "peers-upstream", "--chunks", str(CHUNKS))
    upstream = f"http://{HOST}:{up.port}"
    bodies = {"json": chat_body("Peers: what is 2 plus 2?", False),
              "sse": chat_body("Peers: count to forty.", True)}  # fmt: skip
    expected = {}
    for kind, body in bodies.items():
        status, _, data = fetch(up.port, body)
        assert status == 200, f"the bench upstream answered {status}"
        expected[kind] = data

    packages, notes = install_node_peers(npm_dir())
    for note in notes:
        print(f"  peers: {note}", flush=True)
    tools = python_tools(work, venv_bin, recorder, b.confdir, upstream)
    tools += node_tools(work, packages, upstream)

    # Record: each tool on its own port, both requests, with the upstream up. A Node
    # peer that fails is left out with a note; a failure of ours stops the bench.
    ports: dict[str, int] = {}
    for tool in list(tools):
        p = b.spawn(f"peers-rec-{_slug(tool.name)}", tool.record, tool.env)
        ports[tool.name] = p.port
        try:
            wait_listening(p)
            for kind, body in bodies.items():
                status, _, _ = fetch(p.port, body)
                if status != 200:
                    raise RuntimeError(f"{tool.name} answered {status} while recording {kind}")
        except (RuntimeError, OSError) as e:
            if not tool.name.startswith(("Proxay", "Talkback")):
                raise
            tools.remove(tool)
            why = str(e).splitlines()[0][:160]
            notes.append(f"{tool.name} left out: {why} ({p.log.name}; --keep keeps it)")
            print(f"  peers: {notes[-1]}", flush=True)
        finally:
            p.stop()
            b.procs.remove(p)
    up.stop()
    b.procs.remove(up)

    # Replay, the upstream gone: same port (so the Host header is the one recorded).
    procs = {}
    checks: dict[str, dict[str, Any]] = {}
    for tool in tools:
        p = b.spawn(f"peers-replay-{_slug(tool.name)}", tool.replay, tool.env, ports[tool.name])
        wait_listening(p)
        procs[tool.name] = p
        checks[tool.name] = {kind: compare(expected[kind], *fetch(p.port, body))
                             for kind, body in bodies.items()}  # fmt: skip
        for kind, c in checks[tool.name].items():
            print(f"  peers check {tool.name:28} {kind:4} {c['status']} {c['framing']:14} "
                  f"{c['note']}", flush=True)  # fmt: skip

    rounds, seconds = (1, 1) if b.smoke else (ROUNDS, 2)
    rows = []
    for kind in KINDS:
        for conns in CONNS:
            trials: dict[str, list[dict[str, Any]]] = {name: [] for name in procs}
            for i in range(rounds):
                for name, p in procs.items():
                    authority = f"{HOST}:{p.port}"
                    if i == 0 and not b.smoke:  # warm up: connections, caches, JIT
                        load(b, p.port, PATH, authority, conns, 1, [bodies[kind]])
                    cpu = p.cpu_s()
                    r = load(b, p.port, PATH, authority, conns, seconds, [bodies[kind]])
                    r["cpu_us_per_req"] = (
                        round((p.cpu_s() - cpu) / r["requests"] * 1e6) if r["requests"] else None
                    )
                    trials[name].append(r)
            for name, rs in trials.items():
                mid = dict(sorted(rs, key=lambda r: r["rps"])[len(rs) // 2])
                generator = mid.pop("tool")  # wrk or loadgen.py
                row = {"tool": name, "load_generator": generator, "kind": kind,
                       "conns": conns, **mid, "errors": sum(r["errors"] for r in rs),
                       "trials_rps": [round(r["rps"], 1) for r in rs]}  # fmt: skip
                rows.append(row)
                print(
                    f"  peers {kind:4} c={conns:<3} {name:28} {row['rps']:8.0f} req/s  "
                    f"p50 {row['p50_ms']:7.3f} ms  err {row['errors']}  cpu "
                    f"{row['cpu_us_per_req']} us/req  "
                    f"[{'/'.join(f'{x:.0f}' for x in row['trials_rps'])}]",
                    flush=True,
                )
    for p in procs.values():
        p.stop()
        b.procs.remove(p)

    table = peers_table(rows, [t.name for t in tools], checks)
    print("\n" + table + "\n", flush=True)
    out["peers"] = {
        "tools": [t.name for t in tools],
        "notes": notes,
        "checks": checks,
        "expected_bytes": {k: len(v) for k, v in expected.items()},
        "rows": rows,
        "table": table,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _is_peer(name: str) -> bool:
    return name.startswith(("Proxay", "Talkback")) or name == "mitmproxy --server-replay"


def answers_cell(checks: dict[str, dict[str, Any]]) -> str:
    """What the bytes check found, in a few words: ``same`` or what differs, per kind."""
    if all(c["same"] for c in checks.values()):
        return "same bytes"
    return "; ".join(f"{k.upper()}: {c['note']}" for k, c in checks.items() if not c["same"])


def peers_table(
    rows: list[dict[str, Any]], names: list[str], checks: dict[str, dict[str, Any]]
) -> str:
    """The issue's table: requests per second per column, each with its ratio to the best
    peer of that column; the median latency at 1 connection, with the best peer's
    latency divided by the tool's (above 1.0: lower latency than every peer); and
    whether the answers were the bytes the upstream sent."""

    def cell(name: str, kind: str, conns: int) -> dict[str, Any] | None:
        for r in rows:
            if (r["tool"], r["kind"], r["conns"]) == (name, kind, conns):
                return r
        return None

    cols = [(k, c) for k in KINDS for c in CONNS]
    best_rps = {}
    best_p50 = {}
    for kind, conns in cols:
        peers = [cell(n, kind, conns) for n in names if _is_peer(n)]
        peers = [r for r in peers if r and r["rps"] > 0]
        best_rps[kind, conns] = max((r["rps"] for r in peers), default=0.0)
        best_p50[kind, conns] = min((r["p50_ms"] for r in peers), default=0.0)
    head = ("| tool | JSON, 1 conn | JSON, 16 | SSE, 1 | SSE, 16 "
            "| p50 JSON, 1 conn | p50 SSE, 1 conn | answers |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name in names:
        cells = []
        for kind, conns in cols:
            r = cell(name, kind, conns)
            if r is None:
                cells.append("-")
                continue
            ratio = r["rps"] / best_rps[kind, conns] if best_rps[kind, conns] else float("nan")
            errs = f", {r['errors']} errors" if r["errors"] else ""
            cells.append(f"{r['rps']:,.0f} ({ratio:.2f}x{errs})")
        for kind in KINDS:
            r = cell(name, kind, 1)
            if r is None or not r["rps"] or not r["p50_ms"] > 0:  # nothing answered
                cells.append("-")
                continue
            ratio = best_p50[kind, 1] / r["p50_ms"] if best_p50[kind, 1] else float("nan")
            cells.append(f"{r['p50_ms']:.3f} ms ({ratio:.2f}x)")
        cells.append(answers_cell(checks[name]) if name in checks else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
