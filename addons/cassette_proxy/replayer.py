"""The Replayer: a planned request -> the recorded answer, or the miss error.

A service, not a room: the Router calls it for requests answered at once, the Fallback
room for requests whose upstream went away or never answered. Either way it is the same
lookup (``matching.find``), sequence position, read, encode and answer cache, the same
counts, usage line and log line.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import status_codes

from . import answers, http1, matching
from .cassette import Cassette, CassetteError
from .families import NotRecordable, Wire, encode
from .library import Library
from .plan import Plan
from .printable import printable

log = logging.getLogger("cassette_proxy")

HTTP1_CACHE_MAX = 1024 * 1024  # whole HTTP/1.1 answers kept up to this size (the lane's)
WIRE_CACHE_SIZE = 256  # encoded answers kept for repeated hits (as many as the store's cache)
HeaderFields = tuple[tuple[bytes, bytes], ...]


class Replayer:
    def __init__(self, library: Library) -> None:
        self.library = library
        # Encoded answers by cassette file: a hit re-sends bytes, no model_dump/encode.
        # Valid while the store still holds the same Cassette object for that file.
        self._wires: OrderedDict[Path, _Encoded] = OrderedDict()

    def find(self, plan: Plan) -> matching.Match | None:
        """The recording that answers the plan's request (``matching.find``), and why."""
        store = self.library.store
        assert store is not None and plan.request is not None
        request = plan.request
        find, scope = matching.find, self.library.test_scope
        match = find(store, request, plan.key, plan.test_id, plan.upstream, scope)
        # Other proxies and people change the folder: a hit's file is checked, a miss
        # rescans it (both rate-limited, see store.refresh), then the lookup is redone.
        if match is not None and store.changed(match.entry):
            match = find(store, request, plan.key, plan.test_id, plan.upstream, scope)
        if match is None and store.refresh():
            match = find(store, request, plan.key, plan.test_id, plan.upstream, scope)
        return match

    def has_next(self, plan: Plan, match: matching.Match) -> bool:
        """Whether the request's next position has an answer of its own (record-if-missing
        forwards and records a position that has none)."""
        store = self.library.store
        position = self.library.sequencer.take(plan)
        return self.library.sequencer.recorded_at(store, match.entry, position)

    def answer(
        self, plan: Plan, why: str = "", match: matching.Match | None = None
    ) -> http.Response:
        """The recorded answer for a plan, or the miss error; ``why`` names a fallback."""
        served = self._serve(plan, why, match)
        if isinstance(served, http.Response):
            return served  # the miss error
        return _response(served)

    def answer_http1(
        self, plan: Plan, why: str = "", match: matching.Match | None = None
    ) -> tuple[bytes, bool]:
        """``answer`` as the bytes mitmproxy's HTTP/1 server would write for it, and
        whether the connection closes after them (the fast lane's, lane.py). A hit's bytes
        are made once per cassette, as its header fields are."""
        served = self._serve(plan, why, match)
        if isinstance(served, http.Response):
            return http1.encode(served, plan.method)
        if served.http1 is not None:
            return served.http1
        encoded = http1.encode(_response(served), plan.method)
        if len(encoded[0]) <= HTTP1_CACHE_MAX:  # a big answer is not kept twice
            served.http1 = encoded
        return encoded

    def _serve(
        self, plan: Plan, why: str, match: matching.Match | None
    ) -> _Encoded | http.Response:
        """A hit's encoded answer, its counts, usage and log line taken; or the miss."""
        library = self.library
        store = library.store
        assert store is not None
        if match is None:
            match = self.find(plan)
        plan.why = why
        if why:  # in the upstream's place: this run's re-recording of it is not complete
            library.sequencer.interrupted(plan)
        if match is None:
            library.counts["miss"] += 1
            return self._miss(plan)
        first, plan.rule = match.entry, match.rule
        entry = library.sequencer.answer(store, first, plan)  # the n-th of a sequence
        try:
            try:
                encoded = self._wire(entry, plan)
            except (OSError, CassetteError):
                if entry is first:
                    raise
                # A later answer deleted or broken since it was indexed: the sequence
                # now ends before it, and the last answer still there repeats.
                shown = store.relative(entry.path)  # a name's CR/LF escaped
                log.warning("later answer %s cannot be read; it is no longer served", shown)
                store.sequences.remove(entry.path)
                entry = store.sequences.at(first, plan.position or 1)
                encoded = self._wire(entry, plan)
        except (OSError, ValueError, NotRecordable, CassetteError) as e:
            broken = printable(f"{store.relative(entry.path)}: {e}")  # names escaped
            log.warning("cassette %s cannot be replayed", broken)
            library.counts["miss"] += 1
            return self._miss(plan, broken=broken)
        plan.served_from = encoded.served_from
        plan.served_entry = entry
        library.counts["hit"] += 1
        library.usage.note("fallback" if why else "hit", plan.served_from)
        if log.isEnabledFor(logging.INFO):  # a quiet proxy skips building the line
            log.info(
                "%s hit %s %s -> %s%s (%s)",
                library.mode,
                plan.method,
                plan.path,
                plan.served_from,
                f" (fallback: {why})" if why else "",
                plan.rule if plan.rule == matching.EXACT else f"loose: {plan.rule}",
            )
        return encoded

    def _wire(self, entry: Any, plan: Plan) -> _Encoded:
        """The bytes to send for a hit, the cassette file named in the answer, and the
        answer's header fields (None when Response.make must encode the body itself)."""
        store = self.library.store
        assert store is not None
        cassette = store.read(entry, plan.upstream)  # model lists: per upstream
        # One recording is encoded per what the request asked for, not only per key: the
        # key leaves out encoding_format (embeddings as floats or base64), and a loose
        # match may serve a stream to a request that did not ask for its usage chunk.
        asked = (plan.key, _asked_for(plan.body))
        cached = self._wires.get(entry.path)
        if cached is not None and cached.cassette is cassette and cached.asked == asked:
            self._wires.move_to_end(entry.path)
            return cached
        wire = encode(plan.path, plan.body, cassette.response.model_dump())
        served_from = store.relative(entry.path)
        encoded = _Encoded(cassette, asked, wire, served_from, _header_fields(wire, served_from))
        self._wires[entry.path] = encoded
        if len(self._wires) > WIRE_CACHE_SIZE:
            self._wires.popitem(last=False)
        return encoded

    def _miss(self, plan: Plan, broken: str | None = None) -> http.Response:
        store = self.library.store
        library = self.library
        response, message = answers.miss(store, plan, library.mode, library.test_scope, broken)
        log.warning("%s miss %s", library.mode, message.removeprefix(answers.PREFIX))
        return response


@dataclass(slots=True)
class _Encoded:
    """A hit's answer, encoded once per cassette file (while the store holds the same
    Cassette object for it) and per what the request asked for."""

    cassette: Cassette
    asked: tuple[Any, ...]
    wire: Wire
    served_from: str  # the cassette file, as the answer's FILE_HEADER names it
    fields: HeaderFields | None  # the answer's header fields; None: Response.make's
    http1: tuple[bytes, bool] | None = None  # the whole HTTP/1.1 answer (the fast lane)


def _response(encoded: _Encoded) -> http.Response:
    wire, fields = encoded.wire, encoded.fields
    if fields is None:
        headers = {"content-type": wire.content_type, answers.FILE_HEADER: encoded.served_from}
        headers.update(wire.headers)
        return http.Response.make(wire.status, wire.body, headers)
    # What Response.make builds, from header bytes made once per cassette (a third of
    # the addon's time per hit went to re-encoding the same few headers).
    now = time.time()
    reason = status_codes.RESPONSES.get(wire.status, "").encode()
    return http.Response(b"HTTP/1.1", wire.status, reason, http.Headers(fields), wire.body,
                         None, now, now)  # fmt: skip


def _header_fields(wire: Wire, served_from: str) -> HeaderFields | None:
    """The header fields Response.make would give a replayed answer, or None when the
    body would need encoding (content-encoding) or has no length (transfer-encoding)."""
    headers = {"content-type": wire.content_type, answers.FILE_HEADER: served_from}
    headers.update(wire.headers)
    lowered = {k.lower() for k in headers}
    if "content-encoding" in lowered or "transfer-encoding" in lowered:
        return None
    fields = [
        (k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
        for k, v in headers.items()
        if k.lower() != "content-length"
    ]
    fields.append((b"content-length", str(len(wire.body)).encode()))
    return tuple(fields)


def _asked_for(body: Any) -> tuple[Any, ...]:
    """What in a request body shapes the encoded answer (``families.encode``)."""
    if not isinstance(body, dict):
        return ()
    options = body.get("stream_options")
    usage = options.get("include_usage") if isinstance(options, dict) else None
    return (body.get("encoding_format"), bool(body.get("stream")), bool(usage))
