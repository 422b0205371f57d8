"""Matching: which recorded interaction answers a request, and why.

Read this file to know why a request got a given cassette (or none).

1. A request, live or recorded, becomes a ``Request``: method, wire path, body and
   query as the cassette holds them (credentials redacted, the era of a llama-stack
   file undone by ``eras.recorded_wire``).
2. Its **exact key** (``exact_key``) hashes the method, the path, the query and the
   body's normal form (``equivalence.normal_form``: spellings a server reads alike).
   Nulls are kept: ``{"strict": null}`` is not the same request as ``{}`` (llama-stack
   hashes nulls too, and holds pairs that differ only there, with different answers).
3. Only when the exact key has no recording, the **loose rules** (``LOOSE_RULES``) are
   tried, each a small named function that forgets one thing about a request. The
   request's loose keys are its forms under every combination of the rules that
   change it, fewest rules first; a recording is indexed under its own forms the same
   way, so a rule may apply on either side. The rules made for what llama-stack's
   recorder dropped (``LLAMA_STACK_RULES``) match llama-stack's files only, and no rule
   forgets a paging parameter (``PAGING_PARAMS``): see docs/matching.md.
4. When several recordings answer one key, ``choose`` picks: the request's own test
   id first; then host affinity (recorded against the same upstream host and port);
   then a recording made outside any test; then the lowest test id.

A hit's log line names the rule that matched (``exact`` or the loose rules); a miss
names the rules tried, the nearest recording and the test ids recorded for the path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import combinations
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from . import eras, keys
from .entries import Entry, Index
from .equivalence import normal_form
from .families.openai import asks_for_usage
from .redact import keyed_query, redact_body, redact_path, wire_text

if TYPE_CHECKING:
    from .cassette import Cassette

EXACT = "exact"
# A request changed by more rules than this is tried with the first ones only (2**n keys).
MAX_LOOSE_RULES = 6


@dataclass(frozen=True)
class Request:
    """A request as matching sees it: what its cassette holds (credentials redacted)."""

    method: str
    path: str
    body: Any
    query: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Form:
    """A request in keyed form: the body canonical (``keys.canonical_json``)."""

    method: str
    path: str
    body: Any
    query: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Match:
    """A recording that answers a request, and the rule by which it does."""

    entry: Entry
    rule: str  # "exact", or the loose rules joined by "+"


# ---- requests, live and recorded --------------------------------------------------------


def live_request(method: str, path: str, body: Any, query: Iterable[tuple[str, str]]) -> Request:
    """A live request as it will be recorded: keys in the path, credential fields of
    the body and credential query parameters redacted, so that the cassette written
    for it gives this same request back (``recorded_request``)."""
    pairs = tuple(keyed_query(query))
    return Request(method.upper(), redact_path(wire_text(path)), redact_body(body), pairs)


def recorded_request(cassette: Cassette) -> Request:
    """The wire request a cassette of any era answers, keyed as a live one."""
    wire = eras.recorded_wire(cassette)
    pairs = tuple(keyed_query(wire.query))
    return Request(wire.method, redact_path(wire.path), redact_body(wire.body), pairs)


def recorded_query(url: str | None) -> list[tuple[str, str]]:
    """The keyed query parameters of a recorded URL (credentials dropped)."""
    text = urlsplit(url or "").query
    return keyed_query(parse_qsl(text, keep_blank_values=True))


def upstream_of(url: str | None) -> str | None:
    """``host:port`` of a recorded URL, for host affinity; None for a bare path."""
    if not url or "://" not in url:
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    port = port or (443 if parts.scheme.lower() == "https" else 80)
    return f"{parts.hostname.lower()}:{port}"


def upstream(host: str, port: int) -> str:
    return f"{host.lower()}:{port}"


def form(request: Request) -> Form:
    """The keyed form: the body's normal form, canonical. A JSON ``null`` body is keyed
    as no body, as the cassette format reads a recorded ``"body": null``."""
    body = {} if request.body is None else request.body
    canonical = keys.canonical_json(normal_form(request.path, body))
    return Form(request.method.upper(), request.path, canonical, request.query)


def key_of_form(f: Form) -> str:
    return keys.hash_form(f.method, f.path, f.body, list(f.query))


def exact_key(request: Request) -> str:
    """The exact key: nulls kept, client spellings of one request made alike."""
    return key_of_form(form(request))


# ---- file names ---------------------------------------------------------------------------


def file_stem(
    method: str, path: str, body: Any, query: Iterable[tuple[str, str]], test_id: str | None
) -> str:
    """The name (without ``.json``) a recording gets: llama-stack's request hash.

    A request without a query gets exactly llama-stack's hash of its path; with one, the
    hashed endpoint is ``path?query`` (keyed parameters, sorted), so two requests that
    differ only in their query get two files (``?purpose=batch`` and ``?purpose=fine-tune``).
    """
    pairs = sorted(query)
    endpoint = path + "?" + urlencode(pairs) if pairs else path
    return keys.recording_hash(method, endpoint, {} if body is None else body, test_id)


# ---- loose rules ----------------------------------------------------------------------------


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def null_insensitive(f: Form) -> Form:
    """A null-valued field is taken as absent: a client that sends ``"strict": null``
    where the recording left the field out (or the other way round)."""
    return replace(f, body=_drop_nulls(f.body))


def _is_openai_completions(path: str) -> bool:
    return "/api/" not in path and path.rstrip("/").endswith("/completions")


def stream_options_ignored(f: Form) -> Form:
    """A stream's ``stream_options`` (include_usage) is forgotten: llama-stack's recorder
    ignores it for Bedrock, where it varies between runs. The replay then gives what the
    request asked for (``families.openai``: no usage chunk unless asked).

    One direction only: a recording's options are forgotten (its usage chunk is stripped
    for a request that did not ask), but a request that asks for usage keeps them, as a
    stream recorded without usage cannot give it."""
    body = f.body
    if _is_openai_completions(f.path) and isinstance(body, dict) and body.get("stream"):
        return replace(f, body={k: v for k, v in body.items() if k != "stream_options"})
    return f


def stream_options_ignored_request(f: Form) -> Form:
    """``stream_options_ignored`` on the request's side: never for one asking usage."""
    return f if asks_for_usage(f.body) else stream_options_ignored(f)


def pull_model_ignored(f: Form) -> Form:
    """Ollama's ``/api/pull`` model is forgotten: llama-stack recorded ``pull(model)``
    with the model positional, so its recorded body is ``{}``."""
    if f.path.endswith("/api/pull") and isinstance(f.body, dict) and "model" in f.body:
        return replace(f, body={k: v for k, v in f.body.items() if k != "model"})
    return f


def project_id_ignored(f: Form) -> Form:
    """``project_id`` (body or query) is forgotten: llama-stack's recorder drops it from
    ``extra_body`` and ``extra_query`` before hashing, so recordings made with a real
    watsonx project replay under CI's dummy one."""
    body, query = f.body, f.query
    if isinstance(body, dict) and "project_id" in body:
        body = {k: v for k, v in body.items() if k != "project_id"}
    if any(k == "project_id" for k, _ in query):
        query = tuple((k, v) for k, v in query if k != "project_id")
    return replace(f, body=body, query=query)


# llama-stack's recorder rewrites these inside strings before hashing: numbers with 4+
# decimals (as %.5f), and the file_search results it injects into prompts (scores,
# attributes, document ids and citations differ between runs for the same documents).
_LONG_DECIMAL = re.compile(r"(-?\d+\.\d{4,})")
_SEARCH_SCORE = re.compile(r"score:\s*[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")
_SEARCH_ATTRIBUTES = re.compile(r",?\s*attributes:\s*\{[^}]*\}")
_UUID = r"[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}"
_SEARCH_DOCUMENT_ID = re.compile(r"document_id:\s*" + _UUID)
_SEARCH_CITATION = re.compile(r"<\|" + _UUID + r"\|>")


def _volatile_text(text: str) -> str:
    if "." not in text and ":" not in text and "<|" not in text:
        return text  # most strings: nothing to rewrite, no regex run
    if "document_id:" in text:
        # Scores and attributes only in file_search results (which name their documents):
        # "credit score: 820" in a prompt is the user's text, not a search score.
        text = _SEARCH_SCORE.sub("score: *", text)
        text = _SEARCH_ATTRIBUTES.sub("", text)
    text = _SEARCH_DOCUMENT_ID.sub("document_id: *", text)
    text = _SEARCH_CITATION.sub("<|*|>", text)
    return _LONG_DECIMAL.sub(lambda m: f"{float(m.group(0)):.5f}", text)


def _volatile(value: Any) -> Any:
    if isinstance(value, str):
        return _volatile_text(value)
    if isinstance(value, dict):
        return {k: _volatile(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_volatile(v) for v in value]
    return value


def volatile_text_ignored(f: Form) -> Form:
    """Text that varies between runs of one test is forgotten, as llama-stack's recorder
    does: long decimals inside strings, file_search scores, attributes, ids, citations."""
    return replace(f, body=_volatile(f.body))


# Query parameters that choose a page of a list: never forgotten by a loose rule (page 2
# answered with page 1 loops a paginating client for ever). Compared lower-case.
PAGING_PARAMS = frozenset(
    {
        "after", "before", "page", "cursor", "order", "limit", "offset", "starting_after",
        "ending_before", "page_size", "pagesize", "page_token", "pagetoken", "next_token",
        "nexttoken", "next_page_token", "nextpagetoken", "continuation_token",
        "continuationtoken", "marker", "since", "until", "sort", "per_page", "start",
    }
)  # fmt: skip


def is_paging_param(name: str) -> bool:
    return name.lower() in PAGING_PARAMS


def query_not_recorded(f: Form) -> Form:
    """The request's query is forgotten, for llama-stack recordings: that recorder never
    saw parameters an SDK adds by default (watsonx's ``?version=``). Paging parameters
    are kept (``PAGING_PARAMS``). A request side rule: a recording keeps its query."""
    return replace(f, query=tuple((k, v) for k, v in f.query if is_paging_param(k)))


@dataclass(frozen=True)
class LooseRule:
    name: str
    request: Callable[[Form], Form]  # how the rule changes a live request
    recording: Callable[[Form], Form]  # how it changes a recording (often the same)
    # Made for what llama-stack's recorder dropped: matches its files only
    # (``eras.recorded_by_llama_stack``), never the proxy's own recordings.
    llama_stack_only: bool = False


def _unchanged(f: Form) -> Form:
    return f


# In the order they are tried; a request changed by several gets every combination.
LOOSE_RULES: tuple[LooseRule, ...] = (
    LooseRule("null_insensitive", null_insensitive, null_insensitive),
    LooseRule("stream_options_ignored", stream_options_ignored_request, stream_options_ignored),
    LooseRule("pull_model_ignored", pull_model_ignored, pull_model_ignored),
    LooseRule("project_id_ignored", project_id_ignored, project_id_ignored),
    LooseRule("volatile_text_ignored", volatile_text_ignored, volatile_text_ignored, True),
    LooseRule("query_not_recorded", query_not_recorded, _unchanged, True),
)
LLAMA_STACK_RULES = frozenset(rule.name for rule in LOOSE_RULES if rule.llama_stack_only)


def _forms(f: Form, side: str) -> Iterator[tuple[Form, tuple[str, ...]]]:
    """``f`` under every non-empty combination of the rules that change it, fewest
    rules first, in ``LOOSE_RULES`` order; with the names of the rules applied."""
    changing = [rule for rule in LOOSE_RULES if getattr(rule, side)(f) != f][:MAX_LOOSE_RULES]
    for n in range(1, len(changing) + 1):
        for combo in combinations(changing, n):
            g = f
            for rule in combo:
                g = getattr(rule, side)(g)
            yield g, tuple(rule.name for rule in combo)


def loose_keys(request: Request) -> list[tuple[str, str]]:
    """The request's loose keys, in the order they are tried: (key, rules applied).

    The first is the exact key itself, looked up among the recordings' loose forms (a
    rule that applies on the recording's side only, e.g. it holds a null the request
    leaves out)."""
    f = form(request)
    exact = key_of_form(f)
    out = [(exact, "")]
    seen = {exact}
    for g, names in _forms(f, "request"):
        k = key_of_form(g)
        if k not in seen:
            seen.add(k)
            out.append((k, "+".join(names)))
    return out


def recording_keys(request: Request) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The exact key a recording answers, its loose keys and the rules of each."""
    f = form(request)
    exact = key_of_form(f)
    loose: dict[str, str] = {}
    for g, names in _forms(f, "recording"):
        k = key_of_form(g)
        if k != exact and k not in loose:
            loose[k] = "+".join(names)
    return exact, tuple(loose), tuple(loose.values())


def rules_tried(request: Request) -> list[str]:
    """The rules a lookup of this request tries: exact, then the loose rules that apply."""
    f = form(request)
    return [EXACT] + [rule.name for rule in LOOSE_RULES if rule.request(f) != f]


# ---- choosing among candidates --------------------------------------------------------------


def _rank(entry: Entry, test_id: str | None, host: str | None) -> tuple[bool, bool, bool, str]:
    return (
        entry.test_id != test_id or test_id is None,  # the request's own test first
        host is None or entry.upstream != host,  # then the same upstream host and port
        entry.test_id is not None,  # then a recording made outside any test
        entry.test_id or "",  # then the lowest test id, so the choice is stable
    )


def choose(
    entries: list[Entry] | None, test_id: str | None, host: str | None = None
) -> Entry | None:
    """The recording that answers, of several with the same key (see the module doc).

    ``entries`` are newest first: among equals the newest recording wins."""
    if not entries:
        return None
    if len(entries) == 1:
        return entries[0]
    return min(entries, key=lambda e: _rank(e, test_id, host))


LENIENT, STRICT = "lenient", "strict"
SCOPES = (LENIENT, STRICT)


def check_scope(scope: str) -> str:
    """The option ``cassette_test_scope``, checked: ``lenient`` or ``strict``."""
    if scope not in SCOPES:
        raise ValueError(f"cassette_test_scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    return scope


def in_scope(entries: list[Entry] | None, test_id: str | None, scope: str) -> list[Entry] | None:
    """The recordings a request may be answered from. ``strict``: a request with a test id
    only from its own test's recordings (model lists too: a test's own lists, merged);
    ``lenient``, or no test id: all of them (``choose`` still prefers the request's own)."""
    if scope != STRICT or test_id is None or not entries:
        return entries
    return [e for e in entries if e.test_id == test_id]


def find(
    store: Index,
    request: Request,
    key: str,
    test_id: str | None,
    host: str | None = None,
    scope: str = LENIENT,
) -> Match | None:
    """The recording that answers ``request`` (whose exact key is ``key``), and why."""
    entry = choose(in_scope(store.exact(key), test_id, scope), test_id, host)
    if entry is not None:
        return Match(entry, EXACT)
    for k, names in loose_keys(request):
        found = store.loose(k) if k == key else [*store.exact(k), *store.loose(k)]
        # A rule made for llama-stack's files never matches the proxy's own recordings.
        found = [e for e in found if e.llama_stack or not LLAMA_STACK_RULES & _applied(e, k, names)]
        entry = choose(in_scope(found, test_id, scope), test_id, host)
        if entry is not None:
            applied = _applied(entry, k, names)
            rules = [rule.name for rule in LOOSE_RULES if rule.name in applied]
            return Match(entry, "+".join(rules) or EXACT)
    return None


def _applied(entry: Entry, k: str, names: str) -> set[str]:
    """The rules by which ``entry`` answers loose key ``k``: those applied to the request
    (``names``) and those applied to the recording."""
    recorded = entry.loose_rules[entry.loose.index(k)] if k in entry.loose else ""
    return {n for n in (*names.split("+"), *recorded.split("+")) if n}


# ---- a miss: what was closest ---------------------------------------------------------------


def model_of(body: Any) -> str | None:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def nearest(
    store: Index, request: Request, test_id: str | None, limit: int = 200
) -> tuple[Entry, str] | None:
    """The recording on the same method and path closest to the request, and the first
    difference: the same test id first, then the same model, then the longest common
    prefix of the canonical bodies. Only runs on a miss, so it may read files."""
    entries = [e for e in store.on_path(request.path) if e.method == request.method]
    if not entries:
        return None
    model = model_of(request.body)
    entries.sort(key=lambda e: (e.test_id != test_id, e.model != model))
    best_group = (entries[0].test_id != test_id, entries[0].model != model)
    wanted = form(request)
    wanted_text = keys.dumps_canonical(wanted.body)
    best: tuple[int, Entry, Form] | None = None
    for entry in entries[:limit]:
        if (entry.test_id != test_id, entry.model != model) != best_group:
            break
        try:
            recorded = form(recorded_request(store.read(entry)))
        except Exception:  # noqa: BLE001 - an unreadable file is just not the nearest
            continue
        score = _common_prefix(wanted_text, keys.dumps_canonical(recorded.body))
        if best is None or score > best[0]:
            best = (score, entry, recorded)
    if best is None:
        return None
    _, entry, recorded = best
    diff = keys.first_difference(wanted.body, recorded.body)
    if diff is None:
        diff = "query string" if recorded.query != wanted.query else "test id"
    elif diff.endswith(".sha256"):  # another file: which one was sent, which recorded
        sent, kept = _value_at(wanted.body, diff), _value_at(recorded.body, diff)
        if isinstance(sent, str) and isinstance(kept, str):
            diff += f" (the file sent has sha256 {sent}, the recorded one {kept})"
    return entry, diff


def _value_at(body: Any, where: str) -> Any:
    """The value at a ``first_difference`` path (``body.file.sha256``, ``body.f[1].x``)."""
    value = {"body": body}
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", where):
        if part.startswith("["):
            index = int(part[1:-1])
            value = value[index] if isinstance(value, list) and index < len(value) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
    return value


def test_id_summary(
    store: Index, request: Request, test_id: str | None, shown: int = 5
) -> tuple[int, list[str], int]:
    """For a miss: how many recordings this path has under the request's own test id,
    a few of the other test ids recorded for it, and how many others there are."""
    ids = [e.test_id for e in store.on_path(request.path) if e.method == request.method]
    own = sum(1 for i in ids if i == test_id) if test_id else 0
    others = sorted({i for i in ids if i and i != test_id})
    return own, others[:shown], len(others)


def loose_keys_for(
    method: str, path: str, body: Any, query: list[tuple[str, str]] | None = None
) -> tuple[str, ...]:
    """The loose keys of a request given by its parts, tried in order after an exact miss."""
    request = Request(method.upper(), path, body, tuple(query or ()))
    return tuple(k for k, _ in loose_keys(request))
