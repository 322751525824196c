"""The device's side of a DriverQueue in pure Python: tests of the initiator play the device by
reading and writing ring memory directly (no vhost-user back-end involved)."""

import os
import struct

DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Device:
    """The device's view of one DriverQueue, through the shared memory."""

    def __init__(self, queue):
        self.q = queue
        self.mem = queue.memory
        self.last_avail = 0
        self.used_idx = 0

    def desc(self, index, table=None):
        base = self.q.desc_gpa if table is None else table
        return DESC.unpack(self.mem.read(base + 16 * index, 16))

    def avail_idx(self):
        return struct.unpack("<H", self.mem.read(self.q.avail_gpa + 2, 2))[0]

    def avail_flags(self):
        return struct.unpack("<H", self.mem.read(self.q.avail_gpa, 2))[0]

    def used_event(self):
        return struct.unpack("<H", self.mem.read(self.q.avail_gpa + 4 + 2 * self.q.size, 2))[0]

    def pop(self):
        """Next head and its chain [(addr, len, flags)] (indirect tables expanded)."""
        assert self.avail_idx() != self.last_avail
        slot = self.last_avail % self.q.size
        head = struct.unpack("<H", self.mem.read(self.q.avail_gpa + 4 + 2 * slot, 2))[0]
        self.last_avail += 1
        chain, i, table = [], head, None
        addr, length, flags, nxt = self.desc(i)
        if flags & F_INDIRECT:
            table, i = addr, 0
        while True:
            addr, length, flags, nxt = self.desc(i, table)
            chain.append((addr, length, flags & ~F_NEXT))
            if not flags & F_NEXT:
                return head, chain
            i = nxt

    def push(self, head, length):
        slot = self.used_idx % self.q.size
        self.mem.write(self.q.used_gpa + 4 + 8 * slot, struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write(self.q.used_gpa + 2, struct.pack("<H", self.used_idx))

    def set_used_flags(self, flags):
        self.mem.write(self.q.used_gpa, struct.pack("<H", flags))

    def set_avail_event(self, value):
        self.mem.write(self.q.used_gpa + 4 + 8 * self.q.size, struct.pack("<H", value))

    def read_chain(self, chain):
        """Bytes of the device-readable buffers of a chain, concatenated."""
        return b"".join(self.mem.read(a, n) for a, n, f in chain if not f & F_WRITE)

    def write_chain(self, chain, data):
        """Fill the device-writable buffers of a chain with data, in order; returns bytes written."""
        done = 0
        for a, n, f in chain:
            if f & F_WRITE and done < len(data):
                piece = data[done:done + n]
                self.mem.write(a, piece)
                done += len(piece)
        return done

    def has_request(self):
        return self.avail_idx() != self.last_avail

    def notify(self, call_fd):
        os.eventfd_write(call_fd, 1)
