"""AWS Bedrock's streaming runtime through the proxy: boto3's converse_stream and
invoke_model_with_response_stream, answered in AWS eventstream frames by a small real
upstream (session_upstreams.py), recorded, then replayed with the upstream stopped."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import urllib3.exceptions
from botocore.config import Config
from cassette_proxy.families import eventstream
from conftest import cassette_files, wait_for_files
from session_upstreams import answer_for, start_bedrock_upstream

MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
ACCESS_KEY = "AKIATESTBEDROCK12345"
SECRET_KEY = "bedrock-secret-key-do-not-write-0123456789"


@pytest.fixture
def bedrock(tmp_path: Path):
    up = start_bedrock_upstream(tls_dir=tmp_path)
    yield up
    up.stop()


@pytest.fixture
def bedrock_plain():
    up = start_bedrock_upstream(delay=0.15)
    yield up
    up.stop()


def client(endpoint: str, proxy: Any = None, verify: Any = None, fault: str | None = None):
    """boto3 as a user sets it up: a proxy in its Config (CONNECT for https), a CA bundle."""
    config = Config(
        proxies={"https": proxy.url, "http": proxy.url} if proxy is not None else None,
        retries={"max_attempts": 1, "mode": "standard"},
        read_timeout=20,
        connect_timeout=5,
    )
    made = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_session_token="session-token-FQoGZXIvYXdzEJr-0123456789",
        config=config,
        verify=verify,
    )
    if fault is not None:

        def add(request: Any, **_: Any) -> None:
            request.headers["X-Cassette-Fault"] = fault

        made.meta.events.register("before-sign.bedrock-runtime.*", add)
    return made


def converse(c: Any, prompt: str) -> list[dict[str, Any]]:
    answer = c.converse_stream(
        modelId=MODEL, messages=[{"role": "user", "content": [{"text": prompt}]}]
    )
    return list(answer["stream"])


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )


def test_converse_stream_over_https_proxy_records_then_replays_offline(proxy_factory, bedrock):
    proxy = proxy_factory(
        options={
            "ssl_verify_upstream_trusted_ca": str(bedrock.cert),
            # Asked for by name: SigV4's headers are still never written, others are.
            "cassette_record_headers": ["x-amz-date", "x-amz-security-token", "user-agent"],
        }
    )
    live_client = client(f"https://localhost:{bedrock.port}", proxy, str(proxy.ca_cert))
    live = converse(live_client, "hello bedrock")
    assert text_of(live) == answer_for("hello bedrock")
    assert live[-1]["metadata"]["usage"]["outputTokens"] == 3
    [file] = wait_for_files(proxy.cassette_dir, 1)
    text = file.read_text()
    data = json.loads(text)
    response = data["response"]
    assert response["content_type"] == eventstream.CONTENT_TYPE
    assert response["is_streaming"] is True
    assert [c["headers"][":event-type"] for c in response["body"]] == [
        "messageStart", "contentBlockDelta", "contentBlockDelta", "contentBlockDelta",
        "contentBlockStop", "messageStop", "metadata",
    ]  # fmt: skip
    assert response["body"][1]["payload"]["delta"]["text"] == "echo:"
    assert len(response["timing"]["chunks_ms"]) == 7
    assert set(data["request"]["headers"]) == {"user-agent"}
    # SigV4: neither the key id, the signature, the session token nor the date is written.
    sent = bedrock.requests[0]["headers"]
    signature = sent["Authorization"].rsplit("Signature=", 1)[1]
    for secret in (ACCESS_KEY, SECRET_KEY, signature, "FQoGZXIvYXdzEJr", sent["X-Amz-Date"]):
        assert secret not in text
    path = "/model/" + MODEL.replace(":", "%3A") + "/converse-stream"  # as boto3 sends it
    assert data["request"]["url"] == f"https://localhost:{bedrock.port}{path}"

    bedrock.stop()
    # A new signature and date on every call: the same prompt still hits, offline.
    again = converse(
        client(f"https://localhost:{bedrock.port}", proxy, str(proxy.ca_cert)), "hello bedrock"
    )
    assert again == live
    assert len(cassette_files(proxy.cassette_dir)) == 1

    # A changed prompt is a miss, never another answer.
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        converse(
            client(f"https://localhost:{bedrock.port}", proxy, str(proxy.ca_cert)), "hello other"
        )
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert "miss" in proxy.log_text()


def test_invoke_with_response_stream_in_reverse_mode(proxy_factory, bedrock_plain):
    proxy = proxy_factory(reverse=bedrock_plain.url)
    c = client(proxy.url)
    answer = c.invoke_model_with_response_stream(
        modelId=MODEL, body=json.dumps({"prompt": "reverse words"})
    )
    live = [json.loads(e["chunk"]["bytes"]) for e in answer["body"]]
    assert [d["delta"]["text"] for d in live] == answer_for("reverse words").split(" ")
    [file] = wait_for_files(proxy.cassette_dir, 1)
    chunk = json.loads(file.read_text())["response"]["body"][0]
    assert json.loads(base64.b64decode(chunk["payload"]["bytes"])) == live[0]
    proxy.stop()
    bedrock_plain.stop()

    replay = proxy_factory(reverse=bedrock_plain.url, mode="replay")
    answer = client(replay.url).invoke_model_with_response_stream(
        modelId=MODEL, body=json.dumps({"prompt": "reverse words"})
    )
    assert [json.loads(e["chunk"]["bytes"]) for e in answer["body"]] == live


def test_cut_and_paced_replay(proxy_factory, bedrock_plain):
    proxy = proxy_factory(reverse=bedrock_plain.url)
    live = converse(client(proxy.url), "pace me please")  # 7 events, 0.15 s apart
    wait_for_files(proxy.cassette_dir, 1)
    proxy.stop()
    bedrock_plain.stop()

    replay = proxy_factory(reverse=bedrock_plain.url, mode="replay")
    # cut-after=2: two whole events, then the connection ends without the stream's end.
    events = []
    # botocore reads the stream through urllib3, which says the body ended early.
    with pytest.raises((botocore.exceptions.BotoCoreError, urllib3.exceptions.ProtocolError)):
        answer = client(replay.url, fault="cut-after=2").converse_stream(
            modelId=MODEL, messages=[{"role": "user", "content": [{"text": "pace me please"}]}]
        )
        for event in answer["stream"]:
            events.append(event)
    assert events == live[:2]
    assert "cut after 2 chunk(s)" in replay.log_text()

    paced = proxy_factory(reverse=bedrock_plain.url, mode="replay",
                          options={"cassette_pacing": "recorded"})  # fmt: skip
    started = time.monotonic()
    assert converse(client(paced.url), "pace me please") == live
    # Six gaps of 0.15 s were recorded: a paced replay cannot be quicker than most of that.
    assert time.monotonic() - started >= 0.6
    assert "paced x1" in paced.log_text()


def test_frames_round_trip_and_bad_bytes_are_refused():
    from session_upstreams import frame

    raw = frame("contentBlockDelta", {"delta": {"text": "hi"}, "contentBlockIndex": 0})
    chunk = eventstream.decode_frame(raw)
    assert chunk == {
        "headers": {":event-type": "contentBlockDelta", ":content-type": "application/json",
                    ":message-type": "event"},
        "payload": {"delta": {"text": "hi"}, "contentBlockIndex": 0},
    }  # fmt: skip
    assert eventstream.decode_frame(eventstream.encode_frame(chunk)) == chunk
    headers = {
        "n": {"type": "integer", "value": 7},
        "b": {"type": "bool", "value": False},
        "u": {"type": "uuid", "value": "12345678-1234-5678-1234-567812345678"},
    }
    typed = {"headers": headers, "payload_base64": base64.b64encode(b"\x00\xffnot json").decode()}
    assert eventstream.decode_frame(eventstream.encode_frame(typed)) == typed
    broken = raw[:-1] + bytes([raw[-1] ^ 1])
    with pytest.raises(eventstream.FrameError, match="message CRC"):
        eventstream.decode_frame(broken)
    recorder = eventstream.EventStreamRecorder()
    recorder.feed(raw[:5])
    recorder.feed(raw[5:] + raw[:20])
    with pytest.raises(Exception, match="inside a message"):
        recorder.response(clean_end=True)
    assert len(recorder.chunks) == 1


def test_cli_understands_eventstream_cassettes(proxy_factory, bedrock_plain):
    from cassette_proxy.cli import cli
    from click.testing import CliRunner

    proxy = proxy_factory(reverse=bedrock_plain.url)
    converse(client(proxy.url), "count my tokens")
    [file] = wait_for_files(proxy.cassette_dir, 1)
    proxy.stop()

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, [*args, "-d", str(proxy.cassette_dir)])
        assert result.exit_code == 0, result.output
        return result.output

    [row] = [json.loads(line) for line in run("ls", "--json").splitlines()]
    assert row["kind"] == "eventstream" and row["chunks"] == 8 and row["model"] == MODEL
    assert row["prompt"] == "count my tokens"
    shown = run("show", file.name[:12])
    assert f"text:\n    {answer_for('count my tokens')}" in shown
    assert "stop reason: end_turn" in shown
    assert "completion_tokens 4" in shown
    assert "1 cassette(s): 0 error(s), 0 warning(s)" in run("verify")
    stats = json.loads(run("stats", "--json"))
    assert stats["tokens"]["completion_tokens"] == 4
    # A frame that cannot be put on the wire again is a verify error.
    data = json.loads(file.read_text())
    data["response"]["body"][1]["headers"][":event-type"] = {"type": "nonsense"}
    file.write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["verify", "-d", str(proxy.cassette_dir)])
    assert result.exit_code != 0 and "cannot be replayed" in result.output


def test_eventstream_on_any_path_is_recorded_as_frames_never_as_lines():
    """Other AWS streams (SageMaker's response streams) reach the raw family: binary
    frames kept as text lines would replay garbled, so they are frames there too."""
    from cassette_proxy.families import classify, encode
    from session_upstreams import frame

    path = "/endpoints/my-endpoint/invocations-response-stream"
    family = classify("POST", path)
    assert family.name == "raw"
    recorder = family.stream_recorder(path, {}, eventstream.CONTENT_TYPE)
    frames = [frame("PayloadPart", {"Bytes": "aGk="}), frame("PayloadPart", {"Bytes": "eW8="})]
    recorder.feed(b"".join(frames))
    wire = encode(path, {}, recorder.response(clean_end=True))
    assert wire.content_type == eventstream.CONTENT_TYPE
    assert eventstream.split_frames(wire.body) == [
        eventstream.encode_frame(eventstream.decode_frame(f)) for f in frames
    ]
