"""Issue 18 items 7-9: every line the proxy prints is redacted as a cassette is (log
lines of faults and unkeyable requests, mitmdump's flow lines at flow_detail=3), and
credentials under more names and shapes (jwt, bearer, pwd, header lists in a body, a
credential-named header opted into recording) never reach a cassette. Real mitmdump,
httpx, curl and the openai SDK, fake upstreams on loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
from cassette_proxy.cassette import read_cassette
from cassette_proxy.redact import redact_body, request_secrets
from conftest import cassette_files, openai_client, wait_until
from upstreams import answer_text, start_credential_upstream

CHAT = "/v1/chat/completions"
# An Azure-style key (32 hex digits, no sk- prefix) that a gateway takes in the path as
# well as in the api-key header; and an OpenAI-style one in another gateway's path.
AZURE_KEY = "a3f9c2e17b4d4e0f9a8b7c6d5e4f3a21"
AZURE_PATH = f"/openai/{AZURE_KEY}/deployments/gpt/chat/completions"
SK_PATH = "/gw/sk-FAULTPATHKEY0123456789/v1/chat/completions"


def every_byte_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


# ---- item 7: log lines -----------------------------------------------------------------


def test_keys_in_url_paths_never_reach_a_log_line(proxy_factory, upstream_factory):
    upstream = upstream_factory("A")
    proxy = proxy_factory(mode="auto")
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
        # Unkeyable (not JSON): passed through unrecorded, and the log says so.
        passed = http.post(
            upstream.url + AZURE_PATH,
            content=b"plain text, not JSON",
            headers={"api-key": AZURE_KEY, "content-type": "text/plain"},
        )
        assert passed.status_code == 200 and len(upstream.requests) == 1  # forwarded
        proxy.wait_for_log("passthrough POST")
        # Faults: answered, a bad one refused, an exhausted times=1 answered as usual.
        for path, headers in ((SK_PATH, {}), (AZURE_PATH, {"api-key": AZURE_KEY})):
            body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
            fault = {**headers, "X-Cassette-Fault": "status=503,times=1"}
            first = http.post(upstream.url + path, json=body, headers=fault)
            assert first.status_code == 503
            second = http.post(upstream.url + path, json=body, headers=fault)
            assert second.status_code != 503
            bad = {**headers, "X-Cassette-Fault": "status=abc"}
            assert http.post(upstream.url + path, json=body, headers=bad).status_code == 400
    replay = proxy_factory(mode="replay")
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30) as http:
        refused = http.post(
            upstream.url + AZURE_PATH,
            content=b"plain text, not JSON",
            headers={"api-key": AZURE_KEY, "content-type": "text/plain"},
        )
    assert refused.json()["error"]["type"] == "cassette_unkeyable"
    assert AZURE_KEY not in refused.text
    replay.wait_for_log("not forwarded POST")
    wait_until(lambda: proxy.log_text().count("used up") == 2, what="two used-up faults")
    log = proxy.log_text() + replay.log_text()
    assert log.count("-> 503 (X-Cassette-Fault)") == 2
    assert log.count("bad X-Cassette-Fault header on POST") == 2
    assert "passthrough POST /openai/REDACTED/deployments/gpt/chat/completions" in log
    assert "not forwarded POST /openai/REDACTED/deployments" in log
    assert "/gw/REDACTED/v1/chat/completions" in log
    assert AZURE_KEY not in log
    assert "FAULTPATHKEY" not in log


def test_redact_line_takes_credential_pairs_out_of_any_line():
    from cassette_proxy.redact import redact_line  # new in issue 18

    line = "GET https://h/v1/x?api-key=abc123&api-version=2024-06-01 ;key=XYZ status=503"
    assert redact_line(line) == (
        "GET https://h/v1/x?api-key=REDACTED&api-version=2024-06-01 ;key=REDACTED status=503"
    )
    assert redact_line("Authorization: Bearer abc.def") == "Authorization: Bearer REDACTED"


# ---- item 8: more names and shapes -------------------------------------------------------


def shaped_secrets(n: int) -> dict[str, Any]:
    return {
        "jwt": f"eyJhbGciOiJIUzI1NiJ9.JWTFIELD{n}x0123456789.sig",
        "bearer": f"BEARERFIELD{n}x0123456789",
        "pwd": f"PWDFIELD{n}x0123456789",
        "mcp_servers": [
            {"url": "https://mcp.example/a",
             "headers": [["Authorization", f"Bearer MCPLISTHEADER{n}x0123456789"]]},
            {"url": "https://mcp.example/b",
             "headers": [{"name": "X-Api-Key", "value": f"MCPNAMEDHEADER{n}x0123456789"}]},
        ],
    }  # fmt: skip


def shaped_needles(n: int) -> list[str]:
    return [f"{w}{n}x0123456789" for w in ("JWTFIELD", "BEARERFIELD", "PWDFIELD",
            "MCPLISTHEADER", "MCPNAMEDHEADER", "XJWTHEADER")]  # fmt: skip


def test_more_credential_names_and_header_lists_never_reach_a_cassette(
    proxy_factory, upstream_factory
):
    upstream = upstream_factory("A")
    proxy = proxy_factory(
        mode="auto", options={"cassette_record_headers": ["x-jwt", "x-request-tag"]}
    )

    def ask(n: int) -> str:
        client = openai_client(proxy, upstream)
        answer = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "shapes"}],
            extra_body=shaped_secrets(n),
            extra_headers={"x-jwt": f"XJWTHEADER{n}x0123456789", "x-request-tag": "kept"},
        )
        return answer.choices[0].message.content or ""

    assert ask(1) == answer_text("A", "shapes")
    files = cassette_files(proxy.cassette_dir)
    assert len(files) == 1
    written = every_byte_under(proxy.cassette_dir)
    for needle in shaped_needles(1):
        assert needle.encode() not in written, needle
    cassette = read_cassette(files[0])
    assert cassette.request.headers == {"x-request-tag": "kept"}
    body = cassette.request.body
    assert body["jwt"] == body["bearer"] == body["pwd"] == "REDACTED"
    assert body["mcp_servers"][0]["headers"] == [["Authorization", "REDACTED"]]
    assert body["mcp_servers"][1]["headers"] == [{"name": "X-Api-Key", "value": "REDACTED"}]
    assert upstream.requests[0].headers["x-jwt"] == "XJWTHEADER1x0123456789"  # sent as is

    # Offline, other credentials in the same shapes key the same: a hit, not a miss.
    upstream.stop()
    assert ask(2) == answer_text("A", "shapes")
    assert "auto hit " in proxy.log_text()


def test_header_lists_in_bodies_are_credentials_and_their_neighbours_data():
    body = {
        "stop": ["key", "other"],
        "filters": [{"key": "region", "value": "us"}],
        "rows": [["name", "value"]],
        "h": [{"name": "x-request-id", "value": "r1"}],
    }
    assert redact_body(body) is body
    found = request_secrets([], [], shaped_secrets(1))
    assert {"MCPLISTHEADER1x0123456789", "MCPNAMEDHEADER1x0123456789"} <= found


# ---- item 9: mitmdump's flow lines at flow_detail=3 ---------------------------------------


def test_flow_detail_3_prints_bodies_redacted_as_their_cassettes(proxy_factory):
    upstream = start_credential_upstream("A", accepted_keys={"CHATKEY0123456789abc"})
    try:
        proxy = proxy_factory(mode="auto", options={"flow_detail": 3}, env={"COLUMNS": "4000"})
        # An identity server's token exchange, as curl posts a form: it issues tokens.
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-x", proxy.url,
             "--data-urlencode", "grant_type=urn:ibm:params:oauth:grant-type:apikey",
             "--data-urlencode", "apikey=IBMAPIKEYVALUE0123456789",
             upstream.url + "/identity/token"],
            capture_output=True, check=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        issued = json.loads(out.stdout)
        assert issued["access_token"].startswith("access-A-")
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
            chat = http.post(
                upstream.url + CHAT,
                json={"model": "fake-model", "password": "hunter2",
                      "messages": [{"role": "user", "content": "login"}]},
                headers={"Authorization": "Bearer CHATKEY0123456789abc"},
            )  # fmt: skip
        assert chat.status_code == 200
        terminal = proxy.wait_for_log("/v1/chat/completions")
        proxy.stop()
        terminal = proxy.log_text()
        assert "/identity/token" in terminal and "REDACTED" in terminal
        tokens = [issued[k] for k in ("access_token", "refresh_token", "id_token")]
        for secret in ("hunter2", *tokens, "IBMAPIKEYVALUE0123456789", "CHATKEY0123456789abc"):
            assert secret not in terminal, secret
        written = every_byte_under(proxy.cassette_dir)
        assert b"hunter2" not in written and issued["access_token"].encode() not in written
    finally:
        upstream.stop()
