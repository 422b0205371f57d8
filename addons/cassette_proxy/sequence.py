"""Identical requests answered in recorded order (an agent polling "is the job done?").

When one request (same key, same test id) is recorded several times in one proxy run,
every answer is kept, in order: the first in llama-stack's own file for the request
(``<hash>.json``, so llama-stack's reader still finds it), the n-th in a sibling file
``<hash>.<n>.json`` in the same folder. On replay, the n-th identical request of a
proxy run (per test id) gets the n-th answer; after the last, the last repeats.

Positions in a recording run: a request takes the position after the answers already
recorded for it in this run, when it arrives. So a client that asks again after its
answer (polling) gets the next position, while identical requests in flight at the
same time share one (the last to finish is kept, as before). When the proxy stops, a
request recorded again in this run loses the later answers an older run left past its
own (a new run of two answers leaves no stale third behind), unless its upstream failed
during the run. A run that never repeats a request writes exactly the files it wrote
before sequences existed.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import time
import weakref
from pathlib import Path
from typing import Any

log = logging.getLogger("cassette_proxy")

# <hash>.<n>.json with n >= 2: the first answer's file name (a request hash, as the
# recorder names files) and the position. Hand-named files (chat.2.json) are not siblings.
_SIBLING = re.compile(r"^(?P<stem>[0-9a-f]{12,64})\.(?P<n>[2-9]|[1-9]\d+)\.json$")
MAX_POSITION = 100_000


def position_of(path: Path) -> int:
    """An answer's position in its sequence, from its file name (1 for the first)."""
    match = _SIBLING.match(path.name)
    if match is None or int(match["n"]) > MAX_POSITION:
        return 1
    return int(match["n"])


def first_path(path: Path) -> Path:
    """The file of a sequence's first answer (the file itself for a first answer)."""
    match = _SIBLING.match(path.name)
    if match is None or int(match["n"]) > MAX_POSITION:
        return path
    return path.with_name(match["stem"] + ".json")


def sibling_path(first: Path, position: int) -> Path:
    """The file of the answer at ``position`` of the sequence that starts at ``first``."""
    if position <= 1:
        return first
    return first.with_name(f"{first.name.removesuffix('.json')}.{position}.json")


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _canonical(path: Path) -> tuple[str, str]:
    """One name for a file whether the store saw it below the resolved cassette_dir (at
    load) or below cassette_dir as given (just recorded)."""
    return _real_folder(str(path.parent)), path.name


class SequenceIndex:
    """The later answers of each sequence, by the first answer's file: position -> entry.

    Kept by the store beside its index; only the first answer is in the store's own
    index, so every lookup that knows nothing of sequences finds the first answer.
    """

    def __init__(self) -> None:
        self._later: dict[tuple[str, str], dict[int, Any]] = {}

    def clear(self) -> None:
        self._later.clear()

    def add(self, entry: Any) -> None:
        path: Path = entry.path
        self._later.setdefault(_canonical(first_path(path)), {})[position_of(path)] = entry

    def remove(self, path: Path) -> None:
        """Forget one later answer (its file is gone or changed); the sequence then ends
        before it (``length``), so the last answer that is still there repeats."""
        later = self._later.get(_canonical(first_path(path)))
        if later is not None:
            later.pop(position_of(path), None)

    def drop(self, first: Path) -> None:
        if self._later:  # most folders hold no sequence: no path work then
            self._later.pop(_canonical(first), None)

    def files(self, first: Path) -> list[Path]:
        """The files of the later answers indexed for a first answer's file."""
        if not self._later:
            return []
        later = self._later.get(_canonical(first)) or {}
        return [later[n].path for n in sorted(later)]

    def length(self, first: Path) -> int:
        """How many answers the sequence starting at ``first`` has (1: no siblings)."""
        later = self._later.get(_canonical(first))
        if not later:
            return 1
        n = 1
        while n + 1 in later:  # a gap ends the sequence: answers are never skipped
            n += 1
        return n

    def at(self, first_entry: Any, position: int) -> Any:
        """The entry answering at ``position``; the last one past the end."""
        if position <= 1 or not self._later:  # most folders hold no sequence
            return first_entry
        last = min(position, self.length(first_entry.path))
        return first_entry if last == 1 else self._later[_canonical(first_entry.path)][last]


class ReplayCounter:
    """How many identical requests (same key, same test id) this proxy run has answered,
    from cassettes or live: the n-th gets the n-th answer. A position is taken when a
    request arrives and given back when a forwarded attempt ends with no answer served
    or recorded (a hung or failing upstream): the client's retry takes it again."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str | None], int] = {}

    def next(self, key: str, test_id: str | None) -> int:
        """The position of a request arriving now (1, 2, ...)."""
        n = min(self._seen.get((key, test_id), 0) + 1, MAX_POSITION)
        self._seen[(key, test_id)] = n
        return n

    def peek(self, key: str, test_id: str | None) -> int:
        """The position ``next`` would give now, taking nothing."""
        return min(self._seen.get((key, test_id), 0) + 1, MAX_POSITION)

    def give_back(self, key: str, test_id: str | None, position: int) -> bool:
        """Return the position a failed attempt took, if no later one was taken since."""
        if self._seen.get((key, test_id)) != position:
            return False
        self._seen[(key, test_id)] = position - 1
        return True


class RecordingPositions:
    """Positions of the answers recorded in this proxy run, per request and test id."""

    def __init__(self) -> None:
        self._recorded: dict[Path, int] = {}  # first file -> answers recorded in this run

    def arrived(self, first: Path) -> int:
        """The position a request arriving now will be recorded at."""
        return min(self._recorded.get(first, 0) + 1, MAX_POSITION)

    def recorded(self, first: Path, position: int) -> None:
        self._recorded[first] = max(self._recorded.get(first, 0), position)

    def items(self) -> list[tuple[Path, int]]:
        return list(self._recorded.items())


class Sequencer:
    """Which answer a replay gets, which file a recording goes in, and when an old
    sequence gives way to a new one.

    An old sequence is replaced only by a complete new one: a new run writes its answers
    over the old ones position by position, and the old run's later answers past the new
    run's last are removed only when the proxy stops (``settle``), and only for requests
    whose upstream never failed in this run. A run cut short (the upstream died, the proxy
    was killed) leaves the old tail in place: ``done`` is never lost to a half re-record.
    """

    def __init__(self) -> None:
        self.replays = ReplayCounter()
        self.positions = RecordingPositions()
        self._arrivals: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._requests: dict[Path, tuple[str, str | None]] = {}  # first file -> key, test id
        self._interrupted: set[tuple[str, str | None]] = set()
        self._started = time.time()  # files newer than this were written during this run

    def answer(self, store: Any, entry: Any, plan: Any) -> Any:
        """The entry that answers this request now: the n-th for its n-th arrival.

        A request forwarded first (and answered from the cassettes only because its
        upstream went away) keeps the position it arrived with."""
        self.take(plan)
        return store.sequences.at(entry, plan.position)

    def take(self, plan: Any) -> int:
        """The request's position in its sequence, taken now if it has none."""
        if plan.position is None:
            plan.position = self.replays.next(plan.key, plan.test_id)
        plan.position_taken = True
        return plan.position

    def peek(self, plan: Any) -> int:
        """The position ``take`` would give this request now, taking nothing (the fast
        lane asks before it decides whether a request is its own)."""
        if plan.position is not None:
            return plan.position
        return self.replays.peek(plan.key, plan.test_id)

    def recorded_at(self, store: Any, entry: Any, position: int) -> bool:
        """Whether the sequence starting at ``entry`` has its own answer at ``position``
        (not only "the last one repeats")."""
        return position <= 1 or position <= store.sequences.length(entry.path)

    def arrived(self, flow: Any, plan: Any, first: Path, own_position: bool = False) -> None:
        """A request about to be forwarded: it takes its position among the run's
        identical requests, and its answer, if recorded, the next recording position
        (``own_position``: the position it took, for a position that has no recording)."""
        position = self.take(plan)
        self._arrivals[flow] = position if own_position else self.positions.arrived(first)
        self._requests[first] = (plan.key, plan.test_id)

    def release(self, plan: Any) -> None:
        """A forwarded attempt ended with no answer served or recorded: its position goes
        back, so the client's retry is answered at the same place of the sequence."""
        if plan.position_taken and plan.position is not None:
            plan.position_taken = False
            if self.replays.give_back(plan.key, plan.test_id, plan.position):
                plan.position = None

    def interrupted(self, plan: Any) -> None:
        """The upstream failed this request in this run (it was answered from the
        cassettes in the upstream's place, or not at all): its old sequence stays whole."""
        self._interrupted.add((plan.key, plan.test_id))

    def recording_path(self, flow: Any, first: Path) -> Path:
        """The file this flow's answer is to be recorded in (nothing changes yet: the
        write may still fail; ``committed`` settles it once the file is in place)."""
        position = self._arrivals.get(flow, 1)
        return sibling_path(first, position)

    def committed(self, store: Any, flow: Any, path: Path) -> None:
        """This flow's answer is on disk at ``path`` (or kept there): it takes its place."""
        position = self._arrivals.pop(flow, 1)
        self.positions.recorded(first_path(path), position)

    def settle(self, store: Any) -> None:
        """The run is over: each sequence it re-recorded completely loses the old run's
        answers past its own last."""
        for first, last in self.positions.items():
            if self._requests.get(first) in self._interrupted:
                continue
            stale = [p for p in store.sequences.files(first) if position_of(p) > last]
            for path in stale:
                try:
                    if path.stat().st_mtime >= self._started:
                        continue  # written during this run: another proxy's, on a shared folder
                    path.unlink()
                    log.info("removed %s: a later answer of an older recording run", path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.warning("could not remove stale answer %s: %s", path, e)
                store.sequences.remove(path)


def position_in(path: Path) -> tuple[int, int]:
    """A file's position in its sequence and how many answers the sequence has on disk
    (``1, 1`` for a request answered once), for ``cassette-proxy show``."""
    first = first_path(path)
    stem = first.name.removesuffix(".json")
    later = [p for p in first.parent.glob(f"{glob.escape(stem)}.*.json") if first_path(p) == first]
    count = 1
    positions = {position_of(p) for p in later}
    while count + 1 in positions:
        count += 1
    return position_of(path), max(count, position_of(path))
