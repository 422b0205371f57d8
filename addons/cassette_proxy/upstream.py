"""Is the upstream reachable? A TCP connect with its own timeout, cached briefly.

mitmproxy has no connect timeout (a host that drops SYNs hangs for minutes), so
the proxy asks before it forwards, and asks again just before it connects.
"""

from __future__ import annotations

import asyncio
import time


class UpstreamProbe:
    def __init__(self, timeout_ms: int = 500, ttl_ms: int = 2000) -> None:
        self.timeout_ms = timeout_ms
        self.ttl_ms = ttl_ms
        self._verdicts: dict[tuple[str, int], tuple[bool, float]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future[bool]] = {}

    def cached(self, host: str, port: int) -> bool | None:
        """The cached verdict, or None when there is none or it is too old."""
        verdict = self._verdicts.get((host, port))
        if verdict is None or time.monotonic() - verdict[1] > self.ttl_ms / 1000:
            return None
        return verdict[0]

    def mark(self, host: str, port: int, up: bool) -> None:
        self._verdicts[(host, port)] = (up, time.monotonic())

    async def reachable(self, host: str, port: int) -> bool:
        verdict = self.cached(host, port)
        if verdict is not None:
            return verdict
        return await self.probe(host, port)

    async def probe(self, host: str, port: int) -> bool:
        """A fresh connect; concurrent probes of one address share a single attempt."""
        address = (host, port)
        pending = self._inflight.get(address)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight[address] = future
        try:
            up = await self._connect(host, port)
            self.mark(host, port, up)
            future.set_result(up)
            return up
        finally:
            del self._inflight[address]
            if not future.done():
                future.cancel()

    async def _connect(self, host: str, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.timeout_ms / 1000
            )
        except (OSError, TimeoutError, UnicodeError):
            return False
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True
