"""The baseline: answer every request with the same bytes from memory, no lookup at all."""

import os

from mitmproxy import http

BODIES = {s: open(os.environ[f"BENCH_{s.upper()}_BODY"], "rb").read() for s in ("json", "sse")}
TYPES = {"json": "application/json", "sse": "text/event-stream"}


class Answer:
    def request(self, flow: http.HTTPFlow) -> None:
        kind = "sse" if b'"stream": true' in (flow.request.content or b"") else "json"
        flow.response = http.Response.make(200, BODIES[kind], {"content-type": TYPES[kind]})


addons = [Answer()]
