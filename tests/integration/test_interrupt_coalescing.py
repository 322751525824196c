"""Interrupt coalescing (vhost_controller_set_coalescing) through a running daemon and our
front-end: counts of call-eventfd signals, never timings."""

import time

from tests.helpers.frontend_load import ReadStream, drain_signals, metric, scrape, wait_signal
from tests.helpers.ports import free_tcp_port
from vhostd.initiator.blk import VirtioBlk

REQUESTS = 100_000


def open_disk(d, name="vhost.0"):
    # No EVENT_IDX and interrupts always wanted: every pass with completions asks for one.
    dev = VirtioBlk(str(d.socket_dir / name), queue_size=128, memory_bytes=16 << 20, event_idx=False).open()
    dev.frontend.queues[0].configure(interrupts=True)
    return dev


def test_coalescing_under_load_sends_fewer_signals_per_request(daemon):
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port)
    d.rpc("bdev_malloc_create", name="M0", num_blocks=16384, block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="M0")
    with open_disk(d) as dev:
        stream = ReadStream(dev)
        call_fd = stream.call_fd
        drain_signals(call_fd)
        stream.run(REQUESTS)
        signals_off = drain_signals(call_fd)
        d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=50, iops_threshold=1000)
        stream.run(REQUESTS)
        signals_on = drain_signals(call_fd)
        stream.close()
        samples = scrape(port)
    # Without coalescing nearly every request completes in a pass of its own and is signalled;
    # with it, the reactor spaces interrupts once the measured rate exceeds the threshold.
    assert signals_off > REQUESTS // 4
    assert signals_on * 3 < signals_off
    assert metric(samples, "vhostd_queue_coalesced_notifications_total", ctrlr="vhost.0") > 0
    assert metric(samples, "vhostd_reactor_coalesced_notifications_total") > 0
    (info,) = d.rpc("vhost_get_controllers")
    assert (info["delay_base_us"], info["iops_threshold"]) == (50, 1000)


def test_after_an_idle_spell_every_request_is_signalled_at_once(daemon):
    port = free_tcp_port()
    d = daemon("--http", "127.0.0.1:%d" % port)
    d.rpc("bdev_malloc_create", name="M0", num_blocks=16384, block_size=512)
    d.rpc("vhost_create_blk_controller", ctrlr="vhost.0", dev_name="M0")
    d.rpc("vhost_controller_set_coalescing", ctrlr="vhost.0", delay_base_us=1000, iops_threshold=100)
    with open_disk(d) as dev:
        stream = ReadStream(dev)
        stream.run(REQUESTS)                 # heavy load first: the interrupt gap is large
        time.sleep(0.05)                     # the reactor sleeps, sending what it held back
        drain_signals(stream.call_fd)
        held_before = metric(scrape(port), "vhostd_queue_coalesced_notifications_total", ctrlr="vhost.0")
        assert held_before > 0
        for _ in range(20):
            time.sleep(0.03)                 # longer than two rate windows
            stream.one()
            assert wait_signal(stream.call_fd) == 1
        stream.close()
        held_after = metric(scrape(port), "vhostd_queue_coalesced_notifications_total", ctrlr="vhost.0")
    # One signal per request, and none of them was held back for coalescing.
    assert held_after == held_before
