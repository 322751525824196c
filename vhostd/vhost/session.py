"""The back-end side of one vhost-user connection as a state machine: no sockets, no threads.

``Session.receive(message)`` takes one decoded front-end message and returns *effects*: replies to
send and data-plane work (start a queue, stop a queue, remap memory, swap a queue's call fd).  The
connection (vhost/connection.py) carries the effects out in order; work that needs the reactors
(stopping a queue) reports back through ``Session.queue_stopped()``, which returns the remaining
effects (e.g. the GET_VRING_BASE reply).  Tests drive the machine with bytes.

Two kinds of failure: a well-formed request that is refused gets a negative REPLY_ACK when the
front-end asked for one (and is logged); a malformed message (bad size, missing fds, a request in
an impossible state) raises ProtocolError, after which the session is BROKEN and the connection
closes.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import protocol as p
from .features import ProtocolFeature, VirtioFeature, bit
from .protocol import ProtocolError, Request

log = logging.getLogger(__name__)

MAX_QUEUE_SIZE = 1024
MAX_MEM_SLOTS = 32


class DeviceModel(Protocol):
    """What a session needs to know of the device behind it (blk or scsi)."""

    name: str

    @property
    def features(self) -> int:
        """virtio feature bits offered (device, ring and transport bits)."""

    @property
    def protocol_features(self) -> int:
        """vhost-user protocol feature bits offered."""

    @property
    def max_queues(self) -> int:
        """GET_QUEUE_NUM answer."""

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device config space at offset (zero-filled past its end)."""

    def write_config(self, offset: int, data: bytes, flags: int) -> bool:
        """Apply a SET_CONFIG; False if refused."""

    def attach_queue(self, index: int, queue: Any, acked_features: int) -> Any:
        """Make the device serve a configured queue; returns the reactor that will poll it."""

    def detach_queue(self, index: int, queue: Any, reactor: Any) -> None:
        """The queue is no longer polled: release the device's hold on it."""


# ---------------------------------------------------------------------------------------------
# Effects
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """Send a reply message (flags VERSION|REPLY) with optional fds."""

    request: int
    payload: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class StartQueue:
    """Build queue ``index`` from ``session.vrings[index]`` on the current memory and hand it to
    a reactor; report failure with ``session.queue_failed(index, reason)``."""

    index: int


@dataclass(frozen=True)
class StopQueue:
    """Take queue ``index`` back from its reactor (drains in-flight requests), then call
    ``session.queue_stopped(index, last_avail_idx)`` and carry out what it returns."""

    index: int


@dataclass(frozen=True)
class MapMemory:
    """Replace the guest memory table with ``regions`` [(MemoryRegion, fd)].  Every running
    queue has been stopped by preceding effects; the fds are the connection's to close."""

    regions: tuple[tuple[p.MemoryRegion, int], ...]


@dataclass(frozen=True)
class AddMemoryRegion:
    """Map one more region (ADD_MEM_REG); every running queue was stopped by earlier effects.
    The fd is the connection's to close."""

    region: p.MemoryRegion
    fd: int


@dataclass(frozen=True)
class RemoveMemoryRegion:
    """Unmap a region (REM_MEM_REG); every running queue was stopped by earlier effects."""

    region: p.MemoryRegion


@dataclass(frozen=True)
class UpdateQueueFds:
    """A running queue's call or error eventfd changed: switch it on the reactor, then close
    ``old_fds``."""

    index: int
    old_fds: tuple[int, ...]


@dataclass(frozen=True)
class MapLog:
    """SET_LOG_BASE: map the dirty log (``size_bytes`` of fd at ``offset``; the fd is the
    connection's to close), switch every running queue to it, then unmap the previous one."""

    fd: int
    size_bytes: int
    offset: int


@dataclass(frozen=True)
class UpdateLogging:
    """Dirty logging was turned on or off (SET_FEATURES ±LOG_ALL) or a ring's used-ring logging
    changed (SET_VRING_ADDR): give every running queue its new settings through its reactor."""


@dataclass(frozen=True)
class CloseFds:
    fds: tuple[int, ...]


@dataclass(frozen=True)
class MapInflight:
    """Map the inflight-tracking region (fd, size, offset) for the queues to use."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class Reconcile:
    """Once the effects before it are done: call ``session.reconcile(index)`` and carry out what
    it returns (starts a queue that should run now, e.g. after a stop-remap-start)."""

    index: int


@dataclass(frozen=True)
class ForgetQueue:
    """Once the effects before it are done: call ``session.forget_queue(index)`` (RESET_DEVICE)."""

    index: int


@dataclass(frozen=True)
class CreateInflight:
    """Create a zeroed inflight region for (num_queues, queue_size), map it, and reply to
    GET_INFLIGHT_FD with its fd (``session.inflight_created``)."""

    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class OpenBackendChannel:
    """SET_BACKEND_REQ_FD: from now on back-end requests go to this socket fd (the connection's
    to keep and close; one given earlier is closed)."""

    fd: int


@dataclass(frozen=True)
class SendBackendRequest:
    """Send a back-end request on the channel of OpenBackendChannel; no answer is awaited."""

    request: int
    payload: bytes = b""


Effect = (Reply | StartQueue | StopQueue | MapMemory | AddMemoryRegion | RemoveMemoryRegion
          | UpdateQueueFds | CloseFds | MapInflight | CreateInflight | Reconcile | ForgetQueue
          | OpenBackendChannel | SendBackendRequest | MapLog | UpdateLogging)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
class SessionState(enum.Enum):
    CONNECTED = "connected"     # negotiating; no SET_FEATURES yet
    READY = "ready"             # features set: queues may run
    BROKEN = "broken"           # a malformed message: nothing more is processed


@dataclass
class Vring:
    """What the front-end told us about one virtqueue."""

    index: int
    size: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    base: int = 0                 # SET_VRING_BASE's value, or where we stopped (VirtQueue.vring_base)
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    kick_set: bool = False        # SET_VRING_KICK received (with or without fd): the ring started
    enabled: bool = False
    running: bool = False         # handed to a reactor
    stopping: bool = False        # StopQueue in progress
    failed: str | None = None     # the last start failed (bad addresses …)
    reply_base_on_stop: bool = False
    log_used: bool = False        # SET_VRING_ADDR flag VHOST_VRING_F_LOG: log used-ring writes
    log_gpa: int = 0              # the used ring's guest address for the log

    def addressed(self) -> bool:
        return self.size > 0 and self.desc != 0 and self.avail != 0 and self.used != 0


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Session:
    """The vhost-user back-end state machine of one connection to one device."""

    def __init__(self, device: DeviceModel) -> None:
        self.device = device
        self.state = SessionState.CONNECTED
        self.owner = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.memory_mapped = False
        self.vrings = [Vring(i) for i in range(device.max_queues)]
        self.inflight: MapInflight | None = None
        self.backend_channel = False      # SET_BACKEND_REQ_FD gave us a socket for our requests
        self.log_mapped = False           # SET_LOG_BASE gave us a dirty log
        self.log_fd: int | None = None    # SET_LOG_FD's eventfd (kept, never signalled)
        self._handlers = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.RESET_DEVICE: self._reset_device,
        }
        # The memory table as last mapped, for ADD/REM_MEM_REG to compute the next one.
        self._regions: list[p.MemoryRegion] = []

    # -- entry points -------------------------------------------------------------------------
    @property
    def broken(self) -> bool:
        return self.state is SessionState.BROKEN

    def negotiated(self, feature: int) -> bool:
        return bool(self.acked_features & bit(feature))

    def protocol_negotiated(self, feature: int) -> bool:
        return bool(self.acked_protocol_features & bit(feature))

    @property
    def logging(self) -> bool:
        """Dirty logging is on: LOG_ALL acked and a log mapped (running queues mark pages)."""
        return self.log_mapped and self.negotiated(VirtioFeature.VHOST_LOG_ALL)

    def receive(self, msg: p.Message) -> list[Effect]:
        """Process one front-end message.  Raises ProtocolError (session BROKEN) on a malformed
        one; the message's fds are owned by the session from here on."""
        if self.broken:
            msg.close_fds()
            raise ProtocolError("session is broken")
        try:
            msg.body = p.decode_request_body(msg)
            handler = self._handlers.get(msg.request)
            if handler is None:
                return self._refuse(msg, "unsupported request %s" % msg.name())
            effects = handler(msg)
            # Handlers take the fds they keep; any other (a stray fd on SET_OWNER …) would stay
            # open for the daemon's lifetime, and a front-end could exhaust its fd table.
            msg.close_fds()
            return effects
        except ProtocolError:
            self.state = SessionState.BROKEN
            msg.close_fds()
            raise

    def queue_stopped(self, index: int, base: int) -> list[Effect]:
        """The connection has taken queue ``index`` back from its reactor, which stopped at base
        (VirtQueue.vring_base: the next avail index, or a packed ring's positions)."""
        vring = self.vrings[index]
        vring.running = False
        vring.stopping = False
        vring.base = base
        effects: list[Effect] = []
        if vring.reply_base_on_stop:
            vring.reply_base_on_stop = False
            effects.append(Reply(Request.GET_VRING_BASE, p.VringState(index, base).encode()))
        return effects

    def queue_started(self, index: int) -> None:
        self.vrings[index].running = True
        self.vrings[index].failed = None

    def queue_failed(self, index: int, reason: str) -> None:
        """Starting a queue failed (rings outside memory …): it stays stopped until reconfigured."""
        vring = self.vrings[index]
        vring.running = False
        vring.failed = reason
        log.warning("%s: queue %d cannot start: %s", self.device.name, index, reason)

    def config_changed(self) -> list[Effect]:
        """The device's config space changed (a resized disk): tell the front-end, which re-reads
        it with GET_CONFIG.  Nothing when it cannot be told (no CONFIG or BACKEND_REQ negotiated,
        no channel yet); it then reads the new config at its next GET_CONFIG."""
        if self.broken or not self.backend_channel or not (
                self.protocol_negotiated(ProtocolFeature.BACKEND_REQ)
                and self.protocol_negotiated(ProtocolFeature.CONFIG)):
            return []
        return [SendBackendRequest(p.BackendRequest.CONFIG_CHANGE_MSG)]

    def close(self) -> list[Effect]:
        """The connection is going away: stop every queue; the caller then releases fds."""
        effects: list[Effect] = [StopQueue(v.index) for v in self.vrings if v.running]
        return effects

    def owned_fds(self) -> list[int]:
        """Every fd the session still holds (closed by the connection after close())."""
        fds: list[int] = [self.log_fd] if self.log_fd is not None else []
        for v in self.vrings:
            fds += [fd for fd in (v.kick_fd, v.call_fd, v.err_fd) if fd is not None and fd >= 0]
        return fds

    # -- helpers ------------------------------------------------------------------------------
    def _ack(self, msg: p.Message, ok: bool = True) -> list[Effect]:
        if msg.need_reply and self.protocol_negotiated(ProtocolFeature.REPLY_ACK):
            return [Reply(msg.request, p.encode_u64(0 if ok else 1))]
        return []

    def _refuse(self, msg: p.Message, reason: str) -> list[Effect]:
        log.warning("%s: refused %s: %s", self.device.name, msg.name(), reason)
        msg.close_fds()
        return self._ack(msg, ok=False)

    def _expect_fds(self, msg: p.Message, count: int) -> None:
        if len(msg.fds) != count:
            raise ProtocolError("%s carries %d fds, expected %d" % (msg.name(), len(msg.fds), count))

    def _vring(self, index: int) -> Vring | None:
        if index >= len(self.vrings):
            return None
        return self.vrings[index]

    def _should_run(self, vring: Vring) -> bool:
        return (self.state is SessionState.READY and self.memory_mapped and vring.addressed()
                and vring.kick_set and vring.enabled and vring.failed is None)

    def _reconcile(self, vring: Vring) -> list[Effect]:
        """Start or stop a queue so that it runs exactly when it should."""
        if vring.stopping:
            return []
        want = self._should_run(vring)
        if want and not vring.running:
            vring.running = True       # optimistic; queue_failed() reverts it
            return [StartQueue(vring.index)]
        if not want and vring.running:
            vring.stopping = True
            return [StopQueue(vring.index)]
        return []

    def _stop_all(self) -> list[Effect]:
        effects: list[Effect] = []
        for v in self.vrings:
            if v.running and not v.stopping:
                v.stopping = True
                effects.append(StopQueue(v.index))
        return effects

    def _reconcile_all(self) -> list[Effect]:
        return [Reconcile(v.index) for v in self.vrings]

    def reconcile(self, index: int) -> list[Effect]:
        """Start or stop queue ``index`` so that it runs exactly when it should."""
        return self._reconcile(self.vrings[index])

    # -- features -----------------------------------------------------------------------------
    def _get_features(self, msg: p.Message) -> list[Effect]:
        return [Reply(msg.request, p.encode_u64(self.device.features))]

    def _set_features(self, msg: p.Message) -> list[Effect]:
        value = msg.body
        allowed = self.device.features | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
        if value & ~allowed:
            return self._refuse(msg, "features %#x were not offered (offered %#x)" % (value, allowed))
        if self.state is SessionState.READY and value ^ self.acked_features == bit(VirtioFeature.VHOST_LOG_ALL):
            # Migration starts or ends: the queues keep running and only start or stop marking
            # pages, before the reply (QEMU counts on the log from then on).
            self.acked_features = value
            log.log(25, "%s: dirty logging %s", self.device.name, "on" if self.logging else "off")
            return [UpdateLogging()] + self._ack(msg)
        self.acked_features = value
        if not value & bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES):
            # Without protocol features there is no SET_VRING_ENABLE: rings start enabled.
            for v in self.vrings:
                v.enabled = True
        self.state = SessionState.READY
        # EVENT_IDX/INDIRECT may change under running queues: they restart with the new bits.
        return self._stop_all() + self._ack(msg) + self._reconcile_all()

    def _set_owner(self, msg: p.Message) -> list[Effect]:
        self.owner = True
        return self._ack(msg)

    def _reset_owner(self, msg: p.Message) -> list[Effect]:
        effects = self._stop_all()
        self.acked_features = 0
        self.state = SessionState.CONNECTED
        return effects + self._ack(msg)

    def _get_protocol_features(self, msg: p.Message) -> list[Effect]:
        return [Reply(msg.request, p.encode_u64(self.device.protocol_features))]

    def _set_protocol_features(self, msg: p.Message) -> list[Effect]:
        value = msg.body
        if value & ~self.device.protocol_features:
            return self._refuse(msg, "protocol features %#x were not offered" % value)
        self.acked_protocol_features = value
        return self._ack(msg)

    def _get_queue_num(self, msg: p.Message) -> list[Effect]:
        return [Reply(msg.request, p.encode_u64(self.device.max_queues))]

    def _get_max_mem_slots(self, msg: p.Message) -> list[Effect]:
        return [Reply(msg.request, p.encode_u64(MAX_MEM_SLOTS))]

    # -- memory -------------------------------------------------------------------------------
    def _remap(self, msg: p.Message, change: Effect) -> list[Effect]:
        """Stop every running queue, change the memory table, restart what should run."""
        effects = self._stop_all()
        effects.append(change)
        self.memory_mapped = bool(self._regions)
        return effects + self._ack(msg) + self._reconcile_all()

    def _set_mem_table(self, msg: p.Message) -> list[Effect]:
        table: p.MemoryTable = msg.body
        self._expect_fds(msg, len(table.regions))
        if not table.regions or any(r.memory_size == 0 for r in table.regions):
            raise ProtocolError("SET_MEM_TABLE without regions or with an empty one")
        regions = tuple(zip(table.regions, msg.fds))
        msg.fds = []
        self._regions = list(table.regions)
        return self._remap(msg, MapMemory(regions))

    def _add_mem_reg(self, msg: p.Message) -> list[Effect]:
        if not self.protocol_negotiated(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            return self._refuse(msg, "CONFIGURE_MEM_SLOTS not negotiated")
        self._expect_fds(msg, 1)
        region = msg.body.region
        if len(self._regions) >= MAX_MEM_SLOTS:
            return self._refuse(msg, "no free memory slot")
        if region.memory_size == 0:
            raise ProtocolError("ADD_MEM_REG of an empty region")
        fd = msg.fds.pop()
        self._regions.append(region)
        return self._remap(msg, AddMemoryRegion(region, fd))

    def _rem_mem_reg(self, msg: p.Message) -> list[Effect]:
        if not self.protocol_negotiated(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            return self._refuse(msg, "CONFIGURE_MEM_SLOTS not negotiated")
        msg.close_fds()        # QEMU may attach one; it is not used
        region = msg.body.region
        match = [r for r in self._regions
                 if (r.guest_phys_addr, r.memory_size, r.userspace_addr)
                 == (region.guest_phys_addr, region.memory_size, region.userspace_addr)]
        if not match:
            return self._refuse(msg, "no such memory region")
        self._regions.remove(match[0])
        return self._remap(msg, RemoveMemoryRegion(region))

    # -- vrings -------------------------------------------------------------------------------
    def _state_request(self, msg: p.Message) -> tuple[Vring | None, int]:
        state: p.VringState = msg.body
        return self._vring(state.index), state.num

    def _set_vring_num(self, msg: p.Message) -> list[Effect]:
        vring, num = self._state_request(msg)
        if vring is None:
            return self._refuse(msg, "queue %d does not exist" % msg.body.index)
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            return self._refuse(msg, "queue size %d is not a power of two ≤ %d" % (num, MAX_QUEUE_SIZE))
        if vring.running:
            return self._refuse(msg, "queue %d is running" % vring.index)
        vring.size = num
        vring.failed = None
        return self._ack(msg)

    def _set_vring_addr(self, msg: p.Message) -> list[Effect]:
        addr: p.VringAddr = msg.body
        vring = self._vring(addr.index)
        if vring is None:
            return self._refuse(msg, "queue %d does not exist" % addr.index)
        log_used = bool(addr.flags & p.VRING_F_LOG)
        if vring.running:
            # Logging toggles re-send the same addresses while running, with the log flag.
            if (vring.desc, vring.avail, vring.used) != (addr.desc, addr.avail, addr.used):
                return self._refuse(msg, "queue %d is running" % vring.index)
            if (vring.log_used, vring.log_gpa) == (log_used, addr.log):
                return self._ack(msg)
            vring.log_used, vring.log_gpa = log_used, addr.log
            return [UpdateLogging()] + self._ack(msg)
        vring.log_used, vring.log_gpa = log_used, addr.log
        vring.desc, vring.avail, vring.used = addr.desc, addr.avail, addr.used
        vring.failed = None
        return self._ack(msg) + self._reconcile(vring)

    def _set_vring_base(self, msg: p.Message) -> list[Effect]:
        vring, num = self._state_request(msg)
        if vring is None:
            return self._refuse(msg, "queue %d does not exist" % msg.body.index)
        if vring.running:
            return self._refuse(msg, "queue %d is running" % vring.index)
        # Packed rings: the avail position and wrap counter in bits 0-15, the used ones in 16-31.
        if num > 0xFFFF and not self.negotiated(VirtioFeature.RING_PACKED):
            return self._refuse(msg, "split-ring base %#x does not fit 16 bits" % num)
        vring.base = num
        return self._ack(msg)

    def _get_vring_base(self, msg: p.Message) -> list[Effect]:
        vring, _ = self._state_request(msg)
        if vring is None:
            raise ProtocolError("GET_VRING_BASE for queue %d, which does not exist" % msg.body.index)
        # The ring stops: no more fetching until a new kick (QEMU re-sends the whole setup).
        vring.kick_set = False
        old_kick = vring.kick_fd
        vring.kick_fd = None
        effects: list[Effect] = []
        if vring.running or vring.stopping:
            vring.reply_base_on_stop = True
            if not vring.stopping:
                vring.stopping = True
                effects.append(StopQueue(vring.index))
            # The reply comes from queue_stopped(); the old kick fd is closed after the stop.
            if old_kick is not None:
                effects.append(CloseFds((old_kick,)))
            return effects
        _close(old_kick)
        return [Reply(msg.request, p.VringState(vring.index, vring.base).encode())]

    def _vring_file(self, msg: p.Message) -> tuple[Vring | None, int | None]:
        vfile: p.VringFile = msg.body
        self._expect_fds(msg, 0 if vfile.no_fd else 1)
        fd = None if vfile.no_fd else msg.fds.pop()
        vring = self._vring(vfile.index)
        if vring is None:
            _close(fd)
        return vring, fd

    def _set_vring_kick(self, msg: p.Message) -> list[Effect]:
        vring, fd = self._vring_file(msg)
        if vring is None:
            return self._refuse(msg, "queue %d does not exist" % msg.body.index)
        effects: list[Effect] = []
        if vring.running:
            # A new kick fd for a running ring: stop, swap, restart.
            vring.stopping = True
            effects.append(StopQueue(vring.index))
            effects.append(CloseFds(tuple(f for f in (vring.kick_fd,) if f is not None)))
            vring.kick_fd = fd
            vring.kick_set = True
            effects.append(Reconcile(vring.index))
            return effects + self._ack(msg)
        _close(vring.kick_fd)
        vring.kick_fd = fd
        vring.kick_set = True
        return self._ack(msg) + self._reconcile(vring)

    def _swap_fd(self, msg: p.Message, attr: str) -> list[Effect]:
        vring, fd = self._vring_file(msg)
        if vring is None:
            return self._refuse(msg, "queue %d does not exist" % msg.body.index)
        old = getattr(vring, attr)
        setattr(vring, attr, fd)
        if vring.running or vring.stopping:
            return self._ack(msg) + [UpdateQueueFds(vring.index, tuple(f for f in (old,) if f is not None))]
        _close(old)
        return self._ack(msg)

    def _set_vring_call(self, msg: p.Message) -> list[Effect]:
        return self._swap_fd(msg, "call_fd")

    def _set_vring_err(self, msg: p.Message) -> list[Effect]:
        return self._swap_fd(msg, "err_fd")

    def _set_vring_enable(self, msg: p.Message) -> list[Effect]:
        vring, num = self._state_request(msg)
        if vring is None:
            return self._refuse(msg, "queue %d does not exist" % msg.body.index)
        if not self.negotiated(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES) and self.state is SessionState.READY:
            return self._refuse(msg, "SET_VRING_ENABLE without protocol features")
        vring.enabled = bool(num)
        return self._ack(msg) + self._reconcile(vring)

    def _set_backend_req_fd(self, msg: p.Message) -> list[Effect]:
        if not self.protocol_negotiated(ProtocolFeature.BACKEND_REQ):
            return self._refuse(msg, "BACKEND_REQ not negotiated")
        self._expect_fds(msg, 1)
        fd = msg.fds.pop()
        self.backend_channel = True
        return [OpenBackendChannel(fd)] + self._ack(msg)

    # -- dirty log ----------------------------------------------------------------------------
    def _set_log_base(self, msg: p.Message) -> list[Effect]:
        if not self.protocol_negotiated(ProtocolFeature.LOG_SHMFD):
            return self._refuse(msg, "LOG_SHMFD not negotiated")
        self._expect_fds(msg, 1)
        base: p.LogBase = msg.body
        if base.mmap_size == 0:
            raise ProtocolError("SET_LOG_BASE of an empty log")
        fd = msg.fds.pop()
        self.log_mapped = True
        # With LOG_SHMFD the front-end waits for a u64 reply (its value is not looked at).
        return [MapLog(fd, base.mmap_size, base.mmap_offset), Reply(msg.request, p.encode_u64(0))]

    def _set_log_fd(self, msg: p.Message) -> list[Effect]:
        self._expect_fds(msg, 1)
        _close(self.log_fd)
        self.log_fd = msg.fds.pop()
        return self._ack(msg)

    # -- config and inflight -----------------------------------------------------------------
    def _get_config(self, msg: p.Message) -> list[Effect]:
        cfg: p.ConfigSpace = msg.body
        if not self.protocol_negotiated(ProtocolFeature.CONFIG) and not (
                self.device.protocol_features & bit(ProtocolFeature.CONFIG)):
            raise ProtocolError("GET_CONFIG without the CONFIG protocol feature")
        data = self.device.read_config(cfg.offset, cfg.size)
        return [Reply(msg.request, p.ConfigSpace(cfg.offset, cfg.size, cfg.flags, data).encode())]

    def _set_config(self, msg: p.Message) -> list[Effect]:
        cfg: p.ConfigSpace = msg.body
        ok = self.device.write_config(cfg.offset, cfg.data, cfg.flags)
        if not ok:
            return self._refuse(msg, "config write at %d (%d bytes) refused" % (cfg.offset, cfg.size))
        return self._ack(msg)

    def _get_inflight_fd(self, msg: p.Message) -> list[Effect]:
        if not self.protocol_negotiated(ProtocolFeature.INFLIGHT_SHMFD):
            raise ProtocolError("GET_INFLIGHT_FD without INFLIGHT_SHMFD")
        info: p.InflightInfo = msg.body
        if not 0 < info.num_queues <= len(self.vrings) or not 0 < info.queue_size <= MAX_QUEUE_SIZE:
            raise ProtocolError("GET_INFLIGHT_FD for %d queues of %d" % (info.num_queues, info.queue_size))
        # Queues point into the current region: they stop before it is replaced.
        return self._stop_all() + [CreateInflight(info.num_queues, info.queue_size)] + self._reconcile_all()

    def _set_inflight_fd(self, msg: p.Message) -> list[Effect]:
        if not self.protocol_negotiated(ProtocolFeature.INFLIGHT_SHMFD):
            msg.close_fds()
            raise ProtocolError("SET_INFLIGHT_FD without INFLIGHT_SHMFD")
        self._expect_fds(msg, 1)
        info: p.InflightInfo = msg.body
        fd = msg.fds.pop()
        if not 0 < info.num_queues <= len(self.vrings) or not 0 < info.queue_size <= MAX_QUEUE_SIZE \
                or info.mmap_size == 0:
            _close(fd)
            return self._refuse(msg, "inflight region for %d queues of %d, %d bytes"
                                % (info.num_queues, info.queue_size, info.mmap_size))
        effects: list[Effect] = self._stop_all()
        self.inflight = MapInflight(fd, info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size)
        effects.append(self.inflight)
        return effects + self._ack(msg) + self._reconcile_all()

    def inflight_created(self, effect: CreateInflight, fd: int, mmap_size: int) -> list[Effect]:
        """The connection created the region of a GET_INFLIGHT_FD: reply with its fd."""
        info = p.InflightInfo(mmap_size, 0, effect.num_queues, effect.queue_size)
        return [Reply(Request.GET_INFLIGHT_FD, info.encode(), (fd,))]

    def _reset_device(self, msg: p.Message) -> list[Effect]:
        effects = self._stop_all() + [ForgetQueue(v.index) for v in self.vrings]
        self.acked_features = 0
        self.state = SessionState.CONNECTED
        return effects + self._ack(msg)

    def forget_queue(self, index: int) -> list[Effect]:
        """Drop a stopped queue's configuration and fds (RESET_DEVICE)."""
        old = self.vrings[index]
        fds = tuple(f for f in (old.kick_fd, old.call_fd, old.err_fd) if f is not None)
        self.vrings[index] = Vring(index)
        return [CloseFds(fds)] if fds else []
