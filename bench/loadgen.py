"""A small HTTP/1.1 load generator, used only when ``wrk`` is not installed.

``python bench/loadgen.py URL PATH CONNS SECONDS BODIES.json`` keeps CONNS keep-alive
connections busy for SECONDS, sending the bodies in turn (POST to PATH, which may be an
absolute URL for a forward proxy), and prints one JSON line: requests, errors, rps,
p50_ms, p99_ms. It runs in its own process; on 2 cores it competes with the proxy for
CPU just as wrk does, only more (it is Python).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    i = lower.find(b"content-length:")
    if i >= 0:
        n = int(lower[i + 15 : lower.find(b"\r\n", i)])
        await reader.readexactly(n)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _worker(host: str, port: int, requests: list[bytes], stop: float, out: list) -> None:
    latencies, errors = out
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    while time.monotonic() < stop:
        t = time.monotonic()
        try:
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors.append(1)
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            continue
        latencies.append(time.monotonic() - t)
        if status >= 400:
            errors.append(1)
        i += 1
    writer.close()


async def main(url: str, path: str, conns: int, seconds: float, bodies_file: str) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = urlsplit(path)
    authority = target.netloc or f"{host}:{port}"
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {authority}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body.encode())}\r\n\r\n{body}"
        ).encode()
        for body in json.loads(open(bodies_file).read())
    ]
    latencies: list[float] = []
    errors: list[int] = []
    start = time.monotonic()
    stop = start + seconds
    await asyncio.gather(
        *(
            _worker(host, port, requests[k:] + requests[:k], stop, [latencies, errors])
            for k in range(conns)
        )
    )
    elapsed = time.monotonic() - start
    latencies.sort()

    def pct(q: float) -> float:
        return (
            1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0
        )

    print(
        json.dumps(
            {
                "requests": len(latencies),
                "errors": len(errors),
                "rps": len(latencies) / elapsed,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
            }
        )
    )


if __name__ == "__main__":
    u, p, c, s, b = sys.argv[1:6]
    asyncio.run(main(u, p, int(c), float(s), b))
