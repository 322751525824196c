"""vhost-user-blk controllers: features, config space, and the data-plane device behind them."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .. import _dataplane as dp
from .controller import Controller
from .features import BlkFeature, ProtocolFeature, VirtioFeature, mask

if TYPE_CHECKING:
    from ..dataplane import ReactorSet

MAX_QUEUES = 32
SEG_MAX = 128                    # data segments per request (ext: MAX_IOV - header - status)
MAX_DISCARD_SECTORS = 32768      # 16 MiB per discard / write-zeroes request
CONFIG_SIZE = 60                 # virtio_blk_config up to write_zeroes_may_unmap (+3 pad)

# BACKEND_REQ: a resized disk's new capacity is announced with CONFIG_CHANGE_MSG.  LOG_SHMFD and
# VHOST_LOG_ALL: live migration (the dirty log).
PROTOCOL_FEATURES = mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                         ProtocolFeature.BACKEND_REQ, ProtocolFeature.INFLIGHT_SHMFD,
                         ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.LOG_SHMFD)
RING_FEATURES = mask(VirtioFeature.VERSION_1, VirtioFeature.RING_INDIRECT_DESC,
                     VirtioFeature.RING_EVENT_IDX, VirtioFeature.VHOST_USER_PROTOCOL_FEATURES,
                     VirtioFeature.VHOST_LOG_ALL)
BLK_FEATURES = mask(BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.TOPOLOGY,
                    BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES)


def blk_config(num_blocks: int, block_size: int, num_queues: int) -> bytes:
    """The virtio_blk_config bytes (virtio 1.x §5.2.4) of a disk."""
    capacity = num_blocks * block_size // 512
    alignment = max(1, block_size // 512)
    return struct.pack(
        "<QIIHBBIBBHIBBHIIIIIB3x",
        capacity,                 # 0 capacity, 512-byte sectors
        0,                        # 8 size_max (SIZE_MAX not offered)
        SEG_MAX,                  # 12 seg_max
        0, 0, 0,                  # 16 geometry (not offered)
        block_size,               # 20 blk_size
        0, 0,                     # 24 physical_block_exp, 25 alignment_offset
        1,                        # 26 min_io_size (blocks)
        0,                        # 28 opt_io_size
        0, 0,                     # 32 writeback, 33 unused
        num_queues,               # 34 num_queues
        MAX_DISCARD_SECTORS,      # 36 max_discard_sectors
        1,                        # 40 max_discard_seg
        alignment,                # 44 discard_sector_alignment
        MAX_DISCARD_SECTORS,      # 48 max_write_zeroes_sectors
        1,                        # 52 max_write_zeroes_seg
        0,                        # 56 write_zeroes_may_unmap
    )


class BlkSessionDevice:
    """What a session sees of a blk controller, and how its queues reach the data plane."""

    def __init__(self, controller: BlkController) -> None:
        self.controller = controller
        self.name = controller.name

    @property
    def features(self) -> int:
        features = RING_FEATURES | BLK_FEATURES
        if self.controller.packed_ring:
            features |= 1 << VirtioFeature.RING_PACKED     # as SPDK: only when asked for
        if self.controller.readonly:
            features |= 1 << BlkFeature.RO
        return features

    @property
    def protocol_features(self) -> int:
        return PROTOCOL_FEATURES

    @property
    def max_queues(self) -> int:
        return MAX_QUEUES

    def read_config(self, offset: int, size: int) -> bytes:
        disk = self.controller.disk
        config = blk_config(disk.num_blocks if disk is not None else 0,
                            disk.block_size if disk is not None else 512, MAX_QUEUES)
        window = config[offset:offset + size]
        return window + bytes(size - len(window))

    def write_config(self, offset: int, data: bytes, flags: int) -> bool:
        return False             # nothing in our config space is writable (no CONFIG_WCE)

    def attach_queue(self, index: int, queue: dp.VirtQueue, acked_features: int = 0) -> dp.Reactor:
        self.controller.device.attach(queue)
        queue.set_coalescing(self.controller.delay_base_us, self.controller.iops_threshold)
        return self.controller.reactor_for_queue(index)

    def detach_queue(self, index: int, queue: dp.VirtQueue, reactor: dp.Reactor) -> None:
        device = self.controller.device
        device.detach(queue)
        if device.disk.removed and device.disk.in_use == 0:
            # A hot-removed bdev's registry left the disk open for its queues: the last one is
            # gone, so its fds and memory go now rather than whenever a cycle is collected.
            device.disk.close()


class BlkController(Controller):
    """A vhost-user-blk controller serving one bdev."""

    kind = "blk"

    def __init__(self, name: str, socket_dir: str, reactors: ReactorSet, cores: list[int],
                 bdev, readonly: bool = False, transport: str = "vhost_user_blk",
                 packed_ring: bool = False, **kw) -> None:
        super().__init__(name, socket_dir, reactors, cores, **kw)
        self.bdev = bdev
        self.readonly = readonly
        self.packed_ring = packed_ring
        self.transport = transport
        disk = bdev.disk
        self.device = dp.BlkDevice(disk, readonly, bdev.name.encode()[:20],
                                   MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS)

    @property
    def disk(self) -> dp.Disk | None:
        return self.bdev.disk if self.bdev is not None else None

    def session_device(self) -> BlkSessionDevice:
        return BlkSessionDevice(self)

    async def bdev_resized(self, bdev) -> None:
        """The bdev's size changed: its capacity (read live by GET_CONFIG) is announced to a
        connected front-end, which raises a config interrupt in the guest."""
        if bdev is self.bdev and self.connection is not None:
            await self.connection.config_changed()

    def bdev_removed(self) -> None:
        """The bdev went away (hot-remove): I/O fails from now on; the controller stays."""
        self.bdev = None

    def backend_specific(self) -> dict:
        return {"block": {"readonly": self.readonly,
                          "bdev": self.bdev.name if self.bdev is not None else None,
                          "transport": self.transport}}
