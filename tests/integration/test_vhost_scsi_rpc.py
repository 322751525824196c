"""vhost-scsi controllers made with SPDK's rpc.py on a real daemon and driven by our virtio-scsi
front-end over the controller socket: targets, claims, errors, config round trip, commands,
task management, and hot-plug events while I/O runs on another target."""

import json
import os
import struct
import threading

import pytest

from vhostd.initiator import scsi as vs
from vhostd.initiator.scsi import VirtioScsi
from vhostd.rpc.client import RpcCallError


def rpc_error(d, method, **params):
    with pytest.raises(RpcCallError) as exc:
        d.rpc(method, **params)
    return exc.value.code, exc.value.message


def open_scsi(d, name, **kw):
    return VirtioScsi(str(d.socket_dir / name), memory_bytes=32 << 20, **kw).open()


def test_scsi_controller_targets_and_reporting_through_spdk_rpc(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "16", "512")
    d.spdk("bdev_malloc_create", "-b", "M1", "8", "4096")
    d.spdk("bdev_null_create", "N0", "64", "512")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    sock = d.socket_dir / "vhost.0"
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    assert d.spdk("vhost_scsi_controller_add_target", "vhost.0", "-1", "M0") == 0
    assert d.spdk("vhost_scsi_controller_add_target", "vhost.0", "5", "M1") == 5
    assert d.rpc("add_lun", ctrlr="vhost.0", bdev_name="N0") == 1
    (info,) = d.spdk("vhost_get_controllers")
    assert info["ctrlr"] == "vhost.0" and info["socket"] == str(sock) and info["sessions"] == []
    targets = info["backend_specific"]["scsi"]
    assert [(t["scsi_dev_num"], t["target_name"], t["luns"]) for t in targets] == [
        (0, "Target 0", [{"id": 0, "bdev_name": "M0"}]), (1, "Target 1", [{"id": 0, "bdev_name": "N0"}]),
        (5, "Target 5", [{"id": 0, "bdev_name": "M1"}])]
    assert len({t["id"] for t in targets}) == 3
    (m0,) = d.spdk("bdev_get_bdevs", "-b", "M0")
    assert m0["claimed"] is True
    with pytest.raises(Exception):
        d.spdk("bdev_malloc_delete", "M0")            # claimed by target 0
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="vhost.0", scsi_target_num=2,
                     bdev_name="M0") == (-32602, "Device or resource busy")   # claimed twice
    d.spdk("vhost_scsi_controller_remove_target", "vhost.0", "5")
    assert d.spdk("bdev_get_bdevs", "-b", "M1")[0]["claimed"] is False
    d.spdk("bdev_malloc_delete", "M1")
    d.spdk("vhost_delete_controller", "vhost.0")
    assert not sock.exists()
    assert d.spdk("bdev_get_bdevs", "-b", "M0")[0]["claimed"] is False


def test_resizing_a_target_bdev_gives_one_capacity_unit_attention_then_the_new_size(daemon):
    d = daemon()
    d.spdk("bdev_null_create", "N0", "16", "512")
    d.spdk("bdev_null_create", "N1", "16", "512")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "N0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "1", "N1")
    with open_scsi(d, "vhost.0") as dev:
        assert dev.read_capacity(0) == (32768, 512)
        d.spdk("bdev_null_resize", "N0", "48")
        assert dev.test_unit_ready(1).ok                       # another target: nothing to report
        result = dev.test_unit_ready(0)
        assert result.sense_key_asc_ascq == (6, 0x2A, 0x09)   # CAPACITY DATA HAS CHANGED
        assert dev.test_unit_ready(0).ok                       # once
        assert dev.read_capacity(0) == (48 * 2048, 512)


def test_scsi_rpc_errors_match_spdk(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.rpc("vhost_create_scsi_controller", ctrlr="s")
    assert rpc_error(d, "vhost_create_scsi_controller", ctrlr="s") == (-32602, "File exists")
    assert rpc_error(d, "vhost_create_scsi_controller", ctrlr="t", cpumask="0x4") == (-32602, "Invalid argument")
    assert rpc_error(d, "vhost_create_scsi_controller", ctrlr="a/b") == (-32602, "Invalid argument")
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="nope", scsi_target_num=0,
                     bdev_name="M0") == (-32602, "No such device")
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="s", scsi_target_num=0,
                     bdev_name="nope") == (-32602, "Invalid argument")
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="s", scsi_target_num=8,
                     bdev_name="M0") == (-32602, "Invalid argument")
    assert rpc_error(d, "vhost_scsi_controller_remove_target", ctrlr="s", scsi_target_num=3) == \
        (-32602, "Device or resource busy")
    assert rpc_error(d, "vhost_scsi_controller_remove_target", ctrlr="s", scsi_target_num=9) == \
        (-32602, "Invalid argument")
    assert rpc_error(d, "vhost_start_scsi_controller", ctrlr="nope") == (-32602, "No such device")
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="s", scsi_target_num=0,
                     bdev_name="M0", lun=1) == (-32602, "Invalid argument")            # unknown key
    d.rpc("vhost_scsi_controller_add_target", ctrlr="s", scsi_target_num=0, bdev_name="M0")
    d.spdk("bdev_malloc_create", "-b", "M1", "8", "512")
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="s", scsi_target_num=0,
                     bdev_name="M1") == (-32602, "File exists")
    for n in range(1, 8):
        d.spdk("bdev_null_create", "N%d" % n, "8", "512")
        d.rpc("add_vhost_scsi_lun", ctrlr="s", scsi_target_num=-1, bdev_name="N%d" % n)
    assert rpc_error(d, "add_lun", ctrlr="s", bdev_name="M1") == (-32602, "No space left on device")
    d.rpc("vhost_create_blk_controller", ctrlr="b", dev_name="M1")
    assert rpc_error(d, "vhost_scsi_controller_add_target", ctrlr="b", scsi_target_num=0,
                     bdev_name="M1") == (-32602, "Invalid argument")                   # not scsi


def test_delayed_controller_listens_after_start_and_config_round_trips(daemon, tmp_path):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    assert d.rpc("construct_vhost_scsi_controller", ctrlr="vhost.1", delay=True, cpumask="0x1") is True
    sock = d.socket_dir / "vhost.1"
    assert not sock.exists()
    assert d.rpc("add_vhost_scsi_lun", ctrlr="vhost.1", scsi_target_num=2, bdev_name="M0") == 2
    d.spdk("vhost_start_scsi_controller", "vhost.1")
    d.spdk("vhost_start_scsi_controller", "vhost.1")             # already started
    assert sock.exists()
    d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.1", delay_base_us=50, iops_threshold=1000)
    assert d.spdk("framework_get_config", "scsi") is None
    assert d.spdk("framework_get_config", "vhost_scsi") == [
        {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "vhost.1", "cpumask": "1", "delay": True}},
        {"method": "vhost_scsi_controller_add_target", "params": {"ctrlr": "vhost.1", "scsi_target_num": 2,
                                                                  "bdev_name": "M0"}},
        {"method": "vhost_start_scsi_controller", "params": {"ctrlr": "vhost.1"}},
        {"method": "vhost_controller_set_coalescing", "params": {"ctrlr": "vhost.1", "delay_base_us": 50,
                                                                 "iops_threshold": 1000}}]
    saved = d.spdk("save_config")
    subsystems = [s["subsystem"] for s in saved["subsystems"]]
    assert subsystems.index("bdev") < subsystems.index("scsi") < subsystems.index("vhost_scsi")
    d2 = daemon()
    d2.spdk("load_config", stdin=json.dumps(saved))
    (info,) = d2.spdk("vhost_get_controllers")
    assert info["backend_specific"]["scsi"][0]["scsi_dev_num"] == 2 and info["delay_base_us"] == 50
    assert (d2.socket_dir / "vhost.1").exists()
    assert d2.spdk("save_config") == saved


def test_commands_task_management_and_notifications_through_the_daemon(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "16", "512")
    d.spdk("bdev_malloc_create", "-b", "M1", "4", "4096")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "M0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "1", "M1")
    with open_scsi(d, "vhost.0", num_queues=2) as dev:
        assert dev.read_capacity(0) == (16 * 2048, 512)
        assert dev.read_capacity(1) == (1024, 4096)
        assert dev.inquiry(1)[16:32] == b"Malloc disk     "
        data = os.urandom(64 * 1024)
        dev.write(0, 128, data, 512)
        assert dev.read(0, 128, 128, 512) == data
        dev.write(1, 7, data[:8192], 4096)
        assert dev.read(1, 7, 2, 4096) == data[:8192]
        dev.synchronize_cache(1)
        assert dev.report_luns(0) == [0]
        res = dev.command(0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]), data_in_len=64, queue=1)
        assert res.ok
        assert dev.command(4, bytes(6)).response == vs.S_BAD_TARGET
        assert dev.command(0, bytes(6), lun=3).sense_key_asc_ascq == (5, 0x25, 0)
        for subtype in (vs.TMF_ABORT_TASK, vs.TMF_LOGICAL_UNIT_RESET, vs.TMF_I_T_NEXUS_RESET,
                        vs.TMF_QUERY_TASK_SET):
            assert dev.tmf(subtype, 0) == vs.S_OK
        assert dev.tmf(vs.TMF_CLEAR_ACA, 0) == vs.S_FUNCTION_REJECTED
        assert dev.tmf(vs.TMF_LOGICAL_UNIT_RESET, 6) == vs.S_BAD_TARGET
        assert dev.async_notification(0, 0x10) == (vs.S_OK, 0)
        stat = d.spdk("bdev_get_iostat", "--names", "M0")["bdevs"][0]
        assert stat["num_write_ops"] == 1 and stat["bytes_written"] == 64 * 1024
        assert stat["num_read_ops"] == 1
        assert d.spdk("bdev_get_iostat", "--names", "M1")["bdevs"][0]["num_write_ops"] == 1
        (info,) = d.spdk("vhost_get_controllers")
        assert info["sessions"][0]["started"] is True


def test_hot_add_and_remove_send_events_while_io_continues(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "16", "512")
    d.spdk("bdev_malloc_create", "-b", "M2", "8", "512")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "M0")
    errors, stop = [], threading.Event()
    with open_scsi(d, "vhost.0", num_queues=1) as dev:
        pattern = b"\x3c" * 4096

        def hammer():
            # I/O to target 0 on its own thread while targets come and go.
            try:
                n = 0
                while not stop.is_set():
                    dev.write(0, n % 1024, pattern, 512)
                    assert dev.read(0, n % 1024, 8, 512) == pattern
                    n += 1
            except Exception as exc:        # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        # The front-end is single-threaded: serialize through one worker and check events here.
        assert d.spdk("vhost_scsi_controller_add_target", "vhost.0", "2", "M2") == 2
        (event,) = dev.events(timeout_s=5)
        assert (event.kind, event.reason, event.lun[:2], event.missed) == (vs.EVT_TRANSPORT_RESET, 1, b"\x01\x02", False)
        assert dev.read_capacity(2) == (16384, 512)
        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            d.spdk("vhost_scsi_controller_remove_target", "vhost.0", "2")
        finally:
            stop.set()
            worker.join(10)
        assert not errors, errors
        (event,) = dev.events(timeout_s=5)
        assert (event.kind, event.reason, event.lun[:2]) == (vs.EVT_TRANSPORT_RESET, 2, b"\x01\x02")
        assert dev.command(2, bytes(6)).response == vs.S_BAD_TARGET
        d.spdk("bdev_malloc_delete", "M2")          # released by the removal
        assert dev.read(0, 0, 8, 512) == pattern


# Every opcode of the emulation once through the daemon's socket: (CDB, data-out, data-in bytes).
UNMAP_PARAMS = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 64, 8)
MODE_PARAMS = bytes([0, 0, 0, 0, 0x08, 0x12, 0x04]) + bytes(17)
EVERY_OPCODE = {
    "TEST UNIT READY": (bytes(6), b"", 0),
    "REQUEST SENSE": (bytes([0x03, 0, 0, 0, 18, 0]), b"", 18),
    "READ(6)": (bytes([0x08, 0, 0, 1, 1, 0]), b"", 512),
    "WRITE(6)": (bytes([0x0A, 0, 0, 1, 1, 0]), b"\x01" * 512, 0),
    "INQUIRY": (bytes([0x12, 0, 0, 0, 96, 0]), b"", 96),
    "INQUIRY VPD B0": (bytes([0x12, 1, 0xB0, 0, 64, 0]), b"", 64),
    "MODE SELECT(6)": (bytes([0x15, 0x10, 0, 0, len(MODE_PARAMS), 0]), MODE_PARAMS, 0),
    "MODE SENSE(6)": (bytes([0x1A, 0, 0x3F, 0, 255, 0]), b"", 255),
    "START STOP UNIT": (bytes([0x1B, 0, 0, 0, 1, 0]), b"", 0),
    "READ CAPACITY(10)": (bytes([0x25]) + bytes(9), b"", 8),
    "READ(10)": (bytes([0x28, 0, 0, 0, 0, 2, 0, 0, 1, 0]), b"", 512),
    "WRITE(10)": (bytes([0x2A, 0, 0, 0, 0, 2, 0, 0, 1, 0]), b"\x02" * 512, 0),
    "VERIFY(10)": (bytes([0x2F, 0, 0, 0, 0, 2, 0, 0, 1, 0]), b"", 0),
    "SYNCHRONIZE CACHE(10)": (bytes([0x35]) + bytes(9), b"", 0),
    "WRITE SAME(10)": (bytes([0x41, 0, 0, 0, 0, 3, 0, 0, 4, 0]), b"\x03" * 512, 0),
    "UNMAP": (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, len(UNMAP_PARAMS), 0]), UNMAP_PARAMS, 0),
    "MODE SELECT(10)": (bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, 8 + 20, 0]), bytes(8) + MODE_PARAMS[4:], 0),
    "MODE SENSE(10)": (bytes([0x5A, 0, 0x08, 0, 0, 0, 0, 0, 64, 0]), b"", 64),
    "PERSISTENT RESERVE IN": (bytes([0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0]), b"", 8),
    "READ(16)": (bytes([0x88, 0]) + struct.pack(">QI", 5, 1) + b"\0\0", b"", 512),
    "WRITE(16)": (bytes([0x8A, 0]) + struct.pack(">QI", 5, 1) + b"\0\0", b"\x04" * 512, 0),
    "VERIFY(16)": (bytes([0x8F, 0]) + struct.pack(">QI", 5, 1) + b"\0\0", b"", 0),
    "SYNCHRONIZE CACHE(16)": (bytes([0x91]) + bytes(15), b"", 0),
    "WRITE SAME(16)": (bytes([0x93, 0x08]) + struct.pack(">QI", 40, 8) + b"\0\0", bytes(512), 0),
    "READ CAPACITY(16)": (bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0", b"", 32),
    "REPORT LUNS": (bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 16) + b"\0\0", b"", 16),
    "READ(12)": (bytes([0xA8, 0]) + struct.pack(">II", 6, 1) + b"\0\0", b"", 512),
    "WRITE(12)": (bytes([0xAA, 0]) + struct.pack(">II", 6, 1) + b"\0\0", b"\x05" * 512, 0),
}


def test_every_opcode_through_the_daemon(daemon, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    d = daemon()
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_scsi_controller", "vhost.0")
    d.spdk("vhost_scsi_controller_add_target", "vhost.0", "0", "File0")
    with open_scsi(d, "vhost.0") as dev:
        for name, (cdb, out, din) in EVERY_OPCODE.items():
            res = dev.command(0, cdb, data_out=out, data_in_len=din)
            assert res.ok, (name, res)
        assert dev.command(0, bytes([0x4C]) + bytes(9)).sense_key_asc_ascq == (5, 0x20, 0)
    assert d.rpc("remove_vhost_scsi_target", ctrlr="vhost.0", scsi_target_num=0) is True
    data = image.read_bytes()
    assert data[512:1024] == b"\x01" * 512 and data[1024:1536] == b"\x02" * 512
    assert data[1536:2560] == b"\x03" * 1024                   # WRITE SAME at 3-6, then 5 and 6 rewritten
    assert data[2560:3072] == b"\x04" * 512 and data[3072:3584] == b"\x05" * 512
