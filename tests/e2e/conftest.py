"""Fixtures for e2e tests: the guest image, booting guests, short socket paths, QSD back-ends.

A missing dependency (QEMU, busybox-static) skips the e2e tests on a developer machine but fails
them in CI (env CI=true), where `make test` is expected to have installed everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest import Guest, GuestImage, GuestShell, tail_text
from libvirt_host import LibvirtDaemon, LibvirtGuest
from qsd import StorageDaemon
from tests.helpers.daemon import Daemon
from tests.helpers.qemu_root import QEMU_ROOT_DIR, QemuRoot, QemuRootError, build_qemu_root

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO_ROOT / "build" / "guest"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"
REQUIRED_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-storage-daemon": "qemu-system-x86",
    "busybox": "busybox-static",
    "cpio": "cpio",
}
LIBVIRT_TOOLS = {
    "libvirtd": "libvirt-daemon, libvirt-daemon-driver-qemu",
    "virsh": "libvirt-clients",
    "unshare": "util-linux",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing_dependency(message: str) -> None:
    """Skip locally, fail in CI: there a missing tool is a broken `make test`, not a choice."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: e2e dependencies must be installed)", pytrace=False)
    pytest.skip(f"{message}; run scripts/install-system-deps.sh (or `make test`)")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The kernel and initramfs of the test guest, built into build/guest on first use."""
    missing = [f"{tool} (package {pkg})" for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)]
    if missing:
        missing_dependency("e2e tests need " + ", ".join(missing))
    result = subprocess.run(
        [str(BUILD_SCRIPT), str(GUEST_DIR)], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(
            f"{BUILD_SCRIPT} failed ({result.returncode}):\n{result.stderr}{result.stdout}", pytrace=False
        )
    return GuestImage.from_dir(GUEST_DIR)


@pytest.fixture(scope="session")
def qemu_root() -> QemuRoot:
    """The Debian 13 root with QEMU 11.1 (vfio-user-pci), built into build/qemu-root on first use."""
    if not (QEMU_ROOT_DIR / ".stamp").exists() and not shutil.which("mmdebstrap"):
        missing_dependency("building the QEMU 11.1 root needs mmdebstrap")
    try:
        return build_qemu_root()
    except QemuRootError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for unix sockets (tmp_path can exceed the 107-byte sun_path limit)."""
    path = Path(tempfile.mkdtemp(prefix="vhd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sparse_file(tmp_path: Path) -> Callable[[int], Path]:
    """A factory: ``sparse_file(size_bytes)`` is a new all-zero (sparse) file under tmp_path, for file
    bdevs whose bytes a test checks afterwards."""
    made = []

    def make(size_bytes: int) -> Path:
        path = tmp_path / ("disk.img" if not made else "disk-%d.img" % len(made))
        with open(path, "wb") as f:
            f.truncate(size_bytes)
        made.append(path)
        return path

    return make


@pytest.fixture
def started_daemons() -> list[Daemon]:
    """Every vhostd daemon the test started (the ``vhostd`` fixture's and a test's own): their logs'
    tails go into the failure reports of the test's guests."""
    return []


def daemon_log_tails(daemons: list[Daemon], chars: int = 2500) -> str:
    return "\n".join(f"== vhostd {i} ({d.log_path}) ==\n{tail_text(d.log(), chars)}"
                     for i, d in enumerate(daemons))


@pytest.fixture
def vhostd(socket_dir: Path, started_daemons: list[Daemon]) -> Iterator[Callable[..., Daemon]]:
    """A factory: ``vhostd(*args)`` starts a vhostd daemon with its sockets under socket_dir;
    ``vhostd(*args, after=d)`` one in d's directory (a restart: the same socket paths). Every
    daemon it started is stopped at teardown and its log printed (shown when a test fails)."""
    daemons = []

    def start(*args, after: Daemon | None = None, **kw) -> Daemon:
        if after is not None:
            workdir = after.dir
        else:
            workdir = socket_dir / ("d%d" % len(daemons))
            workdir.mkdir()
        d = Daemon(*args, workdir=str(workdir), **kw)
        daemons.append(d)
        started_daemons.append(d)
        return d.start()

    yield start
    for d in daemons:
        d.stop()
        print(d.log())
        d.cleanup()


def booted(guest: GuestShell, started_daemons: list[Daemon]) -> GuestShell:
    """Start a guest whose failure reports carry the tails of the test's vhostd logs; the boot's
    figures are printed (shown with a failing test's output)."""
    guest.attach_log("vhostd logs", lambda: daemon_log_tails(started_daemons))
    guest.start()
    print(f"guest booted in {guest.boot_time_s:.1f} s, time scale {guest.time_scale:.1f} "
          f"(calibration {guest.calibration_s:.2f} s); console log: {guest.console_log_path}")
    return guest


@pytest.fixture
def boot_guest(guest_image: GuestImage, tmp_path: Path,
               started_daemons: list[Daemon]) -> Iterator[Callable[..., Guest]]:
    """A factory: ``boot_guest(devices=[...], smp=2)`` boots a Guest (keyword arguments as Guest's);
    every guest it booted is ended at teardown. The QEMU command line is printed, so a failing
    test shows it with its captured output; console logs stay under tmp_path. A guest's failure
    reports carry the tails of the logs of every vhostd the test started."""
    guests: list[Guest] = []

    def boot(**kwargs) -> Guest:
        kwargs.setdefault("workdir", tmp_path / f"guest{len(guests)}")
        guest = Guest(guest_image, **kwargs)
        print(f"QEMU: {guest.command_line_str}")
        guests.append(guest)
        return booted(guest, started_daemons)

    yield boot
    for guest in guests:
        guest.close()


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    """A libvirtd of the tests' own (``tests/e2e/libvirt_host.py``): root, in a private mount
    namespace over a temporary state directory. At teardown every domain is destroyed, the daemon
    stopped and its logs (libvirtd's, each domain's QEMU log) copied to a pytest temporary directory."""
    missing = [f"{tool} (package {pkg})" for tool, pkg in LIBVIRT_TOOLS.items() if not shutil.which(tool)]
    if missing:
        missing_dependency("libvirt tests need " + ", ".join(missing))
    if os.geteuid() != 0:
        missing_dependency("libvirt tests need root: libvirtd runs privileged in its own mount namespace")
    daemon = LibvirtDaemon(logs_dir=tmp_path_factory.mktemp("libvirtd-logs"))
    with daemon:
        yield daemon
    print(f"libvirtd logs: {daemon.logs_dir}")


@pytest.fixture
def boot_libvirt_guest(guest_image: GuestImage, libvirtd: LibvirtDaemon, tmp_path: Path,
                       started_daemons: list[Daemon]) -> Iterator[Callable[..., LibvirtGuest]]:
    """A factory: ``boot_libvirt_guest(elements=[...], disks=[...])`` defines and starts the test
    guest as a domain of the ``libvirtd`` fixture (keyword arguments as LibvirtGuest's) and waits for
    its shell; every domain it started is destroyed and undefined at teardown. The domain XML is
    printed; failure reports carry it, libvirt's QEMU log, libvirtd's log and the vhostd logs."""
    guests: list[LibvirtGuest] = []

    def boot(**kwargs) -> LibvirtGuest:
        kwargs.setdefault("workdir", tmp_path / f"domain{len(guests)}")
        guest = LibvirtGuest(guest_image, libvirtd, **kwargs)
        print(f"libvirt domain XML:\n{guest.domain_xml}")
        guests.append(guest)
        return booted(guest, started_daemons)

    yield boot
    for guest in guests:
        guest.close()


@pytest.fixture
def storage_daemon(socket_dir: Path) -> Iterator[Callable[..., StorageDaemon]]:
    """A factory: ``storage_daemon(image_path, num_queues=1)`` starts qemu-storage-daemon exporting the
    image as vhost-user-blk on a socket in ``socket_dir``; all are stopped and cleaned at teardown."""
    daemons: list[StorageDaemon] = []

    def start(image: str | os.PathLike[str], **kwargs) -> StorageDaemon:
        daemon = StorageDaemon(image, socket_dir / f"qsd{len(daemons)}.sock", **kwargs)
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()
