"""The index over ``cassette_dir``: request key -> cassette file.

Loading reads every ``*.json`` below the folder once and keeps only what a lookup
needs (key, file, test id); responses are read on a hit and kept in a small cache.
A lookup is a dict hit, not a scan.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import keys
from .cassette import TEMP_PREFIX, Cassette, CassetteError, read_cassette
from .redact import keyed_query

log = logging.getLogger(__name__)

# The version segment the recorder doubled (base_url + endpoint): /v1/v1/ on the wire is /v1/.
_DOUBLED_VERSION = re.compile(r"/(v\d+(?:beta\d*|alpha\d*)?)/\1/")


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    test_id: str | None
    method: str
    wire_path: str


@dataclass
class LoadReport:
    loaded: int = 0
    bad: list[str] = field(default_factory=list)
    removed_temp: int = 0


def wire_path_of(request: Any) -> str:
    """The wire path of a recorded request: the URL's path with a doubled version undone."""
    url = getattr(request, "url", None) or ""
    path = urlsplit(url).path if "://" in url else ""
    if not path:
        path = getattr(request, "endpoint", None) or "/"
    return _DOUBLED_VERSION.sub(r"/\1/", path)


def request_body_of(request: Any) -> Any:
    body = getattr(request, "body", None)
    if body is None:
        body = getattr(request, "payload", None)  # raw-HTTP cassettes
    return {} if body is None else body


def key_of(cassette: Cassette) -> tuple[str, str]:
    """The request key a cassette answers, and its wire path."""
    request = cassette.request
    path = wire_path_of(request)
    query = keyed_query(parse_qsl(urlsplit(request.url or "").query, keep_blank_values=True))
    return keys.request_key(request.method, path, request_body_of(request), query), path


def safe_folder(test_id: str) -> str:
    """A folder name derived from a test id that can never leave ``cassette_dir``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", test_id).strip("._-")[:80] or "test"
    return f"{slug}-{hashlib.sha256(test_id.encode()).hexdigest()[:8]}"


class CassetteStore:
    def __init__(self, root: Path, cache_size: int = 256) -> None:
        self.root = root
        self._index: dict[str, list[Entry]] = {}
        self._by_path: dict[str, list[Entry]] = {}
        self._cache: OrderedDict[Path, Cassette] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return sum(len(v) for v in self._index.values())

    def load(self) -> LoadReport:
        """(Re)build the index. Bad files are skipped and reported, never fatal."""
        report = LoadReport()
        self._index.clear()
        self._by_path.clear()
        self._cache.clear()
        if not self.root.is_dir():
            return report
        root = self.root.resolve()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(TEMP_PREFIX):
                    self._remove_temp(path, report)
                    continue
                if not name.endswith(".json"):
                    continue
                if path.is_symlink() and not path.resolve().is_relative_to(root):
                    report.bad.append(f"{path}: symlink points outside {root}, skipped")
                    continue
                try:
                    cassette = read_cassette(path)
                except CassetteError as e:
                    report.bad.append(str(e))
                    continue
                self._add(path, cassette)
                report.loaded += 1
        for entries in self._index.values():
            # Newest first, so a fresh recording wins over an older file with the same key.
            entries.sort(key=_mtime, reverse=True)
        return report

    def _remove_temp(self, path: Path, report: LoadReport) -> None:
        try:
            path.unlink()
            report.removed_temp += 1
        except OSError:
            pass

    def _add(self, path: Path, cassette: Cassette) -> Entry:
        key, wire_path = key_of(cassette)
        entry = Entry(key, path, cassette.test_id, cassette.request.method.upper(), wire_path)
        self._index.setdefault(key, []).append(entry)
        self._by_path.setdefault(wire_path, []).append(entry)
        return entry

    def add(self, path: Path, cassette: Cassette) -> Entry:
        """Index a cassette just recorded; it replaces older entries for its key and test id."""
        key, _ = key_of(cassette)
        old = [e for e in self._index.get(key, []) if e.test_id == cassette.test_id]
        for e in old:
            self._index[key].remove(e)
            self._by_path[e.wire_path].remove(e)
            self._cache.pop(e.path, None)
        entry = self._add(path, cassette)
        self._index[key].insert(0, self._index[key].pop())
        self._remember(path, cassette)
        return entry

    def lookup(self, key: str, test_id: str | None = None) -> Entry | None:
        """The entry for a key: the test's own first, then unscoped, then any other test's."""
        entries = self._index.get(key)
        if not entries:
            return None
        if test_id is not None:
            for e in entries:
                if e.test_id == test_id:
                    return e
        for e in entries:
            if e.test_id is None:
                return e
        return min(entries, key=lambda e: e.test_id or "")

    def test_ids(self, key: str) -> list[str]:
        return sorted({e.test_id for e in self._index.get(key, []) if e.test_id})

    def read(self, entry: Entry) -> Cassette:
        cassette = self._cache.get(entry.path)
        if cassette is not None:
            self._cache.move_to_end(entry.path)
            return cassette
        cassette = read_cassette(entry.path)
        self._remember(entry.path, cassette)
        return cassette

    def _remember(self, path: Path, cassette: Cassette) -> None:
        self._cache[path] = cassette
        self._cache.move_to_end(path)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def nearest(self, method: str, wire_path: str, body: Any) -> tuple[Entry, str] | None:
        """The recorded request on the same path closest to ``body``, and the first difference.

        Only runs on a miss, so it may read files again.
        """
        wanted = keys.canonical_json(body)
        best: tuple[int, Entry, str] | None = None
        for entry in self._by_path.get(wire_path, [])[:500]:
            if entry.method != method.upper():
                continue
            try:
                recorded = keys.canonical_json(request_body_of(self.read(entry).request))
            except CassetteError:
                continue
            diff = keys.first_difference(wanted, recorded) or "query string or test id"
            score = _similarity(wanted, recorded)
            if best is None or score > best[0]:
                best = (score, entry, diff)
        return (best[1], best[2]) if best else None

    def relative(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)


def _mtime(entry: Entry) -> float:
    try:
        return entry.path.stat().st_mtime
    except OSError:
        return 0.0


def _similarity(a: Any, b: Any) -> int:
    """How many top-level fields two bodies share with equal values."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return int(a == b)
    return sum(1 for k in a if k in b and a[k] == b[k])
