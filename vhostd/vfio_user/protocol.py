"""vfio-user wire format: a sans-I/O codec between bytes (+ file descriptors) and messages.

A message is a 16-byte header (msg_id u16, command u16, msg_size u32 counting the header, flags u32,
error u32; host-endian) followed by the payload; file descriptors travel as SCM_RIGHTS with the
message.  This module knows command numbers, flag bits, payload layouts and their sizes; it knows
nothing of sockets or of what a command means to a device.  The server's session
(vfio_user/session.py) decodes commands and encodes replies; a client would do the opposite.
"""

from __future__ import annotations

import json
import os
import struct
from errno import EINVAL
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size

TYPE_MASK = 0xF
TYPE_COMMAND = 0
TYPE_REPLY = 1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
KNOWN_FLAGS = TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

# What the server accepts, offered in its VERSION reply.  QEMU reads all 4 KiB of config space in one
# REGION_READ, so the data size must be at least that.
MAX_DATA_XFER_SIZE = 1 << 20
MAX_MSG_FDS = 8
MAX_DMA_MAPS = 1024
PAGE_SIZE = 4096
# The largest message: a REGION_WRITE of MAX_DATA_XFER_SIZE bytes (VERSION's JSON is far smaller).
MAX_MESSAGE_SIZE = HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE


class Command(IntEnum):
    """vfio-user commands (client → server unless noted)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11            # server → client
    DMA_WRITE = 12           # server → client
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid vfio-user message, or a command the session cannot
    take in its state; the connection is unusable and closes."""


class CommandError(Exception):
    """A well-formed command that is refused: the reply is an ERROR header carrying ``errno``."""

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno


# ---------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------
VERSION_HEAD = struct.Struct("<HH")
DMA_MAP = struct.Struct("<IIQQQ")
DMA_UNMAP = struct.Struct("<IIQQ")
DEVICE_INFO = struct.Struct("<IIII")
REGION_INFO = struct.Struct("<IIIIQQ")
CAP_HEADER = struct.Struct("<HHI")
SPARSE_MMAP_HEAD = struct.Struct("<II")
SPARSE_AREA = struct.Struct("<QQ")
IRQ_INFO = struct.Struct("<IIII")
IRQ_SET = struct.Struct("<IIIII")
REGION_ACCESS = struct.Struct("<QII")


class DmaFlag(IntFlag):
    READ = 1
    WRITE = 2


class DeviceFlag(IntFlag):
    RESET = 1
    PCI = 2


class RegionFlag(IntFlag):
    READ = 1
    WRITE = 2
    MMAP = 4
    CAPS = 8


class IrqInfoFlag(IntFlag):
    EVENTFD = 1
    MASKABLE = 2
    AUTOMASKED = 4
    NORESIZE = 8


class IrqSetFlag(IntFlag):
    DATA_NONE = 1
    DATA_BOOL = 2
    DATA_EVENTFD = 4
    ACTION_MASK = 8
    ACTION_UNMASK = 16
    ACTION_TRIGGER = 32


# Plain ints: ``~`` of an IntFlag keeps only the flag's own bits, which would hide unknown ones.
IRQ_SET_DATA = int(IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD)
IRQ_SET_ACTION = int(IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER)
DMA_FLAGS = int(DmaFlag.READ | DmaFlag.WRITE)


class PciRegion(IntEnum):
    """Region indexes of a PCI device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class PciIrq(IntEnum):
    """IRQ indexes of a PCI device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5
CAP_SPARSE_MMAP = 1


def _short(name: str, payload: bytes, need: int) -> None:
    if len(payload) < need:
        raise CommandError(EINVAL, "%s payload of %d bytes is shorter than %d" % (name, len(payload), need))


@dataclass(frozen=True)
class Version:
    """VERSION: protocol major/minor and the JSON capabilities object."""

    major: int
    minor: int
    capabilities: dict[str, Any]

    def encode(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        return VERSION_HEAD.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def decode(cls, payload: bytes) -> Version:
        """Raises ProtocolError for anything that is not a VERSION with a JSON object: a peer that
        cannot state its capabilities cannot be served."""
        if len(payload) < VERSION_HEAD.size:
            raise ProtocolError("VERSION payload of %d bytes is too short" % len(payload))
        major, minor = VERSION_HEAD.unpack_from(payload)
        text = bytes(payload[VERSION_HEAD.size:]).split(b"\0", 1)[0]
        if not text:
            return cls(major, minor, {})
        try:
            document = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError("VERSION capabilities are not JSON: %s" % exc) from None
        if not isinstance(document, dict):
            raise ProtocolError("VERSION capabilities are not a JSON object")
        capabilities = document.get("capabilities", {})
        if not isinstance(capabilities, dict):
            raise ProtocolError("VERSION \"capabilities\" is not a JSON object")
        return cls(major, minor, capabilities)


@dataclass(frozen=True)
class DmaMap:
    """DMA_MAP: a window of guest-physical memory, backed by the attached fd at ``offset`` (or by
    nothing: then reachable only through DMA_READ/WRITE)."""

    flags: int
    offset: int
    addr: int
    size: int
    argsz: int = DMA_MAP.size

    def encode(self) -> bytes:
        return DMA_MAP.pack(self.argsz, self.flags, self.offset, self.addr, self.size)

    @classmethod
    def decode(cls, payload: bytes) -> DmaMap:
        _short("DMA_MAP", payload, DMA_MAP.size)
        argsz, flags, offset, addr, size = DMA_MAP.unpack_from(payload)
        return cls(flags, offset, addr, size, argsz)


@dataclass(frozen=True)
class DmaUnmap:
    """DMA_UNMAP: the window an earlier DMA_MAP named, exactly."""

    flags: int
    addr: int
    size: int
    argsz: int = DMA_UNMAP.size

    def encode(self) -> bytes:
        return DMA_UNMAP.pack(self.argsz, self.flags, self.addr, self.size)

    @classmethod
    def decode(cls, payload: bytes) -> DmaUnmap:
        _short("DMA_UNMAP", payload, DMA_UNMAP.size)
        argsz, flags, addr, size = DMA_UNMAP.unpack_from(payload)
        return cls(flags, addr, size, argsz)


@dataclass(frozen=True)
class DeviceInfo:
    """DEVICE_GET_INFO (request: argsz only matters; reply: flags and counts)."""

    flags: int
    num_regions: int
    num_irqs: int
    argsz: int = DEVICE_INFO.size

    def encode(self) -> bytes:
        return DEVICE_INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def decode(cls, payload: bytes) -> DeviceInfo:
        _short("DEVICE_GET_INFO", payload, DEVICE_INFO.size)
        argsz, flags, num_regions, num_irqs = DEVICE_INFO.unpack_from(payload)
        return cls(flags, num_regions, num_irqs, argsz)


@dataclass(frozen=True)
class SparseArea:
    """One mappable piece of a region: offset within the region, size."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO: the fixed 32 bytes; ``caps`` are the capability-chain bytes that
    follow them in a full reply."""

    index: int
    flags: int
    size: int
    offset: int
    cap_offset: int = 0
    argsz: int = REGION_INFO.size
    caps: bytes = b""

    def encode(self) -> bytes:
        return REGION_INFO.pack(self.argsz, self.flags, self.index, self.cap_offset, self.size,
                                self.offset) + self.caps

    @classmethod
    def decode(cls, payload: bytes) -> RegionInfo:
        _short("DEVICE_GET_REGION_INFO", payload, REGION_INFO.size)
        argsz, flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(payload)
        return cls(index, flags, size, offset, cap_offset, argsz, bytes(payload[REGION_INFO.size:]))


def encode_sparse_mmap_cap(areas: tuple[SparseArea, ...], next_offset: int = 0) -> bytes:
    """The sparse-mmap capability (id 1, version 1) listing ``areas``."""
    head = CAP_HEADER.pack(CAP_SPARSE_MMAP, 1, next_offset) + SPARSE_MMAP_HEAD.pack(len(areas), 0)
    return head + b"".join(SPARSE_AREA.pack(a.offset, a.size) for a in areas)


def decode_sparse_mmap_cap(caps: bytes) -> tuple[SparseArea, ...]:
    """The areas of a sparse-mmap capability at the start of ``caps`` (a client's view)."""
    cap_id, _, _ = CAP_HEADER.unpack_from(caps)
    if cap_id != CAP_SPARSE_MMAP:
        raise ProtocolError("capability %d is not sparse mmap" % cap_id)
    count, _ = SPARSE_MMAP_HEAD.unpack_from(caps, CAP_HEADER.size)
    start = CAP_HEADER.size + SPARSE_MMAP_HEAD.size
    return tuple(SparseArea(*SPARSE_AREA.unpack_from(caps, start + i * SPARSE_AREA.size))
                 for i in range(count))


@dataclass(frozen=True)
class IrqInfo:
    """DEVICE_GET_IRQ_INFO: an IRQ index, its flags and how many vectors it has."""

    index: int
    flags: int = 0
    count: int = 0
    argsz: int = IRQ_INFO.size

    def encode(self) -> bytes:
        return IRQ_INFO.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, payload: bytes) -> IrqInfo:
        _short("DEVICE_GET_IRQ_INFO", payload, IRQ_INFO.size)
        argsz, flags, index, count = IRQ_INFO.unpack_from(payload)
        return cls(index, flags, count, argsz)


@dataclass(frozen=True)
class IrqSet:
    """DEVICE_SET_IRQS: act (mask, unmask, trigger) on vectors ``start…start+count-1`` of ``index``
    with data none, bools (``data``, one byte per vector) or eventfds (the attached fds)."""

    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    argsz: int = IRQ_SET.size

    def encode(self) -> bytes:
        return IRQ_SET.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> IrqSet:
        _short("DEVICE_SET_IRQS", payload, IRQ_SET.size)
        argsz, flags, index, start, count = IRQ_SET.unpack_from(payload)
        return cls(flags, index, start, count, bytes(payload[IRQ_SET.size:]), argsz)


@dataclass(frozen=True)
class RegionAccess:
    """REGION_READ / REGION_WRITE: ``count`` bytes at ``offset`` of region ``region``; ``data`` is
    what a write carries (or a read's reply returns)."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    def encode(self) -> bytes:
        return REGION_ACCESS.pack(self.offset, self.region, self.count) + self.data

    def encode_head(self) -> bytes:
        """The reply to a write: the access without data."""
        return REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def decode(cls, payload: bytes) -> RegionAccess:
        _short("REGION_READ/WRITE", payload, REGION_ACCESS.size)
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        return cls(offset, region, count, bytes(payload[REGION_ACCESS.size:]))


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------
def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    """Close each fd, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class Message:
    """One vfio-user message as received: header fields, raw payload and the fds that came with it.
    The receiver owns ``fds`` and must close those it does not keep."""

    msg_id: int
    command: int
    flags: int = TYPE_COMMAND
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)
    error: int = 0

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_reply(self) -> bool:
        return (self.flags & TYPE_MASK) == TYPE_REPLY

    def name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return "command %d" % self.command

    def close_fds(self) -> None:
        """Close every fd the message carries (a refused message keeps nothing)."""
        close_fds(self.fds)
        self.fds = []


def encode(msg_id: int, command: int, payload: bytes = b"", flags: int = TYPE_COMMAND,
           error: int = 0) -> bytes:
    """Header + payload bytes of one message (fds are sent alongside by the transport)."""
    return HEADER.pack(msg_id & 0xFFFF, command & 0xFFFF, HEADER_SIZE + len(payload), flags,
                       error) + payload


def encode_reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    """A successful reply: same id and command, type REPLY."""
    return encode(msg_id, command, payload, TYPE_REPLY)


def encode_error(msg_id: int, command: int, errno: int) -> bytes:
    """A failed reply: the bare header with the ERROR flag and the errno."""
    return encode(msg_id, command, b"", TYPE_REPLY | FLAG_ERROR, errno)


class MessageReader:
    """Reassembles messages from a byte stream and the fds received with it (sans-I/O).

    ``feed(data, fds)`` with what one recvmsg returned; then ``next_message()`` until it returns
    None.  Fds received with a message's bytes belong to that message, as QEMU sends a message and
    its fds in one sendmsg.  Raises ProtocolError on a bad header; the stream is then unusable.
    ``expect_reply`` selects which message type the reader accepts (a server reads commands).
    """

    def __init__(self, expect_reply: bool = False, max_fds: int = MAX_MSG_FDS) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._expect_reply = expect_reply
        self._max_fds = max_fds

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Add what one recvmsg returned.  Raises ProtocolError when the message being read has
        collected more fds than the limit (close() then releases them)."""
        self._buffer += data
        self._fds.extend(fds)
        if len(self._fds) > self._max_fds:
            raise ProtocolError("more than %d fds attached to one message" % self._max_fds)

    def bytes_needed(self) -> int:
        """How many more bytes complete the message being read: the header first, then exactly
        its payload (so a reader never consumes the next message's bytes, or its fds)."""
        have = len(self._buffer)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        size = HEADER.unpack_from(self._buffer)[2]
        return max(1, min(max(size, HEADER_SIZE), MAX_MESSAGE_SIZE + 1) - have)

    def next_message(self) -> Message | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        msg_id, command, size, flags, error = HEADER.unpack_from(self._buffer)
        if size < HEADER_SIZE or size > MAX_MESSAGE_SIZE:
            raise ProtocolError("message size %d is outside [%d, %d] (command %d)"
                                % (size, HEADER_SIZE, MAX_MESSAGE_SIZE, command))
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError("unknown header flags %#x (command %d)" % (flags, command))
        kind = flags & TYPE_MASK
        if kind not in (TYPE_COMMAND, TYPE_REPLY):
            raise ProtocolError("message type %d is neither command nor reply" % kind)
        if (kind == TYPE_REPLY) != self._expect_reply:
            raise ProtocolError("unexpected %s (flags %#x, command %d)"
                                % ("reply" if kind == TYPE_REPLY else "command", flags, command))
        if len(self._buffer) < size:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:size])
        del self._buffer[:size]
        fds, self._fds = self._fds, []
        return Message(msg_id, command, flags, payload, fds, error)

    def close(self) -> None:
        """Close fds received but not yet handed out."""
        close_fds(self._fds)
        self._fds = []
