"""RBD bdevs on a real one-node Ceph cluster: every bdev_rbd_* method, param and error through
SPDK's own rpc.py, our front-end writing and reading an RBD bdev through a blk controller (bytes
checked with `rbd export`), and vhostd without librbd."""

import json
import time

import pytest

from tests.helpers.ports import free_tcp_port
from tests.helpers.daemon import SpdkRpcError
from tests.helpers.waiting import wait_for
from vhostd.initiator.blk import VirtioBlk


def spdk_error(d, *args):
    with pytest.raises(SpdkRpcError) as exc:
        d.spdk(*args)
    return exc.value.error()


def register(d, ceph, name="c0"):
    return d.spdk("bdev_rbd_register_cluster", name, "--user", "admin",
                  "--config-file", str(ceph.conf))


def inline_config(ceph):
    """--config/--config-param pairs that reach the cluster without any file."""
    return ["mon_host=" + ceph.mon_host, "key=" + ceph.admin_key()]


def test_cluster_and_bdev_lifecycle_through_spdk_rpc(ceph_cluster, rbd_image, daemon):
    d = daemon()
    image = rbd_image(64 << 20)
    assert spdk_error(d, "bdev_rbd_get_clusters_info")["code"] == -2
    assert register(d, ceph_cluster) == "c0"
    assert spdk_error(d, "bdev_rbd_register_cluster", "c0")["code"] == -1      # duplicate
    info = {"cluster_name": "c0", "user_id": "admin", "config_file": str(ceph_cluster.conf)}
    assert d.spdk("bdev_rbd_get_clusters_info", "-b", "c0") == info
    assert d.spdk("bdev_rbd_get_clusters_info") == [info]
    assert spdk_error(d, "bdev_rbd_get_clusters_info", "-b", "nope") == {
        "code": -2, "message": "No such file or directory"}

    assert d.spdk("bdev_rbd_create", "-b", "r0", "-c", "c0", "rbd", image, "4096") == "r0"
    (bdev,) = d.spdk("bdev_get_bdevs", "-b", "r0")
    assert bdev["product_name"] == "Ceph Rbd Disk"
    assert (bdev["block_size"], bdev["num_blocks"]) == (4096, (64 << 20) // 4096)
    assert bdev["driver_specific"] == {"rbd": {"pool_name": "rbd", "rbd_name": image,
                                               "user_id": "admin",
                                               "config_file": str(ceph_cluster.conf)}}
    assert bdev["supported_io_types"]["unmap"] and bdev["supported_io_types"]["write_zeroes"]
    assert spdk_error(d, "bdev_rbd_create", "-b", "r0", "-c", "c0", "rbd", image, "4096")["code"] == -17
    assert spdk_error(d, "bdev_rbd_unregister_cluster", "c0")["code"] == -1   # in use

    d.spdk("bdev_rbd_resize", "r0", "96")
    assert d.spdk("bdev_get_bdevs", "-b", "r0")[0]["num_blocks"] == (96 << 20) // 4096
    assert ceph_cluster.image_size(image) == 96 << 20
    d.spdk("bdev_rbd_resize", "r0", "96")                                    # equal is fine
    assert spdk_error(d, "bdev_rbd_resize", "r0", "32")["code"] == -22       # no shrinking
    assert spdk_error(d, "bdev_rbd_resize", "nope", "128")["code"] == -19
    d.spdk("bdev_null_create", "n0", "8", "512")
    assert spdk_error(d, "bdev_rbd_resize", "n0", "128")["code"] == -22
    assert spdk_error(d, "bdev_rbd_delete", "n0") == {"code": -19, "message": "No such device"}

    d.spdk("bdev_rbd_delete", "r0")
    assert spdk_error(d, "bdev_rbd_delete", "r0")["code"] == -19
    d.spdk("bdev_rbd_unregister_cluster", "c0")
    assert spdk_error(d, "bdev_rbd_unregister_cluster", "c0")["code"] == -1
    assert spdk_error(d, "bdev_rbd_get_clusters_info")["code"] == -2


def test_bdev_with_its_own_connection_and_default_name(ceph_cluster, rbd_image, daemon):
    d = daemon()
    image = rbd_image(16 << 20)
    pairs = inline_config(ceph_cluster)
    args = [a for pair in pairs for a in ("--config", pair)]
    assert spdk_error(d, "bdev_rbd_create", *args, "rbd", image, "0")["code"] == -22
    assert d.spdk("bdev_rbd_create", "--user", "admin", *args, "-r", "rbd", image, "512") == "Ceph0"
    (bdev,) = d.spdk("bdev_get_bdevs", "-b", "Ceph0")
    assert bdev["driver_specific"]["rbd"] == {
        "pool_name": "rbd", "rbd_name": image, "user_id": "admin",
        "config": dict(p.split("=", 1) for p in pairs)}
    assert not bdev["supported_io_types"]["write"]                           # -r: read-only
    d.spdk("bdev_rbd_delete", "Ceph0")


def test_failures_answer_within_bounded_time(ceph_cluster, rbd_image, daemon):
    d = daemon()
    image = rbd_image(8 << 20)
    register(d, ceph_cluster)
    t0 = time.monotonic()
    bad_pool = spdk_error(d, "bdev_rbd_create", "-c", "c0", "nopool", image, "512")
    bad_image = spdk_error(d, "bdev_rbd_create", "-c", "c0", "rbd", "no-such-image", "512")
    no_cluster = spdk_error(d, "bdev_rbd_create", "-c", "nope", "rbd", image, "512")
    assert time.monotonic() - t0 < 20
    assert bad_pool["code"] == bad_image["code"] == no_cluster["code"] == -1
    assert "nopool" in bad_pool["message"] and "no-such-image" in bad_image["message"]

    unreachable = ["--config-param", "mon_host=127.0.0.1:%d" % free_tcp_port(),
                   "--config-param", "client_mount_timeout=3"]
    t0 = time.monotonic()
    err = spdk_error(d, "bdev_rbd_register_cluster", "c1", *unreachable)
    assert err["code"] == -1 and "timed out" in err["message"]
    assert time.monotonic() - t0 < 25
    wrong_key = ["--config-param", "mon_host=" + ceph_cluster.mon_host,
                 "--config-param", "key=AQBKp1xmAAAAABAAhbQ3Exr0uXjPqDkvGg0ryw==",
                 "--config-param", "client_mount_timeout=5"]
    err = spdk_error(d, "bdev_rbd_register_cluster", "c2", "--user", "admin", *wrong_key)
    assert err["code"] == -1
    assert spdk_error(d, "bdev_rbd_register_cluster", "c3", "--key-file", "/nonexistent")["code"] == -1
    assert spdk_error(d, "bdev_rbd_register_cluster", "c4", "--core-mask", "0xzz")["code"] == -1
    assert [c["cluster_name"] for c in d.spdk("bdev_rbd_get_clusters_info")] == ["c0"]
    assert d.rpc("bdev_malloc_create", num_blocks=16, block_size=512) == "Malloc0"   # still serving


def test_save_config_and_load_config_round_trip(ceph_cluster, rbd_image, daemon):
    d = daemon()
    image = rbd_image(8 << 20)
    register(d, ceph_cluster)
    d.spdk("bdev_rbd_create", "-b", "shared", "-c", "c0", "rbd", image, "4096")
    saved = d.spdk("save_config")
    bdev_entries = next(s for s in saved["subsystems"] if s["subsystem"] == "bdev")["config"]
    methods = [e["method"] for e in bdev_entries]
    assert methods.index("bdev_rbd_register_cluster") < methods.index("bdev_rbd_create")
    assert "key" not in json.dumps(bdev_entries).replace("key_file", "")
    before = d.spdk("bdev_get_bdevs", "-b", "shared")
    d.spdk("bdev_rbd_delete", "shared")        # the image is opened once at a time
    fresh = daemon()
    fresh.spdk("load_config", stdin=json.dumps(saved))
    assert fresh.spdk("bdev_get_bdevs", "-b", "shared") == before
    assert fresh.spdk("bdev_rbd_get_clusters_info", "-b", "c0")["config_file"] == str(ceph_cluster.conf)


def test_frontend_writes_and_reads_through_a_blk_controller(ceph_cluster, rbd_image, daemon):
    d = daemon()
    image = rbd_image(16 << 20)
    register(d, ceph_cluster)
    d.spdk("bdev_rbd_create", "-b", "r0", "-c", "c0", "rbd", image, "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "r0")
    data = bytes(range(256)) * 64                  # 16 KiB, four 4 KiB segments
    with VirtioBlk(str(d.socket_dir / "vhost.0"), num_queues=2, queue_size=64,
                   memory_bytes=8 << 20).open() as dev:
        assert dev.config.capacity == (16 << 20) // 512
        dev.write(2048, data, queue=1)
        dev.write(4096, b"\xa5" * 8192)
        dev.flush()
        assert dev.read(2048, len(data), segment_bytes=4096) == data
        dev.write_zeroes([(4096, 8)])
        assert dev.read(4096, 8192) == bytes(4096) + b"\xa5" * 4096
    exported = ceph_cluster.export_image(image)
    assert exported[2048 * 512:2048 * 512 + len(data)] == data
    assert exported[4096 * 512:4096 * 512 + 8192] == bytes(4096) + b"\xa5" * 4096
    assert exported[:2048 * 512] == bytes(2048 * 512)
    stat = d.rpc("bdev_get_iostat", names=["r0"])["bdevs"][0]
    assert stat["num_write_ops"] >= 2 and stat["bytes_read"] >= len(data)


def test_without_librbd_other_bdevs_work_and_rbd_methods_say_what_is_missing(daemon):
    d = daemon(env={"VHOSTD_LIBRBD": "libvhostd-test-missing.so.1"})
    err = spdk_error(d, "bdev_rbd_register_cluster", "c0")
    assert err["code"] == -1
    assert "librbd1" in err["message"] and "libvhostd-test-missing.so.1" in err["message"]
    err = spdk_error(d, "bdev_rbd_create", "rbd", "img", "512")
    assert "librbd" in err["message"]
    assert d.spdk("bdev_malloc_create", "-b", "m0", "1", "512") == "m0"
    d.spdk("vhost_create_blk_controller", "vhost.0", "m0")
    with VirtioBlk(str(d.socket_dir / "vhost.0"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        dev.write(0, b"\x5a" * 512)
        assert dev.read(0, 512) == b"\x5a" * 512


def test_an_image_is_opened_once_per_process(ceph_cluster, rbd_image, daemon):
    d = daemon()
    image = rbd_image(8 << 20)
    register(d, ceph_cluster)
    register(d, ceph_cluster, "c1")             # a second connection to the same cluster
    d.spdk("bdev_rbd_create", "-b", "r0", "-c", "c0", "rbd", image, "512")
    pairs = [a for pair in inline_config(ceph_cluster) for a in ("--config", pair)]
    for how in (["-c", "c0"], ["-c", "c1"], ["--user", "admin", *pairs]):
        err = spdk_error(d, "bdev_rbd_create", "-b", "r1", *how, "rbd", image, "512")
        assert err["code"] == -16, err
        assert err["message"].startswith("Device or resource busy: image rbd/%s is already open "
                                          "as bdev r0" % image), err
    assert spdk_error(d, "bdev_rbd_unregister_cluster", "c0")["code"] == -1      # r0 uses it
    d.spdk("bdev_rbd_unregister_cluster", "c1")
    assert [b["name"] for b in d.spdk("bdev_get_bdevs")] == ["r0"]
    d.spdk("bdev_rbd_delete", "r0")
    assert d.spdk("bdev_rbd_create", "-b", "r1", "-c", "c0", "rbd", image, "512") == "r1"


def test_delete_under_a_connected_frontend_closes_the_image_when_it_disconnects(
        ceph_cluster, rbd_image, daemon):
    d = daemon()
    image = rbd_image(8 << 20)
    register(d, ceph_cluster)
    d.spdk("bdev_rbd_create", "-b", "r0", "-c", "c0", "rbd", image, "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "r0")
    dev = VirtioBlk(str(d.socket_dir / "vhost.0"), num_queues=1, queue_size=64,
                    memory_bytes=4 << 20).open()
    try:
        dev.write(0, b"\x11" * 4096)
        # Answers (within the client's 60 s) although the connected queue still holds the disk.
        assert d.rpc("bdev_rbd_delete", name="r0") is True
        assert spdk_error(d, "bdev_rbd_create", "-b", "r1", "-c", "c0", "rbd", image,
                          "512")["code"] == -16                 # still open
        assert spdk_error(d, "bdev_rbd_unregister_cluster", "c0")["code"] == -1
    finally:
        dev.close()
    wait_for(lambda: d.spdk("bdev_rbd_create", "-b", "r1", "-c", "c0", "rbd", image, "512",
                            check=False) == "r1", timeout=30, interval=0.2)
    assert ceph_cluster.export_image(image)[:4096] == b"\x11" * 4096
