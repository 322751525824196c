"""vhostd's vhost-user-blk back-end running inside the test process: an asyncio loop in a thread,
reactors pinned as asked, one BlkController on a socket.  Lets the initiator be tested against
vhostd before (and independently of) the vhostd command."""

import asyncio
import os
import tempfile
import threading
from dataclasses import dataclass

from vhostd import _dataplane as dp
from vhostd.dataplane import ReactorSet
from vhostd.vhost.blk import BlkController


@dataclass
class _Bdev:
    name: str
    disk: dp.Disk


class InProcessVhostd:
    """Start with a Disk; ``socket_path`` accepts one front-end at a time; ``close()`` ends it."""

    def __init__(self, disk, cores=(0,), name="vhd.0"):
        self._tmp = tempfile.TemporaryDirectory(prefix="vhd-ip-", dir="/tmp")
        self.socket_path = os.path.join(self._tmp.name, name)
        self.disk = disk
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.reactors = ReactorSet(cores)
        self.controller = None

        async def setup():
            self.reactors.start(self.loop)
            self.controller = BlkController(name, self._tmp.name, self.reactors, list(cores),
                                            _Bdev(name + "-disk", disk))
            await self.controller.start()

        self._run(setup())

    def _run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        async def teardown():
            await self.controller.stop()
            await self.reactors.stop()

        self._run(teardown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
