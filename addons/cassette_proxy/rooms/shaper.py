"""ReplayShaper: an answer served from cassettes at once, paced or cut on its way out.

  request          a replayed answer that is to be paced or cut is taken back and the
                   flow pointed at the local replay server, which writes it on time
  responseheaders  such a flow gets its real target back; an answer from the stand-in
                   keeps the client's connection as it was

The shaping itself (what is cut, when each piece goes) is the Shaping service's, the
same for answers the Fallback room gives when the upstream went away or hung.
"""

from __future__ import annotations

import time
from typing import Any

from mitmproxy import ctx, exceptions, http

from ..pacing import LocalReplayServer, parse_pacing
from ..plan import SERVE, Plans
from ..shaping import Shaping
from ..streams import STREAM_TYPES


class ReplayShaper:
    def __init__(self, plans: Plans, shaping: Shaping) -> None:
        self.plans = plans
        self.shaping = shaping
        self.server = LocalReplayServer()

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
                self.shaping.factor = parse_pacing(ctx.options.cassette_pacing)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
        if "cassette_record_timing" in updated:
            self.shaping.record_timing = bool(ctx.options.cassette_record_timing)

    async def running(self) -> None:
        # Started before the first request: a paced answer is never late for it.
        await self.server.start()

    def done(self) -> None:
        self.server.close()

    async def request(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        plan = self.plans.get(flow)
        if response is None or plan is None or plan.route != SERVE:
            return
        started = flow.request.timestamp_end or time.time()
        if plan.fault is not None:
            started += plan.fault.delay_ms / 1000  # waited already, at intake
        replay = self.shaping.shape(plan, response, started)
        if replay is None:
            return  # the common case: the whole answer goes as it is
        if isinstance(replay, http.Response):  # a cut that cuts nothing: the 400
            flow.response = replay
            flow.comment = f"cassette: {plan.notes[-1]}"
            flow.marked = ":x:"
            return
        flow.response = None  # sent by the local replay server instead
        await self.server.redirect(flow, replay)
        flow.comment += f" ({plan.notes[-1]})"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        if self.server.owns(flow):
            self.server.restore(flow)
            response.headers.pop("connection", None)  # the client's connection stays
            response.stream = True  # passed on as written: on time, and cut if cut
            return
        plan = self.plans.get(flow)
        if plan is None or not plan.stand_in:
            return
        # The stand-in closes its own socket; the client's connection stays as it was.
        response.headers.pop("connection", None)
        if response.headers.get("content-type", "").lower().startswith(STREAM_TYPES):
            response.stream = True  # nothing of it is recorded; sent as it comes

    def error(self, flow: http.HTTPFlow) -> None:
        self.server.restore(flow)


