"""``cassette-proxy import``: mitmproxy flow files, HAR files and VCR.py cassettes into
cassettes.

Each interaction goes through the same families and the same naming as a live
recording (``recording.interaction``), so importing traffic captured with plain
mitmdump, a browser or any HAR-writing tool gives the cassettes the proxy would have
written had it seen that traffic.
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import exceptions, http
from mitmproxy.io import FlowReader

from .answers import FILE_HEADER, MISS_HEADER
from .bodies import NotKeyable, keyed_parts, written_secrets
from .cassette import Cassette, CassetteError, NotJSONError, write_cassette
from .families import NotRecordable, classify
from .plan import TEST_ID_HEADER
from .recording import interaction, whole_response
from .redact import redact_url
from .sequence import first_path, position_of, sibling_path
from .store import live_key
from .streams import STREAM_TYPES
from .vcrfile import looks_like_vcr, read_vcr


def read_flows(source: Path) -> list[http.HTTPFlow]:
    """Every HTTP flow in a ``mitmdump -w`` file, a HAR file (mitmproxy reads both) or a
    VCR.py / pytest-recording cassette (YAML or JSON).

    Raises ValueError with a one-line reason when the file is none of them.
    """
    try:
        with source.open("rb") as f:
            head = f.read(4096)
            if looks_like_vcr(source, head):
                return read_vcr(source)
            f.seek(0)
            flows = list(FlowReader(f).stream())
    except exceptions.FlowReadException as e:
        raise ValueError(
            f"not a mitmproxy flow file, a HAR file or a VCR.py cassette ({e})"
        ) from None
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror or e}") from None
    return [f for f in flows if isinstance(f, http.HTTPFlow)]


@dataclass
class ImportResult:
    written: list[Path] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # stale later answers of a sequence


def import_flows(
    flows: Iterable[http.HTTPFlow],
    cassette_dir: Path,
    *,
    test_id: str | None = None,
    record_headers: list[str] | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Write a cassette for each flow, in order.

    The same request more than once is a sequence, as a live recording run keeps it:
    the first answer in ``<h>.json``, the n-th in ``<h>.<n>.json``. A sequence already
    on disk is left alone unless ``overwrite``; then the whole of it is replaced and no
    later answer of the old one is left behind.
    """
    result = ImportResult()
    sequences: dict[Path, list[Cassette]] = {}
    for flow in flows:
        try:
            made = cassette_of(flow, cassette_dir, test_id, record_headers or [])
        except NotRecordable as e:
            result.skipped[str(e)] += 1
            continue
        path, cassette = made
        if path.exists() and not overwrite:
            result.skipped["already recorded (use --overwrite)"] += 1
            continue
        sequences.setdefault(path, []).append(cassette)
    for first, answers in sequences.items():
        write_sequence(first, answers, result)
    return result


def write_sequence(first: Path, answers: list[Cassette], result: ImportResult) -> None:
    """One request's answers, in order, as a sequence; what an older sequence held past
    them is removed only once the new one is wholly written."""
    if position_of(sibling_path(first, 2)) != 2:
        answers = answers[-1:]  # a name that cannot start a sequence: the last answer wins
    old_later = [p for p in later_answers(first) if position_of(p) > len(answers)]
    for position, cassette in enumerate(answers, start=1):
        path = sibling_path(first, position)
        try:
            write_cassette(path, cassette)
        except OSError as e:
            result.failed.append(f"{path}: {e.strerror or e}")
            return
        except NotJSONError as e:  # never a file that is not JSON
            result.skipped[f"not valid JSON: {e}"] += 1
            return
        except CassetteError as e:  # over the size a cassette may hold
            result.failed.append(str(e))
            return
        result.written.append(path)
    for stale in old_later:
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            result.failed.append(f"{stale}: cannot remove a stale later answer: {e.strerror or e}")
            continue
        result.removed.append(stale)


def later_answers(first: Path) -> list[Path]:
    """The files of the later answers on disk of the sequence that starts at ``first``."""
    stem = first.name.removesuffix(".json")
    if not first.parent.is_dir():
        return []
    found = first.parent.glob(f"{glob.escape(stem)}.*.json")
    return sorted((p for p in found if first_path(p) == first), key=position_of)


def cassette_of(
    flow: http.HTTPFlow, root: Path, test_id: str | None, record_headers: list[str]
) -> tuple[Path, Cassette]:
    """The cassette for one flow and its path; NotRecordable says why there is none."""
    request, response = flow.request, flow.response
    if response is None:
        raise NotRecordable("no response")
    if FILE_HEADER in response.headers or MISS_HEADER in response.headers:
        raise NotRecordable("answered by cassette-proxy itself")
    # The body, path and secrets exactly as the proxy takes them (bodies.py).
    content = (request.get_content(strict=False) or b"") if request.raw_content else b""
    content_type = request.headers.get("content-type", "")
    try:
        parts = keyed_parts(
            request.headers.items(multi=True),
            request.path.split("?", 1)[0],
            request.query.items(multi=True),
            content_type,
            content,
        )
    except NotKeyable as e:
        raise NotRecordable(f"request {e}") from None
    secrets, marker = written_secrets(
        request.headers.items(multi=True), request.query.items(multi=True), content_type, content
    )
    body: Any = parts.body
    path = parts.path
    method = request.method.upper()
    family = classify(method, path)
    status = response.status_code
    content_type = response.headers.get("content-type", "").lower()
    if content_type.startswith(STREAM_TYPES):
        if not 200 <= status < 300:
            raise NotRecordable(f"upstream answered {status}")
        if response.raw_content is None:
            raise NotRecordable("streamed body not kept (capture with store_streamed_bodies=true)")
        recorder = family.stream_recorder(path, body, content_type)
        recorder.feed(response.get_content(strict=False) or b"")
        half = recorder.response(clean_end=flow.error is None)
    else:
        try:
            data = json.loads(response.get_content(strict=False) or b"")
        except (ValueError, UnicodeDecodeError):
            raise NotRecordable("answer is not JSON") from None
        half = whole_response(family, path, body, status, data)
    scoped = test_id if test_id is not None else request.headers.get(TEST_ID_HEADER)
    headers = {k: v for k, v in request.headers.items() if k.lower() != TEST_ID_HEADER}
    # The request as the proxy's key sees it, then the one way an interaction becomes a
    # cassette (recording.interaction), as the proxy writes it.
    _, path, body, _ = live_key(method, path, body, parts.query)
    return interaction(
        root,
        method=method,
        path=path,
        body=body,
        test_id=scoped,
        url=redact_url(request.pretty_url),
        request_headers=headers,
        record_headers=record_headers,
        marker=marker,
        secrets=secrets,
        response=half,
    )
