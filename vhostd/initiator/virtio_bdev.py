"""Another vhost-user target as a bdev (bdev_virtio_attach_controller, trtype "user"): our front-end
connects to its socket, and the disk's I/O goes out on the front-end's queues from whichever
reactor submits it (ext: BDEV_VIRTIO).

The requests' buffers live in another guest's memory, which the downstream target cannot see:
data goes through per-request bounce buffers in the front-end's shared memory (BOUNCE_BYTES each,
SLOTS requests in flight per queue), so one I/O moves at most BOUNCE_BYTES.
"""

from __future__ import annotations

from .. import _dataplane as dp
from ..errors import InvalidArgument, IOFailure
from .blk import VirtioBlk

BOUNCE_BYTES = 1 << 20
SLOTS = 32


def memory_bytes(vq_count: int, vq_size: int) -> int:
    """Front-end memory for the rings, request areas and bounce buffers of vq_count queues."""
    per_queue = 16 * vq_size * 2 + 8 * vq_size + SLOTS * (BOUNCE_BYTES + 8192) + (1 << 20)
    return vq_count * per_queue + (4 << 20)


def attach_blk(socket_path: str, vq_count: int = 1, vq_size: int = 512,
               timeout_s: float = 5.0) -> tuple[VirtioBlk, dp.Disk]:
    """Connect to a vhost-user-blk target and return (device, disk).  Blocking: run it off the
    event loop.  Raises IOFailure if the target cannot be reached or negotiated."""
    if vq_size & (vq_size - 1) or not 16 <= vq_size <= 1024:
        raise InvalidArgument("vq_size %d is not a power of two between 16 and 1024" % vq_size)
    if not 1 <= vq_count <= 32:
        raise InvalidArgument("vq_count %d is not between 1 and 32" % vq_count)
    device = VirtioBlk(socket_path, num_queues=vq_count, queue_size=vq_size,
                       bounce_bytes=BOUNCE_BYTES, slots=SLOTS, timeout_s=timeout_s,
                       memory_bytes=memory_bytes(vq_count, vq_size))
    try:
        device.open()
    except Exception as exc:
        device.close()
        raise IOFailure("cannot attach %s: %s" % (socket_path, exc)) from None
    config = device.config
    if config is None or config.capacity == 0:
        device.close()
        raise IOFailure("%s reports no capacity" % socket_path)
    block_size = config.blk_size if config.blk_size >= 512 else 512
    readonly = device.has(5)     # VIRTIO_BLK_F_RO
    disk = dp.virtio_disk([vq.queue for vq in device.frontend.vqs], block_size,
                          config.size_bytes // block_size, readonly, backend=device)
    return device, disk
