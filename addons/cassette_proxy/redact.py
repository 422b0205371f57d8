"""Secrets never reach a cassette: credentials by name (headers, query parameters, body
and answer fields, at any depth), keys in URLs and text, and every credential value the
request carried, wherever it shows up in what is written (an upstream's echo included).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

# Never written, even when the user asks to record headers by name (besides every
# header whose name is a credential name, ``is_credential_name``).
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "anthropic-api-key",
        "cookie",
        "set-cookie",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
        # AWS SigV4 (Bedrock): the signature and what it signs change on every call.
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
        # A browser's Realtime client sends its key as a subprotocol
        # ("openai-insecure-api-key.<key>"): sessions.py writes the subprotocols without it.
        "sec-websocket-protocol",
    }
)
REDACTED = "REDACTED"

# ---- credential names ----------------------------------------------------------------
#
# A name is a credential name when one of its words is a credential word. Words come
# from splitting on anything but letters and digits, then camelCase ("AWSAccessKeyId"
# -> aws access key id), compared lower-case. Whole words, so LLM fields stay data:
# ``max_tokens``, ``input_tokens`` and ``budget_tokens`` are counts (plural ``tokens`` is
# not a credential word, nor ``keys``), ``top_k``, ``logit_bias``, ``authors``,
# ``tokenizer`` and ``keywords`` are other words. Only string values are ever replaced
# (a count is never a secret), and a string under a credential name at any depth.
CREDENTIAL_WORDS = frozenset(
    {
        "key", "token", "secret", "secrets", "password", "passwords", "passwd", "pwd",
        "passphrase", "signature", "sig", "credential", "credentials", "auth",
        "authorization", "cookie", "jwt", "bearer",
    }
)  # fmt: skip
# All-lower-case compounds ("apikey", "accesstoken", "x-apikey"): a credential word
# after one of these prefixes; "monkey" or "turkey" are not keys.
COMPOUND_PREFIXES = (
    "api", "access", "auth", "bearer", "client", "id", "private", "refresh", "secret",
    "security", "session", "subscription", "master", "app", "oauth", "sas", "signing",
    "x", "xapi",
)  # fmt: skip
# Paging words: ``pageToken``, ``nextToken``, ``next_page_token``, ``continuation_token``
# name the cursor of a list's next page, not a credential. Dropped from the key or
# written as REDACTED, page 2 would get page 1's answer.
PAGING_WORDS = frozenset(
    {"page", "next", "prev", "previous", "continuation", "pagination", "cursor", "resume",
     "resumption", "sync"}
)  # fmt: skip
# Words that make the credential word that follows them a non-secret: the special
# tokens of a chat template (``eos_token``), paging cursors, keys that are identifiers
# (``prompt_cache_key``, ``idempotency_key``, ``public_key``), Gemini's
# ``thoughtSignature`` (an opaque blob the client sends back).
NOT_SECRET_AFTER = {
    "token": frozenset({"eos", "bos", "pad", "unk", "sep", "cls", "mask", "stop", "start",
                        "end", "special", "image", "audio", "video", *PAGING_WORDS}),
    "key": frozenset({"cache", "idempotency", "partition", "sort", "primary", "foreign",
                      "object", "routing", "dedup", "dedupe", "group", "public", "lookup",
                      "hash", "row", "column", "field", "map"}),
    "signature": frozenset({"thought", "function", "method", "tool", "type"}),
}  # fmt: skip
# Words after a credential word that make the name describe the credential, not hold it:
# ``token_type`` ("Bearer", which OAuth clients check), ``auth_uri``, ``expires_in`` ...
DESCRIPTOR_WORDS = frozenset(
    {
        "type", "types", "kind", "name", "names", "url", "uri", "uris", "endpoint",
        "count", "counts", "limit", "limits", "len", "length", "usage", "expiry",
        "expires", "expire", "expiration", "expired", "ttl", "format", "version",
        "method", "hint", "strs", "budget", "ids", "prefix", "scheme", "mode",
        "logprob", "logprobs", "offset", "offsets",
    }
)  # fmt: skip
# OAuth fields that carry a credential without a credential word: only in query
# strings and form-encoded bodies (in a JSON body ``code`` is a code interpreter's).
OAUTH_FIELDS = frozenset(
    {"code", "code_verifier", "assertion", "client_assertion", "device_code", "otp"}
)

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SEPARATORS = re.compile(r"[^A-Za-z0-9]+")


def name_words(name: str) -> list[str]:
    """``"X-Amz-Signature"`` -> ``["x", "amz", "signature"]``; camelCase split too."""
    return [w.lower() for part in _SEPARATORS.split(name) for w in _WORD.findall(part)]


def _credential_word(word: str) -> str | None:
    if word in CREDENTIAL_WORDS:
        return word
    for base in ("key", "token", "secret", "password", "passwd", "signature", "credentials",
                 "jwt"):  # fmt: skip
        if word.endswith(base) and word[: -len(base)] in COMPOUND_PREFIXES:
            return base
    return None


@functools.lru_cache(maxsize=4096)
def is_credential_name(name: str) -> bool:
    """Whether a header, query parameter or body field of this name holds a credential."""
    words = name_words(name)
    for i, word in enumerate(words):
        base = _credential_word(word)
        if base is None:
            continue
        if i > 0 and words[i - 1] in NOT_SECRET_AFTER.get(base, ()):
            continue
        if i + 1 < len(words) and words[i + 1] in DESCRIPTOR_WORDS:
            continue
        return True
    return False


def is_secret_header(name: str) -> bool:
    return name.lower() in SECRET_HEADERS or is_credential_name(name)


# Bearer tokens (also URL-encoded) and well-known key formats: sk-/rk-/pk- (OpenAI,
# Anthropic, ...), hf_ (Hugging Face), gsk_ (Groq), AIza (Google).
_SECRET_IN_TEXT = re.compile(
    r"(?i)(bearer(?:\s+|%20|\+))[A-Za-z0-9._~+/=-]+"
    r"|\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}"
    r"|\b(?:hf_[A-Za-z0-9]{30,}|gsk_[A-Za-z0-9]{20,}|AIza[A-Za-z0-9_-]{30,})"
)


def wire_text(text: str) -> str:
    """Text as a URL parser reading its bytes with ``errors="replace"`` sees it.

    mitmproxy decodes a request line's non-UTF-8 bytes as lone surrogates
    (``surrogateescape``); a cassette's URL cannot hold them (JSON and ``urlencode`` want
    UTF-8), so both sides of the key use U+FFFD where the wire had a bad byte.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "replace")


def is_secret_query_param(name: str) -> bool:
    return is_credential_name(name) or name.lower() in OAUTH_FIELDS


def keyed_query(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Query parameters that take part in the request key: all but credentials.

    Values are redacted as ``redact_url`` writes them, so the key of a live request is
    the key of its cassette.
    """
    return [
        (wire_text(k), redact_text(wire_text(v))) for k, v in pairs if not is_secret_query_param(k)
    ]


def redact_text(text: str) -> str:
    return _SECRET_IN_TEXT.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def redact_path(path: str) -> str:
    """A URL path with keys redacted segment by segment: a token never eats a ``/``."""
    if _SECRET_IN_TEXT.search(path) is None:
        return path  # no segment can hold one either (the common case: one C call)
    return "/".join(redact_text(segment) for segment in path.split("/"))


def _not_secret_here(parent: dict[str, Any], name: str) -> bool:
    """Shapes where a credential word names data, not a credential."""
    if name == "token" and "logprob" in parent:
        return True  # a logprobs entry: {"token": "Hello", "logprob": -0.1, ...}
    if name == "key" and "value" in parent:
        return True  # a key/value pair: {"key": "region", "value": "us"} (filters, tags)
    if name == "signature" and "type" in parent:
        # A thought's signature (Anthropic thinking blocks and signature_delta, Gemini
        # interactions' thought outputs): an opaque blob the client sends back verbatim.
        return True
    return False


# Header lists carried in a body (MCP server configs, tool definitions, webhook specs):
# ``[["Authorization", "Bearer ..."]]`` and ``[{"name": "X-Api-Key", "value": "..."}]``.
# The value of a pair whose name is a credential header name is a credential.
_PAIR_NAMES = ("name", "key", "header")


def _named_pair_secret(value: dict[str, Any]) -> bool:
    """``{"name": "X-Api-Key", "value": ...}``: a header given as a name/value object."""
    if "value" not in value:
        return False
    for field in _PAIR_NAMES:
        name = value.get(field)
        if isinstance(name, str):
            return is_secret_header(name)
    return False


def _pair_list(value: list[Any]) -> bool:
    """``[["Authorization", "Bearer ..."], ...]``: a list of [name, value] pairs."""
    return bool(value) and all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) for v in value
    )


def redact_body(body: Any, extra: frozenset[str] = frozenset()) -> Any:
    """The body with the string values of credential fields replaced by REDACTED.

    A credential field is one whose name ``is_credential_name`` (or is in ``extra``,
    e.g. ``OAUTH_FIELDS`` for a form), at any depth; every string inside a credential
    field's object or list is replaced too (``"credentials": {"value": ...}``). The names
    of a JSON schema's ``properties`` are property names, not fields (a tool may take an
    ``api_key`` argument). Returns ``body`` itself when there is nothing to replace (the
    common case). Free text (a prompt that mentions a key) is data and is left alone.
    """
    return _redact(body, extra, inside=False, schema=False)


# A JSON string followed by a colon: an object's key (JSON has no other place for one).
# Tried at every quote, and a failed try consumes nothing, so no key is missed; a string
# that only looks like a key makes redact_body run, nothing worse.
_JSON_KEY = re.compile(rb'"([^"\\]*+(?:\\.[^"\\]*+)*+)"\s*:')
# Every credential name holds one of these (CREDENTIAL_WORDS, compounds included), in
# ASCII letters: a text without any (and without \u escapes, which could spell one) has
# no credential name at all.
_CREDENTIAL_HINTS = (b"key", b"token", b"secret", b"pass", b"sig", b"credential", b"auth",
                     b"cookie", b"jwt", b"bearer", b"pwd")  # fmt: skip
# A short JSON string: a header name in a header list (``["Authorization", "..."]``,
# ``{"name": "X-Api-Key", ...}``) is a string value, not a key.
_JSON_SHORT_STRING = re.compile(rb'"([A-Za-z0-9_-]{1,64})"')
_PAIR_LIST_START = re.compile(rb'\[\s*\[\s*"')


def names_credentials(raw: bytes) -> bool:
    """Whether a JSON text has a key ``redact_body`` could act on (a credential field's
    name). When not, ``redact_body`` of its value returns it unchanged: a stream's chunk
    is checked on its bytes, not walked (issue 12)."""
    if b"\\u" not in raw:
        lower = raw.lower()
        if not any(hint in lower for hint in _CREDENTIAL_HINTS):
            return False
    if _names_credentials(frozenset(_JSON_KEY.findall(raw))):
        return True
    if b'"value"' not in raw and _PAIR_LIST_START.search(raw) is None:
        return False  # no header list in it (the common case: usage's "tokens" only)
    return _names_headers(frozenset(_JSON_SHORT_STRING.findall(raw)))


@functools.lru_cache(maxsize=1024)
def _names_headers(strings: frozenset[bytes]) -> bool:
    return any(is_secret_header(s.decode("ascii")) for s in strings)


@functools.lru_cache(maxsize=1024)
def _names_credentials(keys: frozenset[bytes]) -> bool:
    for key in keys:
        if b"\\" in key:  # an escaped name: read it the slow way
            return True
        try:
            if is_credential_name(key.decode("utf-8")):
                return True
        except UnicodeDecodeError:
            return True
    return False


_SCALARS = frozenset({int, float, bool, type(None)})


def _redact(value: Any, extra: frozenset[str], inside: bool, schema: bool) -> Any:
    if isinstance(value, str):
        return REDACTED if inside and value != REDACTED else value
    if isinstance(value, dict):
        out: dict[str, Any] | None = None
        pair = not inside and not schema and _named_pair_secret(value)
        for k, v in value.items():
            secret = (
                inside
                or (pair and k == "value")
                or (
                    isinstance(k, str)
                    and not schema
                    and (is_credential_name(k) or k in extra)
                    and not _not_secret_here(value, k)
                )
            )
            if not secret and not isinstance(v, (dict, list)):
                continue
            new = _redact(v, extra, secret, schema=k == "properties" and not schema)
            if new is not v:
                out = dict(value) if out is None else out
                out[k] = new
        return value if out is None else out
    if isinstance(value, list):
        if set(map(type, value)) <= _SCALARS:
            return value  # an embedding: 1,536 floats, checked at C speed
        out_list: list[Any] | None = None
        if not inside and not schema and _pair_list(value):
            for i, (name, v) in enumerate(value):
                if is_secret_header(name) and v != REDACTED:
                    out_list = list(value) if out_list is None else out_list
                    out_list[i] = [name, _redact(v, extra, True, False)]
            if out_list is not None:
                value = out_list
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)) or (inside and isinstance(v, str)):
                new = _redact(v, extra, inside, False)
                if new is not v:
                    out_list = list(value) if out_list is None else out_list
                    out_list[i] = new
        return value if out_list is None else out_list
    return value


def redact_form(fields: Any) -> Any:
    """A form-encoded body's fields with credentials (OAuth's ``code`` too) redacted."""
    return redact_body(fields, OAUTH_FIELDS)


def redact_strings(value: Any) -> Any:
    """Every string in a JSON value with keys and bearer tokens replaced (``redact_text``).

    Used on recorded error answers: a 401 is where an upstream echoes the key it got.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_strings(v) for v in value]
    return value


def redact_url(url: str) -> str:
    """The URL with credential query values and embedded keys replaced by REDACTED."""
    parts = urlsplit(wire_text(url))
    query = urlencode(
        [
            (k, REDACTED if is_secret_query_param(k) else redact_text(v))
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    netloc = parts.netloc.rsplit("@", 1)[-1]  # user:password@host
    return urlunsplit((parts.scheme, netloc, redact_path(parts.path), query, parts.fragment))


def recordable_headers(headers: Mapping[str, str], wanted: Iterable[str]) -> dict[str, str]:
    """The headers the user opted into recording, minus credentials, names lower-cased."""
    names = {n.lower() for n in wanted}
    return {
        k.lower(): redact_text(v)
        for k, v in headers.items()
        if k.lower() in names and not is_secret_header(k)
    }


# ---- the request's own credential values, wherever they show up ------------------------
#
# A credential the request carried (in a header, the query or the body) is looked for in
# everything written for it, the answer included: an upstream echoes the key it got in
# a 401 ("Incorrect API key provided: abc123..."), whatever the key looks like. Values
# that look like placeholders are redacted where they stand but not hunted elsewhere:
# shorter than 8 characters, or under 16 with no digit and one letter case ("EMPTY",
# "ollama", "not-needed"), so a dummy key can never rewrite an answer's text.


def is_huntable(value: str) -> bool:
    """Whether a credential value is distinctive enough to replace inside other text."""
    if len(value) < 8 or value == REDACTED:
        return False
    if len(value) >= 16 or any(c.isdigit() for c in value):
        return True
    return any(c.isupper() for c in value) and any(c.islower() for c in value)


def _header_values(name: str, value: str) -> list[str]:
    """A credential header's value and the credentials inside it."""
    values = [value]
    scheme, _, rest = value.strip().partition(" ")
    if rest and scheme.lower() in ("bearer", "basic", "token", "digest", "apikey", "key"):
        values = [rest.strip()]  # the scheme is no secret: "Bearer EMPTY" is a placeholder
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(rest.strip()).decode().partition(":")
                values += [user, password]
            except (binascii.Error, UnicodeDecodeError, ValueError):
                pass
    if name.lower() in ("cookie", "set-cookie"):
        for crumb in value.split(";"):
            values.append(crumb.partition("=")[2].strip())
    if scheme.upper().startswith("AWS4-"):
        # SigV4: "Credential=AKID/date/region/service/aws4_request, ..., Signature=hex"
        for part in rest.split(","):
            field, _, v = part.strip().partition("=")
            if field == "Credential":
                values.append(v.partition("/")[0])
            elif field == "Signature":
                values.append(v)
    if name.lower() == "sec-websocket-protocol":
        for protocol in value.split(","):
            if protocol.strip().startswith("openai-insecure-api-key."):
                values.append(protocol.strip().removeprefix("openai-insecure-api-key."))
    return values


def _body_values(value: Any, extra: frozenset[str], inside: bool, out: set[str]) -> None:
    if isinstance(value, str):
        if inside:
            out.add(value)
    elif isinstance(value, dict):
        pair = not inside and _named_pair_secret(value)
        if pair and isinstance(value["value"], str):
            name = next(value[f] for f in _PAIR_NAMES if isinstance(value.get(f), str))
            out.update(_header_values(name, value["value"]))  # "Bearer X": X too
        for k, v in value.items():
            secret = (
                inside
                or (pair and k == "value")
                or (
                    isinstance(k, str)
                    and (is_credential_name(k) or k in extra)
                    and not _not_secret_here(value, k)
                )
            )
            if secret or isinstance(v, (dict, list)):
                _body_values(v, extra, secret, out)
    elif isinstance(value, list):
        pairs = not inside and _pair_list(value)
        for v in value:
            if pairs and is_secret_header(v[0]):
                if isinstance(v[1], str):
                    out.update(_header_values(v[0], v[1]))  # "Bearer X": X too
                _body_values(v[1], extra, True, out)
            else:
                _body_values(v, extra, inside, out)


def request_secrets(
    headers: Iterable[tuple[str, str]],
    query: Iterable[tuple[str, str]],
    body: Any,
    form: bool = False,
) -> frozenset[str]:
    """The distinctive credential values a request carried, longest first when sorted."""
    found: set[str] = set()
    for name, value in headers:
        if is_secret_header(name):
            found.update(_header_values(name, value))
    for name, value in query:
        if is_secret_query_param(name):
            found.add(value)
    _body_values(body, OAUTH_FIELDS if form else frozenset(), False, found)
    return frozenset(v for v in found if is_huntable(v))


def _variants(secrets: frozenset[str]) -> list[str]:
    """Each secret as it may appear: as sent, and percent-encoded (in a URL)."""
    out = set(secrets) | {quote(s, safe="") for s in secrets} | {quote_plus(s) for s in secrets}
    return sorted(out, key=len, reverse=True)


def scrub(value: Any, secrets: frozenset[str]) -> Any:
    """``value`` (a JSON value or a string) with every secret replaced by REDACTED.

    Returns ``value`` itself when no secret occurs in it.
    """
    if not secrets:
        return value
    return _scrub(value, _variants(secrets))


def _scrub(value: Any, needles: list[str]) -> Any:
    if isinstance(value, str):
        for needle in needles:
            if needle in value:
                value = value.replace(needle, REDACTED)
        return value
    if isinstance(value, dict):
        out: dict[str, Any] | None = None
        for k, v in value.items():
            new = _scrub(v, needles)
            if new is not v:
                out = dict(value) if out is None else out
                out[k] = new
        return value if out is None else out
    if isinstance(value, list):
        if set(map(type, value)) <= _SCALARS:
            return value
        out_list: list[Any] | None = None
        for i, v in enumerate(value):
            if isinstance(v, (str, dict, list)):
                new = _scrub(v, needles)
                if new is not v:
                    out_list = list(value) if out_list is None else out_list
                    out_list[i] = new
        return value if out_list is None else out_list
    return value


def _strings_in(value: Any, path: tuple[Any, ...], out: list[tuple[tuple[Any, ...], str]]) -> None:
    if isinstance(value, str):
        out.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _strings_in(v, (*path, k), out)
    elif isinstance(value, list) and not set(map(type, value)) <= _SCALARS:
        for i, v in enumerate(value):
            _strings_in(v, (*path, i), out)


def _replaced(value: Any, path: tuple[Any, ...], new: str) -> Any:
    """``value`` with the string at ``path`` replaced, containers copied along the way."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replaced(value[head], rest, new)
    return copy


def _spans(text: str, needles: list[str]) -> list[tuple[int, int]]:
    """Where the needles (longest first) occur in ``text``, without overlaps, in order."""
    spans: list[tuple[int, int]] = []
    for needle in needles:
        at = text.find(needle)
        while at >= 0:
            end = at + len(needle)
            if all(end <= s or at >= e for s, e in spans):
                spans.append((at, end))
            at = text.find(needle, end)
    return sorted(spans)


def scrub_stream(chunks: list[Any], secrets: frozenset[str]) -> list[Any]:
    """A stream's chunks with secrets replaced even when split across chunks.

    An upstream that echoes a key streams it in pieces (``"AUTHO"``, ``"RIZATION..."``
    in consecutive ``delta.content``): the strings at the same place in every chunk are
    read as one text, and a secret found in it becomes REDACTED in the chunk where it
    starts and is removed from the chunks it continues into.
    """
    if not secrets or len(chunks) < 2:
        return chunks
    needles = _variants(secrets)
    groups: dict[tuple[Any, ...], list[tuple[int, str]]] = {}
    for i, chunk in enumerate(chunks):
        found: list[tuple[tuple[Any, ...], str]] = []
        _strings_in(chunk, (), found)
        for path, text in found:
            groups.setdefault(path, []).append((i, text))
    out = list(chunks)
    for path, pieces in groups.items():
        joined = "".join(text for _, text in pieces)
        spans = _spans(joined, needles) if len(pieces) > 1 else []
        offset = 0
        for i, text in pieces:
            start, end = offset, offset + len(text)
            offset = end
            kept, pos = [], start
            for s, e in spans:
                if e <= start or s >= end:
                    continue
                kept.append(joined[pos : max(s, start)])
                if s >= start:
                    kept.append(REDACTED)
                pos = min(e, end)
            kept.append(joined[pos:end])
            new = "".join(kept)
            if new != text:
                out[i] = _replaced(out[i], path, new)
    return chunks if all(a is b for a, b in zip(out, chunks, strict=True)) else out


class SplitSecretWatch:
    """Whether ``scrub_stream`` would change a stream, seen a batch of chunks at a time.

    For a stream written as it passes (``spool.py``), whose chunks are not kept: the
    strings at each place in every chunk, read as one text (as ``scrub_stream`` reads
    them), are searched for the secrets; only the last characters of each text are kept
    between batches, as many as a secret split across batches could start with.
    ``found`` is set on any occurrence (then the stream is scrubbed the ordinary way).
    """

    def __init__(self, secrets: frozenset[str]) -> None:
        self.needles = _variants(secrets) if secrets else []
        self._keep = max((len(n) for n in self.needles), default=1) - 1
        self._tails: dict[tuple[Any, ...], str] = {}
        self.found = False

    def add(self, chunks: list[Any]) -> None:
        if not self.needles or self.found:
            return
        texts: dict[tuple[Any, ...], list[str]] = {}
        for chunk in chunks:
            found: list[tuple[tuple[Any, ...], str]] = []
            _strings_in(chunk, (), found)
            for path, text in found:
                texts.setdefault(path, []).append(text)
        for path, pieces in texts.items():
            joined = self._tails.get(path, "") + "".join(pieces)
            if any(needle in joined for needle in self.needles):
                self.found = True
                return
            self._tails[path] = joined[len(joined) - self._keep :] if self._keep else ""


def scrub_lines(lines: list[str], secrets: frozenset[str]) -> list[str]:
    """``scrub_stream`` for a raw stream kept as its SSE lines (``data: {...}``): the JSON
    of the data lines is read as the chunks, and a changed line is written back in the
    same JSON style (compact or not); other lines stay as they are."""
    found: list[tuple[int, str, Any]] = []
    for i, line in enumerate(lines):
        if isinstance(line, str) and line.startswith("data:"):
            payload = line[5:].lstrip()
            if payload[:1] in ("{", "["):
                try:
                    found.append((i, payload, json.loads(payload)))
                except ValueError:
                    pass
    chunks = [obj for _, _, obj in found]
    scrubbed = scrub_stream(chunks, secrets)
    if scrubbed is chunks:
        return lines
    out = list(lines)
    for (i, payload, old), new in zip(found, scrubbed, strict=True):
        if new is not old:
            compact = json.dumps(old, separators=(",", ":"), ensure_ascii=False) == payload
            text = json.dumps(new, separators=(",", ":") if compact else None, ensure_ascii=False)
            out[i] = lines[i][: len(lines[i]) - len(payload)] + text
    return out


def redact_answer(
    response: dict[str, Any], secrets: frozenset[str], raw: bytes | None = None
) -> dict[str, Any]:
    """A recorded response half with credentials out: credential fields by name (a token
    exchange's ``access_token``, ``refresh_token``, ``id_token``) and the request's own
    credential values anywhere (an upstream's echo). The client that replays it gets
    ``REDACTED`` as its token, sends it back as ``Bearer REDACTED``, and that request
    keys as the recorded one did (headers are not keyed; bodies are redacted alike).

    ``raw``: the answer's bytes as they came (decoded), which the body was read from.
    When they name no credential field (``names_credentials``), the body is not walked:
    that walk was most of a small stream's recording time (issue 12)."""
    if raw is None or names_credentials(raw) or not _clean_shell(response):
        response = redact_body(response)
    response = scrub(response, secrets)
    body = response.get("body")
    if response.get("is_streaming") and isinstance(body, list) and secrets:
        lines = all(isinstance(line, str) for line in body)
        chunks = scrub_lines(body, secrets) if lines else scrub_stream(body, secrets)
        if chunks is not body:
            response = {**response, "body": chunks}
    return response


def _clean_shell(response: dict[str, Any]) -> bool:
    """Whether the response half without its body has nothing for redact_body."""
    shell = {k: v for k, v in response.items() if k != "body"}
    return redact_body(shell) is shell


# ---- log lines ---------------------------------------------------------------------------
#
# Every line the proxy logs is redacted as a cassette is. A request's path is shown as
# its cassette would hold it (``shown_path``: keys in segments, and the request's own
# credential values, e.g. an Azure ``api-key`` that a gateway also takes in the path);
# and every line, whoever logs it, passes ``redact_line`` on its way out (``LineFilter``).

# ``name=value`` where a URL or a line holds one (``?api-key=...``, ``;key=...``).
_NAMED_VALUE = re.compile(r"(?<![A-Za-z0-9_-])([A-Za-z][A-Za-z0-9_.-]{0,63})=([^\s&;/#,'\"]+)")


def redact_line(text: str) -> str:
    """A log line with keys in text and credential ``name=value`` pairs redacted."""
    text = redact_text(text)
    if "=" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if not is_secret_query_param(name) or m.group(2) == REDACTED:
            return m.group(0)
        return f"{name}={REDACTED}"

    return _NAMED_VALUE.sub(one, text)


class LineFilter(logging.Filter):
    """Passes every record's text through ``redact_line`` (a filter never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad record is logging's to report
            return True
        clean = redact_line(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_LINE_FILTER = LineFilter()
_OUR_LOGGERS = ("cassette_proxy", "cassette_proxy.fallback", "cassette_proxy.pacing",
                "cassette_proxy.store", "cassette_proxy.index_cache")  # fmt: skip


def guard_log_lines() -> None:
    """Put ``LineFilter`` on our loggers and on every handler the root logger has now
    (mitmproxy's terminal log: its own lines too). Idempotent."""
    for name in _OUR_LOGGERS:
        logger = logging.getLogger(name)
        if _LINE_FILTER not in logger.filters:
            logger.addFilter(_LINE_FILTER)
    for handler in logging.getLogger().handlers:
        if _LINE_FILTER not in handler.filters:
            handler.addFilter(_LINE_FILTER)
