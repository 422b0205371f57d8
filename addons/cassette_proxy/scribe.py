"""The Scribe: a forwarded answer the Recorder chose to keep -> a cassette on disk.

A service of the Recorder room. It makes the cassette (``recording.interaction``: the
one way an interaction becomes a cassette), writes it (small on the loop, big in the
worker process, long streams as they pass), indexes it, counts it and logs it. Whether
an answer is written at all is the Recorder's to decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from mitmproxy import http

from . import keys, matching
from .bodies import message_secrets
from .cassette import (
    Cassette,
    CassetteError,
    NotJSONError,
    RecordedResponse,
    discard_temp,
    plain,
    write_cassette,
)
from .families import NotRecordable
from .families.ollama import with_stream_default
from .families.openai import SSEChunkRecorder
from .library import Library
from .pacing import with_timing
from .plan import Plan
from .recording import chunk_is_error, interaction, recording_path
from .redact import SplitSecretWatch, names_credentials, redact_body, redact_url, scrub
from .shaping import Shaping
from .spool import PLACEHOLDER, SpoolError, StreamSpool, split_around
from .stable import normalize_response
from .tempfiles import TempFiles, opened, ready
from .writer import CassetteWriter, WholeAnswer

log = logging.getLogger("cassette_proxy")

_HASH_NAME = re.compile(r"^[0-9a-f]{12,64}\.json$")  # a recorder's name, not a person's


class Scribe:
    def __init__(self, library: Library, shaping: Shaping) -> None:
        self.library = library
        self.shaping = shaping
        # Big answers parsed and written off the loop; fsyncs batched on a thread of their
        # own, so they never hold up the threads other work is queued on.
        self.writer = CassetteWriter()
        self.temps = TempFiles()  # opened while requests are upstream
        self.normalize = False  # option cassette_normalize
        self.record_headers: list[str] = []  # option cassette_record_headers
        self.record_errors: frozenset[int] = frozenset()  # option cassette_record_errors
        self.answer_headers: list[str] = []  # option cassette_answer_headers

    def close(self) -> None:
        self.writer.close()
        self.temps.close()

    # ---- names ----------------------------------------------------------------------

    def first_answer_path(self, flow: http.HTTPFlow, plan: Plan) -> Path:
        """The file of the request's first answer, as ``recording.interaction`` names it
        (the URL's query, the Ollama stream default); worked out once per request."""
        store = self.library.store
        assert store is not None
        if plan.file is None:
            url = self.recorded_url(flow, plan)
            query = matching.recorded_query(url) if "?" in url else []
            body = with_stream_default(plan.path, plan.body)  # as interaction writes it
            path = recording_path(store.root, plan.method, plan.path, body, plan.test_id,
                                  query)  # fmt: skip
            plan.file = self._recorded_first(plan, path) or path
        return plan.file

    def _recorded_first(self, plan: Plan, path: Path) -> Path | None:
        """The file already answering this very request (same key, test id, upstream) in
        the same folder, when the client spelled it otherwise (a field the key leaves out):
        re-recorded in place, so its sequence stays one sequence."""
        store = self.library.store
        assert store is not None
        for entry in store.exact(plan.key):
            if (entry.test_id, entry.upstream) != (plan.test_id, plan.upstream):
                continue
            if entry.path.name == path.name or not _HASH_NAME.match(entry.path.name):
                return None
            if os.path.realpath(entry.path.parent) == os.path.realpath(path.parent):
                return entry.path
            return None
        return None

    def answer_path(self, flow: http.HTTPFlow, plan: Plan) -> Path:
        """The file this flow's answer goes in: its position's (<hash>.<n>.json)."""
        return self.library.sequencer.recording_path(flow, self.first_answer_path(flow, plan))

    def recorded_url(self, flow: http.HTTPFlow, plan: Plan) -> str:
        """The request's URL as a cassette records it (credentials out); worked out once."""
        if plan.url is None:
            plan.url = redact_url(flow.request.pretty_url)
        return plan.url

    def open_temp(self, flow: http.HTTPFlow, plan: Plan) -> None:
        """Open the answer's temp file while the request is upstream."""
        if self.library.store is not None:
            plan.temp = self.temps.soon(self.first_answer_path(flow, plan).parent)

    def release_temp(self, plan: Plan) -> None:
        """A temp file opened for an answer that is not recorded goes back: removed now
        if it is open (so that none is left when the flow is over), else once it is."""
        if plan.temp is not None:
            temp = ready(plan.temp)
            if temp is not None:
                discard_temp(temp)
            else:
                self.temps.discard(plan.temp)
            plan.temp = None

    def request_secrets(self, flow: http.HTTPFlow, plan: Plan) -> tuple[frozenset[str], str | None]:
        """The request's credential values, which the cassette never holds, and its body
        marker: found when it was keyed, else from the request again (a memo hit)."""
        if plan.secrets is None:
            plan.secrets, plan.marker = message_secrets(flow.request)
        return plan.secrets, plan.marker

    # ---- the cassette ---------------------------------------------------------------

    def cassette(
        self,
        flow: http.HTTPFlow,
        plan: Plan,
        response: dict[str, Any],
        timed: bool = True,
        raw: bytes | None = None,
    ) -> tuple[Path, Cassette]:
        """The cassette of a flow and its file. ``raw``: the answer's bytes, which
        ``response`` was read from (redaction need not walk what names no key)."""
        store = self.library.store
        assert store is not None
        if self.normalize:
            response = normalize_response(response, self._digest(plan))
        if timed:  # else the caller has (or will have) added response.timing itself
            response = self.shaping.timed(flow, response)
        secrets, marker = self.request_secrets(flow, plan)
        path, cassette = interaction(
            store.root,
            method=plan.method,
            path=plan.path,
            body=plan.body,
            test_id=plan.test_id,
            url=self.recorded_url(flow, plan),
            request_headers=flow.request.headers,
            record_headers=self.record_headers,
            marker=marker,
            secrets=secrets,
            response=response,
            raw=raw,  # a whole answer's bytes: its wire_form (replay byte for byte)
            file=self.first_answer_path(flow, plan),
            answer_headers=flow.response.headers if flow.response is not None else None,
            header_names=self.answer_headers,
        )
        return self.library.sequencer.recording_path(flow, path), cassette

    def _digest(self, plan: Plan) -> str:
        return keys.recording_hash(plan.method, plan.path, plan.body, plan.test_id)

    # ---- writing ---------------------------------------------------------------------

    async def write(
        self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any], raw: bytes | None = None
    ) -> None:
        """Record a whole answer: written and renamed, indexed, then fsynced off the loop.

        The fsync waits for the disk (about 1 ms each here); doing it before the answer
        capped recording at a third of forwarding speed (docs/benchmarks.md).
        """
        plan.recorded = True
        path, cassette = self.cassette(flow, plan, response, raw=raw)
        size = len(flow.response.raw_content or b"") if flow.response is not None else 0
        temp, plan.temp = await opened(plan.temp), None
        try:
            # Small: on the loop (a thread hop costs more); big: on the writer thread.
            stat = await self.writer.write(path, cassette, size, temp)
        except NotJSONError as e:  # the client still gets its answer, as it came
            self.not_recorded(flow, plan, f"not valid JSON: {e}", warn=True)
            return
        except Exception as e:  # noqa: BLE001 - the client still gets its answer
            self.write_failed(flow, plan, path, e)
            return
        self.recorded(flow, plan, path, cassette, stat)

    def write_stream(
        self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any], timed: bool, raw: Any
    ) -> None:
        """Record a finished stream now, on the event loop (the tap cannot await)."""
        plan.recorded = True
        path, cassette = self.cassette(flow, plan, response, timed=timed, raw=raw)
        temp = ready(plan.temp)  # the tap cannot wait for it: if not open yet, open now
        if temp is not None:
            plan.temp = None
        try:
            stat = write_cassette(path, cassette, durable=False, temp=temp, keep_unchanged=True)
        except NotJSONError as e:
            self.not_recorded(flow, plan, f"not valid JSON: {e}", warn=True)
            return
        except Exception as e:  # noqa: BLE001 - a failed write must not break the stream
            self.write_failed(flow, plan, path, e)
            return
        self.recorded(flow, plan, path, cassette, stat)

    async def write_big(self, flow: http.HTTPFlow, plan: Plan, content: bytes, status: int) -> bool:
        """Record a big whole answer in the worker process (writer.py): parsed, typed,
        scrubbed and written there, renamed and indexed here; awaited, as ``write`` is.
        False: an answer to record the ordinary way (an error, a model list)."""
        timing = self.shaping.timed(flow, {"is_streaming": False}).get("timing")
        stand_in = {"body": None, "is_streaming": False}
        path, cassette = self.cassette(flow, plan, stand_in, timed=False)
        digest = self._digest(plan) if self.normalize else None
        job = WholeAnswer(
            content, status, plan.method, plan.path, plan.body, self.record_errors,
            plain(cassette), self.request_secrets(flow, plan)[0], digest, timing,
        )  # fmt: skip
        try:
            temp, plan.temp = await opened(plan.temp), None
            result = await self.writer.record_whole(job, path.parent, temp)
        except Exception as e:  # noqa: BLE001 - the worker died, the disk refused: loud
            plan.recorded = True
            self.write_failed(flow, plan, path, e)
            return True
        if result.outcome == "ordinary":
            return False
        if result.outcome == "not_recorded":
            self.not_recorded(flow, plan, result.reason)
            return True
        plan.recorded = True
        if result.outcome == "not_json_value":
            self.not_recorded(flow, plan, f"not valid JSON: {result.reason}", warn=True)
            return True
        if result.outcome == "too_big":
            self.write_failed(flow, plan, path, CassetteError(f"{path}: {result.reason}"))
            return True
        try:
            os.replace(result.temp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(result.temp)
            self.write_failed(flow, plan, path, e)
            return True
        # Indexed by its request side; replays read the file (its body was never here).
        head = RecordedResponse.model_validate(result.head)
        stand_in_cassette = cassette.model_copy(update={"response": head})
        self.recorded(flow, plan, path, stand_in_cassette, remember=False)
        return True

    # ---- a big stream, written as it passes (spool.py) ------------------------------

    def start_spool(self, flow: http.HTTPFlow, plan: Plan) -> StreamSpool:
        """The temp file of a stream's cassette, its text up to the chunks written: that
        of the cassette ``cassette`` makes (response.timing comes after the chunks)."""
        placeholder = {"body": [PLACEHOLDER], "is_streaming": True}
        path, cassette = self.cassette(flow, plan, placeholder, timed=False)
        head, indent, _ = split_around(cassette.to_json_bytes())
        temp = ready(plan.temp)  # the one opened while the request was upstream, if open
        if temp is not None:
            plan.temp = None
        spool = StreamSpool(path.parent, head, indent, temp)
        spool.secrets = self.request_secrets(flow, plan)[0]  # as the cassette scrubs them
        spool.watch = SplitSecretWatch(spool.secrets)
        if self.normalize:
            spool.digest = self._digest(plan)
        return spool

    def spool_more(self, recorder: SSEChunkRecorder, spool: StreamSpool) -> None:
        """Write the chunks that came since the last batch, each as the cassette would
        hold it. Raises (SpoolError, NotRecordable, OSError, ...) to give up."""
        read = recorder.read
        chunks = []
        named = False  # a chunk with a key redact_body may act on
        for payload in recorder.payloads[spool.count :]:
            chunk, by_orjson = read(payload)
            if not by_orjson:  # it may hold a NaN, or a number orjson would not write
                raise SpoolError("a chunk orjson does not read")
            chunks.append(chunk)
            named = named or not isinstance(payload, bytes) or names_credentials(payload)
        if not chunks:
            return
        if spool.digest is not None:
            chunks = normalize_response({"body": chunks}, spool.digest)["body"]
        if named:  # else redact_body would return them unchanged (names_credentials)
            chunks = redact_body(chunks)
        chunks = scrub(chunks, spool.secrets)  # redact_answer, chunk by chunk
        spool.error = spool.error or any(chunk_is_error(c) for c in chunks)
        spool.watch.add(chunks)
        if spool.watch.found:  # scrub_stream would change the stream: its way, at the end
            raise SpoolError("a secret in the stream")
        spool.add(chunks)

    def finish_spool(
        self, flow: http.HTTPFlow, plan: Plan, recorder: Any, spool: StreamSpool
    ) -> tuple[bool, dict[str, Any] | None]:
        """Finish a stream written as it passed: its last lines, the rename, the index.
        Whether that was done, and response.timing (taken here either way); when not,
        the temp file is gone and the stream is to be recorded the ordinary way."""
        form = recorder.wire_form()  # the stream's JSON layout (wireform.py)
        shell: dict[str, Any] = {"body": [PLACEHOLDER], "is_streaming": True}
        shell.update({"wire_form": form} if form else {})
        placeholder = self.shaping.timed(flow, shell)
        timing = placeholder.get("timing")
        if not recorder.complete:
            spool.discard()
            return False, timing
        try:
            self.spool_more(recorder, spool)
            if self.normalize != (spool.digest is not None):
                raise SpoolError("cassette_normalize changed while the stream passed")
            path, cassette = self.cassette(flow, plan, placeholder, timed=False)
            head, indent, tail = split_around(cassette.to_json_bytes())
            if (head, indent, path.parent) != (spool.head, spool.indent, spool.folder):
                raise SpoolError("the cassette's text before the chunks changed")
            spool.finish(tail, path)
        except Exception as e:  # noqa: BLE001 - the ordinary way says what is wrong
            spool.discard()
            log.debug("stream not written as it passed (%s): written at its end", e)
            return False, timing
        plan.recorded = True
        # Indexed from the placeholder, not kept in memory: replays read the file.
        self.recorded(flow, plan, path, cassette, remember=False)
        return True, timing

    def finish_stream(self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any],
                      timing: dict[str, Any] | None, raw: Any) -> None:  # fmt: skip
        if timing is not None:  # taken by finish_spool already
            self.write_stream(flow, plan, with_timing(response, timing), timed=False, raw=raw)
        else:
            self.write_stream(flow, plan, response, timed=True, raw=raw)

    # ---- outcomes ---------------------------------------------------------------------

    def not_recorded(
        self, flow: http.HTTPFlow, plan: Plan, reason: str, warn: bool = False
    ) -> None:
        """One log line for a forwarded answer that leaves no cassette; unmark the flow."""
        self.release_temp(plan)  # before the line: whoever reads it finds no temp file
        (log.warning if warn else log.info)(
            "%s not recorded %s %s key %s: %s",
            self.library.mode,
            plan.method,
            plan.path,
            plan.key,  # the full key: grep the log for the request_key a miss names
            reason,
        )
        if plan.spool is not None:  # a stream written as it passed: its temp file goes
            plan.spool.discard()
            plan.spool = None
        if flow.comment.startswith("cassette: recording"):
            flow.marked = ""
            flow.comment = f"cassette: not recorded ({reason})"

    def write_failed(self, flow: http.HTTPFlow, plan: Plan, path: Path, error: Exception) -> None:
        """Loud: the user believes this interaction is recorded, and it is not."""
        store = self.library.store
        assert store is not None
        log.error(
            "FAILED to record %s %s key %s into %s: %s (the client got its live answer; "
            "no cassette was written)",
            plan.method,
            plan.path,
            plan.key,
            store.relative(path),
            error,
        )
        flow.marked = ":x:"
        flow.comment = f"cassette: NOT recorded, write failed ({error})"

    def recorded(
        self,
        flow: http.HTTPFlow,
        plan: Plan,
        path: Path,
        cassette: Cassette,
        stat: os.stat_result | None = None,
        remember: bool = True,
    ) -> None:
        """A cassette is on disk: count it and mark the flow now; index and log it as
        soon as the answer has gone out; fsync it off the loop. ``remember=False``:
        ``cassette`` is a stand-in without the answer's body (a big one): indexed, not
        kept for replays.

        The index waits for the loop's next pass (``call_soon``), which comes before any
        request that arrives after this answer: the client is not kept waiting for the
        index (a fifth of a small recording's time), and nothing can miss the entry.
        """
        store = self.library.store
        assert store is not None
        self.library.counts["recorded"] += 1
        relative = store.relative(path)
        flow.comment = f"cassette: recorded {relative}"
        flow.marked = ":red_circle:"
        asyncio.get_running_loop().call_soon(
            self._index, flow, plan, path, cassette, stat, relative, remember
        )
        self.writer.sync_later(path, _flush_failed)

    def _index(
        self,
        flow: http.HTTPFlow,
        plan: Plan,
        path: Path,
        cassette: Cassette,
        stat: os.stat_result | None,
        relative: str,
        remember: bool,
    ) -> None:
        library = self.library
        assert library.store is not None
        try:
            library.sequencer.committed(library.store, flow, path)
            library.store.add(path, cassette, stat, remember=remember)
        except Exception as e:  # noqa: BLE001 - the file is there; a restart indexes it
            log.error("recorded %s but could not index it: %s", relative, e)
            return
        library.usage.note("recorded", relative)
        log.info(
            "%s recorded %s %s -> %s",
            library.mode,
            plan.method,
            plan.path,
            relative,
        )


def _flush_failed(path: Path, error: OSError) -> None:
    log.error("FAILED to flush cassette %s to disk: %s", path, error)


__all__ = ["NotRecordable", "Scribe"]
