"""Memory hot-plug under a vhost-user-blk guest (QEMU 7.2 with CONFIGURE_MEM_SLOTS: ADD_MEM_REG
and REM_MEM_REG).  A memfd DIMM is added to the running guest, onlined as movable memory (so the
guest's user buffers come from it first), I/O runs with O_DIRECT buffers in it, and the DIMM is
offlined and unplugged again: no I/O error, the data is right, and vhostd maps the new memory
while it is there and no longer afterwards."""

from __future__ import annotations

import pytest

from guest import PATTERN_TOOL_IN_GUEST, VhostUserDevice
from test_vhostd_recovery import PATTERN_BYTES, SEED, check_writers_finished_cleanly, start_writers
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

MIB = 1 << 20
DISK_MIB = 96
DIMM_MIB = 256
HOLD_SEED = 31
HOLD_OFFSET = PATTERN_BYTES          # after the writers' region
HOLD_BYTES = 48 * MIB
HOLD_DIR = "/tmp/hold"
GUEST_RAM = "memfd:memory-backend-memfd"


def ram_mappings(pid: int) -> int:
    """Mappings of QEMU's guest-RAM memfds in the daemon."""
    with open("/proc/%d/maps" % pid) as f:
        return sum(1 for line in f if GUEST_RAM in line)


def movable_free_pages(guest) -> int:
    out = guest.check("grep -A2 'zone  *Movable' /proc/zoneinfo | sed -n 's/.*pages free *//p'")
    return int(out.split()[0])


def memory_blocks(guest) -> dict[str, str]:
    """The guest's memory blocks, name → state."""
    out = guest.check("for b in /sys/devices/system/memory/memory*; do echo ${b##*/} $(cat $b/state); done")
    return dict(line.split() for line in out.splitlines())


def test_a_dimm_is_hot_added_used_for_io_and_unplugged_without_stale_mappings(
        vhostd, boot_guest, guest_image, sparse_file):
    image = sparse_file(DISK_MIB * MIB)
    d = vhostd()
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    guest = boot_guest(devices=[VhostUserDevice("blk", d.socket_dir / "vhost.0")],
                       memory_mib=256, memory_slots=4, max_memory_mib=2048)
    guest.write_pattern("/dev/vda", HOLD_SEED, HOLD_OFFSET, HOLD_BYTES, direct=True, chunk_bytes=MIB)
    pid = d.proc.pid
    baseline = ram_mappings(pid)
    blocks_before = memory_blocks(guest)
    print(f"vhostd maps {baseline} guest-RAM regions; guest memory blocks {len(blocks_before)}")

    guest.qmp("object-add", {"qom-type": "memory-backend-memfd", "id": "hp0", "size": DIMM_MIB * MIB,
                             "share": True})
    guest.qmp("device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "hp0"})
    wait_for(lambda: ram_mappings(pid) > baseline, timeout=guest.scaled(60), interval=0.05)
    added_maps = ram_mappings(pid)
    guest.wait_in_guest(f"[ $(ls -d /sys/devices/system/memory/memory* | wc -l) -gt {len(blocks_before)} ]",
                        60, "the DIMM's memory blocks did not appear in the guest")
    new_blocks = sorted(set(memory_blocks(guest)) - set(blocks_before))
    states = memory_blocks(guest)
    print(f"DIMM added: vhostd maps {added_maps} regions; new blocks {new_blocks} "
          f"states {[states[b] for b in new_blocks]}")
    for block in new_blocks:
        if states[block] == "offline":
            guest.check(f"echo online_movable > /sys/devices/system/memory/{block}/state")
    movable_free = movable_free_pages(guest)
    print(f"onlined as movable: {movable_free} free pages in ZONE_MOVABLE")

    # I/O with buffers in the DIMM: writers, and one reader holding 48 MiB it read with O_DIRECT
    # (movable user pages come from ZONE_MOVABLE first).
    start_writers(guest)
    guest.check(f"mkdir -p {HOLD_DIR}; touch {HOLD_DIR}/read; ({PATTERN_TOOL_IN_GUEST} hold {HOLD_SEED} /dev/vda"
                f" {HOLD_OFFSET} {HOLD_BYTES} {HOLD_DIR}; echo $? > /tmp/hold.rc) > /tmp/hold.log 2>&1 & true")
    guest.wait_for_path(f"{HOLD_DIR}/loaded", timeout_s=120)
    in_dimm_mib = (movable_free - movable_free_pages(guest)) * 4096 // MIB
    guest.check(f"touch {HOLD_DIR}/check")
    guest.wait_for_path("/tmp/hold.rc", timeout_s=120)
    held = guest.check("cat /tmp/hold.log /tmp/hold.rc")
    assert held.split() == ["ok", str(HOLD_BYTES), "0"], held
    check_writers_finished_cleanly(guest)
    print(f"I/O done; {in_dimm_mib} MiB of the DIMM were in use while the reader held its buffer")
    assert in_dimm_mib >= 16

    # Unplug: the guest offlines the blocks, QEMU removes the DIMM, vhostd unmaps it.
    for block in new_blocks:
        guest.check(f"echo offline > /sys/devices/system/memory/{block}/state")
    guest.qmp("device_del", id="dimm0")
    guest.wait_qmp_event("DEVICE_DELETED", guest.scaled(60), lambda data: data.get("device") == "dimm0")
    guest.qmp("object-del", id="hp0")
    wait_for(lambda: ram_mappings(pid) == baseline, timeout=guest.scaled(60), interval=0.05)
    assert sorted(memory_blocks(guest)) == sorted(blocks_before)
    # The disk still works on the remaining memory.
    guest.write_pattern("/dev/vda", SEED + 1, 0, 4 * MIB, direct=True)
    guest.check_pattern("/dev/vda", SEED + 1, 0, 4 * MIB, direct=True)
    assert guest.poweroff() == 0
    guest_image.patterns.check_file(image, SEED + 1, 0, 4 * MIB)
    guest_image.patterns.check_file(image, SEED, 4 * MIB, PATTERN_BYTES - 4 * MIB)
    guest_image.patterns.check_file(image, HOLD_SEED, HOLD_OFFSET, HOLD_BYTES)
