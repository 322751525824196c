"""A minimal driver side of a split virtqueue in pure Python, for data-plane unit tests.

Guest memory is a memfd mapped twice: once here (the "guest"), once by GuestMemory (the device).
Guest physical addresses start at 0 and the front-end virtual address of gpa g is UADDR_BASE + g.
Requests are built descriptor by descriptor so tests can also build hostile chains.
"""

import mmap
import os
import struct

from vhostd import _dataplane as dp

UADDR_BASE = 0x7F0000000000
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class GuestRam:
    """A memfd-backed guest memory with a bump allocator."""

    def __init__(self, size=16 << 20):
        self.size = size
        self.fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.next_free = 0x1000

    def alloc(self, length, align=64):
        addr = (self.next_free + align - 1) // align * align
        if addr + length > self.size:
            raise MemoryError("test guest memory exhausted")
        self.next_free = addr + length
        return addr

    def memory(self):
        """A device-side GuestMemory mapping this RAM as one region."""
        return dp.GuestMemory([(0, self.size, UADDR_BASE, 0, self.fd)])

    def write(self, gpa, data):
        self.map[gpa:gpa + len(data)] = data

    def read(self, gpa, length):
        return bytes(self.map[gpa:gpa + length])

    def close(self):
        self.map.close()
        os.close(self.fd)


class SplitRing:
    """Driver side of one split virtqueue in GuestRam."""

    def __init__(self, ram, size=128, event_idx=False):
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.desc = ram.alloc(16 * size, 16)
        self.avail = ram.alloc(6 + 2 * size, 2)
        self.used = ram.alloc(6 + 8 * size, 4)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))

    def addresses(self):
        """(desc, avail, used) as front-end virtual addresses."""
        return (UADDR_BASE + self.desc, UADDR_BASE + self.avail, UADDR_BASE + self.used)

    def write_desc(self, index, addr, length, flags, next_index=0, table=None):
        base = self.desc if table is None else table
        self.ram.write(base + 16 * index, DESC.pack(addr, length, flags, next_index))

    def add_chain(self, segments):
        """segments: [(gpa, length, writable)] → head index, published on the avail ring."""
        ids = [self.free.pop(0) for _ in segments]
        for k, (gpa, length, writable) in enumerate(segments):
            last = k == len(segments) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.write_desc(ids[k], gpa, length, flags, 0 if last else ids[k + 1])
        self.publish(ids[0])
        return ids[0]

    def add_indirect(self, segments):
        """The same chain through one indirect table."""
        table = self.ram.alloc(16 * len(segments), 16)
        for k, (gpa, length, writable) in enumerate(segments):
            last = k == len(segments) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.write_desc(k, gpa, length, flags, 0 if last else k + 1, table=table)
        head = self.free.pop(0)
        self.write_desc(head, table, 16 * len(segments), F_INDIRECT)
        self.publish(head)
        return head

    def publish(self, head):
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, value):
        self.avail_idx = value & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self):
        return struct.unpack("<H", self.ram.read(self.used + 2, 2))[0]

    def pop_used(self):
        """[(id, len)] of entries used since the last call; returns their descriptors to free."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.ram.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        for head, _ in out:
            self.release(head)
        return out

    def release(self, head):
        index = head
        while True:
            addr, length, flags, nxt = DESC.unpack(self.ram.read(self.desc + 16 * index, 16))
            self.free.append(index)
            if not flags & F_NEXT:
                break
            index = nxt

    def queue(self, index=0, memory=None, last_avail=0):
        """A device-side VirtQueue configured on this ring."""
        q = dp.VirtQueue(index)
        q.configure(memory, self.size, *self.addresses(), last_avail, self.event_idx, True)
        return q


# The kinds of disk the data-plane rigs run their default-disk tests on: memory completes inside
# the submit, a file later, from the io_uring ring.
DISK_KINDS = ["malloc", "file"]


def make_disk(kind: str, directory, block_size: int, num_blocks: int) -> "dp.Disk":
    """A zeroed disk of the given kind; a file disk's backing file goes in directory."""
    if kind == "malloc":
        return dp.Disk.malloc(block_size, num_blocks)
    path = directory / ("%s-%d.img" % (kind, num_blocks))
    path.write_bytes(bytes(block_size * num_blocks))
    return dp.Disk.file(str(path), block_size)
