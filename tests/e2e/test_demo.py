"""`make demo` as a user runs it: vhostd with the demo config, a real QEMU guest on its blk and scsi
controllers, the guest's report and IOPS on both sides, and nothing left running afterwards.

The test runs the real `make demo` when the virtualenv it runs in is up to date for this checkout
(as under `make test`); otherwise `make` would rebuild that virtualenv, so it runs the command the
target's recipe ends with, as `make -n` prints it, which is the same program with the same args.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "scripts" / "demo-config.json"
VENV = Path(sys.prefix)
DEMO_TIMEOUT_S = 600
PATTERN_BYTES = 4 << 20


def make(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(REPO_ROOT), "--no-print-directory", f"VENV={VENV}", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)


def demo_recipe_command() -> list[str]:
    """The command the `demo` target's recipe ends with, as `make -n demo` prints it."""
    dry_run = make("-n", "demo")
    assert dry_run.returncode == 0, dry_run.stderr
    return shlex.split(dry_run.stdout.strip().splitlines()[-1])


def venv_is_current() -> bool:
    """Whether `make demo` would leave the virtualenv alone (`make -q` on its stamp)."""
    return make("-q", f"{VENV}/.installed").returncode == 0


def expected_disks() -> dict[str, tuple[str, int]]:
    """From the demo config: controller and target -> (bdev, size in bytes), keyed as the guest's
    report locates a disk: "blk" for the virtio-blk disk, "scsi:T" for SCSI target T."""
    entries = [e for s in json.loads(DEMO_CONFIG.read_text())["subsystems"] for e in s["config"]]
    sizes = {e["params"]["name"]: e["params"]["num_blocks"] * e["params"]["block_size"]
             for e in entries if e["method"] in ("bdev_malloc_create", "bdev_null_create")}
    disks = {}
    for e in entries:
        if e["method"] == "vhost_create_blk_controller":
            disks["blk"] = (e["params"]["dev_name"], sizes[e["params"]["dev_name"]])
        elif e["method"] == "vhost_scsi_controller_add_target":
            bdev = e["params"]["bdev_name"]
            disks["scsi:%d" % e["params"]["scsi_target_num"]] = (bdev, sizes[bdev])
    return disks


def process_gone(pid: int, name: str) -> bool:
    """No process `pid` running `name` (a recycled pid running something else counts as gone)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True
    return name.encode() not in cmdline


def test_make_demo_shows_the_guests_disks_verified_and_iops_then_stops_everything(guest_image):
    recipe = demo_recipe_command()
    assert recipe[:2] == [f"{VENV}/bin/python", "scripts/demo.py"], recipe
    command = ["make", "-C", str(REPO_ROOT), f"VENV={VENV}", "demo"] if venv_is_current() else recipe
    print("running:", shlex.join(command))
    result = subprocess.run(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=DEMO_TIMEOUT_S)
    out = result.stdout
    print(out, result.stderr)
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert re.search(r"^demo OK in [\d.]+ s$", out, re.M)

    disks = {m[1]: (int(m[2]), m[3]) for m in re.finditer(
        r"^  guest\| vhd-demo: disk (\S+) size_bytes=(\d+) hctl=(\S+) ", out, re.M)}
    located = {}
    for name, (size_bytes, hctl) in disks.items():
        key = "blk" if hctl == "-" else "scsi:%s" % hctl.split(":")[2]
        located[key] = name
        bdev, want_size = expected_disks()[key]
        assert size_bytes == want_size, (name, bdev)
        want = "zero" if bdev.startswith("Null") else r"\d+"
        assert re.search(rf"^  guest\| vhd-demo: verify {name} wrote=\d+ expect={want} result=ok {PATTERN_BYTES}$",
                         out, re.M), name
        row = re.search(rf"^  {name} +\S+ (?:\(blk\)|target \d) +{bdev} +(\d+) MiB +.*: verified$", out, re.M)
        assert row and int(row[1]) << 20 == want_size, name
        guest_iops, host_iops = re.search(rf"^  {name} +(\d+) +(\d+)$", out, re.M).groups()
        assert int(guest_iops) > 0 and int(host_iops) > 0, name
    assert sorted(located) == sorted(expected_disks()), disks
    assert located["blk"].startswith("vd") and all(located[k].startswith("sd") for k in located if k != "blk")
    for ctrlr in ("vhost.0", "vhost.1"):
        job_iops, mib_read, mib_written = re.search(rf"^  {re.escape(ctrlr)} +(\d+) +([\d.]+) +([\d.]+)$", out, re.M).groups()
        assert int(job_iops) > 0 and float(mib_read) > 0 and float(mib_written) > 0, ctrlr

    pids = dict(re.findall(r"^\[host\] (vhostd|QEMU) pid (\d+)", out, re.M))
    assert set(pids) == {"vhostd", "QEMU"}, out
    assert process_gone(int(pids["vhostd"]), "vhostd") and process_gone(int(pids["QEMU"]), "qemu-system")


def test_demo_fails_with_vhostds_log_when_the_config_lacks_a_scsi_controller(guest_image, tmp_path):
    config = json.loads(DEMO_CONFIG.read_text())
    config["subsystems"] = [s for s in config["subsystems"] if s["subsystem"] != "vhost_scsi"]
    path = tmp_path / "blk-only.json"
    path.write_text(json.dumps(config))
    recipe = demo_recipe_command()
    result = subprocess.run([*recipe[:2], "--config", str(path)], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 1, out
    assert "demo FAILED" in out and "should have blk and scsi controllers; it has ['blk']" in out
    assert "--- vhostd's log" in out and "vhostd ready" in out
    work = re.search(r"^--- the work directory is kept: (\S+) ---$", out, re.M)[1]
    pid = int(re.search(r"^\[host\] vhostd pid (\d+)", out, re.M)[1])
    assert process_gone(pid, "vhostd") and "QEMU pid" not in out
    shutil.rmtree(work)
