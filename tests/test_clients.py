"""Clients not written in Python, and the ollama Python client, through `cassette-proxy run`.

Every client gets exactly the environment the command printed at start (its `export`
lines), so these tests also prove the README's recipes: curl with `http_proxy`, curl
with `HTTPS_PROXY` and the CA, Node 20 (undici's proxy agent, openai-node, reverse
mode). Each records against a live fake upstream, then gets the same answer with the
upstream gone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from cliproxy import CliProxy, start_cli_proxy
from conftest import cassette_files
from upstreams import (
    OllamaUpstream,
    OpenAIUpstream,
    answer_text,
    embedding_vector,
    start_ollama_upstream,
    tool_arguments,
)

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (Node 20 tests)")


def chat_body(prompt: str, stream: bool = False) -> str:
    body: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body)


def curl(
    proxy: CliProxy, url: str, prompt: str, stream: bool = False
) -> tuple[dict[str, str], str]:
    """POST a chat with curl, using only the printed environment; (headers, body)."""
    argv = [CURL or "curl", "-sS", "-i", "--suppress-connect-headers", "--fail-with-body"]
    argv += ["-H", "content-type: application/json"]
    argv += ["-d", chat_body(prompt, stream), url]
    out = subprocess.run(argv, capture_output=True, text=True, env=proxy.env(), timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    headers = dict(line.lower().split(": ", 1) for line in head.splitlines()[1:])
    return headers, body


def sse_text(body: str) -> str:
    text = ""
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


@needs_curl
def test_curl_through_http_proxy(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"))
    assert proxy.exports()["http_proxy"] == proxy.url  # curl reads only the lower-case one
    url = f"{upstream.url}/v1/chat/completions"
    headers, body = curl(proxy, url, "curl")
    assert json.loads(body)["choices"][0]["message"]["content"] == answer_text("A", "curl")
    assert "x-cassette-file" not in headers
    _, streamed = curl(proxy, url, "curl stream", stream=True)
    assert sse_text(streamed) == answer_text("A", "curl stream")

    upstream.stop()
    headers, body = curl(proxy, url, "curl")
    assert json.loads(body)["choices"][0]["message"]["content"] == answer_text("A", "curl")
    assert headers["x-cassette-file"].endswith(".json")
    _, streamed = curl(proxy, url, "curl stream", stream=True)
    assert sse_text(streamed) == answer_text("A", "curl stream")
    assert proxy.stop() == 0
    assert "2 hits, 0 misses, 2 recorded, 2 offline fallbacks" in proxy.output()


@needs_curl
def test_curl_through_https_proxy_with_the_ca(tmp_path: Path, tls_upstream: OpenAIUpstream) -> None:
    trust = f"ssl_verify_upstream_trusted_ca={tls_upstream.cert}"  # type: ignore[attr-defined]
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--set", trust)
    exports = proxy.exports()
    assert exports["HTTPS_PROXY"] == proxy.url and exports["CURL_CA_BUNDLE"].endswith(".pem")
    url = f"https://localhost:{tls_upstream.port}/v1/chat/completions"
    _, body = curl(proxy, url, "tls")
    assert json.loads(body)["choices"][0]["message"]["content"] == answer_text("TLS", "tls")
    tls_upstream.stop()
    headers, body = curl(proxy, url, "tls")
    assert json.loads(body)["choices"][0]["message"]["content"] == answer_text("TLS", "tls")
    assert "x-cassette-file" in headers
    proxy.stop()
    [cassette] = cassette_files(tmp_path / "c")
    assert json.loads(cassette.read_text())["request"]["url"].startswith("https://localhost:")


# ---- Node 20 ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """tests/node with its pinned packages installed (npm ci, once)."""
    if NODE is None:
        pytest.skip("node is not installed (Node 20 tests)")
    if not (NODE_DIR / "node_modules" / "undici").is_dir():
        npm = shutil.which("npm")
        assert npm, "node is installed but npm is not"
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR / "clients.mjs"


def node(script: Path, env: dict[str, str], client: str, base_url: str, prompt: str) -> Any:
    out = subprocess.run(
        [NODE or "node", str(script), client, base_url, prompt],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@needs_node
def test_node_version_is_20_or_newer() -> None:
    version = subprocess.run([NODE or "node", "--version"], capture_output=True, text=True).stdout
    assert int(version.strip().lstrip("v").split(".")[0]) >= 20


@needs_node
def test_node_fetch_through_the_proxy_http_and_https(
    tmp_path: Path, node_clients: Path, upstream: OpenAIUpstream, tls_upstream: OpenAIUpstream
) -> None:
    trust = f"ssl_verify_upstream_trusted_ca={tls_upstream.cert}"  # type: ignore[attr-defined]
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"), "--set", trust)
    env = proxy.env()
    assert env["NODE_EXTRA_CA_CERTS"].endswith("mitmproxy-ca-cert.pem")
    plain, secure = f"{upstream.url}/v1", f"https://localhost:{tls_upstream.port}/v1"
    got = node(node_clients, env, "fetch-proxy", plain, "node")
    assert (got["status"], got["content"], got["file"]) == (200, answer_text("A", "node"), None)
    got = node(node_clients, env, "fetch-proxy", secure, "node tls")
    assert (got["status"], got["content"]) == (200, answer_text("TLS", "node tls"))

    upstream.stop()
    tls_upstream.stop()
    for base, tag, prompt in ((plain, "A", "node"), (secure, "TLS", "node tls")):
        got = node(node_clients, env, "fetch-proxy", base, prompt)
        assert (got["status"], got["content"]) == (200, answer_text(tag, prompt))
        assert got["file"].endswith(".json")
    proxy.stop()
    assert "2 hits, 0 misses, 2 recorded" in proxy.output()


def expected_openai(tag: str, prompt: str, models: list[str]) -> dict[str, Any]:
    return {
        "content": answer_text(tag, prompt),
        "tool_call": {"name": "get_weather", "arguments": tool_arguments(tag, prompt)},
        "embedding": embedding_vector(tag, prompt),
        "models": models,
    }


@needs_node
def test_openai_node_through_reverse_mode(
    tmp_path: Path, node_clients: Path, upstream: OpenAIUpstream
) -> None:
    folder = tmp_path / "c"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--reverse", upstream.url)
    base_url = proxy.exports()["OPENAI_BASE_URL"]
    want = expected_openai("A", "reverse", upstream.models)
    assert node(node_clients, proxy.env(), "openai", base_url, "reverse") == want
    proxy.stop()
    assert len(cassette_files(folder)) == 4  # stream, tool call, embeddings, models

    upstream.stop()
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--reverse", upstream.url)
    assert (
        node(node_clients, proxy.env(), "openai", proxy.exports()["OPENAI_BASE_URL"], "reverse")
        == want
    )
    proxy.stop()
    assert "4 hits, 0 misses, 0 recorded, 4 offline fallbacks" in proxy.output()


@needs_node
def test_openai_node_through_the_forward_proxy(
    tmp_path: Path, node_clients: Path, upstream: OpenAIUpstream
) -> None:
    want = expected_openai("A", "forward", upstream.models)
    # Recorded in a first run, then served from the cassettes in a second (within one
    # run the same requests again would be their sequences' next positions).
    for summary in ("0 hits, 0 misses, 4 recorded", "4 hits, 0 misses, 0 recorded"):
        args = ("-d", str(tmp_path / "c"), "--mode", "record-if-missing")
        proxy = start_cli_proxy(tmp_path, *args)
        assert (
            node(node_clients, proxy.env(), "openai-proxy", f"{upstream.url}/v1", "forward") == want
        )
        proxy.stop()
        assert summary in proxy.output()
    assert len(upstream.requests) == 4


# ---- the ollama Python client ----------------------------------------------------------


@pytest.fixture
def ollama_upstream() -> Iterator[OllamaUpstream]:
    server = start_ollama_upstream("A")
    yield server
    server.stop()


def ollama_calls(client: ollama.Client) -> dict[str, Any]:
    messages = [{"role": "user", "content": "llama"}]
    return {
        "chat": client.chat(model="llama3.2:3b", messages=messages).message.content,
        "stream": "".join(
            part.message.content or ""
            for part in client.chat(model="llama3.2:3b", messages=messages, stream=True)
        ),
        "generate": client.generate(model="llama3.2:3b", prompt="gen").response,
        "embed": client.embed(model="all-minilm", input="vec").embeddings,
        "list": [m.model for m in client.list().models],
    }


def test_ollama_python_client_through_the_proxy(
    tmp_path: Path, ollama_upstream: OllamaUpstream
) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(tmp_path / "c"))
    client = ollama.Client(host=ollama_upstream.url, proxy=proxy.url, trust_env=False)
    live = ollama_calls(client)
    assert live["chat"] == live["stream"] == answer_text("A", "llama")
    assert live["generate"] == answer_text("A", "gen")
    ollama_upstream.stop()
    assert ollama_calls(client) == live
    proxy.stop()
    assert "5 hits, 0 misses, 5 recorded, 5 offline fallbacks" in proxy.output()
