"""Intake: what a request says of itself, read once and taken off it.

Our control headers (``X-Cassette-Test-Id``, ``X-Cassette-Fault``) come off every
request and are never forwarded; our internal headers (the stand-in's and the local
replay server's tokens) come off a client's request whatever it carries in them: only
the proxy sets them, with per-request secrets. A fault that answers at once (a bad
header, ``status=``) is answered here; the rest of the request gets its key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from mitmproxy import http

from .. import answers
from ..bodies import NotKeyable
from ..faults import FAULT_HEADER_NAME, FaultError, parse_fault
from ..keying import Keyer
from ..library import Library
from ..pacing import TOKEN_HEADER as REPLAY_TOKEN
from ..plan import (
    CONTROL_NAMES,
    FAULT_HEADER,
    INTERNAL_NAMES,
    PASS,
    REFUSE,
    TEST_ID_HEADER,
    Plan,
    Plans,
    is_upgrade,
)
from ..printing import shown_path
from ..shaping import Shaping

log = logging.getLogger("cassette_proxy")

_INTERNAL = INTERNAL_NAMES | {REPLAY_TOKEN.encode()}
_OURS = CONTROL_NAMES | _INTERNAL


class Intake:
    def __init__(self, plans: Plans, library: Library, shaping: Shaping) -> None:
        self.plans = plans
        self.library = library
        self.shaping = shaping
        self.keyer = Keyer()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Every request gets its Plan here, and our headers come off (one pass over the
        raw fields: mitmproxy's lookups, one per name, cost more than the rest)."""
        request = flow.request
        ours = False
        for name, value in request.headers.fields:
            lowered = name.lower()
            if lowered in _OURS:
                ours = True
            elif lowered == b"upgrade" and b"websocket" in value.lower():
                return  # a WebSocket session: the session room reads its headers
        plan = self.plans.open(flow)
        if ours:
            # mitmproxy sends a streamed request's headers before the request hook runs:
            # ours come off now, whether its body streams or not.
            self._take_headers(flow, plan, streamed=bool(request.stream))

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # answered by another addon, or by us in requestheaders
        plan = self.plans.get(flow)
        if plan is None:  # requestheaders did not see it (an upgrade, or a made-up flow)
            if is_upgrade(flow.request):
                return  # a WebSocket session: the session room's (sessions.py)
            plan = self.plans.open(flow)
            if any(k.lower() in _OURS for k, _ in flow.request.headers.fields):
                self._take_headers(flow, plan, streamed=False)
        if plan.route == REFUSE or plan.stand_in:
            return  # a bad header, or a streamed body on its way to the stand-in already
        if plan.fault is not None and not await self._fault(flow, plan):
            return
        if self.library.mode == "passthrough":
            plan.route = PASS
            shown = shown_path(flow.request)  # logs never show a key
            log.info("passthrough %s %s (nothing recorded or replayed)", flow.request.method,
                     shown)  # fmt: skip
            return
        try:
            self.keyer.key(flow.request, plan)
        except NotKeyable as e:
            plan.unkeyable = str(e)

    def _take_headers(self, flow: http.HTTPFlow, plan: Plan, streamed: bool) -> None:
        request = flow.request
        test_ids: list[bytes] = []
        faults: list[bytes] = []
        kept = []
        for name, value in request.headers.fields:
            lowered = name.lower()
            if lowered == _TEST_ID:
                test_ids.append(value)
            elif lowered == _FAULT:
                faults.append(value)
            elif lowered not in _INTERNAL:
                kept.append((name, value))
        request.headers.fields = tuple(kept)
        if test_ids:
            text = b", ".join(test_ids).decode("utf-8", "surrogateescape").strip()
            plan.test_id = text or None
        if faults:
            self._read_fault(flow, plan, b",".join(faults).decode("latin-1"), streamed)

    def _read_fault(self, flow: http.HTTPFlow, plan: Plan, value: str, streamed: bool) -> None:
        request = flow.request
        path = request.path.split("?", 1)[0]  # for the error's shape only, never printed
        try:
            plan.fault = parse_fault(value)
        except FaultError as e:
            log.warning("%s bad %s header on %s %s: %s", self.library.mode, FAULT_HEADER_NAME,
                        request.method, shown_path(request), e)  # fmt: skip
            self._answer(flow, plan, answers.bad_fault(path, value, str(e)), streamed)
            flow.comment = "cassette: bad X-Cassette-Fault header"
            flow.marked = ":x:"
            return
        fault = plan.fault
        if streamed and fault is not None and fault.status is not None:
            # The body streams upstream as it comes: a status fault is answered by the
            # stand-in instead, and nothing reaches the upstream.
            mode = self.library.mode
            if not self.shaping.counter.take(fault, (plan.test_id, request.method, request.path,
                                                     hashlib.sha256(b"").digest())):  # fmt: skip
                plan.fault = None
                return
            self.library.counts["fault"] += 1
            self._answer(flow, plan, answers.fault(path, fault.status), streamed)
            flow.comment = f"cassette: fault {fault.spec}"
            flow.marked = ":boom:"
            log.info("%s fault %s %s -> %d (%s)", mode, request.method, shown_path(request),
                     fault.status, FAULT_HEADER_NAME)  # fmt: skip

    async def _fault(self, flow: http.HTTPFlow, plan: Plan) -> bool:
        """Apply a fault that answers or waits; False when the flow is answered."""
        fault = plan.fault
        assert fault is not None
        request = flow.request
        path = request.path.split("?", 1)[0]  # for the error's shape only, never printed
        mode = self.library.mode
        body = hashlib.sha256(request.raw_content or b"").digest()
        if not self.shaping.counter.take(fault, (plan.test_id, request.method, request.path, body)):
            log.info("%s fault %r used up (times=%d) for %s %s: answered as usual", mode,
                     fault.spec, fault.times, request.method, shown_path(request))  # fmt: skip
            plan.fault = None
            return True
        if fault.status is not None or fault.delay_ms:
            self.library.counts["fault"] += 1  # a cut-after alone is counted when it cuts
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.status is not None:
            flow.response = answers.fault(path, fault.status)
            plan.route = REFUSE
            flow.comment = f"cassette: fault {fault.spec}"
            flow.marked = ":boom:"
            log.info("%s fault %s %s -> %d (%s)", mode, request.method, shown_path(request),
                     fault.status, FAULT_HEADER_NAME)  # fmt: skip
            return False
        if not fault.needs_replay:
            plan.fault = None
        return True

    def _answer(
        self, flow: http.HTTPFlow, plan: Plan, response: http.Response, streamed: bool
    ) -> None:
        plan.route = REFUSE
        if streamed:
            plan.early = response  # the Router sends it from the stand-in
        else:
            flow.response = response


_TEST_ID, _FAULT = TEST_ID_HEADER.encode(), FAULT_HEADER.encode()

