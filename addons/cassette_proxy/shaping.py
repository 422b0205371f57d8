"""Shaping: faults on demand (faults.py) and recorded pacing (pacing.py), as a service.

Every answer served from the cassettes passes ``Shaping.shape``, whichever path served
it: the Router's (at once), the stand-in's (the upstream went away) or the Fallback
room's in-flight answer (the upstream never answered). A cut or paced answer becomes a
``Replay``: the pieces to write and when. The recording side keeps when each chunk of a
live stream arrived (``clocked``, ``timed``).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from mitmproxy import ctx, http

from . import answers
from .faults import FaultCounter, cut_beyond_stream
from .library import Library
from .pacing import ChunkClock, Replay, recorded_timing, schedule, whole_timing, with_timing
from .plan import Plan
from .streams import STREAM_TYPES

log = logging.getLogger("cassette_proxy")


class TimedTap:
    """Notes each read's time on the clock, then hands it to the recorder's tap."""

    def __init__(self, clock: ChunkClock, inner: Any) -> None:
        self.clock = clock
        self.inner = inner

    def __call__(self, data: bytes) -> Any:
        try:
            self.clock.feed(data)  # before the tap: it writes the cassette at the end marker
        except Exception:  # noqa: BLE001 - a timing is never worth a broken stream
            log.debug("chunk clock failed", exc_info=True)
        return self.inner(data)


class Shaping:
    def __init__(self, library: Library) -> None:
        self.library = library
        self.counter = FaultCounter()  # X-Cassette-Fault times=N, per proxy run
        self.factor: float | None = None  # option cassette_pacing; None: off
        self.record_timing = True  # option cassette_record_timing (off with normalize)
        self._clocks: weakref.WeakKeyDictionary[http.HTTPFlow, ChunkClock] = (
            weakref.WeakKeyDictionary()
        )

    # ---- replay -------------------------------------------------------------------

    def shape(
        self, plan: Plan, response: http.Response, started: float
    ) -> Replay | http.Response | None:
        """The answer as pieces on a schedule when it is to be cut or paced, else None
        (the common case: the whole answer goes as it is). Logs what was done. A cut
        beyond the stream's end cuts nothing: the 400 saying so, never a cut logged."""
        if plan.served_from is None:
            return None  # a miss, a refusal: never shaped
        fault = plan.fault
        cut = fault.cut_after if fault is not None else None
        timing = self._timing(plan) if self.factor else None
        if cut is None and timing is None:
            return None
        if "content-encoding" in response.headers:
            log.info("replay of %s is content-encoded: sent whole", plan.served_from)
            return None
        content_type = response.headers.get("content-type", "")
        streamed = content_type.lower().startswith(STREAM_TYPES)
        body = response.raw_content or b""
        pieces = schedule(body, content_type, timing, self.factor, streamed)
        if cut is not None and streamed and cut >= len(pieces):
            problem = cut_beyond_stream(cut, len(pieces))
            log.warning("%s fault %r not applied to %s: %s", self.library.mode,
                        fault.spec if fault else "", plan.served_from, problem)  # fmt: skip
            plan.notes.append(f"bad X-Cassette-Fault ({problem})")
            return answers.bad_fault(plan.path, fault.spec if fault else "", problem)
        replay = Replay(
            response=response,
            pieces=pieces,
            started=started,
            cut_after=cut if streamed else None,
            cut_mid_body=cut is not None and not streamed,
            streamed=streamed,
        )
        how = []
        if cut is not None and fault is not None and not fault.delay_ms:
            self.library.counts["fault"] += 1  # (with a delay, counted when it was waited)
        if cut is not None:
            how.append(f"cut after {cut} chunk(s)" if streamed else "cut mid-body")
        if timing is not None:
            how.append(f"paced x{self.factor:g}")
        plan.notes.append(", ".join(how))
        log.info("%s shaped replay of %s: %s", self.library.mode, plan.served_from,
                 ", ".join(how))  # fmt: skip
        return replay

    def _timing(self, plan: Plan) -> dict[str, Any] | None:
        store = self.library.store
        entry = plan.served_entry  # set by the replay (a later answer of a sequence too)
        if store is None or entry is None:
            return None
        try:
            return recorded_timing(store.read(entry).response, plan.served_from or "")
        except Exception:  # noqa: BLE001 - it was just read for the answer; no pacing then
            return None

    # ---- recording ------------------------------------------------------------------

    def records_timing(self) -> bool:
        return self.record_timing and not ctx.options.cassette_normalize

    def clocked(self, flow: http.HTTPFlow, tap: Any) -> Any:
        """The recorder's stream tap, behind a clock noting when each chunk came."""
        assert flow.response is not None
        if not self.records_timing():
            return tap
        encoding = flow.response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return tap  # the clock frames what it reads: a compressed stream keeps no timing
        started = flow.request.timestamp_end or time.time()
        clock = ChunkClock(flow.response.headers.get("content-type", ""), started)
        self._clocks[flow] = clock
        return TimedTap(clock, tap)

    def timed(self, flow: http.HTTPFlow, response: dict[str, Any]) -> dict[str, Any]:
        """The response half of a new cassette, with its timing when one is recorded."""
        clock = self._clocks.pop(flow, None)
        if not self.records_timing():
            return response
        if clock is not None:
            return with_timing(response, clock.timing())
        if response.get("is_streaming") or flow.response is None:
            return response  # a stream without a clock (compressed): no timing
        started = flow.request.timestamp_end
        finished = flow.response.timestamp_end or time.time()
        if started is None:
            return response
        return with_timing(response, whole_timing(started, finished))
