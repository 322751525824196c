"""The NVMe controller register file (BAR0's first page) as a state machine: no memory, no queues.

``ControllerRegisters.read(offset, size)`` returns register bytes; ``write(offset, data)`` stores
what the host may change and returns *events* for the controller (enable with these admin queues,
disable, shut down).  The controller reports back when it has done the work
(``report_ready()``, ``report_fatal()``, ``report_disabled()``,
``report_shutdown_complete()``) and the status register follows, so the ready and shutdown
handshakes of the NVMe base specification stay here, in one place.
Doorbells (0x1000 on) are not registers: the controller keeps them in shared memory.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass
from errno import EINVAL

from ..vfio_user.protocol import CommandError

log = logging.getLogger(__name__)

REGISTER_PAGE_SIZE = 0x1000
DOORBELL_OFFSET = 0x1000
PAGE_SHIFT = 12


class Reg(enum.IntEnum):
    """Register offsets in BAR0."""

    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    CMBLOC = 0x38
    CMBSZ = 0x3C


# CC fields
CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20
CC_WRITABLE = 0x00FFFFF1          # EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES
# CSTS fields
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
# AQA: 12-bit sizes, 0-based
AQA_SIZE_MASK = 0xFFF
CSS_NVM = 0


@dataclass(frozen=True)
class Capabilities:
    """The values CAP and VS report (SPDK's defaults where the spec leaves a choice)."""

    max_queue_entries: int = 256          # MQES + 1
    timeout_500ms: int = 20               # CAP.TO: how long the host waits for RDY
    doorbell_stride_shift: int = 0        # DSTRD: doorbells 4 << n bytes apart
    version: int = 0x00010400             # 1.4

    def cap(self) -> int:
        return ((self.max_queue_entries - 1)
                | 1 << 16                                   # CQR: queues physically contiguous
                | self.timeout_500ms << 24
                | self.doorbell_stride_shift << 32
                | 1 << 37)                                  # CSS: NVM command set; MPSMIN=MPSMAX=0


@dataclass(frozen=True)
class AdminQueues:
    """Where the admin queues live, from AQA/ASQ/ACQ at enable time."""

    sq_addr: int
    sq_entries: int
    cq_addr: int
    cq_entries: int


@dataclass(frozen=True)
class Enable:
    """CC.EN 0→1 with a valid configuration: map the admin queues, then call ``report_ready()``
    (or ``report_fatal()`` if they cannot be reached)."""

    admin: AdminQueues
    page_size: int
    io_sq_entry_size: int
    io_cq_entry_size: int


@dataclass(frozen=True)
class Disable:
    """CC.EN 1→0 (controller reset): stop and delete every queue, then call
    ``report_disabled()``."""


@dataclass(frozen=True)
class Shutdown:
    """CC.SHN set while enabled: finish outstanding work, flush, then
    ``report_shutdown_complete()``."""

    abrupt: bool


@dataclass(frozen=True)
class InterruptMaskChanged:
    """INTMS/INTMC changed the INTx/MSI mask (``registers.interrupt_mask``)."""


RegisterEvent = Enable | Disable | Shutdown | InterruptMaskChanged


class ControllerRegisters:
    """BAR0 registers of one NVMe controller."""

    def __init__(self, caps: Capabilities = Capabilities()) -> None:
        self.caps = caps
        self.reset()

    def reset(self) -> None:
        """Power-on values (DEVICE_RESET, or a new controller)."""
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.interrupt_mask = 0

    @property
    def enabled(self) -> bool:
        return bool(self.cc & CC_EN)

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY)

    @property
    def fatal(self) -> bool:
        return bool(self.csts & CSTS_CFS)

    # -- host access --------------------------------------------------------------------------
    def image(self) -> bytes:
        """The register page as the host reads it."""
        page = bytearray(REGISTER_PAGE_SIZE)
        struct.pack_into("<QIIIIxxxxIIIQQII", page, 0, self.caps.cap(), self.caps.version,
                         self.interrupt_mask, self.interrupt_mask, self.cc, self.csts, 0,
                         self.aqa, self.asq, self.acq, 0, 0)
        return bytes(page)

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the register page."""
        if offset + size > REGISTER_PAGE_SIZE:
            raise CommandError(EINVAL, "register read %#x+%d beyond the page" % (offset, size))
        return self.image()[offset:offset + size]

    def write(self, offset: int, data: bytes) -> list[RegisterEvent]:
        """A host store of 4 or 8 naturally aligned bytes (8: two dwords, low first)."""
        size = len(data)
        if size not in (4, 8) or offset % size or offset + size > REGISTER_PAGE_SIZE:
            raise CommandError(EINVAL, "register write of %d bytes at %#x" % (size, offset))
        events: list[RegisterEvent] = []
        for i in range(0, size, 4):
            (value,) = struct.unpack_from("<I", data, i)
            events += self._write_dword(offset + i, value)
        return events

    def _write_dword(self, offset: int, value: int) -> list[RegisterEvent]:
        if offset == Reg.CC:
            return self._write_cc(value)
        if offset == Reg.INTMS:
            self.interrupt_mask |= value
            return [InterruptMaskChanged()]
        if offset == Reg.INTMC:
            self.interrupt_mask &= ~value
            return [InterruptMaskChanged()]
        if offset == Reg.AQA:
            self.aqa = value & (AQA_SIZE_MASK | AQA_SIZE_MASK << 16)
        elif offset in (Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4):
            base = Reg.ASQ if offset < Reg.ACQ else Reg.ACQ
            shift = 32 * ((offset - base) // 4)
            old = self.asq if base == Reg.ASQ else self.acq
            new = (old & ~(0xFFFFFFFF << shift)) | value << shift
            new &= ~((1 << PAGE_SHIFT) - 1)                 # bits 11:0 are reserved
            if base == Reg.ASQ:
                self.asq = new
            else:
                self.acq = new
        elif offset == Reg.NSSR:
            pass                                            # CAP.NSSRS is 0: no subsystem reset
        else:
            log.debug("write %#x to read-only register %#x ignored", value, offset)
        return []

    def _write_cc(self, value: int) -> list[RegisterEvent]:
        value &= CC_WRITABLE
        was_enabled = self.enabled
        if was_enabled and value & CC_EN:
            # While enabled only SHN may change (the other fields configure the enable).
            old_shn = self.cc >> CC_SHN_SHIFT & CC_SHN_MASK
            self.cc = (self.cc & ~(CC_SHN_MASK << CC_SHN_SHIFT)) | (value & CC_SHN_MASK << CC_SHN_SHIFT)
            shn = self.cc >> CC_SHN_SHIFT & CC_SHN_MASK
            if shn and not old_shn and self.ready:
                self._set_shst(SHST_OCCURRING)
                return [Shutdown(abrupt=shn == 2)]
            return []
        self.cc = value
        if was_enabled:
            return [Disable()]
        if not value & CC_EN:
            return []
        return self._enable()

    def _enable(self) -> list[RegisterEvent]:
        problem = self._config_problem()
        if problem:
            log.warning("controller enable refused: %s", problem)
            self.csts |= CSTS_CFS
            return []
        cc = self.cc
        admin = AdminQueues(self.asq, (self.aqa & AQA_SIZE_MASK) + 1,
                            self.acq, (self.aqa >> 16 & AQA_SIZE_MASK) + 1)
        return [Enable(admin, 1 << (PAGE_SHIFT + (cc >> CC_MPS_SHIFT & CC_MPS_MASK)),
                       1 << (cc >> CC_IOSQES_SHIFT & 0xF), 1 << (cc >> CC_IOCQES_SHIFT & 0xF))]

    def _config_problem(self) -> str | None:
        cc = self.cc
        if cc >> CC_CSS_SHIFT & CC_CSS_MASK != CSS_NVM:
            return "CC.CSS %d is not the NVM command set" % (cc >> CC_CSS_SHIFT & CC_CSS_MASK)
        if cc >> CC_MPS_SHIFT & CC_MPS_MASK:
            return "CC.MPS %d: only 4 KiB pages" % (cc >> CC_MPS_SHIFT & CC_MPS_MASK)
        if cc >> CC_AMS_SHIFT & CC_AMS_MASK:
            return "CC.AMS %d: only round robin" % (cc >> CC_AMS_SHIFT & CC_AMS_MASK)
        sq_entries = (self.aqa & AQA_SIZE_MASK) + 1
        cq_entries = (self.aqa >> 16 & AQA_SIZE_MASK) + 1
        if sq_entries < 2 or cq_entries < 2:
            return "admin queues of %d/%d entries (AQA %#x)" % (sq_entries, cq_entries, self.aqa)
        if not self.asq or not self.acq:
            return "admin queue base ASQ %#x ACQ %#x" % (self.asq, self.acq)
        return None

    def _set_shst(self, shst: int) -> None:
        self.csts = (self.csts & ~(0x3 << CSTS_SHST_SHIFT)) | shst << CSTS_SHST_SHIFT

    # -- controller reports -------------------------------------------------------------------
    def report_ready(self) -> None:
        """The admin queues are mapped: the controller is ready."""
        if self.enabled:
            self.csts = (self.csts | CSTS_RDY) & ~CSTS_CFS

    def report_fatal(self, reason: str) -> None:
        """The controller cannot go on (admin queues unreachable, an impossible doorbell):
        controller fatal status, until the host resets it."""
        log.warning("controller fatal status: %s", reason)
        self.csts |= CSTS_CFS

    def report_disabled(self) -> None:
        """Every queue is gone: not ready, shutdown state cleared, fatal status cleared."""
        self.csts = 0

    def report_shutdown_complete(self) -> None:
        self._set_shst(SHST_COMPLETE)
