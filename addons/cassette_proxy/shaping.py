"""Shaping replayed answers: faults on demand (faults.py) and recorded pacing (pacing.py).

``ReplayShaper`` is a child addon of ``CassetteRecorder`` (its ``addons``), so mitmproxy
calls each of its hooks right after the recorder's, under mitmdump, mitmweb and the
lean master alike. The recorder calls ``take_fault`` first thing in its own ``request``
hook (a status fault is answered before any lookup, probe or upstream); everything
else happens here, after the recorder has decided:

  request          a replayed answer that is to be paced or cut is taken back and the
                   flow pointed at the local replay server, which writes it on time
  responseheaders  such a flow gets its real target back; a recorded stream gets a
                   ChunkClock in front of the recorder's tap
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, exceptions, http

from .faults import (
    FAULT_HEADER,
    FAULT_HEADER_NAME,
    Fault,
    FaultCounter,
    FaultError,
    bad_fault_response,
    fault_response,
    parse_fault,
)
from .pacing import (
    ChunkClock,
    LocalReplayServer,
    Replay,
    parse_pacing,
    recorded_timing,
    schedule,
    whole_timing,
    with_timing,
)
from .streams import STREAM_TYPES

if TYPE_CHECKING:
    from .addon import CassetteRecorder

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


class ReplayShaper:
    def __init__(self, recorder: CassetteRecorder) -> None:
        self.recorder = recorder
        self.server = LocalReplayServer()
        self.counter = FaultCounter()
        self.factor: float | None = None  # option cassette_pacing; None: off
        self._faults: weakref.WeakKeyDictionary[http.HTTPFlow, Fault] = weakref.WeakKeyDictionary()
        self._clocks: weakref.WeakKeyDictionary[http.HTTPFlow, ChunkClock] = (
            weakref.WeakKeyDictionary()
        )

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cassette_pacing",
            str,
            "off",
            "Replay streams at their recorded pace: off (as fast as possible), recorded, "
            "or a speed factor (2 is twice as fast). Cassettes without timings replay "
            "unpaced.",
        )
        loader.add_option(
            "cassette_record_timing",
            bool,
            True,
            "Record when each chunk of a stream arrived (response.timing), for "
            "cassette_pacing. Left out with cassette_normalize.",
        )

    def configure(self, updated: set[str]) -> None:
        if "cassette_pacing" in updated:
            try:
                self.factor = parse_pacing(ctx.options.cassette_pacing)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e

    def done(self) -> None:
        self.server.close()

    # ---- faults ---------------------------------------------------------------------

    async def take_fault(self, flow: http.HTTPFlow, test_id: str | None) -> bool:
        """Read and remove ``X-Cassette-Fault``; True when the flow is answered already.

        Answered here: a bad header (a 400 naming it) and ``status=NNN``. ``delay-ms`` is
        waited here; ``cut-after`` is kept for ``request`` below.
        """
        values = flow.request.headers.get_all(FAULT_HEADER)
        if not values:
            return False
        del flow.request.headers[FAULT_HEADER]  # never forwarded
        value = ",".join(values)
        request = flow.request
        path = request.path.split("?", 1)[0]
        mode = ctx.options.cassette_mode
        try:
            fault = parse_fault(value)
        except FaultError as e:
            shown = f"{request.method} {path}"
            log.warning("%s bad %s header on %s: %s", mode, FAULT_HEADER_NAME, shown, e)
            flow.response = bad_fault_response(path, value, str(e))
            flow.comment = "cassette: bad X-Cassette-Fault header"
            flow.marked = ":x:"
            return True
        if fault is None:
            return False
        body = hashlib.sha256(request.raw_content or b"").digest()
        if not self.counter.take(fault, (test_id, request.method, request.path, body)):
            log.info("%s fault %r used up (times=%d) for %s %s: answered as usual", mode,
                     fault.spec, fault.times, request.method, path)  # fmt: skip
            return False
        if fault.status is not None or fault.delay_ms:
            self._injected()  # a cut-after alone is counted when it cuts (request below)
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.status is not None:
            flow.response = fault_response(path, fault.status)
            flow.comment = f"cassette: fault {fault.spec}"
            flow.marked = ":boom:"
            log.info("%s fault %s %s -> %d (%s)", mode, request.method, path, fault.status,
                     FAULT_HEADER_NAME)  # fmt: skip
            return True
        if fault.needs_replay:
            self._faults[flow] = fault
        return False

    # ---- after the recorder: pace or cut a replayed answer -----------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            self._forwarded(flow)
            return
        plan = self.recorder.plans.get(flow)
        if plan is None or plan.served_from is None:
            return  # not a replayed answer (a miss, a fault, a bad header)
        fault = self._faults.pop(flow, None)
        cut = fault.cut_after if fault is not None else None
        timing = self._timing(plan) if self.factor else None
        if cut is None and timing is None:
            return  # the common case: the whole answer goes as it is
        if "content-encoding" in response.headers:
            log.info("replay of %s is content-encoded: sent whole", plan.served_from)
            return
        content_type = response.headers.get("content-type", "")
        streamed = content_type.lower().startswith(STREAM_TYPES)
        body = response.raw_content or b""
        pieces = schedule(body, content_type, timing, self.factor, streamed)
        delay = fault.delay_ms / 1000 if fault is not None else 0.0
        replay = Replay(
            response=response,
            pieces=pieces,
            started=(flow.request.timestamp_end or time.time()) + delay,
            cut_after=cut if streamed else None,
            cut_mid_body=cut is not None and not streamed,
            streamed=streamed,
        )
        flow.response = None  # sent by the local replay server instead
        await self.server.redirect(flow, replay)
        how = []
        if cut is not None and fault is not None and not fault.delay_ms:
            self._injected()
        if cut is not None:
            how.append(f"cut after {cut} chunk(s)" if streamed else "cut mid-body")
        if timing is not None:
            how.append(f"paced x{self.factor:g}")
        flow.comment += f" ({', '.join(how)})"
        mode = ctx.options.cassette_mode
        log.info("%s shaped replay of %s: %s", mode, plan.served_from, ", ".join(how))

    def _injected(self) -> None:
        """One more request that got a fault: the proxy's summary line counts them."""
        counts = self.recorder.counts
        counts["fault"] = counts.get("fault", 0) + 1

    def _forwarded(self, flow: http.HTTPFlow) -> None:
        """A request on its way upstream: the position its recorded answer takes."""
        plan = self.recorder.plans.get(flow)
        store = self.recorder.store
        if plan is None or store is None:
            return
        fault = self._faults.pop(flow, None)
        if fault is not None:
            log.info("%s fault %r not applied to %s %s: cut-after applies to replayed answers, "
                     "this one is forwarded live", ctx.options.cassette_mode, fault.spec,
                     plan.method, plan.path)  # fmt: skip
        first = self.recorder.first_answer_path(flow, plan)
        self.recorder.sequencer.arrived(flow, plan, first)

    def _timing(self, plan: Any) -> dict[str, Any] | None:
        store = self.recorder.store
        if store is None:
            return None
        entry = plan.served_entry  # set by the replay (a later answer of a sequence too)
        if entry is None:
            return None
        try:
            return recorded_timing(store.read(entry).response)
        except Exception:  # noqa: BLE001 - it was just read for the answer; no pacing then
            return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        if self.server.owns(flow):
            self.server.restore(flow)
            flow.response.headers.pop("connection", None)  # the client's connection stays
            flow.response.stream = True  # passed on as written: on time, and cut if cut
            return
        plan = self.recorder.plans.get(flow)
        if plan is None or plan.recorder is None or not callable(flow.response.stream):
            return
        if not self._records_timing():
            return
        encoding = flow.response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return  # the clock frames what it reads: a compressed stream keeps no timing
        started = flow.request.timestamp_end or time.time()
        clock = ChunkClock(flow.response.headers.get("content-type", ""), started)
        self._clocks[flow] = clock
        flow.response.stream = TimedTap(clock, flow.response.stream)

    def error(self, flow: http.HTTPFlow) -> None:
        self.server.restore(flow)

    # ---- recording ------------------------------------------------------------------

    def _records_timing(self) -> bool:
        opts = ctx.options
        return bool(opts.cassette_record_timing) and not opts.cassette_normalize

    def timed(self, flow: http.HTTPFlow, response: dict[str, Any]) -> dict[str, Any]:
        """The response half of a new cassette, with its timing when one is recorded."""
        clock = self._clocks.pop(flow, None)
        if not self._records_timing():
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
