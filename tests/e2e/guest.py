"""A QEMU guest for end-to-end tests, driven through its serial console and QMP.

The guest is the kernel and initramfs that ``scripts/build-guest.sh`` builds. Its ``/init`` serves a
small command protocol on ttyS0, which QEMU connects to this process's pipes:

* host -> guest: ``RUN <nonce> <n>`` then ``n`` lines of the base64-encoded shell script;
* guest -> host: ``VHD-BEGIN-<nonce>``, the script's stdout and stderr, then
  ``\\nVHD-END-<nonce> rc=<status>``.

The console neither echoes nor rewrites newlines, so a command's output comes back as it was
written. Each command runs in a child shell (``cd`` and variables do not persist), with stdin from
/dev/null. This module has no pytest dependency; the fixtures live in ``conftest.py``.

Time limits are nominal: a guest under TCG runs as fast as its host lets it, and a host of the same
kind can be twice as slow as another, or share its cores with a busy neighbour. Right after boot the
harness times a short calibration command in the guest; every limit a command or wait is given is
multiplied by how much slower than the reference the guest was (``Guest.time_scale``, never below 1).

Test data comes from ``vhd-pattern`` (``tests/e2e/tools/vhd-pattern.c``), a static helper in the
guest image that writes and checks seeded, position-dependent data natively; the host runs the same
binary (``PatternTool``) to make or check the bytes it expects. The guest's shell never computes data.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, Self

READY_MARKER = b"VHD-GUEST-READY"
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
# The calibration: a little of what guest commands do, busybox's shell and native code, and one
# console round trip. On an idle machine of our kind (2 vCPUs, TCG) it takes 0.082-0.099 s, with a
# busy loop on each core 0.16-0.25 s (and busybox `seq` slows down alike). The reference is the idle
# figure with a little room.
CALIBRATION_COMMAND = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; vhd-pattern spin 16 >/dev/null"
CALIBRATION_REFERENCE_S = 0.10
CALIBRATION_RUNS = 3
# A guest this much slower than the reference is hung rather than slow: limits stop growing there.
MAX_TIME_SCALE = 12.0
# VHOSTD_GUEST_TIME_SCALE=N makes every guest's scale at least N (a known-slow machine).
TIME_SCALE_ENV = "VHOSTD_GUEST_TIME_SCALE"
PATTERN_TOOL_IN_GUEST = "vhd-pattern"
LOG_TAIL_CHARS = 6000
# The guest reads a script through the tty's flip buffers (about 64 KiB); stay well below.
MAX_SCRIPT_BYTES = 32 * 1024
# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH_BYTES = 107
CONSOLE_TAIL_CHARS = 3000


class GuestError(Exception):
    """The guest or its QEMU process did not behave as the harness expected."""


class GuestTimeout(GuestError):
    """Something expected on the console did not arrive in time."""


class GuestExited(GuestError):
    """QEMU exited while the harness was waiting for the guest."""


class CommandFailed(GuestError):
    """A command run with :meth:`Guest.check` exited with a non-zero status."""

    def __init__(self, command: str, rc: int, output: str) -> None:
        super().__init__(f"guest command failed with rc={rc}: {command}\n--- output ---\n{output}")
        self.command = command
        self.rc = rc
        self.output = output


class PatternMismatch(GuestError, AssertionError):
    """Data read back is not the pattern that should be there."""


class QMPError(GuestError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        super().__init__(f"QMP {command} failed: {error.get('class')}: {error.get('desc')}")
        self.command = command
        self.error = dict(error)


def pattern_args(
    action: Literal["write", "check"],
    seed: int | Literal["zero"],
    path: str | os.PathLike[str],
    offset: int,
    length: int,
    *,
    direct: bool = False,
    sync: bool = False,
    chunk_bytes: int | None = None,
) -> list[str]:
    """The arguments of ``vhd-pattern write|check`` (after the program name)."""
    args = [action, str(seed), os.fspath(path), str(offset), str(length)]
    if chunk_bytes is not None:
        args += ["-b", str(chunk_bytes)]
    if direct:
        args.append("-d")
    if sync:
        if action != "write":
            raise ValueError("only a write can fsync")
        args.append("-f")
    return args


def pattern_command(action: Literal["write", "check"], seed: int | Literal["zero"],
                    path: str | os.PathLike[str], offset: int, length: int, **options: Any) -> str:
    """A guest shell command that writes or checks pattern ``seed`` at ``[offset, offset+length)`` of
    ``path`` (options as :func:`pattern_args`); for composing background jobs in a test's script."""
    return shlex.join([PATTERN_TOOL_IN_GUEST, *pattern_args(action, seed, path, offset, length, **options)])


@dataclasses.dataclass(frozen=True)
class PatternTool:
    """The host's copy of ``vhd-pattern``: the bytes a guest's pattern write put on a disk."""

    path: Path

    def bytes(self, seed: int, offset: int, length: int) -> bytes:
        """Pattern ``seed`` at positions ``[offset, offset+length)``."""
        result = subprocess.run([os.fspath(self.path), "gen", str(seed), str(offset), str(length)],
                                capture_output=True, check=True)
        return result.stdout

    def check_file(self, path: str | os.PathLike[str], seed: int | Literal["zero"], offset: int,
                   length: int) -> None:
        """:class:`PatternMismatch` unless ``[offset, offset+length)`` of the file holds the pattern."""
        result = subprocess.run([os.fspath(self.path), *pattern_args("check", seed, path, offset, length)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise PatternMismatch(f"{path} [{offset}, +{length}) is not pattern {seed}: "
                                  f"{result.stdout}{result.stderr}".rstrip())


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """The kernel and initramfs a guest boots, and the host's copy of the guest's pattern helper."""

    kernel: Path
    initrd: Path
    patterns: PatternTool

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> GuestImage:
        """The image ``scripts/build-guest.sh`` wrote into ``directory``."""
        directory = Path(directory)
        image = cls(directory / "vmlinuz", directory / "initramfs.cpio.gz",
                    PatternTool(directory / "vhd-pattern"))
        for path in (image.kernel, image.initrd, image.patterns.path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing: run scripts/build-guest.sh {directory}")
        return image


_DEVICE_DRIVERS = {"blk": "vhost-user-blk-pci", "scsi": "vhost-user-scsi-pci"}
# The two devices spell their queue-count property differently.
_NUM_QUEUES_PROPERTY = {"blk": "num-queues", "scsi": "num_queues"}


@dataclasses.dataclass(frozen=True)
class VhostUserDevice:
    """A vhost-user PCI device whose back-end listens on ``socket``.

    ``id`` defaults to ``<kind><index>`` when the guest is created; the chardev is ``<id>-chr``.
    ``reconnect_s`` sets the chardev's ``reconnect`` (seconds between attempts after a disconnect);
    ``props`` are extra ``-device`` properties (Python bools become on/off).
    """

    kind: Literal["blk", "scsi"]
    socket: str | os.PathLike[str]
    num_queues: int = 1
    id: str | None = None
    reconnect_s: int | None = None
    props: Mapping[str, str | int | bool] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _DEVICE_DRIVERS:
            raise ValueError(f"unknown vhost-user device kind {self.kind!r} (blk or scsi)")
        check_unix_path(self.socket)

    @property
    def chardev_id(self) -> str:
        return f"{self.id}-chr"

    def device_properties(self) -> dict[str, str | int | bool]:
        """The ``-device`` / ``device_add`` properties, driver first."""
        return {
            "driver": _DEVICE_DRIVERS[self.kind],
            "id": str(self.id),
            "chardev": self.chardev_id,
            _NUM_QUEUES_PROPERTY[self.kind]: self.num_queues,
            **self.props,
        }

    def command_line_args(self) -> list[str]:
        """``-chardev`` and ``-device`` options, in the order QEMU needs them."""
        chardev = f"socket,id={self.chardev_id},path={qemu_opt_value(self.socket)}"
        if self.reconnect_s is not None:
            chardev += f",reconnect={self.reconnect_s}"
        props = self.device_properties()
        device = ",".join(
            [str(props.pop("driver"))] + [f"{k}={qemu_opt_value(v)}" for k, v in props.items()]
        )
        return ["-chardev", chardev, "-device", device]

    def qmp_chardev_add_args(self) -> dict[str, Any]:
        """Arguments of the QMP ``chardev-add`` that creates this device's chardev."""
        data: dict[str, Any] = {
            "addr": {"type": "unix", "data": {"path": os.fspath(self.socket)}},
            "server": False,
        }
        if self.reconnect_s is not None:
            data["reconnect"] = self.reconnect_s
        return {"id": self.chardev_id, "backend": {"type": "socket", "data": data}}


def qemu_opt_value(value: object) -> str:
    """``value`` as written in a QEMU ``key=value,...`` option."""
    if isinstance(value, bool):
        return "on" if value else "off"
    # QEMU's option syntax escapes a comma by doubling it.
    return os.fspath(value).replace(",", ",,") if isinstance(value, (str, os.PathLike)) else str(value)


def check_unix_path(path: str | os.PathLike[str]) -> None:
    """ValueError for a path too long to bind or connect a unix socket to."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
        raise ValueError(f"unix socket path longer than {MAX_UNIX_PATH_BYTES} bytes: {path}")


def tail_text(text: str, chars: int = CONSOLE_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


# Resolved here, not in the forked child, where loading symbols could deadlock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: a crashed or killed test run must not leave its children spinning."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """End a child process that may still run: SIGTERM, SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ProcessHarness:
    """A context manager around a helper process: ``start()`` on entry, ``close()`` on exit, and
    ``close()`` also when ``start()`` fails half way."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SerialConsole:
    """Everything QEMU's serial port wrote, collected by a reader thread, searchable while it grows."""

    # A marker may straddle two reads; re-scan this much of what was already searched.
    _RESCAN_BYTES = 256

    def __init__(self, fd: int, log_path: Path) -> None:
        self._fd = fd
        self._log = open(log_path, "wb")
        self._buffer = bytearray()
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read_loop, name="guest-console", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                data = b""
            with self._changed:
                if data:
                    self._buffer += data
                    self._log.write(data)
                    self._log.flush()
                else:
                    self._closed = True
                self._changed.notify_all()
            if not data:
                return

    @property
    def closed(self) -> bool:
        """QEMU closed the console: it is exiting."""
        with self._changed:
            return self._closed

    @property
    def size(self) -> int:
        with self._changed:
            return len(self._buffer)

    def text(self, start: int = 0, end: int | None = None) -> str:
        """What the guest wrote between two offsets, decoded leniently."""
        with self._changed:
            return self._buffer[start:end].decode(errors="replace")

    def wait_for(self, pattern: re.Pattern[bytes], start: int, deadline: float) -> re.Match[bytes] | None:
        """The first match of ``pattern`` at or after ``start``; None at the deadline or at EOF."""
        searched = start
        with self._changed:
            while True:
                match = pattern.search(self._buffer, max(start, searched - self._RESCAN_BYTES))
                if match:
                    return match
                searched = len(self._buffer)
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def close(self) -> None:
        self._thread.join(timeout=5)
        self._log.close()


class ConsoleTransport:
    """How the harness holds a guest's serial port: a file descriptor the guest's output is read
    from (by :class:`SerialConsole`) and :meth:`write` for what the host sends. How the port is
    reached depends on who launched the machine."""

    read_fd: int

    def write(self, data: bytes) -> None:
        """Send ``data`` to the guest; an OSError once the port is gone."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PipeConsole(ConsoleTransport):
    """The serial port on the stdio pipes of a QEMU this process started (``-serial stdio``)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.read_fd = proc.stdout.fileno()

    def write(self, data: bytes) -> None:
        self._proc.stdin.write(data)
        self._proc.stdin.flush()

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.stdout.close()


class SocketConsole(ConsoleTransport):
    """The serial port on a unix socket QEMU listens on (libvirt's ``<serial type='unix'>``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(os.fspath(path))
        self.read_fd = self._sock.fileno()

    def write(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        # shutdown wakes a reader still blocked on the socket; close alone would not.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

class QMPClient:
    """A minimal QMP client: synchronous commands, asynchronous events kept for :meth:`wait_event`."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(os.fspath(path))
        self._pending = bytearray()
        self._next_id = 0
        self.timeout_s = timeout_s
        self.events: list[dict[str, Any]] = []
        greeting = self._read_message(time.monotonic() + timeout_s)
        if "QMP" not in greeting:
            raise GuestError(f"unexpected QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout("no QMP message from QEMU in time")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise GuestExited("QEMU closed the QMP socket")
            self._pending += data
        line, _, rest = self._pending.partition(b"\n")
        self._pending = bytearray(rest)
        return json.loads(line)

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """Run ``command``; its ``return`` value, or :class:`QMPError`."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            message = self._read_message(deadline)
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == self._next_id:
                if "error" in message:
                    raise QMPError(command, message["error"])
                return message.get("return")

    def wait_event(
        self,
        name: str,
        timeout_s: float | None = None,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The first event called ``name`` (for which ``match(data)`` holds), removed from the list."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        seen = 0
        while True:
            for index in range(seen, len(self.events)):
                event = self.events[index]
                if event["event"] == name and (match is None or match(event.get("data", {}))):
                    return self.events.pop(index)
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        self._sock.close()


class GuestShell(ProcessHarness):
    """A guest machine driven through the command protocol on its serial console: boot wait,
    calibration, commands, pattern checks and failure reports. Subclasses launch the machine and
    say how its console is reached (:meth:`_launch`), whether it runs and how it ended."""

    def __init__(
        self,
        image: GuestImage,
        *,
        workdir: str | os.PathLike[str] | None = None,
        boot_timeout_s: float = 120.0,
        min_time_scale: float | None = None,
    ) -> None:
        self.image = image
        if min_time_scale is None:
            min_time_scale = float(os.environ.get(TIME_SCALE_ENV) or 1.0)
        self.min_time_scale = max(1.0, min_time_scale)
        # Until the calibration after boot, only the floor is known.
        self.time_scale = self.min_time_scale
        self.calibration_s: float | None = None
        self.boot_timeout_s = boot_timeout_s
        self.boot_time_s: float | None = None
        self._logs: dict[str, Callable[[], str]] = {}
        self._own_dirs: list[Path] = []
        if workdir is None:
            workdir = self._make_temp_dir()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log_path = self.workdir / "console.log"
        self._transport: ConsoleTransport | None = None
        self._console: SerialConsole | None = None
        self._broken: str | None = None

    def _make_temp_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="vhd-guest-"))
        self._own_dirs.append(path)
        return path

    def _short_path(self, name: str) -> Path:
        """``name`` in the work directory, or in a short temporary one if that makes a path too
        long for a unix socket."""
        path = self.workdir / name
        if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
            path = self._make_temp_dir() / name
        return path

    # --- what a subclass provides --------------------------------------------------------------

    def _launch(self) -> ConsoleTransport:
        """Start the machine; its console, connected before the guest wrote anything to it."""
        raise NotImplementedError

    def _booted(self) -> None:
        """Called once the guest's shell is ready, before the calibration."""

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def _wait_ended(self, limit_s: float) -> Any:
        """Wait up to ``limit_s`` for the machine to end after the guest powered off; how it ended
        (what :meth:`poweroff` returns), or None if it still runs."""
        raise NotImplementedError

    def _ended_text(self) -> str | None:
        """How the machine ended, for a failure report; None while it runs."""
        raise NotImplementedError

    def _machine_text(self) -> str:
        """The failure report's lines on the machine: how it was launched."""
        raise NotImplementedError

    def _machine_logs(self) -> dict[str, str]:
        """The failure report's logs of the machine, label -> text (tails are taken)."""
        raise NotImplementedError

    def _end_machine(self) -> None:
        """End the machine if it still runs and release what launching it took."""
        raise NotImplementedError

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the machine, wait for the guest's shell, calibrate the time limits."""
        if self._transport is not None:
            raise GuestError("guest already started")
        started = time.monotonic()
        self._transport = self._launch()
        self._console = SerialConsole(self._transport.read_fd, self.console_log_path)
        ready = re.compile(re.escape(READY_MARKER) + rb"\r?\n")
        boot_limit_s = self.scaled(self.boot_timeout_s)
        if not self._console.wait_for(ready, 0, started + boot_limit_s):
            self._fail(f"guest shell not ready (boot timeout {boot_limit_s:.0f} s)")
        self.boot_time_s = time.monotonic() - started
        self._booted()
        self.calibrate()

    def calibrate(self) -> float:
        """Time the calibration command and set :attr:`time_scale` from it; the scale."""
        samples = []
        for _ in range(CALIBRATION_RUNS):
            started = time.monotonic()
            # A fixed, generous limit: the scale is not known yet.
            self._run_within(CALIBRATION_COMMAND, 120.0, "calibration")
            samples.append(time.monotonic() - started)
        self.calibration_s = sorted(samples)[len(samples) // 2]
        self.time_scale = min(MAX_TIME_SCALE, max(self.min_time_scale, self.calibration_s / CALIBRATION_REFERENCE_S))
        return self.time_scale

    def scaled(self, nominal_s: float) -> float:
        """A time limit for work that takes ``nominal_s`` seconds at most on the reference machine,
        stretched by this guest's measured slowness (host-side waits on guest progress use it too)."""
        return nominal_s * self.time_scale

    def attach_log(self, label: str, read: Callable[[], str]) -> None:
        """Add a log (a function returning its text) whose tail goes into every failure report, e.g.
        the back-end serving this guest's disks."""
        self._logs[label] = read

    def poweroff(self, timeout_s: float = 60.0) -> Any:
        """Flush the guest's caches, power it off and wait for the machine to end; how it ended (for
        a QEMU guest its exit status)."""
        self.check("sync", timeout_s=timeout_s)
        self._send_script("poweroff -f", secrets.token_hex(8))
        limit_s = self.scaled(timeout_s)
        ended = self._wait_ended(limit_s)
        if ended is None:
            self._fail(f"machine still running {limit_s:.0f} s after poweroff -f")
        return ended

    def close(self) -> None:
        """End the machine if it still runs and release everything."""
        self._end_machine()
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for path in self._own_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._own_dirs.clear()

    # --- commands ----------------------------------------------------------------------------

    def run(self, command: str, timeout_s: float = 60.0) -> tuple[int, str]:
        """Run a shell script in the guest; its exit status and combined stdout/stderr. ``timeout_s``
        is nominal (see :meth:`scaled`)."""
        limit_s = self.scaled(timeout_s)
        return self._run_within(command, limit_s, f"timeout {timeout_s:.0f} s x {self.time_scale:.1f} = {limit_s:.0f} s")

    def _run_within(self, command: str, limit_s: float, limit_text: str) -> tuple[int, str]:
        nonce = secrets.token_hex(8)
        deadline = time.monotonic() + limit_s
        start = self._send_script(command, nonce)
        begin = self._console.wait_for(re.compile(rb"VHD-BEGIN-%s\r?\n" % nonce.encode()), start, deadline)
        end = begin and self._console.wait_for(
            re.compile(rb"\nVHD-END-%s rc=(\d+)\r?\n" % nonce.encode()), begin.end(), deadline
        )
        if not end:
            self._broken = f"unfinished command: {command}"
            self._fail(f"guest command did not finish ({limit_text}): {command}")
        return int(end.group(1)), self._console.text(begin.end(), end.start())

    def check(self, command: str, timeout_s: float = 60.0) -> str:
        """Run a shell script in the guest; its output, or :class:`CommandFailed` if rc != 0."""
        rc, output = self.run(command, timeout_s)
        if rc != 0:
            raise CommandFailed(command, rc, output)
        return output

    def write_pattern(self, path: str, seed: int | Literal["zero"], offset: int, length: int, *,
                      direct: bool = False, sync: bool = True, chunk_bytes: int | None = None,
                      timeout_s: float = 60.0) -> None:
        """Write pattern ``seed`` at ``[offset, offset+length)`` of ``path`` in the guest (a disk or
        a file), fsynced unless ``sync=False``."""
        self.check(pattern_command("write", seed, path, offset, length, direct=direct, sync=sync,
                                   chunk_bytes=chunk_bytes), timeout_s)

    def check_pattern(self, path: str, seed: int | Literal["zero"], offset: int, length: int, *,
                      direct: bool = False, chunk_bytes: int | None = None, timeout_s: float = 60.0) -> None:
        """:class:`PatternMismatch` unless ``[offset, offset+length)`` of ``path`` in the guest holds
        pattern ``seed`` (read with O_DIRECT if ``direct``, else through the guest's page cache)."""
        command = pattern_command("check", seed, path, offset, length, direct=direct, chunk_bytes=chunk_bytes)
        rc, output = self.run(command, timeout_s)
        if rc != 0:
            raise PatternMismatch(f"in the guest, {path} [{offset}, +{length}) is not pattern {seed}: "
                                  f"{output.strip()}")

    def _send_script(self, command: str, nonce: str) -> int:
        """Send one RUN request; the console offset from which its answer is to be looked for."""
        if self._broken:
            raise GuestError(f"guest unusable after an earlier failure ({self._broken})")
        if not self.running:
            self._fail("the machine is not running")
        encoded = base64.encodebytes(command.encode())
        if len(encoded) > MAX_SCRIPT_BYTES:
            raise ValueError(f"guest script of {len(encoded)} encoded bytes exceeds {MAX_SCRIPT_BYTES}")
        lines = encoded.splitlines()
        start = self._console.size
        try:
            self._transport.write(b"RUN %s %d\n" % (nonce.encode(), len(lines)) + encoded)
        except (BrokenPipeError, ConnectionError):
            self._fail("the serial console was closed")
        return start

    def _fail(self, what: str) -> NoReturn:
        """Raise GuestExited or GuestTimeout with the evidence a reader needs."""
        raise self.failure(what)

    def failure(self, what: str) -> GuestError:
        """GuestExited or GuestTimeout saying ``what``, with the evidence a reader needs: how the
        machine was launched and its logs (QEMU's command line and stderr, or the libvirt domain's
        XML and logs), the console's tail, the calibration and every attached log's tail. Tests
        raise it when their own wait on the guest runs out."""
        ended = self._ended_text()
        if ended:
            what += f" ({ended})"
        console = self._console.text() if self._console else ""
        calibration = ("not calibrated" if self.calibration_s is None else
                       f"calibration {self.calibration_s:.2f} s against {CALIBRATION_REFERENCE_S:.2f} s")
        message = (
            f"{what}\n{self._machine_text()}\n"
            f"time scale {self.time_scale:.1f} ({calibration}; boot took "
            f"{'?' if self.boot_time_s is None else '%.1f' % self.boot_time_s} s)"
        )
        for label, text in self._machine_logs().items():
            message += f"\n--- {label} ---\n{tail_text(text)}"
        message += f"\n--- console tail ({self.console_log_path}) ---\n{tail_text(console)}"
        for label, read in self._logs.items():
            try:
                text = read()
            except Exception as error:  # the report must not fail for want of a log
                text = f"(unreadable: {error!r})"
            message += f"\n--- {label} (tail) ---\n{tail_text(text, LOG_TAIL_CHARS)}"
        return (GuestExited if ended else GuestTimeout)(message)
    # --- common checks -----------------------------------------------------------------------

    def read_sysfs(self, path: str, timeout_s: float = 60.0) -> str:
        """The content of a sysfs (or any) file in the guest, without the trailing newline."""
        return self.check(f"cat {shlex.quote(path)}", timeout_s).rstrip("\n")

    def block_device_sizes(self) -> dict[str, int]:
        """Block devices the guest sees, name -> size in bytes (from /sys/block/*/size)."""
        output = self.check(
            'for d in /sys/block/*; do [ -e "$d/size" ] && echo "${d##*/} $(cat "$d/size")"; done; true'
        )
        sizes = {}
        for line in output.splitlines():
            name, sectors = line.split()
            sizes[name] = int(sectors) * 512
        return sizes

    def wait_for_path(self, path: str, timeout_s: float = 30.0) -> None:
        """Wait until ``path`` exists in the guest (device nodes appear asynchronously)."""
        self.wait_in_guest(f"[ -e {shlex.quote(path)} ]", timeout_s, f"{path} did not appear in the guest")

    def wait_for_no_path(self, path: str, timeout_s: float = 30.0) -> None:
        """Wait until ``path`` is gone in the guest (a removed device's nodes go asynchronously)."""
        self.wait_in_guest(f"[ ! -e {shlex.quote(path)} ]", timeout_s, f"{path} still exists in the guest")

    def wait_in_guest(self, condition: str, timeout_s: float, what: str) -> None:
        """Poll the shell ``condition`` in the guest every 0.1 s until it holds; the guest's own
        clock bounds the wait (``timeout_s``, nominal), so the console is free again afterwards."""
        limit_s = self.scaled(timeout_s)
        tenths = max(1, int(limit_s * 10))
        rc, _ = self._run_within(
            f"i=0; until {condition}; do i=$((i+1)); [ $i -gt {tenths} ] && exit 1; usleep 100000; done",
            limit_s * 2 + 30, f"waiting for: {condition}",
        )
        if rc != 0:
            self._fail(f"{what} within {limit_s:.0f} s")

    def dmesg(self) -> str:
        """The guest kernel's log (kept off the console while commands run)."""
        return self.check("dmesg")


class Guest(GuestShell):
    """A QEMU guest this process starts, with vhost-user disks; the serial port on QEMU's stdio, QMP
    on a unix socket. A context manager that always ends the QEMU process.

    ``with Guest(image, devices=[VhostUserDevice("blk", sock)]) as guest: guest.check("ls /dev")``
    """

    def __init__(
        self,
        image: GuestImage,
        devices: Iterable[VhostUserDevice] = (),
        *,
        memory_mib: int = 256,
        smp: int = 1,
        workdir: str | os.PathLike[str] | None = None,
        boot_timeout_s: float = 120.0,
        kernel_cmdline: str = KERNEL_CMDLINE,
        qemu_binary: str = "qemu-system-x86_64",
        extra_args: Iterable[str] = (),
        reboot_resets: bool = False,
        min_time_scale: float | None = None,
        memory_slots: int = 0,
        max_memory_mib: int | None = None,
        incoming: str | None = None,
    ) -> None:
        super().__init__(image, workdir=workdir, boot_timeout_s=boot_timeout_s, min_time_scale=min_time_scale)
        memory = f"{memory_mib}M"
        if memory_slots:
            # DIMM slots for memory hot-plug (object_add + device_add pc-dimm), up to maxmem.
            memory += f",slots={memory_slots},maxmem={max_memory_mib or 4 * memory_mib}M"
        self.devices: list[VhostUserDevice] = []
        self._devices_named = 0
        for dev in devices:
            self.devices.append(self._named(dev))
        self.stderr_path = self.workdir / "qemu.stderr"
        self.qmp_path = self._short_path("qmp.sock")
        self.command_line: list[str] = [
            qemu_binary,
            "-accel", "tcg",
            "-cpu", "max",
            "-machine", "pc,memory-backend=mem",
            # vhost-user back-ends map guest RAM, so it must be a shareable fd.
            "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-m", memory,
            "-smp", str(smp),
            "-nodefaults",
            "-nographic",
            # A reboot ends QEMU unless the test wants to see the guest come back.
            *([] if reboot_resets else ["-no-reboot"]),
            "-serial", "stdio",
            "-qmp", f"unix:{qemu_opt_value(self.qmp_path)},server=on,wait=off",
            "-kernel", os.fspath(image.kernel),
            "-initrd", os.fspath(image.initrd),
            "-append", kernel_cmdline,
        ]
        for dev in self.devices:
            self.command_line += dev.command_line_args()
        if incoming is not None:
            # A live-migration destination: it waits for the source's state (start_incoming()).
            self.command_line += ["-incoming", incoming]
        self.command_line += list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPClient | None = None
        self._stderr_file = None

    def _named(self, device: VhostUserDevice) -> VhostUserDevice:
        """``device`` with an id: its own, or ``<kind><n>`` with n counting every device added."""
        self._devices_named += 1
        if device.id:
            return device
        return dataclasses.replace(device, id=f"{device.kind}{self._devices_named - 1}")

    @property
    def command_line_str(self) -> str:
        """The QEMU command line as a shell would take it (tests print it on failure)."""
        return shlex.join(self.command_line)

    # --- the QEMU process ----------------------------------------------------------------------

    def _launch(self) -> ConsoleTransport:
        self._stderr_file = open(self.stderr_path, "wb")
        self._proc = subprocess.Popen(
            self.command_line,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            preexec_fn=die_with_parent,
        )
        return PipeConsole(self._proc)

    def _booted(self) -> None:
        self._qmp = QMPClient(self.qmp_path)

    def start_incoming(self, source: GuestShell, timeout_s: float = 30.0) -> None:
        """Launch this guest as the destination of a live migration (``incoming=``) and connect
        QMP; its shell is the source's, arriving with the migration, so there is no boot to wait
        for and the time limits are the source's."""
        if self._transport is not None:
            raise GuestError("guest already started")
        self._transport = self._launch()
        self._console = SerialConsole(self._transport.read_fd, self.console_log_path)
        self.time_scale, self.calibration_s = source.time_scale, source.calibration_s
        deadline = time.monotonic() + self.scaled(timeout_s)
        while True:
            try:
                self._booted()
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if not self.running or time.monotonic() > deadline:
                    self._fail("the incoming QEMU's QMP socket did not come up")
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """QEMU's exit status once it has exited, else None."""
        return None if self._proc is None else self._proc.poll()

    def _wait_ended(self, limit_s: float) -> int | None:
        try:
            return self._proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            return None

    def _ended_text(self) -> str | None:
        if self._console is not None and self._console.closed:
            # QEMU closes the console a moment before its process ends.
            self._wait_ended(10)
        if self.exit_code is None:
            return None
        return f"QEMU exited with status {self.exit_code}"

    def _machine_text(self) -> str:
        return f"QEMU: {self.command_line_str}"

    def _machine_logs(self) -> dict[str, str]:
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return {"QEMU stderr": stderr}

    def _end_machine(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._proc is not None:
            terminate(self._proc)
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None

    def reboot(self, timeout_s: float | None = None) -> float:
        """Flush the guest's caches, reboot it (``reboot -f``: a machine reset, needs
        ``reboot_resets=True``) and wait for its shell to be ready again; the seconds it took."""
        self.check("sync")
        started = time.monotonic()
        start = self._send_script("reboot -f", secrets.token_hex(8))
        ready = re.compile(re.escape(READY_MARKER) + rb"\r?\n")
        deadline = started + self.scaled(self.boot_timeout_s if timeout_s is None else timeout_s)
        if not self._console.wait_for(ready, start, deadline):
            self._broken = "reboot did not complete"
            self._fail("guest shell not ready again after reboot -f")
        return time.monotonic() - started

    def kill(self) -> None:
        """End QEMU at once (SIGKILL), as a crash would."""
        if self.running:
            self._proc.kill()
            self._proc.wait()
    # --- QMP ---------------------------------------------------------------------------------

    def qmp(self, command: str, arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Run a QMP command; arguments from ``arguments`` (for names with dashes) and keywords."""
        if self._qmp is None:
            raise GuestError("QMP is not connected (guest not started or closed)")
        return self._qmp.execute(command, {**(arguments or {}), **kwargs})

    def wait_qmp_event(
        self, name: str, timeout_s: float = 30.0, match: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Wait for a QMP event (see :meth:`QMPClient.wait_event`)."""
        if self._qmp is None:
            raise GuestError("QMP is not connected (guest not started or closed)")
        return self._qmp.wait_event(name, timeout_s, match)

    def hotplug(self, device: VhostUserDevice) -> VhostUserDevice:
        """Add a vhost-user device to the running guest (chardev-add, device_add); it, with its id."""
        device = self._named(device)
        self.qmp("chardev-add", device.qmp_chardev_add_args())
        try:
            self.qmp("device_add", device.device_properties())
        except QMPError:
            self.qmp("chardev-remove", id=device.chardev_id)
            raise
        self.devices.append(device)
        return device

    def unplug(self, device_id: str, timeout_s: float = 60.0) -> None:
        """Remove a device (device_del), wait until the guest released it, drop its chardev."""
        device = next(dev for dev in self.devices if dev.id == device_id)
        self.qmp("device_del", id=device_id)
        self.wait_qmp_event("DEVICE_DELETED", timeout_s, lambda data: data.get("device") == device_id)
        self.qmp("chardev-remove", id=device.chardev_id)
        self.devices.remove(device)
