"""The NVMe controller's PCI function as a vfio-user device: regions, interrupts, register access.

BAR0 is the register page (trapped: every access is a REGION_READ/WRITE) followed by the doorbell
page at 0x1000, which lives in a memfd that the client maps (the one sparse-mmap area), so the
guest's doorbell stores land in memory the controller reads; doorbell writes that QEMU traps anyway
(firmware, INTx emulation) are stored in the same page.  BAR4 holds the MSI-X table and BAR5 the
PBA; QEMU emulates the table itself, so they read as zeros here.
"""

from __future__ import annotations

import logging
import mmap
import os
from errno import EINVAL
from typing import Any, Protocol

from ..vfio_user.protocol import CommandError, PciIrq, PciRegion, RegionFlag, SparseArea
from ..vfio_user.session import DmaWindow, RegionDescription
from . import registers as r
from .pci import BarLayout, ConfigSpace, PciIdentity

log = logging.getLogger(__name__)

DOORBELL_PAGE_SIZE = 0x1000
READ_WRITE = RegionFlag.READ | RegionFlag.WRITE
SQ_ENTRY_SIZE = 64
CQ_ENTRY_SIZE = 16


class DmaLookup(Protocol):
    """Where guest-physical addresses are mapped (the vfio-user session's DMA windows)."""

    def find_window(self, addr: int, size: int) -> DmaWindow | None:
        ...


class NvmeFunction:
    """One emulated NVMe controller's PCI function."""

    def __init__(self, name: str, caps: r.Capabilities = r.Capabilities(),
                 identity: PciIdentity = PciIdentity(), bars: BarLayout = BarLayout(),
                 mappable_bar0: bool = True) -> None:
        self.name = name
        self.bars = bars
        self.registers = r.ControllerRegisters(caps)
        self.config = ConfigSpace(identity, bars)
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
    def carry_out(self, event: Any, dma: DmaLookup) -> None:
        """Do what a register write asked for.  Until queues run on the reactors, enabling checks
        that the admin queues lie in mapped guest memory and reports ready (or fatal status)."""
        if isinstance(event, r.Enable):
            admin = event.admin
            sq = dma.find_window(admin.sq_addr, admin.sq_entries * SQ_ENTRY_SIZE)
            cq = dma.find_window(admin.cq_addr, admin.cq_entries * CQ_ENTRY_SIZE)
            if sq is None or cq is None or not cq.writable:
                self.registers.report_enable_failed(
                    "admin queues SQ %#x (%d) CQ %#x (%d) are not in writable mapped memory"
                    % (admin.sq_addr, admin.sq_entries, admin.cq_addr, admin.cq_entries))
            else:
                self.registers.report_ready()
        elif isinstance(event, r.Disable):
            self.registers.report_disabled()
        elif isinstance(event, r.Shutdown):
            self.registers.report_shutdown_complete()

    def reset(self) -> None:
        """DEVICE_RESET: registers, config space and doorbells to power-on values."""
        self.registers.reset()
        self.config.reset()
        self.doorbells[:] = bytes(DOORBELL_PAGE_SIZE)

    def close(self) -> None:
        """Release the BAR0 memory (the controller is deleted)."""
        self.doorbells.release()
        if self._bar0_map is not None:
            self._bar0_map.close()
            self._bar0_map = None
        if self.bar0_fd is not None:
            os.close(self.bar0_fd)
            self.bar0_fd = None

