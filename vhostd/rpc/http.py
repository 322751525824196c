"""JSON-RPC over HTTP for orchestration agents, plus /metrics and /healthz (aiohttp, on the
daemon's event loop).

``POST /`` takes the same bodies as the Unix socket (a request or a batch).  With an auth file
(``user:password`` lines) every request but /healthz needs HTTP Basic auth; without one, only
loopback peers are served.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging

from aiohttp import web

from .dispatch import INVALID_REQUEST, PARSE_ERROR, Dispatcher, error_reply
from .framing import FramingError, decode_document

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024


def load_credentials(path: str) -> dict[str, str]:
    """user → password from ``user:password`` lines (blank lines and # comments skipped)."""
    creds: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ValueError("%s:%d: expected user:password" % (path, number))
            creds[user] = password
    if not creds:
        raise ValueError("%s has no user:password line" % path)
    return creds


def _is_loopback(peer: str | None) -> bool:
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except ValueError:
        return False


class HttpServer:
    def __init__(self, dispatcher: Dispatcher, metrics, host: str, port: int,
                 credentials: dict[str, str] | None) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.host, self.port = host, port
        self.credentials = credentials
        self._runner: web.AppRunner | None = None

    def _authorized(self, request: web.Request) -> bool:
        if self.credentials is None:
            return _is_loopback(request.remote)
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def _refused(self, request: web.Request) -> web.Response:
        if self.credentials is None:
            return web.Response(status=403, text="only loopback peers are served without --http-auth\n")
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="vhostd"'},
                            text="authentication required\n")

    async def rpc(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused(request)
        body = await request.read()
        try:
            value = decode_document(body)
        except FramingError:
            return web.json_response(error_reply(*PARSE_ERROR))
        if not isinstance(value, (dict, list)):
            return web.json_response(error_reply(*INVALID_REQUEST))
        reply = await self.dispatcher.handle_value(value)
        if reply is None:
            return web.Response(status=204)
        return web.Response(body=json.dumps(reply, separators=(",", ":")).encode() + b"\n",
                            content_type="application/json")

    async def metrics_page(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused(request)
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "state": self.dispatcher.app.state.name.lower()})

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/", self.rpc)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/healthz", self.healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.credentials is None:
            log.warning("HTTP JSON-RPC on %s:%d has no --http-auth: only loopback peers are served",
                        self.host, self.port)
        else:
            log.info("HTTP JSON-RPC on %s:%d (basic auth)", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
