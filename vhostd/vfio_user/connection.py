"""One vfio-user client connection: reads messages, feeds the session, carries its effects out.

Messages are handled one at a time, each with all its effects finished before the next, so an
unmap is complete before its reply and register writes take effect in order.  DMA windows are
mmapped here (MAP_SHARED of the client's fds); on EOF or a protocol error everything the client
gave is released and the device keeps its state for the next client.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from typing import Any, Protocol

from . import protocol as p
from . import session as s
from .transport import ConnectionClosed, Transport

log = logging.getLogger(__name__)


class ServedDevice(s.DeviceModel, Protocol):
    """A device the connection can serve: the session's interface, plus the work its register
    writes ask for and a reset."""

    def carry_out(self, event: Any, dma: Any) -> None:
        """Do what a ``region_write`` event asks; ``dma`` finds mapped windows."""

    def reset(self) -> None:
        """DEVICE_RESET."""


class Connection:
    """Serves one client of ``device`` on ``transport``."""

    def __init__(self, transport: Transport, device: ServedDevice) -> None:
        self.transport = transport
        self.device = device
        self.session = s.Session(device)
        self.mappings: dict[int, mmap.mmap] = {}      # by window start address
        self._failed: set[int] = set()                # msg ids whose mapping failed

    async def run(self) -> None:
        """Serve until the client leaves or breaks the protocol, then release what it gave."""
        try:
            while True:
                msg = await self.transport.receive()
                effects = self.session.receive(msg)
                await self._carry_out(effects, msg.msg_id)
        except ConnectionClosed:
            log.info("%s: vfio-user client left", self.device.name)
        except p.ProtocolError as exc:
            log.warning("%s: vfio-user client dropped: %s", self.device.name, exc)
        finally:
            self.close()

    def close(self) -> None:
        for effect in self.session.close():
            self._release(effect)
        p.close_fds(self.session.owned_fds())
        self.transport.close()

    async def _carry_out(self, effects: list[Any], msg_id: int) -> None:
        for effect in effects:
            if isinstance(effect, s.Reply):
                if msg_id in self._failed:
                    self._failed.discard(msg_id)
                    effect = s.Reply(effect.msg_id, effect.command, errno=errno.ENOMEM)
                await self.transport.send(effect.encode(), effect.fds)
            elif isinstance(effect, s.MapDma):
                self._map(effect, msg_id)
            elif isinstance(effect, (s.UnmapDma, s.UpdateIrqs)):
                self._release(effect)
            elif isinstance(effect, s.TriggerIrq):
                self._signal(effect.index, effect.vectors)
            elif isinstance(effect, s.UnmaskIrq):
                pass                       # nothing is pending until the controller interrupts
            elif isinstance(effect, s.ResetDevice):
                self.device.reset()
            else:
                self.device.carry_out(effect, self.session)

    def _map(self, effect: s.MapDma, msg_id: int) -> None:
        window = effect.window
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if window.writable else 0)
        try:
            self.mappings[window.addr] = mmap.mmap(effect.fd, window.size, mmap.MAP_SHARED, prot,
                                                   offset=window.offset)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot map DMA window %#x+%#x: %s", self.device.name, window.addr,
                        window.size, exc)
            self.session.dma_windows.pop(window.addr, None)
            self._failed.add(msg_id)
        finally:
            os.close(effect.fd)

    def _release(self, effect: Any) -> None:
        if isinstance(effect, s.UnmapDma):
            mapping = self.mappings.pop(effect.window.addr, None)
            if mapping is not None:
                mapping.close()
        elif isinstance(effect, s.UpdateIrqs):
            p.close_fds(effect.old_fds)

    def _signal(self, index: int, vectors: tuple[int, ...]) -> None:
        for vector in vectors:
            fd = self.session.irq_fds[index][vector]
            if fd is not None:
                os.eventfd_write(fd, 1)
