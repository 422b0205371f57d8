"""Unit tests of the request key and the file-name hash (pure functions)."""

import hashlib
import json

from cassette_proxy import keys, matching


def test_key_ignores_key_order_and_float_noise_but_keeps_nulls():
    a = {"model": "m", "temperature": 0.7, "messages": [{"role": "user", "content": "hi"}]}
    b = {
        "messages": [{"content": "hi", "role": "user"}],
        "temperature": 0.700000001,
        "model": "m",
    }
    assert keys.request_key("POST", "/v1/chat/completions", a) == keys.request_key(
        "post", "/v1/chat/completions", b
    )
    # A null is not an absent field (issue 9 finding 1): only a loose key forgets it.
    with_null = {**b, "seed": None}
    exact = keys.request_key("POST", "/v1/chat/completions", a)
    assert keys.request_key("POST", "/v1/chat/completions", with_null) != exact
    assert exact in matching.loose_keys_for("POST", "/v1/chat/completions", with_null)


def test_key_treats_integral_floats_as_ints():
    # JavaScript serialises 0.0 as 0.
    assert keys.request_key("POST", "/p", {"t": 0.0}) == keys.request_key("POST", "/p", {"t": 0})
    assert keys.request_key("POST", "/p", {"t": True}) != keys.request_key("POST", "/p", {"t": 1})


def test_key_depends_on_method_path_body_and_query():
    base = keys.request_key("POST", "/v1/completions", {"prompt": "x"})
    assert base != keys.request_key("GET", "/v1/completions", {"prompt": "x"})
    assert base != keys.request_key("POST", "/v1/chat/completions", {"prompt": "x"})
    assert base != keys.request_key("POST", "/v1/completions", {"prompt": "y"})
    assert base != keys.request_key("POST", "/v1/completions", {"prompt": "x"}, [("a", "1")])
    assert keys.request_key("GET", "/m", {}, [("a", "1"), ("b", "2")]) == keys.request_key(
        "GET", "/m", {}, [("b", "2"), ("a", "1")]
    )


def test_recording_hash_is_llama_stack_documented_hash():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    normalized = {"method": "POST", "endpoint": "/v1/chat/completions", "body": body}
    expected = hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()
    assert keys.recording_hash("POST", "/v1/chat/completions", body) == expected
    assert len(expected) == 64


def test_seed_cassette_name_is_its_documented_hash_prefix(repo_root):
    seed = json.loads((repo_root / "cassettes" / "0806aef47037.json").read_text())
    req = seed["request"]
    # The documented hash takes the URL's path, version segment doubled and all.
    full = keys.recording_hash(req["method"], "/v1/v1/chat/completions", req["body"])
    assert full.startswith("0806aef47037")


def test_first_difference_names_the_field():
    assert keys.first_difference({"a": 1, "b": 2}, {"a": 1, "b": 3}) == "body.b"
    assert keys.first_difference({"a": [1, 2]}, {"a": [1]}).startswith("body.a (length")
    assert keys.first_difference({"a": 1}, {"a": 1, "z": 0}) == "body.z (only in the recording)"
    assert keys.first_difference({"a": 1}, {"a": 1}) is None
