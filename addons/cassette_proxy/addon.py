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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import server_hooks
from mitmproxy.tls import TlsData
from OpenSSL import SSL

from . import keys
from .cassette import Cassette, CassetteError, write_cassette
from .fallback import TOKEN_HEADER, FallbackServer, certificate_pems
from .families import Family, NotRecordable, StreamRecorder, classify, encode
from .families.base import Wire
from .recording import UNRECORDED_ERRORS, new_recording, recording_path, whole_response
from .redact import keyed_query, recordable_headers, redact_url
from .stable import normalize_response
from .store import CassetteStore
from .upstream import UpstreamProbe
from .usage import UsageLog

log = logging.getLogger("cassette_proxy")

MODES = ("auto", "record", "replay", "record-if-missing", "passthrough")
TEST_ID_HEADER = "x-cassette-test-id"
FILE_HEADER = "x-cassette-file"
MISS_HEADER = "x-cassette-miss"
# The openai SDKs retry 408, 409, 429 and 5xx; a miss must not be retried.
MISS_STATUS = 404
STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")
WIRE_CACHE_SIZE = 256  # encoded answers kept for repeated hits (as many as the store's cache)


@dataclass
class Plan:
    """What the proxy decided for one request; kept in ``flow.metadata``."""

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


PLAN = "cassette_plan"


class CassetteRecorder:
    def __init__(self) -> None:
        self.store: CassetteStore | None = None
        self.probe = UpstreamProbe()
        self.fallback = FallbackServer(self._fallback_answer)
        self._awaiting_connect: dict[str, http.HTTPFlow] = {}
        self._fallback_flows: dict[str, http.HTTPFlow] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.counts = {"hit": 0, "miss": 0, "recorded": 0, "fallback": 0}
        # Encoded answers by cassette file: a hit re-sends bytes, no model_dump/encode.
        # Valid while the store still holds the same Cassette object for that file.
        self._wires: OrderedDict[Path, tuple[Cassette, str, Wire, str]] = OrderedDict()
        self.usage = UsageLog()

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
        flow.metadata[PLAN] = plan
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
        if request.raw_content:
            try:
                body = json.loads(request.get_content(strict=False) or b"")
            except (ValueError, UnicodeDecodeError):
                log.info("passthrough %s %s: body is not JSON", request.method, request.path)
                return None
        path = request.path.split("?", 1)[0]
        query = keyed_query(request.query.items(multi=True))
        key = keys.request_key(request.method, path, body, query)
        loose = keys.loose_keys(request.method, path, body, query)
        family = classify(request.method, path)
        return Plan(family, key, request.method.upper(), path, body, test_id, loose_keys=loose)

    def _lookup(self, plan: Plan) -> Any:
        assert self.store is not None
        return self.store.lookup(plan.key, plan.test_id, plan.loose_keys)

    # ---- replay -------------------------------------------------------------------

    def _serve(self, flow: http.HTTPFlow, plan: Plan, why: str = "") -> None:
        flow.response = self._replay(plan, why)
        file = flow.response.headers.get(FILE_HEADER)
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
            wire, plan.served_from = self._wire(entry, plan)
        except (OSError, ValueError, NotRecordable, CassetteError) as e:
            log.warning("cassette %s cannot be replayed: %s", entry.path, e)
            self.counts["miss"] += 1
            return self._miss(plan, broken=f"{self.store.relative(entry.path)}: {e}")
        self.counts["hit"] += 1
        self.usage.note("fallback" if why else "hit", plan.served_from)
        log.info(
            "%s hit %s %s key %s -> %s%s",
            ctx.options.cassette_mode,
            plan.method,
            plan.path,
            plan.key[:12],
            plan.served_from,
            f" (fallback: {why})" if why else "",
        )
        headers = {"content-type": wire.content_type, FILE_HEADER: plan.served_from}
        headers.update(wire.headers)
        return http.Response.make(wire.status, wire.body, headers)

    def _wire(self, entry: Any, plan: Plan) -> tuple[Wire, str]:
        """The bytes to send for a hit, and the cassette file named in the answer."""
        assert self.store is not None
        cassette = self.store.read(entry)
        cached = self._wires.get(entry.path)
        if cached is not None and cached[0] is cassette and cached[1] == plan.key:
            self._wires.move_to_end(entry.path)
            return cached[2], cached[3]
        wire = encode(plan.path, plan.body, cassette.response.model_dump())
        served_from = self.store.relative(entry.path)
        self._wires[entry.path] = (cassette, plan.key, wire, served_from)
        if len(self._wires) > WIRE_CACHE_SIZE:
            self._wires.popitem(last=False)
        return wire, served_from

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
        ids = self.store.test_ids(plan.key)
        if ids:
            error["test_ids"] = ids
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
        plan: Plan | None = flow.metadata.get(PLAN)
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
        plan: Plan | None = flow.metadata.get(PLAN) if flow else None
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
        plan: Plan | None = flow.metadata.get(PLAN)
        if plan is None or plan.served_from is not None or flow.response is None:
            return None
        if flow.response.headers.get(MISS_HEADER) or TOKEN_HEADER in flow.request.headers:
            return None
        return plan

    def _mark_pending(self, flow: http.HTTPFlow) -> None:
        """Mark a flow whose answer is about to be recorded, naming the file.

        mitmdump's ``-w`` writer saves a flow in its own ``response``/``error`` hook,
        which runs before ours: marked only in ``_write``, a saved flow would never
        show that it was recorded. ``_write`` or ``_not_recorded`` settle the mark
        (mitmweb is updated after every hook).
        """
        plan = self._recording(flow)
        assert flow.response is not None
        status = flow.response.status_code
        if plan is None or self.store is None:
            return
        if not (200 <= status < 300 or (400 <= status < 500 and status not in UNRECORDED_ERRORS)):
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
            plan.key[:12],
            reason,
        )
        if flow.comment.startswith("cassette: recording"):
            flow.marked = ""
            flow.comment = f"cassette: not recorded ({reason})"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if ctx.options.cassette_mode == "passthrough" or flow.response is None:
            return
        content_type = flow.response.headers.get("content-type", "").lower()
        if not content_type.startswith(STREAM_TYPES):
            self._mark_pending(flow)
            return
        flow.response.stream = True  # never buffer a stream, recorded or not
        plan = self._recording(flow)
        if plan is None or not 200 <= flow.response.status_code < 300:
            return
        if flow.response.headers.get("content-encoding", "identity") != "identity":
            encoding = flow.response.headers["content-encoding"]
            self._not_recorded(flow, plan, f"stream is {encoding}-encoded")
            return
        try:
            plan.recorder = plan.family.stream_recorder(plan.path, plan.body, content_type)
        except NotRecordable as e:
            self._not_recorded(flow, plan, str(e))
            return
        flow.response.stream = _Tap(plan)
        self._mark_pending(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        plan = self._recording(flow)
        if plan is None:
            return
        assert flow.response is not None
        if plan.recorder is not None:
            self._finish_stream(flow, plan, clean_end=True)
            return
        if flow.response.stream:
            if flow.comment.startswith("cassette: recording"):
                self._not_recorded(flow, plan, "the stream could not be recorded")
            return  # a stream we chose not to record
        status = flow.response.status_code
        try:
            data = json.loads(flow.response.get_content(strict=False) or b"")
        except (ValueError, UnicodeDecodeError):
            self._not_recorded(flow, plan, "answer is not JSON")
            return
        try:
            response = whole_response(plan.family, plan.path, plan.body, status, data)
        except NotRecordable as e:
            self._not_recorded(flow, plan, str(e))
            return
        self._write(flow, plan, response)

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
        assert plan.recorder is not None
        try:
            response = plan.recorder.response(clean_end)
        except NotRecordable as e:
            self._not_recorded(flow, plan, str(e), warn=True)
            return
        self._write(flow, plan, response)

    def _write(self, flow: http.HTTPFlow, plan: Plan, response: dict[str, Any]) -> None:
        assert self.store is not None
        plan.recorded = True
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
        # Indexed at once so the next request is a hit even before the file is on disk.
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
        task = asyncio.get_running_loop().create_task(self._write_file(path, cassette))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_file(self, path: Path, cassette: Cassette) -> None:
        try:
            await asyncio.to_thread(write_cassette, path, cassette)
        except OSError as e:
            log.error("FAILED to write cassette %s: %s (the client got its answer)", path, e)


class _Tap:
    """The stream tap: passes every read through untouched and feeds the recorder."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, data: bytes) -> bytes:
        recorder = self.plan.recorder
        if recorder is not None and data:
            try:
                recorder.feed(data)
            except Exception as e:  # noqa: BLE001 - an exception here would hang the client
                log.info("stop recording %s: %s", self.plan.key[:12], e)
                self.plan.recorder = None
        return data
