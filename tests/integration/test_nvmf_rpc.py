"""The nvmf methods on a real daemon through SPDK's own spdk-rpc: the VFIOUSER transport, a
subsystem, a listener whose <traddr>/cntrl socket a vfio-user client is served on, listing, config
and errors."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest

from tests.helpers.daemon import SpdkRpcError
from vhostd.vfio_user import protocol as p
from vhostd.vfio_user.protocol import Command, PciRegion
from vhostd.vfio_user.transport import Transport

NQN = "nqn.2016-06.io.spdk:vfu0"


def spdk_error(d, *args):
    with pytest.raises(SpdkRpcError) as exc:
        d.spdk(*args)
    return exc.value.error()


def read_config_ids(path) -> tuple[int, bytes]:
    """Negotiate with the controller at ``path`` and read its vendor/device ids and its Identify
    model string source (config space only: no guest memory needed)."""
    async def client():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        transport = Transport(sock, expect_reply=True)
        try:
            await transport.send(p.encode(1, Command.VERSION, p.Version(0, 0, {}).encode()))
            version = p.Version.decode((await asyncio.wait_for(transport.receive(), 10)).payload)
            await transport.send(p.encode(2, Command.REGION_READ,
                                          p.RegionAccess(0, PciRegion.CONFIG, 4).encode()))
            reply = await asyncio.wait_for(transport.receive(), 10)
            return version.capabilities["max_msg_fds"], p.RegionAccess.decode(reply.payload).data
        finally:
            transport.close()
    return asyncio.run(client())


def test_a_vfiouser_subsystem_listens_and_serves_a_controller(daemon, tmp_path):
    d = daemon()
    traddr = d.socket_dir / "vfu0"
    traddr.mkdir()
    d.spdk("nvmf_create_transport", "-t", "VFIOUSER")
    d.spdk("nvmf_create_subsystem", NQN, "-a", "-s", "SPDK0001", "-d", "vhostd NVMe")
    d.spdk("nvmf_subsystem_add_listener", NQN, "-t", "VFIOUSER", "-a", str(traddr))
    assert (traddr / "cntrl").is_socket()
    assert read_config_ids(traddr / "cntrl") == (8, struct.pack("<HH", 0x4E58, 0x0001))

    (transport,) = d.spdk("nvmf_get_transports")
    assert transport["trtype"] == "VFIOUSER" and transport["max_queue_depth"] == 256
    subsystems = {s["nqn"]: s for s in d.spdk("nvmf_get_subsystems")}
    assert subsystems["nqn.2014-08.org.nvmexpress.discovery"]["subtype"] == "Discovery"
    ours = subsystems[NQN]
    assert (ours["serial_number"], ours["model_number"], ours["allow_any_host"]) == \
        ("SPDK0001", "vhostd NVMe", True)
    assert ours["listen_addresses"] == [{"trtype": "VFIOUSER", "adrfam": "", "traddr": str(traddr),
                                         "trsvcid": ""}]
    (listener,) = d.spdk("nvmf_subsystem_get_listeners", NQN)
    assert listener["address"]["traddr"] == str(traddr)

    config = {s["subsystem"]: s["config"] for s in d.spdk("save_config")["subsystems"]}
    methods = [entry["method"] for entry in config["nvmf"]]
    assert methods == ["nvmf_create_transport", "nvmf_create_subsystem", "nvmf_subsystem_add_listener"]

    d.spdk("nvmf_subsystem_remove_listener", NQN, "-t", "VFIOUSER", "-a", str(traddr))
    assert not (traddr / "cntrl").exists()
    d.spdk("nvmf_subsystem_add_listener", NQN, "-t", "vfiouser", "-a", str(traddr))
    d.spdk("nvmf_delete_subsystem", NQN)
    assert not (traddr / "cntrl").exists()
    assert [s["nqn"] for s in d.spdk("nvmf_get_subsystems")] == ["nqn.2014-08.org.nvmexpress.discovery"]


def test_nvmf_errors_are_clear(daemon):
    d = daemon()
    traddr = d.socket_dir / "vfu1"
    traddr.mkdir()
    error = spdk_error(d, "nvmf_create_transport", "-t", "TCP")
    assert error["code"] == -32602 and "only VFIOUSER" in error["message"]
    assert d.rpc("nvmf_create_transport", trtype="vfiouser") is True
    assert "already exists" in spdk_error(d, "nvmf_create_transport", "-t", "VFIOUSER")["message"]
    d.spdk("nvmf_create_subsystem", NQN)
    assert "already exists" in spdk_error(d, "nvmf_create_subsystem", NQN)["message"]
    assert spdk_error(d, "nvmf_subsystem_add_listener", "nqn.2016-06.io.spdk:none", "-t", "VFIOUSER",
                      "-a", str(traddr))["code"] == -32602
    assert "not a directory" in spdk_error(d, "nvmf_subsystem_add_listener", NQN, "-t", "VFIOUSER",
                                           "-a", str(traddr / "missing"))["message"]
    d.spdk("nvmf_subsystem_add_listener", NQN, "-t", "VFIOUSER", "-a", str(traddr))
    assert "already exists" in spdk_error(d, "nvmf_subsystem_add_listener", NQN, "-t", "VFIOUSER",
                                          "-a", str(traddr))["message"]
    assert spdk_error(d, "nvmf_delete_subsystem", "nqn.2016-06.io.spdk:none")["code"] == -32602


def test_bdevs_become_namespaces_listed_saved_and_loaded_again(daemon, tmp_path):
    d = daemon()
    traddr = d.socket_dir / "vfu2"
    traddr.mkdir()
    d.spdk("bdev_malloc_create", "-b", "M512", "8", "512")
    d.spdk("bdev_malloc_create", "-b", "M4K", "16", "4096")
    d.spdk("nvmf_create_transport", "-t", "VFIOUSER")
    d.spdk("nvmf_create_subsystem", NQN, "-a", "-m", "4")
    d.spdk("nvmf_subsystem_add_listener", NQN, "-t", "VFIOUSER", "-a", str(traddr))
    d.spdk("nvmf_subsystem_add_ns", NQN, "M512")       # spdk-rpc prints no result here
    assert d.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={
        "bdev_name": "M4K", "nsid": 3, "eui64": "0011223344556677",
        "nguid": "000102030405060708090a0b0c0d0e0f"}) == 3
    m512 = d.rpc("bdev_get_bdevs", name="M512")[0]
    assert m512["claimed"] is True
    (ours,) = d.spdk("nvmf_get_subsystems", NQN)
    first, third = ours["namespaces"]
    assert (first["nsid"], first["bdev_name"], first["uuid"]) == (1, "M512", m512["uuid"])
    assert first["nguid"] == m512["uuid"].replace("-", "").upper()
    assert (third["nsid"], third["eui64"], third["nguid"]) == \
        (3, "0011223344556677", "000102030405060708090A0B0C0D0E0F")

    assert "already claimed" in spdk_error(d, "nvmf_subsystem_add_ns", NQN, "M512")["message"]
    assert "already has NSID 3" in spdk_error(d, "nvmf_subsystem_add_ns", NQN, "M512", "-n", "3")["message"]
    assert "maximum 4" in spdk_error(d, "nvmf_subsystem_add_ns", NQN, "M512", "-n", "5")["message"]
    assert spdk_error(d, "nvmf_subsystem_add_ns", NQN, "nope")["code"] == -32602
    assert spdk_error(d, "bdev_malloc_delete", "M4K")["message"] == "Device or resource busy"

    saved = d.spdk("save_config")
    config = {s["subsystem"]: s["config"] for s in saved["subsystems"]}
    added = [e["params"] for e in config["nvmf"] if e["method"] == "nvmf_subsystem_add_ns"]
    assert [(a["namespace"]["nsid"], a["namespace"]["bdev_name"]) for a in added] == [(1, "M512"), (3, "M4K")]

    d.spdk("nvmf_subsystem_remove_ns", NQN, "1")
    assert d.rpc("bdev_get_bdevs", name="M512")[0]["claimed"] is False
    assert [n["nsid"] for n in d.spdk("nvmf_get_subsystems", NQN)[0]["namespaces"]] == [3]
    assert spdk_error(d, "nvmf_subsystem_remove_ns", NQN, "1")["code"] == -32602

    # the saved config rebuilds the same namespaces, identifiers included, in a new daemon
    for entry in config["nvmf"]:
        if entry["method"] == "nvmf_subsystem_add_listener":
            entry["params"]["listen_address"]["traddr"] = str(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    again = daemon(config=str(path))
    (restored,) = again.spdk("nvmf_get_subsystems", NQN)
    assert restored["namespaces"] == ours["namespaces"]
    again.spdk("nvmf_delete_subsystem", NQN)
    assert again.rpc("bdev_get_bdevs", name="M4K")[0]["claimed"] is False
