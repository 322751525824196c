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
PACKED_DESC = struct.Struct("<QIHH")      # addr, len, id, flags
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


F_AVAIL, F_USED = 1 << 7, 1 << 15
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = 0, 1, 2


class PackedRing:
    """Driver side of one packed virtqueue in GuestRam (virtio 1.1 §2.8).

    Positions are free-running counts of descriptor slots, as the device keeps them: the slot is
    count % size and the wrap counter is 1 on even laps.  Buffer ids are handed out from a free
    list, so completions may come back in any order."""

    def __init__(self, ram, size=128, event_idx=False):
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.desc = ram.alloc(16 * size, 16)
        self.driver_area = ram.alloc(4, 4)      # driver event suppression (we write it)
        self.device_area = ram.alloc(4, 4)      # device event suppression (the device writes it)
        self.avail_count = 0
        self.used_count = 0
        self.free = list(range(size))
        self.chain_len = {}                     # buffer id → descriptor slots its chain took
        self.free_slots = size
        self.held = []                          # (position, flags) of heads not yet published

    def addresses(self):
        """(descriptor ring, driver area, device area) as front-end virtual addresses."""
        return (UADDR_BASE + self.desc, UADDR_BASE + self.driver_area, UADDR_BASE + self.device_area)

    def wrap(self, count):
        return 1 if (count // self.size) % 2 == 0 else 0

    def avail_flags(self, count):
        """The AVAIL/USED bits that make the descriptor at position count available."""
        return F_AVAIL if self.wrap(count) else F_USED

    def write_desc(self, slot, addr, length, buffer_id, flags, table=None):
        base = self.desc if table is None else table
        self.ram.write(base + 16 * slot, PACKED_DESC.pack(addr, length, buffer_id, flags))

    def add_chain(self, segments, hold=False):
        """segments: [(gpa, length, writable)] → buffer id, made available (head flags last);
        with hold, the head waits for publish_held()."""
        last = len(segments) - 1
        return self.add_raw(hold=hold, descriptors=[(gpa, length, (F_WRITE if writable else 0) | (0 if k == last else F_NEXT))
                             for k, (gpa, length, writable) in enumerate(segments)])

    def ram_flags(self, slot):
        return PACKED_DESC.unpack(self.ram.read(self.desc + 16 * slot, 16))[3]

    def publish_head(self, position, flags):
        """Store the flags of the descriptor at position (the last write of a chain)."""
        self.ram.write(self.desc + 16 * (position % self.size) + 14, struct.pack("<H", flags))

    def add_indirect(self, segments):
        """The same chain through one indirect table (one ring slot)."""
        table = self.ram.alloc(16 * len(segments), 16)
        for k, (gpa, length, writable) in enumerate(segments):
            self.write_desc(k, gpa, length, 0, F_WRITE if writable else 0, table=table)
        return self.add_raw([(table, 16 * len(segments), F_INDIRECT)])

    def add_raw(self, descriptors, buffer_id=None, hold=False):
        """Make descriptors [(addr, len, flags)] available as one chain, flags as given (NEXT
        included) plus the avail bits; the last carries buffer_id (default: a free id).  With
        hold the head's flags are stored by publish_held()."""
        if buffer_id is None:
            buffer_id = self.free.pop(0)
        start = self.avail_count
        for k, (addr, length, flags) in enumerate(descriptors):
            if k:
                self.write_desc((start + k) % self.size, addr, length, buffer_id,
                                flags | self.avail_flags(start + k))
        addr, length, flags = descriptors[0]
        self.write_desc(start % self.size, addr, length, buffer_id, self.ram_flags(start % self.size))
        self.chain_len[buffer_id] = len(descriptors)
        self.free_slots -= len(descriptors)
        self.avail_count = (start + len(descriptors)) & 0xFFFF
        self.held.append((start, flags | self.avail_flags(start)))
        if not hold:
            self.publish_held()
        return buffer_id

    def publish_held(self):
        """Store the held heads' flags, the last chain's first: the device sees them all at once."""
        for start, flags in reversed(self.held):
            self.publish_head(start, flags)
        self.held = []

    def pop_used(self):
        """[(id, len)] of descriptors used since the last call; their ids become free again."""
        out = []
        while True:
            slot = self.used_count % self.size
            _, length, buffer_id, flags = PACKED_DESC.unpack(self.ram.read(self.desc + 16 * slot, 16))
            wrap = self.wrap(self.used_count)
            if bool(flags & F_AVAIL) != bool(wrap) or bool(flags & F_USED) != bool(wrap):
                return out
            out.append((buffer_id, length))
            n = self.chain_len.pop(buffer_id, 1)
            self.used_count = (self.used_count + n) & 0xFFFF
            self.free_slots += n
            self.free.append(buffer_id)

    def set_driver_event(self, flags, off_wrap=0):
        """Tell the device when to interrupt: ENABLE, DISABLE, or DESC at off_wrap."""
        self.ram.write(self.driver_area, struct.pack("<HH", off_wrap, flags))

    def device_event(self):
        """(off_wrap, flags) the device asks kicks with."""
        return struct.unpack("<HH", self.ram.read(self.device_area, 4))

    def off_wrap(self, count):
        return (count % self.size) | (self.wrap(count) << 15)

    def base(self):
        """SET_VRING_BASE's value for the current positions (avail, used)."""
        return self.off_wrap(self.avail_count) | self.off_wrap(self.used_count) << 16

    def queue(self, index=0, memory=None, last_avail=None):
        """A device-side VirtQueue configured on this ring."""
        q = dp.VirtQueue(index)
        q.configure(memory, self.size, *self.addresses(), self.base() if last_avail is None else last_avail,
                    self.event_idx, True, packed=True)
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
