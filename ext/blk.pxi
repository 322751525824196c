# virtio-blk device: decode a request from its (already checked) iovecs, run it on the bdev, write
# the status byte.  Layout (virtio 1.x §5.2.6): device-readable header {type le32, reserved le32,
# sector le64}, data, and the last device-writable byte is the status.  Parsing goes by byte
# offsets across segments: no assumption that the header or the status has a descriptor of its own.

cdef enum:
    VIRTIO_BLK_T_IN = 0
    VIRTIO_BLK_T_OUT = 1
    VIRTIO_BLK_T_FLUSH = 4
    VIRTIO_BLK_T_GET_ID = 8
    VIRTIO_BLK_T_DISCARD = 11
    VIRTIO_BLK_T_WRITE_ZEROES = 13
    VIRTIO_BLK_S_OK = 0
    VIRTIO_BLK_S_IOERR = 1
    VIRTIO_BLK_S_UNSUPP = 2
    VIRTIO_BLK_WZ_UNMAP = 1
    BLK_REQ_HEADER = 16
    BLK_SEGMENT = 16          # discard / write-zeroes segment {sector le64, num u32, flags u32}


cdef inline uint8_t *_blk_status_byte(task_t *task) noexcept nogil:
    """Where the status goes: the last byte of the last device-writable segment, or NULL."""
    cdef iovec *last
    if task.n_iov <= task.n_readable:
        return NULL
    last = &task.iov[task.n_iov - 1]
    if last.iov_base == NULL or last.iov_len == 0:
        return NULL
    return <uint8_t *>last.iov_base + last.iov_len - 1


cdef void blk_finish(task_t *task, uint8_t status) noexcept nogil:
    """Write the status byte (if the chain has one) and complete the request."""
    if task.status != NULL:
        task.status[0] = status
        task.used_len += 1
    else:
        task.used_len = 0
    task_complete(task, status != VIRTIO_BLK_S_OK)


cdef void _blk_io_done(bdev_io_t *io) noexcept nogil:
    cdef task_t *task = <task_t *>io.cb_arg
    if io.status == 0 and io.op == OP_READ:
        task.used_len = <uint32_t>io.length
    blk_finish(task, VIRTIO_BLK_S_OK if io.status == 0 else VIRTIO_BLK_S_IOERR)


cdef inline void _blk_start_io(vq_t *vq, task_t *task, blk_dev_t *dev, uint32_t op,
                               uint64_t offset, uint64_t length, int first, int count) noexcept nogil:
    cdef bdev_io_t *io = &task.io
    io.bdev = dev.bdev
    io.op = op
    io.offset = offset
    io.length = length
    io.iov = &task.iov[first]
    io.iovcnt = count
    io.ranges = NULL
    io.nranges = 0
    io.cb = _blk_io_done
    io.cb_arg = task
    io.stats = &vq.io_stats
    bdev_submit(vq.io, io)


cdef void _blk_ranges(vq_t *vq, task_t *task, blk_dev_t *dev, uint32_t type,
                      int first, int count) noexcept nogil:
    """DISCARD / WRITE_ZEROES: one segment per request (max_*_seg = 1 in our config space)."""
    cdef uint8_t seg[BLK_SEGMENT]
    cdef uint64_t sector
    cdef uint32_t num, flags, limit
    if iov_total(&task.iov[first], count) != BLK_SEGMENT:
        blk_finish(task, VIRTIO_BLK_S_IOERR if iov_total(&task.iov[first], count) > BLK_SEGMENT
                   else VIRTIO_BLK_S_UNSUPP)
        return
    iov_to_buf(&task.iov[first], count, 0, seg, BLK_SEGMENT)
    memcpy(&sector, seg, 8)
    memcpy(&num, seg + 8, 4)
    memcpy(&flags, seg + 12, 4)
    limit = dev.max_discard_sectors if type == VIRTIO_BLK_T_DISCARD else dev.max_write_zeroes_sectors
    if (type == VIRTIO_BLK_T_DISCARD and flags != 0) or (flags & ~(<uint32_t>VIRTIO_BLK_WZ_UNMAP)):
        blk_finish(task, VIRTIO_BLK_S_UNSUPP)
        return
    if num > limit or sector > (<uint64_t>-1) // 512 - num:
        blk_finish(task, VIRTIO_BLK_S_IOERR)
        return
    task.io.bdev = dev.bdev
    task.io.op = OP_UNMAP if type == VIRTIO_BLK_T_DISCARD else OP_WRITE_ZEROES
    task.io.offset = sector * 512
    task.io.length = <uint64_t>num * 512
    task.io.iov = NULL
    task.io.iovcnt = 0
    task.io.ranges = NULL
    task.io.nranges = 0
    task.io.cb = _blk_io_done
    task.io.cb_arg = task
    task.io.stats = &vq.io_stats
    bdev_submit(vq.io, &task.io)


cdef void blk_handle(vq_t *vq, task_t *task) noexcept nogil:
    """Execute one virtio-blk request (the queue handler of blk controllers)."""
    cdef blk_dev_t *dev = <blk_dev_t *>vq.device
    cdef uint8_t hdr[BLK_REQ_HEADER]
    cdef uint32_t type
    cdef uint64_t sector
    cdef size_t readable, writable, id_len
    cdef int first_data, n_writable
    task.io.op = 0
    task.io.length = 0
    task.status = _blk_status_byte(task)
    if task.bad or task.status == NULL:
        blk_finish(task, VIRTIO_BLK_S_IOERR)
        return
    readable = iov_total(task.iov, task.n_readable)
    if readable < BLK_REQ_HEADER:
        blk_finish(task, VIRTIO_BLK_S_IOERR)
        return
    iov_to_buf(task.iov, task.n_readable, 0, hdr, BLK_REQ_HEADER)
    memcpy(&type, hdr, 4)
    memcpy(&sector, hdr + 8, 8)
    # The status byte is not data: drop it from the writable segments.
    n_writable = iov_trim_tail(&task.iov[task.n_readable], task.n_iov - task.n_readable, 1)
    writable = iov_total(&task.iov[task.n_readable], n_writable)
    if type == VIRTIO_BLK_T_IN or type == VIRTIO_BLK_T_OUT:
        if sector > (<uint64_t>-1) // 512:
            blk_finish(task, VIRTIO_BLK_S_IOERR)
            return
        if type == VIRTIO_BLK_T_IN:
            task.io.op = OP_READ
            _blk_start_io(vq, task, dev, OP_READ, sector * 512, writable, task.n_readable, n_writable)
        elif dev.readonly:
            blk_finish(task, VIRTIO_BLK_S_IOERR)
        else:
            first_data = iov_skip_head(task.iov, task.n_readable, BLK_REQ_HEADER)
            task.io.op = OP_WRITE
            _blk_start_io(vq, task, dev, OP_WRITE, sector * 512, readable - BLK_REQ_HEADER,
                          first_data, task.n_readable - first_data)
    elif type == VIRTIO_BLK_T_FLUSH:
        _blk_start_io(vq, task, dev, OP_FLUSH, 0, 0, 0, 0)
    elif type == VIRTIO_BLK_T_GET_ID:
        id_len = writable if writable < BLK_SERIAL_LEN else BLK_SERIAL_LEN
        buf_to_iov(&task.iov[task.n_readable], n_writable, 0, dev.serial, id_len)
        task.used_len = <uint32_t>id_len
        blk_finish(task, VIRTIO_BLK_S_OK)
    elif type == VIRTIO_BLK_T_DISCARD or type == VIRTIO_BLK_T_WRITE_ZEROES:
        if dev.readonly or (dev.max_discard_sectors == 0 and type == VIRTIO_BLK_T_DISCARD) \
                or (dev.max_write_zeroes_sectors == 0 and type == VIRTIO_BLK_T_WRITE_ZEROES):
            blk_finish(task, VIRTIO_BLK_S_UNSUPP if not dev.readonly else VIRTIO_BLK_S_IOERR)
            return
        first_data = iov_skip_head(task.iov, task.n_readable, BLK_REQ_HEADER)
        _blk_ranges(vq, task, dev, type, first_data, task.n_readable - first_data)
    else:
        blk_finish(task, VIRTIO_BLK_S_UNSUPP)


cdef class BlkDevice:
    """A virtio-blk device's data-plane state: the bdev it serves, read-only flag, serial."""
    cdef blk_dev_t dev
    cdef readonly Disk disk

    def __cinit__(self, Disk disk, bint readonly=False, bytes serial=b"",
                  uint32_t max_discard_sectors=0, uint32_t max_write_zeroes_sectors=0):
        self.disk = disk
        self.dev.bdev = disk.bdev
        self.dev.readonly = readonly or disk.readonly
        self.dev.max_discard_sectors = max_discard_sectors
        self.dev.max_write_zeroes_sectors = max_write_zeroes_sectors
        memset(self.dev.serial, 0, BLK_SERIAL_LEN)
        memcpy(self.dev.serial, <char *>serial, min(len(serial), BLK_SERIAL_LEN))

    @property
    def readonly(self):
        return bool(self.dev.readonly)

    def attach(self, VirtQueue queue):
        """Make this device the handler of queue and account its I/O to the disk."""
        queue.vq.device = &self.dev
        queue.vq.handler = blk_handle
        queue.device = self
        self.disk.attach_channel(&queue.vq.io_stats, queue)

    def detach(self, VirtQueue queue):
        """Stop accounting queue's I/O to the disk (the queue is no longer polled)."""
        self.disk.detach_channel(&queue.vq.io_stats)
        memset(&queue.vq.io_stats, 0, sizeof(io_stats_t))
        queue.vq.device = NULL
        queue.vq.handler = NULL
        queue.device = None
