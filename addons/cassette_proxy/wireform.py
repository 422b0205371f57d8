"""How an upstream wrote its JSON, kept beside the typed answer so a replay sends its bytes.

A cassette stores answers as parsed JSON (llama-stack's typed ``__type__``/``__data__``
form, which its reader needs), and a replay writes them out again. Written the default
way (``json.dumps``: ``", "`` and ``": "``), a compact answer from vLLM or OpenAI came
back with different bytes. The optional ``response.wire_form`` (ignored by llama-stack's
reader, like ``response.timing``) says how to write them as they came:

* ``{"json": LAYOUT}``: one of ``LAYOUTS``; checked at record time to give the exact
  bytes of the answer (or of every chunk of a stream but those in ``chunks``);
* ``"end"``: what followed the JSON of a whole answer (a server's trailing newline);
* ``"text"``: a whole answer no layout writes (odd spacing, escapes), verbatim;
* ``"chunks"``: ``{index: text}``, the stream chunks no layout writes, verbatim;
* ``"eol"``: ``"\\r\\n"`` when a stream's lines ended so.

A verbatim text is only ever sent when it still reads as the very value the replay
would send: a cassette edited by hand, normalised (``cassette_normalize``) or redacted
sends the value, in the layout, not stale text. ``settle`` drops such texts when the
cassette is written, so no file keeps text its body no longer says (a credential).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency
    orjson = None  # type: ignore[assignment]

FIELD = "wire_form"
# A verbatim text is kept up to this size: beyond it the cassette would hold the answer
# twice for a rare case (a layout covers what real servers write).
MAX_TEXT = 256 * 1024


def _json(separators: tuple[str, str], ascii_only: bool) -> Callable[[Any], bytes]:
    def dump(value: Any) -> bytes:
        return json.dumps(value, separators=separators, ensure_ascii=ascii_only).encode()

    return dump


# Tried in this order. ``orjson`` writes as pydantic does (vLLM, FastAPI servers that
# dump pydantic models): compact, UTF-8, floats as ``1e-7``; ``compact`` is Python's.
LAYOUTS: dict[str, Callable[[Any], bytes]] = {}
if orjson is not None:
    LAYOUTS["orjson"] = orjson.dumps
LAYOUTS.update(
    {
        "compact": _json((",", ":"), False),
        "compact-ascii": _json((",", ":"), True),
        "spaced": _json((", ", ": "), True),
        "spaced-utf8": _json((", ", ": "), False),
    }
)
DEFAULT = "spaced"  # what replays wrote before wire forms: json.dumps(value)


def render(value: Any, layout: str) -> bytes | None:
    """``value`` written in ``layout``; None if the layout is unknown or cannot write it."""
    dump = LAYOUTS.get(layout)
    if dump is None:
        return None
    try:
        return dump(value)
    except (TypeError, ValueError):  # orjson: a 65-bit integer, NaN stays json's
        return None


def layout_of(raw: bytes, value: Any, first: str | None = None) -> str | None:
    """The layout that writes ``value`` as exactly ``raw``, ``first`` tried first."""
    names = [first] if first in LAYOUTS else []
    names += [name for name in LAYOUTS if name != first]
    for name in names:
        if render(value, name) == raw:
            return name
    return None


def _text(raw: bytes) -> str | None:
    if len(raw) > MAX_TEXT:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---- whole answers ----------------------------------------------------------------------


def whole_form(raw: bytes) -> dict[str, Any] | None:
    """The wire form of a whole JSON answer's bytes; None when json.dumps writes them
    (the default) or they are not JSON."""
    body = raw.rstrip(b" \t\r\n")
    end = raw[len(body) :]
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    layout = layout_of(body, value)
    if layout is not None:
        form: dict[str, Any] = {"json": layout}
    else:
        text = _text(raw)
        if text is None:
            return None
        return {"text": text}
    if end:
        form["end"] = end.decode("ascii")
    if form == {"json": DEFAULT}:
        return None
    return form


# ---- streams: one JSON value per SSE event or NDJSON line ---------------------------------


class StreamForm:
    """Learns a stream's wire form chunk by chunk (``see``), as its recorder reads them."""

    def __init__(self) -> None:
        self.layout: str | None = None
        self.texts: dict[str, str] = {}
        self.crlf = False
        self._eol_seen = False
        self._last = b""

    def feed(self, data: bytes) -> None:
        """Take a read of the stream: its first line end (CRLF or LF) is the stream's."""
        if self._eol_seen or not data:
            return
        at = data.find(b"\n")
        if at < 0:
            self._last = data[-1:]
            return
        self._eol_seen = True
        self.crlf = (data[at - 1 : at] if at else self._last) == b"\r"

    def see(self, index: int, raw: bytes | str, value: Any) -> None:
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
        if self.layout is not None and render(value, self.layout) == data:
            self.texts.pop(str(index), None)
            return
        if self.layout is None:
            self.layout = layout_of(data, value) or DEFAULT
            if render(value, self.layout) == data:
                return
        # A chunk over several ``data:`` lines is not one line: written by the layout.
        text = _text(data) if b"\n" not in data and b"\r" not in data else None
        if text is not None:
            self.texts[str(index)] = text

    def form(self, texts: bool = True) -> dict[str, Any] | None:
        """The form learnt so far; ``texts=False``: the layout and line ends only."""
        form: dict[str, Any] = {}
        if self.layout is not None and self.layout != DEFAULT:
            form["json"] = self.layout
        if texts and self.texts:
            form["chunks"] = dict(self.texts)
        if self.crlf:
            form["eol"] = "\r\n"
        return form or None


# ---- replay -------------------------------------------------------------------------------


def _same(text: str, value: Any) -> bool:
    try:
        return bool(json.loads(text) == value)
    except (ValueError, RecursionError):
        return False


def whole_bytes(value: Any, form: dict[str, Any]) -> bytes | None:
    """A whole answer's value as its wire form writes it; None: use the default."""
    text = form.get("text")
    if isinstance(text, str) and _same(text, value):
        return text.encode("utf-8", "surrogateescape")
    layout = form.get("json")
    out = render(value, layout) if isinstance(layout, str) else None
    if out is None:
        return None
    end = form.get("end")
    return out + end.encode() if isinstance(end, str) and not end.strip() else out


def chunk_bytes(values: list[Any], form: dict[str, Any]) -> list[bytes]:
    """Each chunk's JSON as the wire form writes it (a chunk a form cannot write: json.dumps)."""
    layout = form.get("json")
    layout = layout if isinstance(layout, str) and layout in LAYOUTS else DEFAULT
    texts = form.get("chunks")
    texts = texts if isinstance(texts, dict) else {}
    out = []
    for i, value in enumerate(values):
        text = texts.get(str(i))
        one_line = isinstance(text, str) and "\n" not in text and "\r" not in text
        if one_line and _same(text, value):
            out.append(text.encode("utf-8", "surrogateescape"))
            continue
        data = render(value, layout)
        out.append(data if data is not None else json.dumps(value).encode())
    return out


def eol(form: dict[str, Any] | None) -> str:
    end = (form or {}).get("eol")
    return "\r\n" if end == "\r\n" else "\n"


def settle(response: dict[str, Any], sent: Any) -> dict[str, Any]:
    """The response half with the verbatim texts of its wire form that no longer read as
    what a replay sends (``sent``: the whole value, or the list of chunk values) dropped.
    Run on what is written, after normalisation and redaction."""
    form = response.get(FIELD)
    if not isinstance(form, dict) or ("text" not in form and "chunks" not in form):
        return response
    form = dict(form)
    if "text" in form and not (isinstance(form["text"], str) and _same(form["text"], sent)):
        del form["text"]
    if "chunks" in form:
        chunks = form["chunks"] if isinstance(form["chunks"], dict) else {}
        values = sent if isinstance(sent, list) else []
        kept = {
            k: v
            for k, v in chunks.items()
            if k.isdigit() and int(k) < len(values) and isinstance(v, str)
            and _same(v, values[int(k)])
        }  # fmt: skip
        if kept:
            form["chunks"] = kept
        else:
            del form["chunks"]
    out = dict(response)
    if form:
        out[FIELD] = form
    else:
        del out[FIELD]
    return out
