"""JSON-RPC over HTTP with and without auth, /metrics, /healthz."""

import base64
import json
import urllib.error
import urllib.request

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.ports import free_tcp_port


def http(port, path="/", body=None, user=None, method=None):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                 data=json.dumps(body).encode() if body is not None else None,
                                 method=method or ("POST" if body is not None else "GET"))
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_rpc_with_basic_auth(daemon, tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("# operators\nadmin:s3cret\n")
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port, "--http-auth", str(auth))
    status, _ = http(port, body={"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1})
    assert status == 401
    status, _ = http(port, body={"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1}, user="admin:wrong")
    assert status == 401
    status, body = http(port, body={"jsonrpc": "2.0", "method": "bdev_malloc_create", "id": 1,
                                    "params": {"num_blocks": 64, "block_size": 512}}, user="admin:s3cret")
    assert status == 200 and json.loads(body) == {"jsonrpc": "2.0", "id": 1, "result": "Malloc0"}
    status, body = http(port, body=[{"jsonrpc": "2.0", "method": "log_get_level", "id": 1},
                                    {"jsonrpc": "2.0", "method": "nope", "id": 2}], user="admin:s3cret")
    assert status == 200 and {r["id"] for r in json.loads(body)} == {1, 2}
    assert http(port, "/metrics")[0] == 401
    status, body = http(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_http_without_auth_serves_loopback_and_warns(daemon):
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port)
    status, body = http(port, body={"method": "log_get_level", "id": 3})
    assert json.loads(body)["result"] == "NOTICE"
    assert "only loopback peers are served" in d.log()


def test_metrics_count_rpc_calls_and_bdev_io(daemon, tmp_path):
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port)
    d.rpc("bdev_malloc_create", name="M0", num_blocks=64, block_size=512)
    d.rpc("bdev_get_bdevs")
    status, body = http(port, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'vhostd_rpc_calls_total{method="bdev_malloc_create",outcome="ok"} 1.0' in text
    assert 'vhostd_bdev_ops_total{bdev="M0",op="read"} 0.0' in text
    assert "process_cpu_seconds_total" in text and "vhostd_reactor_poll_passes_total" in text


def test_unknown_method_names_share_one_metrics_label(daemon):
    port = free_tcp_port()
    daemon("--http", "127.0.0.1:%d" % port)
    status, body = http(port, body=[{"method": "no_such_method_%d" % i, "id": i} for i in range(200)])
    assert status == 200 and len(json.loads(body)) == 200
    text = http(port, "/metrics")[1].decode()
    assert 'vhostd_rpc_calls_total{method="unknown",outcome="not_found"} 200.0' in text
    assert "no_such_method" not in text


def test_bad_http_auth_file_stops_startup(tmp_path):
    bad = tmp_path / "auth"
    bad.write_text("no-colon-here\n")
    d = Daemon("--http", "127.0.0.1:%d" % free_tcp_port(), "--http-auth", str(bad))
    d.start(wait=False)
    try:
        assert d.proc.wait(20) == 1
        assert "--http-auth" in d.log()
    finally:
        d.cleanup()
