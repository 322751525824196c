"""The nvmf methods on a real daemon through SPDK's own spdk-rpc: the VFIOUSER transport, a
subsystem, a listener whose <traddr>/cntrl socket a vfio-user client is served on, listing, config
and errors."""

from __future__ import annotations

import asyncio
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
