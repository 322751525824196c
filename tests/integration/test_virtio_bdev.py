"""A vhost-user target consumed as a bdev: our front-end's queues driven by the bdev C path."""

import os

import pytest

from vhostd import _dataplane as dp
from vhostd.initiator.targets import InProcessVhostdTarget
from vhostd.initiator.virtio_bdev import attach_blk


@pytest.fixture
def target(tmp_path):
    disk = dp.Disk.malloc(512, 32768)
    with InProcessVhostdTarget("malloc", disk=disk, cpus=(0,), workdir=str(tmp_path)) as t:
        yield t, disk


def test_io_through_a_virtio_disk_reaches_the_target(target):
    t, backing = target
    device, disk = attach_blk(t.socket_path, vq_count=2, vq_size=64)
    ctx = dp.IoContext()
    try:
        assert (disk.kind, disk.block_size, disk.num_blocks) == ("virtio", 512, 32768)
        data = os.urandom(256 * 1024)
        ctx.write(disk, 1 << 20, data)
        ctx.flush(disk)
        assert ctx.read(disk, 1 << 20, len(data)) == data
        assert dp.IoContext().read(backing, 1 << 20, len(data)) == data
        ctx.write_zeroes(disk, 1 << 20, 4096)
        assert ctx.read(disk, 1 << 20, 4096) == bytes(4096)
        with pytest.raises(OSError):
            ctx.read(disk, 32768 * 512, 512)
        assert disk.iostat()["num_write_ops"] == 2
    finally:
        ctx.close()
        disk.remove()
        assert disk.virtio_released
        device.close()


def test_io_larger_than_a_bounce_buffer_fails_cleanly(target):
    t, _ = target
    device, disk = attach_blk(t.socket_path)
    ctx = dp.IoContext()
    try:
        with pytest.raises(OSError):
            ctx.read(disk, 0, 2 << 20)
        assert len(ctx.read(disk, 0, 1 << 20)) == 1 << 20
    finally:
        ctx.close()
        disk.remove()
        device.close()
