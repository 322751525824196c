"""How a guest attaches to a controller: the QEMU options and the libvirt XML, made from the
controller's ``vhost_get_controllers`` entry (``vhostd-rpc attach-qemu|attach-libvirt CTRLR``).

vhost-user needs the guest's RAM in shared memory (the back-end maps it): QEMU takes a memfd
backend with ``share=on``; libvirt takes ``<memoryBacking>`` with a memfd source and shared access.
libvirt's ``<disk type='vhostuser'>`` is a vhost-user-blk disk; libvirt has no vhost-user-scsi
disk, so a scsi controller is attached through QEMU's own options (``<qemu:commandline>``).
"""

from __future__ import annotations

import os
import shlex
from xml.sax.saxutils import quoteattr

MEMORY_NOTE = "guest RAM must be shared memory for vhost-user"


def controller_kind(info: dict) -> str:
    specific = info.get("backend_specific") or {}
    if "block" in specific:
        return "blk"
    if "scsi" in specific:
        return "scsi"
    raise ValueError("controller %s is neither blk nor scsi" % info.get("ctrlr"))


def socket_path(info: dict) -> str:
    path = info["socket"]
    if not os.path.isabs(path):
        raise ValueError("controller %s reports a relative socket path %r: start vhostd with an "
                         "absolute -S directory" % (info["ctrlr"], path))
    return path


def _device_id(info: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in info["ctrlr"])


def qemu_device_options(info: dict, num_queues: int = 1, reconnect_s: int = 1) -> list[str]:
    """The -chardev and -device options of the controller's disk."""
    dev = _device_id(info)
    kind = controller_kind(info)
    chardev = "socket,id=%s-chr,path=%s" % (dev, socket_path(info))
    if kind == "blk" and reconnect_s:
        chardev += ",reconnect=%d" % reconnect_s     # QEMU 7.2 reconnects blk, not scsi
    # QEMU spells the property num-queues on vhost-user-blk, num_queues on vhost-user-scsi.
    queues = "num-queues" if kind == "blk" else "num_queues"
    device = "vhost-user-%s-pci,id=%s,chardev=%s-chr,%s=%d" % (kind, dev, dev, queues, num_queues)
    return ["-chardev", chardev, "-device", device]


def qemu_memory_options(memory_mib: int) -> list[str]:
    return ["-m", "%dM" % memory_mib,
            "-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % memory_mib,
            "-numa", "node,memdev=mem"]


def qemu_options(info: dict, memory_mib: int = 1024, num_queues: int = 1) -> str:
    """A shell-ready fragment of a QEMU command line: shared memory and the disk."""
    return "# %s\n%s \\\n  %s\n" % (MEMORY_NOTE, shlex.join(qemu_memory_options(memory_mib)),
                                    shlex.join(qemu_device_options(info, num_queues)))


def libvirt_xml(info: dict, target_dev: str = "vdb", num_queues: int = 1) -> str:
    """The domain XML fragments: <memoryBacking> and the disk (or, for scsi, QEMU options)."""
    memory = ("<!-- %s: inside <domain> -->\n<memoryBacking>\n  <source type='memfd'/>\n"
              "  <access mode='shared'/>\n</memoryBacking>\n" % MEMORY_NOTE)
    path = socket_path(info)
    if controller_kind(info) == "blk":
        disk = ("<!-- inside <devices>; attach to a running domain with virsh attach-device -->\n"
                "<disk type='vhostuser' device='disk'>\n"
                "  <driver name='qemu' type='raw' queues='%d'/>\n"
                "  <source type='unix' path=%s>\n"
                "    <reconnect enabled='yes' timeout='1'/>\n"
                "  </source>\n"
                "  <target dev=%s bus='virtio'/>\n"
                "</disk>\n" % (num_queues, quoteattr(path), quoteattr(target_dev)))
        return memory + disk
    args = "".join("  <qemu:arg value=%s/>\n" % quoteattr(a) for a in qemu_device_options(info, num_queues))
    return (memory + "<!-- libvirt has no vhost-user-scsi disk: QEMU's options, with "
            "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' on <domain> -->\n"
            "<qemu:commandline>\n" + args + "</qemu:commandline>\n")
