"""Faults under a real QEMU guest on vhost-user-blk over an RBD image: the OSD killed and restarted,
the whole cluster stopped, vhostd killed and restarted from its saved config.

These tests kill Ceph daemons, so they use a cluster of their own (``own_ceph_cluster``), never the
session's.  Each guest writes with O_DIRECT and fsyncs at the end: what a writer saw acknowledged
and flushed must be in the image, checked in ``rbd export``'s bytes.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from guest import VhostUserDevice, pattern_command
from tests.helpers.waiting import wait_for
from vhostd.rpc.client import RpcCallError
from writers import BackgroundWriters, io_errors_in_dmesg

pytestmark = pytest.mark.e2e

MIB = 1 << 20
DISK_BYTES = 64 * MIB
REQUEST_BYTES = 16 << 10
PATTERN_BYTES = 32 * MIB
# The OSD stays dead this long before it is started again: an outage, not a wait for anything.
OSD_OUTAGE_S = 3.0
# Guests should get errors, not stall, once the cluster is gone: rados_osd_op_timeout (seconds).
OSD_OP_TIMEOUT_S = 10


@pytest.fixture
def image(own_ceph_cluster):
    """A new 64 MiB image in the module's own cluster, removed at teardown."""
    name = "fault-%s" % uuid.uuid4().hex[:8]
    own_ceph_cluster.create_image(name, DISK_BYTES)
    yield name
    own_ceph_cluster.wait_active()
    own_ceph_cluster.remove_image(name)


def serve(d, cluster, image, config_param=()):
    params = [a for pair in config_param for a in ("--config-param", pair)]
    d.spdk("bdev_rbd_register_cluster", "c0", "--user", "admin", "--config-file", str(cluster.conf),
           *params)
    d.spdk("bdev_rbd_create", "-b", "Rbd0", "-c", "c0", "rbd", image, "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Rbd0")


def bytes_written(d) -> int:
    return d.rpc("bdev_get_iostat", name="Rbd0")["bdevs"][0]["bytes_written"]


def writers(seed) -> BackgroundWriters:
    """Four writers of 8 MiB each over the first 32 MiB, 16 KiB requests."""
    return BackgroundWriters(seed, count=4, slice_bytes=PATTERN_BYTES // 4, request_bytes=REQUEST_BYTES)


def guest_writing(vhostd, boot_guest, cluster, image, jobs, **device):
    """A vhostd serving the image, a guest on it and its writers under way (32 requests' bytes
    completed); (daemon, guest)."""
    d = vhostd()
    serve(d, cluster, image)
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0", num_queues=2,
                                                **device)], smp=2)
    jobs.start(guest)
    wait_for(lambda: bytes_written(d) >= 32 * REQUEST_BYTES, timeout=guest.scaled(60),
             interval=0.02)
    return d, guest


def unregistered(d, cluster_name) -> bool:
    """bdev_rbd_unregister_cluster succeeded (it is refused while an image is open through it)."""
    try:
        d.rpc("bdev_rbd_unregister_cluster", name=cluster_name)
    except RpcCallError as exc:
        assert "is used by" in exc.message, exc
        return False
    return True


def check_exported(cluster, image, guest_image, tmp_path, seed):
    """rbd export: the pattern over the first 32 MiB, zeros after it."""
    exported = tmp_path / "export.raw"
    exported.write_bytes(cluster.export_image(image))
    guest_image.patterns.check_file(exported, seed, 0, PATTERN_BYTES)
    guest_image.patterns.check_file(exported, "zero", PATTERN_BYTES, DISK_BYTES - PATTERN_BYTES)


def test_osd_killed_and_restarted_stalls_the_guest_without_an_error(
        own_ceph_cluster, image, vhostd, boot_guest, guest_image, tmp_path):
    cluster = own_ceph_cluster
    seed = 21
    jobs = writers(seed)
    d, guest = guest_writing(vhostd, boot_guest, cluster, image, jobs)
    cluster.kill("osd.0")
    killed_at = time.monotonic()
    before = bytes_written(d)
    assert before < PATTERN_BYTES, "the writers finished before the OSD was killed"
    time.sleep(OSD_OUTAGE_S)
    stalled = bytes_written(d)
    cluster.restart("osd.0")
    restarted_at = time.monotonic()
    wait_for(lambda: bytes_written(d) > stalled, timeout=guest.scaled(120), interval=0.05)
    resumed_at = time.monotonic()
    print(f"OSD killed after {before >> 10} KiB of {PATTERN_BYTES >> 10} KiB; "
          f"{(stalled - before) >> 10} KiB completed while it was dead; I/O resumed "
          f"{resumed_at - restarted_at:.1f} s after the restart, a stall of "
          f"{resumed_at - killed_at:.1f} s")
    assert jobs.wait(guest) == [0] * jobs.count, jobs.logs(guest)
    assert io_errors_in_dmesg(guest) == ""
    assert guest.poweroff() == 0
    d.spdk("bdev_rbd_delete", "Rbd0")             # closes the image: every write is in the cluster
    check_exported(cluster, image, guest_image, tmp_path, seed)


def test_vhostd_killed_and_restarted_from_saved_config_under_a_writing_guest(
        own_ceph_cluster, image, vhostd, boot_guest, guest_image, tmp_path):
    cluster = own_ceph_cluster
    seed = 23
    jobs = writers(seed)
    d, guest = guest_writing(vhostd, boot_guest, cluster, image, jobs, reconnect_s=1)
    config = tmp_path / "saved.json"
    config.write_text(json.dumps(d.spdk("save_config")))
    before = bytes_written(d)
    d.kill()
    assert before < PATTERN_BYTES, "the writers finished before vhostd was killed"
    restarted_at = time.monotonic()
    fresh = vhostd(config=str(config), after=d)
    # It answers RPC before its config is applied: the bdev comes when the image is open.
    wait_for(lambda: fresh.rpc("bdev_get_bdevs") != [], timeout=60, interval=0.1)
    # The dead process still owns the image's exclusive lock: the new one's first write waits
    # until the OSD drops the dead client's watch, then librbd breaks the lock.
    wait_for(lambda: bytes_written(fresh) > 0, timeout=guest.scaled(180), interval=0.05)
    print(f"vhostd killed after {before >> 10} KiB of {PATTERN_BYTES >> 10} KiB; the restarted "
          f"one completed its first write {time.monotonic() - restarted_at:.1f} s after it started")
    assert jobs.wait(guest) == [0] * jobs.count, jobs.logs(guest)
    assert io_errors_in_dmesg(guest) == ""
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern("/dev/vda", seed, 0, PATTERN_BYTES, direct=True)
    assert guest.poweroff() == 0
    fresh.spdk("bdev_rbd_delete", "Rbd0")
    check_exported(cluster, image, guest_image, tmp_path, seed)


def test_whole_cluster_stopped_gives_the_guest_errors_and_vhostd_stays_up(
        own_ceph_cluster, image, vhostd, boot_guest, guest_image, tmp_path):
    cluster = own_ceph_cluster
    d = vhostd()
    serve(d, cluster, image, config_param=["rados_osd_op_timeout=%d" % OSD_OP_TIMEOUT_S,
                                           "rados_mon_op_timeout=%d" % OSD_OP_TIMEOUT_S])
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0")])
    guest.write_pattern("/dev/vda", 25, 0, MIB, direct=True)      # the image's lock is held now
    try:
        cluster.stop()
        t0 = time.monotonic()
        # librbd acknowledges writes from its cache once the guest has flushed (rbd_cache, writeback
        # after the first flush), so the error comes with the fsync that follows them.
        rc, out = guest.run(pattern_command("write", 25, "/dev/vda", 8 * MIB, 64 << 10,
                                            direct=True, sync=True),
                            timeout_s=3 * OSD_OP_TIMEOUT_S)
        write_error_s = time.monotonic() - t0
        t0 = time.monotonic()
        read_rc, read_out = guest.run(pattern_command("check", 25, "/dev/vda", 0, MIB,
                                                      direct=True), timeout_s=3 * OSD_OP_TIMEOUT_S)
        read_error_s = time.monotonic() - t0
        print(f"with the cluster stopped: a write + fsync failed after {write_error_s:.1f} s "
              f"({out.strip()}), a read after {read_error_s:.1f} s ({read_out.strip()})")
        assert rc != 0 and read_rc != 0
        assert "I/O error" in io_errors_in_dmesg(guest)
        assert d.rpc("bdev_get_bdevs", name="Rbd0")[0]["name"] == "Rbd0"     # answers RPC
        stat = d.rpc("bdev_get_iostat", name="Rbd0")["bdevs"][0]
        assert stat["num_write_ops"] >= 1
        t0 = time.monotonic()
        assert d.rpc("bdev_rbd_delete", name="Rbd0") is True
        delete_s = time.monotonic() - t0
        print(f"bdev_rbd_delete with the cluster stopped answered in {delete_s:.1f} s")
        assert d.rpc("bdev_get_bdevs") == []
        # The guest's queues still held the disk: the image closes once they detach.
        assert guest.poweroff() == 0
        t0 = time.monotonic()
        wait_for(lambda: unregistered(d, "c0"), timeout=guest.scaled(120), interval=0.5)
        print(f"after the guest went away the image was closed and the cluster unregistered "
              f"within {time.monotonic() - t0:.1f} s")
        assert d.rpc("spdk_get_version")["version"]
    finally:
        cluster.start_again()
    exported = tmp_path / "export.raw"
    exported.write_bytes(cluster.export_image(image))
    guest_image.patterns.check_file(exported, 25, 0, MIB)
