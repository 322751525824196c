"""The initiator against a real qemu-storage-daemon (QEMU 7.2's vhost-user-blk export): negotiation,
every blk request type, multiqueue, stop/start, reconnect to a restarted daemon, and a file export
checked on the host."""

import os
import shutil
import threading
import time

import pytest

from vhostd import _dataplane as dp
from vhostd.initiator import blk
from vhostd.initiator.blk import VirtioBlk
from vhostd.initiator.frontend import DEFAULT_PROTOCOL_FEATURES
from vhostd.initiator.targets import QsdTarget
from vhostd.vhost.features import BlkFeature, ProtocolFeature, VirtioFeature, bit

SIZE = 64 << 20

if shutil.which("qemu-storage-daemon") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("qemu-storage-daemon is required in CI")
    pytest.skip("qemu-storage-daemon is not installed", allow_module_level=True)


@pytest.fixture
def qsd_null():
    with QsdTarget("null", size_bytes=SIZE, num_queues=2, read_zeroes=True) as target:
        yield target


@pytest.fixture
def qsd_file(tmp_path):
    image = tmp_path / "disk.img"
    with QsdTarget("file", image=str(image), size_bytes=SIZE, num_queues=2) as target:
        yield target


def open_disk(target, **options):
    return VirtioBlk(target.socket_path, **options).open()


def test_negotiation_acks_only_offered_features_this_front_end_implements(qsd_null):
    with open_disk(qsd_null) as disk:
        fe = disk.frontend
        assert fe.protocol == fe.offered_protocol & DEFAULT_PROTOCOL_FEATURES
        assert fe.has_protocol(ProtocolFeature.CONFIG) and fe.has_protocol(ProtocolFeature.REPLY_ACK)
        assert fe.features & ~fe.offered_features == 0
        assert not fe.features & bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
        assert fe.has_feature(VirtioFeature.VERSION_1)
        assert fe.has_feature(VirtioFeature.RING_EVENT_IDX) and fe.queues[0].event_idx
        assert fe.max_queues >= 2


def test_config_space_describes_the_export(qsd_null):
    with open_disk(qsd_null, num_queues=2) as disk:
        config = disk.config
        assert config.capacity == SIZE // 512
        assert config.blk_size == 512 and config.num_queues == 2
        assert config.seg_max > 0


@pytest.mark.parametrize("options", [
    {},
    {"memory_regions": 3},
    {"event_idx": False, "indirect": False},
    {"use_mem_slots": True, "ack_all": True},
], ids=["default", "three-regions", "no-event-idx-no-indirect", "mem-slots-ack-all"])
def test_written_data_reads_back(qsd_file, options):
    # (Not call_fds=False: QSD 7.2's libvhost-user writes to the missing call fd and panics.)
    with open_disk(qsd_file, **options) as disk:
        pattern = bytes(range(256)) * 64
        disk.write(16, pattern)
        assert disk.read(16, len(pattern)) == pattern
        # Many small descriptors, through an indirect table when negotiated.
        assert disk.read(16, len(pattern), segment_bytes=512, indirect=True) == pattern


def test_buffers_straddling_memory_regions_are_served(qsd_file):
    with open_disk(qsd_file, memory_regions=2, memory_bytes=8 << 20) as disk:
        mem = disk.memory
        edge = mem.regions[1][0]
        data = os.urandom(8192)
        header, status = mem.alloc(16), mem.alloc(1)
        mem.write(header, blk.struct.pack("<IIQ", blk.T_OUT, 0, 0))
        mem.write(edge - 4096, data)
        q = disk.frontend.queues[0]
        q.add_chain([(header, 16, False), (edge - 4096, 8192, False), (status, 1, True)])
        q.flush()
        q.wait()
        assert mem.read(status, 1) == b"\0"
        assert disk.read(0, 8192) == data


def test_flush_get_id_discard_and_write_zeroes(qsd_file):
    with open_disk(qsd_file) as disk:
        disk.write(0, b"\xee" * 8192)
        disk.flush()
        assert disk.get_id()
        if disk.has(BlkFeature.DISCARD):
            disk.discard([(0, 8)])
        if disk.has(BlkFeature.WRITE_ZEROES):
            disk.write_zeroes([(8, 8)])
            assert disk.read(8, 4096) == bytes(4096)


def test_unknown_request_type_is_unsupported(qsd_null):
    with open_disk(qsd_null) as disk:
        assert disk.request(0x7777).status == blk.S_UNSUPP


def test_read_beyond_the_end_fails_with_ioerr(qsd_null):
    with open_disk(qsd_null) as disk:
        with pytest.raises(blk.BlkError) as err:
            disk.read(SIZE // 512, 512)
        assert err.value.status == blk.S_IOERR


def test_two_queues_serve_requests(qsd_file):
    with open_disk(qsd_file, num_queues=2) as disk:
        disk.write(0, b"\x01" * 512, queue=0)
        disk.write(1, b"\x02" * 512, queue=1)
        assert disk.read(0, 1024, queue=1) == b"\x01" * 512 + b"\x02" * 512
        stats = [q.stats()["completed"] for q in disk.frontend.queues]
        assert stats == [1, 2]


def test_get_vring_base_returns_the_next_avail_index(qsd_null):
    with open_disk(qsd_null, num_queues=2) as disk:
        for _ in range(5):
            disk.read(0, 512, queue=0)
        disk.read(0, 512, queue=1)
        assert disk.frontend.stop() == [5, 1]
        # Started again, both rings go on where they stopped.
        disk.frontend.start()
        disk.read(0, 512, queue=0)
        assert disk.frontend.stop() == [6, 1]


def test_rings_resume_after_reconnecting_to_a_restarted_daemon(qsd_file):
    with open_disk(qsd_file, num_queues=2) as disk:
        disk.write(0, b"\x42" * 4096)
        disk.write(8, b"\x43" * 4096, queue=1)
        before = [q.avail_idx for q in disk.frontend.queues]
        qsd_file.restart()
        disk.frontend.reconnect()
        assert disk.read(0, 4096) == b"\x42" * 4096
        assert disk.read(8, 4096, queue=1) == b"\x43" * 4096
        assert [q.avail_idx for q in disk.frontend.queues] == [n + 1 for n in before]
        assert disk.frontend.stop() == [n + 1 for n in before]


def test_requests_in_flight_when_the_daemon_dies_complete_after_reconnect(qsd_null):
    # Without INFLIGHT_SHMFD (QSD offers none) the ring resumes at used.idx and the new daemon
    # fetches what was in flight again, as QEMU 7.2 does; null-co completes in order.
    with open_disk(qsd_null) as disk:
        q = disk.frontend.queues[0]
        gen = dp.LoadGenerator([q], 16, 4096, 50, 1000, 1.5, drain_s=10)
        runner = threading.Thread(target=gen.run)
        runner.start()
        time.sleep(0.3)
        qsd_null.kill()
        in_flight = q.inflight
        qsd_null.start()
        disk.frontend.reconnect()
        runner.join(30)
        result = gen.result()
        gen.close()
        assert in_flight == 16
        assert result["errors"] == 0 and result["lost"] == 0 and not q.broken
        assert disk.frontend.stop() == [q.avail_idx]


def test_file_export_holds_the_data_on_the_host_after_flush(qsd_file):
    data = os.urandom(65536)
    with open_disk(qsd_file) as disk:
        disk.write(2048, data)
        disk.flush()
        with open(qsd_file.image, "rb") as f:
            f.seek(2048 * 512)
            assert f.read(len(data)) == data
