"""vhost-user targets the benchmark and the tests start themselves: qemu-storage-daemon exports
(null-co, file), vhostd (any bdev, blk or scsi controller created through its JSON-RPC), and SPDK's
own vhost application when a build of it is on the machine (the speed anchor; never needed by tests).

Each target is a context manager with ``start()``, ``stop()``, ``socket_path``, ``pid`` (for its
CPU use), ``kind`` ("blk" or "scsi") and ``label``.  ``cpus`` pins the target (taskset for QSD,
``-m`` for vhostd).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from .. import _dataplane as dp
from ..dataplane import ReactorSet
from ..vhost.blk import BlkController
from ..vhost.scsi import ScsiController


class TargetError(Exception):
    """A target did not start or did not accept its configuration."""


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """utime + stime of a process (all its threads), or of one of its threads, from /proc."""
    path = "/proc/%d/stat" % pid if tid is None else "/proc/%d/task/%d/stat" % (pid, tid)
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _opt(value: object) -> str:
    """A QEMU option value: commas are doubled."""
    return str(value).replace(",", ",,")


def _cpu_list(cpus: set[int] | list[int] | None) -> str | None:
    return ",".join(str(c) for c in sorted(cpus)) if cpus else None


RBD_ENV = "VHOSTD_BENCH_RBD"


@dataclass(frozen=True)
class RbdSource:
    """An existing RBD image for the rbd targets: ``pool/image``, the Ceph config file (with the
    monitors and ``keyring =``) and the client (no ``client.`` prefix)."""

    pool: str
    image: str
    conf: str
    user: str = "admin"

    @classmethod
    def parse(cls, spec: str | None = None, conf: str | None = None) -> RbdSource:
        """From ``POOL/IMAGE`` (or $VHOSTD_BENCH_RBD) and a config path (or $CEPH_CONF)."""
        spec = spec or os.environ.get(RBD_ENV)
        conf = conf or os.environ.get("CEPH_CONF")
        if not spec or "/" not in spec:
            raise TargetError("rbd targets need the image as POOL/IMAGE: pass --rbd or set %s" % RBD_ENV)
        if not conf:
            raise TargetError("rbd targets need a Ceph config file: pass --ceph-conf or set CEPH_CONF")
        pool, image = spec.split("/", 1)
        return cls(pool, image, conf)


class _Target:
    """A target's working directory (a temporary one unless given) and its lifetime."""

    label = "target"

    def __init__(self, workdir: str | None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="vhd-target-", dir="/tmp")
        self.workdir = Path(workdir or self._tmp.name)

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()          # a target that failed half-way (e.g. an RPC refused) must not linger
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class _Process(_Target):
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, workdir: str | None) -> None:
        super().__init__(workdir)
        self.log_path = self.workdir / ("%s.log" % self.label.replace(" ", "-").replace("/", "-"))
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu_seconds(self) -> float | None:
        """CPU time the target has used so far."""
        return proc_cpu_seconds(self.pid) if self.pid is not None else None

    # A command to run the target under (valgrind …, perf record …): put before the target's own
    # binary, after a ``taskset -c CPUS`` prefix so that the tool is what gets pinned.
    wrapper: list[str] = []

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        if self.wrapper:
            at = 3 if command[0] == "taskset" else 0
            command = command[:at] + list(self.wrapper) + command[at:]
        self.command = command
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_until(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                raise TargetError("%s exited with status %d while %s\n%s"
                                  % (self.label, self.proc.returncode, what, self.log_tail()))
            if time.monotonic() > deadline:
                raise TargetError("%s not ready within %.0f s (%s)\n%s"
                                  % (self.label, timeout_s, what, self.log_tail()))
            time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class QsdTarget(_Process):
    """qemu-storage-daemon exporting a null-co, file or rbd node as vhost-user-blk.

    backend "null": ``null-co`` of size_bytes (reads return whatever the buffer held unless
    read_zeroes).  backend "file": image (created sparse at size_bytes if missing), opened with
    cache.direct=on and the given aio engine.  backend "rbd": the image of ``rbd`` (an RbdSource)
    through QEMU's rbd driver, cache.direct=on (librbd's cache off).
    """

    kind = "blk"

    def __init__(self, backend: str = "null", *, image: str | None = None, size_bytes: int = 1 << 30,
                 num_queues: int = 1, cpus: set[int] | list[int] | None = None,
                 read_zeroes: bool = False, direct: bool = True, aio: str = "io_uring",
                 workdir: str | None = None, binary: str = "qemu-storage-daemon",
                 rbd: RbdSource | None = None) -> None:
        if backend not in ("null", "file", "rbd"):
            raise ValueError("QSD backend is 'null', 'file' or 'rbd'")
        if backend == "rbd" and rbd is None:
            raise ValueError("QSD's rbd backend needs an RbdSource")
        self.label = "qsd-%s" % backend
        super().__init__(workdir)
        self.backend = backend
        self.socket_path = str(self.workdir / ("%s.sock" % self.label))
        self.pid_path = self.workdir / ("%s.pid" % self.label)
        self.image = image or str(self.workdir / "qsd.img")
        self.size_bytes = size_bytes
        self.num_queues = num_queues
        self.cpus = cpus
        self.read_zeroes = read_zeroes
        self.direct = direct
        self.aio = aio
        self.binary = binary
        self.rbd = rbd

    def command_line(self) -> list[str]:
        if self.backend == "null":
            node = "driver=null-co,node-name=disk0,size=%d,read-zeroes=%s" % (
                self.size_bytes, "on" if self.read_zeroes else "off")
        elif self.backend == "rbd":
            node = "driver=rbd,node-name=disk0,pool=%s,image=%s,conf=%s,user=%s,cache.direct=on" % (
                _opt(self.rbd.pool), _opt(self.rbd.image), _opt(self.rbd.conf), _opt(self.rbd.user))
        else:
            node = "driver=file,node-name=disk0,filename=%s,cache.direct=%s,aio=%s" % (
                _opt(self.image), "on" if self.direct else "off", self.aio)
        command = [self.binary, "--blockdev", node,
                   "--export", "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
                   "addr.path=%s,writable=on,num-queues=%d" % (_opt(self.socket_path), self.num_queues),
                   "--pidfile", str(self.pid_path)]
        cpus = _cpu_list(self.cpus)
        return (["taskset", "-c", cpus] if cpus else []) + command

    def start(self, timeout_s: float = 30.0) -> QsdTarget:
        if self.backend == "file" and not os.path.exists(self.image):
            with open(self.image, "wb") as f:
                f.truncate(self.size_bytes)
        for path in (self.socket_path, self.pid_path):
            Path(path).unlink(missing_ok=True)
        self._spawn(self.command_line())
        # QSD writes its pid file once the export listens.
        self._wait_until(lambda: self.pid_path.exists() and os.path.exists(self.socket_path),
                         timeout_s, "waiting for the export socket")
        return self

    def restart(self, timeout_s: float = 30.0) -> None:
        """Stop and start again on the same socket (a back-end restart)."""
        self.stop()
        self.start(timeout_s)


def spdk_rpc(path: str, method: str, params: dict | None = None, timeout_s: float = 10.0):
    """One SPDK JSON-RPC call over a unix socket; returns the result or raises TargetError."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        request["params"] = params
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode())
        buf = b""
        decoder = json.JSONDecoder()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise TargetError("%s closed the RPC connection during %s" % (path, method))
            buf += chunk
            try:
                reply, _ = decoder.raw_decode(buf.decode().lstrip())
                break
            except ValueError:
                continue
    if "error" in reply:
        raise TargetError("%s failed: %s" % (method, reply["error"]))
    return reply.get("result")


def vhostd_command() -> list[str] | None:
    """How to start vhostd here: the console script, or the module, or None if absent."""
    exe = shutil.which("vhostd")
    if exe:
        return [exe]
    if importlib.util.find_spec("vhostd.cli") is not None:
        return [sys.executable, "-m", "vhostd.cli"]
    return None


class VhostdTarget(_Process):
    """vhostd with one bdev (null, malloc, file or rbd) behind one blk or scsi controller.

    The bdev and controller are created through vhostd's SPDK JSON-RPC, as an operator would;
    ``cpus`` becomes the ``-m`` mask (one reactor per core).  An rbd bdev opens the image of
    ``rbd`` (an RbdSource) through a registered cluster with librbd's cache off, as QSD's
    cache.direct=on has it.
    """

    def __init__(self, bdev: str = "null", *, kind: str = "blk", image: str | None = None,
                 size_bytes: int = 1 << 30, block_size: int = 512, cpus=(0,),
                 workdir: str | None = None, extra_args: list[str] | None = None,
                 rbd: RbdSource | None = None, packed_ring: bool = False) -> None:
        if bdev not in ("null", "malloc", "file", "rbd") or kind not in ("blk", "scsi"):
            raise ValueError("bdev is null, malloc, file or rbd; kind is blk or scsi")
        if bdev == "rbd" and rbd is None:
            raise ValueError("an rbd bdev needs an RbdSource")
        self.label = "vhostd-%s-%s" % (kind, bdev)
        self.packed_ring = packed_ring      # blk: created with packed_ring (scsi always offers it)
        super().__init__(workdir)
        self.bdev = bdev
        self.kind = kind
        self.image = image or str(self.workdir / "vhostd.img")
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.cpus = set(cpus)
        self.extra_args = extra_args or []
        self.rbd = rbd
        self.rpc_path = str(self.workdir / "rpc.sock")
        self.ctrlr = "vhd.0"
        self.socket_path = str(self.workdir / self.ctrlr)

    def rpc(self, method: str, params: dict | None = None, timeout_s: float = 10.0):
        return spdk_rpc(self.rpc_path, method, params, timeout_s)

    def start(self, timeout_s: float = 30.0) -> VhostdTarget:
        command = vhostd_command()
        if command is None:
            raise TargetError("vhostd is not installed here")
        mask = sum(1 << c for c in self.cpus)
        self._spawn(command + ["-S", str(self.workdir), "-r", self.rpc_path, "-m", hex(mask)]
                    + self.extra_args)
        self._wait_until(lambda: os.path.exists(self.rpc_path), timeout_s, "waiting for the RPC socket")
        self._create_bdev()
        if self.kind == "blk":
            self.rpc("vhost_create_blk_controller", {"ctrlr": self.ctrlr, "dev_name": "disk0",
                                                     **({"packed_ring": True} if self.packed_ring else {})})
        else:
            self.rpc("vhost_create_scsi_controller", {"ctrlr": self.ctrlr})
            self.rpc("vhost_scsi_controller_add_target",
                     {"ctrlr": self.ctrlr, "scsi_target_num": 0, "bdev_name": "disk0"})
        self._wait_until(lambda: os.path.exists(self.socket_path), timeout_s, "waiting for the controller socket")
        return self

    def _create_bdev(self) -> None:
        blocks = self.size_bytes // self.block_size
        if self.bdev == "null":
            self.rpc("bdev_null_create", {"name": "disk0", "num_blocks": blocks, "block_size": self.block_size})
        elif self.bdev == "malloc":
            self.rpc("bdev_malloc_create", {"name": "disk0", "num_blocks": blocks, "block_size": self.block_size})
        elif self.bdev == "rbd":
            # Connecting and opening take seconds: vhostd answers within 30 s.
            self.rpc("bdev_rbd_register_cluster", {"name": "c0", "user_id": self.rbd.user,
                                                   "config_file": self.rbd.conf,
                                                   "config_param": {"rbd_cache": "false"}}, 40.0)
            self.rpc("bdev_rbd_create", {"name": "disk0", "cluster_name": "c0",
                                         "pool_name": self.rbd.pool, "rbd_name": self.rbd.image,
                                         "block_size": self.block_size}, 40.0)
        else:
            if not os.path.exists(self.image):
                with open(self.image, "wb") as f:
                    f.truncate(self.size_bytes)
            self.rpc("bdev_uring_create", {"name": "disk0", "filename": self.image,
                                           "block_size": self.block_size})


SPDK_ENV = "VHOSTD_BENCH_SPDK"
HUGEPAGE_BYTES = 2 << 20


def find_spdk_vhost(where: str | None = None) -> Path:
    """SPDK's vhost binary: ``where`` (or $VHOSTD_BENCH_SPDK) is the binary itself, an SPDK source
    tree (``build/bin/vhost``), or the directory ``anchors/spdk/build.sh`` built into (``src/...``)."""
    where = where or os.environ.get(SPDK_ENV)
    if not where:
        raise TargetError("SPDK targets need a build of SPDK's vhost app: pass --spdk PATH or set "
                          "%s (see ../shared/anchors/spdk/README.md for the build)" % SPDK_ENV)
    base = Path(where)
    for candidate in (base, base / "build" / "bin" / "vhost", base / "src" / "build" / "bin" / "vhost"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise TargetError("no SPDK vhost binary at %s (nor build/bin/vhost or src/build/bin/vhost under it)" % base)


def free_hugepage_bytes(meminfo: str = "/proc/meminfo") -> int:
    """Free 2 MiB hugepages, in bytes."""
    with open(meminfo) as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1]) * HUGEPAGE_BYTES
    return 0


class SpdkTarget(_Process):
    """SPDK's vhost application with a null or malloc bdev behind one blk or scsi controller, set up
    through its JSON-RPC exactly as VhostdTarget sets up vhostd, so that one run can hold both.

    SPDK takes its memory from 2 MiB hugepages (hugetlbfs on /dev/hugepages); this checks there are
    enough free and says how to add them rather than changing the machine.  Its reactors busy-poll:
    the target uses its whole core even when idle.
    """

    BASE_MEMORY_MIB = 256           # SPDK's own pools besides a malloc bdev's buffer

    def __init__(self, bdev: str = "null", *, kind: str = "blk", size_bytes: int = 1 << 30,
                 block_size: int = 512, cpus=(0,), workdir: str | None = None,
                 spdk: str | None = None) -> None:
        if bdev not in ("null", "malloc") or kind not in ("blk", "scsi"):
            raise ValueError("SPDK targets serve a null or malloc bdev through blk or scsi")
        self.label = "spdk-%s%s" % ("scsi-" if kind == "scsi" else "", bdev)
        super().__init__(workdir)
        self.spdk = spdk
        self.bdev = bdev
        self.kind = kind
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.cpus = sorted(set(cpus))
        self.rpc_path = str(self.workdir / "spdk.sock")
        self.ctrlr = "spdk.0"
        self.socket_path = str(self.workdir / self.ctrlr)

    @property
    def memory_mib(self) -> int:
        buffer_mib = self.size_bytes >> 20 if self.bdev == "malloc" else 0
        return self.BASE_MEMORY_MIB + buffer_mib

    def command_line(self, binary: Path) -> list[str]:
        mask = hex(sum(1 << c for c in self.cpus))
        # -u: no PCI devices (nothing here is an NVMe drive); -s: MiB of hugepage memory to take.
        return ["taskset", "-c", _cpu_list(self.cpus), str(binary), "-S", str(self.workdir), "-m", mask,
                "-u", "-s", str(self.memory_mib), "-r", self.rpc_path]

    def rpc(self, method: str, params: dict | None = None):
        return spdk_rpc(self.rpc_path, method, params)

    def _answers_rpc(self) -> bool:
        try:
            spdk_rpc(self.rpc_path, "spdk_get_version", timeout_s=1.0)
        except (OSError, TargetError):
            return False
        return True

    def start(self, timeout_s: float = 60.0) -> SpdkTarget:
        binary = find_spdk_vhost(self.spdk)
        needed = self.memory_mib << 20
        if free_hugepage_bytes() < needed:
            raise TargetError("SPDK needs %d MiB of free 2 MiB hugepages, the machine has %d MiB: "
                              "echo %d > /proc/sys/vm/nr_hugepages (and hugetlbfs on /dev/hugepages)"
                              % (needed >> 20, free_hugepage_bytes() >> 20, needed // HUGEPAGE_BYTES + 64))
        env = dict(os.environ)
        lib = binary.parent.parent / "lib"         # a shared-library build keeps its .so files here
        if lib.is_dir():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
        self._spawn(self.command_line(binary), env=env)
        self._wait_until(self._answers_rpc, timeout_s, "waiting for its RPC server")
        blocks = self.size_bytes // self.block_size
        create = "bdev_null_create" if self.bdev == "null" else "bdev_malloc_create"
        self.rpc(create, {"name": "disk0", "num_blocks": blocks, "block_size": self.block_size})
        mask = hex(sum(1 << c for c in self.cpus))
        if self.kind == "blk":
            self.rpc("vhost_create_blk_controller", {"ctrlr": self.ctrlr, "dev_name": "disk0", "cpumask": mask})
        else:
            self.rpc("vhost_create_scsi_controller", {"ctrlr": self.ctrlr, "cpumask": mask})
            self.rpc("vhost_scsi_controller_add_target",
                     {"ctrlr": self.ctrlr, "scsi_target_num": 0, "bdev_name": "disk0"})
        self._wait_until(lambda: os.path.exists(self.socket_path), timeout_s, "waiting for the controller socket")
        return self


@dataclass
class _Bdev:
    """What a blk or scsi controller needs of a bdev."""

    name: str
    disk: dp.Disk
    product_name: str = "Disk"
    uuid: uuidlib.UUID = field(default_factory=uuidlib.uuid4)

    def claim(self, holder) -> None:
        pass

    def release(self, holder) -> None:
        pass


class InProcessVhostdTarget(_Target):
    """vhostd's blk or scsi back-end (reactors + one controller on a null or malloc disk, or the given
    Disk) running in this process: an asyncio loop in a thread, reactors pinned to ``cpus``.  Measures vhostd's
    data plane before the vhostd command exists, and serves tests; its CPU use is that of its
    reactor threads."""

    def __init__(self, bdev: str = "null", *, disk=None, cpus=(0,), size_bytes: int = 1 << 30,
                 block_size: int = 512, workdir: str | None = None, kind: str = "blk",
                 packed_ring: bool = False) -> None:
        if bdev not in ("null", "malloc") or kind not in ("blk", "scsi"):
            raise ValueError("in-process vhostd serves a null or malloc disk through blk or scsi")
        self.kind = kind
        self.packed_ring = packed_ring      # blk: offer packed virtqueues (scsi always does)
        self.label = "vhostd-inproc-%s%s" % ("scsi-" if kind == "scsi" else "", bdev)
        blocks = size_bytes // block_size
        if disk is None:
            disk = dp.Disk.null(block_size, blocks) if bdev == "null" else dp.Disk.malloc(block_size, blocks)
        self.disk = disk
        self.cpus = sorted(cpus or (0,))
        super().__init__(workdir)
        self.ctrlr = "vhd.0"
        self.socket_path = os.path.join(self.workdir, self.ctrlr)
        self.pid = None
        self.loop = None

    def start(self) -> InProcessVhostdTarget:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vhostd-inproc", daemon=True)
        self.thread.start()
        self.reactors = ReactorSet(self.cpus)

        async def setup():
            self.reactors.start(self.loop)
            bdev = _Bdev(self.ctrlr + "-disk", self.disk)
            if self.kind == "scsi":
                self.controller = ScsiController(self.ctrlr, str(self.workdir), self.reactors, self.cpus)
                await self.controller.add_target(0, bdev)
            else:
                self.controller = BlkController(self.ctrlr, str(self.workdir), self.reactors, self.cpus, bdev,
                                                packed_ring=self.packed_ring)
            await self.controller.start()

        self._run(setup())
        return self

    def _run(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def cpu_seconds(self) -> float | None:
        total = 0.0
        for reactor in self.reactors.reactors:
            value = proc_cpu_seconds(os.getpid(), reactor.tid) if reactor.tid else None
            if value is None:
                return None
            total += value
        return total

    def stop(self) -> None:
        if self.loop is None:
            return

        async def teardown():
            if getattr(self, "controller", None) is not None:
                await self.controller.stop()
            await self.reactors.stop()

        self._run(teardown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.loop = None


def make_target(spec: str, *, cpus=None, size_bytes: int = 1 << 30, num_queues: int = 1,
                image: str | None = None, direct: bool = True, workdir: str | None = None,
                spdk: str | None = None, rbd: RbdSource | None = None, packed_ring: bool = False):
    """A target from a short name: qsd-null, qsd-file, qsd-rbd, vhostd-null, vhostd-malloc,
    vhostd-file, vhostd-rbd,
    vhostd-scsi-null, vhostd-scsi-malloc, vhostd-scsi-file, vhostd-inproc-null,
    vhostd-inproc-malloc, vhostd-inproc-scsi-null, vhostd-inproc-scsi-malloc, spdk-null, spdk-malloc,
    spdk-scsi-null, spdk-scsi-malloc.  image: the file of file targets (default: a new sparse file of
    size_bytes); direct: QSD's cache.direct; spdk: where SPDK's vhost binary is (find_spdk_vhost);
    rbd: the image of the rbd targets (default: RbdSource.parse() from the environment)."""
    parts = spec.split("-")
    if parts[-1] == "rbd" and rbd is None:
        rbd = RbdSource.parse()
    if parts[0] == "spdk" and len(parts) in (2, 3) and (len(parts) == 2 or parts[1] == "scsi"):
        return SpdkTarget(parts[-1], kind="scsi" if len(parts) == 3 else "blk", cpus=cpus or (0,),
                          size_bytes=size_bytes, workdir=workdir, spdk=spdk)
    if parts[0] == "qsd" and len(parts) == 2:
        return QsdTarget(parts[1], cpus=cpus, size_bytes=size_bytes, num_queues=num_queues,
                         image=image, direct=direct, workdir=workdir, rbd=rbd)
    if parts[:2] == ["vhostd", "inproc"] and len(parts) in (3, 4):
        return InProcessVhostdTarget(parts[-1], cpus=cpus or (0,), size_bytes=size_bytes, workdir=workdir,
                                     kind="scsi" if len(parts) == 4 and parts[2] == "scsi" else "blk",
                                     packed_ring=packed_ring)
    if parts[0] == "vhostd" and len(parts) in (2, 3):
        kind = parts[1] if len(parts) == 3 else "blk"
        return VhostdTarget(parts[-1], kind=kind, cpus=cpus or (0,), size_bytes=size_bytes,
                            image=image, workdir=workdir, rbd=rbd, packed_ring=packed_ring)
    raise ValueError("unknown target %r (qsd-null, qsd-file, vhostd-null, vhostd-scsi-malloc, spdk-null …)" % spec)
