"""The Library: the cassette folder and what is known of it while the proxy runs.

A service every room is handed (and an addon for its own options): the store (the
index of ``cassette_dir``), the sequencer (identical requests in recorded order), the
usage log, the counts and the closing summary. It answers nothing and forwards nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions

from . import answers, matching
from .sequence import Sequencer
from .store import CassetteStore
from .usage import UsageLog

log = logging.getLogger("cassette_proxy")

MODES = ("auto", "record", "replay", "record-if-missing", "passthrough")


class Library:
    def __init__(self) -> None:
        self.store: CassetteStore | None = None
        self.sequencer = Sequencer()
        self.usage = UsageLog()
        self.counts = {"hit": 0, "miss": 0, "recorded": 0, "fallback": 0, "fault": 0}
        self.log_summary = True  # `cassette-proxy run` prints the summary itself
        self.mode = "auto"  # cassette_mode, kept here: options are deep-copied on each read
        self.test_scope = matching.LENIENT  # cassette_test_scope

    def load(self, loader: Any) -> None:
        loader.add_option("cassette_dir", str, "cassettes", "Folder of cassettes (JSON files).")
        loader.add_option(
            "cassette_mode", str, "auto", f"One of: {', '.join(MODES)}. See the README."
        )
        loader.add_option(
            "cassette_test_scope",
            str,
            matching.LENIENT,
            "strict: a request with a test id is answered only from its own test's "
            "recordings; lenient: from another test's when its own has none.",
        )
        loader.add_option(
            "cassette_usage_log",
            str,
            "",
            "Append one line per cassette served or recorded to this file, for "
            "`cassette-proxy prune`. Empty: no log.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "cassette_mode" in updated and opts.cassette_mode not in MODES:
            raise exceptions.OptionsError(
                f"cassette_mode must be one of {', '.join(MODES)}, not {opts.cassette_mode!r}"
            )
        self.mode = opts.cassette_mode
        if "cassette_test_scope" in updated:
            try:
                self.test_scope = matching.check_scope(opts.cassette_test_scope)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
        if updated & {"cassette_dir", "cassette_mode"}:
            ensure_folder(Path(opts.cassette_dir).expanduser(), opts.cassette_mode)
        if "cassette_dir" in updated:
            self._open(Path(opts.cassette_dir).expanduser())
        if "cassette_usage_log" in updated:
            self.usage.close()
            where = Path(opts.cassette_usage_log).expanduser() if opts.cassette_usage_log else None
            try:
                self.usage = UsageLog(where, Path(opts.cassette_dir).expanduser())
            except OSError as e:
                raise exceptions.OptionsError(f"cassette_usage_log {where}: {e}") from e

    def _open(self, root: Path) -> None:
        self.usage.root = root
        self.store = CassetteStore(root)
        report = self.store.load()
        for problem in report.bad:
            log.warning("cassette skipped: %s", problem)
        if report.removed_temp:
            log.info("removed %d unfinished temp file(s) in %s", report.removed_temp, root)
        if report.unservable:
            for line in unservable_summary(report.unservable):
                log.info("%s", line)
            for entry in report.unservable:  # all of them, one per line, at -v
                log.debug("not served: %s", entry)
        unserved = f" ({len(report.unservable)} not served)" if report.unservable else ""
        log.info("cassettes: %d loaded from %s%s", report.loaded, root, unserved)
        if root.is_dir() and not os.access(root, os.W_OK):
            # access() sees a read-only mount even for root; each failed write says so too.
            log.warning("cassette_dir %s is not writable: nothing can be recorded", root)

    def done(self) -> None:
        if self.store is not None:
            self.sequencer.settle(self.store)  # old sequences replaced by complete new ones
        self.usage.close()
        if self.log_summary:
            log.info("%s", self.summary())

    def summary(self) -> str:
        """The one line a proxy prints when it stops, under every host."""
        return answers.summary_line(self.counts)


def ensure_folder(root: Path, mode: str) -> None:
    """Replay from a folder that is not there is a typo, not an empty folder: refuse it.
    Modes that record create it, and say so."""
    if root.exists():
        if not root.is_dir():
            raise exceptions.OptionsError(f"cassette_dir {root} exists and is not a folder")
        return
    if mode == "replay":
        raise exceptions.OptionsError(
            f"cassette folder {root} does not exist, and replay answers only from it "
            "(check the path given to -d / cassette_dir, or record first)"
        )
    if mode in ("auto", "record", "record-if-missing"):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise exceptions.OptionsError(f"cannot create cassette folder {root}: {e}") from e
        log.info("created cassette folder %s", root)


SUMMARY_NAMES = 3  # names shown per kind of unservable file (all of them at -v)


def unservable_summary(unservable: Sequence[str]) -> list[str]:
    """Files that cannot be served, as one line per kind: a count and the first names.

    ``unservable`` holds ``"<file>: <reason>"``. A big llama-stack folder has thousands
    of tool-level recordings; naming them all made one log line of 27,800 characters.
    """
    by_kind: dict[str, list[str]] = {}
    for entry in unservable:
        name, _, reason = entry.partition(": ")
        by_kind.setdefault(_reason_kind(reason), []).append(name)
    total = len(unservable)
    lines = [
        f"{total} recording(s) are read but not served: no HTTP client can send their "
        "request (llama-stack's tool-level and SDK-level recordings, and chat streams it "
        "labelled with the wrong endpoint); that is expected, the rest are served"
    ]
    for kind, names in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:SUMMARY_NAMES])
        more = f" and {len(names) - SUMMARY_NAMES} more (-v lists all)" if (
            len(names) > SUMMARY_NAMES
        ) else ""
        lines.append(f"  {len(names)} {kind}: {shown}{more}")
    return lines


def _reason_kind(reason: str) -> str:
    """A reason without the parts that differ per file (quoted labels, type names)."""
    if reason.startswith("stale: endpoint label"):
        return "stale: endpoint label relative to the base URL (pre-Aug-2025)"
    if reason.startswith("stale: a "):
        return "stale: a response recorded under the wrong endpoint"
    if reason.startswith("an SDK-level recording"):
        return "SDK-level recording, not an HTTP request"
    return reason
