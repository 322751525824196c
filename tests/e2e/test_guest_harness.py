"""The e2e harness proven on a real path: QEMU guest <-> vhost-user-blk <-> qemu-storage-daemon (and
vhostd, whose log a guest's failure report carries); the pattern helper both sides use."""

from __future__ import annotations

import subprocess

import pytest

from guest import CommandFailed, GuestError, GuestExited, GuestTimeout, PatternMismatch, VhostUserDevice

pytestmark = pytest.mark.e2e

MIB = 1 << 20
IMAGE_SIZE_BYTES = 64 * MIB
SEED = 7
PATTERN_OFFSET = 8 * MIB
PATTERN_BYTES = 4 * MIB


def make_image(path, size_bytes=IMAGE_SIZE_BYTES):
    """A sparse, zero-filled image file."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    return path


def test_pattern_helper_depends_on_seed_and_position_and_finds_a_changed_byte(guest_image, tmp_path):
    tool = guest_image.patterns
    data = tool.bytes(SEED, 0, 64 * 1024)
    assert len(data) == 64 * 1024 and data != bytes(len(data))
    # Position-dependent: the bytes at 4 KiB are the same whether made from 0 or from 4 KiB, and
    # differ from those at 0; another seed gives other bytes.
    assert tool.bytes(SEED, 4096, 4096) == data[4096:8192] != data[:4096]
    assert tool.bytes(SEED + 1, 0, 4096) != data[:4096]
    path = tmp_path / "file"
    # Bytes made for position 0 but written at 4 KiB are in the wrong place.
    path.write_bytes(bytes(4096) + data)
    tool.check_file(path, "zero", 0, 4096)
    with pytest.raises(PatternMismatch, match="mismatch at 4096"):
        tool.check_file(path, SEED, 4096, len(data))
    path.write_bytes(bytes(4096) + tool.bytes(SEED, 4096, len(data)))
    tool.check_file(path, SEED, 4096, len(data))
    changed = bytearray(path.read_bytes())
    changed[4096 + 5000] ^= 1
    path.write_bytes(changed)
    with pytest.raises(PatternMismatch, match="mismatch at 9096: 1 of"):
        tool.check_file(path, SEED, 4096, len(data))


def test_pattern_helper_randread_counts_its_reads_and_refuses_a_span_below_one_read(guest_image, tmp_path):
    path = make_image(tmp_path / "disk", 1 * MIB)
    result = subprocess.run([str(guest_image.patterns.path), "randread", str(path), "1M", "200", "-b", "512"],
                            capture_output=True, text=True, check=True)
    fields = dict(word.split("=") for word in result.stdout.split()[2:])
    assert result.stdout.startswith(f"randread {path} ") and int(fields["ops"]) > 0
    assert int(fields["bytes"]) == 512 * int(fields["ops"]) and int(fields["ms"]) >= 200
    assert int(fields["iops"]) == pytest.approx(int(fields["ops"]) * 1000 / int(fields["ms"]), rel=0.01)
    short = subprocess.run([str(guest_image.patterns.path), "randread", str(path), "4095", "10"],
                           capture_output=True, text=True)
    assert short.returncode == 2 and "usage" in short.stderr


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


def test_command_timeout_is_scaled_and_reports_console_and_vhostd_log_and_retires_guest(vhostd, boot_guest):
    d = vhostd()
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "16", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    guest = boot_guest(min_time_scale=2.0, devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0")])
    assert guest.calibration_s > 0 and guest.time_scale >= 2.0
    with pytest.raises(GuestTimeout) as timeout:
        guest.run("echo partial-output-before-hang; sleep 600", timeout_s=1)
    report = str(timeout.value)
    assert "timeout 1 s x %.1f = " % guest.time_scale in report
    assert "partial-output-before-hang" in report
    assert guest.command_line_str in report
    assert "vhostd ready" in report.split("--- vhostd logs (tail) ---")[1]
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
    # Through the page cache to the raw disk, then read back cold so the read goes to the back-end.
    guest.write_pattern("/dev/vda", SEED, PATTERN_OFFSET, PATTERN_BYTES, chunk_bytes=MIB)
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern("/dev/vda", SEED, PATTERN_OFFSET, PATTERN_BYTES)
    with pytest.raises(PatternMismatch):
        guest.check_pattern("/dev/vda", SEED + 1, PATTERN_OFFSET, PATTERN_BYTES)
    assert guest.poweroff() == 0

    guest.image.patterns.check_file(image, SEED, PATTERN_OFFSET, PATTERN_BYTES)
    guest.image.patterns.check_file(image, "zero", 0, PATTERN_OFFSET)
    end = PATTERN_OFFSET + PATTERN_BYTES
    guest.image.patterns.check_file(image, "zero", end, IMAGE_SIZE_BYTES - end)


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
