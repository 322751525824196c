"""JSON-RPC fuzzing of a running daemon, on the Unix socket and on the HTTP endpoint.

Requests come from rpc_schema/*.json (schema-valid params, and params broken one way or another);
then raw bytes, truncated JSON, deep nesting and huge batches.  Every reply must be a JSON-RPC
response (a result, or an error object with an integer code and a message), no reply may carry a
traceback, and afterwards the daemon still answers and its log has no "Traceback".
"""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import examples
from tests.fuzz.rpc_strategies import ANY_JSON, load_schemas, request_strategy
from vhostd.rpc.framing import JsonStreamDecoder

SCHEMAS = load_schemas()
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow, HealthCheck.data_too_large])


# -- talking to the daemon --------------------------------------------------------------------
def unix_exchange(path: str, data: bytes, timeout: float = 20.0) -> tuple[list, bool]:
    """Send raw bytes, half-close, read until the daemon closes: (decoded replies, clean end).
    The daemon answers everything it parsed before it closes (or closes after a parse error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass               # closed after a parse error while we were still sending
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        raw = b""
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
    decoder = JsonStreamDecoder(max_buffered=64 << 20)
    decoder.feed(raw)
    replies = []
    while True:
        complete, value = decoder.next_value()
        if not complete:
            break
        replies.append(value)
    return replies, decoder.buffered == 0


def http_post(port: int, body: bytes, timeout: float = 20.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_response(reply, request_id=None) -> None:
    """One JSON-RPC response object, as SPDK sends it."""
    assert isinstance(reply, dict), reply
    assert reply.get("jsonrpc") == "2.0", reply
    assert "id" in reply, reply
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        err = reply["error"]
        assert isinstance(err, dict) and set(err) <= {"code", "message", "data"}, reply
        assert isinstance(err["code"], int) and not isinstance(err["code"], bool), reply
        assert isinstance(err["message"], str), reply
        assert "Traceback" not in json.dumps(err), reply
    if request_id is not None:
        assert reply["id"] == request_id, reply


def check_value(value) -> None:
    """A reply value: one response, or a non-empty batch of them."""
    if isinstance(value, list):
        assert value, "an empty batch reply"
        for item in value:
            check_response(item)
    else:
        check_response(value)


def check_alive(daemon, log_from: int = 0) -> None:
    """The daemon runs, answers on both endpoints, and logged no traceback since ``log_from``."""
    assert daemon.proc.poll() is None, "vhostd exited"
    assert "rpc_get_methods" in daemon.rpc("rpc_get_methods")
    status, body = http_post(daemon.http_port, b'{"jsonrpc":"2.0","method":"rpc_get_methods","id":1}')
    assert status == 200 and "rpc_get_methods" in json.loads(body)["result"]
    log = daemon.log()[log_from:]
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture
def d(fuzz_daemon):
    """The module's daemon; after each test it must still answer, with no traceback logged."""
    start = len(fuzz_daemon.log())
    yield fuzz_daemon
    check_alive(fuzz_daemon, start)


def request_bytes(method, params, request_id):
    req = {"jsonrpc": "2.0", "method": method, "id": request_id}
    if params is not None:
        req["params"] = params
    return json.dumps(req).encode()


# -- schema-driven requests -------------------------------------------------------------------
@settings(max_examples=examples(200, 4000), **FUZZ)
@given(call=request_strategy(SCHEMAS, valid=True), request_id=st.integers(0, 1 << 31))
def test_schema_valid_requests_get_a_jsonrpc_response(d, call, request_id):
    method, params, _ = call
    replies, _ = unix_exchange(d.rpc_socket, request_bytes(method, params, request_id))
    assert len(replies) == 1, replies
    check_response(replies[0], request_id)
    event("result" if "result" in replies[0] else "error %d" % replies[0]["error"]["code"])
    if "error" in replies[0]:
        # A refused valid-shaped call is a domain error, never the generic "server error".
        assert replies[0]["error"]["code"] != -32000, replies[0]


@settings(max_examples=examples(200, 4000), **FUZZ)
@given(call=request_strategy(SCHEMAS, valid=False), request_id=st.integers(0, 1 << 31))
def test_mutated_params_are_refused_with_an_error_object(d, call, request_id):
    method, params, surely_invalid = call
    replies, _ = unix_exchange(d.rpc_socket, request_bytes(method, params, request_id))
    assert len(replies) == 1, replies
    check_response(replies[0], request_id)
    if surely_invalid:
        assert "error" in replies[0], (method, params, replies[0])
    if "error" in replies[0]:
        assert replies[0]["error"]["code"] != -32000, replies[0]


@settings(max_examples=examples(80, 1500), **FUZZ)
@given(call=st.one_of(request_strategy(SCHEMAS, valid=True), request_strategy(SCHEMAS, valid=False)),
       request_id=st.one_of(st.integers(0, 1 << 31), st.text(max_size=10)))
def test_http_endpoint_answers_schema_requests_the_same_way(d, call, request_id):
    method, params, _ = call
    status, body = http_post(d.http_port, request_bytes(method, params, request_id))
    assert status == 200, (status, body)
    check_response(json.loads(body), request_id)


# -- envelopes, framing, sizes ----------------------------------------------------------------
ENVELOPES = st.dictionaries(
    st.sampled_from(["jsonrpc", "method", "params", "id", "extra"]) | st.text(max_size=6),
    st.one_of(ANY_JSON, st.sampled_from(["2.0", "rpc_get_methods", "bdev_get_bdevs", "log_get_level"])),
    max_size=5)


@settings(max_examples=examples(150, 3000), **FUZZ)
@given(values=st.lists(st.one_of(ENVELOPES, ANY_JSON), min_size=1, max_size=6))
def test_arbitrary_json_values_each_get_a_valid_reply_or_none(d, values):
    data = b"".join(json.dumps(v).encode() + b" " for v in values)
    replies, clean = unix_exchange(d.rpc_socket, data)
    assert clean
    for reply in replies:
        check_value(reply)
    # Bare top-level numbers and literals need a delimiter; everything else is answered (or is a
    # successful notification); a top-level number split across values may merge, so only bound.
    assert len(replies) <= len(values)


@settings(max_examples=examples(150, 4000), **FUZZ)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v, cut: json.dumps(v).encode()[:cut], ENVELOPES, st.integers(0, 200)),
    st.builds(lambda a, b: a + b, st.sampled_from([b"{", b"[", b'"', b"]", b"}", b"\xff", b"\x00", b"nul",
                                                   b'{"method":"rpc_get_methods","id":1}']),
              st.binary(max_size=50)),
))
def test_raw_bytes_and_truncated_json_on_the_unix_socket(d, data):
    replies, _ = unix_exchange(d.rpc_socket, data)
    for reply in replies:
        check_value(reply)
    if replies and isinstance(replies[-1], dict) and replies[-1].get("error", {}).get("code") == -32700:
        assert replies[-1]["id"] is None


@settings(max_examples=examples(80, 1500), **FUZZ)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v, cut: json.dumps(v).encode()[:cut], ENVELOPES, st.integers(0, 200)),
    st.builds(lambda v: json.dumps(v).encode(), ANY_JSON),
))
def test_raw_bytes_and_truncated_json_on_http(d, data):
    status, body = http_post(d.http_port, data)
    if status == 204:
        assert body == b""
        return
    assert status == 200, (status, body)
    check_value(json.loads(body))


NESTING = [10, 500, 999, 1000, 1001, 5000, 100000]


def nested(depth: int, inside: bytes = b"1") -> bytes:
    return b"[" * depth + inside + b"]" * depth


@pytest.mark.parametrize("depth", NESTING)
def test_deeply_nested_json_is_refused_without_harm(d, depth):
    for data in (nested(depth), b'{"method":"bdev_get_bdevs","id":1,"params":{"name":' + nested(depth) + b"}}",
                 b'{"method":"rpc_get_methods","id":' + nested(depth) + b"}"):
        replies, _ = unix_exchange(d.rpc_socket, data)
        assert len(replies) == 1, (depth, replies)
        check_value(replies[0])
        status, body = http_post(d.http_port, data)
        assert status == 200, (depth, status, body[:200])
        check_value(json.loads(body))
        if depth > 64:
            assert json.loads(body)["error"]["code"] == -32700


@pytest.mark.parametrize("count", [1, 1000, 4500, 15000])
def test_huge_batches_get_one_reply_per_request(d, count):
    batch = [{"jsonrpc": "2.0", "method": "log_get_level", "id": i} for i in range(count)]
    data = json.dumps(batch, separators=(",", ":")).encode()
    too_large = len(data) > 256 * 1024        # SPDK's receive buffer, and the HTTP body limit
    replies, _ = unix_exchange(d.rpc_socket, data, timeout=60)
    assert len(replies) == 1
    if too_large:
        assert replies[0]["error"]["code"] == -32700
    else:
        assert sorted(r["id"] for r in replies[0]) == list(range(count))
        for r in replies[0]:
            check_response(r)
    status, body = http_post(d.http_port, data, timeout=60)
    if too_large:
        assert status == 413
    else:
        assert status == 200 and len(json.loads(body)) == count


def test_oversized_and_huge_string_requests(d):
    for size in (1 << 10, 200 << 10, 300 << 10, 2 << 20):
        data = request_bytes("bdev_get_bdevs", {"name": "x" * size}, 5)
        replies, _ = unix_exchange(d.rpc_socket, data)
        assert len(replies) == 1
        check_response(replies[0])
        status, body = http_post(d.http_port, data)
        assert status in (200, 413), status
        if status == 200:
            check_response(json.loads(body), 5)


def test_random_method_names_do_not_grow_the_metrics_without_bound(d):
    """Unknown method names are counted under one label: a client cannot make /metrics (and the
    daemon's memory) grow with every name it invents."""
    def series():
        conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=20)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return sum(1 for line in text.splitlines() if line.startswith("vhostd_rpc_calls_total{"))

    before = series()
    batch = [{"method": "no_such_method_%d" % i, "id": i} for i in range(500)]
    replies, _ = unix_exchange(d.rpc_socket, json.dumps(batch).encode())
    assert all(r["error"]["code"] == -32601 for r in replies[0])
    assert series() <= before + 1


def test_daemon_survives_the_whole_module_with_a_clean_log(fuzz_daemon):
    check_alive(fuzz_daemon)
