#!/usr/bin/env python3
"""Idle behaviour of a vhostd daemon (docs/benchmarks.md, "Idle"):

1. idle CPU: with --controllers blk controllers, each with a connected front-end and no I/O, the
   CPU used by the reactor threads and by the whole process over --cpu-seconds, after an idle
   spell;
2. first-request latency: --requests reads of --bs, each after --idle-ms of silence (the reactor
   has gone to sleep and a kick must wake it), p50/p99/max;
3. the same reads back to back (the reactor polling), for comparison;
4. the platform's own cost of the same two wake-ups: an eventfd ping-pong between two processes
   pinned like the target and this client, each sleeping in read(), after the same silences.

    python3 scripts/bench_idle.py [--requests 100] [--idle-ms 50] [--controllers 16]

Latency is measured around one synchronous read of our front-end (post, kick, sleep on the call
eventfd, reap): it includes the client's own wake-up and Python overhead, the same in 2 and 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vhostd.initiator.bench import parse_cpus  # noqa: E402
from vhostd.initiator.blk import VirtioBlk  # noqa: E402
from vhostd.initiator.targets import VhostdTarget, proc_cpu_seconds  # noqa: E402


def percentiles(samples_ns: list[int]) -> dict:
    ordered = sorted(samples_ns)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000.0

    return {"p50_us": at(0.50), "p99_us": at(0.99), "max_us": ordered[-1] / 1000.0, "count": len(ordered)}


def reactor_cpu_seconds(target: VhostdTarget) -> float:
    tids = [r["tid"] for r in target.rpc("framework_get_reactors")["reactors"]]
    return sum(proc_cpu_seconds(target.pid, tid) or 0.0 for tid in tids)


def measure_idle_cpu(target: VhostdTarget, spell_s: float, seconds: float) -> dict:
    time.sleep(spell_s)
    reactors0, process0, t0 = reactor_cpu_seconds(target), proc_cpu_seconds(target.pid), time.monotonic()
    time.sleep(seconds)
    reactors1, process1, t1 = reactor_cpu_seconds(target), proc_cpu_seconds(target.pid), time.monotonic()
    wall = t1 - t0
    return {"seconds": wall, "reactor_cpu_pct": 100.0 * (reactors1 - reactors0) / wall,
            "process_cpu_pct": 100.0 * (process1 - process0) / wall}


def timed_reads(queue, count: int, block_bytes: int, pause_s: float) -> list[int]:
    samples = []
    for i in range(count):
        if pause_s:
            time.sleep(pause_s)
        t0 = time.perf_counter_ns()
        queue.run_io("read", (i % 256) * block_bytes, length=block_bytes)
        samples.append(time.perf_counter_ns() - t0)
    return samples


def eventfd_ping_pong(count: int, pause_s: float, target_cpus: list[int]) -> list[int]:
    """Round trips of a blocking eventfd ping-pong with a child process on target_cpus."""
    ping, pong = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    child = os.fork()
    if child == 0:
        try:
            if target_cpus:
                os.sched_setaffinity(0, set(target_cpus))
            for _ in range(count):
                os.eventfd_read(ping)
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)
    samples = []
    try:
        for _ in range(count):
            time.sleep(pause_s)
            t0 = time.perf_counter_ns()
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            samples.append(time.perf_counter_ns() - t0)
    finally:
        os.waitpid(child, 0)
        os.close(ping)
        os.close(pong)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100, help="reads after idle spells (and back to back)")
    ap.add_argument("--idle-ms", type=float, default=50.0, help="silence before each read")
    ap.add_argument("--bs", type=int, default=4096, help="bytes per read")
    ap.add_argument("--controllers", type=int, default=16, help="blk controllers, each with a connected front-end")
    ap.add_argument("--cpu-seconds", type=float, default=2.0, help="idle CPU measuring time")
    ap.add_argument("--target-cpus", default="0", help="vhostd's cores (-m)")
    ap.add_argument("--client-cpus", help="pin this client to these cores")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.client_cpus:
        os.sched_setaffinity(0, set(parse_cpus(args.client_cpus)))

    with VhostdTarget("malloc", size_bytes=8 << 20, cpus=parse_cpus(args.target_cpus)) as target:
        sockets = [target.socket_path]
        for i in range(1, args.controllers):
            name = "idle.%d" % i
            target.rpc("bdev_malloc_create", {"name": "m%d" % i, "num_blocks": 2048, "block_size": 512})
            target.rpc("vhost_create_blk_controller", {"ctrlr": name, "dev_name": "m%d" % i})
            sockets.append(os.path.join(str(target.workdir), name))
        devices = []
        try:
            for path in sockets:
                devices.append(VirtioBlk(path, queue_size=64, memory_bytes=4 << 20,
                                         bounce_bytes=args.bs).open())
            idle = measure_idle_cpu(target, 0.5, args.cpu_seconds)
            queue = devices[0].frontend.queues[0]
            queue.run_io("read", 0, length=args.bs)               # first touch of the buffers
            after_idle = percentiles(timed_reads(queue, args.requests, args.bs, args.idle_ms / 1000.0))
            back_to_back = percentiles(timed_reads(queue, args.requests, args.bs, 0.0))
            stats = target.rpc("framework_get_reactors")["reactors"]
        finally:
            for dev in devices:
                dev.close()
    platform = percentiles(eventfd_ping_pong(args.requests, args.idle_ms / 1000.0, parse_cpus(args.target_cpus)))

    result = {"controllers": args.controllers, "target_cpus": args.target_cpus, "idle": idle,
              "after_idle": after_idle, "back_to_back": back_to_back, "eventfd_ping_pong": platform,
              "idle_ms": args.idle_ms,
              "block_bytes": args.bs, "reactors": [{"lcore": r["lcore"], "busy": r["busy"], "idle": r["idle"]}
                                                   for r in stats]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("idle: %d controllers with connected front-ends, %.1f s: reactor threads %.2f %% CPU, "
          "whole process %.2f %%" % (args.controllers, idle["seconds"], idle["reactor_cpu_pct"],
                                     idle["process_cpu_pct"]))
    print("%-26s %8s %8s %8s" % ("%d-byte read latency (us)" % args.bs, "p50", "p99", "max"))
    for label, r in (("after %g ms idle" % args.idle_ms, after_idle), ("back to back", back_to_back),
                     ("eventfd ping-pong", platform)):
        print("%-26s %8.1f %8.1f %8.1f" % (label, r["p50_us"], r["p99_us"], r["max_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
