"""Router: ``cassette_mode``, one method per row of the README's Modes table.

Each request with a key is served from the cassettes, forwarded, or refused here; the
rule that holds in every row: nothing is forwarded in replay, whatever a client sends.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, exceptions, http

from .. import answers
from ..fallback import FallbackServer, start_stand_in
from ..keying import not_keyable
from ..library import Library
from ..matching import Match
from ..plan import FORWARD, PASS, REFUSE, SERVE, Plan, Plans
from ..printing import shown_path
from ..replayer import Replayer
from ..upstream import BUSY, DOWN, UpstreamProbe

log = logging.getLogger("cassette_proxy")


class Router:
    def __init__(
        self,
        plans: Plans,
        library: Library,
        replayer: Replayer,
        probe: UpstreamProbe,
        stand_in: FallbackServer,
    ) -> None:
        self.plans = plans
        self.library = library
        self.replayer = replayer
        self.probe = probe
        self.stand_in = stand_in
        self._rows = {
            "replay": self.replay,
            "record-if-missing": self.record_if_missing,
            "auto": self.auto,
            "record": self.record,
        }

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cassette_probe_timeout_ms", int, 500, "Upstream reachability probe timeout (ms)."
        )
        loader.add_option(
            "cassette_probe_ttl_ms", int, 2000, "How long an upstream verdict is cached (ms)."
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if updated & {"cassette_probe_timeout_ms", "cassette_probe_ttl_ms"}:
            if opts.cassette_probe_timeout_ms <= 0 or opts.cassette_probe_ttl_ms < 0:
                raise exceptions.OptionsError(
                    "cassette_probe_timeout_ms must be > 0 and cassette_probe_ttl_ms >= 0"
                )
            self.probe.settings(opts.cassette_probe_timeout_ms, opts.cassette_probe_ttl_ms)
        if "connection_strategy" in updated or "cassette_mode" in updated:
            # Lazy connects let the request hook answer before any upstream connect,
            # so reverse mode and HTTPS work with the upstream down.
            if opts.connection_strategy != "lazy":
                opts.connection_strategy = "lazy"

    # ---- a streamed request body: it goes upstream before the request hook ----------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed request body (stream_large_bodies) goes upstream before the request
        hook runs: where nothing may be forwarded (or a fault answers it), it goes to the
        local stand-in instead, which answers the error saying why."""
        if not flow.request.stream or flow.response is not None:
            return
        plan = self.plans.get(flow)
        answer = plan.early if plan is not None else None
        if answer is None:
            mode = self.library.mode
            if mode not in ("replay", "auto"):
                return
            where = await self._no_forwarding(flow, mode)
            if where is None:
                return
            why = not_keyable(flow.request) or "the request body is streamed"
            answer = self._refusal(flow, why, where)
            plan = self.plans.open(flow)
        plan.route, plan.stand_in = REFUSE, True
        await start_stand_in(self.stand_in)
        self.stand_in.route(flow, lambda: answer)

    async def _no_forwarding(self, flow: http.HTTPFlow, mode: str) -> str | None:
        """Why a request must not be forwarded (replay; auto with the upstream offline)."""
        host, port = flow.request.host, flow.request.port
        if mode == "replay":
            return "cassette_mode is replay"
        if mode == "auto" and not await self.probe.reachable(host, port):
            return f"the upstream {host}:{port} is offline"
        return None

    # ---- the request: one method per mode ------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        plan = self.plans.get(flow)
        if plan is None or flow.response is not None or plan.stand_in:
            return
        if plan.route in (PASS, REFUSE):
            return
        if not plan.keyed:
            await self._unkeyable(flow, plan)
            return
        await self._rows[self.library.mode](flow, plan)
        if flow.response is None:
            plan.route = FORWARD
            # Decoded bodies stream through the tap as they are recorded.
            flow.request.headers["accept-encoding"] = "identity"

    async def replay(self, flow: http.HTTPFlow, plan: Plan) -> None:
        """Only from cassettes: a hit, or the miss error."""
        self.serve(flow, plan)

    async def record_if_missing(self, flow: http.HTTPFlow, plan: Plan) -> None:
        """From cassettes when this position of the request is recorded, else forwarded
        and recorded (the miss error at once when the upstream is offline)."""
        match = self.replayer.find(plan)
        if match is not None and self.replayer.has_next(plan, match):
            self.serve(flow, plan, match=match)
        elif not await self.probe.reachable(flow.request.host, flow.request.port):
            self.serve(flow, plan, why="upstream offline", match=match)
        elif match is not None:
            plan.own_position = True  # a later position of a recorded sequence
        # else forwarded: recorded at its arrival's position

    async def auto(self, flow: http.HTTPFlow, plan: Plan) -> None:
        """Live whenever the upstream is up (recorded), from cassettes when it is not."""
        host, port = flow.request.host, flow.request.port
        verdict = self.probe.cached(host, port)
        plan.probed = verdict is None
        if verdict is None:
            verdict = await self.probe.probe(host, port)
        if verdict == DOWN:
            self.library.counts["fallback"] += 1
            self.serve(flow, plan, why="upstream offline")
            return
        plan.busy = verdict == BUSY

    async def record(self, flow: http.HTTPFlow, plan: Plan) -> None:
        """Always live and recorded; an unreachable upstream is a 502 (fail fast:
        mitmproxy has no connect timeout of its own)."""
        host, port = flow.request.host, flow.request.port
        if await self.probe.reachable(host, port):
            return
        flow.response = answers.unreachable_in_record(host, port)
        plan.route = REFUSE
        log.warning(
            "record %s %s: upstream %s:%s is unreachable; answered 502, nothing recorded",
            plan.method, plan.path, host, port,
        )  # fmt: skip

    def serve(
        self, flow: http.HTTPFlow, plan: Plan, why: str = "", match: Match | None = None
    ) -> None:
        flow.response = self.replayer.answer(plan, why, match)
        plan.route = SERVE
        file = plan.served_from  # set on a hit, as the answer's FILE_HEADER
        flow.comment = f"cassette: {file}" if file else "cassette: miss"
        flow.marked = ":vhs:" if file else ":x:"
        if why:
            flow.comment += f" ({why})"

    # ---- requests without a key ------------------------------------------------------

    async def _unkeyable(self, flow: http.HTTPFlow, plan: Plan) -> None:
        """Forwarded unrecorded, or, where forwarding is not allowed, a non-retryable
        error saying why."""
        why = plan.unkeyable or "no key"
        mode = self.library.mode
        where = await self._no_forwarding(flow, mode)
        if where is None:
            plan.route = PASS
            shown = shown_path(flow.request)  # logs never show a key
            log.info("%s passthrough %s %s: %s", mode, flow.request.method, shown, why)
            return
        plan.route = REFUSE
        flow.response = self._refusal(flow, why, where)

    def _refusal(self, flow: http.HTTPFlow, why: str, where: str) -> http.Response:
        request = flow.request
        shown = shown_path(request)  # as its cassette would hold it
        log.warning("%s not forwarded %s %s: %s (%s)", self.library.mode, request.method,
                    shown, why, where)  # fmt: skip
        flow.comment = f"cassette: not forwarded ({why})"
        flow.marked = ":x:"
        return answers.refusal(request.method, shown, why, where)
