"""The store's index cache: a restart reuses what indexing found, and never anything stale."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cassette_proxy import index_cache
from cassette_proxy.store import CassetteStore

SEED = Path(__file__).resolve().parent.parent / "cassettes" / "0806aef47037.json"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CASSETTE_PROXY_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cassettes"
    root.mkdir()
    shutil.copy(SEED, root / SEED.name)
    return root


def cache_file(tmp_path: Path) -> Path:
    (found,) = (tmp_path / "cache").glob("*.json")
    return found


def index(store: CassetteStore) -> dict[str, list[str]]:
    return {k: sorted(e.path.name for e in v) for k, v in store._index.items()}


def test_a_restart_takes_entries_from_the_cache(folder, tmp_path):
    assert CassetteStore(folder).load().loaded == 1
    tamper(tmp_path)
    second = CassetteStore(folder)
    assert second.load().loaded == 1
    assert list(index(second)) == ["f" * 64]


def tamper(tmp_path: Path) -> None:
    """Give the one cached entry a bogus key: visible in the index if the cache is used."""
    doc = json.loads(cache_file(tmp_path).read_text())
    (record,) = doc["files"].values()
    record[2]["key"] = "f" * 64
    cache_file(tmp_path).write_text(json.dumps(doc))


def test_changed_code_ignores_the_whole_cache(folder, tmp_path, monkeypatch):
    CassetteStore(folder).load()
    tamper(tmp_path)
    monkeypatch.setattr(index_cache, "_code_stamp", lambda: "another version")
    store = CassetteStore(folder)
    store.load()
    assert "f" * 64 not in index(store) and len(index(store)) == 1


def test_a_changed_file_is_read_again(folder, tmp_path):
    CassetteStore(folder).load()
    tamper(tmp_path)
    seed = json.loads((folder / SEED.name).read_text())
    seed["request"]["body"]["temperature"] = 0.5
    (folder / SEED.name).write_text(json.dumps(seed, indent=2) + "\n")
    os.utime(folder / SEED.name, ns=(1, 1))
    store = CassetteStore(folder)
    store.load()
    (key,) = index(store)
    assert key != "f" * 64 and store.lookup(key) is not None


def test_bad_files_are_reported_on_every_start_and_temp_files_removed(folder, tmp_path):
    (folder / "broken.json").write_text('{"request": ')
    (folder / ".cassette-tmp-half.partial").write_text("{")
    os.utime(folder / ".cassette-tmp-half.partial", (1, 1))  # left by a crash long ago
    first = CassetteStore(folder).load()
    assert first.loaded == 1 and len(first.bad) == 1 and "broken.json" in first.bad[0]
    assert first.removed_temp == 1
    again = CassetteStore(folder).load()
    assert again.loaded == 1 and len(again.bad) == 1 and "broken.json" in again.bad[0]


def test_the_cache_can_be_turned_off(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CASSETTE_PROXY_CACHE_DIR", "off")
    assert CassetteStore(folder).load().loaded == 1
    assert not (tmp_path / "cache").exists()
