"""The pytest plugin, run for real: an inner pytest session (pytester, in a subprocess)
whose tests use the fixtures; it records per test, then replays with the upstream gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cassette_proxy.store import safe_folder
from conftest import cassette_files
from upstreams import OpenAIUpstream

pytest_plugins = ["pytester"]

INNER_TESTS = """
import json, os, subprocess

import pytest


def test_openai_client(cassette_openai_client):
    answer = cassette_openai_client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "plugin"}]
    )
    assert answer.choices[0].message.content == "[A] echo: plugin"


@pytest.mark.parametrize("prompt", ["same", "same "])
def test_http_client_sends_the_test_id(cassette_http_client, cassette_test_id, prompt):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt.strip()}]}
    got = cassette_http_client.post(os.environ["UPSTREAM"] + "/v1/chat/completions", json=body)
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["message"]["content"] == "[A] echo: same"
    assert cassette_test_id.endswith(f"[{prompt}]")


def test_subprocesses_go_through_it(cassette_proxy):
    assert os.environ["HTTP_PROXY"] == os.environ["http_proxy"] == cassette_proxy.url
    assert os.environ["SSL_CERT_FILE"] == str(cassette_proxy.ca_cert)
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", os.environ["UPSTREAM"] + "/v1/models"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert [m["owned_by"] for m in json.loads(out)["data"]] == ["fake-A", "fake-A"]
"""


def inner_session(pytester: pytest.Pytester, upstream: OpenAIUpstream, cassettes: Path) -> None:
    pytester.makeini(
        f"""
        [pytest]
        cassette_dir = {cassettes}
        cassette_mode = auto
        cassette_openai_base_url = {upstream.url}/v1
        """
    )
    pytester.makepyfile(test_inner=INNER_TESTS)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_plugin_records_per_test_then_replays_offline(
    pytester: pytest.Pytester,
    upstream: OpenAIUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cassettes = tmp_path / "cassettes"
    inner_session(pytester, upstream, cassettes)
    monkeypatch.setenv("UPSTREAM", upstream.url)
    used = tmp_path / "used.log"

    first = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--cassette-usage-log={used}")
    first.assert_outcomes(passed=4)
    first.stdout.fnmatch_lines(
        ["cassette-proxy: 0 hits, 0 misses, 4 recorded, 0 offline fallbacks*"]
    )

    files = cassette_files(cassettes)
    by_folder = {p.parent.name: json.loads(p.read_text()) for p in files}
    ids = [
        "test_inner.py::test_openai_client",
        "test_inner.py::test_http_client_sends_the_test_id[same]",
        "test_inner.py::test_http_client_sends_the_test_id[same ]",
    ]
    for test_id in ids:  # one folder per test, named after its id
        assert by_folder[safe_folder(test_id)]["test_id"] == test_id
    # a subprocess has no test id: its cassette is not in a test's folder
    [unscoped] = [p for p in files if p.parent == cassettes]
    assert json.loads(unscoped.read_text())["request"]["endpoint"] == "/v1/models"
    assert len(used.read_text().splitlines()) == 4

    upstream.stop()  # offline; replay mode asks nothing of it anyway
    second = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--cassette-mode=replay")
    second.assert_outcomes(passed=4)
    second.stdout.fnmatch_lines(["cassette-proxy: 4 hits, 0 misses, 0 recorded*replay mode*"])


def test_plugin_reverse_mode_and_a_clear_start_error(
    pytester: pytest.Pytester, upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    pytester.makepyfile(
        test_rev="""
        import os

        def test_reverse(cassette_openai_client, cassette_proxy):
            assert os.environ["OPENAI_BASE_URL"] == cassette_proxy.url + "/v1"
            answer = cassette_openai_client.completions.create(model="fake-model", prompt="rev")
            assert answer.choices[0].text == "[A] echo: rev"
        """
    )
    args = [f"--cassette-dir={tmp_path / 'c'}", f"--cassette-reverse={upstream.url}"]
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)
    assert len(cassette_files(tmp_path / "c")) == 1

    pytester.makeini("[pytest]\ncassette_proxy_args = --set no_such_option=1\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == 4  # the session stops, once (issue 20)
    result.stdout.fnmatch_lines(["*cassette-proxy did not start*", "*no_such_option*"])
