"""Idle reactors sleep: a daemon serving 16 blk controllers, each with a connected front-end and
no I/O, spends at most 1 % of a CPU in its reactor threads, and serves I/O at once afterwards."""

import time
from contextlib import ExitStack

from tests.helpers.waiting import wait_for
from vhostd.initiator.blk import VirtioBlk
from vhostd.initiator.targets import proc_cpu_seconds

CONTROLLERS = 16
MEASURE_S = 2.0


def reactor_cpu_seconds(d) -> float:
    """utime + stime of the daemon's reactor threads, from /proc/PID/task/TID/stat."""
    tids = [r["tid"] for r in d.rpc("framework_get_reactors")["reactors"]]
    return sum(proc_cpu_seconds(d.proc.pid, tid) for tid in tids)


def test_sixteen_connected_idle_controllers_cost_under_one_percent(daemon):
    d = daemon(cores="0x3")
    for i in range(CONTROLLERS):
        d.rpc("bdev_malloc_create", name="M%d" % i, num_blocks=2048, block_size=512)
        d.rpc("vhost_create_blk_controller", ctrlr="vhost.%d" % i, dev_name="M%d" % i)
    with ExitStack() as stack:
        devs = [stack.enter_context(VirtioBlk(str(d.socket_dir / ("vhost.%d" % i)), num_queues=2,
                                              queue_size=64, memory_bytes=2 << 20).open())
                for i in range(CONTROLLERS)]
        # The front-end does not wait for the back-end to finish starting its queues (nor does QEMU).
        wait_for(lambda: all(info["sessions"] and info["sessions"][0]["started"]
                             for info in d.rpc("vhost_get_controllers")))
        time.sleep(0.5)                                  # the idle spell
        cpu0, t0 = reactor_cpu_seconds(d), time.monotonic()
        time.sleep(MEASURE_S)
        cpu1, t1 = reactor_cpu_seconds(d), time.monotonic()
        percent = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        print("reactor CPU over %.1f s idle with %d connected controllers: %.2f %%" % (t1 - t0, CONTROLLERS, percent))
        assert percent <= 1.0
        for i, dev in enumerate(devs):
            dev.write(8, bytes([i + 1]) * 4096, queue=i % 2)
            assert dev.read(8, 4096) == bytes([i + 1]) * 4096
