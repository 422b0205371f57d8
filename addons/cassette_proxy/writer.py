"""Big cassettes are parsed, serialized and written on a thread of their own.

A 25 MB answer took a quarter of a second of the event loop to parse and write, and
every other client waited that long (issue 12). Its ``response`` hook is async: it can
await the thread, so the client still gets its answer only once the cassette is in
place. Small answers stay on the loop: a thread hop costs more than their work (about
0.1 ms). The thread still shares the GIL: a single big C call (orjson reading 25 MB)
holds the loop for its duration, but no longer for the sum of them all.

The fsyncs that follow every write (off the answer's path) run on a second thread, in
batches: each file, then each folder once.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .cassette import Cassette, sync_cassettes, write_cassette

# Answers with a body above this size are handled on the writer thread.
OFFLOAD_BYTES = 256 * 1024

T = TypeVar("T")


class CassetteWriter:
    """One worker thread for big cassettes: their JSON parse, their text, their file."""

    def __init__(self, offload_bytes: int = OFFLOAD_BYTES) -> None:
        self.offload_bytes = offload_bytes
        self._pool: ThreadPoolExecutor | None = None
        # fsyncs wait for the disk: a thread of their own, batched (see sync).
        self._sync_pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._to_sync: list[tuple[Path, asyncio.Future[None]]] = []
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

    async def write(self, path: Path, cassette: Cassette, size: int) -> None:
        """``write_cassette(path, cassette, durable=False)``, off the loop when ``size``
        (the answer's body) is big. Raises what write_cassette raises."""
        if not self.big(size):
            write_cassette(path, cassette, durable=False)
        else:
            await self.run(write_cassette, path, cassette, False)

    async def sync(self, path: Path) -> None:
        """fsync a cassette written with ``durable=False`` and its folder entry, batched
        with the others waiting: under load one folder fsync serves many cassettes (an
        fsync pair took ~6 ms on the shared machine: one by one, the thread fell behind).
        Raises OSError."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._lock:
            self._to_sync.append((path, done))
            start, self._syncing = not self._syncing, True
        if start:
            if self._sync_pool is None:
                self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="cassette-fsync")
            loop.run_in_executor(self._sync_pool, self._sync_batches, loop)
        await done

    def _sync_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the sync thread: fsync what is waiting, batch after batch, until none is."""
        while True:
            with self._lock:
                batch, self._to_sync = self._to_sync, []
                if not batch:
                    self._syncing = False
                    return
            try:
                errors = sync_cassettes([path for path, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiter must hear of it
                errors = [OSError(f"fsync failed: {e}")] * len(batch)
            for (_, done), error in zip(batch, errors, strict=True):
                try:
                    loop.call_soon_threadsafe(_settle, done, error)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    def close(self) -> None:
        for pool in (self._pool, self._sync_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._sync_pool = None


def _settle(done: asyncio.Future[None], error: OSError | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
