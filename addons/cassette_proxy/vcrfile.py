"""VCR.py cassettes (also pytest-recording's, which are VCR.py's) as mitmproxy flows, for
``cassette-proxy import``.

A VCR.py cassette is a YAML or JSON document::

    version: 1
    interactions:
    - request:  {method, uri, body, headers: {Name: [value, ...]}}
      response: {status: {code, message}, headers: {Name: [value, ...]},
                 body: {string: <text or bytes>}}

Bodies are text, or bytes where they are not UTF-8 (YAML's ``!!binary``; a compressed
answer is kept compressed, its ``Content-Encoding`` header beside it). Older files wrote
strings as ``!!python/str`` / ``!!python/unicode`` and tuples as ``!!python/tuple``:
those are read as what they are; any other ``!!python/...`` tag is refused, never run.

Each interaction becomes one flow, in order, so the importer records it exactly as the
proxy would have: same families (SSE and NDJSON answers split into chunks), same names,
same redaction, repeated requests as sequences.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

from mitmproxy import connection, http
from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import YAMLError

YAML_SUFFIXES = (".yaml", ".yml")
_JSON_HEAD = re.compile(r'\{\s*"(version|interactions)"\s*:')


class VCRFormatError(ValueError):
    """The file is a VCR.py cassette that cannot be read; the message says where."""


def looks_like_vcr(source: Path, head: bytes) -> bool:
    """A VCR.py cassette by its name or first bytes (a HAR or flow file is not)."""
    if source.suffix.lower() in YAML_SUFFIXES:
        return True
    text = head.lstrip().decode("utf-8", "replace")
    if text.startswith(("interactions:", "version:", "---")):
        return True
    # VCR.py's JSON opens with "version" (or "interactions"); a HAR file with "log".
    return _JSON_HEAD.match(text) is not None


class _Constructor(SafeConstructor):
    """YAML's safe types plus the harmless Python tags old VCR.py files hold."""


def _python_str(loader: SafeConstructor, node: Any) -> Any:
    return loader.construct_scalar(node)


def _python_tuple(loader: SafeConstructor, node: Any) -> Any:
    return list(loader.construct_sequence(node))


for _tag in ("python/str", "python/unicode"):
    _Constructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _python_str)
_Constructor.add_constructor("tag:yaml.org,2002:python/tuple", _python_tuple)


def load_document(source: Path) -> Any:
    """The parsed document (YAML is a superset of JSON, but JSON is read as JSON)."""
    raw = source.read_bytes()
    if raw.lstrip().startswith(b"{"):
        try:
            return json.loads(raw)
        except ValueError as e:
            raise VCRFormatError(f"not valid JSON: {e}") from None
    yaml = YAML(typ="safe", pure=True)
    yaml.Constructor = _Constructor
    try:
        return yaml.load(io.BytesIO(raw))
    except YAMLError as e:
        reason = " ".join(str(e).split())
        raise VCRFormatError(f"not a VCR.py cassette (YAML: {reason})") from None


def read_vcr(source: Path) -> list[http.HTTPFlow]:
    """Every interaction of a VCR.py cassette as a flow; VCRFormatError says what is wrong."""
    document = load_document(source)
    if not isinstance(document, dict) or not isinstance(document.get("interactions"), list):
        raise VCRFormatError("not a VCR.py cassette (no list of interactions)")
    flows = []
    for n, interaction in enumerate(document["interactions"], start=1):
        try:
            flows.append(flow_of(interaction))
        except (KeyError, TypeError, ValueError) as e:
            raise VCRFormatError(f"interaction {n}: {e}") from None
    return flows


def flow_of(interaction: Any) -> http.HTTPFlow:
    if not isinstance(interaction, dict):
        raise ValueError("not a mapping")
    req, resp = interaction.get("request"), interaction.get("response")
    if not isinstance(req, dict) or not isinstance(resp, dict):
        raise ValueError("no request or no response")
    method, uri = req.get("method"), req.get("uri")
    if not isinstance(method, str) or not isinstance(uri, str) or "://" not in uri:
        raise ValueError("the request has no method or no absolute uri")
    request = http.Request.make(method.upper(), uri, b"", header_pairs(req.get("headers")))
    _set_body(request, body_bytes(req.get("body")))
    status = resp.get("status")
    code = status.get("code") if isinstance(status, dict) else status
    if not isinstance(code, int) or isinstance(code, bool):
        raise ValueError("the response has no status code")
    response = http.Response.make(code, b"", header_pairs(resp.get("headers")))
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        response.reason = status["message"]
    _set_body(response, body_bytes(resp.get("body")))
    now = time.time()
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0))
    server = connection.Server(address=(request.host, request.port))
    flow = http.HTTPFlow(client, server)
    request.timestamp_start = request.timestamp_end = now
    response.timestamp_start = response.timestamp_end = now
    flow.request, flow.response = request, response
    return flow


def _set_body(message: http.Message, raw: bytes) -> None:
    """The body as recorded (still compressed if it was), its length told truly."""
    message.raw_content = raw
    if "transfer-encoding" not in message.headers:
        message.headers["content-length"] = str(len(raw))


def body_bytes(body: Any) -> bytes:
    """A request's ``body`` (text, bytes or null) or a response's ``{string: ...}``."""
    if isinstance(body, dict):
        body = body.get("string")
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    raise ValueError(f"a body of type {type(body).__name__}")


def header_pairs(headers: Any) -> list[tuple[bytes, bytes]]:
    """``{Name: [value, ...]}`` (or ``{Name: value}``) as header fields, in order."""
    if headers is None:
        return []
    if not isinstance(headers, dict):
        raise ValueError("headers are not a mapping")
    pairs = []
    for name, values in headers.items():
        for value in values if isinstance(values, list) else [values]:
            if value is None:  # a header VCR.py's filter_headers emptied: not sent
                continue
            pairs.append((str(name).encode("latin-1"), str(value).encode("latin-1", "replace")))
    return pairs
