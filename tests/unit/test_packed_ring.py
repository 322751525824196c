"""Packed virtqueues (VIRTIO_F_RING_PACKED) in the C data plane: a reactor serving virtio-blk on a
packed ring that a pure-Python driver (tests/helpers/ringdriver.PackedRing) builds, including
hostile rings."""

import os
import struct

import pytest

from vhostd import _dataplane as dp
from tests.helpers.ringdriver import (DISK_KINDS, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, F_INDIRECT,
                                      F_NEXT, F_WRITE, make_disk)
from tests.helpers.waiting import wait_for
from tests.unit.test_blk_dataplane import Rig, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT

T_UNKNOWN = 0x77


@pytest.fixture(params=DISK_KINDS)
def rig(request, tmp_path):
    """A Rig maker on a packed ring of 256 slots; the disk in memory or in a file (io_uring)."""
    rigs = []

    def make(disk=None, **kw):
        r = Rig(disk or make_disk(request.param, tmp_path, 512, 4096), packed=True, **kw)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def _blk_chain(r, type_, sector, data_out=b"", data_in_len=0, split_data=1):
    """Segments of one blk request (data split in split_data descriptors) and its status gpa."""
    hdr = r.ram.alloc(16)
    r.ram.write(hdr, struct.pack("<IIQ", type_, 0, sector))
    segments = [(hdr, 16, False)]
    payload = data_out or bytes(data_in_len)
    if payload:
        buf = r.ram.alloc(len(payload), 512)
        r.ram.write(buf, data_out)
        piece = len(payload) // split_data
        for k in range(split_data):
            segments.append((buf + k * piece, piece, not data_out))
    status = r.ram.alloc(1)
    r.ram.write(status, b"\xff")
    segments.append((status, 1, True))
    return segments, status, (buf if payload else None)


@pytest.mark.parametrize("event_idx", [False, True])
def test_write_then_read_returns_the_data(rig, event_idx):
    r = rig(event_idx=event_idx)
    assert r.queue.packed
    data = os.urandom(4096)
    assert r.request(T_OUT, 8, data_out=data)[:2] == (S_OK, 1)
    assert r.request(T_IN, 8, data_in_len=4096) == (S_OK, 4097, data)


@pytest.mark.parametrize("event_idx", [False, True])
def test_chains_of_different_lengths_wrap_the_ring_many_times(rig, event_idx):
    """Chains of 3 to 6 descriptors, 40 in flight at a time, 2000 slots in all (the 256-slot
    ring wraps 7 times): every request completes with its data and the used position keeps up."""
    r = rig(event_idx=event_idx)
    written = {}
    sector = 0
    for batch in range(14):
        pending = {}
        for k in range(40):
            split = 1 + (batch + k) % 4
            data = os.urandom(512 * split)
            segments, status, _ = _blk_chain(r, T_OUT, sector, data_out=data, split_data=split)
            pending[r.ring.add_chain(segments)] = status
            written[sector] = data
            sector += split
        os.eventfd_write(r.kick, 1)
        used = r.wait_used(len(pending))
        assert sorted(i for i, _ in used) == sorted(pending)
        assert all(r.ram.read(st, 1)[0] == S_OK for st in pending.values())
    assert r.ring.used_count == r.ring.avail_count and r.ring.avail_count > 7 * 256
    for start in (0, 512, sector - len(written[max(written)]) // 512):
        data = written[start]
        assert r.request(T_IN, start, data_in_len=len(data))[2] == data


def test_completions_out_of_order_advance_the_used_position_by_chain_length(rig, tmp_path):
    """A file read (4 descriptors, completes from the io_uring ring) posted before an unsupported
    request (2 descriptors, completes at once): the later request is used first, each used
    descriptor carries its own buffer id, and the driver's slots line up after both."""
    r = rig(disk=make_disk("file", tmp_path, 512, 4096))
    read, st_read, _ = _blk_chain(r, T_IN, 0, data_in_len=1536, split_data=2)
    hdr = r.ram.alloc(16)
    r.ram.write(hdr, struct.pack("<IIQ", T_UNKNOWN, 0, 0))
    st_unknown = r.ram.alloc(1)
    first = r.ring.add_chain(read, hold=True)
    second = r.ring.add_chain([(hdr, 16, False), (st_unknown, 1, True)], hold=True)
    r.ring.publish_held()       # one reactor pass pops both
    os.eventfd_write(r.kick, 1)
    used = r.wait_used(2)
    assert [i for i, _ in used] == [second, first]
    assert dict(used) == {first: 1537, second: 1}
    assert (r.ram.read(st_read, 1)[0], r.ram.read(st_unknown, 1)[0]) == (S_OK, S_UNSUPP)
    assert r.ring.used_count == r.ring.avail_count == 6
    assert r.request(T_IN, 0, data_in_len=512)[0] == S_OK


def test_indirect_table_works(rig):
    r = rig()
    segments, status, _ = _blk_chain(r, T_OUT, 4, data_out=b"\x42" * 1024, split_data=2)
    r.ring.add_indirect(segments)
    os.eventfd_write(r.kick, 1)
    r.wait_used()
    assert r.ram.read(status, 1)[0] == S_OK
    assert r.request(T_IN, 4, data_in_len=1024)[2] == b"\x42" * 1024
    assert r.ring.used_count == r.ring.avail_count == 1 + 3    # the table takes one slot


def test_buffer_outside_guest_memory_gets_ioerr(rig):
    r = rig()
    segments, status, _ = _blk_chain(r, T_IN, 0, data_in_len=512)
    segments[1] = (1 << 40, 512, True)
    r.ring.add_chain(segments)
    os.eventfd_write(r.kick, 1)
    assert r.wait_used()[0][1] in (0, 1)
    assert r.ram.read(status, 1)[0] == S_IOERR
    assert not r.queue.broken
    assert r.request(T_IN, 0, data_in_len=512)[0] == S_OK


@pytest.mark.parametrize("table", ["outside memory", "odd length", "nested", "with next"])
def test_bad_indirect_table_fails_the_request_not_the_queue(rig, table):
    r = rig()
    segments, status, _ = _blk_chain(r, T_IN, 0, data_in_len=512)
    good = r.ram.alloc(16 * len(segments), 16)
    for k, (gpa, length, writable) in enumerate(segments):
        r.ring.write_desc(k, gpa, length, 0, F_WRITE if writable else 0, table=good)
    if table == "outside memory":
        chain = [(1 << 40, 16 * len(segments), F_INDIRECT)]
    elif table == "odd length":
        chain = [(good, 16 * len(segments) - 3, F_INDIRECT)]
    elif table == "nested":
        r.ring.write_desc(1, good, 48, 0, F_INDIRECT, table=good)
        chain = [(good, 16 * len(segments), F_INDIRECT)]
    else:
        chain = [(good, 16 * len(segments), F_INDIRECT | F_NEXT), (status, 1, F_WRITE)]
    r.ring.add_raw(chain)
    os.eventfd_write(r.kick, 1)
    r.wait_used()
    assert not r.queue.broken
    assert r.queue.stats()["bad_chains"] == 1
    assert r.request(T_IN, 0, data_in_len=512)[0] == S_OK


def test_chain_longer_than_the_ring_breaks_the_queue_and_signals_err(rig):
    r = rig()
    r.ring.write_desc(0, 0x2000, 16, 0, F_NEXT)          # not available until the end
    for slot in range(1, r.ring.size):
        r.ring.write_desc(slot, 0x2000, 16, 0, F_NEXT | r.ring.avail_flags(slot))
    r.ring.publish_head(0, F_NEXT | r.ring.avail_flags(0))
    os.eventfd_write(r.kick, 1)
    wait_for(lambda: r.queue.broken)
    assert os.eventfd_read(r.err) >= 1


def test_buffer_id_out_of_range_breaks_the_queue(rig):
    r = rig()
    segments, _, _ = _blk_chain(r, T_IN, 0, data_in_len=512)
    r.ring.add_raw([(a, n, (F_WRITE if w else 0) | (F_NEXT if k < 2 else 0))
                    for k, (a, n, w) in enumerate(segments)], buffer_id=r.ring.size)
    os.eventfd_write(r.kick, 1)
    wait_for(lambda: r.queue.broken)


def test_buffer_id_already_in_flight_breaks_the_queue(rig, tmp_path):
    """Two chains with one buffer id in the same batch: the first is still being read from the
    file when the second is popped."""
    r = rig(disk=make_disk("file", tmp_path, 512, 4096))
    for _ in range(2):
        segments, _, _ = _blk_chain(r, T_IN, 0, data_in_len=512)
        r.ring.add_raw([(a, n, (F_WRITE if w else 0) | (F_NEXT if k < 2 else 0))
                        for k, (a, n, w) in enumerate(segments)], buffer_id=7, hold=True)
    r.ring.publish_held()
    os.eventfd_write(r.kick, 1)
    wait_for(lambda: r.queue.broken)


def test_descriptor_not_yet_available_is_not_taken(rig):
    """A descriptor whose AVAIL/USED bits are those of the previous lap is not a request."""
    r = rig()
    segments, status, _ = _blk_chain(r, T_IN, 0, data_in_len=512)
    for k, (a, n, w) in enumerate(segments):
        stale = r.ring.avail_flags(r.ring.size)      # the other lap's bits
        r.ring.write_desc(k, a, n, 0, (F_WRITE if w else 0) | (F_NEXT if k < 2 else 0) | stale)
    os.eventfd_write(r.kick, 1)
    msg = r.reactor.post_barrier()
    wait_for(lambda: msg.done)
    assert r.ring.pop_used() == [] and r.ram.read(status, 1) == b"\xff"
    assert r.queue.stats()["requests"] == 0


def _drain(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_driver_event_flags_suppress_or_ask_for_interrupts(rig):
    r = rig()
    _drain(r.call)
    r.ring.set_driver_event(EVENT_DISABLE)
    r.request(T_IN, 0, data_in_len=512)
    assert _drain(r.call) == 0
    r.ring.set_driver_event(EVENT_ENABLE)
    r.request(T_IN, 0, data_in_len=512)
    wait_for(lambda: _drain(r.call) > 0)


def test_event_idx_interrupts_when_the_named_descriptor_is_used(rig):
    """DESC: the interrupt comes with the used descriptor at off_wrap, not before (3-slot chains:
    the 4th request's chain covers slots 9-11)."""
    r = rig(event_idx=True)
    _drain(r.call)
    r.ring.set_driver_event(EVENT_DESC, r.ring.off_wrap(10))
    for k in range(3):
        r.request(T_IN, k, data_in_len=512)
    assert _drain(r.call) == 0 and r.queue.stats()["suppressed"] >= 1
    r.request(T_IN, 3, data_in_len=512)
    wait_for(lambda: _drain(r.call) > 0)


def test_event_idx_position_in_the_next_lap_is_not_crossed_early(rig):
    r = rig(event_idx=True)
    _drain(r.call)
    r.ring.set_driver_event(EVENT_DESC, r.ring.off_wrap(r.ring.size + 2))
    for k in range(3):
        r.request(T_IN, k, data_in_len=512)
    assert _drain(r.call) == 0


@pytest.mark.parametrize("event_idx", [False, True])
def test_sleeping_reactor_asks_for_kicks(rig, event_idx):
    """Before it sleeps the device enables kicks: ENABLE, or DESC at the next avail position."""
    r = rig(event_idx=event_idx, idle_sleep_us=100.0)
    r.request(T_IN, 0, data_in_len=512)
    expected = (r.ring.off_wrap(r.ring.avail_count), EVENT_DESC) if event_idx else (0, EVENT_ENABLE)
    wait_for(lambda: r.ring.device_event() == expected)
    assert r.request(T_IN, 1, data_in_len=512)[0] == S_OK


def test_vring_base_carries_positions_and_wrap_counters_across_a_restart(rig):
    """Stop after the ring wrapped once (wrap counters 0), restart a new queue from vring_base:
    I/O goes on, and the base round-trips."""
    r = rig()
    for k in range(100):
        r.request(T_OUT, k, data_out=bytes([k]) * 512)     # 3 slots each: 300 > 256
    msg = r.reactor.post_remove_queue(r.queue)
    wait_for(lambda: msg.done)
    base = r.queue.vring_base
    assert base == r.ring.base()
    assert not base & 0x8000 and base & 0x7FFF == 300 - 256
    r.device.detach(r.queue)
    r.queue = r.ring.queue(0, r.memory, last_avail=base)
    r.queue.set_fds(r.kick, r.call, r.err)
    r.device.attach(r.queue)
    msg = r.reactor.post_add_queue(r.queue)
    wait_for(lambda: msg.done)
    assert r.queue.vring_base == base
    assert r.request(T_IN, 99, data_in_len=512)[2] == bytes([99]) * 512


def test_base_outside_the_ring_is_refused():
    from tests.helpers.ringdriver import GuestRam, PackedRing
    ram = GuestRam(1 << 20)
    memory = ram.memory()
    ring = PackedRing(ram, 64)
    with pytest.raises(ValueError):
        ring.queue(0, memory, last_avail=0x8000 | 64)
    with pytest.raises(ValueError):
        ring.queue(0, memory, last_avail=(0x8000 | 70) << 16 | 0x8000)
    q = ring.queue(0, memory, last_avail=0x8000)
    assert q.vring_base == 0x80008000       # no used part given: the same as avail
    memory.close()
    ram.close()


def test_rings_outside_guest_memory_are_refused():
    from tests.helpers.ringdriver import UADDR_BASE, GuestRam
    ram = GuestRam(1 << 20)
    memory = ram.memory()
    q = dp.VirtQueue(0)
    with pytest.raises(ValueError):
        q.configure(memory, 64, UADDR_BASE + (1 << 20) - 512, UADDR_BASE, UADDR_BASE + 4, 0x8000,
                    False, True, packed=True)
    with pytest.raises(ValueError):
        q.configure(memory, 64, UADDR_BASE, UADDR_BASE + 4096, UADDR_BASE + (1 << 20) - 2, 0x8000,
                    False, True, packed=True)
    memory.close()
    ram.close()


# -- inflight tracking (kill -9 recovery) ------------------------------------------------------
INFLIGHT_HEADER = struct.Struct("<QHHIHHHH")     # features, version, desc_num, layout, avail, used, pending id, pending used
INFLIGHT_ENTRY = struct.Struct("<BBHHHQ")        # inflight, pad, ndesc, avail_after, pad, counter; 8 descriptors follow
ENTRY_BYTES = INFLIGHT_ENTRY.size + 8 * 16


def _stop(r):
    msg = r.reactor.post_remove_queue(r.queue)
    wait_for(lambda: msg.done)
    r.device.detach(r.queue)
    r.queue.clear_inflight()


def _restart_with_region(r, region, base, running=True):
    """Take the queue back (unless already stopped) and start a new one on the same ring from
    base and the region: what a restarted vhostd does when QEMU reconnects."""
    if running:
        _stop(r)
    r.queue = r.ring.queue(0, r.memory, last_avail=base)
    resubmitted = r.queue.set_inflight(region, 0)
    r.queue.set_fds(r.kick, r.call, r.err)
    r.device.attach(r.queue)
    msg = r.reactor.post_add_queue(r.queue)
    wait_for(lambda: msg.done)
    return resubmitted


def _rig_with_region(rig):
    import mmap
    r = rig()
    region = mmap.mmap(-1, dp.inflight_queue_bytes(r.ring.size))
    _restart_with_region(r, region, r.ring.base())
    return r, region


def test_inflight_region_follows_both_positions(rig):
    r, region = _rig_with_region(rig)
    for k in range(100):                        # 300 slots: the ring wrapped
        r.request(T_OUT, k, data_out=bytes([k]) * 512)
    _, version, desc_num, layout, avail, used, pending, _ = INFLIGHT_HEADER.unpack_from(region, 0)
    assert (version, desc_num, layout, pending) == (1, r.ring.size, 0x444B4350, 0xFFFF)
    assert avail == used == r.ring.avail_count == 300
    assert not any(region[INFLIGHT_HEADER.size + k * ENTRY_BYTES] for k in range(r.ring.size))


@pytest.mark.parametrize("avail_stored", [True, False], ids=["after-fetch", "before-avail-stored"])
def test_chain_in_flight_at_a_crash_is_replayed_from_the_region(rig, avail_stored):
    """The dead back-end had fetched a write (its ring slots since overwritten) and not completed
    it; QEMU reconnects with the base it knew at start.  The restarted queue takes both positions
    from the region, replays the write from its copy, then serves the next request."""
    r, region = _rig_with_region(rig)
    for k in range(90):
        r.request(T_IN, k, data_in_len=512)       # 270 slots: wrap counters now 0
    _stop(r)
    start = r.ring.avail_count
    data = os.urandom(1024)
    segments, status, _ = _blk_chain(r, T_OUT, 64, data_out=data, split_data=2)
    buffer_id = r.ring.add_chain(segments)
    descs = [struct.unpack_from("<QIHH", r.ram.read(r.ring.desc + 16 * ((start + k) % r.ring.size), 16))
             for k in range(4)]
    entry = INFLIGHT_ENTRY.pack(1, 0, 4, (start + 4) & 0xFFFF, 0, 1 << 40) + b"".join(
        struct.pack("<QIHH", *d) for d in descs) + bytes(4 * 16)
    at = INFLIGHT_HEADER.size + buffer_id * ENTRY_BYTES
    region[at:at + ENTRY_BYTES] = entry
    if not avail_stored:
        struct.pack_into("<H", region, 16, start & 0xFFFF)
    else:
        struct.pack_into("<H", region, 16, (start + 4) & 0xFFFF)
    for k in range(4):        # the ring no longer holds the chain (neither available nor used now)
        stale = r.ring.avail_flags(start + k + r.ring.size)
        r.ram.write(r.ring.desc + 16 * ((start + k) % r.ring.size), bytes(14) + struct.pack("<H", stale))
    assert _restart_with_region(r, region, 0x80008000, running=False) == 1       # QEMU's stale base
    os.eventfd_write(r.kick, 1)
    assert r.wait_used() == [(buffer_id, 1)]
    assert r.ram.read(status, 1)[0] == S_OK
    assert r.queue.vring_base & 0xFFFF == r.ring.off_wrap(start + 4)
    assert r.request(T_IN, 64, data_in_len=1024)[2] == data


def test_used_descriptor_written_before_a_crash_is_not_replayed(rig):
    """pending_id says a completion was being written and it reached the ring: that request is
    done, the used position is past it, nothing is resubmitted."""
    r, region = _rig_with_region(rig)
    segments, _, _ = _blk_chain(r, T_IN, 0, data_in_len=512)
    buffer_id = r.ring.add_chain(segments)
    os.eventfd_write(r.kick, 1)
    assert r.wait_used() == [(buffer_id, 513)]
    at = INFLIGHT_HEADER.size + buffer_id * ENTRY_BYTES
    region[at:at + INFLIGHT_ENTRY.size] = INFLIGHT_ENTRY.pack(1, 0, 3, 3, 0, 9)
    struct.pack_into("<HHHH", region, 16, 3, 0, buffer_id, 0)       # avail 3, used 0, pending at 0
    assert _restart_with_region(r, region, 0x80008000) == 0
    assert r.queue.vring_base == 0x80038003
    assert r.request(T_IN, 1, data_in_len=512)[0] == S_OK


def test_scribbled_region_never_breaks_memory_safety(rig):
    """A front-end that writes garbage over the region: recovery bounds every value (the queue
    may serve garbage requests, which fail, but nothing outside the ring or guest memory)."""
    import random
    rng = random.Random(4)
    for _ in range(20):
        r, region = _rig_with_region(rig)
        region[:] = bytes(rng.randrange(256) for _ in range(len(region)))
        struct.pack_into("<HHI", region, 8, 1, r.ring.size, 0x444B4350)
        _restart_with_region(r, region, r.ring.base())
        os.eventfd_write(r.kick, 1)
        msg = r.reactor.post_barrier()
        wait_for(lambda: msg.done)
