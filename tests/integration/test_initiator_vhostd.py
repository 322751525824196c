"""The initiator against vhostd's own vhost-user-blk back-end (controller, session, reactors) over a
real socket, the back-end running in this process: every request type, multiqueue, polled queues
without a call fd, the inflight buffer, stop/start, reconnect, and hostile chains."""

import struct
import time

import pytest

from vhostd import _dataplane as dp
from vhostd.initiator import blk
from vhostd.initiator.blk import VirtioBlk
from vhostd.vhost.features import ProtocolFeature
from vhostd.initiator.targets import InProcessVhostdTarget

BLOCKS = 1 << 15


@pytest.fixture
def vhostd():
    # Packed rings offered: front-ends that do not ask for them negotiate split ones.
    with InProcessVhostdTarget(disk=dp.Disk.malloc(512, BLOCKS), packed_ring=True) as backend:
        yield backend


@pytest.mark.parametrize("options", [
    {},
    {"memory_regions": 3, "use_mem_slots": True},
    {"event_idx": False, "indirect": False, "ack_all": True},
    {"call_fds": False},
    {"packed": True},
    {"packed": True, "event_idx": False, "indirect": False, "call_fds": False},
], ids=["default", "mem-slots-3-regions", "plain-rings-ack-all", "no-call-fd", "packed",
        "packed-plain-no-call-fd"])
def test_every_request_type(vhostd, options):
    with VirtioBlk(vhostd.socket_path, num_queues=2, **options).open() as disk:
        assert disk.frontend.has_feature(34) is bool(options.get("packed"))
        assert disk.config.capacity == BLOCKS
        data = bytes(range(256)) * 32
        disk.write(8, data, queue=1)
        assert disk.read(8, len(data)) == data
        assert disk.read(8, len(data), segment_bytes=512) == data
        disk.flush()
        assert disk.get_id() == b"vhd.0-disk"
        disk.write_zeroes([(8, 8)])
        disk.discard([(16, 8)])
        assert disk.read(8, len(data)) == bytes(8192)
        assert disk.request(0x7777).status == blk.S_UNSUPP
        with pytest.raises(blk.BlkError):
            disk.read(BLOCKS, 512)


def test_inflight_buffer_is_negotiated_and_kept(vhostd):
    with VirtioBlk(vhostd.socket_path).open() as disk:
        fe = disk.frontend
        assert fe.has_protocol(ProtocolFeature.INFLIGHT_SHMFD)
        info, fd = fe.inflight
        assert info.num_queues == 1 and info.mmap_size > 0
        fe.stop()
        fe.start()
        assert fe.inflight == (info, fd)
        disk.read(0, 512)


def test_get_vring_base_after_load_equals_published_index(vhostd):
    with VirtioBlk(vhostd.socket_path, num_queues=2, queue_size=256).open() as disk:
        queues = disk.frontend.queues
        gen = dp.LoadGenerator(queues, 16, 4096, 50, 1000, 0.3)
        gen.run()
        gen.close()
        assert disk.frontend.stop() == [q.avail_idx for q in queues]


@pytest.mark.parametrize("event_idx", [True, False])
def test_packed_rings_under_load_stop_at_the_positions_the_driver_reached(vhostd, event_idx):
    """The C load generator on packed rings (out-of-order completions, many laps of the ring):
    GET_VRING_BASE gives back both positions with their wrap counters, as the driver has them."""
    with VirtioBlk(vhostd.socket_path, num_queues=2, queue_size=64, packed=True, event_idx=event_idx).open() as disk:
        queues = disk.frontend.queues
        gen = dp.LoadGenerator(queues, 16, 4096, 50, 1000, 0.3)
        gen.run()
        result = gen.result()
        gen.close()
        assert result["ops"] > 64 * 4 and result["errors"] == 0
        assert disk.frontend.stop() == [q.packed_base for q in queues]
        disk.frontend.start()
        data = b"\x5a" * 4096
        disk.write(24, data)
        assert disk.read(24, 4096) == data


def test_reconnect_resumes_rings_on_the_same_controller(vhostd):
    with VirtioBlk(vhostd.socket_path).open() as disk:
        disk.write(0, b"\x33" * 512)
        before = disk.frontend.queues[0].avail_idx
        disk.frontend.reconnect()
        assert disk.read(0, 512) == b"\x33" * 512
        assert disk.frontend.stop() == [before + 1]


def test_hostile_chain_gets_an_error_status_and_the_queue_keeps_serving(vhostd):
    with VirtioBlk(vhostd.socket_path).open() as disk:
        mem = disk.memory
        header, status = mem.alloc(16), mem.alloc(1)
        mem.write(header, struct.pack("<IIQ", blk.T_IN, 0, 0))
        mem.write(status, b"\xff")
        q = disk.frontend.queues[0]
        # Data buffer far outside guest memory, built by hand on free descriptors.
        q.write_desc(100, header, 16, 1, 101)
        q.write_desc(101, 1 << 50, 4096, 2 | 1, 102)
        q.write_desc(102, status, 1, 2)
        q.put_avail(100)
        q.kick()
        used = []
        for _ in range(1000):
            used = q.poll_raw()
            if used:
                break
            time.sleep(0.001)
        assert used and used[0][0] == 100
        assert mem.read(status, 1)[0] == blk.S_IOERR
        q.reset(q.avail_idx, q.last_used_idx)
        disk.write(0, b"\x44" * 512)
        assert disk.read(0, 512) == b"\x44" * 512
