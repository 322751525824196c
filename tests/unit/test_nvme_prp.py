"""PRP walks: the pieces of a transfer from PRP1/PRP2 and PRP lists, with hostile pointers."""

import struct

import pytest

from vhostd.nvme import status as st
from vhostd.nvme.prp import DataPointerError, prp_segments

PAGE = 4096


class Memory:
    """Guest memory of list pages: {address: bytes}; anything else is unmapped."""

    def __init__(self, **pages):
        self.pages = {}

    def put_list(self, addr, entries):
        self.pages[addr] = struct.pack("<%dQ" % len(entries), *entries)

    def read(self, addr, size):
        for base, data in self.pages.items():
            if base <= addr and addr + size <= base + len(data):
                return data[addr - base:addr - base + size]
        raise DataPointerError(st.DATA_TRANSFER_ERROR, "unmapped %#x" % addr)


def test_one_page_with_an_offset_uses_prp1_only():
    assert prp_segments(0x10010, 0xdead, 512, PAGE, Memory().read) == [(0x10010, 512)]


def test_a_transfer_ending_in_the_next_page_uses_prp2_as_that_page():
    assert prp_segments(0x10800, 0x30000, 4096, PAGE, Memory().read) == [(0x10800, 2048), (0x30000, 2048)]


def test_a_longer_transfer_reads_a_prp_list():
    mem = Memory()
    mem.put_list(0x50000, [0x61000, 0x62000, 0x63000])
    assert prp_segments(0x60000, 0x50000, 4 * PAGE, PAGE, mem.read) == [
        (0x60000, PAGE), (0x61000, PAGE), (0x62000, PAGE), (0x63000, PAGE)]


def test_a_full_list_page_chains_through_its_last_entry():
    mem = Memory()
    # A list starting 16 bytes before its page end holds 2 slots: one entry, then the chain.
    mem.put_list(0x50ff0, [0x61000, 0x70000])
    mem.put_list(0x70000, [0x62000, 0x63000])
    assert prp_segments(0x60000, 0x50ff0, 4 * PAGE, PAGE, mem.read) == [
        (0x60000, PAGE), (0x61000, PAGE), (0x62000, PAGE), (0x63000, PAGE)]


@pytest.mark.parametrize("prp1, prp2, length, lists, expected", [
    (0x10002, 0, 512, {}, st.INVALID_PRP_OFFSET),                       # PRP1 not dword aligned
    (0x10000, 0x20010, 8192, {}, st.INVALID_PRP_OFFSET),                # PRP2 page with offset
    (0x10000, 0x50004, 3 * PAGE, {}, st.INVALID_PRP_OFFSET),            # list not 8-byte aligned
    (0x10000, 0x50000, 3 * PAGE, {0x50000: [0x61000, 0x62008]}, st.INVALID_PRP_OFFSET),
    (0x10000, 0x90000, 3 * PAGE, {}, st.DATA_TRANSFER_ERROR),           # list in unmapped memory
    (0x60000, 0x50ff0, 4 * PAGE, {0x50ff0: [0x61000, 0x70008]}, st.INVALID_PRP_OFFSET),  # chain
], ids=["prp1", "prp2", "list-align", "entry", "unmapped-list", "chain"])
def test_hostile_pointers_fail_with_the_status_the_spec_names(prp1, prp2, length, lists, expected):
    mem = Memory()
    for addr, entries in lists.items():
        mem.put_list(addr, entries)
    with pytest.raises(DataPointerError) as info:
        prp_segments(prp1, prp2, length, PAGE, mem.read)
    assert info.value.status == expected
