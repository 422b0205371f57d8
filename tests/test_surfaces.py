"""The 2026 API surfaces through a real mitmdump (issue 11, items 4, 5 and 7).

* OpenAI Responses (``POST /v1/responses``): typed, streamed and not, through the real
  openai SDK; ``GET``/``cancel``/``input_items`` as JSON; ``stats``, ``show``,
  ``cassette_normalize``.
* Anthropic Messages (``POST /v1/messages``, ``/count_tokens``): raw HTTP as llama-stack
  keeps it, through the real anthropic SDK; complete only at ``message_stop``.
* vLLM's other endpoints and Gemini: raw JSON and lines.

Each records against a loopback upstream that speaks the wire format
(tests/surface_upstreams.py), then replays with the upstream gone, and the replay is
compared with what the live call returned.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import typing
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from cassette_proxy import catalog
from cassette_proxy.cassette import read_cassette
from cassette_proxy.cli import cli
from cassette_proxy.families import classify, encode
from cassette_proxy.families.anthropic import MessagesStreamRecorder
from cassette_proxy.families.base import NotRecordable
from cassette_proxy.families.responses import (
    ResponseEventsRecorder,
    event_type_name,
    normalize_body,
)
from click.testing import CliRunner
from conftest import cassette_files, openai_client, wait_for_files
from surface_upstreams import start_surface_upstream
from upstreams import answer_text, tool_arguments

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llama-stack"
LLAMA_MESSAGES = (  # llama-stack's raw recordings of /v1/messages, streamed and not
    "f22657bfd86db6348c0a0d0b17332dcfc038b345d2a7be8da4b880a433d36a52.json",
    "2703eb8f17f3914dd6991ecf387caa6c511cc52e6498b73e274cb4f01adf1e37.json",
)
RESPONSES = "openai.types.responses."
ANTHROPIC_KEY = "sk-ant-api03-surface-secret-0123456789"
GOOGLE_KEY = "AIzaSyD-surface-secret-0123456789abcdefghij"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def surface():
    up = start_surface_upstream("A")
    yield up
    up.stop()


def docs(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in cassette_files(directory)]


def doc_for(directory: Path, endpoint: str, **body: Any) -> dict[str, Any]:
    """The one cassette for ``endpoint`` whose request body has these fields."""
    found = [
        d
        for d in docs(directory)
        if d["request"]["endpoint"] == endpoint
        and all(d["request"]["body"].get(k) == v for k, v in body.items())
    ]
    assert len(found) == 1, [d["request"] for d in docs(directory)]
    return found[0]


def dumps(objects: Any) -> list[dict[str, Any]]:
    return [o.model_dump(mode="json") for o in objects]


def as_sent(objects: Any) -> list[dict[str, Any]]:
    """What the server sent for each SDK object (the fields it set)."""
    return [o.model_dump(mode="json", exclude_unset=True) for o in objects]


def anthropic_client(proxy: Any, upstream: Any, **kwargs: Any) -> anthropic.Anthropic:
    http = httpx2.Client(proxy=proxy.url, trust_env=False, timeout=30.0)
    return anthropic.Anthropic(
        base_url=upstream.url, api_key=ANTHROPIC_KEY, http_client=http, max_retries=0, **kwargs
    )


def raw_stream(proxy: Any, url: str, body: Any, headers: dict[str, str] | None = None):
    """The status, content type and exact bytes of a streamed answer, read to its end."""
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30.0) as http:
        with http.stream("POST", url, json=body, headers=headers or {}) as r:
            return r.status_code, r.headers.get("content-type"), b"".join(r.iter_raw())


def wait_for_count(proxy: Any, needle: str, n: int, timeout: float = 20.0) -> None:
    """Wait until the proxy's log holds ``needle`` at least ``n`` times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proxy.log_text().count(needle) < n:
        time.sleep(0.05)
    assert proxy.log_text().count(needle) >= n, proxy.log_text()


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# ---- OpenAI Responses ---------------------------------------------------------------------


def test_every_responses_event_type_names_its_class_in_the_openai_sdk():
    from openai.types.responses import ResponseStreamEvent

    members = typing.get_args(typing.get_args(ResponseStreamEvent)[0])
    assert len(members) > 40
    for cls in members:
        (kind,) = typing.get_args(cls.model_fields["type"].annotation)
        assert event_type_name(kind) == f"{cls.__module__}.{cls.__qualname__}", kind


def test_responses_whole_answer_is_a_typed_response_and_replays_to_the_sdk(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    client = openai_client(proxy, surface)
    live = client.responses.create(model="fake-model", input="hello responses")
    live_tool = client.responses.create(model="fake-model", input="weather?", tools=[TOOL])
    assert live.output_text == answer_text("A", "hello responses")
    assert live_tool.output[1].type == "function_call"

    wait_for_files(proxy.cassette_dir, 2)
    doc = doc_for(proxy.cassette_dir, "/v1/responses", input="hello responses")
    assert doc["request"]["headers"] == {}
    assert doc["response"]["is_streaming"] is False
    assert doc["response"]["body"]["__type__"] == RESPONSES + "response.Response"
    assert doc["response"]["body"]["__data__"]["id"] == live.id

    surface.stop()
    replay = openai_client(proxy_factory(mode="replay"), surface)
    assert replay.responses.create(model="fake-model", input="hello responses") == live
    again = replay.responses.create(model="fake-model", input="weather?", tools=[TOOL])
    assert again.model_dump() == live_tool.model_dump()
    assert again.output[1].arguments == tool_arguments("A", "weather?")


def test_responses_stream_is_typed_by_event_and_replays_as_the_server_sent_it(
    proxy_factory, surface
):
    proxy = proxy_factory(mode="auto")
    client = openai_client(proxy, surface)
    live = list(client.responses.create(model="fake-model", input="stream it", stream=True))
    tool_body = {"model": "fake-model", "input": "call it", "tools": [TOOL], "stream": True}
    live_raw = raw_stream(proxy, f"{surface.url}/v1/responses", tool_body)
    assert [e.type for e in live][-1] == "response.completed"
    assert "".join(e.delta for e in live if e.type == "response.output_text.delta") == (
        answer_text("A", "stream it")
    )
    assert live_raw[0] == 200 and live_raw[2].startswith(b"event: response.created\ndata: {")

    wait_for_files(proxy.cassette_dir, 2)
    doc = doc_for(proxy.cassette_dir, "/v1/responses", input="stream it")
    events = doc["response"]["body"]
    assert doc["response"]["is_streaming"] is True
    assert [e["__data__"] for e in events] == as_sent(live)
    by_kind = {e["__data__"]["type"]: e["__type__"] for e in events}
    assert by_kind["response.output_text.delta"] == (
        RESPONSES + "response_text_delta_event.ResponseTextDeltaEvent"
    )
    assert by_kind["response.completed"] == (
        RESPONSES + "response_completed_event.ResponseCompletedEvent"
    )
    # Every event's __type__ loads and parses its data (as `cassette-proxy verify` checks).
    for event in events:
        cls = catalog.load_type(event["__type__"])
        assert cls.model_validate(event["__data__"]).type == event["__data__"]["type"]
    tool_doc = doc_for(proxy.cassette_dir, "/v1/responses", input="call it")
    kinds = [e["__data__"]["type"] for e in tool_doc["response"]["body"]]
    assert "response.function_call_arguments.delta" in kinds

    surface.stop()
    replay = proxy_factory(mode="replay")
    again = list(
        openai_client(replay, surface).responses.create(
            model="fake-model", input="stream it", stream=True
        )
    )
    assert dumps(again) == dumps(live)
    # The same bytes the server sent: event lines, compact JSON, its content type.
    assert raw_stream(replay, f"{surface.url}/v1/responses", tool_body) == live_raw


def test_responses_stream_is_an_answer_only_once_it_ends(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    client = openai_client(proxy, surface)
    live: dict[str, list[Any]] = {}
    for end in ("failed", "incomplete", "error"):
        surface.configure(stream_end=end)
        live[end] = list(client.responses.create(model="fake-model", input=end, stream=True))
    for n, end in enumerate(("none", "cut"), start=1):
        surface.configure(stream_end=end, cut_after=3)
        try:
            raw_stream(
                proxy,
                f"{surface.url}/v1/responses",
                {"model": "fake-model", "input": end, "stream": True},
            )
        except httpx.HTTPError:
            assert end == "cut"
        wait_for_count(proxy, "not recorded POST /v1/responses", n)
    assert [e.type for e in live["error"]][-1] == "error"

    wait_for_files(proxy.cassette_dir, 3)
    recorded = {d["request"]["body"]["input"] for d in docs(proxy.cassette_dir)}
    assert recorded == {"failed", "incomplete", "error"}
    log = proxy.log_text()
    assert "stream ended before response.completed" in log

    surface.stop()
    replay = openai_client(proxy_factory(mode="replay"), surface)
    for end, events in live.items():
        again = replay.responses.create(model="fake-model", input=end, stream=True)
        assert dumps(again) == dumps(events)


def test_responses_retrieve_cancel_and_input_items_record_and_replay_as_json(
    proxy_factory, surface
):
    proxy = proxy_factory(mode="auto")
    client = openai_client(proxy, surface)
    created = client.responses.create(model="fake-model", input="keep me")
    follow_up = client.responses.create(
        model="fake-model", input="and then?", previous_response_id=created.id
    )
    live = {
        "retrieve": client.responses.retrieve(created.id).model_dump(),
        "input_items": client.responses.input_items.list(created.id).model_dump(),
        "cancel": client.responses.cancel(created.id).model_dump(),
    }
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        deleted = http.delete(f"{surface.url}/v1/responses/{created.id}").json()
        missing = http.get(f"{surface.url}/v1/responses/resp_nope")
    assert live["cancel"]["status"] == "cancelled" and deleted["deleted"] is True
    assert missing.status_code == 404

    wait_for_files(proxy.cassette_dir, 7)
    raw = [d for d in docs(proxy.cassette_dir) if d["request"]["endpoint"] != "/v1/responses"]
    assert {(d["request"]["method"], d["request"]["endpoint"]) for d in raw} == {
        ("GET", f"/v1/responses/{created.id}"),
        ("GET", f"/v1/responses/{created.id}/input_items"),
        ("POST", f"/v1/responses/{created.id}/cancel"),
        ("DELETE", f"/v1/responses/{created.id}"),
        ("GET", "/v1/responses/resp_nope"),
    }
    for d in raw:  # plain JSON: no __type__, replayed as recorded
        assert "__type__" not in json.dumps(d["response"])

    surface.stop()
    replay_proxy = proxy_factory(mode="replay")
    replay = openai_client(replay_proxy, surface)
    assert replay.responses.create(model="fake-model", input="keep me") == created
    # A conversation chained by previous_response_id replays: the replayed id is the real one.
    chained = replay.responses.create(
        model="fake-model", input="and then?", previous_response_id=created.id
    )
    assert chained == follow_up and chained.previous_response_id == created.id
    assert replay.responses.retrieve(created.id).model_dump() == live["retrieve"]
    assert replay.responses.input_items.list(created.id).model_dump() == live["input_items"]
    assert replay.responses.cancel(created.id).model_dump() == live["cancel"]
    with httpx.Client(proxy=replay_proxy.url, trust_env=False) as http:
        assert http.delete(f"{surface.url}/v1/responses/{created.id}").json() == deleted
        again = http.get(f"{surface.url}/v1/responses/resp_nope")
        assert (again.status_code, again.json()) == (404, missing.json())


def test_responses_stats_and_show(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    client = openai_client(proxy, surface)
    whole = client.responses.create(model="fake-model", input="count me")
    streamed = list(
        client.responses.create(model="fake-model", input="count me too", tools=[TOOL], stream=True)
    )
    final = streamed[-1].response
    wait_for_files(proxy.cassette_dir, 2)
    cassettes = str(proxy.cassette_dir)

    verify = CliRunner().invoke(cli, ["verify", "--strict", "--cassette-dir", cassettes])
    assert verify.exit_code == 0 and "0 error(s), 0 warning(s)" in verify.output, verify.output
    stats = cli_json("stats", "--cassette-dir", cassettes)
    assert stats["tokens"] == {
        "prompt_tokens": whole.usage.input_tokens + final.usage.input_tokens,
        "completion_tokens": whole.usage.output_tokens + final.usage.output_tokens,
        "total_tokens": whole.usage.total_tokens + final.usage.total_tokens,
    }
    doc = doc_for(proxy.cassette_dir, "/v1/responses", input="count me too")
    path = next(p for p in cassette_files(proxy.cassette_dir) if json.loads(p.read_text()) == doc)
    view = cli_json("show", str(path), "--cassette-dir", cassettes)["response"]
    assert view["kind"] == "Response" and view["chunks"] == len(streamed)
    assert view["text"] == answer_text("A", "count me too")
    call = final.output[1]
    assert view["tool_calls"] == [
        {
            "id": call.call_id,
            "name": "get_weather",
            "arguments": tool_arguments("A", "count me too"),
        }
    ]
    assert view["usage"]["total_tokens"] == final.usage.total_tokens


def test_cassette_normalize_gives_responses_stable_files_that_still_replay(proxy_factory, surface):
    texts = []
    for _ in range(2):  # the upstream answers with fresh ids and times each time
        # A new record run each time: within one run a repeat is the next answer of its
        # sequence (<hash>.2.json); a new run replaces the file.
        proxy = proxy_factory(mode="record", options={"cassette_normalize": True})
        client = openai_client(proxy, surface)
        list(client.responses.create(model="fake-model", input="stable", stream=True))
        client.responses.create(model="fake-model", input="stable whole")
        files = wait_for_files(proxy.cassette_dir, 2)
        texts.append({p.name: p.read_text() for p in files})
        proxy.stop()
    assert texts[0] == texts[1]
    doc = doc_for(proxy.cassette_dir, "/v1/responses", input="stable")
    datas = [e["__data__"] for e in doc["response"]["body"]]
    final = datas[-1]["response"]
    assert final["id"].startswith("rec-") and final["created_at"] == 0
    item_ids = {d["item_id"] for d in datas if "item_id" in d}
    assert item_ids == {final["output"][0]["id"]} and item_ids.pop().startswith("rec-")

    surface.stop()
    replay = openai_client(proxy_factory(mode="replay"), surface)
    events = list(replay.responses.create(model="fake-model", input="stable", stream=True))
    assert as_sent(events) == datas
    assert replay.responses.create(model="fake-model", input="stable whole").id.startswith("rec-")


def test_sdk_level_responses_recordings_replay_to_the_openai_sdk(proxy_factory, tmp_path):
    """OGX's recorder patches ``responses.create`` too: its files (SDK kwargs, a doubled
    ``/v1/v1`` URL, typed events without a wire form, llama-stack's normalised
    ``created_at`` string) replay to the SDK as the objects they hold."""
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Hi!", "annotations": []}],
    }
    final = {
        "id": "rec-0123456789ab",
        "object": "response",
        "created_at": 0,
        "status": "completed",
        "model": "m",
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": 2, "output_tokens": 1, "total_tokens": 3},
    }
    kinds = [
        ("response.created", {"response": {**final, "status": "in_progress", "output": []}}),
        (
            "response.output_text.delta",
            {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi!"},
        ),
        ("response.completed", {"response": final}),
    ]
    events = [
        {"__type__": event_type_name(k), "__data__": {"type": k, "sequence_number": n, **d}}
        for n, (k, d) in enumerate(kinds)
    ]
    whole = {**final, "created_at": "1970-01-01T00:00:00.000000Z"}
    cassettes = tmp_path / "ogx"
    cassettes.mkdir()
    for name, body, response in (
        (
            "a.json",
            {"model": "m", "input": "hi", "stream": True},
            {"body": events, "is_streaming": True},
        ),
        (
            "b.json",
            {"model": "m", "input": "hi"},
            {
                "body": {"__type__": RESPONSES + "response.Response", "__data__": whole},
                "is_streaming": False,
            },
        ),
    ):
        request = {
            "method": "POST",
            "url": "http://localhost:8000/v1/v1/responses",
            "headers": {},
            "body": body,
            "endpoint": "/v1/responses",
            "model": "m",
        }
        doc = {
            "test_id": None,
            "request": request,
            "response": response,
            "id_normalization_mapping": {},
        }
        (cassettes / name).write_text(json.dumps(doc, indent=2) + "\n")
    proxy = proxy_factory(mode="replay", cassette_dir=cassettes)
    client = openai_client(proxy, "http://localhost:8000")
    replayed = list(client.responses.create(model="m", input="hi", stream=True))
    assert as_sent(replayed) == [e["__data__"] for e in events]
    assert client.responses.create(model="m", input="hi").output_text == "Hi!"


def test_responses_recorder_unit_split_reads_terminal_events_and_forms():
    body = b"".join(
        f"event: {t}\ndata: {json.dumps({'type': t, 'sequence_number': n}, separators=(',', ':'))}"
        f"\n\n".encode()
        for n, t in enumerate(
            ["response.created", "response.output_text.delta", "response.completed"]
        )
    )
    recorder = ResponseEventsRecorder("text/event-stream; charset=utf-8")
    for i in range(len(body)):  # one byte per read: events are framed whatever the reads
        recorder.feed(body[i : i + 1])
    assert recorder.complete
    response = recorder.response(clean_end=False)
    wire = encode("/v1/responses", {}, response)
    assert (wire.content_type, wire.body) == ("text/event-stream; charset=utf-8", body)

    no_end = ResponseEventsRecorder("text/event-stream")
    no_end.feed(body.split(b"event: response.completed")[0])
    with pytest.raises(NotRecordable, match="response.completed"):
        no_end.response(clean_end=True)
    named_wrong = ResponseEventsRecorder("text/event-stream")
    with pytest.raises(NotRecordable, match="differs"):
        named_wrong.feed(b'event: response.created\ndata: {"type": "error"}\n\n')
    # A server without event: lines is replayed without them too.
    plain = ResponseEventsRecorder("text/event-stream")
    plain.feed(b'data: {"type": "error", "message": "no"}\n\n')
    assert encode("/v1/responses", {}, plain.response(True)).body == (
        b'data: {"type": "error", "message": "no"}\n\n'
    )
    assert classify("POST", "/v1/responses").name == "responses"
    assert classify("GET", "/v1/responses/resp_1").name == "raw"
    assert classify("POST", "/v1/responses/resp_1/cancel").name == "raw"


def test_normalize_body_maps_each_id_once_and_consistently():
    item = {"id": "msg_live", "type": "message", "content": []}
    response = {"id": "resp_live", "object": "response", "created_at": 17.5, "output": [item]}
    body = [
        {
            "__type__": RESPONSES + "x.A",
            "__data__": {"type": "response.created", "response": {**response, "output": []}},
        },
        {
            "__type__": RESPONSES + "x.B",
            "__data__": {
                "type": "response.output_text.delta",
                "item_id": "msg_live",
                "delta": "hi",
            },
        },
        {
            "__type__": RESPONSES + "x.C",
            "__data__": {"type": "response.completed", "response": response},
        },
    ]
    out = normalize_body(body, "abcdef0123456789")
    assert out[0]["__data__"]["response"]["id"] == "rec-abcdef012345"
    assert out[0]["__data__"]["response"]["created_at"] == 0
    assert out[1]["__data__"]["item_id"] == out[2]["__data__"]["response"]["output"][0]["id"]
    assert out[1]["__data__"]["item_id"] == "rec-abcdef012345-1"
    assert body[1]["__data__"]["item_id"] == "msg_live"  # the input is left as it was


# ---- Anthropic Messages -----------------------------------------------------------------


def test_anthropic_messages_whole_answers_record_raw_and_replay_to_the_sdk(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    client = anthropic_client(proxy, surface)
    messages = [{"role": "user", "content": "hello claude"}]
    live = client.messages.create(model="claude-fake", max_tokens=64, messages=messages)
    live_tool = client.messages.create(
        model="claude-fake", max_tokens=64, messages=messages, tools=[ANTHROPIC_TOOL]
    )
    count = client.messages.count_tokens(model="claude-fake", messages=messages)
    assert live.content[0].text == answer_text("A", "hello claude")
    assert live_tool.stop_reason == "tool_use" and count.input_tokens == 2
    with httpx.Client(proxy=proxy.url, trust_env=False) as http:
        bad = http.post(
            f"{surface.url}/v1/messages",
            json={"model": "claude-fake", "messages": messages},
            headers={"x-api-key": ANTHROPIC_KEY},
        )
    assert bad.status_code == 400 and bad.json()["type"] == "error"

    wait_for_files(proxy.cassette_dir, 4)
    doc = doc_for(proxy.cassette_dir, "/v1/messages", max_tokens=64, tools=None)
    # llama-stack's raw HTTP shape: status, the JSON body as it came, no __type__.
    assert untimed(doc["response"]) == {
        "status": 200,
        "body": live.model_dump(mode="json", exclude_unset=True),
        "is_streaming": False,
    }
    error_doc = doc_for(proxy.cassette_dir, "/v1/messages", max_tokens=None)
    assert error_doc["response"]["status"] == 400

    surface.stop()
    replay_proxy = proxy_factory(mode="replay")
    replay = anthropic_client(replay_proxy, surface)
    again = replay.messages.create(model="claude-fake", max_tokens=64, messages=messages)
    assert again.model_dump() == live.model_dump()
    again_tool = replay.messages.create(
        model="claude-fake", max_tokens=64, messages=messages, tools=[ANTHROPIC_TOOL]
    )
    assert again_tool.model_dump() == live_tool.model_dump()
    assert replay.messages.count_tokens(model="claude-fake", messages=messages) == count
    with httpx.Client(proxy=replay_proxy.url, trust_env=False) as http:
        bad_again = http.post(
            f"{surface.url}/v1/messages", json={"model": "claude-fake", "messages": messages}
        )
    assert (bad_again.status_code, bad_again.json()) == (400, bad.json())


def test_anthropic_stream_keeps_its_lines_and_replays_byte_for_byte(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    client = anthropic_client(proxy, surface)
    messages = [{"role": "user", "content": "stream claude"}]
    live = list(
        client.messages.create(model="claude-fake", max_tokens=64, messages=messages, stream=True)
    )
    body = {
        "model": "claude-fake",
        "max_tokens": 64,
        "stream": True,
        "tools": [ANTHROPIC_TOOL],
        "messages": [{"role": "user", "content": "weather, raw"}],
    }
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    live_raw = raw_stream(proxy, f"{surface.url}/v1/messages", body, headers)
    helper = [{"role": "user", "content": "through the stream helper"}]
    with client.messages.stream(model="claude-fake", max_tokens=64, messages=helper) as s:
        live_final = s.get_final_message()
    assert [e.type for e in live][0] == "message_start" and live[-1].type == "message_stop"
    assert b"event: ping\n" in live_raw[2]

    wait_for_files(proxy.cassette_dir, 3)
    doc = doc_for(proxy.cassette_dir, "/v1/messages", messages=messages)
    lines = doc["response"]["body"]
    assert doc["response"]["is_streaming"] is True
    assert all(isinstance(line, str) for line in lines)
    assert lines[:2] == ["event: message_start", lines[1]] and lines[2] == ""
    assert "event: ping" in lines and lines[-3:-1] == [
        "event: message_stop",
        'data: {"type":"message_stop"}',
    ]
    assert lines[-1] == ""

    surface.stop()
    replay = proxy_factory(mode="replay")
    again = list(
        anthropic_client(replay, surface).messages.create(
            model="claude-fake", max_tokens=64, messages=messages, stream=True
        )
    )
    assert dumps(again) == dumps(live)
    replay_client = anthropic_client(replay, surface)
    with replay_client.messages.stream(model="claude-fake", max_tokens=64, messages=helper) as s:
        assert s.get_final_message() == live_final
    assert live_final.content[0].text == answer_text("A", "through the stream helper")
    status, kind, data = raw_stream(replay, f"{surface.url}/v1/messages", body, headers)
    assert (status, kind.split(";")[0], data) == (200, "text/event-stream", live_raw[2])


def test_anthropic_stream_is_an_answer_only_at_message_stop(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    client = anthropic_client(proxy, surface)
    for n, end in enumerate(("none", "cut", "error"), start=1):
        surface.configure(stream_end=end, cut_after=4)
        messages = [{"role": "user", "content": f"end {end}"}]
        # The SDK reads a stream without message_stop to its end; a cut or an error raises.
        with contextlib.suppress(anthropic.APIError, httpx2.HTTPError):
            list(
                client.messages.create(
                    model="claude-fake", max_tokens=8, messages=messages, stream=True
                )
            )
        wait_for_count(proxy, "not recorded POST /v1/messages", n)
    surface.configure(stream_end="normal")
    done = list(
        client.messages.create(
            model="claude-fake",
            max_tokens=8,
            stream=True,
            messages=[{"role": "user", "content": "end normal"}],
        )
    )
    assert done[-1].type == "message_stop"
    files = wait_for_files(proxy.cassette_dir, 1)
    assert len(files) == 1 and "end normal" in files[0].read_text()
    assert "stream ended before message_stop" in proxy.log_text()


def test_anthropic_show_joins_text_and_tool_input_and_stats_reads_usage(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    client = anthropic_client(proxy, surface)
    messages = [{"role": "user", "content": "weather in Paris"}]
    streamed = list(
        client.messages.create(
            model="claude-fake",
            max_tokens=64,
            messages=messages,
            tools=[ANTHROPIC_TOOL],
            stream=True,
        )
    )
    whole = client.messages.create(model="claude-fake", max_tokens=32, messages=messages)
    files = wait_for_files(proxy.cassette_dir, 2)
    cassettes = str(proxy.cassette_dir)
    start = streamed[0].message.usage
    delta = next(e for e in streamed if e.type == "message_delta").usage

    by_lines = {f: json.loads(f.read_text())["response"]["is_streaming"] for f in files}
    stream_file = next(f for f, s in by_lines.items() if s)
    view = cli_json("show", str(stream_file), "--cassette-dir", cassettes)["response"]
    assert view["kind"] == "anthropic-message"
    assert view["text"] == answer_text("A", "weather in Paris")
    tool_id = next(
        e.content_block.id
        for e in streamed
        if e.type == "content_block_start" and e.content_block.type == "tool_use"
    )
    assert view["tool_calls"] == [
        {
            "id": tool_id,
            "name": "get_weather",
            "input": json.loads(tool_arguments("A", "weather in Paris")),
        }
    ]
    assert view["stop_reason"] == "tool_use"
    assert view["usage"]["completion_tokens"] == delta.output_tokens

    verify = CliRunner().invoke(cli, ["verify", "--strict", "--cassette-dir", cassettes])
    assert verify.exit_code == 0 and "0 error(s), 0 warning(s)" in verify.output, verify.output
    stats = cli_json("stats", "--cassette-dir", cassettes)
    assert stats["tokens"] == {
        "prompt_tokens": start.input_tokens + whole.usage.input_tokens,
        "completion_tokens": delta.output_tokens + whole.usage.output_tokens,
        "total_tokens": start.input_tokens
        + whole.usage.input_tokens
        + delta.output_tokens
        + whole.usage.output_tokens,
    }


def test_anthropic_credentials_are_never_written(proxy_factory, surface):
    names = ["x-api-key", "anthropic-api-key", "authorization", "anthropic-version"]
    proxy = proxy_factory(mode="auto", options={"cassette_record_headers": names})
    # The SDK sends its key as a bearer token; gateways take x-api-key / anthropic-api-key.
    extra = {"x-api-key": ANTHROPIC_KEY + "-x", "anthropic-api-key": ANTHROPIC_KEY + "-a"}
    client = anthropic_client(proxy, surface, default_headers=extra)
    messages = [{"role": "user", "content": "secret"}]
    client.messages.create(model="claude-fake", max_tokens=8, messages=messages)
    list(client.messages.create(model="claude-fake", max_tokens=9, messages=messages, stream=True))
    files = wait_for_files(proxy.cassette_dir, 2)
    assert len(files) == 2
    sent = surface.requests[0].headers  # they all reached the upstream
    assert sent["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert (sent["x-api-key"], sent["anthropic-api-key"]) == tuple(extra.values())
    for path in files:
        text = path.read_text()
        assert "surface-secret" not in text
        headers = json.loads(text)["request"]["headers"]
        assert headers == {"anthropic-version": sent["anthropic-version"]}


def test_llama_stack_messages_recordings_replay_to_the_anthropic_sdk(proxy_factory, tmp_path):
    """llama-stack's own raw recordings of /v1/messages (Ollama, May 2026) serve the SDK."""
    cassettes = tmp_path / "llama"
    cassettes.mkdir()
    for name in LLAMA_MESSAGES:
        shutil.copy(FIXTURES / name, cassettes / name)
    proxy = proxy_factory(mode="replay", cassette_dir=cassettes)
    for name in LLAMA_MESSAGES:
        recorded = json.loads((FIXTURES / name).read_text())
        payload = recorded["request"]["payload"]
        http = httpx2.Client(proxy=proxy.url, trust_env=False, timeout=30.0)
        client = anthropic.Anthropic(
            base_url="http://0.0.0.0:11434",
            api_key="unused",
            http_client=http,
            max_retries=0,
            default_headers={"X-Cassette-Test-Id": recorded["test_id"]},
        )
        if payload["stream"]:
            events = list(client.messages.create(**payload))
            lines = [line for line in recorded["response"]["body"] if line.startswith("data:")]
            assert [e.model_dump(mode="json", exclude_unset=True) for e in events] == [
                json.loads(line[5:]) for line in lines
            ]
            assert events[-1].type == "message_stop"
        else:
            message = client.messages.create(**payload)
            assert (
                message.model_dump(mode="json", exclude_unset=True)
                == (recorded["response"]["body"])
            )


def test_anthropic_recorder_unit_split_reads_and_end_marker():
    wire = (
        b'event: message_start\ndata: {"type":"message_start","message":{}}\n\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    recorder = MessagesStreamRecorder()
    for i in range(len(wire)):
        assert not recorder.complete
        recorder.feed(wire[i : i + 1])
    assert recorder.complete
    response = recorder.response(clean_end=False)
    assert encode("/v1/messages", {}, response).body == wire
    # No event: lines (some gateways): the data's type still ends the stream.
    bare = MessagesStreamRecorder()
    bare.feed(b'data: {"type":"message_stop"}\n\n')
    assert bare.complete
    cut = MessagesStreamRecorder()
    cut.feed(wire[: wire.index(b"event: message_stop")])
    with pytest.raises(NotRecordable, match="message_stop"):
        cut.response(clean_end=True)
    # A recorded stream without its last blank line still ends its last event.
    lines = ["event: message_stop", 'data: {"type":"message_stop"}']
    assert encode("/v1/messages", {}, {"body": lines, "is_streaming": True}).body.endswith(b"}\n\n")
    assert classify("POST", "/v1/messages").name == "anthropic"
    assert classify("POST", "/v1/messages/count_tokens").name == "anthropic"
    assert classify("POST", "/v1/threads/t/messages").name == "raw"


# ---- vLLM's other endpoints and Gemini -------------------------------------------------------

VLLM_CALLS = [
    ("/tokenize", {"model": "m", "prompt": "hello world"}),
    ("/tokenize", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("/detokenize", {"model": "m", "tokens": [104, 105]}),
    ("/v1/rerank", {"model": "r", "query": "a cat", "documents": ["a dog", "a cat sat"]}),
    ("/rerank", {"model": "r", "query": "q", "documents": ["q one", "two"], "top_n": 1}),
    ("/v2/rerank", {"model": "r", "query": "q", "documents": ["q"]}),
    ("/score", {"model": "s", "text_1": "a", "text_2": ["b", "c"]}),
    ("/v1/score", {"model": "s", "text_1": "a", "text_2": "b"}),
    ("/pooling", {"model": "p", "input": ["x", "yy"]}),
    ("/classify", {"model": "c", "input": ["good day", "bad day"]}),
]


def test_vllm_endpoints_record_and_replay_as_raw_json(proxy_factory, surface):
    proxy = proxy_factory(mode="auto")
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30.0) as http:
        live = [http.post(surface.url + path, json=body) for path, body in VLLM_CALLS]
    assert all(r.status_code == 200 for r in live)

    wait_for_files(proxy.cassette_dir, len(VLLM_CALLS))
    recorded = docs(proxy.cassette_dir)
    assert len(recorded) == len(VLLM_CALLS)
    for (path, body), answer in zip(VLLM_CALLS, live, strict=True):
        doc = doc_for(proxy.cassette_dir, path, **body)
        expected = {"status": 200, "body": answer.json(), "is_streaming": False}
        assert untimed(doc["response"]) == expected

    surface.stop()
    replay = proxy_factory(mode="replay")
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30.0) as http:
        for (path, body), answer in zip(VLLM_CALLS, live, strict=True):
            again = http.post(surface.url + path, json=body)
            assert again.status_code == 200, (path, again.text)
            assert again.headers["content-type"] == "application/json"
            assert again.json() == answer.json(), path


def sse_events(data: bytes) -> list[Any]:
    text = data.decode().replace("\r\n", "\n")
    return [json.loads(e[5:]) for e in text.split("\n\n") if e.startswith("data:")]


def test_gemini_streams_and_answers_replay_and_its_key_is_never_written(proxy_factory, surface):
    names = ["x-goog-api-key", "x-goog-api-client"]
    proxy = proxy_factory(mode="auto", options={"cassette_record_headers": names})
    model = "gemini-2.5-flash"
    body = {"contents": [{"role": "user", "parts": [{"text": "hello gemini"}]}]}
    # Another prompt for the JSON-array stream: two requests that differ only in their
    # query (alt=sse) get the same file name (llama-stack's hash has no query).
    array_body = {"contents": [{"role": "user", "parts": [{"text": "as an array"}]}]}
    stream_url = f"{surface.url}/v1beta/models/{model}:streamGenerateContent?alt=sse"
    headers = {"x-goog-api-key": GOOGLE_KEY, "x-goog-api-client": "genai-py/1.0"}
    live_stream = raw_stream(proxy, stream_url, body, headers)
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30.0) as http:
        whole_url = f"{surface.url}/v1beta/models/{model}:generateContent"
        live_whole = http.post(f"{whole_url}?key={GOOGLE_KEY}", json=body)
        array_url = f"{surface.url}/v1beta/models/{model}:streamGenerateContent"
        live_array = http.post(array_url, json=array_body, headers=headers)
    assert live_stream[0] == 200 and live_stream[2].endswith(b"\r\n\r\n")
    events = sse_events(live_stream[2])
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events) == (
        answer_text("A", "hello gemini")
    )
    assert live_whole.status_code == 200 and isinstance(live_array.json(), list)

    files = wait_for_files(proxy.cassette_dir, 3)
    assert len(files) == 3
    for path in files:
        text = path.read_text()
        assert GOOGLE_KEY not in text and "surface-secret" not in text
        assert json.loads(text)["request"]["headers"] in ({}, {"x-goog-api-client": "genai-py/1.0"})
    stream_doc = next(d for d in docs(proxy.cassette_dir) if d["response"]["is_streaming"])
    assert stream_doc["response"]["body"][0].startswith("data: {")

    surface.stop()
    replay = proxy_factory(mode="replay")
    status, kind, data = raw_stream(replay, stream_url, body, headers)
    assert (status, kind) == (200, "text/event-stream")
    # Lines replay as lines: the same events (CRLF endings come back as LF).
    assert sse_events(data) == events
    with httpx.Client(proxy=replay.url, trust_env=False, timeout=30.0) as http:
        other_key = http.post(f"{whole_url}?key=AIzaSyOTHER-0123456789abcdefghijklmnopq", json=body)
        assert other_key.json() == live_whole.json()
        assert http.post(array_url, json=array_body).json() == live_array.json()


def test_llama_stack_messages_recordings_verify_and_count_their_usage():
    for name in LLAMA_MESSAGES:
        path = FIXTURES / name
        findings = catalog.verify_item(catalog.load_item(path, FIXTURES))
        assert not findings.errors, (name, findings.errors)
        usage = catalog.summarize(read_cassette(path)).usage
        body = json.loads(path.read_text())["response"]["body"]
        if isinstance(body, dict):
            assert usage["prompt_tokens"] == body["usage"]["input_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        view = catalog.reassemble(read_cassette(path))
        assert view["kind"] == "anthropic-message"
        if not isinstance(body, dict):  # a streamed answer: thinking, then the text
            deltas = [json.loads(x[5:]) for x in body if x.startswith("data:") and "_delta" in x]
            thinking = [d["delta"].get("thinking", "") for d in deltas if "delta" in d]
            assert view["thinking"] == "".join(thinking) and view["thinking"]
            assert view["text"] == "1, 2, 3, 4, 5"


def untimed(response: dict[str, Any]) -> dict[str, Any]:
    """A recorded response half without its recorded pacing (``response.timing``,
    test_agent_replay.py) and the other additive fields (``wire_form``, ``headers``:
    issue 19): the shape llama-stack's raw recordings have."""
    return {k: v for k, v in response.items() if k not in ("timing", "wire_form", "headers")}
