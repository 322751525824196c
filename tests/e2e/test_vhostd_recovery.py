"""vhostd dies or restarts under a writing guest: the guest carries on without an I/O error and every
write it saw acknowledged and flushed is on disk (inflight tracking, QEMU reconnect=1)."""

from __future__ import annotations

import json
import time

import pytest

from guest import VhostUserDevice, pattern_command
from tests.helpers.daemon import Daemon
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

DISK_MIB = 64
SEED = 10
WRITERS = 4
SLICE_BYTES = 12 << 20
PATTERN_BYTES = WRITERS * SLICE_BYTES
REQUEST_BYTES = 16 << 10
# The target stays down this long before it is started again: an outage, not a wait for anything.
OUTAGE_S = 0.5


def write_config(path, image):
    path.write_text(json.dumps({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_aio_create", "params": {"name": "File0", "filename": str(image)}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "File0"}}]}]}))


@pytest.fixture
def setup(socket_dir, tmp_path, sparse_file, started_daemons):
    image = sparse_file(DISK_MIB << 20)
    config = tmp_path / "config.json"
    write_config(config, image)
    workdir = socket_dir / "d"
    workdir.mkdir()
    daemons = []

    def start():
        d = Daemon(workdir=str(workdir), config=str(config))
        daemons.append(d)
        started_daemons.append(d)
        return d.start()

    yield image, start
    for d in daemons:
        d.stop()
        print(d.log())
        d.cleanup()


def start_writers(guest, disk="/dev/vda"):
    """Four background writers of 12 MiB each (O_DIRECT, fsync at the end), so several requests
    are in flight — and complete out of order — when the target goes away. Each leaves its exit
    status in /tmp/rc<i>."""
    jobs = "".join(
        f"({pattern_command('write', SEED, disk, i * SLICE_BYTES, SLICE_BYTES, direct=True, sync=True, chunk_bytes=REQUEST_BYTES)};"
        f" echo $? > /tmp/rc{i}) > /tmp/w{i}.log 2>&1 & "
        for i in range(WRITERS))
    guest.check("rm -f /tmp/rc*; " + jobs + "true")


def writer_codes(guest) -> list[int]:
    return [int(c) for c in guest.check("cat /tmp/rc* 2>/dev/null; true").split()]


def wait_writers(guest, timeout_s=240):
    """The writers' exit statuses once all have finished (``timeout_s`` nominal)."""
    try:
        wait_for(lambda: len(writer_codes(guest)) == WRITERS, timeout=guest.scaled(timeout_s), interval=0.5)
    except TimeoutError:
        raise guest.failure("the guest's writers did not finish: "
                            + guest.check("cat /tmp/w*.log; dmesg | tail")) from None
    return writer_codes(guest)


def check_writers_finished_cleanly(guest, disk="/dev/vda"):
    """The writers all ended with status 0, the guest logged no I/O error, and the disk holds
    their pattern (read cold, O_DIRECT)."""
    assert wait_writers(guest) == [0] * WRITERS, guest.check("cat /tmp/w*.log")
    errors = guest.run("dmesg | grep -iE 'I/O error|blk_update_request|critical' ")[1]
    assert errors == "", errors
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern(disk, SEED, 0, PATTERN_BYTES, direct=True)


def bytes_written(d):
    return d.rpc("bdev_get_iostat")["bdevs"][0]["bytes_written"]


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_guest_survives_a_target_restart_mid_write(setup, boot_guest, guest_image, how):
    image, start = setup
    d = start()
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0", reconnect_s=1)])
    start_writers(guest)
    # Mid-write: the writers are under way and far from done.
    wait_for(lambda: bytes_written(d) >= 64 * REQUEST_BYTES, timeout=guest.scaled(60), interval=0.02)
    written_before = bytes_written(d)
    if how == "kill -9":
        d.kill()
    else:
        d.stop()
    print(f"the target went away after {written_before >> 10} KiB of {PATTERN_BYTES >> 10} KiB")
    assert written_before < PATTERN_BYTES
    time.sleep(OUTAGE_S)
    start()
    check_writers_finished_cleanly(guest)
    assert guest.poweroff() == 0
    guest_image.patterns.check_file(image, SEED, 0, PATTERN_BYTES)
    guest_image.patterns.check_file(image, "zero", PATTERN_BYTES, (DISK_MIB << 20) - PATTERN_BYTES)
