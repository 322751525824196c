"""vhostd-bench: drive vhost-user-blk/-scsi targets like QEMU would and measure them.

One run = one workload (N queues × QD, random offsets, read/write mix, block size, duration,
polling or interrupt completions) against one socket, or against several targets the command
starts itself (``--targets qsd-null,qsd-file,vhostd-null``), side by side in one table.  The
request path is the C load generator (ext/initiator.pxi); Python only sets up, shows progress
and reports.

Examples::

    vhostd-bench --socket /var/tmp/vhost.0 --rw randread --bs 4096 --qd 32 --time 10
    vhostd-bench --targets qsd-null,qsd-file --target-cpus 0 --client-cpus 1 --qd 32 --time 10
    vhostd-bench --targets spdk-null,vhostd-null --spdk /opt/spdk --rounds 7 --target-cpus 1 --client-cpus 0

With ``--rounds N`` the targets run N times, each round in a rotated order (so no target always goes
first), and a summary follows the table: per target the median and spread of IOPS, mean latency and
target CPU, and per round the ratio of each target's IOPS (and mean latency) to the first target's —
on a machine whose speed swings between runs, only ratios taken in the same round say anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from .. import _dataplane as dp
from ..vhost.protocol import ProtocolError
from .blk import VirtioBlk
from .channel import RequestFailed
from .frontend import FrontendError
from .targets import RbdSource, TargetError, make_target, proc_cpu_seconds

# What a target can do wrong; the run of that target is reported failed, the others go on.
TARGET_FAILURES = (TargetError, FrontendError, ProtocolError, RequestFailed, OSError, TimeoutError)

@dataclass
class Workload:
    rw: str = "randread"             # randread | randwrite | randrw
    rwmixread: int = 70              # % reads of randrw
    block_bytes: int = 4096
    qd: int = 32                     # per queue
    queues: int = 1
    queue_size: int = 256
    duration_s: float = 10.0
    ramp_s: float = 1.0
    interrupts: bool = False
    client_cpus: list[int] = field(default_factory=list)
    threads: int = 1                 # client threads; queues are dealt round-robin
    span_bytes: int = 0              # offsets below this (0: the whole device)
    memory_regions: int = 1
    hugepages: bool = False          # guest memory of 2 MiB hugepages (QEMU's hugetlb=on)
    event_idx: bool = True
    packed: bool = False             # packed virtqueues (VIRTIO_F_RING_PACKED) instead of split
    indirect: bool = True
    indirect_mode: str = "auto"
    timeout_s: float = 5.0           # connecting, and each control-path reply

    @property
    def read_pct(self) -> int:
        return {"randread": 100, "randwrite": 0}.get(self.rw, self.rwmixread)


@dataclass
class Result:
    target: str
    kind: str
    iops: float
    mb_per_s: float
    lat_mean_us: float
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    lat_max_us: float
    client_cpu_pct: float
    target_cpu_pct: float | None
    ops: int
    errors: int
    elapsed_s: float
    kicks_per_op: float
    round: int = 1


# A polling target under load should use all of its core; less means it waited on something (or the
# client could not keep it busy), and its round says little about its speed.
BUSY_CPU_FLOOR_PCT = 97.0


@dataclass
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        ordered = sorted(values)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return cls(median, ordered[0], ordered[-1])


@dataclass
class TargetSummary:
    target: str
    rounds: int
    iops: Spread
    lat_mean_us: Spread
    target_cpu_pct: Spread | None
    iops_ratio: Spread | None          # to the baseline target, round by round
    lat_ratio: Spread | None
    rounds_below_cpu_floor: list[int]


def rotated(items: list, round_index: int) -> list:
    """The order of round ``round_index`` (0-based): the list rotated left by that many places."""
    k = round_index % len(items) if items else 0
    return items[k:] + items[:k]


def summarize_rounds(results: list[Result], order: list[str]) -> list[TargetSummary]:
    """Medians and spreads per target over rounds; ratios to order[0] from rounds that have both."""
    by_round: dict[int, dict[str, Result]] = {}
    for r in results:
        by_round.setdefault(r.round, {})[r.target] = r
    baseline = order[0] if order else None
    summaries = []
    for name in order:
        mine = [r for r in results if r.target == name]
        if not mine:
            continue
        pairs = [(rs[name], rs[baseline]) for rs in by_round.values() if name in rs and baseline in rs]
        cpu = [r.target_cpu_pct for r in mine if r.target_cpu_pct is not None]
        summaries.append(TargetSummary(
            target=name, rounds=len(mine),
            iops=Spread.of([r.iops for r in mine]), lat_mean_us=Spread.of([r.lat_mean_us for r in mine]),
            target_cpu_pct=Spread.of(cpu),
            iops_ratio=Spread.of([a.iops / b.iops for a, b in pairs if b.iops]),
            lat_ratio=Spread.of([a.lat_mean_us / b.lat_mean_us for a, b in pairs if b.lat_mean_us]),
            rounds_below_cpu_floor=[r.round for r in mine
                                    if r.target_cpu_pct is not None and r.target_cpu_pct < BUSY_CPU_FLOOR_PCT]))
    return summaries


def format_summary(summaries: list[TargetSummary]) -> str:
    def spread(s: Spread | None, fmt: str) -> str:
        return "-" if s is None else ("%s (%s–%s)" % (fmt % s.median, fmt % s.low, fmt % s.high))

    baseline = summaries[0].target if summaries else "-"
    head = ("target", "rounds", "IOPS median (range)", "mean us median (range)", "target CPU",
            "IOPS / %s" % baseline, "mean us / %s" % baseline, "rounds < %.0f%% CPU" % BUSY_CPU_FLOOR_PCT)
    rows = [head]
    for t in summaries:
        rows.append((t.target, str(t.rounds), spread(t.iops, "%.0f"), spread(t.lat_mean_us, "%.2f"),
                     spread(t.target_cpu_pct, "%.0f%%"), spread(t.iops_ratio, "%.2f"),
                     spread(t.lat_ratio, "%.2f"), ",".join(map(str, t.rounds_below_cpu_floor)) or "none"))
    return _markdown_table(rows)


def percentile(histogram: dict[int, int], fraction: float) -> int:
    """Smallest bucket value at or below which `fraction` of the samples lie."""
    total = sum(histogram.values())
    if total == 0:
        return 0
    need = fraction * total
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= need:
            return value
    return max(histogram)


def thread_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


class Device:
    """A connected blk or scsi device with its queues set up for the C request path."""

    def __init__(self, socket_path: str, kind: str, workload: Workload) -> None:
        self.kind = kind
        options = dict(num_queues=workload.queues, queue_size=workload.queue_size,
                       memory_regions=workload.memory_regions, hugepages=workload.hugepages,
                       event_idx=workload.event_idx, packed=workload.packed,
                       indirect=workload.indirect, timeout_s=workload.timeout_s,
                       memory_bytes=self._memory_bytes(workload))
        if kind == "blk":
            self.dev = VirtioBlk(socket_path, **options).open()
            if self.dev.config is None:
                raise TargetError("%s did not negotiate CONFIG: capacity unknown" % socket_path)
            self.size_bytes = self.dev.config.size_bytes
            self.queues = self.dev.frontend.queues
        else:
            from .scsi import VirtioScsi
            self.dev = VirtioScsi(socket_path, **options).open()
            self.size_bytes = self.dev.prepare_load()
            self.queues = self.dev.request_queues
        mode = {"never": dp.INDIRECT_NEVER, "auto": dp.INDIRECT_AUTO, "always": dp.INDIRECT_ALWAYS}
        for q in self.queues:
            q.configure(indirect_mode=mode[workload.indirect_mode])

    @staticmethod
    def _memory_bytes(w: Workload) -> int:
        slots = w.queue_size * 4096 * (w.queues + 2)
        data = w.queues * w.qd * ((w.block_bytes + 4095) // 4096 * 4096)
        # Each region a multiple of 2 MiB, as a QEMU guest's RAM is (and hugepages need).
        unit = (2 << 20) * w.memory_regions
        return (slots + data + (16 << 20) + unit - 1) // unit * unit

    def close(self) -> None:
        self.dev.close()


def run_workload(socket_path: str, kind: str, workload: Workload, label: str,
                 target_cpu=None, progress=None) -> Result:
    """Connect, run the workload on every queue, disconnect; returns the measured Result.
    target_cpu: a callable returning the target's CPU seconds so far (or None)."""
    device = Device(socket_path, kind, workload)
    try:
        span = workload.span_bytes or device.size_bytes
        span_blocks = span // workload.block_bytes
        if span_blocks == 0:
            raise TargetError("%s is smaller than one %d-byte block" % (label, workload.block_bytes))
        nthreads = max(1, min(workload.threads, len(device.queues)))
        groups = [device.queues[i::nthreads] for i in range(nthreads)]
        gens = [dp.LoadGenerator(group, workload.qd, workload.block_bytes, workload.read_pct,
                                 span_blocks, workload.duration_s, ramp_s=workload.ramp_s,
                                 interrupts=workload.interrupts, seed=0x9E3779B97F4A7C15 + i)
                for i, group in enumerate(groups)]
        errors: list[BaseException] = []
        client_cpu = [0.0] * nthreads

        def worker(index: int) -> None:
            if workload.client_cpus:
                os.sched_setaffinity(0, {workload.client_cpus[index % len(workload.client_cpus)]})
            start = thread_cpu_seconds()
            try:
                gens[index].run()
            except BaseException as exc:     # reported by the main thread
                errors.append(exc)
            client_cpu[index] = thread_cpu_seconds() - start

        kicks_before = sum(q.stats()["kicks"] for q in device.queues)
        tcpu0, wall0 = target_cpu() if target_cpu else None, time.monotonic()
        threads = [threading.Thread(target=worker, args=(i,), name="bench-%d" % i) for i in range(nthreads)]
        for t in threads:
            t.start()
        _watch(threads, gens, workload, label, progress)
        wall1 = time.monotonic()
        tcpu1 = target_cpu() if target_cpu else None
        if errors:
            raise errors[0]
        results = [g.result() for g in gens]
        for g in gens:
            g.close()
        kicks = sum(q.stats()["kicks"] for q in device.queues) - kicks_before
    finally:
        device.close()
    return _summarize(label, kind, workload, results, kicks, sum(client_cpu), wall1 - wall0,
                      None if tcpu0 is None or tcpu1 is None else tcpu1 - tcpu0)


def _watch(threads, gens, workload: Workload, label: str, progress) -> None:
    """Wait for the workers, showing live IOPS once per second."""
    last_ops, last_t = 0, time.monotonic()
    start = last_t
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=1.0)
            break
        now = time.monotonic()
        snaps = [g.snapshot() for g in gens]
        ops = sum(s["ops"] for s in snaps)
        if progress is not None and now - last_t >= 0.5:
            rate = (ops - last_ops) / (now - last_t) if ops >= last_ops else 0.0
            phase = "ramp" if not all(s["measuring"] for s in snaps) else "run"
            progress("\r%-14s %-4s %5.1f/%.0f s %10.0f IOPS   " % (
                label, phase, now - start, workload.ramp_s + workload.duration_s, rate))
            last_ops, last_t = ops, now
    for t in threads:
        t.join()
    if progress is not None:
        progress("\r" + " " * 60 + "\r")


def _summarize(label, kind, workload, results, kicks, client_cpu_s, wall_s, target_cpu_s) -> Result:
    rate = results[0]["tick_rate"]
    ops = sum(r["ops"] for r in results)
    elapsed = max(r["elapsed_ticks"] for r in results) / rate
    iops = sum(r["ops"] / (r["elapsed_ticks"] / rate) for r in results if r["elapsed_ticks"])
    nbytes = sum(r["bytes_read"] + r["bytes_written"] for r in results)
    histogram: dict[int, int] = {}
    for r in results:
        for value, count in r["histogram"].items():
            histogram[value] = histogram.get(value, 0) + count
    us = 1e6 / rate
    lost = sum(r["lost"] for r in results)
    if lost:
        raise TargetError("%s: %d requests never completed" % (label, lost))
    return Result(
        target=label, kind=kind, iops=iops,
        mb_per_s=nbytes / elapsed / 1e6 if elapsed else 0.0,
        lat_mean_us=sum(r["lat_sum_ticks"] for r in results) / ops * us if ops else 0.0,
        lat_p50_us=percentile(histogram, 0.50) * us, lat_p99_us=percentile(histogram, 0.99) * us,
        lat_p999_us=percentile(histogram, 0.999) * us,
        lat_max_us=max(r["lat_max_ticks"] for r in results) * us,
        client_cpu_pct=100.0 * client_cpu_s / wall_s,
        target_cpu_pct=None if target_cpu_s is None else 100.0 * target_cpu_s / wall_s,
        ops=ops, errors=sum(r["errors"] for r in results), elapsed_s=elapsed,
        kicks_per_op=kicks / ops if ops else 0.0)


def format_table(results: list[Result]) -> str:
    rounds = len({r.round for r in results}) > 1
    head = (("round",) if rounds else ()) + ("target", "IOPS", "MB/s", "mean us", "p50 us", "p99 us",
                                              "p99.9 us", "max us", "client CPU", "target CPU", "errors")
    rows = [head]
    for r in results:
        rows.append(((str(r.round),) if rounds else ()) + (r.target, "%.0f" % r.iops, "%.1f" % r.mb_per_s, "%.2f" % r.lat_mean_us,
                     "%.2f" % r.lat_p50_us, "%.2f" % r.lat_p99_us, "%.2f" % r.lat_p999_us,
                     "%.1f" % r.lat_max_us, "%.0f%%" % r.client_cpu_pct,
                     "-" if r.target_cpu_pct is None else "%.0f%%" % r.target_cpu_pct, str(r.errors)))
    return _markdown_table(rows, text_columns=2 if rounds else 1)


def _markdown_table(rows: list[tuple[str, ...]], text_columns: int = 1) -> str:
    """Rows (the first is the head) as a Markdown table; columns after the first ``text_columns``
    are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) if i < text_columns else cell.rjust(widths[i])
                               for i, cell in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if i >= text_columns else "-")
                                   for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def parse_cpus(text: str | None) -> list[int]:
    """'1', '0,2', '0-3' → list of cores."""
    if not text:
        return []
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().rstrip("b").rstrip("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhostd-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="vhost-user socket of a running target")
    where.add_argument("--targets", help="comma-separated targets to start and measure in turn: "
                       "qsd-null, qsd-file, qsd-rbd, vhostd-null, vhostd-malloc, vhostd-file, vhostd-rbd, vhostd-scsi-malloc, "
                       "vhostd-inproc-null, vhostd-inproc-malloc, vhostd-inproc-scsi-null, vhostd-inproc-scsi-malloc (vhostd's back-end in this process)")
    ap.add_argument("--type", choices=("blk", "scsi"), default="blk", help="device type of --socket")
    ap.add_argument("--target-pid", type=int, help="pid of the --socket target, for its CPU use")
    ap.add_argument("--name", help="label of the --socket target in the table")
    ap.add_argument("--rw", choices=("randread", "randwrite", "randrw"), default="randread")
    ap.add_argument("--rwmixread", type=int, default=70, help="%% reads with --rw randrw")
    ap.add_argument("--bs", type=parse_size, default=4096, help="block size (4k, 64k …)")
    ap.add_argument("--qd", type=int, default=32, help="requests in flight per queue")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--time", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--ramp", type=float, default=1.0, help="unmeasured seconds before")
    ap.add_argument("--mode", choices=("poll", "irq"), default="poll",
                    help="completions: busy-poll the used rings, or sleep on the call eventfds")
    ap.add_argument("--client-cpus", help="pin client threads to these cores (e.g. 1 or 1,2)")
    ap.add_argument("--threads", type=int, default=1, help="client threads (queues dealt round-robin)")
    ap.add_argument("--target-cpus", default="0", help="cores of targets started with --targets")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the --targets list this many times, in a rotated order each round, "
                         "and summarize medians and per-round ratios to the first target")
    ap.add_argument("--spdk", help="SPDK's vhost binary or build tree, for the spdk-* targets "
                                   "(default: $VHOSTD_BENCH_SPDK)")
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="disk size of started targets")
    ap.add_argument("--image", help="file of file targets (default: a new sparse file of --size)")
    ap.add_argument("--rbd", metavar="POOL/IMAGE",
                    help="the existing RBD image of the rbd targets (default: $VHOSTD_BENCH_RBD)")
    ap.add_argument("--ceph-conf", help="Ceph config file of the rbd targets, with the monitors "
                    "and keyring (default: $CEPH_CONF)")
    ap.add_argument("--file-cache", choices=("direct", "page"), default="direct",
                    help="qsd-file: cache.direct=on (O_DIRECT, as vhostd) or the page cache")
    ap.add_argument("--span", type=parse_size, default=0, help="offsets below this (default: whole disk)")
    ap.add_argument("--memory-regions", type=int, default=1)
    ap.add_argument("--hugepages", choices=("auto", "on", "off"), default="auto",
                    help="guest memory of 2 MiB hugepages, as QEMU's memory-backend-memfd,hugetlb=on; "
                         "auto: on when an spdk-* target is measured (SPDK's vhost needs it), for "
                         "every target of the run")
    ap.add_argument("--no-event-idx", action="store_true")
    ap.add_argument("--ring", choices=("split", "packed"), default="split",
                    help="virtqueue layout; packed: started vhostd targets offer it (--packed-ring)")
    ap.add_argument("--no-indirect", action="store_true")
    ap.add_argument("--indirect", choices=("never", "auto", "always"), default="auto",
                    help="when chains go through an indirect table (if negotiated)")
    ap.add_argument("--timeout", type=float, default=5.0,
                    help="seconds to wait for a target's socket and for each control reply")
    ap.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    return ap


def wants_hugepages(args) -> bool:
    if args.hugepages != "auto":
        return args.hugepages == "on"
    return bool(args.targets) and any(spec.strip().startswith("spdk-") for spec in args.targets.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    workload = Workload(rw=args.rw, rwmixread=args.rwmixread, block_bytes=args.bs, qd=args.qd,
                        queues=args.queues, queue_size=args.queue_size, duration_s=args.time,
                        ramp_s=args.ramp, interrupts=args.mode == "irq",
                        client_cpus=parse_cpus(args.client_cpus), threads=args.threads,
                        span_bytes=args.span, memory_regions=args.memory_regions,
                        hugepages=wants_hugepages(args),
                        event_idx=not args.no_event_idx, packed=args.ring == "packed",
                        indirect=not args.no_indirect,
                        indirect_mode=args.indirect, timeout_s=args.timeout)
    progress = None if args.quiet or args.json or not sys.stderr.isatty() else \
        (lambda text: (sys.stderr.write(text), sys.stderr.flush()))
    results: list[Result] = []
    failures: list[str] = []
    if args.socket:
        target_cpu = (lambda: proc_cpu_seconds(args.target_pid)) if args.target_pid else None
        try:
            results.append(run_workload(args.socket, args.type, workload, args.name or args.socket,
                                        target_cpu, progress))
        except TARGET_FAILURES as exc:
            failures.append("%s: %s" % (args.socket, exc))
            print("vhostd-bench: %s failed: %s" % (args.socket, exc), file=sys.stderr)
    else:
        specs = [spec.strip() for spec in args.targets.split(",")]
        rbd = None
        if any(spec.endswith("-rbd") for spec in specs):
            try:
                rbd = RbdSource.parse(args.rbd, args.ceph_conf)
            except TargetError as exc:
                ap.error(str(exc))
        labels: dict[str, str] = {}             # spec -> the label its results carry
        for round_index in range(args.rounds):
            for spec in rotated(specs, round_index):
                target = make_target(spec, cpus=parse_cpus(args.target_cpus),
                                     size_bytes=args.size, num_queues=args.queues, image=args.image,
                                     direct=args.file_cache == "direct", spdk=args.spdk, rbd=rbd,
                                     packed_ring=args.ring == "packed")
                labels[spec] = target.label
                try:
                    with target:
                        try:
                            result = run_workload(target.socket_path, target.kind, workload,
                                                  target.label, target.cpu_seconds, progress)
                        except TARGET_FAILURES as exc:
                            exc.target_log = getattr(target, "log_tail", lambda: "")()
                            raise
                except TARGET_FAILURES as exc:
                    failures.append("%s (round %d): %s" % (spec, round_index + 1, exc))
                    print("vhostd-bench: %s failed: %s" % (spec, exc), file=sys.stderr)
                    if getattr(exc, "target_log", "") and not args.quiet:
                        print("vhostd-bench: the end of its log:\n%s" % exc.target_log, file=sys.stderr)
                    continue
                result.round = round_index + 1
                results.append(result)
        measured = {r.target for r in results}
        order = [labels[spec] for spec in specs if labels.get(spec) in measured]
    summaries = summarize_rounds(results, order) if args.rounds > 1 and not args.socket else []
    if args.json:
        print(json.dumps({"workload": asdict(workload), "results": [asdict(r) for r in results],
                          "summary": [asdict(t) for t in summaries], "failures": failures}, indent=2))
    else:
        w = workload
        print("%s bs=%d qd=%d queues=%d mode=%s time=%.0fs client-cpus=%s memory=%s ring=%s" % (
            w.rw if w.rw != "randrw" else "randrw(%d%% read)" % w.rwmixread, w.block_bytes, w.qd,
            w.queues, args.mode, w.duration_s, args.client_cpus or "any",
            "hugepages" if w.hugepages else "4k-pages", args.ring))
        print(format_table(results))
        if summaries:
            print()
            print("%d rounds, ratios to %s taken round by round:" % (args.rounds, summaries[0].target))
            print(format_summary(summaries))
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
