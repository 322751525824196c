"""A vfio-user Endpoint serving an NvmeFunction over a real Unix socket, driven by a small client
built on the same codec (fds through SCM_RIGHTS both ways, shared memory both ways)."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from vhostd.nvme.function import NvmeFunction
from vhostd.vfio_user import protocol as p
from vhostd.vfio_user.protocol import Command, IrqSetFlag, PciIrq, PciRegion
from vhostd.vfio_user.server import Endpoint
from vhostd.vfio_user.transport import ConnectionClosed, Transport

MB = 1 << 20


class Client:
    """The client side of one connection (what QEMU does, the parts the tests need)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.next_id = 0

    @classmethod
    async def connect(cls, path: Path) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        return cls(Transport(sock, expect_reply=True))

    async def call(self, command, payload=b"", fds=()) -> p.Message:
        self.next_id += 1
        await self.transport.send(p.encode(self.next_id, command, payload), fds)
        reply = await asyncio.wait_for(self.transport.receive(), 10)
        assert (reply.msg_id, reply.command) == (self.next_id, command)
        return reply

    async def negotiate(self) -> p.Version:
        reply = await self.call(Command.VERSION, p.Version(0, 0, {"pgsizes": 4096, "max_msg_fds": 16}).encode())
        return p.Version.decode(reply.payload)

    def close(self) -> None:
        self.transport.close()


def memfd() -> int:
    return os.memfd_create("ram")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def socket_dir():
    path = Path(tempfile.mkdtemp(prefix="vfu-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def serve(socket_dir, scenario):
    """Run ``scenario(endpoint, function)`` against a started endpoint, then stop it."""
    async def main():
        function = NvmeFunction("nvme0")
        endpoint = Endpoint(socket_dir / "cntrl", function, takeover_wait_s=0.2)
        await endpoint.start()
        try:
            await scenario(endpoint, function)
        finally:
            await endpoint.stop()
            function.close()
    asyncio.run(main())


async def wait_for(condition, timeout_s=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def test_guest_memory_and_the_doorbell_page_are_shared_both_ways(socket_dir):
    async def scenario(endpoint, function):
        client = await Client.connect(endpoint.path)
        assert (await client.negotiate()).capabilities["max_msg_fds"] == 8
        ram = memfd()
        os.ftruncate(ram, 2 * MB)
        reply = await client.call(Command.DMA_MAP, p.DmaMap(3, MB, 0x100000, MB).encode(), [ram])
        assert reply.error == 0
        os.pwrite(ram, b"guest bytes", MB + 0x10)
        assert endpoint.connection.memory.read(0x100010, 11) == b"guest bytes"
        # BAR0's region info carries the doorbell page's fd; a store there reaches the device.
        reply = await client.call(Command.DEVICE_GET_REGION_INFO,
                                  p.RegionInfo(PciRegion.BAR0, 0, 0, 0, argsz=64).encode())
        info = p.RegionInfo.decode(reply.payload)
        (area,) = p.decode_sparse_mmap_cap(info.caps)
        (bar0_fd,) = reply.fds
        doorbells = mmap.mmap(bar0_fd, area.size, mmap.MAP_SHARED, offset=info.offset + area.offset)
        doorbells[4:8] = struct.pack("<I", 9)                            # CQ 0 head
        assert bytes(function.doorbells[4:8]) == struct.pack("<I", 9)
        doorbells.close()
        os.close(bar0_fd)
        reply = await client.call(Command.DMA_UNMAP, p.DmaUnmap(0, 0x100000, MB).encode())
        assert reply.error == 0 and len(endpoint.connection.memory) == 0
        os.close(ram)
        client.close()

    serve(socket_dir, scenario)


def test_refused_commands_get_error_replies_and_the_connection_stays(socket_dir):
    async def scenario(endpoint, function):
        client = await Client.connect(endpoint.path)
        await client.negotiate()
        small = memfd()
        os.ftruncate(small, 4096)
        reply = await client.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [small])
        assert (reply.flags & p.FLAG_ERROR, reply.error) == (p.FLAG_ERROR, errno.EINVAL)
        reply = await client.call(Command.DEVICE_FEATURE, bytes(8))
        assert reply.error == errno.ENOSYS
        reply = await client.call(Command.REGION_READ, p.RegionAccess(0, PciRegion.CONFIG, 4).encode())
        assert p.RegionAccess.decode(reply.payload).data == b"\x58\x4e\x01\x00"
        os.close(small)
        client.close()

    serve(socket_dir, scenario)


def test_a_client_sending_garbage_is_dropped_and_the_next_one_served(socket_dir):
    async def scenario(endpoint, function):
        client = await Client.connect(endpoint.path)
        await client.negotiate()
        await client.transport.send(struct.pack("<HHIII", 1, 2, 4, 0, 0))      # size < header
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.transport.receive(), 5)
        client.close()
        again = await Client.connect(endpoint.path)
        await again.negotiate()
        assert endpoint.clients_served == 2
        again.close()

    serve(socket_dir, scenario)


def test_a_client_that_comes_as_the_first_leaves_is_served(socket_dir):
    async def scenario(endpoint, function):
        first = await Client.connect(endpoint.path)
        await first.negotiate()
        second = await Client.connect(endpoint.path)
        first.close()
        await second.negotiate()
        assert endpoint.clients_served == 2
        second.close()

    serve(socket_dir, scenario)


def test_a_second_client_is_refused_while_one_is_served(socket_dir):
    async def scenario(endpoint, function):
        first = await Client.connect(endpoint.path)
        await first.negotiate()
        second = await Client.connect(endpoint.path)
        await second.transport.send(p.encode(1, Command.VERSION, p.Version(0, 0, {}).encode()))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(second.transport.receive(), 5)
        second.close()
        reply = await first.call(Command.DEVICE_GET_INFO, p.DeviceInfo(0, 0, 0).encode())
        assert p.DeviceInfo.decode(reply.payload).num_regions == 9
        first.close()

    serve(socket_dir, scenario)


def test_a_client_that_truncates_its_guest_memory_is_dropped_and_the_next_one_served(socket_dir):
    async def scenario(endpoint, function):
        client = await Client.connect(endpoint.path)
        await client.negotiate()
        ram = memfd()
        os.ftruncate(ram, MB)
        await client.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [ram])
        os.ftruncate(ram, 0)
        # The lost page reads zeros (no SIGBUS), and the connection ends.
        assert endpoint.connection.memory.read(0x1000, 4) == bytes(4)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.transport.receive(), 5)
        client.close()
        os.close(ram)
        again = await Client.connect(endpoint.path)
        await again.negotiate()
        again.close()

    serve(socket_dir, scenario)


def test_a_client_that_leaves_gives_back_every_fd_and_mapping(socket_dir):
    async def scenario(endpoint, function):
        baseline = open_fds()
        client = await Client.connect(endpoint.path)
        await client.negotiate()
        ram = memfd()
        os.ftruncate(ram, MB)
        await client.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [ram])
        vectors = [os.eventfd(0) for _ in range(3)]
        reply = await client.call(Command.DEVICE_SET_IRQS,
                                  p.IrqSet(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                                           PciIrq.MSIX, 0, 3).encode(), vectors)
        assert reply.error == 0
        connection = endpoint.connection
        assert len(connection.session.owned_fds()) == 3 and len(connection.memory) == 1
        for fd in [ram, *vectors]:
            os.close(fd)
        client.close()
        await wait_for(lambda: endpoint._serving.done())
        assert len(connection.memory) == 0 and connection.session.owned_fds() == []
        assert open_fds() == baseline

    serve(socket_dir, scenario)
