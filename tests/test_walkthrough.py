"""The README walkthrough, step by step: the seed answers with nothing on port 8000,
the demo backend is recorded through curl and the openai SDK, then taken away."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import cassette_files, free_port


@pytest.fixture
def demo_backend():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cassette_proxy.demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert "demo upstream on" in proc.stdout.readline()
    yield port, proc
    proc.terminate()
    proc.wait(10)


def curl(proxy_url: str, url: str, body: str, *flags: str) -> str:
    cmd = ["curl", "-sS", *flags, "-x", proxy_url, "-H", "content-type: application/json",
           "-d", body, url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_walkthrough(proxy_factory, repo_root, tmp_path, demo_backend):
    cassettes = tmp_path / "cassettes"
    shutil.copytree(repo_root / "cassettes", cassettes)
    proxy = proxy_factory(cassette_dir=cassettes)

    # The shipped cassette answers at once (whether or not port 8000 is taken,
    # as long as what listens there is not an answering LLM: use replay to be sure).
    seed = json.loads((cassettes / "0806aef47037.json").read_text())
    replay = proxy_factory(mode="replay", cassette_dir=cassettes)
    out = curl(replay.url, "http://localhost:8000/v1/chat/completions",
               json.dumps(seed["request"]["body"]))  # fmt: skip
    assert out.count("data: ") == 10 and out.endswith("data: [DONE]\n\n")
    assert "get_weather" in out

    port, backend = demo_backend
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = '{"model": "demo-model", "messages": [{"role": "user", "content": "hello"}]}'
    live = json.loads(curl(proxy.url, url, body))
    assert live["choices"][0]["message"]["content"] == "You said: hello"

    sdk = (
        "import openai\n"
        f"client = openai.OpenAI(base_url='http://127.0.0.1:{port}/v1', api_key='sk-anything')\n"
        "stream = client.chat.completions.create(model='demo-model', stream=True,\n"
        "    messages=[{'role': 'user', 'content': 'tell me a story'}])\n"
        "print(''.join(c.choices[0].delta.content or '' for c in stream))\n"
    )
    env = {"HTTP_PROXY": proxy.url, "NO_PROXY": "", "PATH": "/usr/bin:/bin"}
    story = subprocess.run([sys.executable, "-c", sdk], env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert story.returncode == 0, story.stderr
    assert story.stdout.strip() == "You said: tell me a story"

    deadline = time.monotonic() + 10
    while len(cassette_files(cassettes)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(cassette_files(cassettes)) == 3

    backend.terminate()  # take the upstream away
    backend.wait(10)
    head = curl(proxy.url, url, body, "-i")
    assert "x-cassette-file:" in head.lower()
    assert json.loads(head.replace("\r\n", "\n").split("\n\n", 1)[1]) == live
    story = subprocess.run([sys.executable, "-c", sdk], env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert story.stdout.strip() == "You said: tell me a story"
