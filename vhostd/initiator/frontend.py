"""The front-end of a vhost-user connection: what QEMU 7.2 does with a vhost-user-blk/-scsi device.

A ``Frontend`` owns the guest memory (a memfd, ``DriverMemory``), the split virtqueues laid out in
it (``DriverQueue``), their kick/call/err eventfds, and the connection.  It sends the message
sequences of vhost_user.md §2: connect (§2.1), start (§2.3), stop (§2.4) and reconnect to a
restarted back-end with the same memory and rings (§2.5).  Device layers (blk.py, scsi.py) and
the benchmark put requests on the queues; nothing here knows a device's request format.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from .. import _dataplane as dp
from ..vhost import protocol as p
from ..vhost.features import ProtocolFeature, VirtioFeature, bit, mask
from ..vhost.protocol import Request
from .channel import BackendClosed, BackendRequestChannel, BadReply, Channel, RequestFailed

log = logging.getLogger(__name__)

# What this front-end implements of the protocol; only these bits are ever acknowledged.
# BACKEND_REQ only on request (backend_requests=True): QEMU always takes it, but most tests
# have no use for the back-end's requests.
DEFAULT_PROTOCOL_FEATURES = mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                                 ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.CONFIGURE_MEM_SLOTS,
                                 ProtocolFeature.RESET_DEVICE)
PROTOCOL_FEATURES = DEFAULT_PROTOCOL_FEATURES | bit(ProtocolFeature.BACKEND_REQ)
RING_FEATURES = mask(VirtioFeature.VERSION_1, VirtioFeature.RING_INDIRECT_DESC,
                     VirtioFeature.RING_EVENT_IDX, VirtioFeature.ANY_LAYOUT)
F_PROTOCOL = bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
MAX_VQS = 256


class FrontendError(Exception):
    """The back-end cannot serve this front-end as configured (features, queue count …)."""


@dataclass(frozen=True)
class Writable:
    """A device-writable buffer of a request: length bytes, pre-filled with fill (so bytes the
    device did not write stand out)."""

    length: int
    fill: int = 0


@dataclass
class Vq:
    """One virtqueue as the front-end keeps it across stops and reconnects."""

    queue: dp.DriverQueue
    kick_fd: int
    call_fd: int            # -1: SET_VRING_CALL without fd (the back-end never signals)
    err_fd: int
    started: bool = False   # SET_VRING_KICK sent and no GET_VRING_BASE since
    base: int | None = None  # GET_VRING_BASE's answer after a clean stop


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Frontend:
    """The QEMU side of one vhost-user device.

    device_features: device-specific feature bits this driver accepts (ring and transport bits
    are added here; event_idx/indirect=False withhold those).  protocol_features: the subset of
    PROTOCOL_FEATURES to acknowledge.  memory: a DriverMemory to use (kept by the caller), else
    one of memory_bytes in memory_regions regions is created (of 2 MiB hugepages if hugepages,
    as a QEMU guest with hugetlb memory has).  use_mem_slots: send memory with
    ADD_MEM_REG when CONFIGURE_MEM_SLOTS is negotiated (else SET_MEM_TABLE).  ack_all: set
    NEED_REPLY on every request without a reply of its own once REPLY_ACK is negotiated (QEMU
    sets it only where §1.1 says).  call_fds=False sends SET_VRING_CALL without fd (polled
    queues).
    """

    def __init__(self, path: str, *, num_queues: int = 1, queue_size: int = 128,
                 device: int = dp.DEVICE_BLK, device_features: int = 0, event_idx: bool = True,
                 indirect: bool = True, protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 memory: dp.DriverMemory | None = None, memory_bytes: int = 64 << 20,
                 memory_regions: int = 1, hugepages: bool = False, bounce_bytes: int = 0,
                 slots: int = 0, use_mem_slots: bool = False,
                 ack_all: bool = False, call_fds: bool = True, timeout_s: float = 5.0,
                 packed: bool = False) -> None:
        if not 1 <= num_queues <= MAX_VQS:
            raise ValueError("between 1 and %d virtqueues" % MAX_VQS)
        self.path = str(path)
        self.timeout_s = timeout_s
        self.wanted_features = device_features | RING_FEATURES
        if not event_idx:
            self.wanted_features &= ~bit(VirtioFeature.RING_EVENT_IDX)
        if not indirect:
            self.wanted_features &= ~bit(VirtioFeature.RING_INDIRECT_DESC)
        self.packed = packed            # packed virtqueues: the back-end must offer RING_PACKED
        if packed:
            self.wanted_features |= bit(VirtioFeature.RING_PACKED)
        self.wanted_protocol = protocol_features & PROTOCOL_FEATURES
        self.device = device
        self.use_mem_slots = use_mem_slots
        self.ack_all = ack_all
        self.own_memory = memory is None
        self.memory = memory if memory is not None else dp.DriverMemory(memory_bytes, memory_regions, hugepages=hugepages)
        self.vqs: list[Vq] = []
        for index in range(num_queues):
            queue = dp.DriverQueue(self.memory, index, queue_size, device=device,
                                   bounce_bytes=bounce_bytes, nslots=slots, packed=packed)
            kick, call, err = _eventfd(), (_eventfd() if call_fds else -1), _eventfd()
            queue.set_fds(kick, call)
            self.vqs.append(Vq(queue, kick, call, err))
        self.channel: Channel | None = None
        self.backend_requests: BackendRequestChannel | None = None   # SET_BACKEND_REQ_FD's socket
        self.offered_features = 0       # GET_FEATURES
        self.features = 0                # acknowledged virtio features (SET_FEATURES less bit 30)
        self.offered_protocol = 0
        self.protocol = 0                # acknowledged protocol features
        self.max_queues: int | None = None   # GET_QUEUE_NUM
        self.max_mem_slots: int | None = None
        self.inflight: tuple[p.InflightInfo, int] | None = None
        self.started = False
        self._memory_sent = False

    # -- helpers ---------------------------------------------------------------------------
    @property
    def queues(self) -> list[dp.DriverQueue]:
        return [vq.queue for vq in self.vqs]

    def has_protocol(self, feature: int) -> bool:
        return bool(self.protocol & bit(feature))

    def has_feature(self, feature: int) -> bool:
        return bool(self.features & bit(feature))

    def _ch(self) -> Channel:
        if self.channel is None:
            raise BackendClosed("not connected to %s" % self.path)
        return self.channel

    def _request(self, request: int, payload: bytes = b"", fds=(), ack: bool | None = None) -> None:
        """A request without its own reply; acked when REPLY_ACK is negotiated and either QEMU
        acks it (ack=True) or ack_all is set."""
        with_ack = self.has_protocol(ProtocolFeature.REPLY_ACK) and (bool(ack) or self.ack_all)
        self._ch().request(request, payload, fds, ack=with_ack)

    def _vring_file(self, request: int, index: int, fd: int) -> None:
        no_fd = fd < 0
        self._request(request, p.VringFile(index, no_fd).encode(), () if no_fd else (fd,))

    # -- §2.1 connect ----------------------------------------------------------------------
    def connect(self, connect_timeout_s: float | None = None) -> None:
        """Open the socket and negotiate: features, protocol features, queue count, owner, and
        each queue's call and err eventfds."""
        self.channel = Channel(self.path, self.timeout_s,
                               self.timeout_s if connect_timeout_s is None else connect_timeout_s)
        self._memory_sent = False
        ch = self.channel
        self.offered_features = ch.call_u64(Request.GET_FEATURES)
        self.protocol = 0
        if self.offered_features & F_PROTOCOL:
            self.offered_protocol = ch.call_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol = self.offered_protocol & self.wanted_protocol
            ch.request(Request.SET_PROTOCOL_FEATURES, p.encode_u64(self.protocol))
        if self.has_protocol(ProtocolFeature.MQ):
            self.max_queues = ch.call_u64(Request.GET_QUEUE_NUM)
        if self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = ch.call_u64(Request.GET_MAX_MEM_SLOTS)
        if self.has_protocol(ProtocolFeature.BACKEND_REQ):
            self._open_backend_requests()
        self._check_queue_count()
        self._request(Request.SET_OWNER)
        again = ch.call_u64(Request.GET_FEATURES)
        if again != self.offered_features:
            raise BadReply("GET_FEATURES changed from %#x to %#x" % (self.offered_features, again))
        self.features = self.offered_features & self.wanted_features
        if self.packed and not self.has_feature(VirtioFeature.RING_PACKED):
            raise FrontendError("%s does not offer packed virtqueues" % self.path)
        for vq in self.vqs:
            vq.queue.configure(event_idx=self.has_feature(VirtioFeature.RING_EVENT_IDX),
                               indirect=self.has_feature(VirtioFeature.RING_INDIRECT_DESC))
            self._vring_file(Request.SET_VRING_CALL, vq.queue.index, vq.call_fd)
            self._vring_file(Request.SET_VRING_ERR, vq.queue.index, vq.err_fd)

    def _open_backend_requests(self) -> None:
        """SET_BACKEND_REQ_FD with one end of a new socket pair (acked, as QEMU asks)."""
        if self.backend_requests is not None:
            self.backend_requests.close()
        self.backend_requests = BackendRequestChannel(self.timeout_s)
        self._request(Request.SET_BACKEND_REQ_FD, fds=(self.backend_requests.peer_fd,), ack=True)
        self.backend_requests.peer_sent()

    def backend_request(self, timeout_s: float | None = None) -> p.Message:
        """The next request the back-end sent on its own (BACKEND_REQ negotiated)."""
        if self.backend_requests is None:
            raise FrontendError("%s did not negotiate BACKEND_REQ" % self.path)
        return self.backend_requests.receive(timeout_s)

    def _check_queue_count(self) -> None:
        # blk fails when the back-end serves fewer queues (one without MQ); scsi, like QEMU,
        # takes its control + event + request queues on trust.
        if self.device != dp.DEVICE_BLK:
            return
        limit = self.max_queues if self.max_queues is not None else 1
        if len(self.vqs) > limit:
            raise FrontendError("%s serves %d queues, %d wanted" % (self.path, limit, len(self.vqs)))

    def get_config(self, offset: int = 0, size: int = 57) -> bytes:
        """GET_CONFIG: size bytes of the device config space (needs the CONFIG feature)."""
        if not self.has_protocol(ProtocolFeature.CONFIG):
            raise FrontendError("%s did not negotiate CONFIG" % self.path)
        payload = p.ConfigSpace(offset, size, 0, bytes(size)).encode()
        msg = self._ch().call(Request.GET_CONFIG, payload, reply_size=p.CONFIG_HEAD.size + size)
        msg.close_fds()
        return p.ConfigSpace.decode(msg.payload).data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """SET_CONFIG (acked like QEMU does when REPLY_ACK is negotiated)."""
        self._request(Request.SET_CONFIG, p.ConfigSpace(offset, len(data), flags, data).encode(), ack=True)

    # -- §2.3 start ------------------------------------------------------------------------
    def start(self) -> None:
        """Features, inflight buffer, memory table, then each ring (NUM, BASE, ADDR, KICK),
        SET_VRING_ENABLE(1) for all, and a kick on each.  A ring resumes at the base GET_VRING_BASE returned, or,
        after the back-end died, at used.idx (QEMU's choice; requests in flight are fetched
        again, or recovered from the inflight buffer)."""
        features = self.features | (F_PROTOCOL if self.offered_features & F_PROTOCOL else 0)
        self._request(Request.SET_FEATURES, p.encode_u64(features))
        self._setup_inflight()
        for vq in self.vqs:
            self._vring_file(Request.SET_VRING_CALL, vq.queue.index, vq.call_fd)
        self._request(Request.SET_FEATURES, p.encode_u64(features))
        self._send_memory()
        for vq in self.vqs:
            q = vq.queue
            base = vq.base if vq.base is not None else (q.packed_base if self.packed else q.used_idx)
            self._request(Request.SET_VRING_NUM, p.VringState(q.index, q.size).encode())
            self._request(Request.SET_VRING_BASE, p.VringState(q.index, base).encode())
            desc, used, avail = q.addresses()
            self._request(Request.SET_VRING_ADDR, p.VringAddr(q.index, 0, desc, used, avail, 0).encode())
            self._vring_file(Request.SET_VRING_KICK, q.index, vq.kick_fd)
            vq.started = True
            vq.base = None
        if features & F_PROTOCOL:
            for vq in self.vqs:
                self._request(Request.SET_VRING_ENABLE, p.VringState(vq.queue.index, 1).encode())
        # QEMU kicks every queue when its ioeventfds start: requests already on the ring (a
        # resumed ring) are fetched even though avail_event is the old back-end's.
        for vq in self.vqs:
            vq.queue.kick()
        self.started = True

    def _setup_inflight(self) -> None:
        if not self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            return
        if self.inflight is None:
            query = p.InflightInfo(0, 0, len(self.vqs), self.vqs[0].queue.size).encode()
            msg = self._ch().call(Request.GET_INFLIGHT_FD, query, reply_size=p.INFLIGHT.size)
            info = p.InflightInfo.decode(msg.payload)
            if info.mmap_size == 0:
                msg.close_fds()
                return
            if len(msg.fds) != 1:
                msg.close_fds()
                raise BadReply("GET_INFLIGHT_FD reply carries %d fds, expected 1" % len(msg.fds))
            self.inflight = (info, msg.fds[0])
        info, fd = self.inflight
        self._request(Request.SET_INFLIGHT_FD, info.encode(), (fd,))

    def _send_memory(self) -> None:
        regions = [p.MemoryRegion(*r) for r in self.memory.regions]
        fd = self.memory.fd
        if self.use_mem_slots and self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            # The back-end keeps regions across stops; a new connection gets them all again.
            if not self._memory_sent:
                for region in regions:
                    self._request(Request.ADD_MEM_REG, p.SingleRegion(region).encode(), (fd,), ack=True)
        else:
            self._request(Request.SET_MEM_TABLE, p.MemoryTable(tuple(regions)).encode(),
                          (fd,) * len(regions), ack=True)
        self._memory_sent = True

    # -- §2.4 stop -------------------------------------------------------------------------
    def stop(self) -> list[int]:
        """SET_VRING_ENABLE(0) for all, then GET_VRING_BASE for each started ring (the back-end
        finishes what is in flight first).  Returns each ring's base (next avail index)."""
        if self.offered_features & F_PROTOCOL:
            for vq in self.vqs:
                self._request(Request.SET_VRING_ENABLE, p.VringState(vq.queue.index, 0).encode())
        bases = []
        for vq in self.vqs:
            if vq.started:
                vq.base = self.get_vring_base(vq.queue.index)
                vq.started = False
            bases.append(vq.base)
        self.started = False
        return bases

    def get_vring_base(self, index: int) -> int:
        msg = self._ch().call(Request.GET_VRING_BASE, p.VringState(index, 0).encode())
        msg.close_fds()
        state = p.VringState.decode(msg.payload)
        if state.index != index:
            raise BadReply("GET_VRING_BASE for queue %d answered for queue %d" % (index, state.index))
        return state.num

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._request(Request.SET_VRING_ENABLE, p.VringState(index, int(enable)).encode())

    def reset_device(self) -> None:
        """RESET_DEVICE (scsi's virtio reset, when negotiated)."""
        if self.has_protocol(ProtocolFeature.RESET_DEVICE):
            self._request(Request.RESET_DEVICE)

    def transact(self, index: int, parts: list[bytes | Writable], *, segment_bytes: int = 0,
                 indirect: bool | None = None, timeout_s: float = 5.0) -> tuple[int, list[bytes]]:
        """Post one request on queue index — parts in order, bytes device-readable, Writable
        device-writable, each in its own buffer of driver memory (split into descriptors of
        segment_bytes when > 0; empty parts left out) — and wait for it.  Returns (used_len,
        the bytes of each Writable part)."""
        mem = self.memory
        allocations, segments, received = [], [], []
        try:
            for part in parts:
                writable = isinstance(part, Writable)
                length = part.length if writable else len(part)
                if length == 0:
                    if writable:
                        received.append((0, 0))
                    continue
                gpa = mem.alloc(length, 4096 if length >= 512 else 64)
                allocations.append(gpa)
                if writable:
                    mem.fill(gpa, length, part.fill)
                    received.append((gpa, length))
                else:
                    mem.write(gpa, part)
                step = segment_bytes if segment_bytes > 0 and length >= 512 else length
                segments += [(gpa + off, min(step, length - off), writable) for off in range(0, length, step)]
            q = self.vqs[index].queue
            head = q.add_chain(segments, indirect)
            q.flush()
            used = q.wait(timeout_s)
            if len(used) != 1 or used[0][0] != head:
                raise BadReply("queue %d completed %r, expected head %d only" % (index, used, head))
            return used[0][1], [mem.read(gpa, length) if length else b"" for gpa, length in received]
        finally:
            for gpa in allocations:
                mem.free(gpa)

    def error_signalled(self, index: int) -> bool:
        """True if the back-end signalled queue index's error eventfd since the last call."""
        try:
            return os.eventfd_read(self.vqs[index].err_fd) > 0
        except BlockingIOError:
            return False

    # -- §2.5 reconnect --------------------------------------------------------------------
    def disconnect(self) -> None:
        """Drop the connection without stopping the rings (as when the back-end dies)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.backend_requests is not None:
            self.backend_requests.close()
            self.backend_requests = None

    def reconnect(self, connect_timeout_s: float = 10.0) -> None:
        """Connect again (to a restarted back-end) and, if the device was started, start it on
        the same memory and rings: requests in flight are fetched again from used.idx."""
        was_started = self.started or any(vq.started for vq in self.vqs)
        self.disconnect()
        # A back-end that has not yet noticed the old connection closing may refuse the new one.
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.connect(max(0.0, deadline - time.monotonic()))
                break
            except BackendClosed:
                self.disconnect()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        if was_started:
            for vq in self.vqs:
                if vq.started:
                    vq.base = None
            self.start()

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the rings if the back-end is still there, close the connection and every fd.
        The memory is closed too if this front-end created it."""
        if self.channel is not None and self.started:
            try:
                self.stop()
            except (BackendClosed, BadReply, RequestFailed, TimeoutError, OSError) as exc:
                log.debug("stop on close failed: %s", exc)
        self.disconnect()
        for vq in self.vqs:
            for fd in (vq.kick_fd, vq.call_fd, vq.err_fd):
                if fd >= 0:
                    os.close(fd)
            vq.kick_fd = vq.call_fd = vq.err_fd = -1
            vq.queue.set_fds(-1, -1)
        if self.inflight is not None:
            os.close(self.inflight[1])
            self.inflight = None
        if self.own_memory:
            for vq in self.vqs:
                vq.queue.close()
            self.memory.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
