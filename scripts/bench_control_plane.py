#!/usr/bin/env python3
"""Control-plane benchmark of a vhostd daemon (docs/benchmarks.md):

1. RPC round trips/s and latency on one connection (idle data plane);
2. the same while a vhostd-bench client saturates a blk controller;
3. creating N null bdevs and N blk controllers (and deleting them).

    python3 scripts/bench_control_plane.py [--count 1000] [--calls 5000] [--load-seconds 10]

It starts its own daemon (reactor on --target-cpus, the load client on --client-cpus).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vhostd.rpc.framing import JsonStreamDecoder  # noqa: E402


class Connection:
    """One persistent JSON-RPC connection (as an orchestration agent keeps)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = JsonStreamDecoder(64 << 20)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        req = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params:
            req["params"] = params
        self.sock.sendall(json.dumps(req).encode())
        while True:
            complete, value = self.decoder.next_value()
            if complete:
                break
            self.decoder.feed(self.sock.recv(1 << 20))
        if "error" in value:
            raise RuntimeError("%s: %s" % (method, value["error"]))
        return value["result"]


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda f: s[min(len(s) - 1, int(f * len(s)))] * 1e3  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": s[-1] * 1e3}


def timed_calls(conn: Connection, method: str, count: int) -> tuple[float, dict]:
    lat = []
    t0 = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        conn.call(method)
        lat.append(time.perf_counter() - t)
    return count / (time.perf_counter() - t0), percentiles(lat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="bdevs and controllers to create")
    ap.add_argument("--calls", type=int, default=5000, help="RPC calls per latency measurement")
    ap.add_argument("--load-seconds", type=float, default=10.0)
    ap.add_argument("--target-cpus", default="0")
    ap.add_argument("--client-cpus", default="1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="vhd-cp-", dir="/tmp")
    rpc = os.path.join(work, "spdk.sock")
    mask = hex(sum(1 << int(c) for c in args.target_cpus.split(",")))
    env = dict(os.environ, PYTHONPATH=ROOT)
    daemon = subprocess.Popen([sys.executable, "-m", "vhostd.cli", "-S", work, "-r", rpc, "-m", mask],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict = {}
    try:
        for _ in range(200):
            if os.path.exists(rpc):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        conn = Connection(rpc)
        rate, lat = timed_calls(conn, "spdk_get_version", args.calls)
        results["idle"] = {"round_trips_per_s": round(rate), **lat}

        conn.call("bdev_null_create", name="LoadNull", num_blocks=1 << 21, block_size=512)
        conn.call("vhost_create_blk_controller", ctrlr="load.0", dev_name="LoadNull")
        load = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--socket",
                                 os.path.join(work, "load.0"), "--qd", "32", "--time", str(args.load_seconds),
                                 "--client-cpus", args.client_cpus, "--json"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(2.0)
        rate, lat = timed_calls(conn, "vhost_get_controllers", max(200, args.calls // 5))
        iostat_rate, iostat_lat = timed_calls(conn, "bdev_get_iostat", 200)
        out, _ = load.communicate(timeout=args.load_seconds + 60)
        try:
            iops = round(json.loads(out)["results"][0]["iops"])
        except (ValueError, KeyError, IndexError):
            iops = None
        results["under_load"] = {"data_plane_iops": iops, "vhost_get_controllers_per_s": round(rate), **lat,
                                 "bdev_get_iostat_p99_ms": iostat_lat["p99_ms"]}
        conn.call("vhost_delete_controller", ctrlr="load.0")
        conn.call("bdev_null_delete", name="LoadNull")

        t0 = time.perf_counter()
        for i in range(args.count):
            conn.call("bdev_null_create", name="Null%d" % i, num_blocks=2048, block_size=512)
        t1 = time.perf_counter()
        for i in range(args.count):
            conn.call("vhost_create_blk_controller", ctrlr="c%d" % i, dev_name="Null%d" % i)
        t2 = time.perf_counter()
        listed = len(conn.call("vhost_get_controllers"))
        t3 = time.perf_counter()
        for i in range(args.count):
            conn.call("vhost_delete_controller", ctrlr="c%d" % i)
            conn.call("bdev_null_delete", name="Null%d" % i)
        t4 = time.perf_counter()
        results["scale"] = {"count": args.count, "create_bdevs_s": round(t1 - t0, 2),
                            "create_controllers_s": round(t2 - t1, 2), "listed": listed,
                            "list_controllers_ms": round((t3 - t2) * 1e3, 1),
                            "delete_all_s": round(t4 - t3, 2)}
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    i, u, s = results["idle"], results["under_load"], results["scale"]
    print("| measurement | value |")
    print("|---|--:|")
    print("| RPC round trips/s, idle (spdk_get_version, one connection) | %d |" % i["round_trips_per_s"])
    print("| RPC latency idle p50 / p99 / max | %.2f / %.2f / %.2f ms |" % (i["p50_ms"], i["p99_ms"], i["max_ms"]))
    print("| data plane during the load phase | %s IOPS |" % u["data_plane_iops"])
    print("| vhost_get_controllers under load: calls/s | %d |" % u["vhost_get_controllers_per_s"])
    print("| ... latency p50 / p99 / max | %.2f / %.2f / %.2f ms |" % (u["p50_ms"], u["p99_ms"], u["max_ms"]))
    print("| bdev_get_iostat under load p99 | %.2f ms |" % u["bdev_get_iostat_p99_ms"])
    print("| create %d null bdevs | %.2f s |" % (s["count"], s["create_bdevs_s"]))
    print("| create %d blk controllers | %.2f s |" % (s["count"], s["create_controllers_s"]))
    print("| vhost_get_controllers with %d controllers | %.1f ms |" % (s["listed"], s["list_controllers_ms"]))
    print("| delete them all | %.2f s |" % s["delete_all_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
