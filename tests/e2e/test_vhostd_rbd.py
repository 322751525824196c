"""A real QEMU guest on vhost-user-blk over a Ceph RBD image served by vhostd."""

from __future__ import annotations

import pytest

from guest import VhostUserDevice

pytestmark = pytest.mark.e2e

MIB = 1 << 20
SEED = 7
PATTERN_BYTES = 4 * MIB


def test_guest_writes_and_reads_an_rbd_image(ceph_cluster, rbd_image, vhostd, boot_guest,
                                             guest_image, tmp_path):
    image = rbd_image(32 * MIB)
    d = vhostd()
    d.spdk("bdev_rbd_register_cluster", "c0", "--user", "admin", "--config-file",
           str(ceph_cluster.conf))
    d.spdk("bdev_rbd_create", "-b", "Rbd0", "-c", "c0", "rbd", image, "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Rbd0")
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0", num_queues=2)],
                       smp=2)
    assert guest.block_device_sizes()["vda"] == 32 * MIB
    guest.write_pattern("/dev/vda", SEED, 8 * MIB, PATTERN_BYTES, direct=True, chunk_bytes=MIB)
    guest.write_pattern("/dev/vda", SEED, 20 * MIB, MIB, sync=True)     # through the page cache
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern("/dev/vda", SEED, 8 * MIB, PATTERN_BYTES, direct=True)
    guest.check_pattern("/dev/vda", SEED, 20 * MIB, MIB)
    assert guest.poweroff() == 0
    d.spdk("vhost_delete_controller", "vhost.0")
    d.spdk("bdev_rbd_delete", "Rbd0")        # closes the image: every write is in the cluster
    exported = tmp_path / "image.raw"
    exported.write_bytes(ceph_cluster.export_image(image))
    guest_image.patterns.check_file(exported, SEED, 8 * MIB, PATTERN_BYTES)
    guest_image.patterns.check_file(exported, SEED, 20 * MIB, MIB)
    guest_image.patterns.check_file(exported, "zero", 0, 8 * MIB)
    guest_image.patterns.check_file(exported, "zero", 12 * MIB, 8 * MIB)


def test_second_vhostd_serves_a_guest_what_the_first_wrote(ceph_cluster, rbd_image, vhostd,
                                                           boot_guest, guest_image, tmp_path):
    """Two hosts sharing the store: the first vhostd releases the image (bdev_rbd_delete), the
    second opens it and its guest reads the first guest's data and writes its own."""
    image = rbd_image(16 * MIB)
    first, second = vhostd(), vhostd()
    for d in (first, second):
        d.spdk("bdev_rbd_register_cluster", "c0", "--user", "admin", "--config-file",
               str(ceph_cluster.conf))
    first.spdk("bdev_rbd_create", "-b", "Rbd0", "-c", "c0", "rbd", image, "512")
    first.spdk("vhost_create_blk_controller", "vhost.0", "Rbd0")
    guest = boot_guest(devices=[VhostUserDevice("blk", first.socket_dir / "vhost.0")])
    guest.write_pattern("/dev/vda", SEED, 0, PATTERN_BYTES, direct=True)
    assert guest.poweroff() == 0
    first.spdk("bdev_rbd_delete", "Rbd0")
    second.spdk("bdev_rbd_create", "-b", "Rbd0", "-c", "c0", "rbd", image, "512")
    second.spdk("vhost_create_blk_controller", "vhost.0", "Rbd0")
    guest = boot_guest(devices=[VhostUserDevice("blk", second.socket_dir / "vhost.0")])
    guest.check_pattern("/dev/vda", SEED, 0, PATTERN_BYTES, direct=True)
    guest.write_pattern("/dev/vda", SEED + 1, 8 * MIB, MIB, direct=True)
    assert guest.poweroff() == 0
    second.spdk("bdev_rbd_delete", "Rbd0")
    exported = tmp_path / "image.raw"
    exported.write_bytes(ceph_cluster.export_image(image))
    guest_image.patterns.check_file(exported, SEED, 0, PATTERN_BYTES)
    guest_image.patterns.check_file(exported, SEED + 1, 8 * MIB, MIB)
