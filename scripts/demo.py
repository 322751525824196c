#!/usr/bin/env python3
"""``make demo``: vhostd serving a real QEMU guest, end to end, in well under a minute.

Starts vhostd with the demo config (``scripts/demo-config.json``; sockets in a new directory under
/tmp), boots the tiny test guest (``build/guest``, made by ``scripts/build-guest.sh``) on every
controller of the config with the QEMU options ``vhostd-rpc attach-qemu`` prints, and lets the
guest's job run (``vhd-demo`` in the guest image): the disks it sees, a pattern written and read back
on each with O_DIRECT, then timed 4 KiB random reads on all disks at once. vhostd's own counters
(``bdev_get_iostat``, ``vhost_get_queue_stats``) are read right before and after that job for the
host's side of the IOPS. Then QEMU (the guest powers off) and vhostd (SIGTERM) are stopped.

The exit status is 0 only if every step worked: the guest saw every disk at its bdev's size, each
disk held what was written (a null disk: reads leave the buffer untouched), every job and every controller moved I/O, and both
processes ended cleanly. On a failure the tails of the guest's console and of vhostd's log are
printed and the work directory is kept.

usage: scripts/demo.py [--guest DIR] [--config FILE] [--job-ms MS] [--timeout-s S]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from vhostd.attach import controller_kind, qemu_device_options, qemu_memory_options  # noqa: E402
from vhostd.rpc.client import RpcCallError, call_unix  # noqa: E402

GUEST_MEMORY_MIB = 512
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 vhd.demo=1"
STOP_GRACE_S = 20.0
TAIL_CHARS = 4000

DISK_LINE = re.compile(r"vhd-demo: disk (\S+) size_bytes=(\d+) hctl=(\S+) serial=(\S+) model=(.*)")
VERIFY_LINE = re.compile(r"vhd-demo: verify (\S+) wrote=(\S+) expect=(\S+) result=(.*)")
JOB_LINE = re.compile(r"vhd-demo: job (\S+) ops=(\d+) bytes=(\d+) ms=(\d+) iops=(\d+)")
JOB_FAILED_LINE = re.compile(r"vhd-demo: job (\S+) failed: (.*)")
JOB_READY_LINE = "vhd-demo: job-ready"
DONE_LINE = re.compile(r"vhd-demo: done failures=(\d+)")


class DemoError(Exception):
    """A step of the demo did not work; the message says which."""


class Interrupted(DemoError):
    """SIGTERM, SIGINT or SIGHUP: the demo stops everything it started and fails."""


@dataclasses.dataclass
class GuestDisk:
    """One disk as the guest reported it."""

    name: str
    size_bytes: int
    hctl: str
    serial: str
    model: str
    wrote: str = ""
    expect: str = ""
    check: str = ""
    iops: int | None = None
    job_ms: int | None = None
    job_error: str = ""

    @property
    def verified(self) -> bool:
        return self.check.startswith("ok ")

    @property
    def scsi_target(self) -> int | None:
        return int(self.hctl.split(":")[2]) if self.hctl != "-" else None


@dataclasses.dataclass
class GuestReport:
    """What the guest's ``vhd-demo`` job printed, line by line."""

    disks: dict[str, GuestDisk] = dataclasses.field(default_factory=dict)
    job_ready: bool = False
    failures: int | None = None

    def feed(self, line: str) -> None:
        if match := DISK_LINE.fullmatch(line):
            name, size, hctl, serial, model = match.groups()
            self.disks[name] = GuestDisk(name, int(size), hctl, serial, model)
        elif match := VERIFY_LINE.fullmatch(line):
            disk = self.disks[match[1]]
            disk.wrote, disk.expect, disk.check = match[2], match[3], match[4]
        elif match := JOB_LINE.fullmatch(line):
            disk = self.disks[match[1]]
            disk.iops, disk.job_ms = int(match[5]), int(match[4])
        elif match := JOB_FAILED_LINE.fullmatch(line):
            self.disks[match[1]].job_error = match[2]
        elif line == JOB_READY_LINE:
            self.job_ready = True
        elif match := DONE_LINE.fullmatch(line):
            self.failures = int(match[1])


@dataclasses.dataclass(frozen=True)
class Counters:
    """vhostd's counters at one moment: ops and bytes per bdev and per controller."""

    at: float
    bdev_ops: dict[str, int]
    controller_ops: dict[str, int]
    controller_bytes: dict[str, tuple[int, int]]

    @classmethod
    def read(cls, rpc_socket: str) -> Counters:
        iostat = call_unix(rpc_socket, "bdev_get_iostat")
        queues = call_unix(rpc_socket, "vhost_get_queue_stats")
        at = time.monotonic()
        bdev_ops = {b["name"]: b["num_read_ops"] + b["num_write_ops"] for b in iostat["bdevs"]}
        controller_ops, controller_bytes = {}, {}
        for c in queues["controllers"]:
            controller_ops[c["ctrlr"]] = sum(q["read_ops"] + q["write_ops"] for q in c["queues"])
            controller_bytes[c["ctrlr"]] = (sum(q["bytes_read"] for q in c["queues"]),
                                            sum(q["bytes_written"] for q in c["queues"]))
        return cls(at, bdev_ops, controller_ops, controller_bytes)


class Console:
    """QEMU's serial output, line by line, from a reader thread; everything is kept for the log."""

    def __init__(self, stream, log_path: Path) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._log = open(log_path, "w")
        self._text: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self._text.append(line)
            self._log.write(line + "\n")
            self._log.flush()
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next line; None once QEMU closed the console. DemoError at the deadline."""
        try:
            return self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DemoError("the guest printed nothing more before the time limit") from None

    def tail(self) -> str:
        return "\n".join(self._text)[-TAIL_CHARS:]

    def close(self) -> None:
        self._thread.join(timeout=5)
        self._log.close()


def say(text: str) -> None:
    print(text, flush=True)


def mib(size_bytes: int) -> str:
    return "%g MiB" % (size_bytes / (1 << 20))


def stop(proc: subprocess.Popen | None, what: str) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within the grace time; its exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            say("[host] %s (pid %d) ignored SIGTERM for %g s: killed" % (what, proc.pid, STOP_GRACE_S))
            proc.kill()
            proc.wait()
    return proc.returncode


def on_signal(signum: int, _frame) -> None:
    raise Interrupted("stopped by %s" % signal.Signals(signum).name)


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="vhd-demo-"))
        self.socket_dir = self.workdir / "sockets"
        self.socket_dir.mkdir()
        self.rpc_socket = str(self.workdir / "spdk.sock")
        self.vhostd_log = self.workdir / "vhostd.log"
        self.vhostd: subprocess.Popen | None = None
        self.qemu: subprocess.Popen | None = None
        self.console: Console | None = None
        self.report = GuestReport()
        self.controllers: list[dict] = []
        self.bdev_sizes: dict[str, int] = {}

    def remaining_s(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoError("the demo ran out of its %g s" % self.args.timeout_s)
        return left

    def start_vhostd(self) -> None:
        command = [sys.executable, "-m", "vhostd.cli", "-S", str(self.socket_dir), "-r", self.rpc_socket,
                   "-m", "0x1", "--json", str(self.args.config)]
        notify_path = self.workdir / "notify.sock"
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        say("[host] vhostd: %s" % shlex.join(command))
        started = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(self.vhostd_log, "wb") as log:
            notify.bind(str(notify_path))
            self.vhostd = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT)
            say("[host] vhostd pid %d, log %s" % (self.vhostd.pid, self.vhostd_log))
            self.wait_ready(notify)
        say("[host] vhostd ready in %.1f s (READY=1 on NOTIFY_SOCKET)" % (time.monotonic() - started))

    def wait_ready(self, notify: socket.socket) -> None:
        """Until vhostd sends READY=1: its RPC socket listens and the config's controllers are up."""
        while True:
            if self.vhostd.poll() is not None:
                raise DemoError("vhostd exited with status %d while starting" % self.vhostd.returncode)
            notify.settimeout(min(0.5, self.remaining_s()))
            try:
                message = notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in message.splitlines():
                return

    def read_config(self) -> None:
        self.controllers = call_unix(self.rpc_socket, "vhost_get_controllers")
        kinds = sorted({controller_kind(c) for c in self.controllers})
        if kinds != ["blk", "scsi"]:
            raise DemoError("the demo config should have blk and scsi controllers; it has %s" % kinds)
        self.bdev_sizes = {b["name"]: b["num_blocks"] * b["block_size"]
                           for b in call_unix(self.rpc_socket, "bdev_get_bdevs")}
        for c in self.controllers:
            say("[host] controller %s: %s" % (c["ctrlr"], describe(c)))

    def expected_disks(self) -> int:
        return sum(len(c["backend_specific"]["scsi"]) if controller_kind(c) == "scsi" else 1
                   for c in self.controllers)

    def start_qemu(self) -> None:
        guest = self.args.guest
        cmdline = "%s vhd.demo_disks=%d vhd.demo_job_ms=%d" % (KERNEL_CMDLINE, self.expected_disks(),
                                                               self.args.job_ms)
        # Shared guest RAM and one disk per controller: what `vhostd-rpc attach-qemu` prints.
        parts = [["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-nodefaults",
                  "-nographic", "-no-reboot", "-serial", "stdio"],
                 ["-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initramfs.cpio.gz")],
                 ["-append", cmdline],
                 qemu_memory_options(GUEST_MEMORY_MIB),
                 *(qemu_device_options(c) for c in self.controllers)]
        say("[host] QEMU (memory and disk options as `vhostd-rpc attach-qemu` prints them):")
        say(" \\\n".join("       " + shlex.join(part) for part in parts))
        command = [word for part in parts for word in part]
        self.qemu_stderr = open(self.workdir / "qemu.stderr", "wb")
        self.qemu = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.qemu_stderr)
        self.console = Console(self.qemu.stdout, self.workdir / "console.log")
        say("[host] QEMU pid %d: booting the guest under TCG (emulated CPU: several seconds)" % self.qemu.pid)

    def run_guest(self) -> tuple[Counters, Counters]:
        """Stream the guest's report; read vhostd's counters around its timed job."""
        booted = time.monotonic()
        before = after = None
        while (line := self.console.next_line(self.deadline)) is not None:
            # The firmware's terminal resets can share a line with the guest's first report.
            start = line.find("vhd-demo: ")
            if start < 0:
                continue
            line = line[start:]
            say("  guest| " + line)
            self.report.feed(line)
            if line == JOB_READY_LINE:
                before = Counters.read(self.rpc_socket)
                try:
                    self.qemu.stdin.write(b"go\n")
                    self.qemu.stdin.flush()
                except BrokenPipeError:
                    raise DemoError("QEMU ended before the guest's job could start") from None
            elif self.report.failures is not None:
                after = Counters.read(self.rpc_socket)
        if after is None or before is None:
            raise DemoError("QEMU ended before the guest's job finished (status %s)" % self.qemu.wait())
        try:
            status = self.qemu.wait(self.remaining_s())
        except subprocess.TimeoutExpired:
            raise DemoError("the guest finished its job but did not power off in time") from None
        if status != 0:
            raise DemoError("QEMU exited with status %d" % status)
        say("[host] the guest powered off; QEMU exited 0, %.1f s after it started" % (time.monotonic() - booted))
        return before, after

    def disk_bdev(self, disk: GuestDisk) -> tuple[str, str]:
        """The controller (and target) a guest disk is attached to, and its bdev."""
        for c in self.controllers:
            if controller_kind(c) == "blk" and disk.scsi_target is None and \
                    disk.serial in ("-", c["backend_specific"]["block"]["bdev"]):
                return "%s (blk)" % c["ctrlr"], c["backend_specific"]["block"]["bdev"]
            if controller_kind(c) == "scsi" and disk.scsi_target is not None:
                for target in c["backend_specific"]["scsi"]:
                    if target["scsi_dev_num"] == disk.scsi_target:
                        return "%s target %d" % (c["ctrlr"], disk.scsi_target), target["luns"][0]["bdev_name"]
        raise DemoError("guest disk %s (%s) matches no controller" % (disk.name, disk.model))

    def summarize(self, before: Counters, after: Counters) -> list[str]:
        """Print the tables; the problems found (none: the demo worked)."""
        problems = []
        if self.report.failures:
            problems.append("the guest's job counted %d failures" % self.report.failures)
        if len(self.report.disks) != self.expected_disks():
            problems.append("the guest saw %d disks, the config has %d" % (len(self.report.disks),
                                                                          self.expected_disks()))
        seconds = after.at - before.at
        say("\nWhat the guest saw (vhd-demo in the guest: sysfs, then vhd-pattern with O_DIRECT)")
        rows = [("disk", "attached to", "bdev", "size", "model", "wrote, read back (4 MiB)")]
        jobs = [("disk", "guest IOPS", "host IOPS (bdev_get_iostat)")]
        for disk in self.report.disks.values():
            where, bdev = self.disk_bdev(disk)
            read_back = "buffer unchanged (null disk)" if disk.expect == "zero" else "pattern %s" % disk.expect
            rows.append((disk.name, where, bdev, mib(disk.size_bytes), disk.model, "pattern %s, %s: %s" % (
                disk.wrote, read_back, "verified" if disk.verified else "FAILED " + disk.check)))
            host_iops = (after.bdev_ops[bdev] - before.bdev_ops[bdev]) / seconds
            jobs.append((disk.name, str(disk.iops) if disk.iops is not None else "FAILED " + disk.job_error,
                         "%.0f" % host_iops))
            if disk.size_bytes != self.bdev_sizes[bdev]:
                problems.append("%s is %d bytes in the guest, %s has %d" % (disk.name, disk.size_bytes, bdev,
                                                                           self.bdev_sizes[bdev]))
            if not disk.verified:
                problems.append("%s: the data read back is not what was written (%s)" % (disk.name, disk.check))
            if not disk.iops or host_iops <= 0:
                problems.append("%s: no I/O in the timed job" % disk.name)
        table(rows)
        job_s = max((d.job_ms or 0) for d in self.report.disks.values()) / 1000
        say("\nRandom 4 KiB reads, O_DIRECT, one at a time per disk, all disks at once: %.1f s in the guest, "
            "%.1f s between the host's counter reads" % (job_s, seconds))
        table(jobs)
        say("\nvhostd per controller (vhost_get_queue_stats): the job, and all since the guest connected")
        ctrl_rows = [("controller", "job IOPS", "MiB read", "MiB written")]
        for c in self.controllers:
            name = c["ctrlr"]
            iops = (after.controller_ops[name] - before.controller_ops[name]) / seconds
            read, written = after.controller_bytes[name]
            ctrl_rows.append((name, "%.0f" % iops, "%.1f" % (read / (1 << 20)), "%.1f" % (written / (1 << 20))))
            if iops <= 0:
                problems.append("controller %s served no I/O in the job" % name)
        table(ctrl_rows)
        return problems

    def close(self) -> list[str]:
        """Stop QEMU and vhostd; the problems stopping them."""
        problems = []
        if self.qemu is not None and self.qemu.poll() is None:
            say("[host] stopping QEMU (pid %d)" % self.qemu.pid)
            stop(self.qemu, "QEMU")
        if self.console is not None:
            self.console.close()
        if self.qemu is not None:
            self.qemu_stderr.close()
        if self.vhostd is not None:
            say("[host] stopping vhostd (pid %d): SIGTERM" % self.vhostd.pid)
            status = stop(self.vhostd, "vhostd")
            if status != 0:
                problems.append("vhostd exited with status %s" % status)
            else:
                say("[host] vhostd exited 0")
        return problems

    def failure_report(self) -> None:
        if self.console is not None:
            say("\n--- the guest's console (tail; all of it in %s) ---\n%s" % (self.workdir / "console.log",
                                                                           self.console.tail()))
        qemu_stderr = self.workdir / "qemu.stderr"
        if qemu_stderr.exists() and qemu_stderr.stat().st_size:
            say("--- QEMU's stderr ---\n%s" % qemu_stderr.read_text(errors="replace")[-TAIL_CHARS:])
        if self.vhostd_log.exists():
            say("--- vhostd's log (tail; all of it in %s) ---\n%s" % (
                self.vhostd_log, self.vhostd_log.read_text(errors="replace")[-TAIL_CHARS:]))
        say("--- the work directory is kept: %s ---" % self.workdir)


def describe(info: dict) -> str:
    if controller_kind(info) == "blk":
        return "blk on %s" % info["backend_specific"]["block"]["bdev"]
    return "scsi, " + ", ".join("target %d %s" % (t["scsi_dev_num"], t["luns"][0]["bdev_name"])
                                for t in info["backend_specific"]["scsi"])


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        say("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", type=Path, default=REPO_ROOT / "build" / "guest",
                    help="the guest image directory (scripts/build-guest.sh DIR)")
    ap.add_argument("--config", type=Path, default=REPO_ROOT / "scripts" / "demo-config.json",
                    help="vhostd's config: blk and scsi controllers")
    ap.add_argument("--job-ms", type=int, default=2000, help="length of the guest's timed random-read job")
    ap.add_argument("--timeout-s", type=float, default=240.0,
                    help="the whole run's limit (TCG is slow, and slower on a busy host)")
    args = ap.parse_args(argv)
    args.guest = args.guest.resolve()
    args.config = args.config.resolve()
    for path in (args.guest / "vmlinuz", args.guest / "initramfs.cpio.gz", args.config):
        if not path.is_file():
            ap.error("%s is missing (make guest builds the guest)" % path)
    if shutil.which("qemu-system-x86_64") is None:
        ap.error("qemu-system-x86_64 not found: scripts/install-system-deps.sh installs it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    say("vhostd demo: vhostd with %s, a QEMU guest on its blk and scsi controllers" % args.config.name)
    demo = Demo(args)
    problems = []
    try:
        demo.start_vhostd()
        demo.read_config()
        demo.start_qemu()
        before, after = demo.run_guest()
        problems = demo.summarize(before, after)
    except (DemoError, RpcCallError, OSError) as exc:
        problems = [str(exc) if isinstance(exc, DemoError) else "%s: %s" % (type(exc).__name__, exc)]
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        problems += demo.close()
    if problems:
        demo.failure_report()
        say("\ndemo FAILED after %.1f s:\n  %s" % (time.monotonic() - started, "\n  ".join(problems)))
        return 1
    shutil.rmtree(demo.workdir, ignore_errors=True)
    say("\ndemo OK in %.1f s" % (time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
