"""vhost-user wire format: a sans-I/O codec between bytes (+ file descriptors) and messages.

A message is a 12-byte header (request u32, flags u32, payload size u32, host-endian) followed by
the payload; file descriptors travel as SCM_RIGHTS with the message.  This module knows request
numbers, flag bits, payload layouts and their sizes; it knows nothing of sockets or of what a
request means to a device.  Both sides use it: the back-end (vhost/session.py) decodes requests and
encodes replies, the front-end (initiator/) the other way round.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VERSION_MASK = 0x3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
MAX_PAYLOAD = 4096        # the largest legitimate payload is a config space access (12 + 256)
MAX_FDS = 8               # QEMU attaches at most 8 descriptors to one message
MAX_CONFIG_SIZE = 256
VRING_NOFD_MASK = 0x100   # bit 8 of a kick/call/err payload: no fd attached
VRING_INDEX_MASK = 0xFF


class Request(IntEnum):
    """Front-end → back-end requests."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(IntEnum):
    """Back-end → front-end requests (on the SET_BACKEND_REQ_FD channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid vhost-user message; the connection is unusable."""


# ---------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
MEM_TABLE_HEAD = struct.Struct("<II")
SINGLE_REGION = struct.Struct("<Q32s")
CONFIG_HEAD = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHHI")
LOG = struct.Struct("<QQ")
VRING_F_LOG = 1                  # SET_VRING_ADDR flags: log writes to the used ring


@dataclass(frozen=True)
class VringState:
    """SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE: a queue index and a number."""

    index: int
    num: int

    def encode(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        return cls(*VRING_STATE.unpack(payload))


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR: ring addresses in the front-end's virtual address space."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    def encode(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        return cls(*VRING_ADDR.unpack(payload))


@dataclass(frozen=True)
class MemoryRegion:
    """One region of guest memory: guest physical address, size, front-end virtual address and
    offset of the region in its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return MEM_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                               self.mmap_offset)

    @classmethod
    def decode(cls, payload: bytes) -> MemoryRegion:
        return cls(*MEM_REGION.unpack(payload))


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE: every region (one fd each, in order)."""

    regions: tuple[MemoryRegion, ...]

    def encode(self) -> bytes:
        return MEM_TABLE_HEAD.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)

    @classmethod
    def decode(cls, payload: bytes) -> MemoryTable:
        if len(payload) < MEM_TABLE_HEAD.size:
            raise ProtocolError("memory table payload of %d bytes is too short" % len(payload))
        count, _ = MEM_TABLE_HEAD.unpack_from(payload)
        need = MEM_TABLE_HEAD.size + count * MEM_REGION.size
        # QEMU sends only the regions in use; older front-ends pad to 8 entries.
        if count > 8 or len(payload) < need:
            raise ProtocolError("memory table with %d regions does not fit %d bytes"
                                % (count, len(payload)))
        regions = tuple(MemoryRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
                        for i in range(count))
        return cls(regions)


@dataclass(frozen=True)
class SingleRegion:
    """ADD_MEM_REG / REM_MEM_REG."""

    region: MemoryRegion

    def encode(self) -> bytes:
        return SINGLE_REGION.pack(0, self.region.encode())

    @classmethod
    def decode(cls, payload: bytes) -> SingleRegion:
        return cls(MemoryRegion.decode(payload[8:40]))


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: a window of the device configuration space."""

    offset: int
    size: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        return CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> ConfigSpace:
        if len(payload) < CONFIG_HEAD.size:
            raise ProtocolError("config payload of %d bytes is too short" % len(payload))
        offset, size, flags = CONFIG_HEAD.unpack_from(payload)
        data = payload[CONFIG_HEAD.size:]
        if size > MAX_CONFIG_SIZE or len(data) != size:
            raise ProtocolError("config payload says %d data bytes but carries %d" % (size, len(data)))
        return cls(offset, size, flags, bytes(data))


@dataclass(frozen=True)
class InflightInfo:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD: the shared buffer that tracks in-flight descriptors."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def encode(self) -> bytes:
        return INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size, 0)

    @classmethod
    def decode(cls, payload: bytes) -> InflightInfo:
        size, offset, nq, qs, _ = INFLIGHT.unpack(payload)
        return cls(size, offset, nq, qs)


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: queue index, and whether the message carries no fd."""

    index: int
    no_fd: bool

    def encode(self) -> bytes:
        return U64.pack(self.index | (VRING_NOFD_MASK if self.no_fd else 0))

    @classmethod
    def decode(cls, payload: bytes) -> VringFile:
        (value,) = U64.unpack(payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise ProtocolError("vring file payload %#x has reserved bits set" % value)
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK))


@dataclass(frozen=True)
class LogBase:
    """SET_LOG_BASE: the dirty-log buffer (migration)."""

    mmap_size: int
    mmap_offset: int

    def encode(self) -> bytes:
        return LOG.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def decode(cls, payload: bytes) -> LogBase:
        return cls(*LOG.unpack(payload))


def encode_u64(value: int) -> bytes:
    return U64.pack(value & 0xFFFFFFFFFFFFFFFF)


def decode_u64(payload: bytes) -> int:
    return U64.unpack(payload)[0]


# Payload layout of each front-end request: (size check, decoder).  A size of None means "a
# variable size that the decoder checks"; 0 means "no payload" (anything sent is ignored, as
# QEMU sends u64 zeroes with some of them).
_U64 = (U64.size, decode_u64)
_STATE = (VRING_STATE.size, VringState.decode)
_FILE = (U64.size, VringFile.decode)
REQUEST_PAYLOADS: dict[Request, tuple[int | None, Any]] = {
    Request.GET_FEATURES: (0, None),
    Request.SET_FEATURES: _U64,
    Request.SET_OWNER: (0, None),
    Request.RESET_OWNER: (0, None),
    Request.SET_MEM_TABLE: (None, MemoryTable.decode),
    Request.SET_LOG_BASE: (LOG.size, LogBase.decode),
    Request.SET_LOG_FD: (0, None),
    Request.SET_VRING_NUM: _STATE,
    Request.SET_VRING_ADDR: (VRING_ADDR.size, VringAddr.decode),
    Request.SET_VRING_BASE: _STATE,
    Request.GET_VRING_BASE: _STATE,
    Request.SET_VRING_KICK: _FILE,
    Request.SET_VRING_CALL: _FILE,
    Request.SET_VRING_ERR: _FILE,
    Request.GET_PROTOCOL_FEATURES: (0, None),
    Request.SET_PROTOCOL_FEATURES: _U64,
    Request.GET_QUEUE_NUM: (0, None),
    Request.SET_VRING_ENABLE: _STATE,
    Request.SET_BACKEND_REQ_FD: (0, None),
    Request.SET_VRING_ENDIAN: _STATE,
    Request.GET_CONFIG: (None, ConfigSpace.decode),
    Request.SET_CONFIG: (None, ConfigSpace.decode),
    Request.GET_INFLIGHT_FD: (INFLIGHT.size, InflightInfo.decode),
    Request.SET_INFLIGHT_FD: (INFLIGHT.size, InflightInfo.decode),
    Request.RESET_DEVICE: (0, None),
    Request.GET_MAX_MEM_SLOTS: (0, None),
    Request.ADD_MEM_REG: (SINGLE_REGION.size, SingleRegion.decode),
    Request.REM_MEM_REG: (SINGLE_REGION.size, SingleRegion.decode),
    Request.SET_STATUS: _U64,
    Request.GET_STATUS: (0, None),
}

# Requests whose no-payload form QEMU still sends 8 zero bytes with (SET_OWNER etc. in old QEMUs).
_LENIENT_EMPTY = {Request.GET_FEATURES, Request.SET_OWNER, Request.RESET_OWNER,
                  Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM, Request.RESET_DEVICE,
                  Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.SET_BACKEND_REQ_FD,
                  Request.SET_LOG_FD}


@dataclass
class Message:
    """One vhost-user message: request number, flags, raw payload and attached fds.

    ``body`` is the decoded payload (a payload dataclass, an int for u64 payloads, or None).
    The receiver owns ``fds`` and must close those it does not keep.
    """

    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)
    body: Any = None

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return "request %d" % self.request

    def close_fds(self) -> None:
        """Close every fd the message carries (a refused message keeps nothing)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """Header + payload bytes of one message (fds are sent alongside by the transport)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """A back-end's reply: flags exactly VERSION|REPLY, as QEMU checks."""
    return encode(request, payload, VERSION | FLAG_REPLY)


def encode_backend_request(request: BackendRequest, payload: bytes = b"") -> bytes:
    """A back-end request for the SET_BACKEND_REQ_FD channel.  Never with NEED_REPLY: QEMU
    answers CONFIG_CHANGE_MSG only after a GET_CONFIG on the main socket, and a back-end waiting
    for that answer could not serve the GET_CONFIG (vhost_user.md §1.4)."""
    return encode(request, payload, VERSION)


def decode_request_body(msg: Message) -> Any:
    """Check the payload size of a front-end request and decode it.  Raises ProtocolError for a
    wrong size or a malformed payload; unknown requests decode to None (the session refuses them).
    """
    try:
        request = Request(msg.request)
    except ValueError:
        return None
    size, decoder = REQUEST_PAYLOADS.get(request, (None, None))
    if size == 0:
        if msg.payload and not (request in _LENIENT_EMPTY and len(msg.payload) == U64.size):
            raise ProtocolError("%s carries %d unexpected payload bytes" % (request.name, len(msg.payload)))
        return None
    if size is not None and len(msg.payload) != size:
        raise ProtocolError("%s payload is %d bytes, expected %d" % (request.name, len(msg.payload), size))
    if decoder is None:
        return None
    try:
        return decoder(bytes(msg.payload))
    except struct.error as exc:
        raise ProtocolError("%s payload is malformed: %s" % (request.name, exc)) from None


class MessageReader:
    """Reassembles messages from a byte stream and the fds received with it (sans-I/O).

    ``feed(data, fds)`` with what one recvmsg returned; then ``next_message()`` until it returns
    None.  Fds received with the bytes of a header belong to that message, as QEMU sends a message
    and its fds in one sendmsg.  Raises ProtocolError on a bad header; the stream is then unusable.
    """

    def __init__(self, expect_reply: bool = False) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._expect_reply = expect_reply

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Add what one recvmsg returned.  Raises ProtocolError when the message being read has
        collected more than MAX_FDS fds (a peer trickling its bytes, each with fds attached, would
        otherwise fill our fd table before the message ends); close() releases them."""
        self._buffer += data
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise ProtocolError("more than %d fds attached to one message" % MAX_FDS)

    def bytes_needed(self) -> int:
        """How many more bytes complete the message being read: the header first, then exactly
        its payload (so a reader never consumes the next message's bytes, or its fds)."""
        have = len(self._buffer)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        _, _, size = HEADER.unpack_from(self._buffer)
        return max(1, min(size, MAX_PAYLOAD + 1) + HEADER_SIZE - have)

    def next_message(self) -> Message | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        request, flags, size = HEADER.unpack_from(self._buffer)
        if flags & ~KNOWN_FLAGS or (flags & VERSION_MASK) != VERSION:
            raise ProtocolError("bad header flags %#x (request %d)" % (flags, request))
        if bool(flags & FLAG_REPLY) != self._expect_reply:
            raise ProtocolError("unexpected %s (flags %#x, request %d)"
                                % ("reply" if flags & FLAG_REPLY else "request", flags, request))
        if size > MAX_PAYLOAD:
            raise ProtocolError("payload of %d bytes exceeds %d (request %d)" % (size, MAX_PAYLOAD, request))
        if len(self._buffer) < HEADER_SIZE + size:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:HEADER_SIZE + size])
        del self._buffer[:HEADER_SIZE + size]
        fds, self._fds = self._fds, []
        return Message(request, flags, payload, fds)

    def close(self) -> None:
        """Close fds received but not yet handed out."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
