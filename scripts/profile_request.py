#!/usr/bin/env python3
"""Per-request instruction cost of vhostd's blk or scsi data path, for docs/benchmarks.md.

Runs the in-process vhostd blk (or scsi: --kind scsi) target and the bench client for a few seconds; meant to run under
callgrind, which counts instructions (repeatable, unlike time on a shared machine):

    valgrind --tool=callgrind --callgrind-out-file=build/callgrind.out \\
        python3 scripts/profile_request.py --bdev null --time 3
    python3 scripts/profile_request.py --report build/callgrind.out --requests N

The first form prints the number of requests completed; the second divides the inclusive
instruction counts of the data-path functions by it.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bdev", default="null", choices=["null", "malloc"])
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--kind", default="blk", choices=["blk", "scsi"])
    ap.add_argument("--report")
    ap.add_argument("--requests", type=int)
    args = ap.parse_args()
    if args.report:
        report(args.report, args.requests)
    else:
        run(args.bdev, args.time, args.qd, args.kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
