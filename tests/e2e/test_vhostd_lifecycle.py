"""The front-end's life cycle seen from vhostd: a guest that reboots, a QEMU that is killed, a
controller or bdev removed under a guest.  vhostd keeps serving, and releases what a session held."""

from __future__ import annotations

import os
import threading

import pytest

from guest import VhostUserDevice, pattern_command
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

MIB = 1 << 20
# The writers' pattern; each phase's own pattern has its own seed, so stale data is caught.
WRITER_SEED = 1
PHASE_BYTES = MIB
# Enough writes to show a writer is under way (each is one 64 KiB request).
WRITES_UNDER_WAY = 50


def write_phase(guest, seed: int, offset_mib: int, disk: str = "/dev/vda") -> None:
    """1 MiB of pattern ``seed`` at ``offset_mib`` of ``disk``, O_DIRECT and fsynced."""
    guest.write_pattern(disk, seed, offset_mib * MIB, PHASE_BYTES, direct=True)


def check_phase(guest, seed: int, offset_mib: int, disk: str = "/dev/vda") -> None:
    """The guest reads back (O_DIRECT) what :func:`write_phase` wrote there."""
    guest.check_pattern(disk, seed, offset_mib * MIB, PHASE_BYTES, direct=True)


def check_phase_in_file(guest, path, seed: int, offset_mib: int) -> None:
    """The file behind the disk holds what :func:`write_phase` wrote there."""
    guest.image.patterns.check_file(path, seed, offset_mib * MIB, PHASE_BYTES)


def io_errors(guest) -> str:
    return guest.run("dmesg | grep -iE 'I/O error|blk_update_request|critical'")[1]


def test_guest_reboot_resets_the_device_and_keeps_its_data(vhostd, boot_guest, sparse_file):
    image = sparse_file(16 * MIB)
    d = vhostd("-L", "DEBUG")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    guest = boot_guest(reboot_resets=True, devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0")])
    write_phase(guest, 2, 0)
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
    check_phase(guest, 2, 0)
    write_phase(guest, 3, 4)
    check_phase(guest, 3, 4)
    assert io_errors(guest) == ""
    assert guest.poweroff() == 0
    assert d.proc.poll() is None
    check_phase_in_file(guest, image, 2, 0)
    check_phase_in_file(guest, image, 3, 4)


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
    extra, missing = sorted(open_fds(pid) - fds_idle), sorted(fds_idle - open_fds(pid))
    assert (extra, missing) == ([], []), describe_sockets(extra)


def unix_sockets() -> dict[str, str]:
    """Inode -> /proc/net/unix line (which shows the bound path) of every Unix socket."""
    with open("/proc/net/unix") as f:
        return {line.split()[6]: line for line in list(f)[1:]}


def describe_sockets(fds: list[str]) -> str:
    sockets = unix_sockets()
    return "".join(sockets.get(fd.rsplit("[", 1)[1].rstrip("]"), fd + "\n") for fd in fds if "socket:[" in fd)


def without(fds: set[str], *paths) -> set[str]:
    """``fds`` less those of a file in ``paths`` or a socket bound to one of them."""
    sockets = unix_sockets()
    names = tuple(str(p) for p in paths)

    def refers_to(fd: str) -> bool:
        target = fd.split(" -> ", 1)[1]
        if target.startswith("socket:["):
            target = sockets.get(target[8:-1], "").rstrip("\n")
        return target.endswith(names)

    return {fd for fd in fds if not refers_to(fd)}


def start_writers(guest, disk: str = "/dev/vda", count: int = 2) -> None:
    """Background writers, writer i writing pattern WRITER_SEED over [4i, 4i+4) MiB (O_DIRECT, in
    64 KiB requests) over and over, each stopping at its first failed write; a writer that stops
    leaves its exit status in /tmp/wrc<i>."""
    guest.check("rm -f /tmp/wrc*")
    for i in range(count):
        write = pattern_command("write", WRITER_SEED, disk, i * 4 * MIB, 4 * MIB, direct=True)
        guest.check(f"(while :; do {write} 2>/dev/null || {{ echo $? > /tmp/wrc{i}; break; }}; done)"
                    " >/dev/null 2>&1 &")


def write_ops(d, bdev: str) -> int:
    return d.rpc("bdev_get_iostat", name=bdev)["bdevs"][0]["num_write_ops"]


def wait_for_writes(d, guest, bdev: str, more_than: int) -> None:
    """Wait until ``bdev`` has served more than ``more_than`` writes (the guest's writers are under
    way); the guest's failure report if they never get there."""
    try:
        wait_for(lambda: write_ops(d, bdev) > more_than, timeout=guest.scaled(30), interval=0.1)
    except TimeoutError:
        raise guest.failure(f"{bdev} served {write_ops(d, bdev)} writes, not more than {more_than}") from None


def test_qemu_killed_mid_io_releases_the_session_and_a_new_qemu_attaches(vhostd, boot_guest, sparse_file):
    image = sparse_file(16 * MIB)
    d = vhostd("-L", "INFO")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    pid = d.proc.pid
    fds_idle, maps_idle = open_fds(pid), shared_mappings(pid)
    device = VhostUserDevice("blk", d.socket_dir / "vhost.0")
    guest = boot_guest(devices=[device])
    start_writers(guest)
    wait_for_writes(d, guest, "File0", WRITES_UNDER_WAY)
    (session,) = d.rpc("vhost_get_controllers")[0]["sessions"]
    assert session["started"] is True
    # Guest RAM and the inflight region are mapped while the session lives.
    assert any("memfd:vhostd-inflight" in m for m in shared_mappings(pid))
    assert len(shared_mappings(pid)) > len(maps_idle)
    assert len(open_fds(pid)) > len(fds_idle)

    guest.kill()
    wait_for(lambda: d.rpc("vhost_get_controllers")[0]["sessions"] == [], timeout=guest.scaled(10), interval=0.1)
    assert "%s: front-end disconnected" % session["name"] in d.log()
    assert d.proc.poll() is None
    assert_released(pid, fds_idle, maps_idle)

    again = boot_guest(devices=[device])
    write_phase(again, 4, 8)
    check_phase(again, 4, 8)
    assert io_errors(again) == ""
    assert again.poweroff() == 0
    wait_for(lambda: d.rpc("vhost_get_controllers")[0]["sessions"] == [], timeout=again.scaled(10), interval=0.1)
    assert_released(pid, fds_idle, maps_idle)
    check_phase_in_file(again, image, 4, 8)


def writer_codes(guest, count: int = 2) -> list[int]:
    out = guest.check(" ".join(["cat"] + ["/tmp/wrc%d" % i for i in range(count)]) + " 2>/dev/null; true")
    return [int(c) for c in out.split()]


@pytest.fixture
def two_controllers(vhostd, boot_guest, sparse_file):
    """vhost.0 serves File0 (a 16 MiB file), vhost.1 serves Malloc1; a guest has vhost.1 as vda
    and vhost.0, hot-plugged, as vdb.  Also the daemon's fds and memfd mappings as they should be
    once vhost.0 and File0 are gone (recorded before vhost.0's front-end came)."""
    image = sparse_file(16 * MIB)
    d = vhostd("-L", "INFO")
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("bdev_malloc_create", "-b", "Malloc1", "16", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    d.spdk("vhost_create_blk_controller", "vhost.1", "Malloc1")
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.1", id="keep")])
    guest.wait_for_path("/dev/vda")
    pid = d.proc.pid
    # What is left once vhost.0 is gone: no listening socket of its own (and, once its bdev is
    # deleted too, no file).
    fds_idle = open_fds(pid)
    baseline = without(fds_idle, d.socket_dir / "vhost.0", image), shared_mappings(pid)
    assert len(baseline[0]) <= len(fds_idle) - 2
    guest.hotplug(VhostUserDevice("blk", d.socket_dir / "vhost.0", id="gone"))
    guest.wait_for_path("/dev/vdb")
    assert guest.read_sysfs("/sys/block/vdb/serial") == "File0"
    return d, guest, image, baseline


def delete_in_background(d, ctrlr: str):
    """vhost_delete_controller from another thread (it waits for the front-end to leave)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(d.rpc("vhost_delete_controller", ctrlr=ctrlr)))
    thread.start()
    return thread, result


def unplug_and_finish_delete(d, guest, thread, result) -> None:
    """Unplug vhost.0 from the guest; the pending vhost_delete_controller then completes, its
    socket is gone and the daemon still runs."""
    guest.unplug("gone")
    thread.join(30)
    assert result == [True]
    assert [c["ctrlr"] for c in d.rpc("vhost_get_controllers")] == ["vhost.1"]
    assert not (d.socket_dir / "vhost.0").exists()
    assert d.proc.poll() is None


def test_bdev_hot_removed_under_a_writing_guest_fails_its_io_and_nothing_else(two_controllers):
    d, guest, image, (fds_idle, maps_idle) = two_controllers
    start_writers(guest, "/dev/vdb")
    wait_for_writes(d, guest, "File0", WRITES_UNDER_WAY)
    d.spdk("bdev_aio_delete", "File0")
    # Each writer stops at its first failed write: the guest saw an I/O error, not a hang.
    try:
        wait_for(lambda: len(writer_codes(guest)) == 2, timeout=guest.scaled(30), interval=0.5)
    except TimeoutError:
        raise guest.failure(f"writers still running after File0 went: {writer_codes(guest)}") from None
    assert all(code != 0 for code in writer_codes(guest))
    assert "vdb" in io_errors(guest)
    assert guest.run("dd if=/dev/vdb of=/dev/null bs=4k count=1 iflag=direct")[0] != 0
    assert d.rpc("vhost_get_controllers", name="vhost.0")[0]["backend_specific"]["block"]["bdev"] is None
    # The other controller is untouched.
    write_phase(guest, 5, 2)
    check_phase(guest, 5, 2)
    assert "vda" not in io_errors(guest)

    # The controller goes when its front-end does; then the file and the session are let go.
    thread, result = delete_in_background(d, "vhost.0")
    unplug_and_finish_delete(d, guest, thread, result)
    assert not any(str(image) in fd for fd in open_fds(d.proc.pid))
    assert_released(d.proc.pid, fds_idle, maps_idle)
    check_phase(guest, 5, 2)


def test_controller_deleted_under_a_writing_guest_goes_when_the_guest_lets_go(two_controllers):
    d, guest, image, (fds_idle, maps_idle) = two_controllers
    start_writers(guest, "/dev/vdb")
    wait_for_writes(d, guest, "File0", WRITES_UNDER_WAY)
    thread, result = delete_in_background(d, "vhost.0")
    # While the guest holds the controller the delete waits and the guest's I/O goes on: the
    # writers get well past where they were and the delete has still not replied.
    wait_for_writes(d, guest, "File0", write_ops(d, "File0") + 20)
    assert result == [] and thread.is_alive()
    assert writer_codes(guest) == []
    write_phase(guest, 6, 2)
    check_phase(guest, 6, 2)

    # Unplugged with its writers still running: QEMU stops the rings with requests in flight.
    unplug_and_finish_delete(d, guest, thread, result)
    assert "vda" not in io_errors(guest)
    check_phase(guest, 6, 2)
    # The bdev outlives its controller and still holds what the guest wrote.
    d.spdk("bdev_aio_delete", "File0")
    assert_released(d.proc.pid, fds_idle, maps_idle)
    guest.image.patterns.check_file(image, WRITER_SEED, 0, 64 * 1024)
