"""A local stand-in upstream for requests whose upstream died after they were let through.

mitmproxy sends its own 502 once a connect fails, whatever an addon does in the
error hook. So when the last-moment probe in ``server_connect`` fails, the
connection is pointed here instead, and this server answers from the cassettes.
The request carries a token header naming the flow it belongs to.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from mitmproxy import http
from mitmproxy.net.http.http1.assemble import assemble_response

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-cassette-fallback"
MAX_HEAD = 64 * 1024

Answer = Callable[[str], http.Response]


class FallbackServer:
    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._plain: asyncio.Server | None = None
        self._tls: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.tls_address: tuple[str, int] | None = None

    async def start(self, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> None:
        if self._plain is None:
            self._plain = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.address = self._plain.sockets[0].getsockname()[:2]
        if self._tls is None and cert_pem and key_pem:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
                cert.write_bytes(cert_pem)
                key.write_bytes(key_pem)
                context.load_cert_chain(cert, key)
            context.set_alpn_protocols(["http/1.1"])
            self._tls = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
            self.tls_address = self._tls.sockets[0].getsockname()[:2]

    def close(self) -> None:
        for server in (self._plain, self._tls):
            if server is not None:
                server.close()
        self._plain = self._tls = None
        self.address = self.tls_address = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            token = ""
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == TOKEN_HEADER:
                    token = value.strip()
                elif name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if length:
                await reader.readexactly(length)
            response = self._answer(token)
            response.headers["connection"] = "close"
            writer.write(assemble_response(response))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            log.warning("cassette fallback: bad request from mitmproxy: %s", e)
        finally:
            writer.close()


def certificate_pems(certstore: object, host: str = "localhost") -> tuple[bytes, bytes]:
    """A certificate for the TLS stand-in from mitmproxy's own certificate store."""
    entry = certstore.get_cert(host, [])  # type: ignore[attr-defined]
    key = entry.privatekey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return entry.cert.to_pem(), key
