"""Prometheus metrics of one daemon: process, RPC calls, bdev I/O, vhost queues, reactors.

Everything is read from the live objects at scrape time (the data plane's counters live in C and
are summed here); only RPC calls are counted as they happen.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .latency_histogram import bucket_upper_bound_s

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.rpc_calls = Counter("vhostd_rpc_calls", "JSON-RPC requests by method and outcome",
                                 ["method", "outcome"], registry=self.registry)
        self.registry.register(_DataPlaneCollector(app))

    def observe_rpc(self, method: str, outcome: str) -> None:
        self.rpc_calls.labels(method, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DataPlaneCollector:
    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self):
        yield from self._bdevs()
        yield from self._queues()
        yield from self._reactors()

    def _bdevs(self):
        ops = CounterMetricFamily("vhostd_bdev_ops", "Completed bdev I/O operations",
                                  labels=["bdev", "op"])
        nbytes = CounterMetricFamily("vhostd_bdev_bytes", "Bytes moved by bdev I/O",
                                     labels=["bdev", "op"])
        errors = CounterMetricFamily("vhostd_bdev_errors", "Failed bdev I/O operations", labels=["bdev"])
        latency = CounterMetricFamily("vhostd_bdev_latency_seconds",
                                      "Summed latency of completed bdev I/O", labels=["bdev", "op"])
        rate = self.app.tick_rate
        for bdev in self.app.bdevs:
            s = bdev.disk.iostat()
            for op, count, size, lat in (("read", "num_read_ops", "bytes_read", "read_latency_ticks"),
                                         ("write", "num_write_ops", "bytes_written", "write_latency_ticks"),
                                         ("unmap", "num_unmap_ops", "bytes_unmapped", "unmap_latency_ticks")):
                ops.add_metric([bdev.name, op], s[count])
                nbytes.add_metric([bdev.name, op], s[size])
                latency.add_metric([bdev.name, op], s[lat] / rate)
            errors.add_metric([bdev.name], sum(s["io_error"].values()))
        yield from (ops, nbytes, errors, latency)

    def _queues(self):
        labels = ["ctrlr", "queue"]
        requests = CounterMetricFamily("vhostd_queue_requests", "Requests completed per virtqueue", labels=labels)
        ops = CounterMetricFamily("vhostd_queue_ops", "Requests per virtqueue by kind", labels=labels + ["op"])
        nbytes = CounterMetricFamily("vhostd_queue_bytes", "Data bytes per virtqueue", labels=labels + ["op"])
        errors = CounterMetricFamily("vhostd_queue_errors", "Requests completed with an error status", labels=labels)
        bad = CounterMetricFamily("vhostd_queue_bad_chains", "Descriptor chains rejected", labels=labels)
        notify = CounterMetricFamily("vhostd_queue_notifications", "Interrupts sent to the guest", labels=labels)
        suppressed = CounterMetricFamily("vhostd_queue_suppressed_notifications",
                                         "Interrupt decisions the driver did not want (EVENT_IDX, NO_INTERRUPT)",
                                         labels=labels)
        coalesced = CounterMetricFamily("vhostd_queue_coalesced_notifications",
                                        "Passes whose completions coalescing held back for a later interrupt",
                                        labels=labels)
        kicks = CounterMetricFamily("vhostd_queue_kicks", "Guest kicks that woke a sleeping reactor", labels=labels)
        latency = HistogramMetricFamily("vhostd_queue_latency_seconds",
                                        "Request latency from pop to push", labels=labels)
        connected = GaugeMetricFamily("vhostd_controller_frontend_connected",
                                      "1 while a front-end (QEMU) is connected to the controller",
                                      labels=["ctrlr", "type"])
        rate = self.app.tick_rate
        for ctrlr in self.app.vhost.controllers.values():
            connected.add_metric([ctrlr.name, ctrlr.kind], 1 if ctrlr.connection is not None else 0)
            for q in ctrlr.queue_stats():
                key = [ctrlr.name, str(q["queue"])]
                requests.add_metric(key, q["requests"])
                ops.add_metric(key + ["read"], q["read_ops"])
                ops.add_metric(key + ["write"], q["write_ops"])
                ops.add_metric(key + ["other"], q["other_ops"])
                nbytes.add_metric(key + ["read"], q["bytes_read"])
                nbytes.add_metric(key + ["write"], q["bytes_written"])
                errors.add_metric(key, q["errors"])
                bad.add_metric(key, q["bad_chains"])
                notify.add_metric(key, q["notifications"])
                suppressed.add_metric(key, q["suppressed"])
                coalesced.add_metric(key, q["coalesced"])
                kicks.add_metric(key, q["kicks"])
                buckets, total = [], 0
                for b, count in enumerate(q["latency_histogram"]):
                    total += count
                    buckets.append(("%.9g" % bucket_upper_bound_s(b, rate), total))
                buckets.append(("+Inf", total))
                latency.add_metric(key, buckets, q["latency_ticks"] / rate)
        yield from (connected, requests, ops, nbytes, errors, bad, notify, suppressed, coalesced, kicks, latency)

    def _reactors(self):
        busy = CounterMetricFamily("vhostd_reactor_busy_seconds", "Time reactors spent on work", labels=["lcore"])
        idle = CounterMetricFamily("vhostd_reactor_idle_seconds", "Time reactors polled or slept without work",
                                   labels=["lcore"])
        passes = CounterMetricFamily("vhostd_reactor_poll_passes", "Poll passes", labels=["lcore"])
        sleeps = CounterMetricFamily("vhostd_reactor_sleeps", "Times a reactor went to sleep", labels=["lcore"])
        wakeups = CounterMetricFamily("vhostd_reactor_wakeups", "Times a sleeping reactor woke", labels=["lcore"])
        notify = CounterMetricFamily("vhostd_reactor_notifications", "Interrupts reactors sent", labels=["lcore"])
        coalesced = CounterMetricFamily("vhostd_reactor_coalesced_notifications",
                                        "Passes whose completions coalescing held back", labels=["lcore"])
        queues = GaugeMetricFamily("vhostd_reactor_queues", "Virtqueues a reactor polls", labels=["lcore"])
        rate = self.app.tick_rate
        for r in self.app.reactors.reactors:
            s = r.stats()
            key = [str(r.lcore)]
            busy.add_metric(key, s["busy_ticks"] / rate)
            idle.add_metric(key, s["idle_ticks"] / rate)
            passes.add_metric(key, s["poll_passes"])
            sleeps.add_metric(key, s["sleeps"])
            wakeups.add_metric(key, s["wakeups"])
            notify.add_metric(key, s["notifications"])
            coalesced.add_metric(key, s["coalesced"])
            queues.add_metric(key, s["queues"])
        yield from (busy, idle, passes, sleeps, wakeups, notify, coalesced, queues)
