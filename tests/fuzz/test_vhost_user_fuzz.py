"""Hostile vhost-user front-ends against a running daemon (a separate process).

The daemon has two blk controllers on malloc bdevs: ``hostile.0``, which the cases attack, and
``good.0``, which the project's front-end (vhostd.initiator) keeps reading and writing from a
thread the whole time.  Each case must end with the connection answered per spec or closed; then
the daemon's open fds and guest-memory mappings (/proc/PID) are back to the baseline, ``good.0``
has kept serving, ``hostile.0`` serves a well-behaved front-end, and the log has no traceback.

tests/integration/test_vhost_hostile_frontend.py covers the basic framing errors (short header,
bad flags, wrong payload sizes, missing fds) against an in-process controller; this file goes
after fds that should not be there, memory tables and regions that cannot be mapped, ring
addresses, mem-slot and inflight abuse, requests in the wrong state, disconnects at every point,
and generated message sequences.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import examples
from tests.fuzz.traffic import BackgroundTraffic
from tests.fuzz.vhost_peer import FD_KINDS, HostilePeer, any_fd, fd_count, guest_mappings, maps, memfd
from tests.helpers.daemon import Daemon
from vhostd.initiator.blk import VirtioBlk
from vhostd.vhost import protocol as p
from vhostd.vhost.features import ProtocolFeature, VirtioFeature, bit
from vhostd.vhost.protocol import Request

NEED_REPLY = p.VERSION | p.FLAG_NEED_REPLY
F_PROTOCOL = bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
F_RINGS = bit(VirtioFeature.VERSION_1) | F_PROTOCOL
PROTO = (bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
         | bit(ProtocolFeature.INFLIGHT_SHMFD) | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.MQ))
MEM = 1 << 20
UADDR = 0x7F0000000000


class GoodTraffic(BackgroundTraffic):
    """The project's front-end on good.0, writing and verifying in a thread until stopped."""

    name = "good.0"

    def __init__(self, socket_path: str) -> None:
        self.dev = VirtioBlk(socket_path, queue_size=64, memory_bytes=8 << 20).open()
        self.start()

    def step(self, n: int) -> None:
        data = bytes([n & 0xFF]) * 4096
        self.dev.write(8 * (n % 64), data)
        assert self.dev.read(8 * (n % 64), 4096) == data

    def release(self) -> None:
        self.dev.close()


class Target:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.pid = daemon.proc.pid
        self.path = str(daemon.socket_dir / "hostile.0")
        self.good = GoodTraffic(str(daemon.socket_dir / "good.0"))
        self.baseline: tuple[int, int, int] | None = None
        self.log_mark = 0

    def idle(self) -> bool:
        (info,) = self.daemon.rpc("vhost_get_controllers", name="hostile.0")
        return not info["sessions"]

    def counts(self) -> tuple[int, int, int]:
        """(open fds, memfd mappings, all mappings) of the daemon."""
        return fd_count(self.pid), guest_mappings(self.pid), len(maps(self.pid))

    def quiet_counts(self, samples: int = 2, timeout_s: float = 2.0) -> tuple[int, int, int]:
        """The counts once ``samples`` readings in a row, 20 ms apart and with no RPC between
        them, agree: the daemon closes the connection of the RPC just made (idle()) a moment
        after answering it, and a reading taken in that moment holds one fd too many."""
        deadline = time.monotonic() + timeout_s
        readings = [self.counts()]
        while len(readings) < samples or len(set(readings[-samples:])) > 1:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
            readings.append(self.counts())
        return readings[-1]

    def settle(self, timeout_s: float = 3.0) -> None:
        """Wait for the hostile session to end and the daemon's fds and guest mappings to return
        to the baseline."""
        deadline = time.monotonic() + timeout_s
        while not (self.idle() and self.quiet_counts() == self.baseline):
            if time.monotonic() > deadline:
                fds = sorted(os.readlink("/proc/%d/fd/%s" % (self.pid, f))
                             for f in os.listdir("/proc/%d/fd" % self.pid))
                raise AssertionError("daemon holds %r, baseline %r; idle=%s\nfds: %s\nmemfd maps: %s"
                                     % (self.counts(), self.baseline, self.idle(), fds,
                                        [m for m in maps(self.pid) if "memfd:" in m]))
            time.sleep(0.005)

    def check_serves(self) -> None:
        with VirtioBlk(self.path, queue_size=32, memory_bytes=4 << 20).open() as dev:
            dev.write(0, b"\xa5" * 4096)
            assert dev.read(0, 4096) == b"\xa5" * 4096

    def check_log(self) -> None:
        log = self.daemon.log()
        fresh, self.log_mark = log[self.log_mark:], len(log)
        assert "Traceback" not in fresh, fresh[-6000:]
        assert self.daemon.proc.poll() is None, "vhostd exited:\n" + log[-6000:]


@pytest.fixture(scope="module")
def target():
    d = Daemon()
    d.start()
    t = None
    try:
        d.rpc("bdev_malloc_create", name="Fz0", num_blocks=8192, block_size=512)
        d.rpc("bdev_malloc_create", name="Fz1", num_blocks=8192, block_size=512)
        # Packed rings offered: cases and generated features may ask for them.
        d.rpc("vhost_create_blk_controller", ctrlr="hostile.0", dev_name="Fz0", packed_ring=True)
        d.rpc("vhost_create_blk_controller", ctrlr="good.0", dev_name="Fz1")
        t = Target(d)
        t.check_serves()                # warm-up: lazily created state is part of the baseline
        t.good.check()
        deadline = time.monotonic() + 10
        while not t.idle():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t.baseline = t.quiet_counts(samples=5)
        yield t
    finally:
        if t is not None:
            t.good.close()
        d.stop()
        log = d.log()
        d.cleanup()
        assert "Traceback" not in log, log[-6000:]


def finish(target: Target, peer: HostilePeer) -> None:
    peer.drain(0.05)
    peer.close()
    target.settle()
    target.good.check()
    target.check_serves()
    target.settle()
    target.check_log()


# -- building blocks of the cases -----------------------------------------------------------
def negotiate(peer: HostilePeer, features: int = F_RINGS, protocol: int = PROTO) -> None:
    peer.request(Request.GET_FEATURES)
    assert peer.reply() is not None
    peer.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(protocol))
    peer.request(Request.SET_OWNER)
    peer.request(Request.SET_FEATURES, p.encode_u64(features), flags=NEED_REPLY)
    assert peer.ack() == 0


def table(*regions: tuple[int, int, int, int]) -> bytes:
    return p.MemoryTable(tuple(p.MemoryRegion(*r) for r in regions)).encode()


def single(gpa: int, size: int, uaddr: int, offset: int = 0) -> bytes:
    return p.SingleRegion(p.MemoryRegion(gpa, size, uaddr, offset)).encode()


def map_guest(peer: HostilePeer, size: int = MEM) -> int:
    """A valid one-region memory table; returns a memfd of the same memory (ours to close)."""
    fd = memfd(size)
    peer.request(Request.SET_MEM_TABLE, table((0, size, UADDR, 0)), [os.dup(fd)], flags=NEED_REPLY)
    assert peer.ack() == 0
    return fd


def ring(peer: HostilePeer, index: int = 0, size: int = 64, desc: int = 0x1000, avail: int = 0x2000,
         used: int = 0x3000, uaddr_base: int = UADDR, enable: bool = True, base: int = 0) -> int:
    """Configure and start ring ``index`` (SET_VRING_BASE base); returns its err eventfd (ours to
    close)."""
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    peer.request(Request.SET_VRING_ERR, p.encode_u64(index), [os.dup(err)])
    peer.request(Request.SET_VRING_CALL, p.encode_u64(index), [os.eventfd(0, os.EFD_CLOEXEC)])
    peer.request(Request.SET_VRING_NUM, p.VringState(index, size).encode())
    peer.request(Request.SET_VRING_BASE, p.VringState(index, base).encode())
    peer.request(Request.SET_VRING_ADDR, p.VringAddr(index, 0, uaddr_base + desc, uaddr_base + used,
                                                     uaddr_base + avail).encode())
    peer.request(Request.SET_VRING_KICK, p.encode_u64(index), [os.eventfd(0, os.EFD_CLOEXEC)])
    if enable:
        peer.request(Request.SET_VRING_ENABLE, p.VringState(index, 1).encode(), flags=NEED_REPLY)
        assert peer.ack() == 0
    return err


def get_base(peer: HostilePeer, index: int = 0):
    peer.request(Request.GET_VRING_BASE, p.VringState(index, 0).encode())
    msg = peer.reply()
    assert msg is not None and msg[0] == Request.GET_VRING_BASE, msg
    return p.VringState.decode(msg[2]).num


def closes(peer: HostilePeer) -> None:
    assert peer.drain(5.0), "back-end kept the connection open"


def fds_of(*kinds: str, size: int = MEM) -> list[int]:
    return [any_fd(k, size) for k in kinds]


# -- the cases: name → function(peer), each asserting what the back-end answered ---------------
def c_features_with_stray_fds(peer):
    peer.request(Request.GET_FEATURES, fds=fds_of("memfd", "eventfd"))
    msg = peer.reply()
    assert msg is not None and msg[0] == Request.GET_FEATURES or peer.closed_by_backend


def c_owner_and_vring_num_with_stray_fds(peer):
    negotiate(peer)
    peer.request(Request.SET_OWNER, fds=fds_of("eventfd", "eventfd", "pipe"))
    peer.request(Request.SET_VRING_NUM, p.VringState(0, 64).encode(), fds_of("memfd"), flags=NEED_REPLY)
    ack = peer.ack()
    assert ack is not None or peer.closed_by_backend


def c_unknown_request_with_fds_gets_a_nack(peer):
    negotiate(peer)
    for request in (99, 41, 0xFFFFFFFF, Request.SEND_RARP, Request.IOTLB_MSG, Request.SET_LOG_BASE):
        payload = b"\0" * (16 if request == Request.SET_LOG_BASE else 8)
        peer.request(request, payload, fds_of("memfd", "socket"), flags=NEED_REPLY)
        ack = peer.ack()
        if ack is None:
            assert peer.closed_by_backend
            return
        assert ack != 0


def c_more_fds_than_a_message_may_carry(peer):
    negotiate(peer)
    peer.request(Request.SET_VRING_CALL, p.encode_u64(0), fds_of(*["eventfd"] * 9))
    closes(peer)


def c_sixty_four_fds(peer):
    peer.request(Request.GET_FEATURES, fds=fds_of(*["devnull"] * 64))
    closes(peer)


def c_fd_attached_to_the_payload_not_the_header(peer):
    negotiate(peer)
    head = p.HEADER.pack(Request.SET_VRING_CALL, p.VERSION, 8)
    peer.send(head)
    time.sleep(0.02)
    peer.send(p.encode_u64(0), fds_of("eventfd"))
    peer.request(Request.GET_FEATURES)
    peer.drain(0.3)


def c_fds_then_disconnect_mid_payload(peer):
    negotiate(peer)
    data = p.encode(Request.SET_MEM_TABLE, table((0, MEM, UADDR, 0)), NEED_REPLY)
    peer.send(data[:20], fds_of("memfd", "memfd", "eventfd"))


def c_region_offset_beyond_fd(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, 4096, UADDR, MEM)), fds_of("memfd"), flags=NEED_REPLY)
    closes(peer)


def c_region_sizes_that_wrap(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, 1 << 63, UADDR, (1 << 63) + 4096)), fds_of("memfd"),
                 flags=NEED_REPLY)
    closes(peer)


def c_region_gpa_wraps(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table(((1 << 64) - 4096, MEM, UADDR, 0)), fds_of("memfd"),
                 flags=NEED_REPLY)
    closes(peer)


def c_region_uaddr_wraps(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, MEM, (1 << 64) - 4096, 0)), fds_of("memfd"),
                 flags=NEED_REPLY)
    closes(peer)


def c_region_far_larger_than_fd(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, 1 << 46, UADDR, 0)), fds_of("memfd"), flags=NEED_REPLY)
    closes(peer)


def c_empty_memfd(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, MEM, UADDR, 0)), [memfd(0)], flags=NEED_REPLY)
    closes(peer)


@pytest.fixture(params=[k for k in FD_KINDS if k != "memfd"])
def unmappable(request):
    return request.param


def c_regions_of_unmappable_fds(peer, kind="eventfd"):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, MEM, UADDR, 0), (MEM, MEM, UADDR + MEM, 0)),
                 [memfd(MEM), any_fd(kind)], flags=NEED_REPLY)
    closes(peer)


def c_nine_regions(peer):
    negotiate(peer)
    regions = tuple((i * MEM, MEM, UADDR + i * MEM, 0) for i in range(9))
    peer.request(Request.SET_MEM_TABLE, table(*regions), fds_of(*["memfd"] * 8), flags=NEED_REPLY)
    closes(peer)


def c_uaddr_overlap(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, MEM, UADDR, 0), (4 * MEM, MEM, UADDR + 4096, 0)),
                 fds_of("memfd", "memfd"), flags=NEED_REPLY)
    closes(peer)


def c_more_fds_than_regions(peer):
    negotiate(peer)
    peer.request(Request.SET_MEM_TABLE, table((0, MEM, UADDR, 0)), fds_of("memfd", "memfd"), flags=NEED_REPLY)
    closes(peer)


def c_eight_regions_then_replaced_twice(peer):
    negotiate(peer)
    regions = tuple((i * MEM, MEM, UADDR + i * MEM, 0) for i in range(8))
    for _ in range(3):
        peer.request(Request.SET_MEM_TABLE, table(*regions), fds_of(*["memfd"] * 8), flags=NEED_REPLY)
        assert peer.ack() == 0
    peer.request(Request.SET_MEM_TABLE, table((0, MEM, UADDR, 0)), fds_of("memfd"), flags=NEED_REPLY)
    assert peer.ack() == 0


def c_mem_slots_exhausted(peer):
    negotiate(peer)
    for i in range(34):
        peer.request(Request.ADD_MEM_REG, single(i * MEM, 65536, UADDR + i * MEM), fds_of("memfd"),
                     flags=NEED_REPLY)
        ack = peer.ack()
        assert ack == (0 if i < 32 else 1), (i, ack)


def c_mem_slot_overlapping_an_existing_one(peer):
    negotiate(peer)
    peer.request(Request.ADD_MEM_REG, single(0, MEM, UADDR), fds_of("memfd"), flags=NEED_REPLY)
    assert peer.ack() == 0
    peer.request(Request.ADD_MEM_REG, single(MEM // 2, MEM, UADDR + 8 * MEM), fds_of("memfd"), flags=NEED_REPLY)
    closes(peer)


def c_mem_slot_without_fd_and_removal_of_unknown(peer):
    negotiate(peer)
    peer.request(Request.REM_MEM_REG, single(0, MEM, UADDR), fds_of("memfd"), flags=NEED_REPLY)
    assert peer.ack() != 0
    peer.request(Request.ADD_MEM_REG, single(0, MEM, UADDR), flags=NEED_REPLY)
    closes(peer)


def c_mem_slot_of_unmappable_fd(peer):
    negotiate(peer)
    peer.request(Request.ADD_MEM_REG, single(0, MEM, UADDR), fds_of("pipe"), flags=NEED_REPLY)
    closes(peer)


def c_rings_outside_and_straddling_memory(peer):
    negotiate(peer)
    mem = map_guest(peer)
    errs = []
    for index, (desc, avail, used) in enumerate([
            (MEM + 4096, 0x2000, 0x3000),                  # descriptors past the end
            (0x1000, MEM - 64, 0x3000),                    # avail ring straddles the end
            (0x1000, 0x2000, MEM - 8),                     # used ring straddles the end
            ((1 << 64) - UADDR - 16, 0x2000, 0x3000)]):     # uaddr + length wraps
        errs.append(ring(peer, index % 2, desc=desc, avail=avail, used=used))
        assert get_base(peer, index % 2) == 0
    for err in errs:
        assert os.eventfd_read(err) >= 1, "the error eventfd was not signalled"
        os.close(err)
    os.close(mem)


def c_ring_sizes_bases_and_indices_out_of_range(peer):
    negotiate(peer)
    for request, payload in [
            (Request.SET_VRING_NUM, p.VringState(0, 0).encode()),
            (Request.SET_VRING_NUM, p.VringState(0, 3).encode()),
            (Request.SET_VRING_NUM, p.VringState(0, 32768).encode()),
            (Request.SET_VRING_NUM, p.VringState(255, 64).encode()),
            (Request.SET_VRING_NUM, p.VringState(0xFFFFFFFF, 64).encode()),
            (Request.SET_VRING_BASE, p.VringState(0, 0x10000).encode()),
            (Request.SET_VRING_ADDR, p.VringAddr(200, 0, 1, 2, 3).encode()),
            (Request.SET_VRING_ENABLE, p.VringState(255, 1).encode())]:
        peer.request(request, payload, flags=NEED_REPLY)
        assert peer.ack() != 0, (request, payload)
    peer.request(Request.SET_VRING_KICK, p.encode_u64(200), fds_of("eventfd"), flags=NEED_REPLY)
    assert peer.ack() != 0


def c_ring_started_before_memory_then_memory_pulled(peer):
    negotiate(peer)
    err = ring(peer)                                 # kicked and enabled, but no memory yet
    mem = map_guest(peer)                             # now it starts
    peer.request(Request.SET_MEM_TABLE, table((0, 8192, UADDR, 0)), fds_of("memfd"), flags=NEED_REPLY)
    assert peer.ack() == 0                            # rings now outside: restart fails
    assert get_base(peer) == 0
    assert os.eventfd_read(err) >= 1
    os.close(err)
    os.close(mem)


def c_running_ring_loses_its_region(peer):
    negotiate(peer)
    peer.request(Request.ADD_MEM_REG, single(0, MEM, UADDR), fds_of("memfd"), flags=NEED_REPLY)
    assert peer.ack() == 0
    err = ring(peer)
    peer.request(Request.REM_MEM_REG, single(0, MEM, UADDR), flags=NEED_REPLY)
    assert peer.ack() == 0
    peer.request(Request.SET_VRING_ADDR, p.VringAddr(0, 0, 1, 2, 3).encode(), flags=NEED_REPLY)
    assert peer.ack() is not None
    os.close(err)


def c_reset_owner_and_device_while_running(peer):
    negotiate(peer)
    mem = map_guest(peer)
    err = ring(peer)
    peer.request(Request.RESET_OWNER, flags=NEED_REPLY)
    assert peer.ack() == 0
    peer.request(Request.SET_FEATURES, p.encode_u64(F_RINGS), flags=NEED_REPLY)
    assert peer.ack() == 0
    peer.request(Request.RESET_DEVICE, flags=NEED_REPLY)
    assert peer.ack() is not None
    os.close(err)
    os.close(mem)


def c_features_changed_under_a_running_ring(peer):
    negotiate(peer)
    mem = map_guest(peer)
    err = ring(peer)
    for features in (F_RINGS | bit(VirtioFeature.RING_EVENT_IDX), 1 << 63, F_RINGS, 0):
        peer.request(Request.SET_FEATURES, p.encode_u64(features), flags=NEED_REPLY)
        assert peer.ack() is not None
    os.close(err)
    os.close(mem)


def c_disconnect_with_requests_in_flight(peer):
    negotiate(peer)
    mem = map_guest(peer)
    guest = mmap.mmap(mem, MEM)
    # 32 read requests of 64 KiB each (header, data, status), published at once.
    for i in range(32):
        d = 0x1000 + 16 * 3 * i
        hdr, data, status = 0x10000 + 16 * i, 0x20000 + 0x10000 * (i % 12), 0x8000 + i
        struct.pack_into("<QIHH", guest, d, hdr, 16, 1, 3 * i + 1)
        struct.pack_into("<QIHH", guest, d + 16, data, 0x10000, 3, 3 * i + 2)
        struct.pack_into("<QIHH", guest, d + 32, status, 1, 2, 0)
        struct.pack_into("<IIQ", guest, hdr, 0, 0, i * 128)
        struct.pack_into("<H", guest, 0x6000 + 4 + 2 * i, 3 * i)
    struct.pack_into("<H", guest, 0x6000 + 2, 32)
    guest.close()
    err = ring(peer, size=128, desc=0x1000, avail=0x6000, used=0x7000)
    os.close(err)
    os.close(mem)


F_PACKED = F_RINGS | bit(VirtioFeature.RING_PACKED)


def c_packed_ring_bases_out_of_range(peer):
    """A packed base names a slot past the ring (avail or used part): the queue does not start
    and says so on its error eventfd; a good base then starts it and comes back from GET_VRING_BASE."""
    negotiate(peer, F_PACKED)
    mem = map_guest(peer)
    for base in (0x8000 | 64, 0x80008000 | 0x7FFF, (0x8000 | 100) << 16 | 0x8000):
        err = ring(peer, size=64, base=base)
        assert get_base(peer) == base
        assert os.eventfd_read(err) >= 1, "the error eventfd was not signalled for base %#x" % base
        os.close(err)
    err = ring(peer, size=64, base=0x80058005)
    assert get_base(peer) == 0x80058005
    os.close(err)
    os.close(mem)


def c_packed_rings_over_random_memory(peer):
    """Packed rings (with EVENT_IDX, several sizes and ring placements) over random guest memory,
    kicked, then stopped: whatever the descriptors say, GET_VRING_BASE is answered."""
    negotiate(peer, F_PACKED | bit(VirtioFeature.RING_EVENT_IDX))
    mem = map_guest(peer)
    guest = mmap.mmap(mem, MEM)
    rng = random.Random(34)
    guest[:] = rng.randbytes(MEM)
    guest.close()
    for size, desc, avail, used in ((64, 0x1000, 0x2000, 0x3000), (1024, 0x4000, MEM - 8, MEM - 4),
                                    (16, 0x10000, 0x10000, 0x10000)):
        err = ring(peer, size=size, desc=desc, avail=avail, used=used, base=0x80008000)
        peer.request(Request.SET_VRING_KICK, p.encode_u64(0), [os.eventfd(1, os.EFD_CLOEXEC)])
        get_base(peer)
        os.close(err)
    os.close(mem)


def c_inflight_sizes_out_of_range(peer):
    negotiate(peer)
    for info in (p.InflightInfo(0, 0, 0, 64), p.InflightInfo(0, 0, 1, 0), p.InflightInfo(0, 0, 1, 65535)):
        peer.request(Request.GET_INFLIGHT_FD, info.encode())
        if peer.drain(0.5) or peer.closed_by_backend:
            return
        raise AssertionError("GET_INFLIGHT_FD %r was accepted" % (info,))


def c_inflight_region_larger_than_its_fd(peer):
    negotiate(peer)
    peer.request(Request.SET_INFLIGHT_FD, p.InflightInfo(1 << 20, 0, 1, 64).encode(), [memfd(4096)],
                 flags=NEED_REPLY)
    closes(peer)


def c_inflight_offset_wraps(peer):
    negotiate(peer)
    peer.request(Request.SET_INFLIGHT_FD, p.InflightInfo(4096, (1 << 64) - 4096, 1, 64).encode(),
                 [memfd(8192)], flags=NEED_REPLY)
    closes(peer)


def c_inflight_of_unmappable_fd(peer):
    negotiate(peer)
    peer.request(Request.SET_INFLIGHT_FD, p.InflightInfo(4096, 0, 1, 64).encode(), fds_of("eventfd"),
                 flags=NEED_REPLY)
    closes(peer)


def c_inflight_replaced_again_and_again(peer):
    negotiate(peer)
    for _ in range(3):
        peer.request(Request.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 2, 128).encode())
        msg = peer.reply()
        assert msg is not None and msg[0] == Request.GET_INFLIGHT_FD and len(msg[3]) == 1
        for fd in msg[3]:
            os.close(fd)
        # vhostd seals an inflight fd it is given against resizing, so it must be sealable; 16 KiB
        # holds one queue of 64 in either layout (packed rings keep a copy of each chain).
        peer.request(Request.SET_INFLIGHT_FD, p.InflightInfo(16384, 0, 1, 64).encode(),
                     [memfd(16384, sealable=True)], flags=NEED_REPLY)
        assert peer.ack() == 0


def c_config_windows_out_of_range(peer):
    negotiate(peer)
    for offset, size in ((0xFFFFFFF0, 256), (1 << 31, 16), (0, 256), (300, 8)):
        peer.request(Request.GET_CONFIG, p.ConfigSpace(offset, size, 0, bytes(size)).encode())
        msg = peer.reply()
        assert msg is not None and msg[0] == Request.GET_CONFIG and len(msg[2]) == 12 + size
    peer.request(Request.SET_CONFIG, p.ConfigSpace(0xFFFFFFFF, 1, 0, b"\x01").encode(), flags=NEED_REPLY)
    assert peer.ack() != 0


def c_wrong_state_requests(peer):
    # Nothing negotiated: ring and memory requests straight away.
    peer.request(Request.GET_VRING_BASE, p.VringState(0, 0).encode())
    msg = peer.reply()
    assert msg is not None and msg[0] == Request.GET_VRING_BASE
    peer.request(Request.SET_VRING_KICK, p.encode_u64(0), fds_of("eventfd"))
    peer.request(Request.SET_VRING_ENABLE, p.VringState(0, 1).encode())
    peer.request(Request.ADD_MEM_REG, single(0, MEM, UADDR), fds_of("memfd"))   # not negotiated
    peer.request(Request.SET_MEM_TABLE, table((0, MEM, UADDR, 0)), fds_of("memfd"))
    peer.request(Request.GET_VRING_BASE, p.VringState(0, 0).encode())
    msg = peer.reply()
    assert msg is not None and msg[0] == Request.GET_VRING_BASE


def c_guest_memory_truncated_under_a_running_ring(peer):
    """The front-end owns the memfd: shrinking it would make the next access SIGBUS (which once
    ended the daemon).  Now the session closes and every other controller carries on."""
    negotiate(peer)
    mem = map_guest(peer)
    err = ring(peer)
    os.ftruncate(mem, 0)
    peer.request(Request.SET_VRING_ENABLE, p.VringState(0, 0).encode())
    peer.request(Request.SET_VRING_ENABLE, p.VringState(0, 1).encode())   # restart reads the rings
    closes(peer)
    os.close(err)
    os.close(mem)


def c_guest_memory_truncated_then_only_kicked(peer):
    """No message after the truncation: the survived SIGBUS itself wakes the control plane
    (the handler's eventfd), which closes the session at once."""
    negotiate(peer)
    mem = map_guest(peer)
    err = ring(peer)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    peer.request(Request.SET_VRING_KICK, p.encode_u64(0), [os.dup(kick)], flags=NEED_REPLY)
    assert peer.ack() == 0
    os.ftruncate(mem, 0)
    os.eventfd_write(kick, 1)               # the reactor reads the avail ring: a lost page
    closes(peer)
    for fd in (kick, err, mem):
        os.close(fd)


def c_inflight_region_cannot_be_truncated_under_the_device(peer):
    negotiate(peer)
    peer.request(Request.GET_INFLIGHT_FD, p.InflightInfo(0, 0, 1, 64).encode())
    msg = peer.reply()
    assert msg is not None and len(msg[3]) == 1
    inflight = msg[3][0]
    peer.request(Request.SET_INFLIGHT_FD, msg[2], [os.dup(inflight)], flags=NEED_REPLY)
    assert peer.ack() == 0
    mem = map_guest(peer)
    err = ring(peer)
    with pytest.raises(PermissionError):
        os.ftruncate(inflight, 0)           # the region vhostd handed out is sealed against it
    peer.request(Request.SET_VRING_ENABLE, p.VringState(0, 0).encode())
    peer.request(Request.SET_VRING_ENABLE, p.VringState(0, 1).encode())
    peer.request(Request.GET_FEATURES)
    msg = peer.reply()
    assert msg is not None and msg[0] == Request.GET_FEATURES        # still served
    for fd in (err, mem, inflight):
        os.close(fd)


def c_header_with_fds_then_eof(peer):
    peer.send(p.HEADER.pack(Request.SET_MEM_TABLE, p.VERSION, 40), fds_of("memfd", "memfd"))


CASES = {name[2:]: fn for name, fn in globals().items() if name.startswith("c_") and callable(fn)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_front_end_case(target, case):
    peer = HostilePeer(target.path)
    try:
        CASES[case](peer)
    finally:
        finish(target, peer)


def test_unmappable_fd_kinds_as_memory(target, unmappable):
    peer = HostilePeer(target.path)
    try:
        c_regions_of_unmappable_fds(peer, unmappable)
    finally:
        finish(target, peer)


# -- generated message sequences ----------------------------------------------------------------
ADDRESSES = st.one_of(
    st.sampled_from([0, 1, 0x1000, MEM - 16, MEM - 2, MEM, MEM + 4096, (1 << 64) - 1, (1 << 63)]),
    st.integers(0, MEM + 0x2000),
    st.integers(0, (1 << 64) - 1))
U32S = st.one_of(st.sampled_from([0, 1, 2, 63, 64, 128, 255, 256, 1024, 0x8000, 0xFFFF, 0x10000,
                                  0xFFFFFFFF]), st.integers(0, (1 << 32) - 1))
U64S = st.one_of(U32S, st.integers(0, (1 << 64) - 1),
                 st.sampled_from([F_RINGS, F_RINGS | bit(VirtioFeature.RING_EVENT_IDX), PROTO, 1 << 63,
                                  F_RINGS | bit(VirtioFeature.RING_PACKED)]))


def _ua(offset: int) -> int:
    """A front-end virtual address at offset from the guest's mapping (wrapping at 2**64)."""
    return (UADDR + offset) & ((1 << 64) - 1)


def _payloads():
    state = st.builds(lambda i, n: p.VringState(i, n).encode(), st.integers(0, 3) | U32S, U32S)
    vfile = st.builds(p.encode_u64, st.integers(0, 3) | st.sampled_from([0x100, 0x101, 0x1FF, 0x200]) | U64S)
    region = st.builds(lambda g, s, u, o: (g, s, _ua(u) if u < MEM * 4 else u, o),
                       ADDRESSES, st.sampled_from([4096, MEM, MEM // 2]) | ADDRESSES, ADDRESSES,
                       st.sampled_from([0, 4096]) | ADDRESSES)
    return {
        Request.SET_FEATURES: st.builds(p.encode_u64, U64S),
        Request.SET_PROTOCOL_FEATURES: st.builds(p.encode_u64, U64S),
        Request.SET_MEM_TABLE: st.lists(region, max_size=9).map(lambda rs: table(*rs)),
        Request.ADD_MEM_REG: st.builds(lambda r: single(*r), region),
        Request.REM_MEM_REG: st.builds(lambda r: single(*r), region),
        Request.SET_VRING_NUM: state, Request.SET_VRING_BASE: state, Request.GET_VRING_BASE: state,
        Request.SET_VRING_ENABLE: state, Request.SET_VRING_ENDIAN: state,
        Request.SET_VRING_ADDR: st.builds(lambda i, f, d, u, a: p.VringAddr(i, f, _ua(d), _ua(u), _ua(a)).encode(),
                                          st.integers(0, 3) | U32S, U32S, ADDRESSES, ADDRESSES, ADDRESSES),
        Request.SET_VRING_KICK: vfile, Request.SET_VRING_CALL: vfile, Request.SET_VRING_ERR: vfile,
        Request.GET_CONFIG: st.builds(lambda o, s: p.ConfigSpace(o, s, 0, bytes(s)).encode(),
                                      U32S, st.integers(0, 256)),
        Request.SET_CONFIG: st.builds(lambda o, d, f: p.ConfigSpace(o, len(d), f, d).encode(),
                                      U32S, st.binary(max_size=256), st.integers(0, 3)),
        Request.GET_INFLIGHT_FD: st.builds(lambda n, q: p.InflightInfo(0, 0, n, q).encode(),
                                           st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
        Request.SET_INFLIGHT_FD: st.builds(lambda s, o, n, q: p.InflightInfo(s, o, n, q).encode(),
                                           ADDRESSES, ADDRESSES, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
        Request.SET_LOG_BASE: st.binary(min_size=16, max_size=16),
        Request.SET_STATUS: st.builds(p.encode_u64, U64S),
    }


PAYLOADS = _payloads()
WELL_SIZED = st.sampled_from(sorted(PAYLOADS)).flatmap(lambda r: st.tuples(st.just(int(r)), PAYLOADS[r]))
MESSAGE = st.one_of(
    # Well-sized payloads with adversarial values (twice the weight of the rest).
    WELL_SIZED, WELL_SIZED,
    # Requests without payload.
    st.tuples(st.sampled_from([int(r) for r in Request if r not in PAYLOADS]), st.just(b"")),
    # Anything at all.
    st.tuples(st.integers(0, 50) | st.integers(0, (1 << 32) - 1), st.binary(max_size=64)),
)
# Mostly valid flags and few fds, so that sequences get past the first message more often.
SEQUENCE = st.lists(st.tuples(MESSAGE,
                              st.sampled_from([p.VERSION, NEED_REPLY] * 3 + [0, 0x5, 0xD, 0xF]),
                              st.just([]) | st.lists(st.sampled_from(FD_KINDS), max_size=3),
                              st.booleans()),                # split the message in two sends
                    min_size=1, max_size=12)


@settings(max_examples=examples(200, 3000), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(prefix=st.sampled_from(["none", "negotiated", "mapped", "running"]), messages=SEQUENCE,
       garbage_seed=st.integers(0, (1 << 32) - 1))
def test_generated_message_sequences(target, prefix, messages, garbage_seed):
    """From a fresh, a negotiated, a mapped or a running session (rings over garbage: random
    descriptors and avail entries), a sequence of well-sized messages with adversarial values,
    fds of every kind, messages split across sends, and anything at all."""
    peer = HostilePeer(target.path)
    mem = None
    try:
        if prefix != "none":
            negotiate(peer)
        if prefix in ("mapped", "running"):
            mem = map_guest(peer)
        if prefix == "running":
            with mmap.mmap(mem, MEM) as guest:
                # descriptors, avail ring, used ring
                guest[0x1000:0x5000] = random.Random(garbage_seed).randbytes(0x4000)
            os.close(ring(peer, desc=0x1000, avail=0x2000, used=0x3000))
        for (request, payload), flags, kinds, split in messages:
            data = p.HEADER.pack(request, flags, len(payload)) + payload
            fds = [any_fd(k, MEM) for k in kinds]
            if split and len(data) > 1:
                ok = peer.send(data[:len(data) // 2], fds) and peer.send(data[len(data) // 2:])
            else:
                ok = peer.send(data, fds)
            if not ok:
                break
        event("closed by the back-end" if peer.drain(0.02) else "still open")
    finally:
        if mem is not None:
            os.close(mem)
        peer.close()
        target.settle()
        target.good.check()
        target.check_log()


def test_resources_and_service_after_everything(target):
    target.settle()
    target.check_serves()
    target.settle()
    target.good.check()
    target.check_log()
