"""A real QEMU guest doing its disk I/O through a running vhostd (vhost-user-blk-pci)."""

from __future__ import annotations

import pytest

from guest import VhostUserDevice, pattern_command

pytestmark = pytest.mark.e2e

MIB = 1 << 20
SEED = 1
PATTERN_BYTES = 4 * MIB


def test_guest_reads_and_writes_malloc_and_file_disks(vhostd, boot_guest, guest_image, sparse_file):
    image = sparse_file(32 * MIB)
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "64", "512")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    d.spdk("vhost_create_blk_controller", "vhost.1", "File0")
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0"),
                                VhostUserDevice("blk", d.socket_dir / "vhost.1")])
    sizes = guest.block_device_sizes()
    assert sizes["vda"] == 64 * MIB and sizes["vdb"] == 32 * MIB
    assert guest.read_sysfs("/sys/block/vda/serial") == "Malloc0"
    # Through the page cache (the guest's writeback makes the requests), then read back cold.
    guest.write_pattern("/dev/vda", SEED, 8 * MIB, PATTERN_BYTES, chunk_bytes=MIB)
    guest.write_pattern("/dev/vdb", SEED, 4 * MIB, PATTERN_BYTES, chunk_bytes=MIB)
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern("/dev/vda", SEED, 8 * MIB, PATTERN_BYTES)
    guest.check_pattern("/dev/vdb", SEED, 4 * MIB, PATTERN_BYTES)
    # discard through the guest's block layer reads back as zeros
    guest.check("blkdiscard -o 0 -l 1048576 /dev/vda 2>/dev/null || true")
    assert guest.poweroff() == 0
    guest_image.patterns.check_file(image, SEED, 4 * MIB, PATTERN_BYTES)
    guest_image.patterns.check_file(image, "zero", 0, 4 * MIB)
    guest_image.patterns.check_file(image, "zero", 8 * MIB, 24 * MIB)
    stat = {b["name"]: b for b in d.spdk("bdev_get_iostat")["bdevs"]}
    assert stat["File0"]["bytes_written"] >= PATTERN_BYTES and stat["Malloc0"]["num_read_ops"] > 0


def test_guest_with_two_queues_on_two_vcpus(vhostd, boot_guest):
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "32", "4096")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    guest = boot_guest(smp=2, devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0", num_queues=2)])
    assert guest.check("ls /sys/block/vda/mq").split() == ["0", "1"]
    assert guest.read_sysfs("/sys/block/vda/queue/logical_block_size") == "4096"
    # One writer per vCPU, so each blk-mq queue carries requests.
    for cpu in (0, 1):
        guest.check("taskset -c %d %s" % (cpu, pattern_command("write", SEED + cpu, "/dev/vda", cpu * 4 * MIB, MIB,
                                                                direct=True, chunk_bytes=4096)))
    for cpu in (0, 1):
        guest.check_pattern("/dev/vda", SEED + cpu, cpu * 4 * MIB, MIB, direct=True)
    queues = d.rpc("vhost_get_controllers")[0]["sessions"][0]
    assert queues["max_queues"] >= 2
    assert guest.poweroff() == 0
