"""Issue 18 item 6: a CONNECT tunnel that carries neither HTTP nor TLS never reaches the
network in replay (nor in auto with the upstream offline). Real mitmdump, a raw TCP
client speaking through CONNECT, a real TCP server with a banner on loopback."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest
from upstreams import refused_port

HOST = "127.0.0.1"
BANNER = b"220 raw-service ready\r\n"
CLIENT_BYTES = b"\x00\x01HELO-raw\r\n"  # no space, not a TLS record: mitmproxy's raw TCP


class _BannerHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: BannerServer = self.server  # type: ignore[assignment]
        server.connections += 1
        self.request.sendall(BANNER)
        self.request.settimeout(3)
        try:
            data = self.request.recv(1024)
        except OSError:
            return
        server.received += data
        if data:
            self.request.sendall(b"echo:" + data)


class BannerServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _BannerHandler)
        self.connections = 0
        self.received = b""


@pytest.fixture
def banner_server() -> Iterator[BannerServer]:
    server = BannerServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def tunnel(proxy_port: int, port: int) -> bytes:
    """CONNECT to 127.0.0.1:port, send raw bytes, return everything the client got back."""
    with socket.create_connection((HOST, proxy_port), timeout=10) as s:
        s.sendall(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            piece = s.recv(1024)
            if not piece:
                break
            head += piece
        assert head.startswith(b"HTTP/1.1 200"), head
        s.sendall(CLIENT_BYTES)
        got = head.partition(b"\r\n\r\n")[2]
        s.settimeout(5)
        try:
            while True:
                piece = s.recv(1024)
                if not piece:
                    break
                got += piece
                if b"echo:" in got:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return got


def test_raw_tunnel_is_refused_in_replay(proxy_factory, banner_server):
    proxy = proxy_factory(mode="replay")
    got = tunnel(proxy.port, banner_server.server_address[1])
    text = proxy.wait_for_log("refused a raw TCP tunnel")
    assert banner_server.connections == 0 and banner_server.received == b""
    assert BANNER not in got
    assert "cassette_mode is replay" in text and "neither HTTP nor TLS" in text


def test_raw_tunnel_is_refused_in_auto_with_the_upstream_offline(proxy_factory):
    proxy = proxy_factory(mode="auto")
    port = refused_port()
    got = tunnel(proxy.port, port)
    text = proxy.wait_for_log("refused a raw TCP tunnel")
    assert got == b""
    assert f"the upstream {HOST}:{port} is offline" in text


def test_raw_tunnel_is_relayed_in_auto_with_the_upstream_up(proxy_factory, banner_server):
    proxy = proxy_factory(mode="auto")
    got = tunnel(proxy.port, banner_server.server_address[1])
    assert BANNER in got and b"echo:" + CLIENT_BYTES in got
    assert banner_server.received == CLIENT_BYTES
    assert "refused a raw TCP tunnel" not in proxy.log_text()
