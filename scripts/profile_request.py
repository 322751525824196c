#!/usr/bin/env python3
"""Per-request instruction cost of vhostd's blk or scsi data path, for docs/benchmarks.md.

Runs the in-process vhostd blk (or scsi: --kind scsi) target and the bench client for a few seconds; meant to run under
callgrind, which counts instructions (repeatable, unlike time on a shared machine):

    valgrind --tool=callgrind --callgrind-out-file=build/callgrind.out \\
        python3 scripts/profile_request.py --bdev null --time 3
    python3 scripts/profile_request.py --report build/callgrind.out --requests N

The first form prints the number of requests completed; the second divides the inclusive
instruction counts of the data-path functions by it.

The third form compares targets as separate processes, each started under callgrind (any
vhostd-bench target: vhostd-null, vhostd-scsi-null, spdk-null, spdk-scsi-null with --spdk …):

    python3 scripts/profile_request.py --targets spdk-null,vhostd-null --spdk /opt/spdk --time 5

Only the polling thread's work is counted (callgrind --toggle-collect on the reactor loop, which is
SPDK's ``reactor_run``; vhostd's reactor thread, ``Reactor._thread_main``, whose inlined
``reactor_run`` has no symbol of its own), between a dump just before the client connects and one
just after it closes, and divided by the requests the client completed in between: instructions
per request, and the functions that spend most of them.
"""

import argparse
import os
import re
import subprocess
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Functions of one request's path on the target, and the bench client's submit (Cython mangles
# names: matched by suffix).
PATH_FUNCTIONS = [
    ("reactor pass (all work)", "reactor_run"),
    ("poll a queue", "vq_poll"),
    ("  pop: avail entry + descriptor walk", "vq_pop"),
    ("    translate buffers", "gpa_to_iov"),
    ("  blk request handling", "blk_handle"),
    ("  scsi request handling", "scsi_request_handle"),
    ("    CDB execution", "scsi_execute"),
    ("    response + completion", "scsi_finish"),
    ("    bdev submit", "bdev_submit"),
    ("    bdev completion + accounting", "bdev_io_finish"),
    ("    push used entry", "task_complete"),
    ("interrupt decision", "vq_notify"),
    ("io_uring poll", "io_ctx_poll"),
    ("client: build and post a request", "vdrv_submit"),
]


def run(bdev: str, seconds: float, qd: int, kind: str = "blk") -> None:
    from vhostd.initiator.bench import Workload, run_workload
    from vhostd.initiator.targets import InProcessVhostdTarget
    with InProcessVhostdTarget(bdev, cpus=(0,), size_bytes=64 << 20, kind=kind) as target:
        workload = Workload(rw="randread", block_bytes=4096, qd=qd, queues=1, duration_s=seconds,
                            ramp_s=0.0, client_cpus=[1])
        result = run_workload(target.socket_path, kind, workload, target.label)
    print("requests", result.ops)


def report(path: str, requests: int) -> None:
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    costs = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+\S+:(\S+)", line) or re.match(r"\s*([\d,]+)\s+\S+:(\S+)", line)
        if m:
            name = m.group(2)
            value = int(m.group(1).replace(",", ""))
            costs[name] = max(costs.get(name, 0), value)
    print("| step | instructions / request |")
    print("|---|--:|")
    for label, suffix in PATH_FUNCTIONS:
        total = sum(v for k, v in costs.items() if k.endswith(suffix) or ("_" + suffix) in k and k.split("(")[0].endswith(suffix))
        if total:
            print("| %s | %.0f |" % (label, total / requests))


def profile_target(spec: str, seconds: float, qd: int, spdk: str | None, outdir: str,
                   top: int) -> None:
    from vhostd.initiator.bench import Workload, run_workload
    from vhostd.initiator.targets import make_target
    os.makedirs(outdir, exist_ok=True)
    out = os.path.join(outdir, "callgrind.%s.out" % spec)
    for old in [out] + ["%s.%d" % (out, i) for i in range(1, 4)]:
        if os.path.exists(old):
            os.unlink(old)
    target = make_target(spec, cpus=(1,), size_bytes=64 << 20, spdk=spdk)
    target.wrapper = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                      "--toggle-collect=reactor_run",
                      "--toggle-collect=*Reactor_*_thread_main", "--compress-strings=no", "--dump-instr=no"]
    target.start(timeout_s=300)
    try:
        def dump(label: str) -> None:
            subprocess.run(["callgrind_control", "-d", label, str(target.pid)], check=True,
                           capture_output=True, timeout=120)
        dump("before")
        # SPDK needs hugepage memory (see vhostd-bench --hugepages); under valgrind vhostd cannot
        # map it, and the page size changes no instruction count.
        workload = Workload(rw="randread", block_bytes=4096, qd=qd, queues=1, duration_s=seconds,
                            ramp_s=0.0, client_cpus=[0], hugepages=spec.startswith("spdk-"),
                            timeout_s=120)
        result = run_workload(target.socket_path, target.kind, workload, target.label)
        dump("after")
    finally:
        target.stop()
    window = "%s.2" % out                      # the second dump: the client's connection
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", window],
                          capture_output=True, text=True, check=True).stdout
    total = 0
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)", line)
        if not m:
            continue
        value = int(m.group(1).replace(",", ""))
        name = m.group(2)
        if "PROGRAM TOTALS" in name:
            total = value
            continue
        if total and value >= total * 0.99:
            continue                     # the frames below the toggled reactor loop
        name = name.split(" [")[0].split(":")[-1]
        name = re.sub(r"^__pyx_f_6vhostd_10_dataplane_", "", name)
        rows.append((value, name))
    merged: dict[str, int] = {}
    for value, name in rows:            # one function inlined from several files: one row
        merged[name] = merged.get(name, 0) + value
    rows = [(value, name) for name, value in merged.items()]
    requests = result.ops
    print("%s: %d requests, %.0f instructions per request (the reactor thread, QD %d)"
          % (spec, requests, total / max(requests, 1), qd))
    print("| function (self) | instructions / request |")
    print("|---|--:|")
    for value, name in sorted(rows, reverse=True)[:top]:
        print("| `%s` | %.0f |" % (name, value / max(requests, 1)))
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bdev", default="null", choices=["null", "malloc"])
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--kind", default="blk", choices=["blk", "scsi"])
    ap.add_argument("--targets", help="comma-separated vhostd-bench targets to profile one by one")
    ap.add_argument("--spdk", help="SPDK's vhost binary or build tree, for spdk-* targets")
    ap.add_argument("--outdir", default="build/callgrind")
    ap.add_argument("--top", type=int, default=12, help="functions listed per target")
    ap.add_argument("--report")
    ap.add_argument("--requests", type=int)
    args = ap.parse_args()
    if args.targets:
        for spec in args.targets.split(","):
            profile_target(spec.strip(), args.time, args.qd, args.spdk, args.outdir, args.top)
    elif args.report:
        report(args.report, args.requests)
    else:
        run(args.bdev, args.time, args.qd, args.kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
