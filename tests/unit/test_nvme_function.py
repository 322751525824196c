"""The NVMe controller's PCI function: config space as QEMU reads it back, BAR0 routing to the
registers and the shared doorbell page, and through a vfio-user session (bytes in, bytes out)."""

import os
import struct

import pytest

from vhostd.nvme import pci
from vhostd.nvme import registers as r
from vhostd.nvme.function import NvmeFunction
from vhostd.vfio_user import protocol as p
from vhostd.vfio_user import session as s
from vhostd.vfio_user.memory import MemoryAccessError
from vhostd.vfio_user.protocol import Command, CommandError, PciIrq, PciRegion


@pytest.fixture
def function():
    fn = NvmeFunction("nvme0")
    yield fn
    fn.close()


def config32(fn, offset):
    return struct.unpack("<I", fn.region_read(PciRegion.CONFIG, offset, 4))[0]


def config16(fn, offset):
    return struct.unpack("<H", fn.region_read(PciRegion.CONFIG, offset, 2))[0]


def test_config_space_is_an_nvme_controller(function):
    assert config32(function, 0) == 0x00014E58
    assert config32(function, 0x08) >> 8 == 0x010802
    assert config16(function, pci.STATUS) & pci.STATUS_CAPABILITY_LIST
    assert config32(function, pci.BAR0) == 0x4               # 64-bit memory, not prefetchable
    assert config32(function, pci.SUBSYSTEM_VENDOR_ID) == 0x00014E58
    assert function.region_read(PciRegion.CONFIG, pci.INTERRUPT_PIN, 1) == b"\1"


def capabilities(fn):
    found = {}
    offset = fn.region_read(PciRegion.CONFIG, pci.CAPABILITIES_POINTER, 1)[0]
    while offset:
        cap_id, next_offset = fn.region_read(PciRegion.CONFIG, offset, 2)
        found[cap_id] = offset
        offset = next_offset
    return found


def test_capability_list_has_pm_msix_and_pcie(function):
    caps = capabilities(function)
    assert set(caps) == {pci.CAP_PM, pci.CAP_MSIX, pci.CAP_PCIE}
    assert config16(function, caps[pci.CAP_PM] + 2) & 7 == 3
    assert config16(function, caps[pci.CAP_PM] + 4) & pci.PM_NO_SOFT_RESET
    msix = caps[pci.CAP_MSIX]
    assert config16(function, msix + 2) & 0x7FF == 31         # 32 vectors
    assert config32(function, msix + 4) == 4 and config32(function, msix + 8) == 5
    assert config16(function, caps[pci.CAP_PCIE] + 2) & 0xF == 2


def test_bar_sizing_reads_back_the_size_mask(function):
    for offset, expected in ((pci.BAR0, 0xFFFFC004), (pci.BAR0 + 4, 0xFFFFFFFF),
                             (pci.BAR4, 0xFFFFF000), (pci.BAR5, 0xFFFFF000), (0x18, 0), (0x1C, 0)):
        function.region_write(PciRegion.CONFIG, offset, b"\xff" * 4)
        assert config32(function, offset) == expected, hex(offset)
    function.region_write(PciRegion.CONFIG, pci.BAR0, struct.pack("<I", 0xFE000000))
    assert config32(function, pci.BAR0) == 0xFE000004


def test_rom_register_reads_zero_after_qemus_probe(function):
    function.region_write(PciRegion.CONFIG, pci.ROM, struct.pack("<I", 0xFFFFF800))
    assert config32(function, pci.ROM) == 0


def test_read_only_config_bits_stay(function):
    function.region_write(PciRegion.CONFIG, 0, b"\xff" * 0x40)
    assert config32(function, 0) == 0x00014E58
    assert config32(function, 0x08) >> 8 == 0x010802
    assert config16(function, pci.COMMAND) == pci.COMMAND_WRITABLE


def test_msix_control_enable_and_mask_are_writable_table_size_is_not(function):
    msix = capabilities(function)[pci.CAP_MSIX]
    function.region_write(PciRegion.CONFIG, msix + 2, struct.pack("<H", 0xC7FF))
    assert config16(function, msix + 2) == 0xC01F
    assert function.config.msix_enabled
    function.region_write(PciRegion.CONFIG, msix + 2, struct.pack("<H", 0x001F))
    assert not function.config.msix_enabled


def test_bar0_registers_and_doorbells(function):
    cap = struct.unpack("<Q", function.region_read(PciRegion.BAR0, 0, 8))[0]
    assert cap & 0xFFFF == 255
    function.region_write(PciRegion.BAR0, 0x1008, struct.pack("<I", 7))       # SQ 1 tail
    assert function.doorbells[8:12] == struct.pack("<I", 7)
    assert function.region_read(PciRegion.BAR0, 0x1008, 4) == struct.pack("<I", 7)
    assert function.region_read(PciRegion.BAR0, 0x2000, 4) == bytes(4)
    with pytest.raises(CommandError):
        function.region_write(PciRegion.BAR0, 0x1002, b"\1\0")
    with pytest.raises(CommandError):
        function.region_write(PciRegion.BAR0, 0x2000, bytes(4))


def test_doorbell_page_is_the_memory_behind_bar0s_fd(function):
    os.pwrite(function.bar0_fd, struct.pack("<I", 3), r.DOORBELL_OFFSET)   # as a client's mmap store
    assert function.region_read(PciRegion.BAR0, 0x1000, 4) == struct.pack("<I", 3)


def test_without_a_mappable_bar0_there_is_no_fd_and_doorbells_are_trapped():
    fn = NvmeFunction("nvme1", mappable_bar0=False)
    assert fn.region(PciRegion.BAR0) == s.RegionDescription(0x4000, 3)
    fn.region_write(PciRegion.BAR0, 0x1000, struct.pack("<I", 1))
    assert fn.region_read(PciRegion.BAR0, 0x1000, 4) == struct.pack("<I", 1)
    fn.close()


class Memory:
    """Guest RAM at 0 for the function's tests: ``size`` bytes, read-only if asked."""

    def __init__(self, size=1 << 20, writable=True):
        self.ram = bytearray(size)
        self.writable = writable

    def contains(self, addr, size, writable=False):
        return addr + size <= len(self.ram) and (self.writable or not writable)

    def read(self, addr, size):
        if not self.contains(addr, size):
            raise MemoryAccessError("unmapped %#x" % addr)
        return bytes(self.ram[addr:addr + size])

    def write(self, addr, data):
        if not self.contains(addr, len(data), True):
            raise MemoryAccessError("unmapped %#x" % addr)
        self.ram[addr:addr + len(data)] = data


def enable(fn, asq=0x10000, acq=0x20000):
    events = []
    for offset, value in ((r.Reg.AQA, 0x001F001F), (r.Reg.ASQ, asq), (r.Reg.ACQ, acq),
                          (r.Reg.CC, 0x00460001)):
        events += fn.region_write(PciRegion.BAR0, offset, struct.pack("<I", value))
    return events


def test_enable_reports_ready_when_the_admin_queues_are_in_mapped_memory(function):
    (event,) = enable(function)
    function.carry_out(event, Memory())
    assert function.registers.ready


def test_enable_over_unmapped_or_read_only_memory_is_controller_fatal(function):
    (event,) = enable(function)
    function.carry_out(event, Memory(0x18000))
    assert function.registers.csts == r.CSTS_CFS
    fn = NvmeFunction("nvme2")
    (event,) = enable(fn)
    fn.carry_out(event, Memory(writable=False))
    assert fn.registers.csts == r.CSTS_CFS
    fn.close()


def test_reset_restores_registers_config_and_doorbells(function):
    function.carry_out(enable(function)[0], Memory())
    function.region_write(PciRegion.CONFIG, pci.BAR0, struct.pack("<I", 0xFE000000))
    function.region_write(PciRegion.BAR0, 0x1000, struct.pack("<I", 5))
    function.reset()
    assert not function.registers.ready
    assert config32(function, pci.BAR0) == 0x4
    assert bytes(function.doorbells[:4]) == bytes(4)


def message(msg_id, command, payload=b"", fds=()):
    reader = p.MessageReader()
    reader.feed(p.encode(msg_id, command, payload), list(fds))
    return reader.next_message()


def test_qemus_realize_reads_through_a_session(function):
    sess = s.Session(function)
    sess.receive(message(0, Command.VERSION, p.Version(0, 0, {"pgsizes": 4096}).encode()))
    (reply,) = sess.receive(message(1, Command.DEVICE_GET_REGION_INFO, p.RegionInfo(0, 0, 0, 0, argsz=64).encode()))
    info = p.RegionInfo.decode(reply.payload)
    assert info.flags == 0xF and info.size == 0x4000 and reply.fds == (function.bar0_fd,)
    assert p.decode_sparse_mmap_cap(info.caps) == (p.SparseArea(0x1000, 0x1000),)
    (reply,) = sess.receive(message(2, Command.REGION_READ, p.RegionAccess(0, PciRegion.CONFIG, 4096).encode()))
    assert p.RegionAccess.decode(reply.payload).data[:4] == b"\x58\x4e\x01\x00"
    (reply,) = sess.receive(message(3, Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(PciIrq.MSIX).encode()))
    assert p.IrqInfo.decode(reply.payload).count == 32
    effects = sess.receive(message(4, Command.REGION_WRITE,
                                   p.RegionAccess(0x14, PciRegion.BAR0, 4, struct.pack("<I", 0x00460001)).encode()))
    # Without AQA/ASQ/ACQ the enable is refused at once: fatal status, no event, a reply.
    assert [type(e) for e in effects] == [s.Reply] and function.registers.csts == r.CSTS_CFS
