"""Issue 18 item 16: with an HTTP/2 upstream, one hung request's response timeout ends
that request's stream only; a healthy SSE stream on the same upstream connection goes on
to its end. Real mitmdump (auto), httpx over HTTP/2 through CONNECT, a real TLS HTTP/2
upstream on loopback (h2_upstreams.py)."""

from __future__ import annotations

import json
import ssl
import threading
from typing import Any

import httpx
import pytest
from h2_upstreams import H2Upstream
from upstreams import self_signed

CHAT = "/v1/chat/completions"


class PreferH2(ssl.SSLContext):
    """Offers h2 first: mitmproxy mirrors the client's ALPN order to the upstream."""

    def set_alpn_protocols(self, protocols: Any) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


@pytest.fixture
def h2_upstream(tmp_path):
    cert, key = self_signed(tmp_path)
    server = H2Upstream(cert, key, n_events=11, interval=0.25).start()
    server.cert = cert  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_a_hung_request_ends_its_own_stream_only(proxy_factory, h2_upstream):
    proxy = proxy_factory(
        mode="auto",
        options={
            "ssl_verify_upstream_trusted_ca": str(h2_upstream.cert),
            "cassette_response_timeout_ms": 1000,
        },
    )
    verify = PreferH2(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(cafile=str(proxy.ca_cert))
    url = h2_upstream.url + CHAT
    first_event = threading.Event()
    healthy: dict[str, Any] = {}

    with httpx.Client(proxy=proxy.url, verify=verify, http2=True, trust_env=False,
                      timeout=30) as http:  # fmt: skip

        def stream() -> None:
            body = {"model": "fake-model", "stream": True,
                    "messages": [{"role": "user", "content": "healthy"}]}  # fmt: skip
            events: list[str] = []
            try:
                with http.stream("POST", url, json=body) as r:
                    healthy["version"] = r.http_version
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            first_event.set()
            except httpx.HTTPError as e:
                healthy["error"] = repr(e)
            healthy["events"] = events
            first_event.set()

        thread = threading.Thread(target=stream)
        thread.start()
        assert first_event.wait(20)
        hung = http.post(
            url,
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hang"}]},
        )
        thread.join(30)

    # Both went over one HTTP/2 connection to the upstream: the premise of the finding.
    assert sorted(p for _, p in h2_upstream.requests) == ["hang", "healthy"]
    assert h2_upstream.connections == 1
    # The healthy stream went on to its end ...
    assert healthy.get("error") is None, healthy
    assert healthy["version"] == "HTTP/2"
    events = healthy["events"]
    assert events[-1] == "[DONE]"
    contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert contents == [f"e{i} " for i in range(11)]
    # ... and the hung one got an answer that says what happened.
    assert hung.http_version == "HTTP/2" and hung.status_code == 502
    assert "cassette_response_timeout_ms" in hung.text
    log = proxy.wait_for_log("ended this stream only")
    assert "sent no response headers within 1000 ms" in log
