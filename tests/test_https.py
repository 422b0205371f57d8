"""HTTPS through the proxy (HTTPS_PROXY with mitmproxy's CA) to a TLS upstream:
recording, offline fallback, and the upstream dying while an "up" verdict is cached."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import cassette_files
from upstreams import answer_text


def https_client(proxy, upstream_port: int) -> openai.OpenAI:
    """The openai SDK as a user sets it up: HTTPS_PROXY and mitmproxy's CA."""
    verify = ssl.create_default_context(cafile=str(proxy.ca_cert))
    http = httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=30)
    return openai.OpenAI(
        base_url=f"https://localhost:{upstream_port}/v1",
        api_key="sk-test-https-000000",
        http_client=http,
        max_retries=0,
    )


def chat(text: str, **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


def test_https_record_then_offline_replay(proxy_factory, tls_upstream):
    proxy = proxy_factory(options={"ssl_verify_upstream_trusted_ca": str(tls_upstream.cert)})
    client = https_client(proxy, tls_upstream.port)
    live = client.chat.completions.create(**chat("over tls"))
    assert live.choices[0].message.content == answer_text("TLS", "over tls")
    live_stream = [c.model_dump() for c in client.chat.completions.create(**chat("s"), stream=True)]
    deadline = time.monotonic() + 10
    while len(cassette_files(proxy.cassette_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    urls = {json.loads(f.read_text())["request"]["url"] for f in cassette_files(proxy.cassette_dir)}
    assert urls == {f"https://localhost:{tls_upstream.port}/v1/chat/completions"}

    tls_upstream.stop()
    client = https_client(proxy, tls_upstream.port)
    assert client.chat.completions.create(**chat("over tls")) == live
    assert [c.model_dump() for c in client.chat.completions.create(**chat("s"), stream=True)] == (
        live_stream
    )


def test_https_upstream_dies_while_up_verdict_is_cached(proxy_factory, tls_upstream):
    proxy = proxy_factory(
        options={
            "ssl_verify_upstream_trusted_ca": str(tls_upstream.cert),
            "cassette_probe_ttl_ms": 600_000,
        }
    )
    live = https_client(proxy, tls_upstream.port).chat.completions.create(**chat("tls window"))
    deadline = time.monotonic() + 10
    while not cassette_files(proxy.cassette_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    tls_upstream.stop()
    # A new client connection: mitmproxy connects upstream again, and the probe in
    # server_connect sends it to the local stand-in, over TLS, instead of a 502.
    again = https_client(proxy, tls_upstream.port).chat.completions.create(**chat("tls window"))
    assert again == live
    assert "went away" in proxy.log_text()


def test_curl_with_https_proxy_and_the_ca(proxy_factory, tls_upstream):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    proxy = proxy_factory(options={"ssl_verify_upstream_trusted_ca": str(tls_upstream.cert)})
    env = proxy.proxy_env()
    url = f"https://localhost:{tls_upstream.port}/v1/chat/completions"
    cmd = ["curl", "-sS", "--fail", "-H", "content-type: application/json",
           "-d", json.dumps(chat("curl tls")), url]  # fmt: skip
    live = json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
    assert live["choices"][0]["message"]["content"] == answer_text("TLS", "curl tls")
    deadline = time.monotonic() + 10
    while not cassette_files(proxy.cassette_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    tls_upstream.stop()
    replay = subprocess.run(cmd, env=env, capture_output=True, check=True).stdout
    assert json.loads(replay) == live


def test_python_subprocess_with_https_proxy_environment(proxy_factory, tls_upstream, tmp_path):
    """The README's recipe: only environment variables, no code changes."""
    proxy = proxy_factory(options={"ssl_verify_upstream_trusted_ca": str(tls_upstream.cert)})
    script = tmp_path / "client.py"
    script.write_text(
        "import openai, sys\n"
        f"c = openai.OpenAI(base_url='https://localhost:{tls_upstream.port}/v1', api_key='sk-x',"
        " max_retries=0)\n"
        "r = c.chat.completions.create(model='fake-model', messages=[{'role': 'user',"
        " 'content': 'env only'}])\n"
        "print(r.choices[0].message.content)\n"
    )
    env = {k: v for k, v in proxy.proxy_env().items() if k != "REQUESTS_CA_BUNDLE"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, str(script)], env=env | {"PATH": os.environ.get("PATH", "")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == answer_text("TLS", "env only")
