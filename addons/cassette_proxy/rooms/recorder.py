"""Recorder: a forwarded answer -> a cassette, when it may be written.

  request          a request on its way upstream: the position its answer takes, and
                   its cassette's temp file opened while the upstream works
  responseheaders  a stream: tapped, so chunks are recorded as they pass through
  response/error   a whole answer written; a stream settled; a failed attempt's
                   sequence position given back

What may be written: a 2xx, an error in ``cassette_record_errors``, at its own position
of a sequence; an error never replaces a recorded success at that position (whole
answers, streams and spooled streams alike), except in an explicit ``record`` run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, exceptions, http

from ..cassette import CassetteError, read_cassette
from ..decoding import BodyTooLarge, message_content, stream_decoder
from ..families import NotRecordable
from ..families.openai import SSEChunkRecorder
from ..library import Library
from ..plan import FORWARD, PASS, Plan, Plans
from ..recording import (
    DEFAULT_RECORDED_ERRORS,
    chunk_is_error,
    is_error,
    recorded_errors,
    whole_response,
)
from ..scribe import Scribe
from ..shaping import Shaping
from ..streams import STREAM_TYPES
from ..taping import Tap, close_delimited

log = logging.getLogger("cassette_proxy")

RECORDING_MODES = frozenset({"auto", "record", "record-if-missing"})


class Recorder:
    def __init__(self, plans: Plans, library: Library, shaping: Shaping) -> None:
        self.plans = plans
        self.library = library
        self.shaping = shaping
        self.scribe = Scribe(library, shaping)
        self.scribe.record_errors = DEFAULT_RECORDED_ERRORS
        self.stopping = False  # set when the proxy shuts down

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cassette_record_headers",
            Sequence[str],
            [],
            "Request headers to record by name. Credentials are never recorded.",
        )
        loader.add_option(
            "cassette_answer_headers",
            Sequence[str],
            [],
            "Answer headers to record and replay beside the documented ones (x-request-id, "
            "request-id, x-ratelimit-*, ...). Credentials and cookies are never recorded.",
        )
        loader.add_option(
            "cassette_normalize",
            bool,
            False,
            "Write llama-stack's normalised ids, times and durations (rec-<hash>, 0, epoch) "
            "so re-recording an unchanged answer gives an identical file.",
        )
        loader.add_option(
            "cassette_record_errors",
            str,
            "4xx",
            "Which upstream error answers are recorded: none, 4xx (every 4xx but the "
            "retryable 408, 409, 429), 5xx, or statuses, comma-separated (4xx,429).",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        self.scribe.answer_headers = list(opts.cassette_answer_headers)
        self.scribe.normalize = opts.cassette_normalize
        self.scribe.record_headers = list(opts.cassette_record_headers)
        if "cassette_record_errors" in updated:
            try:
                self.scribe.record_errors = recorded_errors(opts.cassette_record_errors)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e

    def done(self) -> None:
        self.stopping = True  # streams cut from here on were cut by us, not by a client
        self.scribe.close()

    # ---- which flows are recorded ---------------------------------------------------

    def _forwarded(self, flow: http.HTTPFlow) -> Plan | None:
        """The plan of a flow whose request went (or goes) upstream to be recorded."""
        plan = self.plans.get(flow)
        if plan is None or plan.route != FORWARD or plan.family is None or plan.stand_in:
            return None
        if self.library.mode not in RECORDING_MODES or self.library.store is None:
            return None
        return plan

    def _recording(self, flow: http.HTTPFlow) -> Plan | None:
        """The plan of a flow whose upstream answer is to be recorded, if any."""
        plan = self._forwarded(flow)
        if plan is None or plan.served_from is not None or flow.response is None:
            return None  # (our own answers are never routed FORWARD: never recorded)
        return plan

    def request(self, flow: http.HTTPFlow) -> None:
        plan = self._forwarded(flow)
        if plan is None or flow.response is not None:
            return
        first = self.scribe.first_answer_path(flow, plan)
        self.library.sequencer.arrived(flow, plan, first, own_position=plan.own_position)
        self.scribe.open_temp(flow, plan)

    def _mark_pending(self, flow: http.HTTPFlow, plan: Plan) -> None:
        """Mark a flow whose answer is about to be recorded, naming the file.

        mitmweb shows it while a stream is still being recorded, and a flow writer that
        runs before us sees it (``cassette-proxy run --full`` adds our addons after all
        of mitmdump's, and the ``-w`` writer saves a flow in its own response hook).
        """
        assert flow.response is not None and self.library.store is not None
        status = flow.response.status_code
        if not (200 <= status < 300 or status in self.scribe.record_errors):
            return
        path = self.scribe.first_answer_path(flow, plan)
        flow.marked = ":red_circle:"
        flow.comment = f"cassette: recording {self.library.store.relative(path)}"

    # ---- responseheaders: tap a stream ------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        content_type = response.headers.get("content-type", "").lower()
        streamed = content_type.startswith(STREAM_TYPES)
        plan = self.plans.get(flow)
        if plan is None or plan.route != FORWARD or plan.stand_in:
            # Passthrough, answers from cassettes, our own: streams pass as they come
            # (mitmproxy would buffer them); nothing of them is recorded.
            if streamed and not response.stream:
                response.stream = True
            return
        if plan.fault is not None and plan.served_from is None:
            log.info("%s fault %r not applied to %s %s: cut-after applies to answers from "
                     "cassettes, this one came live", self.library.mode, plan.fault.spec,
                     plan.method, plan.path)  # fmt: skip
        recording = self._recording(flow)
        if not streamed:
            if recording is not None:
                self._mark_pending(flow, recording)
                self._warm_worker(flow)
            return
        response.stream = True  # never buffer a stream, recorded or not
        if recording is None or not 200 <= response.status_code < 300:
            return
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        decoder = None
        if encoding not in ("", "identity"):
            # Asked for identity, but some front ends compress streams anyway: the client
            # gets the bytes as sent, the recorder a decoded copy.
            decoder = stream_decoder(encoding)
            if decoder is None:
                why = f"stream is {encoding}-encoded (cannot decode)"
                self.scribe.not_recorded(flow, plan, why)
                return
        try:
            plan.recorder = plan.family.stream_recorder(plan.path, plan.body, content_type)
        except NotRecordable as e:
            self.scribe.not_recorded(flow, plan, str(e))
            return
        tap = Tap(flow, plan, decoder, self.scribe, self._finish_stream)
        response.stream = self.shaping.clocked(flow, tap)
        self._mark_pending(flow, plan)

    def _warm_worker(self, flow: http.HTTPFlow) -> None:
        """A big answer to record is on its way: start the worker process while it comes."""
        assert flow.response is not None
        length = flow.response.headers.get("content-length", "")
        writer = self.scribe.writer
        if length.isdigit() and writer.big(int(length)):
            try:
                writer.warm()
            except Exception as e:  # noqa: BLE001 - record_whole says so when it matters
                log.debug("recording worker not started: %s", e)

    # ---- response: a whole answer ----------------------------------------------------

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._record_response(flow)
        finally:
            self._settle(flow)

    async def _record_response(self, flow: http.HTTPFlow) -> None:
        plan = self._recording(flow)
        if plan is None or plan.recorded:
            return
        assert flow.response is not None
        if plan.recorder is not None:  # the tap has done it already
            self._finish_stream(flow, plan, clean_end=not close_delimited(flow))
            return
        if flow.response.stream:
            if flow.comment.startswith("cassette: recording"):
                self.scribe.not_recorded(flow, plan, "the stream could not be recorded")
            return  # a stream we chose not to record
        status = flow.response.status_code
        scribe = self.scribe
        try:
            content = message_content(flow.response)  # bounded, before any parse
        except BodyTooLarge as e:
            scribe.not_recorded(flow, plan, f"the answer: {e}; passed through as sent", warn=True)
            return
        if scribe.writer.big(len(content)) and not self._may_replace(flow, plan, status):
            return
        if scribe.writer.big(len(content)) and await scribe.write_big(flow, plan, content, status):
            return  # recorded (or not, and said why) in the worker process
        try:
            data = await scribe.writer.loads(content)
        except (ValueError, UnicodeDecodeError):
            scribe.not_recorded(flow, plan, "answer is not JSON")
            return
        except RecursionError:
            scribe.not_recorded(flow, plan, "answer is JSON nested too deeply")
            return
        try:
            response = whole_response(
                plan.family, plan.path, plan.body, status, data, scribe.record_errors
            )
        except NotRecordable as e:
            scribe.not_recorded(flow, plan, str(e))
            return
        if is_error(response) and self._keeps_success(flow, plan, status):
            return
        # Awaited: mitmproxy sends the answer after this hook, so a client that got a
        # whole answer can count on its cassette being in place, even if the proxy is
        # killed (fsynced right after, off the answer's path).
        await scribe.write(flow, plan, response, content)

    def _may_replace(self, flow: http.HTTPFlow, plan: Plan, status: int) -> bool:
        """A big answer with an error status: not written over a success (the worker
        never types it, so it is checked here)."""
        return not (status >= 400 and self._keeps_success(flow, plan, status))

    # ---- the rule: an error never replaces a success at its position ---------------

    def _keeps_success(self, flow: http.HTTPFlow, plan: Plan, status: int) -> bool:
        """An error answer never replaces a success recorded at the same position of the
        same request (a revoked key, a model not pulled), except in a ``record`` run.
        True: the success is kept, and the position is taken by it."""
        store = self.library.store
        assert store is not None
        target = self.scribe.answer_path(flow, plan)
        try:
            old = read_cassette(target)
        except (OSError, CassetteError):
            return False  # nothing recorded there (or unreadable): the error is recorded
        if old.test_id != plan.test_id or is_error(old.response.model_dump()):
            return False  # an error may replace an error
        where = store.relative(target)
        mode = self.library.mode
        if mode == "record":
            log.warning(
                "record: upstream answered %s for %s %s key %s: this error replaces the "
                "successful recording %s",
                status, plan.method, plan.path, plan.key, where,
            )  # fmt: skip
            return False
        log.info(
            "%s kept %s: upstream answered %s for %s %s key %s; an error never replaces "
            "a success (a record run does)",
            mode, where, status, plan.method, plan.path, plan.key,
        )  # fmt: skip
        plan.recorded = True
        self.library.sequencer.committed(store, flow, target)
        self.library.usage.note("kept", where)
        if flow.comment.startswith("cassette: recording"):
            flow.marked = ""
            flow.comment = f"cassette: kept {where} (upstream answered {status})"
        return True

    # ---- streams ----------------------------------------------------------------------

    def _finish_stream(self, flow: http.HTTPFlow, plan: Plan, clean_end: bool) -> None:
        """Record a finished stream now, on the event loop (the tap cannot await).

        Called by the tap when the stream's end marker arrives, before those bytes are
        passed on: a client that saw the end of a stream can count on its cassette being
        in place (renamed; fsynced in a thread right after), even if the proxy is killed.
        """
        recorder, spool = plan.recorder, plan.spool
        if recorder is None or plan.recorded:
            return
        plan.recorder = plan.spool = None  # settled, whatever happens below
        scribe = self.scribe
        status = flow.response.status_code if flow.response is not None else 200
        timing = None
        if spool is not None:
            unsent = recorder.payloads[spool.count :][-3:]  # not written yet: the end's
            error = spool.error or any(chunk_is_error(recorder.read(p)[0]) for p in unsent)
            if error and recorder.complete and self._keeps_success(flow, plan, status):
                spool.discard()
                return
            done, timing = scribe.finish_spool(flow, plan, recorder, spool)
            if done:
                return
        try:
            response = recorder.response(clean_end)
        except NotRecordable as e:
            scribe.not_recorded(flow, plan, str(e), warn=True)
            return
        if is_error(response) and self._keeps_success(flow, plan, status):
            return
        raw = recorder.data() if isinstance(recorder, SSEChunkRecorder) else None
        scribe.finish_stream(flow, plan, response, timing, raw)

    # ---- the end of a forwarded attempt -----------------------------------------------

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._record_error(flow)
        finally:
            plan = self.plans.get(flow)
            if plan is not None and plan.route == FORWARD and not plan.recorded:
                self.library.sequencer.interrupted(plan)  # the upstream failed it
            self._settle(flow)

    def _record_error(self, flow: http.HTTPFlow) -> None:
        plan = self._recording(flow) if flow.response is not None else None
        if plan is None or plan.recorded:
            return
        if plan.recorder is None:
            if flow.comment.startswith("cassette: recording"):
                self.scribe.not_recorded(flow, plan, "the stream could not be recorded")
            return
        # The openai SDK hangs up right after data: [DONE]: complete, though mitmproxy
        # reports an error. Anything else cut short leaves no cassette.
        if plan.recorder.complete:
            self._finish_stream(flow, plan, clean_end=False)
        else:
            reason = flow.error.msg if flow.error else "unknown"
            if self.stopping:  # mitmproxy says "Client disconnected." for its own shutdown
                reason = "the proxy was stopped"
            self.scribe.not_recorded(flow, plan, f"stream cut short ({reason})", warn=True)

    def _settle(self, flow: http.HTTPFlow) -> None:
        """A forwarded attempt is over: its temp file goes back if unused, and its
        sequence position too if nothing was served or recorded for it."""
        plan = self.plans.get(flow)
        if plan is None or plan.route == PASS:
            return
        self.scribe.release_temp(plan)
        if plan.route == FORWARD and not plan.recorded and plan.served_from is None:
            self.library.sequencer.release(plan)


