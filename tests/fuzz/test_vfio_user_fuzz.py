"""Hostile vfio-user clients against a running daemon (a separate process) serving two NVMe
controllers made with the nvmf RPCs: ``hostile`` (attacked) and ``good``, which a well-behaved
client keeps reading from a thread the whole time.  Each case must end with the connection answered
per spec or closed; then the daemon's open fds and memfd mappings are back to the baseline, ``good``
kept serving, ``hostile`` serves a well-behaved client, and the log has no traceback."""

from __future__ import annotations

import array
import json
import mmap
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import examples
from tests.fuzz.traffic import BackgroundTraffic
from tests.fuzz.vhost_peer import fd_count, guest_mappings, maps, memfd
from tests.helpers.daemon import Daemon
from vhostd.nvme import registers as r
from vhostd.vfio_user import protocol as p
from vhostd.vfio_user.protocol import Command, IrqSetFlag, PciIrq, PciRegion

MB = 1 << 20
NQN = "nqn.2016-06.io.spdk:%s"


class Peer:
    """A blocking vfio-user client that can send anything."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.next_id = 0

    def send(self, data: bytes, fds=()) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], ancillary)

    def command(self, command: int, payload: bytes = b"", fds=()) -> bytes:
        self.next_id += 1
        self.send(p.encode(self.next_id, command, payload), fds)
        return self.next_id

    def reply(self) -> tuple[tuple, bytes, list[int]]:
        """(header, payload, fds) of the next reply; raises EOFError when the daemon closed."""
        data, ancdata, _, _ = self.sock.recvmsg(16, socket.CMSG_SPACE(8 * 4))
        if len(data) < 16:
            raise EOFError()
        fds = []
        for level, kind, blob in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", blob[:len(blob) - len(blob) % 4]))
        header = struct.unpack("<HHIII", data)
        rest = b""
        while len(rest) < header[2] - 16:
            chunk = self.sock.recv(header[2] - 16 - len(rest))
            if not chunk:
                raise EOFError()
            rest += chunk
        return header, rest, fds

    def call(self, command: int, payload: bytes = b"", fds=()):
        self.command(command, payload, fds)
        return self.reply()

    def negotiate(self) -> None:
        header, _, _ = self.call(Command.VERSION, p.Version(0, 0, {"pgsizes": 4096}).encode())
        assert header[4] == 0

    def closed_by_daemon(self) -> bool:
        try:
            while True:
                self.reply()
        except (EOFError, ConnectionResetError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def config_read(peer: Peer, offset: int = 0, count: int = 4) -> bytes:
    header, payload, _ = peer.call(Command.REGION_READ, p.RegionAccess(offset, PciRegion.CONFIG, count).encode())
    assert header[4] == 0, header
    return p.RegionAccess.decode(payload).data


class GoodTraffic(BackgroundTraffic):
    """A well-behaved client reading the good controller's config space in a thread."""

    def __init__(self, path: str) -> None:
        self.peer = Peer(path)
        self.peer.negotiate()
        self.start()

    def step(self, n: int) -> None:
        assert config_read(self.peer) == b"\x58\x4e\x01\x00"

    def release(self) -> None:
        self.peer.close()


class Target:
    def __init__(self, daemon: Daemon, hostile_dir, good_dir) -> None:
        self.daemon = daemon
        self.pid = daemon.proc.pid
        self.path = str(hostile_dir / "cntrl")
        self.good = GoodTraffic(str(good_dir / "cntrl"))
        self.baseline = self.quiet_counts()
        self.log_mark = 0

    def counts(self) -> tuple[int, int, int]:
        return fd_count(self.pid), guest_mappings(self.pid), len(maps(self.pid))

    def quiet_counts(self) -> tuple[int, int, int]:
        readings = [self.counts()]
        deadline = time.monotonic() + 2
        while len(readings) < 2 or readings[-1] != readings[-2]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
            readings.append(self.counts())
        return readings[-1]

    def settle(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.quiet_counts() != self.baseline:
            if time.monotonic() > deadline:
                fds = sorted(os.readlink("/proc/%d/fd/%s" % (self.pid, f))
                             for f in os.listdir("/proc/%d/fd" % self.pid))
                raise AssertionError("daemon holds %r, baseline %r\nfds: %s"
                                     % (self.counts(), self.baseline, fds))
            time.sleep(0.01)

    def check_serves(self) -> None:
        peer = Peer(self.path)
        try:
            peer.negotiate()
            assert config_read(peer) == b"\x58\x4e\x01\x00"
        finally:
            peer.close()

    def check_log(self) -> None:
        log = self.daemon.log()
        fresh, self.log_mark = log[self.log_mark:], len(log)
        assert "Traceback" not in fresh, fresh[-6000:]
        assert self.daemon.proc.poll() is None, "vhostd exited:\n" + log[-6000:]

    def after_case(self) -> None:
        self.settle()
        self.good.check()
        self.check_serves()
        self.settle()
        self.check_log()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vfu-fuzz")
    daemon = Daemon(workdir=str(workdir)).start()
    dirs = {}
    try:
        daemon.rpc("nvmf_create_transport", trtype="VFIOUSER")
        daemon.rpc("bdev_malloc_create", name="Hostile0", num_blocks=2048, block_size=512)
        for name in ("hostile", "good"):
            dirs[name] = daemon.socket_dir / name
            dirs[name].mkdir()
            daemon.rpc("nvmf_create_subsystem", nqn=NQN % name, allow_any_host=True)
            if name == "hostile":
                daemon.rpc("nvmf_subsystem_add_ns", nqn=NQN % name, namespace={"bdev_name": "Hostile0"})
            daemon.rpc("nvmf_subsystem_add_listener", nqn=NQN % name,
                       listen_address={"trtype": "VFIOUSER", "traddr": str(dirs[name])})
        t = Target(daemon, dirs["hostile"], dirs["good"])
        yield t
        t.good.close()
    finally:
        daemon.stop()
        daemon.cleanup()


def _short_header(peer):
    peer.send(b"\x01\x00\x01\x00")


def _size_below_header(peer):
    peer.send(struct.pack("<HHIII", 1, Command.VERSION, 8, 0, 0))


def _huge_size(peer):
    peer.send(struct.pack("<HHIII", 1, Command.REGION_WRITE, 0xFFFFFFFF, 0, 0))


def _before_version(peer):
    peer.command(Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [memfd(MB)])


def _bad_json(peer):
    peer.command(Command.VERSION, struct.pack("<HH", 0, 0) + b"{nope")


def _too_many_fds(peer):
    peer.negotiate()
    fds = [os.eventfd(0) for _ in range(p.MAX_MSG_FDS + 1)]
    peer.command(Command.DEVICE_SET_IRQS, p.IrqSet(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                                                   PciIrq.MSIX, 0, len(fds)).encode(), fds)
    for fd in fds:
        os.close(fd)


def enable_controller(peer):
    """Admin queues at 0x10000/0x20000 (32 entries), then CC.EN=1, by trapped register writes."""
    for offset, value in ((r.Reg.AQA, 0x001F001F), (r.Reg.ASQ, 0x10000), (r.Reg.ACQ, 0x20000),
                          (r.Reg.CC, 0x00460001)):
        access = p.RegionAccess(offset, PciRegion.BAR0, 4, struct.pack("<I", value))
        assert peer.call(Command.REGION_WRITE, access.encode())[0][4] == 0


def wait_fatal(peer, timeout_s=5.0):
    """The daemon notices on its next poll: wait for the controller fatal status."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, csts, _ = peer.call(Command.REGION_READ, p.RegionAccess(r.Reg.CSTS, PciRegion.BAR0, 4).encode())
        if struct.unpack("<I", p.RegionAccess.decode(csts).data)[0] & r.CSTS_CFS:
            return
        assert time.monotonic() < deadline, "no controller fatal status"
        time.sleep(0.01)


def _dma_beyond_fd_and_overlapping(peer):
    peer.negotiate()
    small = memfd(4096)
    assert peer.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, MB).encode(), [small])[0][4] == 22
    ram = memfd(2 * MB)
    assert peer.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, 2 * MB).encode(), [ram])[0][4] == 0
    assert peer.call(Command.DMA_MAP, p.DmaMap(3, 0, MB, MB).encode(), [ram])[0][4] == 17
    pipe_r, pipe_w = os.pipe()
    assert peer.call(Command.DMA_MAP, p.DmaMap(3, 0, 0x400000, MB).encode(), [pipe_r])[0][4] == 22
    for fd in (small, ram, pipe_r, pipe_w):
        os.close(fd)


def _truncate_guest_memory_under_an_enabled_controller(peer):
    """The daemon's admin-queue poll touches the lost pages: zeros, no SIGBUS; the client is
    dropped."""
    peer.negotiate()
    ram = memfd(2 * MB)
    assert peer.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, 2 * MB).encode(), [ram])[0][4] == 0
    enable_controller(peer)
    os.ftruncate(ram, 0)
    trapped = p.RegionAccess(0x1000, PciRegion.BAR0, 4, struct.pack("<I", 1))   # SQ 0 tail
    peer.command(Command.REGION_WRITE, trapped.encode())
    assert peer.closed_by_daemon()
    os.close(ram)


def _unmap_in_use_and_hostile_doorbells(peer):
    """Enable the controller over mapped RAM, ring an impossible doorbell through the mmapped
    BAR0 page, unmap the admin queues' memory while enabled, then leave."""
    peer.negotiate()
    ram = memfd(2 * MB)
    assert peer.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, 2 * MB).encode(), [ram])[0][4] == 0
    enable_controller(peer)
    header, payload, fds = peer.call(Command.DEVICE_GET_REGION_INFO,
                                     p.RegionInfo(PciRegion.BAR0, 0, 0, 0, argsz=64).encode())
    doorbells = mmap.mmap(fds[0], 0x1000, offset=0x1000)
    doorbells[0:4] = struct.pack("<I", 0xFFFF)
    wait_fatal(peer)
    doorbells.close()
    os.close(fds[0])
    assert peer.call(Command.DMA_UNMAP, p.DmaUnmap(0, 0, 2 * MB).encode())[0][4] == 0
    os.close(ram)
    reset = peer.call(Command.DEVICE_RESET)
    assert reset[0][4] == 0


def _sqe(opcode, cid, nsid=0, prp1=0, prp2=0, cdw10=0, cdw11=0, cdw12=0):
    return struct.pack("<BBHIQQQQIIIIII", opcode, 0, cid, nsid, 0, 0, prp1, prp2, cdw10, cdw11,
                       cdw12, 0, 0, 0)


def _wait_completions(ram, cq_addr, count, deadline_s=10.0):
    """{cid: (SCT, SC)} of the first ``count`` entries of a CQ in its first phase."""
    deadline = time.monotonic() + deadline_s
    while True:
        dw3s = [struct.unpack_from("<I", ram, cq_addr + 16 * i + 12)[0] for i in range(count)]
        if all(dw3 >> 16 & 1 for dw3 in dw3s):
            return {dw3 & 0xFFFF: (dw3 >> 25 & 7, dw3 >> 17 & 0xFF) for dw3 in dw3s}
        assert time.monotonic() < deadline, "completions did not come: %r" % dw3s
        time.sleep(0.01)


def _hostile_io_commands_and_an_impossible_io_doorbell(peer):
    """An I/O queue pair on the reactors: hostile PRPs, NSIDs and LBAs each get their NVMe
    status and a good read still works; then an SQ tail beyond the queue is controller fatal."""
    peer.negotiate()
    fd = memfd(2 * MB)
    assert peer.call(Command.DMA_MAP, p.DmaMap(3, 0, 0, 2 * MB).encode(), [fd])[0][4] == 0
    ram = mmap.mmap(fd, 2 * MB)
    enable_controller(peer)
    _, _, fds = peer.call(Command.DEVICE_GET_REGION_INFO,
                          p.RegionInfo(PciRegion.BAR0, 0, 0, 0, argsz=64).encode())
    doorbells = mmap.mmap(fds[0], 0x1000, offset=0x1000)
    ram[0x10000:0x10080] = _sqe(0x05, 1, prp1=0x30000, cdw10=1 | 15 << 16, cdw11=1) \
        + _sqe(0x01, 2, prp1=0x40000, cdw10=1 | 15 << 16, cdw11=1 | 1 << 16)
    doorbells[0:4] = struct.pack("<I", 2)
    assert _wait_completions(ram, 0x20000, 2) == {1: (0, 0), 2: (0, 0)}
    ram[0x60000:0x60010] = struct.pack("<QQ", 0x52000, 0xDEAD0000)         # a PRP list
    commands = [
        _sqe(0x02, 10, 1, prp1=0xDEAD0000),                                 # outside guest memory
        _sqe(0x02, 11, 1, prp1=0x50002),                                    # PRP1 not dword aligned
        _sqe(0x02, 12, 9, prp1=0x50000),                                    # no such namespace
        _sqe(0x01, 13, 1, prp1=0x50000, prp2=0x60000, cdw12=23),            # list entry outside
        _sqe(0x02, 14, 1, prp1=0x50000, cdw10=2047, cdw12=1),               # past the last LBA
        _sqe(0x7F, 15, 1),                                                  # unknown opcode
        _sqe(0x02, 16, 1, prp1=0x50000, cdw12=7),                           # a good 4 KiB read
    ]
    ram[0x40000:0x40000 + 64 * len(commands)] = b"".join(commands)
    doorbells[8:12] = struct.pack("<I", len(commands))                      # SQ 1 tail
    assert _wait_completions(ram, 0x30000, len(commands)) == {
        10: (0, 0x04), 11: (0, 0x13), 12: (0, 0x0B), 13: (0, 0x04), 14: (0, 0x80), 15: (0, 0x01),
        16: (0, 0x00)}
    doorbells[8:12] = struct.pack("<I", 100)                                # beyond 16 entries
    wait_fatal(peer)
    doorbells.close()
    os.close(fds[0])
    ram.close()
    assert peer.call(Command.DMA_UNMAP, p.DmaUnmap(0, 0, 2 * MB).encode())[0][4] == 0
    os.close(fd)
    assert peer.call(Command.DEVICE_RESET)[0][4] == 0


def _eventfds_then_vanish(peer):
    peer.negotiate()
    fds = [os.eventfd(0) for _ in range(4)]
    peer.call(Command.DEVICE_SET_IRQS, p.IrqSet(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER,
                                                PciIrq.MSIX, 0, 4).encode(), fds)
    for fd in fds:
        os.close(fd)


def _half_a_message(peer):
    peer.negotiate()
    peer.send(p.encode(9, Command.REGION_WRITE, p.RegionAccess(0, PciRegion.CONFIG, 64, bytes(64)).encode())[:40])


def _out_of_range_accesses(peer):
    peer.negotiate()
    for access in (p.RegionAccess(0x4000, PciRegion.BAR0, 4), p.RegionAccess(0, 44, 4),
                   p.RegionAccess((1 << 64) - 1, PciRegion.CONFIG, 8), p.RegionAccess(0, PciRegion.CONFIG, 2 * MB)):
        assert peer.call(Command.REGION_READ, access.encode())[0][4] == 22


CASES = [_short_header, _size_below_header, _huge_size, _before_version, _bad_json, _too_many_fds,
         _dma_beyond_fd_and_overlapping, _truncate_guest_memory_under_an_enabled_controller,
         _unmap_in_use_and_hostile_doorbells, _hostile_io_commands_and_an_impossible_io_doorbell,
         _eventfds_then_vanish, _half_a_message, _out_of_range_accesses]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_hostile_client_case(target, case):
    peer = Peer(target.path)
    try:
        case(peer)
    finally:
        peer.close()
    target.after_case()


MESSAGES = st.tuples(st.integers(0, 20), st.binary(max_size=64), st.integers(0, 2),
                     st.sampled_from([0, p.FLAG_NO_REPLY]))


@settings(max_examples=examples(40, 2000), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(MESSAGES, max_size=12))
def test_generated_message_sequences_after_version(target, messages):
    peer = Peer(target.path)
    try:
        peer.negotiate()
        for command, payload, nfds, flags in messages:
            fds = [memfd(4096) for _ in range(nfds)]
            try:
                peer.next_id += 1
                peer.send(p.encode(peer.next_id, command, payload, flags), fds)
            except OSError:
                break
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        peer.close()
    target.after_case()


def test_the_baseline_is_the_daemon_with_both_controllers_idle(target):
    assert json.dumps(target.daemon.rpc("nvmf_get_subsystems"))
    target.after_case()
