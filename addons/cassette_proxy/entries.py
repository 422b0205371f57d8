"""An index entry: what a lookup needs to know of one recording, without reading it.

Made by the store (store.py) when it indexes a file, ranked by matching (matching.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    test_id: str | None
    method: str
    wire_path: str
    loose: tuple[str, ...] = ()  # weaker keys (matching.recording_keys), tried after a miss
    merge_field: str | None = None  # model lists: merged with same-key siblings by this
    loose_rules: tuple[str, ...] = ()  # the loose rules of each of ``loose``
    upstream: str | None = None  # host:port it was recorded against (host affinity)
    model: str | None = None  # the request's model (a miss's nearest recording)
    llama_stack: bool = False  # written by llama-stack's recorder (matching.LLAMA_STACK_RULES)


class Index(Protocol):
    """What matching needs of the store (store.CassetteStore)."""

    def exact(self, key: str) -> list[Entry]: ...

    def loose(self, key: str) -> list[Entry]: ...

    def on_path(self, wire_path: str) -> list[Entry]: ...

    def read(self, entry: Entry) -> Any: ...
