"""Raw tunnels: a CONNECT tunnel that carries neither HTTP nor TLS.

mitmproxy hands such a tunnel to its raw TCP layer, which relays bytes both ways. Nothing
in it can be keyed, recorded or replayed, so where nothing may go to the network (replay;
auto and record-if-missing with the upstream offline) the tunnel is refused before its
upstream connect, and the log says why. Elsewhere it is relayed as before, unrecorded.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, tcp

from .redact import redact_text
from .upstream import UpstreamProbe

log = logging.getLogger("cassette_proxy")

# Modes that forward only to an upstream that is up.
_IF_UP = ("auto", "record-if-missing")


class RawTunnelGuard:
    """Refuses raw TCP tunnels where forwarding is not allowed (tcp_start, before connect)."""

    def __init__(self) -> None:
        self.probe: UpstreamProbe | None = None

    def _probe(self) -> UpstreamProbe:
        if self.probe is None:
            opts = ctx.options
            self.probe = UpstreamProbe(opts.cassette_probe_timeout_ms, opts.cassette_probe_ttl_ms)
        return self.probe

    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        mode = ctx.options.cassette_mode
        server = flow.server_conn
        if server.address is None or server.timestamp_start is not None:
            return  # already connected (not ours to refuse), or nowhere to go
        host, port = server.address[:2]
        if mode == "replay":
            where = "cassette_mode is replay"
        elif mode in _IF_UP and not await self._probe().reachable(host, port):
            where = f"the upstream {host}:{port} is offline"
        else:
            return
        # An error on the server connection before its connect: mitmproxy then never
        # opens it (server_connect sees it "killed before connect") and closes the client.
        server.error = f"cassette-proxy: raw TCP tunnel refused ({where})"
        log.warning(
            "%s refused a raw TCP tunnel to %s:%s: it carries neither HTTP nor TLS, so it "
            "cannot be answered from cassettes; %s, so it was not forwarded",
            mode,
            redact_text(str(host)),
            port,
            where,
        )

    def done(self) -> None:
        if self.probe is not None:
            self.probe.close()
