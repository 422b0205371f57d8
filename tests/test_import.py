"""`cassette-proxy import`: traffic captured by a plain mitmdump (`-w` flow file and
`hardump` HAR file) becomes the very cassettes the recording proxy writes, and they
replay to the openai SDK."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from cassette_proxy.cli import cli
from click.testing import CliRunner
from conftest import Proxy, cassette_files, openai_client
from upstreams import OpenAIUpstream


def traffic(client: openai.OpenAI) -> dict[str, Any]:
    """The same calls every time; what each answered (ids aside)."""
    got: dict[str, Any] = {}
    chat = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "imported"}]
    )
    got["chat"] = chat.choices[0].message.content
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "streamed"}], stream=True
    )
    got["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    got["completion"] = client.completions.create(model="fake-model", prompt="once").choices[0].text
    emb = client.embeddings.create(model="fake-embedding", input="vec")  # base64 on the wire
    got["embedding"] = emb.data[0].embedding
    got["models"] = [m.id for m in client.models.list()]
    return got


def failures(client: openai.OpenAI, upstream: OpenAIUpstream) -> None:
    """A 400 (recorded as an error) and a 503 (never recorded)."""
    for status, prompt in ((400, "bad"), (503, "busy")):
        upstream.configure(fail_mode="status", fail_status=status, fail_times=1)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": prompt}]
            )
    upstream.configure(fail_mode=None)


def import_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["import", *args], prog_name="cassette-proxy")
    return result.exit_code, result.stdout, result.stderr


def test_flow_and_har_files_import_as_the_proxy_would_record(
    tmp_path: Path,
    proxy_factory: Callable[..., Proxy],
    upstream: OpenAIUpstream,
) -> None:
    plain = tmp_path / "plain.py"
    plain.write_text("addons = []\n")  # mitmdump with no cassette addon: a capture only
    flows, har = tmp_path / "traffic.flows", tmp_path / "traffic.har"
    capture = proxy_factory(
        "-w", str(flows), script=plain, options={"hardump": str(har), "store_streamed_bodies": True}
    )
    client = openai_client(capture, upstream)
    live = traffic(client)
    failures(client, upstream)
    capture.stop()

    recorder = proxy_factory(mode="record", cassette_dir=tmp_path / "recorded")
    client = openai_client(recorder, upstream)
    assert traffic(client) == live
    failures(client, upstream)
    recorder.stop()
    recorded = {p.name: json.loads(p.read_text()) for p in cassette_files(tmp_path / "recorded")}
    assert len(recorded) == 6  # 5 calls + the 400; the 503 is not recorded

    for source, folder in ((flows, tmp_path / "from-flows"), (har, tmp_path / "from-har")):
        code, out, err = import_cli(str(source), "-d", str(folder))
        assert code == 0, err
        assert "6 imported, 1 skipped (1 upstream answered 503)" in err
        imported = {p.name: json.loads(p.read_text()) for p in cassette_files(folder)}
        assert sorted(imported) == sorted(recorded)
        assert sorted(out.splitlines()) == sorted(f"imported {folder / n}" for n in recorded)
        for name, doc in imported.items():
            assert doc["request"] == recorded[name]["request"]
            assert doc["response"]["is_streaming"] == recorded[name]["response"]["is_streaming"]

    # again: nothing to do unless asked to overwrite
    code, _, err = import_cli(str(flows), "-d", str(tmp_path / "from-flows"))
    assert code == 0 and "0 imported, 7 skipped" in err and "6 already recorded" in err
    code, _, err = import_cli(str(flows), "-d", str(tmp_path / "from-flows"), "--overwrite")
    assert code == 0 and "6 imported" in err

    upstream.configure(tag="B")  # replay must not ask the upstream
    upstream.clear_requests()
    replay = proxy_factory(mode="replay", cassette_dir=tmp_path / "from-flows")
    client = openai_client(replay, upstream)
    assert traffic(client) == live
    with pytest.raises(openai.BadRequestError, match="injected failure"):
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "bad"}]
        )
    assert upstream.requests == []


def test_import_skips_what_the_proxy_answered_itself(
    tmp_path: Path, proxy_factory: Callable[..., Proxy], upstream: OpenAIUpstream
) -> None:
    """A flow file written next to the cassette addon: replays and misses are not new."""
    first = proxy_factory(mode="record", cassette_dir=tmp_path / "c")
    openai_client(first, upstream).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}]
    )
    first.stop()
    flows = tmp_path / "replayed.flows"
    recorder = proxy_factory(
        "-w", str(flows), mode="record-if-missing", cassette_dir=tmp_path / "c"
    )
    client = openai_client(recorder, upstream)
    for text in ("x", "y"):  # a hit, then recorded
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": text}]
        )
    recorder.stop()
    code, _, err = import_cli(str(flows), "-d", str(tmp_path / "again"))
    assert code == 0
    assert "1 imported, 1 skipped (1 answered by cassette-proxy itself)" in err


def test_import_errors_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.flows"
    junk.write_bytes(b"\x00\x01 this is not a flow file")
    code, _, err = import_cli(str(junk), "-d", str(tmp_path / "c"))
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith(f"cassette-proxy: {junk}: not a mitmproxy flow file")
    code, _, err = import_cli(str(tmp_path / "missing.har"))
    assert code == 2 and "does not exist" in err
