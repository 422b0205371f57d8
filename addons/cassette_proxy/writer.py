"""Big cassettes are parsed, serialized and written on a thread of their own.

A 25 MB answer took a quarter of a second of the event loop to parse and write, and
every other client waited that long (issue 12). Its ``response`` hook is async: it can
await the thread, so the client still gets its answer only once the cassette is in
place. Small answers stay on the loop: a thread hop costs more than their work (about
0.1 ms). The thread still shares the GIL: a single big C call (orjson reading 25 MB)
holds the loop for its duration, but no longer for the sum of them all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .cassette import Cassette, write_cassette

# Answers with a body above this size are handled on the writer thread.
OFFLOAD_BYTES = 256 * 1024

T = TypeVar("T")


class CassetteWriter:
    """One worker thread for big cassettes: their JSON parse, their text, their file."""

    def __init__(self, offload_bytes: int = OFFLOAD_BYTES) -> None:
        self.offload_bytes = offload_bytes
        self._pool: ThreadPoolExecutor | None = None

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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
