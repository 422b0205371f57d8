"""Secrets under other names (issue 9 finding 14): credential names matched by their
words at any depth, and every credential value a request carried scrubbed from all
that is written, the upstream's echo in its answer included. Real mitmdump (printing
its flow lines, no -q), httpx, the openai SDK and curl, a key-checking upstream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cassette_proxy.cassette import read_cassette
from cassette_proxy.redact import (
    is_credential_name,
    redact_answer,
    redact_body,
    request_secrets,
)
from conftest import cassette_files, openai_client
from upstreams import answer_text, start_credential_upstream

CHAT = "/v1/chat/completions"
FIXTURES = Path(__file__).parent / "fixtures"
SEED = Path(__file__).parent.parent / "cassettes"
QUERY_NAMES = ["sig", "code", "subscription-key", "X-Amz-Signature", "X-Amz-Credential",
               "client_secret", "password", "secret", "auth"]  # fmt: skip
HEADER_NAMES = ["Authorization", "x-api-key", "anthropic-api-key", "x-goog-api-key",
                "x-auth-token", "api-key"]  # fmt: skip


def value(name: str, n: int) -> str:
    """A distinctive secret for a credential name in set n (no sk- or other prefix)."""
    return "".join(c for c in name.upper() if c.isalnum()) + f"VALUE{n}x0123456789"


def request_of(n: int) -> dict[str, Any]:
    headers = {name: value(name, n) for name in HEADER_NAMES}
    headers["Authorization"] = "Bearer " + value("Authorization", n)
    headers["x-request-tag"] = "kept"
    query = [(name, value(name, n)) for name in QUERY_NAMES]
    query += [("api-version", "2024-06-01"), ("X-Amz-Algorithm", "AWS4-HMAC-SHA256")]
    body = {
        "model": "fake-model",
        # The header's key typed into the prompt: the upstream echoes it in its answer.
        "messages": [{"role": "user", "content": f"my key is {value('Authorization', n)}"}],
        "secret": value("secret", n),
        "accessToken": value("accessToken", n),
        "clientSecret": value("clientSecret", n),
        "private_key": value("private_key", n),
        "aws_secret_access_key": value("aws_secret_access_key", n),
        "metadata": {"session_token": value("session_token", n), "tokens": "5",
                     "deep": [{"credentials": {"value": value("credentials", n)}}]},
        # LLM fields with credential-like words: data, kept as sent.
        "max_tokens": 50, "max_completion_tokens": 60, "top_k": 3,
        "logit_bias": {"50256": -100}, "prompt_cache_key": "cache-me-please",
        "keys": ["a", "b"], "authors": "someone",
    }  # fmt: skip
    return {"headers": headers, "query": query, "body": body}


def needles(n: int) -> list[str]:
    names = [*HEADER_NAMES, *QUERY_NAMES, "secret", "accessToken", "clientSecret",
             "private_key", "aws_secret_access_key", "session_token", "credentials",
             "WRONGKEY", "goog-query-key"]  # fmt: skip
    return [value(name, n) for name in names]


def every_byte_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def chat_content(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: {")]
        return "".join(
            (c["choices"][0]["delta"].get("content") or "") if c["choices"] else ""
            for c in map(json.loads, events)
        )
    return response.json()["choices"][0]["message"]["content"]


def test_credentials_under_other_names_never_reach_a_cassette_nor_the_terminal(
    proxy_factory, tmp_path
):
    upstream = start_credential_upstream(
        "A", accepted_keys={value("x-api-key", 1), value("goog-query-key", 1)}
    )
    upstream_gone = upstream.stop
    recorded_headers = [*HEADER_NAMES, "x-request-tag"]
    # flow_detail=3: mitmdump prints each flow's URL, headers and bodies; a wide
    # terminal, so no line is cut before its secrets.
    proxy = proxy_factory(
        mode="auto",
        options={"cassette_record_headers": recorded_headers, "flow_detail": 3},
        env={"COLUMNS": "4000"},
    )

    def send(n: int, stream: bool) -> httpx.Response:
        r = request_of(n)
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as http:
            return http.post(
                upstream.url + CHAT,
                params=r["query"],
                json={**r["body"], "stream": stream},
                headers=r["headers"],
            )

    def wrong_key(n: int) -> openai.AuthenticationError:
        client = openai_client(proxy, upstream, api_key=value("WRONGKEY", n))  # no sk- prefix
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "wrong key"}]
            )
        return caught.value

    def google_models(n: int) -> dict[str, Any]:
        # curl, with the key in the query (?key=), as Google's APIs take it.
        url = f"{upstream.url}/v1/models?key={value('goog-query-key', n)}"
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-x", proxy.url, url],
            capture_output=True, check=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        return json.loads(out.stdout)

    live = [send(1, stream=False), send(1, stream=True)]
    assert [r.status_code for r in live] == [200, 200]
    assert chat_content(live[0]) == answer_text("A", f"my key is {value('Authorization', 1)}")
    assert chat_content(live[1]) == chat_content(live[0])
    live_error = wrong_key(1)
    assert live_error.status_code == 401
    assert value("WRONGKEY", 1) in live_error.message  # the client sees the echo
    live_models = google_models(1)
    assert live_models["object"] == "list"
    # The upstream got every credential: the proxy keeps them out of what it writes.
    first = upstream.requests[0]
    assert value("sig", 1) in first.path and value("secret", 1).encode() in first.body

    files = cassette_files(proxy.cassette_dir)
    assert len(files) == 4
    written = every_byte_under(proxy.cassette_dir)
    terminal = proxy.log_text()  # mitmdump's own flow lines, printed without -q
    assert "POST http://127.0.0.1" in terminal
    for needle in needles(1):
        assert needle.encode() not in written, needle
        assert needle not in terminal, needle

    chats = [c for c in map(read_cassette, files) if "secret" in (c.request.body or {})]
    assert len(chats) == 2
    for c in chats:
        assert c.request.headers == {"x-request-tag": "kept"}
        url = c.request.url or ""
        for name in QUERY_NAMES:
            assert f"{name}=REDACTED" in url, name
        assert "api-version=2024-06-01" in url and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
        body = c.request.body
        for name in ("secret", "accessToken", "clientSecret", "private_key",
                     "aws_secret_access_key"):  # fmt: skip
            assert body[name] == "REDACTED", name
        assert body["metadata"] == {"session_token": "REDACTED", "tokens": "5",
                                    "deep": [{"credentials": {"value": "REDACTED"}}]}  # fmt: skip
        assert body["messages"][0]["content"] == "my key is REDACTED"
        sent = request_of(1)["body"]
        for name in ("max_tokens", "max_completion_tokens", "top_k", "logit_bias",
                     "prompt_cache_key", "keys", "authors"):  # fmt: skip
            assert body[name] == sent[name], name
    echoes = [f for f in files if "Incorrect API key provided: REDACTED" in f.read_text()]
    assert len(echoes) == 1

    # Offline, the same requests with other credentials replay from the same cassettes.
    upstream_gone()
    again = [send(2, stream=False), send(2, stream=True)]
    assert [r.status_code for r in again] == [200, 200]
    assert all("x-cassette-file" in r.headers for r in again)
    redacted_echo = answer_text("A", "my key is REDACTED")
    assert chat_content(again[0]) == chat_content(again[1]) == redacted_echo
    assert again[0].json()["usage"] == live[0].json()["usage"]
    replayed_error = wrong_key(2)
    assert replayed_error.status_code == 401
    assert "Incorrect API key provided: REDACTED" in replayed_error.message
    assert google_models(2) == live_models
    assert proxy.log_text().count("auto hit ") == 4  # all from cassettes, none forwarded


YES = ["sig", "subscription-key", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
       "client_secret", "password", "secret", "auth", "secret", "accessToken", "clientSecret",
       "private_key", "aws_secret_access_key", "session_token", "api_key", "apiKey", "APIKEY",
       "apikey", "x-api-key", "anthropic-api-key", "x-goog-api-key", "AWSAccessKeyId",
       "ocp-apim-subscription-key", "authorization", "Proxy-Authorization", "access_token",
       "refresh_token", "id_token", "x-auth-token", "passwd", "credentials", "Cookie",
       "oauth_signature", "subject_token", "delegated_refresh_token", "token", "key"]  # fmt: skip
NO = ["max_tokens", "tokens", "top_k", "keys", "input_tokens", "output_tokens", "prompt_tokens",
      "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
      "max_completion_tokens", "max_output_tokens", "maxOutputTokens", "budget_tokens",
      "logit_bias", "authors", "author", "tokenizer", "keywords", "monkey", "prompt_cache_key",
      "idempotency-key", "eos_token", "token_type", "expires_in", "auth_uri", "token_uri",
      "thoughtSignature", "signature_method", "stop_token_ids", "prompt_token_ids", "token_strs",
      "X-Amz-SignedHeaders", "x-ratelimit-remaining-tokens", "api-version", "public_key",
      "top_logprobs", "logprobs", "model"]  # fmt: skip


def test_credential_names_are_matched_by_their_words():
    assert [n for n in YES if not is_credential_name(n)] == []
    assert [n for n in NO if is_credential_name(n)] == []


def test_shapes_where_a_credential_word_is_data():
    body = {
        "logprobs": {"content": [{"token": "Hello", "logprob": -0.1, "top_logprobs": [
            {"token": "Hi", "logprob": -2.0}]}]},
        "filters": {"type": "eq", "key": "region", "value": "us"},
        "content": [{"type": "thinking", "thinking": "...", "signature": "EqQBCgIYAhIM"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"api_key": {"type": "string"}},
            "required": ["api_key"]}}}],
    }  # fmt: skip
    assert redact_body(body) is body
    assert redact_body({"auth": {"user": "u", "secrets": ["a", "b"]}}) == {
        "auth": {"user": "REDACTED", "secrets": ["REDACTED", "REDACTED"]}
    }


def test_placeholder_keys_are_not_hunted_through_answers():
    for placeholder in ("EMPTY", "ollama", "not-needed", "sk-none"):
        assert request_secrets([("authorization", f"Bearer {placeholder}")], [], None) == set()
    found = request_secrets([("x-api-key", "abc123DEF456ghi")], [("sig", "s1g-0123456")], None)
    assert found == {"abc123DEF456ghi", "s1g-0123456"}


def recorded_files() -> list[Path]:
    return sorted([*FIXTURES.rglob("*.json"), *SEED.rglob("*.json")])


def test_no_recorded_llm_request_or_answer_is_redacted():
    """Every real recording the tests carry (llama-stack's, the seed): the name rules
    change nothing in a request body (so every key is what it was) nor in an answer."""
    files = recorded_files()
    assert len(files) >= 50
    for path in files:
        doc = json.loads(path.read_text())
        request, response = doc["request"], doc["response"]
        for body in (request.get("body"), request.get("payload")):
            assert redact_body(body) == body, path
        assert redact_answer(response, frozenset()) == response, path


# ---- form-encoded token exchanges (issue 9 finding 15a) --------------------------------

WATSONX_CHAT = "/ml/v1/text/chat?version=2023-10-25"


def grants(n: int) -> dict[str, dict[str, str]]:
    """IBM IAM, Azure AD client credentials, Google's JWT bearer: credentials of set n."""
    return {
        "/identity/token": {
            "grant_type": "urn:ibm:params:oauth:grant-type:apikey",
            "apikey": value("ibm-apikey", n),
        },
        "/oauth2/v2.0/token": {
            "grant_type": "client_credentials",
            "client_id": "app-0001",
            "client_secret": value("azure-client-secret", n),
            "scope": "https://cognitiveservices.azure.com/.default",
        },
        "/token": {
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": "eyJhbGciOiJSUzI1NiJ9." + value("google-assertion", n),
        },
    }


def test_form_encoded_token_exchanges_are_keyed_recorded_and_replayed_without_tokens(
    proxy_factory,
):
    upstream = start_credential_upstream("A")
    proxy = proxy_factory(mode="auto")

    def session(http_proxy: str, n: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Each grant: exchange it for a token (httpx, as the SDKs post forms), then call
        the API with ``Authorization: Bearer <token>``."""
        out = []
        with httpx.Client(proxy=http_proxy, trust_env=False, timeout=30) as http:
            for path, grant in grants(n).items():
                token = http.post(upstream.url + path, data=grant)
                assert token.status_code == 200, token.text
                access = token.json()["access_token"]
                chat = http.post(
                    upstream.url + WATSONX_CHAT,
                    json={"model_id": "ibm/granite", "project_id": "p-1",
                          "messages": [{"role": "user", "content": f"after {path}"}]},
                    headers={"Authorization": f"Bearer {access}"},
                )  # fmt: skip
                assert chat.status_code == 200, chat.text
                out.append((token.json(), chat.json()))
        return out

    def curl_exchange(http_proxy: str, n: int) -> dict[str, Any]:
        # curl -d posts application/x-www-form-urlencoded, as in IBM's own docs.
        grant = grants(n)["/identity/token"]
        data = f"grant_type={grant['grant_type']}&apikey={grant['apikey']}"
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-x", http_proxy, "-d", data,
             upstream.url + "/identity/token"],
            capture_output=True, check=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        return json.loads(out.stdout)

    live = session(proxy.url, 1)
    live_curl = curl_exchange(proxy.url, 1)
    issued = [token["access_token"] for token, _ in live]
    assert all(t.startswith("access-A-") for t in issued)
    assert live_curl == live[0][0]

    files = cassette_files(proxy.cassette_dir)
    # Three exchanges, three calls; curl's exchange is the same request again, so it is
    # the second answer of the first exchange's sequence (<hash>.2.json).
    assert len(files) == 7
    assert len([p for p in files if p.name.count(".") == 2]) == 1
    written = every_byte_under(proxy.cassette_dir)
    credentials = [v for grant in grants(1).values() for v in grant.values()]
    credentials = [c for c in credentials if "VALUE1" in c]
    tokens = [v for token, _ in live for k, v in token.items() if k.endswith("_token")]
    assert len(credentials) == 3 and len(tokens) == 9
    for secret in [*credentials, *tokens, "eyJhbGciOiJSUzI1NiJ9"]:
        assert secret.encode() not in written, secret
    exchanges = [c for c in map(read_cassette, files) if "grant_type" in (c.request.body or {})]
    assert len(exchanges) == 4  # curl's is the second answer of the IBM exchange
    for c in exchanges:
        assert c.request.headers == {"content-type": "application/x-www-form-urlencoded"}
        answer = c.response.body["body"] if "body" in c.response.body else c.response.body
        assert {k: answer[k] for k in ("access_token", "refresh_token", "id_token")} == {
            "access_token": "REDACTED", "refresh_token": "REDACTED", "id_token": "REDACTED"
        }  # fmt: skip
        assert answer["token_type"] == "Bearer" and answer["expires_in"] == 3600
    azure = next(c for c in exchanges if c.request.body["grant_type"] == "client_credentials")
    assert azure.request.body == {
        "grant_type": "client_credentials",
        "client_id": "app-0001",
        "client_secret": "REDACTED",
        "scope": "https://cognitiveservices.azure.com/.default",
    }
    checked = subprocess.run(
        [sys.executable, "-m", "cassette_proxy.cli", "verify", "--cassette-dir",
         str(proxy.cassette_dir)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert checked.returncode == 0 and "0 error(s), 0 warning(s)" in checked.stdout, checked

    # Replay only, the identity server and the API gone, other credentials: the client
    # gets the placeholder token, sends it back as a bearer, and every call replays.
    upstream.stop()
    proxy.stop()
    replay = proxy_factory(mode="replay", cassette_dir=proxy.cassette_dir)
    again = session(replay.url, 2)
    for (live_token, live_chat), (token, chat) in zip(live, again, strict=True):
        assert token == {**live_token, "access_token": "REDACTED",
                         "refresh_token": "REDACTED", "id_token": "REDACTED"}  # fmt: skip
        assert chat == live_chat
    assert curl_exchange(replay.url, 2) == again[0][0]
    assert replay.log_text().count("replay hit POST ") == 7
    assert "passthrough" not in replay.log_text()


def test_a_streamed_echo_split_across_chunks_or_sse_lines_is_scrubbed():
    key = "ECHOEDKEY1x0123456789"
    pieces = ["my key is ECH", "OEDKEY1x01", "23456789 ok"]
    typed = {"is_streaming": True, "body": [
        {"__type__": "t", "__data__": {"choices": [{"delta": {"content": p}}]}} for p in pieces
    ]}  # fmt: skip
    got = redact_answer(typed, frozenset({key}))
    text = "".join(c["__data__"]["choices"][0]["delta"]["content"] for c in got["body"])
    assert text == "my key is REDACTED ok"
    lines = ["event: content_block_delta"]
    for p in pieces:
        delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": p}}
        lines += [f"data: {json.dumps(delta, separators=(',', ':'))}", ""]
    raw = redact_answer({"is_streaming": True, "status": 200, "body": lines}, frozenset({key}))
    assert key[:6] not in "".join(raw["body"]) and raw["body"][0] == lines[0]
    deltas = [json.loads(line[6:])["delta"]["text"] for line in raw["body"][1::2]]
    assert "".join(deltas) == "my key is REDACTED ok"
    assert raw["body"][1].startswith('data: {"type":"content_block_delta"')  # still compact
    untouched = {"is_streaming": True, "body": lines}
    assert redact_answer(untouched, frozenset({"NOTTHERE0123456"})) is untouched
