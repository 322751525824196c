"""A vhost controller: a named device with a listening Unix socket at SOCKET_DIR/<name>, serving one
front-end connection at a time, and the placement of its queues on reactors.

Kinds (vhost/blk.py, vhost/scsi.py) provide the device model a session negotiates with and attach
queues to their data-plane device.  The controller survives its front-end disconnecting and
reconnecting (guest reboot, QEMU restart).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
from typing import Any

from .. import _dataplane as dp
from ..dataplane import ReactorSet
from ..errors import Busy, InvalidArgument, IOFailure
from .connection import Connection
from .transport import Transport

log = logging.getLogger(__name__)

_session_ids = itertools.count()

DEFAULT_IOPS_THRESHOLD = 60000
HANDOVER_TIMEOUT_S = 5.0      # how long a second front-end waits for the first to leave
ACCEPT_RETRY_S = 0.1          # pause after a failed accept (out of fds) before the next attempt


class Controller:
    """Base of blk and scsi controllers."""

    kind = "base"

    def __init__(self, name: str, socket_dir: str, reactors: ReactorSet, cores: list[int],
                 socket_mode: int = 0o600, socket_group: int | None = None) -> None:
        self.name = name
        self.socket_dir = socket_dir
        self.socket_path = os.path.join(socket_dir, name)
        self.reactors = reactors
        self.cores = sorted(cores)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.delay_base_us = 0
        self.iops_threshold = DEFAULT_IOPS_THRESHOLD
        self.listener: socket.socket | None = None
        self.connection: Connection | None = None
        self._accept_task: asyncio.Task | None = None
        self._serve_task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- socket -------------------------------------------------------------------------------
    def _prepare_path(self) -> None:
        if len(os.fsencode(self.socket_path)) >= 108:
            raise InvalidArgument("socket path %s is too long" % self.socket_path)
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise IOFailure("%s exists and is not a socket" % self.socket_path)
        os.unlink(self.socket_path)      # a stale socket of an earlier run

    async def start(self) -> None:
        """Create the listening socket and accept front-ends."""
        if self.listener is not None:
            return
        self._prepare_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(self.socket_path)
            finally:
                os.umask(old_umask)
            os.chmod(self.socket_path, self.socket_mode)
            if self.socket_group is not None:
                os.chown(self.socket_path, -1, self.socket_group)
            sock.listen(4)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise IOFailure("cannot listen on %s: %s" % (self.socket_path, exc.strerror)) from None
        self.listener = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn_sock, _ = await loop.sock_accept(self.listener)
            except OSError as exc:
                # Out of fds (EMFILE, ENFILE) or memory: the front-end waits in the backlog.  Try
                # again shortly; ending here would leave the socket unserved for good.
                log.warning("%s: accepting a front-end failed: %s", self.name, exc.strerror or exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if self.connection is not None:
                # One front-end at a time.  A new one usually means the old one is going away
                # (QEMU restarted, guest rebooted): it waits for that, then is served.
                try:
                    await asyncio.wait_for(self._idle.wait(), HANDOVER_TIMEOUT_S)
                except asyncio.TimeoutError:
                    log.warning("%s: a front-end is already connected; refusing another", self.name)
                    conn_sock.close()
                    continue
            self.connection = Connection(self, Transport(conn_sock), next(_session_ids))
            self._idle.clear()
            log.info("%s: front-end connected (session %s)", self.name, self.connection.name)
            self._serve_task = loop.create_task(self.connection.run())

    def connection_closed(self, connection: Connection) -> None:
        if self.connection is connection:
            self.connection = None
            self._idle.set()

    async def stop(self) -> None:
        """Close the socket and any connection (its queues are drained first)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self.connection is not None:
            await self.connection.shutdown()
        if self._serve_task is not None:
            self._serve_task.cancel()
            self._serve_task = None

    @property
    def busy(self) -> bool:
        """A front-end is connected."""
        return self.connection is not None

    def check_deletable(self) -> None:
        if self.busy:
            raise Busy("controller %s has a connected front-end" % self.name)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- data plane ---------------------------------------------------------------------------
    def reactor_for_queue(self, index: int) -> dp.Reactor:
        """Queues spread over the reactors of the controller's cpumask."""
        return self.reactors.by_core(self.cores[index % len(self.cores)])

    def set_coalescing(self, delay_base_us: int, iops_threshold: int) -> None:
        self.delay_base_us = delay_base_us
        self.iops_threshold = iops_threshold
        if self.connection is not None:
            for queue, _ in self.connection.queues.values():
                queue.set_coalescing(delay_base_us, iops_threshold)

    def session_device(self) -> Any:
        """The device model a new connection's session negotiates with."""
        raise NotImplementedError

    async def bdev_resized(self, bdev) -> None:
        """A bdev changed size: kinds that serve it tell their front-end (blk, scsi override)."""

    # -- reporting ----------------------------------------------------------------------------
    def cpumask(self) -> str:
        value = 0
        for core in self.cores:
            value |= 1 << core
        return "0x%x" % value

    def sessions(self) -> list[dict]:
        c = self.connection
        if c is None:
            return []
        return [{"vid": c.id, "id": 0, "name": c.name, "started": c.started,
                 "max_queues": c.device.max_queues, "inflight_task_cnt": c.inflight_task_count}]

    def backend_specific(self) -> dict:
        raise NotImplementedError

    def info(self) -> dict:
        """The vhost_get_controllers entry (SPDK's shape)."""
        return {"ctrlr": self.name, "cpumask": self.cpumask(), "delay_base_us": self.delay_base_us,
                "iops_threshold": self.iops_threshold, "socket": self.socket_path,
                "sessions": self.sessions(), "backend_specific": self.backend_specific()}

    def queue_stats(self) -> list[dict]:
        return self.connection.queue_stats() if self.connection is not None else []
