"""The libvirt XML vhostd-rpc prints for a controller works in a real libvirt: a TCG domain defined
from it boots with a vhostd disk, and a second printed disk is attached and detached with virsh
while the domain runs. What ``virsh domblklist`` showed at each step is kept in the test's
``domblklist.txt`` (and printed)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

MIB = 1 << 20
FILE_DISK_BYTES = 16 * MIB
MALLOC_DISK_MIB = 32
PATTERN_BYTES = 4 * MIB
SEED = 11
HOTPLUG_SEED = 12


def printed(d, form: str, ctrlr: str, *params: str) -> str:
    result = subprocess.run([sys.executable, "-m", "vhostd.rpc.client", "-s", d.rpc_socket, form, ctrlr, *params],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def printed_element(text: str, tag: str) -> str:
    """The one ``<tag>`` element of the printed XML, verbatim."""
    found = re.findall(r"<%s[ >].*?</%s>" % (tag, tag), text, re.S)
    assert len(found) == 1, f"expected one <{tag}> in:\n{text}"
    return found[0]


def listed_targets(domblklist: str) -> dict[str, str]:
    """virsh domblklist's table as target -> source."""
    rows = [line.split() for line in domblklist.splitlines()[2:] if line.strip()]
    return {row[0]: row[1] for row in rows}


def sessions(d, ctrlr: str) -> list:
    return next(c for c in d.rpc("vhost_get_controllers") if c["ctrlr"] == ctrlr)["sessions"]


def test_printed_libvirt_xml_boots_a_domain_and_hot_plugs_a_disk(vhostd, boot_libvirt_guest, guest_image,
                                                                 sparse_file, tmp_path):
    image = sparse_file(FILE_DISK_BYTES)
    d = vhostd()
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("bdev_malloc_create", "-b", "Malloc0", str(MALLOC_DISK_MIB), "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    d.spdk("vhost_create_blk_controller", "vhost.1", "Malloc0")
    boot_xml = printed(d, "attach-libvirt", "vhost.0", "target_dev=vda")
    hotplug_xml = printed(d, "attach-libvirt", "vhost.1", "target_dev=vdb")
    hotplug_disk = printed_element(hotplug_xml, "disk")
    sockets = {ctrlr: str(d.socket_dir / ctrlr) for ctrlr in ("vhost.0", "vhost.1")}

    record_path = tmp_path / "domblklist.txt"
    record: list[str] = []

    def domblklist(step: str) -> dict[str, str]:
        text = guest.domblklist()
        record.append(f"$ virsh domblklist {guest.name}   # {step}\n{text.rstrip()}\n")
        record_path.write_text("\n".join(record))
        print(record[-1])
        return listed_targets(text)

    guest = boot_libvirt_guest(elements=[printed_element(boot_xml, "memoryBacking")],
                               disks=[printed_element(boot_xml, "disk")], smp=2)
    assert domblklist("after virsh start") == {"vda": sockets["vhost.0"]}, "\n".join(record)
    assert guest.block_device_sizes()["vda"] == FILE_DISK_BYTES
    guest.write_pattern("/dev/vda", SEED, 0, PATTERN_BYTES, direct=True)
    guest.check_pattern("/dev/vda", SEED, 0, PATTERN_BYTES, direct=True)
    assert sessions(d, "vhost.0") and not sessions(d, "vhost.1")

    guest.attach_device(hotplug_disk, "vhost.1")
    guest.wait_for_path("/sys/block/vdb")
    assert domblklist("after virsh attach-device --live") == {"vda": sockets["vhost.0"],
                                                               "vdb": sockets["vhost.1"]}, "\n".join(record)
    assert guest.block_device_sizes()["vdb"] == MALLOC_DISK_MIB * MIB
    assert sessions(d, "vhost.1")
    guest.write_pattern("/dev/vdb", HOTPLUG_SEED, MIB, PATTERN_BYTES, direct=True)
    guest.check_pattern("/dev/vdb", HOTPLUG_SEED, MIB, PATTERN_BYTES, direct=True)

    guest.detach_device(hotplug_disk, "vhost.1")
    guest.wait_for_no_path("/sys/block/vdb")
    try:
        wait_for(lambda: "vdb" not in listed_targets(guest.domblklist()), timeout=guest.scaled(30), interval=0.2)
    except TimeoutError:
        raise guest.failure("libvirt still lists vdb after detach-device") from None
    assert domblklist("after virsh detach-device --live") == {"vda": sockets["vhost.0"]}, "\n".join(record)
    try:
        wait_for(lambda: not sessions(d, "vhost.1"), timeout=guest.scaled(30), interval=0.1)
    except TimeoutError:
        raise guest.failure("vhost.1 still has a front-end after detach-device") from None
    assert sessions(d, "vhost.0")
    guest.check_pattern("/dev/vda", SEED, 0, PATTERN_BYTES, direct=True)

    assert guest.poweroff().startswith("shut off"), guest.state()
    wait_for(lambda: not sessions(d, "vhost.0"), timeout=guest.scaled(30), interval=0.1)
    guest_image.patterns.check_file(image, SEED, 0, PATTERN_BYTES)
    guest_image.patterns.check_file(image, "zero", PATTERN_BYTES, FILE_DISK_BYTES - PATTERN_BYTES)
