"""The driver side of split rings (ext/initiator.pxi): layout, chains, publish and kick decisions,
used-ring checks, the latency histogram and driver memory.  The test plays the device by reading
and writing ring memory directly."""

import os
import struct

import pytest

from vhostd import _dataplane as dp
from tests.helpers.ringdevice import F_INDIRECT, F_NEXT, F_WRITE, Device

@pytest.fixture
def memory():
    mem = dp.DriverMemory(8 << 20, 2)
    yield mem
    mem.close()


def make_queue(memory, size=16, **kwargs):
    q = dp.DriverQueue(memory, 0, size, **kwargs)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    q.set_fds(kick, -1)
    return q, kick


def kicks(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_ring_layout_sizes_and_alignment_follow_the_split_ring_spec():
    assert dp.split_ring_layout(128) == ((2048, 16), (262, 2), (1030, 4))
    assert dp.split_ring_layout(1) == ((16, 16), (8, 2), (14, 4))


def test_rings_are_placed_aligned_inside_driver_memory(memory):
    q, _ = make_queue(memory, 256)
    assert q.desc_gpa % 16 == 0 and q.avail_gpa % 2 == 0 and q.used_gpa % 4 == 0
    desc, used, avail = q.addresses()
    assert desc == memory.hva(q.desc_gpa) and used == memory.hva(q.used_gpa)
    assert avail == memory.hva(q.avail_gpa)


def test_memory_regions_are_adjacent_views_of_one_memfd(memory):
    regions = memory.regions
    assert len(regions) == 2
    (g0, s0, u0, o0), (g1, s1, u1, o1) = regions
    assert (g0, o0) == (0, 0) and g1 == s0 == o1 and u1 == u0 + s0
    assert s0 + s1 == memory.size
    memory.write(s0 - 2, b"abcd")           # a buffer across the region edge
    assert memory.read(s0 - 2, 4) == b"abcd"


def free_hugepages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(free_hugepages() < 4, reason="needs 4 free 2 MiB hugepages")
def test_hugepage_memory_is_a_hugetlb_memfd_in_whole_2mib_pages_mapped_aligned():
    mem = dp.DriverMemory(3 << 20, 1, hugepages=True)
    try:
        assert os.fstat(mem.fd).st_blksize == 2 << 20          # hugetlbfs reports its page size
        assert mem.size == 4 << 20                               # rounded up to whole pages
        (gpa, size, uaddr, offset) = mem.regions[0]
        assert size == 4 << 20 and uaddr % (2 << 20) == 0
        mem.write(mem.size - 4096, b"\x5a" * 4096)
        assert mem.read(mem.size - 4096, 4096) == b"\x5a" * 4096
    finally:
        mem.close()


def test_memory_allocator_reuses_freed_ranges(memory):
    a = memory.alloc(4096, 4096)
    b = memory.alloc(100)
    memory.free(a)
    assert memory.alloc(4096, 4096) == a
    memory.free(b)
    with pytest.raises(MemoryError):
        memory.alloc(memory.size)


def test_queue_size_must_be_a_power_of_two(memory):
    with pytest.raises(ValueError):
        dp.DriverQueue(memory, 0, 100)


def test_direct_chain_links_descriptors_and_flags(memory):
    q, _ = make_queue(memory)
    dev = Device(q)
    head = q.add_chain([(0x1000, 16, False), (0x2000, 4096, True), (0x3000, 1, True)])
    assert dev.avail_idx() == 0            # not published before flush
    q.flush()
    got_head, chain = dev.pop()
    assert got_head == head
    assert chain == [(0x1000, 16, 0), (0x2000, 4096, F_WRITE), (0x3000, 1, F_WRITE)]
    assert q.num_free == 13 and q.inflight == 1


def test_completed_chains_return_their_descriptors(memory):
    q, _ = make_queue(memory)
    dev = Device(q)
    heads = [q.add_chain([(0x1000, 16, False), (0x3000, 1, True)]) for _ in range(8)]
    q.flush()
    assert q.num_free == 0
    with pytest.raises(BlockingIOError):
        q.add_chain([(0x1000, 16, False)])
    for _ in heads:
        head, _chain = dev.pop()
        dev.push(head, 1)
    assert sorted(h for h, _ in q.poll()) == sorted(heads)
    assert q.num_free == 16 and q.inflight == 0


def test_indirect_chain_uses_one_ring_descriptor(memory):
    q, _ = make_queue(memory, event_idx=False, indirect=True, indirect_mode=dp.INDIRECT_ALWAYS)
    dev = Device(q)
    segments = [(0x1000, 16, False)] + [(0x10000 + 512 * i, 512, True) for i in range(20)] + [(0x3000, 1, True)]
    head = q.add_chain(segments)
    q.flush()
    assert q.num_free == 15
    addr, length, flags, _ = dev.desc(head)
    assert flags == F_INDIRECT and length == 16 * len(segments)
    _, chain = dev.pop()
    assert chain == [(a, n, F_WRITE if w else 0) for a, n, w in segments]


def test_auto_mode_goes_indirect_only_when_descriptors_run_short(memory):
    q, _ = make_queue(memory, indirect=True, indirect_mode=dp.INDIRECT_AUTO)
    chain = [(0x1000, 16, False), (0x2000, 512, True), (0x3000, 1, True)]
    for _ in range(5):
        q.add_chain(chain)
    assert q.num_free == 1
    q.add_chain(chain)                      # 3 needed, 1 free: indirect
    assert q.num_free == 0


def test_without_negotiated_indirect_a_long_chain_waits_for_descriptors(memory):
    q, _ = make_queue(memory, indirect=False, indirect_mode=dp.INDIRECT_ALWAYS)
    q.add_chain([(0x1000, 16, False)] * 10)
    with pytest.raises(BlockingIOError):
        q.add_chain([(0x1000, 16, False)] * 10)
    with pytest.raises(ValueError):
        q.add_chain([(0x1000, 16, False)] * 17)


def test_kick_honours_no_notify_without_event_idx(memory):
    q, kick = make_queue(memory)
    dev = Device(q)
    q.add_chain([(0x1000, 16, False)])
    assert q.flush() and kicks(kick) == 1
    dev.set_used_flags(1)
    q.add_chain([(0x1000, 16, False)])
    assert not q.flush() and kicks(kick) == 0
    assert not q.flush()                    # nothing new: no publish, no kick


def test_kick_honours_avail_event_with_event_idx(memory):
    q, kick = make_queue(memory, event_idx=True)
    dev = Device(q)
    dev.set_avail_event(0)                  # wants a kick when entry 0 is published
    q.add_chain([(0x1000, 16, False)])
    assert q.flush()
    dev.set_avail_event(5)                  # not before entry 5
    for _ in range(3):
        q.add_chain([(0x1000, 16, False)])
    assert not q.flush()                    # avail.idx 1 → 4 does not pass 5
    q.add_chain([(0x1000, 16, False)])
    q.add_chain([(0x1000, 16, False)])
    assert q.flush()                        # 4 → 6 passes entry 5
    assert kicks(kick) == 2


def test_polling_queue_suppresses_interrupts(memory):
    q, _ = make_queue(memory)
    dev = Device(q)
    assert dev.avail_flags() == 1           # NO_INTERRUPT while polled
    q.configure(interrupts=True)
    assert dev.avail_flags() == 0


def test_polling_with_event_idx_keeps_used_event_far_ahead(memory):
    q, _ = make_queue(memory, size=16, event_idx=True)
    dev = Device(q)
    for _ in range(3):
        head = q.add_chain([(0x1000, 16, False)])
        q.flush()
        dev.pop()
        dev.push(head, 0)
        q.poll()
        assert (dev.used_event() - q.last_used_idx) & 0xFFFF >= 0x4000


def test_used_entry_for_a_descriptor_not_in_flight_breaks_the_queue(memory):
    q, _ = make_queue(memory)
    dev = Device(q)
    q.add_chain([(0x1000, 16, False), (0x3000, 1, True)])
    q.flush()
    dev.pop()
    dev.push(1, 0)                          # descriptor 1 is not a head
    with pytest.raises(OSError):
        q.poll()
    assert q.broken


def test_used_index_running_ahead_of_requests_breaks_the_queue(memory):
    q, _ = make_queue(memory)
    q.add_chain([(0x1000, 16, False)])
    q.flush()
    memory.write(q.used_gpa + 2, struct.pack("<H", 5))
    with pytest.raises(OSError):
        q.poll()


def test_raw_api_writes_arbitrary_descriptors_and_indexes(memory):
    q, _ = make_queue(memory)
    dev = Device(q)
    q.write_desc(3, 0xDEAD0000, 77, F_NEXT, 3)       # a loop
    q.put_avail(3)
    assert dev.avail_idx() == 1
    assert dev.desc(3) == (0xDEAD0000, 77, F_NEXT, 3)
    q.set_avail_idx(0x1234)
    assert dev.avail_idx() == 0x1234
    dev.push(9, 42)
    assert q.read_used(0) == (9, 42)
    assert q.poll_raw() == [(9, 42)]


def test_reset_resumes_at_given_indexes(memory):
    q, _ = make_queue(memory)
    q.reset(avail_idx=40, used_idx=38)
    assert q.avail_idx == 40 and q.last_used_idx == 38 and q.num_free == 16
    assert Device(q).avail_idx() == 40


@pytest.mark.parametrize("value", [0, 1, 15, 16, 17, 31, 32, 1000, 123456789, 2 ** 40 + 12345])
def test_histogram_bucket_bounds_value_within_one_sixteenth(value):
    bucket, low = dp.histogram_bucket(value)
    assert low <= value
    assert value - low <= max(value // 16, 0)
    assert dp.histogram_bucket(low)[0] == bucket
