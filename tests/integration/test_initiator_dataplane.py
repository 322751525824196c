"""The initiator's C request path (vdrv_submit, vdrv_poll, the load generator) against vhostd's
own device side in the same process: a reactor polling a blk VirtQueue that maps the initiator's
memory, no socket in between."""

import os

import pytest

from vhostd import _dataplane as dp
from tests.helpers.waiting import wait_for

QUEUE_SIZE = 256


class Loopback:
    """A DriverQueue on DriverMemory (3 regions) served by a reactor through GuestMemory."""

    def __init__(self, disk, event_idx=True, indirect=True):
        self.memory = dp.DriverMemory(32 << 20, 3)
        self.device_memory = dp.GuestMemory([(g, s, u, off, self.memory.fd)
                                             for g, s, u, off in self.memory.regions])
        self.driver = dp.DriverQueue(self.memory, 0, QUEUE_SIZE, event_idx=event_idx,
                                     indirect=indirect, device=dp.DEVICE_BLK, bounce_bytes=65536)
        self.vq = dp.VirtQueue(0)
        desc, used, avail = self.driver.addresses()
        self.vq.configure(self.device_memory, QUEUE_SIZE, desc, avail, used, 0, event_idx, indirect)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        kick, call, err = self.fds
        self.vq.set_fds(kick, call, err)
        self.driver.set_fds(kick, call)
        self.disk = disk
        self.device = dp.BlkDevice(disk, False, b"loopback", 65536, 65536)
        self.device.attach(self.vq)
        self.reactor = dp.Reactor(0, 200.0)
        self.reactor.start()
        msg = self.reactor.post_add_queue(self.vq)
        wait_for(lambda: msg.done)

    def close(self):
        msg = self.reactor.post_remove_queue(self.vq)
        wait_for(lambda: msg.done)
        self.device.detach(self.vq)
        stop = self.reactor.post_stop()
        self.reactor.join(5)
        assert stop.done
        for fd in self.fds:
            os.close(fd)


@pytest.fixture(params=[(True, True), (False, False)], ids=["event_idx+indirect", "plain"])
def loop(request):
    rig = Loopback(dp.Disk.malloc(512, 1 << 15), *request.param)
    yield rig
    rig.close()


def test_bdev_ios_through_the_driver_reach_the_disk(loop):
    q = loop.driver
    q.run_io("write", 8192, b"\x5a" * 8192)
    assert q.run_io("read", 8192, length=8192) == b"\x5a" * 8192
    q.run_io("flush", 0)
    q.run_io("write_zeroes", 12288, length=4096)
    assert q.run_io("read", 8192, length=8192) == b"\x5a" * 4096 + bytes(4096)
    q.run_io("unmap", 8192, length=4096)
    assert q.run_io("read", 8192, length=4096) == bytes(4096)
    assert q.stats()["bounced"] >= 4       # Python buffers are outside driver memory


def test_failed_io_reports_the_device_status(loop):
    with pytest.raises(OSError) as err:
        loop.driver.run_io("read", (1 << 15) * 512, length=512)
    assert err.value.errno == 5


def test_load_generator_completes_every_request_it_submits(loop):
    gen = dp.LoadGenerator([loop.driver], 32, 4096, 50, 1024, 0.3)
    gen.run()
    result = gen.result()
    gen.close()
    assert result["ops"] > 1000 and result["errors"] == 0 and result["lost"] == 0
    assert result["read_ops"] + result["write_ops"] == result["ops"]
    assert sum(result["histogram"].values()) == result["ops"]
    assert loop.driver.inflight == 0
    assert loop.vq.stats()["requests"] == loop.driver.stats()["completed"]


def test_load_generator_sleeps_on_the_call_eventfd_in_interrupt_mode(loop):
    gen = dp.LoadGenerator([loop.driver], 4, 4096, 100, 1024, 0.3, interrupts=True)
    gen.run()
    result = gen.result()
    gen.close()
    assert result["ops"] > 100 and result["errors"] == 0
    assert loop.driver.stats()["waits"] > 0
