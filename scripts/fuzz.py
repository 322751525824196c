#!/usr/bin/env python3
"""Guest-side fuzzing of vhostd's virtio-blk queues: adversarial descriptor chains pushed into a
live queue.

The fuzzer is a vhost-user front-end that lays out its own guest memory (three memfd regions with
a hole) and its own split ring, and writes descriptors itself: addresses outside or straddling
regions, lengths 0 and huge, looping chains, indirect tables inside indirect tables, too many
segments, wrong directions, bad virtio-blk types and headers, avail index jumps, heads out of
range or already in flight, random garbage, buffers that alias the ring, and (with
``--scribble-inflight``) a front-end that rewrites the shared inflight-tracking region under the
device.  Valid requests are mixed in.  With ``--packed`` the ring is a packed virtqueue
(VIRTIO_F_RING_PACKED) on a controller that offers it: the same chains laid out as packed
descriptors, and instead of the split-only tricks (loops through next, avail index jumps) chains
longer than the ring, buffer ids out of range or twice in flight.

Oracles, per batch of requests:
  * every request completes (a used entry with its head or buffer id, once) or the ring is marked broken (the
    error eventfd fires); nothing hangs;
  * a request expected to fail gets an error status (or no status byte at all), one expected to
    succeed gets OK, a structurally broken ring breaks;
  * used.len never exceeds the writable bytes of the chain;
  * the device writes guest memory only inside the chain's device-writable buffers and the used
    ring (packed: the descriptor ring and the device event area; every other byte of guest memory
    is compared before and after);
  * after a broken ring is reset (GET_VRING_BASE, then set up again) the queue serves again;
  * a second controller keeps serving through the project's front-end (vhostd.initiator).

Targets: ``--target daemon`` (default) starts a vhostd with two blk controllers on malloc bdevs;
``--target inproc`` runs the back-end in this process (for the AddressSanitizer run);
``--socket PATH [--good-socket PATH]`` attacks a vhostd that is already running.

    python scripts/fuzz.py --iterations 2000 --seed 7
    python scripts/fuzz.py --soak                # 20000 iterations
    python scripts/fuzz.py --packed --iterations 2000
"""

from __future__ import annotations

import argparse
import collections
import mmap
import os
import random
import select
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vhostd.initiator.channel import Channel  # noqa: E402
from vhostd.vhost import protocol as p  # noqa: E402
from vhostd.vhost.features import ProtocolFeature, VirtioFeature, bit  # noqa: E402
from vhostd.vhost.protocol import Request  # noqa: E402

DESC = struct.Struct("<QIHH")
PACKED_DESC = struct.Struct("<QIHH")      # addr, len, buffer id, flags
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
F_AVAIL, F_USED = 1 << 7, 1 << 15
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512
MIB = 1 << 20

# Guest physical layout: A and B are adjacent (a buffer may legitimately straddle them, giving
# two iovecs), then a hole, then C.  Front-end virtual address = UADDR_BASE + gpa.
REGIONS = ((0, 2 * MIB), (2 * MIB, 2 * MIB), (8 * MIB, 1 * MIB))
HOLE = (4 * MIB, 8 * MIB)
MEMORY_END = 9 * MIB
UADDR_BASE = 0x7E0000000000
QUEUE_SIZE = 256
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x3000, 0x4000
TABLES_GPA, TABLES_END = 0x8000, 0x40000          # indirect tables
BUFFERS = ((0x40000, 4 * MIB), (8 * MIB, 9 * MIB))  # where request buffers go
MAX_SEGMENTS = 128                                  # the device's seg_max
USED_RING = (USED_GPA, USED_GPA + 6 + 8 * QUEUE_SIZE)
AVAIL_RING = (AVAIL_GPA, AVAIL_GPA + 6 + 2 * QUEUE_SIZE)
# Packed ring: descriptors at DESC_GPA, the driver event area at AVAIL_GPA, the device's at USED_GPA.
PACKED_RING = (DESC_GPA, DESC_GPA + 16 * QUEUE_SIZE)
PACKED_EVENT_AREAS = ((AVAIL_GPA, AVAIL_GPA + 4), (USED_GPA, USED_GPA + 4))


class Finding(Exception):
    """The device did something the oracles forbid."""


# ---------------------------------------------------------------------------------------------
# Guest memory and the driver side of one split ring
# ---------------------------------------------------------------------------------------------
class GuestMemory:
    """The fuzzer's guest RAM: one memfd per region, mapped here and shared with the device."""

    def __init__(self) -> None:
        self.fds, self.maps = [], []
        for _, size in REGIONS:
            fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.fds.append(fd)
            self.maps.append(mmap.mmap(fd, size))

    def table(self) -> bytes:
        return p.MemoryTable(tuple(p.MemoryRegion(gpa, size, UADDR_BASE + gpa, 0)
                                   for gpa, size in REGIONS)).encode()

    def _locate(self, gpa: int, length: int):
        for k, (base, size) in enumerate(REGIONS):
            if base <= gpa and gpa + length <= base + size:
                return self.maps[k], gpa - base
        raise ValueError("gpa %#x+%d is not inside one region" % (gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        while data:
            m, off = self._locate(gpa, 1)
            n = min(len(data), len(m) - off)
            m[off:off + n] = data[:n]
            gpa, data = gpa + n, data[n:]

    def read(self, gpa: int, length: int) -> bytes:
        out = b""
        while length:
            m, off = self._locate(gpa, 1)
            n = min(length, len(m) - off)
            out += m[off:off + n]
            gpa, length = gpa + n, length - n
        return out

    def snapshot(self) -> list[bytes]:
        return [bytes(m) for m in self.maps]

    def changes_outside(self, before: list[bytes], allowed: list[tuple[int, int]]) -> int | None:
        """The first gpa whose byte differs from the snapshot and lies outside every allowed
        [lo, hi) range (sorted, merged), or None."""
        for k, (base, size) in enumerate(REGIONS):
            now, old = self.maps[k], before[k]
            for page in range(0, size, 4096):
                if now[page:page + 4096] == old[page:page + 4096]:
                    continue
                lo = base + page
                if any(a <= lo and lo + 4096 <= b for a, b in allowed):
                    continue
                a_page, b_page = now[page:page + 4096], old[page:page + 4096]
                for i in range(4096):
                    if a_page[i] != b_page[i] and not any(a <= lo + i < b for a, b in allowed):
                        return lo + i
        return None

    def close(self) -> None:
        for m in self.maps:
            m.close()
        for fd in self.fds:
            os.close(fd)


@dataclass
class Chain:
    """One request as the fuzzer built it and what it expects of the device."""

    case: str
    head: int
    expect: str                     # ok | error | broken | any
    writable: list[tuple[int, int]] = field(default_factory=list)   # [gpa, end) device may write
    writable_bytes: int = 0
    status_gpa: int | None = None
    check_data: tuple[int, bytes] | None = None   # (gpa, bytes) a successful read must return


class Ring:
    """The driver side of queue 0 in the fuzzer's guest memory."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.reset()

    def reset(self) -> None:
        self.mem.write(DESC_GPA, bytes(16 * QUEUE_SIZE))
        self.mem.write(AVAIL_GPA, bytes(6 + 2 * QUEUE_SIZE))
        self.mem.write(USED_GPA, bytes(6 + 8 * QUEUE_SIZE))
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    def desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None):
        base = DESC_GPA if table is None else table
        self.mem.write(base + 16 * index, DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF,
                                                    nxt & 0xFFFF))

    def take(self, count: int) -> list[int]:
        """count fresh descriptor indices (the ring is drained between batches)."""
        if self.next_desc + count > QUEUE_SIZE:
            raise OverflowError
        ids = list(range(self.next_desc, self.next_desc + count))
        self.next_desc += count
        return ids

    def publish(self, head: int) -> None:
        self.mem.write(AVAIL_GPA + 4 + 2 * (self.avail_idx % QUEUE_SIZE), struct.pack("<H", head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(USED_GPA + 2, 2))[0]

    def pop_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used_seen % QUEUE_SIZE
            out.append(struct.unpack("<II", self.mem.read(USED_GPA + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def chain_id(self, head: int) -> int:
        """What the used entry of the chain starting at descriptor head carries: head."""
        return head

    def checkpoint(self):
        return self.next_desc

    def rollback(self, mark) -> None:
        """Forget descriptors taken since checkpoint() (a case that ran out of room)."""
        self.next_desc = mark

    def device_areas(self) -> list[tuple[int, int]]:
        """Ring memory the device may write (and the avail ring, which we write after the
        snapshot)."""
        return [USED_RING, AVAIL_RING]

    def base(self) -> int:
        """SET_VRING_BASE of a fresh ring."""
        return 0


class PackedRing(Ring):
    """The driver side of queue 0 as a packed virtqueue.

    Positions are free-running slot counts (slot = count % size, wrap counter 1 on even laps).
    take() hands out consecutive positions from the avail position; a chain's buffer id is the
    slot of its first descriptor (unique among the chains of a batch: the ring drains between
    batches).  A chain's head descriptor is written not yet available and made available by
    publish(), after the rest of the chain."""

    def reset(self) -> None:
        self.mem.write(DESC_GPA, bytes(16 * QUEUE_SIZE))
        self.mem.write(AVAIL_GPA, bytes(4))
        self.mem.write(USED_GPA, bytes(4))
        self.avail_pos = 0
        self.used_pos = 0
        self.next_desc = 0
        self.batch_start = 0
        self.new_batch()

    def new_batch(self) -> None:
        """Forget the previous batch's chains (it drained, or the ring was reset)."""
        self.heads: dict[int, list[tuple[int, int]]] = {}   # buffer id → [(head position, flags)]
        self.chain_len: dict[int, int] = {}                 # buffer id → slots of its chain
        self.head_positions: set[int] = set()
        self.ids: dict[int, int] = {}                       # position → buffer id its chain carries

    @staticmethod
    def wrap(pos: int) -> int:
        return 1 if (pos // QUEUE_SIZE) % 2 == 0 else 0

    def avail_bits(self, pos: int) -> int:
        return F_AVAIL if self.wrap(pos) else F_USED

    def take(self, count: int, buffer_id: int | None = None) -> list[int]:
        if self.next_desc == 0:
            self.batch_start = self.avail_pos
            self.new_batch()
        if self.next_desc + count > QUEUE_SIZE:
            raise OverflowError
        first = self.batch_start + self.next_desc
        self.next_desc += count
        positions = list(range(first, first + count))
        bid = first % QUEUE_SIZE if buffer_id is None else buffer_id
        for pos in positions:
            self.ids[pos] = bid
        self.head_positions.add(first)
        self.chain_len[bid] = count
        self.avail_pos = first + count
        return positions

    def chain_id(self, head: int) -> int:
        """The buffer id the used descriptor of the chain starting at position head carries."""
        return self.ids.get(head, head % QUEUE_SIZE)

    def checkpoint(self):
        return self.next_desc, self.avail_pos

    def rollback(self, mark) -> None:
        """Give back positions taken since checkpoint() (slots taken but never made available
        would stop the device there), and make what was written there unavailable again: the
        rest of a chain is written available before its head, and the device would take it as
        a chain of its own once it reaches that position."""
        taken_to = self.avail_pos
        self.next_desc, self.avail_pos = mark
        for bid in list(self.heads):
            self.heads[bid] = [(pos, f) for pos, f in self.heads[bid] if pos < self.avail_pos]
        self.head_positions = {pos for pos in self.head_positions if pos < self.avail_pos}
        for pos in range(self.avail_pos, taken_to):
            self.ids.pop(pos, None)
            gpa = DESC_GPA + 16 * (pos % QUEUE_SIZE) + 14
            flags = struct.unpack("<H", self.mem.read(gpa, 2))[0] & ~(F_AVAIL | F_USED)
            self.mem.write(gpa, struct.pack("<H", flags | (self.avail_bits(pos) ^ (F_AVAIL | F_USED))))

    def desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None):
        if table is not None:          # a table entry: no avail bits, next unused
            self.mem.write(table + 16 * index, PACKED_DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF,
                                                                0, flags & 0xFFFF))
            return
        pos, bid = index, self.ids.get(index, index % QUEUE_SIZE)
        flags = (flags & ~(F_AVAIL | F_USED) & 0xFFFF) | self.avail_bits(pos)
        if pos in self.head_positions:
            # the head: written unavailable (the other lap's bits), made available by publish()
            self.heads.setdefault(bid, []).append((pos, flags))
            flags ^= F_AVAIL | F_USED
        self.mem.write(DESC_GPA + 16 * (pos % QUEUE_SIZE),
                       PACKED_DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, bid, flags))

    def publish(self, head: int) -> None:
        """Make the chains with buffer id head available (their head flags, stored last; later
        chains first, so the device sees them all at once)."""
        for pos, flags in reversed(self.heads.pop(head, [])):
            self.mem.write(DESC_GPA + 16 * (pos % QUEUE_SIZE) + 14, struct.pack("<H", flags))

    def set_avail_idx(self, value: int) -> None:
        raise NotImplementedError("packed rings have no avail index")

    def pop_used(self) -> list[tuple[int, int]]:
        out = []
        while True:
            _, length, bid, flags = PACKED_DESC.unpack(self.mem.read(DESC_GPA + 16 * (self.used_pos % QUEUE_SIZE), 16))
            wrap = self.wrap(self.used_pos)
            if bool(flags & F_AVAIL) != bool(wrap) or bool(flags & F_USED) != bool(wrap):
                return out
            out.append((bid, length))
            self.used_pos += self.chain_len.get(bid, 1)
            if len(out) > QUEUE_SIZE:
                return out             # a device that keeps "using": the oracles will object

    def device_areas(self) -> list[tuple[int, int]]:
        return [PACKED_RING, *PACKED_EVENT_AREAS]

    def base(self) -> int:
        return 0x8000 | 0x8000 << 16      # slot 0, wrap counters 1


# ---------------------------------------------------------------------------------------------
# A raw front-end session on one blk controller
# ---------------------------------------------------------------------------------------------
class Session:
    """vhost-user set-up of queue 0 over the fuzzer's memory, and its reset after a break."""

    def __init__(self, path: str, scribble_inflight: bool = False, packed: bool = False) -> None:
        self.path = path
        self.packed = packed
        self.mem = GuestMemory()
        self.ring = PackedRing(self.mem) if packed else Ring(self.mem)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.scribble_inflight = scribble_inflight
        self.inflight: mmap.mmap | None = None
        self.ch: Channel | None = None
        self.capacity_sectors = 0
        self.connect()

    def connect(self) -> None:
        self.ch = ch = Channel(self.path, timeout_s=10.0)
        offered = ch.call_u64(Request.GET_FEATURES)
        proto = ch.call_u64(Request.GET_PROTOCOL_FEATURES)
        want = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
        if self.scribble_inflight:
            want |= bit(ProtocolFeature.INFLIGHT_SHMFD)
        self.protocol = proto & want
        ch.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(self.protocol))
        ch.request(Request.SET_OWNER, ack=True)
        features = offered & (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.RING_INDIRECT_DESC)
                              | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES))
        if self.packed:
            if not offered & bit(VirtioFeature.RING_PACKED):
                raise RuntimeError("%s does not offer packed rings" % self.path)
            features |= bit(VirtioFeature.RING_PACKED)
        ch.request(Request.SET_FEATURES, p.encode_u64(features), ack=True)
        cfg = ch.call(Request.GET_CONFIG, p.ConfigSpace(0, 8, 0, bytes(8)).encode(), reply_size=20)
        self.capacity_sectors = struct.unpack("<Q", cfg.payload[12:20])[0]
        if self.protocol & bit(ProtocolFeature.INFLIGHT_SHMFD):
            msg = ch.call(Request.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 1, QUEUE_SIZE).encode(), reply_size=24)
            info = p.InflightInfo.decode(msg.payload)
            fd = msg.fds[0]
            self.inflight = mmap.mmap(fd, info.mmap_size)
            ch.request(Request.SET_INFLIGHT_FD, msg.payload, [fd], ack=True)
            os.close(fd)
        ch.request(Request.SET_MEM_TABLE, self.mem.table(), self.mem.fds, ack=True)
        ch.request(Request.SET_VRING_CALL, p.encode_u64(0), [self.call], ack=True)
        ch.request(Request.SET_VRING_ERR, p.encode_u64(0), [self.err], ack=True)
        self.start_ring()

    def start_ring(self) -> None:
        ch = self.ch
        self.ring.reset()
        if self.inflight is not None:
            self.inflight[:] = bytes(len(self.inflight))
        ch.request(Request.SET_VRING_NUM, p.VringState(0, QUEUE_SIZE).encode(), ack=True)
        ch.request(Request.SET_VRING_BASE, p.VringState(0, self.ring.base()).encode(), ack=True)
        ch.request(Request.SET_VRING_ADDR, p.VringAddr(0, 0, UADDR_BASE + DESC_GPA, UADDR_BASE + USED_GPA,
                                                       UADDR_BASE + AVAIL_GPA).encode(), ack=True)
        ch.request(Request.SET_VRING_KICK, p.encode_u64(0), [self.kick], ack=True)
        ch.request(Request.SET_VRING_ENABLE, p.VringState(0, 1).encode(), ack=True)
        self.drain_err()

    def stop_ring(self) -> int:
        msg = self.ch.call(Request.GET_VRING_BASE, p.VringState(0, 0).encode())
        return p.VringState.decode(msg.payload).num

    def reset_ring(self) -> None:
        """What a driver does after the device said it needs a reset: stop the ring, set it up
        from scratch."""
        self.stop_ring()
        self.start_ring()

    def drain_err(self) -> bool:
        try:
            return os.eventfd_read(self.err) > 0
        except BlockingIOError:
            return False

    def kick_device(self) -> None:
        os.eventfd_write(self.kick, 1)

    def close(self) -> None:
        if self.ch is not None:
            self.ch.close()
        if self.inflight is not None:
            self.inflight.close()
        self.mem.close()
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------
class Builder:
    """Builds one batch of chains on a ring with a seeded random generator."""

    def __init__(self, rng: random.Random, session: Session) -> None:
        self.rng = rng
        self.s = session
        self.ring = session.ring
        self.mem = session.mem
        self.buf_next = [lo for lo, _ in BUFFERS]
        self.table_next = TABLES_GPA
        self.avail_ops: list[tuple[str, int]] = []      # applied after the memory snapshot

    def publish(self, head: int) -> None:
        self.avail_ops.append(("head", head))

    def apply(self) -> None:
        for op, value in self.avail_ops:
            if op == "head":
                self.ring.publish(value)
            else:
                self.ring.set_avail_idx(self.ring.avail_idx + value)
        self.avail_ops = []

    # -- placement ----------------------------------------------------------------------------
    def alloc(self, length: int, straddle: bool = False) -> int:
        """A fresh buffer (no two buffers of a batch overlap); straddle: one that crosses the
        A|B region boundary (legitimate: two iovecs)."""
        if straddle and length > 1 and self.buf_next[0] <= 2 * MIB - length:
            addr = 2 * MIB - self.rng.randrange(1, length)
            self.buf_next[0] = addr + length
            return addr
        k = 1 if length <= 4096 and self.rng.random() < 0.3 else 0
        for k in (k, 1 - k):
            lo, hi = BUFFERS[k]
            addr = (self.buf_next[k] + 15) // 16 * 16
            if addr + length <= hi:
                self.buf_next[k] = addr + length
                return addr
        raise OverflowError("guest buffers exhausted for this batch")

    def table(self, entries: int) -> int:
        addr = self.table_next
        if addr + 16 * entries > TABLES_END:
            raise OverflowError("indirect table space exhausted for this batch")
        self.table_next = addr + 16 * entries
        return addr

    def bad_address(self, length: int) -> tuple[int, str]:
        """An address whose [addr, addr+length) is not all guest memory."""
        choice = self.rng.randrange(6)
        if choice == 0:
            return HOLE[0] + self.rng.randrange(HOLE[1] - HOLE[0] - length), "in the hole"
        if choice == 1:
            return HOLE[0] - self.rng.randrange(1, length) if length > 1 else HOLE[0], "straddles B|hole"
        if choice == 2:
            return MEMORY_END - self.rng.randrange(0, length), "straddles the end"
        if choice == 3:
            return (1 << 64) - self.rng.randrange(1, length + 1), "wraps"
        if choice == 4:
            return MEMORY_END + self.rng.randrange(1 << 40), "past the end"
        return HOLE[1] - self.rng.randrange(1, length + 1) if length > 1 else HOLE[1] - 1, "straddles hole|C"

    # -- request pieces -----------------------------------------------------------------------
    def header(self, type_: int, sector: int) -> int:
        addr = self.alloc(16)
        self.mem.write(addr, struct.pack("<IIQ", type_ & 0xFFFFFFFF, 0, sector & (2**64 - 1)))
        return addr

    def status(self) -> int:
        addr = self.alloc(1)
        self.mem.write(addr, b"\xee")
        return addr

    def valid_segments(self, kind: str | None = None):
        """(segments [(gpa, len, writable)], chain fields): a well-formed request."""
        rng = self.rng
        cap = self.s.capacity_sectors
        kind = kind or rng.choice(["read", "write", "flush", "get_id", "read", "write"])
        if kind in ("read", "write"):
            nbytes = rng.choice([512, 4096, 512 * rng.randint(1, 64)])
            sector = rng.randrange(max(1, cap - nbytes // SECTOR))
            pieces = rng.choice([1, 1, 2, 3, 8])
            sizes = _split(rng, nbytes, pieces)
            hdr = self.header(T_IN if kind == "read" else T_OUT, sector)
            data = []
            for size in sizes:
                gpa = self.alloc(size, straddle=rng.random() < 0.05)
                if kind == "write":
                    self.mem.write(gpa, rng.randbytes(size))
                data.append((gpa, size, kind == "read"))
            st = self.status()
            return [(hdr, 16, False)] + data + [(st, 1, True)], st
        if kind == "flush":
            hdr = self.header(T_FLUSH, 0)
            st = self.status()
            return [(hdr, 16, False), (st, 1, True)], st
        hdr = self.header(T_GET_ID, 0)
        length = rng.choice([1, 20, 64])
        buf = self.alloc(length)
        st = self.status()
        return [(hdr, 16, False), (buf, length, True), (st, 1, True)], st

    def direct(self, segments, flags_override=None, nexts=None) -> int:
        """Write segments as a direct chain; returns the head."""
        ids = self.ring.take(len(segments))
        for k, (gpa, length, writable) in enumerate(segments):
            last = k == len(segments) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            if flags_override is not None and k in flags_override:
                flags = flags_override[k]
            nxt = ids[k + 1] if not last else 0
            if nexts is not None and k in nexts:
                nxt = nexts[k]
            self.ring.desc(ids[k], gpa, length, flags, nxt)
        return self.ring.chain_id(ids[0])

    def write_table(self, segments) -> int:
        """A new indirect table holding segments as one well-linked chain; returns its address."""
        table = self.table(max(1, len(segments)))
        for k, (gpa, length, writable) in enumerate(segments):
            last = k == len(segments) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.ring.desc(k, gpa, length, flags, 0 if last else k + 1, table=table)
        return table

    def indirect(self, segments, table_len=None, table_addr=None, head_flags=F_INDIRECT) -> int:
        table = self.write_table(segments)
        (head,) = self.ring.take(1)
        self.ring.desc(head, table if table_addr is None else table_addr,
                       16 * len(segments) if table_len is None else table_len, head_flags)
        return self.ring.chain_id(head)

    def chain(self, case, head, segments, expect, status=None, check_data=None) -> Chain:
        writable = [(g, g + n) for g, n, w in segments if w and n]
        return Chain(case, head, expect, writable, sum(n for _, n, w in segments if w), status, check_data)

    # -- the cases ----------------------------------------------------------------------------
    def build(self, case: str) -> tuple[list[Chain], dict]:
        """Chains for one case, published in order; extra: avail-index tricks."""
        return getattr(self, "case_" + case)()

    def case_valid(self):
        segs, st = self.valid_segments()
        head = self.direct(segs) if self.rng.random() < 0.7 else self.indirect(segs)
        return [self.chain("valid", head, segs, "ok", st)], {}

    def case_write_then_read(self):
        rng = self.rng
        sector = rng.randrange(max(1, self.s.capacity_sectors - 8))
        data = rng.randbytes(4096)
        hdr, buf, st = self.header(T_OUT, sector), self.alloc(4096), self.status()
        self.mem.write(buf, data)
        w = [(hdr, 16, False), (buf, 4096, False), (st, 1, True)]
        hdr2, buf2, st2 = self.header(T_IN, sector), self.alloc(4096), self.status()
        r = [(hdr2, 16, False), (buf2, 4096, True), (st2, 1, True)]
        return [self.chain("write_then_read", self.direct(w), w, "ok", st),
                self.chain("write_then_read", self.direct(r), r, "ok", st2, (buf2, data))], {}

    def case_bad_address(self):
        segs, st = self.valid_segments(self.rng.choice(["read", "write"]))
        k = self.rng.randrange(1, len(segs) - 1)
        gpa, length, writable = segs[k]
        bad, _ = self.bad_address(length)
        segs[k] = (bad, length, writable)
        head = self.direct(segs) if self.rng.random() < 0.6 else self.indirect(segs)
        return [self.chain("bad_address", head, segs, "error", st)], {}

    def case_bad_header_address(self):
        segs, st = self.valid_segments()
        bad, _ = self.bad_address(16)
        segs[0] = (bad, 16, False)
        return [self.chain("bad_header_address", self.direct(segs), segs, "error", st)], {}

    def case_bad_status_address(self):
        segs, _ = self.valid_segments()
        bad, _ = self.bad_address(1)
        segs[-1] = (bad, 1, True)
        return [self.chain("bad_status_address", self.direct(segs), segs[:-1], "error")], {}

    def case_zero_lengths(self):
        segs, st = self.valid_segments(self.rng.choice(["read", "write", "flush"]))
        k = self.rng.randrange(1, len(segs))
        segs.insert(k, (self.alloc(16), 0, self.rng.random() < 0.5))
        head = self.direct(segs)
        return [self.chain("zero_lengths", head, segs, "any", st)], {}

    def case_zero_length_status(self):
        segs, st = self.valid_segments()
        segs[-1] = (st, 0, True)
        return [self.chain("zero_length_status", self.direct(segs), segs, "error")], {}

    def case_huge_length(self):
        segs, st = self.valid_segments(self.rng.choice(["read", "write"]))
        k = self.rng.randrange(1, len(segs) - 1)
        gpa, _, writable = segs[k]
        segs[k] = (gpa, self.rng.choice([0xFFFFFFFF, 0x80000000, 64 * MIB, 9 * MIB]), writable)
        return [self.chain("huge_length", self.direct(segs), segs, "error", st)], {}

    def case_loop(self):
        segs, st = self.valid_segments(self.rng.choice(["read", "write"]))
        ids_before = self.ring.next_desc
        k = self.rng.randrange(len(segs))
        target = ids_before + self.rng.randrange(k + 1)
        flags = {k: (F_WRITE if segs[k][2] else 0) | F_NEXT}
        head = self.direct(segs, flags_override=flags, nexts={k: target})
        return [self.chain("loop", head, segs, "broken", st)], {}

    def case_next_out_of_range(self):
        segs, st = self.valid_segments()
        k = self.rng.randrange(len(segs) - 1)
        head = self.direct(segs, nexts={k: self.rng.randrange(QUEUE_SIZE, 0x10000)})
        return [self.chain("next_out_of_range", head, segs, "broken", st)], {}

    def case_head_out_of_range(self):
        self.publish(self.rng.randrange(QUEUE_SIZE, 0x10000))
        return [Chain("head_out_of_range", -1, "broken")], {"published": True}

    def case_avail_jump(self):
        self.avail_ops.append(("jump", self.rng.randrange(QUEUE_SIZE + 1, 0x10000 - QUEUE_SIZE)))
        return [Chain("avail_jump", -1, "broken")], {"published": True}

    def case_head_in_flight_twice(self):
        segs, st = self.valid_segments("read")
        head = self.direct(segs)
        self.publish(head)
        self.publish(head)
        # The first may finish before the second is fetched (malloc completes at once): then
        # both complete; otherwise the ring breaks.
        return [self.chain("head_in_flight_twice", head, segs, "any", st)], {"published": True}

    def case_nested_indirect(self):
        segs, st = self.valid_segments()
        inner = self.write_table(segs)
        outer = self.table(2)
        self.ring.desc(0, inner, 16 * len(segs), F_INDIRECT | F_NEXT, 1, table=outer)
        self.ring.desc(1, st, 1, F_WRITE, table=outer)
        (head,) = self.ring.take(1)
        self.ring.desc(head, outer, 32, F_INDIRECT)
        return [self.chain("nested_indirect", self.ring.chain_id(head), segs + [(st, 1, True)], "error", st)], {}

    def case_indirect_with_next(self):
        segs, st = self.valid_segments()
        head = self.indirect(segs, head_flags=F_INDIRECT | F_NEXT)
        return [self.chain("indirect_with_next", head, segs, "error", st)], {}

    def case_indirect_not_alone(self):
        segs, st = self.valid_segments()
        table = self.write_table(segs)
        first, second = self.ring.take(2)
        hdr = self.header(T_IN, 0)
        self.ring.desc(first, hdr, 16, F_NEXT, second)
        self.ring.desc(second, table, 16 * len(segs), F_INDIRECT)
        return [self.chain("indirect_not_alone", self.ring.chain_id(first), segs, "error", st)], {}

    def case_indirect_bad_table(self):
        segs, st = self.valid_segments()
        rng = self.rng
        how = rng.randrange(4)
        if how == 0:
            head = self.indirect(segs, table_len=16 * len(segs) - rng.randrange(1, 16))
        elif how == 1:
            head = self.indirect(segs, table_len=0)
        elif how == 2:
            head = self.indirect(segs, table_addr=self.bad_address(16 * len(segs))[0])
        else:
            head = self.indirect(segs, table_len=rng.choice([0xFFFFFFF0, 65537 * 16]))
        return [self.chain("indirect_bad_table", head, segs, "error", st)], {}

    def case_indirect_loop(self):
        segs, st = self.valid_segments()
        table = self.table(len(segs))
        for k, (gpa, length, writable) in enumerate(segs):
            self.ring.desc(k, gpa, length, (F_WRITE if writable else 0) | F_NEXT,
                           self.rng.randrange(len(segs) + (1 if self.rng.random() < 0.3 else 0)), table=table)
        (head,) = self.ring.take(1)
        self.ring.desc(head, table, 16 * len(segs), F_INDIRECT)
        return [self.chain("indirect_loop", head, segs, "error", st)], {}

    def case_too_many_segments(self):
        rng = self.rng
        n = rng.choice([MAX_SEGMENTS + 3, 131, 200, 250])
        hdr = self.header(T_IN, 0)
        data = [(self.alloc(512), 512, True) for _ in range(n - 2)]
        st = self.status()
        segs = [(hdr, 16, False)] + data + [(st, 1, True)]
        if rng.random() < 0.5 or self.ring.next_desc + n > QUEUE_SIZE:
            head = self.indirect(segs)
        else:
            head = self.direct(segs)
        return [self.chain("too_many_segments", head, segs, "error", st)], {}

    def case_many_small_segments(self):
        n = self.rng.randint(2, MAX_SEGMENTS - 2)
        hdr = self.header(T_IN, 0)
        data = [(self.alloc(512), 512, True) for _ in range(n)]
        st = self.status()
        segs = [(hdr, 16, False)] + data + [(st, 1, True)]
        return [self.chain("many_small_segments", self.indirect(segs), segs, "ok", st)], {}

    def case_wrong_direction(self):
        segs, st = self.valid_segments(self.rng.choice(["read", "write"]))
        how = self.rng.randrange(3)
        if how == 0:
            segs[0] = (segs[0][0], 16, True)                  # header device-writable
            expect = "error"
        elif how == 1:
            segs[-1] = (segs[-1][0], 1, False)                # status device-readable
            expect = "error"
            st = None
        else:
            segs = [(g, n, not w) for g, n, w in segs]        # every direction flipped
            expect = "error"
            st = None if not segs[-1][2] else st
        return [self.chain("wrong_direction", self.direct(segs), segs, expect, st)], {}

    def case_bad_type(self):
        t = self.rng.choice([2, 3, 5, 6, 7, 9, 10, 12, 14, 15, 16, 0xFF, 0x80000000, 0xFFFFFFFF])
        hdr = self.header(t, 0)
        buf = self.alloc(512)
        st = self.status()
        segs = [(hdr, 16, False), (buf, 512, self.rng.random() < 0.5), (st, 1, True)]
        return [self.chain("bad_type", self.direct(segs), segs, "error", st)], {}

    def case_short_header(self):
        hdr = self.header(T_IN, 0)
        st = self.status()
        n = self.rng.randrange(0, 16)
        segs = [(hdr, n, False), (self.alloc(512), 512, True), (st, 1, True)]
        return [self.chain("short_header", self.direct(segs), segs, "error", st)], {}

    def case_split_header(self):
        hdr = self.header(T_IN, 3)
        cut = self.rng.randrange(1, 16)
        buf, st = self.alloc(512), self.status()
        segs = [(hdr, cut, False), (hdr + cut, 16 - cut, False), (buf, 512, True), (st, 1, True)]
        return [self.chain("split_header", self.direct(segs), segs, "ok", st)], {}

    def case_sector_out_of_range(self):
        cap = self.s.capacity_sectors
        sector = self.rng.choice([cap, cap + 1, cap - 1, 1 << 55, (1 << 64) // SECTOR, (1 << 64) - 1])
        t = self.rng.choice([T_IN, T_OUT])
        hdr, buf, st = self.header(t, sector), self.alloc(4096), self.status()
        segs = [(hdr, 16, False), (buf, 4096 if sector == cap - 1 else 512, t == T_IN), (st, 1, True)]
        return [self.chain("sector_out_of_range", self.direct(segs), segs, "error", st)], {}

    def case_discard_and_write_zeroes(self):
        rng = self.rng
        t = rng.choice([T_DISCARD, T_WRITE_ZEROES])
        seg = self.alloc(32)
        size = rng.choice([16, 16, 8, 32, 0])
        self.mem.write(seg, struct.pack("<QII", rng.choice([0, 8, self.s.capacity_sectors, (1 << 64) - 1]),
                                        rng.choice([0, 8, 1 << 31, 0xFFFFFFFF]), rng.choice([0, 1, 2, 0xFFFFFFFF]))
                       + bytes(16))
        hdr, st = self.header(t, 0), self.status()
        segs = [(hdr, 16, False)] + ([(seg, size, False)] if size else []) + [(st, 1, True)]
        return [self.chain("discard_and_write_zeroes", self.direct(segs), segs, "any", st)], {}

    def case_garbage_chain(self):
        rng = self.rng
        n = rng.randint(1, 6)
        ids = self.ring.take(n)
        for i in ids:
            self.mem.write(DESC_GPA + 16 * i, rng.randbytes(16))
        return [Chain("garbage_chain", ids[0], "any_or_broken", [(0, MEMORY_END)], 1 << 40)], {"chaos": True}

    def case_buffer_aliases_ring(self):
        target = self.rng.choice([DESC_GPA, AVAIL_GPA, USED_GPA, TABLES_GPA])
        hdr, st = self.header(T_IN, 0), self.status()
        segs = [(hdr, 16, False), (target, 512, True), (st, 1, True)]
        return [Chain("buffer_aliases_ring", self.direct(segs), "any_or_broken",
                      [(0, MEMORY_END)], 1 << 40, st)], {"chaos": True}


class PackedBuilder(Builder):
    """The cases on a packed ring: the split ones that mean the same there, and packed tricks in
    place of those about next links and the avail index."""

    SPLIT_ONLY = {"loop", "next_out_of_range", "head_out_of_range", "avail_jump", "indirect_loop"}

    def direct(self, segments, flags_override=None, nexts=None, buffer_id=None) -> int:
        ids = self.ring.take(len(segments), buffer_id)
        for k, (gpa, length, writable) in enumerate(segments):
            last = k == len(segments) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            if flags_override is not None and k in flags_override:
                flags = flags_override[k]
            self.ring.desc(ids[k], gpa, length, flags)
        return self.ring.chain_id(ids[0])

    def case_chain_too_long(self):
        """NEXT on every descriptor of the ring: a chain longer than the ring."""
        hdr = self.header(T_IN, 0)
        positions = self.ring.take(QUEUE_SIZE)
        for pos in positions:
            self.ring.desc(pos, hdr, 16, F_NEXT)
        return [Chain("chain_too_long", self.ring.chain_id(positions[0]), "broken")], {}

    def case_id_out_of_range(self):
        segs, st = self.valid_segments()
        head = self.direct(segs, buffer_id=self.rng.randrange(QUEUE_SIZE, 0x10000))
        return [self.chain("id_out_of_range", head, segs, "broken", st)], {}

    def case_head_in_flight_twice(self):
        """Two chains with one buffer id: both complete (the first finished before the second
        was fetched) or the ring breaks."""
        segs, st = self.valid_segments("read")
        head = self.direct(segs)
        self.direct(segs, buffer_id=head)
        self.publish(head)
        return [self.chain("head_in_flight_twice", head, segs, "any", st)], {"published": True}

    def case_indirect_with_next(self):
        segs, st = self.valid_segments()
        table = self.write_table(segs)
        first, second = self.ring.take(2)
        self.ring.desc(first, table, 16 * len(segs), F_INDIRECT | F_NEXT)
        self.ring.desc(second, st, 1, F_WRITE)
        return [self.chain("indirect_with_next", self.ring.chain_id(first), segs, "error", st)], {}

    def case_garbage_chain(self):
        rng = self.rng
        positions = self.ring.take(rng.randint(1, 6))
        for pos in positions:
            self.mem.write(DESC_GPA + 16 * (pos % QUEUE_SIZE), rng.randbytes(16))
        bid = self.ring.chain_id(positions[0])
        flags = rng.randrange(0x10000) & ~(F_AVAIL | F_USED) | self.ring.avail_bits(positions[0])
        self.ring.heads.setdefault(bid, []).append((positions[0], flags))
        return [Chain("garbage_chain", bid, "any_or_broken", [(0, MEMORY_END)], 1 << 40)], {"chaos": True}


def _cases(builder: type[Builder]) -> list[str]:
    skip = getattr(builder, "SPLIT_ONLY", set())
    return [name[5:] for name in dir(builder) if name.startswith("case_") and name[5:] not in skip]


CASES = _cases(Builder)
PACKED_CASES = _cases(PackedBuilder)
# How often each case is drawn: valid requests are a quarter of everything.
WEIGHTS = {name: 1 for name in CASES}
WEIGHTS.update(valid=8, write_then_read=2)
PACKED_WEIGHTS = {name: 1 for name in PACKED_CASES}
PACKED_WEIGHTS.update(valid=8, write_then_read=2)


def _split(rng: random.Random, total: int, pieces: int) -> list[int]:
    if pieces <= 1 or total < pieces:
        return [total]
    cuts = sorted(rng.sample(range(1, total), pieces - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


# ---------------------------------------------------------------------------------------------
# Running batches and checking them
# ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    iterations: int = 0
    chains: int = 0
    tried: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    resets: int = 0
    good_checks: int = 0
    findings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["iterations %d, chains %d, ring resets %d, checks of the other controller %d, findings %d"
                 % (self.iterations, self.chains, self.resets, self.good_checks, len(self.findings))]
        for case in sorted(self.tried):
            outs = ", ".join("%s %d" % (o.split(":", 1)[1], n) for o, n in sorted(self.outcomes.items())
                             if o.split(":", 1)[0] == case)
            lines.append("  %-26s %6d  %s" % (case, self.tried[case], outs))
        for f in self.findings[:50]:
            lines.append("FINDING: " + f)
        return "\n".join(lines)


class Fuzzer:
    def __init__(self, path: str, good_path: str | None = None, seed: int = 0,
                 scribble_inflight: bool = False, timeout_s: float = 2.0, good_every: int = 200,
                 packed: bool = False) -> None:
        self.session = Session(path, scribble_inflight, packed)
        self.builder_class = PackedBuilder if packed else Builder
        self.weights = PACKED_WEIGHTS if packed else WEIGHTS
        self.good_path = good_path
        self.seed = seed
        self.timeout_s = timeout_s
        self.good_every = good_every
        self.report = Report()
        self.scribble = scribble_inflight
        self._good = None

    def close(self) -> None:
        self.session.close()
        if self._good is not None:
            self._good.close()

    def run(self, iterations: int, deadline_s: float | None = None) -> Report:
        start = time.monotonic()
        stop = threading.Event()
        scribbler = None
        if self.scribble and self.session.inflight is not None:
            scribbler = threading.Thread(target=self._scribble_forever, args=(stop,), daemon=True)
            scribbler.start()
        try:
            for i in range(iterations):
                if deadline_s is not None and time.monotonic() - start > deadline_s:
                    break
                self.iteration(i)
                if self.good_path and (i + 1) % self.good_every == 0:
                    self.check_good()
        finally:
            stop.set()
            if scribbler is not None:
                scribbler.join(5)
        if self.good_path:
            self.check_good()
        return self.report

    def _scribble_forever(self, stop: threading.Event) -> None:
        """A hostile front-end thread: rewrite the 'next' links and flags of the shared inflight
        region while the device completes requests (it must never follow them out of bounds)."""
        rng = random.Random(self.seed)
        region = self.session.inflight
        descs = (len(region) - 16) // 16
        while not stop.is_set():
            for _ in range(256):
                k = rng.randrange(min(descs, QUEUE_SIZE))
                struct.pack_into("<H", region, 16 + 16 * k + 6, rng.randrange(0x10000))
            if rng.random() < 0.01:
                struct.pack_into("<HH", region, 12, rng.randrange(0x10000), rng.randrange(0x10000))
            time.sleep(0)

    def check_good(self) -> None:
        """The other controller serves a well-behaved front-end (the project's VirtioBlk)."""
        from vhostd.initiator.blk import VirtioBlk

        try:
            if self._good is None:
                self._good = VirtioBlk(self.good_path, queue_size=64, memory_bytes=8 * MIB).open()
            data = os.urandom(4096)
            self._good.write(8, data)
            if self._good.read(8, 4096) != data:
                raise Finding("the other controller returned wrong data")
            self.report.good_checks += 1
        except Exception as exc:        # any failure here is a finding, not a fuzzer crash
            self.report.findings.append("other controller stopped serving: %r" % (exc,))

    def iteration(self, i: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + i)
        report = self.report
        report.iterations += 1
        s = self.session
        s.ring.next_desc = 0            # the previous batch has drained: its descriptors are free
        builder = self.builder_class(rng, s)
        names, weights = zip(*sorted(self.weights.items()))
        count = rng.choice([1, 1, 2, 3, 5, 8])
        chains: list[Chain] = []
        chaos = False
        for _ in range(count):
            case = rng.choices(names, weights)[0]
            mark = s.ring.checkpoint()
            try:
                built, extra = builder.build(case)
            except OverflowError:
                s.ring.rollback(mark)
                break
            report.tried[case] += 1
            for c in built:
                if not extra.get("published") and c.head >= 0:
                    builder.publish(c.head)
            chains.extend(built)
            chaos = chaos or extra.get("chaos", False)
            if any(c.expect == "broken" for c in built):
                break            # nothing after a structural break would be fetched
        if chaos:
            # The guest scribbles over its own rings: every chain of the batch may turn into
            # anything, and the ring may stall (the guest clobbered its own avail entries).  Only
            # "no crash, no status but a virtio one" is left to check, and the reset after.
            for c in chains:
                c.expect, c.writable, c.writable_bytes = "any_or_broken", [(0, MEMORY_END)], 1 << 40
                c.check_data = None
        report.chains += len(chains)
        before = s.mem.snapshot()
        builder.apply()
        if self.scribble and s.inflight is not None and rng.random() < 0.5:
            self._scribble(rng)
        s.kick_device()
        try:
            self.wait_and_check(chains, before, i)
        except Finding as exc:
            report.findings.append("seed %d iteration %d (%s): %s"
                                   % (self.seed, i, ", ".join(c.case for c in chains), exc))
            self.recover(i)

    def _scribble(self, rng: random.Random) -> None:
        """A hostile front-end rewrites the shared inflight region while requests run."""
        region = self.session.inflight
        for _ in range(rng.randint(1, 64)):
            off = rng.randrange(len(region) - 2)
            region[off:off + 2] = rng.randbytes(2)

    def wait_and_check(self, chains: list[Chain], before: list[bytes], i: int) -> None:
        s = self.session
        expect_heads = {c.head: c for c in chains if c.head >= 0}
        structural = any(c.expect == "broken" for c in chains)
        maybe_broken = any(c.expect in ("broken", "any_or_broken", "any") for c in chains)
        got: dict[int, int] = {}
        times: collections.Counter = collections.Counter()
        # A head published twice completes twice (unless the ring breaks): wait for both, or the
        # late second completion would show up in the next batch.
        wanted = collections.Counter({c.head: 2 if c.case == "head_in_flight_twice" else 1
                                      for c in chains if c.head >= 0})
        broken = False
        deadline = time.monotonic() + self.timeout_s
        while True:
            for head, length in s.ring.pop_used():
                if head in got and not any(c.case == "head_in_flight_twice" or c.expect == "any_or_broken"
                                           for c in chains):
                    raise Finding("head %d completed twice" % head)
                if head not in expect_heads and not any(c.expect == "any_or_broken" for c in chains):
                    raise Finding("used entry for head %d, which was not published" % head)
                got[head] = length
                times[head] += 1
            if s.drain_err():
                broken = True
            pending = [h for h in expect_heads if times[h] < wanted[h]]
            if broken:
                time.sleep(0.002)
                for head, length in s.ring.pop_used():
                    got[head] = length
                break
            if not pending and not structural:
                break
            if time.monotonic() > deadline:
                if chains and all(c.expect == "any_or_broken" for c in chains):
                    self.report.outcomes["chaos:stalled"] += 1
                    self.recover(i)
                    return
                raise Finding("no completion and no broken ring within %.0f s (pending heads %s)"
                              % (self.timeout_s, pending[:8]))
            select.select([s.call, s.err], [], [], 0.01)
            try:
                os.eventfd_read(s.call)
            except BlockingIOError:
                pass
        report = self.report
        if broken and not maybe_broken:
            raise Finding("the ring broke, but every chain was well-formed")
        if structural and not broken:
            raise Finding("a structurally broken chain did not break the ring")
        # Per chain: status and used.len.
        for c in chains:
            if c.head < 0:
                report.outcomes[c.case + ":broken" if broken else c.case + ":?"] += 1
                continue
            if c.head not in got:
                if not broken:
                    raise Finding("head %d (%s) never completed" % (c.head, c.case))
                report.outcomes[c.case + ":broken"] += 1
                continue
            used_len = got[c.head]
            if used_len > c.writable_bytes:
                raise Finding("%s: used.len %d exceeds the %d writable bytes" % (c.case, used_len, c.writable_bytes))
            status = s.mem.read(c.status_gpa, 1)[0] if c.status_gpa is not None else None
            label = {S_OK: "ok", S_IOERR: "ioerr", S_UNSUPP: "unsupp", None: "no-status", 0xEE: "untouched"}.get(
                status, "status %#x" % status if status is not None else "?")
            report.outcomes["%s:%s" % (c.case, label)] += 1
            if c.expect == "ok" and status != S_OK:
                raise Finding("%s: a valid request got status %s" % (c.case, label))
            if c.expect == "error" and status == S_OK:
                raise Finding("%s: an invalid request succeeded" % c.case)
            if status is not None and status not in (S_OK, S_IOERR, S_UNSUPP, 0xEE):
                raise Finding("%s: status byte %#x is not a virtio-blk status" % (c.case, status))
            if c.expect == "ok" and status == 0xEE:
                raise Finding("%s: the status byte was not written" % c.case)
            if c.expect == "any_or_broken":
                continue
            if c.check_data is not None and status == S_OK:
                gpa, data = c.check_data
                if s.mem.read(gpa, len(data)) != data:
                    raise Finding("%s: read back other data than written" % c.case)
        # Guest memory: only writable buffers and the used ring may have changed (and the avail
        # ring, which we wrote ourselves after the snapshot).
        allowed = _merge(s.ring.device_areas() + [r for c in chains for r in c.writable])
        bad = s.mem.changes_outside(before, allowed)
        if bad is not None:
            raise Finding("the device wrote guest memory at %#x, outside every writable buffer" % bad)
        if broken or any(c.expect == "any_or_broken" for c in chains):
            # A guest that scribbled over its own rings resets them, as a driver would: the device
            # may still be working through entries the scribbling made up, whose completions would
            # otherwise land in the next batch.
            self.recover(i)

    def recover(self, i: int) -> None:
        """Reset the ring (or, failing that, reconnect) and prove the queue serves again."""
        s = self.session
        self.report.resets += 1
        try:
            s.reset_ring()
        except Exception:
            s.ch.close()
            s.connect()
        rng = random.Random(self.seed * 7919 + i)
        s.ring.next_desc = 0
        builder = self.builder_class(rng, s)
        chains, _ = builder.case_write_then_read()
        for c in chains:
            builder.publish(c.head)
        before = s.mem.snapshot()
        builder.apply()
        s.kick_device()
        try:
            self.wait_and_check(chains, before, i)
        except Finding as exc:
            self.report.findings.append("seed %d iteration %d: the queue does not serve after a reset: %s"
                                        % (self.seed, i, exc))
            s.ch.close()
            s.connect()


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or touching ranges joined."""
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
class DaemonTarget:
    """A vhostd process with two blk controllers (fuzz.0 and good.0) on malloc bdevs; packed: the
    fuzzed one is fuzzp.0, created with packed_ring."""

    def __init__(self, packed: bool = False) -> None:
        from vhostd.initiator.targets import VhostdTarget

        self.t = VhostdTarget("malloc", size_bytes=16 * MIB)
        self.packed = packed

    def __enter__(self):
        self.t.start()
        self.t.rpc("bdev_malloc_create", {"name": "good0", "num_blocks": 8192, "block_size": 512})
        self.t.rpc("vhost_create_blk_controller", {"ctrlr": "good.0", "dev_name": "good0"})
        self.path = self.t.socket_path
        if self.packed:
            self.t.rpc("bdev_malloc_create", {"name": "fuzzp0", "num_blocks": 32768, "block_size": 512})
            self.t.rpc("vhost_create_blk_controller", {"ctrlr": "fuzzp.0", "dev_name": "fuzzp0",
                                                       "packed_ring": True})
            self.path = str(self.t.workdir / "fuzzp.0")
        self.good_path = str(self.t.workdir / "good.0")
        return self

    def alive(self) -> bool:
        return self.t.proc.poll() is None

    def log_tail(self) -> str:
        return self.t.log_tail(40)

    def __exit__(self, *exc) -> None:
        self.t.close()


class InProcessTarget:
    """Two in-process blk controllers (the data plane runs in this process: for ASAN); packed: the
    fuzzed one offers packed rings."""

    def __init__(self, packed: bool = False) -> None:
        self.packed = packed

    def __enter__(self):
        from vhostd.initiator.targets import InProcessVhostdTarget

        self.fuzzed = InProcessVhostdTarget("malloc", size_bytes=16 * MIB, packed_ring=self.packed).start()
        self.good = InProcessVhostdTarget("malloc", size_bytes=4 * MIB).start()
        self.path, self.good_path = self.fuzzed.socket_path, self.good.socket_path
        return self

    def alive(self) -> bool:
        return True

    def log_tail(self) -> str:
        return ""

    def __exit__(self, *exc) -> None:
        self.fuzzed.close()
        self.good.close()


def fuzz(path: str, good_path: str | None, iterations: int, seed: int, scribble_inflight: bool = False,
         deadline_s: float | None = None, timeout_s: float = 2.0, packed: bool = False) -> Report:
    """Run the guest fuzzer against a blk controller socket (packed: on a packed ring; the
    controller must offer it); returns the report."""
    fuzzer = Fuzzer(path, good_path, seed, scribble_inflight, timeout_s, packed=packed)
    try:
        return fuzzer.run(iterations, deadline_s)
    finally:
        fuzzer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soak", action="store_true", help="20000 iterations (or --iterations if larger)")
    ap.add_argument("--target", choices=["daemon", "inproc"], default="daemon")
    ap.add_argument("--socket", help="attack this controller socket of a running vhostd instead")
    ap.add_argument("--good-socket", help="another controller of that vhostd, checked to keep serving")
    ap.add_argument("--scribble-inflight", action="store_true",
                    help="also rewrite the shared inflight region while requests run")
    ap.add_argument("--packed", action="store_true",
                    help="fuzz a packed virtqueue (the target controller is created with packed_ring)")
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="seconds a batch may take before it counts as hung (more under ASAN)")
    args = ap.parse_args(argv)
    iterations = max(args.iterations, 20000) if args.soak else args.iterations
    start = time.monotonic()
    runs = [False, True] if args.scribble_inflight else [False]
    reports = []
    if args.socket:
        for scribble in runs:
            reports.append(fuzz(args.socket, args.good_socket, iterations, args.seed, scribble, args.max_seconds,
                                args.timeout, args.packed))
        alive, tail = True, ""
    else:
        target = DaemonTarget(args.packed) if args.target == "daemon" else InProcessTarget(args.packed)
        with target as t:
            for scribble in runs:
                try:
                    reports.append(fuzz(t.path, t.good_path, iterations, args.seed, scribble, args.max_seconds,
                                        args.timeout, args.packed))
                except Exception as exc:
                    r = Report()
                    r.findings.append("fuzzer stopped: %r (daemon alive: %s)\n%s" % (exc, t.alive(), t.log_tail()))
                    reports.append(r)
            alive, tail = t.alive(), t.log_tail()
    for scribble, report in zip(runs, reports):
        print("== guest fuzz, seed %d%s%s ==" % (args.seed, ", packed ring" if args.packed else "",
                                               ", inflight scribbled" if scribble else ""))
        print(report.summary())
    if not alive:
        print("FINDING: vhostd exited\n" + tail)
    print("elapsed %.1f s" % (time.monotonic() - start))
    return 1 if (not alive or any(r.findings for r in reports)) else 0


if __name__ == "__main__":
    sys.exit(main())
