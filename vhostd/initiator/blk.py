"""virtio-blk over the front-end: config space parsing and every request type (vhost_user.md §4).

``VirtioBlk`` connects, reads the config space, starts the device and offers one method per
request type.  ``request()`` is the raw form (any type, any data) for tests of error paths; the
named methods raise ``BlkError`` unless the device answers OK.  Requests are synchronous on one
queue; for load, use the C path (``DriverQueue`` as ``DEVICE_BLK`` with a ``LoadGenerator``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import _dataplane as dp
from ..vhost.features import BlkFeature, ProtocolFeature, mask
from .frontend import Frontend, Writable

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_GET_LIFETIME = 0, 1, 4, 8, 10
T_DISCARD, T_WRITE_ZEROES, T_SECURE_ERASE = 11, 13, 14
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512
ID_BYTES = 20
SEGMENT = struct.Struct("<QII")          # discard / write-zeroes: sector, num_sectors, flags
SEGMENT_F_UNMAP = 1

# Device features this driver understands (QEMU's vhost-user-blk set, less RO-only details).
DRIVER_FEATURES = mask(BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.GEOMETRY, BlkFeature.RO,
                       BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.TOPOLOGY,
                       BlkFeature.CONFIG_WCE, BlkFeature.MQ, BlkFeature.DISCARD,
                       BlkFeature.WRITE_ZEROES)
CONFIG_BYTES = 57                         # what QEMU 7.2 asks for by default


class BlkError(OSError):
    """A virtio-blk request completed with a status other than OK."""

    def __init__(self, what: str, status: int) -> None:
        name = {S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}.get(status, "status %d" % status)
        super().__init__("%s failed: %s" % (what, name))
        self.status = status


@dataclass(frozen=True)
class BlkConfig:
    """virtio_blk_config (virtio 1.x §5.2.4), fields as the device reports them."""

    capacity: int                      # 512-byte sectors
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 512
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    _LAYOUT = struct.Struct("<QIIHBBIBBHIBBHIIIIIB")

    @classmethod
    def parse(cls, data: bytes) -> BlkConfig:
        """Decode the first len(data) bytes of the config space (missing fields read as 0)."""
        raw = bytes(data[:cls._LAYOUT.size]).ljust(cls._LAYOUT.size, b"\0")
        (capacity, size_max, seg_max, cyl, heads, sectors, blk_size, pbe, align, min_io, opt_io,
         writeback, _unused, num_queues, mds, mdseg, dsa, mwzs, mwzseg, wzmu) = cls._LAYOUT.unpack(raw)
        return cls(capacity, size_max, seg_max, cyl, heads, sectors, blk_size, pbe, align, min_io,
                   opt_io, writeback, num_queues, mds, mdseg, dsa, mwzs, mwzseg, wzmu)

    @property
    def size_bytes(self) -> int:
        return self.capacity * SECTOR


@dataclass(frozen=True)
class BlkResult:
    status: int
    used_len: int
    data: bytes


class VirtioBlk:
    """A vhost-user-blk device driven by this process.  Frontend options pass through
    (num_queues, queue_size, memory_regions, event_idx, indirect, use_mem_slots …)."""

    def __init__(self, path: str, *, features: int = DRIVER_FEATURES, config_bytes: int = CONFIG_BYTES,
                 **frontend_options) -> None:
        self.frontend = Frontend(path, device=dp.DEVICE_BLK, device_features=features,
                                 **frontend_options)
        self.config_bytes = config_bytes
        self.config: BlkConfig | None = None

    def open(self) -> VirtioBlk:
        """Connect, read the config space (when CONFIG is negotiated) and start the rings."""
        self.frontend.connect()
        self.read_config()
        self.frontend.start()
        return self

    def read_config(self) -> BlkConfig | None:
        if self.frontend.has_protocol(ProtocolFeature.CONFIG):
            self.config = BlkConfig.parse(self.frontend.get_config(0, self.config_bytes))
        return self.config

    def has(self, feature: int) -> bool:
        return self.frontend.has_feature(feature)

    @property
    def memory(self) -> dp.DriverMemory:
        return self.frontend.memory

    # -- the raw request -------------------------------------------------------------------
    def request(self, type_: int, sector: int = 0, data_out: bytes = b"", data_in_len: int = 0, *,
                queue: int = 0, segment_bytes: int = 0, indirect: bool | None = None,
                timeout_s: float = 5.0) -> BlkResult:
        """Post one request — header, data_out, data_in buffer, status — and wait for it.
        segment_bytes > 0 splits the data into descriptors of that size."""
        used_len, (data_in, status) = self.frontend.transact(
            queue, [struct.pack("<IIQ", type_, 0, sector), data_out, Writable(data_in_len, 0xA5),
                    Writable(1, 0xFF)], segment_bytes=segment_bytes, indirect=indirect,
            timeout_s=timeout_s)
        return BlkResult(status[0], used_len, data_in)

    def _ok(self, what: str, result: BlkResult) -> BlkResult:
        if result.status != S_OK:
            raise BlkError(what, result.status)
        return result

    # -- request types ---------------------------------------------------------------------
    def read(self, sector: int, length_bytes: int, **options) -> bytes:
        return self._ok("read", self.request(T_IN, sector, data_in_len=length_bytes, **options)).data

    def write(self, sector: int, data: bytes, **options) -> None:
        self._ok("write", self.request(T_OUT, sector, data_out=data, **options))

    def flush(self, **options) -> None:
        self._ok("flush", self.request(T_FLUSH, 0, **options))

    def get_id(self, **options) -> bytes:
        """The serial, without its NUL padding."""
        return self._ok("get-id", self.request(T_GET_ID, 0, data_in_len=ID_BYTES, **options)).data.split(b"\0", 1)[0]

    def discard(self, ranges: list[tuple[int, int]], **options) -> None:
        """ranges: [(sector, num_sectors)]."""
        self._ok("discard", self.request(T_DISCARD, 0, data_out=_segments(ranges, 0), **options))

    def write_zeroes(self, ranges: list[tuple[int, int]], unmap: bool = False, **options) -> None:
        flags = SEGMENT_F_UNMAP if unmap else 0
        self._ok("write-zeroes", self.request(T_WRITE_ZEROES, 0, data_out=_segments(ranges, flags), **options))

    def close(self) -> None:
        self.frontend.close()

    def __enter__(self) -> VirtioBlk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _segments(ranges: list[tuple[int, int]], flags: int) -> bytes:
    return b"".join(SEGMENT.pack(sector, count, flags) for sector, count in ranges)
