"""vhostd dies or restarts under a writing guest: the guest carries on without an I/O error and every
write it saw acknowledged and flushed is on disk (inflight tracking, QEMU reconnect=1)."""

from __future__ import annotations

import json
import time

import pytest

from guest import VhostUserDevice
from tests.helpers.daemon import Daemon

pytestmark = pytest.mark.e2e

DISK_MIB = 64


def write_config(path, image):
    path.write_text(json.dumps({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_aio_create", "params": {"name": "File0", "filename": str(image)}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "File0"}}]}]}))


@pytest.fixture
def setup(socket_dir, tmp_path, sparse_file):
    image = sparse_file(DISK_MIB << 20)
    config = tmp_path / "config.json"
    write_config(config, image)
    workdir = socket_dir / "d"
    workdir.mkdir()
    daemons = []

    def start():
        d = Daemon(workdir=str(workdir), config=str(config))
        daemons.append(d)
        return d.start()

    yield image, start
    for d in daemons:
        d.stop()
        print(d.log())
        d.cleanup()


def start_writer(guest):
    """Four background writers of 12 MiB each (O_DIRECT, fsync at the end), so several requests
    are in flight — and complete out of order — when the target goes away."""
    guest.check("seq 10000000 15999999 | head -c 50331648 > /tmp/pattern")
    guest.check("for i in 0 1 2 3; do (dd if=/tmp/pattern of=/dev/vda bs=64k skip=$((i * 192)) seek=$((i * 192))"
                " count=192 oflag=direct conv=fsync,notrunc; echo $? > /tmp/rc$i) > /tmp/dd$i.log 2>&1 & done")


def wait_writer(guest, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rc, out = guest.run("cat /tmp/rc0 /tmp/rc1 /tmp/rc2 /tmp/rc3 2>/dev/null")
        codes = out.split()
        if len(codes) == 4:
            return [int(c) for c in codes], guest.check("cat /tmp/dd*.log")
        time.sleep(0.5)
    raise TimeoutError("the guest's writers did not finish: " + guest.check("cat /tmp/dd*.log; dmesg | tail"))


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_guest_survives_a_target_restart_mid_write(setup, boot_guest, how):
    image, start = setup
    d = start()
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0", reconnect_s=1)])
    start_writer(guest)
    time.sleep(0.3)
    if how == "kill -9":
        d.kill()
    else:
        d.stop()
    time.sleep(0.5)
    start()
    codes, log = wait_writer(guest)
    assert codes == [0, 0, 0, 0], log
    errors = guest.run("dmesg | grep -iE 'I/O error|blk_update_request|critical' ")[1]
    assert errors == "", errors
    written, read_back = guest.check(
        "echo 3 > /proc/sys/vm/drop_caches; md5sum < /tmp/pattern;"
        " dd if=/dev/vda bs=1M count=48 iflag=direct 2>/dev/null | md5sum").splitlines()
    assert written == read_back
    pattern = guest.check("md5sum < /tmp/pattern").split()[0]
    assert guest.poweroff() == 0
    import hashlib
    assert hashlib.md5(image.read_bytes()[:48 << 20]).hexdigest() == pattern
