"""The admin queue of an enabled NvmeFunction over fake guest RAM: commands fetched at the SQ
tail doorbell, data through PRPs, completions with the phase tag, interrupts, hostile doorbells."""

import os
import struct

import pytest

from vhostd.nvme import registers as r
from vhostd.nvme import status as st
from vhostd.nvme.command import Completion, Submission
from vhostd.nvme.function import NvmeFunction
from vhostd.nvme import pci
from vhostd.vfio_user.protocol import PciIrq, PciRegion
from tests.unit.test_nvme_function import Memory

ASQ, ACQ, BUFFER = 0x10000, 0x20000, 0x30000
ENTRIES = 32


@pytest.fixture
def ram():
    return Memory()


@pytest.fixture
def function(ram):
    fn = NvmeFunction("nvme0")
    for offset, value in ((r.Reg.AQA, (ENTRIES - 1) | (ENTRIES - 1) << 16), (r.Reg.ASQ, ASQ),
                          (r.Reg.ACQ, ACQ)):
        fn.region_write(PciRegion.BAR0, offset, struct.pack("<I", value))
    (event,) = fn.region_write(PciRegion.BAR0, r.Reg.CC, struct.pack("<I", 0x00460001))
    fn.carry_out(event, ram)
    assert fn.registers.ready
    yield fn
    fn.close()


class Host:
    """The driver's side: place commands, ring doorbells, reap completions."""

    def __init__(self, fn, ram):
        self.fn, self.ram = fn, ram
        self.sq_tail = self.cq_head = 0
        self.phase = 1
        self.signals = []

    def submit(self, opcode, cid, **fields):
        sub = Submission(opcode, 0, cid, fields.pop("nsid", 0), 0, fields.pop("prp1", BUFFER),
                         fields.pop("prp2", 0), fields.pop("cdw10", 0), fields.pop("cdw11", 0))
        self.ram.write(ASQ + self.sq_tail * 64, sub.encode())
        self.sq_tail = (self.sq_tail + 1) % ENTRIES

    def ring(self, sq_tail=None, cq_head=None):
        tail = self.sq_tail if sq_tail is None else sq_tail
        head = self.cq_head if cq_head is None else cq_head
        self.fn.doorbells[0:8] = struct.pack("<II", tail, head)
        return self.fn.poll_admin(self.ram, self.signals.append)

    def reap(self):
        out = []
        while True:
            completion, phase = Completion.decode(self.ram.read(ACQ + self.cq_head * 16, 16))
            if phase != self.phase:
                return out
            out.append(completion)
            self.cq_head = (self.cq_head + 1) % ENTRIES
            if self.cq_head == 0:
                self.phase ^= 1


def test_identify_controller_through_the_admin_queue(function, ram):
    host = Host(function, ram)
    host.submit(0x06, cid=7, cdw10=1)
    assert host.ring() == 1
    (completion,) = host.reap()
    assert completion == Completion(7, st.SUCCESS, 0, sq_head=1, sq_id=0)
    assert ram.read(BUFFER + 24, 40).rstrip() == b"vhostd NVMe controller"
    assert host.signals == [0]


def test_nothing_happens_without_a_doorbell(function, ram):
    host = Host(function, ram)
    host.submit(0x06, cid=1, cdw10=1)
    assert host.ring(sq_tail=0) == 0 and host.reap() == []


def test_the_phase_flips_at_each_wrap_and_a_full_cq_stops_fetching(function, ram):
    host = Host(function, ram)
    done = 0
    for round_ in range(3):
        for i in range(ENTRIES - 1):
            host.submit(0x18, cid=round_ * 100 + i)          # Keep Alive
        done += host.ring()
        assert [c.cid for c in host.reap()] == [round_ * 100 + i for i in range(ENTRIES - 1)]
    assert done == 3 * (ENTRIES - 1)
    # The host stops reaping: entries-1 completions fill the CQ, the next command waits in the SQ.
    for i in range(ENTRIES - 1):
        host.submit(0x18, cid=i)
    assert host.ring() == ENTRIES - 1
    host.submit(0x18, cid=ENTRIES - 1)
    assert host.ring() == 0
    assert len(host.reap()) == ENTRIES - 1
    assert host.ring() == 1 and [c.cid for c in host.reap()] == [ENTRIES - 1]


def test_data_to_unmapped_memory_completes_with_a_data_transfer_error(function, ram):
    host = Host(function, ram)
    host.submit(0x06, cid=3, cdw10=1, prp1=0x7FF00000)
    host.ring()
    (completion,) = host.reap()
    assert completion.status == st.DATA_TRANSFER_ERROR


def test_an_sq_tail_beyond_the_queue_is_controller_fatal_and_no_loop(function, ram):
    host = Host(function, ram)
    assert host.ring(sq_tail=0xFFFF) == 0
    assert function.registers.csts & r.CSTS_CFS
    assert host.ring(sq_tail=1) == 0


def test_a_cq_head_past_the_posted_entries_is_controller_fatal(function, ram):
    host = Host(function, ram)
    host.submit(0x18, cid=1)
    host.ring()
    assert host.ring(cq_head=5) == 0
    assert function.registers.csts & r.CSTS_CFS


def test_an_async_event_request_is_held_and_completes_nothing(function, ram):
    host = Host(function, ram)
    host.submit(0x0C, cid=9)
    host.submit(0x18, cid=10)
    assert host.ring() == 1
    assert [c.cid for c in host.reap()] == [10]


def test_disable_drops_the_admin_queues_and_enable_starts_them_fresh(function, ram):
    host = Host(function, ram)
    host.submit(0x18, cid=1)
    host.ring()
    (event,) = function.region_write(PciRegion.BAR0, r.Reg.CC, struct.pack("<I", 0x00460000))
    function.carry_out(event, ram)
    assert function.admin_sq is None and not function.registers.ready
    assert bytes(function.doorbells[:8]) == bytes(8)


def test_interrupts_follow_msix_enable_and_the_intx_disable_bit(function, ram):
    intx, vector0 = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    irq_fds = {PciIrq.INTX: [intx], PciIrq.MSIX: [vector0] + [None] * 31}
    host = Host(function, ram)
    host.submit(0x18, cid=1)
    function.doorbells[0:4] = struct.pack("<I", host.sq_tail)
    assert function.poll(ram, irq_fds) == 1
    assert os.eventfd_read(intx) == 1                        # MSI-X off: INTx
    msix = pci.MSIX_OFFSET + 2
    function.region_write(PciRegion.CONFIG, msix, struct.pack("<H", pci.MSIX_ENABLE))
    host.submit(0x18, cid=2)
    function.doorbells[0:4] = struct.pack("<I", host.sq_tail)
    function.poll(ram, irq_fds)
    assert os.eventfd_read(vector0) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(intx)
    os.close(intx)
    os.close(vector0)


def test_admin_queues_whose_memory_is_unmapped_wait_for_it(function, ram):
    # Firmware unmaps and remaps low memory around resets: no fatal status, the queue resumes.
    host = Host(function, ram)
    host.submit(0x18, cid=4)
    function.doorbells[0:4] = struct.pack("<I", host.sq_tail)
    assert function.poll_admin(Memory(0x1000), host.signals.append) == 0
    assert not function.registers.csts & r.CSTS_CFS
    assert function.poll_admin(ram, host.signals.append) == 1
    assert [c.cid for c in host.reap()] == [4]
