"""virtio-blk requests through the C data plane: a reactor polling a ring built by a test driver."""

import os
import struct
import time

import pytest

from vhostd import _dataplane as dp
from tests.helpers.ringdriver import DISK_KINDS, make_disk, GuestRam, PackedRing, SplitRing
from tests.helpers.waiting import wait_for

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2


class Rig:
    """One blk queue on one reactor, with a driver to post requests."""

    def __init__(self, disk, readonly=False, event_idx=False, idle_sleep_us=200.0, packed=False):
        self.ram = GuestRam()
        self.ring = (PackedRing if packed else SplitRing)(self.ram, 256, event_idx)
        self.memory = self.ram.memory()
        self.disk = disk
        self.device = dp.BlkDevice(disk, readonly, b"vhostd-test-serial", 65536, 65536)
        self.queue = self.ring.queue(0, self.memory)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.queue.set_fds(self.kick, self.call, self.err)
        self.device.attach(self.queue)
        self.reactor = dp.Reactor(0, idle_sleep_us)
        self.reactor.start()
        msg = self.reactor.post_add_queue(self.queue)
        wait_for(lambda: msg.done)

    def request(self, type_, sector=0, data_out=b"", data_in_len=0, extra=()):
        """Post one request and wait for it: (status, used_len, data_in)."""
        hdr = self.ram.alloc(16)
        self.ram.write(hdr, struct.pack("<IIQ", type_, 0, sector))
        segments = [(hdr, 16, False)]
        if data_out:
            buf = self.ram.alloc(len(data_out), 512)
            self.ram.write(buf, data_out)
            segments.append((buf, len(data_out), False))
        din = None
        if data_in_len:
            din = self.ram.alloc(data_in_len, 512)
            segments.append((din, data_in_len, True))
        status = self.ram.alloc(1)
        self.ram.write(status, b"\xff")
        segments.append((status, 1, True))
        head = self.ring.add_chain(list(extra) or segments)
        os.eventfd_write(self.kick, 1)
        used = self.wait_used()
        assert used[0][0] == head
        return (self.ram.read(status, 1)[0], used[0][1],
                self.ram.read(din, data_in_len) if din is not None else b"")

    def wait_used(self, count=1):
        got = []
        def more():
            got.extend(self.ring.pop_used())
            return len(got) >= count
        wait_for(more)
        return got

    def close(self):
        msg = self.reactor.post_remove_queue(self.queue)
        wait_for(lambda: msg.done)
        self.device.detach(self.queue)
        stop = self.reactor.post_stop()
        self.reactor.join(5)
        for fd in (self.kick, self.call, self.err):
            os.close(fd)
        self.memory.close()


@pytest.fixture(params=DISK_KINDS)
def rig(request, tmp_path):
    """A Rig maker; the default disk (2 MiB, 512-byte blocks) is once in memory (completes inside
    the submit) and once a file (completes later, from the io_uring ring)."""
    rigs = []

    def make(disk=None, **kw):
        r = Rig(disk or make_disk(request.param, tmp_path, 512, 4096), **kw)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_write_then_read_returns_the_data(rig, event_idx):
    r = rig(event_idx=event_idx)
    data = os.urandom(4096)
    assert r.request(T_OUT, 8, data_out=data)[:2] == (S_OK, 1)
    status, used_len, got = r.request(T_IN, 8, data_in_len=4096)
    assert (status, used_len, got) == (S_OK, 4097, data)


def test_flush_get_id_discard_write_zeroes(rig):
    r = rig()
    r.request(T_OUT, 0, data_out=b"\x77" * 2048)
    assert r.request(T_FLUSH)[0] == S_OK
    status, used_len, serial = r.request(T_GET_ID, data_in_len=20)
    assert status == S_OK and serial == b"vhostd-test-serial\0\0" and used_len == 21
    seg = r.ram.alloc(16)
    r.ram.write(seg, struct.pack("<QII", 1, 2, 0))
    hdr = r.ram.alloc(16)
    r.ram.write(hdr, struct.pack("<IIQ", T_DISCARD, 0, 0))
    st = r.ram.alloc(1)
    r.ring.add_chain([(hdr, 16, False), (seg, 16, False), (st, 1, True)])
    os.eventfd_write(r.kick, 1)
    r.wait_used()
    assert r.ram.read(st, 1) == bytes([S_OK])
    got = r.request(T_IN, 0, data_in_len=2048)[2]
    assert got == b"\x77" * 512 + bytes(1024) + b"\x77" * 512


def test_reads_past_the_end_fail_with_ioerr(rig):
    r = rig(dp.Disk.malloc(512, 16))
    assert r.request(T_IN, 16, data_in_len=512)[0] == S_IOERR
    assert r.request(T_IN, 15, data_in_len=512)[0] == S_OK


def test_readonly_device_refuses_writes(rig):
    r = rig(readonly=True)
    assert r.request(T_OUT, 0, data_out=b"\1" * 512)[0] == S_IOERR
    assert r.request(T_IN, 0, data_in_len=512)[2] == bytes(512)


def test_unknown_request_type_is_unsupported(rig):
    r = rig()
    assert r.request(99)[0] == S_UNSUPP


def test_descriptor_outside_guest_memory_gets_ioerr(rig):
    r = rig()
    hdr = r.ram.alloc(16)
    r.ram.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    st = r.ram.alloc(1)
    status, _, _ = r.request(T_IN, extra=[(hdr, 16, False), (1 << 40, 512, True), (st, 1, True)])
    assert r.ram.read(st, 1)[0] == S_IOERR


def test_indirect_chain_works(rig):
    r = rig()
    hdr = r.ram.alloc(16)
    r.ram.write(hdr, struct.pack("<IIQ", T_OUT, 0, 4))
    buf = r.ram.alloc(1024, 512)
    r.ram.write(buf, b"\x42" * 1024)
    st = r.ram.alloc(1)
    r.ring.add_indirect([(hdr, 16, False), (buf, 1024, False), (st, 1, True)])
    os.eventfd_write(r.kick, 1)
    r.wait_used()
    assert r.ram.read(st, 1)[0] == S_OK
    assert r.request(T_IN, 4, data_in_len=1024)[2] == b"\x42" * 1024


def test_looping_chain_breaks_the_ring_and_signals_err(rig):
    r = rig()
    a, b = r.ring.free.pop(0), r.ring.free.pop(0)
    r.ring.write_desc(a, 0x2000, 16, 1, b)
    r.ring.write_desc(b, 0x3000, 16, 1, a)
    r.ring.publish(a)
    os.eventfd_write(r.kick, 1)
    wait_for(lambda: r.queue.broken)
    assert os.eventfd_read(r.err) >= 1


def test_avail_index_jump_breaks_the_ring(rig):
    r = rig()
    r.ring.set_avail_idx(1000)
    os.eventfd_write(r.kick, 1)
    wait_for(lambda: r.queue.broken)


def test_many_requests_in_flight_complete(rig):
    r = rig()
    heads = []
    for i in range(32):
        hdr = r.ram.alloc(16)
        r.ram.write(hdr, struct.pack("<IIQ", T_OUT, 0, i))
        buf = r.ram.alloc(512, 512)
        r.ram.write(buf, bytes([i]) * 512)
        st = r.ram.alloc(1)
        heads.append(r.ring.add_chain([(hdr, 16, False), (buf, 512, False), (st, 1, True)]))
    os.eventfd_write(r.kick, 1)
    used = r.wait_used(32)
    assert sorted(h for h, _ in used) == sorted(heads)
    assert r.request(T_IN, 31, data_in_len=512)[2] == bytes([31]) * 512
    stats = r.queue.stats()
    assert stats["write_ops"] == 32 and stats["read_ops"] == 1
    assert r.disk.iostat()["num_write_ops"] == 32


def test_file_disk_through_io_uring(rig, tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    r = rig(dp.Disk.file(path))
    data = os.urandom(8192)
    assert r.request(T_OUT, 16, data_out=data)[0] == S_OK
    assert r.request(T_FLUSH)[0] == S_OK
    assert path.read_bytes()[8192:16384] == data
    assert r.request(T_IN, 16, data_in_len=8192)[2] == data


def test_reactor_sleeps_when_idle_and_wakes_on_kick(rig):
    r = rig(idle_sleep_us=100)
    wait_for(lambda: r.reactor.stats()["sleeps"] >= 1)
    before = r.reactor.stats()
    assert r.request(T_IN, 0, data_in_len=512)[0] == S_OK
    assert r.reactor.stats()["wakeups"] > before["wakeups"]
