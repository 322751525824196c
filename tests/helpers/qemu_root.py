"""The Debian 13 root with QEMU 11.1 (the vfio-user client) that scripts/build-qemu-root.sh builds
under build/qemu-root, for the NVMe-over-vfio-user tests; Debian 12's own QEMU serves the rest."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
QEMU_ROOT_DIR = REPO_ROOT / "build" / "qemu-root"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-qemu-root.sh"


class QemuRootError(Exception):
    """build-qemu-root.sh failed; the message carries its output."""


@dataclass(frozen=True)
class QemuRoot:
    """A built root: its directory and the wrappers that run its tools with the host's paths."""

    path: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def tool(self, name: str) -> Path:
        """The wrapper of ``name`` (qemu-system-x86_64, qemu-img, qemu-io, qemu-storage-daemon)."""
        return self.path / "bin" / name

    @property
    def qemu_system(self) -> Path:
        return self.tool("qemu-system-x86_64")

    def version(self) -> str:
        """The first line of ``qemu-system-x86_64 --version``."""
        out = subprocess.run([str(self.qemu_system), "--version"], capture_output=True, text=True,
                             check=True, stdin=subprocess.DEVNULL).stdout
        return out.splitlines()[0]

    def stamp(self) -> dict[str, str]:
        """What the build recorded: ``qemu`` (version line), ``root_build_s`` (seconds mmdebstrap took), ``script``."""
        fields = {}
        for line in (self.path / ".stamp").read_text().splitlines():
            key, _, value = line.partition(" ")
            fields[key] = value
        return fields


def build_qemu_root(path: Path = QEMU_ROOT_DIR) -> QemuRoot:
    """Build the root if it is missing or stale (a no-op, without network, when it is up to date)."""
    result = subprocess.run([str(BUILD_SCRIPT), str(path)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise QemuRootError(f"{BUILD_SCRIPT} failed ({result.returncode}):\n"
                            f"{result.stderr}{result.stdout}")
    return QemuRoot(path)
