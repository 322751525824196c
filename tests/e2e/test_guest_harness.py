"""The e2e harness proven on a real path: QEMU guest <-> vhost-user-blk <-> qemu-storage-daemon."""

from __future__ import annotations

import hashlib

import pytest

from guest import CommandFailed, GuestError, GuestExited, GuestTimeout, VhostUserDevice

pytestmark = pytest.mark.e2e

IMAGE_SIZE_BYTES = 64 * 1024 * 1024
PATTERN_OFFSET_MIB = 8
# The pattern: the numbers 1000000..1524287, one per 8-byte line, exactly 4 MiB; made in the guest by
# busybox seq, recomputed here.
PATTERN_FIRST, PATTERN_LAST = 1000000, 1524287
PATTERN_BYTES = 4 * 1024 * 1024


def make_image(path, size_bytes=IMAGE_SIZE_BYTES):
    """A sparse, zero-filled image file."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    return path


def expected_pattern() -> bytes:
    return b"".join(b"%d\n" % i for i in range(PATTERN_FIRST, PATTERN_LAST + 1))


def test_command_output_status_and_failure_are_reported(boot_guest):
    guest = boot_guest()
    assert guest.run("echo out; echo err >&2; exit 7") == (7, "out\nerr\n")
    assert guest.check("printf 'no newline'") == "no newline"
    assert guest.check("echo 'quotes \" and $x'; printf '%s\\n' \"a b\"") == 'quotes " and $x\na b\n'
    assert len(guest.check("seq 1 20000").splitlines()) == 20000
    with pytest.raises(CommandFailed) as failed:
        guest.check("false")
    assert failed.value.rc == 1
    assert guest.qmp("query-status")["status"] == "running"
    assert guest.poweroff() == 0


def test_command_timeout_reports_console_tail_and_retires_guest(boot_guest):
    guest = boot_guest()
    with pytest.raises(GuestTimeout) as timeout:
        guest.run("echo partial-output-before-hang; sleep 600", timeout_s=1)
    assert "partial-output-before-hang" in str(timeout.value)
    assert guest.command_line_str in str(timeout.value)
    with pytest.raises(GuestError, match="unusable"):
        guest.run("true")


def test_qemu_failing_at_start_reports_its_stderr(boot_guest, socket_dir):
    with pytest.raises(GuestExited, match="Failed to connect"):
        boot_guest(devices=[VhostUserDevice("blk", socket_dir / "nobody-listens.sock")])


def test_blk_disk_from_storage_daemon_reads_and_writes(boot_guest, storage_daemon, tmp_path):
    image = make_image(tmp_path / "disk.img")
    qsd = storage_daemon(image)
    guest = boot_guest(devices=[VhostUserDevice("blk", qsd.socket_path)])

    assert guest.read_sysfs("/sys/block/vda/size") == str(IMAGE_SIZE_BYTES // 512)
    assert guest.block_device_sizes()["vda"] == IMAGE_SIZE_BYTES
    # Write the pattern to the raw disk, drop the page cache so the read goes to the back-end,
    # read it back and compare checksums in the guest.
    guest.check(
        f"seq {PATTERN_FIRST} {PATTERN_LAST} > /tmp/pattern"
        f" && dd if=/tmp/pattern of=/dev/vda bs=1M seek={PATTERN_OFFSET_MIB} conv=fsync 2>/dev/null"
        " && echo 3 > /proc/sys/vm/drop_caches"
    )
    written, read_back = guest.check(
        "md5sum < /tmp/pattern;"
        f" dd if=/dev/vda bs=1M skip={PATTERN_OFFSET_MIB} count={PATTERN_BYTES >> 20} 2>/dev/null | md5sum"
    ).splitlines()
    assert written == read_back
    assert guest.poweroff() == 0

    pattern = expected_pattern()
    assert len(pattern) == PATTERN_BYTES
    assert written.split()[0] == hashlib.md5(pattern).hexdigest()
    data = image.read_bytes()
    offset = PATTERN_OFFSET_MIB << 20
    assert data[offset : offset + PATTERN_BYTES] == pattern
    assert data[:offset] == bytes(offset)
    assert data[offset + PATTERN_BYTES :] == bytes(len(data) - offset - PATTERN_BYTES)


def test_blk_disk_with_two_queues_gets_two_blk_mq_queues(boot_guest, storage_daemon, tmp_path):
    qsd = storage_daemon(make_image(tmp_path / "disk.img"), num_queues=2)
    guest = boot_guest(devices=[VhostUserDevice("blk", qsd.socket_path, num_queues=2)], smp=2)

    assert guest.check("ls /sys/block/vda/mq").split() == ["0", "1"]
    assert guest.check("grep -c ^processor /proc/cpuinfo").strip() == "2"
    guest.check("dd if=/dev/vda of=/dev/null bs=1M count=4 2>/dev/null")
    assert guest.poweroff() == 0


def test_blk_disk_hotplug_and_unplug_over_qmp(boot_guest, storage_daemon, tmp_path):
    qsd = storage_daemon(make_image(tmp_path / "disk.img"))
    guest = boot_guest()
    assert "vda" not in guest.block_device_sizes()

    device = guest.hotplug(VhostUserDevice("blk", qsd.socket_path))
    guest.wait_for_path("/sys/block/vda")
    assert guest.block_device_sizes()["vda"] == IMAGE_SIZE_BYTES
    pci_ids = [dev.get("qdev_id") for dev in guest.qmp("query-pci")[0]["devices"]]
    assert device.id in pci_ids

    guest.unplug(device.id)
    assert "vda" not in guest.block_device_sizes()
    assert guest.poweroff() == 0
