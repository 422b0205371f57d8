"""Is the upstream up, busy or offline? A TCP connect with its own timeout, cached briefly.

mitmproxy has no connect timeout (a host that drops SYNs hangs for minutes), so the
proxy asks before it forwards, and asks again just before it connects. Verdicts:

  up    a connect succeeded.
  down  refused, unreachable, a DNS failure: at once. Or no answer within the probe
        timeout from a host not seen up in the last minute (a host that drops packets).
  busy  no answer within the probe timeout from a host seen up in the last minute: a
        live server whose accept queue is full (a loaded machine, many parallel
        clients) drops SYNs too. The request is forwarded, and waits up to
        ``CONNECT_TIMEOUT_S`` for the upstream to accept before falling back.

The connect runs in a thread: on a busy event loop (200 requests arriving at once) a
connect that the kernel completed in a millisecond would otherwise be seen only after
the timeout, and a live upstream would be called down.
"""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

UP, DOWN, BUSY = "up", "down", "busy"
SEEN_UP_WINDOW_S = 60.0  # a connect timeout to a host up this recently means busy
CONNECT_TIMEOUT_S = 10.0  # how long a request waits for a busy upstream to accept
_TIMEOUT = "timeout"
# Name resolution is not bounded by the socket timeout: give up waiting this much later.
_RESOLVE_GRACE_S = 0.5

Address = tuple[str, int]


def _connect(host: str, port: int, timeout: float) -> str:
    """One blocking TCP connect: UP, DOWN (an error) or _TIMEOUT."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        return _TIMEOUT
    except (OSError, UnicodeError, ValueError):
        return DOWN
    return UP


class UpstreamProbe:
    def __init__(self, timeout_ms: int = 500, ttl_ms: int = 2000) -> None:
        self.timeout_ms = timeout_ms
        self.ttl_ms = ttl_ms
        self._verdicts: dict[Address, tuple[str, float]] = {}
        self._seen_up: dict[Address, float] = {}
        self._inflight: dict[tuple[Address, float], asyncio.Future[str]] = {}
        self._threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cassette-probe")

    def settings(self, timeout_ms: int, ttl_ms: int) -> None:
        """New probe timeout and verdict lifetime (options); old verdicts are dropped."""
        self.timeout_ms, self.ttl_ms = timeout_ms, ttl_ms
        self._verdicts.clear()

    def cached(self, host: str, port: int) -> str | None:
        """The cached verdict (UP, DOWN or BUSY), or None when there is none or it is old."""
        verdict = self._verdicts.get((host, port))
        if verdict is None or time.monotonic() - verdict[1] > self.ttl_ms / 1000:
            return None
        return verdict[0]

    def mark(self, host: str, port: int, up: bool) -> None:
        """A connect to the upstream succeeded or failed (ours or mitmproxy's)."""
        now = time.monotonic()
        self._verdicts[(host, port)] = (UP if up else DOWN, now)
        if up:
            self._seen_up[(host, port)] = now
        else:
            # Waited for and not there: no longer "seen up lately".
            self._seen_up.pop((host, port), None)

    def seen_up(self, host: str, port: int) -> float | None:
        """Seconds since the upstream was last seen up, if within SEEN_UP_WINDOW_S."""
        when = self._seen_up.get((host, port))
        if when is None or time.monotonic() - when > SEEN_UP_WINDOW_S:
            return None
        return time.monotonic() - when

    async def verdict(self, host: str, port: int) -> str:
        """The cached verdict, or a fresh probe's."""
        return self.cached(host, port) or await self.probe(host, port)

    async def reachable(self, host: str, port: int) -> bool:
        """Up or busy: worth forwarding to."""
        return await self.verdict(host, port) != DOWN

    async def probe(self, host: str, port: int) -> str:
        """A fresh connect within the probe timeout: UP, DOWN or BUSY."""
        outcome = await self._attempt(host, port, self.timeout_ms / 1000)
        if outcome == _TIMEOUT:
            verdict = BUSY if self.seen_up(host, port) is not None else DOWN
            self._verdicts[(host, port)] = (verdict, time.monotonic())
            return verdict
        self.mark(host, port, outcome == UP)
        return outcome

    async def wait_until_up(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
        """A busy upstream: wait up to ``timeout`` for it to accept a connection."""
        outcome = await self._attempt(host, port, timeout)
        self.mark(host, port, outcome == UP)
        return outcome == UP

    async def _attempt(self, host: str, port: int, timeout: float) -> str:
        """One connect in a thread; concurrent attempts at one address share it."""
        key = ((host, port), timeout)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._inflight[key] = future
        try:
            attempt: Future[str] = self._threads.submit(_connect, host, port, timeout)
            await asyncio.wait([asyncio.wrap_future(attempt)], timeout=timeout + _RESOLVE_GRACE_S)
            # The thread's own result, even if the loop was too busy to see it in time.
            done = attempt.done() and not attempt.cancelled()  # cancelled: close()
            outcome = attempt.result() if done else _TIMEOUT
            future.set_result(outcome)
            return outcome
        finally:
            del self._inflight[key]
            if not future.done():
                future.cancel()

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
