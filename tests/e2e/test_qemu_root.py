"""The Debian 13 root that scripts/build-qemu-root.sh builds: its QEMU is 11.1 with the vfio-user
client, runs without touching the host's mounts, also runs chrooted, and a second build is a no-op."""

import subprocess
import time

import pytest

from tests.helpers.qemu_root import build_qemu_root

pytestmark = pytest.mark.e2e


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL, timeout=120, **kwargs)


def mounts():
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_root_qemu_is_11_1_and_has_the_vfio_user_client(qemu_root):
    version = qemu_root.version()
    print(version, "- root built in", qemu_root.stamp().get("root_build_s"), "s")
    assert version.startswith("QEMU emulator version 11.1.")
    devices = run(qemu_root.qemu_system, "-device", "help").stdout
    assert '"vfio-user-pci"' in devices
    options = run(qemu_root.qemu_system, "-device", "vfio-user-pci,help").stdout
    assert "socket=<SocketAddress>" in options


def test_root_qemu_starts_a_machine_with_its_own_firmware_and_leaves_host_mounts_alone(qemu_root):
    before = mounts()
    # A q35 TCG machine that quits from its monitor: firmware (SeaBIOS) and modules must load.
    result = subprocess.run(
        [str(qemu_root.qemu_system), "-nodefaults", "-display", "none", "-machine", "q35",
         "-accel", "tcg", "-monitor", "stdio"],
        input="quit\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Only modules from the same build" not in result.stderr
    assert mounts() == before


def test_root_qemu_img_is_the_same_build(qemu_root):
    assert run(qemu_root.tool("qemu-img"), "--version").stdout.startswith("qemu-img version 11.1.")


def test_root_runs_its_qemu_chrooted(qemu_root):
    out = run("unshare", "--mount", "--propagation", "private",
              "chroot", qemu_root.rootfs, "qemu-system-x86_64", "--version").stdout
    assert out.startswith("QEMU emulator version 11.1.")


def test_building_an_up_to_date_root_again_does_nothing(qemu_root):
    started = time.monotonic()
    build_qemu_root(qemu_root.path)
    assert time.monotonic() - started < 5
