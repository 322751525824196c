"""vhostd dies or restarts under a writing guest: the guest carries on without an I/O error and every
write it saw acknowledged and flushed is on disk (inflight tracking, QEMU reconnect=1), on split and
on packed virtqueues (packed=on, a --packed-ring controller: the region gives back both ring
positions, which QEMU cannot after a crash)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from guest import VhostUserDevice
from tests.helpers.daemon import Daemon
from tests.helpers.waiting import wait_for
from writers import BackgroundWriters, io_errors_in_dmesg

pytestmark = pytest.mark.e2e

DISK_MIB = 64
SEED = 10
REQUEST_BYTES = 16 << 10
WRITERS = BackgroundWriters(SEED, count=4, slice_bytes=12 << 20, request_bytes=REQUEST_BYTES)
PATTERN_BYTES = WRITERS.total_bytes
# The target stays down this long before it is started again: an outage, not a wait for anything.
OUTAGE_S = 0.5


def write_config(path, image, packed=False):
    params = {"ctrlr": "vhost.0", "dev_name": "File0", **({"packed_ring": True} if packed else {})}
    path.write_text(json.dumps({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_aio_create", "params": {"name": "File0", "filename": str(image)}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": params}]}]}))


@pytest.fixture
def setup(socket_dir, tmp_path, sparse_file, started_daemons):
    image = sparse_file(DISK_MIB << 20)
    config = tmp_path / "config.json"
    workdir = socket_dir / "d"
    workdir.mkdir()
    daemons = []

    def start(packed=False):
        write_config(config, image, packed)
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
    """WRITERS on ``disk``: several requests are in flight, and complete out of order, when the
    target goes away."""
    dataclasses.replace(WRITERS, device=disk).start(guest)


def check_writers_finished_cleanly(guest, disk="/dev/vda"):
    """The writers all ended with status 0, the guest logged no I/O error, and the disk holds
    their pattern (read cold, O_DIRECT)."""
    assert WRITERS.wait(guest) == [0] * WRITERS.count, WRITERS.logs(guest)
    assert io_errors_in_dmesg(guest) == ""
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    guest.check_pattern(disk, SEED, 0, PATTERN_BYTES, direct=True)


def bytes_written(d):
    return d.rpc("bdev_get_iostat")["bdevs"][0]["bytes_written"]


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_guest_survives_a_target_restart_mid_write(setup, boot_guest, guest_image, how, ring):
    image, start = setup
    packed = ring == "packed"
    d = start(packed)
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0", reconnect_s=1,
                                                props={"packed": True} if packed else {})])
    if packed:
        assert d.rpc("vhost_get_queue_stats", name="vhost.0")["controllers"][0]["queues"][0]["packed"]
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
    start(packed)
    check_writers_finished_cleanly(guest)
    assert guest.poweroff() == 0
    guest_image.patterns.check_file(image, SEED, 0, PATTERN_BYTES)
    guest_image.patterns.check_file(image, "zero", PATTERN_BYTES, (DISK_MIB << 20) - PATTERN_BYTES)
