"""Python function calls and CPU per recording and per replay through the addon's own
hooks, in-process.

``python bench/hooks.py [--before DIR]`` builds real mitmproxy flows (no sockets), runs
them through ``CassetteRecorder``'s request, responseheaders and response hooks in
record mode (each request a new body, so each writes a cassette: a plain chat
completion, then a 40-chunk SSE stream through the tap), then replays 64 recorded plain
answers, and prints, per recording and per replay, the Python calls made (cProfile; the
same on a quiet or a busy machine) and the CPU time (without the profiler; best of 3).
``--before DIR`` measures the ``addons/`` folder of another checkout the same way
(``git archive REV addons | tar -x -C /tmp/old``), in a process of its own."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
N = 1000


_HANDLERS: dict[tuple[int, str], list[Any]] = {}
_KEEP: list[Any] = []


async def hook(addon: Any, name: str, *args: Any) -> None:
    """Call a hook on the addon and its child addons, in mitmproxy's order (a root with
    rooms, or one class with a child), the handlers resolved once per hook name as the
    lean master's hook table does (cassette_proxy/lean.py)."""
    handlers = _HANDLERS.get((id(addon), name))
    if handlers is None:
        from mitmproxy.addonmanager import traverse

        _KEEP.append(addon)  # its id stays its own while the table holds it
        found = [getattr(a, name, None) for a in traverse([addon])]
        handlers = _HANDLERS[(id(addon), name)] = [f for f in found if callable(f)]
    for func in handlers:
        result = func(*args)
        if result is not None:
            await result


def measure(kind: str) -> dict[str, Any]:
    from cassette_proxy.addon import CassetteRecorder
    from mitmproxy import http
    from mitmproxy.addons import proxyserver
    from mitmproxy.test import taddons, tflow
    from upstream import CHAT, chunk_event

    stream = kind == "sse40"
    answer = json.dumps(CHAT).encode()
    events = b"".join(chunk_event(i, 40) for i in range(40)) + b"data: [DONE]\n\n"

    def flow(i: int) -> Any:
        f = tflow.tflow()
        text = f"Record {i} {time.monotonic_ns()}"
        body = {"model": "bench-model", "stream": stream,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        f.request = http.Request.make(
            "POST", "http://127.0.0.1:9/v1/chat/completions", json.dumps(body).encode(),
            {"content-type": "application/json", "host": "127.0.0.1:9"},
        )  # fmt: skip
        return f

    async def one(addon: Any, f: Any) -> None:
        await hook(addon, "request", f)
        if stream:
            f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
            await hook(addon, "responseheaders", f)
            tap = f.response.stream
            tap(events)
            tap(b"")
            f.response.content = b""
        else:
            f.response = http.Response.make(200, answer, {"content-type": "application/json"})
            await hook(addon, "responseheaders", f)
        await hook(addon, "response", f)
        await asyncio.sleep(0)  # what the addon leaves for the loop's next pass

    async def run() -> dict[str, Any]:
        addon = CassetteRecorder()
        with taddons.context(addon, proxyserver.Proxyserver()) as tctx:
            tctx.configure(addon, cassette_dir=tempfile.mkdtemp(), cassette_mode="record")
            addon.probe.mark("127.0.0.1", 9, True)
            addon.probe.ttl_ms = 10**9
            flows = [flow(i) for i in range(200 + 4 * N)]
            for f in flows[:200]:  # warm up: imports, caches, the first folder
                await one(addon, f)
            cpu = []
            for r in range(3):
                batch = flows[200 + r * N : 200 + (r + 1) * N]
                t0 = time.process_time()
                for f in batch:
                    await one(addon, f)
                cpu.append((time.process_time() - t0) / N * 1e6)
            prof = cProfile.Profile()
            prof.enable()
            for f in flows[200 + 3 * N :]:
                await one(addon, f)
            prof.disable()
            await asyncio.sleep(0.2)
            addon.writer.close()
            addon.temps.close() if hasattr(addon, "temps") else None
            stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
            calls = sum(v[1] for v in stats.values()) / N
            ours = sum(v[1] for k, v in stats.items() if "cassette_proxy" in k[0]) / N
            return {"kind": kind, "calls": round(calls), "calls_in_package": round(ours),
                    "cpu_us": round(min(cpu))}  # fmt: skip

    return asyncio.run(run())


def measure_replay() -> dict[str, Any]:
    """The same for a replay: 64 plain answers recorded, then asked for again and again
    (the hooks mitmproxy calls for an answer set in ``request``)."""
    from cassette_proxy.addon import CassetteRecorder
    from mitmproxy import http
    from mitmproxy.addons import proxyserver
    from mitmproxy.test import taddons, tflow
    from upstream import CHAT

    answer = json.dumps(CHAT).encode()

    def flow(i: int) -> Any:
        f = tflow.tflow()
        body = {"model": "bench-model", "messages": [{"role": "user", "content": f"Q {i % 64}"}]}
        f.request = http.Request.make(
            "POST", "http://127.0.0.1:9/v1/chat/completions", json.dumps(body).encode(),
            {"content-type": "application/json", "host": "127.0.0.1:9"},
        )  # fmt: skip
        return f

    async def one(addon: Any, f: Any, record: bool) -> None:
        await hook(addon, "requestheaders", f)
        await hook(addon, "request", f)
        if record:
            f.response = http.Response.make(200, answer, {"content-type": "application/json"})
        await hook(addon, "responseheaders", f)
        await hook(addon, "response", f)
        await asyncio.sleep(0)

    async def run() -> dict[str, Any]:
        folder = tempfile.mkdtemp()
        for mode in ("record", "replay"):
            addon = CassetteRecorder()
            with taddons.context(addon, proxyserver.Proxyserver()) as tctx:
                tctx.configure(addon, cassette_dir=folder, cassette_mode=mode)
                addon.probe.mark("127.0.0.1", 9, True)
                addon.probe.ttl_ms = 10**9
                if mode == "record":
                    for i in range(64):
                        await one(addon, flow(i), True)
                    await asyncio.sleep(0.2)
                    addon.writer.close()
                    continue
                for i in range(500):  # warm up
                    await one(addon, flow(i), False)
                cpu = []
                for _ in range(3):
                    batch = [flow(i) for i in range(N)]
                    t0 = time.process_time()
                    for f in batch:
                        await one(addon, f, False)
                    cpu.append((time.process_time() - t0) / N * 1e6)
                assert batch[0].response is not None and batch[0].response.status_code == 200
                batch = [flow(i) for i in range(N)]
                prof = cProfile.Profile()
                prof.enable()
                for f in batch:
                    await one(addon, f, False)
                prof.disable()
                addon.writer.close()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        calls = sum(v[1] for v in stats.values()) / N
        ours = sum(v[1] for k, v in stats.items() if "cassette_proxy" in k[0]) / N
        return {"kind": "replay", "calls": round(calls), "calls_in_package": round(ours),
                "cpu_us": round(min(cpu))}  # fmt: skip

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="", help="the addons/ folder of another checkout")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path[:0] = [args.child, str(BENCH)]
        print(json.dumps([measure("json"), measure("sse40"), measure_replay()]))
        return 0
    here = str(BENCH.parent / "addons")
    runs = [("this code", here)] + ([("before", str(Path(args.before).resolve()))]
                                    if args.before else [])  # fmt: skip
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    for label, addons in runs:
        out = subprocess.run(
            [sys.executable, __file__, "--child", addons],
            capture_output=True, text=True, check=True, env={**env, "PYTHONPATH": addons},
        ).stdout  # fmt: skip
        for row in json.loads(out.strip().splitlines()[-1]):
            what = "replay" if row["kind"] == "replay" else "recording"
            print(f"{label:10} {row['kind']:6} {row['calls']:6} Python calls per {what} "
                  f"({row['calls_in_package']} in cassette_proxy), "
                  f"{row['cpu_us']} us CPU")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
