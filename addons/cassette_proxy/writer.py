"""Big cassettes are parsed, serialized and written on a thread of their own.

A 25 MB answer took a quarter of a second of the event loop to parse and write, and
every other client waited that long (issue 12). Its ``response`` hook is async: it can
await the thread, so the client still gets its answer only once the cassette is in
place. Small answers stay on the loop: a thread hop costs more than their work (about
0.1 ms). The thread still shares the GIL: a single big C call (orjson reading 25 MB)
holds the loop for its duration, but no longer for the sum of them all.

The fsyncs that follow every write (off the answer's path) run on a second thread, in
batches: each file, then each folder once; a batch at most every SYNC_WINDOW_S.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .cassette import Cassette, sync_cassettes, write_cassette

# Answers with a body above this size are handled on the writer thread.
OFFLOAD_BYTES = 256 * 1024
# Batches of fsyncs start at most this often (sync_later).
SYNC_WINDOW_S = 0.05

T = TypeVar("T")


class CassetteWriter:
    """One worker thread for big cassettes: their JSON parse, their text, their file."""

    def __init__(self, offload_bytes: int = OFFLOAD_BYTES) -> None:
        self.offload_bytes = offload_bytes
        self._pool: ThreadPoolExecutor | None = None
        # fsyncs wait for the disk: a thread of their own, batched (see sync).
        self._sync_pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._to_sync: list[tuple[Path, Callable[[Path, OSError], None], Any]] = []
        self._syncing = False

    def big(self, size: int) -> bool:
        return size > self.offload_bytes

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the writer thread, awaited."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cassette-writer")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def loads(self, content: bytes) -> Any:
        """``json.loads(content)``, off the loop when the body is big."""
        if not self.big(len(content)):
            return json.loads(content)
        return await self.run(json.loads, content)

    async def write(
        self, path: Path, cassette: Cassette, size: int, temp: tuple[int, str] | None = None
    ) -> os.stat_result:
        """``write_cassette(path, cassette, durable=False, temp)``, off the loop when
        ``size`` (the answer's body) is big. Returns and raises what write_cassette does."""
        if not self.big(size):
            return write_cassette(path, cassette, False, temp)
        return await self.run(write_cassette, path, cassette, False, temp)

    def sync_later(self, path: Path, failed: Callable[[Path, OSError], None]) -> None:
        """fsync a cassette written with ``durable=False`` and its folder entry soon, on
        the sync thread; returns at once. ``failed(path, error)`` is called on the event
        loop if the disk refuses.

        Batched: while one batch is synced the next gathers, and batches start at most
        every SYNC_WINDOW_S. Each fsync commits the file system's journal, and creating a
        file waits for a commit in progress: one commit per recording held the loop's
        next file creation up by a third of a millisecond (docs/benchmarks.md).
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            self._to_sync.append((path, failed, loop))
            start, self._syncing = not self._syncing, True
        if start:
            if self._sync_pool is None:
                self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="cassette-fsync")
            self._sync_pool.submit(self._sync_batches)

    def _sync_batches(self) -> None:
        """On the sync thread: fsync what is waiting, batch after batch, until none is."""
        while True:
            started = time.monotonic()
            with self._lock:
                batch, self._to_sync = self._to_sync, []
                if not batch:
                    self._syncing = False
                    return
            try:
                errors = sync_cassettes([path for path, _, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiter must hear of it
                errors = [OSError(f"fsync failed: {e}")] * len(batch)
            for (path, failed, loop), error in zip(batch, errors, strict=True):
                if error is None:
                    continue
                try:
                    loop.call_soon_threadsafe(failed, path, error)
                except RuntimeError:  # the loop is closed: nobody to tell but stderr
                    print(f"FAILED to flush cassette {path} to disk: {error}", file=sys.stderr)
            pause = SYNC_WINDOW_S - (time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)  # let the next batch gather

    def close(self) -> None:
        for pool in (self._pool, self._sync_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._sync_pool = None


