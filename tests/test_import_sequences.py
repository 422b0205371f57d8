"""`cassette-proxy import` keeps sequences: the same request captured several times
(an agent polling a job) imports as `<h>.json`, `<h>.2.json`, ..., and replays in order;
`--overwrite` replaces the whole sequence. Captured by a plain mitmdump, imported by the
real CLI, replayed by a real proxy to the openai SDK."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import openai
from cliproxy import CLI
from conftest import Proxy, cassette_files, openai_client
from upstreams import OpenAIUpstream


def import_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "import", *args], capture_output=True, text=True, timeout=120,
        env=dict(os.environ),
    )  # fmt: skip


def poll(client: openai.OpenAI) -> str:
    chat = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "is the job done?"}]
    )
    return chat.choices[0].message.content or ""


def capture(
    tmp_path: Path,
    name: str,
    proxy_factory: Callable[..., Proxy],
    upstream: OpenAIUpstream,
    tags: list[str],
) -> Path:
    """The same request once per tag, the upstream answering with that tag, through a
    mitmdump that only writes a flow file."""
    plain = tmp_path / "plain.py"
    plain.write_text("addons = []\n")
    flows = tmp_path / f"{name}.flows"
    proxy = proxy_factory("-w", str(flows), script=plain)
    client = openai_client(proxy, upstream)
    for tag in tags:
        upstream.configure(tag=tag)
        assert poll(client) == f"[{tag}] echo: is the job done?"
    proxy.stop()
    return flows


def replay(
    proxy_factory: Callable[..., Proxy], folder: Path, upstream: OpenAIUpstream, n: int
) -> list[str]:
    upstream.clear_requests()
    proxy = proxy_factory(mode="replay", cassette_dir=folder)
    client = openai_client(proxy, upstream)
    answers = [poll(client) for _ in range(n)]
    proxy.stop()
    assert upstream.requests == []
    return [a.split("]")[0].lstrip("[") for a in answers]


def test_a_sequence_imports_as_a_sequence_and_overwrite_replaces_all_of_it(
    tmp_path: Path, proxy_factory: Callable[..., Proxy], upstream: OpenAIUpstream
) -> None:
    polls = capture(tmp_path, "polls", proxy_factory, upstream, ["running", "running2", "done"])
    folder = tmp_path / "cassettes"
    out = import_cli(str(polls), "-d", str(folder))
    assert out.returncode == 0, out.stderr
    assert "3 imported, 0 skipped" in out.stderr
    files = sorted(p.name for p in cassette_files(folder))
    assert len(files) == 3
    stem = min(files, key=len).removesuffix(".json")
    assert files == sorted([f"{stem}.json", f"{stem}.2.json", f"{stem}.3.json"])
    # in order, then the last repeats (as a live recording run's sequence)
    assert replay(proxy_factory, folder, upstream, 4) == ["running", "running2", "done", "done"]

    # again without --overwrite: the sequence on disk stays as it is
    out = import_cli(str(polls), "-d", str(folder))
    assert out.returncode == 0 and "0 imported, 3 skipped" in out.stderr

    # a new capture of one answer replaces the whole sequence: no stale <h>.2/.3
    fresh = capture(tmp_path, "fresh", proxy_factory, upstream, ["new"])
    out = import_cli(str(fresh), "-d", str(folder), "--overwrite")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in cassette_files(folder)) == [f"{stem}.json"]
    assert f"removed {folder / (stem + '.2.json')}" in out.stdout
    assert replay(proxy_factory, folder, upstream, 3) == ["new", "new", "new"]

    # and a longer one over a shorter one
    out = import_cli(str(polls), "-d", str(folder), "--overwrite")
    assert out.returncode == 0 and "3 imported" in out.stderr
    assert replay(proxy_factory, folder, upstream, 3) == ["running", "running2", "done"]
