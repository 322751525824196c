"""vhostd-top: a live view of a running vhostd, as spdk_top is for SPDK.

Each refresh reads three RPCs (framework_get_reactors, vhost_get_queue_stats, bdev_get_iostat) over
the Unix socket or HTTP, and shows rates over the last interval.  Four views:

  1 reactors      busy share of each reactor's core, the queues and controllers it polls
  2 controllers   per controller: IOPS, MB/s read and written, mean and p99 latency, errors
  3 queues        the same per virtqueue, with the reactor that polls it
  4 bdevs         per bdev: read/write IOPS and MB/s, mean latency, errors

Keys: 1-4 or Tab switch views, s sorts by the next column (S: the previous one), r reverses the
order, q quits.  ``--batch N`` prints N refreshes as plain text instead (no terminal needed).

The model (snapshots in, rows out) and the rendering (rows in, lines out) are plain functions; only
:func:`run_screen` touches curses.
"""

from __future__ import annotations

import argparse
import curses
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from typing import Any, Callable

from .latency_histogram import quantile_s
from .rpc.client import RpcCallError, call_http, call_unix

Call = Callable[[str], Any]
Row = dict[str, Any]

VIEWS = ("reactors", "controllers", "queues", "bdevs")


@dataclass(frozen=True)
class Snapshot:
    """What one refresh read, and when (monotonic seconds)."""

    at: float
    reactors: dict
    queues: dict
    iostat: dict


def take_snapshot(call: Call) -> Snapshot:
    return Snapshot(time.monotonic(), call("framework_get_reactors"), call("vhost_get_queue_stats"),
                    call("bdev_get_iostat"))


def counter_delta(now: int, before: int | None) -> int:
    """The increase of a counter; a counter that went back started again (a new front-end's queue,
    a reset iostat), so all of its value is new."""
    if before is None or now < before:
        return now
    return now - before


def _queue_key(ctrlr: str, q: dict) -> tuple[str, int]:
    return ctrlr, q["queue"]


def _queues_by_key(snap: Snapshot) -> dict[tuple[str, int], dict]:
    return {_queue_key(c["ctrlr"], q): q for c in snap.queues["controllers"] for q in c["queues"]}


QUEUE_COUNTERS = ("requests", "read_ops", "write_ops", "bytes_read", "bytes_written", "errors",
                  "bad_chains", "latency_ticks")


def _queue_deltas(prev: Snapshot | None, cur: Snapshot) -> dict[tuple[str, int], dict]:
    before = _queues_by_key(prev) if prev is not None else {}
    deltas = {}
    for key, q in _queues_by_key(cur).items():
        old = before.get(key)
        restarted = old is not None and q["requests"] < old["requests"]
        base = None if restarted else old
        d = {name: counter_delta(q[name], base[name] if base else None) for name in QUEUE_COUNTERS}
        old_hist = base["latency_histogram"] if base else [0] * len(q["latency_histogram"])
        d["latency_histogram"] = [counter_delta(n, o) for n, o in zip(q["latency_histogram"], old_hist)]
        d["lcore"] = q["lcore"]
        deltas[key] = d
    return deltas


def _rates(d: dict, seconds: float, tick_rate: int) -> Row:
    requests = d["requests"]
    return {
        "iops": requests / seconds,
        "read_mbs": d["bytes_read"] / seconds / 1e6,
        "write_mbs": d["bytes_written"] / seconds / 1e6,
        "lat_us": (d["latency_ticks"] / requests / tick_rate * 1e6) if requests else None,
        "p99_us": _us(quantile_s(d["latency_histogram"], 0.99, tick_rate)),
        "errors": d["errors"] + d["bad_chains"],
    }


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


def _interval(prev: Snapshot | None, cur: Snapshot) -> float:
    return max(cur.at - prev.at, 1e-3) if prev is not None else 1.0


def queue_rows(prev: Snapshot | None, cur: Snapshot) -> list[Row]:
    seconds, rate = _interval(prev, cur), cur.queues["tick_rate"]
    rows = []
    for (ctrlr, queue), d in sorted(_queue_deltas(prev, cur).items()):
        rows.append({"ctrlr": ctrlr, "queue": queue, "lcore": d["lcore"], **_rates(d, seconds, rate)})
    return rows


def controller_rows(prev: Snapshot | None, cur: Snapshot) -> list[Row]:
    seconds, rate = _interval(prev, cur), cur.queues["tick_rate"]
    deltas = _queue_deltas(prev, cur)
    rows = []
    for c in cur.queues["controllers"]:
        mine = [d for (ctrlr, _), d in deltas.items() if ctrlr == c["ctrlr"]]
        total: dict[str, Any] = {name: sum(d[name] for d in mine) for name in QUEUE_COUNTERS}
        total["latency_histogram"] = [sum(bucket) for bucket in zip(*(d["latency_histogram"] for d in mine))]
        rows.append({"ctrlr": c["ctrlr"], "queues": len(mine), **_rates(total, seconds, rate)})
    return rows


def reactor_rows(prev: Snapshot | None, cur: Snapshot) -> list[Row]:
    before = {r["lcore"]: r for r in prev.reactors["reactors"]} if prev is not None else {}
    queues_on: dict[int, int] = {}
    for c in cur.queues["controllers"]:
        for q in c["queues"]:
            queues_on[q["lcore"]] = queues_on.get(q["lcore"], 0) + 1
    rows = []
    for r in cur.reactors["reactors"]:
        old = before.get(r["lcore"])
        busy = counter_delta(r["busy"], old["busy"] if old else None)
        idle = counter_delta(r["idle"], old["idle"] if old else None)
        threads = [t["name"] for t in r["lw_threads"] if t["name"] != "app_thread"]
        rows.append({"lcore": r["lcore"], "busy_pct": 100.0 * busy / (busy + idle) if busy + idle else 0.0,
                     "queues": queues_on.get(r["lcore"], 0), "controllers": ",".join(threads) or "-"})
    return rows


def bdev_rows(prev: Snapshot | None, cur: Snapshot) -> list[Row]:
    seconds, rate = _interval(prev, cur), cur.iostat["tick_rate"]
    before = {b["name"]: b for b in prev.iostat["bdevs"]} if prev is not None else {}
    rows = []
    for b in cur.iostat["bdevs"]:
        old = before.get(b["name"])
        d = {k: counter_delta(b[k], old[k] if old else None)
             for k in ("num_read_ops", "num_write_ops", "bytes_read", "bytes_written",
                       "read_latency_ticks", "write_latency_ticks")}
        ops = d["num_read_ops"] + d["num_write_ops"]
        ticks = d["read_latency_ticks"] + d["write_latency_ticks"]
        rows.append({"bdev": b["name"], "read_iops": d["num_read_ops"] / seconds,
                     "write_iops": d["num_write_ops"] / seconds,
                     "read_mbs": d["bytes_read"] / seconds / 1e6, "write_mbs": d["bytes_written"] / seconds / 1e6,
                     "lat_us": ticks / ops / rate * 1e6 if ops else None,
                     "errors": sum(b["io_error"].values())})
    return rows


ROWS_OF = {"reactors": reactor_rows, "controllers": controller_rows, "queues": queue_rows, "bdevs": bdev_rows}


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    width: int
    fmt: str = "{}"
    left: bool = False          # names are left-aligned, numbers right-aligned

    def fit(self, text: str) -> str:
        text = text[:self.width]
        return text.ljust(self.width) if self.left else text.rjust(self.width)


COLUMNS = {
    "reactors": [Column("lcore", "CORE", 5), Column("busy_pct", "BUSY%", 7, "{:.1f}"),
                 Column("queues", "QUEUES", 7), Column("controllers", "CONTROLLERS", 40, left=True)],
    "controllers": [Column("ctrlr", "CONTROLLER", 16, left=True), Column("queues", "QUEUES", 7),
                    Column("iops", "IOPS", 10, "{:.0f}"), Column("read_mbs", "READ MB/s", 10, "{:.1f}"),
                    Column("write_mbs", "WRITE MB/s", 11, "{:.1f}"), Column("lat_us", "LAT us", 9, "{:.1f}"),
                    Column("p99_us", "P99 us", 9, "{:.0f}"), Column("errors", "ERRORS", 7)],
    "queues": [Column("ctrlr", "CONTROLLER", 16, left=True), Column("queue", "QUEUE", 6), Column("lcore", "CORE", 5),
               Column("iops", "IOPS", 10, "{:.0f}"), Column("read_mbs", "READ MB/s", 10, "{:.1f}"),
               Column("write_mbs", "WRITE MB/s", 11, "{:.1f}"), Column("lat_us", "LAT us", 9, "{:.1f}"),
               Column("p99_us", "P99 us", 9, "{:.0f}"), Column("errors", "ERRORS", 7)],
    "bdevs": [Column("bdev", "BDEV", 16, left=True), Column("read_iops", "READ IOPS", 10, "{:.0f}"),
              Column("write_iops", "WRITE IOPS", 11, "{:.0f}"), Column("read_mbs", "READ MB/s", 10, "{:.1f}"),
              Column("write_mbs", "WRITE MB/s", 11, "{:.1f}"), Column("lat_us", "LAT us", 9, "{:.1f}"),
              Column("errors", "ERRORS", 7)],
}


@dataclass
class ViewState:
    """Which view is shown and how it is sorted (the keys change it)."""

    view: str = "controllers"
    sort_column: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VIEWS})
    descending: bool = False

    def press(self, key: str) -> bool:
        """Apply a key; False when it means quit."""
        if key in ("q", "Q"):
            return False
        if key in "1234" and len(key) == 1:
            self.view = VIEWS[int(key) - 1]
        elif key == "\t":
            self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        elif key in ("s", "S"):
            step = 1 if key == "s" else -1
            count = len(COLUMNS[self.view])
            self.sort_column[self.view] = (self.sort_column[self.view] + step) % count
        elif key == "r":
            self.descending = not self.descending
        return True

    @property
    def sort_key(self) -> str:
        return COLUMNS[self.view][self.sort_column[self.view]].key


def sorted_rows(rows: list[Row], key: str, descending: bool) -> list[Row]:
    """Rows by one column; rows without a value (no requests: no latency) go last either way."""
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    return sorted(present, key=lambda r: r[key], reverse=descending) + missing


def _cell(column: Column, value: Any) -> str:
    return column.fit("-" if value is None else column.fmt.format(value))


def render(state: ViewState, rows: list[Row], source: str, seconds: float, width: int) -> list[str]:
    """The screen's lines: a title, the view tabs, the header (the sort column marked), the rows."""
    columns = COLUMNS[state.view]
    tabs = "  ".join(("[%d %s]" if v == state.view else " %d %s ") % (i + 1, v) for i, v in enumerate(VIEWS))
    order = "desc" if state.descending else "asc"
    lines = [("vhostd-top  %s  every %.1f s  sort: %s %s" % (source, seconds, state.sort_key, order))[:width],
             tabs[:width],
             "keys: 1-4/Tab view  s/S sort  r reverse  q quit"[:width],
             ""]
    header = " ".join(c.fit(c.title + ("*" if c.key == state.sort_key else "")) for c in columns)
    lines.append(header[:width])
    for row in sorted_rows(rows, state.sort_key, state.descending):
        lines.append(" ".join(_cell(c, row.get(c.key)) for c in columns)[:width])
    if not rows:
        lines.append("(none)")
    return lines


def make_call(args: argparse.Namespace) -> tuple[Call, str]:
    if args.http:
        url = args.http.rstrip("/") + "/"
        return (lambda method: call_http(url, method, None, args.user, args.timeout)), url
    return (lambda method: call_unix(args.socket, method, None, args.timeout)), args.socket


def run_batch(call: Call, source: str, state: ViewState, delay_s: float, count: int, views: list[str]) -> None:
    prev = take_snapshot(call)
    for _ in range(count):
        time.sleep(delay_s)
        cur = take_snapshot(call)
        for view in views:
            state.view = view
            for line in render(state, ROWS_OF[view](prev, cur), source, cur.at - prev.at, 200):
                print(line)
            print()
        sys.stdout.flush()
        prev = cur


def run_screen(screen: Any, call: Call, source: str, state: ViewState, delay_s: float) -> None:
    curses.curs_set(0)
    screen.timeout(100)
    prev = take_snapshot(call)
    cur = prev
    next_refresh = time.monotonic() + delay_s
    error = ""
    while True:
        now = time.monotonic()
        if now >= next_refresh:
            try:
                prev, cur = cur, take_snapshot(call)
                error = ""
            except (OSError, RpcCallError, urllib.error.URLError, ValueError) as exc:
                error = "cannot read %s: %s" % (source, exc)
            next_refresh = now + delay_s
        height, width = screen.getmaxyx()
        lines = render(state, ROWS_OF[state.view](prev if prev is not cur else None, cur), source,
                       cur.at - prev.at if prev is not cur else delay_s, width - 1)
        if error:
            lines.insert(1, error[:width - 1])
        screen.erase()
        for y, line in enumerate(lines[:height]):
            screen.addstr(y, 0, line)
        screen.refresh()
        key = screen.getch()
        if key != -1 and not state.press(chr(key) if key < 256 else ""):
            return


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vhostd-top", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-s", dest="socket", default="/var/tmp/spdk.sock", help="RPC Unix socket")
    ap.add_argument("--http", metavar="URL", help="read over HTTP instead (e.g. http://127.0.0.1:9250)")
    ap.add_argument("--user", metavar="USER:PASSWORD", help="HTTP Basic credentials")
    ap.add_argument("-d", "--delay", type=float, default=1.0, help="seconds between refreshes (default 1)")
    ap.add_argument("-v", "--view", choices=VIEWS, default="controllers", help="the view shown first")
    ap.add_argument("--batch", type=int, metavar="N", help="print N refreshes of every view as text and exit")
    ap.add_argument("-t", "--timeout", type=float, default=5.0, help="RPC timeout in seconds")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    call, source = make_call(args)
    state = ViewState(view=args.view)
    try:
        if args.batch is not None:
            run_batch(call, source, state, args.delay, args.batch, list(VIEWS))
        else:
            curses.wrapper(run_screen, call, source, state, args.delay)
    except RpcCallError as exc:
        print("vhostd-top: %s answered error %d: %s" % (source, exc.code, exc.message), file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError) as exc:
        print("vhostd-top: cannot read %s: %s" % (source, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
