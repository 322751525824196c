"""The NVMe register file (BAR0's first page): values, the enable/ready, reset and shutdown
handshakes, and what the host may not change (no memory, no queues)."""

import struct

import pytest

from vhostd.nvme import registers as r
from vhostd.vfio_user.protocol import CommandError


def dword(value):
    return struct.pack("<I", value)


def read32(regs, offset):
    return struct.unpack("<I", regs.read(offset, 4))[0]


def read64(regs, offset):
    return struct.unpack("<Q", regs.read(offset, 8))[0]


@pytest.fixture
def regs():
    return r.ControllerRegisters()


def configure_admin_queues(regs, asq=0x10000, acq=0x20000, aqa=0x001F001F):
    regs.write(r.Reg.AQA, dword(aqa))
    # Linux writes the 64-bit bases as two halves.
    regs.write(r.Reg.ASQ, dword(asq & 0xFFFFFFFF))
    regs.write(r.Reg.ASQ + 4, dword(asq >> 32))
    regs.write(r.Reg.ACQ, dword(acq & 0xFFFFFFFF))
    regs.write(r.Reg.ACQ + 4, dword(acq >> 32))


def test_cap_reports_mqes_cqr_timeout_stride_and_the_nvm_command_set(regs):
    cap = read64(regs, r.Reg.CAP)
    assert cap & 0xFFFF == 255                 # MQES: 256 entries
    assert cap >> 16 & 1 == 1                  # CQR
    assert cap >> 24 & 0xFF == 20              # TO: 10 s
    assert cap >> 32 & 0xF == 0                # DSTRD
    assert cap >> 37 & 0xFF == 1               # CSS: NVM only
    assert cap >> 48 & 0xFF == 0               # MPSMIN = MPSMAX = 4 KiB
    # Linux reads CAP in two halves.
    assert read32(regs, 0) | read32(regs, 4) << 32 == cap


def test_version_is_1_4_and_there_is_no_cmb(regs):
    assert read32(regs, r.Reg.VS) == 0x00010400
    assert read32(regs, r.Reg.CMBLOC) == 0 and read32(regs, r.Reg.CMBSZ) == 0


def test_linux_enable_sequence_asks_for_the_admin_queues_then_reports_ready(regs):
    assert regs.write(r.Reg.CC, dword(0)) == []
    assert read32(regs, r.Reg.CSTS) & r.CSTS_RDY == 0
    configure_admin_queues(regs, asq=0x1_2345_6000, acq=0x7000)
    assert read64(regs, r.Reg.ASQ) == 0x1_2345_6000
    assert regs.write(r.Reg.CC, dword(0x00460000)) == []
    (event,) = regs.write(r.Reg.CC, dword(0x00460001))
    assert event == r.Enable(r.AdminQueues(0x1_2345_6000, 32, 0x7000, 32), 4096, 64, 16)
    assert not regs.ready                      # not before the controller has mapped the queues
    regs.report_ready()
    assert read32(regs, r.Reg.CSTS) == r.CSTS_RDY
    assert read32(regs, r.Reg.CC) == 0x00460001


@pytest.mark.parametrize("cc, aqa, asq", [
    (0x00460011, 0x001F001F, 0x1000),          # CSS 1
    (0x00460081, 0x001F001F, 0x1000),          # MPS 8 KiB
    (0x00460801, 0x001F001F, 0x1000),          # AMS weighted round robin
    (0x00460001, 0x001F0000, 0x1000),          # a 1-entry admin SQ
    (0x00460001, 0x001F001F, 0),               # no admin SQ base
], ids=["css", "mps", "ams", "aqa", "asq"])
def test_an_invalid_enable_sets_controller_fatal_status_and_asks_for_nothing(regs, cc, aqa, asq):
    configure_admin_queues(regs, asq=asq, aqa=aqa)
    assert regs.write(r.Reg.CC, dword(cc)) == []
    assert read32(regs, r.Reg.CSTS) == r.CSTS_CFS


def test_enable_failure_reported_by_the_controller_is_fatal_status(regs):
    configure_admin_queues(regs)
    regs.write(r.Reg.CC, dword(0x00460001))
    regs.report_fatal("admin SQ not mapped")
    assert read32(regs, r.Reg.CSTS) == r.CSTS_CFS


def test_disable_is_a_controller_reset_ready_drops_when_the_controller_is_done(regs):
    configure_admin_queues(regs)
    regs.write(r.Reg.CC, dword(0x00460001))
    regs.report_ready()
    assert regs.write(r.Reg.CC, dword(0x00460000)) == [r.Disable()]
    regs.report_disabled()
    assert read32(regs, r.Reg.CSTS) == 0


def test_normal_shutdown_goes_through_occurring_to_complete(regs):
    configure_admin_queues(regs)
    regs.write(r.Reg.CC, dword(0x00460001))
    regs.report_ready()
    assert regs.write(r.Reg.CC, dword(0x00464001)) == [r.Shutdown(abrupt=False)]
    assert read32(regs, r.Reg.CSTS) >> 2 & 3 == r.SHST_OCCURRING
    regs.report_shutdown_complete()
    assert read32(regs, r.Reg.CSTS) == r.CSTS_RDY | r.SHST_COMPLETE << 2
    # Writing SHN again while it is set asks for nothing more.
    assert regs.write(r.Reg.CC, dword(0x00464001)) == []


def test_abrupt_shutdown(regs):
    configure_admin_queues(regs)
    regs.write(r.Reg.CC, dword(0x00460001))
    regs.report_ready()
    assert regs.write(r.Reg.CC, dword(0x00468001)) == [r.Shutdown(abrupt=True)]


def test_while_enabled_only_shn_of_cc_changes(regs):
    configure_admin_queues(regs)
    regs.write(r.Reg.CC, dword(0x00460001))
    regs.write(r.Reg.CC, dword(0x00000071))
    assert read32(regs, r.Reg.CC) == 0x00460001


def test_read_only_registers_ignore_writes(regs):
    cap, vs = read64(regs, r.Reg.CAP), read32(regs, r.Reg.VS)
    regs.write(r.Reg.CAP, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))
    regs.write(r.Reg.VS, dword(0xFFFFFFFF))
    regs.write(r.Reg.CSTS, dword(0xFFFFFFFF))
    regs.write(r.Reg.NSSR, dword(0x4E564D65))
    assert (read64(regs, r.Reg.CAP), read32(regs, r.Reg.VS), read32(regs, r.Reg.CSTS)) == (cap, vs, 0)


def test_queue_bases_drop_reserved_low_bits_and_aqa_reserved_bits(regs):
    regs.write(r.Reg.ASQ, struct.pack("<Q", 0x12345FFF))
    regs.write(r.Reg.AQA, dword(0xFFFFFFFF))
    assert read64(regs, r.Reg.ASQ) == 0x12345000
    assert read32(regs, r.Reg.AQA) == 0x0FFF0FFF


def test_interrupt_mask_set_and_clear(regs):
    assert regs.write(r.Reg.INTMS, dword(0x5)) == [r.InterruptMaskChanged()]
    regs.write(r.Reg.INTMC, dword(0x1))
    assert read32(regs, r.Reg.INTMS) == 0x4 and read32(regs, r.Reg.INTMC) == 0x4


@pytest.mark.parametrize("offset, data", [(0x14, b"\1\0"), (0x16, dword(1)), (0x2c, bytes(8)),
                                          (0xffc, bytes(8)), (0x1000, dword(0))])
def test_writes_of_odd_size_alignment_or_place_are_refused(regs, offset, data):
    with pytest.raises(CommandError):
        regs.write(offset, data)


def test_reset_restores_power_on_values(regs):
    configure_admin_queues(regs)
    regs.write(r.Reg.CC, dword(0x00460001))
    regs.report_ready()
    regs.reset()
    assert regs.read(r.Reg.INTMS, 0x24) == bytes(0x24)        # INTMS … ASQ
    assert read32(regs, r.Reg.CSTS) == 0 and read64(regs, r.Reg.ACQ) == 0
