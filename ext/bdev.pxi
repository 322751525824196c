# Block devices: malloc (anonymous memory), null (writes discarded, reads move no data), file (a regular
# file or block device through io_uring), virtio (another target) and rbd (librbd, rbd.pxi).
# One request type (bdev_io_t), one entry point
# (bdev_submit) and one completion path (bdev_io_finish) for every kind; the per-I/O code holds no
# Python object and never takes the GIL.

from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from libc.errno cimport (errno, EINVAL, ENODEV, EROFS, ERANGE, ENOMEM, EBUSY, EOPNOTSUPP, EIO,
                         EAGAIN)

cdef extern from "<liburing.h>" nogil:
    int io_uring_queue_init(unsigned entries, io_uring *ring, unsigned flags)
    void io_uring_queue_exit(io_uring *ring)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    int io_uring_submit(io_uring *ring)
    void io_uring_prep_readv(io_uring_sqe *sqe, int fd, const iovec *iovecs, unsigned nr_vecs,
                             uint64_t offset)
    void io_uring_prep_writev(io_uring_sqe *sqe, int fd, const iovec *iovecs, unsigned nr_vecs,
                              uint64_t offset)
    void io_uring_prep_fsync(io_uring_sqe *sqe, int fd, unsigned fsync_flags)
    void io_uring_prep_fallocate(io_uring_sqe *sqe, int fd, int mode, off_t offset, off_t length)
    void io_uring_sqe_set_data(io_uring_sqe *sqe, void *data)
    void *io_uring_cqe_get_data(const io_uring_cqe *cqe)
    int io_uring_peek_cqe(io_uring *ring, io_uring_cqe **cqe_ptr)
    int io_uring_wait_cqe(io_uring *ring, io_uring_cqe **cqe_ptr)
    void io_uring_cqe_seen(io_uring *ring, io_uring_cqe *cqe)
    int io_uring_register_eventfd(io_uring *ring, int fd)
    unsigned IORING_FSYNC_DATASYNC

cdef extern from "<fcntl.h>" nogil:
    int open(const char *path, int flags, ...)
    int O_RDONLY
    int O_RDWR
    int O_CLOEXEC
    int O_DIRECT
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE
    int FALLOC_FL_ZERO_RANGE

cdef extern from *:
    """
    #include <sys/ioctl.h>
    #include <sys/stat.h>
    #include <fcntl.h>
    #include <linux/fs.h>
    #include <linux/stat.h>
    /* Size in bytes and logical block size of a block device; 0 on success. */
    static int vhd_blockdev_geometry(int fd, uint64_t *size_bytes, uint32_t *logical_block) {
        uint64_t size = 0; int lbs = 0;
        if (ioctl(fd, BLKGETSIZE64, &size) != 0) return -1;
        if (ioctl(fd, BLKSSZGET, &lbs) != 0) return -1;
        *size_bytes = size; *logical_block = (uint32_t)lbs;
        return 0;
    }
    /* Alignment O_DIRECT needs on this fd (offsets, lengths and buffers), 0 if it is unsupported,
       or 4096 when the kernel does not say. */
    static uint32_t vhd_direct_alignment(int fd) {
    #ifdef STATX_DIOALIGN
        struct statx stx;
        if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN)) {
            uint32_t a = stx.stx_dio_offset_align;
            if (a == 0) return 0;
            if (stx.stx_dio_mem_align > a) a = stx.stx_dio_mem_align;
            return a;
        }
    #endif
        return 4096;
    }
    """
    int vhd_blockdev_geometry(int fd, uint64_t *size_bytes, uint32_t *logical_block) nogil
    uint32_t vhd_direct_alignment(int fd) nogil

cdef enum:
    IO_RING_ENTRIES = 512
    QOS_TIMESLICES_PER_SEC = 1000


# ---------------------------------------------------------------------------------------------
# Accounting and completion
# ---------------------------------------------------------------------------------------------
cdef inline void _account_latency(uint64_t *total, uint64_t *maximum, uint64_t *minimum,
                                  uint64_t lat) noexcept nogil:
    total[0] += lat
    if lat > maximum[0]:
        maximum[0] = lat
    if minimum[0] == 0 or lat < minimum[0]:
        minimum[0] = lat


cdef void bdev_io_finish(bdev_io_t *io, int32_t status) noexcept nogil:
    """Account a finished I/O to its channel and hand it back through its callback."""
    cdef io_stats_t *s = io.stats
    cdef uint64_t lat
    io.status = status
    if s != NULL:
        lat = vhd_clock() - io.submit_tick
        if status != 0:
            s.failed += 1
        elif io.op == OP_READ:
            s.num_read_ops += 1
            s.bytes_read += io.length
            _account_latency(&s.read_latency_ticks, &s.max_read_latency_ticks,
                             &s.min_read_latency_ticks, lat)
        elif io.op == OP_WRITE or io.op == OP_WRITE_ZEROES:
            s.num_write_ops += 1
            s.bytes_written += io.length
            _account_latency(&s.write_latency_ticks, &s.max_write_latency_ticks,
                             &s.min_write_latency_ticks, lat)
        elif io.op == OP_UNMAP:
            s.num_unmap_ops += 1
            s.bytes_unmapped += io.length
            _account_latency(&s.unmap_latency_ticks, &s.max_unmap_latency_ticks,
                             &s.min_unmap_latency_ticks, lat)
        else:
            s.num_flush_ops += 1
    if io.cb != NULL:
        io.cb(io)


# ---------------------------------------------------------------------------------------------
# QoS: shared token buckets per bdev, refilled per 1 ms timeslice
# ---------------------------------------------------------------------------------------------
cdef inline void _qos_refill(qos_t *q, uint64_t now) noexcept nogil:
    cdef uint64_t slice_ticks = _tick_rate // QOS_TIMESLICES_PER_SEC
    cdef uint64_t last = q.last_refill_tick
    if slice_ticks == 0 or now - last < slice_ticks:
        return
    if not vhd_cas_u64(&q.last_refill_tick, last, now):
        return      # another reactor refilled this timeslice
    # A new timeslice starts with one slice of allowance; debt from a large I/O carries over.
    if q.ios_per_sec:
        q.ios_tokens = _qos_slice_tokens(q.ios_tokens, q.ios_per_sec)
    if q.bytes_per_sec:
        q.bytes_tokens = _qos_slice_tokens(q.bytes_tokens, q.bytes_per_sec)
    if q.read_bytes_per_sec:
        q.read_bytes_tokens = _qos_slice_tokens(q.read_bytes_tokens, q.read_bytes_per_sec)
    if q.write_bytes_per_sec:
        q.write_bytes_tokens = _qos_slice_tokens(q.write_bytes_tokens, q.write_bytes_per_sec)


cdef inline int64_t _qos_slice_tokens(int64_t current, uint64_t per_sec) noexcept nogil:
    cdef int64_t allowance = <int64_t>((per_sec + QOS_TIMESLICES_PER_SEC - 1) // QOS_TIMESLICES_PER_SEC)
    if current < 0:
        return current + allowance
    return allowance


cdef bint qos_admit(bdev_t *b, bdev_io_t *io) noexcept nogil:
    """Take the tokens an I/O needs; False (nothing taken) if a limit is exhausted this slice."""
    cdef qos_t *q = &b.qos
    cdef int64_t nbytes = <int64_t>io.length
    if io.op != OP_READ and io.op != OP_WRITE:
        return True
    _qos_refill(q, vhd_ticks())
    if q.ios_per_sec and q.ios_tokens <= 0:
        return False
    if q.bytes_per_sec and q.bytes_tokens <= 0:
        return False
    if io.op == OP_READ and q.read_bytes_per_sec and q.read_bytes_tokens <= 0:
        return False
    if io.op == OP_WRITE and q.write_bytes_per_sec and q.write_bytes_tokens <= 0:
        return False
    if q.ios_per_sec:
        vhd_fetch_add_i64(&q.ios_tokens, -1)
    if q.bytes_per_sec:
        vhd_fetch_add_i64(&q.bytes_tokens, -nbytes)
    if io.op == OP_READ and q.read_bytes_per_sec:
        vhd_fetch_add_i64(&q.read_bytes_tokens, -nbytes)
    if io.op == OP_WRITE and q.write_bytes_per_sec:
        vhd_fetch_add_i64(&q.write_bytes_tokens, -nbytes)
    return True


# ---------------------------------------------------------------------------------------------
# The per-thread I/O engine
# ---------------------------------------------------------------------------------------------
cdef int io_ctx_init(io_ctx_t *ctx) noexcept nogil:
    """Set up a thread's io_uring; 0 or -errno."""
    cdef int rc
    memset(ctx, 0, sizeof(io_ctx_t))
    ctx.event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if ctx.event_fd < 0:
        return -errno
    rc = io_uring_queue_init(IO_RING_ENTRIES, &ctx.ring, 0)
    if rc < 0:
        close(ctx.event_fd)
        ctx.event_fd = -1
        return rc
    rc = io_uring_register_eventfd(&ctx.ring, ctx.event_fd)
    if rc < 0:
        io_uring_queue_exit(&ctx.ring)
        close(ctx.event_fd)
        ctx.event_fd = -1
        return rc
    ctx.ring_ready = 1
    return 0


cdef void io_ctx_fini(io_ctx_t *ctx) noexcept nogil:
    cdef uint32_t i, k
    cdef virtio_bdev_t *v
    for i in range(ctx.nvqueues):       # let go of claimed virtio queues
        v = ctx.vbdevs[i]
        for k in range(v.nqueues):
            if v.owners[k] == ctx:
                vhd_store_ptr(<void **>&v.owners[k], NULL)
    ctx.nvqueues = 0
    if ctx.ring_ready:
        io_uring_queue_exit(&ctx.ring)
        ctx.ring_ready = 0
    if ctx.event_fd >= 0:
        close(ctx.event_fd)
        ctx.event_fd = -1


cdef inline void _io_ctx_enqueue(io_ctx_t *ctx, bdev_io_t *io) noexcept nogil:
    io.next_queued = NULL
    if ctx.queued_tail == NULL:
        ctx.queued_head = io
    else:
        ctx.queued_tail.next_queued = io
    ctx.queued_tail = io


cdef inline bint _direct_ok(bdev_t *b, bdev_io_t *io) noexcept nogil:
    cdef uint64_t mask
    cdef int i
    if b.fd_direct < 0:
        return False
    mask = b.direct_align - 1
    if (io.offset | io.length) & mask:
        return False
    for i in range(io.iovcnt):
        if ((<uint64_t>io.iov[i].iov_base) | io.iov[i].iov_len) & mask:
            return False
    return True


cdef int _file_prepare(io_ctx_t *ctx, bdev_t *b, bdev_io_t *io) noexcept nogil:
    """Put the SQEs of one file I/O into the ring.  0, or -EAGAIN if the ring has no room."""
    cdef io_uring_sqe *sqe
    cdef uint32_t i, n
    cdef uint64_t off, length
    cdef int mode
    n = io.nranges if (io.op == OP_UNMAP or io.op == OP_WRITE_ZEROES) and io.nranges > 0 else 1
    # All SQEs of an I/O go in together, so check for room first.
    for i in range(n):
        sqe = io_uring_get_sqe(&ctx.ring)
        if sqe == NULL:
            if i == 0 and ctx.unsubmitted:
                io_uring_submit(&ctx.ring)
                ctx.in_kernel += ctx.unsubmitted
                ctx.unsubmitted = 0
                sqe = io_uring_get_sqe(&ctx.ring)
            if sqe == NULL:
                if i == 0:
                    return -EAGAIN
                # Out of room mid-way: the prepared ones run; the rest fails this I/O.
                io.status = -EAGAIN
                io.pending -= (n - i)
                return 0
        if io.op == OP_READ:
            io_uring_prep_readv(sqe, b.fd_direct if _direct_ok(b, io) else b.fd, io.iov, io.iovcnt, io.offset)
        elif io.op == OP_WRITE:
            io_uring_prep_writev(sqe, b.fd_direct if _direct_ok(b, io) else b.fd, io.iov, io.iovcnt, io.offset)
        elif io.op == OP_FLUSH:
            io_uring_prep_fsync(sqe, b.fd, IORING_FSYNC_DATASYNC)
        else:
            if io.nranges > 0:
                off = io.ranges[i].offset
                length = io.ranges[i].length
            else:
                off = io.offset
                length = io.length
            mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if io.op == OP_UNMAP else FALLOC_FL_ZERO_RANGE)
            io_uring_prep_fallocate(sqe, b.fd, mode, <off_t>off, <off_t>length)
        io_uring_sqe_set_data(sqe, io)
        if i == 0:
            io.pending = n
            io.status = 0
        ctx.unsubmitted += 1
    return 0


cdef inline int _check_range(bdev_t *b, uint64_t offset, uint64_t length) noexcept nogil:
    cdef uint64_t size = b.num_blocks * b.block_size
    if offset % b.block_size or length % b.block_size:
        return -EINVAL
    if offset > size or length > size - offset:
        return -ERANGE
    return 0


cdef int _validate(bdev_t *b, bdev_io_t *io) noexcept nogil:
    cdef uint32_t i
    cdef uint64_t total
    cdef int rc
    if b.removed:
        return -ENODEV
    if b.readonly and io.op != OP_READ and io.op != OP_FLUSH:
        return -EROFS
    if io.op == OP_READ or io.op == OP_WRITE:
        total = 0
        for i in range(<uint32_t>io.iovcnt):
            total += io.iov[i].iov_len
        if total != io.length:
            return -EINVAL
        return _check_range(b, io.offset, io.length)
    if io.op == OP_UNMAP or io.op == OP_WRITE_ZEROES:
        if io.nranges == 0:
            return _check_range(b, io.offset, io.length)
        io.length = 0
        for i in range(io.nranges):
            rc = _check_range(b, io.ranges[i].offset, io.ranges[i].length)
            if rc:
                return rc
            io.length += io.ranges[i].length
        return 0
    if io.op == OP_FLUSH:
        return 0
    return -EOPNOTSUPP


cdef void _memory_execute(bdev_t *b, bdev_io_t *io) noexcept nogil:
    """malloc and null kinds: the whole I/O happens here, synchronously."""
    cdef uint8_t *p
    cdef int i
    cdef uint32_t r
    if io.op == OP_READ:
        if b.kind == BDEV_MALLOC:
            p = b.data + io.offset
            for i in range(io.iovcnt):
                memcpy(io.iov[i].iov_base, p, io.iov[i].iov_len)
                p += io.iov[i].iov_len
        # A null disk's read moves no data, as SPDK's null bdev ("undefined data for reads"): the
        # guest's buffer keeps what it held, which was the guest's own memory.
    elif io.op == OP_WRITE:
        if b.kind == BDEV_MALLOC:
            p = b.data + io.offset
            for i in range(io.iovcnt):
                memcpy(p, io.iov[i].iov_base, io.iov[i].iov_len)
                p += io.iov[i].iov_len
    elif (io.op == OP_UNMAP or io.op == OP_WRITE_ZEROES) and b.kind == BDEV_MALLOC:
        # Unmapped blocks of a malloc disk read back as zeros (LBPRZ), like written zeros.
        if io.nranges == 0:
            memset(b.data + io.offset, 0, io.length)
        else:
            for r in range(io.nranges):
                memset(b.data + io.ranges[r].offset, 0, io.ranges[r].length)


cdef vdrv_queue_t *_virtio_queue(io_ctx_t *ctx, virtio_bdev_t *v) noexcept nogil:
    """The driver queue of v this engine uses: the one it owns, else a free one it claims now."""
    cdef uint32_t i
    for i in range(v.nqueues):
        if v.owners[i] == ctx:
            return v.queues[i]
    if v.closing or ctx.nvqueues >= MAX_CTX_VQUEUES:
        return NULL
    for i in range(v.nqueues):
        if v.owners[i] == NULL and vhd_cas_ptr(<void **>&v.owners[i], NULL, ctx):
            ctx.vqueues[ctx.nvqueues] = v.queues[i]
            ctx.vbdevs[ctx.nvqueues] = v
            ctx.nvqueues += 1
            return v.queues[i]
    return NULL


cdef int _virtio_start(io_ctx_t *ctx, bdev_io_t *io) noexcept nogil:
    cdef vdrv_queue_t *q = _virtio_queue(ctx, io.bdev.virtio)
    cdef int rc
    if q == NULL:
        bdev_io_finish(io, -EBUSY)      # more threads than the device has queues
        return 1
    rc = vdrv_submit(q, io)
    if rc == -EAGAIN:
        _io_ctx_enqueue(ctx, io)
        return 0
    return rc


cdef int _virtio_poll(io_ctx_t *ctx) noexcept nogil:
    """Publish, then complete, on every claimed virtio queue; let go of closing devices' queues
    once they are idle."""
    cdef uint32_t i = 0, k
    cdef int n, completed = 0
    cdef virtio_bdev_t *v
    while i < ctx.nvqueues:
        vdrv_flush(ctx.vqueues[i])
        n = vdrv_poll(ctx.vqueues[i], 256)
        if n > 0:
            completed += n
        elif n < 0:
            completed += vdrv_fail_inflight(ctx.vqueues[i], -EIO)
        v = ctx.vbdevs[i]
        if v.closing and ctx.vqueues[i].inflight == 0:
            for k in range(v.nqueues):
                if v.owners[k] == ctx:
                    vhd_store_ptr(<void **>&v.owners[k], NULL)
            ctx.nvqueues -= 1
            ctx.vqueues[i] = ctx.vqueues[ctx.nvqueues]
            ctx.vbdevs[i] = ctx.vbdevs[ctx.nvqueues]
            continue
        i += 1
    return completed


cdef int _start(io_ctx_t *ctx, bdev_io_t *io) noexcept nogil:
    """Execute or queue a validated I/O.  Returns 1 if it finished (callback already ran)."""
    cdef bdev_t *b = io.bdev
    cdef int rc
    if b.qos.enabled and not qos_admit(b, io):
        _io_ctx_enqueue(ctx, io)
        return 0
    if b.kind == BDEV_VIRTIO:
        return _virtio_start(ctx, io)
    if b.kind == BDEV_RBD:
        return _rbd_start(ctx, io)
    if b.kind == BDEV_FILE:
        rc = _file_prepare(ctx, b, io)
        if rc == -EAGAIN:
            _io_ctx_enqueue(ctx, io)
        return 0
    _memory_execute(b, io)
    bdev_io_finish(io, 0)
    return 1


cdef int bdev_submit(io_ctx_t *ctx, bdev_io_t *io) noexcept nogil:
    """Start an I/O on its bdev.  The callback runs exactly once: before this returns (malloc,
    null, every error) or from a later io_ctx_poll() (file).  Returns 1 if it already ran."""
    cdef int rc
    io.submit_tick = vhd_clock()
    io.pending = 0
    rc = _validate(io.bdev, io)
    if rc:
        bdev_io_finish(io, rc)
        return 1
    if io.bdev.kind == BDEV_FILE and not ctx.ring_ready:
        bdev_io_finish(io, -ENODEV)
        return 1
    return _start(ctx, io)


cdef void io_ctx_flush(io_ctx_t *ctx) noexcept nogil:
    """Hand prepared SQEs to the kernel (once per reactor pass)."""
    cdef int rc
    if ctx.unsubmitted:
        rc = io_uring_submit(&ctx.ring)
        if rc > 0:
            ctx.in_kernel += <uint32_t>rc
            ctx.unsubmitted -= <uint32_t>rc if <uint32_t>rc <= ctx.unsubmitted else ctx.unsubmitted


cdef int io_ctx_poll(io_ctx_t *ctx) noexcept nogil:
    """Retry queued I/Os, submit, and complete what the kernel finished.  Returns the number of
    I/Os completed."""
    cdef io_uring_cqe *cqe
    cdef bdev_io_t *io
    cdef bdev_io_t *queued
    cdef int completed = 0
    cdef int32_t res
    # Queued I/Os (ring full or QoS) get another chance, in order.
    if ctx.queued_head != NULL:
        queued = ctx.queued_head
        ctx.queued_head = NULL
        ctx.queued_tail = NULL
        while queued != NULL:
            io = queued
            queued = queued.next_queued
            completed += _start(ctx, io)
    io_ctx_flush(ctx)
    if ctx.nvqueues:
        completed += _virtio_poll(ctx)
    if ctx.rbd_inflight:
        completed += rbd_ctx_poll(ctx)
    if not ctx.ring_ready or ctx.in_kernel == 0:
        return completed
    vhd_clock_refresh()
    while io_uring_peek_cqe(&ctx.ring, &cqe) == 0:
        io = <bdev_io_t *>io_uring_cqe_get_data(cqe)
        res = cqe.res
        io_uring_cqe_seen(&ctx.ring, cqe)
        ctx.in_kernel -= 1
        if res < 0:
            if io.status == 0:
                io.status = res
        elif (io.op == OP_READ or io.op == OP_WRITE) and <uint64_t>res != io.length:
            # A short transfer on a file happens only past its end: the disk shrank under us.
            if io.status == 0:
                io.status = -EIO
        io.pending -= 1
        if io.pending == 0:
            bdev_io_finish(io, io.status)
            completed += 1
    return completed


cdef inline bint io_ctx_idle(io_ctx_t *ctx) noexcept nogil:
    cdef uint32_t i
    for i in range(ctx.nvqueues):
        if ctx.vqueues[i].inflight:
            return False
    return (ctx.in_kernel == 0 and ctx.unsubmitted == 0 and ctx.queued_head == NULL
            and ctx.rbd_inflight == 0)


# ---------------------------------------------------------------------------------------------
# Python faces: Disk (one bdev's C state) and IoContext (synchronous I/O through the C path)
# ---------------------------------------------------------------------------------------------
_IOSTAT_KEYS = (
    "bytes_read", "num_read_ops", "bytes_written", "num_write_ops", "bytes_unmapped",
    "num_unmap_ops", "read_latency_ticks", "max_read_latency_ticks", "min_read_latency_ticks",
    "write_latency_ticks", "max_write_latency_ticks", "min_write_latency_ticks",
    "unmap_latency_ticks", "max_unmap_latency_ticks", "min_unmap_latency_ticks",
)


cdef void io_stats_add(io_stats_t *total, const io_stats_t *s) noexcept nogil:
    """Fold one channel's counters into a total (max of maxima, min of non-zero minima)."""
    total.bytes_read += s.bytes_read
    total.num_read_ops += s.num_read_ops
    total.bytes_written += s.bytes_written
    total.num_write_ops += s.num_write_ops
    total.bytes_unmapped += s.bytes_unmapped
    total.num_unmap_ops += s.num_unmap_ops
    total.num_flush_ops += s.num_flush_ops
    total.read_latency_ticks += s.read_latency_ticks
    total.write_latency_ticks += s.write_latency_ticks
    total.unmap_latency_ticks += s.unmap_latency_ticks
    total.failed += s.failed
    total.qos_queued += s.qos_queued
    if s.max_read_latency_ticks > total.max_read_latency_ticks:
        total.max_read_latency_ticks = s.max_read_latency_ticks
    if s.max_write_latency_ticks > total.max_write_latency_ticks:
        total.max_write_latency_ticks = s.max_write_latency_ticks
    if s.max_unmap_latency_ticks > total.max_unmap_latency_ticks:
        total.max_unmap_latency_ticks = s.max_unmap_latency_ticks
    if s.min_read_latency_ticks and (total.min_read_latency_ticks == 0 or s.min_read_latency_ticks < total.min_read_latency_ticks):
        total.min_read_latency_ticks = s.min_read_latency_ticks
    if s.min_write_latency_ticks and (total.min_write_latency_ticks == 0 or s.min_write_latency_ticks < total.min_write_latency_ticks):
        total.min_write_latency_ticks = s.min_write_latency_ticks
    if s.min_unmap_latency_ticks and (total.min_unmap_latency_ticks == 0 or s.min_unmap_latency_ticks < total.min_unmap_latency_ticks):
        total.min_unmap_latency_ticks = s.min_unmap_latency_ticks


cdef void io_stats_reset(io_stats_t *s, str mode):
    if mode == "all":
        memset(s, 0, sizeof(io_stats_t))
    elif mode == "maxmin":
        s.max_read_latency_ticks = s.min_read_latency_ticks = 0
        s.max_write_latency_ticks = s.min_write_latency_ticks = 0
        s.max_unmap_latency_ticks = s.min_unmap_latency_ticks = 0
    elif mode == "error":
        s.failed = 0


cdef class StatsChannel:
    """A live channel's counters (a virtqueue serving a bdev), registered with its Disk so that
    iostat() sums them.  The pointer stays valid while the channel is registered."""
    cdef io_stats_t *stats
    cdef object owner       # keeps the memory holding *stats alive

    @staticmethod
    cdef StatsChannel wrap(io_stats_t *stats, object owner):
        cdef StatsChannel ch = StatsChannel.__new__(StatsChannel)
        ch.stats = stats
        ch.owner = owner
        return ch


cdef class Disk:
    """The C state of one bdev and the Python face the control plane uses.

    Create with Disk.malloc(), Disk.null() or Disk.file().  Reactors reach the bdev_t through
    ``Disk.bdev``; the object must outlive every queue that uses it (the control plane detaches
    queues before close()).
    """
    cdef bdev_t *bdev
    cdef readonly str kind
    cdef readonly object path
    cdef io_stats_t retired        # counters of channels that went away, and of IoContext calls
    cdef list channels
    cdef object backend            # virtio kind: the front-end and driver queues kept alive

    def __cinit__(self):
        self.bdev = <bdev_t *>calloc(1, sizeof(bdev_t))
        if self.bdev == NULL:
            raise MemoryError()
        self.bdev.fd = -1
        self.bdev.fd_direct = -1
        self.channels = []

    @staticmethod
    def _check_geometry(uint32_t block_size, uint64_t num_blocks):
        if block_size < 512 or block_size % 512 or block_size > 65536:
            raise ValueError("block_size %d is not a multiple of 512 between 512 and 65536" % block_size)
        if num_blocks == 0:
            raise ValueError("num_blocks must be greater than 0")
        if num_blocks > (1 << 63) // block_size:
            raise ValueError("disk size overflows")

    @staticmethod
    def malloc(uint32_t block_size, uint64_t num_blocks):
        """A disk in anonymous memory, zero-filled (pages are allocated on first write)."""
        Disk._check_geometry(block_size, num_blocks)
        cdef Disk d = Disk.__new__(Disk)
        cdef size_t length = <size_t>(block_size * num_blocks)
        cdef void *p = mmap(NULL, length, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if p == MAP_FAILED:
            raise MemoryError("cannot map %d bytes for a malloc disk" % length)
        d.bdev.kind = BDEV_MALLOC
        d.bdev.data = <uint8_t *>p
        d.bdev.data_len = length
        d.bdev.block_size = block_size
        d.bdev.num_blocks = num_blocks
        d.kind = "malloc"
        return d

    @staticmethod
    def null(uint32_t block_size, uint64_t num_blocks):
        """A disk that discards writes and whose reads leave the buffer as it was (SPDK's null
        bdev: "undefined data for reads"), so that it measures everything but the data."""
        Disk._check_geometry(block_size, num_blocks)
        cdef Disk d = Disk.__new__(Disk)
        d.bdev.kind = BDEV_NULL
        d.bdev.block_size = block_size
        d.bdev.num_blocks = num_blocks
        d.kind = "null"
        return d

    @staticmethod
    def file(path, uint32_t block_size=0, bint readonly=False):
        """A regular file or block device served through io_uring.

        block_size 0 detects it (the device's logical block size, 512 for files).  Opens a second
        O_DIRECT descriptor when the filesystem supports it and the block size is a multiple of
        its direct-I/O alignment; I/Os whose buffers are not aligned use the buffered descriptor.
        Raises OSError (with errno) when the path cannot be opened, ValueError for a bad block size.
        """
        cdef Disk d = Disk.__new__(Disk)
        cdef bytes bpath = os.fsencode(path)
        cdef int flags = (O_RDONLY if readonly else O_RDWR) | O_CLOEXEC
        cdef int fd = open(bpath, flags)
        if fd < 0:
            raise OSError(errno, os.strerror(errno), path)
        d.bdev.fd = fd
        d.bdev.kind = BDEV_FILE
        d.bdev.readonly = readonly
        d.kind = "file"
        d.path = os.fspath(path)
        cdef uint32_t logical = 512
        cdef uint64_t size = d._measure(&logical)
        if block_size == 0:
            block_size = logical
        if block_size % logical:
            raise ValueError("block_size %d is not a multiple of the device's logical block size %d"
                             % (block_size, logical))
        Disk._check_geometry(block_size, 1)
        if size < block_size:
            raise ValueError("%s is smaller than one block (%d bytes)" % (path, block_size))
        d.bdev.block_size = block_size
        d.bdev.num_blocks = size // block_size
        cdef uint32_t align = vhd_direct_alignment(fd)
        if align and block_size % align == 0:
            fd = open(bpath, flags | O_DIRECT)
            if fd >= 0:
                d.bdev.fd_direct = fd
                d.bdev.direct_align = align
        return d

    cdef uint64_t _measure(self, uint32_t *logical) except? 0:
        cdef stat st
        cdef uint64_t size = 0
        if fstat(self.bdev.fd, &st) != 0:
            raise OSError(errno, os.strerror(errno), self.path)
        if (st.st_mode & 0o170000) == 0o060000:
            if vhd_blockdev_geometry(self.bdev.fd, &size, logical) != 0:
                raise OSError(errno, os.strerror(errno), self.path)
            return size
        if (st.st_mode & 0o170000) == 0o100000:
            return <uint64_t>st.st_size
        raise ValueError("%s is neither a regular file nor a block device" % self.path)

    @property
    def block_size(self):
        return self.bdev.block_size

    @property
    def num_blocks(self):
        return self.bdev.num_blocks

    @property
    def readonly(self):
        return bool(self.bdev.readonly)

    @property
    def direct(self):
        """True when aligned I/O goes through an O_DIRECT descriptor."""
        return self.bdev.fd_direct >= 0

    @property
    def removed(self):
        return bool(self.bdev.removed)

    @property
    def address(self):
        """Address of the bdev_t, for the parts of the data plane that take a Disk by pointer."""
        return <size_t>self.bdev

    def resize(self, uint64_t num_blocks):
        """Change the size of a null disk, or record the new size of an rbd disk's image (malloc
        and file disks cannot be resized this way)."""
        if self.bdev.kind != BDEV_NULL and self.bdev.kind != BDEV_RBD:
            raise ValueError("only null and rbd disks can be resized")
        Disk._check_geometry(self.bdev.block_size, num_blocks)
        self.bdev.num_blocks = num_blocks

    def rescan(self):
        """Re-read a file disk's size (it may have grown or shrunk); returns num_blocks."""
        cdef uint32_t logical = 512
        if self.bdev.kind != BDEV_FILE:
            raise ValueError("only file disks can be rescanned")
        self.bdev.num_blocks = self._measure(&logical) // self.bdev.block_size
        return self.bdev.num_blocks

    def set_qos(self, uint64_t rw_ios_per_sec=0, uint64_t rw_mbytes_per_sec=0,
                uint64_t r_mbytes_per_sec=0, uint64_t w_mbytes_per_sec=0):
        """Rate limits enforced on reads and writes (0 = unlimited)."""
        cdef qos_t *q = &self.bdev.qos
        q.enabled = 0
        q.ios_per_sec = rw_ios_per_sec
        q.bytes_per_sec = rw_mbytes_per_sec * 1024 * 1024
        q.read_bytes_per_sec = r_mbytes_per_sec * 1024 * 1024
        q.write_bytes_per_sec = w_mbytes_per_sec * 1024 * 1024
        q.ios_tokens = q.bytes_tokens = q.read_bytes_tokens = q.write_bytes_tokens = 0
        q.last_refill_tick = 0
        vhd_full_fence()
        q.enabled = 1 if (q.ios_per_sec or q.bytes_per_sec or q.read_bytes_per_sec
                          or q.write_bytes_per_sec) else 0

    def remove(self):
        """Hot-remove: every I/O submitted from now on fails with ENODEV (virtio kind: the I/O
        engines let go of its queues once idle; see virtio_released)."""
        self.bdev.removed = 1
        if self.bdev.virtio != NULL:
            self.bdev.virtio.closing = 1
        vhd_full_fence()

    cdef void attach_channel(self, io_stats_t *stats, object owner):
        self.channels.append(StatsChannel.wrap(stats, owner))

    cdef void detach_channel(self, io_stats_t *stats):
        cdef StatsChannel ch
        for ch in list(self.channels):
            if ch.stats == stats:
                io_stats_add(&self.retired, stats)
                self.channels.remove(ch)

    def iostat(self):
        """SPDK bdev_get_iostat counters summed over every channel of this disk."""
        cdef io_stats_t total
        cdef StatsChannel ch
        memset(&total, 0, sizeof(io_stats_t))
        io_stats_add(&total, &self.retired)
        for ch in self.channels:
            io_stats_add(&total, ch.stats)
        result = {key: (<dict>total)[key] for key in _IOSTAT_KEYS}
        io_error = {}
        if total.failed:
            io_error["failed"] = total.failed
        result["io_error"] = io_error
        result["num_flush_ops"] = total.num_flush_ops
        return result

    def reset_iostat(self, str mode="all"):
        """Reset counters: 'all', 'maxmin' (latency extremes), 'error' or 'none'."""
        cdef StatsChannel ch
        if mode not in ("all", "maxmin", "error", "none"):
            raise ValueError("unknown reset mode %r" % mode)
        io_stats_reset(&self.retired, mode)
        for ch in self.channels:
            io_stats_reset(ch.stats, mode)

    @property
    def in_use(self):
        """Number of live channels (queues) using this disk."""
        return len(self.channels)

    def close(self):
        """Release the disk's memory and descriptors.  Refused while a channel uses it."""
        if self.channels:
            raise RuntimeError("disk is in use by %d channel(s)" % len(self.channels))
        self._release()

    @property
    def virtio_released(self):
        """virtio kind, after remove(): True once no I/O engine drives its queues any more."""
        cdef virtio_bdev_t *v = self.bdev.virtio
        cdef uint32_t i
        if v == NULL:
            return True
        for i in range(v.nqueues):
            if v.owners[i] != NULL:
                return False
        return True

    cdef void _release(self):
        cdef virtio_bdev_t *v
        if self.bdev == NULL:
            return
        v = self.bdev.virtio
        if v != NULL:
            v.closing = 1
            if self.virtio_released:
                free(v.queues)
                free(v.owners)
                free(v)
                self.bdev.virtio = NULL
                self.backend = None
        if self.bdev.data != NULL:
            munmap(self.bdev.data, self.bdev.data_len)
            self.bdev.data = NULL
        if self.bdev.fd >= 0:
            close(self.bdev.fd)
            self.bdev.fd = -1
        if self.bdev.fd_direct >= 0:
            close(self.bdev.fd_direct)
            self.bdev.fd_direct = -1
        self.bdev.removed = 1

    def __dealloc__(self):
        if self.bdev != NULL:
            self._release()
            free(self.bdev)
            self.bdev = NULL


cdef void _sync_io_done(bdev_io_t *io) noexcept nogil:
    (<int *>io.cb_arg)[0] = 1


cdef class IoContext:
    """A private io_uring for synchronous I/O on disks through the same C path the reactors use
    (the control plane's occasional I/O, and tests)."""
    cdef io_ctx_t ctx

    def __cinit__(self):
        cdef int rc = io_ctx_init(&self.ctx)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    cdef int _run(self, Disk disk, uint32_t op, uint64_t offset, uint64_t length,
                  iovec *iov, int iovcnt) except -1:
        cdef bdev_io_t io
        cdef io_stats_t stats
        cdef int done = 0
        cdef io_uring_cqe *cqe
        memset(&io, 0, sizeof(io))
        memset(&stats, 0, sizeof(stats))
        io.bdev = disk.bdev
        io.op = op
        io.offset = offset
        io.length = length
        io.iov = iov
        io.iovcnt = iovcnt
        io.cb = _sync_io_done
        io.cb_arg = &done
        io.stats = &stats
        with nogil:
            bdev_submit(&self.ctx, &io)
            while not done:
                io_ctx_poll(&self.ctx)
                if not done and self.ctx.in_kernel:
                    io_uring_wait_cqe(&self.ctx.ring, &cqe)
                elif not done and self.ctx.rbd_inflight:
                    rbd_ctx_wait(&self.ctx, 100)
        io_stats_add(&disk.retired, &stats)
        if io.status < 0:
            raise OSError(-io.status, os.strerror(-io.status))
        return 0

    def read(self, Disk disk, uint64_t offset, uint64_t length):
        """Read length bytes at offset."""
        cdef bytearray buf = bytearray(length)
        cdef iovec iov
        iov.iov_base = <char *>buf if length else NULL
        iov.iov_len = length
        self._run(disk, OP_READ, offset, length, &iov, 1)
        return bytes(buf)

    def write(self, Disk disk, uint64_t offset, const uint8_t[:] data):
        """Write data at offset."""
        cdef iovec iov
        iov.iov_base = <void *>&data[0] if data.shape[0] else NULL
        iov.iov_len = data.shape[0]
        self._run(disk, OP_WRITE, offset, data.shape[0], &iov, 1)

    def flush(self, Disk disk):
        """Make completed writes durable (fdatasync for file disks)."""
        self._run(disk, OP_FLUSH, 0, 0, NULL, 0)

    def unmap(self, Disk disk, uint64_t offset, uint64_t length):
        """Deallocate a range; it reads back as zeros on every kind vhostd has."""
        self._run(disk, OP_UNMAP, offset, length, NULL, 0)

    def write_zeroes(self, Disk disk, uint64_t offset, uint64_t length):
        """Zero a range."""
        self._run(disk, OP_WRITE_ZEROES, offset, length, NULL, 0)

    def close(self):
        io_ctx_fini(&self.ctx)

    def __dealloc__(self):
        io_ctx_fini(&self.ctx)
