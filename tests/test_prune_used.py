"""`cassette-proxy prune --yes` deletes only valid cassettes that no answer used.

A real `cassette-proxy run` writes the usage log while real clients talk through it;
the real `prune` command then deletes; a second proxy run shows nothing that answered
was lost."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from cliproxy import CLI, start_cli_proxy
from conftest import cassette_files, openai_client
from upstreams import OpenAIUpstream


def prune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "prune", *args], capture_output=True, text=True, timeout=120,
        env=dict(os.environ),
    )  # fmt: skip


def ask(client: Any, prompt: str) -> str:
    answer = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": prompt}]
    )
    return answer.choices[0].message.content or ""


def record(tmp_path: Path, folder: Path, upstream: OpenAIUpstream, *prompts: str) -> None:
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "record")
    client = openai_client(proxy.url, upstream)
    for prompt in prompts:
        ask(client, prompt)
    assert proxy.stop() == 0


def model_list(ids: list[str]) -> dict[str, Any]:
    """A model list as llama-stack's recorder wrote it (one of several merged on replay)."""
    return {
        "request": {
            "method": "POST",
            "url": "http://localhost:8000/v1/v1/models",
            "headers": {},
            "body": {},
            "endpoint": "/v1/models",
            "model": "",
        },
        "response": {
            "body": [
                {
                    "__type__": "openai.types.model.Model",
                    "__data__": {"id": i, "object": "model", "created": 0, "owned_by": "x"},
                }
                for i in ids
            ],
            "is_streaming": False,
        },
    }


def test_only_unused_cassettes_go_not_other_json_nor_merged_lists(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder = tmp_path / "cassettes"
    record(tmp_path, folder, upstream, "used", "unused")
    # test data beside the cassettes: JSON, not a cassette
    data = folder / "test_cases" / "chat_completion.json"
    data.parent.mkdir()
    data.write_text(json.dumps({"test_chat_basic": {"data": {"input": {"messages": []}}}}))
    broken = folder / "half.json"
    broken.write_text('{"request": {"method": "POST"')  # a cassette broken by hand
    lists = {
        folder / f"models-{'a' * 64}-0000000{n}.json": ids
        for n, ids in enumerate([["m1", "m2"], ["m3", "m4"]], start=1)
    }
    for path, ids in lists.items():
        path.write_text(json.dumps(model_list(ids), indent=2) + "\n")

    log = tmp_path / "used.log"
    proxy = start_cli_proxy(
        tmp_path, "-d", str(folder), "--mode", "replay", "--usage-log", str(log)
    )
    client = openai_client(proxy.url, upstream)
    assert ask(client, "used") == "[A] echo: used"
    assert sorted(m.id for m in client.models.list()) == ["m1", "m2", "m3", "m4"]
    assert proxy.stop() == 0
    assert len(log.read_text().splitlines()) == 2  # the chat and one list: the one served

    out = prune("-d", str(folder), "--usage-log", str(log), "--yes")
    assert out.returncode == 0, out.stderr
    removed = [line.split()[-1] for line in out.stdout.splitlines()]
    assert len(removed) == 1  # the chat nobody asked for
    assert "2 file(s) not cassettes: never removed" in out.stderr
    assert data.exists() and broken.exists()
    assert all(path.exists() for path in lists)

    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay")
    client = openai_client(proxy.url, upstream)
    assert ask(client, "used") == "[A] echo: used"
    assert sorted(m.id for m in client.models.list()) == ["m1", "m2", "m3", "m4"]
    assert proxy.stop() == 0


def test_the_success_kept_when_the_upstream_answered_an_error_is_used(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    folder = tmp_path / "cassettes"
    record(tmp_path, folder, upstream, "revoked key", "fine", "never asked")
    before = {p.name for p in cassette_files(folder)}
    assert len(before) == 3

    log = tmp_path / "used.log"
    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "auto", "--usage-log", str(log))
    client = openai_client(proxy.url, upstream)
    assert ask(client, "fine") == "[A] echo: fine"  # re-recorded live
    upstream.configure(fail_mode="status", fail_status=401, fail_times=1)
    try:
        ask(client, "revoked key")
    except Exception as e:  # noqa: BLE001 - the live 401 reaches the client
        assert getattr(e, "status_code", None) == 401
    proxy.wait_for("kept")
    assert proxy.stop() == 0
    assert {p.name for p in cassette_files(folder)} == before  # the 401 replaced nothing

    out = prune("-d", str(folder), "--usage-log", str(log), "--yes")
    assert out.returncode == 0, out.stderr
    assert "1 removed, 2 kept" in out.stderr

    proxy = start_cli_proxy(tmp_path, "-d", str(folder), "--mode", "replay")
    client = openai_client(proxy.url, upstream)
    assert ask(client, "revoked key") == "[A] echo: revoked key"  # still there
    assert ask(client, "fine") == "[A] echo: fine"
    assert proxy.stop() == 0


def test_contributing_keeps_a_sequence_whole_and_merged_lists_together(tmp_path: Path) -> None:
    """The pure rule prune applies to what the log names."""
    from cassette_proxy.cassette import Cassette
    from cassette_proxy.contributions import contributing

    lists = {
        tmp_path / f"models-{'a' * 64}-{n}.json": Cassette.model_validate(model_list([f"m{n}"]))
        for n in ("00000001", "00000002")
    }
    first, second = sorted(lists)
    stem = "b" * 64
    third = tmp_path / f"{stem}.3.json"
    used = contributing({first, third}, lists)
    assert used == {first, second, third, tmp_path / f"{stem}.json", tmp_path / f"{stem}.2.json"}
    assert contributing(set(), lists) == set()
