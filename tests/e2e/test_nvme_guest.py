"""A real Linux guest (TCG) in QEMU 11.1 probes vhostd's NVMe controller over vfio-user: the stock
nvme driver enables it, identifies it, and creates one I/O queue pair per vCPU, from an in-process
endpoint and from a daemon configured with SPDK's spdk-rpc (without namespaces: /dev/nvme0 alone);
then a daemon's namespaces from bdevs (512 and 4096-byte blocks) that the guest does O_DIRECT I/O
on, served by the reactors."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from guest import pattern_command
from vhostd.nvme.function import NvmeFunction
from vhostd.vfio_user.server import Endpoint

pytestmark = pytest.mark.e2e


class EndpointThread:
    """An Endpoint on its own event loop in a thread, as the guest harness is synchronous."""

    def __init__(self, path, function) -> None:
        self.loop = asyncio.new_event_loop()
        self.endpoint = Endpoint(path, function)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.endpoint.start())

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.call(self.endpoint.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def nvme_endpoint(socket_dir):
    function = NvmeFunction("nvme0")
    served = EndpointThread(socket_dir / "cntrl", function)
    yield served
    served.close()
    function.close()


def test_linux_probes_the_controller_with_one_io_queue_per_vcpu(qemu_root, boot_guest, nvme_endpoint):
    device = {"driver": "vfio-user-pci",
              "socket": {"type": "unix", "path": str(nvme_endpoint.endpoint.path)}}
    guest = boot_guest(qemu_binary=str(qemu_root.qemu_system), smp=2,
                       extra_args=["-device", json.dumps(device)])
    guest.wait_for_path("/dev/nvme0")
    assert guest.read_sysfs("/sys/class/nvme/nvme0/model").rstrip() == "vhostd NVMe controller"
    assert guest.read_sysfs("/sys/class/nvme/nvme0/serial").rstrip() == "VHOSTD0000000001"
    assert guest.read_sysfs("/sys/class/nvme/nvme0/state") == "live"
    nvme_lines = [line for line in guest.dmesg().splitlines() if "nvme" in line]
    print("\n".join(nvme_lines))
    assert any("2/0/0 default/read/poll queues" in line for line in nvme_lines)
    admin = nvme_endpoint.endpoint.device.admin
    assert sorted(admin.sqs) == [1, 2] and sorted(admin.cqs) == [1, 2]
    assert all(cq.interrupts for cq in admin.cqs.values())
    assert guest.poweroff() == 0


def test_a_controller_made_with_spdk_rpc_on_the_daemon_is_probed_by_linux(qemu_root, boot_guest, vhostd):
    d = vhostd()
    traddr = d.socket_dir / "vfu0"
    traddr.mkdir()
    nqn = "nqn.2016-06.io.spdk:vfu0"
    d.spdk("nvmf_create_transport", "-t", "VFIOUSER")
    d.spdk("nvmf_create_subsystem", nqn, "-a", "-s", "SN0001", "-d", "vhostd NVMe")
    d.spdk("nvmf_subsystem_add_listener", nqn, "-t", "VFIOUSER", "-a", str(traddr))
    device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(traddr / "cntrl")}}
    guest = boot_guest(qemu_binary=str(qemu_root.qemu_system), extra_args=["-device", json.dumps(device)])
    guest.wait_for_path("/dev/nvme0")
    assert guest.read_sysfs("/sys/class/nvme/nvme0/model").rstrip() == "vhostd NVMe"
    assert guest.read_sysfs("/sys/class/nvme/nvme0/serial").rstrip() == "SN0001"
    assert guest.read_sysfs("/sys/class/nvme/nvme0/subsysnqn") == nqn
    assert guest.read_sysfs("/sys/class/nvme/nvme0/state") == "live"
    assert guest.poweroff() == 0


def test_the_controller_comes_back_after_a_guest_reboot(qemu_root, boot_guest, nvme_endpoint):
    # A reboot: Linux deletes its I/O queues and shuts the controller down, QEMU resets the device
    # (DEVICE_RESET, DMA remaps), firmware and Linux bring it up again.
    device = {"driver": "vfio-user-pci",
              "socket": {"type": "unix", "path": str(nvme_endpoint.endpoint.path)}}
    guest = boot_guest(qemu_binary=str(qemu_root.qemu_system), smp=2, reboot_resets=True,
                       extra_args=["-device", json.dumps(device)])
    guest.wait_for_path("/dev/nvme0")
    print("guest rebooted in %.1f s" % guest.reboot())
    guest.wait_for_path("/dev/nvme0")
    assert guest.read_sysfs("/sys/class/nvme/nvme0/state") == "live"
    assert any("2/0/0 default/read/poll queues" in line for line in guest.dmesg().splitlines())
    assert nvme_endpoint.endpoint.clients_served == 1
    assert guest.poweroff() == 0


def test_a_new_qemu_is_served_after_one_is_killed(qemu_root, boot_guest, nvme_endpoint):
    # SIGKILL sends nothing: EOF releases the first client's memory and eventfds, the next QEMU
    # resets the controller at realize and its guest probes it again.
    device = {"driver": "vfio-user-pci",
              "socket": {"type": "unix", "path": str(nvme_endpoint.endpoint.path)}}
    first = boot_guest(qemu_binary=str(qemu_root.qemu_system), extra_args=["-device", json.dumps(device)])
    first.wait_for_path("/dev/nvme0")
    first.kill()
    second = boot_guest(qemu_binary=str(qemu_root.qemu_system), extra_args=["-device", json.dumps(device)])
    second.wait_for_path("/dev/nvme0")
    assert second.read_sysfs("/sys/class/nvme/nvme0/state") == "live"
    assert nvme_endpoint.endpoint.clients_served == 2
    assert second.poweroff() == 0


MIB = 1 << 20
SEED = 7
NQN = "nqn.2016-06.io.spdk:vfu0"


def serve_namespaces(vhostd, bdevs, namespaces, serial="SN0002"):
    """A daemon whose subsystem NQN has the bdevs (spdk-rpc argument lists) named in namespaces
    as its namespaces, listening in <socket_dir>/vfu0; returns it and QEMU's -device arguments."""
    d = vhostd()
    traddr = d.socket_dir / "vfu0"
    traddr.mkdir()
    for args in bdevs:
        d.spdk(*args)
    d.spdk("nvmf_create_transport", "-t", "VFIOUSER")
    d.spdk("nvmf_create_subsystem", NQN, "-a", "-s", serial, "-d", "vhostd NVMe")
    for name in namespaces:
        d.spdk("nvmf_subsystem_add_ns", NQN, name)
    d.spdk("nvmf_subsystem_add_listener", NQN, "-t", "VFIOUSER", "-a", str(traddr))
    device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(traddr / "cntrl")}}
    return d, ["-device", json.dumps(device)]


def test_linux_does_direct_io_on_namespaces_of_512_and_4096_byte_blocks(qemu_root, boot_guest, vhostd,
                                                                         guest_image, sparse_file):
    image = sparse_file(32 * MIB)
    d, args = serve_namespaces(vhostd, [("bdev_malloc_create", "-b", "Malloc0", "16", "512"),
                                        ("bdev_aio_create", str(image), "File0", "4096")],
                               ["Malloc0", "File0"])
    guest = boot_guest(qemu_binary=str(qemu_root.qemu_system), smp=2, extra_args=args)
    guest.wait_for_path("/dev/nvme0n2")
    sizes = guest.block_device_sizes()
    assert sizes["nvme0n1"] == 16 * MIB and sizes["nvme0n2"] == 32 * MIB
    assert guest.read_sysfs("/sys/block/nvme0n1/queue/logical_block_size") == "512"
    assert guest.read_sysfs("/sys/block/nvme0n2/queue/logical_block_size") == "4096"
    # O_DIRECT from each vCPU (each has its own I/O queue pair), 128 KiB requests: PRP lists.
    for cpu in (0, 1):
        for disk in ("/dev/nvme0n1", "/dev/nvme0n2"):
            guest.check("taskset -c %d %s" % (cpu, pattern_command(
                "write", SEED + cpu, disk, (1 + cpu) * 4 * MIB, 2 * MIB, direct=True,
                chunk_bytes=128 * 1024)))
    for cpu in (0, 1):
        for disk in ("/dev/nvme0n1", "/dev/nvme0n2"):
            guest.check_pattern(disk, SEED + cpu, (1 + cpu) * 4 * MIB, 2 * MIB, direct=True,
                                chunk_bytes=4096)
    # a 512-byte write in the middle of a page (PRP1 with an offset) and a flush
    guest.check(pattern_command("write", SEED + 5, "/dev/nvme0n1", 512 * 7, 512, direct=True, sync=True))
    guest.check_pattern("/dev/nvme0n1", SEED + 5, 512 * 7, 512, direct=True)
    # deallocate (Dataset Management) through the guest's block layer
    guest.check("blkdiscard -o 0 -l 1048576 /dev/nvme0n2")
    assert guest.poweroff() == 0
    for cpu in (0, 1):
        guest_image.patterns.check_file(image, SEED + cpu, (1 + cpu) * 4 * MIB, 2 * MIB)
    guest_image.patterns.check_file(image, "zero", 0, MIB)
    stat = {b["name"]: b for b in d.spdk("bdev_get_iostat")["bdevs"]}
    print({name: {k: stat[name][k] for k in ("num_read_ops", "num_write_ops", "num_unmap_ops")}
           for name in stat})
    assert stat["File0"]["bytes_written"] >= 4 * MIB and stat["File0"]["num_unmap_ops"] >= 1


def test_io_carries_on_across_a_guest_reboot_and_a_killed_qemu(qemu_root, boot_guest, vhostd):
    # The reboot deletes the I/O queues, resets the controller and remaps low memory while the
    # controller's I/O queues sit on a reactor; the kill drops the client with them in place.
    d, args = serve_namespaces(vhostd, [("bdev_malloc_create", "-b", "Malloc0", "16", "4096")],
                               ["Malloc0"])
    first = boot_guest(qemu_binary=str(qemu_root.qemu_system), smp=2, reboot_resets=True, extra_args=args)
    first.wait_for_path("/dev/nvme0n1")
    first.write_pattern("/dev/nvme0n1", SEED, 0, MIB, direct=True, chunk_bytes=64 * 1024)
    print("guest rebooted in %.1f s" % first.reboot())
    first.wait_for_path("/dev/nvme0n1")
    first.check_pattern("/dev/nvme0n1", SEED, 0, MIB, direct=True)
    first.write_pattern("/dev/nvme0n1", SEED + 1, 2 * MIB, MIB, direct=True)
    first.kill()
    second = boot_guest(qemu_binary=str(qemu_root.qemu_system), extra_args=args)
    second.wait_for_path("/dev/nvme0n1")
    second.check_pattern("/dev/nvme0n1", SEED, 0, MIB, direct=True)
    second.check_pattern("/dev/nvme0n1", SEED + 1, 2 * MIB, MIB, direct=True)
    assert second.poweroff() == 0
    assert d.rpc("spdk_get_version") is not None           # the daemon is still serving


def test_a_namespace_added_and_removed_under_a_running_guest_appears_and_disappears(
        qemu_root, boot_guest, vhostd):
    d, args = serve_namespaces(vhostd, [("bdev_malloc_create", "-b", "Malloc0", "8", "512"),
                                        ("bdev_malloc_create", "-b", "Malloc1", "12", "4096")],
                               ["Malloc0"])
    guest = boot_guest(qemu_binary=str(qemu_root.qemu_system), extra_args=args)
    guest.wait_for_path("/dev/nvme0n1")
    # The AEN (namespace attribute changed) makes the driver read log 04 and rescan by itself.
    d.spdk("nvmf_subsystem_add_ns", NQN, "Malloc1")
    guest.wait_for_path("/dev/nvme0n2")
    assert guest.block_device_sizes()["nvme0n2"] == 12 * MIB
    guest.write_pattern("/dev/nvme0n2", SEED, MIB, 2 * MIB, direct=True, chunk_bytes=64 * 1024)
    guest.check_pattern("/dev/nvme0n2", SEED, MIB, 2 * MIB, direct=True)
    d.spdk("nvmf_subsystem_remove_ns", NQN, "2")
    guest.wait_for_no_path("/dev/nvme0n2")
    guest.check_pattern("/dev/nvme0n1", "zero", 0, MIB, direct=True)
    assert guest.poweroff() == 0
