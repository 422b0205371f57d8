"""The recording hot path (issue 12): the fast cassette text is byte for byte what
``json.dumps(indent=2)`` writes, and the bytes-level stream recorders record what the
text-level framing recorded, however the stream is cut into reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from cassette_proxy.cassette import Cassette, dumps_indented, plain, read_cassette
from cassette_proxy.families import NotRecordable
from cassette_proxy.families.ollama import CHAT, NDJSONRecorder, _done
from cassette_proxy.families.openai import CHAT_CHUNK, SSEChunkRecorder
from cassette_proxy.streams import SSEFramer, json_payload, sse_data
from hypothesis import given, settings
from hypothesis import strategies as st

FIXTURES = Path(__file__).parent / "fixtures"
SEED = Path(__file__).parent.parent / "cassettes"

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-1e-3, max_value=1e-3)  # json writes these as 1e-05
    | st.sampled_from([-0.0, 1.0, 1e16, 1e-4, 1e-5, 5e-324, 2**63, 2**64 - 1, 2**64])
)
LEAVES = st.none() | st.booleans() | NUMBERS | TEXT | st.sampled_from(["0.00001", '": 1e-05'])
JSON = st.recursive(
    LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=25,
)


def cassette_files() -> list[Path]:
    return sorted([*FIXTURES.rglob("*.json"), *SEED.rglob("*.json")])


def test_there_are_cassettes_to_compare():
    assert len(cassette_files()) >= 20


@pytest.mark.parametrize("path", cassette_files(), ids=lambda p: p.name[:40])
def test_cassette_text_is_json_dumps_indent_2(path: Path):
    doc = json.loads(path.read_text())
    assert dumps_indented(doc) == json.dumps(doc, indent=2)
    cassette = read_cassette(path)
    assert plain(cassette) == cassette.model_dump(exclude_unset=True)
    want = json.dumps(cassette.model_dump(exclude_unset=True), indent=2) + "\n"
    assert cassette.to_json() == want


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_dumps_indented_is_json_dumps_for_any_json(value: Any):
    assert dumps_indented(value) == json.dumps(value, indent=2)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"), [float("inf")], {"x": -math.inf}, 2**70, {1: "int key"}, (1, 2),
        "caf\u00e9 \u20ac \U0001f600 \x7f \u2028", "\ud800 lone surrogate", [1e-7, -1.5e-05],
        {"a\\": 1e-05, "b": "x\": 1e-05"}, [[], {}, [{}], ""],
    ],
)  # fmt: skip
def test_dumps_indented_where_orjson_writes_otherwise(value: Any):
    assert dumps_indented(value) == json.dumps(value, indent=2)


def test_plain_keeps_the_fields_a_file_had_in_pydantic_order():
    doc = {"response": {"is_streaming": False, "body": {"a": 1}, "status": 200},
           "extra": [1], "request": {"body": {"m": 1}, "method": "POST"}}  # fmt: skip
    cassette = Cassette.model_validate(doc)
    assert list(plain(cassette)) == list(cassette.model_dump(exclude_unset=True))
    want = json.dumps(cassette.model_dump(exclude_unset=True), indent=2) + "\n"
    assert cassette.to_json() == want


# ---- stream recorders: the bytes framing against the text framing ----------------------


def old_sse_chunks(stream: bytes) -> list[Any]:
    """What the text-level recorder recorded: SSEFramer + sse_data + json.loads."""
    chunks = []
    for event in SSEFramer().feed(stream) + ["\n\n"]:
        if not event.strip():
            continue
        _, payload = sse_data(event)
        if payload is None or payload.strip() == "[DONE]":
            continue
        chunks.append({"__type__": CHAT_CHUNK, "__data__": json.loads(payload)})
    return chunks


SSE_STREAM = (
    b": keep-alive\r\n\r\n"
    b'data: {"id": "a", "choices": [{"delta": {"content": "caf\xc3\xa9 \xf0\x9f\x98\x80"}}]}'
    b"\r\n\r\n"
    b'event: message\ndata: {"id": "b",\ndata:  "choices": []}\n\n'
    b'data:{"id": "c", "n": 123456789012345678901234567890, "f": 1e-07, "x": NaN}\n\n'
    b'data: {"id": "d", "ok": "\xe2\x82\xac"}\n\n'
    b"data:  [DONE] \n\n"
)  # fmt: skip


def feed_in_pieces(recorder: Any, stream: bytes, size: int) -> None:
    for i in range(0, len(stream), size):
        recorder.feed(stream[i : i + size])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_sse_recorder_records_what_the_text_framing_did(size: int):
    recorder = SSEChunkRecorder(CHAT_CHUNK)
    feed_in_pieces(recorder, SSE_STREAM, size)
    assert recorder.complete
    got = recorder.response(clean_end=True)["body"]
    want = old_sse_chunks(SSE_STREAM)
    assert json.dumps(got) == json.dumps(want)  # NaN compares equal as text
    assert got[2]["__data__"]["n"] == 123456789012345678901234567890  # not a float


@pytest.mark.parametrize(
    "event, reason",
    [
        (b"data: {not json}\n\n", "SSE data is not JSON"),
        (b'data: {"error": {"message": "boom"}}\n\n', "error inside the stream"),
        (b'event: delta\ndata: {"x": 1}\n\n', "named SSE event 'delta'"),
        # Issue 18.14: bytes that are not UTF-8 are refused, as in a whole answer.
        (b'data: {"bad": "\xff"}\n\n', "not valid UTF-8"),
        (b'event: message\ndata: {"bad": "\xff"}\n\n', "not valid UTF-8"),
    ],
)
def test_sse_recorder_refuses_what_it_refused(event: bytes, reason: str):
    recorder = SSEChunkRecorder(CHAT_CHUNK)
    with pytest.raises(NotRecordable, match=reason):  # as it passes, or at its end
        recorder.feed(b'data: {"id": "ok"}\n\n' + event + b"data: [DONE]\n\n")
        recorder.response(clean_end=True)


def test_a_big_stream_is_read_with_the_collector_paused_and_resumed():
    import gc

    recorder = SSEChunkRecorder(CHAT_CHUNK)
    recorder.feed(b'data: {"i": 1, "f": 1.5e-07}\n\n' * 6000 + b"data: [DONE]\n\n")
    response = recorder.response(clean_end=True)
    assert gc.isenabled() and len(response["body"]) == 6000
    assert dumps_indented(response) == json.dumps(response, indent=2)


def test_sse_recorder_needs_done():
    recorder = SSEChunkRecorder(CHAT_CHUNK)
    recorder.feed(b'data: {"id": "ok"}\n\n')
    with pytest.raises(NotRecordable, match="without data: \\[DONE\\]"):
        recorder.response(clean_end=True)


NDJSON_STREAM = (
    b'{"message": {"content": "caf\xc3\xa9"}, "done": false}\r\n'
    b"\n"
    b'{"message": {"content": "\xe2\x82\xac"}, "n": 12345678901234567890123, "done": false}\n'
    b'{"message": {"content": ""}, "done": true}'
)


@pytest.mark.parametrize("size", [1, 2, 5, 10_000])
def test_ndjson_recorder_records_what_the_text_framing_did(size: int):
    recorder = NDJSONRecorder(CHAT, _done)
    feed_in_pieces(recorder, NDJSON_STREAM, size)
    got = recorder.response(clean_end=True)["body"]
    text = NDJSON_STREAM.decode("utf-8", "replace").replace("\r\n", "\n")
    want = [{"__type__": CHAT, "__data__": json.loads(x)} for x in text.split("\n") if x.strip()]
    assert got == want and recorder.complete


def test_ndjson_recorder_refuses_a_bad_line():
    recorder = NDJSONRecorder(CHAT, _done)
    with pytest.raises(NotRecordable, match="NDJSON line is not JSON"):
        recorder.feed(b'{"done": false}\n{oops\n')
    with pytest.raises(NotRecordable, match="not a JSON object"):
        NDJSONRecorder(CHAT, _done).feed(b"[1]\n")
    with pytest.raises(NotRecordable, match="not valid UTF-8"):  # issue 18.14
        NDJSONRecorder(CHAT, _done).feed(b'{"content": "\xff", "done": false}\n')


@pytest.mark.parametrize(
    "payload", [b'{"a": 1}', b"[1, 2.5e-07]", b'"\xe2\x82\xac"', b"NaN", b"1" * 25]
)
def test_json_payload_reads_what_json_loads_reads(payload: bytes):
    want = json.loads(payload.decode("utf-8"))
    assert json.dumps(json_payload(payload)[0]) == json.dumps(want)
    assert json.dumps(json_payload(payload.decode("utf-8"))[0]) == json.dumps(want)


def test_json_payload_refuses_bytes_that_are_not_utf8():
    """Issue 18.14: never U+FFFD in place of what was sent; a JSON error, as json says."""
    with pytest.raises(json.JSONDecodeError, match="not valid UTF-8"):
        json_payload(b'"\xff"')


def test_a_stream_with_nan_is_written_as_json_writes_it():
    recorder = SSEChunkRecorder(CHAT_CHUNK)
    recorder.feed(b'data: {"a": 1e-05}\n\ndata: {"x": NaN, "y": -Infinity}\n\ndata: [DONE]\n\n')
    response = recorder.response(clean_end=True)
    assert type(response["body"]) is list  # json read a chunk: its floats are looked at
    assert dumps_indented(response) == json.dumps(response, indent=2)
    assert '"x": NaN' in dumps_indented(response)


def test_a_stream_read_by_orjson_is_trusted_and_written_the_same():
    recorder = SSEChunkRecorder(CHAT_CHUNK)
    recorder.feed(b'data: {"a": 1e-05, "b": "\\u00e9\xc3\xa9"}\n\ndata: [DONE]\n\n')
    response = recorder.response(clean_end=True)
    assert type(response["body"]) is not list  # FiniteList: not walked
    assert dumps_indented(response) == json.dumps(response, indent=2)
