"""One front-end connection: reads messages, feeds the session, carries its effects out.

The connection is where the pure session meets the data plane: it maps guest memory, builds
VirtQueue objects, hands them to reactors and takes them back through the reactors' mailboxes, and
sends replies.  Messages are handled strictly one at a time, each with all its effects finished
(a GET_VRING_BASE reply waits for the queue to drain), as the protocol requires.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import socket
import weakref
from collections import deque
from typing import TYPE_CHECKING

from .. import _dataplane as dp
from ..memfd import fix_size
from . import protocol as p
from . import session as s
from .features import VirtioFeature
from .transport import ConnectionClosed, Transport

if TYPE_CHECKING:
    from .controller import Controller

log = logging.getLogger(__name__)

INFLIGHT_QUEUE_ALIGN = 64


def inflight_queue_bytes(queue_size: int) -> int:
    """Bytes of one queue's inflight-tracking region (room for a split or a packed queue's
    layout, dp.inflight_queue_bytes), aligned."""
    need = dp.inflight_queue_bytes(queue_size)
    return (need + INFLIGHT_QUEUE_ALIGN - 1) // INFLIGHT_QUEUE_ALIGN * INFLIGHT_QUEUE_ALIGN


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class TruncationWatch:
    """Closes a connection as soon as the data plane survives a SIGBUS in its front-end's memory
    (the front-end truncated a file it shared), instead of at its next message: the SIGBUS
    handler writes to an eventfd (one for the process) that one event loop watches.  Each
    connection is then checked on its own loop (in-process targets run one loop per thread)."""

    def __init__(self) -> None:
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        dp.set_sigbus_notify_fd(self.fd)

    def add(self, connection: Connection) -> None:
        if self.loop is None or not self.loop.is_running():
            # The first loop, or the one watching before has stopped (its thread no longer uses it).
            if self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(self.fd)
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.fd, self._fired)
        self.connections.add(connection)

    def _fired(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return
        for connection in list(self.connections):
            try:
                connection.loop.call_soon_threadsafe(connection.close_if_truncated)
            except RuntimeError:
                pass                        # its loop is closed: the connection is gone


_truncation_watch = TruncationWatch()


class Connection:
    """A connected front-end (QEMU) on a controller's socket."""

    def __init__(self, controller: Controller, transport: Transport, session_id: int) -> None:
        self.controller = controller
        self.transport = transport
        self.id = session_id
        self.device = controller.session_device()
        self.session = s.Session(self.device)
        self.memory: dp.GuestMemory | None = None
        self.inflight_map: mmap.mmap | None = None
        self.inflight_guard = -1          # dp.guard_mapping handle of inflight_map
        self.inflight_fd: int | None = None
        self.inflight_stride = 0
        self.inflight_queues = 0
        self.inflight_base = 0
        self.queues: dict[int, tuple[dp.VirtQueue, dp.Reactor]] = {}
        self.backend: Transport | None = None   # the SET_BACKEND_REQ_FD channel, send-only
        self.log: dp.DirtyLog | None = None     # SET_LOG_BASE's dirty log
        self.inflight_at_stop: dict[int, int] = {}   # queue → requests in flight when its stop began
        self.truncated = False            # closed by close_if_truncated()
        self.loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()
        self._shutdown_lock = asyncio.Lock()   # run()'s end and Controller.stop() may both call shutdown

    @property
    def name(self) -> str:
        return "%ss%d" % (self.controller.name, self.id)

    @property
    def started(self) -> bool:
        return bool(self.queues)

    async def run(self) -> None:
        """Serve the front-end until it disconnects or breaks the protocol."""
        _truncation_watch.add(self)
        try:
            while True:
                msg = await self.transport.receive()
                log.debug("%s: %s", self.name, msg.name())
                effects = self.session.receive(msg)
                await self.execute(effects)
                self._check_truncation()
        except ConnectionClosed:
            if not self.truncated:
                log.info("%s: front-end disconnected", self.name)
        except p.ProtocolError as exc:
            log.warning("%s: protocol error, closing: %s", self.name, exc)
        except Exception:
            log.exception("%s: closing after an internal error", self.name)
        finally:
            await self.shutdown()

    async def execute(self, effects: list[s.Effect]) -> None:
        """Carry effects out in order; follow-up effects run before the rest."""
        todo = deque(effects)
        while todo:
            effect = todo.popleft()
            more = await self._do(effect)
            if more:
                todo.extendleft(reversed(more))

    async def _do(self, effect: s.Effect) -> list[s.Effect]:
        if isinstance(effect, s.Reply):
            await self.transport.send(p.encode_reply(effect.request, effect.payload), effect.fds)
        elif isinstance(effect, s.StartQueue):
            await self._start_queue(effect.index)
        elif isinstance(effect, s.StopQueue):
            return await self._stop_queue(effect.index)
        elif isinstance(effect, s.Reconcile):
            return self.session.reconcile(effect.index)
        elif isinstance(effect, s.ForgetQueue):
            return self.session.forget_queue(effect.index)
        elif isinstance(effect, s.MapMemory):
            self._map_memory(effect)
        elif isinstance(effect, s.AddMemoryRegion):
            self._add_region(effect)
        elif isinstance(effect, s.RemoveMemoryRegion):
            self._remove_region(effect)
        elif isinstance(effect, s.UpdateQueueFds):
            await self._update_fds(effect)
        elif isinstance(effect, s.CloseFds):
            for fd in effect.fds:
                _close(fd)
        elif isinstance(effect, s.MapInflight):
            self._map_inflight(effect)
        elif isinstance(effect, s.CreateInflight):
            return self._create_inflight(effect)
        elif isinstance(effect, s.OpenBackendChannel):
            self._open_backend_channel(effect.fd)
        elif isinstance(effect, s.SendBackendRequest):
            await self._send_backend_request(effect)
        elif isinstance(effect, s.MapLog):
            await self._map_log(effect)
        elif isinstance(effect, s.UpdateLogging):
            await self._update_logging()
        else:
            raise TypeError("unknown effect %r" % (effect,))
        return []

    # -- back-end requests --------------------------------------------------------------------
    def _open_backend_channel(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            _close(fd)
            raise p.ProtocolError("SET_BACKEND_REQ_FD fd is not a socket: %s" % exc) from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise p.ProtocolError("SET_BACKEND_REQ_FD fd is not a unix stream socket")
        if self.backend is not None:
            self.backend.close()
        self.backend = Transport(sock)

    async def _send_backend_request(self, effect: s.SendBackendRequest) -> None:
        backend = self.backend
        if backend is None:
            return
        try:
            await backend.send(p.encode_backend_request(effect.request, effect.payload))
        except (ConnectionClosed, OSError) as exc:
            # The main socket decides whether the front-end is gone; without the channel it
            # only misses notifications (it reads the new config at its next GET_CONFIG).
            log.warning("%s: back-end request channel failed, closing it: %s", self.name, exc)
            backend.close()
            if self.backend is backend:      # not replaced by a SET_BACKEND_REQ_FD meanwhile
                self.backend = None

    async def config_changed(self) -> None:
        """The device's config space changed: notify the front-end if the session can."""
        if self.closed.is_set():
            return
        await self.execute(self.session.config_changed())

    # -- memory -------------------------------------------------------------------------------
    def _memory_truncated(self) -> bool:
        """The front-end shrank a file we map (guest RAM or the inflight region) and the data
        plane touched a lost page (a SIGBUS survived in _dataplane)."""
        return (self.memory is not None and self.memory.truncated) or (
            self.inflight_guard >= 0 and dp.mapping_truncated(self.inflight_guard)) or (
            self.log is not None and self.log.truncated)

    def _check_truncation(self) -> None:
        if self._memory_truncated():
            raise p.ProtocolError("the front-end truncated shared memory under the device")

    def close_if_truncated(self) -> None:
        """End the session now if its memory was truncated: shutting the socket down makes run()
        see EOF at its next receive (an effect in progress finishes first), and the front-end
        sees the disconnect."""
        if self.truncated or self.closed.is_set() or not self._memory_truncated():
            return
        self.truncated = True
        log.warning("%s: the front-end truncated shared memory under the device, closing", self.name)
        try:
            self.transport.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _map_memory(self, effect: s.MapMemory) -> None:
        old = self.memory
        memory = dp.GuestMemory()
        try:
            for region, fd in effect.regions:
                memory.add_region(region.guest_phys_addr, region.memory_size, region.userspace_addr,
                                  region.mmap_offset, fd)
        except (OSError, ValueError) as exc:
            memory.close()
            raise p.ProtocolError("memory table refused: %s" % exc) from None
        finally:
            for _, fd in effect.regions:
                _close(fd)
        self.memory = memory
        if old is not None:
            old.close()      # every queue using it was stopped by earlier effects

    def _add_region(self, effect: s.AddMemoryRegion) -> None:
        r = effect.region
        try:
            if self.memory is None:
                self.memory = dp.GuestMemory()
            self.memory.add_region(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset,
                                   effect.fd)
        except (OSError, ValueError) as exc:
            raise p.ProtocolError("memory region refused: %s" % exc) from None
        finally:
            _close(effect.fd)

    def _remove_region(self, effect: s.RemoveMemoryRegion) -> None:
        r = effect.region
        if self.memory is not None:
            try:
                self.memory.remove_region(r.guest_phys_addr, r.memory_size, r.userspace_addr)
            except KeyError as exc:
                raise p.ProtocolError(str(exc)) from None

    # -- dirty log ----------------------------------------------------------------------------
    async def _map_log(self, effect: s.MapLog) -> None:
        try:
            log_map = dp.DirtyLog(effect.fd, effect.size_bytes, effect.offset)
        except (OSError, ValueError) as exc:
            raise p.ProtocolError("dirty log refused: %s" % exc) from None
        finally:
            _close(effect.fd)
        old, self.log = self.log, log_map
        # Queues move to the new log before the old one is unmapped (and before the reply: the
        # front-end reads the old log one last time once it has it).
        await self._update_logging()
        if old is not None:
            old.close()
        log.log(25, "%s: dirty log of %d bytes mapped (guest pages up to %d MiB)", self.name,
                 effect.size_bytes, effect.size_bytes * 8 * 4096 >> 20)

    def _stage_log(self, index: int, queue: dp.VirtQueue) -> None:
        vring = self.session.vrings[index]
        queue.set_log(self.log if self.session.logging else None, vring.log_gpa, vring.log_used)

    async def _update_logging(self) -> None:
        for index, (queue, reactor) in list(self.queues.items()):
            self._stage_log(index, queue)
            await self.controller.reactors.wait(reactor, reactor.post_set_log(queue))

    # -- inflight tracking --------------------------------------------------------------------
    def _release_inflight(self) -> None:
        dp.unguard_mapping(self.inflight_guard)
        self.inflight_guard = -1
        if self.inflight_map is not None:
            self.inflight_map.close()
            self.inflight_map = None
        _close(self.inflight_fd)
        self.inflight_fd = None

    def _create_inflight(self, effect: s.CreateInflight) -> list[s.Effect]:
        stride = inflight_queue_bytes(effect.queue_size)
        size = stride * effect.num_queues
        fd = os.memfd_create("vhostd-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The front-end gets this fd: sealed, it cannot shrink the region under our mapping
            # (the next access would fault with SIGBUS and take the whole daemon down).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            region = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            raise
        self._release_inflight()
        self.inflight_map, self.inflight_fd = region, fd
        self.inflight_guard = dp.guard_mapping(region)     # the front-end gets this fd too
        self.inflight_stride, self.inflight_queues = stride, effect.num_queues
        self.inflight_base = 0
        return self.session.inflight_created(effect, fd, size)

    def _map_inflight(self, effect: s.MapInflight) -> None:
        stride = inflight_queue_bytes(effect.queue_size)
        try:
            fix_size(effect.fd, "inflight fd")
            st = os.fstat(effect.fd)
            if effect.mmap_size < stride * effect.num_queues:
                raise ValueError("%d bytes cannot hold %d queues of %d"
                                 % (effect.mmap_size, effect.num_queues, effect.queue_size))
            if st.st_size < effect.mmap_offset + effect.mmap_size:
                raise ValueError("inflight fd has %d bytes, the region needs %d"
                                 % (st.st_size, effect.mmap_offset + effect.mmap_size))
            whole = mmap.mmap(effect.fd, effect.mmap_offset + effect.mmap_size)
        except (OSError, ValueError) as exc:
            _close(effect.fd)
            raise p.ProtocolError("inflight region refused: %s" % exc) from None
        self._release_inflight()
        self.inflight_fd = effect.fd
        self.inflight_map = whole
        self.inflight_guard = dp.guard_mapping(whole)
        self.inflight_stride = stride
        self.inflight_queues = effect.num_queues
        self.inflight_base = effect.mmap_offset

    # -- queues -------------------------------------------------------------------------------
    async def _start_queue(self, index: int) -> None:
        vring = self.session.vrings[index]
        queue = dp.VirtQueue(index)
        try:
            if self.memory is None:
                raise ValueError("no memory table")
            packed = self.session.negotiated(VirtioFeature.RING_PACKED)
            queue.configure(self.memory, vring.size, vring.desc, vring.avail, vring.used, vring.base,
                            self.session.negotiated(VirtioFeature.RING_EVENT_IDX),
                            self.session.negotiated(VirtioFeature.RING_INDIRECT_DESC), packed=packed)
            if packed and index == 0:
                log.log(25, "%s: packed virtqueues", self.name)
            if self.inflight_map is not None and index < self.inflight_queues:
                resubmitted = queue.set_inflight(self.inflight_map,
                                                 self.inflight_base + index * self.inflight_stride)
                if resubmitted:
                    log.log(25, "%s: queue %d resubmits %d requests in flight before", self.name, index,
                             resubmitted)
        except ValueError as exc:
            self.session.queue_failed(index, str(exc))
            if vring.err_fd is not None:
                os.eventfd_write(vring.err_fd, 1)
            return
        self._stage_log(index, queue)
        queue.apply_log()
        queue.set_fds(_fd(vring.kick_fd), _fd(vring.call_fd), _fd(vring.err_fd))
        reactor = self.device.attach_queue(index, queue, self.session.acked_features)
        # Recorded before the wait: a shutdown meanwhile (Controller.stop) must take it back from
        # the reactor before the memory it polls is unmapped (its removal follows the add).
        self.queues[index] = (queue, reactor)
        await self.controller.reactors.wait(reactor, reactor.post_add_queue(queue))
        self.session.queue_started(index)

    async def _stop_queue(self, index: int) -> list[s.Effect]:
        entry = self.queues.pop(index, None)
        if entry is None:
            return self.session.queue_stopped(index, self.session.vrings[index].base)
        queue, reactor = entry
        if queue.logging:
            # A stop while logging is the migration's switch-over (or its cancellation): the
            # stop waits for these requests, so the destination resumes after all of them.
            in_flight = queue.inflight_count
            self.inflight_at_stop[index] = in_flight
            log.log(25, "%s: queue %d stops under dirty logging with %d requests in flight",
                    self.name, index, in_flight)
        await self.controller.reactors.wait(reactor, reactor.post_remove_queue(queue))
        reactor.forget_queue(queue)
        self.device.detach_queue(index, queue, reactor)
        return self.session.queue_stopped(index, queue.vring_base)

    async def _update_fds(self, effect: s.UpdateQueueFds) -> None:
        vring = self.session.vrings[effect.index]
        entry = self.queues.get(effect.index)
        if entry is not None:
            queue, reactor = entry
            await self.controller.reactors.wait(
                reactor, reactor.post_set_fds(queue, _fd(vring.call_fd), _fd(vring.err_fd)))
        for fd in effect.old_fds:
            _close(fd)

    def queue_stats(self) -> list[dict]:
        return [dict(queue=i, lcore=r.lcore, packed=q.packed, **q.stats())
                for i, (q, r) in sorted(self.queues.items())]

    @property
    def inflight_task_count(self) -> int:
        return sum(q.inflight_count for q, _ in self.queues.values())

    async def shutdown(self) -> None:
        """Take every queue back from the reactors, then release memory and fds.  Callers that
        overlap wait for the first: none may unmap memory while a queue is still being taken back."""
        async with self._shutdown_lock:
            if self.closed.is_set():
                return
            await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            while self.queues:
                await self._stop_queue(next(iter(self.queues)))
        finally:
            for fd in self.session.owned_fds():
                _close(fd)
            if self.memory is not None:
                self.memory.close()
                self.memory = None
            self._release_inflight()
            if self.log is not None:
                self.log.close()
                self.log = None
            if self.backend is not None:
                self.backend.close()
                self.backend = None
            self.transport.close()
            self.closed.set()
            self.controller.connection_closed(self)


def _fd(fd: int | None) -> int:
    return -1 if fd is None else fd
