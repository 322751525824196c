"""A real QEMU guest doing its disk I/O through a running vhostd (vhost-user-blk-pci)."""

from __future__ import annotations

import hashlib

import pytest

from guest import VhostUserDevice

pytestmark = pytest.mark.e2e

PATTERN_FIRST, PATTERN_LAST = 1000000, 1524287      # 4 MiB of 8-byte lines, made by busybox seq
PATTERN_BYTES = 4 << 20


def expected_pattern() -> bytes:
    return b"".join(b"%d\n" % i for i in range(PATTERN_FIRST, PATTERN_LAST + 1))


def test_guest_reads_and_writes_malloc_and_file_disks(vhostd, boot_guest, sparse_file):
    image = sparse_file(32 << 20)
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "64", "512")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    d.spdk("vhost_create_blk_controller", "vhost.1", "File0")
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0"),
                                VhostUserDevice("blk", d.socket_dir / "vhost.1")])
    sizes = guest.block_device_sizes()
    assert sizes["vda"] == 64 << 20 and sizes["vdb"] == 32 << 20
    assert guest.read_sysfs("/sys/block/vda/serial") == "Malloc0"
    guest.check(f"seq {PATTERN_FIRST} {PATTERN_LAST} > /tmp/pattern"
                " && dd if=/tmp/pattern of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null"
                " && dd if=/tmp/pattern of=/dev/vdb bs=1M seek=4 conv=fsync 2>/dev/null"
                " && echo 3 > /proc/sys/vm/drop_caches")
    sums = guest.check("md5sum < /tmp/pattern;"
                       " dd if=/dev/vda bs=1M skip=8 count=4 2>/dev/null | md5sum;"
                       " dd if=/dev/vdb bs=1M skip=4 count=4 2>/dev/null | md5sum").splitlines()
    assert sums[0] == sums[1] == sums[2]
    # discard through the guest's block layer reads back as zeros
    guest.check("blkdiscard -o 0 -l 1048576 /dev/vda 2>/dev/null || true")
    assert guest.poweroff() == 0
    data = image.read_bytes()
    assert data[4 << 20:8 << 20] == expected_pattern()
    assert data[:4 << 20] == bytes(4 << 20) and data[8 << 20:] == bytes(len(data) - (8 << 20))
    stat = {b["name"]: b for b in d.spdk("bdev_get_iostat")["bdevs"]}
    assert stat["File0"]["bytes_written"] >= PATTERN_BYTES and stat["Malloc0"]["num_read_ops"] > 0


def test_guest_with_two_queues_on_two_vcpus(vhostd, boot_guest):
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "32", "4096")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    guest = boot_guest(smp=2, devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0", num_queues=2)])
    assert guest.check("ls /sys/block/vda/mq").split() == ["0", "1"]
    assert guest.read_sysfs("/sys/block/vda/queue/logical_block_size") == "4096"
    guest.check("seq 1 200000 > /tmp/p; for cpu in 0 1; do taskset -c $cpu dd if=/tmp/p of=/dev/vda "
                "bs=4096 seek=$((cpu * 1024)) oflag=direct 2>/dev/null; done")
    out = guest.check("md5sum < /tmp/p; dd if=/dev/vda bs=4096 skip=1024 count=$(( ($(wc -c < /tmp/p) + 4095) / 4096 ))"
                      " iflag=direct 2>/dev/null | head -c $(wc -c < /tmp/p) | md5sum").splitlines()
    assert out[0] == out[1]
    queues = d.rpc("vhost_get_controllers")[0]["sessions"][0]
    assert queues["max_queues"] >= 2
    assert guest.poweroff() == 0
