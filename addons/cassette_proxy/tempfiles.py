"""A recording's temp file, opened on a thread while its request is upstream.

Creating a file waits for the file system's journal: on the shared test machine an
``open(O_CREAT)`` took 0.05 to 0.5 ms, and on the event loop it was a quarter of the
proxy's time while recording at 16 connections (docs/benchmarks.md). The request is
upstream for at least a round trip (an LLM's answer for far longer), so the file is
opened then, off the loop, and is ready when the answer is to be written. An answer
that is not recorded gives its temp file back (``discard``); one left by a crash is
stale, and the next start removes it (``store``).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .cassette import discard_temp, open_temp

Temp = tuple[int, str]  # (file descriptor, path), from cassette.open_temp


class TempFiles:
    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._folders: set[str] = set()  # seen to exist (a removed one: the open fails)

    def soon(self, folder: Path) -> Future[Temp] | None:
        """Start opening a temp file in ``folder`` on the thread; None when the folder is
        not there yet (a test's first recording): the writer makes it, only if it writes,
        so an answer that is not recorded leaves no empty folder behind."""
        where = str(folder)
        if where not in self._folders:
            if not os.path.isdir(where):
                return None
            self._folders.add(where)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cassette-temp")
        return self._pool.submit(open_temp, folder, False)

    def start(self) -> None:
        """Start the thread now (``warmup``), not on the first request to record."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cassette-temp")
        self._pool.submit(int).result()

    def discard(self, opening: Future[Temp]) -> None:
        """Give back a temp file that will not be used, once it is open (on the thread)."""
        if self._pool is not None:
            self._pool.submit(_discard_when_open, opening)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def ready(opening: Future[Temp] | None) -> Temp | None:
    """The temp file if it is open by now; None if it is not (or failed to open: the
    writer then opens one itself and says what is wrong)."""
    if opening is None or not opening.done() or opening.cancelled():
        return None
    if opening.exception() is not None:
        return None
    return opening.result()


async def opened(opening: Future[Temp] | None) -> Temp | None:
    """The temp file, waiting for the thread (not the loop) if it is still opening."""
    if opening is None:
        return None
    if opening.done():  # the common case: no hop through the loop
        return ready(opening)
    try:
        return await asyncio.wrap_future(opening)
    except OSError:
        return None


def _discard_when_open(opening: Future[Temp]) -> None:
    temp = ready(opening)
    if temp is not None:
        discard_temp(temp)
