"""A one-node Ceph cluster for tests: mon, mgr and one bluestore OSD on a sparse file, loopback only.

Everything lives in one directory (config, keyring, daemon data, logs, admin sockets): nothing is
read from or written to /etc/ceph and no systemd unit runs.  ``CephCluster.start()`` returns once
the OSD is up and every PG of the test pool is active; failures carry the daemons' log tails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.helpers.ports import free_tcp_port
from tests.helpers.waiting import wait_for

DAEMON_BINARIES = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "ceph-mgr": "ceph-mgr",
                   "ceph": "ceph-common", "rbd": "ceph-common", "monmaptool": "ceph-base",
                   "ceph-authtool": "ceph-common"}
POOL = "rbd"
START_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 60.0


def missing_tools() -> list[str]:
    """The Ceph programs this helper needs that are not installed, with their Debian package."""
    return ["%s (package %s)" % (tool, pkg) for tool, pkg in DAEMON_BINARIES.items()
            if shutil.which(tool) is None]


class CephError(Exception):
    pass


class CephCluster:
    """mon ``a``, mgr ``x`` and ``osd.0`` under ``workdir``; the client is ``client.admin``."""

    def __init__(self, workdir: Path, osd_size_bytes: int = 4 << 30) -> None:
        self.dir = Path(workdir)
        self.conf = self.dir / "ceph.conf"
        self.keyring = self.dir / "keyring"
        self.osd_size_bytes = osd_size_bytes
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.mon_port_v2 = free_tcp_port()
        self.mon_port_v1 = free_tcp_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        self.pool = POOL
        self.start_seconds: float | None = None

    # -- addresses and credentials a client needs -------------------------------------------------
    @property
    def mon_host(self) -> str:
        return "[v2:127.0.0.1:%d,v1:127.0.0.1:%d]" % (self.mon_port_v2, self.mon_port_v1)

    def admin_key(self) -> str:
        out = self._run(["ceph-authtool", str(self.keyring), "-n", "client.admin", "-p"])
        return out.strip()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout_s: float = START_TIMEOUT_S) -> CephCluster:
        t0 = time.monotonic()
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "mgr/ceph-x"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        self._make_keyring()
        self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                   self.mon_host, str(self.dir / "monmap")])
        # The OSD's store needs no monitor: make it while the mon's is made and started.
        osd_mkfs = subprocess.Popen(
            ["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._run(["ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs",
                   "--monmap", str(self.dir / "monmap"), "--keyring", str(self.keyring)])
        self._spawn("mon.a", ["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"])
        out, _ = osd_mkfs.communicate(timeout=COMMAND_TIMEOUT_S)
        if osd_mkfs.returncode != 0:
            raise CephError("ceph-osd --mkfs failed (%d):\n%s%s" % (osd_mkfs.returncode, out,
                                                                  self.log_tails()))
        self.ceph("osd", "new", self.osd_uuid, "0")
        self.ceph("osd", "crush", "add", "osd.0", "0.02", "host=vhostd-test", "root=default")
        self._spawn("osd.0", ["ceph-osd", "-f", "-c", str(self.conf), "-i", "0"])
        self._spawn("mgr.x", ["ceph-mgr", "-f", "-c", str(self.conf), "-i", "x"])
        self.ceph("osd", "pool", "create", self.pool, "32")
        self.ceph("osd", "pool", "application", "enable", self.pool, "rbd")
        remaining = timeout_s - (time.monotonic() - t0)
        self._wait(self._pool_active, max(remaining, 1.0), "the OSD up and every PG active")
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        # OSD first: one whose monitor is gone waits 5 s before it exits.
        for name in ("osd.0", "mgr.x", "mon.a"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- faults (tests that break a cluster use one of their own, never the session's) -------------
    def kill(self, name: str) -> None:
        """SIGKILL one daemon (``osd.0``, ``mon.a``, ``mgr.x``) and reap it."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def restart(self, name: str) -> None:
        """Start a daemon that was killed or stopped again, with its command line and data."""
        if name in self.procs and self.procs[name].poll() is None:
            raise CephError("%s is still running" % name)
        self._spawn(name, self.commands[name])

    def start_again(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """After stop(): the mon, the OSD and the mgr from their data; returns once every PG is
        active again."""
        for name in ("mon.a", "osd.0", "mgr.x"):
            self.restart(name)
        self.wait_active(timeout_s)

    def wait_active(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the OSD is up and every PG of the pool active (after restart())."""
        self._wait(self._pool_active, timeout_s, "the OSD up and every PG active")

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- commands ---------------------------------------------------------------------------------
    def ceph(self, *args: str, json_out: bool = False):
        """The ``ceph`` CLI against this cluster; its parsed JSON output with json_out."""
        cmd = ["ceph", "-c", str(self.conf), *args]
        if json_out:
            cmd += ["-f", "json"]
        out = self._run(cmd)
        return json.loads(out) if json_out else out

    def rbd(self, *args: str, binary: bool = False):
        """The ``rbd`` CLI against this cluster (stdout as bytes with binary)."""
        return self._run(["rbd", "-c", str(self.conf), *args], binary=binary)

    def create_image(self, name: str, size_bytes: int) -> None:
        self.rbd("create", "--size", "%dB" % size_bytes, "%s/%s" % (self.pool, name))

    def remove_image(self, name: str) -> None:
        self.rbd("rm", "--no-progress", "%s/%s" % (self.pool, name))

    def image_size(self, name: str) -> int:
        return json.loads(self.rbd("info", "--format", "json", "%s/%s" % (self.pool, name)))["size"]

    def export_image(self, name: str) -> bytes:
        """The image's bytes as ``rbd export`` reads them."""
        return self.rbd("export", "--no-progress", "%s/%s" % (self.pool, name), "-", binary=True)

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every daemon's log (and its console output), for failure messages."""
        parts = []
        for path in sorted((self.dir / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append("--- %s ---\n%s" % (path.name, "\n".join(text)))
        return "\n" + "\n".join(parts)

    # -- internals --------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        d = self.dir
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon_host = {self.mon_host}
public_addr = 127.0.0.1
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = {self.keyring}
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
mon_data = {d}/mon/$cluster-$id
osd_data = {d}/osd/$cluster-$id
mgr_data = {d}/mgr/$cluster-$id
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mgr_stats_period = 1
mon_mgr_digest_period = 1
paxos_propose_interval = 0.2
objecter_tick_interval = 1
osd_objectstore = bluestore
osd_crush_update_on_start = false
bluestore_block_create = true
bluestore_block_size = {self.osd_size_bytes}
bluestore_debug_enforce_settings = ssd
bluestore_rocksdb_options_annex = write_buffer_size=16777216,max_total_wal_size=67108864
""")

    def _make_keyring(self) -> None:
        kr = str(self.keyring)
        entities = [
            ("mon.", ["--cap", "mon", "allow *"]),
            ("client.admin", ["--cap", "mon", "allow *", "--cap", "osd", "allow *",
                              "--cap", "mgr", "allow *", "--cap", "mds", "allow *"]),
            ("osd.0", ["--cap", "mon", "allow profile osd", "--cap", "mgr", "allow profile osd",
                       "--cap", "osd", "allow *"]),
            ("mgr.x", ["--cap", "mon", "allow profile mgr", "--cap", "osd", "allow *",
                       "--cap", "mds", "allow *"]),
        ]
        for i, (name, caps) in enumerate(entities):
            create = ["--create-keyring"] if i == 0 else []
            self._run(["ceph-authtool", kr, *create, "--gen-key", "-n", name, *caps])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.commands[name] = cmd
        console = open(self.dir / "log" / ("%s.console" % name), "a")
        self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        console.close()

    def _pool_active(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise CephError("%s exited with %s%s" % (name, proc.returncode, self.log_tails()))
        status = self.ceph("status", json_out=True)
        if status["osdmap"].get("num_up_osds", 0) < 1:
            return False
        pgmap = status["pgmap"]
        active = sum(s["count"] for s in pgmap.get("pgs_by_state", [])
                     if s["state_name"].startswith("active"))
        return pgmap.get("num_pgs", 0) > 0 and active == pgmap["num_pgs"]

    def _wait(self, predicate, timeout_s: float, what: str) -> None:
        try:
            wait_for(predicate, timeout=timeout_s, interval=0.25)
        except TimeoutError:
            raise CephError("cluster: %s not reached within %.0f s%s"
                            % (what, timeout_s, self.log_tails())) from None

    def _run(self, cmd: list[str], binary: bool = False):
        env = dict(os.environ, CEPH_CONF=str(self.conf))
        try:
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                    text=not binary, timeout=COMMAND_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            raise CephError("%s timed out after %.0f s%s" % (" ".join(cmd), COMMAND_TIMEOUT_S,
                                                           self.log_tails())) from None
        if result.returncode != 0:
            err = result.stderr if not binary else result.stderr.decode(errors="replace")
            raise CephError("%s failed (%d): %s%s" % (" ".join(cmd), result.returncode, err,
                                                     self.log_tails()))
        return result.stdout
