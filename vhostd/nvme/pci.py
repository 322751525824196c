"""PCI configuration space of the emulated NVMe controller: bytes plus a per-byte write mask.

QEMU's vfio-user client reads config space back after writing it (BAR sizing, the ROM probe, MSI-X
control), so read-only bits must stay and BARs must answer sizing like hardware: the mask keeps the
address bits a BAR of its size has and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from errno import EINVAL

from ..vfio_user.protocol import CommandError

CONFIG_SPACE_SIZE = 4096

# Standard header
VENDOR_ID = 0x00
COMMAND = 0x04
STATUS = 0x06
CLASS_CODE = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR4 = 0x20
BAR5 = 0x24
SUBSYSTEM_VENDOR_ID = 0x2C
ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

STATUS_CAPABILITY_LIST = 1 << 4
# Command: I/O space, memory space, bus master, parity, SERR, INTx disable.
COMMAND_WRITABLE = 0x0547
COMMAND_MEMORY = 1 << 1
COMMAND_INTX_DISABLE = 1 << 10
BAR_MEMORY_64 = 0x4
CLASS_NVME = 0x010802          # mass storage / non-volatile memory / NVM Express

# Capabilities: power management, MSI-X, PCI Express (endpoint, version 2)
CAP_PM, CAP_MSIX, CAP_PCIE = 0x01, 0x11, 0x10
PM_OFFSET, MSIX_OFFSET, PCIE_OFFSET = 0x40, 0x50, 0x60
PM_NO_SOFT_RESET = 1 << 3
MSIX_ENABLE = 1 << 15
MSIX_FUNCTION_MASK = 1 << 14
PCIE_CAP_SIZE = 0x3C
PCIE_DEVCAP_FLR = 1 << 28


@dataclass(frozen=True)
class PciIdentity:
    """The ids the function reports (SPDK's vfio-user controller uses these)."""

    vendor_id: int = 0x4E58
    device_id: int = 0x0001
    subsystem_vendor_id: int = 0x4E58
    subsystem_id: int = 0x0001


@dataclass(frozen=True)
class BarLayout:
    """Sizes of the memory BARs: BAR0 (registers + doorbells, 64-bit), BAR4 (MSI-X table) and BAR5
    (MSI-X PBA), each a power of two of at least 4 KiB."""

    bar0_size: int = 0x4000
    msix_table_size: int = 0x1000
    msix_pba_size: int = 0x1000
    msix_vectors: int = 32


class ConfigSpace:
    """4 KiB of config space; writes change only the bits the mask allows."""

    def __init__(self, identity: PciIdentity = PciIdentity(), bars: BarLayout = BarLayout()) -> None:
        self.identity = identity
        self.bars = bars
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._mask = bytearray(CONFIG_SPACE_SIZE)
        self.reset()

    def reset(self) -> None:
        """Power-on contents."""
        data, mask = self._data, self._mask
        data[:] = bytes(CONFIG_SPACE_SIZE)
        mask[:] = bytes(CONFIG_SPACE_SIZE)
        ident, bars = self.identity, self.bars
        struct.pack_into("<HH", data, VENDOR_ID, ident.vendor_id, ident.device_id)
        struct.pack_into("<H", data, STATUS, STATUS_CAPABILITY_LIST)
        struct.pack_into("<I", data, 0x08, CLASS_NVME << 8)          # revision 0
        struct.pack_into("<HH", data, SUBSYSTEM_VENDOR_ID, ident.subsystem_vendor_id,
                         ident.subsystem_id)
        data[CAPABILITIES_POINTER] = PM_OFFSET
        data[INTERRUPT_PIN] = 1
        self._set_mask(COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(0x0C, 2, 0xFFFF)                               # cache line, latency timer
        self._set_mask(INTERRUPT_LINE, 1, 0xFF)
        # BARs: type bits read-only, address bits of the BAR's size writable (sizing reads them).
        struct.pack_into("<I", data, BAR0, BAR_MEMORY_64)
        self._set_mask(BAR0, 4, ~(bars.bar0_size - 1) & 0xFFFFFFF0)
        self._set_mask(BAR0 + 4, 4, 0xFFFFFFFF)
        self._set_mask(BAR4, 4, ~(bars.msix_table_size - 1) & 0xFFFFFFF0)
        self._set_mask(BAR5, 4, ~(bars.msix_pba_size - 1) & 0xFFFFFFF0)
        # ROM (0x30) stays 0 and read-only: QEMU would otherwise expose a ROM BAR.
        # Power management: version 3; PMCSR power state writable, No_Soft_Reset.
        struct.pack_into("<BBH", data, PM_OFFSET, CAP_PM, MSIX_OFFSET, 3)
        struct.pack_into("<H", data, PM_OFFSET + 4, PM_NO_SOFT_RESET)
        self._set_mask(PM_OFFSET + 4, 1, 0x3)
        # MSI-X: table at BAR4 offset 0, PBA at BAR5 offset 0; enable and mask writable.
        struct.pack_into("<BBHII", data, MSIX_OFFSET, CAP_MSIX, PCIE_OFFSET, bars.msix_vectors - 1,
                         4, 5)
        self._set_mask(MSIX_OFFSET + 2, 2, MSIX_ENABLE | MSIX_FUNCTION_MASK)
        # PCI Express v2 endpoint with function-level reset; device control writable.
        struct.pack_into("<BBHI", data, PCIE_OFFSET, CAP_PCIE, 0, 0x0002, PCIE_DEVCAP_FLR)
        self._set_mask(PCIE_OFFSET + 8, 2, 0xFFFF)

    def _set_mask(self, offset: int, size: int, bits: int) -> None:
        self._mask[offset:offset + size] = (bits & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def read(self, offset: int, size: int) -> bytes:
        if offset + size > CONFIG_SPACE_SIZE:
            raise CommandError(EINVAL, "config read %#x+%d beyond 4 KiB" % (offset, size))
        return bytes(self._data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset``, bit by bit where the mask allows."""
        if offset + len(data) > CONFIG_SPACE_SIZE:
            raise CommandError(EINVAL, "config write %#x+%d beyond 4 KiB" % (offset, len(data)))
        for i, value in enumerate(data):
            mask = self._mask[offset + i]
            self._data[offset + i] = (self._data[offset + i] & ~mask) | (value & mask)

    def word(self, offset: int) -> int:
        return struct.unpack_from("<H", self._data, offset)[0]

    @property
    def msix_enabled(self) -> bool:
        return bool(self.word(MSIX_OFFSET + 2) & MSIX_ENABLE)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.word(COMMAND) & COMMAND_INTX_DISABLE)
