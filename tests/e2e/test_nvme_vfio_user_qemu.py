"""QEMU 11.1's own vfio-user client (vfio-user-pci) against vhostd's vfio-user endpoint and NVMe
PCI function, with no guest: QEMU runs under the qtest accelerator and the test plays the CPU and
the driver, reading config space through ports 0xcf8/0xcfc, BAR0 through MMIO, and running an
admin command through queues in guest RAM."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest

from vhostd.nvme import registers as r
from vhostd.nvme import status as st
from vhostd.nvme.command import Completion, Submission
from vhostd.nvme.function import NvmeFunction
from vhostd.vfio_user.server import Endpoint

pytestmark = pytest.mark.e2e

SLOT = 4
BAR0_ADDR = 0xFE000000
GUEST_RAM_MIB = 256
ADMIN_SQ, ADMIN_CQ, IDENTIFY_BUFFER = 0x100000, 0x101000, 0x102000


class Qtest:
    """The qtest protocol: one command line out, one "OK …" line back (IRQ lines skipped)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        while True:
            answer = (await asyncio.wait_for(self.reader.readline(), 30)).decode().strip()
            if not answer.startswith("IRQ"):
                break
        assert answer.startswith("OK"), f"{line!r} → {answer!r}"
        return answer[2:].strip()

    async def config_read(self, offset: int) -> int:
        await self.command("outl 0xcf8 %#x" % (0x80000000 | SLOT << 11 | offset))
        return int(await self.command("inl 0xcfc"), 16)

    async def config_write(self, offset: int, value: int) -> None:
        await self.command("outl 0xcf8 %#x" % (0x80000000 | SLOT << 11 | offset))
        await self.command("outl 0xcfc %#x" % value)

    async def readl(self, addr: int) -> int:
        return int(await self.command("readl %#x" % addr), 16)

    async def writel(self, addr: int, value: int) -> None:
        await self.command("writel %#x %#x" % (addr, value))

    async def write(self, addr: int, data: bytes) -> None:
        """Store bytes in guest RAM (as the guest's CPU would)."""
        await self.command("write %#x %#x 0x%s" % (addr, len(data), data.hex()))

    async def read(self, addr: int, size: int) -> bytes:
        answer = await self.command("read %#x %#x" % (addr, size))
        return bytes.fromhex(answer[2:])                         # "0x…"


async def start_qemu(qemu_root, socket_dir, endpoint_path):
    qtest_path = socket_dir / "qtest"
    qtest_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(qtest_path))
    listener.listen(1)
    listener.setblocking(False)
    device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(endpoint_path)},
              "addr": "%#x" % SLOT}
    args = [str(qemu_root.qemu_system), "-nodefaults", "-display", "none", "-accel", "qtest",
            "-machine", "q35,memory-backend=mem", "-m", "%dM" % GUEST_RAM_MIB,
            "-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % GUEST_RAM_MIB,
            "-device", json.dumps(device), "-qtest", "unix:%s" % qtest_path]
    print("QEMU:", " ".join(args))
    qemu = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), 60)
    except BaseException:
        qemu.kill()
        raise AssertionError("QEMU did not reach qtest: %s" % (await qemu.stderr.read()).decode())
    finally:
        listener.close()
    reader, writer = await asyncio.open_unix_connection(sock=conn)
    return qemu, Qtest(reader, writer)


async def stop_qemu(qemu) -> str:
    if qemu.returncode is None:
        qemu.terminate()
    stderr = (await asyncio.wait_for(qemu.stderr.read(), 30)).decode()
    await qemu.wait()
    return stderr


async def wait_for(condition, timeout_s=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in %.0f s" % timeout_s
        await asyncio.sleep(0.05)


def test_qemu_reads_the_nvme_function_enables_it_and_runs_identify_through_the_admin_queue(qemu_root, socket_dir):
    async def scenario():
        function = NvmeFunction("nvme0")
        endpoint = Endpoint(socket_dir / "cntrl", function)
        await endpoint.start()
        qemu, qtest = await start_qemu(qemu_root, socket_dir, endpoint.path)
        try:
            # Config space as QEMU forwards it: ids, class, BAR0 type.
            assert await qtest.config_read(0x00) == 0x00014E58
            assert await qtest.config_read(0x08) >> 8 == 0x010802
            assert await qtest.config_read(0x10) & 0xF == 0x4
            # Place BAR0 and turn on memory decoding and bus mastering, as firmware would.
            await qtest.config_write(0x10, BAR0_ADDR)
            await qtest.config_write(0x14, 0)
            await qtest.config_write(0x04, 0x0006)
            cap = await qtest.readl(BAR0_ADDR) | await qtest.readl(BAR0_ADDR + 4) << 32
            assert cap == function.registers.caps.cap()
            assert await qtest.readl(BAR0_ADDR + r.Reg.VS) == 0x00010400
            # The enable handshake over guest RAM that QEMU DMA-mapped to us.
            session = endpoint.connection.session
            assert session.find_window(ADMIN_SQ, 0x2000) is not None
            await qtest.writel(BAR0_ADDR + r.Reg.AQA, 0x001F001F)
            await qtest.writel(BAR0_ADDR + r.Reg.ASQ, ADMIN_SQ)
            await qtest.writel(BAR0_ADDR + r.Reg.ASQ + 4, 0)
            await qtest.writel(BAR0_ADDR + r.Reg.ACQ, ADMIN_CQ)
            await qtest.writel(BAR0_ADDR + r.Reg.ACQ + 4, 0)
            await qtest.writel(BAR0_ADDR + r.Reg.CC, 0x00460001)
            assert await qtest.readl(BAR0_ADDR + r.Reg.CSTS) & r.CSTS_RDY
            # Identify Controller through the admin queue: the entry in guest RAM, the SQ tail
            # doorbell stored through QEMU's mmap of BAR0's fd (the sparse area, not a message),
            # the completion and the data back in guest RAM.
            trapped = []
            served_write = function.region_write

            def recording_write(index, offset, data):
                trapped.append((index, offset))
                return served_write(index, offset, data)
            function.region_write = recording_write
            identify = Submission(0x06, 0, 0x42, 0, 0, IDENTIFY_BUFFER, 0, cdw10=1)
            await qtest.write(ADMIN_SQ, identify.encode())
            await qtest.writel(BAR0_ADDR + 0x1000, 1)
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                completion, phase = Completion.decode(await qtest.read(ADMIN_CQ, 16))
                if phase == 1:
                    break
                assert asyncio.get_running_loop().time() < deadline, "no completion"
                await asyncio.sleep(0.01)
            assert completion == Completion(0x42, st.SUCCESS, 0, sq_head=1, sq_id=0)
            assert trapped == [] and bytes(function.doorbells[:4]) == struct.pack("<I", 1)
            function.region_write = served_write
            model = await qtest.read(IDENTIFY_BUFFER + 24, 40)
            assert model.rstrip() == b"vhostd NVMe controller"
        finally:
            stderr = await stop_qemu(qemu)
            print("QEMU stderr:", stderr)
        # QEMU leaving sends nothing: EOF releases the windows and irq fds; state stays.
        await wait_for(lambda: endpoint._serving.done())
        assert len(endpoint.connection.memory) == 0 and endpoint.connection.session.owned_fds() == []
        assert function.registers.ready
        # The next QEMU is served: its realize resets the controller.
        qemu, qtest = await start_qemu(qemu_root, socket_dir, endpoint.path)
        try:
            assert await qtest.config_read(0x00) == 0x00014E58
            assert not function.registers.ready
            assert endpoint.clients_served == 2
        finally:
            await stop_qemu(qemu)
        await endpoint.stop()
        function.close()

    asyncio.run(scenario())
