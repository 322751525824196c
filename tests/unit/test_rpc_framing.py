"""SPDK's JSON-RPC framing codec, fed bytes; cpumask parsing; the rpc_schema check."""

import pytest

from vhostd import cpumask
from vhostd.errors import InvalidArgument
from vhostd.rpc import schema
from vhostd.rpc.framing import FramingError, JsonStreamDecoder, decode_document, encode_response


def values(decoder):
    out = []
    while True:
        complete, value = decoder.next_value()
        if not complete:
            return out
        out.append(value)


def test_concatenated_values_without_separators():
    d = JsonStreamDecoder()
    d.feed(b'{"a":1}{"b":[1,2]}  \n[{"c":"}"}]')
    assert values(d) == [{"a": 1}, {"b": [1, 2]}, [{"c": "}"}]]


def test_values_split_across_feeds_wait_for_the_rest():
    d = JsonStreamDecoder()
    d.feed(b'{"method": "x", "params": {"s": "a\\"')
    assert values(d) == []
    d.feed(b'b"}}')
    assert values(d) == [{"method": "x", "params": {"s": 'a"b'}}]


def test_bare_scalars_end_at_a_delimiter():
    d = JsonStreamDecoder()
    d.feed(b"123")
    assert values(d) == []
    d.feed(b" true ")
    assert values(d) == [123, True]


@pytest.mark.parametrize("data", [b'{"a":}', b"}", b'{"a": tru}', b"\xff\xfe{}"])
def test_malformed_json_is_a_framing_error(data):
    d = JsonStreamDecoder()
    d.feed(data)
    with pytest.raises(FramingError):
        values(d)


def test_oversized_request_is_a_framing_error():
    d = JsonStreamDecoder(max_buffered=1024)
    d.feed(b'{"a": "' + b"x" * 2000)
    with pytest.raises(FramingError):
        values(d)


def test_responses_are_compact_with_a_newline_and_escaped_non_ascii():
    assert encode_response({"jsonrpc": "2.0", "id": 1, "result": "é/x"}) == \
        b'{"jsonrpc":"2.0","id":1,"result":"\\u00e9/x"}\n'


@pytest.mark.parametrize("text,cores", [("0x3", [0, 1]), ("3", [0, 1]), ("[0,2-4]", [0, 2, 3, 4]),
                                        ("0X10", [4])])
def test_cpumask_forms(text, cores):
    assert cpumask.parse(text) == cores


@pytest.mark.parametrize("text", ["", "0x0", "zz", "[3-1]", "[a]", "[0,1"])
def test_bad_cpumasks(text):
    with pytest.raises(InvalidArgument):
        cpumask.parse(text)


def test_cpumask_outside_the_app_mask_is_refused():
    with pytest.raises(InvalidArgument):
        cpumask.within([2], [0, 1])
    assert cpumask.format_hex([0, 1]) == "0x3" and cpumask.format_hex([4], prefix=False) == "10"


def test_checked_in_rpc_schemas_are_current():
    assert schema.main(["--check"]) == 0, "run: python -m vhostd.rpc.schema"


def test_nesting_deeper_than_spdk_allows_is_a_framing_error_before_decoding():
    d = JsonStreamDecoder()
    d.feed(b"[" * 64 + b"1" + b"]" * 64)
    assert values(d) == [eval("[" * 64 + "1" + "]" * 64)]
    for depth in (65, 1000, 100000):
        d = JsonStreamDecoder()
        d.feed(b'{"method":"x","params":' + b"[" * depth + b"]" * depth + b"}")
        with pytest.raises(FramingError, match="nested deeper"):
            d.next_value()
    d = JsonStreamDecoder()
    d.feed(b"[" * 65)                     # refused before the value is complete
    with pytest.raises(FramingError):
        d.next_value()


def test_decode_document_takes_exactly_one_value():
    assert decode_document(b' {"a": [1]} \n') == {"a": [1]}
    assert decode_document(b"17") == 17
    for bad in (b"", b"   ", b'{"a":1}{"b":2}', b'{"a":1} x', b"[1", b"[" * 65 + b"]" * 65, b"\xff"):
        with pytest.raises(FramingError):
            decode_document(bad)
