"""The data plane's PRP walk (ext/nvme.pxi): PRP1 with an offset, PRP2 as the second page or a
PRP list (chained across list pages), and every hostile pointer answered with the NVMe status
(Invalid PRP Offset, Data Transfer Error), never an access outside guest memory."""

import os
import struct

import pytest

from vhostd import _dataplane as dp

PAGE = 4096
BASE = 0x100000
SIZE = 64 * PAGE
INVALID_PRP_OFFSET = 0x13 | 1 << 14
DATA_TRANSFER_ERROR = 0x04


@pytest.fixture
def memory():
    fd = os.memfd_create("prp-test")
    os.ftruncate(fd, SIZE)
    mem = dp.GuestMemory()
    mem.add_region(BASE, SIZE, BASE, 0, fd)
    os.close(fd)
    yield mem
    mem.close()


def host(memory, gpa, length):
    ((addr, size),) = memory.translate(gpa, length)
    return addr, size


def put_list(memory, gpa, entries):
    memory.write(gpa, struct.pack("<%dQ" % len(entries), *entries))


def test_one_page_with_an_offset_needs_only_prp1(memory):
    assert dp.nvme_prp_segments(memory, BASE + 512, 0, 1024) == [host(memory, BASE + 512, 1024)]


def test_prp2_is_the_second_page_and_contiguous_pages_merge(memory):
    segments = dp.nvme_prp_segments(memory, BASE + 3 * PAGE + 2048, BASE + 9 * PAGE, 4096)
    assert segments == [host(memory, BASE + 3 * PAGE + 2048, 2048), host(memory, BASE + 9 * PAGE, 2048)]
    merged = dp.nvme_prp_segments(memory, BASE, BASE + PAGE, 2 * PAGE)
    assert merged == [host(memory, BASE, 2 * PAGE)]


def test_a_prp_list_and_its_chain_to_a_second_list_page(memory):
    pages = [BASE + (10 + 2 * i) * PAGE for i in range(5)]       # not contiguous: 5 segments
    put_list(memory, BASE + PAGE, pages)
    assert dp.nvme_prp_segments(memory, BASE, BASE + PAGE, 6 * PAGE) == \
        [host(memory, BASE, PAGE)] + [host(memory, p, PAGE) for p in pages]
    # A list starting 16 bytes before its page's end: one entry, then the chain pointer.
    list_gpa = BASE + 2 * PAGE - 16
    put_list(memory, list_gpa, [pages[0], BASE + 4 * PAGE])
    put_list(memory, BASE + 4 * PAGE, pages[1:3])
    assert dp.nvme_prp_segments(memory, BASE, list_gpa, 4 * PAGE) == \
        [host(memory, BASE, PAGE)] + [host(memory, p, PAGE) for p in pages[:3]]


@pytest.mark.parametrize("prp1, prp2, length, status", [
    (BASE + 2, 0, 512, INVALID_PRP_OFFSET),                       # PRP1 not dword aligned
    (BASE, BASE + PAGE + 8, 2 * PAGE, INVALID_PRP_OFFSET),        # PRP2 page with an offset
    (BASE, BASE + PAGE + 4, 3 * PAGE, INVALID_PRP_OFFSET),        # list not 8-byte aligned
    (0x10, 0, 512, DATA_TRANSFER_ERROR),                          # outside guest memory
    (BASE + SIZE - 512, 0, 1024, DATA_TRANSFER_ERROR),            # runs off the end
    (BASE, 0xdead0000, 2 * PAGE, DATA_TRANSFER_ERROR),            # second page unmapped
    (BASE, 0xdead0000, 3 * PAGE, DATA_TRANSFER_ERROR),            # list page unmapped
])
def test_hostile_pointers_get_the_nvme_status(memory, prp1, prp2, length, status):
    assert dp.nvme_prp_segments(memory, prp1, prp2, length) == status


def test_hostile_list_entries_get_the_nvme_status(memory):
    put_list(memory, BASE + PAGE, [BASE + 8 * PAGE, BASE + 9 * PAGE + 512])
    assert dp.nvme_prp_segments(memory, BASE, BASE + PAGE, 3 * PAGE) == INVALID_PRP_OFFSET
    put_list(memory, BASE + PAGE, [BASE + 8 * PAGE, 0xdead0000])
    assert dp.nvme_prp_segments(memory, BASE, BASE + PAGE, 3 * PAGE) == DATA_TRANSFER_ERROR
    # A chain pointer that points back at its own list page never loops: the length runs out.
    last = BASE + 2 * PAGE - 8
    put_list(memory, last, [last & ~(PAGE - 1)])
    put_list(memory, last & ~(PAGE - 1), [BASE + 8 * PAGE] * 511)
    result = dp.nvme_prp_segments(memory, BASE, last, 600 * PAGE)
    assert isinstance(result, int) or sum(size for _, size in result) == 600 * PAGE


def test_zero_length_has_no_segments(memory):
    assert dp.nvme_prp_segments(memory, 0, 0, 0) == []
