"""A cache of the store's index, so a restart with thousands of cassettes is quick.

Indexing a cassette means parsing its whole JSON file (responses are most of the
bytes) and computing its keys. The result for a file depends only on that file's bytes
and on this package's code, so it is kept per file, keyed by path, size and mtime (ns),
under a stamp made from the source of the modules that compute it: any change to a
file, or to the code, reindexes that file or everything. Bad files are never cached, so
they are reported on every start. The cache lives outside ``cassette_dir`` (in
``$XDG_CACHE_HOME/cassette-proxy`` or ``~/.cache/cassette-proxy``, or
``$CASSETTE_PROXY_CACHE_DIR``; ``off`` disables it), never in the user's recordings.
A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent
_FORMAT = 1


def _code_stamp() -> str:
    """A hash of every module of this package: changed code, fresh index."""
    digest = hashlib.sha256(str(_FORMAT).encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        try:
            digest.update(path.relative_to(_PACKAGE).as_posix().encode())
            digest.update(path.read_bytes())
        except OSError:
            pass
    return digest.hexdigest()


def cache_dir() -> Path | None:
    configured = os.environ.get("CASSETTE_PROXY_CACHE_DIR")
    if configured:
        return None if configured.lower() == "off" else Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cassette-proxy"


class IndexCache:
    """``relative path -> (size, mtime_ns, record)`` for one ``cassette_dir``.

    ``record`` is whatever JSON value the store keeps for a file (an entry, or the
    reason the file cannot be served); the store owns its meaning.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        folder = cache_dir()
        name = hashlib.sha256(str(root).encode()).hexdigest()[:24] + ".json"
        self.path = folder / name if folder is not None else None
        self.stamp = _code_stamp() if self.path is not None else ""
        self._old: dict[str, list[Any]] = {}
        self._new: dict[str, list[Any]] = {}
        self.hits = 0
        if self.path is None:
            return
        try:
            doc = json.loads(self.path.read_bytes())
            if doc.get("stamp") == self.stamp and doc.get("root") == str(root):
                self._old = doc["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._old = {}

    def get(self, relative: str, stat: os.stat_result) -> Any | None:
        """The record kept for this file, if the file is unchanged since."""
        found = self._old.get(relative)
        if found is None or found[0] != stat.st_size or found[1] != stat.st_mtime_ns:
            return None
        self._new[relative] = found
        self.hits += 1
        return found[2]

    def put(self, relative: str, stat: os.stat_result, record: Any) -> None:
        self._new[relative] = [stat.st_size, stat.st_mtime_ns, record]

    def save(self) -> None:
        """Write the cache (atomically) if it changed; files gone since are dropped."""
        if self.path is None or self._new == self._old:
            return
        doc = {"stamp": self.stamp, "root": str(self.root), "files": self._new}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".index-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, self.path)
            _prune(self.path.parent)
        except (OSError, TypeError, ValueError) as e:
            log.debug("index cache not written (%s): %s", self.path, e)
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass


def _prune(folder: Path, max_age_s: float = 30 * 86400) -> None:
    """Drop caches of folders not loaded for a month (temp folders of old test runs)."""
    now = time.time()
    for path in folder.glob("*.json"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
        except OSError:
            pass
