"""The NVMe controller's PCI function as a vfio-user device: regions, interrupts, register access.

BAR0 is the register page (trapped: every access is a REGION_READ/WRITE) followed by the doorbell
page at 0x1000, which lives in a memfd that the client maps (the one sparse-mmap area), so the
guest's doorbell stores land in memory the controller reads; doorbell writes that QEMU traps anyway
(firmware, INTx emulation) are stored in the same page.  BAR4 holds the MSI-X table and BAR5 the
PBA; QEMU emulates the table itself, so they read as zeros here.

The I/O queues are served on a reactor (ext/nvme.pxi's ``NvmeController``): the admin queue
creates and deletes them in the controller's slots, and the connection takes the controller off
its reactor (``pause``) before anything the reactor reads changes under it (DMA windows, interrupt
fds, reset) and puts it back after (``sync_data_plane``).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from errno import EINVAL
from typing import Any, Protocol

from .. import _dataplane as dp
from ..vfio_user.memory import MemoryAccessError
from ..vfio_user.protocol import CommandError, PciIrq, PciRegion, RegionFlag, SparseArea
from ..vfio_user.session import RegionDescription
from . import identify as ident
from . import registers as r
from . import status as st
from .admin import AdminCommands, CreateQueue, DeleteQueue
from .command import CQE_SIZE, SQE_SIZE, Completion, Submission
from .pci import BarLayout, ConfigSpace, PciIdentity
from .prp import DataPointerError, prp_segments
from .queues import CompletionQueue, DoorbellError, SubmissionQueue

log = logging.getLogger(__name__)

DOORBELL_PAGE_SIZE = 0x1000
READ_WRITE = RegionFlag.READ | RegionFlag.WRITE
PAGE_SIZE = 4096
MAX_IO_QUEUES = 31
MAX_NAMESPACES = 32          # the data plane's NSIDs (NVME_MAX_NS)


class GuestMemory(Protocol):
    """The client's DMA-mapped memory (vfio_user.memory.DmaMemory): checked reads and writes."""

    def contains(self, addr: int, size: int, writable: bool = False) -> bool:
        ...

    def read(self, addr: int, size: int) -> bytes:
        ...

    def write(self, addr: int, data: bytes) -> None:
        ...


class NvmeFunction:
    """One emulated NVMe controller's PCI function."""

    def __init__(self, name: str, caps: r.Capabilities = r.Capabilities(),
                 identity: PciIdentity = PciIdentity(), bars: BarLayout = BarLayout(),
                 mappable_bar0: bool = True,
                 info: ident.ControllerInfo = ident.ControllerInfo(),
                 reactors: Any = None) -> None:
        self.name = name
        self.info = info
        self.reactors = reactors              # vhostd.dataplane.ReactorSet, or None: no I/O queues
        self.io: dp.NvmeController | None = None
        self._io_reactor: Any = None          # the reactor polling self.io, or None
        self._io_fds: tuple = ()
        self.disks: dict[int, Any] = {}       # nsid → the bdev's data-plane Disk
        self._namespaces_stale = False        # self.io serves other namespaces than self.disks
        self.bars = bars
        self.registers = r.ControllerRegisters(caps)
        self.config = ConfigSpace(identity, bars)
        self.admin = AdminCommands(info, caps.max_queue_entries, MAX_IO_QUEUES, bars.msix_vectors,
                                   self._queue_memory_ok)
        self._memory: GuestMemory | None = None
        self.admin_sq: SubmissionQueue | None = None
        self.admin_cq: CompletionQueue | None = None
        self.bar0_fd: int | None = None
        if mappable_bar0:
            # The file covers BAR0 up to the doorbell page's end; only that page is mappable.
            self.bar0_fd = os.memfd_create("nvme-bar0-" + name, os.MFD_CLOEXEC)
            os.ftruncate(self.bar0_fd, r.DOORBELL_OFFSET + DOORBELL_PAGE_SIZE)
            self._bar0_map: mmap.mmap | None = mmap.mmap(self.bar0_fd, r.DOORBELL_OFFSET
                                                         + DOORBELL_PAGE_SIZE)
            self.doorbells = memoryview(self._bar0_map)[r.DOORBELL_OFFSET:]
        else:
            self._bar0_map = None
            self.doorbells = memoryview(bytearray(DOORBELL_PAGE_SIZE))

    def set_namespaces(self, namespaces: dict[int, ident.NamespaceInfo],
                       disks: dict[int, Any] | None = None) -> None:
        """The namespaces Identify reports from now on (NSID → geometry and identifiers) and the
        disks the I/O queues serve them from (taken at the next controller enable)."""
        before = self.admin.namespaces
        changed = {nsid for nsid in set(before) | set(namespaces)
                   if before.get(nsid) != namespaces.get(nsid)}
        self.admin.namespaces = dict(namespaces)
        self.disks = dict(disks or {})
        if changed and self.registers.ready:
            self.admin.namespaces_changed(changed)
            self._namespaces_stale = True

    # -- vfio-user DeviceModel ----------------------------------------------------------------
    def region(self, index: int) -> RegionDescription:
        bars = self.bars
        if index == PciRegion.BAR0:
            if self.bar0_fd is None:
                return RegionDescription(bars.bar0_size, READ_WRITE)
            return RegionDescription(bars.bar0_size, READ_WRITE, self.bar0_fd, 0,
                                     (SparseArea(r.DOORBELL_OFFSET, DOORBELL_PAGE_SIZE),))
        if index == PciRegion.BAR4:
            return RegionDescription(bars.msix_table_size, READ_WRITE)
        if index == PciRegion.BAR5:
            return RegionDescription(bars.msix_pba_size, READ_WRITE)
        if index == PciRegion.CONFIG:
            return RegionDescription(4096, READ_WRITE)
        return RegionDescription()

    def irq_count(self, index: int) -> int:
        return {PciIrq.INTX: 1, PciIrq.MSIX: self.bars.msix_vectors}.get(index, 0)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            return self.config.read(offset, count)
        if index == PciRegion.BAR0:
            return self._bar0_read(offset, count)
        return bytes(count)               # MSI-X table (QEMU's) and PBA (nothing pending)

    def region_write(self, index: int, offset: int, data: bytes) -> list[Any]:
        if index == PciRegion.CONFIG:
            self.config.write(offset, data)
            return []
        if index == PciRegion.BAR0:
            return self._bar0_write(offset, data)
        return []

    # -- BAR0 ---------------------------------------------------------------------------------
    def _bar0_read(self, offset: int, count: int) -> bytes:
        end = offset + count
        if end <= r.REGISTER_PAGE_SIZE:
            return self.registers.read(offset, count)
        if offset >= r.DOORBELL_OFFSET and end <= r.DOORBELL_OFFSET + DOORBELL_PAGE_SIZE:
            return bytes(self.doorbells[offset - r.DOORBELL_OFFSET:end - r.DOORBELL_OFFSET])
        if offset >= r.DOORBELL_OFFSET + DOORBELL_PAGE_SIZE:
            return bytes(count)
        raise CommandError(EINVAL, "BAR0 read %#x+%d crosses a page" % (offset, count))

    def _bar0_write(self, offset: int, data: bytes) -> list[Any]:
        if offset + len(data) <= r.REGISTER_PAGE_SIZE:
            return self.registers.write(offset, data)
        start = offset - r.DOORBELL_OFFSET
        if 0 <= start and start + len(data) <= DOORBELL_PAGE_SIZE:
            if len(data) != 4 or start % 4:
                raise CommandError(EINVAL, "doorbell write of %d bytes at %#x" % (len(data), offset))
            self.doorbells[start:start + 4] = data
            return []
        raise CommandError(EINVAL, "BAR0 write %#x+%d outside registers and doorbells"
                           % (offset, len(data)))

    # -- controller work ----------------------------------------------------------------------
    def carry_out(self, event: Any, memory: GuestMemory) -> None:
        """Do what a register write asked for: enabling maps the admin queues (controller fatal
        status if they are not in writable mapped memory), disabling drops every queue."""
        self._memory = memory
        if isinstance(event, r.Enable):
            admin = event.admin
            sq_bytes, cq_bytes = admin.sq_entries * SQE_SIZE, admin.cq_entries * CQE_SIZE
            if not memory.contains(admin.sq_addr, sq_bytes) \
                    or not memory.contains(admin.cq_addr, cq_bytes, writable=True):
                self.registers.report_fatal(
                    "admin queues SQ %#x (%d) CQ %#x (%d) are not in writable mapped memory"
                    % (admin.sq_addr, admin.sq_entries, admin.cq_addr, admin.cq_entries))
                return
            self.admin_sq = SubmissionQueue(0, admin.sq_addr, admin.sq_entries)
            self.admin_cq = CompletionQueue(0, admin.cq_addr, admin.cq_entries)
            self._start_io(memory)
            self.registers.report_ready()
        elif isinstance(event, r.Disable):
            self._drop_queues()
            self.registers.report_disabled()
        elif isinstance(event, r.Shutdown):
            self.registers.report_shutdown_complete()

    def _start_io(self, memory: GuestMemory) -> None:
        guest = getattr(memory, "guest", None)
        if self.reactors is None or guest is None:
            return
        self._drop_io()
        self.io = dp.NvmeController(guest, self.doorbells, PAGE_SIZE << self.info.mdts)
        for nsid, disk in self.disks.items():
            self.io.set_namespace(nsid, disk)

    def _drop_io(self) -> None:
        """Forget the I/O queues' controller (it is off its reactor: see pause)."""
        if self.io is not None:
            if self._io_reactor is not None:
                raise RuntimeError("%s: I/O queues dropped while a reactor polls them" % self.name)
            self.io.release()
            self.io = None
            self._io_fds = ()

    def _irq_fd_list(self, irq_fds: dict[int, list[int | None]]) -> tuple:
        if self.config.msix_enabled:
            return tuple(irq_fds.get(PciIrq.MSIX, []))
        if not self.config.intx_disabled:
            return tuple(irq_fds.get(PciIrq.INTX, [])[:1])
        return ()

    async def pause(self) -> None:
        """Take the I/O queues off their reactor (in-flight commands finish first)."""
        reactor, self._io_reactor = self._io_reactor, None
        if reactor is None or self.io is None:
            return
        await self.reactors.wait(reactor, reactor.post_remove_queue(self.io.queue))
        reactor.forget_queue(self.io.queue)
        self.reactors.placed(reactor, -1)

    async def sync_data_plane(self, irq_fds: dict[int, list[int | None]]) -> None:
        """Put the I/O queues on a reactor while the controller is ready (interrupt fds as the
        client set them), and off it when it is not."""
        io = self.io
        if io is not None and io.fatal and not self.registers.fatal:
            log.warning("%s: an I/O queue doorbell was impossible: controller fatal status", self.name)
            self.registers.report_fatal("impossible I/O queue doorbell")
        wanted = io is not None and self.registers.ready and not self.registers.fatal
        fds = self._irq_fd_list(irq_fds) if wanted else ()
        stale = self._namespaces_stale and io is not None
        if self._io_reactor is not None and (not wanted or fds != self._io_fds or stale):
            await self.pause()
        if not wanted or self._io_reactor is not None:
            return
        if stale:
            for nsid in range(1, MAX_NAMESPACES + 1):
                if self.disks.get(nsid) is not io.namespace_disk(nsid):
                    io.set_namespace(nsid, self.disks.get(nsid))
            self._namespaces_stale = False
        io.set_irq_fds(list(fds))
        self._io_fds = fds
        reactor = self.reactors.least_loaded()
        self._io_reactor = reactor
        self.reactors.placed(reactor, 1)
        await self.reactors.wait(reactor, reactor.post_add_queue(io.queue))

    def _apply_queue_effects(self, effects: list) -> None:
        io = self.io
        if io is None:
            return
        for effect in effects:
            if isinstance(effect, CreateQueue):
                q = effect.config
                if effect.kind == "cq":
                    io.create_cq(q.qid, q.addr, q.entries, q.vector, q.interrupts)
                else:
                    io.create_sq(q.qid, q.addr, q.entries, q.cqid)
            elif isinstance(effect, DeleteQueue):
                if effect.kind == "cq":
                    io.delete_cq(effect.qid)
                else:
                    io.delete_sq(effect.qid)

    def _drop_queues(self) -> None:
        self._drop_io()
        self.admin_sq = self.admin_cq = None
        self.admin.reset()
        self.doorbells[:] = bytes(DOORBELL_PAGE_SIZE)

    def _queue_memory_ok(self, addr: int, size: int, writable: bool) -> bool:
        return self._memory is not None and self._memory.contains(addr, size, writable)

    def poll(self, memory: GuestMemory, irq_fds: dict[int, list[int | None]]) -> int:
        """One pass over the admin queue; interrupts go to the client's eventfds: the MSI-X
        vector's while MSI-X is enabled, else INTx unless the Command register disables it."""
        return self.poll_admin(memory, lambda vector: self._signal(irq_fds, vector))

    def _signal(self, irq_fds: dict[int, list[int | None]], vector: int) -> None:
        fd = None
        if self.config.msix_enabled:
            vectors = irq_fds.get(PciIrq.MSIX, [])
            fd = vectors[vector] if vector < len(vectors) else None
        elif not self.config.intx_disabled:
            fd = (irq_fds.get(PciIrq.INTX) or [None])[0]
        if fd is not None:
            os.eventfd_write(fd, 1)

    def poll_admin(self, memory: GuestMemory, signal: Any) -> int:
        """Run what the host queued on the admin SQ (up to the free CQ slots); ``signal(vector)``
        raises the admin CQ's interrupt.  Returns the number of commands completed."""
        sq, cq = self.admin_sq, self.admin_cq
        if sq is None or cq is None or not self.registers.ready:
            return 0
        self._memory = memory
        if not memory.contains(sq.addr, sq.entries * SQE_SIZE) \
                or not memory.contains(cq.addr, cq.entries * CQE_SIZE, writable=True):
            return 0              # unmapped for now (firmware remaps low memory): wait for it
        sq_tail, cq_head = struct.unpack_from("<II", self.doorbells, 0)
        try:
            sq.ring(sq_tail)
            cq.ring(cq_head)
        except DoorbellError as exc:
            log.warning("%s: %s: controller fatal status", self.name, exc)
            self.registers.report_fatal(str(exc))
            self.admin_sq = self.admin_cq = None
            return 0
        done = 0
        while sq.pending() and not cq.full():
            try:
                sub = Submission.decode(memory.read(sq.pop(), SQE_SIZE))
            except MemoryAccessError as exc:     # the SQ left guest memory under us
                self.registers.report_fatal("admin SQ unreadable: %s" % exc)
                return done
            completion = self._run_admin(sub, memory)
            if completion is None:
                continue                     # held (an Asynchronous Event Request)
            if not self._post_admin(memory, Completion(sub.cid, completion.status, completion.dw0,
                                                       sq.head, 0)):
                return done
            done += 1
        while not cq.full():                 # events complete held AERs
            event = self.admin.take_event()
            if event is None:
                break
            if not self._post_admin(memory, Completion(event[0], st.SUCCESS, event[1], sq.head, 0)):
                return done
            done += 1
        if done:
            signal(cq.vector)
        return done

    def _post_admin(self, memory: GuestMemory, completion: Completion) -> bool:
        """Post on the admin CQ; False (controller fatal) if its memory went away."""
        address, phase = self.admin_cq.push()
        entry = completion.encode(phase)
        try:
            # DW0–DW2 first, then DW3 with the phase tag: the host never sees half an entry.
            memory.write(address, entry[:12])
            memory.write(address + 12, entry[12:])
        except MemoryAccessError as exc:
            self.registers.report_fatal("admin CQ unwritable: %s" % exc)
            return False
        return True

    def _run_admin(self, sub: Submission, memory: GuestMemory) -> Completion | None:
        result = self.admin.execute(sub)
        if result.held:
            return None
        status = result.status
        if result.effects:
            try:
                self._apply_queue_effects(result.effects)
            except ValueError as exc:              # memory went away since the admin check
                log.warning("%s: %s", self.name, exc)
                self.admin.reset_queue_effects(result.effects)
                status = st.DATA_TRANSFER_ERROR
        if result.data is not None and status.ok:
            try:
                offset = 0
                for addr, size in prp_segments(sub.prp1, sub.prp2, len(result.data), PAGE_SIZE,
                                               self._read_list(memory)):
                    memory.write(addr, result.data[offset:offset + size])
                    offset += size
            except DataPointerError as exc:
                status = exc.status
            except MemoryAccessError:
                status = st.DATA_TRANSFER_ERROR
        return Completion(sub.cid, status, result.dw0)

    @staticmethod
    def _read_list(memory: GuestMemory):
        def read(addr: int, size: int) -> bytes:
            try:
                return memory.read(addr, size)
            except MemoryAccessError as exc:
                raise DataPointerError(st.DATA_TRANSFER_ERROR, str(exc)) from None
        return read

    def reset(self) -> None:
        """DEVICE_RESET: registers, config space, queues and doorbells to power-on values."""
        self.registers.reset()
        self.config.reset()
        self._drop_queues()

    def close(self) -> None:
        """Release the BAR0 memory (the controller is deleted)."""
        self._drop_io()
        self.doorbells.release()
        if self._bar0_map is not None:
            self._bar0_map.close()
            self._bar0_map = None
        if self.bar0_fd is not None:
            os.close(self.bar0_fd)
            self.bar0_fd = None

