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
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from stat import S_ISLNK
from typing import Any

from . import eras, keys
from .cassette import TEMP_PREFIX, Cassette, CassetteError, RecordedResponse, read_cassette
from .equivalence import normal_form
from .families import unknown_type
from .index_cache import IndexCache
from .redact import keyed_query, redact_body, redact_path, wire_text
from .sequence import SequenceIndex, position_of

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
    loose: tuple[str, ...] = ()  # weaker keys (keys.loose_keys), tried after a miss
    merge_field: str | None = None  # model lists: merged with same-key siblings by this


@dataclass
class LoadReport:
    loaded: int = 0
    bad: list[str] = field(default_factory=list)
    removed_temp: int = 0
    # Valid cassettes no client can reach (tool calls, SDK-only, stale labels): not indexed.
    unservable: list[str] = field(default_factory=list)


def wire_path_of(request: Any) -> str:
    """The wire path of a recorded request: the URL's path with a doubled version undone.

    ``/v1/v1/x`` -> ``/v1/x``, ``/openai/v1/v1/x`` -> ``/openai/v1/x``,
    ``/v1beta/openai/v1/models`` -> ``/v1beta/openai/models`` (see ``eras.wire_path``).
    """
    if isinstance(request, Cassette):
        return eras.wire_path(request)
    path = eras.wire_path(Cassette(request=request, response=RecordedResponse()))
    url = getattr(request, "url", None) or ""
    if "://" in url and not getattr(request, "endpoint", None):
        path = _DOUBLED_VERSION.sub(r"/\1/", path)  # no label to undo it by: a best guess
    return path


def request_body_of(request: Any) -> Any:
    body = getattr(request, "body", None)
    if body is None:
        body = getattr(request, "payload", None)  # raw-HTTP cassettes
    return {} if body is None else body


def key_of(cassette: Cassette) -> tuple[str, str]:
    """The request key a cassette answers, and its wire path.

    The key is that of the wire request the real client sends for the recorded call
    (``eras.recorded_wire``), so SDK-level recordings of every era match the wire.
    """
    wire = eras.recorded_wire(cassette)
    query = keyed_query(wire.query)
    # Keyed as the proxy keys a live request: credentials in the body and path redacted.
    path = redact_path(wire.path)
    return keys.request_key(wire.method, path, redact_body(wire.body), query), wire.path


def live_key(
    method: str, path: str, body: Any, query: Iterable[tuple[str, str]]
) -> tuple[str, str, Any, list[tuple[str, str]]]:
    """How the proxy keys a live request: (key, path, body, query) as they are recorded.

    Credentials are redacted first (keys in the path, credential fields of the body,
    credential query parameters), exactly as the cassette will hold them, so that
    ``key_of`` of the cassette written for this request gives this same key.
    """
    path, body, pairs = redact_path(wire_text(path)), redact_body(body), keyed_query(query)
    return keys.request_key(method, path, body, pairs), path, body, pairs


def safe_folder(test_id: str) -> str:
    """A folder name derived from a test id that can never leave ``cassette_dir``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", test_id).strip("._-")[:80] or "test"
    digest = hashlib.sha256(test_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}"


class CassetteStore:
    def __init__(self, root: Path, cache_size: int = 256) -> None:
        self.root = root
        self._index: dict[str, list[Entry]] = {}
        self._by_path: dict[str, list[Entry]] = {}
        self._loose: dict[str, list[Entry]] = {}
        self._cache: OrderedDict[Path, Cassette] = OrderedDict()
        self._cache_size = cache_size
        # Later answers of repeated requests (<hash>.<n>.json): sequence.py
        self.sequences = SequenceIndex()

    def __len__(self) -> int:
        return sum(len(v) for v in self._index.values())

    def __contains__(self, key: object) -> bool:
        """Whether anything is recorded under this exact request key."""
        return bool(self._index.get(key))  # type: ignore[call-overload]

    def load(self) -> LoadReport:
        """(Re)build the index. Bad files are skipped and reported, never fatal."""
        report = LoadReport()
        self._index.clear()
        self._by_path.clear()
        self._loose.clear()
        self._cache.clear()
        self.sequences.clear()
        if not self.root.is_dir():
            return report
        root = self.root.resolve()
        # What indexing found per file, kept across starts by path + size + mtime.
        cache = IndexCache(root)
        mtimes: dict[Path, int] = {}
        prefix = len(str(root).rstrip(os.sep)) + 1
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in dirnames:
                # os.walk does not follow a symlinked folder; say so if it leads outside.
                if problem := _symlink_problem(Path(dirpath) / name, root):
                    report.bad.append(f"{Path(dirpath) / name}: {problem}, not followed")
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(TEMP_PREFIX):
                    self._remove_temp(path, report)
                    continue
                if not name.endswith(".json"):
                    continue
                try:
                    stat = os.lstat(path)  # one syscall for most files: not a symlink
                    if S_ISLNK(stat.st_mode):
                        if problem := _symlink_problem(path, root):
                            report.bad.append(f"{path}: {problem}, skipped")
                            continue
                        stat = path.stat()
                except OSError as e:
                    report.bad.append(f"{path}: cannot read: {e.strerror or e}")
                    continue
                mtimes[path] = stat.st_mtime_ns
                relative = str(path)[prefix:]  # path relative to root, without relpath()
                record = cache.get(relative, stat)
                if record is not None:
                    report.loaded += 1
                    if "unservable" in record:
                        report.unservable.append(f"{self.relative(path)}: {record['unservable']}")
                    else:
                        self._insert(_entry_from(record, path))
                    continue
                try:
                    cassette = read_cassette(path)
                    reason = eras.unservable_reason(cassette)
                    odd = unknown_type(cassette.response.body) if reason is None else None
                    if odd is not None:  # a typed answer no family can put on the wire
                        raise CassetteError(f"{path}: {odd}")
                    entry = self._add(path, cassette) if reason is None else None
                except CassetteError as e:
                    report.bad.append(str(e))
                    continue
                except Exception as e:  # noqa: BLE001 - one odd file never stops a start
                    report.bad.append(f"{path}: cannot be indexed: {type(e).__name__}: {e}")
                    continue
                report.loaded += 1
                if entry is None:
                    report.unservable.append(f"{self.relative(path)}: {reason}")
                    cache.put(relative, stat, {"unservable": reason})
                    continue
                cache.put(relative, stat, _entry_record(entry))
        cache.save()
        for entries in [*self._index.values(), *self._loose.values()]:
            if len(entries) > 1:
                # Newest first, so a fresh recording wins over an older file with the same key.
                entries.sort(key=lambda e: mtimes.get(e.path, 0), reverse=True)
        return report

    def _remove_temp(self, path: Path, report: LoadReport) -> None:
        try:
            path.unlink()
            report.removed_temp += 1
        except OSError:
            pass

    def _add(self, path: Path, cassette: Cassette) -> Entry:
        wire = eras.recorded_wire(cassette)
        query = keyed_query(wire.query)
        body, keyed_path = redact_body(wire.body), redact_path(wire.path)  # as a live request
        key = keys.request_key(wire.method, keyed_path, body, query)
        loose = keys.loose_keys(wire.method, keyed_path, body, query)
        merge = eras.model_list_field(cassette)
        entry = Entry(key, path, cassette.test_id, wire.method, keyed_path, loose, merge)
        return self._insert(entry)

    def _insert(self, entry: Entry) -> Entry:
        if position_of(entry.path) > 1:
            self.sequences.add(entry)  # a later answer: found through its first one only
            return entry
        self._index.setdefault(entry.key, []).append(entry)
        self._by_path.setdefault(entry.wire_path, []).append(entry)
        for k in entry.loose:
            self._loose.setdefault(k, []).append(entry)
        return entry

    def add(self, path: Path, cassette: Cassette) -> Entry:
        """Index a cassette just recorded; it replaces older entries for its key and test id."""
        if position_of(path) > 1:
            entry = self._add(path, cassette)  # into self.sequences
            self._remember(path, cassette)
            return entry
        key, _ = key_of(cassette)
        old = [e for e in self._index.get(key, []) if e.test_id == cassette.test_id]
        for e in old:
            self._index[key].remove(e)
            self._by_path[e.wire_path].remove(e)
            for k in e.loose:
                self._loose[k].remove(e)
            self._cache.pop(e.path, None)
        entry = self._add(path, cassette)
        self._index[key].insert(0, self._index[key].pop())
        for k in entry.loose:
            self._loose[k].insert(0, self._loose[k].pop())
        self._remember(path, cassette)
        return entry

    def lookup(
        self, key: str, test_id: str | None = None, loose: tuple[str, ...] = ()
    ) -> Entry | None:
        """The entry for a key: the test's own first, then unscoped, then any other test's.

        Only when the exact key has nothing, the loose keys are tried, in order, the same way.
        """
        entry = _pick(self._index.get(key), test_id)
        for k in loose:
            if entry is not None:
                break
            entry = _pick(self._loose.get(k), test_id)
        return entry

    def test_ids(self, key: str) -> list[str]:
        return sorted({e.test_id for e in self._index.get(key, []) if e.test_id})

    def path_test_ids(self, method: str, wire_path: str) -> list[str]:
        """The test ids recorded for a method and path (for a miss message)."""
        entries = self._by_path.get(wire_path, [])
        return sorted({e.test_id for e in entries if e.test_id and e.method == method.upper()})

    def read(self, entry: Entry) -> Cassette:
        """The cassette as it is replayed: ids mapped back, model lists merged."""
        cassette = self._cache.get(entry.path)
        if cassette is not None:
            self._cache.move_to_end(entry.path)
            return cassette
        cassette = _read_mapped(entry.path)
        if entry.merge_field:
            siblings = sorted(
                (
                    e
                    for e in self._index.get(entry.key, [])
                    if e.test_id == entry.test_id and e.merge_field == entry.merge_field
                ),
                key=lambda e: str(e.path),
            )
            if len(siblings) > 1:
                group = [
                    cassette if e.path == entry.path else _read_mapped(e.path) for e in siblings
                ]
                merged = eras.merge_model_lists(group, entry.merge_field)
                response = RecordedResponse.model_validate(merged)
                cassette = cassette.model_copy(update={"response": response})
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
        wanted = keys.canonical_json(normal_form(wire_path, body))
        best: tuple[int, Entry, str] | None = None
        for entry in self._by_path.get(wire_path, [])[:500]:
            if entry.method != method.upper():
                continue
            try:
                recorded_body = eras.recorded_wire(self.read(entry)).body
            except CassetteError:
                continue
            recorded = keys.canonical_json(normal_form(wire_path, recorded_body))
            diff = keys.first_difference(wanted, recorded) or "query string or test id"
            score = _similarity(wanted, recorded)
            if best is None or score > best[0]:
                best = (score, entry, diff)
        return (best[1], best[2]) if best else None

    def relative(self, path: Path) -> str:
        if ".." not in path.parts and path.is_relative_to(self.root):
            # A path the proxy built under root: no realpath() syscalls on every recording.
            return str(path.relative_to(self.root))
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)


def _read_mapped(path: Path) -> Cassette:
    return eras.apply_id_mapping(read_cassette(path))


def _symlink_problem(path: Path, root: Path) -> str | None:
    """Why a symlink below ``root`` is not followed: it leads outside, loops or is broken."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return "broken symlink"
    except (OSError, RuntimeError):
        return "symlink loop"
    return None if target.is_relative_to(root) else f"symlink points outside {root}"


def _entry_record(entry: Entry) -> dict[str, Any]:
    """An entry as the index cache keeps it (the path is the cache's own key)."""
    return {f.name: getattr(entry, f.name) for f in fields(Entry) if f.name != "path"}


def _entry_from(record: dict[str, Any], path: Path) -> Entry:
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
    return Entry(path=path, **values)


def _pick(entries: list[Entry] | None, test_id: str | None) -> Entry | None:
    """The test's own entry, else an unscoped one, else the first test id in sort order."""
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
