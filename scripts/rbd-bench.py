#!/usr/bin/env python3
"""4 KiB random read and write at QD 1 and QD 32 on one RBD image: `rbd bench` (librbd alone, the
store's ceiling), then vhostd-bench against `vhostd-rbd` and `qsd-rbd` over the same image.

Without --ceph-conf it starts the tests' one-node cluster (tests/helpers/ceph.py) in a temporary
directory, creates the image and fills it (object-map answers reads of never-written objects
without an OSD), and stops and removes the cluster at the end.  Prints every tool's own output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.ceph import CephCluster  # noqa: E402

WORKLOADS = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL)


def rbd_bench(conf: str, image: str, rw: str, qd: int, total: str, env) -> None:
    run(["rbd", "-c", conf, "bench", "--io-type", "read" if rw == "randread" else "write",
         "--io-pattern", "rand", "--io-size", "4K", "--io-threads", str(qd),
         "--io-total", total, "--rbd-cache=false", image], env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ceph-conf", help="an existing cluster's config (default: start one)")
    ap.add_argument("--rbd", default="rbd/vhostd-bench", help="POOL/IMAGE (created if a cluster "
                    "is started here; it must exist otherwise)")
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the image created here")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time", type=float, default=10.0, help="seconds per vhostd-bench run")
    ap.add_argument("--target-cpus", default="0")
    ap.add_argument("--client-cpus", default="1")
    args = ap.parse_args()
    cluster = None
    if args.ceph_conf is None:
        cluster = CephCluster(Path(tempfile.mkdtemp(prefix="vhd-ceph-bench-")),
                              osd_size_bytes=(args.size_mib << 20) * 3)
        print("starting a one-node cluster in %s" % cluster.dir, flush=True)
        cluster.start()
        conf = str(cluster.conf)
    else:
        conf = args.ceph_conf
    env = dict(os.environ, CEPH_CONF=conf, PYTHONPATH=str(REPO))
    try:
        if cluster is not None:
            cluster.rbd("create", "--size", "%dM" % args.size_mib, args.rbd)
            run(["rbd", "-c", conf, "bench", "--io-type", "write", "--io-pattern", "seq",
                 "--io-size", "4M", "--io-threads", "4", "--io-total", "%dM" % args.size_mib,
                 args.rbd], env)
        for rw, qd in WORKLOADS:
            for _ in range(args.rounds):
                rbd_bench(conf, args.rbd, rw, qd, "16M" if qd == 1 else "96M", env)
        for rw, qd in WORKLOADS:
            run([sys.executable, str(REPO / "scripts" / "bench.py"), "--targets", "vhostd-rbd,qsd-rbd",
                 "--rbd", args.rbd, "--ceph-conf", conf, "--rw", rw, "--bs", "4k", "--qd", str(qd),
                 "--rounds", str(args.rounds), "--time", str(args.time), "--timeout", "60",
                 "--target-cpus", args.target_cpus, "--client-cpus", args.client_cpus], env)
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
