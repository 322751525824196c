"""From a decoded JSON-RPC value to its reply, with SPDK's rules around jsonrpcserver.

SPDK's envelope differs from the JSON-RPC 2.0 letter: "jsonrpc" may be omitted; notifications
(no id, or id null) still get *error* replies (with id null); params must decode as an object;
a method may be refused for the framework state.  This layer applies those rules, then lets
jsonrpcserver dispatch to a thin wrapper that validates params (pydantic) and maps domain errors
to SPDK codes.  Shared by the Unix-socket and HTTP servers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from jsonrpcserver import JsonRpcError, Success, async_dispatch_to_response
from jsonrpcserver.response import to_serializable
from pydantic import ValidationError

from ..errors import VhostdError
from .registry import REGISTRY, MethodSpec, Registry, RpcError, State

log = logging.getLogger(__name__)

INVALID_REQUEST = (-32600, "Invalid request")
METHOD_NOT_FOUND = (-32601, "Method not found")
PARSE_ERROR = (-32700, "Parse error")
NOT_INITIALIZED = (-1, "Method may only be called after framework is initialized using "
                       "framework_start_init RPC.")
ALREADY_INITIALIZED = (-1, "Method may only be called before framework is initialized. Use "
                           "--wait-for-rpc command line parameter and then issue this RPC before "
                           "the framework_start_init RPC.")
_MISSING = object()
UNKNOWN_METHOD_LABEL = "unknown"


def error_reply(code: int, message: str, request_id: Any = None) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _identity(value):
    return value


class Dispatcher:
    """Answers requests for one App.  ``observe(method, outcome)`` is called per request
    (metrics)."""

    def __init__(self, app: Any, registry: Registry = REGISTRY, observe=None) -> None:
        self.app = app
        self.registry = registry
        self.observe = observe or (lambda method, outcome: None)
        self._jsonrpc_methods = {name: self._wrapper(spec) for name, spec in registry.methods.items()}

    # -- one request --------------------------------------------------------------------------
    async def handle(self, request: Any) -> dict | None:
        """The reply to one request object, or None (a notification that succeeded)."""
        if not isinstance(request, dict):
            return error_reply(*INVALID_REQUEST)
        request_id = request.get("id", _MISSING)
        notification = request_id is _MISSING or request_id is None
        if request_id is _MISSING:
            request_id = None
        method = request.get("method")
        params = request.get("params")
        if (request_id is not None and not isinstance(request_id, (str, int, float))) \
                or isinstance(request_id, bool):
            # An id that is not a string, number or null is not echoed (SPDK replies id null).
            return error_reply(*INVALID_REQUEST)
        if (request.get("jsonrpc", "2.0") != "2.0" or not isinstance(method, str)
                or not isinstance(params, (dict, list, type(None)))):
            return error_reply(*INVALID_REQUEST, request_id)
        spec = self.registry.lookup(method)
        if spec is None:
            # One label for every unknown name: clients cannot grow the metrics without bound.
            self.observe(UNKNOWN_METHOD_LABEL, "not_found")
            return error_reply(*METHOD_NOT_FOUND, request_id)
        if method != spec.name:
            self.app.note_alias_use(method, spec.name)
        state = self.app.state
        if not (spec.states & state):
            self.observe(spec.name, "error")
            return error_reply(*(NOT_INITIALIZED if state is State.STARTUP else ALREADY_INITIALIZED),
                               request_id)
        inner = {"jsonrpc": "2.0", "method": spec.name, "id": 0}
        if params is not None:
            inner["params"] = {"raw_params": params}
        reply = await async_dispatch_to_response(
            inner, self._jsonrpc_methods, context=self.app, deserializer=_identity,
            validator=_identity, post_process=to_serializable)
        if "error" in reply:
            self.observe(spec.name, "error")
            err = reply["error"]
            return error_reply(err["code"], err["message"], request_id)
        self.observe(spec.name, "ok")
        if notification:
            return None
        return {"jsonrpc": "2.0", "id": request_id, "result": reply["result"]}

    def _wrapper(self, spec: MethodSpec):
        async def call(app, raw_params=_MISSING):
            params = self.decode_params(spec, None if raw_params is _MISSING else raw_params)
            try:
                result = spec.handler(app, params)
                if inspect.isawaitable(result):
                    result = await result
            except RpcError as exc:
                raise JsonRpcError(exc.code, exc.message) from None
            except VhostdError as exc:
                mapped = spec.map_error(exc)
                log.info("%s failed: %s (%s)", spec.name, exc, mapped.message)
                raise JsonRpcError(mapped.code, mapped.message) from None
            return Success(result)

        return call

    @staticmethod
    def decode_params(spec: MethodSpec, params: Any):
        """The validated params model (None for methods without params); JsonRpcError with the
        method's decode error otherwise."""
        if spec.params is None:
            if params is not None:
                raise JsonRpcError(*spec.decode_error)
            return None
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise JsonRpcError(*spec.decode_error)
        try:
            return spec.params.model_validate(params, strict=True)
        except ValidationError as exc:
            log.info("%s: params rejected: %s", spec.name, exc.errors()[0].get("msg") if exc.errors() else exc)
            raise JsonRpcError(*spec.decode_error) from None

    # -- one top-level value ------------------------------------------------------------------
    async def handle_value(self, value: Any) -> dict | list | None:
        """A single request or a batch; None when nothing is to be sent."""
        if isinstance(value, list):
            if not value:
                return error_reply(*INVALID_REQUEST)
            replies = []

            async def one(item):
                reply = await self.handle(item)
                if reply is not None:
                    replies.append(reply)           # completion order, as SPDK

            await asyncio.gather(*(one(item) for item in value))
            return replies or None
        if not isinstance(value, dict):
            return error_reply(*INVALID_REQUEST)
        return await self.handle(value)
