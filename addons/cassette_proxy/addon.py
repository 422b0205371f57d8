"""The mitmproxy addon: hooks that wire classify, key, look up or forward, record, encode.

The way of a request:
  request          classify it, key it; serve a hit or forward it (by mode, by upstream)
  server_connect   the upstream died since the last probe: point the connection at
                   the local fallback server, which answers from the cassettes
  responseheaders  a stream: tap it, so chunks are recorded as they pass through
  response/error   a complete answer: write the cassette
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import server_hooks
from mitmproxy.tls import TlsData
from OpenSSL import SSL

from . import keys
from .cassette import (
    MAX_CASSETTE_BYTES,
    Cassette,
    CassetteError,
    write_cassette,
)
from .decoding import StreamDecoder, stream_decoder
from .fallback import TOKEN_HEADER, FallbackServer, certificate_pems
from .families import Family, NotRecordable, StreamRecorder, Wire, classify, encode
from .recording import (
    DEFAULT_RECORDED_ERRORS,
    new_recording,
    recorded_errors,
    recording_path,
    whole_response,
)
from .redact import recordable_headers, redact_path, redact_url
from .stable import normalize_response
from .store import CassetteStore, live_key
from .upstream import UpstreamProbe
from .usage import UsageLog
from .writer import CassetteWriter

log = logging.getLogger("cassette_proxy")

MODES = ("auto", "record", "replay", "record-if-missing", "passthrough")
TEST_ID_HEADER = "x-cassette-test-id"
FILE_HEADER = "x-cassette-file"
MISS_HEADER = "x-cassette-miss"
# The openai SDKs retry 408, 409, 429 and 5xx; a miss must not be retried.
MISS_STATUS = 404
STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")
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
    recorder: StreamRecorder | None = None
    recorded: bool = False
    notes: list[str] = field(default_factory=list)
    loose_keys: tuple[str, ...] = ()  # weaker keys tried after a miss (keys.loose_keys)



class CassetteRecorder:
    def __init__(self) -> None:
        self.store: CassetteStore | None = None
        self.probe = UpstreamProbe()
        self.fallback = FallbackServer(self._fallback_answer)
        self._awaiting_connect: dict[str, http.HTTPFlow] = {}
        self._fallback_flows: dict[str, http.HTTPFlow] = {}
        self._writes: set[asyncio.Task[None]] = set()
        # Big answers parsed and written off the loop; fsyncs batched on a thread of their
        # own, so they never hold up the threads other work is queued on.
        self.writer = CassetteWriter()
        self.counts = {"hit": 0, "miss": 0, "recorded": 0, "fallback": 0}
        # Encoded answers by cassette file: a hit re-sends bytes, no model_dump/encode.
        # Valid while the store still holds the same Cassette object for that file.
        self._wires: OrderedDict[Path, tuple[Cassette, str, Wire, str, HeaderFields | None]] = (
            OrderedDict()
        )
        self.usage = UsageLog()
        self._keys: OrderedDict[tuple[Any, ...], tuple[str, str, Any, Any]] = OrderedDict()
        # flow -> its Plan; an entry goes when mitmproxy drops the flow.
        self.plans: weakref.WeakKeyDictionary[http.HTTPFlow, Plan] = weakref.WeakKeyDictionary()
        self.log_summary = True  # `cassette-proxy run` prints the summary itself
        self.record_errors = DEFAULT_RECORDED_ERRORS  # option cassette_record_errors

    # ---- options -----------------------------------------------------------------

    def load(self, loader: Any) -> None:
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
            "cassette_record_headers",
            Sequence[str],
            [],
            "Request headers to record by name. Credentials are never recorded.",
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
        if updated & {"cassette_probe_timeout_ms", "cassette_probe_ttl_ms"}:
            if opts.cassette_probe_timeout_ms <= 0 or opts.cassette_probe_ttl_ms < 0:
                raise exceptions.OptionsError(
                    "cassette_probe_timeout_ms must be > 0 and cassette_probe_ttl_ms >= 0"
                )
            self.probe = UpstreamProbe(opts.cassette_probe_timeout_ms, opts.cassette_probe_ttl_ms)
        if "connection_strategy" in updated or "cassette_mode" in updated:
            # Lazy connects let the request hook answer before any upstream connect,
            # so reverse mode and HTTPS work with the upstream down.
            if opts.connection_strategy != "lazy":
                opts.connection_strategy = "lazy"
        if "cassette_dir" in updated:
            root = Path(opts.cassette_dir).expanduser()
            if root.exists() and not root.is_dir():
                raise exceptions.OptionsError(f"cassette_dir {root} exists and is not a folder")
            self.store = CassetteStore(root)
            report = self.store.load()
            for problem in report.bad:
                log.warning("cassette skipped: %s", problem)
            if report.removed_temp:
                log.info("removed %d unfinished temp file(s) in %s", report.removed_temp, root)
            if report.unservable:
                log.info(
                    "%d cassette(s) no client can reach, not served: %s",
                    len(report.unservable),
                    "; ".join(report.unservable),
                )
            log.info("cassettes: %d loaded from %s", report.loaded, root)
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
                self.usage = UsageLog(where)
            except OSError as e:
                raise exceptions.OptionsError(f"cassette_usage_log {where}: {e}") from e

    async def done(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self.fallback.close()
        self.usage.close()
        self.writer.close()
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
        mode = ctx.options.cassette_mode
        test_id = flow.request.headers.pop(TEST_ID_HEADER, "").strip() or None
        if mode == "passthrough" or flow.response is not None:
            return
        plan = self._plan(flow, test_id)
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
            plan.probed = self.probe.cached(host, port) is None
            if not await self.probe.reachable(host, port):
                self.counts["fallback"] += 1
                self._serve(flow, plan, why="upstream offline")
                return
            self._awaiting_connect[flow.client_conn.id] = flow
        elif mode == "record":
            # Fail fast: mitmproxy has no connect timeout of its own.
            if not await self.probe.reachable(flow.request.host, flow.request.port):
                flow.response = http.Response.make(
                    502,
                    f"cassette-proxy: upstream {flow.request.host}:{flow.request.port} "
                    "is unreachable and cassette_mode is record",
                    {"content-type": "text/plain"},
                )
                return
        if flow.response is None:
            # Decoded bodies stream through the tap as they are recorded.
            flow.request.headers["accept-encoding"] = "identity"

    def _plan(self, flow: http.HTTPFlow, test_id: str | None) -> Plan | None:
        request = flow.request
        body: Any = {}
        path, has_query, _ = request.path.partition("?")
        why = _not_keyable(request)
        if why is not None:
            mode = ctx.options.cassette_mode
            log.info("%s passthrough %s %s: %s", mode, request.method, redact_path(path), why)
            return None
        # The same request bytes always give the same key: a test suite re-sends the
        # same requests, and the key's work (parse, redact, normal form, hash) was the
        # biggest part of the addon's time per hit (docs/benchmarks.md).
        memo_key = (request.method, request.path, request.headers.get("content-encoding"),
                    request.raw_content)  # fmt: skip
        memo = self._keys.get(memo_key)
        if memo is not None:
            self._keys.move_to_end(memo_key)
            key, path, body, query = memo
            return self._plan_for(request.method, key, path, body, query, test_id)
        if request.raw_content:
            try:
                body = json.loads(request.get_content(strict=False) or b"")
            except (ValueError, UnicodeDecodeError, RecursionError):
                kind = request.headers.get("content-type", "no content-type")
                log.info(
                    "%s passthrough %s %s: body is not JSON (%s)",
                    ctx.options.cassette_mode,
                    request.method,
                    redact_path(path),  # logs never show a key in the path either
                    kind.split(";", 1)[0],
                )
                return None
        try:
            # Credentials never reach a cassette, nor the key (store.live_key).
            pairs = request.query.items(multi=True) if has_query else []
            key, path, body, query = live_key(request.method, path, body, pairs)
            plan = self._plan_for(request.method, key, path, body, query, test_id)
        except RecursionError:
            mode = ctx.options.cassette_mode
            shown = redact_path(path)
            log.info("%s passthrough %s %s: JSON nested too deeply", mode, request.method, shown)
            return None
        if len(request.raw_content or b"") <= KEY_MEMO_MAX_BODY:
            self._keys[memo_key] = (key, path, body, query)
            if len(self._keys) > KEY_MEMO_SIZE:
                self._keys.popitem(last=False)
        return plan

    def _plan_for(
        self, method: str, key: str, path: str, body: Any, query: Any, test_id: str | None
    ) -> Plan:
        # Loose keys are only consulted when the exact key has nothing recorded.
        known = self.store is not None and key in self.store
        loose = () if known else keys.loose_keys(method, path, body, query)
        family = classify(method, path)
        return Plan(family, key, method.upper(), path, body, test_id, loose_keys=loose)

    def _lookup(self, plan: Plan) -> Any:
        assert self.store is not None
        return self.store.lookup(plan.key, plan.test_id, plan.loose_keys)

    # ---- replay -------------------------------------------------------------------

    def _serve(self, flow: http.HTTPFlow, plan: Plan, why: str = "") -> None:
        flow.response = self._replay(plan, why)
        file = plan.served_from  # set on a hit, as the answer's FILE_HEADER
        flow.comment = f"cassette: {file}" if file else "cassette: miss"
        flow.marked = ":tape:" if file else ":x:"
        if why:
            flow.comment += f" ({why})"

    def _replay(self, plan: Plan, why: str = "") -> http.Response:
        """The recorded answer for a plan, or the miss error; ``why`` names a fallback."""
        assert self.store is not None
        entry = self.store.lookup(plan.key, plan.test_id, plan.loose_keys)
        if entry is None:
            self.counts["miss"] += 1
            return self._miss(plan)
        try:
            wire, plan.served_from, fields = self._wire(entry, plan)
        except (OSError, ValueError, NotRecordable, CassetteError) as e:
            log.warning("cassette %s cannot be replayed: %s", entry.path, e)
            self.counts["miss"] += 1
            return self._miss(plan, broken=f"{self.store.relative(entry.path)}: {e}")
        self.counts["hit"] += 1
        self.usage.note("fallback" if why else "hit", plan.served_from)
        if log.isEnabledFor(logging.INFO):  # a quiet proxy skips building the line
            log.info(
                "%s hit %s %s key %s -> %s%s",
                ctx.options.cassette_mode,
                plan.method,
                plan.path,
                plan.key[:12],
                plan.served_from,
                f" (fallback: {why})" if why else "",
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
        cached = self._wires.get(entry.path)
        if cached is not None and cached[0] is cassette and cached[1] == plan.key:
            self._wires.move_to_end(entry.path)
            return cached[2], cached[3], cached[4]
        wire = encode(plan.path, plan.body, cassette.response.model_dump())
        served_from = self.store.relative(entry.path)
        fields = _header_fields(wire, served_from)
        self._wires[entry.path] = (cassette, plan.key, wire, served_from, fields)
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
        nearest = self.store.nearest(plan.method, plan.path, plan.body)
        if nearest is not None:
            entry, diff = nearest
            where = self.store.relative(entry.path)
            error["nearest"] = {"file": where, "first_difference": diff}
            message += f"; nearest recording {where} differs first at {diff}"
        else:
            message += "; nothing is recorded for this path"
        # Which tests recorded this path: a wrong or missing X-Cassette-Test-Id shows here.
        ids = self.store.test_ids(plan.key) or self.store.path_test_ids(plan.method, plan.path)
        if ids:
            error["test_ids"] = ids
            shown = ", ".join(ids[:10]) + (f" (+{len(ids) - 10} more)" if len(ids) > 10 else "")
            message += f"; test ids recorded for this path: {shown}"
        if plan.test_id:
            message += f"; this request's test id: {plan.test_id}"
        error["message"] = message
        mode = ctx.options.cassette_mode
        log.warning("%s miss %s", mode, message.removeprefix("cassette-proxy: "))
        return http.Response.make(
            MISS_STATUS,
            json.dumps({"error": error}),
            {"content-type": "application/json", MISS_HEADER: plan.key},
        )

    # ---- server_connect: no window of 502s when the upstream dies -----------------

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        flow = self._awaiting_connect.pop(data.client.id, None)
        if flow is None or data.server.address is None:
            return
        plan: Plan | None = self.plans.get(flow)
        if plan is None or plan.probed or flow.response is not None:
            return
        host, port = data.server.address[:2]
        if await self.probe.probe(host, port):
            return
        await self._start_fallback()
        self.counts["fallback"] += 1
        self._fallback_flows[flow.id] = flow
        flow.request.headers[TOKEN_HEADER] = flow.id
        address = self.fallback.tls_address if data.server.tls else self.fallback.address
        log.debug("upstream %s:%s went away; answering %s from cassettes", host, port, plan.key)
        data.server.address = address

    def client_disconnected(self, client: connection.Client) -> None:
        # A keep-alive request reuses its server connection and never reaches
        # server_connect: forget it when its client goes.
        self._awaiting_connect.pop(client.id, None)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address:
            self.probe.mark(*data.server.address[:2], up=False)

    def tls_start_server(self, tls_start: TlsData) -> None:
        """Our own stand-in has a throwaway certificate: do not verify it."""
        if self.fallback.tls_address is None or tls_start.conn.address != self.fallback.tls_address:
            return
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        context.set_alpn_protos([b"http/1.1"])
        tls_start.ssl_conn = SSL.Connection(context)
        tls_start.ssl_conn.set_connect_state()

    async def _start_fallback(self) -> None:
        tlsconfig = ctx.master.addons.get("tlsconfig")
        pems = certificate_pems(tlsconfig.certstore) if tlsconfig else (None, None)
        await self.fallback.start(*pems)

    def _fallback_answer(self, token: str) -> http.Response:
        flow = self._fallback_flows.pop(token, None)
        plan: Plan | None = self.plans.get(flow) if flow else None
        if flow is None or plan is None:
            return http.Response.make(
                502, b"cassette-proxy: upstream offline", {"content-type": "text/plain"}
            )
        response = self._replay(plan, why="upstream went away")
        flow.comment = f"cassette: {plan.served_from or 'miss'} (upstream went away)"
        flow.marked = ":tape:" if plan.served_from else ":x:"
        return response

    # ---- record ---------------------------------------------------------------------

    def _recording(self, flow: http.HTTPFlow) -> Plan | None:
        """The plan of a flow whose upstream answer is to be recorded, if any."""
        plan: Plan | None = self.plans.get(flow)
        if plan is None or plan.served_from is not None or flow.response is None:
            return None
        if flow.response.headers.get(MISS_HEADER) or TOKEN_HEADER in flow.request.headers:
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
        path = recording_path(self.store.root, plan.method, plan.path, plan.body, plan.test_id)
        flow.marked = ":red_circle:"
        flow.comment = f"cassette: recording {self.store.relative(path)}"

    def _not_recorded(
        self, flow: http.HTTPFlow, plan: Plan, reason: str, warn: bool = False
    ) -> None:
        """One log line for a forwarded answer that leaves no cassette; unmark the flow."""
        (log.warning if warn else log.info)(
            "%s not recorded %s %s key %s: %s",
            ctx.options.cassette_mode,
            plan.method,
            plan.path,
            plan.key,  # the full key: grep the log for the request_key a miss names
            reason,
        )
        if flow.comment.startswith("cassette: recording"):
            flow.marked = ""
            flow.comment = f"cassette: not recorded ({reason})"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if ctx.options.cassette_mode == "passthrough" or flow.response is None:
            return
        if TOKEN_HEADER in flow.request.headers:
            # The stand-in closes its own socket; the client's connection stays as it was.
            flow.response.headers.pop("connection", None)
        content_type = flow.response.headers.get("content-type", "").lower()
        if not content_type.startswith(STREAM_TYPES):
            self._mark_pending(flow)
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

    async def response(self, flow: http.HTTPFlow) -> None:
        plan = self._recording(flow)
        if plan is None or plan.recorded:
            return
        assert flow.response is not None
        if plan.recorder is not None:
            self._finish_stream(flow, plan, clean_end=True)  # the tap has done it already
            return
        if flow.response.stream:
            if flow.comment.startswith("cassette: recording"):
                self._not_recorded(flow, plan, "the stream could not be recorded")
            return  # a stream we chose not to record
        status = flow.response.status_code
        try:
            data = await self.writer.loads(flow.response.get_content(strict=False) or b"")
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
        # Awaited: mitmproxy sends the answer after this hook, so a client that got a
        # whole answer can count on its cassette being in place, even if the proxy is
        # killed (fsynced right after, off the answer's path).
        await self._write(flow, plan, response)

    def error(self, flow: http.HTTPFlow) -> None:
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
            self._not_recorded(flow, plan, f"stream cut short ({reason})", warn=True)

    def _finish_stream(self, flow: http.HTTPFlow, plan: Plan, clean_end: bool) -> None:
        """Record a finished stream now, on the event loop (the tap cannot await).

        Called by the tap when the stream's end marker arrives, before those bytes are
        passed on: a client that saw the end of a stream can count on its cassette being
        in place (renamed; fsynced in a thread right after), even if the proxy is killed.
        """
        recorder = plan.recorder
        if recorder is None or plan.recorded:
            return
        plan.recorder = None  # settled, whatever happens below
        try:
            response = recorder.response(clean_end)
        except NotRecordable as e:
            self._not_recorded(flow, plan, str(e), warn=True)
            return
        plan.recorded = True
        path, cassette = self._new_cassette(flow, plan, response)
        try:
            write_cassette(path, cassette, durable=False)
        except Exception as e:  # noqa: BLE001 - a failed write must not break the stream
            self._write_failed(flow, plan, path, e)
            return
        self._recorded(flow, plan, path, cassette)
        self._sync_later(path)

    def _sync_later(self, path: Path) -> None:
        task = asyncio.get_running_loop().create_task(self._sync_file(path))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any]) -> None:
        """Record a whole answer: written and renamed, indexed, then fsynced off the loop.

        The fsync waits for the disk (about 1 ms each here); doing it before the answer
        capped recording at a third of forwarding speed (docs/benchmarks.md).
        """
        plan.recorded = True
        path, cassette = self._new_cassette(flow, plan, response)
        size = len(flow.response.raw_content or b"") if flow.response is not None else 0
        try:
            # Small: on the loop (a thread hop costs more); big: on the writer thread.
            await self.writer.write(path, cassette, size)
        except Exception as e:  # noqa: BLE001 - the client still gets its answer
            self._write_failed(flow, plan, path, e)
            return
        self._recorded(flow, plan, path, cassette)
        self._sync_later(path)

    async def _sync_file(self, path: Path) -> None:
        try:
            await self.writer.sync(path)  # batched with the others waiting
        except OSError as e:
            log.error("FAILED to flush cassette %s to disk: %s", path, e)

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
        self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any]
    ) -> tuple[Path, Cassette]:
        assert self.store is not None
        request = flow.request
        if ctx.options.cassette_normalize:
            digest = keys.recording_hash(plan.method, plan.path, plan.body, plan.test_id)
            response = normalize_response(response, digest)
        path, cassette = new_recording(
            self.store.root,
            method=plan.method,
            path=plan.path,
            body=plan.body,
            test_id=plan.test_id,
            url=redact_url(request.pretty_url),
            headers=recordable_headers(request.headers, ctx.options.cassette_record_headers),
            response=response,
        )
        return path, cassette

    def _recorded(self, flow: http.HTTPFlow, plan: Plan, path: Path, cassette: Cassette) -> None:
        """Index a cassette that is on disk, count it, log it, mark the flow."""
        assert self.store is not None
        self.store.add(path, cassette)
        self.counts["recorded"] += 1
        relative = self.store.relative(path)
        self.usage.note("recorded", relative)
        flow.comment = f"cassette: recorded {relative}"
        flow.marked = ":red_circle:"
        log.info(
            "%s recorded %s %s key %s -> %s",
            ctx.options.cassette_mode,
            plan.method,
            plan.path,
            plan.key[:12],
            relative,
        )


HeaderFields = tuple[tuple[bytes, bytes], ...]


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


class _Tap:
    """The stream tap: passes every read through untouched and feeds the recorder.

    When the stream's own end marker arrives ([DONE], "done": true) or the upstream ends
    it cleanly, the cassette is written before those bytes go on to the client.
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

    def __call__(self, data: bytes) -> bytes:
        recorder = self.plan.recorder
        if recorder is None or self.plan.recorded:
            return data
        try:
            if data:
                recorder.feed(self.decoder.feed(data) if self.decoder else data)
                if recorder.complete:
                    self.addon._finish_stream(self.flow, self.plan, clean_end=False)
            else:  # b"": the upstream ended the body cleanly
                if self.decoder:
                    recorder.feed(self.decoder.flush())
                self.addon._finish_stream(self.flow, self.plan, clean_end=True)
        except Exception as e:  # noqa: BLE001 - an exception here would hang the client
            self.plan.recorder = None
            self.addon._not_recorded(self.flow, self.plan, f"stream not recordable: {e}")
        return data
