"""The NVMe-oF target's objects as SPDK names them: transports, subsystems and their listeners.

A VFIOUSER listener is a directory (``traddr``) where the controller's socket ``cntrl`` appears for
QEMU's vfio-user-pci; each listener serves its own emulated controller (an ``NvmeFunction``) with
the subsystem's serial and model.  Domain errors only; the RPC layer shapes results and codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..vfio_user.server import Endpoint
from .function import NvmeFunction
from .identify import ControllerInfo

log = logging.getLogger(__name__)

VFIOUSER = "VFIOUSER"
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
SOCKET_NAME = "cntrl"


@dataclass
class Transport:
    trtype: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Listener:
    trtype: str
    traddr: str
    function: NvmeFunction
    endpoint: Endpoint


@dataclass
class Subsystem:
    nqn: str
    serial_number: str
    model_number: str
    allow_any_host: bool = False
    max_namespaces: int = 0
    min_cntlid: int = 1
    max_cntlid: int = 0xFFEF
    listeners: list[Listener] = field(default_factory=list)


class NvmfTarget:
    """Every transport and subsystem of the daemon."""

    def __init__(self, socket_mode: int = 0o600) -> None:
        self.socket_mode = socket_mode
        self.transports: dict[str, Transport] = {}
        self.subsystems: dict[str, Subsystem] = {}

    def create_transport(self, trtype: str, options: dict[str, Any]) -> Transport:
        kind = trtype.upper()
        if kind != VFIOUSER:
            raise InvalidArgument("transport type %s is not supported (only VFIOUSER)" % trtype)
        if kind in self.transports:
            raise AlreadyExists("transport %s already exists" % kind)
        transport = Transport(kind, dict(options))
        self.transports[kind] = transport
        return transport

    def create_subsystem(self, nqn: str, serial_number: str, model_number: str,
                         allow_any_host: bool = False, max_namespaces: int = 0,
                         min_cntlid: int = 1, max_cntlid: int = 0xFFEF) -> Subsystem:
        if not nqn.startswith("nqn.") or len(nqn) > 223:
            raise InvalidArgument("invalid NQN %r" % nqn)
        if nqn in self.subsystems or nqn == DISCOVERY_NQN:
            raise AlreadyExists("subsystem %s already exists" % nqn)
        if not 1 <= min_cntlid <= max_cntlid <= 0xFFEF:
            raise InvalidArgument("controller ids %d…%d" % (min_cntlid, max_cntlid))
        subsystem = Subsystem(nqn, serial_number, model_number, allow_any_host, max_namespaces,
                              min_cntlid, max_cntlid)
        self.subsystems[nqn] = subsystem
        return subsystem

    def subsystem(self, nqn: str) -> Subsystem:
        try:
            return self.subsystems[nqn]
        except KeyError:
            raise NotFound("no subsystem %s" % nqn) from None

    async def delete_subsystem(self, nqn: str) -> None:
        subsystem = self.subsystem(nqn)
        for listener in list(subsystem.listeners):
            await self._close_listener(subsystem, listener)
        del self.subsystems[nqn]

    async def add_listener(self, nqn: str, trtype: str, traddr: str) -> Listener:
        subsystem = self.subsystem(nqn)
        kind = trtype.upper()
        if kind != VFIOUSER:
            raise InvalidArgument("transport type %s is not supported (only VFIOUSER)" % trtype)
        if kind not in self.transports:
            raise InvalidArgument("create the %s transport first (nvmf_create_transport)" % kind)
        if any(l.traddr == traddr for s in self.subsystems.values() for l in s.listeners):
            raise AlreadyExists("listener %s already exists" % traddr)
        directory = Path(traddr)
        if not directory.is_dir():
            raise InvalidArgument("traddr %s is not a directory" % traddr)
        info = ControllerInfo(serial=subsystem.serial_number, model=subsystem.model_number,
                              controller_id=subsystem.min_cntlid, subnqn=nqn)
        function = NvmeFunction(directory.name or nqn, info=info)
        endpoint = Endpoint(directory / SOCKET_NAME, function, self.socket_mode)
        try:
            await endpoint.start()
        except OSError as exc:
            function.close()
            raise InvalidArgument("cannot listen on %s: %s" % (directory / SOCKET_NAME, exc)) from None
        listener = Listener(kind, traddr, function, endpoint)
        subsystem.listeners.append(listener)
        log.info("subsystem %s listening on %s", nqn, endpoint.path)
        return listener

    async def remove_listener(self, nqn: str, trtype: str, traddr: str) -> None:
        subsystem = self.subsystem(nqn)
        for listener in subsystem.listeners:
            if listener.traddr == traddr and listener.trtype == trtype.upper():
                await self._close_listener(subsystem, listener)
                return
        raise NotFound("subsystem %s has no listener %s" % (nqn, traddr))

    async def _close_listener(self, subsystem: Subsystem, listener: Listener) -> None:
        await listener.endpoint.stop()
        listener.function.close()
        subsystem.listeners.remove(listener)

    async def shutdown(self) -> None:
        for nqn in list(self.subsystems):
            await self.delete_subsystem(nqn)
