"""One vfio-user client connection: reads messages, feeds the session, carries its effects out.

Messages are handled one at a time, each with all its effects finished before the next, so an
unmap is complete before its reply and register writes take effect in order.  DMA windows are
mapped here, in the data plane's GuestMemory; on EOF, a protocol error or guest memory the client
truncated, everything it gave is released and the device keeps its state for the next client.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any, Protocol

from . import protocol as p
from . import session as s
from .memory import DmaMemory
from .transport import ConnectionClosed, Transport

log = logging.getLogger(__name__)

# Until the reactors poll NVMe queues, the control plane looks at the admin queue: often while
# commands come, rarely after a quiet spell (doorbells through the mmap send no message).
POLL_INTERVAL_S = 0.001
IDLE_POLL_INTERVAL_S = 0.02
IDLE_AFTER_POLLS = 1000


class ServedDevice(s.DeviceModel, Protocol):
    """A device the connection can serve: the session's interface, plus the work its register
    writes ask for and a reset."""

    def carry_out(self, event: Any, memory: DmaMemory) -> None:
        """Do what a ``region_write`` event asks, with the client's guest memory."""

    def reset(self) -> None:
        """DEVICE_RESET."""

    def poll(self, memory: DmaMemory, irq_fds: dict[int, list[int | None]]) -> int:
        """Run queued work (the admin queue) once; returns how much was done."""

    async def pause(self) -> None:
        """Stop the data plane's use of guest memory and interrupt fds (before they change)."""

    async def sync_data_plane(self, irq_fds: dict[int, list[int | None]]) -> None:
        """Let the data plane serve the device again as its state now says."""


class Connection:
    """Serves one client of ``device`` on ``transport``."""

    def __init__(self, transport: Transport, device: ServedDevice) -> None:
        self.transport = transport
        self.device = device
        self.session = s.Session(device)
        self.memory = DmaMemory()
        self._failed: dict[int, int] = {}             # msg id → errno of a mapping that failed
        self._quiet_polls = 0
        self._handling = False                        # a message's effects are being carried out

    async def run(self) -> None:
        """Serve until the client leaves or breaks the protocol, then release what it gave."""
        poller = asyncio.get_running_loop().create_task(self._poll_loop(asyncio.current_task()))
        try:
            while True:
                msg = await self.transport.receive()
                effects = self.session.receive(msg)
                self._handling = True
                if any(not isinstance(e, (s.Reply, s.TriggerIrq, s.UnmaskIrq)) for e in effects):
                    await self.device.pause()
                await self._carry_out(effects, msg.msg_id)
                self._poll()
                await self.device.sync_data_plane(self.session.irq_fds)
                self._handling = False
        except ConnectionClosed:
            log.info("%s: vfio-user client left", self.device.name)
        except p.ProtocolError as exc:
            log.warning("%s: vfio-user client dropped: %s", self.device.name, exc)
        finally:
            poller.cancel()
            # The reactors let go of guest memory before it is unmapped.
            await self.device.pause()
            self.close()

    async def _poll_loop(self, serving: asyncio.Task | None) -> None:
        while True:
            quiet = self._quiet_polls >= IDLE_AFTER_POLLS
            await asyncio.sleep(IDLE_POLL_INTERVAL_S if quiet else POLL_INTERVAL_S)
            if self.memory.truncated:
                # The client truncated a file behind guest memory: its lost pages read zeros now.
                log.warning("%s: vfio-user client truncated its guest memory: dropped",
                            self.device.name)
                if serving is not None:
                    serving.cancel()
                return
            self._poll()
            if not self._handling:
                await self.device.sync_data_plane(self.session.irq_fds)

    def _poll(self) -> None:
        if self.device.poll(self.memory, self.session.irq_fds):
            self._quiet_polls = 0
        else:
            self._quiet_polls += 1

    def close(self) -> None:
        for effect in self.session.close():
            self._release(effect)
        self.memory.close()
        p.close_fds(self.session.owned_fds())
        self.transport.close()

    async def _carry_out(self, effects: list[Any], msg_id: int) -> None:
        for effect in effects:
            if isinstance(effect, s.Reply):
                if msg_id in self._failed:
                    effect = s.Reply(effect.msg_id, effect.command, errno=self._failed.pop(msg_id))
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
                self.device.carry_out(effect, self.memory)

    def _map(self, effect: s.MapDma, msg_id: int) -> None:
        window = effect.window
        try:
            self.memory.map(window, effect.fd)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot map DMA window %#x+%#x: %s", self.device.name, window.addr,
                        window.size, exc)
            self.session.dma_windows.pop(window.addr, None)
            self._failed[msg_id] = errno.EINVAL if isinstance(exc, ValueError) else errno.ENOMEM
        finally:
            os.close(effect.fd)

    def _release(self, effect: Any) -> None:
        if isinstance(effect, s.UnmapDma):
            self.memory.unmap(effect.window)
        elif isinstance(effect, s.UpdateIrqs):
            p.close_fds(effect.old_fds)

    def _signal(self, index: int, vectors: tuple[int, ...]) -> None:
        for vector in vectors:
            fd = self.session.irq_fds[index][vector]
            if fd is not None:
                os.eventfd_write(fd, 1)
