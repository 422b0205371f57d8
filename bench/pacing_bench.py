"""Recorded pacing accuracy (``scripts/bench --only pacing``; docs/benchmarks.md).

A stream is recorded through the proxy from an upstream that paces it (first event after
``FIRST_MS``, then one every ``EVERY_MS``), the client noting when each event arrived;
then the same requests are replayed with ``cassette_pacing=recorded`` and the upstream
gone. The figure is how far the replayed time to first chunk and each gap between chunks
are from the live ones, as the same client saw them through the same proxy host.
"""

from __future__ import annotations

import socket
import time
from typing import Any

FIRST_MS = 250
EVERY_MS = 40
CHUNKS = 20


def event_times(proxy_port: int, url: str, body: str, timeout: float = 30.0) -> list[float]:
    """Seconds from sending the request to the end of each SSE ``data:`` event."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    data = body.encode()
    request = (
        f"POST {url} HTTP/1.1\r\nHost: {parts.netloc}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    ).encode() + data
    times: list[float] = []
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as s:
        start = time.monotonic()
        s.sendall(request)
        raw = b""
        seen = 0
        while True:
            buf = s.recv(65536)
            if not buf:
                break
            now = time.monotonic() - start
            raw += buf
            count = raw.count(b"data: ")  # each event starts so; its end arrives with it
            times.extend([now] * (count - seen))
            seen = count
            if b"[DONE]" in raw and raw.endswith(b"0\r\n\r\n"):
                break
    return times


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def _stats(errors_ms: list[float]) -> dict[str, float]:
    xs = sorted(abs(e) for e in errors_ms)
    if not xs:
        return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "n": len(xs),
        "p50_ms": xs[len(xs) // 2],
        "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))],
        "max_ms": xs[-1],
    }


def section_pacing(
    b: Any, out: dict[str, Any], start_upstream: Any, chat_body: Any, recorder: str
) -> None:
    """Record paced streams, replay them with cassette_pacing=recorded, compare."""
    n = 2 if b.smoke else 10
    hosts = {"lean+recorder": "lean-recorder", "mitmdump+recorder": "mitmdump"}
    rows = []
    for name, host in hosts.items():
        folder = b.work / f"pacing-{host}"
        slow = start_upstream(
            b, f"pacing-upstream-{host}", "--chunks", str(CHUNKS),
            "--first-ms", str(FIRST_MS), "--every-ms", str(EVERY_MS),
        )  # fmt: skip
        url = f"http://127.0.0.1:{slow.port}/v1/chat/completions"
        script = [recorder] if host == "mitmdump" else []
        rec = b.proxy(f"pacing-rec-{host}", host, [*script, f"cassette_dir={folder}",
                                                   "cassette_mode=record"])  # fmt: skip
        bodies = [chat_body(f"pacing {i}", True) for i in range(n + 1)]
        live = [event_times(rec.port, url, body) for body in bodies]
        rec.stop()
        b.procs.remove(rec)
        slow.stop()
        b.procs.remove(slow)
        play = b.proxy(
            f"pacing-play-{host}",
            host,
            [*script, f"cassette_dir={folder}", "cassette_mode=replay", "cassette_pacing=recorded"],
        )
        replayed = [event_times(play.port, url, body) for body in bodies]
        play.stop()
        b.procs.remove(play)
        first_errors: list[float] = []
        gap_errors: list[float] = []
        for lv, rp in list(zip(live, replayed, strict=True))[1:]:  # the first warms up
            assert len(lv) == len(rp) == CHUNKS + 1, (len(lv), len(rp))
            first_errors.append((rp[0] - lv[0]) * 1000)
            gap_errors += [(r - g) * 1000 for g, r in zip(_gaps(lv), _gaps(rp), strict=True)]
        row = {
            "host": name,
            "requests": n,
            "first_chunk": _stats(first_errors),
            "gaps": _stats(gap_errors),
            "live_first_ms_mean": sum(lv[0] for lv in live[1:]) / n * 1000,
            "replay_first_ms_mean": sum(rp[0] for rp in replayed[1:]) / n * 1000,
        }
        rows.append(row)
        print(
            f"  pacing {name:18} first chunk |replay-live| p50 {row['first_chunk']['p50_ms']:5.1f}"
            f" max {row['first_chunk']['max_ms']:5.1f} ms; gaps p50 {row['gaps']['p50_ms']:5.1f}"
            f" p99 {row['gaps']['p99_ms']:5.1f} max {row['gaps']['max_ms']:5.1f} ms",
            flush=True,
        )
    out["pacing"] = {"first_ms": FIRST_MS, "every_ms": EVERY_MS, "chunks": CHUNKS, "rows": rows}
