"""A big stream's cassette written as the stream passes (spool.py, issue 12): the file is
byte for byte the one the whole-cassette writer writes (``json.dumps(indent=2) + "\\n"``),
however the chunks are cut into batches; and what the spool cannot be sure of (secrets
split across chunks) is left to the ordinary writer.

The proxy-level tests (a real mitmdump, a real upstream, the openai SDK) are in
tests/test_big_recordings.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cassette_proxy.cassette import (
    TEMP_PREFIX,
    Cassette,
    CassetteError,
    FiniteList,
    read_cassette,
    write_cassette,
)
from cassette_proxy.redact import SplitSecretWatch, scrub_stream
from cassette_proxy.spool import PLACEHOLDER, SpoolError, StreamSpool, chunk_block, split_around
from cassette_proxy.streams import json_payload
from hypothesis import given, settings
from hypothesis import strategies as st

FIXTURES = Path(__file__).parent / "fixtures"

TEXT = st.text(st.characters(codec=None, exclude_categories=("Cs",)), max_size=12)
NUMBERS = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-1e-3, max_value=1e-3)  # json writes these as 1e-05
    | st.sampled_from([-0.0, 1.0, 1e16, 1e-4, 1e-5, 5e-324])
)
LEAVES = st.none() | st.booleans() | NUMBERS | TEXT | st.sampled_from(["0.00001", '": 1e-05'])
JSON = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=20,
)


def stream_cassettes() -> list[Path]:
    """Recorded streams (a list of typed chunks) among the fixtures."""
    found = []
    for path in sorted(FIXTURES.rglob("*.json")):
        doc = json.loads(path.read_text())
        body = doc.get("response", {}).get("body")
        if doc["response"].get("is_streaming") and isinstance(body, list) and len(body) > 1:
            if all(isinstance(c, dict) for c in body):
                found.append(path)
    return found


def spooled_text(tmp_path: Path, cassette: Cassette, batches: list[list[Any]]) -> bytes:
    """The file the spool writes for ``cassette`` whose chunks come in ``batches``."""
    doc = cassette.model_dump(exclude_unset=True)
    doc["response"]["body"] = [PLACEHOLDER]
    head, indent, tail = split_around(Cassette.model_validate(doc).to_json_bytes())
    spool = StreamSpool(tmp_path, head, indent)
    for batch in batches:
        spool.add(batch)
    target = tmp_path / "spooled.json"
    spool.finish(tail, target)
    return target.read_bytes()


def cut(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    """``items`` in consecutive batches of the given sizes (the last takes the rest)."""
    batches, at = [], 0
    for size in sizes:
        if at >= len(items):
            break
        batches.append(items[at : at + size])
        at += size
    if at < len(items):
        batches.append(items[at:])
    return batches


def test_there_are_stream_cassettes_to_compare():
    assert len(stream_cassettes()) >= 5


@pytest.mark.parametrize("path", stream_cassettes(), ids=lambda p: p.name[:40])
@pytest.mark.parametrize("sizes", [[1], [2, 3], [1000]], ids=["ones", "twos-threes", "one"])
def test_a_spooled_stream_is_the_whole_cassette_writer_s_file(tmp_path, path, sizes):
    cassette = read_cassette(path)
    chunks = cassette.response.body
    # The chunks as the recorder has them: read by orjson from their wire JSON.
    read = [json_payload(json.dumps(c).encode())[0] for c in chunks]
    batches = cut(read, sizes * len(read))
    got = spooled_text(tmp_path, cassette, batches)
    old = tmp_path / "whole.json"
    write_cassette(old, cassette, durable=False)
    assert got == old.read_bytes()
    want = json.dumps(cassette.model_dump(exclude_unset=True), indent=2) + "\n"
    assert got == want.encode("ascii")
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))  # the temp file was renamed


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.dictionaries(TEXT, JSON, max_size=4), min_size=1, max_size=8),
    st.lists(st.integers(1, 4), min_size=1, max_size=8),
    st.booleans(),
)
def test_spooled_text_is_json_dumps_for_any_chunks(tmp_path_factory, datas, sizes, timed):
    tmp = tmp_path_factory.mktemp("spool")
    chunks = [{"__type__": "openai.types.chat.chat_completion_chunk.ChatCompletionChunk",
               "__data__": d} for d in datas]  # fmt: skip
    response: dict[str, Any] = {"body": chunks, "is_streaming": True}
    if timed:
        response["timing"] = {"chunks_ms": [0.5, 1e-05], "total_ms": 3}
    doc = {
        "test_id": "t\u00e9st",
        "request": {"method": "POST", "url": "http://h/v1/chat/completions", "headers": {},
                    "body": {"model": "m", "stream": True, "x": "\U0001f600"},
                    "endpoint": "/v1/chat/completions", "model": "m"},
        "response": response,
        "id_normalization_mapping": {},
    }  # fmt: skip
    cassette = Cassette.model_validate(doc)
    got = spooled_text(tmp, cassette, cut(chunks, sizes))
    assert got == (json.dumps(doc, indent=2) + "\n").encode("ascii")


def test_chunk_block_moves_each_line_to_the_list_s_depth():
    block = chunk_block([{"a": [1, {}]}, {"b": "\u00e9"}], b"      ")
    assert block == (
        b'      {\n        "a": [\n          1,\n          {}\n        ]\n      },\n'
        b'      {\n        "b": "\\u00e9"\n      }'
    )


def test_split_around_refuses_a_text_without_the_placeholder_in_a_list():
    with pytest.raises(SpoolError):
        split_around(b'{\n  "body": "x"\n}\n')
    with pytest.raises(SpoolError):
        split_around(f'{{\n  "body": "{PLACEHOLDER}"\n}}\n'.encode())


def test_a_discarded_spool_leaves_no_temp_file(tmp_path):
    spool = StreamSpool(tmp_path, b'{\n  "body": [\n', b"    ")
    spool.add([{"a": 1}])
    assert len(list(tmp_path.glob(f"{TEMP_PREFIX}*.partial"))) == 1
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_spool_dropped_unfinished_removes_its_temp_file(tmp_path):
    spool = StreamSpool(tmp_path, b'{\n  "body": [\n', b"    ")
    spool.add([{"a": 1}])
    del spool  # a flow gone without its hooks
    assert list(tmp_path.iterdir()) == []


def test_a_spool_over_the_cassette_limit_gives_up_and_cleans_up(tmp_path, monkeypatch):
    import cassette_proxy.spool as spool_module

    monkeypatch.setattr(spool_module, "MAX_CASSETTE_BYTES", 200)
    spool = StreamSpool(tmp_path, b'{\n  "body": [\n', b"    ")
    with pytest.raises(CassetteError):
        spool.add([{"text": "x" * 300}])
    assert list(tmp_path.iterdir()) == []


def test_split_secret_watch_sees_what_scrub_stream_would_change():
    secret = "sk-abcdefgh12345678"
    pieces = ["Your key is sk-abc", "defgh1234", "5678, keep it"]
    chunks = [{"__data__": {"choices": [{"delta": {"content": p}}]}} for p in pieces]
    assert scrub_stream(chunks, frozenset({secret})) != chunks
    for sizes in ([1], [2], [3]):
        watch = SplitSecretWatch(frozenset({secret}))
        for batch in cut(chunks, sizes * 3):
            watch.add(batch)
        assert watch.found
    clean = [{"__data__": {"choices": [{"delta": {"content": p}}]}} for p in ["a", "b", "c"]]
    watch = SplitSecretWatch(frozenset({secret}))
    for batch in cut(clean, [1, 1, 1]):
        watch.add(batch)
    assert not watch.found
    assert scrub_stream(clean, frozenset({secret})) == clean


def test_a_finite_list_of_chunks_skips_the_nan_walk_but_not_the_bytes():
    # chunk_block relies on FiniteList: the chunks were read by orjson (no NaN).
    assert chunk_block(FiniteList([{"x": 1e-7}]), b"  ") == b'  {\n    "x": 1e-07\n  }'


KEYS = st.sampled_from(["id", "content", "api_key", "token", "prompt_tokens", "logprob",
                        "Authorization", "x-api-key", "keywords", "pass", "caf\u00e9"])  # fmt: skip
OBJECTS = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(KEYS | TEXT, kids, max_size=3),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(OBJECTS, st.booleans())
def test_a_chunk_without_credential_names_is_left_alone_by_redact_body(obj, ascii_only):
    from cassette_proxy.redact import names_credentials, redact_body

    raw = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if not names_credentials(raw):
        assert redact_body(obj) is obj
        assert redact_body([{"__type__": "t", "__data__": obj}])[0]["__data__"] is obj


def test_names_credentials_sees_a_credential_key_however_it_is_written():
    from cassette_proxy.redact import names_credentials

    assert names_credentials(b'{"api_key": "x"}')
    assert names_credentials(b'{"a": {"Authorization": "x"}}')
    assert names_credentials(b'{"\\u0061pi_key": "x"}')  # escaped: read the slow way
    assert not names_credentials(b'{"id": "x", "content": "my api_key\\": 1"}')
    assert not names_credentials(b'{"usage": {"prompt_tokens": 1}}')  # plural: a count
