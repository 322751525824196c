"""The NVMe-oF target's objects as SPDK names them: transports, subsystems, their namespaces and
listeners.

A VFIOUSER listener is a directory (``traddr``) where the controller's socket ``cntrl`` appears for
QEMU's vfio-user-pci; each listener serves its own emulated controller (an ``NvmeFunction``) with
the subsystem's serial and model.  A namespace is a bdev the subsystem claims while it is attached;
every controller of the subsystem reports it.  Domain errors only; the RPC layer shapes results
and codes.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlreadyExists, Busy, InvalidArgument, NotFound
from ..vfio_user.server import Endpoint
from .function import NvmeFunction
from .identify import ControllerInfo, NamespaceInfo

log = logging.getLogger(__name__)

VFIOUSER = "VFIOUSER"
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
SOCKET_NAME = "cntrl"
DEFAULT_MAX_NAMESPACES = 32        # NN of a subsystem created with max_namespaces 0 ("no limit")


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
class Namespace:
    """A bdev attached to a subsystem under an NSID, with the identifiers the host tells apart."""

    nsid: int
    bdev: Any
    uuid: uuidlib.UUID
    nguid: bytes
    eui64: bytes

    def info(self) -> NamespaceInfo:
        return NamespaceInfo(self.nsid, self.bdev.block_size, self.bdev.num_blocks,
                             nguid=self.nguid, eui64=self.eui64, uuid=self.uuid.bytes)


def _hex_id(text: str | None, size: int, what: str) -> bytes | None:
    """An NGUID (16 bytes) or EUI64 (8 bytes) as SPDK takes it: hex digits, dashes allowed."""
    if text is None:
        return None
    try:
        value = bytes.fromhex(text.replace("-", ""))
    except ValueError:
        value = b""
    if len(value) != size:
        raise InvalidArgument("%s %r is not %d hex bytes" % (what, text, size))
    return value


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
    namespaces: dict[int, Namespace] = field(default_factory=dict)

    @property
    def nsid_limit(self) -> int:
        return self.max_namespaces or DEFAULT_MAX_NAMESPACES

    def namespace_infos(self) -> dict[int, NamespaceInfo]:
        return {nsid: ns.info() for nsid, ns in sorted(self.namespaces.items())}

    def namespace_disks(self) -> dict[int, Any]:
        return {nsid: ns.bdev.disk for nsid, ns in self.namespaces.items()
                if getattr(ns.bdev, "disk", None) is not None}


class NvmfTarget:
    """Every transport and subsystem of the daemon."""

    def __init__(self, socket_mode: int = 0o600,
                 find_bdev: Callable[[str], Any] | None = None, reactors: Any = None) -> None:
        self.socket_mode = socket_mode
        self.find_bdev = find_bdev
        self.reactors = reactors
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
        for ns in subsystem.namespaces.values():
            ns.bdev.release(subsystem)
        del self.subsystems[nqn]

    # -- namespaces ---------------------------------------------------------------------------
    def add_namespace(self, nqn: str, bdev_name: str, nsid: int | None = None,
                      uuid: str | None = None, nguid: str | None = None,
                      eui64: str | None = None) -> Namespace:
        """Attach a bdev (claimed) under ``nsid`` (0 or None: the lowest free one).  The UUID
        defaults to the bdev's and the NGUID to the UUID's bytes, as SPDK does."""
        subsystem = self.subsystem(nqn)
        if self.find_bdev is None:
            raise InvalidArgument("no bdevs on this target")
        limit = subsystem.nsid_limit
        if not nsid:
            nsid = next((n for n in range(1, limit + 1) if n not in subsystem.namespaces), 0)
            if not nsid:
                raise InvalidArgument("subsystem %s has no free NSID (max %d)" % (nqn, limit))
        elif nsid > limit or nsid == 0xFFFFFFFF:
            raise InvalidArgument("NSID %d above the subsystem's maximum %d" % (nsid, limit))
        elif nsid in subsystem.namespaces:
            raise AlreadyExists("subsystem %s already has NSID %d" % (nqn, nsid))
        try:
            ns_uuid = uuidlib.UUID(uuid) if uuid is not None else None
        except ValueError:
            raise InvalidArgument("%r is not a UUID" % uuid) from None
        ns_nguid = _hex_id(nguid, 16, "nguid")
        ns_eui64 = _hex_id(eui64, 8, "eui64") or bytes(8)
        bdev = self.find_bdev(bdev_name)                  # raises NotFound
        if bdev.claimed_by is not None:
            raise Busy("bdev %s is already claimed" % bdev.name)
        if ns_uuid is None:
            ns_uuid = bdev.uuid
        if ns_nguid is None:
            ns_nguid = ns_uuid.bytes
        for other in subsystem.namespaces.values():
            if other.uuid == ns_uuid or other.nguid == ns_nguid:
                raise AlreadyExists("subsystem %s already has a namespace with UUID/NGUID %s"
                                    % (nqn, ns_uuid))
        bdev.claim(subsystem)                             # raises Busy
        namespace = Namespace(nsid, bdev, ns_uuid, ns_nguid, ns_eui64)
        subsystem.namespaces[nsid] = namespace
        self._publish_namespaces(subsystem)
        log.info("subsystem %s: namespace %d is bdev %s", nqn, nsid, bdev.name)
        return namespace

    def remove_namespace(self, nqn: str, nsid: int) -> None:
        subsystem = self.subsystem(nqn)
        namespace = subsystem.namespaces.pop(nsid, None)
        if namespace is None:
            raise NotFound("subsystem %s has no namespace %d" % (nqn, nsid))
        namespace.bdev.release(subsystem)
        self._publish_namespaces(subsystem)

    @staticmethod
    def _publish_namespaces(subsystem: Subsystem) -> None:
        infos, disks = subsystem.namespace_infos(), subsystem.namespace_disks()
        for listener in subsystem.listeners:
            listener.function.set_namespaces(infos, disks)

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
                              controller_id=subsystem.min_cntlid, subnqn=nqn,
                              max_namespaces=subsystem.nsid_limit)
        function = NvmeFunction(directory.name or nqn, info=info, reactors=self.reactors)
        function.set_namespaces(subsystem.namespace_infos(), subsystem.namespace_disks())
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
