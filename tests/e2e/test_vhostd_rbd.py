"""A real QEMU guest on vhost-user-blk and vhost-user-scsi over a Ceph RBD image served by vhostd,
and the guest seeing the image grow with bdev_rbd_resize while it runs."""

from __future__ import annotations

import time

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
    rbd_bdev(d, ceph_cluster, image)
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


def rbd_bdev(d, ceph_cluster, image: str, name: str = "Rbd0") -> None:
    d.spdk("bdev_rbd_register_cluster", "c0", "--user", "admin", "--config-file",
           str(ceph_cluster.conf))
    d.spdk("bdev_rbd_create", "-b", name, "-c", "c0", "rbd", image, "512")


def wait_for_guest_size(guest, sysfs_size: str, size_bytes: int, what: str) -> float:
    """Poll the guest's sectors count until it says size_bytes; returns how long that took."""
    started = time.monotonic()
    guest.wait_in_guest(f'[ "$(cat {sysfs_size})" = "{size_bytes // 512}" ]', 30.0,
                        f"{what} did not reach {size_bytes} bytes")
    return time.monotonic() - started


def test_bdev_rbd_resize_under_a_running_blk_guest_changes_its_disk_size(
        ceph_cluster, rbd_image, vhostd, boot_guest):
    image = rbd_image(32 * MIB)
    d = vhostd()
    rbd_bdev(d, ceph_cluster, image)
    d.spdk("vhost_create_blk_controller", "vhost.0", "Rbd0")
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0")])
    assert guest.block_device_sizes()["vda"] == 32 * MIB
    d.spdk("bdev_rbd_resize", "Rbd0", "48")
    took_s = wait_for_guest_size(guest, "/sys/block/vda/size", 48 * MIB, "/dev/vda")
    print("guest saw vda grow 32 -> 48 MiB within %.1f s" % took_s)
    assert "capacity change" in guest.dmesg()
    assert ceph_cluster.image_size(image) == 48 * MIB
    # The new blocks take data: a pattern written past the old end reads back.
    guest.write_pattern("/dev/vda", SEED, 40 * MIB, MIB, direct=True)
    guest.check_pattern("/dev/vda", SEED, 40 * MIB, MIB, direct=True)
    assert guest.poweroff() == 0


def boot_scsi_guest_on_rbd(ceph_cluster, rbd_image, vhostd, boot_guest, size_bytes: int):
    """A guest whose vhost-user-scsi controller has an RBD image as target 0; returns (daemon,
    guest, image, disk name in the guest)."""
    image = rbd_image(size_bytes)
    d = vhostd()
    rbd_bdev(d, ceph_cluster, image)
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "Rbd0")
    guest = boot_guest(devices=[VhostUserDevice("scsi", d.socket_dir / "vhost.0")])
    (disk,) = [name for name in guest.block_device_sizes() if name.startswith("sd")]
    return d, guest, image, disk


def test_guest_writes_and_reads_an_rbd_image_over_vhost_user_scsi(ceph_cluster, rbd_image, vhostd,
                                                                  boot_guest, guest_image, tmp_path):
    d, guest, image, disk = boot_scsi_guest_on_rbd(ceph_cluster, rbd_image, vhostd, boot_guest, 32 * MIB)
    dev = "/dev/" + disk
    assert guest.block_device_sizes()[disk] == 32 * MIB
    guest.write_pattern(dev, SEED, 8 * MIB, PATTERN_BYTES, direct=True, chunk_bytes=MIB)
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern(dev, SEED, 8 * MIB, PATTERN_BYTES, direct=True)
    assert guest.poweroff() == 0
    d.spdk("vhost_delete_controller", "vhost.0")
    d.spdk("bdev_rbd_delete", "Rbd0")
    exported = tmp_path / "image.raw"
    exported.write_bytes(ceph_cluster.export_image(image))
    guest_image.patterns.check_file(exported, SEED, 8 * MIB, PATTERN_BYTES)
    guest_image.patterns.check_file(exported, "zero", 0, 8 * MIB)
    guest_image.patterns.check_file(exported, "zero", 12 * MIB, 20 * MIB)


def test_bdev_rbd_resize_under_a_running_scsi_guest_is_seen_after_a_rescan(
        ceph_cluster, rbd_image, vhostd, boot_guest):
    d, guest, image, disk = boot_scsi_guest_on_rbd(ceph_cluster, rbd_image, vhostd, boot_guest, 32 * MIB)
    d.spdk("bdev_rbd_resize", "Rbd0", "48")
    guest.check(f"echo 1 > /sys/block/{disk}/device/rescan")
    took_s = wait_for_guest_size(guest, f"/sys/block/{disk}/size", 48 * MIB, "/dev/" + disk)
    print("guest saw %s grow 32 -> 48 MiB within %.1f s of the rescan" % (disk, took_s))
    log = guest.dmesg()
    print("\n".join(line for line in log.splitlines() if "apacity" in line))
    assert "Capacity data has changed" in log          # the unit attention reached the guest
    guest.write_pattern("/dev/" + disk, SEED, 40 * MIB, MIB, direct=True)
    guest.check_pattern("/dev/" + disk, SEED, 40 * MIB, MIB, direct=True)
    assert guest.poweroff() == 0


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
