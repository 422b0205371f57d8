"""The Plan: what the proxy decided for one request, the only channel between rooms.

Every room (``rooms/``) reads and writes the flow's Plan and nothing of another room.
Plans are kept by flow in ``Plans`` (a weak map: an entry goes with its flow), not in
``flow.metadata``: mitmproxy serializes that when it saves a flow (``-w``, mitmweb),
and a Plan (its family, its stream recorder) does not serialize.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http

from . import matching
from .families import Family, StreamRecorder
from .faults import Fault
from .spool import StreamSpool

# Our own request headers: read and taken off at intake, never forwarded.
TEST_ID_HEADER = "x-cassette-test-id"
FAULT_HEADER = "x-cassette-fault"
# The stand-in's token header: set by us on flows sent to the local stand-in, with a
# per-process secret value; a client's own header of that name is taken off at intake.
TOKEN_HEADER = "x-cassette-fallback"
CONTROL_NAMES = frozenset({TEST_ID_HEADER.encode(), FAULT_HEADER.encode()})
INTERNAL_NAMES = frozenset({TOKEN_HEADER.encode()})

# Routes (Router): where the answer comes from.
SERVE = "serve"  # from the cassettes, now
FORWARD = "forward"  # to the upstream (recorded when the mode records)
REFUSE = "refuse"  # our own error answer; nothing forwarded
PASS = "pass"  # passthrough: forwarded, nothing recorded


@dataclass
class Plan:
    """One request's decisions, from intake to the answer."""

    test_id: str | None = None
    fault: Fault | None = None  # X-Cassette-Fault, when it shapes the answer (cut-after)
    # The key and the request as recorded (Intake); None for a request that has no key.
    family: Family | None = None
    key: str = ""
    method: str = ""
    path: str = ""
    body: Any = None
    request: matching.Request | None = None  # as matching sees it (redacted, as recorded)
    upstream: str | None = None  # host:port the request is for (host affinity)
    secrets: frozenset[str] | None = None  # credential values (bodies.written_secrets)
    marker: str | None = None
    route: str = FORWARD
    unkeyable: str | None = None  # why the request has no key (Intake), if it has none
    early: http.Response | None = None  # an answer for a streamed request (the stand-in's)
    # Replay (the Replayer).
    served_from: str | None = None  # cassette file, once answered from the cassettes
    served_entry: Any = None  # the store entry replayed (pacing reads its timing)
    rule: str | None = None  # the matching rule of a hit: exact, or the loose rules
    why: str = ""  # a fallback's reason (upstream offline, went away, did not answer)
    position: int | None = None  # n-th identical request of this run (sequence.py)
    position_taken: bool = False  # ... and it is held until served or recorded
    own_position: bool = False  # recorded at that position (record-if-missing), not the next
    stand_in: bool = False  # sent to the local stand-in (fallback.py)
    # Upstream liveness (Fallback).
    probed: bool = False  # the upstream was probed for this very request
    busy: bool = False  # ... and did not accept within the probe timeout, though seen up
    # Recording (the Recorder).
    recorder: StreamRecorder | None = None
    recorded: bool = False
    file: Path | None = None  # its first answer's file (first_answer_path)
    url: str | None = None  # the URL as recorded: redacted (recorded_url)
    temp: Any = None  # Future[Temp]: its cassette's temp file, opening (tempfiles.py)
    spool: StreamSpool | None = None  # a big stream's cassette, written as it passes
    notes: list[str] = field(default_factory=list)

    @property
    def keyed(self) -> bool:
        return self.family is not None


def is_upgrade(request: http.Request) -> bool:
    """A WebSocket upgrade: left to the session room (sessions.py), never keyed as HTTP."""
    for name, value in request.headers.fields:
        if name.lower() == b"upgrade":
            return b"websocket" in value.lower()
    return False


class Plans:
    """flow -> its Plan; an entry goes when mitmproxy drops the flow."""

    def __init__(self) -> None:
        self._plans: weakref.WeakKeyDictionary[http.HTTPFlow, Plan] = weakref.WeakKeyDictionary()
        # Every room looks its plan up in every hook: the map's own method, no call of ours.
        self.get = self._plans.get

    def open(self, flow: http.HTTPFlow) -> Plan:
        """The flow's Plan, made now if it has none yet."""
        plan = self._plans.get(flow)
        if plan is None:
            plan = self._plans[flow] = Plan()
        return plan
