"""Conformance with llama-stack's recordings (issue 3): 54 real files, served as they are.

One real mitmdump in replay mode points its ``cassette_dir`` at the unmodified fixtures.
Each of the 48 files marked ``parsed-equal`` in manifest.tsv is re-issued through it
from its recorded kwargs by the client that made the original call (the openai SDK for
``/v1/*`` typed calls, extra_body / extra_query included; the ollama client for
``/api/*``; httpx for raw-HTTP recordings), with the recording's test id in
``X-Cassette-Test-Id`` when it has one, as llama-stack's test context did. What the
client parses must equal the recorded ``__data__``. The other 6 load without error
and are never served.
"""

from __future__ import annotations

import csv
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama
import openai
import pytest
from cassette_proxy.store import CassetteStore
from conftest import Proxy, start_proxy

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llama-stack"
with (FIXTURES / "manifest.tsv").open() as _f:
    ROWS = list(csv.DictReader(_f, delimiter="\t"))
REPLAYABLE = [r for r in ROWS if r["wire_replay"] == "parsed-equal"]
# OGX's tool-level Tavily web_search: answers POST https://api.tavily.com/search (issue 19,
# tests/test_replay_fidelity.py), not the openai/ollama clients reissued here.
TAVILY = [r for r in ROWS if r["wire_replay"] == "tavily-http"]
NOT_SERVED = [r for r in ROWS if r["wire_replay"] not in ("parsed-equal", "tavily-http")]
TEST_ID_HEADER = "X-Cassette-Test-Id"
MODEL_TYPES = ("openai.types.model.Model", "ollama._types.ListResponse")


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def dump(obj: Any) -> Any:
    """What a client parsed, as JSON: only the fields the wire carried."""
    return obj.model_dump(mode="json", exclude_unset=True)


@pytest.fixture(scope="module")
def replay_proxy(tmp_path_factory: pytest.TempPathFactory, mitm_confdir: Path) -> Iterator[Proxy]:
    proxy = start_proxy(
        tmp_path_factory.mktemp("conformance"),
        mode="replay",
        cassette_dir=FIXTURES,
        confdir=mitm_confdir,
    )
    yield proxy
    proxy.stop()


def http_client(proxy: Proxy, headers: dict[str, str]) -> httpx.Client:
    # HTTPS hosts (api.openai.com, Azure, Bedrock, ...) go through CONNECT with the proxy's CA.
    verify = ssl.create_default_context(cafile=str(proxy.ca_cert))
    return httpx.Client(
        proxy=proxy.url, verify=verify, trust_env=False, timeout=60, headers=headers
    )


def scope_headers(doc: dict[str, Any]) -> dict[str, str]:
    test_id = doc.get("test_id")
    return {TEST_ID_HEADER: test_id} if test_id else {}


def base_url(request: dict[str, Any]) -> str:
    """The caller's base URL: llama-stack wrote ``base_url.rstrip("/") + endpoint``."""
    url, endpoint = request["url"], request["endpoint"]
    assert url.endswith(endpoint), (url, endpoint)
    return url[: -len(endpoint)]


def merged_model_list(doc: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
    """The model list replayed for a request: every recording of the same request (its
    hash material: method, URL path, body, test id) against the same upstream host and
    port merged, union by id, sorted by id (issue 18.4: another host's models never join
    in); a list recorded once is served as it is."""
    request = doc["request"]
    url = urlsplit(request["url"])
    mine = (request["method"], url.path, json.dumps(request["body"]), doc.get("test_id"),
            url.netloc)  # fmt: skip
    seen: dict[str, Any] = {}
    kind = None
    group = []
    for row in sorted(REPLAYABLE, key=lambda r: r["filename"]):
        other = load(row["filename"])
        req = other["request"]
        theirs = (req.get("method"), urlsplit(req.get("url") or "").path,
                  json.dumps(req.get("body")), other.get("test_id"),
                  urlsplit(req.get("url") or "").netloc)  # fmt: skip
        if theirs == mine:
            group.append(other["response"]["body"])
    if len(group) == 1:  # nothing to merge: served as recorded, in its own order
        body = group[0]
        return [m["__data__"] for m in body] if isinstance(body, list) else body["__data__"]
    for body in group:
        if isinstance(body, list):
            kind = "openai"
            seen.update({m["__data__"]["id"]: m["__data__"] for m in body})
        else:
            kind = "ollama"
            seen.update({m["model"]: m for m in body["__data__"]["models"]})
    ordered = [seen[k] for k in sorted(seen)]
    return ordered if kind == "openai" else {"models": ordered}


def expected_of(doc: dict[str, Any]) -> Any:
    response = doc["response"]
    body = response["body"]
    if response.get("is_exception"):
        data = response["exception_data"]
        return {"status": data["status_code"], "error": data["body"]}
    first = body[0] if isinstance(body, list) and body else body
    if isinstance(first, dict) and first.get("__type__") in MODEL_TYPES:
        return merged_model_list(doc)
    if isinstance(body, list):
        return [x["__data__"] if isinstance(x, dict) and "__data__" in x else x for x in body]
    if isinstance(body, dict) and "__data__" in body:
        return body["__data__"]
    return {"status": response.get("status", 200), "body": body}


# ---- the clients, as the original callers used them -------------------------------------


def via_openai(proxy: Proxy, doc: dict[str, Any]) -> Any:
    request = doc["request"]
    client = openai.OpenAI(
        base_url=base_url(request),
        api_key="sk-conformance-0000",
        http_client=http_client(proxy, scope_headers(doc)),
        max_retries=0,
    )
    kwargs = dict(request["body"])
    endpoint = request["endpoint"]
    try:
        if endpoint == "/v1/models":
            return [dump(m) for m in client.models.list(**kwargs)]
        create = {
            "/v1/chat/completions": client.chat.completions.create,
            "/v1/completions": client.completions.create,
            "/v1/embeddings": client.embeddings.create,
        }[endpoint]
        result = create(**kwargs)
        if kwargs.get("stream"):
            return [dump(chunk) for chunk in result]
        return dump(result)
    except openai.APIStatusError as e:
        return {"status": e.status_code, "error": e.body}


def via_ollama(proxy: Proxy, doc: dict[str, Any]) -> Any:
    request = doc["request"]
    client = ollama.Client(
        host=base_url(request),
        proxy=proxy.url,
        trust_env=False,
        timeout=60,
        headers=scope_headers(doc),
    )
    kwargs = dict(request["body"])
    endpoint = request["endpoint"]
    if endpoint == "/api/generate":
        result: Any = client.generate(**kwargs)
    elif endpoint == "/api/chat":
        result = client.chat(**kwargs)
    elif endpoint == "/api/embeddings":
        result = client.embed(**kwargs)  # llama-stack's label for AsyncClient.embed
    elif endpoint == "/api/tags":
        result = client.list()
    elif endpoint == "/api/ps":
        result = client.ps()
    elif endpoint == "/api/pull":
        # The model was positional, so the recording's body is {}; any model reaches it.
        result = client.pull(request.get("model") or "llama3.2-vision:11b")
    else:
        raise AssertionError(f"no ollama call for {endpoint}")
    if isinstance(result, Iterator):
        return [dump(x) for x in result]
    return dump(result)


def via_httpx(proxy: Proxy, doc: dict[str, Any]) -> Any:
    request = doc["request"]
    with http_client(proxy, scope_headers(doc)) as http:
        r = http.request(request.get("method", "POST"), request["url"], json=request["payload"])
        if doc["response"].get("is_streaming"):
            return list(r.iter_lines())
        return {"status": r.status_code, "body": r.json()}


def reissue(proxy: Proxy, doc: dict[str, Any]) -> Any:
    request = doc["request"]
    if "payload" in request:
        return via_httpx(proxy, doc)
    if request["endpoint"].startswith("/api/"):
        return via_ollama(proxy, doc)
    return via_openai(proxy, doc)


# ---- the tests -------------------------------------------------------------------------


def test_manifest_has_the_expected_split():
    assert len(ROWS) == 54
    assert len(REPLAYABLE) == 48
    assert len(TAVILY) == 1
    assert (
        sorted(r["wire_replay"] for r in NOT_SERVED) == ["not-wire-replayable"] * 3 + ["stale"] * 2
    )


@pytest.mark.parametrize(
    "row", REPLAYABLE, ids=[f"{r['filename'][:18]}-{r['category']}" for r in REPLAYABLE]
)
def test_each_wire_replayable_recording_parses_back_equal(replay_proxy: Proxy, row):
    doc = load(row["filename"])
    got = reissue(replay_proxy, doc)
    expected = expected_of(doc)
    if isinstance(expected, list) and isinstance(got, list):
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"object {i} of {len(expected)} differs"
    else:
        assert got == expected


def test_every_fixture_loads_and_only_the_replayable_ones_are_indexed():
    report = CassetteStore(FIXTURES).load()
    assert report.bad == []
    assert report.loaded == 54
    skipped = sorted(line.split(":", 1)[0] for line in report.unservable)
    assert skipped == sorted(r["filename"] for r in NOT_SERVED)
    reasons = " ".join(report.unservable)
    assert reasons.count("stale") == 2


def test_the_five_are_reported_and_never_served(replay_proxy: Proxy):
    log = replay_proxy.wait_for_log("not served")
    for row in NOT_SERVED:
        assert row["filename"] in log
    assert "cassette skipped" not in log  # none of the 54 is a bad file
    # The stale chat recordings: neither the call their caller made nor their label hits.
    for row in (r for r in NOT_SERVED if r["wire_replay"] == "stale"):
        doc = load(row["filename"])
        request = doc["request"]
        with http_client(replay_proxy, {}) as http:
            for url in (request["url"], base_url(request) + "/v1/chat/completions"):
                r = http.post(url, json=request["body"])
                assert r.status_code == 404 and "x-cassette-miss" in r.headers, url
