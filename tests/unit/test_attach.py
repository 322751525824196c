"""The QEMU options and libvirt XML made from vhost_get_controllers entries."""

import shlex
import xml.etree.ElementTree as ET

import pytest

from vhostd.attach import libvirt_xml, qemu_options

BLK = {"ctrlr": "vhost.0", "socket": "/run/vhostd/vhost.0",
       "backend_specific": {"block": {"bdev": "Malloc0", "readonly": False}}}
def shell_words(text):
    """The words a shell makes of the printed lines (comments dropped, continuations joined)."""
    return shlex.split(text.replace("\\\n", " "), comments=True)


SCSI = {"ctrlr": "vhost.1", "socket": "/run/vhostd/vhost.1", "backend_specific": {"scsi": []}}


def test_qemu_options_share_memory_and_name_the_socket():
    words = shell_words(qemu_options(BLK, memory_mib=512, num_queues=4))
    assert words[:6] == ["-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
                         "-numa", "node,memdev=mem"]
    assert words[6:] == ["-chardev", "socket,id=vhost-0-chr,path=/run/vhostd/vhost.0,reconnect=1",
                         "-device", "vhost-user-blk-pci,id=vhost-0,chardev=vhost-0-chr,num-queues=4"]
    scsi = shell_words(qemu_options(SCSI))
    assert scsi[-1] == "vhost-user-scsi-pci,id=vhost-1,chardev=vhost-1-chr,num_queues=1"
    assert "reconnect" not in scsi[-3]      # QEMU 7.2 cannot reconnect vhost-user-scsi


def _fragments(text):
    return ET.fromstring("<root xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>%s</root>" % text)


def test_libvirt_blk_disk_is_a_vhostuser_disk_with_shared_memfd_memory():
    root = _fragments(libvirt_xml(BLK, target_dev="vdc", num_queues=2))
    backing = root.find("memoryBacking")
    assert backing.find("source").get("type") == "memfd" and backing.find("access").get("mode") == "shared"
    disk = root.find("disk")
    assert (disk.get("type"), disk.get("device")) == ("vhostuser", "disk")
    assert disk.find("source").attrib == {"type": "unix", "path": "/run/vhostd/vhost.0"}
    assert disk.find("target").attrib == {"dev": "vdc", "bus": "virtio"}
    assert disk.find("driver").get("queues") == "2"


def test_libvirt_scsi_controller_goes_through_qemu_commandline():
    root = _fragments(libvirt_xml(SCSI))
    args = [a.get("value") for a in root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline")]
    assert args[0] == "-chardev" and args[2] == "-device" and args[3].startswith("vhost-user-scsi-pci,")


def test_a_relative_socket_path_is_refused():
    with pytest.raises(ValueError, match="absolute -S"):
        qemu_options(dict(BLK, socket="vhost.0"))
