"""vhost-blk controllers created with SPDK's rpc.py on a real daemon, served to our front-end."""

import fcntl
import json
import os
import resource
import socket
import threading
import time

import pytest

from tests.helpers.daemon import SpdkRpcError
from tests.helpers.waiting import wait_for
from vhostd.initiator.blk import VirtioBlk
from vhostd.initiator.frontend import PROTOCOL_FEATURES
from vhostd.rpc.client import RpcCallError
from vhostd.vhost import protocol as p


def rpc_error(d, method, **params):
    with pytest.raises(RpcCallError) as exc:
        d.rpc(method, **params)
    return exc.value.code, exc.value.message


def test_blk_controller_serves_io_and_reports_it(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "16", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    sock = str(d.socket_dir / "vhost.0")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    with VirtioBlk(sock, num_queues=2, queue_size=64, memory_bytes=16 << 20).open() as dev:
        assert dev.config.size_bytes == 16 << 20
        dev.write(4096, b"\xa5" * 8192, queue=1)
        assert dev.read(4096, 8192) == b"\xa5" * 8192
        dev.flush()
        assert dev.get_id().rstrip(b"\0") == b"M0"
        (info,) = d.spdk("vhost_get_controllers")
        assert info["ctrlr"] == "vhost.0" and info["socket"] == sock
        assert info["backend_specific"] == {"block": {"readonly": False, "bdev": "M0",
                                                      "transport": "vhost_user_blk"}}
        (session,) = info["sessions"]
        assert session["started"] is True and session["name"] == "vhost.0s%d" % session["vid"]
        stat = d.spdk("bdev_get_iostat", "--names", "M0")["bdevs"][0]
        assert stat["num_write_ops"] == 1 and stat["bytes_written"] == 8192 and stat["num_read_ops"] >= 1
        threads = [t["name"] for t in d.spdk("thread_get_stats")["threads"]]
        assert "vhost.0" in threads
    config = d.spdk("framework_get_config", "vhost_blk")
    assert config == [{"method": "vhost_create_blk_controller", "params": {
        "ctrlr": "vhost.0", "dev_name": "M0", "cpumask": "1", "readonly": False, "transport": "vhost_user_blk"}}]


def test_resizing_a_null_bdev_sends_config_change_and_get_config_shows_the_new_capacity(daemon):
    d = daemon()
    d.spdk("bdev_null_create", "N0", "16", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "N0")
    sock = str(d.socket_dir / "vhost.0")
    with VirtioBlk(sock, protocol_features=PROTOCOL_FEATURES).open() as dev:
        assert dev.frontend.backend_requests is not None and dev.config.size_bytes == 16 << 20
        d.spdk("bdev_null_resize", "N0", "48")
        msg = dev.frontend.backend_request(timeout_s=10.0)
        assert (msg.request, msg.flags, msg.payload) == (p.BackendRequest.CONFIG_CHANGE_MSG, p.VERSION, b"")
        assert dev.read_config().size_bytes == 48 << 20
        # Blocks past the old end are served now (a null disk's reads move no data, as SPDK's:
        # only the status says it was served; a block past the end would fail with BlkError).
        dev.write((40 << 20) // 512, b"\x5a" * 4096)
        assert len(dev.read((40 << 20) // 512, 4096)) == 4096


def test_an_aio_rescan_of_a_grown_file_is_announced_like_a_resize(daemon, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 << 20))
    d = daemon()
    d.spdk("bdev_aio_create", str(image), "A0", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "A0")
    with VirtioBlk(str(d.socket_dir / "vhost.0"), protocol_features=PROTOCOL_FEATURES).open() as dev:
        os.truncate(image, 24 << 20)
        d.spdk("bdev_aio_rescan", "A0")
        assert dev.frontend.backend_request(timeout_s=10.0).request == p.BackendRequest.CONFIG_CHANGE_MSG
        assert dev.read_config().size_bytes == 24 << 20


def test_a_front_end_without_backend_req_still_reads_the_new_capacity(daemon):
    d = daemon()
    d.spdk("bdev_null_create", "N0", "16", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "N0")
    with VirtioBlk(str(d.socket_dir / "vhost.0")).open() as dev:
        assert dev.frontend.backend_requests is None
        d.spdk("bdev_null_resize", "N0", "32")
        assert dev.read_config().size_bytes == 32 << 20


def test_blk_controller_errors(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    assert rpc_error(d, "vhost_create_blk_controller", ctrlr="v", dev_name="nope") == (-32602, "No such device")
    d.rpc("vhost_create_blk_controller", ctrlr="v", dev_name="M0")
    assert rpc_error(d, "vhost_create_blk_controller", ctrlr="v", dev_name="M0") == (-32602, "File exists")
    assert rpc_error(d, "vhost_create_blk_controller", ctrlr="w", dev_name="M0", cpumask="0x2") == \
        (-32602, "Invalid argument")
    assert rpc_error(d, "vhost_create_blk_controller", ctrlr="../escape", dev_name="M0") == \
        (-32602, "Invalid argument")
    assert rpc_error(d, "vhost_delete_controller", ctrlr="nope") == (-32602, "No such device")
    assert rpc_error(d, "vhost_get_controllers", name="nope") == (-32603, "No such device")
    assert rpc_error(d, "vhost_controller_set_coalescing", ctrlr="v", delay_base_us=10,
                     iops_threshold=5) == (-32602, "Invalid argument")
    # Unknown keys are ignored by this method (SPDK's relaxed decoder); it still needs its own.
    d.rpc("vhost_create_blk_controller", ctrlr="x", dev_name=d.rpc("bdev_get_bdevs")[0]["uuid"], future_key=1)
    assert [c["ctrlr"] for c in d.rpc("vhost_get_controllers")] == ["v", "x"]
    (info,) = d.rpc("vhost_get_controllers", name="x")
    assert info["backend_specific"]["block"]["bdev"] == "M0"


def test_packed_ring_controller_offers_ring_packed_and_keeps_it_in_the_config(daemon):
    """SPDK's rpc.py --packed-ring: RING_PACKED (bit 34) offered; without it, not (as SPDK)."""
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "--packed-ring", "pk", "M0")
    d.spdk("vhost_create_blk_controller", "sp", "M0")
    with VirtioBlk(str(d.socket_dir / "pk"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        assert dev.frontend.offered_features & 1 << 34 and not dev.has(34)   # offered; split used
    with VirtioBlk(str(d.socket_dir / "sp"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        assert not dev.frontend.offered_features & 1 << 34
    params = {e["params"]["ctrlr"]: e["params"] for e in d.spdk("framework_get_config", "vhost_blk")}
    assert params["pk"]["packed_ring"] is True and "packed_ring" not in params["sp"]


def test_readonly_controller_offers_ro_and_refuses_writes(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "-r", "ro", "M0")
    with VirtioBlk(str(d.socket_dir / "ro"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        assert dev.has(5)
        assert dev.request(1, 0, data_out=b"\0" * 512).status == 1


def test_coalescing_is_stored_reported_and_saved(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    d.spdk("vhost_controller_set_coalescing", "vhost.0", "50", "1000")
    (info,) = d.rpc("vhost_get_controllers")
    assert (info["delay_base_us"], info["iops_threshold"]) == (50, 1000)
    assert {"method": "vhost_controller_set_coalescing", "params": {
        "ctrlr": "vhost.0", "delay_base_us": 50, "iops_threshold": 1000}} in d.rpc("framework_get_config", name="vhost_blk")


def test_delete_waits_for_the_front_end_to_leave(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    dev = VirtioBlk(str(d.socket_dir / "vhost.0"), queue_size=64, memory_bytes=8 << 20).open()
    done = threading.Event()

    def delete():
        d.rpc("vhost_delete_controller", ctrlr="vhost.0")
        done.set()

    t = threading.Thread(target=delete)
    t.start()
    time.sleep(0.5)
    assert not done.is_set()
    assert dev.read(0, 512) == bytes(512)      # still served while the delete waits
    dev.close()
    assert done.wait(10)
    t.join()
    assert d.rpc("vhost_get_controllers") == []
    assert not (d.socket_dir / "vhost.0").exists()


def test_deleting_a_bdev_under_a_controller_fails_its_io(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    with VirtioBlk(str(d.socket_dir / "vhost.0"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        dev.write(0, b"\1" * 512)
        d.spdk("bdev_malloc_delete", "M0")
        assert dev.request(0, 0, data_in_len=512).status == 1
        (info,) = d.rpc("vhost_get_controllers")
        assert info["backend_specific"]["block"]["bdev"] is None
        # Nothing could recreate it: save_config leaves it out rather than write an empty dev_name.
        assert d.spdk("framework_get_config", "vhost_blk") == []
    d.spdk("vhost_delete_controller", "vhost.0")


def test_a_file_bdev_deleted_under_a_front_end_is_closed_when_the_front_end_leaves(daemon, tmp_path):
    d = daemon()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    d.spdk("bdev_aio_create", str(image), "F0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "F0")

    def file_fds():
        fd_dir = "/proc/%d/fd" % d.proc.pid
        found = []
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == str(image):
                    found.append(fd)
            except FileNotFoundError:       # closed between listing and reading: not the image's
                pass
        return found

    with VirtioBlk(str(d.socket_dir / "vhost.0"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        dev.write(0, b"\1" * 512)
        d.spdk("bdev_aio_delete", "F0")
        assert dev.request(0, 0, data_in_len=512).status == 1
        assert file_fds()                  # the queue still holds the disk
    # Its last queue gone, the removed disk is closed although the controller stays.
    wait_for(lambda: not file_fds(), timeout=5, interval=0.05)
    assert [c["ctrlr"] for c in d.rpc("vhost_get_controllers")] == ["vhost.0"]


def test_the_inflight_region_handed_to_the_front_end_cannot_be_shrunk(daemon):
    """A front-end that could truncate the inflight memfd would make the daemon fault (SIGBUS)
    on its next access to it, taking every controller down: the region comes sealed."""
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    with VirtioBlk(str(d.socket_dir / "vhost.0"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        _, fd = dev.frontend.inflight
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        dev.write(0, b"\x77" * 4096)
        assert dev.read(0, 4096) == b"\x77" * 4096
    assert d.proc.poll() is None


def test_a_controller_accepts_again_after_the_daemon_ran_out_of_fds(daemon):
    d = daemon("-L", "INFO")
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    sock = str(d.socket_dir / "vhost.0")
    limits = resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/%d/fd" % d.proc.pid))
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (in_use, limits[1]))
    try:
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(sock)              # accepting it fails with EMFILE
            wait_for(lambda: "accepting a front-end failed" in d.log(), timeout=5, interval=0.05)
    finally:
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, limits)
    with VirtioBlk(sock, queue_size=64, memory_bytes=8 << 20).open() as dev:
        dev.write(0, b"\x42" * 512)
        assert dev.read(0, 512) == b"\x42" * 512


def test_controllers_survive_save_and_load_config(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "--cpumask", "0x1", "vhost.0", "M0")
    saved = d.spdk("save_config")
    fresh = daemon()
    fresh.spdk("load_config", stdin=json.dumps(saved))
    assert [c["ctrlr"] for c in fresh.rpc("vhost_get_controllers")] == ["vhost.0"]
    assert (fresh.socket_dir / "vhost.0").exists()


def test_virtio_attach_consumes_another_daemons_controller(daemon):
    target = daemon()
    target.spdk("bdev_malloc_create", "-b", "M0", "16", "512")
    target.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    d = daemon()
    sock = str(target.socket_dir / "vhost.0")
    assert d.spdk("bdev_virtio_attach_controller", "-t", "user", "-a", sock, "-d", "blk", "VirtioBlk0") == "VirtioBlk0"  # printed one name per line
    (bdev,) = d.rpc("bdev_get_bdevs", name="VirtioBlk0")
    assert bdev["num_blocks"] == 32768 and bdev["product_name"] == "VirtioBlk Disk"
    # Serve it again to our own front-end: I/O crosses both daemons.
    d.spdk("vhost_create_blk_controller", "vhost.1", "VirtioBlk0")
    with VirtioBlk(str(d.socket_dir / "vhost.1"), queue_size=64, memory_bytes=8 << 20).open() as dev:
        dev.write(8192, b"\x3c" * 65536)
        assert dev.read(8192, 65536) == b"\x3c" * 65536
    assert target.rpc("bdev_get_iostat")["bdevs"][0]["bytes_written"] == 65536
    d.spdk("vhost_delete_controller", "vhost.1")
    d.spdk("bdev_virtio_detach_controller", "VirtioBlk0")
    assert d.rpc("bdev_get_bdevs") == []
    with pytest.raises(SpdkRpcError):
        d.spdk("bdev_virtio_detach_controller", "VirtioBlk0")
