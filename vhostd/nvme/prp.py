"""PRP data pointers: the guest-physical pieces of one transfer, every list entry checked.

PRP1 is the first page (a dword-aligned offset allowed); a transfer that ends in the next page has
that page in PRP2; a longer one has in PRP2 a list of page addresses, whose last entry chains to the
next list page when a list page is full.  ``read_memory`` is how list pages are read (the guest
memory), so the walk itself stays pure; it raises ``DataPointerError`` for an unmapped address.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from . import status as st

ENTRY_SIZE = 8


class DataPointerError(Exception):
    """The data pointer is invalid; ``status`` is what the command completes with."""

    def __init__(self, status: st.Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def prp_segments(prp1: int, prp2: int, length: int, page_size: int,
                 read_memory: Callable[[int, int], bytes]) -> list[tuple[int, int]]:
    """(address, size) of each piece of a ``length``-byte transfer described by PRP1/PRP2."""
    if length <= 0:
        return []
    if prp1 & 0x3:
        raise DataPointerError(st.INVALID_PRP_OFFSET, "PRP1 %#x is not dword aligned" % prp1)
    first = min(length, page_size - prp1 % page_size)
    segments = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return segments
    if remaining <= page_size:
        _check_page(prp2, page_size, "PRP2")
        return segments + [(prp2, remaining)]
    if prp2 & (ENTRY_SIZE - 1):
        raise DataPointerError(st.INVALID_PRP_OFFSET, "PRP list %#x is not 8-byte aligned" % prp2)
    pages_left = (remaining + page_size - 1) // page_size
    list_addr = prp2
    while pages_left:
        slots = (page_size - list_addr % page_size) // ENTRY_SIZE
        # A full list page whose transfer continues chains through its last slot.
        take = pages_left if pages_left <= slots else slots - 1
        wanted = take + (1 if pages_left > slots else 0)
        entries = struct.unpack("<%dQ" % wanted, read_memory(list_addr, wanted * ENTRY_SIZE))
        for entry in entries[:take]:
            _check_page(entry, page_size, "PRP entry")
            size = min(page_size, remaining)
            segments.append((entry, size))
            remaining -= size
        pages_left -= take
        if pages_left:
            list_addr = entries[-1]
            _check_page(list_addr, page_size, "PRP list chain")
    return segments


def _check_page(addr: int, page_size: int, what: str) -> None:
    if addr % page_size:
        raise DataPointerError(st.INVALID_PRP_OFFSET, "%s %#x is not page aligned" % (what, addr))
