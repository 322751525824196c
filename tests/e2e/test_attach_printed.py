"""The QEMU options vhostd-rpc prints for a controller attach a real guest: nothing added by the
harness but its own shared memory, the printed -chardev/-device options as they are."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

MIB = 1 << 20
SEED = 9


def printed(d, form: str, ctrlr: str, *params: str) -> str:
    result = subprocess.run([sys.executable, "-m", "vhostd.rpc.client", "-s", d.rpc_socket, form, ctrlr, *params],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def device_options(text: str) -> list[str]:
    """The printed command line without its memory options (the harness's guest has its own)."""
    words = shlex.split(text.replace("\\\n", " "), comments=True)   # as a shell reads it
    options = []
    for flag, value in zip(words[::2], words[1::2]):
        if flag in ("-chardev", "-device"):
            options += [flag, value]
        else:
            assert flag in ("-m", "-object", "-numa"), flag
    return options


def test_printed_qemu_options_attach_a_blk_and_a_scsi_disk(vhostd, boot_guest, guest_image, sparse_file):
    image = sparse_file(16 * MIB)
    d = vhostd()
    d.spdk("bdev_aio_create", str(image), "File0")
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "32", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "File0")
    d.spdk("vhost_create_scsi_controller", "vhost.1")
    d.spdk("vhost_scsi_controller_add_target", "vhost.1", "0", "Malloc0")
    blk = printed(d, "attach-qemu", "vhost.0", "num_queues=2")
    scsi = printed(d, "attach-qemu", "vhost.1")
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in blk
    xml = printed(d, "attach-libvirt", "vhost.0", "target_dev=vdc")
    assert "<disk type='vhostuser' device='disk'>" in xml and "path=\"%s\"" % (d.socket_dir / "vhost.0") in xml
    guest = boot_guest(smp=2, extra_args=device_options(blk) + device_options(scsi))
    guest.wait_for_path("/sys/bus/scsi/devices/0:0:0:0/block")
    sizes = guest.block_device_sizes()
    assert sizes["vda"] == 16 * MIB and sizes["sda"] == 32 * MIB
    assert guest.check("ls /sys/block/vda/mq").split() == ["0", "1"]
    guest.write_pattern("/dev/vda", SEED, 0, 4 * MIB, direct=True)
    guest.write_pattern("/dev/sda", SEED, 0, 4 * MIB, direct=True)
    guest.check_pattern("/dev/sda", SEED, 0, 4 * MIB, direct=True)
    assert guest.poweroff() == 0
    guest_image.patterns.check_file(image, SEED, 0, 4 * MIB)
