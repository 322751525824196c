"""A real QEMU guest on vhost-user-scsi-pci served by a running vhostd: targets become sd disks with
the sizes, block sizes and identity the emulation reports, data goes through, and targets added or
removed with RPC while the guest runs appear and disappear without a rescan command."""

from __future__ import annotations

import pytest

from guest import VhostUserDevice, pattern_command

pytestmark = pytest.mark.e2e

MIB = 1 << 20
SEED = 1
PATTERN_BYTES = 4 * MIB
# The hot-plug test's writer: seven 4 MiB writes over [0, 28) MiB of target 0.
WRITER_SEED = 2
WRITER_CHUNKS = 7

# (host, channel, target, lun) directory of each SCSI device and the disk under it
LIST_DISKS = ('for d in /sys/bus/scsi/devices/*:*:*:*; do [ -d "$d/block" ] && '
              'echo "${d##*/} $(ls $d/block)"; done; true')


def disks_by_target(guest) -> dict[int, str]:
    """SCSI target number -> sd device name, as the guest sees them."""
    out = {}
    for line in guest.check(LIST_DISKS).splitlines():
        hctl, name = line.split()
        out[int(hctl.split(":")[2])] = name
    return out


def test_guest_sees_scsi_targets_with_their_geometry_and_identity(vhostd, boot_guest, sparse_file):
    image = sparse_file(32 << 20)
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "64", "512")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("bdev_malloc_create", "-b", "Malloc4k", "16", "4096")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "Malloc0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "1", "File0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "3", "Malloc4k")
    guest = boot_guest(devices=[VhostUserDevice("scsi", d.socket_dir / "vhost.0")])
    disks = disks_by_target(guest)
    assert sorted(disks) == [0, 1, 3]
    sizes = guest.block_device_sizes()
    assert sizes[disks[0]] == 64 << 20 and sizes[disks[1]] == 32 << 20 and sizes[disks[3]] == 16 << 20
    sys0, sys3 = "/sys/block/%s" % disks[0], "/sys/block/%s" % disks[3]
    assert guest.read_sysfs(sys0 + "/device/vendor").strip() == "VHOSTD"
    assert guest.read_sysfs(sys0 + "/device/model").strip() == "Malloc disk"
    assert guest.read_sysfs(sys0 + "/queue/rotational") == "0"
    assert guest.read_sysfs(sys0 + "/queue/logical_block_size") == "512"
    assert guest.read_sysfs(sys3 + "/queue/logical_block_size") == "4096"
    assert int(guest.read_sysfs(sys0 + "/queue/discard_max_bytes")) > 0
    assert guest.read_sysfs("/sys/class/scsi_disk/0:0:0:0/provisioning_mode") == "unmap"
    assert guest.read_sysfs("/sys/class/scsi_disk/0:0:0:0/cache_type") == "write back"
    a, b, c = ("/dev/" + disks[n] for n in (0, 1, 3))
    # Through the page cache (the guest's writeback makes the requests), and O_DIRECT on the 4 KiB
    # disk; read back cold.
    guest.write_pattern(a, SEED, 8 * MIB, PATTERN_BYTES, chunk_bytes=MIB)
    guest.write_pattern(b, SEED, 4 * MIB, PATTERN_BYTES, chunk_bytes=MIB)
    guest.write_pattern(c, SEED, 2 * MIB, PATTERN_BYTES, direct=True, chunk_bytes=MIB)
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern(a, SEED, 8 * MIB, PATTERN_BYTES)
    guest.check_pattern(b, SEED, 4 * MIB, PATTERN_BYTES)
    guest.check_pattern(c, SEED, 2 * MIB, PATTERN_BYTES, direct=True)
    # Unmapped blocks of a malloc disk read back as zeros.
    guest.write_pattern(a, SEED, 0, MIB, direct=True)
    guest.check(f"blkdiscard -o 0 -l {MIB} {a}")
    guest.check_pattern(a, "zero", 0, MIB, direct=True)
    assert guest.poweroff() == 0
    guest.image.patterns.check_file(image, SEED, 4 * MIB, PATTERN_BYTES)
    guest.image.patterns.check_file(image, "zero", 0, 4 * MIB)
    stat = {s["name"]: s for s in d.spdk("bdev_get_iostat")["bdevs"]}
    assert stat["File0"]["bytes_written"] >= 4 << 20 and stat["Malloc0"]["num_unmap_ops"] >= 1


def test_targets_added_and_removed_while_the_guest_runs(vhostd, boot_guest):
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "32", "512")
    d.spdk("bdev_malloc_create", "-b", "Malloc1", "16", "512")
    d.spdk("bdev_malloc_create", "-b", "Malloc2", "8", "4096")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "Malloc0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "1", "Malloc1")
    guest = boot_guest(devices=[VhostUserDevice("scsi", d.socket_dir / "vhost.0")])
    disks = disks_by_target(guest)
    assert sorted(disks) == [0, 1]
    a = "/dev/" + disks[0]
    # A writer on target 0 runs across the hot-plug events.
    writes = "; ".join(pattern_command("write", WRITER_SEED, a, i * 4 * MIB, 4 * MIB, sync=True)
                       + " || echo WRITE-FAILED" for i in range(WRITER_CHUNKS))
    guest.check(f"({writes}) > /tmp/w.log 2>&1 & echo $! > /tmp/w.pid")
    assert d.spdk("vhost_scsi_controller_add_target", "vhost.0", "4", "Malloc2") == 4
    guest.wait_for_path("/sys/bus/scsi/devices/0:0:4:0/block", timeout_s=60)
    disks = disks_by_target(guest)
    assert guest.read_sysfs("/sys/block/%s/queue/logical_block_size" % disks[4]) == "4096"
    assert guest.block_device_sizes()[disks[4]] == 8 << 20
    guest.check(f"echo hello | dd of=/dev/{disks[4]} bs=4096 conv=sync,fsync 2>/dev/null")
    d.spdk("vhost_scsi_controller_remove_target", "vhost.0", "1")
    guest.wait_for_no_path("/sys/bus/scsi/devices/0:0:1:0", timeout_s=60)
    assert sorted(disks_by_target(guest)) == [0, 4]
    guest.wait_in_guest("! kill -0 $(cat /tmp/w.pid) 2>/dev/null", 120, "the writer did not finish")
    assert "WRITE-FAILED" not in guest.check("cat /tmp/w.log")
    guest.check_pattern(a, WRITER_SEED, 0, WRITER_CHUNKS * 4 * MIB, direct=True)
    assert "I/O error" not in guest.dmesg().replace(disks[1], "")
    d.spdk("bdev_malloc_delete", "Malloc1")          # released by the removal
    (info,) = d.spdk("vhost_get_controllers")
    assert [t["scsi_dev_num"] for t in info["backend_specific"]["scsi"]] == [0, 4]
    assert guest.poweroff() == 0
