"""One RBD image served by two vhostd processes (two hosts sharing the store), driven by our own
virtio-blk front-end: hand-over after bdev_rbd_delete, and two read-write holders at once under
librbd's exclusive lock (the owner yields the lock to a writer that asks; no lock policy is set)."""

import json
import time

from vhostd.initiator.blk import VirtioBlk

SECTOR = 512


def serve(d, ceph, image):
    d.spdk("bdev_rbd_register_cluster", "c0", "--user", "admin", "--config-file", str(ceph.conf))
    d.spdk("bdev_rbd_create", "-b", "r0", "-c", "c0", "rbd", image, "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "r0")


def frontend(d):
    return VirtioBlk(str(d.socket_dir / "vhost.0"), num_queues=1, queue_size=64,
                     memory_bytes=4 << 20).open()


def lock_owner(ceph, image):
    """The client holding the image's exclusive lock (``rbd lock ls``), or None."""
    locks = json.loads(ceph.rbd("lock", "ls", "--format", "json", "rbd/" + image) or "[]")
    if isinstance(locks, dict):          # older rbd: {lock id: {locker, address}}
        locks = [dict(v, id=k) for k, v in locks.items()]
    return locks[0]["locker"] if locks else None


def timed_write(dev, sector, data):
    t0 = time.monotonic()
    dev.write(sector, data)
    return time.monotonic() - t0


def test_second_process_serves_what_the_first_wrote_after_it_released_the_image(
        ceph_cluster, rbd_image, daemon):
    image = rbd_image(16 << 20)
    first, second = daemon(), daemon()
    serve(first, ceph_cluster, image)
    data = bytes(range(256)) * 256                 # 64 KiB
    with frontend(first) as dev:
        dev.write(4096, data)
        dev.flush()
    assert lock_owner(ceph_cluster, image) is not None
    first.spdk("bdev_rbd_delete", "r0")            # closes the image: the lock is dropped
    assert lock_owner(ceph_cluster, image) is None
    serve(second, ceph_cluster, image)
    with frontend(second) as dev:
        assert dev.read(4096, len(data)) == data
        dev.write(0, b"\x5a" * 4096)
    assert ceph_cluster.export_image(image)[:4096] == b"\x5a" * 4096


def test_two_processes_writing_one_image_hand_the_exclusive_lock_over(
        ceph_cluster, rbd_image, daemon):
    image = rbd_image(16 << 20)
    first, second = daemon(), daemon()
    serve(first, ceph_cluster, image)
    serve(second, ceph_cluster, image)             # both open read-write: allowed
    a, b, c = b"\xaa" * 4096, b"\xbb" * 4096, b"\xcc" * 4096
    with frontend(first) as one, frontend(second) as two:
        timed_write(one, 0, a)
        owner_one = lock_owner(ceph_cluster, image)
        handover_s = timed_write(two, 8, b)        # asks the owner, which yields the lock
        owner_two = lock_owner(ceph_cluster, image)
        assert owner_one is not None and owner_two is not None and owner_one != owner_two
        assert one.read(8, 4096) == b               # the first sees the second's write
        back_s = timed_write(one, 16, c)
        assert lock_owner(ceph_cluster, image) == owner_one
        assert two.read(0, 4096) == a and two.read(16, 4096) == c
        steady = [timed_write(one, 24 + 8 * i, a) for i in range(8)]
        print("lock hand-over writes: %.3f s and %.3f s; writes by the owner: %.3f s median"
              % (handover_s, back_s, sorted(steady)[len(steady) // 2]))
    exported = ceph_cluster.export_image(image)
    assert exported[:4096] == a and exported[8 * SECTOR:8 * SECTOR + 4096] == b
    assert exported[16 * SECTOR:16 * SECTOR + 4096] == c
    for d in (first, second):
        assert d.rpc("bdev_get_iostat", name="r0")["bdevs"][0]["num_write_ops"] >= 1
        d.spdk("bdev_rbd_delete", "r0")
