"""Big cassettes are parsed, serialized and written on a thread of their own.

A 25 MB answer took a quarter of a second of the event loop to parse and write, and
every other client waited that long (issue 12). Its ``response`` hook is async: it can
await the thread, so the client still gets its answer only once the cassette is in
place. Small answers stay on the loop: a thread hop costs more than their work (about
0.1 ms). The thread still shares the GIL: a single big C call (orjson reading 25 MB)
holds the loop for its duration, but no longer for the sum of them all.

The fsyncs that follow every write (off the answer's path) run on a second thread, in
batches (one syncfs per file system where there is one); a batch at most every
SYNC_WINDOW_S.

The thread did not end the stall: json and orjson hold the GIL for the whole of each
call (~100-250 ms for 25 MB here), and the million objects of a parsed 25 MB answer make
every garbage collection of the proxy walk them. So a big whole answer is recorded in a
worker *process* (``record_whole``, one process started on first use): the answer's
bytes go there, and it parses, types, normalises, scrubs, serializes and writes the
temp file, exactly as the proxy does for a small answer. The proxy then renames it and
indexes the request side; the client gets the answer only after that, as before.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .cassette import (
    MAX_CASSETTE_BYTES,
    Cassette,
    NotJSONError,
    open_temp,
    sync_cassettes,
    write_cassette,
)

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
        # Big whole answers are recorded in a process of their own (record_whole).
        self._process: ProcessPoolExecutor | None = None

    def big(self, size: int) -> bool:
        return size > self.offload_bytes

    def start(self) -> None:
        """Start the writer and fsync threads now (``warmup``): created on the first
        recording, their start held that recording's answer up."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cassette-writer")
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="cassette-fsync")
        for pool in (self._pool, self._sync_pool):
            pool.submit(int).result()  # a thread starts on its first job

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
        """``write_cassette(path, cassette, durable=False, temp, keep_unchanged=True)``
        (an unchanged answer leaves its file alone: ``churn``), off the loop when
        ``size`` (the answer's body) is big. Returns and raises what write_cassette does."""
        if not self.big(size):
            return write_cassette(path, cassette, False, temp, keep_unchanged=True)
        return await self.run(write_cassette, path, cassette, False, temp, True)

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
        if self._process is not None:
            # Idle by now (the proxy awaited its answers); the worker exits on its own,
            # and not waiting keeps the loop free for mitmproxy's own shutdown.
            self._process.shutdown(wait=False)
        self._pool = self._sync_pool = self._process = None

    # ---- big whole answers: in a worker process ------------------------------------

    def _worker(self) -> ProcessPoolExecutor:
        if self._process is None:
            # The worker imports this package as the proxy did: ``mitmdump -s`` put its
            # folder on sys.path only while loading the script; spawn copies sys.path.
            root = str(Path(__file__).resolve().parent.parent)
            if root not in sys.path:
                sys.path.append(root)
            # spawn: a fresh interpreter, not a fork of a proxy with threads and sockets.
            context = multiprocessing.get_context("spawn")
            self._process = ProcessPoolExecutor(
                max_workers=1,
                mp_context=context,
                initializer=_watch_parent,
                initargs=(os.getpid(),),
            )
        return self._process

    def warm(self) -> None:
        """Start the worker process now (a big answer is on its way), so that its start
        overlaps the answer's download instead of following it."""
        if self._process is None:
            self._worker().submit(int)

    async def record_whole(
        self, job: WholeAnswer, folder: Path, temp: tuple[int, str] | None = None
    ) -> WholeResult:
        """``record_whole(job)`` in the worker process, into ``temp`` (opened while the
        request was upstream) or a new temp file in ``folder``. On ``done``, the temp file
        (``result.temp``) is the cassette's, to be renamed by the caller; otherwise it is
        gone. Raises WorkerFailed when the worker died."""
        fd, name = temp if temp is not None else open_temp(folder)
        os.close(fd)  # the worker writes it by name
        job.temp = name
        loop = asyncio.get_running_loop()
        try:
            result: WholeResult = await loop.run_in_executor(self._worker(), record_whole, job)
        except BaseException as e:
            _unlink(name)
            if isinstance(e, BrokenProcessPool):
                self._process = None  # a new one next time
                raise WorkerFailed(f"the recording worker process died ({e})") from e
            raise
        if result.outcome != "done":
            _unlink(name)
        else:
            result.temp = name
        return result


class WorkerFailed(Exception):
    """The worker process recording a big answer died or could not start."""


@dataclass
class WholeAnswer:
    """What the worker needs to record a whole answer as the proxy would (``_new_cassette``
    with ``response.timing``; ``CassetteRecorder._write``), all plain data."""

    content: bytes  # the answer's body, decoded
    status: int
    method: str
    path: str  # the request's wire path (the family is classified from it)
    body: Any  # the request body as keyed (families type some answers by it)
    record_errors: frozenset[int]
    frame: dict[str, Any]  # the cassette without its response (plain, file order)
    secrets: frozenset[str]  # the request's credential values, scrubbed out
    digest: str | None  # cassette_normalize's request hash, when on
    timing: dict[str, Any] | None  # response.timing, when recorded
    temp: str = ""  # the temp file to write (set by CassetteWriter.record_whole)


@dataclass
class WholeResult:
    """``done`` (the cassette is in ``temp``; ``head`` is its response half without the
    body, for the index), ``not_recorded`` (``reason``: the proxy's words for it),
    ``not_json_value``, ``too_big``, or ``ordinary`` (an error answer, a model list:
    recorded the ordinary way, which looks at other cassettes)."""

    outcome: str
    reason: str = ""
    head: dict[str, Any] = field(default_factory=dict)
    temp: str = ""


def record_whole(job: WholeAnswer) -> WholeResult:
    """In the worker process: the cassette of a whole answer, written to ``job.temp``.

    The same steps, in the same order, as the proxy's ``response`` hook, ``_write`` and
    ``_new_cassette`` for a small answer: json.loads, ``whole_response``, normalisation,
    timing, ``redact_answer``, the cassette model and its text.
    """
    from . import eras
    from .families import NotRecordable, classify
    from .pacing import with_timing
    from .recording import answer_extras, is_error, whole_response
    from .redact import redact_answer
    from .stable import normalize_response

    try:
        data = json.loads(job.content)
    except (ValueError, UnicodeDecodeError):
        return WholeResult("not_recorded", "answer is not JSON")
    except RecursionError:
        return WholeResult("not_recorded", "answer is JSON nested too deeply")
    family = classify(job.method, job.path)
    try:
        response = whole_response(
            family, job.path, job.body, job.status, data, job.record_errors
        )
    except NotRecordable as e:
        return WholeResult("not_recorded", str(e))
    if is_error(response):
        return WholeResult("ordinary")  # an error never replaces a success: the proxy looks
    if job.digest is not None:
        response = normalize_response(response, job.digest)
    if job.timing is not None:
        response = with_timing(response, job.timing)
    response = redact_answer(response, job.secrets)
    # How the JSON was written and the answer's headers, as ``new_recording`` adds them
    # (the headers are in the frame's stand-in response, made by it).
    headers = (job.frame.get("response") or {}).get("headers") or {}
    response = answer_extras(job.path, job.body, response, job.content, headers, list(headers))
    cassette = Cassette.model_validate({**job.frame, "response": response})
    if eras.model_list_field(cassette) is not None:
        return WholeResult("ordinary")  # merged with its siblings on replay: the proxy's way
    try:
        text = cassette.to_json_bytes()
    except NotJSONError as e:
        return WholeResult("not_json_value", str(e))
    if len(text) > MAX_CASSETTE_BYTES:
        return WholeResult(
            "too_big",
            f"the cassette would be {len(text) / 2**20:.1f} MiB, over the "
            f"{MAX_CASSETTE_BYTES // 2**20} MiB a cassette may hold",
        )
    with open(job.temp, "wb") as f:
        f.write(text)
    head = {k: v for k, v in response.items() if k != "body"}
    return WholeResult("done", head=head)


def _watch_parent(parent: int) -> None:
    """In the worker: exit once the proxy is gone. A proxy killed with SIGKILL closes no
    pipe the worker would notice (it holds both ends of its own queue): no orphan."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="cassette-parent-watch", daemon=True).start()


def _unlink(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


