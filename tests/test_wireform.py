"""Unit tests of wireform.py and churn.py (issue 19): pure functions, real recorders."""

from __future__ import annotations

import json

from cassette_proxy import churn, wireform
from cassette_proxy.families import encode
from cassette_proxy.families.ollama import OllamaFamily
from cassette_proxy.families.openai import OpenAIFamily
from cassette_proxy.recording import answer_extras


def test_whole_forms_say_how_the_json_was_written() -> None:
    value = {"id": "x", "n": [1, 2.5], "t": "é", "p": -1e-05}
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert wireform.whole_form(compact) == {"json": "compact"}
    assert wireform.whole_form(json.dumps(value).encode()) is None  # the default
    assert wireform.whole_form(json.dumps(value).encode() + b"\n") == {
        "json": "spaced",
        "end": "\n",
    }
    odd = b'{"id" :"x"}'
    assert wireform.whole_form(odd) == {"text": '{"id" :"x"}'}
    assert wireform.whole_form(b"not json") is None


def test_a_stale_or_redacted_text_is_dropped_and_never_sent() -> None:
    response = {
        "status": 200,
        "body": {"token": "REDACTED"},
        "is_streaming": False,
        "wire_form": {"text": '{"token" : "sk-live-secret"}'},
    }
    settled = answer_extras("/v1/thing", {}, response)
    assert "wire_form" not in settled
    wire = encode("/v1/thing", {}, response)  # a hand-edited file: the value is sent
    assert b"sk-live" not in wire.body and json.loads(wire.body) == {"token": "REDACTED"}


def test_openai_stream_chunks_and_line_ends_replay_as_sent() -> None:
    chunks = [{"id": "c", "choices": [{"delta": {"content": "hé"}}]}, {"id": "c", "choices": []}]
    live = b"".join(
        b"data: " + json.dumps(c, separators=(",", ":"), ensure_ascii=False).encode() + b"\r\n\r\n"
        for c in chunks
    )
    live += b'data: {"id":  "odd", "choices": []}\r\n\r\ndata: [DONE]\r\n\r\n'
    recorder = OpenAIFamily().stream_recorder("/v1/chat/completions", {}, "text/event-stream")
    for i in range(0, len(live), 7):  # reads that split lines and CRLFs
        recorder.feed(live[i : i + 7])
    response = recorder.response(clean_end=True)
    assert response["wire_form"]["eol"] == "\r\n"
    assert response["wire_form"]["chunks"] == {"2": '{"id":  "odd", "choices": []}'}
    response = answer_extras("/v1/chat/completions", {}, response)
    assert encode("/v1/chat/completions", {"stream": True}, response).body == live


def test_ollama_ndjson_lines_replay_as_sent() -> None:
    lines = [
        {"model": "m", "created_at": "2025-01-01T00:00:00Z", "response": "a<b", "done": False},
        {"model": "m", "created_at": "2025-01-01T00:00:01Z", "response": "", "done": True},
    ]
    # Go's encoder: compact, and <, >, & escaped (no layout writes that: verbatim texts).
    live = b"".join(
        json.dumps(x, separators=(",", ":")).replace("<", "\\u003c").encode() + b"\n"
        for x in lines
    )
    recorder = OllamaFamily().stream_recorder("/api/generate", {}, "application/x-ndjson")
    recorder.feed(live)
    response = answer_extras("/api/generate", {}, recorder.response(clean_end=True))
    assert encode("/api/generate", {}, response).body == live


def test_churn_ignores_volatile_fields_and_names_real_changes() -> None:
    old = {
        "request": {"body": {"model": "m"}},
        "response": {
            "body": {"__type__": "T", "__data__": {"id": "a", "created": 1, "text": "hi"}},
            "timing": {"total_ms": 3},
            "headers": {"x-request-id": "r1"},
        },
    }
    new = json.loads(json.dumps(old))
    new["response"]["body"]["__data__"].update(id="b", created=2)
    new["response"]["timing"] = {"total_ms": 9}
    new["response"]["headers"] = {"x-request-id": "r2"}
    assert churn.comparable(old) == churn.comparable(new)
    new["response"]["body"]["__data__"]["text"] = "ho"
    assert churn.changed_fields(churn.comparable(old), churn.comparable(new)) == [
        "response.body.__data__.text"
    ]


def test_a_chunk_sent_over_several_data_lines_is_written_on_one() -> None:
    live = b'data: {"id": "c",\ndata:  "choices": []}\n\ndata: [DONE]\n\n'
    recorder = OpenAIFamily().stream_recorder("/v1/chat/completions", {}, "text/event-stream")
    recorder.feed(live)
    response = answer_extras("/v1/chat/completions", {}, recorder.response(clean_end=True))
    body = encode("/v1/chat/completions", {"stream": True}, response).body
    events = [e for e in body.split(b"\n\n") if e]
    assert all(e.count(b"\n") == 0 and e.startswith(b"data: ") for e in events)
    assert json.loads(events[0][6:]) == {"id": "c", "choices": []}
