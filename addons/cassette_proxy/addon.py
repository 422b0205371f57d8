"""The mitmproxy addon: cassette-proxy as a house of small rooms (``rooms/``).

``CassetteRecorder`` makes the services and registers the rooms as its ``addons``, in
hook order, the way mitmproxy builds itself from many small addons:

  Library       the folder, the store, sequences, usage log, counts and summary
  Intake        our control headers off, test id, X-Cassette-Fault, the key -> a Plan
  Router        cassette_mode: serve from cassettes, forward, or refuse
  Fallback      the upstream dies or hangs: the cassettes answer instead
  ReplayShaper  paces or cuts an answer served from cassettes
  Recorder      a forwarded answer -> a cassette
  SessionRoom   WebSocket sessions, recorded and played whole (sessions.py)
  RawTunnelGuard  a tunnel of neither HTTP nor TLS: refused where nothing may be forwarded
  Lane          the fast lane (lane.py): plain HTTP/1.1 replays answered before
                mitmproxy's layers, by the same services; hosted by the lean master only

The way of a request: intake (key), route, replay or forward, record, answer. The
rooms share only the flow's Plan (plan.py) and the services handed to them.
docs/architecture.md has the walk of a replay and of a recording.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx

from .answers import FILE_HEADER, MISS_HEADER, MISS_STATUS
from .fallback import FallbackServer, start_stand_in
from .lane import Lane
from .library import MODES, Library, unservable_summary
from .plan import TEST_ID_HEADER, TOKEN_HEADER, Plans
from .printing import guard_flow_lines
from .replayer import Replayer
from .rooms.intake import Intake
from .rooms.liveness import DEFAULT_RESPONSE_TIMEOUT_MS, Fallback
from .rooms.recorder import Recorder
from .rooms.router import Router
from .rooms.shaper import ReplayShaper
from .sessions import SessionRoom
from .shaping import Shaping
from .tunnels import RawTunnelGuard
from .upstream import UpstreamProbe
from .warmup import WarmStart


class CassetteRecorder:
    """The root addon: no hooks of its own but ``load``; its rooms do the work."""

    def __init__(self) -> None:
        self.plans = Plans()
        self.library = Library()
        self.probe = UpstreamProbe()
        self.stand_in = FallbackServer()
        self.shaping = Shaping(self.library)
        self.replayer = Replayer(self.library)
        self.intake = Intake(self.plans, self.library, self.shaping)
        self.router = Router(self.plans, self.library, self.replayer, self.probe, self.stand_in)
        self.fallback = Fallback(
            self.plans, self.library, self.replayer, self.shaping, self.probe, self.stand_in
        )
        self.shaper = ReplayShaper(self.plans, self.shaping)
        self.recorder = Recorder(self.plans, self.library, self.shaping)
        self.sessions = SessionRoom()  # WebSocket sessions (Realtime): docs/sessions.md
        # Plain HTTP/1.1 replays answered before mitmproxy (cassette-proxy run only).
        self.lane = Lane(self.library, self.intake.keyer, self.replayer, self.shaping, self.probe)
        self.addons = [
            self.library,
            self.intake,
            self.router,
            self.fallback,
            self.shaper,
            self.recorder,
            self.sessions,
            RawTunnelGuard(),  # raw TCP tunnels: never relayed where nothing may be forwarded
            WarmStart(self),  # what a first request would start, started at running
            self.lane,
        ]

    def load(self, loader: Any) -> None:
        guard_flow_lines(getattr(ctx, "master", None))  # flow lines never print a credential

    async def warm_start(self) -> None:
        """Start what a first request would otherwise start (warmup.py): threads, the
        local replay server, the offline stand-in where it may be needed."""
        scribe = self.recorder.scribe
        scribe.writer.start()
        scribe.temps.start()  # (the replay server of paced answers: ReplayShaper.running)
        if self.library.mode in ("auto", "replay"):
            await start_stand_in(self.stand_in)

    # What callers outside the rooms read: the CLI's summary, the benchmarks.
    @property
    def counts(self) -> dict[str, int]:
        return self.library.counts

    @property
    def log_summary(self) -> bool:
        return self.library.log_summary

    @log_summary.setter
    def log_summary(self, value: bool) -> None:
        self.library.log_summary = value

    @property
    def store(self) -> Any:
        return self.library.store

    @property
    def writer(self) -> Any:
        return self.recorder.scribe.writer

    @property
    def temps(self) -> Any:
        return self.recorder.scribe.temps


__all__ = [
    "DEFAULT_RESPONSE_TIMEOUT_MS",
    "FILE_HEADER",
    "MISS_HEADER",
    "MISS_STATUS",
    "MODES",
    "TEST_ID_HEADER",
    "TOKEN_HEADER",
    "CassetteRecorder",
    "unservable_summary",
]
