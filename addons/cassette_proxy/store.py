"""The index over ``cassette_dir``: request key -> cassette file.

Loading reads every ``*.json`` below the folder once and keeps only what a lookup
needs (keys, file, test id, upstream); responses are read on a hit and kept in a small
cache. A lookup is a dict hit, not a scan. The store only indexes: which keys a request
or a recording has, and which candidate answers, is ``matching``'s.

Other proxies (pytest-xdist workers, CI jobs on a shared volume) and people change the
folder while a proxy runs. ``refresh`` rescans it on a miss (at most once a second) for
files added, changed or removed; ``changed`` stats a hit's file (at most once a second
per file) so that a file rewritten or deleted in place is reread or dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from stat import S_ISLNK
from typing import Any

from . import eras, matching
from .cassette import (
    TEMP_PREFIX,
    Cassette,
    CassetteError,
    RecordedResponse,
    read_cassette,
    stale_temp,
)
from .entries import Entry
from .families import unknown_type
from .index_cache import IndexCache
from .printable import printable
from .sequence import SequenceIndex, position_of

log = logging.getLogger(__name__)

# The version segment the recorder doubled (base_url + endpoint): /v1/v1/ on the wire is /v1/.
_DOUBLED_VERSION = re.compile(r"/(v\d+(?:beta\d*|alpha\d*)?)/\1/")
# A miss rescans the folder at most this often (seconds), and never more than a twentieth
# of the time (a rescan of a huge folder must not eat the event loop); a hit's file is
# stat'ed at most this often.
RESCAN_INTERVAL = 1.0
RESCAN_COST_FACTOR = 20
HIT_CHECK_INTERVAL = 1.0


@dataclass
class LoadReport:
    loaded: int = 0
    bad: list[str] = field(default_factory=list)
    removed_temp: int = 0
    # Valid cassettes no client can reach (tool calls, SDK-only, stale labels): not indexed.
    unservable: list[str] = field(default_factory=list)


def _unknown_type(cassette: Cassette) -> str | None:
    """Why a cassette's typed answer cannot be replayed: a type no family or era knows."""
    return unknown_type(cassette.response.body) or eras.unknown_openai_type(cassette)


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
    """The exact request key a cassette answers, and its wire path.

    The key is that of the wire request the real client sends for the recorded call
    (``matching.recorded_request``), so SDK-level recordings of every era match the wire.
    """
    wire = eras.recorded_wire(cassette)
    return matching.exact_key(matching.recorded_request(cassette)), wire.path


def live_key(
    method: str, path: str, body: Any, query: Iterable[tuple[str, str]]
) -> tuple[str, str, Any, list[tuple[str, str]]]:
    """How the proxy keys a live request: (key, path, body, query) as they are recorded
    (``matching.live_request``), so that ``key_of`` of its cassette gives this same key.
    """
    request = matching.live_request(method, path, body, query)
    return matching.exact_key(request), request.path, request.body, list(request.query)


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
        # What is known of each file below root, indexed or not: str(path) -> _signature.
        # Strings, not Paths: a rescan builds no Path for an unchanged file.
        self._files: dict[str, tuple[int, int, int]] = {}
        self._entry_of: dict[Path, Entry] = {}
        self._checked: dict[Path, float] = {}  # file -> when a hit last stat'ed it
        self._scanned_at = time.monotonic()
        self._scan_cost = 0.0
        self._real_root = root
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
        self._files.clear()
        self._entry_of.clear()
        self._checked.clear()
        self._scanned_at = time.monotonic()
        self._real_root = root = self.root.resolve()
        self.sequences.clear()
        if not self.root.is_dir():
            return report
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
                    self._files[str(path)] = _signature(stat)
                    if S_ISLNK(stat.st_mode):
                        if problem := _symlink_problem(path, root):
                            report.bad.append(f"{path}: {problem}, skipped")
                            continue
                        stat = path.stat()
                        self._files[str(path)] = _signature(stat)
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
                    odd = _unknown_type(cassette) if reason is None else None
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
        report.bad = [printable(problem) for problem in report.bad]  # names reach the log
        for entries in [*self._index.values(), *self._loose.values()]:
            if len(entries) > 1:
                # Newest first, so a fresh recording wins over an older file with the same key.
                entries.sort(key=lambda e: mtimes.get(e.path, 0), reverse=True)
        return report

    def _remove_temp(self, path: Path, report: LoadReport) -> None:
        """Remove a temp file left by a crash; another proxy's in-flight one stays."""
        if not stale_temp(path):
            return
        try:
            path.unlink()
            report.removed_temp += 1
        except OSError:
            pass

    # ---- refresh: the folder changes while the proxy runs -----------------------------

    def refresh(self) -> bool:
        """Rescan the folder for cassettes added, changed or removed, if not done lately.

        Called on a miss. Returns whether the index changed (a lookup may now hit).
        Never removes a temp file: that is for a start (``load``) to do.
        """
        now = time.monotonic()
        if now - self._scanned_at < max(RESCAN_INTERVAL, RESCAN_COST_FACTOR * self._scan_cost):
            return False
        indexed = removed = 0
        seen: set[str] = set()
        folders = [str(self._real_root)] if self.root.is_dir() else []
        while folders:  # the walk of load(), on strings: a few µs per unchanged file
            try:
                listing = os.scandir(folders.pop())
            except OSError:
                continue
            with listing:
                for item in listing:
                    name = item.name
                    if item.is_dir(follow_symlinks=False):
                        if not name.startswith("."):
                            folders.append(item.path)
                        continue
                    if not name.endswith(".json") or name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        if item.is_symlink():
                            if _symlink_problem(Path(item.path), self._real_root):
                                continue
                            stat = os.stat(item.path)
                        else:
                            stat = item.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    seen.add(item.path)
                    if self._files.get(item.path) != _signature(stat):
                        indexed += self._reindex(Path(item.path), stat)
        for path in [p for p in self._files if p not in seen]:
            self._forget(Path(path))
            removed += 1
        self._scanned_at = time.monotonic()
        self._scan_cost = self._scanned_at - now
        if indexed or removed:
            log.info(
                "cassettes changed in %s: %d new or changed indexed, %d removed, no longer "
                "served (rescan took %.1f ms)",
                self.root, indexed, removed, self._scan_cost * 1000,
            )  # fmt: skip
        return bool(indexed or removed)

    def changed(self, entry: Entry) -> bool:
        """Whether a hit's file changed on disk since it was indexed; if so, it is reread
        (or dropped when gone or unreadable) and the caller looks up again.

        Stats the file at most once per HIT_CHECK_INTERVAL: a hit stays a dict lookup.
        """
        now = time.monotonic()
        last = self._checked.get(entry.path)
        if last is not None and now - last < HIT_CHECK_INTERVAL:
            return False
        self._checked[entry.path] = now
        try:
            stat = entry.path.stat()
        except OSError:
            self._forget(entry.path)
            log.warning("cassette %s is gone from the folder, no longer served",
                        self.relative(entry.path))  # fmt: skip
            return True
        if self._files.get(str(entry.path)) == _signature(stat):
            return False
        if self._reindex(entry.path, stat):
            log.info("cassette changed on disk, reread: %s", self.relative(entry.path))
        return True

    def _reindex(self, path: Path, stat: os.stat_result) -> bool:
        """(Re)read one file that is new or changed; a bad one is dropped and reported.

        Returns whether the file is now indexed."""
        self._forget(path)
        self._files[str(path)] = _signature(stat)
        try:
            cassette = read_cassette(path)
            reason = eras.unservable_reason(cassette)
            odd = _unknown_type(cassette) if reason is None else None
            if odd is not None:
                raise CassetteError(f"{path}: {odd}")
            if reason is not None:
                log.info("cassette not served: %s: %s", self.relative(path), reason)
                return False
            entry = self._add(path, cassette)
        except CassetteError as e:
            log.warning("cassette skipped: %s", printable(str(e)))
            return False
        except Exception as e:  # noqa: BLE001 - one odd file never stops the proxy
            name = type(e).__name__
            problem = printable(f"{path}: cannot be indexed: {name}: {e}")
            log.warning("cassette skipped: %s", problem)
            return False
        if position_of(path) == 1:  # later answers live in self.sequences, not the index
            self._first(entry)  # the newest file wins, as at a start
        return True

    def _forget(self, path: Path) -> None:
        """Drop a file from the index (it was removed, or is about to be reread)."""
        self._files.pop(str(path), None)
        self._cache.pop(path, None)
        entry = self._entry_of.get(path)
        if entry is not None:
            self._remove(entry)
        if position_of(path) > 1:
            self.sequences.remove(path)  # a later answer: no longer served

    def _remove(self, entry: Entry) -> None:
        self._index[entry.key].remove(entry)
        self._by_path[entry.wire_path].remove(entry)
        for k in entry.loose:
            self._loose[k].remove(entry)
        self._cache.pop(entry.path, None)
        if self._entry_of.get(entry.path) is entry:
            del self._entry_of[entry.path]

    def _first(self, entry: Entry) -> None:
        """Put an entry just indexed (last in its lists) first: the newest wins."""
        self._index[entry.key].insert(0, self._index[entry.key].pop())
        for k in entry.loose:
            self._loose[k].insert(0, self._loose[k].pop())

    def _real(self, path: Path) -> Path:
        """A path built on ``root`` as the walk of the folder spells it (root resolved)."""
        if self._real_root == self.root:
            return path
        below = _below(path, self.root)
        return path if below is None else self._real_root / below

    def _add(self, path: Path, cassette: Cassette) -> Entry:
        return self._insert(self._entry(path, cassette))

    def _entry(self, path: Path, cassette: Cassette) -> Entry:
        request = matching.recorded_request(cassette)
        key, loose, rules = matching.recording_keys(request)
        merge = eras.model_list_field(cassette)
        return Entry(
            key, path, cassette.test_id, request.method, request.path, loose, merge, rules,
            matching.upstream_of(cassette.request.url), matching.model_of(request.body),
            eras.recorded_by_llama_stack(cassette),
        )  # fmt: skip

    def _insert(self, entry: Entry) -> Entry:
        if position_of(entry.path) > 1:
            self.sequences.add(entry)  # a later answer: found through its first one only
            return entry
        self._entry_of[entry.path] = entry
        self._index.setdefault(entry.key, []).append(entry)
        self._by_path.setdefault(entry.wire_path, []).append(entry)
        for k in entry.loose:
            self._loose.setdefault(k, []).append(entry)
        return entry

    def add(
        self,
        path: Path,
        cassette: Cassette,
        stat: os.stat_result | None = None,
        remember: bool = True,
    ) -> Entry:
        """Index a cassette just recorded; it replaces older entries for its key, test id
        and upstream (recordings of the same request against other hosts stay).

        ``stat`` is the written file's (``write_cassette`` returns it): a recording then
        costs no stat call of its own. ``remember=False``: ``cassette`` is not the file's
        whole content (a big answer indexed from its request side): reads go to the file.
        """
        path = self._real(path)
        entry = self._entry(path, cassette)  # the key, worked out once
        if position_of(path) == 1:
            old = [
                e for e in self._index.get(entry.key, [])
                if e.test_id == cassette.test_id and e.upstream == entry.upstream
            ]  # fmt: skip
            same_file = self._entry_of.get(path)
            if same_file is not None and same_file not in old:
                old.append(same_file)
            for e in old:
                self._remove(e)
        self._insert(entry)
        if position_of(path) == 1:
            self._first(entry)
        if remember:
            self._remember(path, cassette)
        else:
            self._cache.pop(path, None)
        try:  # so that a rescan sees the file as known, not as new
            self._files[str(path)] = _signature(stat if stat is not None else path.stat())
        except OSError:
            pass
        return entry

    def exact(self, key: str) -> list[Entry]:
        """The recordings whose exact key is ``key``, newest first."""
        return self._index.get(key) or []

    def loose(self, key: str) -> list[Entry]:
        """The recordings with ``key`` among their loose keys, newest first."""
        return self._loose.get(key) or []

    def on_path(self, wire_path: str) -> list[Entry]:
        """Every recording of a wire path (for a miss message)."""
        return self._by_path.get(wire_path) or []

    def lookup(
        self,
        key: str,
        test_id: str | None = None,
        loose: tuple[str, ...] = (),
        host: str | None = None,
    ) -> Entry | None:
        """The entry for an exact key (chosen by ``matching.choose``); only when it has
        nothing, the given loose keys, in order. The proxy itself uses ``matching.find``."""
        entry = matching.choose(self.exact(key), test_id, host)
        for k in loose:
            if entry is not None:
                break
            found = self.loose(k) if k == key else [*self.exact(k), *self.loose(k)]
            entry = matching.choose(found, test_id, host)
        return entry

    def test_ids(self, key: str) -> list[str]:
        return sorted({e.test_id for e in self._index.get(key, []) if e.test_id})

    def path_test_ids(self, method: str, wire_path: str) -> list[str]:
        """The test ids recorded for a method and path (for a miss message)."""
        entries = self._by_path.get(wire_path, [])
        return sorted({e.test_id for e in entries if e.test_id and e.method == method.upper()})

    def read(self, entry: Entry, host: str | None = None) -> Cassette:
        """The cassette as it is replayed: ids mapped back, model lists merged.

        A model list is merged with the lists recorded against its own upstream only
        (another host's models, vLLM's answering an Ollama request, never join in); with
        every upstream's only when ``host``, the request's upstream, has no list of its own.
        """
        if entry.merge_field and host is not None:
            siblings = self._model_lists(entry)
            if len(siblings) > 1 and all(e.upstream != host for e in siblings):
                return self._merged(entry, siblings, _read_mapped(entry.path))  # rare: uncached
        cassette = self._cache.get(entry.path)
        if cassette is not None:
            self._cache.move_to_end(entry.path)
            return cassette
        cassette = _read_mapped(entry.path)
        if entry.merge_field:
            own = [e for e in self._model_lists(entry) if e.upstream == entry.upstream]
            cassette = self._merged(entry, own, cassette)
        self._remember(entry.path, cassette)
        return cassette

    def _model_lists(self, entry: Entry) -> list[Entry]:
        """The model lists recorded for the same request and test id as ``entry``."""
        return sorted(
            (
                e
                for e in self._index.get(entry.key, [])
                if e.test_id == entry.test_id and e.merge_field == entry.merge_field
            ),
            key=lambda e: str(e.path),
        )

    def _merged(self, entry: Entry, group: list[Entry], cassette: Cassette) -> Cassette:
        """``cassette`` (``entry``'s) answering with the union of ``group``'s lists."""
        if len(group) < 2 or entry.merge_field is None:
            return cassette
        read = [cassette if e.path == entry.path else _read_mapped(e.path) for e in group]
        merged = eras.merge_model_lists(read, entry.merge_field)
        response = RecordedResponse.model_validate(merged)
        return cassette.model_copy(update={"response": response})

    def uncache(self, path: Path) -> None:
        """Forget the parsed cassette kept for ``path``: the next read is from its file
        (a stream written as it passed is indexed from a stand-in without its chunks)."""
        self._cache.pop(self._real(path), None)

    def _remember(self, path: Path, cassette: Cassette) -> None:
        self._cache[path] = cassette
        self._cache.move_to_end(path)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def relative(self, path: Path) -> str:
        """A file's name below the folder, as shown in headers and log lines: control
        characters escaped (``printable``), so a CR/LF in a name ends no header or line."""
        return printable(self._relative(path))

    def _relative(self, path: Path) -> str:
        for root in (self.root, self._real_root):
            # A path the proxy built under root: no realpath() syscalls on every recording
            # (and string work: pathlib's relative_to cost 0.1 ms a call).
            below = _below(path, root)
            if below is not None:
                return below
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)


def _below(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` as a string, if it is plainly below it (no ``..``)."""
    text, top = str(path), str(root)
    prefix = top if top.endswith(os.sep) else top + os.sep
    if not text.startswith(prefix):
        return None
    rest = text[len(prefix) :]
    if not rest or ".." in rest.split(os.sep):
        return None
    return rest


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells a changed file: size, mtime and inode (a file renamed over it, as every
    writer of cassettes does, is a new inode even within one mtime tick)."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


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


