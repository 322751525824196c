"""``vhostd-rpc`` (also ``scripts/rpc.py``): call one JSON-RPC method on a vhostd (or SPDK) daemon.

    vhostd-rpc bdev_malloc_create num_blocks=131072 block_size=512 name=Malloc0
    vhostd-rpc -s /var/tmp/spdk.sock vhost_get_controllers
    vhostd-rpc --http http://127.0.0.1:9250 --user admin:secret rpc_get_methods
    vhostd-rpc bdev_get_bdevs '{"name": "Malloc0"}'
    vhostd-rpc attach-qemu vhost.0 [memory_mib=1024] [num_queues=1]
    vhostd-rpc attach-libvirt vhost.0 [target_dev=vdb] [num_queues=1]

Params are key=value pairs (values read as JSON when they parse, else as strings) or one JSON
object.  The result is printed as JSON; an error prints its code and message and exits 1.
attach-qemu and attach-libvirt are not RPC methods: they read the controller with
vhost_get_controllers and print the QEMU options or the libvirt domain XML that attach a guest.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import urllib.error
import urllib.request
from typing import Any

from ..attach import libvirt_xml, qemu_options
from .framing import JsonStreamDecoder

ATTACH_FORMS = {"attach-qemu": qemu_options, "attach-libvirt": libvirt_xml}


class RpcCallError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__("%d: %s" % (code, message))
        self.code, self.message = code, message


def call_unix(path: str, method: str, params: dict | None = None, timeout: float = 60.0) -> Any:
    """One request over the Unix socket; returns the result or raises RpcCallError."""
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        request["params"] = params
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode())
        decoder = JsonStreamDecoder(max_buffered=64 << 20)
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the reply")
            decoder.feed(data)
            complete, reply = decoder.next_value()
            if complete:
                break
    return _result(reply)


def call_http(url: str, method: str, params: dict | None = None, user: str | None = None,
              timeout: float = 60.0) -> Any:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        request["params"] = params
    req = urllib.request.Request(url, data=json.dumps(request).encode(),
                                 headers={"Content-Type": "application/json"})
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return _result(json.loads(resp.read()))


def _result(reply: dict) -> Any:
    if "error" in reply:
        raise RpcCallError(reply["error"]["code"], reply["error"]["message"])
    return reply.get("result")


def parse_params(items: list[str]) -> dict | None:
    if not items:
        return None
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        return json.loads(items[0])
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError("expected key=value, got %r" % item)
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vhostd-rpc", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-s", dest="socket", default="/var/tmp/spdk.sock", help="RPC Unix socket")
    ap.add_argument("--http", metavar="URL", help="use HTTP instead (e.g. http://127.0.0.1:9250)")
    ap.add_argument("--user", metavar="USER:PASSWORD", help="HTTP Basic credentials")
    ap.add_argument("-t", "--timeout", type=float, default=60.0)
    ap.add_argument("method")
    ap.add_argument("params", nargs="*")
    args = ap.parse_args(argv)
    def call(method: str, params: dict | None) -> Any:
        if args.http:
            return call_http(args.http, method, params, args.user, args.timeout)
        return call_unix(args.socket, method, params, args.timeout)

    try:
        if args.method in ATTACH_FORMS:
            if not args.params:
                raise ValueError("%s needs a controller name" % args.method)
            options = parse_params(args.params[1:]) or {}
            (info,) = call("vhost_get_controllers", {"name": args.params[0]})
            print(ATTACH_FORMS[args.method](info, **options), end="")
            return 0
        params = parse_params(args.params)
        result = call(args.method, params)
    except RpcCallError as exc:
        print("error %d: %s" % (exc.code, exc.message), file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError, urllib.error.URLError) as exc:
        print("vhostd-rpc: %s" % exc, file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
