"""Unit tests of the cassette model, atomic writes and the families' codecs."""

import json
import os

import pytest
from cassette_proxy.cassette import (
    TEMP_PREFIX,
    CassetteError,
    make_cassette,
    read_cassette,
    write_cassette,
)
from cassette_proxy.families import encode
from cassette_proxy.families.openai import OpenAIFamily, decode_embedding, encode_embedding
from cassette_proxy.store import CassetteStore


def test_seed_round_trips_byte_for_byte(repo_root, tmp_path):
    src = repo_root / "cassettes" / "0806aef47037.json"
    cassette = read_cassette(src)
    out = tmp_path / "x.json"
    write_cassette(out, cassette)
    assert out.read_bytes() == src.read_bytes()
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_new_cassette_has_the_format_key_order(tmp_path):
    c = make_cassette(
        test_id=None,
        method="POST",
        url="http://h/v1/completions",
        headers={},
        body={"model": "m", "prompt": "p"},
        endpoint="/v1/completions",
        model="m",
        response={"body": {"__type__": "t", "__data__": {}}, "is_streaming": False},
    )
    text = c.to_json()
    doc = json.loads(text)
    assert list(doc) == ["request", "response", "id_normalization_mapping"]
    assert list(doc["request"]) == ["method", "url", "headers", "body", "endpoint", "model"]
    assert text == json.dumps(doc, indent=2) + "\n"


def test_bad_files_are_reported_not_fatal(tmp_path, repo_root):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "shape.json").write_text('{"request": 1, "response": 2}')
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / (TEMP_PREFIX + "abc.json")).write_text("{")
    os.utime(tmp_path / (TEMP_PREFIX + "abc.json"), (1, 1))  # left by a crash long ago
    (tmp_path / "good.json").write_bytes(
        (repo_root / "cassettes" / "0806aef47037.json").read_bytes()
    )
    store = CassetteStore(tmp_path)
    report = store.load()
    assert report.loaded == 1
    assert len(report.bad) == 3
    assert report.removed_temp == 1
    assert not (tmp_path / (TEMP_PREFIX + "abc.json")).exists()
    with pytest.raises(CassetteError, match="not valid JSON"):
        read_cassette(tmp_path / "bad.json")


def test_base64_embeddings_round_trip_exactly():
    import base64
    import struct

    raw = base64.b64encode(struct.pack("<3f", 0.1, -2.5, 3.25)).decode()
    floats = decode_embedding(raw)
    assert encode_embedding(floats) == raw


def test_models_list_encodes_as_openai_list():
    fam = OpenAIFamily()
    data = {
        "object": "list",
        "data": [{"id": "a", "object": "model", "created": 1, "owned_by": "x"}],
    }
    recorded = fam.record("/v1/models", {}, 200, data)
    assert recorded["body"][0]["__type__"] == "openai.types.model.Model"
    wire = encode("/v1/models", {}, recorded)
    assert json.loads(wire.body) == data


def test_stream_encodes_as_sse_with_done():
    fam = OpenAIFamily()
    rec = fam.stream_recorder("/v1/chat/completions", {}, "text/event-stream")
    rec.feed(b'data: {"id": "1", "choices": []}\n\ndata: {"id"')
    rec.feed(b': "2", "choices": []}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n')
    assert rec.complete
    response = rec.response(clean_end=True)
    assert [c["__data__"]["id"] for c in response["body"]] == ["1", "2"]
    wire = encode("/v1/chat/completions", {}, response)
    assert wire.content_type == "text/event-stream"
    assert wire.body.endswith(b"data: [DONE]\n\n")
    assert wire.body.count(b"data: ") == 3
