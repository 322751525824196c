"""The ``vhostd`` command (options after SPDK's vhost app)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import __version__, cpumask
from .app import App, Options, StartupError
from .errors import InvalidArgument
from .logs import FORMATS, LEVELS
from .rpc.server import SocketInUse


def parse_http(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_mask(text: str) -> list[int]:
    try:
        return cpumask.parse(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhostd", description="An SPDK-compatible vhost-user storage target.")
    ap.add_argument("-S", dest="socket_dir", default=".", metavar="SOCKET_DIR",
                    help="directory of controller sockets (SOCKET_DIR/<controller name>); default: cwd")
    ap.add_argument("-r", "--rpc-socket", dest="rpc_socket", default="/var/tmp/spdk.sock",
                    metavar="RPC_SOCKET", help="JSON-RPC Unix socket (default /var/tmp/spdk.sock)")
    ap.add_argument("-m", "--cpumask", dest="cores", type=parse_mask, default=[0], metavar="CPUMASK",
                    help="cores of the reactors: 0x3, 3 or [0,1-3] (default 0x1)")
    ap.add_argument("-c", "--json", "--config", dest="config", metavar="CONFIG",
                    help="JSON config in save_config layout, applied at start")
    ap.add_argument("--wait-for-rpc", action="store_true",
                    help="stay in the STARTUP state until framework_start_init")
    ap.add_argument("--http", type=parse_http, metavar="HOST:PORT",
                    help="also serve JSON-RPC (POST /), /metrics and /healthz over HTTP")
    ap.add_argument("--http-auth", metavar="FILE",
                    help="user:password lines for HTTP Basic auth (without it: loopback peers only)")
    ap.add_argument("-L", "--log-level", dest="log_level", choices=sorted(LEVELS), default=None,
                    help="log level (default NOTICE; also sets the print level)")
    ap.add_argument("--log-format", choices=FORMATS, default="text",
                    help="stderr log lines: text (default) or json, one object per line")
    ap.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o600, metavar="MODE",
                    help="mode of controller sockets, octal (default 0600)")
    ap.add_argument("--socket-group", metavar="GROUP", help="group owning controller sockets")
    ap.add_argument("--version", action="version", version="vhostd " + __version__)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(socket_dir=args.socket_dir, rpc_socket=args.rpc_socket, cores=args.cores,
                      config=args.config, wait_for_rpc=args.wait_for_rpc, http=args.http,
                      http_auth=args.http_auth, socket_mode=args.socket_mode,
                      socket_group=args.socket_group, log_format=args.log_format)
    if args.log_level is not None:
        options.log_level = options.print_level = args.log_level
    try:
        app = App(options)
        asyncio.run(app.run())
    except (SocketInUse, StartupError) as exc:
        print("vhostd: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
