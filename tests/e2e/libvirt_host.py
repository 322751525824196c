"""A libvirt daemon of the test's own, and guests it runs as domains (no pytest inside).

``libvirtd`` runs as root, privileged (``qemu:///system``), in a private mount namespace
(``unshare --mount --propagation private``) in which libvirt's directories are bind mounts of a
temporary state directory; nothing of the host's libvirt set-up is read or written, and no systemd,
dbus, virtlogd or ``libvirt-daemon-system`` is needed:

* ``/etc/libvirt``: a ``qemu.conf`` that runs QEMU as root without a security driver, cgroups or a
  per-domain ``/dev`` namespace, with QEMU's output in a plain file instead of virtlogd; defined
  domains land there too;
* ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt``: the daemon's
  sockets and pid files, domain state, QEMU capabilities, libvirtd's and QEMU's logs;
* ``/etc/passwd`` and ``/etc/group`` gain a ``libvirt-qemu`` entry: the QEMU driver looks up its
  built-in default user before it reads ``qemu.conf`` and fails without one (the user comes with
  ``libvirt-daemon-system``; QEMU still runs as root).

Directories that do not exist on the host are created as empty mount points and removed again.
Clients (``virsh``) stay in the host's namespace and reach the daemon through its socket in the
state directory: ``qemu+unix:///system?socket=...``. Paths in domain XML are resolved by libvirtd in
its namespace, where everything but libvirt's own directories is the host's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from guest import (KERNEL_CMDLINE, ConsoleTransport, GuestError, GuestExited, GuestImage, GuestShell, ProcessHarness,
                   SocketConsole, die_with_parent, terminate)
from tests.helpers.waiting import wait_for

# In the namespace -> in the state directory.
LIBVIRT_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
QEMU_CONF = """\
# QEMU as root, unconfined: the test's vhost-user sockets and guest image are root's.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
# No per-domain /dev namespace and no cgroups: neither is there in a container without systemd.
namespaces = []
cgroup_controllers = []
# QEMU's output to /var/log/libvirt/qemu/<domain>.log directly, not through virtlogd.
stdio_handler = "file"
"""
LIBVIRTD_CONF = """\
# Root's clients only (the socket is 0700); polkit would need dbus.
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
# Run by sh in the new namespace: bind mounts given as (source, target) argument pairs, then libvirtd.
NAMESPACE_SCRIPT = """\
set -eu
conf=$1; shift
while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
exec libvirtd -f "$conf"
"""
# The QEMU driver's compiled-in default user and group (Debian's build).
DEFAULT_QEMU_USER = "libvirt-qemu"
VIRSH_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 120.0


class LibvirtError(GuestError):
    """libvirtd did not start, or a virsh command failed."""


class LibvirtDaemon(ProcessHarness):
    """libvirtd in a private mount namespace over a temporary state directory (see the module's
    docstring). ``virsh(...)`` runs virsh against it; ``close()`` destroys and undefines every domain,
    stops the daemon, copies the logs to ``logs_dir`` and removes the state directory."""

    def __init__(self, logs_dir: str | os.PathLike[str] | None = None) -> None:
        # Under /tmp and short: the daemon's socket path must fit sun_path.
        self.state_dir = Path(tempfile.mkdtemp(prefix="vhd-lv-"))
        self.logs_dir = None if logs_dir is None else Path(logs_dir)
        self.socket_path = self.state_dir / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket_path}"
        self.output_path = self.state_dir / "libvirtd.out"
        self._proc: subprocess.Popen[bytes] | None = None
        self._made_mount_points: list[Path] = []

    def _mounts(self) -> list[tuple[Path, Path]]:
        """(source, target) bind mounts of the namespace."""
        mounts = [(self.state_dir / "passwd", Path("/etc/passwd")), (self.state_dir / "group", Path("/etc/group"))]
        return mounts + [(self.state_dir / name, Path(target)) for target, name in LIBVIRT_DIRS.items()]

    def _write_state(self) -> None:
        for name in LIBVIRT_DIRS.values():
            (self.state_dir / name).mkdir()
        (self.state_dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.state_dir / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if not any(line.startswith(DEFAULT_QEMU_USER + ":") for line in passwd.splitlines()):
            passwd += f"{DEFAULT_QEMU_USER}:x:65534:65534:looked up, never used:/nonexistent:/usr/sbin/nologin\n"
        if not any(line.startswith(DEFAULT_QEMU_USER + ":") for line in group.splitlines()):
            group += f"{DEFAULT_QEMU_USER}:x:65534:\n"
        (self.state_dir / "passwd").write_text(passwd)
        (self.state_dir / "group").write_text(group)
        for _, target in self._mounts():
            if not target.exists():
                target.mkdir(parents=True)
                self._made_mount_points.append(target)

    def start(self) -> None:
        """Start libvirtd and wait until virsh can talk to it."""
        self._write_state()
        args = [os.fspath(self.state_dir / "libvirtd.conf")]
        for source, target in self._mounts():
            args += [os.fspath(source), os.fspath(target)]
        with open(self.output_path, "wb") as output:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NAMESPACE_SCRIPT, "sh", *args],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )

        def answers() -> bool:
            if self._proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited with status {self._proc.returncode}:\n{self.log()}")
            return self.socket_path.exists() and self.virsh("version", check=False).returncode == 0

        try:
            wait_for(answers, timeout=READY_TIMEOUT_S, interval=0.2)
        except TimeoutError:
            raise LibvirtError(f"libvirtd did not answer on {self.socket_path} within {READY_TIMEOUT_S:.0f} s:\n"
                               f"{self.log()}") from None

    def virsh(self, *args: str, check: bool = True, timeout_s: float = VIRSH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI args...``; :class:`LibvirtError` with its output if it fails and ``check``."""
        result = subprocess.run(["virsh", "-c", self.uri, *args], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}".rstrip())
        return result

    def qemu_pid(self, domain: str) -> int | None:
        """The pid of a running domain's QEMU, from libvirt's pid file."""
        try:
            return int((self.state_dir / "run" / "qemu" / f"{domain}.pid").read_text())
        except (OSError, ValueError):
            return None

    def qemu_log(self, domain: str) -> str:
        """libvirt's log of a domain's QEMU: its environment and command line, then its stderr."""
        return _read(self.state_dir / "log" / "qemu" / f"{domain}.log")

    def log(self) -> str:
        """libvirtd's log file (warnings and errors) and what it wrote to stdout and stderr."""
        return _read(self.state_dir / "log" / "libvirtd.log") + _read(self.output_path)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            listed = self.virsh("list", "--all", "--name", check=False)
            for name in listed.stdout.split():
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, check=False)
        if self._proc is not None:
            terminate(self._proc)
        if self.logs_dir is not None and (self.state_dir / "log").is_dir():
            shutil.copytree(self.state_dir / "log", self.logs_dir, dirs_exist_ok=True)
            shutil.copy(self.output_path, self.logs_dir)
        for path in reversed(self._made_mount_points):
            try:
                path.rmdir()
            except OSError:
                pass
        self._made_mount_points.clear()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _indented(fragments: Iterable[str], spaces: int) -> str:
    return "".join("".join(" " * spaces + line + "\n" for line in text.strip("\n").splitlines())
                   for text in fragments)


class LibvirtGuest(GuestShell):
    """The test guest as a libvirt domain: a TCG machine (``<domain type='qemu'>``, ``-cpu max``)
    booting the image's kernel and initramfs, its serial port on a unix socket QEMU listens on, which
    the harness connects to before the guest runs (the domain starts paused). ``elements`` are XML
    fragments placed in ``<domain>`` as they are (e.g. ``<memoryBacking>``), ``disks`` fragments
    placed in ``<devices>``. The domain is defined and started in :meth:`start` and destroyed and
    undefined in :meth:`close`."""

    def __init__(
        self,
        image: GuestImage,
        daemon: LibvirtDaemon,
        *,
        elements: Iterable[str] = (),
        disks: Iterable[str] = (),
        memory_mib: int = 256,
        smp: int = 1,
        name: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        boot_timeout_s: float = 120.0,
        kernel_cmdline: str = KERNEL_CMDLINE,
        qemu_binary: str = "/usr/bin/qemu-system-x86_64",
        min_time_scale: float | None = None,
    ) -> None:
        super().__init__(image, workdir=workdir, boot_timeout_s=boot_timeout_s, min_time_scale=min_time_scale)
        self.daemon = daemon
        self.name = name or f"vhd-{uuid.uuid4().hex[:8]}"
        self.console_path = self._short_path("console.sock")
        self.domain_xml_path = self.workdir / "domain.xml"
        self.domain_xml = f"""\
<domain type='qemu'>
  <name>{escape(self.name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{smp}</vcpu>
{_indented(elements, 2)}\
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(os.fspath(image.kernel))}</kernel>
    <initrd>{escape(os.fspath(image.initrd))}</initrd>
    <cmdline>{escape(kernel_cmdline)}</cmdline>
  </os>
  <!-- without <acpi/> libvirt turns ACPI off, and PCI hot-plug with it -->
  <features><acpi/></features>
  <cpu mode='maximum' check='none'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(qemu_binary)}</emulator>
{_indented(disks, 4)}\
    <controller type='usb' model='none'/>
    <serial type='unix'>
      <source mode='bind' path={quoteattr(os.fspath(self.console_path))}/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
        self._defined = False
        self._qemu_pid: int | None = None

    # --- the domain ----------------------------------------------------------------------------

    def _launch(self) -> ConsoleTransport:
        self.domain_xml_path.write_text(self.domain_xml)
        try:
            self.daemon.virsh("define", os.fspath(self.domain_xml_path))
            self._defined = True
            # Paused until the console is connected: QEMU drops what the guest writes before that.
            self.daemon.virsh("start", self.name, "--paused")
        except LibvirtError as error:
            raise GuestExited(str(self.failure(f"the domain did not start: {error}"))) from None
        self._qemu_pid = self.daemon.qemu_pid(self.name)
        console = SocketConsole(self.console_path)
        self.daemon.virsh("resume", self.name)
        return console

    def virsh(self, command: str, *args: str) -> str:
        """``virsh COMMAND DOMAIN ARGS...``; its output (:class:`LibvirtError` if it fails)."""
        return self.daemon.virsh(command, self.name, *args).stdout

    def domblklist(self) -> str:
        """``virsh domblklist``: the disks libvirt says the domain has, as virsh prints them."""
        return self.virsh("domblklist")

    def attach_device(self, xml: str, label: str) -> str:
        """``virsh attach-device --live`` of the XML (saved as ``<label>.xml`` in the work directory)."""
        path = self.workdir / f"{label}.xml"
        path.write_text(xml)
        return self.virsh("attach-device", os.fspath(path), "--live")

    def detach_device(self, xml: str, label: str) -> str:
        """``virsh detach-device --live`` of the XML; libvirt may return before the guest let go."""
        path = self.workdir / f"{label}.xml"
        path.write_text(xml)
        return self.virsh("detach-device", os.fspath(path), "--live")

    def state(self) -> str:
        """``virsh domstate --reason``, e.g. ``running (unpaused)`` or ``shut off (shutdown)``."""
        return self.virsh("domstate", "--reason").strip()

    @property
    def running(self) -> bool:
        # The pid, not virsh: this is asked before every command.
        if self._qemu_pid is None:
            return False
        try:
            stat = Path(f"/proc/{self._qemu_pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"

    def _wait_ended(self, limit_s: float) -> str | None:
        try:
            wait_for(lambda: not self.running and self.state().startswith("shut off"), timeout=limit_s, interval=0.1)
        except TimeoutError:
            return None
        return self.state()

    def _ended_text(self) -> str | None:
        if self.running or self._qemu_pid is None:
            return None
        try:
            return f"domain {self.state()}"
        except LibvirtError as error:
            return f"QEMU is gone; {error}"

    def _machine_text(self) -> str:
        return f"libvirt domain {self.name} on {self.daemon.uri} (QEMU pid {self._qemu_pid}; XML {self.domain_xml_path})"

    def _machine_logs(self) -> dict[str, str]:
        return {
            "domain XML as defined": self.domain_xml,
            "QEMU log (libvirt's: command line, then stderr)": self.daemon.qemu_log(self.name),
            "libvirtd log": self.daemon.log(),
        }

    def kill(self) -> None:
        """End QEMU at once (``virsh destroy``)."""
        if self.running:
            self.daemon.virsh("destroy", self.name)

    def _end_machine(self) -> None:
        if not self._defined:
            return
        if self.running:
            self.daemon.virsh("destroy", self.name, check=False)
        self.daemon.virsh("undefine", self.name, check=False)
        self._defined = False
