"""vhostd-bench runs briefly against qemu-storage-daemon and reports sane numbers (never speed)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from vhostd.initiator import bench

if shutil.which("qemu-storage-daemon") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("qemu-storage-daemon is required in CI")
    pytest.skip("qemu-storage-daemon is not installed", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {"target", "iops", "mb_per_s", "lat_mean_us", "lat_p50_us", "lat_p99_us", "lat_p999_us",
          "lat_max_us", "client_cpu_pct", "target_cpu_pct", "ops", "errors"}


def run_bench(*args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), *args, "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def check_sane(result):
    assert FIELDS <= set(result)
    assert result["iops"] > 0 and result["ops"] > 0 and result["errors"] == 0
    assert result["mb_per_s"] > 0
    assert 0 < result["lat_p50_us"] <= result["lat_p99_us"] <= result["lat_p999_us"] <= result["lat_max_us"]
    assert result["client_cpu_pct"] > 0 and result["target_cpu_pct"] is not None


def test_bench_reports_sane_numbers_for_qsd_null_co_and_vhostd_side_by_side():
    report = run_bench("--targets", "qsd-null,vhostd-inproc-null", "--time", "1", "--ramp", "0.2",
                       "--size", "64M", "--qd", "8")
    assert report["failures"] == []
    assert [r["target"] for r in report["results"]] == ["qsd-null", "vhostd-inproc-null"]
    for result in report["results"]:
        check_sane(result)


def test_bench_mixed_workload_in_interrupt_mode_on_two_queues():
    report = run_bench("--targets", "qsd-file", "--time", "0.5", "--ramp", "0", "--size", "64M",
                       "--rw", "randrw", "--rwmixread", "50", "--mode", "irq", "--queues", "2",
                       "--qd", "4", "--bs", "8k", "--threads", "2")
    (result,) = report["results"]
    check_sane(result)


def test_table_lists_every_result():
    rows = [bench.Result("a", "blk", 1000.0, 4.1, 1.0, 1.0, 2.0, 3.0, 4.0, 50.0, None, 10, 0, 1.0, 0.1)]
    table = bench.format_table(rows)
    assert "| a " in table and "1000" in table and table.count("\n") == 2


def test_percentile_walks_the_histogram():
    hist = {1: 50, 10: 49, 100: 1}
    assert bench.percentile(hist, 0.5) == 1
    assert bench.percentile(hist, 0.99) == 10
    assert bench.percentile(hist, 0.999) == 100


def test_sizes_and_cpu_lists_parse_like_fio_and_taskset():
    assert bench.parse_size("4k") == 4096 and bench.parse_size("1G") == 1 << 30
    assert bench.parse_size("64KiB") == 65536 and bench.parse_size("512") == 512
    assert bench.parse_cpus("1") == [1] and bench.parse_cpus("0,2-3") == [0, 2, 3]
    assert bench.parse_cpus(None) == []


def test_unreachable_socket_is_reported_as_a_failure(tmp_path, capsys):
    assert bench.main(["--socket", str(tmp_path / "nobody"), "--time", "0.1", "--timeout", "0.2",
                       "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["results"] == [] and "nobody" in report["failures"][0]


def test_a_target_whose_setup_fails_does_not_outlive_the_failure(tmp_path):
    from vhostd.initiator.targets import VhostdTarget
    target = VhostdTarget("file", image=str(tmp_path / "no-such-dir" / "disk.img"))
    with pytest.raises(Exception):
        with target:
            pass
    assert target.proc is None                       # the daemon it started was stopped
