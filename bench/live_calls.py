"""Python calls per replay in the live proxy, against the baseline addon in the same master.

``python bench/live_calls.py [--before DIR] [-n 2000]`` records 64 plain answers of
``bench/upstream.py`` through ``python -m cassette_proxy.lean``, then runs two proxies
under cProfile, one at a time: the lean proxy replaying them, and the lean master hosting
``bench/baseline_addon.py`` (the same bytes from memory, no lookup). Each answers N
requests on one keep-alive connection; a second run with one request gives the start-up
calls, taken off. What is left is every Python call the process makes per request
(mitmproxy's included): the same on a quiet machine or a busy one, where req/s on this
VM moves by 1.5x between runs. ``--before DIR`` runs the replay with another checkout's
``addons/`` folder too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def ask(proxy: int, upstream: int, n: int) -> None:
    conn = http.client.HTTPConnection(HOST, proxy, timeout=30)
    url = f"http://{HOST}:{upstream}/v1/chat/completions"
    for i in range(n):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"Q {i % 64}"}]})
        conn.request("POST", url, body, {"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"request {i} got {response.status}")
    conn.close()


def calls(argv: list[str], env: dict[str, str], upstream: int, n: int, work: Path) -> int:
    """All Python calls of one proxy process that answers n requests, start to exit."""
    port = free_port()
    out = work / f"{port}.prof"
    argv = [a.replace("{port}", str(port)) for a in argv]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cProfile", "-o", str(out), *argv],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port, proc)
        ask(port, upstream, n)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return sum(v[1] for v in pstats.Stats(str(out)).stats.values())  # type: ignore[attr-defined]


def per_request(argv: list[str], env: dict[str, str], upstream: int, n: int, work: Path) -> float:
    return (calls(argv, env, upstream, n + 1, work) - calls(argv, env, upstream, 1, work)) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="", help="the addons/ folder of another checkout")
    ap.add_argument("-n", type=int, default=2000, help="requests per measured run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="live-calls-"))
    cassettes = work / "cassettes"
    chat = work / "chat.json"
    sys.path.insert(0, str(BENCH))
    from upstream import CHAT

    chat.write_bytes(json.dumps(CHAT).encode())
    base_env = {**os.environ, "PYTHONOPTIMIZE": "1", "BENCH_JSON_BODY": str(chat),
                "BENCH_SSE_BODY": str(chat)}  # fmt: skip
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(up_port, upstream)
        here = str(ROOT / "addons")
        env = {**base_env, "PYTHONPATH": here}
        lean = ["-m", "cassette_proxy.lean", "-q", "--listen-port", "{port}",
                "--set", f"cassette_dir={cassettes}"]  # fmt: skip
        calls(lean + ["--set", "cassette_mode=record"], env, up_port, 64, work)
        replay = lean + ["--set", "cassette_mode=replay"]
        baseline = [
            str(BENCH / "host.py"), str(BENCH / "baseline_addon.py"),
            "termlog_verbosity=error", f"listen_host={HOST}", "listen_port={port}",
        ]  # fmt: skip
        rows = [("baseline addon (lean master)", baseline, env), ("replay, this code", replay, env)]
        if args.before:
            old = {**base_env, "PYTHONPATH": str(Path(args.before).resolve())}
            rows.append(("replay, before", replay, old))
        base = None
        for label, argv, e in rows:
            got = per_request(argv, e, up_port, args.n, work)
            base = got if base is None else base
            extra = "" if got is base else f"  ({got - base:+.0f} over the baseline)"
            print(f"{label:30} {got:7.0f} Python calls per request{extra}")
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
