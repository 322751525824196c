"""The front-end's life cycle seen from vhostd: a guest that reboots, a QEMU that is killed, a
controller or bdev removed under a guest.  vhostd keeps serving, and releases what a session held."""

from __future__ import annotations

import hashlib
import os

import pytest

from guest import VhostUserDevice
from tests.helpers.daemon import Daemon
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def pattern(first: int) -> bytes:
    """1 MiB of 8-byte lines, as the guest's ``seq first first+131071`` prints them."""
    return b"".join(b"%d\n" % i for i in range(first, first + MIB // 8))


def write_pattern(guest, first: int, offset_mib: int) -> None:
    guest.check(f"seq {first} {first + MIB // 8 - 1} > /tmp/p && dd if=/tmp/p of=/dev/vda bs=64k"
                f" seek={offset_mib * 16} oflag=direct conv=fsync,notrunc 2>/dev/null")


def read_md5(guest, offset_mib: int) -> str:
    return guest.check(f"dd if=/dev/vda bs=64k skip={offset_mib * 16} count=16 iflag=direct 2>/dev/null"
                       " | md5sum").split()[0]


def io_errors(guest) -> str:
    return guest.run("dmesg | grep -iE 'I/O error|blk_update_request|critical'")[1]


@pytest.fixture
def vhostd(socket_dir):
    daemons = []

    def start(*args, **kw):
        workdir = socket_dir / ("d%d" % len(daemons))
        workdir.mkdir()
        d = Daemon(*args, workdir=str(workdir), **kw)
        daemons.append(d)
        return d.start()

    yield start
    for d in daemons:
        d.stop()
        print(d.log())
        d.cleanup()


def test_guest_reboot_resets_the_device_and_keeps_its_data(vhostd, boot_guest, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    d = vhostd("-L", "DEBUG")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    guest = boot_guest(reboot_resets=True, devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0")])
    write_pattern(guest, 2000000, 0)
    stops_before = d.log().count("GET_VRING_BASE")
    kicks_before = d.log().count("SET_VRING_KICK")

    print("guest rebooted in %.1f s" % guest.reboot())
    guest.wait_for_path("/dev/vda")
    # The reset stopped the rings (GET_VRING_BASE) and the new driver started them again.
    assert d.log().count("GET_VRING_BASE") > stops_before
    assert d.log().count("SET_VRING_KICK") > kicks_before
    (info,) = d.rpc("vhost_get_controllers")
    (session,) = info["sessions"]
    assert session["started"] is True
    assert read_md5(guest, 0) == hashlib.md5(pattern(2000000)).hexdigest()
    write_pattern(guest, 3000000, 4)
    assert read_md5(guest, 4) == hashlib.md5(pattern(3000000)).hexdigest()
    assert io_errors(guest) == ""
    assert guest.poweroff() == 0
    assert d.proc.poll() is None
    data = image.read_bytes()
    assert data[:MIB] == pattern(2000000) and data[4 * MIB:5 * MIB] == pattern(3000000)


def open_fds(pid: int) -> set[str]:
    """What each of a process's fds refers to (anon inodes, sockets, files)."""
    fds = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.add("%s -> %s" % (fd, os.readlink(f"/proc/{pid}/fd/{fd}")))
        except FileNotFoundError:
            pass
    return fds


def shared_mappings(pid: int) -> list[str]:
    """The process's mappings of memfds (guest RAM, inflight regions)."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.strip() for line in f if "memfd:" in line]


def assert_released(pid: int, fds_idle: set[str], maps_idle: list[str]) -> None:
    """The process is back to the fds and memfd mappings it had before a front-end came (an RPC
    connection the daemon has not closed yet is given a moment)."""
    try:
        wait_for(lambda: open_fds(pid) == fds_idle and shared_mappings(pid) == maps_idle,
                 timeout=5, interval=0.1)
    except TimeoutError:
        pass
    assert shared_mappings(pid) == maps_idle
    assert sorted(open_fds(pid) - fds_idle) == [] and sorted(fds_idle - open_fds(pid)) == []


def start_writers(guest, count: int = 2) -> None:
    """Background writers that keep requests in flight until QEMU dies."""
    guest.check("seq 1 2000000 > /tmp/p")
    guest.check(f"for i in $(seq 0 {count - 1}); do (while :; do dd if=/tmp/p of=/dev/vda bs=64k"
                " seek=$((i * 64)) count=64 oflag=direct conv=notrunc 2>/dev/null; done) & done")


def test_qemu_killed_mid_io_releases_the_session_and_a_new_qemu_attaches(vhostd, boot_guest, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    d = vhostd("-L", "INFO")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    pid = d.proc.pid
    fds_idle, maps_idle = open_fds(pid), shared_mappings(pid)
    device = VhostUserDevice("blk", d.socket_dir / "vhost.0")
    guest = boot_guest(devices=[device])
    start_writers(guest)
    wait_for(lambda: d.rpc("bdev_get_iostat")["bdevs"][0]["num_write_ops"] > 50, timeout=30, interval=0.1)
    (session,) = d.rpc("vhost_get_controllers")[0]["sessions"]
    assert session["started"] is True
    # Guest RAM and the inflight region are mapped while the session lives.
    assert any("memfd:vhostd-inflight" in m for m in shared_mappings(pid))
    assert len(shared_mappings(pid)) > len(maps_idle)
    assert len(open_fds(pid)) > len(fds_idle)

    guest.kill()
    wait_for(lambda: d.rpc("vhost_get_controllers")[0]["sessions"] == [], timeout=10, interval=0.1)
    assert "%s: front-end disconnected" % session["name"] in d.log()
    assert d.proc.poll() is None
    assert_released(pid, fds_idle, maps_idle)

    again = boot_guest(devices=[device])
    write_pattern(again, 4000000, 8)
    assert read_md5(again, 8) == hashlib.md5(pattern(4000000)).hexdigest()
    assert io_errors(again) == ""
    assert again.poweroff() == 0
    wait_for(lambda: d.rpc("vhost_get_controllers")[0]["sessions"] == [], timeout=10, interval=0.1)
    assert_released(pid, fds_idle, maps_idle)
    assert image.read_bytes()[8 * MIB:9 * MIB] == pattern(4000000)
