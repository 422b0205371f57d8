"""orjson stands in for json only where both read the same value (jsontext.py)."""

from __future__ import annotations

import json

import orjson
from cassette_proxy.cassette import _parse_json
from cassette_proxy.jsontext import orjson_reads_alike
from cassette_proxy.streams import json_payload
from hypothesis import given, settings
from hypothesis import strategies as st

BIG = 18446744073709551616  # 2**64: orjson reads it as a float


def test_a_long_digit_run_inside_a_string_is_read_by_orjson():
    raw = b'{"id": "chatcmpl-6744961469434386963b0837", "n": 3}'
    assert orjson_reads_alike(raw)
    assert json_payload(raw) == (json.loads(raw), True)


def test_an_integer_beyond_64_bits_is_left_to_json():
    for raw in [b'{"n": 18446744073709551616}', b'[-9223372036854775809]',
                b'{"s": "a \\" quote", "n": 12345678901234567890123}']:  # fmt: skip
        assert not orjson_reads_alike(raw)
        value, by_orjson = json_payload(raw)
        assert value == json.loads(raw) and not by_orjson
        assert _parse_json(raw) == json.loads(raw)
    assert json_payload(b"[%d]" % BIG)[0] == [BIG]  # an int, not 1.8446744073709552e+19


def test_an_escaped_quote_does_not_end_a_string_early():
    # Were the string taken to end at \", the digits would look outside it: refused,
    # which is safe; the digits outside a string after it must be seen though.
    assert orjson_reads_alike(b'["a\\"1234567890123456789012"]')
    assert not orjson_reads_alike(b'["a\\\\", 1234567890123456789012]')


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('0123456789"\\ab-'), max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_where_orjson_is_trusted_it_reads_what_json_reads(value):
    raw = json.dumps(value).encode()
    if orjson_reads_alike(raw):
        assert orjson.loads(raw) == json.loads(raw)
    assert _parse_json(raw) == json.loads(raw)
    got, _ = json_payload(raw)
    assert got == json.loads(raw)
