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


def test_rounds_alternate_the_order_and_summarize_ratios_to_the_first_target():
    report = run_bench("--targets", "vhostd-inproc-null,qsd-null", "--rounds", "3", "--time", "0.3",
                       "--ramp", "0", "--size", "64M", "--qd", "4")
    assert report["failures"] == []
    order = [(r["round"], r["target"]) for r in report["results"]]
    assert order == [(1, "vhostd-inproc-null"), (1, "qsd-null"), (2, "qsd-null"),
                     (2, "vhostd-inproc-null"), (3, "vhostd-inproc-null"), (3, "qsd-null")]
    base, other = report["summary"]
    assert base["target"] == "vhostd-inproc-null" and base["rounds"] == 3
    assert base["iops_ratio"] == {"median": 1.0, "low": 1.0, "high": 1.0}
    per_round = {}
    for r in report["results"]:
        per_round.setdefault(r["round"], {})[r["target"]] = r["iops"]
    ratios = sorted(rs["qsd-null"] / rs["vhostd-inproc-null"] for rs in per_round.values())
    assert other["iops_ratio"] == pytest.approx({"median": ratios[1], "low": ratios[0], "high": ratios[2]})
    assert other["iops"]["low"] <= other["iops"]["median"] <= other["iops"]["high"]


def test_summary_spreads_and_the_cpu_floor():
    def result(target, rnd, iops, lat, cpu):
        return bench.Result(target, "blk", iops, 1.0, lat, 1, 1, 1, 1, 50.0, cpu, 10, 0, 1.0, 0.1, rnd)
    rows = [result("a", 1, 100, 2.0, 99.0), result("b", 1, 150, 1.0, 100.0),
            result("a", 2, 200, 1.0, 98.0), result("b", 2, 200, 1.0, 90.0)]
    a, b = bench.summarize_rounds(rows, ["a", "b"])
    assert (a.iops.median, a.iops.low, a.iops.high) == (150, 100, 200)
    assert (b.iops_ratio.median, b.iops_ratio.low, b.iops_ratio.high) == (1.25, 1.0, 1.5)
    assert (b.lat_ratio.low, b.lat_ratio.high) == (0.5, 1.0)
    assert a.rounds_below_cpu_floor == [] and b.rounds_below_cpu_floor == [2]
    text = bench.format_summary([a, b])
    assert "IOPS / a" in text and "1.25 (1.00–1.50)" in text
    assert bench.rotated(["x", "y", "z"], 1) == ["y", "z", "x"] and bench.rotated(["x"], 5) == ["x"]


def test_spdk_targets_say_what_they_need_when_spdk_is_not_there(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("VHOSTD_BENCH_SPDK", raising=False)
    assert bench.main(["--targets", "spdk-null", "--time", "0.1", "--json"]) == 1
    (failure,) = json.loads(capsys.readouterr().out)["failures"]
    assert "--spdk" in failure and "VHOSTD_BENCH_SPDK" in failure
    assert bench.main(["--targets", "spdk-scsi-malloc", "--spdk", str(tmp_path), "--time", "0.1", "--json"]) == 1
    (failure,) = json.loads(capsys.readouterr().out)["failures"]
    assert "no SPDK vhost binary at %s" % tmp_path in failure


def test_spdk_target_is_set_up_like_vhostd_on_its_cores(tmp_path):
    from vhostd.initiator.targets import make_target
    target = make_target("spdk-scsi-malloc", cpus=[1], size_bytes=64 << 20, workdir=str(tmp_path))
    assert (target.label, target.kind, target.memory_mib) == ("spdk-scsi-malloc", "scsi", 256 + 64)
    command = target.command_line(tmp_path / "vhost")
    assert command[:3] == ["taskset", "-c", "1"]
    assert command[command.index("-m") + 1] == "0x2" and command[command.index("-s") + 1] == "320"
    assert command[command.index("-S") + 1] == str(tmp_path) and "-u" in command
    assert make_target("spdk-null").memory_mib == 256
