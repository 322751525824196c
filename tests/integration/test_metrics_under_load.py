"""/metrics and thread_get_stats move with the load: I/O from our front-end through a running
daemon raises every per-queue, per-reactor and per-bdev counter; an idle spell raises idle time."""

import time

from tests.helpers.frontend_load import ReadStream, metric, scrape
from tests.helpers.ports import free_tcp_port
from vhostd import _dataplane as dp
from vhostd.initiator.blk import VirtioBlk

BLOCKS = 16384


def controller_thread(d, name="vhost.0"):
    (thread,) = [t for t in d.rpc("thread_get_stats")["threads"] if t["name"] == name]
    return thread


def test_counters_move_with_the_load(daemon):
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port)
    d.rpc("bdev_malloc_create", name="M0", num_blocks=BLOCKS, block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="M0")
    with VirtioBlk(str(d.socket_dir / "vhost.0"), num_queues=2, queue_size=128, memory_bytes=32 << 20,
                   event_idx=False).open() as dev:
        time.sleep(0.05)                               # the reactor goes to sleep
        before, thread_before = scrape(port), controller_thread(d)
        gen = dp.LoadGenerator(dev.frontend.queues, 16, 4096, 50, BLOCKS * 512 // 4096, 0.5, ramp_s=0)
        gen.run()
        gen.close()
        # Interrupt-driven requests with coalescing on, for the notification counters.
        d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=50, iops_threshold=1000)
        dev.frontend.queues[0].configure(interrupts=True)
        stream = ReadStream(dev)
        stream.run(50_000)
        stream.close()
        time.sleep(0.05)
        after, thread_after = scrape(port), controller_thread(d)

    def grew(name, **labels):
        return metric(after, name, **labels) > metric(before, name, **labels)

    for queue in ("0", "1"):
        q = dict(ctrlr="vhost.0", queue=queue)
        assert grew("vhostd_queue_requests_total", **q)
        assert grew("vhostd_queue_ops_total", op="read", **q)
        assert grew("vhostd_queue_ops_total", op="write", **q)
        assert grew("vhostd_queue_bytes_total", op="read", **q)
        assert grew("vhostd_queue_bytes_total", op="write", **q)
        assert grew("vhostd_queue_latency_seconds_count", **q)
        assert grew("vhostd_queue_latency_seconds_sum", **q)
        assert metric(after, "vhostd_queue_latency_seconds_count", **q) == \
            metric(after, "vhostd_queue_requests_total", **q)
    assert grew("vhostd_queue_notifications_total", ctrlr="vhost.0", queue="0")
    assert grew("vhostd_queue_coalesced_notifications_total", ctrlr="vhost.0", queue="0")
    for name in ("busy_seconds_total", "idle_seconds_total", "poll_passes_total", "sleeps_total",
                 "wakeups_total", "notifications_total", "coalesced_notifications_total"):
        assert grew("vhostd_reactor_" + name, lcore="0"), name
    for op in ("read", "write"):
        assert grew("vhostd_bdev_ops_total", bdev="M0", op=op)
        assert grew("vhostd_bdev_bytes_total", bdev="M0", op=op)
    assert thread_after["busy"] > thread_before["busy"]


def test_idle_time_grows_while_the_reactor_sleeps(daemon):
    d = daemon()
    d.rpc("bdev_malloc_create", name="M0", num_blocks=BLOCKS, block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="M0")
    with VirtioBlk(str(d.socket_dir / "vhost.0"), queue_size=128, memory_bytes=8 << 20).open() as dev:
        dev.read(0, 4096)
        time.sleep(0.05)
        sleeps = d.rpc("framework_get_reactors")["reactors"][0]
        first = controller_thread(d)
        time.sleep(0.3)
        second = controller_thread(d)
        still = d.rpc("framework_get_reactors")["reactors"][0]
        dev.read(0, 4096)                              # and it still serves
    # The reactor sleeps through the spell (nothing wakes it), and its idle time grows all along.
    assert still["idle"] > sleeps["idle"]
    assert second["idle"] > first["idle"]
    assert second["idle"] - first["idle"] > 10 * (second["busy"] - first["busy"])
