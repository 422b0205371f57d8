"""The rooms: one small mitmproxy addon per concern, registered in hook order.

  Intake        our control headers off, test id, X-Cassette-Fault, the key -> a Plan
  Router        cassette_mode: serve from cassettes, forward, or refuse
  Fallback      the upstream dies or hangs: answers from the cassettes instead
  ReplayShaper  paces or cuts an answer served from cassettes
  Recorder      a forwarded answer -> a cassette

Rooms talk only through the flow's Plan (plan.py) and the services they are handed
(library, replayer, shaping, the stand-in, the probe); no room imports another.
docs/architecture.md walks a replay and a recording through them.
"""
