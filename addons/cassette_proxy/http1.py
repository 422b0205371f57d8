"""A whole answer as mitmproxy's HTTP/1 server writes it, for the fast lane (lane.py).

mitmproxy sends an answer an addon made in three steps (``Http1Server.send``): the head
(``assemble_response_head``), the body (one chunk when the answer says
``transfer-encoding: chunked``) and, for chunked, the last chunk. Written here in one
piece, the client reads the same bytes.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import http1


def encode(response: http.Response, method: str = "GET") -> tuple[bytes, bool]:
    """The bytes of a whole answer, and whether the connection closes after it."""
    head = http1.assemble_response_head(response)
    body = response.raw_content or b""
    chunked = "chunked" in response.headers.get("transfer-encoding", "").lower()
    if chunked:
        framed = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        if method.upper() != "HEAD":
            framed += b"0\r\n\r\n"
        body = framed
    close = http1.connection_close(response.http_version, response.headers)
    status = response.status_code
    if not chunked and "content-length" not in response.headers and status not in (204, 304):
        close = close or not 100 <= status < 200  # its end is where the connection ends
    return head + body, close
