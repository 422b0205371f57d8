"""Which cassette files contributed to an answer: what ``cassette-proxy prune`` keeps.

The usage log names the file each answer was served from (``hit``, ``fallback``), each
file written (``recorded``) and each success kept when the live upstream answered an
error (``kept``). More files than the one named stand behind an answer:

* a model list is served merged with every list of the same request and test id
  (llama-stack's ``models-<hash>-<digest>.json`` files): all of them count;
* a later answer of a sequence (``<h>.3.json``) is reached only through the ones before
  it: they count too, so a sequence never loses its middle.

Pure: it reads no file; the caller gives the cassettes it has read. It errs on the side
of keeping (a list that the proxy's merge rule left out is still kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from . import eras, matching
from .cassette import Cassette
from .sequence import first_path, position_of, sibling_path

GroupKey = tuple[str, str | None, str]  # exact key, test id, merge field


def merge_key(cassette: Cassette) -> GroupKey | None:
    """What a model list is merged by (as the store merges them); None if not a list."""
    field = eras.model_list_field(cassette)
    if field is None:
        return None
    key, _, _ = matching.recording_keys(matching.recorded_request(cassette))
    return key, cassette.test_id, field


def contributing(used: Iterable[Path], cassettes: Mapping[Path, Cassette]) -> set[Path]:
    """``used`` and every file that contributed to the answers served from them.

    ``cassettes``: every valid cassette of the folder, by resolved path (``used`` holds
    resolved paths too). Paths in ``used`` that are not cassettes stay in the result.
    """
    keep = set(used)
    groups: dict[GroupKey, set[Path]] = {}
    for path, cassette in cassettes.items():
        group = merge_key(cassette)
        if group is not None:
            groups.setdefault(group, set()).add(path)
    for members in groups.values():
        if members & keep:
            keep |= members
    for path in list(keep):
        position = position_of(path)
        first = first_path(path)
        for earlier in range(1, position):
            keep.add(sibling_path(first, earlier))
    return keep
