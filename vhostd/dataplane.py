"""The control plane's side of the reactors: starting and stopping them, waiting for their
mailbox acknowledgements on the asyncio loop, and placing queues on them.

A reactor acknowledges a mailbox message by setting its ``done`` flag and writing its ack eventfd;
the loop watches every ack fd and resolves the futures of finished messages.  Nothing here blocks
the loop: waiting for a reactor is awaiting a future.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from . import _dataplane as dp

log = logging.getLogger(__name__)


class ReactorSet:
    """One reactor per core of the application's cpumask."""

    def __init__(self, cores: Iterable[int], idle_sleep_us: float = 200.0) -> None:
        self.reactors: list[dp.Reactor] = [dp.Reactor(core, idle_sleep_us) for core in cores]
        self._pending: dict[int, list[dp.MailboxMessage]] = {r.lcore: [] for r in self.reactors}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue_counts: dict[int, int] = {r.lcore: 0 for r in self.reactors}
        self.started = False

    @property
    def cores(self) -> list[int]:
        return [r.lcore for r in self.reactors]

    def by_core(self, core: int) -> dp.Reactor:
        for r in self.reactors:
            if r.lcore == core:
                return r
        raise KeyError(core)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Launch the threads and, with a loop, watch their acknowledgements on it."""
        for r in self.reactors:
            r.start()
            if r.pin_error is not None:
                log.warning("reactor %d: could not pin to core %d: %s", r.lcore, r.lcore, r.pin_error)
        self._loop = loop
        if loop is not None:
            for r in self.reactors:
                loop.add_reader(r.ack_fd, self._on_ack, r)
        self.started = True

    def _on_ack(self, reactor: dp.Reactor) -> None:
        reactor.drain_acks()
        pending = self._pending[reactor.lcore]
        still = []
        for msg in pending:
            if msg.done:
                if msg.future is not None and not msg.future.done():
                    msg.future.set_result(msg.result)
            else:
                still.append(msg)
        self._pending[reactor.lcore] = still

    async def wait(self, reactor: dp.Reactor, msg: dp.MailboxMessage) -> int:
        """Wait (without blocking the loop) until the reactor has carried msg out."""
        if self._loop is None:
            return self.wait_sync(msg)
        msg.future = self._loop.create_future()
        self._pending[reactor.lcore].append(msg)
        if msg.done:           # done before we registered: the ack may already be drained
            self._on_ack(reactor)
        return await msg.future

    @staticmethod
    def wait_sync(msg: dp.MailboxMessage, timeout: float = 30.0) -> int:
        """Block until msg is done (outside the event loop: start-up, tests)."""
        deadline = time.monotonic() + timeout
        while not msg.done:
            if time.monotonic() > deadline:
                raise TimeoutError("reactor did not acknowledge within %.0f s" % timeout)
            time.sleep(0.0002)
        return msg.result

    def least_loaded(self, cores: Iterable[int] | None = None) -> dp.Reactor:
        """The reactor with the fewest queues placed on it (among cores, if given)."""
        candidates = [r for r in self.reactors if cores is None or r.lcore in set(cores)]
        return min(candidates, key=lambda r: (self._queue_counts[r.lcore], r.lcore))

    def placed(self, reactor: dp.Reactor, delta: int) -> None:
        """Record that delta queues were placed on (or taken from) reactor."""
        self._queue_counts[reactor.lcore] += delta

    def queue_count(self, reactor: dp.Reactor) -> int:
        return self._queue_counts[reactor.lcore]

    async def stop(self) -> None:
        """Stop every reactor and wait for its thread to end."""
        messages = [(r, r.post_stop()) for r in self.reactors if r.running]
        for r, msg in messages:
            await self.wait(r, msg)
        loop = asyncio.get_running_loop()
        for r in self.reactors:
            await loop.run_in_executor(None, r.join, 10)
        self._detach_loop()
        self.started = False

    def stop_sync(self) -> None:
        for r in self.reactors:
            if r.running:
                self.wait_sync(r.post_stop())
                r.join(10)
        self._detach_loop()
        self.started = False

    def _detach_loop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for r in self.reactors:
                self._loop.remove_reader(r.ack_fd)
        self._loop = None

    def stats(self) -> list[dict]:
        """Per-reactor counters: lcore, tid and the reactor's own stats."""
        return [dict(lcore=r.lcore, tid=r.tid, **r.stats()) for r in self.reactors]
