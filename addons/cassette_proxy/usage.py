"""The usage log: which cassettes a session served or recorded, for ``cassette-proxy prune``.

One line per interaction answered from, or written to, a cassette::

    hit<TAB>chat/0806aef47037.json
    recorded<TAB>tests_test_x.py__test_a-1b2c3d4e/5f6e....json

Paths are relative to ``cassette_dir`` (absolute when a file lies outside it), so a log
written in CI prunes the same folder in a checkout elsewhere. Lines are appended with
one ``write`` each on a file opened in append mode, so several proxies (pytest-xdist
workers) may share one log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

log = logging.getLogger("cassette_proxy")

EVENTS = ("hit", "fallback", "recorded")


class UsageLog:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered: each note is one write(2), whole even with other writers.
            self._file = path.open("a", encoding="utf-8", buffering=1)

    def note(self, event: str, rel_path: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(f"{event}\t{rel_path}\n")
        except OSError as e:
            log.error("cannot append to the usage log %s: %s; usage logging stops", self.path, e)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


def read_usage(paths: Iterable[Path], cassette_dir: Path) -> tuple[set[Path], int]:
    """The resolved cassette paths named in usage logs, and how many lines were malformed."""
    used: set[Path] = set()
    bad = 0
    root = cassette_dir.resolve()
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            event, sep, rel = line.partition("\t")
            if not sep or event not in EVENTS or not rel:
                bad += 1
                continue
            file = Path(rel)
            used.add((file if file.is_absolute() else root / file).resolve())
    return used, bad
