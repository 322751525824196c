"""Guest memory as the client's DMA windows map it, in the data plane's ``GuestMemory`` (the object
the vhost-user path uses): each window with an fd is a region whose guest address is also its key.

Every access is checked to lie in mapped memory (and in a writable window for stores) before it is
made, so a hostile address is a ``MemoryAccessError``, never a read or write outside guest memory.
``GuestMemory`` guards its mappings: a client that truncates the file behind a window makes the
lost pages read zeros instead of raising SIGBUS, and ``truncated`` tells the connection to end.
"""

from __future__ import annotations

from .. import _dataplane as dp
from .session import DmaWindow


class MemoryAccessError(Exception):
    """An access outside the mapped windows (or a store to a read-only one)."""


class DmaMemory:
    """The mapped DMA windows of one client."""

    def __init__(self) -> None:
        self.guest = dp.GuestMemory()
        self._windows: dict[int, DmaWindow] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def map(self, window: DmaWindow, fd: int) -> None:
        """Map ``window`` from ``fd`` (the caller closes the fd); ValueError or OSError if it cannot
        be (beyond the fd's end, too many regions, mmap failure)."""
        self.guest.add_region(window.addr, window.size, window.addr, window.offset, fd)
        self._windows[window.addr] = window

    def unmap(self, window: DmaWindow) -> None:
        if self._windows.pop(window.addr, None) is not None:
            self.guest.remove_region(window.addr, window.size, window.addr)

    def close(self) -> None:
        self._windows.clear()
        self.guest.close()

    @property
    def truncated(self) -> bool:
        return bool(self.guest.truncated)

    def _check(self, addr: int, size: int, write: bool) -> None:
        if self.guest.translate(addr, size) is None:
            raise MemoryAccessError("%#x+%#x is not in mapped guest memory" % (addr, size))
        if write:
            end = addr + size
            for window in self._windows.values():
                if addr < window.end and window.addr < end and not window.writable:
                    raise MemoryAccessError("store to read-only window at %#x" % window.addr)

    def contains(self, addr: int, size: int, writable: bool = False) -> bool:
        try:
            self._check(addr, size, writable)
        except MemoryAccessError:
            return False
        return True

    def read(self, addr: int, size: int) -> bytes:
        self._check(addr, size, False)
        return self.guest.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data), True)
        self.guest.write(addr, data)
