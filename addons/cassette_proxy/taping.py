"""The stream tap: passes every read through untouched and feeds the stream recorder.

When the stream's own end marker arrives ([DONE], "done": true, message_stop) or the
upstream ends a chunked or length-delimited body, the Recorder finishes the cassette
before those bytes go on to the client. A close-delimited body has only its end marker.
OpenAI SSE streams are written as they pass once they are big (spool.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.net.http import http1

from .decoding import StreamDecoder
from .families.openai import SSEChunkRecorder
from .plan import Plan
from .scribe import Scribe
from .spool import SPOOL_BATCH, SPOOL_BYTES

log = logging.getLogger("cassette_proxy")


class Tap:
    def __init__(
        self,
        flow: http.HTTPFlow,
        plan: Plan,
        decoder: StreamDecoder | None,
        scribe: Scribe,
        finish: Callable[[http.HTTPFlow, Plan, bool], None],
    ) -> None:
        self.flow = flow
        self.plan = plan
        self.decoder = decoder
        self.scribe = scribe
        self.finish = finish  # the Recorder's: (flow, plan, clean_end)
        self.close_delimited = close_delimited(flow)
        self.spooling = isinstance(plan.recorder, SSEChunkRecorder)

    def __call__(self, data: bytes) -> bytes:
        recorder = self.plan.recorder
        if recorder is None or self.plan.recorded:
            return data
        try:
            if data:
                recorder.feed(self.decoder.feed(data) if self.decoder else data)
                if self.spooling:
                    self._spool(recorder)
                if recorder.complete:
                    self.finish(self.flow, self.plan, False)
            else:  # b"": the body ended (by a close, when close-delimited)
                if self.decoder:
                    recorder.feed(self.decoder.flush())
                if self.spooling:
                    self._spool(recorder)
                self.finish(self.flow, self.plan, not self.close_delimited)
        except Exception as e:  # noqa: BLE001 - an exception here would hang the client
            self.plan.recorder = None
            self.scribe.not_recorded(self.flow, self.plan, f"stream not recordable: {e}")
        return data

    def _spool(self, recorder: SSEChunkRecorder) -> None:
        """Write the new chunks of a big stream; on any trouble stop, leaving the stream
        to be recorded at its end (which then says what was wrong, as before)."""
        plan = self.plan
        try:
            if plan.spool is None:
                if recorder.size <= SPOOL_BYTES:
                    return
                plan.spool = self.scribe.start_spool(self.flow, plan)
            elif len(recorder.payloads) - plan.spool.count < SPOOL_BATCH:
                return  # a few chunks at a time (the end marker's call takes the rest)
            self.scribe.spool_more(recorder, plan.spool)
        except Exception as e:  # noqa: BLE001 - the stream goes on, recorded the old way
            self.spooling = False
            if plan.spool is not None:
                plan.spool.discard()
                plan.spool = None
            log.debug("stream no longer written as it passes: %s", e)


def close_delimited(flow: http.HTTPFlow) -> bool:
    """Whether the answer's body ends when the upstream closes the connection.

    HTTP/1 without a content-length and without chunking (mitmproxy's "read until EOF"):
    a close there is no proof of a whole body, as a crash mid-event closes it too. The
    end of a chunked or length-delimited body (or an HTTP/2 stream) is a clean end.
    """
    response = flow.response
    if response is None or not response.http_version.startswith("HTTP/1"):
        return False
    try:
        return http1.expected_http_body_size(flow.request, response) == -1
    except ValueError:
        return True  # headers mitmproxy cannot frame by: no clean end to trust
