"""vhostd-top on a real terminal (tmux) against a daemon under load from vhostd-bench: the views
show the controller's IOPS, the bdev, the reactor; keys switch views, sort and quit; it reads over
the Unix socket and over HTTP with Basic auth.  The rate arithmetic is checked on snapshots."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers.ports import free_tcp_port
from tests.helpers.tmux import TmuxScreen
from vhostd.latency_histogram import quantile_s
from vhostd.top import Snapshot, ViewState, controller_rows, queue_rows, render

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None and not os.environ.get("CI"),
                                reason="tmux is not installed")


@pytest.fixture
def screen(tmp_path):
    s = TmuxScreen(tmp_path)
    yield s
    s.close()


@pytest.fixture
def loaded(daemon, tmp_path):
    """A daemon with a blk controller on Malloc0 that vhostd-bench keeps busy, serving HTTP with
    Basic auth too."""
    auth = tmp_path / "http-auth"
    auth.write_text("operator:s3cret\n")
    auth_port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % auth_port, "--http-auth", str(auth))
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "32", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    load = subprocess.Popen([sys.executable, "-m", "vhostd.initiator.bench", "--socket",
                             str(d.socket_dir / "vhost.0"), "--type", "blk", "--rw", "randrw", "--qd", "4",
                             "--time", "120", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    d.http_url = "http://127.0.0.1:%d" % auth_port
    yield d
    load.kill()
    load.wait()


def _top(*args):
    return [sys.executable, "-m", "vhostd.top", "-d", "0.5", *args]


def _row(screen_text, first_cell):
    for line in screen_text.splitlines():
        cells = line.split()
        if cells and cells[0] == first_cell:
            return cells
    return None


def _busy_controller(text, iops_cell=2):
    """vhost.0's row shows IOPS above zero (the IOPS cell: 2 in the controllers view, 3 in queues)."""
    row = _row(text, "vhost.0")
    return row is not None and len(row) > iops_cell and row[iops_cell].isdigit() and int(row[iops_cell]) > 0


def test_top_over_the_unix_socket_shows_load_and_answers_keys(loaded, screen):
    screen.start(_top("-s", loaded.rpc_socket))
    text = screen.wait_for(_busy_controller, "vhost.0 with IOPS")
    assert "[2 controllers]" in text and "CONTROLLER*" in text
    screen.press("4")
    text = screen.wait_for(lambda t: "[4 bdevs]" in t and _row(t, "Malloc0") is not None, "the bdevs view")
    assert int(_row(text, "Malloc0")[1]) > 0 or int(_row(text, "Malloc0")[2]) > 0
    screen.press("s")
    screen.wait_for(lambda t: "READ IOPS*" in t and "sort: read_iops" in t, "sorted by read IOPS")
    screen.press("1")
    text = screen.wait_for(lambda t: "[1 reactors]" in t and _row(t, "0") is not None, "the reactors view")
    core = _row(text, "0")
    assert float(core[1]) > 0 and core[2] == "1" and "vhost.0" in core[3]
    screen.press("Tab")
    screen.wait_for(lambda t: "[2 controllers]" in t, "Tab to the next view")
    screen.press("3")
    text = screen.wait_for(lambda t: "[3 queues]" in t and _busy_controller(t, 3), "the queues view")
    assert _row(text, "vhost.0")[1] == "0"       # queue 0
    screen.press("q")
    screen.wait_for(lambda t: screen.exited(), "vhostd-top ended on q")


def test_top_over_http_with_basic_auth(loaded, screen):
    screen.start(_top("--http", loaded.http_url, "--user", "operator:s3cret"))
    screen.wait_for(_busy_controller, "vhost.0 with IOPS over HTTP")
    screen.press("q")
    screen.wait_for(lambda t: screen.exited(), "vhostd-top ended on q")


def test_top_with_wrong_credentials_says_so(loaded):
    result = subprocess.run(_top("--http", loaded.http_url, "--user", "operator:wrong", "--batch", "1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "401" in result.stderr


def test_top_without_a_daemon_says_what_it_cannot_read(tmp_path):
    result = subprocess.run(_top("-s", str(tmp_path / "none.sock"), "--batch", "1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot read" in result.stderr and "none.sock" in result.stderr


def _snapshot(at, requests, latency_ticks, histogram, lcore=0):
    queue = {"queue": 0, "lcore": lcore, "requests": requests, "read_ops": requests, "write_ops": 0,
             "bytes_read": requests * 4096, "bytes_written": 0, "errors": 0, "bad_chains": 0,
             "latency_ticks": latency_ticks, "latency_histogram": histogram}
    return Snapshot(at, {"reactors": []}, {"tick_rate": 1_000_000, "controllers": [{"ctrlr": "c", "queues": [queue]}]},
                    {"tick_rate": 1_000_000, "bdevs": []})


def test_rates_are_deltas_over_the_interval_and_a_restarted_queue_counts_from_zero():
    before = _snapshot(10.0, 1000, 10_000, [0, 500, 500, 0])
    after = _snapshot(12.0, 3000, 50_000, [0, 500, 2400, 100])
    (row,) = controller_rows(before, after)
    assert row["iops"] == 1000 and row["read_mbs"] == pytest.approx(2000 * 4096 / 2 / 1e6)
    assert row["lat_us"] == pytest.approx(40_000 / 2000)                  # ticks are µs here
    # 1900 of the 2000 new requests took under 8 ticks, the rest under 16: p99 is in bucket 3.
    assert row["p99_us"] == 16
    restarted = _snapshot(13.0, 300, 3000, [0, 300, 0, 0])
    (q,) = queue_rows(after, restarted)
    assert q["iops"] == 300 and q["lat_us"] == 10


def test_histogram_quantile_is_the_upper_bound_of_the_crossing_bucket():
    assert quantile_s([0, 0, 0], 0.99, 1) is None
    assert quantile_s([90, 9, 1], 0.5, 1) == 2
    assert quantile_s([90, 9, 1], 0.99, 1) == 4


def test_render_marks_the_sort_column_and_puts_rows_without_latency_last():
    state = ViewState(view="controllers")
    state.press("s"); state.press("s"); state.press("r")       # IOPS, descending
    rows = [{"ctrlr": "idle", "queues": 0, "iops": 0.0, "read_mbs": 0.0, "write_mbs": 0.0, "lat_us": None,
             "p99_us": None, "errors": 0},
            {"ctrlr": "busy", "queues": 1, "iops": 5.0, "read_mbs": 0.0, "write_mbs": 0.0, "lat_us": 3.0,
             "p99_us": 4.0, "errors": 0}]
    lines = render(state, rows, "sock", 1.0, 200)
    assert "IOPS*" in lines[4] and "sort: iops desc" in lines[0]
    assert [l.split()[0] for l in lines[5:]] == ["busy", "idle"]
    assert re.search(r"idle\s+0\s+0\s+0\.0\s+0\.0\s+-\s+-\s+0", lines[6])
