"""Fallback: the upstream dies or hangs, and the cassettes answer in its place.

  server_connect   the upstream died since the last probe: the connection is pointed at
                   the local stand-in, which answers from the cassettes (a busy upstream
                   is waited for first: upstream.py)
  (a timer)        no response headers within cassette_response_timeout_ms: the
                   cassettes answer in the upstream's place (fallback.answer_in_flight)

Either way the answer is the Replayer's and passes the same shaping as any replay; a
forwarded attempt that ends with no answer gives its sequence position back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks
from mitmproxy.tls import TlsData
from OpenSSL import SSL

from .. import answers
from ..fallback import (
    FallbackServer,
    answer_in_flight,
    can_answer_in_flight,
    give_up_in_flight,
    start_stand_in,
)
from ..library import Library
from ..pacing import Replay
from ..plan import FORWARD, SERVE, TOKEN_HEADER, Plan, Plans
from ..replayer import Replayer
from ..shaping import Shaping
from ..upstream import BUSY, CONNECT_TIMEOUT_S, DOWN, UpstreamProbe

log = logging.getLogger("cassette_proxy")

# auto: no response headers from the upstream by then, and the cassettes answer (or a 504).
# Under the openai SDK's own 600 s; above most non-streamed generations.
DEFAULT_RESPONSE_TIMEOUT_MS = 120_000
MITMPROXY_CONNECT_TIMEOUT_S = 3 * CONNECT_TIMEOUT_S


class Fallback:
    def __init__(
        self,
        plans: Plans,
        library: Library,
        replayer: Replayer,
        shaping: Shaping,
        probe: UpstreamProbe,
        stand_in: FallbackServer,
    ) -> None:
        self.plans = plans
        self.library = library
        self.replayer = replayer
        self.shaping = shaping
        self.probe = probe
        self.stand_in = stand_in
        self.response_timeout_ms = DEFAULT_RESPONSE_TIMEOUT_MS
        # Forwarded auto-mode flows not yet connected, by client connection, then by flow:
        # an HTTP/2 client multiplexes many flows on one connection (server_connect).
        self._awaiting_connect: dict[str, dict[str, http.HTTPFlow]] = {}
        self._connect_deadlines: dict[str, asyncio.TimerHandle] = {}

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cassette_response_timeout_ms",
            int,
            DEFAULT_RESPONSE_TIMEOUT_MS,
            "auto mode: with no response headers from the upstream this long after the "
            "request, answer from the cassettes (a 504 on a miss). 0: wait for the upstream.",
        )

    def configure(self, updated: set[str]) -> None:
        if "cassette_response_timeout_ms" in updated:
            timeout = ctx.options.cassette_response_timeout_ms
            if timeout < 0:
                raise exceptions.OptionsError(
                    "cassette_response_timeout_ms must be >= 0 (milliseconds; 0 waits for "
                    f"the upstream as long as it takes), not {timeout}"
                )
            self.response_timeout_ms = timeout

    def done(self) -> None:
        self.stand_in.close()
        self.probe.close()

    def request(self, flow: http.HTTPFlow) -> None:
        plan = self.plans.get(flow)
        if plan is None or plan.route != FORWARD or flow.response is not None:
            return
        if self.library.mode == "auto" and plan.keyed:
            self._await_connect(flow)
            self._watch_response(flow)

    # ---- the answer from cassettes, shaped as every replay is ----------------------

    def _answer(self, flow: http.HTTPFlow, plan: Plan, why: str) -> http.Response | Replay:
        """The cassettes' answer for a forwarded flow whose upstream failed it."""
        response = self.replayer.answer(plan, why=why)
        plan.route = SERVE
        flow.comment = f"cassette: {plan.served_from or 'miss'} ({why})"
        flow.marked = ":vhs:" if plan.served_from else ":x:"
        started = (flow.request.timestamp_end or time.time()) + _delay(plan)
        shaped = self.shaping.shape(plan, response, started)
        return shaped if shaped is not None else response

    # ---- server_connect: no window of 502s when the upstream dies -----------------

    def _await_connect(self, flow: http.HTTPFlow) -> None:
        """Remember a forwarded flow until it has a server connection (server_connect)."""
        flows = self._awaiting_connect.setdefault(flow.client_conn.id, {})
        for settled in [f for f in flows.values() if not _connecting(f)]:
            del flows[settled.id]  # answered, failed or connected: server_connect is past
        flows[flow.id] = flow

    def _connecting(self, client: connection.Client, address: Any) -> list[http.HTTPFlow]:
        """The client's flows that wait for a connection to this upstream address."""
        flows = self._awaiting_connect.get(client.id, {}).values()
        return [
            f for f in flows if _connecting(f) and (f.request.host, f.request.port) == address[:2]
        ]

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is None:
            return
        flows = self._connecting(data.client, address)
        plans = [plan for f in flows if (plan := self.plans.get(f)) is not None]
        if not plans:
            return
        host, port = address[:2]
        if any(p.stand_in for p in plans):
            up = False  # found dead for this client's other streams: these follow them
        elif all(p.probed and not p.busy for p in plans):
            up = True  # probed for these very requests a moment ago
        else:
            verdict = BUSY if any(p.busy for p in plans) else await self.probe.probe(host, port)
            up = verdict != DOWN
            if verdict == BUSY:
                # A live server with a full accept queue drops SYNs too: wait for it.
                seen = self.probe.seen_up(host, port)
                log.info(
                    "upstream %s:%s is busy (no connect within %d ms, seen up %s): "
                    "waiting up to %.0f s for it to accept",
                    host,
                    port,
                    self.probe.timeout_ms,
                    f"{seen:.0f} s ago" if seen is not None else "lately",
                    CONNECT_TIMEOUT_S,
                )
                up = await self.probe.wait_until_up(host, port)
        if up:
            if any(p.busy for p in plans):
                self._bound_connect(data.server)  # it accepted ours; mitmproxy's is next
            return
        await start_stand_in(self.stand_in)
        for flow in flows:
            plan = self.plans.get(flow)
            if plan is not None and not plan.stand_in:
                plan.stand_in = True
                self.library.counts["fallback"] += 1
                flow.request.headers[TOKEN_HEADER] = self.stand_in.expect(
                    _later(self._answer, weakref.ref(flow), plan, "upstream went away")
                )
        stand_in = self.stand_in.tls_address if data.server.tls else self.stand_in.address
        log.info(
            "upstream %s:%s went away; answering %d request(s) from cassettes",
            host,
            port,
            len(flows),
        )
        data.server.address = stand_in

    def _bound_connect(self, server: connection.Server) -> None:
        """mitmproxy has no connect timeout: after a busy upstream accepted our connect,
        cancel mitmproxy's own if it takes longer than MITMPROXY_CONNECT_TIMEOUT_S.

        server_connect runs in the task that then connects; cancelling it makes mitmproxy
        fail the connect (server_connect_error, a 502) instead of waiting for minutes.
        Generous: on a crowded event loop a connect done in the kernel is seen late.
        """
        task = asyncio.current_task()
        if task is None:
            return

        def expire() -> None:
            self._connect_deadlines.pop(server.id, None)
            if server.timestamp_tcp_setup is None and server.error is None:
                log.warning(
                    "upstream %s:%s did not accept within %.0f s: connect cancelled",
                    *server.address[:2],
                    MITMPROXY_CONNECT_TIMEOUT_S,
                )
                task.cancel(f"connect timeout ({MITMPROXY_CONNECT_TIMEOUT_S:.0f} s)")

        loop = asyncio.get_running_loop()
        self._connect_deadlines[server.id] = loop.call_later(MITMPROXY_CONNECT_TIMEOUT_S, expire)

    def _unbound_connect(self, server: connection.Server) -> None:
        deadline = self._connect_deadlines.pop(server.id, None)
        if deadline is not None:
            deadline.cancel()

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._unbound_connect(data.server)
        address = data.server.address
        if address and address not in (self.stand_in.address, self.stand_in.tls_address):
            self.probe.mark(*address[:2], up=True)

    def client_disconnected(self, client: connection.Client) -> None:
        # A keep-alive request reuses its server connection and never reaches
        # server_connect: forget the client's flows when it goes.
        self._awaiting_connect.pop(client.id, None)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._unbound_connect(data.server)
        if data.server.address:
            self.probe.mark(*data.server.address[:2], up=False)

    # ---- response timeout: an upstream that accepts and never answers -------------

    def _watch_response(self, flow: http.HTTPFlow) -> None:
        """After cassette_response_timeout_ms with no response headers, answer from cassettes."""
        if self.response_timeout_ms <= 0:
            return
        # A weak reference: a timer must not keep a finished flow (and its bodies) alive.
        asyncio.get_running_loop().call_later(
            self.response_timeout_ms / 1000, self._response_timed_out, weakref.ref(flow)
        )

    def _response_timed_out(self, ref: weakref.ref[http.HTTPFlow]) -> None:
        flow = ref()
        if flow is None or flow.response is not None or flow.error is not None or not flow.live:
            return
        plan = self.plans.get(flow)
        if plan is None or plan.stand_in or plan.route != FORWARD:
            return
        if not flow.server_conn.connected:
            # Still connecting (a busy upstream; bounded by CONNECT_TIMEOUT_S): look again.
            asyncio.get_running_loop().call_later(0.25, self._response_timed_out, ref)
            return
        host, port = flow.request.host, flow.request.port
        self.probe.mark(host, port, up=False)  # the next requests do not wait as long
        if not can_answer_in_flight(flow):
            # Nothing can reach this client but mitmproxy's 502: no answer is taken from
            # the cassettes for it (its position goes back for the client's retry).
            self.library.sequencer.interrupted(plan)
            self.library.sequencer.release(plan)
            how = give_up_in_flight(flow)
        else:
            answer = self._answer(flow, plan, "upstream did not answer")
            if plan.served_from is None and isinstance(answer, http.Response):
                answer = answers.upstream_timeout(answer, self.response_timeout_ms)
            how = answer_in_flight(flow, answer)
        log.warning(
            "upstream %s:%s sent no response headers within %d ms "
            "(cassette_response_timeout_ms) for %s %s: %s",
            host,
            port,
            self.response_timeout_ms,
            plan.method,
            plan.path,
            how,
        )

    # ---- TLS: our stand-in, and upstream handshakes that fail ----------------------

    def tls_start_server(self, tls_start: TlsData) -> None:
        """Our own stand-in has a throwaway certificate: do not verify it."""
        if self.stand_in.tls_address is None or tls_start.conn.address != self.stand_in.tls_address:
            return
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        context.set_alpn_protos([b"http/1.1"])
        tls_start.ssl_conn = SSL.Connection(context)
        tls_start.ssl_conn.set_connect_state()

    def tls_failed_server(self, tls_start: TlsData) -> None:
        """mitmproxy answers a failed upstream handshake with an HTML 502; say what to do."""
        conn = tls_start.conn
        if conn.address is None or conn.address == self.stand_in.tls_address:
            return
        error = conn.error or "handshake failed"
        hint = ""
        if "certificate" in error.lower():
            hint = (
                "; for an upstream with a self-signed or private-CA certificate start the "
                "proxy with --set ssl_verify_upstream_trusted_ca=CA.pem "
                "(or, not verifying at all, --set ssl_insecure=true)"
            )
        log.warning("TLS to upstream %s:%s failed: %s%s", *conn.address[:2], error, hint)


def _later(answer: Any, ref: weakref.ref[http.HTTPFlow], plan: Plan, why: str) -> Any:
    """The stand-in's answer for a flow, worked out when the stand-in is asked."""

    def call() -> http.Response | Replay:
        flow = ref()
        if flow is None:
            return answers.stand_in_unknown()
        return answer(flow, plan, why)

    return call


def _delay(plan: Plan) -> float:
    return plan.fault.delay_ms / 1000 if plan.fault is not None else 0.0


def _connecting(flow: http.HTTPFlow) -> bool:
    """No answer, no error, no server connection yet: a flow server_connect may carry."""
    return flow.response is None and flow.error is None and not flow.server_conn.connected
