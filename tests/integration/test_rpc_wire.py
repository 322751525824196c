"""SPDK's wire behaviour on the Unix socket, byte for byte: framing, errors, batches, notifications."""

import json
import socket

import pytest


def exchange(path, data, expect_close=False, timeout=5.0):
    """Send raw bytes; read until the peer stops (close, or a pause); returns (bytes, closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(data)
        s.settimeout(timeout if expect_close else 0.5)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return out, False
            if not chunk:
                return out, True
            out += chunk


def lines(raw):
    return [json.loads(line) for line in raw.decode().splitlines()]


@pytest.fixture
def sock(daemon):
    return daemon().rpc_socket


def test_reply_format_is_compact_with_key_order(sock):
    raw, _ = exchange(sock, b'{"jsonrpc":"2.0","method":"log_get_level","id":"abc"}')
    assert raw == b'{"jsonrpc":"2.0","id":"abc","result":"NOTICE"}\n'


def test_concatenated_requests_each_get_a_reply(sock):
    raw, _ = exchange(sock, b'{"method":"log_get_level","id":1}{"method":"spdk_get_version","id":2}\n')
    assert sorted(r["id"] for r in lines(raw)) == [1, 2]


def test_missing_jsonrpc_member_is_accepted(sock):
    raw, _ = exchange(sock, b'{"method":"log_get_level","id":7}')
    assert lines(raw) == [{"jsonrpc": "2.0", "id": 7, "result": "NOTICE"}]


def test_malformed_json_gets_parse_error_then_close(sock):
    raw, closed = exchange(sock, b'{"method": "log_get_level", "id": 1,,}', expect_close=True)
    assert lines(raw) == [{"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}]
    assert closed


@pytest.mark.parametrize("request_,code", [
    (b'{"jsonrpc":"1.0","method":"log_get_level","id":1}', -32600),
    (b'{"id":1}', -32600),
    (b'{"method":5,"id":1}', -32600),
    (b'{"method":"log_get_level","params":3,"id":1}', -32600),
    (b'"hello"', -32600),
    (b'{"method":"nope","id":1}', -32601),
])
def test_bad_envelopes_keep_the_connection_open(sock, request_, code):
    raw, closed = exchange(sock, request_ + b'{"method":"log_get_level","id":99}')
    replies = lines(raw)
    assert replies[0]["error"]["code"] == code
    assert replies[1] == {"jsonrpc": "2.0", "id": 99, "result": "NOTICE"}
    assert not closed


def test_notifications_get_no_success_reply_but_do_get_errors(sock):
    raw, _ = exchange(sock, b'{"method":"log_get_level"}{"method":"nope"}{"method":"log_get_level","id":null}')
    assert lines(raw) == [{"jsonrpc": "2.0", "id": None, "error": {"code": -32601, "message": "Method not found"}}]


def test_batches(sock):
    raw, _ = exchange(sock, b'[{"method":"log_get_level","id":1},{"method":"log_get_level"},5,'
                            b'{"method":"nope","id":3}]')
    (batch,) = lines(raw)
    assert isinstance(batch, list) and len(batch) == 3
    by_id = {r["id"]: r for r in batch}
    assert by_id[1]["result"] == "NOTICE" and by_id[3]["error"]["code"] == -32601
    assert by_id[None]["error"]["code"] == -32600
    raw, _ = exchange(sock, b"[]")
    assert lines(raw) == [{"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Invalid request"}}]
    raw, _ = exchange(sock, b'[{"method":"log_get_level"}]')
    assert raw == b""


def test_params_must_be_an_object(sock):
    raw, _ = exchange(sock, b'{"method":"bdev_get_bdevs","params":["x"],"id":1}')
    assert lines(raw)[0]["error"] == {"code": -32603, "message": "spdk_json_decode_object failed"}


@pytest.mark.parametrize("bad_id", [b"[1]", b'{"a":1}', b"true", b"[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]"])
def test_an_id_that_is_not_string_number_or_null_is_answered_with_id_null(sock, bad_id):
    raw, closed = exchange(sock, b'{"method":"log_get_level","id":' + bad_id + b"}")
    assert lines(raw) == [{"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Invalid request"}}]
    assert not closed
