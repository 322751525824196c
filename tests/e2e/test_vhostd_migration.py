"""Live migration of a vhost-user-blk or vhost-user-scsi guest between two QEMU 7.2 processes on
this host, each on its own controller of one vhostd over the same backing file: blk controllers
share one bdev (nothing claims it); a SCSI target claims its bdev, so the destination's target is a
second file bdev on the same file.  Writers in flight during the migration finish on the destination with no I/O error
and their pattern is in the backing file.  A guest process that read a pattern into its memory
with O_DIRECT while the migration iterated holds the right bytes on the destination: the device
wrote those pages after the first pass had sent them, so only the dirty log brings them over (a
page written but not marked would arrive with the process's earlier filler bytes)."""

from __future__ import annotations

import re
import time

import pytest

from guest import PATTERN_TOOL_IN_GUEST, Guest, VhostUserDevice
from test_vhostd_recovery import DISK_MIB, PATTERN_BYTES, REQUEST_BYTES, SEED, bytes_written, \
    check_writers_finished_cleanly, start_writers, write_config
from tests.helpers.daemon import Daemon
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

MIB = 1 << 20
# A region the writers leave alone: written before the migration, read into a guest process's
# memory while it iterates, checked in that memory on the destination.
READ_SEED = 77
READ_OFFSET = PATTERN_BYTES
READ_BYTES = (DISK_MIB << 20) - PATTERN_BYTES
HOLD_DIR = "/tmp/hold"
# The first pass over guest RAM goes slowly; near its end (less than READ_AT_REMAINING_BYTES
# left) the guest reads into pages already sent, then the migration may go fast.  The held
# pages then make about 16 MiB more RAM transferred (117 MiB against 102 without the data-buffer
# marks, when the check fails).  (A 1 ms downtime limit would keep the migration from converging
# during the read, but its constant dirty syncs stall a TCG guest.)
FIRST_PASS_PARAMETERS = {"max-bandwidth": 16 << 20, "downtime-limit": 300}
READ_AT_REMAINING_BYTES = 8 << 20
FINISH_PARAMETERS = {"max-bandwidth": 1 << 30}
MIGRATION_WRITE_MBYTES_PER_S = 2
IN_FLIGHT = re.compile(r"queue (\d+) stops under dirty logging with (\d+) requests in flight")


def hold_command(disk, seed, offset, length):
    return f"{PATTERN_TOOL_IN_GUEST} hold {seed} {disk} {offset} {length} {HOLD_DIR}"


def wait_migration(source: Guest, timeout_s: float, done, fail_on_failed: bool = True) -> dict:
    """Poll ``query-migrate`` until ``done(state)``; the last state.  A failed or cancelled
    migration fails the test unless ``fail_on_failed`` is off."""
    state = {}

    def ready():
        state.clear()
        state.update(source.qmp("query-migrate"))
        if fail_on_failed and state.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"migration {state['status']}: {state}")
        return done(state)
    try:
        wait_for(ready, timeout=source.scaled(timeout_s), interval=0.1)
    except TimeoutError:
        raise source.failure(f"migration did not get there: {state}") from None
    return state


def controllers(d, kind, image):
    """The source's and the destination's controller on the same backing file; the guest's disk."""
    d.spdk("bdev_aio_create", str(image), "File0")
    if kind == "blk":
        d.spdk("vhost_create_blk_controller", "vhost.src", "File0")
        d.spdk("vhost_create_blk_controller", "vhost.dst", "File0")
        return "/dev/vda"
    d.spdk("bdev_aio_create", str(image), "File1")
    for name, bdev in (("vhost.src", "File0"), ("vhost.dst", "File1")):
        d.spdk("vhost_create_scsi_controller", name)
        d.spdk("vhost_scsi_controller_add_target", name, "0", bdev)
    return "/dev/sda"


@pytest.mark.parametrize("kind", ["blk", "scsi"])
def test_a_writing_and_reading_guest_migrates_between_two_controllers_on_one_file(
        vhostd, boot_guest, guest_image, sparse_file, socket_dir, tmp_path, kind):
    image = sparse_file(DISK_MIB << 20)
    d = vhostd()
    disk = controllers(d, kind, image)
    source = boot_guest(devices=[VhostUserDevice(kind, d.socket_dir / "vhost.src")])
    source.wait_for_path(disk)
    source.write_pattern(disk, READ_SEED, READ_OFFSET, READ_BYTES, direct=True, chunk_bytes=MIB)
    source.check(f"mkdir -p {HOLD_DIR}; ({hold_command(disk, READ_SEED, READ_OFFSET, READ_BYTES)};"
                 f" echo $? > /tmp/hold.rc) > /tmp/hold.log 2>&1 & true")
    source.wait_for_path(f"{HOLD_DIR}/ready")

    uri = f"unix:{socket_dir / 'migrate.sock'}"
    destination = Guest(guest_image, devices=[VhostUserDevice(kind, d.socket_dir / "vhost.dst")],
                        workdir=tmp_path / "destination", incoming=uri)
    print(f"destination QEMU: {destination.command_line_str}")
    try:
        destination.attach_log("vhostd", d.log)
        destination.start_incoming(source)
        wait_for(lambda: (socket_dir / "migrate.sock").exists(), timeout=source.scaled(30), interval=0.05)

        # Writes go slowly until the switch-over: the writers are still writing then, and requests
        # are in flight when the source's queue stops (the stop, and GET_VRING_BASE, wait for them).
        d.rpc("bdev_set_qos_limit", name="File0", w_mbytes_per_sec=MIGRATION_WRITE_MBYTES_PER_S)
        before_writers = bytes_written(d)
        start_writers(source, disk)
        wait_for(lambda: bytes_written(d) - before_writers >= 32 * REQUEST_BYTES, timeout=source.scaled(60),
                 interval=0.02)
        written_before = bytes_written(d) - before_writers
        started = time.monotonic()
        source.qmp("migrate-set-parameters", FIRST_PASS_PARAMETERS)
        source.qmp("migrate", uri=uri)
        # Near the end of the first pass most of the held buffer's pages were sent with their
        # filler bytes: the device now writes them.
        wait_migration(source, 300, lambda st: st.get("status") == "active"
                       and st["ram"]["remaining"] < READ_AT_REMAINING_BYTES)
        source.check(f"touch {HOLD_DIR}/read")
        source.wait_for_path(f"{HOLD_DIR}/loaded", timeout_s=120)
        assert source.qmp("query-migrate")["status"] == "active", "the migration ended before the read"
        source.qmp("migrate-set-parameters", FINISH_PARAMETERS)
        final = wait_migration(source, 300, lambda st: st.get("status") == "completed")
        written_at_switch_over = bytes_written(d) - before_writers
        d.rpc("bdev_set_qos_limit", name="File0", w_mbytes_per_sec=0)
        took_s = time.monotonic() - started
        destination.wait_qmp_event("RESUME", timeout_s=destination.scaled(60))
        stops = [(int(q), int(n)) for q, n in IN_FLIGHT.findall(d.log())]
        print(f"migrated in {took_s:.1f} s; the writers had written {written_before >> 10} KiB at its start,"
              f" {written_at_switch_over >> 10} KiB at its end, of {PATTERN_BYTES >> 10} KiB: "
              f"downtime {final.get('downtime')} ms, total {final.get('total-time')} ms, "
              f"RAM {final['ram']['transferred'] >> 20} MiB in {final['ram']['dirty-sync-count']} syncs; "
              f"in flight at the stop (queue, requests) {stops}")
        assert written_at_switch_over < PATTERN_BYTES and stops, d.log()[-3000:]
        assert "dirty logging on" in d.log() and "dirty log of" in d.log()
        assert source.qmp("query-status")["status"] == "postmigrate"

        # The guest carries on on the destination.
        destination.check(f"touch {HOLD_DIR}/check")
        destination.wait_for_path("/tmp/hold.rc", timeout_s=120)
        held = destination.check("cat /tmp/hold.log /tmp/hold.rc")
        assert held.split() == ["ok", str(READ_BYTES), "0"], held
        check_writers_finished_cleanly(destination, disk)
        assert destination.poweroff() == 0
    finally:
        destination.close()
    guest_image.patterns.check_file(image, SEED, 0, PATTERN_BYTES)
    guest_image.patterns.check_file(image, READ_SEED, READ_OFFSET, READ_BYTES)


def test_the_source_carries_on_when_the_destination_dies_mid_migration(
        vhostd, boot_guest, guest_image, sparse_file, socket_dir, tmp_path):
    image = sparse_file(DISK_MIB << 20)
    d = vhostd()
    disk = controllers(d, "blk", image)
    source = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.src")])
    uri = f"unix:{socket_dir / 'migrate.sock'}"
    destination = Guest(guest_image, devices=[VhostUserDevice("blk", d.socket_dir / "vhost.dst")],
                        workdir=tmp_path / "destination", incoming=uri)
    try:
        destination.start_incoming(source)
        wait_for(lambda: (socket_dir / "migrate.sock").exists(), timeout=source.scaled(30), interval=0.05)
        d.rpc("bdev_set_qos_limit", name="File0", w_mbytes_per_sec=MIGRATION_WRITE_MBYTES_PER_S)
        start_writers(source, disk)
        source.qmp("migrate-set-parameters", FIRST_PASS_PARAMETERS)
        source.qmp("migrate", uri=uri)
        wait_migration(source, 300, lambda st: st.get("status") == "active"
                       and st["ram"]["transferred"] >= 16 << 20)
        destination.kill()
        written_at_kill = bytes_written(d)
        final = wait_migration(source, 120, lambda st: st.get("status") == "failed", fail_on_failed=False)
        d.rpc("bdev_set_qos_limit", name="File0", w_mbytes_per_sec=0)
        print(f"migration {final['status']} ({final.get('error-desc')}) with {written_at_kill >> 10} KiB of"
              f" {PATTERN_BYTES >> 10} KiB written")
        assert written_at_kill < PATTERN_BYTES
    finally:
        destination.close()
    # Logging ends with the migration; the guest's disk carries on on the source.
    wait_for(lambda: "dirty logging off" in d.log(), timeout=source.scaled(30), interval=0.05)
    assert source.qmp("query-status")["status"] == "running"
    check_writers_finished_cleanly(source, disk)
    assert source.poweroff() == 0
    guest_image.patterns.check_file(image, SEED, 0, PATTERN_BYTES)


def test_a_migration_outlives_the_source_vhostd_being_killed(
        vhostd, boot_guest, guest_image, sparse_file, socket_dir, tmp_path, started_daemons):
    """QEMU 7.2 does not fail a migration whose vhost-user back-end went away: the source stops the
    ring without GET_VRING_BASE (last_avail rewound to used->idx, so the requests in flight are
    fetched again) and the migration completes.  The destination's controller (another vhostd on
    the same file) then serves them: the writers finish there with no I/O error."""
    image = sparse_file(DISK_MIB << 20)
    config = tmp_path / "source.json"
    write_config(config, image)
    workdir = socket_dir / "source"
    workdir.mkdir()
    src = Daemon(workdir=str(workdir), config=str(config)).start()
    started_daemons.append(src)
    dst = vhostd()
    dst.spdk("bdev_aio_create", str(image), "File0")
    dst.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    source = boot_guest(devices=[VhostUserDevice("blk", src.socket_dir / "vhost.0", reconnect_s=1)])
    uri = f"unix:{socket_dir / 'migrate.sock'}"
    destination = Guest(guest_image, devices=[VhostUserDevice("blk", dst.socket_dir / "vhost.0", reconnect_s=1)],
                        workdir=tmp_path / "destination", incoming=uri)
    try:
        destination.attach_log("vhostd logs", lambda: src.log() + dst.log())
        destination.start_incoming(source)
        wait_for(lambda: (socket_dir / "migrate.sock").exists(), timeout=source.scaled(30), interval=0.05)
        src.rpc("bdev_set_qos_limit", name="File0", w_mbytes_per_sec=MIGRATION_WRITE_MBYTES_PER_S)
        start_writers(source)
        source.qmp("migrate-set-parameters", FIRST_PASS_PARAMETERS)
        source.qmp("migrate", uri=uri)
        wait_migration(source, 300, lambda st: st.get("status") == "active"
                       and st["ram"]["transferred"] >= 16 << 20)
        written_at_kill = bytes_written(src)
        src.kill()
        final = wait_migration(source, 300, lambda st: st.get("status") == "completed")
        print(f"migration completed without the source's vhostd: downtime {final.get('downtime')} ms, "
              f"{written_at_kill >> 10} KiB of {PATTERN_BYTES >> 10} KiB written at the kill")
        assert written_at_kill < PATTERN_BYTES
        destination.wait_qmp_event("RESUME", timeout_s=destination.scaled(60))
        check_writers_finished_cleanly(destination)
        assert destination.poweroff() == 0
    finally:
        destination.close()
        src.stop()
    guest_image.patterns.check_file(image, SEED, 0, PATTERN_BYTES)
