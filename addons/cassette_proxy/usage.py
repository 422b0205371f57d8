"""The usage log: which cassettes a session used, for ``cassette-proxy prune``.

One line per interaction answered from, written to, or kept in a cassette (a success
the live upstream's error did not replace): the event, the file relative to the cassette
folder, and that folder (absolute), tab-separated::

    hit<TAB>chat/0806aef47037.json<TAB>/src/app/tests/cassettes
    recorded<TAB>tests_test_x.py__test_a-1b2c3d4e/5f6e....json<TAB>/src/app/tests/cassettes

``prune`` keeps what a log names and refuses a folder the log was not written for, so a
forgotten ``-d`` cannot empty the wrong folder. Lines of two fields (older logs) are
relative to the folder being pruned. Lines are appended with one ``write`` each on a file
opened in append mode, so several proxies (pytest-xdist workers) may share one log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

log = logging.getLogger("cassette_proxy")

EVENTS = ("hit", "fallback", "recorded", "kept")  # kept: a success an error did not replace


class UsageLog:
    def __init__(self, path: Path | None = None, root: Path | None = None) -> None:
        self.path = path
        self.root = root  # the cassette folder names are relative to; written on each line
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered: each note is one write(2), whole even with other writers.
            self._file = path.open("a", encoding="utf-8", buffering=1)

    def note(self, event: str, rel_path: str) -> None:
        if self._file is None:
            return
        where = f"\t{self.root.resolve()}" if self.root is not None else ""
        try:
            self._file.write(f"{event}\t{rel_path}{where}\n")
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


@dataclass
class Usage:
    """What usage logs name: cassette paths (resolved), the folders they were logged
    against, and how many lines were not understood."""

    used: set[Path] = field(default_factory=set)
    folders: set[Path] = field(default_factory=set)
    malformed: int = 0


def read_usage(paths: Iterable[Path], cassette_dir: Path) -> Usage:
    """The cassettes named in usage logs; two-field lines are relative to ``cassette_dir``."""
    usage = Usage()
    default_root = cassette_dir.resolve()
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            event, _, rest = line.partition("\t")
            rel, _, folder = rest.partition("\t")
            if event not in EVENTS or not rel:
                usage.malformed += 1
                continue
            root = Path(folder).resolve() if folder else default_root
            if folder:
                usage.folders.add(root)
            file = Path(rel)
            usage.used.add((file if file.is_absolute() else root / file).resolve())
    return usage
