"""Guest memory as the client's DMA windows map it: mmaps of the client's fds, by guest address.

Every access is checked to lie inside one window (and a writable one for stores) before it is made,
so a hostile address is a ``MemoryAccessError``, never a read or write outside guest memory.
"""

from __future__ import annotations

import mmap

from ..memfd import fix_size
from .session import DmaWindow


class MemoryAccessError(Exception):
    """An access outside the mapped windows (or a store to a read-only one)."""


class DmaMemory:
    """The mapped DMA windows of one client."""

    def __init__(self) -> None:
        self._windows: dict[int, tuple[DmaWindow, mmap.mmap]] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def map(self, window: DmaWindow, fd: int) -> None:
        """mmap ``window`` from ``fd`` (the caller closes the fd); raises OSError, or ValueError
        for an fd the client could shrink under the mapping (the control plane reads guest memory
        from Python, where a SIGBUS would end the daemon)."""
        fix_size(fd, "DMA window's fd")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if window.writable else 0)
        self._windows[window.addr] = (window, mmap.mmap(fd, window.size, mmap.MAP_SHARED, prot,
                                                        offset=window.offset))

    def unmap(self, window: DmaWindow) -> None:
        entry = self._windows.pop(window.addr, None)
        if entry is not None:
            entry[1].close()

    def unmap_all(self) -> None:
        for window, _ in list(self._windows.values()):
            self.unmap(window)

    def _locate(self, addr: int, size: int, write: bool) -> tuple[mmap.mmap, int]:
        for window, mapping in self._windows.values():
            if window.addr <= addr and addr + size <= window.end:
                if write and not window.writable:
                    raise MemoryAccessError("store to read-only window at %#x" % addr)
                return mapping, addr - window.addr
        raise MemoryAccessError("%#x+%#x is not in mapped guest memory" % (addr, size))

    def contains(self, addr: int, size: int, writable: bool = False) -> bool:
        try:
            self._locate(addr, size, writable)
        except MemoryAccessError:
            return False
        return True

    def read(self, addr: int, size: int) -> bytes:
        mapping, offset = self._locate(addr, size, False)
        return mapping[offset:offset + size]

    def write(self, addr: int, data: bytes) -> None:
        mapping, offset = self._locate(addr, len(data), True)
        mapping[offset:offset + len(data)] = data
