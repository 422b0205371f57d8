"""WebSocket sessions (OpenAI's Realtime API and the servers that speak it): one cassette each.

``SessionRoom`` is a mitmproxy addon of its own. It owns every WebSocket upgrade request
(``CassetteRecorder.request`` leaves them alone):

  request          forward the upgrade (to be recorded), or, when the cassettes answer
                   (replay; auto with the upstream offline; record-if-missing with a
                   recording), point the flow at a local WebSocket server that plays the
                   session, or answer a 404 miss when nothing is recorded for the URL
  responseheaders  a played flow gets its real target back (logs, mitmweb)
  websocket_end    a forwarded session is written: the upgrade request (credentials out)
                   and every frame of both sides with its time

A session cassette is llama-stack's ``request``/``response`` with one more field,
``websocket_session`` (docs/sessions.md). Replay sends the recorded server frames in
order, each batch after the client frame that preceded it; a client frame must match the
recording's next one by its JSON with client-chosen fields left out (``event_id``; the
``item.id`` of ``conversation.item.create``), else the client gets a Realtime ``error``
event naming the first difference and a close (1008). Several recordings of the same URL
are told apart by the client frames as they come; a session never mixes two recordings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from mitmproxy import ctx, http
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from . import keys
from .answers import fault as fault_response
from .cassette import Cassette, CassetteError, read_cassette, write_cassette
from .faults import FAULT_HEADER, Fault, FaultCounter, FaultError, parse_fault
from .pacing import parse_pacing
from .redact import (
    is_secret_query_param,
    recordable_headers,
    redact_body,
    redact_url,
    request_secrets,
    scrub,
)
from .upstream import DOWN, UpstreamProbe

log = logging.getLogger("cassette_proxy")

SESSION_FIELD = "websocket_session"  # the cassette's extra field
FOLDER = "websocket"  # below cassette_dir
TEST_ID_HEADER = "x-cassette-test-id"
TOKEN_HEADER = "x-cassette-session"
MISS_CLOSE_CODE = 1008  # policy violation: the client sent what no recording holds
ABNORMAL_CLOSURE = 1006  # what mitmproxy notes when a side drops without a close frame
INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."
# Realtime fields the client chooses freely: left out when client frames are compared.
VOLATILE_TOP = ("event_id",)
VOLATILE_BY_TYPE = {"conversation.item.create": (("item", "id"),)}


_UPGRADE_NAMES = frozenset({b"upgrade", b"Upgrade", b"UPGRADE"})


def is_upgrade(request: http.Request) -> bool:
    """Whether a request asks for a WebSocket (``Upgrade: websocket``). From the raw
    fields: this runs for every request, and header lookups cost more than the rest."""
    for name, value in request.headers.fields:
        if name in _UPGRADE_NAMES or (len(name) == 7 and name.lower() == b"upgrade"):
            return b"websocket" in value.lower()
    return False


# ---- the cassette's frames (pure) ------------------------------------------------------


def frame_record(from_client: bool, is_text: bool, content: bytes, at_ms: float) -> dict[str, Any]:
    """One frame as a cassette keeps it: JSON where a text frame parses, else text or base64."""
    record: dict[str, Any] = {"from": "client" if from_client else "server", "at_ms": at_ms}
    if not is_text:
        record["binary"] = base64.b64encode(content).decode("ascii")
        return record
    text = content.decode("utf-8", "replace")
    try:
        record["json"] = json.loads(text, parse_constant=_refuse)
    except ValueError:
        record["text"] = text
    return record


def _refuse(name: str) -> Any:
    raise ValueError(name)


def frame_payload(record: dict[str, Any]) -> tuple[bool, bytes]:
    """(is_text, bytes) of a recorded frame, as it goes back on the wire."""
    if "binary" in record:
        return False, base64.b64decode(record["binary"])
    if "json" in record:
        return True, json.dumps(record["json"], separators=(",", ":")).encode()
    return True, str(record.get("text", "")).encode()


def comparable(record: dict[str, Any], ignore: Sequence[str] = ()) -> Any:
    """What of a client frame must match: its JSON without the client-chosen fields."""
    if "json" not in record:
        return {"binary": record["binary"]} if "binary" in record else {"text": record.get("text")}
    value = record["json"]
    if not isinstance(value, dict):
        return value
    out = {k: v for k, v in value.items() if k not in VOLATILE_TOP and k not in ignore}
    for path in VOLATILE_BY_TYPE.get(str(value.get("type")), ()):
        inner = out.get(path[0])
        if isinstance(inner, dict) and path[1] in inner:
            out[path[0]] = {k: v for k, v in inner.items() if k != path[1]}
    return keys.canonical_json(out)


def session_key(path: str, query: Sequence[tuple[str, str]], test_id: str | None) -> str:
    """Which recordings may answer an upgrade: its path, query (credentials out), test id."""
    kept = sorted((k, v) for k, v in query if not is_secret_query_param(k))
    text = json.dumps({"path": path, "query": kept, "test_id": test_id}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def session_file(root: Path, key: str, frames: list[dict[str, Any]]) -> Path:
    """One file per URL and conversation: the same client frames again replace it."""
    client = [comparable(f) for f in frames if f["from"] == "client"]
    digest = hashlib.sha256((key + json.dumps(client, sort_keys=True)).encode()).hexdigest()
    return root / FOLDER / f"{digest}.json"


def is_session(cassette: Cassette) -> bool:
    return isinstance((cassette.model_extra or {}).get(SESSION_FIELD), dict)


def check_session(data: Any) -> str | None:
    """What is wrong with a ``websocket_session`` field, or None (for ``verify``)."""
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        return "websocket_session.frames is not a list"
    if not isinstance(data.get("key"), str):
        return "websocket_session.key is missing"
    for i, f in enumerate(data["frames"]):
        if not isinstance(f, dict) or f.get("from") not in ("client", "server"):
            return f"frame {i}: 'from' must be client or server"
        if not any(k in f for k in ("json", "text", "binary")):
            return f"frame {i}: no json, text or binary"
        try:
            frame_payload(f)
        except (ValueError, TypeError) as e:
            return f"frame {i}: {e}"
    return None


# ---- replay: which recording, what next (pure) ---------------------------------------------


@dataclass
class Recorded:
    path: Path
    relative: str
    frames: list[dict[str, Any]]
    close: dict[str, Any] | None
    subprotocol: str | None


@dataclass
class Step:
    """What the player answers to a client frame: frames to send, or a miss."""

    send: list[dict[str, Any]] = field(default_factory=list)
    base_ms: float = 0.0  # the recorded time the ``send`` frames count from
    error: str | None = None
    param: str | None = None
    close: dict[str, Any] | None = None  # the recording ends here with the server's close


class Player:
    """Plays one session from its candidate recordings (newest first).

    Every candidate still in play has matched every client frame so far and holds the
    very server frames sent so far; the first of them leads.
    """

    def __init__(self, candidates: list[Recorded], ignore: Sequence[str] = ()) -> None:
        self.live = [(c, 0) for c in candidates]
        self.ignore = ignore
        self.client_frames = 0

    @property
    def leader(self) -> Recorded:
        return self.live[0][0]

    def start(self) -> Step:
        return self._advance(0.0)

    def client(self, record: dict[str, Any]) -> Step:
        self.client_frames += 1
        want = comparable(record, self.ignore)
        matched = []
        for rec, pos in self.live:
            if pos < len(rec.frames) and rec.frames[pos]["from"] == "client":
                if comparable(rec.frames[pos], self.ignore) == want:
                    matched.append((rec, pos + 1))
        if not matched:
            return self._miss(record, want)
        self.live = matched
        rec, pos = self.live[0]
        return self._advance(float(rec.frames[pos - 1].get("at_ms") or 0))

    def _advance(self, base_ms: float) -> Step:
        """The leader's server frames up to its next client frame; candidates that would
        have sent other frames drop out."""
        rec, pos = self.live[0]
        end = pos
        while end < len(rec.frames) and rec.frames[end]["from"] == "server":
            end += 1
        batch = rec.frames[pos:end]
        sent = [frame_payload(f) for f in batch]
        kept = []
        for other, opos in self.live:
            theirs = other.frames[opos : opos + len(batch)]
            if [frame_payload(f) for f in theirs] == sent and all(
                f["from"] == "server" for f in theirs
            ):
                kept.append((other, opos + len(batch)))
        self.live = kept
        close = (
            rec.close
            if end == len(rec.frames) and (rec.close or {}).get("by") == "server"
            else None
        )
        return Step(send=batch, base_ms=base_ms, close=close)

    def _miss(self, record: dict[str, Any], want: Any) -> Step:
        rec, pos = self.live[0]
        n = self.client_frames
        kind = want.get("type") if isinstance(want, dict) else None
        what = f"client frame #{n}" + (f" ({kind})" if kind else "")
        if pos >= len(rec.frames):
            why = "the recording has no more client frames"
            param = None
        elif rec.frames[pos]["from"] != "client":
            why = "the recording expects the server to send next"
            param = None
        else:
            expected = comparable(rec.frames[pos], self.ignore)
            param = keys.first_difference(want, expected, "event") or "event"
            why = f"first difference at {param}"
        message = (
            f"cassette-proxy: {what} matches no recording: {why}; "
            f"nearest recording {rec.relative} (frame {pos})"
        )
        return Step(error=message, param=param)


def error_event(message: str, param: str | None, client_event_id: Any) -> dict[str, Any]:
    """A miss in the Realtime ``error`` event's shape."""
    return {
        "type": "error",
        "event_id": f"event_cassette_{int(time.time() * 1000)}",
        "error": {
            "type": "invalid_request_error",
            "code": "cassette_miss",
            "message": message,
            "param": param,
            "event_id": client_event_id,
        },
    }


# ---- the addon ----------------------------------------------------------------------------


@dataclass
class Playing:
    """A session the local server is to play for one upgrade."""

    player: Player
    factor: float | None
    cut_after: int | None
    subprotocol: str | None
    label: str


class SessionRoom:
    """Records and replays WebSocket sessions (see the module's docstring)."""

    def __init__(self) -> None:
        self.mode = "auto"
        self.root: Path | None = None
        self.factor: float | None = None
        self.ignore: list[str] = []
        self.record_headers: list[str] = []
        self.probe = UpstreamProbe()
        self.counter = FaultCounter()
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._playing: dict[str, Playing] = {}
        self._targets: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[str, int, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        # flows forwarded upstream, to record at their end: flow -> (test id, started)
        self._recording: weakref.WeakKeyDictionary[http.HTTPFlow, str | None] = (
            weakref.WeakKeyDictionary()
        )
        self.counts = {"played": 0, "recorded": 0, "miss": 0}

    # ---- options ----------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cassette_session_ignore",
            Sequence[str],
            [],
            "WebSocket sessions: top-level JSON fields of client frames left out of "
            "matching, besides event_id (and item.id of conversation.item.create).",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        self.mode = getattr(opts, "cassette_mode", "auto")
        self.ignore = list(opts.cassette_session_ignore)
        self.record_headers = list(getattr(opts, "cassette_record_headers", []))
        if "cassette_dir" in updated or self.root is None:
            self.root = Path(getattr(opts, "cassette_dir", "cassettes")).expanduser()
        if "cassette_pacing" in updated:
            with contextlib.suppress(ValueError):  # the shaper refuses a bad value loudly
                self.factor = parse_pacing(opts.cassette_pacing)
        if updated & {"cassette_probe_timeout_ms", "cassette_probe_ttl_ms"}:
            with contextlib.suppress(AttributeError):
                self.probe = UpstreamProbe(
                    opts.cassette_probe_timeout_ms, opts.cassette_probe_ttl_ms
                )

    def done(self) -> None:
        if any(self.counts.values()):
            log.info(
                "sessions: %d played, %d misses, %d recorded",
                self.counts["played"],
                self.counts["miss"],
                self.counts["recorded"],
            )
        if self._server is not None:
            self._server.close()
        self._server = None
        self.probe.close()

    # ---- request: forward (record) or play --------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if flow.response is not None or not is_upgrade(request):
            return
        test_id = request.headers.pop(TEST_ID_HEADER, "").strip() or None
        fault = self._fault(flow)
        if flow.response is not None or self.mode == "passthrough":
            return
        path, _, _ = request.path.partition("?")
        key = session_key(path, list(request.query.items(multi=True)), test_id)
        candidates = self._candidates(key)
        mode = self.mode
        if mode == "record-if-missing" and not candidates:
            play = False
        elif mode in ("replay", "record-if-missing"):
            play = mode == "replay" or bool(candidates)
        elif mode == "auto":
            # A fresh probe, never a cached verdict: an upgrade is rare, and a session
            # sent to an upstream that died since would get mitmproxy's 502.
            play = await self.probe.probe(request.host, request.port) == DOWN
        else:  # record
            play = False
        if not play:
            self._recording[flow] = test_id
            if fault is not None and fault.cut_after is not None:
                log.info(
                    "%s fault %r not applied to a forwarded WebSocket session", mode, fault.spec
                )
            return
        shown = redact_url(request.pretty_url)
        if not candidates:
            self.counts["miss"] += 1
            message = f"cassette-proxy: no WebSocket session recorded for {shown}"
            if test_id:
                message += f" with test id {test_id}"
            log.warning("%s miss %s", mode, message.removeprefix("cassette-proxy: "))
            error = {
                "message": message,
                "type": "cassette_miss",
                "code": "cassette_miss",
                "param": None,
                "path": path,
                "session_key": key,
            }
            flow.response = http.Response.make(
                404,
                json.dumps({"error": error}),
                {"content-type": "application/json", "x-cassette-miss": key},
            )
            flow.comment, flow.marked = "cassette: session miss", ":x:"
            return
        offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")]
        chosen = candidates[0].subprotocol
        playing = Playing(
            Player(candidates, self.ignore),
            self.factor,
            fault.cut_after if fault is not None else None,
            chosen if chosen in offered else None,
            shown,
        )
        await self._redirect(flow, playing)
        self.counts["played"] += 1
        flow.comment, flow.marked = f"cassette: session {candidates[0].relative}", ":vhs:"
        log.info(
            "%s session %s -> %s (%d recording(s) for this URL)",
            mode,
            shown,
            candidates[0].relative,
            len(candidates),
        )

    def _fault(self, flow: http.HTTPFlow) -> Fault | None:
        """X-Cassette-Fault on an upgrade: status= answers it, cut-after= cuts the played
        session after that many server frames."""
        values = flow.request.headers.get_all(FAULT_HEADER)
        if not values:
            return None
        del flow.request.headers[FAULT_HEADER]
        path = flow.request.path.partition("?")[0]
        try:
            fault = parse_fault(",".join(values))
        except FaultError as e:
            flow.response = http.Response.make(
                400,
                json.dumps({"error": {"message": str(e)}}),
                {"content-type": "application/json"},
            )
            return None
        if fault is None or not self.counter.take(fault, (flow.request.path,)):
            return None
        if fault.status is not None:
            flow.response = fault_response(path, fault.status)
        return fault

    def _candidates(self, key: str) -> list[Recorded]:
        """The recordings of this URL and test id, newest first."""
        if self.root is None:
            return []
        folder = self.root / FOLDER
        if not folder.is_dir():
            return []
        found = []
        for path in folder.glob("*.json"):
            try:
                cassette = read_cassette(path)
            except (CassetteError, OSError) as e:
                log.warning("session cassette skipped: %s", e)
                continue
            data = (cassette.model_extra or {}).get(SESSION_FIELD)
            if not isinstance(data, dict) or data.get("key") != key:
                continue
            problem = check_session(data)
            if problem is not None:
                log.warning("session cassette %s skipped: %s", path, problem)
                continue
            found.append((path.stat().st_mtime_ns, path, data))
        found.sort(key=lambda t: t[0], reverse=True)
        return [
            Recorded(
                p, str(p.relative_to(self.root)), d["frames"], d.get("close"), d.get("subprotocol")
            )
            for _, p, d in found
        ]

    async def _redirect(self, flow: http.HTTPFlow, playing: Playing) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self._address = self._server.sockets[0].getsockname()[:2]
        assert self._address is not None
        self._playing[flow.id] = playing
        data = flow.request.data
        self._targets[flow] = (data.host, data.port, data.scheme)
        flow.request.headers[TOKEN_HEADER] = flow.id
        data.host, data.port, data.scheme = self._address[0], self._address[1], b"http"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        target = self._targets.pop(flow, None)
        if target is not None:
            data = flow.request.data
            data.host, data.port, data.scheme = target
            flow.request.headers.pop(TOKEN_HEADER, None)
            self._playing.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.responseheaders(flow)

    # ---- record -----------------------------------------------------------------------

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        if flow not in self._recording or flow.websocket is None or self.root is None:
            return
        test_id = self._recording.pop(flow)
        if flow.websocket.close_code == ABNORMAL_CLOSURE:
            # As for a stream cut short: a session that may be missing its end is no
            # recording to answer with.
            log.warning(
                "%s not recorded WebSocket session %s: cut short (the connection dropped "
                "without a close frame, after %d frames)",
                self.mode,
                redact_url(flow.request.pretty_url),
                len(flow.websocket.messages),
            )
            flow.comment = "cassette: session not recorded (cut short)"
            return
        try:
            path = self._write(flow, test_id)
        except Exception as e:  # noqa: BLE001 - the session is over; say it was not kept
            log.error(
                "FAILED to record WebSocket session %s: %s", redact_url(flow.request.pretty_url), e
            )
            return
        self.counts["recorded"] += 1
        flow.comment, flow.marked = f"cassette: recorded {path}", ":red_circle:"
        log.info(
            "%s recorded WebSocket session %s (%d frames) -> %s",
            self.mode,
            redact_url(flow.request.pretty_url),
            len(flow.websocket.messages),
            path,
        )

    def _write(self, flow: http.HTTPFlow, test_id: str | None) -> str:
        assert self.root is not None and flow.websocket is not None
        request = flow.request
        secrets = request_secrets(
            request.headers.items(multi=True), request.query.items(multi=True), None
        )
        started = (flow.response.timestamp_end if flow.response else None) or (
            flow.websocket.messages[0].timestamp if flow.websocket.messages else time.time()
        )
        frames = []
        for m in flow.websocket.messages:
            at = round(max(0.0, m.timestamp - started) * 1000, 1)
            record = frame_record(m.from_client, m.is_text, m.content, at)
            if "json" in record:
                record["json"] = redact_body(record["json"])
            frames.append(scrub(record, secrets))
        ws = flow.websocket
        close: dict[str, Any] = {
            "by": "client" if ws.closed_by_client else "server",
            "code": ws.close_code,
            "reason": scrub(ws.close_reason or "", secrets),
        }
        if flow.error is not None:
            close["error"] = scrub(flow.error.msg, secrets)
        path, _, _ = request.path.partition("?")
        key = session_key(path, list(request.query.items(multi=True)), test_id)
        offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")]
        url = scrub(redact_url(request.pretty_url), secrets)
        query = {k: v for k, v in parse_qsl(urlsplit(url).query)}
        session = {
            "key": key,
            "subprotocols": [p for p in offered if p and not p.startswith(INSECURE_KEY_PROTOCOL)],
            "subprotocol": flow.response.headers.get("sec-websocket-protocol")
            if flow.response
            else None,
            "frames": frames,
            "close": close,
        }
        data = {
            "test_id": test_id,
            "request": {
                "method": "GET",
                "url": url,
                "headers": scrub(recordable_headers(request.headers, self.record_headers), secrets),
                "body": None,
                "endpoint": path,
                "model": query.get("model", ""),
            },
            "response": {"status": 101, "body": None, "is_streaming": False},
            SESSION_FIELD: session,
        }
        target = session_file(self.root, key, frames)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_cassette(target, Cassette.model_validate(data))
        return str(target.relative_to(self.root))

    # ---- the local server that plays a session -----------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            await self._play(ws, reader, writer)
        except (OSError, asyncio.IncompleteReadError) as e:
            log.info("session replay: connection ended: %s", e)
        except Exception:  # noqa: BLE001 - one bad session never stops the proxy
            log.exception("session replay failed")
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    async def _play(
        self, ws: WSConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        playing: Playing | None = None
        while playing is None:
            data = await reader.read(65536)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    token = dict(event.extra_headers).get(TOKEN_HEADER.encode(), b"").decode()
                    playing = self._playing.pop(token, None)
                    if playing is None:
                        writer.write(ws.send(RejectConnection(status_code=502)))
                        return
                    writer.write(ws.send(AcceptConnection(subprotocol=playing.subprotocol)))
        loop = asyncio.get_running_loop()
        sent = 0
        player = playing.player

        async def send(step: Step, at: float) -> bool:
            """The step's frames on time; False when the session is cut or closed."""
            nonlocal sent
            for record in step.send:
                if playing.cut_after is not None and sent >= playing.cut_after:
                    log.info("session %s cut after %d server frame(s)", playing.label, sent)
                    writer.transport.abort()
                    return False
                if playing.factor:
                    delay = (float(record.get("at_ms") or 0) - step.base_ms) / 1000 / playing.factor
                    wait = at + delay - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                is_text, payload = frame_payload(record)
                event = (
                    TextMessage(data=payload.decode()) if is_text else BytesMessage(data=payload)
                )
                writer.write(ws.send(event))
                await writer.drain()
                sent += 1
            if step.close is not None:
                code = step.close.get("code") or 1000
                writer.write(
                    ws.send(CloseConnection(code=code, reason=step.close.get("reason") or ""))
                )
                await writer.drain()
                return False
            return True

        if not await send(player.start(), loop.time()):
            return
        parts: list[bytes | str] = []
        while True:
            data = await reader.read(65536)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    writer.write(ws.send(event.response()))
                    await writer.drain()
                    return
                elif isinstance(event, Message):
                    parts.append(event.data)
                    if not event.message_finished:
                        continue
                    is_text = isinstance(event, TextMessage)
                    content = "".join(parts).encode() if is_text else b"".join(parts)  # type: ignore[arg-type]
                    parts = []
                    arrived = loop.time()
                    record = frame_record(True, is_text, content, 0.0)
                    step = player.client(record)
                    if step.error is not None:
                        self.counts["miss"] += 1
                        log.warning(
                            "%s session miss %s",
                            self.mode,
                            step.error.removeprefix("cassette-proxy: "),
                        )
                        event_id = (
                            (record.get("json") or {}).get("event_id")
                            if isinstance(record.get("json"), dict)
                            else None
                        )
                        error = error_event(step.error, step.param, event_id)
                        writer.write(ws.send(TextMessage(data=json.dumps(error))))
                        writer.write(
                            ws.send(CloseConnection(code=MISS_CLOSE_CODE, reason="cassette miss"))
                        )
                        await writer.drain()
                        return
                    if not await send(step, arrived):
                        return
                elif isinstance(event, RejectData):
                    return
