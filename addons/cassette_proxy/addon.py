"""The mitmproxy addon: hooks that wire classify, key, look up or forward, record, encode.

The way of a request:
  request          classify it, key it; serve a hit or forward it (by mode, by upstream)
  server_connect   the upstream died since the last probe: point the connection at
                   the local fallback server, which answers from the cassettes (a busy
                   upstream is waited for first: upstream.py)
  (a timer)        no response headers within cassette_response_timeout_ms: the
                   cassettes answer in the upstream's place (fallback.answer_in_flight)
  responseheaders  a stream: tap it, so chunks are recorded as they pass through
  response/error   a complete answer: write the cassette
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy import server_hooks
from mitmproxy.tls import TlsData
from OpenSSL import SSL

from . import keys, matching
from .bodies import NotKeyable, keyed_parts, message_secrets
from .cassette import (
    MAX_CASSETTE_BYTES,
    Cassette,
    CassetteError,
    NotJSONError,
    RecordedResponse,
    discard_temp,
    plain,
    write_cassette,
)
from .decoding import StreamDecoder, stream_decoder
from .fallback import TOKEN_HEADER, FallbackServer, answer_in_flight, certificate_pems
from .families import Family, NotRecordable, StreamRecorder, Wire, classify, encode
from .families.ollama import with_stream_default
from .families.openai import SSEChunkRecorder
from .faults import FAULT_HEADER
from .pacing import with_timing
from .recording import (
    DEFAULT_RECORDED_ERRORS,
    is_error,
    new_recording,
    recorded_errors,
    recording_path,
    whole_response,
)
from .redact import (
    SplitSecretWatch,
    guard_flow_lines,
    names_credentials,
    recordable_headers,
    redact_answer,
    redact_body,
    redact_path,
    redact_url,
    scrub,
)
from .sequence import Sequencer
from .shaping import ReplayShaper
from .spool import PLACEHOLDER, SPOOL_BATCH, SPOOL_BYTES, SpoolError, StreamSpool, split_around
from .stable import normalize_response
from .store import CassetteStore, live_key
from .streams import STREAM_TYPES
from .tempfiles import Temp, TempFiles, opened, ready
from .upstream import BUSY, CONNECT_TIMEOUT_S, DOWN, UpstreamProbe
from .usage import UsageLog
from .warmup import WarmStart
from .writer import CassetteWriter, WholeAnswer

log = logging.getLogger("cassette_proxy")

MODES = ("auto", "record", "replay", "record-if-missing", "passthrough")
TEST_ID_HEADER = "x-cassette-test-id"
FILE_HEADER = "x-cassette-file"
MISS_HEADER = "x-cassette-miss"
# The openai SDKs retry 408, 409, 429 and 5xx; a miss must not be retried.
MISS_STATUS = 404
# auto: no response headers from the upstream by then, and the cassettes answer (or a 504).
# Under the openai SDK's own 600 s; above most non-streamed generations.
DEFAULT_RESPONSE_TIMEOUT_MS = 120_000
MITMPROXY_CONNECT_TIMEOUT_S = 3 * CONNECT_TIMEOUT_S
# Request bytes -> key, for requests sent again (at most this many, bodies up to 64 KiB).
KEY_MEMO_SIZE = 512
KEY_MEMO_MAX_BODY = 64 * 1024
WIRE_CACHE_SIZE = 256  # encoded answers kept for repeated hits (as many as the store's cache)


@dataclass
class Plan:
    """What the proxy decided for one request; kept in ``CassetteRecorder.plans``.

    Not in ``flow.metadata``: mitmproxy serializes that when it saves a flow (``-w``,
    mitmweb), and a Plan (with its family and stream recorder) does not serialize.
    """

    family: Family
    key: str
    method: str
    path: str
    body: Any
    test_id: str | None
    served_from: str | None = None  # cassette file, once replayed
    probed: bool = False  # the upstream was probed for this very request
    busy: bool = False  # ... and did not accept within the probe timeout, though seen up lately
    recorder: StreamRecorder | None = None
    recorded: bool = False
    notes: list[str] = field(default_factory=list)
    request: matching.Request | None = None  # as matching sees it (redacted, as recorded)
    upstream: str | None = None  # host:port the request is for (host affinity)
    rule: str | None = None  # the matching rule of a hit: exact, or the loose rules
    position: int | None = None  # n-th identical request of this run (sequence.py)
    file: Path | None = None  # its first answer's file (first_answer_path)
    url: str | None = None  # the URL as recorded: redacted (recorded_url)
    # The request's credential values and body marker (bodies.written_secrets), when
    # the key was worked out from its bytes (not memoised).
    secrets: frozenset[str] | None = None
    marker: str | None = None
    temp: Future[Temp] | None = None  # its cassette's temp file, opening (tempfiles.py)
    served_entry: Any = None  # the store entry replayed (pacing reads its timing)
    spool: StreamSpool | None = None  # a big stream's cassette, written as it passes



class CassetteRecorder:
    def __init__(self) -> None:
        self.store: CassetteStore | None = None
        self.probe = UpstreamProbe()
        self.fallback = FallbackServer(self._fallback_answer)
        # Forwarded auto-mode flows not yet connected, by client connection, then by flow:
        # an HTTP/2 client multiplexes many flows on one connection (server_connect).
        self._awaiting_connect: dict[str, dict[str, http.HTTPFlow]] = {}
        self._connect_deadlines: dict[str, asyncio.TimerHandle] = {}
        self.response_timeout_ms = DEFAULT_RESPONSE_TIMEOUT_MS
        self._fallback_flows: dict[str, http.HTTPFlow] = {}
        self._refusals: dict[str, http.Response] = {}  # streamed bodies kept from upstream
        # X-Cassette-Test-Id / -Fault of streamed requests, by flow id (requestheaders).
        self._control_headers: dict[str, tuple[tuple[bytes, bytes], ...]] = {}
        # Big answers parsed and written off the loop; fsyncs batched on a thread of their
        # own, so they never hold up the threads other work is queued on.
        self.writer = CassetteWriter()
        self.temps = TempFiles()  # opened while requests are upstream
        self.counts = {"hit": 0, "miss": 0, "recorded": 0, "fallback": 0}
        # Encoded answers by cassette file: a hit re-sends bytes, no model_dump/encode.
        # Valid while the store still holds the same Cassette object for that file.
        self._wires: OrderedDict[Path, tuple[Cassette, Any, Wire, str, HeaderFields | None]] = (
            OrderedDict()
        )
        self.usage = UsageLog()
        self._keys: OrderedDict[tuple[Any, ...], tuple[str, str, Any, Any]] = OrderedDict()
        self._upstreams: dict[tuple[Any, ...], str] = {}  # _upstream_of's
        # flow -> its Plan; an entry goes when mitmproxy drops the flow.
        self.plans: weakref.WeakKeyDictionary[http.HTTPFlow, Plan] = weakref.WeakKeyDictionary()
        self.log_summary = True  # `cassette-proxy run` prints the summary itself
        self.record_errors = DEFAULT_RECORDED_ERRORS  # option cassette_record_errors
        # Options read on every request, kept here by configure: mitmproxy deep-copies
        # an option's value on each read (a tenth of a millisecond a recording).
        self.mode = "auto"
        self.normalize = False
        self.record_headers: list[str] = []
        self.answer_headers: list[str] = []  # option cassette_answer_headers (issue 19)
        self.stopping = False  # set when the proxy shuts down
        # Faults on demand and recorded pacing; a child addon: its hooks run after ours.
        self.shaper = ReplayShaper(self)
        self.addons = [self.shaper, WarmStart(self)]  # warmup: nothing starts late
        self.sequencer = Sequencer()  # identical requests answered in recorded order

    # ---- options -----------------------------------------------------------------

    def load(self, loader: Any) -> None:
        guard_flow_lines(getattr(ctx, "master", None))  # flow lines never print a credential
        loader.add_option("cassette_dir", str, "cassettes", "Folder of cassettes (JSON files).")
        loader.add_option(
            "cassette_mode", str, "auto", f"One of: {', '.join(MODES)}. See the README."
        )
        loader.add_option(
            "cassette_probe_timeout_ms", int, 500, "Upstream reachability probe timeout (ms)."
        )
        loader.add_option(
            "cassette_probe_ttl_ms", int, 2000, "How long an upstream verdict is cached (ms)."
        )
        loader.add_option(
            "cassette_response_timeout_ms",
            int,
            DEFAULT_RESPONSE_TIMEOUT_MS,
            "auto mode: with no response headers from the upstream this long after the "
            "request, answer from the cassettes (a 504 on a miss). 0: wait for the upstream.",
        )
        loader.add_option(
            "cassette_record_headers",
            Sequence[str],
            [],
            "Request headers to record by name. Credentials are never recorded.",
        )
        loader.add_option(
            "cassette_answer_headers",
            Sequence[str],
            [],
            "Answer headers to record and replay beside the documented ones (x-request-id, "
            "request-id, x-ratelimit-*, ...). Credentials and cookies are never recorded.",
        )
        loader.add_option(
            "cassette_normalize",
            bool,
            False,
            "Write llama-stack's normalised ids, times and durations (rec-<hash>, 0, epoch) "
            "so re-recording an unchanged answer gives an identical file.",
        )
        loader.add_option(
            "cassette_record_errors",
            str,
            "4xx",
            "Which upstream error answers are recorded: none, 4xx (every 4xx but the "
            "retryable 408, 409, 429), 5xx, or statuses, comma-separated (4xx,429).",
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
        self.normalize = opts.cassette_normalize
        self.record_headers = list(opts.cassette_record_headers)
        self.answer_headers = list(opts.cassette_answer_headers)
        if updated & {"cassette_probe_timeout_ms", "cassette_probe_ttl_ms"}:
            if opts.cassette_probe_timeout_ms <= 0 or opts.cassette_probe_ttl_ms < 0:
                raise exceptions.OptionsError(
                    "cassette_probe_timeout_ms must be > 0 and cassette_probe_ttl_ms >= 0"
                )
            self.probe.close()
            self.probe = UpstreamProbe(opts.cassette_probe_timeout_ms, opts.cassette_probe_ttl_ms)
        if "cassette_response_timeout_ms" in updated:
            if opts.cassette_response_timeout_ms < 0:
                raise exceptions.OptionsError(
                    "cassette_response_timeout_ms must be >= 0 (milliseconds; 0 waits for "
                    f"the upstream as long as it takes), not {opts.cassette_response_timeout_ms}"
                )
            self.response_timeout_ms = opts.cassette_response_timeout_ms
        if "connection_strategy" in updated or "cassette_mode" in updated:
            # Lazy connects let the request hook answer before any upstream connect,
            # so reverse mode and HTTPS work with the upstream down.
            if opts.connection_strategy != "lazy":
                opts.connection_strategy = "lazy"
        if updated & {"cassette_dir", "cassette_mode"}:
            _ensure_folder(Path(opts.cassette_dir).expanduser(), opts.cassette_mode)
        if "cassette_dir" in updated:
            root = Path(opts.cassette_dir).expanduser()
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
        if "cassette_record_errors" in updated:
            try:
                self.record_errors = recorded_errors(opts.cassette_record_errors)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
        if "cassette_usage_log" in updated:
            self.usage.close()
            where = Path(opts.cassette_usage_log).expanduser() if opts.cassette_usage_log else None
            try:
                self.usage = UsageLog(where, Path(opts.cassette_dir).expanduser())
            except OSError as e:
                raise exceptions.OptionsError(f"cassette_usage_log {where}: {e}") from e

    async def done(self) -> None:
        self.stopping = True  # streams cut from here on were cut by us, not by a client
        self.fallback.close()
        self.probe.close()
        self.usage.close()
        self.writer.close()
        self.temps.close()
        if not self.log_summary:
            return
        log.info(
            "cassettes: %d hits, %d misses, %d recorded, %d offline fallbacks",
            self.counts["hit"],
            self.counts["miss"],
            self.counts["recorded"],
            self.counts["fallback"],
        )

    # ---- request: classify, key, look up or forward --------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        mode = self.mode
        early = self._control_headers.pop(flow.id, None)
        if early:  # taken off a streamed request before its headers went out
            flow.request.headers.fields += early
        # One pass over the raw fields: mitmproxy's header lookups, one per name, were a
        # fifth of a replay's time in this hook.
        names = {name.lower() for name, _ in flow.request.headers.fields}
        test_id = None
        if _TEST_ID_NAME in names:
            test_id = flow.request.headers.pop(TEST_ID_HEADER, "").strip() or None
        if flow.response is None and _FAULT_NAME in names:
            if await self.shaper.take_fault(flow, test_id):
                return  # X-Cassette-Fault: an error answer, or a bad header
        if mode == "passthrough" or flow.response is not None:
            return
        if _TOKEN_NAME in names:
            return  # a streamed body, already on its way to the stand-in (requestheaders)
        try:
            plan = self._plan(flow, test_id)
        except NotKeyable as e:
            await self._unkeyable(flow, mode, str(e))
            return
        if plan is None:
            return
        self.plans[flow] = plan
        if mode == "replay":
            self._serve(flow, plan)
        elif mode == "record-if-missing":
            if self._lookup(plan) is not None:
                self._serve(flow, plan)
            elif not await self.probe.reachable(flow.request.host, flow.request.port):
                self._serve(flow, plan, why="upstream offline")  # the miss error, at once
        elif mode == "auto":
            host, port = flow.request.host, flow.request.port
            verdict = self.probe.cached(host, port)
            plan.probed = verdict is None
            if verdict is None:
                verdict = await self.probe.probe(host, port)
            if verdict == DOWN:
                self.counts["fallback"] += 1
                self._serve(flow, plan, why="upstream offline")
                return
            plan.busy = verdict == BUSY
            self._await_connect(flow)
            self._watch_response(flow)
        elif mode == "record":
            # Fail fast: mitmproxy has no connect timeout of its own.
            if not await self.probe.reachable(flow.request.host, flow.request.port):
                flow.response = http.Response.make(
                    502,
                    f"cassette-proxy: upstream {flow.request.host}:{flow.request.port} "
                    "is unreachable and cassette_mode is record",
                    {"content-type": "text/plain"},
                )
                del self.plans[flow]  # our own 502: nothing to record
                log.warning(
                    "record %s %s: upstream %s:%s is unreachable; answered 502, nothing recorded",
                    plan.method, plan.path, flow.request.host, flow.request.port,
                )  # fmt: skip
                return
        if flow.response is None:
            # Decoded bodies stream through the tap as they are recorded.
            flow.request.headers["accept-encoding"] = "identity"
            if self.store is not None:  # forwarded: its answer may be recorded
                plan.temp = self.temps.soon(self.first_answer_path(flow, plan).parent)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed request body (stream_large_bodies) goes upstream before the request
        hook runs: where nothing may be forwarded, it goes to the local stand-in instead,
        which answers the error saying why."""
        mode = self.mode
        if flow.request.stream:
            # mitmproxy sends a streamed request's headers before the request hook runs:
            # our own headers come off now, for the request hook to read.
            fields = flow.request.headers.fields
            ours = tuple(f for f in fields if f[0].lower() in _CONTROL_NAMES)
            if ours:
                self._control_headers[flow.id] = ours
                flow.request.headers.fields = tuple(f for f in fields if f not in ours)
        if not flow.request.stream or flow.response is not None or mode not in ("replay", "auto"):
            return
        where = await self._no_forwarding(flow, mode)
        if where is None:
            return
        why = _not_keyable(flow.request) or "the request body is streamed (stream_large_bodies)"
        await self._start_fallback()
        self._refusals[flow.id] = self._refusal(flow, mode, why, where)
        flow.request.headers[TOKEN_HEADER] = flow.id
        https = flow.request.scheme == "https"
        stand_in = self.fallback.tls_address if https else self.fallback.address
        if stand_in is not None:
            flow.request.host, flow.request.port = stand_in

    async def _no_forwarding(self, flow: http.HTTPFlow, mode: str) -> str | None:
        """Why a request must not be forwarded (replay; auto with the upstream offline)."""
        host, port = flow.request.host, flow.request.port
        if mode == "replay":
            return "cassette_mode is replay"
        if mode == "auto" and not await self.probe.reachable(host, port):
            return f"the upstream {host}:{port} is offline"
        return None

    async def _unkeyable(self, flow: http.HTTPFlow, mode: str, why: str) -> None:
        """A request with no key: forwarded unrecorded, or, where forwarding is not allowed,
        a non-retryable error saying why."""
        where = await self._no_forwarding(flow, mode)
        if where is None:
            request = flow.request
            shown = redact_path(request.path.partition("?")[0])  # logs never show a key
            log.info("%s passthrough %s %s: %s", mode, request.method, shown, why)
            return
        flow.response = self._refusal(flow, mode, why, where)

    def _refusal(self, flow: http.HTTPFlow, mode: str, why: str, where: str) -> http.Response:
        request = flow.request
        shown = redact_path(request.path.partition("?")[0])
        message = (
            f"cassette-proxy: {request.method} {shown} cannot be answered from cassettes: "
            f"{why}; {where}, so it was not forwarded"
        )
        log.warning("%s not forwarded %s %s: %s (%s)", mode, request.method, shown, why, where)
        error = {
            "message": message,
            "type": "cassette_unkeyable",
            "code": "cassette_unkeyable",
            "param": None,
            "method": request.method,
            "path": shown,
            "reason": why,
        }
        flow.comment = f"cassette: not forwarded ({why})"
        flow.marked = ":x:"
        return http.Response.make(
            MISS_STATUS,
            json.dumps({"error": error}),
            {"content-type": "application/json", MISS_HEADER: "unkeyable"},
        )

    def _plan(self, flow: http.HTTPFlow, test_id: str | None) -> Plan | None:
        request = flow.request
        path, has_query, _ = request.path.partition("?")
        why = _not_keyable(request)
        if why is not None:
            raise NotKeyable(why)
        # The same request bytes always give the same key: a test suite re-sends the
        # same requests, and the key's work (parse, redact, normal form, hash) was the
        # biggest part of the addon's time per hit (docs/benchmarks.md).
        # The content type too: the same bytes as JSON and as a form are other bodies.
        typed = tuple(f for f in request.headers.fields if f[0].lower() in _BODY_TYPE_NAMES)
        memo_key = (request.method, request.path, typed, request.raw_content)
        memo = self._keys.get(memo_key)
        if memo is not None:
            self._keys.move_to_end(memo_key)
            key, path, body, query = memo
            host = self._upstream_of(request)
            return self._plan_for(request.method, key, path, body, query, test_id, host)
        # JSON, form-encoded or multipart; the request's own credential values out.
        # A body that cannot be keyed raises NotKeyable (request() says what then).
        parts = keyed_parts(
            request.headers.items(multi=True),
            path,
            request.query.items(multi=True) if has_query else [],
            request.headers.get("content-type", ""),
            (request.get_content(strict=False) or b"") if request.raw_content else b"",
        )
        body, path, pairs = parts.body, parts.path, parts.query
        try:
            # Credentials never reach a cassette, nor the key (store.live_key).
            key, path, body, query = live_key(request.method, path, body, pairs)
            host = self._upstream_of(request)
            plan = self._plan_for(request.method, key, path, body, query, test_id, host)
        except RecursionError:
            raise NotKeyable("JSON nested too deeply") from None
        plan.secrets, plan.marker = parts.secrets, parts.marker
        # A request whose header credential was scrubbed out of its body is not memoised:
        # the memo is keyed by the body's bytes, not the headers.
        if len(request.raw_content or b"") <= KEY_MEMO_MAX_BODY and not parts.scrubbed:
            self._keys[memo_key] = (key, path, body, query)
            if len(self._keys) > KEY_MEMO_SIZE:
                self._keys.popitem(last=False)
        return plan

    def _upstream_of(self, request: http.Request) -> str | None:
        """The upstream as the recorded URL names it (pretty_url's host), for host
        affinity; remembered per authority, as mitmproxy parses and checks it each time."""
        fields = request.headers.fields
        host_field = next((v for k, v in fields if k.lower() == b"host"), None)
        seen = (request.data.authority, host_field, request.host, request.port)
        upstream = self._upstreams.get(seen)
        if upstream is None:
            upstream = matching.upstream(request.pretty_host, request.port)
            if len(self._upstreams) >= 1024:
                self._upstreams.clear()
            self._upstreams[seen] = upstream
        return upstream

    def _plan_for(
        self,
        method: str,
        key: str,
        path: str,
        body: Any,
        query: Any,
        test_id: str | None,
        host: str | None = None,
    ) -> Plan:
        family = classify(method, path)
        request = matching.Request(method.upper(), path, body, tuple(query))
        plan = Plan(family, key, method.upper(), path, body, test_id, request=request)
        plan.upstream = host
        return plan

    def _lookup(self, plan: Plan) -> matching.Match | None:
        """The recording that answers the plan's request (``matching.find``), and why."""
        assert self.store is not None
        request = _matched_request(plan)
        match = matching.find(self.store, request, plan.key, plan.test_id, plan.upstream)
        # Other proxies and people change the folder: a hit's file is checked, a miss
        # rescans it (both rate-limited, see store.refresh), then the lookup is redone.
        if match is not None and self.store.changed(match.entry):
            match = matching.find(self.store, request, plan.key, plan.test_id, plan.upstream)
        if match is None and self.store.refresh():
            match = matching.find(self.store, request, plan.key, plan.test_id, plan.upstream)
        return match

    # ---- replay -------------------------------------------------------------------

    def _serve(self, flow: http.HTTPFlow, plan: Plan, why: str = "") -> None:
        flow.response = self._replay(plan, why)
        file = plan.served_from  # set on a hit, as the answer's FILE_HEADER
        flow.comment = f"cassette: {file}" if file else "cassette: miss"
        flow.marked = ":vhs:" if file else ":x:"
        if why:
            flow.comment += f" ({why})"

    def _replay(self, plan: Plan, why: str = "") -> http.Response:
        """The recorded answer for a plan, or the miss error; ``why`` names a fallback."""
        assert self.store is not None
        match = self._lookup(plan)
        if match is None:
            self.counts["miss"] += 1
            return self._miss(plan)
        first, plan.rule = match.entry, match.rule
        entry = self.sequencer.answer(self.store, first, plan)  # the n-th of a sequence
        try:
            try:
                wire, plan.served_from, fields = self._wire(entry, plan)
            except (OSError, CassetteError):
                if entry is first:
                    raise
                # A later answer deleted or broken since it was indexed: the sequence
                # now ends before it, and the last answer still there repeats.
                log.warning("later answer %s cannot be read; it is no longer served", entry.path)
                self.store.sequences.remove(entry.path)
                entry = self.store.sequences.at(first, plan.position or 1)
                wire, plan.served_from, fields = self._wire(entry, plan)
        except (OSError, ValueError, NotRecordable, CassetteError) as e:
            log.warning("cassette %s cannot be replayed: %s", entry.path, e)
            self.counts["miss"] += 1
            return self._miss(plan, broken=f"{self.store.relative(entry.path)}: {e}")
        plan.served_entry = entry
        self.counts["hit"] += 1
        self.usage.note("fallback" if why else "hit", plan.served_from)
        if log.isEnabledFor(logging.INFO):  # a quiet proxy skips building the line
            log.info(
                "%s hit %s %s key %s -> %s%s (%s)",
                self.mode,
                plan.method,
                plan.path,
                plan.key[:12],
                plan.served_from,
                f" (fallback: {why})" if why else "",
                plan.rule if plan.rule == matching.EXACT else f"loose: {plan.rule}",
            )
        if fields is None:
            headers = {"content-type": wire.content_type, FILE_HEADER: plan.served_from}
            headers.update(wire.headers)
            return http.Response.make(wire.status, wire.body, headers)
        # What Response.make builds, from header bytes made once per cassette (a third of
        # the addon's time per hit went to re-encoding the same few headers).
        now = time.time()
        reason = status_codes.RESPONSES.get(wire.status, "").encode()
        headers = http.Headers(fields)
        return http.Response(b"HTTP/1.1", wire.status, reason, headers, wire.body, None, now, now)

    def _wire(self, entry: Any, plan: Plan) -> tuple[Wire, str, HeaderFields | None]:
        """The bytes to send for a hit, the cassette file named in the answer, and the
        answer's header fields (None when Response.make must encode the body itself)."""
        assert self.store is not None
        cassette = self.store.read(entry)
        # One recording is encoded per what the request asked for, not only per key: the
        # key leaves out encoding_format (embeddings as floats or base64), and a loose
        # match may serve a stream to a request that did not ask for its usage chunk.
        asked = (plan.key, _asked_for(plan.body))
        cached = self._wires.get(entry.path)
        if cached is not None and cached[0] is cassette and cached[1] == asked:
            self._wires.move_to_end(entry.path)
            return cached[2], cached[3], cached[4]
        wire = encode(plan.path, plan.body, cassette.response.model_dump())
        served_from = self.store.relative(entry.path)
        fields = _header_fields(wire, served_from)
        self._wires[entry.path] = (cassette, asked, wire, served_from, fields)
        if len(self._wires) > WIRE_CACHE_SIZE:
            self._wires.popitem(last=False)
        return wire, served_from, fields

    def _miss(self, plan: Plan, broken: str | None = None) -> http.Response:
        assert self.store is not None
        message = f"cassette-proxy: no recording for {plan.method} {plan.path} (key {plan.key})"
        error: dict[str, Any] = {
            "type": "cassette_miss",
            "code": "cassette_miss",
            "param": None,
            "method": plan.method,
            "path": plan.path,
            "request_key": plan.key,
        }
        if broken:
            message += f"; the matching cassette is unreadable: {broken}"
        request = _matched_request(plan)
        tried = matching.rules_tried(request)
        error["rules_tried"] = tried
        message += f"; tried {', '.join(tried)}"
        nearest = matching.nearest(self.store, request, plan.test_id)
        if nearest is not None:
            entry, diff = nearest
            where = self.store.relative(entry.path)
            error["nearest"] = {"file": where, "first_difference": diff}
            message += f"; nearest recording {where} differs first at {diff}"
        else:
            message += "; nothing is recorded for this path"
        # Which tests recorded this path: a wrong or missing X-Cassette-Test-Id shows here.
        # A real suite records hundreds of tests per path: a count and a few, not all.
        own, shown, others = matching.test_id_summary(self.store, request, plan.test_id)
        error["test_ids"] = shown
        error["other_test_ids"] = others
        if plan.test_id:
            error["test_id"] = plan.test_id
            error["test_id_recordings"] = own
            has = f"has {own} recording(s)" if own else "has no recording"
            message += f"; this request's test id: {plan.test_id} ({has} for this path)"
        if others:
            more = f" (+{others - len(shown)} more)" if others > len(shown) else ""
            label = "other test ids" if plan.test_id else "test ids"
            message += f"; {others} {label} recorded for this path: {', '.join(shown)}{more}"
        error["message"] = message
        mode = self.mode
        log.warning("%s miss %s", mode, message.removeprefix("cassette-proxy: "))
        body = b"" if plan.method == "HEAD" else json.dumps({"error": error})  # HEAD: no body
        return http.Response.make(
            MISS_STATUS, body, {"content-type": "application/json", MISS_HEADER: plan.key}
        )

    # ---- server_connect: no window of 502s when the upstream dies -----------------

    def _await_connect(self, flow: http.HTTPFlow) -> None:
        """Remember a forwarded flow until it has a server connection (server_connect)."""
        flows = self._awaiting_connect.setdefault(flow.client_conn.id, {})
        for settled in [f for f in flows.values() if not _connecting(f)]:
            del flows[settled.id]  # answered, failed or connected: server_connect is past
        flows[flow.id] = flow

    def _connecting(self, client: connection.Client, address: Any) -> list[http.HTTPFlow]:
        """The client's flows that wait for a connection to this upstream address."""
        flows = self._awaiting_connect.get(client.id, {}).values()
        return [
            f for f in flows if _connecting(f) and (f.request.host, f.request.port) == address[:2]
        ]

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is None:
            return
        flows = self._connecting(data.client, address)
        plans = [plan for f in flows if (plan := self.plans.get(f)) is not None]
        if not plans:
            return
        host, port = address[:2]
        if any(TOKEN_HEADER in f.request.headers for f in flows):
            up = False  # found dead for this client's other streams: these follow them
        elif all(p.probed and not p.busy for p in plans):
            up = True  # probed for these very requests a moment ago
        else:
            verdict = BUSY if any(p.busy for p in plans) else await self.probe.probe(host, port)
            up = verdict != DOWN
            if verdict == BUSY:
                # A live server with a full accept queue drops SYNs too: wait for it.
                seen = self.probe.seen_up(host, port)
                log.info(
                    "upstream %s:%s is busy (no connect within %d ms, seen up %s): "
                    "waiting up to %.0f s for it to accept",
                    host,
                    port,
                    self.probe.timeout_ms,
                    f"{seen:.0f} s ago" if seen is not None else "lately",
                    CONNECT_TIMEOUT_S,
                )
                up = await self.probe.wait_until_up(host, port)
        if up:
            if any(p.busy for p in plans):
                self._bound_connect(data.server)  # it accepted ours; mitmproxy's is next
            return
        await self._start_fallback()
        for flow in flows:
            if TOKEN_HEADER not in flow.request.headers:
                self.counts["fallback"] += 1
                self._fallback_flows[flow.id] = flow
                flow.request.headers[TOKEN_HEADER] = flow.id
        stand_in = self.fallback.tls_address if data.server.tls else self.fallback.address
        log.info(
            "upstream %s:%s went away; answering %d request(s) from cassettes",
            host,
            port,
            len(flows),
        )
        data.server.address = stand_in

    def _bound_connect(self, server: connection.Server) -> None:
        """mitmproxy has no connect timeout: after a busy upstream accepted our connect,
        cancel mitmproxy's own if it takes longer than MITMPROXY_CONNECT_TIMEOUT_S.

        server_connect runs in the task that then connects; cancelling it makes mitmproxy
        fail the connect (server_connect_error, a 502) instead of waiting for minutes.
        Generous: on a crowded event loop a connect done in the kernel is seen late.
        """
        task = asyncio.current_task()
        if task is None:
            return

        def expire() -> None:
            self._connect_deadlines.pop(server.id, None)
            if server.timestamp_tcp_setup is None and server.error is None:
                log.warning(
                    "upstream %s:%s did not accept within %.0f s: connect cancelled",
                    *server.address[:2],
                    MITMPROXY_CONNECT_TIMEOUT_S,
                )
                task.cancel(f"connect timeout ({MITMPROXY_CONNECT_TIMEOUT_S:.0f} s)")

        loop = asyncio.get_running_loop()
        self._connect_deadlines[server.id] = loop.call_later(MITMPROXY_CONNECT_TIMEOUT_S, expire)

    def _unbound_connect(self, server: connection.Server) -> None:
        deadline = self._connect_deadlines.pop(server.id, None)
        if deadline is not None:
            deadline.cancel()

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._unbound_connect(data.server)
        if data.server.address and data.server.address != self.fallback.address:
            if data.server.address != self.fallback.tls_address:
                self.probe.mark(*data.server.address[:2], up=True)

    def client_disconnected(self, client: connection.Client) -> None:
        # A keep-alive request reuses its server connection and never reaches
        # server_connect: forget the client's flows when it goes.
        for flow in self._awaiting_connect.pop(client.id, {}).values():
            self._fallback_flows.pop(flow.id, None)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._unbound_connect(data.server)
        if data.server.address:
            self.probe.mark(*data.server.address[:2], up=False)

    # ---- response timeout: an upstream that accepts and never answers -------------

    def _watch_response(self, flow: http.HTTPFlow) -> None:
        """After cassette_response_timeout_ms with no response headers, answer from cassettes."""
        if self.response_timeout_ms <= 0:
            return
        # A weak reference: a timer must not keep a finished flow (and its bodies) alive.
        asyncio.get_running_loop().call_later(
            self.response_timeout_ms / 1000, self._response_timed_out, weakref.ref(flow)
        )

    def _response_timed_out(self, ref: weakref.ref[http.HTTPFlow]) -> None:
        flow = ref()
        if flow is None or flow.response is not None or flow.error is not None or not flow.live:
            return
        plan: Plan | None = self.plans.get(flow)
        if plan is None or TOKEN_HEADER in flow.request.headers:
            return
        if not flow.server_conn.connected:
            # Still connecting (a busy upstream; bounded by CONNECT_TIMEOUT_S): look again.
            asyncio.get_running_loop().call_later(0.25, self._response_timed_out, ref)
            return
        host, port = flow.request.host, flow.request.port
        self.probe.mark(host, port, up=False)  # the next requests do not wait as long
        answer = self._replay(plan, why="upstream did not answer")
        if plan.served_from is None:
            answer = _timeout_answer(answer, self.response_timeout_ms)
        how = answer_in_flight(flow, answer)
        log.warning(
            "upstream %s:%s sent no response headers within %d ms "
            "(cassette_response_timeout_ms) for %s %s: %s",
            host,
            port,
            self.response_timeout_ms,
            plan.method,
            plan.path,
            how,
        )
        flow.comment = f"cassette: {plan.served_from or 'miss'} (upstream did not answer)"
        flow.marked = ":vhs:" if plan.served_from else ":x:"

    def tls_start_server(self, tls_start: TlsData) -> None:
        """Our own stand-in has a throwaway certificate: do not verify it."""
        if self.fallback.tls_address is None or tls_start.conn.address != self.fallback.tls_address:
            return
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        context.set_alpn_protos([b"http/1.1"])
        tls_start.ssl_conn = SSL.Connection(context)
        tls_start.ssl_conn.set_connect_state()

    def tls_failed_server(self, tls_start: TlsData) -> None:
        """mitmproxy answers a failed upstream handshake with an HTML 502; say what to do."""
        conn = tls_start.conn
        if conn.address is None or conn.address == self.fallback.tls_address:
            return
        error = conn.error or "handshake failed"
        hint = ""
        if "certificate" in error.lower():
            hint = (
                "; for an upstream with a self-signed or private-CA certificate start the "
                "proxy with --set ssl_verify_upstream_trusted_ca=CA.pem "
                "(or, not verifying at all, --set ssl_insecure=true)"
            )
        log.warning("TLS to upstream %s:%s failed: %s%s", *conn.address[:2], error, hint)

    async def _start_fallback(self) -> None:
        tlsconfig = ctx.master.addons.get("tlsconfig")
        pems = certificate_pems(tlsconfig.certstore) if tlsconfig else (None, None)
        await self.fallback.start(*pems)

    def _fallback_answer(self, token: str) -> http.Response:
        refusal = self._refusals.pop(token, None)
        if refusal is not None:
            return refusal
        flow = self._fallback_flows.pop(token, None)
        plan: Plan | None = self.plans.get(flow) if flow else None
        if flow is None or plan is None:
            return http.Response.make(
                502, b"cassette-proxy: upstream offline", {"content-type": "text/plain"}
            )
        response = self._replay(plan, why="upstream went away")
        flow.comment = f"cassette: {plan.served_from or 'miss'} (upstream went away)"
        flow.marked = ":vhs:" if plan.served_from else ":x:"
        return response

    # ---- record ---------------------------------------------------------------------

    def _recording(self, flow: http.HTTPFlow) -> Plan | None:
        """The plan of a flow whose upstream answer is to be recorded, if any."""
        plan: Plan | None = self.plans.get(flow)
        if plan is None or plan.served_from is not None or flow.response is None:
            return None
        # Our own answers (a miss, a refusal) and the stand-in's are not recorded.
        if _has_header(flow.response, _MISS_NAME) or _has_header(flow.request, _TOKEN_NAME):
            return None
        return plan

    def _mark_pending(self, flow: http.HTTPFlow) -> None:
        """Mark a flow whose answer is about to be recorded, naming the file.

        mitmweb shows it while a stream is still being recorded, and a flow writer
        that runs before us sees it: under ``mitmdump -s`` scripts come before the
        ``-w`` writer, but ``cassette-proxy run --full`` adds this addon after all of
        mitmdump's, and the writer saves a flow in its own ``response``/``error``
        hook. ``_write`` or ``_not_recorded`` settle the mark (mitmweb is updated
        after every hook).
        """
        plan = self._recording(flow)
        assert flow.response is not None
        status = flow.response.status_code
        if plan is None or self.store is None:
            return
        if not (200 <= status < 300 or status in self.record_errors):
            return
        path = self.first_answer_path(flow, plan)
        flow.marked = ":red_circle:"
        flow.comment = f"cassette: recording {self.store.relative(path)}"

    def first_answer_path(self, flow: http.HTTPFlow, plan: Plan) -> Path:
        """The file of the request's first answer, as ``new_recording`` names it (the
        URL's query, the Ollama stream default); worked out once per request."""
        assert self.store is not None
        if plan.file is None:
            url = self.recorded_url(flow, plan)
            query = matching.recorded_query(url) if "?" in url else []
            body = with_stream_default(plan.path, plan.body)  # as new_recording writes it
            plan.file = recording_path(
                self.store.root, plan.method, plan.path, body, plan.test_id, query
            )
        return plan.file

    def recorded_url(self, flow: http.HTTPFlow, plan: Plan) -> str:
        """The request's URL as a cassette records it (credentials out); worked out once."""
        if plan.url is None:
            plan.url = redact_url(flow.request.pretty_url)
        return plan.url

    def _not_recorded(
        self, flow: http.HTTPFlow, plan: Plan, reason: str, warn: bool = False
    ) -> None:
        """One log line for a forwarded answer that leaves no cassette; unmark the flow."""
        self._release_temp(flow)  # before the line: whoever reads it finds no temp file
        (log.warning if warn else log.info)(
            "%s not recorded %s %s key %s: %s",
            self.mode,
            plan.method,
            plan.path,
            plan.key,  # the full key: grep the log for the request_key a miss names
            reason,
        )
        if plan.spool is not None:  # a stream written as it passed: its temp file goes
            plan.spool.discard()
            plan.spool = None
        if flow.comment.startswith("cassette: recording"):
            flow.marked = ""
            flow.comment = f"cassette: not recorded ({reason})"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        content_type = flow.response.headers.get("content-type", "").lower()
        streamed = content_type.startswith(STREAM_TYPES)
        if self.mode == "passthrough":
            # Streams pass as they come, as in every mode (mitmproxy would buffer them).
            if streamed and not flow.response.stream:
                flow.response.stream = True
            return
        if _has_header(flow.request, _TOKEN_NAME):
            # The stand-in closes its own socket; the client's connection stays as it was.
            flow.response.headers.pop("connection", None)
        served = self.plans.get(flow)
        if served is not None and served.served_from is not None:  # from a cassette
            if streamed:
                flow.response.stream = True  # as below: nothing of it is recorded
            return
        if not streamed:
            self._mark_pending(flow)
            self._warm_worker(flow)
            return
        flow.response.stream = True  # never buffer a stream, recorded or not
        plan = self._recording(flow)
        if plan is None or not 200 <= flow.response.status_code < 300:
            return
        encoding = flow.response.headers.get("content-encoding", "identity").strip().lower()
        decoder = None
        if encoding not in ("", "identity"):
            # Asked for identity, but some front ends compress streams anyway: the client
            # gets the bytes as sent, the recorder a decoded copy.
            decoder = stream_decoder(encoding)
            if decoder is None:
                self._not_recorded(flow, plan, f"stream is {encoding}-encoded (cannot decode)")
                return
        try:
            plan.recorder = plan.family.stream_recorder(plan.path, plan.body, content_type)
        except NotRecordable as e:
            self._not_recorded(flow, plan, str(e))
            return
        flow.response.stream = _Tap(self, flow, plan, decoder)
        self._mark_pending(flow)

    def _warm_worker(self, flow: http.HTTPFlow) -> None:
        """A big answer to record is on its way: start the worker process while it comes."""
        assert flow.response is not None
        length = flow.response.headers.get("content-length", "")
        if length.isdigit() and self.writer.big(int(length)) and self._recording(flow):
            try:
                self.writer.warm()
            except Exception as e:  # noqa: BLE001 - record_whole says so when it matters
                log.debug("recording worker not started: %s", e)

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._record_response(flow)
        finally:
            self._release_temp(flow)

    def _release_temp(self, flow: http.HTTPFlow) -> None:
        """A temp file opened for an answer that is not recorded goes back: removed now
        if it is open (so that none is left when the flow is over), else once it is."""
        plan = self.plans.get(flow)
        if plan is not None and plan.temp is not None:
            temp = ready(plan.temp)
            if temp is not None:
                discard_temp(temp)
            else:
                self.temps.discard(plan.temp)
            plan.temp = None

    async def _record_response(self, flow: http.HTTPFlow) -> None:
        plan = self._recording(flow)
        if plan is None or plan.recorded:
            return
        assert flow.response is not None
        if plan.recorder is not None:  # the tap has done it already
            self._finish_stream(flow, plan, clean_end=not _close_delimited(flow))
            return
        if flow.response.stream:
            if flow.comment.startswith("cassette: recording"):
                self._not_recorded(flow, plan, "the stream could not be recorded")
            return  # a stream we chose not to record
        status = flow.response.status_code
        content = flow.response.get_content(strict=False) or b""
        if self.writer.big(len(content)) and await self._record_big(flow, plan, content, status):
            return  # recorded (or not, and said why) in the worker process
        try:
            data = await self.writer.loads(content)
        except (ValueError, UnicodeDecodeError):
            self._not_recorded(flow, plan, "answer is not JSON")
            return
        except RecursionError:
            self._not_recorded(flow, plan, "answer is JSON nested too deeply")
            return
        try:
            response = whole_response(
                plan.family, plan.path, plan.body, status, data, self.record_errors
            )
        except NotRecordable as e:
            self._not_recorded(flow, plan, str(e))
            return
        if self._keeps_success(flow, plan, response, status):
            return
        # Awaited: mitmproxy sends the answer after this hook, so a client that got a
        # whole answer can count on its cassette being in place, even if the proxy is
        # killed (fsynced right after, off the answer's path).
        await self._write(flow, plan, response, content)

    def _keeps_success(
        self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any], status: int
    ) -> bool:
        """An error answer never replaces a success recorded for the same key and test id
        (a revoked key, a model not pulled), except in an explicit ``record`` run."""
        assert self.store is not None
        if not is_error(response):
            return False
        entry = self.store.lookup(plan.key, plan.test_id)
        if entry is None or entry.test_id != plan.test_id:
            return False
        try:
            if is_error(self.store.read(entry).response.model_dump()):
                return False  # an error may replace an error
        except (OSError, CassetteError):
            return False
        where = self.store.relative(entry.path)
        mode = self.mode
        if mode == "record":
            log.warning(
                "record: upstream answered %s for %s %s key %s: this error replaces the "
                "successful recording %s",
                status, plan.method, plan.path, plan.key, where,
            )  # fmt: skip
            return False
        log.info(
            "%s kept %s: upstream answered %s for %s %s key %s; an error never replaces "
            "a success (a record run does)",
            mode, where, status, plan.method, plan.path, plan.key,
        )  # fmt: skip
        plan.recorded = True
        if flow.comment.startswith("cassette: recording"):
            flow.marked = ""
            flow.comment = f"cassette: kept {where} (upstream answered {status})"
        return True

    def error(self, flow: http.HTTPFlow) -> None:
        self._control_headers.pop(flow.id, None)  # a streamed request cut before its hook
        try:
            self._record_error(flow)
        finally:
            self._release_temp(flow)

    def _record_error(self, flow: http.HTTPFlow) -> None:
        plan = self._recording(flow) if flow.response is not None else None
        if plan is None or plan.recorded:
            return
        if plan.recorder is None:
            if flow.comment.startswith("cassette: recording"):
                self._not_recorded(flow, plan, "the stream could not be recorded")
            return
        # The openai SDK hangs up right after data: [DONE]: complete, though mitmproxy
        # reports an error. Anything else cut short leaves no cassette.
        if plan.recorder.complete:
            self._finish_stream(flow, plan, clean_end=False)
        else:
            reason = flow.error.msg if flow.error else "unknown"
            if self.stopping:  # mitmproxy says "Client disconnected." for its own shutdown
                reason = "the proxy was stopped"
            self._not_recorded(flow, plan, f"stream cut short ({reason})", warn=True)

    def _finish_stream(self, flow: http.HTTPFlow, plan: Plan, clean_end: bool) -> None:
        """Record a finished stream now, on the event loop (the tap cannot await).

        Called by the tap when the stream's end marker arrives, before those bytes are
        passed on: a client that saw the end of a stream can count on its cassette being
        in place (renamed; fsynced in a thread right after), even if the proxy is killed.
        """
        recorder, spool = plan.recorder, plan.spool
        if recorder is None or plan.recorded:
            return
        plan.recorder = plan.spool = None  # settled, whatever happens below
        timing = None
        if spool is not None:
            done, timing = self._finish_spool(flow, plan, recorder, spool)
            if done:
                return
        try:
            response = recorder.response(clean_end)
        except NotRecordable as e:
            self._not_recorded(flow, plan, str(e), warn=True)
            return
        plan.recorded = True
        raw = recorder.data() if isinstance(recorder, SSEChunkRecorder) else None
        if timing is not None:  # taken by _finish_spool already
            response = with_timing(response, timing)
            path, cassette = self._new_cassette(flow, plan, response, timed=False, raw=raw)
        else:
            path, cassette = self._new_cassette(flow, plan, response, raw=raw)
        temp = ready(plan.temp)  # the tap cannot wait for it: if not open yet, open now
        if temp is not None:
            plan.temp = None
        try:
            stat = write_cassette(path, cassette, durable=False, temp=temp, keep_unchanged=True)
        except NotJSONError as e:
            self._not_recorded(flow, plan, f"not valid JSON: {e}", warn=True)
            return
        except Exception as e:  # noqa: BLE001 - a failed write must not break the stream
            self._write_failed(flow, plan, path, e)
            return
        self._recorded(flow, plan, path, cassette, stat)
        self._sync_later(path)

    # ---- a big stream, written as it passes (spool.py) ------------------------------

    def _start_spool(self, flow: http.HTTPFlow, plan: Plan) -> StreamSpool:
        """The temp file of a stream's cassette, its text up to the chunks written: that
        of the cassette ``_new_cassette`` makes (response.timing comes after the chunks)."""
        placeholder = {"body": [PLACEHOLDER], "is_streaming": True}
        path, cassette = self._new_cassette(flow, plan, placeholder, timed=False)
        head, indent, _ = split_around(cassette.to_json_bytes())
        temp = ready(plan.temp)  # the one opened while the request was upstream, if open
        if temp is not None:
            plan.temp = None
        spool = StreamSpool(path.parent, head, indent, temp)
        spool.secrets = self._request_secrets(flow, plan)[0]  # as _new_cassette scrubs them
        spool.watch = SplitSecretWatch(spool.secrets)
        if self.normalize:
            spool.digest = keys.recording_hash(plan.method, plan.path, plan.body, plan.test_id)
        return spool

    def _spool_more(self, recorder: SSEChunkRecorder, spool: StreamSpool) -> None:
        """Write the chunks that came since the last batch, each as ``_new_cassette``
        would write it. Raises (SpoolError, NotRecordable, OSError, ...) to give up."""
        read = recorder.read
        chunks = []
        named = False  # a chunk with a key redact_body may act on
        for payload in recorder.payloads[spool.count :]:
            chunk, by_orjson = read(payload)
            if not by_orjson:  # it may hold a NaN, or a number orjson would not write
                raise SpoolError("a chunk orjson does not read")
            chunks.append(chunk)
            named = named or not isinstance(payload, bytes) or names_credentials(payload)
        if not chunks:
            return
        if spool.digest is not None:
            chunks = normalize_response({"body": chunks}, spool.digest)["body"]
        if named:  # else redact_body would return them unchanged (names_credentials)
            chunks = redact_body(chunks)
        chunks = scrub(chunks, spool.secrets)  # redact_answer, chunk by chunk
        spool.watch.add(chunks)
        if spool.watch.found:  # scrub_stream would change the stream: its way, at the end
            raise SpoolError("a secret in the stream")
        spool.add(chunks)

    def _finish_spool(
        self, flow: http.HTTPFlow, plan: Plan, recorder: Any, spool: StreamSpool
    ) -> tuple[bool, dict[str, Any] | None]:
        """Finish a stream written as it passed: its last lines, the rename, the index.
        Whether that was done, and response.timing (taken here either way); when not,
        the temp file is gone and the stream is to be recorded the ordinary way."""
        form = recorder.wire_form()  # the stream's JSON layout (issue 19)
        shell = {"body": [PLACEHOLDER], "is_streaming": True}
        shell.update({"wire_form": form} if form else {})
        placeholder = self.shaper.timed(flow, shell)
        timing = placeholder.get("timing")
        if not recorder.complete:
            spool.discard()
            return False, timing
        try:
            self._spool_more(recorder, spool)
            if self.normalize != (spool.digest is not None):
                raise SpoolError("cassette_normalize changed while the stream passed")
            path, cassette = self._new_cassette(flow, plan, placeholder, timed=False)
            head, indent, tail = split_around(cassette.to_json_bytes())
            if (head, indent, path.parent) != (spool.head, spool.indent, spool.folder):
                raise SpoolError("the cassette's text before the chunks changed")
            spool.finish(tail, path)
        except Exception as e:  # noqa: BLE001 - the ordinary way says what is wrong
            spool.discard()
            log.debug("stream not written as it passed (%s): written at its end", e)
            return False, timing
        assert self.store is not None
        plan.recorded = True
        # Indexed from the placeholder, not kept in memory: replays read the file.
        self._recorded(flow, plan, path, cassette, remember=False)
        self._sync_later(path)
        return True, timing

    def _sync_later(self, path: Path) -> None:
        self.writer.sync_later(path, _flush_failed)

    async def _write(
        self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any], raw: bytes | None = None
    ) -> None:
        """Record a whole answer: written and renamed, indexed, then fsynced off the loop.

        The fsync waits for the disk (about 1 ms each here); doing it before the answer
        capped recording at a third of forwarding speed (docs/benchmarks.md).
        """
        plan.recorded = True
        path, cassette = self._new_cassette(flow, plan, response, raw=raw)
        size = len(flow.response.raw_content or b"") if flow.response is not None else 0
        temp, plan.temp = await opened(plan.temp), None
        try:
            # Small: on the loop (a thread hop costs more); big: on the writer thread.
            stat = await self.writer.write(path, cassette, size, temp)
        except NotJSONError as e:  # the client still gets its answer, as it came
            self._not_recorded(flow, plan, f"not valid JSON: {e}", warn=True)
            return
        except Exception as e:  # noqa: BLE001 - the client still gets its answer
            self._write_failed(flow, plan, path, e)
            return
        self._recorded(flow, plan, path, cassette, stat)
        self._sync_later(path)

    async def _record_big(
        self, flow: http.HTTPFlow, plan: Plan, content: bytes, status: int
    ) -> bool:
        """Record a big whole answer in the worker process (writer.py): parsed, typed,
        scrubbed and written there, renamed and indexed here; awaited, as ``_write`` is.
        False: an answer to record the ordinary way (an error, a model list)."""
        assert self.store is not None
        timing = self.shaper.timed(flow, {"is_streaming": False}).get("timing")
        stand_in = {"body": None, "is_streaming": False}
        path, cassette = self._new_cassette(flow, plan, stand_in, timed=False)
        digest = None
        if self.normalize:
            digest = keys.recording_hash(plan.method, plan.path, plan.body, plan.test_id)
        job = WholeAnswer(
            content, status, plan.method, plan.path, plan.body, self.record_errors,
            plain(cassette), self._request_secrets(flow, plan)[0], digest, timing,
        )  # fmt: skip
        try:
            temp, plan.temp = await opened(plan.temp), None
            result = await self.writer.record_whole(job, path.parent, temp)
        except Exception as e:  # noqa: BLE001 - the worker died, the disk refused: loud
            plan.recorded = True
            self._write_failed(flow, plan, path, e)
            return True
        if result.outcome == "ordinary":
            return False
        if result.outcome == "not_recorded":
            self._not_recorded(flow, plan, result.reason)
            return True
        plan.recorded = True
        if result.outcome == "not_json_value":
            self._not_recorded(flow, plan, f"not valid JSON: {result.reason}", warn=True)
            return True
        if result.outcome == "too_big":
            self._write_failed(flow, plan, path, CassetteError(f"{path}: {result.reason}"))
            return True
        try:
            os.replace(result.temp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(result.temp)
            self._write_failed(flow, plan, path, e)
            return True
        # Indexed by its request side; replays read the file (its body was never here).
        head = RecordedResponse.model_validate(result.head)
        stand_in = cassette.model_copy(update={"response": head})
        self._recorded(flow, plan, path, stand_in, remember=False)
        self._sync_later(path)
        return True

    def _request_secrets(
        self, flow: http.HTTPFlow, plan: Plan
    ) -> tuple[frozenset[str], str | None]:
        """The request's credential values, which ``_new_cassette`` scrubs out, and its
        body marker: found when it was keyed, else from the request again (a memo hit)."""
        if plan.secrets is not None:
            return plan.secrets, plan.marker
        return message_secrets(flow.request)

    def _write_failed(self, flow: http.HTTPFlow, plan: Plan, path: Path, error: Exception) -> None:
        """Loud: the user believes this interaction is recorded, and it is not."""
        assert self.store is not None
        log.error(
            "FAILED to record %s %s key %s into %s: %s (the client got its live answer; "
            "no cassette was written)",
            plan.method,
            plan.path,
            plan.key,
            self.store.relative(path),
            error,
        )
        flow.marked = ":x:"
        flow.comment = f"cassette: NOT recorded, write failed ({error})"

    def _new_cassette(
        self,
        flow: http.HTTPFlow,
        plan: Plan,
        response: dict[str, Any],
        timed: bool = True,
        raw: bytes | None = None,
    ) -> tuple[Path, Cassette]:
        """The cassette of a flow and its file. ``raw``: the answer's bytes, which
        ``response`` was read from (``redact_answer`` need not walk what names no key)."""
        assert self.store is not None
        request = flow.request
        if self.normalize:
            digest = keys.recording_hash(plan.method, plan.path, plan.body, plan.test_id)
            response = normalize_response(response, digest)
        if timed:  # else the caller has (or will have) added response.timing itself
            response = self.shaper.timed(flow, response)  # response.timing, if recorded
        # Every credential value the request carried, out of all that is written.
        secrets, marker = self._request_secrets(flow, plan)
        headers = recordable_headers(request.headers, self.record_headers)
        if marker:
            headers["content-type"] = marker  # what the body was parsed from (bodies.py)
        url = self.recorded_url(flow, plan)
        written = scrub(plan.path, secrets), scrub(plan.body, secrets), scrub(url, secrets)
        # Nothing scrubbed: the file is the one named when the answer began.
        unchanged = written[0] is plan.path and written[1] is plan.body and written[2] is url
        path, cassette = new_recording(
            self.store.root,
            method=plan.method,
            path=written[0],
            body=written[1],
            test_id=plan.test_id,
            url=written[2],
            headers=scrub(headers, secrets),
            response=redact_answer(response, secrets, raw),
            file=self.first_answer_path(flow, plan) if unchanged else None,
            body_redacted=True,  # plan.body is as the key saw it (matching.live_request)
            raw=raw,  # a whole answer's bytes: its wire_form (issue 19)
            answer_headers=flow.response.headers if flow.response is not None else None,
            header_names=self.answer_headers,
        )
        path = self.sequencer.recording_path(flow, path)  # <hash>.<n>.json
        return path, cassette

    def _recorded(
        self,
        flow: http.HTTPFlow,
        plan: Plan,
        path: Path,
        cassette: Cassette,
        stat: os.stat_result | None = None,
        remember: bool = True,
    ) -> None:
        """A cassette is on disk: count it and mark the flow now; index and log it as
        soon as the answer has gone out. ``remember=False``: ``cassette`` is a stand-in
        without the answer's body (a big one): indexed, not kept for replays.

        The index waits for the loop's next pass (``call_soon``), which comes before any
        request that arrives after this answer: the client is not kept waiting for the
        index (a fifth of a small recording's time), and nothing can miss the entry.
        """
        assert self.store is not None
        self.counts["recorded"] += 1
        relative = self.store.relative(path)
        flow.comment = f"cassette: recorded {relative}"
        flow.marked = ":red_circle:"
        asyncio.get_running_loop().call_soon(
            self._index_recorded, flow, plan, path, cassette, stat, relative, remember
        )

    def _index_recorded(
        self,
        flow: http.HTTPFlow,
        plan: Plan,
        path: Path,
        cassette: Cassette,
        stat: os.stat_result | None,
        relative: str,
        remember: bool,
    ) -> None:
        assert self.store is not None
        try:
            self.sequencer.committed(self.store, flow, path)
            self.store.add(path, cassette, stat, remember=remember)
        except Exception as e:  # noqa: BLE001 - the file is there; a restart indexes it
            log.error("recorded %s but could not index it: %s", relative, e)
            return
        self.usage.note("recorded", relative)
        log.info(
            "%s recorded %s %s key %s -> %s",
            self.mode,
            plan.method,
            plan.path,
            plan.key[:12],
            relative,
        )


HeaderFields = tuple[tuple[bytes, bytes], ...]


_MISS_NAME, _TOKEN_NAME = MISS_HEADER.encode(), TOKEN_HEADER.lower().encode()
_TEST_ID_NAME, _FAULT_NAME = TEST_ID_HEADER.encode(), FAULT_HEADER.encode()
_BODY_TYPE_NAMES = frozenset({b"content-type", b"content-encoding"})  # the key memo's
_CONTROL_NAMES = frozenset({_TEST_ID_NAME, _FAULT_NAME})  # never forwarded


def _has_header(message: http.Message, name: bytes) -> bool:
    """``name in message.headers`` for a lower-case name, from the raw fields (mitmproxy's
    lookups cost more than the rest of ``_recording``, which runs on every hook)."""
    return any(k.lower() == name for k, _ in message.headers.fields)


def _flush_failed(path: Path, error: OSError) -> None:
    log.error("FAILED to flush cassette %s to disk: %s", path, error)


def _header_fields(wire: Wire, served_from: str) -> HeaderFields | None:
    """The header fields Response.make would give a replayed answer, or None when the
    body would need encoding (content-encoding) or has no length (transfer-encoding)."""
    headers = {"content-type": wire.content_type, FILE_HEADER: served_from}
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


def _matched_request(plan: Plan) -> matching.Request:
    """The plan's request as matching sees it (``_plan_for`` sets it)."""
    if plan.request is not None:
        return plan.request
    return matching.Request(plan.method, plan.path, plan.body)


def _asked_for(body: Any) -> tuple[Any, ...]:
    """What in a request body shapes the encoded answer (``families.encode``)."""
    if not isinstance(body, dict):
        return ()
    options = body.get("stream_options")
    usage = options.get("include_usage") if isinstance(options, dict) else None
    return (body.get("encoding_format"), bool(body.get("stream")), bool(usage))


def _ensure_folder(root: Path, mode: str) -> None:
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


def _connecting(flow: http.HTTPFlow) -> bool:
    """No answer, no error, no server connection yet: a flow server_connect may carry."""
    return flow.response is None and flow.error is None and not flow.server_conn.connected


def _timeout_answer(miss: http.Response, timeout_ms: int) -> http.Response:
    """The miss error, as a 504 saying the upstream did not answer in time."""
    try:
        body = json.loads(miss.content or b"{}")
        error = body["error"]
    except (ValueError, KeyError, TypeError):
        return miss
    error["type"] = error["code"] = "cassette_upstream_timeout"
    miss_message = str(error.get("message", "")).removeprefix("cassette-proxy: ")
    error["message"] = (
        f"cassette-proxy: the upstream sent no response headers within {timeout_ms} ms "
        f"(cassette_response_timeout_ms) and {miss_message}"
    )
    miss.status_code = 504
    miss.content = json.dumps(body).encode()
    return miss


def _not_keyable(request: http.Request) -> str | None:
    """Why a request body cannot be keyed and recorded (it then passes through)."""
    if request.raw_content is None:
        return "the request body is streamed (stream_large_bodies)"
    if len(request.raw_content) > MAX_CASSETTE_BYTES:
        return (
            f"the request body is {len(request.raw_content) / 2**20:.1f} MiB, over the "
            f"{MAX_CASSETTE_BYTES // 2**20} MiB a cassette may hold"
        )
    return None


def _close_delimited(flow: http.HTTPFlow) -> bool:
    """Whether the answer's body ends when the upstream closes the connection.

    HTTP/1 without a content-length and without chunking (mitmproxy's "read until EOF"):
    a close there is no proof of a whole body, as a crash mid-event closes it too. The
    end of a chunked or length-delimited body (or an HTTP/2 stream) is a clean end.
    """
    response = flow.response
    if response is None or not response.http_version.startswith("HTTP/1"):
        return False
    try:
        return http1.expected_http_body_size(flow.request, response) == -1
    except ValueError:
        return True  # headers mitmproxy cannot frame by: no clean end to trust


class _Tap:
    """The stream tap: passes every read through untouched and feeds the recorder.

    When the stream's own end marker arrives ([DONE], "done": true, message_stop) or the
    upstream ends a chunked or length-delimited body, the cassette is written before
    those bytes go on to the client. A close-delimited body has only its end marker.
    """

    def __init__(
        self,
        addon: CassetteRecorder,
        flow: http.HTTPFlow,
        plan: Plan,
        decoder: StreamDecoder | None,
    ) -> None:
        self.addon = addon
        self.flow = flow
        self.plan = plan
        self.decoder = decoder
        self.close_delimited = _close_delimited(flow)
        # OpenAI SSE streams are written as they pass once they are big (spool.py).
        self.spooling = isinstance(plan.recorder, SSEChunkRecorder)

    def __call__(self, data: bytes) -> bytes:
        recorder = self.plan.recorder
        if recorder is None or self.plan.recorded:
            return data
        try:
            if data:
                recorder.feed(self.decoder.feed(data) if self.decoder else data)
                if self.spooling:
                    self._spool(recorder)
                if recorder.complete:
                    self.addon._finish_stream(self.flow, self.plan, clean_end=False)
            else:  # b"": the body ended (by a close, when close-delimited)
                if self.decoder:
                    recorder.feed(self.decoder.flush())
                if self.spooling:
                    self._spool(recorder)
                clean = not self.close_delimited
                self.addon._finish_stream(self.flow, self.plan, clean_end=clean)
        except Exception as e:  # noqa: BLE001 - an exception here would hang the client
            self.plan.recorder = None
            self.addon._not_recorded(self.flow, self.plan, f"stream not recordable: {e}")
        return data

    def _spool(self, recorder: SSEChunkRecorder) -> None:
        """Write the new chunks of a big stream; on any trouble stop, leaving the stream
        to be recorded at its end (which then says what was wrong, as before)."""
        plan = self.plan
        try:
            if plan.spool is None:
                if recorder.size <= SPOOL_BYTES:
                    return
                plan.spool = self.addon._start_spool(self.flow, plan)
            elif len(recorder.payloads) - plan.spool.count < SPOOL_BATCH:
                return  # a few chunks at a time (the end marker's call takes the rest)
            self.addon._spool_more(recorder, plan.spool)
        except Exception as e:  # noqa: BLE001 - the stream goes on, recorded the old way
            self.spooling = False
            if plan.spool is not None:
                plan.spool.discard()
                plan.spool = None
            log.debug("stream no longer written as it passes: %s", e)
