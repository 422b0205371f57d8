"""Uploads (issue 11 item 6): multipart/form-data requests are recorded and replayed,
keyed by their form fields and each file's sha256 (never the boundary); the cassette
keeps each file's name, type, size and digest, not its bytes; another file is a miss.
Real mitmdump, the openai SDK's audio.transcriptions/translations, httpx, curl, and a
speech-to-text upstream on loopback that reads the parts with the standard library."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import wave
from pathlib import Path

import httpx
import openai
import pytest
from cassette_proxy.bodies import NotKeyable, parse_body
from cassette_proxy.cassette import read_cassette
from conftest import PYTHON_BIN, cassette_files, openai_client
from upstreams import start_credential_upstream, transcript_text

MARKER = b"CASSETTE-AUDIO-BYTES-NEVER-WRITTEN"


def speech(seconds: float = 0.05, tone: int = 7) -> bytes:
    """A small real WAV file (16 kHz mono), with a marker to look for on disk."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        frames = bytes((i * tone) % 256 for i in range(int(16000 * seconds) * 2))
        w.writeframes(frames + MARKER)
    return out.getvalue()


def every_byte_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PYTHON_BIN / "cassette-proxy"), "verify", "--cassette-dir", str(directory)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # translations' prompt
def test_uploads_record_by_fields_and_file_digest_and_replay_with_the_upstream_gone(
    proxy_factory, tmp_path
):
    upstream = start_credential_upstream("A")
    audio, other = speech(), speech(tone=11)
    digest = hashlib.sha256(audio).hexdigest()
    proxy = proxy_factory(mode="auto")

    def transcribe(client: openai.OpenAI, data: bytes) -> str:
        return client.audio.transcriptions.create(
            model="whisper-1", file=("speech.wav", data, "audio/wav"), language="en"
        ).text

    def translate(client: openai.OpenAI) -> str:
        return client.audio.translations.create(
            model="whisper-1", file=("speech.wav", audio, "audio/wav"), prompt="a greeting"
        ).text

    def with_httpx(http_proxy: str) -> tuple[httpx.Response, str]:
        with httpx.Client(proxy=http_proxy, trust_env=False, timeout=30) as http:
            request = http.build_request(
                "POST",
                upstream.url + "/v1/audio/transcriptions",
                files={"file": ("speech.wav", audio, "audio/wav")},
                data={"model": "whisper-1", "timestamp_granularities[]": ["word", "segment"]},
            )
            boundary = request.headers["content-type"].split("boundary=", 1)[1]
            return http.send(request), boundary

    def with_curl(http_proxy: str, path: Path) -> dict[str, str]:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-x", http_proxy, "-F", "model=whisper-1",
             "-F", f"file=@{path};type=audio/wav", upstream.url + "/v1/audio/transcriptions"],
            capture_output=True, check=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        return json.loads(out.stdout)

    wav = tmp_path / "speech.wav"
    wav.write_bytes(audio)
    client = openai_client(proxy, upstream)
    live = [transcribe(client, audio), translate(client)]
    live_httpx, boundary = with_httpx(proxy.url)
    live_curl = with_curl(proxy.url, wav)
    assert live[0] == transcript_text("A", audio, {"model": "whisper-1", "language": "en"})
    assert live_httpx.status_code == 200 and digest[:16] in live_httpx.json()["text"]
    assert digest[:16] in live_curl["text"]

    files = cassette_files(proxy.cassette_dir)
    assert len(files) == 4
    written = every_byte_under(proxy.cassette_dir)
    assert MARKER not in written and boundary.encode() not in written
    assert all(f.stat().st_size < 4096 for f in files)  # digests, not 1.6 KB of audio each
    cassettes = {json.dumps(c.request.body, sort_keys=True): c for c in map(read_cassette, files)}
    sdk = next(c for c in cassettes.values() if c.request.body.get("language") == "en")
    assert sdk.request.headers == {"content-type": "multipart/form-data"}
    assert sdk.request.endpoint == "/v1/audio/transcriptions"
    assert sdk.request.model == "whisper-1"
    assert sdk.request.body == {
        "model": "whisper-1",
        "language": "en",
        "file": {"filename": "speech.wav", "content_type": "audio/wav", "size": len(audio),
                 "sha256": digest},
    }  # fmt: skip
    grains = next(c for c in cassettes.values() if "timestamp_granularities[]" in c.request.body)
    assert grains.request.body["timestamp_granularities[]"] == ["word", "segment"]
    checked = verify(proxy.cassette_dir)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "0 error(s), 0 warning(s)" in checked.stdout + checked.stderr

    # The upstream gone, a replay-only proxy answers every upload as the live one did
    # (the SDK, httpx and curl each pick a new boundary), and another file is a miss.
    upstream.stop()
    proxy.stop()
    replay = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    client = openai_client(replay, upstream)
    assert [transcribe(client, audio), translate(client)] == live
    again, _ = with_httpx(replay.url)
    assert again.status_code == 200 and again.json() == live_httpx.json()
    assert "x-cassette-file" in again.headers
    assert with_curl(replay.url, wav) == live_curl
    with pytest.raises(openai.NotFoundError) as miss:
        transcribe(client, other)
    assert "cassette_miss" in str(miss.value.body) or "no recording" in miss.value.message
    log = replay.log_text()
    assert log.count("replay hit POST /v1/audio/") == 4
    assert "miss no recording for POST /v1/audio/transcriptions" in log
    assert "differs first at body.file.sha256" in log and "passthrough" not in log


def form(boundary: str, *parts: bytes, close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


def test_multipart_bodies_parse_by_fields_and_digests_or_say_why_not():
    part = b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
    file = (b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n\x00\x01\r\n\x02")  # fmt: skip
    kind = "multipart/form-data; boundary="
    a = parse_body(kind + "AAA", form("AAA", part, file))
    b = parse_body(kind + '"BBB"', b"preamble\r\n" + form("BBB", part, file))
    assert a == b and a.kind == "multipart" and a.marker == "multipart/form-data"
    assert a.value["file"] == {"filename": "a.wav", "content_type": "audio/wav", "size": 5,
                               "sha256": hashlib.sha256(b"\x00\x01\r\n\x02").hexdigest()}
    for content_type, body, why in [
        (kind + "AAA", form("AAA", part, close=False), "cut short"),
        ("multipart/form-data", form("AAA", part), "no boundary"),
        (kind + "AAA", b"no parts at all", "does not contain its boundary"),
        (kind + "AAA", form("AAA", b"Content-Disposition: form-data\r\n\r\nx"), "no name"),
    ]:
        with pytest.raises(NotKeyable, match=why):
            parse_body(content_type, body)


def test_form_bodies_parse_by_fields_and_curl_json_stays_json():
    kind = "application/x-www-form-urlencoded"
    a = parse_body(kind, b"grant_type=client_credentials&scope=a&scope=b&empty=")
    assert a.kind == "form" and a.marker == kind
    assert a.value == {"grant_type": "client_credentials", "scope": ["a", "b"], "empty": ""}
    # curl -d '{...}' without -H sends JSON as a form: it is keyed as the JSON it is.
    b = parse_body(kind, b'{"model": "m", "messages": []}')
    assert b.kind == "json" and b.value == {"model": "m", "messages": []} and b.marker is None
    assert parse_body("", b"").value == {}
    with pytest.raises(NotKeyable, match="not UTF-8"):
        parse_body(kind, b"a=\xff\xfe")
    with pytest.raises(NotKeyable, match=r"body is not JSON \(text/plain\)"):
        parse_body("text/plain; charset=utf-8", b"hello")
