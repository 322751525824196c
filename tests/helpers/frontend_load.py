"""Load and measurements from our front-end's side for integration tests: a stream of requests
posted one at a time, call-eventfd signal counts, /metrics samples."""

from __future__ import annotations

import os
import select
import struct
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from vhostd.initiator.blk import T_IN, VirtioBlk

BLOCK = 512


def drain_signals(fd: int) -> int:
    """Call-eventfd signals received since the last drain (the eventfd adds up the writes)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_signal(fd: int, timeout_s: float = 5.0) -> int:
    """Wait until the eventfd has been signalled, then drain it."""
    readable, _, _ = select.select([fd], [], [], timeout_s)
    return drain_signals(fd) if readable else 0


class ReadStream:
    """Read requests of one block on queue 0, posted and published one at a time with up to
    depth in flight; completions are reaped by polling the used ring.  With the queue set to
    want interrupts (and no EVENT_IDX) the device decides about an interrupt at every pass, as
    for a guest whose interrupt handler reaps completions."""

    def __init__(self, dev: VirtioBlk, depth: int = 8, queue: int = 0) -> None:
        self.fe = dev.frontend
        self.queue = self.fe.queues[queue]
        self.call_fd = self.fe.vqs[queue].call_fd
        self.buffers = []
        for i in range(depth):
            gpa = self.fe.memory.alloc(4096)
            self.fe.memory.write(gpa, struct.pack("<IIQ", T_IN, 0, i * 8))
            self.buffers.append(gpa)

    def run(self, count: int) -> None:
        """Post count requests and wait for all of them."""
        free = list(range(len(self.buffers)))
        by_head: dict[int, int] = {}
        sent = done = 0
        while done < count:
            while free and sent < count:
                slot = free.pop()
                gpa = self.buffers[slot]
                head = self.queue.add_chain([(gpa, 16, False), (gpa + 512, BLOCK, True),
                                             (gpa + 1024, 1, True)])
                by_head[head] = slot
                self.queue.flush()
                sent += 1
            for head, _ in self.queue.poll():
                free.append(by_head.pop(head))
                done += 1

    def one(self) -> None:
        """One request, waited for by polling."""
        self.run(1)

    def close(self) -> None:
        for gpa in self.buffers:
            self.fe.memory.free(gpa)
        self.buffers = []


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics: {(sample name, sorted label pairs): value}."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    """The sum of the samples called name whose labels include the given ones."""
    want = {k: str(v) for k, v in labels.items()}
    return sum(value for (n, pairs), value in samples.items()
               if n == name and want.items() <= dict(pairs).items())
