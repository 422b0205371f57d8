"""`cassette-proxy drift` at its edges: redirects (credentials stay with the recorded
upstream, the method never changes) and model lists of any length, checked through the
real CLI against real upstreams on loopback."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cliproxy import CLI, start_cli_proxy
from conftest import cassette_files, openai_client
from redirect_upstream import RedirectUpstream
from upstreams import OpenAIUpstream

SECRET = "sk-drift-secret-0123456789"


def run_drift(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run(
        [str(CLI), "drift", *args], capture_output=True, text=True, timeout=120,
        env=base | (env or {}),
    )  # fmt: skip


def record_chat(tmp_path: Path, upstream: OpenAIUpstream) -> Path:
    folder = tmp_path / "cassettes"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = openai_client(proxy.url, upstream)
    client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "where to?"}]
    )
    assert proxy.stop() == 0
    [cassette] = cassette_files(folder)
    return cassette


@pytest.fixture
def redirectors() -> Iterator[list[RedirectUpstream]]:
    started: list[RedirectUpstream] = []
    yield started
    for r in started:
        r.stop()


@pytest.mark.parametrize("status", [302, 307])
def test_no_credentials_to_another_host(
    tmp_path: Path,
    upstream: OpenAIUpstream,
    upstream_factory: object,
    redirectors: list[RedirectUpstream],
    status: int,
) -> None:
    cassette = record_chat(tmp_path, upstream)
    elsewhere = upstream_factory("B")  # type: ignore[operator]
    redirector = RedirectUpstream(elsewhere.url, status).start()
    redirectors.append(redirector)

    for env, args in (
        ({"OPENAI_API_KEY": SECRET}, ()),
        ({}, ("--header", f"X-Api-Key: {SECRET}")),
    ):
        out = run_drift(str(cassette), "--upstream", redirector.url, *args, env=env)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "a redirect to another host" in out.stdout and "not followed" in out.stdout
        assert SECRET not in out.stdout + out.stderr
        assert "1 not checked" in out.stderr
    assert [a.method for a in redirector.arrived] == ["POST", "POST"]
    assert redirector.arrived[0].headers["authorization"] == f"Bearer {SECRET}"
    assert elsewhere.requests == []  # the other host never saw the credentials


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_keeps_the_method_and_body(
    tmp_path: Path,
    upstream: OpenAIUpstream,
    upstream_factory: object,
    redirectors: list[RedirectUpstream],
    status: int,
) -> None:
    cassette = record_chat(tmp_path, upstream)
    recorded_body = json.loads(cassette.read_text())["request"]["body"]

    # Without credentials, a redirect to another host is followed, as a POST with its body.
    elsewhere = upstream_factory("B")  # type: ignore[operator]
    redirector = RedirectUpstream(elsewhere.url, status).start()
    redirectors.append(redirector)
    out = run_drift(str(cassette), "--upstream", redirector.url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.strip() == "1 cassette(s): 0 drifted, 1 unchanged"
    [arrived] = elsewhere.requests
    assert arrived.method == "POST" and arrived.path == "/v1/chat/completions"
    assert arrived.json() == recorded_body

    # With credentials, a redirect on the same host is followed: method, body and key kept.
    upstream.clear_requests()
    same = RedirectUpstream("", status, relay=upstream.url)
    redirectors.append(same.start())
    same.target = same.url + "/moved"
    out = run_drift(str(cassette), "--upstream", same.url, env={"OPENAI_API_KEY": SECRET})
    assert out.returncode == 0, out.stdout + out.stderr
    assert [(a.method, a.path) for a in same.arrived] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/moved/v1/chat/completions"),
    ]
    [relayed] = upstream.requests
    assert relayed.method == "POST" and relayed.json() == recorded_body
    assert relayed.headers["authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize("models", [["only-model"], ["a", "b", "c"], []])
def test_an_unchanged_model_list_is_not_drift(
    tmp_path: Path, upstream: OpenAIUpstream, models: list[str]
) -> None:
    upstream.configure(models=models)
    folder = tmp_path / "cassettes"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = openai_client(proxy.url, upstream)
    assert [m.id for m in client.models.list()] == models
    assert proxy.stop() == 0
    [cassette] = cassette_files(folder)
    assert isinstance(json.loads(cassette.read_text())["response"]["body"], list)

    same = run_drift(str(cassette))
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout == ""
    assert same.stderr.strip() == "1 cassette(s): 0 drifted, 1 unchanged"

    if models:  # a real change is still seen
        upstream.configure(reshape=_without_owner)
        changed = run_drift(str(cassette))
        assert changed.returncode == 1
        assert changed.stdout.splitlines()[1:] == ["  -owned_by"]


def _without_owner(obj: object) -> object:
    """The list answer with `owned_by` gone from each model."""
    if isinstance(obj, dict) and obj.get("object") == "list":
        data = [{k: v for k, v in m.items() if k != "owned_by"} for m in obj["data"]]
        return {**obj, "data": data}
    return obj
