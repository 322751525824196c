"""The daemon driven by SPDK's own rpc.py (PyPI `spdk`, unmodified) through every issue-2 method."""

import json
import os
import signal
import time

import pytest

from tests.helpers.daemon import Daemon, SpdkRpcError
from vhostd.rpc.client import RpcCallError


def spdk_error(daemon, *args):
    with pytest.raises(SpdkRpcError) as exc:
        daemon.spdk(*args)
    return exc.value.error()


def test_framework_methods(daemon):
    d = daemon()
    methods = d.spdk("rpc_get_methods")
    assert {"bdev_malloc_create", "framework_start_init", "vhost_create_blk_controller"} <= set(methods)
    assert "framework_start_init" not in d.spdk("rpc_get_methods", "--current")
    assert "construct_malloc_bdev" in d.spdk("rpc_get_methods", "--include-aliases")
    version = d.spdk("spdk_get_version")
    assert version["version"].startswith("SPDK v") and version["fields"]["major"] >= 26
    reactors = d.spdk("framework_get_reactors")
    assert reactors["reactors"][0]["lcore"] == 0 and reactors["reactors"][0]["tid"] > 0
    assert reactors["tick_rate"] > 0
    threads = d.spdk("thread_get_stats")["threads"]
    assert threads[0]["name"] == "app_thread"
    subsystems = [s["subsystem"] for s in d.spdk("framework_get_subsystems")]
    assert subsystems.index("bdev") < subsystems.index("vhost_blk")
    assert d.spdk("framework_get_config", "bdev")[-1] == {"method": "bdev_wait_for_examine"}
    d.spdk("framework_wait_init")          # rpc.py prints nothing for these: exit 0 is the check
    d.spdk("bdev_wait_for_examine")
    assert d.rpc("framework_wait_init") is True and d.rpc("bdev_wait_for_examine") is True
    assert spdk_error(d, "framework_start_init")["code"] == -1


def test_log_levels(daemon):
    d = daemon()
    assert d.spdk("log_get_level") == "NOTICE"
    d.spdk("log_set_level", "DEBUG")
    assert d.spdk("log_get_level") == "DEBUG"
    d.spdk("log_set_print_level", "ERROR")
    assert d.spdk("log_get_print_level") == "ERROR"
    with pytest.raises(RpcCallError) as exc:
        d.rpc("log_set_level", level="debug")
    assert (exc.value.code, exc.value.message) == (-32603, "spdk_json_decode_object failed")


def test_malloc_and_null_bdevs(daemon):
    d = daemon()
    assert d.spdk("bdev_malloc_create", "-b", "M0", "8", "512") == "M0"
    assert d.spdk("bdev_malloc_create", "8", "4096") == "Malloc0"
    assert d.spdk("bdev_null_create", "N0", "16", "512") == "N0"
    bdevs = {b["name"]: b for b in d.spdk("bdev_get_bdevs")}
    assert list(bdevs) == ["M0", "Malloc0", "N0"]
    m0 = bdevs["M0"]
    assert (m0["block_size"], m0["num_blocks"], m0["product_name"]) == (512, 16384, "Malloc disk")
    assert m0["aliases"] == [m0["uuid"]] and m0["supported_io_types"]["unmap"] is True
    # The uuid alias finds the bdev.
    assert d.spdk("bdev_get_bdevs", "-b", m0["uuid"])[0]["name"] == "M0"
    assert spdk_error(d, "bdev_malloc_create", "-b", "M0", "8", "512") == {"code": -17, "message": "File exists"}
    assert spdk_error(d, "bdev_malloc_create", "-u", m0["uuid"], "8", "512")["code"] == -17
    assert spdk_error(d, "bdev_get_bdevs", "-b", "nope") == {"code": -19, "message": "No such device"}
    assert spdk_error(d, "bdev_get_bdevs", "-b", "nope", "-t", "100") == {"code": -110, "message": "Connection timed out"}
    d.spdk("bdev_null_resize", "N0", "32")
    assert d.spdk("bdev_get_bdevs", "-b", "N0")[0]["num_blocks"] == 65536
    assert spdk_error(d, "bdev_null_resize", "N0", "8")["code"] == -22
    assert spdk_error(d, "bdev_null_resize", "M0", "64")["code"] == -22
    assert spdk_error(d, "bdev_null_delete", "M0") == {"code": -19, "message": "No such device"}
    d.spdk("bdev_malloc_delete", "M0")
    d.spdk("bdev_null_delete", "N0")
    assert [b["name"] for b in d.spdk("bdev_get_bdevs")] == ["Malloc0"]


def test_metadata_and_dif_are_refused_clearly(daemon):
    d = daemon()
    err = spdk_error(d, "bdev_malloc_create", "-m", "8", "8", "512")
    assert err["code"] == -95 and "metadata" in err["message"]
    assert spdk_error(d, "bdev_null_create", "-t", "1", "-m", "8", "N", "8", "512")["code"] == -95
    assert d.spdk("bdev_get_bdevs") == []


def test_file_bdevs(daemon, tmp_path):
    d = daemon()
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (4 << 20))
    assert d.spdk("bdev_aio_create", str(image), "A0") == "A0"
    a0 = d.spdk("bdev_get_bdevs", "-b", "A0")[0]
    assert a0["product_name"] == "AIO disk" and a0["num_blocks"] == 8192
    assert a0["driver_specific"]["aio"]["filename"] == str(image)
    with open(image, "ab") as f:
        f.truncate(8 << 20)
    d.spdk("bdev_aio_rescan", "A0")
    assert d.spdk("bdev_get_bdevs", "-b", "A0")[0]["num_blocks"] == 16384
    assert spdk_error(d, "bdev_aio_create", str(tmp_path / "missing"), "A1") == {
        "code": -2, "message": "No such file or directory"}
    assert spdk_error(d, "bdev_aio_create", str(image), "A1", "1000")["code"] == -22
    assert d.spdk("bdev_uring_create", str(image), "U0", "4096") == "U0"
    assert d.spdk("bdev_get_bdevs", "-b", "U0")[0]["driver_specific"] == {"uring": {"filename": str(image)}}
    assert spdk_error(d, "bdev_uring_create", str(tmp_path / "missing"), "U1") == {
        "code": -32603, "message": "Unable to create URING bdev."}
    d.spdk("bdev_uring_rescan", "U0")
    d.spdk("bdev_uring_delete", "U0")
    d.spdk("bdev_aio_delete", "A0")
    assert [b["name"] for b in d.spdk("bdev_get_bdevs")] == []


def test_bad_names_are_refused_and_nothing_stays(daemon):
    d = daemon()
    for name in ["a/b", "x" * 256, "tab\there"]:
        with pytest.raises(RpcCallError) as exc:
            d.rpc("bdev_malloc_create", name=name, num_blocks=8, block_size=512)
        assert exc.value.code == -22
    with pytest.raises(RpcCallError) as exc:
        d.rpc("bdev_malloc_create", num_blocks=8, block_size=500)
    assert exc.value.code == -22
    for method in ("bdev_malloc_create", "bdev_null_create"):
        with pytest.raises(RpcCallError) as exc:
            d.rpc(method, name="Z0", num_blocks=8, block_size=0, physical_block_size=4096)
        assert (exc.value.code, exc.value.message) == (-22, "Invalid argument")
    assert "Traceback" not in d.log()
    with pytest.raises(RpcCallError) as exc:
        d.rpc("bdev_malloc_create", num_blocks=8, block_size=512, bogus=1)
    assert (exc.value.code, exc.value.message) == (-32603, "spdk_json_decode_object failed")
    with pytest.raises(RpcCallError) as exc:
        d.rpc("bdev_malloc_create", num_blocks="8", block_size=512)
    assert exc.value.code == -32603
    assert d.rpc("bdev_get_bdevs") == []


def test_iostat_and_qos(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    stat = d.spdk("bdev_get_iostat")
    assert stat["tick_rate"] > 0 and stat["bdevs"][0]["name"] == "M0"
    assert stat["bdevs"][0]["num_read_ops"] == 0 and stat["bdevs"][0]["io_error"] == {}
    assert d.spdk("bdev_get_iostat", "--names", "M0")["bdevs"][0]["name"] == "M0"
    assert spdk_error(d, "bdev_get_iostat", "--names", "zz") == {"code": -19, "message": "No such device"}
    per_channel = d.spdk("bdev_get_iostat", "--names", "M0", "-c")
    assert per_channel["name"] == "M0" and "channels" in per_channel
    d.spdk("bdev_set_qos_limit", "M0", "--rw-ios-per-sec", "1500", "--w-mbytes-per-sec", "10")
    limits = d.spdk("bdev_get_bdevs", "-b", "M0")[0]["assigned_rate_limits"]
    assert limits == {"rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0,
                      "w_mbytes_per_sec": 10}
    assert spdk_error(d, "bdev_set_qos_limit", "M0") == {"code": -22, "message": "No rate limits specified"}
    config = d.spdk("framework_get_config", "bdev")
    assert {"method": "bdev_set_qos_limit", "params": {"name": "M0", "rw_ios_per_sec": 2000,
                                                       "w_mbytes_per_sec": 10}} in config


def test_legacy_aliases_and_create_bdev(daemon):
    d = daemon()
    assert d.rpc("construct_malloc_bdev", num_blocks=16, block_size=512, name="L0") == "L0"
    assert d.rpc("get_bdevs")[0]["name"] == "L0"
    assert d.rpc("create_bdev", type="null", name="G0", num_blocks=16, block_size=512) == "G0"
    with pytest.raises(RpcCallError):
        d.rpc("create_bdev", type="tape", name="G1")
    d.rpc("delete_malloc_bdev", name="L0")
    assert "RPC method construct_malloc_bdev is deprecated" in d.log()


def test_save_config_and_load_config_round_trip(daemon, tmp_path):
    d = daemon()
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("bdev_null_create", "N0", "16", "4096")
    d.spdk("bdev_aio_create", str(image), "A0")
    d.spdk("bdev_set_qos_limit", "M0", "--rw-mbytes-per-sec", "5")
    saved = d.spdk("save_config")
    before = d.spdk("bdev_get_bdevs")
    fresh = daemon()
    out = fresh.spdk("load_config", stdin=json.dumps(saved))
    after = fresh.spdk("bdev_get_bdevs")
    assert after == before, out


def test_config_file_at_start_and_wait_for_rpc(daemon, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 1024}},
            {"method": "bdev_malloc_create", "params": {"name": "C0", "num_blocks": 64, "block_size": 512}}]},
        {"subsystem": "scsi", "config": None}]}))
    d = daemon(config=str(config))
    assert [b["name"] for b in d.spdk("bdev_get_bdevs")] == ["C0"]
    w = daemon("--wait-for-rpc")
    err = spdk_error(w, "bdev_get_bdevs")
    assert err == {"code": -1, "message": "Method may only be called after framework is initialized "
                                          "using framework_start_init RPC."}
    w.spdk("bdev_set_options", "-p", "2048")
    assert "framework_start_init" in w.spdk("rpc_get_methods", "--current")
    w.spdk("framework_start_init")
    assert w.spdk("bdev_get_bdevs") == []
    assert spdk_error(w, "bdev_set_options", "-p", "1")["code"] == -1
    assert w.spdk("framework_get_config", "bdev")[0]["params"]["bdev_io_pool_size"] == 2048


def test_second_instance_on_the_same_socket_fails_clearly(daemon):
    d = daemon()
    other = Daemon(workdir=str(d.dir))
    other.start(wait=False)
    assert other.proc.wait(20) == 1
    assert "in use. Specify another." in other.log()
    assert d.spdk("spdk_get_version")


def test_sigterm_removes_the_sockets(daemon):
    d = daemon()
    d.spdk("bdev_malloc_create", "-b", "M0", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "M0")
    assert (d.socket_dir / "vhost.0").exists()
    assert d.stop() == 0
    assert not os.path.exists(d.rpc_socket) and not (d.socket_dir / "vhost.0").exists()
    assert not os.path.exists(d.rpc_socket + ".lock")


def test_spdk_kill_instance(daemon):
    d = daemon()
    d.spdk("spdk_kill_instance", "SIGTERM")
    assert d.proc.wait(20) == 0
    assert not os.path.exists(d.rpc_socket)


def test_no_param_methods_refuse_params(daemon):
    d = daemon()
    with pytest.raises(RpcCallError) as exc:
        d.rpc("spdk_get_version", x=1)
    assert (exc.value.code, exc.value.message) == (-32602, "spdk_get_version method requires no parameters")
    with pytest.raises(RpcCallError) as exc:
        d.rpc("thread_get_stats", x=1)
    assert exc.value.message == "'thread_get_stats' requires no arguments"
    with pytest.raises(RpcCallError) as exc:
        d.rpc("framework_get_config", name="nope")
    assert (exc.value.code, exc.value.message) == (-32602, "Subsystem 'nope' not found")
    with pytest.raises(RpcCallError) as exc:
        d.rpc("no_such_method")
    assert (exc.value.code, exc.value.message) == (-32601, "Method not found")
