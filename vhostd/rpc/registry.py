"""The declarative table of RPC methods and subsystems.

A method is declared once, where its handler is, with everything SPDK compatibility needs: its
params model (None: takes no params), the states it may run in, its legacy aliases, and how its
failures read on the wire (the code/message of a params decode failure, and how domain errors map
to codes).  A subsystem (bdev, vhost_blk, …) declares its dependencies and the writer of its
framework_get_config entries.  Method modules register by being imported; the server never
changes when a method is added.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..errors import NotSupported, VhostdError


class State(enum.Flag):
    STARTUP = 1
    RUNTIME = 2
    BOTH = STARTUP | RUNTIME


class RpcError(Exception):
    """An error reply exactly as it goes on the wire."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def strerror(err: int) -> str:
    return os.strerror(err)


def errno_error(exc: VhostdError) -> RpcError:
    """bdev family: -errno and strerror; features vhostd lacks say which."""
    if isinstance(exc, NotSupported):
        return RpcError(-exc.errno, "%s: %s" % (strerror(exc.errno), exc))
    return RpcError(-exc.errno, strerror(exc.errno))


def vhost_error(exc: VhostdError) -> RpcError:
    """vhost family: every error is -32602 with strerror (SPDK's vhost_rpc.c)."""
    if isinstance(exc, NotSupported):
        return RpcError(-32602, "%s: %s" % (strerror(exc.errno), exc))
    return RpcError(-32602, strerror(exc.errno))


DECODE_FAILED = (-32603, "spdk_json_decode_object failed")


@dataclass
class MethodSpec:
    name: str
    handler: Callable[..., Awaitable[Any] | Any]
    params: type[BaseModel] | None
    result: Any
    states: State
    aliases: tuple[str, ...]
    decode_error: tuple[int, str]
    map_error: Callable[[VhostdError], RpcError]
    description: str


@dataclass
class Subsystem:
    name: str
    depends_on: tuple[str, ...]
    config_writer: Callable[[Any], list | None] | None = None


@dataclass
class Registry:
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    subsystems: list[Subsystem] = field(default_factory=list)

    def method(self, name: str, *, params: type[BaseModel] | None = None, result: Any = None,
               states: State = State.RUNTIME, aliases: tuple[str, ...] = (),
               decode_error: tuple[int, str] = DECODE_FAILED,
               map_error: Callable[[VhostdError], RpcError] = errno_error):
        """Decorator registering ``handler(app, params)`` (params is None for no-param methods)."""

        def register(handler):
            if name in self.methods or name in self.aliases:
                raise ValueError("RPC method %s registered twice" % name)
            self.methods[name] = MethodSpec(name, handler, params, result, states, tuple(aliases),
                                            decode_error, map_error, (handler.__doc__ or "").strip())
            for alias in aliases:
                self.aliases[alias] = name
            return handler

        return register

    def subsystem(self, name: str, depends_on: tuple[str, ...] = (),
                  config_writer: Callable[[Any], list | None] | None = None) -> None:
        if any(s.name == name for s in self.subsystems):
            raise ValueError("subsystem %s registered twice" % name)
        self.subsystems.append(Subsystem(name, tuple(depends_on), config_writer))

    def lookup(self, name: str) -> MethodSpec | None:
        spec = self.methods.get(name)
        if spec is None and name in self.aliases:
            spec = self.methods[self.aliases[name]]
        return spec

    def ordered_subsystems(self) -> list[Subsystem]:
        """Dependency-first order (stable: registration order among equals)."""
        done: list[Subsystem] = []
        names: set[str] = set()
        pending = list(self.subsystems)
        while pending:
            for sub in pending:
                if all(d in names or not any(s.name == d for s in self.subsystems) for d in sub.depends_on):
                    done.append(sub)
                    names.add(sub.name)
                    pending.remove(sub)
                    break
            else:
                raise ValueError("subsystem dependency cycle among %s" % [s.name for s in pending])
        return done


REGISTRY = Registry()
rpc_method = REGISTRY.method
