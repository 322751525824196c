"""The server side of one vfio-user connection as a state machine: no sockets, no threads.

``Session.receive(message)`` takes one client message and returns *effects*: replies to send and
work for the connection (map or unmap a DMA window, switch interrupt eventfds, reset the device).
The connection carries them out in order, so an UnmapDma is done (the reactors have let go of the
window) before the reply that follows it is sent.  Tests drive the machine with bytes.

Two kinds of failure, as in vhost/session.py: a well-formed command that is refused gets an ERROR
reply with an errno (CommandError); a malformed message or a command the state does not allow
(anything before VERSION, a second VERSION) raises ProtocolError, after which the session is BROKEN
and the connection closes.  A command sent with NO_REPLY gets no reply, not even an error.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, replace
from errno import EBADF, EEXIST, EINVAL, EIO, ENOENT, ENOSPC, ENOSYS
from typing import Any, Callable, Protocol

from . import protocol as p
from .protocol import Command, CommandError, IrqSetFlag, ProtocolError, RegionFlag

log = logging.getLogger(__name__)

PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 0


@dataclass(frozen=True)
class RegionDescription:
    """One region of the device as the client sees it.  ``flags`` are READ/WRITE; a region with an
    ``fd`` and ``sparse_areas`` is partly mappable (the client maps the areas, offsets within the
    region, from the fd at ``fd_offset`` + area offset; the rest is trapped).  Size 0 = absent."""

    size: int = 0
    flags: int = 0
    fd: int | None = None
    fd_offset: int = 0
    sparse_areas: tuple[p.SparseArea, ...] = ()

    @property
    def mappable(self) -> bool:
        return self.fd is not None and bool(self.sparse_areas)


class DeviceModel(Protocol):
    """What a session needs of the device behind it (the NVMe controller's PCI function)."""

    name: str

    def region(self, index: int) -> RegionDescription:
        """Region ``index`` (0 … PCI_NUM_REGIONS-1)."""

    def irq_count(self, index: int) -> int:
        """How many vectors IRQ index ``index`` has (0: none)."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """``count`` bytes of region ``index`` at ``offset`` (within its size); raises CommandError
        to refuse."""

    def region_write(self, index: int, offset: int, data: bytes) -> list[Any]:
        """Store ``data``; returns effects for the connection (e.g. a controller that was enabled
        needs its admin queues mapped); raises CommandError to refuse."""


# ---------------------------------------------------------------------------------------------
# Effects
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """Send a reply to message ``msg_id`` (an ERROR header if ``errno``).  ``fds`` are sent with it
    and stay owned by whoever owned them (the device's region fd)."""

    msg_id: int
    command: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()
    errno: int = 0

    def encode(self) -> bytes:
        if self.errno:
            return p.encode_error(self.msg_id, self.command, self.errno)
        return p.encode_reply(self.msg_id, self.command, self.payload)


@dataclass(frozen=True)
class DmaWindow:
    """A window of guest-physical memory the client mapped: ``size`` bytes at ``addr``, taken from
    its fd at ``offset`` (``has_fd`` False: no fd, reachable only by DMA_READ/WRITE)."""

    addr: int
    size: int
    offset: int
    flags: int
    has_fd: bool

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def writable(self) -> bool:
        return bool(self.flags & p.DmaFlag.WRITE)


@dataclass(frozen=True)
class MapDma:
    """mmap ``window`` from ``fd`` and make it part of the guest memory; the fd is then the
    connection's to close."""

    window: DmaWindow
    fd: int


@dataclass(frozen=True)
class UnmapDma:
    """Make every user of ``window`` (queues, requests in flight) let go of it, then unmap it."""

    window: DmaWindow


@dataclass(frozen=True)
class UpdateIrqs:
    """The eventfds of IRQ ``index`` changed (``session.irq_fds[index]``): switch the device to them,
    then close ``old_fds``."""

    index: int
    old_fds: tuple[int, ...]


@dataclass(frozen=True)
class TriggerIrq:
    """Signal vectors ``vectors`` of IRQ ``index`` (the client asked for a loopback trigger)."""

    index: int
    vectors: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskIrq:
    """Vectors ``vectors`` of IRQ ``index`` are unmasked (INTx after its EOI): the device may signal
    a pending interrupt again."""

    index: int
    vectors: tuple[int, ...]


@dataclass(frozen=True)
class ResetDevice:
    """Reset the device: stop its queues, registers to power-on values; DMA maps and irqs stay."""


Effect = Reply | MapDma | UnmapDma | UpdateIrqs | TriggerIrq | UnmaskIrq | ResetDevice


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
class SessionState(enum.Enum):
    CONNECTED = "connected"   # waiting for VERSION
    READY = "ready"           # negotiated: device commands are served
    BROKEN = "broken"         # a malformed message: nothing more is processed


# Which commands each state takes (the rest are protocol errors); unknown numbers in READY are
# refused with ENOSYS, as the protocol says.
ALLOWED: dict[SessionState, Callable[[int], bool]] = {
    SessionState.CONNECTED: lambda command: command == Command.VERSION,
    SessionState.READY: lambda command: command != Command.VERSION,
    SessionState.BROKEN: lambda command: False,
}


def _check_argsz(argsz: int, need: int) -> None:
    if argsz < need:
        raise CommandError(EINVAL, "argsz %d < %d" % (argsz, need))


def _check_irq_index(index: int) -> None:
    if index >= p.PCI_NUM_IRQS:
        raise CommandError(EINVAL, "irq index %d (the device has %d)" % (index, p.PCI_NUM_IRQS))


def _one_bit(value: int) -> bool:
    return value != 0 and value & (value - 1) == 0


class Session:
    """The vfio-user server state machine of one connection to one device."""

    def __init__(self, device: DeviceModel, max_dma_maps: int = p.MAX_DMA_MAPS) -> None:
        self.device = device
        self.state = SessionState.CONNECTED
        self.client_capabilities: dict[str, Any] = {}
        self.max_dma_maps = max_dma_maps
        self.dma_windows: dict[int, DmaWindow] = {}          # by start address
        self.irq_fds: dict[int, list[int | None]] = {
            index: [None] * device.irq_count(index) for index in range(p.PCI_NUM_IRQS)}
        self.irq_masked: dict[int, list[bool]] = {
            index: [False] * device.irq_count(index) for index in range(p.PCI_NUM_IRQS)}
        self._handlers: dict[int, Callable[[p.Message], list[Effect]]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
        }

    # -- entry points -------------------------------------------------------------------------
    @property
    def broken(self) -> bool:
        return self.state is SessionState.BROKEN

    def receive(self, msg: p.Message) -> list[Effect]:
        """Process one client message.  Raises ProtocolError (session BROKEN) on a malformed one or
        one the state does not take; the message's fds are owned by the session from here on."""
        try:
            if not ALLOWED[self.state](msg.command):
                raise ProtocolError("%s in state %s" % (msg.name(), self.state.value))
            handler = self._handlers.get(msg.command)
            try:
                if handler is None:
                    raise CommandError(ENOSYS, "%s is not supported" % msg.name())
                effects = handler(msg)
            except CommandError as exc:
                log.warning("%s: refused %s: %s", self.device.name, msg.name(), exc)
                effects = [Reply(msg.msg_id, msg.command, errno=exc.errno)]
            # Handlers take the fds they keep; any other would stay open for the daemon's life.
            msg.close_fds()
            if msg.no_reply:
                effects = [e for e in effects if not isinstance(e, Reply)]
            return effects
        except ProtocolError:
            self.state = SessionState.BROKEN
            msg.close_fds()
            raise

    def close(self) -> list[Effect]:
        """The client is gone (EOF, or the session broke): unmap every window and drop every
        interrupt eventfd; the device keeps its state for the next client."""
        effects: list[Effect] = [UnmapDma(w) for w in self.dma_windows.values() if w.has_fd]
        self.dma_windows.clear()
        for index, fds in self.irq_fds.items():
            old = tuple(fd for fd in fds if fd is not None)
            self.irq_fds[index] = [None] * len(fds)
            if old:
                effects.append(UpdateIrqs(index, old))
        return effects

    def owned_fds(self) -> list[int]:
        """Every fd the session still holds (irq eventfds)."""
        return [fd for fds in self.irq_fds.values() for fd in fds if fd is not None]

    def find_window(self, addr: int, size: int) -> DmaWindow | None:
        """The window holding all of ``[addr, addr+size)``, if one does."""
        for window in self.dma_windows.values():
            if window.addr <= addr and addr + size <= window.end:
                return window
        return None

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _reply(msg: p.Message, payload: bytes = b"", fds: tuple[int, ...] = ()) -> Reply:
        return Reply(msg.msg_id, msg.command, payload, fds)

    # -- negotiation --------------------------------------------------------------------------
    def _version(self, msg: p.Message) -> list[Effect]:
        offer = p.Version.decode(msg.payload)
        if offer.major != PROTOCOL_MAJOR:
            raise ProtocolError("client speaks protocol %d.%d, the server %d.x"
                                % (offer.major, offer.minor, PROTOCOL_MAJOR))
        pgsizes = offer.capabilities.get("pgsizes", p.PAGE_SIZE)
        if not isinstance(pgsizes, int) or not pgsizes & p.PAGE_SIZE:
            raise ProtocolError("client page sizes %r exclude %d" % (pgsizes, p.PAGE_SIZE))
        self.client_capabilities = offer.capabilities
        self.state = SessionState.READY
        answer = p.Version(PROTOCOL_MAJOR, min(offer.minor, PROTOCOL_MINOR), {
            "max_msg_fds": p.MAX_MSG_FDS,
            "max_data_xfer_size": p.MAX_DATA_XFER_SIZE,
            "pgsizes": p.PAGE_SIZE,
            "max_dma_maps": self.max_dma_maps,
        })
        return [self._reply(msg, answer.encode())]

    # -- DMA ----------------------------------------------------------------------------------
    def _dma_map(self, msg: p.Message) -> list[Effect]:
        req = p.DmaMap.decode(msg.payload)
        _check_argsz(req.argsz, p.DMA_MAP.size)
        if req.flags & ~p.DMA_FLAGS or not req.flags & p.DmaFlag.READ:
            raise CommandError(EINVAL, "flags %#x" % req.flags)
        if req.size == 0 or (req.addr | req.size) % p.PAGE_SIZE or req.addr + req.size > 1 << 64:
            raise CommandError(EINVAL, "window %#x+%#x is empty, unaligned or wraps"
                               % (req.addr, req.size))
        if len(msg.fds) > 1:
            raise CommandError(EINVAL, "%d fds (at most 1)" % len(msg.fds))
        if len(self.dma_windows) >= self.max_dma_maps:
            raise CommandError(ENOSPC, "%d windows mapped already" % len(self.dma_windows))
        for window in self.dma_windows.values():
            if req.addr < window.end and window.addr < req.addr + req.size:
                raise CommandError(EEXIST, "window %#x+%#x overlaps %#x+%#x"
                                   % (req.addr, req.size, window.addr, window.size))
        window = DmaWindow(req.addr, req.size, req.offset, req.flags, bool(msg.fds))
        effects: list[Effect] = []
        if msg.fds:
            fd = msg.fds[0]
            if req.offset % p.PAGE_SIZE:
                raise CommandError(EINVAL, "fd offset %#x is not page aligned" % req.offset)
            try:
                fd_size = os.fstat(fd).st_size
            except OSError as exc:
                raise CommandError(EBADF, "fd: %s" % exc) from None
            # Beyond the fd's end an access would fault (SIGBUS) instead of failing cleanly.
            if req.offset + req.size > fd_size:
                raise CommandError(EINVAL, "window %#x+%#x at fd offset %#x exceeds the fd's %d "
                                   "bytes" % (req.addr, req.size, req.offset, fd_size))
            msg.fds = []
            effects.append(MapDma(window, fd))
        self.dma_windows[window.addr] = window
        return effects + [self._reply(msg)]

    def _dma_unmap(self, msg: p.Message) -> list[Effect]:
        req = p.DmaUnmap.decode(msg.payload)
        _check_argsz(req.argsz, p.DMA_UNMAP.size)
        if req.flags:
            # The only flag asks for a dirty bitmap, which needs migration support.
            raise CommandError(EINVAL, "flags %#x" % req.flags)
        window = self.dma_windows.get(req.addr)
        if window is None or window.size != req.size:
            raise CommandError(ENOENT, "no window %#x+%#x" % (req.addr, req.size))
        del self.dma_windows[req.addr]
        effects: list[Effect] = [UnmapDma(window)] if window.has_fd else []
        answer = replace(req, argsz=p.DMA_UNMAP.size)
        return effects + [self._reply(msg, answer.encode())]

    # -- device, regions ----------------------------------------------------------------------
    def _get_info(self, msg: p.Message) -> list[Effect]:
        req = p.DeviceInfo.decode(msg.payload)
        _check_argsz(req.argsz, p.DEVICE_INFO.size)
        info = p.DeviceInfo(p.DeviceFlag.RESET | p.DeviceFlag.PCI, p.PCI_NUM_REGIONS, p.PCI_NUM_IRQS)
        return [self._reply(msg, info.encode())]

    def _region(self, index: int) -> RegionDescription:
        if index >= p.PCI_NUM_REGIONS:
            raise CommandError(EINVAL, "region %d (the device has %d)" % (index, p.PCI_NUM_REGIONS))
        return self.device.region(index)

    def _get_region_info(self, msg: p.Message) -> list[Effect]:
        req = p.RegionInfo.decode(msg.payload)
        _check_argsz(req.argsz, p.REGION_INFO.size)
        region = self._region(req.index)
        flags = region.flags & (RegionFlag.READ | RegionFlag.WRITE)
        # The region's offset is where the client's mmap of the fd starts.
        info = p.RegionInfo(req.index, flags, region.size, region.fd_offset)
        if not region.mappable:
            return [self._reply(msg, info.encode())]
        caps = p.encode_sparse_mmap_cap(region.sparse_areas)
        need = p.REGION_INFO.size + len(caps)
        if req.argsz < need:
            # The fixed part with the size needed: the client asks again with room for the chain.
            return [self._reply(msg, replace(info, argsz=need).encode())]
        full = replace(info, flags=flags | RegionFlag.MMAP | RegionFlag.CAPS,
                       cap_offset=p.REGION_INFO.size, argsz=need, caps=caps)
        assert region.fd is not None
        return [self._reply(msg, full.encode(), (region.fd,))]

    def _check_access(self, access: p.RegionAccess, flag: RegionFlag) -> None:
        region = self._region(access.region)
        if not region.flags & flag:
            raise CommandError(EINVAL, "region %d is not %s" % (access.region,
                               "readable" if flag == RegionFlag.READ else "writable"))
        if access.count == 0 or access.count > p.MAX_DATA_XFER_SIZE:
            raise CommandError(EINVAL, "access of %d bytes" % access.count)
        if access.offset + access.count > region.size:
            raise CommandError(EINVAL, "access %#x+%d is beyond region %d's %#x bytes"
                               % (access.offset, access.count, access.region, region.size))

    def _region_read(self, msg: p.Message) -> list[Effect]:
        access = p.RegionAccess.decode(msg.payload)
        if access.data:
            raise CommandError(EINVAL, "REGION_READ carries %d data bytes" % len(access.data))
        self._check_access(access, RegionFlag.READ)
        data = self.device.region_read(access.region, access.offset, access.count)
        if len(data) != access.count:
            raise CommandError(EIO, "device returned %d bytes for %d" % (len(data), access.count))
        return [self._reply(msg, replace(access, data=data).encode())]

    def _region_write(self, msg: p.Message) -> list[Effect]:
        access = p.RegionAccess.decode(msg.payload)
        if len(access.data) != access.count:
            raise CommandError(EINVAL, "REGION_WRITE of %d bytes carries %d"
                               % (access.count, len(access.data)))
        self._check_access(access, RegionFlag.WRITE)
        effects = list(self.device.region_write(access.region, access.offset, access.data))
        return effects + [self._reply(msg, access.encode_head())]

    def _reset(self, msg: p.Message) -> list[Effect]:
        return [ResetDevice(), self._reply(msg)]

    # -- interrupts ---------------------------------------------------------------------------
    def _get_irq_info(self, msg: p.Message) -> list[Effect]:
        req = p.IrqInfo.decode(msg.payload)
        _check_argsz(req.argsz, p.IRQ_INFO.size)
        _check_irq_index(req.index)
        info = p.IrqInfo(req.index, p.IrqInfoFlag.EVENTFD, self.device.irq_count(req.index))
        return [self._reply(msg, info.encode())]

    def _set_irqs(self, msg: p.Message) -> list[Effect]:
        req = p.IrqSet.decode(msg.payload)
        _check_argsz(req.argsz, p.IRQ_SET.size)
        _check_irq_index(req.index)
        data = req.flags & p.IRQ_SET_DATA
        action = req.flags & p.IRQ_SET_ACTION
        if req.flags & ~(p.IRQ_SET_DATA | p.IRQ_SET_ACTION) or not _one_bit(data) \
                or not _one_bit(action):
            raise CommandError(EINVAL, "flags %#x" % req.flags)
        vectors = len(self.irq_fds[req.index])
        if req.count == 0:
            if data != IrqSetFlag.DATA_NONE or action != IrqSetFlag.ACTION_TRIGGER or req.start:
                raise CommandError(EINVAL, "count 0 with flags %#x start %d" % (req.flags, req.start))
            return self._assign_eventfds(req.index, range(vectors), []) + [self._reply(msg)]
        if req.start + req.count > vectors:
            raise CommandError(EINVAL, "vectors %d…%d of irq %d (it has %d)"
                               % (req.start, req.start + req.count - 1, req.index, vectors))
        selected = range(req.start, req.start + req.count)
        if data == IrqSetFlag.DATA_EVENTFD:
            if action != IrqSetFlag.ACTION_TRIGGER:
                raise CommandError(EINVAL, "eventfds can only trigger (flags %#x)" % req.flags)
            if msg.fds and len(msg.fds) != req.count:
                raise CommandError(EINVAL, "%d fds for %d vectors" % (len(msg.fds), req.count))
            fds, msg.fds = msg.fds, []
            return self._assign_eventfds(req.index, selected, fds) + [self._reply(msg)]
        if msg.fds:
            raise CommandError(EINVAL, "fds without DATA_EVENTFD")
        if data == IrqSetFlag.DATA_BOOL:
            if len(req.data) != req.count:
                raise CommandError(EINVAL, "%d bools for %d vectors" % (len(req.data), req.count))
            chosen = tuple(v for v, flag in zip(selected, req.data) if flag)
        else:
            if req.data:
                raise CommandError(EINVAL, "DATA_NONE with %d data bytes" % len(req.data))
            chosen = tuple(selected)
        effects: list[Effect] = []
        masked = self.irq_masked[req.index]
        if action == IrqSetFlag.ACTION_TRIGGER:
            effects.append(TriggerIrq(req.index, chosen))
        else:
            for vector in chosen:
                masked[vector] = action == IrqSetFlag.ACTION_MASK
            if action == IrqSetFlag.ACTION_UNMASK:
                effects.append(UnmaskIrq(req.index, chosen))
        return effects + [self._reply(msg)]

    def _assign_eventfds(self, index: int, vectors: range, fds: list[int]) -> list[Effect]:
        """Bind ``fds`` to ``vectors`` in order (no fds: unbind them)."""
        table = self.irq_fds[index]
        old = tuple(table[v] for v in vectors if table[v] is not None)
        for i, vector in enumerate(vectors):
            table[vector] = fds[i] if fds else None
        return [UpdateIrqs(index, old)] if old or fds else []
