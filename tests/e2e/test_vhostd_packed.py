"""Real QEMU guests on packed virtqueues (``packed=on``) served by vhostd: vhost-user-blk-pci on a
controller created with --packed-ring, and vhost-user-scsi-pci; the guest writes and checks
patterns, with several writers in flight so that the ring wraps and completes out of order, and
vhostd's queue stats show the packed rings were negotiated."""

from __future__ import annotations

import re

import pytest

from guest import VhostUserDevice, pattern_command

pytestmark = pytest.mark.e2e

MIB = 1 << 20
SEED = 7
WRITERS = 4


def _packed_queues(d, ctrlr: str) -> list[bool]:
    (entry,) = d.rpc("vhost_get_queue_stats", name=ctrlr)["controllers"]
    return [q["packed"] for q in entry["queues"]]


def _parallel_writers(guest, dev: str, seed: int, span_bytes: int) -> None:
    """WRITERS O_DIRECT writers at once over [0, WRITERS * span), each its own seed, then each
    region checked cold."""
    script = " & ".join(pattern_command("write", seed + k, dev, k * span_bytes, span_bytes, direct=True,
                                        chunk_bytes=64 << 10) for k in range(WRITERS))
    guest.check(script + " & wait", timeout_s=guest.scaled(120))
    for k in range(WRITERS):
        guest.check_pattern(dev, seed + k, k * span_bytes, span_bytes, direct=True, timeout_s=guest.scaled(60))


def test_guest_on_packed_blk_rings_writes_and_reads_back(vhostd, boot_guest, guest_image, sparse_file):
    image = sparse_file(32 * MIB)
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "64", "512")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "--packed-ring", "vhost.0", "Malloc0")
    d.spdk("vhost_create_blk_controller", "--packed-ring", "vhost.1", "File0")
    d.spdk("vhost_create_blk_controller", "vhost.2", "Malloc0")     # not offered: QEMU falls back to split
    guest = boot_guest(smp=2, devices=[
        VhostUserDevice("blk", d.socket_dir / "vhost.0", num_queues=2, props={"packed": True}),
        VhostUserDevice("blk", d.socket_dir / "vhost.1", props={"packed": True}),
        VhostUserDevice("blk", d.socket_dir / "vhost.2", props={"packed": True})])
    assert _packed_queues(d, "vhost.0") == [True, True]
    assert _packed_queues(d, "vhost.1") == [True]
    assert _packed_queues(d, "vhost.2") == [False]
    assert re.search(r"vhost\.0\S*: packed virtqueues", d.log())
    assert not re.search(r"vhost\.2\S*: packed virtqueues", d.log())
    _parallel_writers(guest, "/dev/vda", SEED, 4 * MIB)
    _parallel_writers(guest, "/dev/vdb", SEED, 2 * MIB)
    # Through the page cache too (writeback makes large chains), read back cold.
    guest.write_pattern("/dev/vdb", SEED + 10, 16 * MIB, 4 * MIB, chunk_bytes=MIB)
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern("/dev/vdb", SEED + 10, 16 * MIB, 4 * MIB)
    for ctrlr in ("vhost.0", "vhost.1"):
        queues = d.rpc("vhost_get_queue_stats", name=ctrlr)["controllers"][0]["queues"]
        assert sum(q["requests"] for q in queues) > 0 and all(q["errors"] == 0 for q in queues)
    assert guest.poweroff() == 0
    for k in range(WRITERS):
        guest_image.patterns.check_file(image, SEED + k, k * 2 * MIB, 2 * MIB)
    guest_image.patterns.check_file(image, SEED + 10, 16 * MIB, 4 * MIB)


def test_guest_on_packed_scsi_rings_writes_and_reads_back(vhostd, boot_guest):
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "64", "512")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "Malloc0")
    guest = boot_guest(devices=[VhostUserDevice("scsi", d.socket_dir / "vhost.0", props={"packed": True})])
    assert all(_packed_queues(d, "vhost.0"))
    dev = "/dev/" + guest.check("ls /sys/bus/scsi/devices/0:0:0:0/block").split()[0]
    _parallel_writers(guest, dev, SEED, 4 * MIB)
    guest.write_pattern(dev, SEED + 10, 32 * MIB, 4 * MIB, chunk_bytes=MIB)
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern(dev, SEED + 10, 32 * MIB, 4 * MIB)
    queues = d.rpc("vhost_get_queue_stats", name="vhost.0")["controllers"][0]["queues"]
    # (errors counts the scan's commands to absent targets and LUNs, as on split rings)
    assert sum(q["write_ops"] for q in queues) > 0 and sum(q["bad_chains"] for q in queues) == 0
    assert guest.poweroff() == 0
