"""vhostd watched by a real Prometheus: the shipped scrape config (docker/prometheus.yml, with HTTP
Basic auth) pointed at a live daemon, the shipped alerting rules loaded, a vhostd-bench run in
between.  PromQL over Prometheus's HTTP API gives per-controller IOPS, bandwidth, latency and
reactor busy share in a sane range of what the benchmark measured itself; every expression of the
Grafana dashboard and of the rules returns series; the rules fire where they should."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.ports import free_tcp_port
from tests.helpers.prometheus import Prometheus

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "vhostd.json"
RULES = ROOT / "docker" / "alerts.yml"
WINDOW = "5s"

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                                reason="prometheus is not installed")


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, Grafana's variables replaced as Grafana
    would: all instances, a rate interval of WINDOW."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", WINDOW).replace("$instance", ".*")
            exprs.append((panel["title"], expr))
    return exprs


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def condition_operand(expr: str) -> str:
    """An alert expression without its final threshold comparison: the series it compares."""
    match = re.match(r"(?s)^(.*\S)\s*(==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", expr.strip())
    assert match, expr
    return match.group(1)


def test_promtool_accepts_the_rules():
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS: %d rules found" % len(rules()) in result.stdout, result.stdout + result.stderr


@pytest.fixture
def watched(daemon, tmp_path):
    """A daemon (blk vhost.0 on Malloc0, and vhost.1 with no front-end) scraped every second by a
    Prometheus configured from docker/prometheus.yml."""
    (tmp_path / "http-auth").write_text("prometheus:scrape-secret\n")
    (tmp_path / "password").write_text("scrape-secret\n")
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port, "--http-auth", str(tmp_path / "http-auth"))
    d.spdk("bdev_malloc_create", "-b", "Malloc0", "64", "512")
    d.spdk("bdev_malloc_create", "-b", "Malloc1", "8", "512")
    d.spdk("vhost_create_blk_controller", "vhost.0", "Malloc0")
    d.spdk("vhost_create_blk_controller", "vhost.1", "Malloc1")
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["basic_auth"]["password_file"] = str(tmp_path / "password")
    job["static_configs"] = [{"targets": ["127.0.0.1:%d" % port]}]
    prom = Prometheus(tmp_path, config).start()
    try:
        prom.wait_for('up{job="vhostd"} == 1', "the vhostd target is up")
        yield d, prom
    finally:
        prom.stop()


def one(result: list[dict], **labels) -> float:
    values = [float(r["value"][1]) for r in result if labels.items() <= r["metric"].items()]
    assert len(values) == 1, result
    return values[0]


def test_prometheus_figures_match_the_benchmark_and_every_dashboard_and_rule_expression_has_series(watched):
    d, prom = watched
    bench = subprocess.run(
        [sys.executable, "-m", "vhostd.initiator.bench", "--socket", str(d.socket_dir / "vhost.0"),
         "--type", "blk", "--rw", "randrw", "--qd", "8", "--time", "8", "--ramp", "1", "--json",
         "--target-pid", str(d.proc.pid)], capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert bench.returncode == 0, bench.stderr
    (measured,) = json.loads(bench.stdout)["results"]
    assert measured["errors"] == 0 and measured["iops"] > 0
    # Let a scrape land after the run, then look at the last WINDOW of it (well inside the 8 s;
    # the queue series end with the front-end's connection).
    at = ended - 1.5
    prom.wait_for('timestamp(up{job="vhostd"}) > %.3f' % ended, "a scrape after the run")

    iops = one(prom.query('sum by (ctrlr) (rate(vhostd_queue_requests_total[%s]))' % WINDOW, at), ctrlr="vhost.0")
    bandwidth = sum(float(r["value"][1]) for r in prom.query(
        'sum by (ctrlr, op) (rate(vhostd_queue_bytes_total{ctrlr="vhost.0"}[%s]))' % WINDOW, at))
    mean_s = one(prom.query('sum by (ctrlr) (rate(vhostd_queue_latency_seconds_sum[{w}])) / '
                            'sum by (ctrlr) (rate(vhostd_queue_latency_seconds_count[{w}]))'.format(w=WINDOW), at),
                 ctrlr="vhost.0")
    p50_s, p99_s = (one(prom.query('histogram_quantile(%s, sum by (ctrlr, le) (rate(vhostd_queue_latency_seconds_bucket[%s])))'
                                   % (q, WINDOW), at), ctrlr="vhost.0") for q in (0.5, 0.99))
    busy = one(prom.query('rate(vhostd_reactor_busy_seconds_total[{w}]) / (rate(vhostd_reactor_busy_seconds_total[{w}])'
                          ' + rate(vhostd_reactor_idle_seconds_total[{w}]))'.format(w=WINDOW), at), lcore="0")
    print("benchmark: %.0f IOPS %.1f MB/s mean %.1f us p99 %.1f us; Prometheus: %.0f IOPS %.1f MB/s "
          "mean %.1f us p50 %.1f us p99 %.1f us, reactor busy %.2f"
          % (measured["iops"], measured["mb_per_s"], measured["lat_mean_us"], measured["lat_p99_us"],
             iops, bandwidth / 1e6, mean_s * 1e6, p50_s * 1e6, p99_s * 1e6, busy))
    # The same requests counted at both ends: rates agree (the run's average against 5 s of it).
    assert 0.5 * measured["iops"] <= iops <= 1.5 * measured["iops"]
    assert 0.5 * measured["mb_per_s"] <= bandwidth / 1e6 <= 1.5 * measured["mb_per_s"]
    assert bandwidth == pytest.approx(iops * 4096, rel=0.01)
    # The target times pop to push, the client submit to reap: the target's share is the smaller
    # (this caught requests charged from the start of a reactor pass they arrived during: 4x the
    # client's mean). 1.5x for the 5 s window against the whole run; quantiles come from log2
    # buckets, so they may overshoot by up to 2x more.
    assert 0 < mean_s * 1e6 <= 1.5 * measured["lat_mean_us"]
    assert 0 < p50_s <= p99_s <= 2 * 1.5 * measured["lat_p99_us"] / 1e6
    assert 0 < busy <= 1

    for title, expr in dashboard_exprs():
        assert prom.query(expr, at), "dashboard panel %r: no series for %s" % (title, expr)
    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules())
    assert all(r["health"] == "ok" for r in loaded), loaded
    for rule in rules():
        assert prom.query(condition_operand(rule["expr"]), at), "rule %s: no series" % rule["alert"]
    # The controller nobody attached to is the one the rule names; vhost.0 had its front-end then.
    lonely = prom.query(next(r["expr"] for r in rules() if r["alert"] == "VhostdControllerWithoutFrontend"), at)
    assert [r["metric"]["ctrlr"] for r in lonely] == ["vhost.1"]


def test_daemon_down_rule_fires_when_vhostd_stops(watched):
    d, prom = watched
    down = next(r["expr"] for r in rules() if r["alert"] == "VhostdDown")
    assert prom.query(down) == []
    d.stop()
    prom.wait_for(down, "up == 0 once vhostd stopped")
