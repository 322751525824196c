# The driver (front-end) side of split virtqueues: what QEMU's guest does with a virtio device.
# One implementation serves three users: the initiator's Python device layers (chains built by the
# caller), the load generator of the benchmark, and a bdev that consumes another vhost-user target
# (vdrv_submit + vdrv_poll on bdev_io_t, completion through io.cb).
#
# Ring memory is shared with a back-end we do not trust either: descriptor free-list links live in
# private memory, and a used entry naming a descriptor that is not the head of a request in flight
# marks the queue broken instead of corrupting our state.
#
# Ordering (x86 TSO, vhost_user.md §3.4): descriptors and avail entries, then a release store of
# avail.idx; a full fence between publishing avail.idx and reading the device's notification wishes
# (used.flags / avail_event), and between re-enabling interrupts and re-reading used.idx.

from libc.errno cimport E2BIG, EFAULT

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN

cdef enum:
    # Layout of a slot's private area in driver memory.
    AREA_TABLE_OFF = 0                       # indirect table: VDRV_MAX_CHAIN descriptors
    AREA_REQ_OFF = 2080                      # blk header (16 B) / scsi command (51 B)
    AREA_RESP_OFF = 2144                     # blk status (1 B) / scsi response (108 B)
    AREA_RANGES_OFF = 2272                   # blk ranges (16 B each) / scsi UNMAP list
    AREA_BOUNCE_OFF = 4096                   # bounce buffer, page aligned
    AREA_MIN_BYTES = 2624
    SCSI_REQ_BYTES = 51
    SCSI_RESP_BYTES = 108
    BLK_T_IN = 0
    BLK_T_OUT = 1
    BLK_T_FLUSH = 4
    BLK_T_DISCARD = 11
    BLK_T_WRITE_ZEROES = 13
    LOAD_POLL_BUDGET = 256


cdef inline uint16_t *_drv_used_idx(vdrv_queue_t *q) noexcept nogil:
    return <uint16_t *>(q.used + 2)

cdef inline uint16_t *_drv_used_flags(vdrv_queue_t *q) noexcept nogil:
    return <uint16_t *>q.used

cdef inline uint16_t *_drv_avail_event(vdrv_queue_t *q) noexcept nogil:
    return <uint16_t *>(q.used + 4 + 8 * <size_t>q.size)

cdef inline uint16_t *_drv_used_event(vdrv_queue_t *q) noexcept nogil:
    return &q.avail[2 + q.size]

cdef inline vring_used_elem_t *_drv_used_elem(vdrv_queue_t *q, uint16_t idx) noexcept nogil:
    return <vring_used_elem_t *>(q.used + 4 + 8 * <size_t>(idx % q.size))


cdef inline uint32_t hist_bucket(uint64_t v) noexcept nogil:
    """Histogram bucket of a value: exact below 16, then 16 linear steps per power of two."""
    cdef int e
    if v < (1 << VDRV_HIST_SUB_BITS):
        return <uint32_t>v
    e = 63 - vhd_clz64(v)
    return <uint32_t>((e - VDRV_HIST_SUB_BITS + 1) << VDRV_HIST_SUB_BITS) \
        + <uint32_t>((v >> (e - VDRV_HIST_SUB_BITS)) & ((1 << VDRV_HIST_SUB_BITS) - 1))


cdef inline uint64_t hist_bucket_low(uint32_t b) noexcept nogil:
    """Smallest value of a histogram bucket."""
    cdef uint32_t e, sub
    if b < (1 << VDRV_HIST_SUB_BITS):
        return b
    e = (b >> VDRV_HIST_SUB_BITS) + VDRV_HIST_SUB_BITS - 1
    sub = b & ((1 << VDRV_HIST_SUB_BITS) - 1)
    return (<uint64_t>1 << e) + (<uint64_t>sub << (e - VDRV_HIST_SUB_BITS))


cdef int hva_to_segs(const guest_mem_t *mem, const uint8_t *hva, uint64_t length, uint32_t writable,
                     vdrv_seg_t *segs, int max_segs) noexcept nogil:
    """Guest-physical segments of our own buffer [hva, hva+length), split at region edges.
    Returns the number of segments, or -1 if a byte is outside driver memory or more than
    max_segs segments would be needed."""
    cdef int n = 0
    cdef uint32_t i
    cdef const mem_region_t *r
    cdef uint64_t off, chunk
    cdef bint found
    while length > 0:
        found = False
        for i in range(mem.nregions):
            r = &mem.regions[i]
            if hva >= r.hva and <uint64_t>(hva - r.hva) < r.size:
                off = <uint64_t>(hva - r.hva)
                chunk = r.size - off
                if chunk > length:
                    chunk = length
                if chunk > 0x80000000UL:
                    chunk = 0x80000000UL
                if n >= max_segs:
                    return -1
                segs[n].gpa = r.gpa + off
                segs[n].len = <uint32_t>chunk
                segs[n].writable = writable
                n += 1
                hva += chunk
                length -= chunk
                found = True
                break
        if not found:
            return -1
    return n


# ---------------------------------------------------------------------------------------------
# Ring: descriptor free list, chains, publish, kick, used
# ---------------------------------------------------------------------------------------------
# Packed rings (virtio 1.1 §2.8), driver side: positions as free-running slot counts, the wrap
# counter 1 on even laps (vring_packed.pxi keeps the device's the same way).
cdef inline uint16_t _pk_wrap(vdrv_queue_t *q, uint16_t pos) noexcept nogil:
    return 1 if (pos & q.size) == 0 else 0

cdef inline uint16_t _pk_avail_bits(vdrv_queue_t *q, uint16_t pos) noexcept nogil:
    return VRING_PACKED_DESC_F_AVAIL if _pk_wrap(q, pos) else VRING_PACKED_DESC_F_USED

cdef inline uint16_t *_pk_flags(vring_packed_desc_t *d) noexcept nogil:
    return <uint16_t *>(<uint8_t *>d + 14)

cdef inline uint16_t _pk_off_wrap(vdrv_queue_t *q, uint16_t pos) noexcept nogil:
    return (pos & (q.size - 1)) | (_pk_wrap(q, pos) << 15)


cdef void vdrv_reset(vdrv_queue_t *q, uint16_t avail_idx, uint16_t used_idx) noexcept nogil:
    """Forget every request and start the ring at the given indexes (a fresh queue: both 0; a
    queue resumed on a new back-end: its avail and used indexes; packed: positions)."""
    cdef uint32_t i
    for i in range(q.size):
        q.desc_next[i] = <uint16_t>(i + 1)
        q.head_slot[i] = VDRV_NO_SLOT
    q.free_head = 0
    q.num_free = q.size
    for i in range(q.nslots):
        q.slots[i].busy = 0
        q.slots[i].done = 0
        q.slots[i].io = NULL
        q.slots[i].next_free = <uint16_t>(i + 1) if i + 1 < q.nslots else VDRV_NO_SLOT
    q.free_slot = 0 if q.nslots else VDRV_NO_SLOT
    q.ndone = 0
    q.inflight = 0
    q.broken = 0
    q.avail_idx = avail_idx
    q.published_idx = avail_idx
    q.kicked_idx = avail_idx
    q.last_used_idx = used_idx
    q.used_event = used_idx
    q.has_pending = 0
    if not q.packed:
        vhd_store_u16(&q.avail[1], avail_idx)
    q.avail_flags = 0xFFFF                 # unknown: the next vdrv_set_interrupts stores
    vdrv_set_interrupts(q, q.interrupts)


cdef inline vdrv_slot_t *vdrv_slot_get(vdrv_queue_t *q) noexcept nogil:
    cdef uint16_t s = q.free_slot
    cdef vdrv_slot_t *slot
    if s == VDRV_NO_SLOT:
        return NULL
    slot = &q.slots[s]
    q.free_slot = slot.next_free
    slot.busy = 1
    slot.done = 0
    slot.bounced = 0
    slot.io = NULL
    slot.used_len = 0
    return slot


cdef inline void vdrv_slot_put(vdrv_queue_t *q, vdrv_slot_t *slot) noexcept nogil:
    slot.busy = 0
    slot.done = 0
    slot.io = NULL
    slot.next_free = q.free_slot
    q.free_slot = <uint16_t>(slot - q.slots)


cdef int _vdrv_add_packed(vdrv_queue_t *q, vdrv_slot_t *slot, const vdrv_seg_t *segs, int n,
                          bint use_indirect) noexcept nogil:
    """vdrv_add_chain on a packed ring: the chain at the next avail positions, buffer id = slot
    index, the head's flags stored last (or at the flush, for the first chain of a batch)."""
    cdef vring_packed_desc_t *table
    cdef vring_packed_desc_t *d
    cdef uint16_t ndesc = 1 if use_indirect else <uint16_t>n
    cdef uint16_t buffer_id = <uint16_t>(slot - q.slots)
    cdef uint16_t pos = q.avail_idx
    cdef uint16_t head_flags
    cdef int k
    if ndesc > q.size:
        return -E2BIG
    if q.num_free < ndesc:
        return -EAGAIN
    if use_indirect:
        table = <vring_packed_desc_t *>(slot.area + AREA_TABLE_OFF)
        for k in range(n):
            table[k].addr = segs[k].gpa
            table[k].len = segs[k].len
            table[k].id = 0
            table[k].flags = VRING_DESC_F_WRITE if segs[k].writable else 0
        d = &q.pdesc[pos & (q.size - 1)]
        d.addr = slot.area_gpa + AREA_TABLE_OFF
        d.len = <uint32_t>(16 * n)
        d.id = buffer_id
        head_flags = VRING_DESC_F_INDIRECT | _pk_avail_bits(q, pos)
    else:
        for k in range(n - 1, -1, -1):          # the head last
            d = &q.pdesc[<uint16_t>(pos + k) & (q.size - 1)]
            d.addr = segs[k].gpa
            d.len = segs[k].len
            d.id = buffer_id
            flags = (VRING_DESC_F_WRITE if segs[k].writable else 0) | (VRING_DESC_F_NEXT if k + 1 < n else 0) \
                | _pk_avail_bits(q, <uint16_t>(pos + k))
            if k:
                d.flags = flags
            else:
                head_flags = flags
    if q.has_pending:
        vhd_store_u16(_pk_flags(&q.pdesc[pos & (q.size - 1)]), head_flags)
    else:
        q.has_pending = 1
        q.pending_pos = pos
        q.pending_flags = head_flags
    slot.ndesc = ndesc
    slot.head = pos
    slot.submit_tick = vhd_ticks()
    q.num_free -= ndesc
    q.avail_idx = <uint16_t>(pos + ndesc)
    q.inflight += 1
    q.stats.submitted += 1
    return 0


cdef int vdrv_add_chain(vdrv_queue_t *q, vdrv_slot_t *slot, const vdrv_seg_t *segs, int n,
                        int indirect) noexcept nogil:
    """Write one request's buffers as a descriptor chain and an avail entry (published later by
    vdrv_flush).  indirect: -1 by the queue's mode, 0 never, 1 always (when negotiated).
    Returns 0, -EAGAIN if the ring lacks descriptors, -E2BIG for a chain the ring cannot hold."""
    cdef bint use_indirect
    cdef uint16_t head, i, last
    cdef vring_desc_t *d
    cdef vring_desc_t *table
    cdef int k
    if n <= 0 or n > VDRV_MAX_CHAIN:
        return -E2BIG
    if indirect < 0:
        use_indirect = q.indirect and n > 1 and (
            q.indirect_mode == VDRV_INDIRECT_ALWAYS
            or (q.indirect_mode == VDRV_INDIRECT_AUTO and q.num_free < n))
    else:
        use_indirect = q.indirect and indirect > 0
    if q.packed:
        return _vdrv_add_packed(q, slot, segs, n, use_indirect)
    if use_indirect:
        if q.num_free < 1:
            return -EAGAIN
        table = <vring_desc_t *>(slot.area + AREA_TABLE_OFF)
        for k in range(n):
            table[k].addr = segs[k].gpa
            table[k].len = segs[k].len
            table[k].flags = (VRING_DESC_F_WRITE if segs[k].writable else 0) \
                | (VRING_DESC_F_NEXT if k + 1 < n else 0)
            table[k].next = <uint16_t>(k + 1) if k + 1 < n else 0
        head = q.free_head
        d = &q.desc[head]
        d.addr = slot.area_gpa + AREA_TABLE_OFF
        d.len = <uint32_t>(16 * n)
        d.flags = VRING_DESC_F_INDIRECT
        d.next = 0
        last = head
        slot.ndesc = 1
    else:
        if n > q.size:
            return -E2BIG
        if q.num_free < n:
            return -EAGAIN
        head = q.free_head
        i = head
        for k in range(n):
            d = &q.desc[i]
            d.addr = segs[k].gpa
            d.len = segs[k].len
            if k + 1 < n:
                d.flags = (VRING_DESC_F_WRITE if segs[k].writable else 0) | VRING_DESC_F_NEXT
                d.next = q.desc_next[i]
                i = q.desc_next[i]
            else:
                d.flags = VRING_DESC_F_WRITE if segs[k].writable else 0
                d.next = 0
        last = i
        slot.ndesc = <uint16_t>n
    q.free_head = q.desc_next[last]
    q.num_free -= slot.ndesc
    slot.head = head
    slot.tail = last
    slot.submit_tick = vhd_ticks()
    q.head_slot[head] = <uint16_t>(slot - q.slots)
    q.avail[2 + q.avail_idx % q.size] = head
    q.avail_idx += 1
    q.inflight += 1
    q.stats.submitted += 1
    return 0


cdef bint _vdrv_flush_packed(vdrv_queue_t *q) noexcept nogil:
    """Make the batch visible (the pending head's flags) and kick if the device's event area
    asks for it: ENABLE, or DESC (EVENT_IDX) when the batch crossed its position."""
    cdef uint32_t area
    cdef uint16_t flags, off_wrap, event
    cdef bint kick
    if q.has_pending:
        vhd_store_u16(_pk_flags(&q.pdesc[q.pending_pos & (q.size - 1)]), q.pending_flags)
        q.has_pending = 0
    q.published_idx = q.avail_idx
    q.stats.publishes += 1
    vhd_full_fence()
    area = vhd_load_u32(<const uint32_t *>q.used)
    flags = <uint16_t>(area >> 16)
    if flags == VRING_PACKED_EVENT_F_DISABLE:
        kick = False
    elif flags == VRING_PACKED_EVENT_F_DESC and q.event_idx:
        off_wrap = <uint16_t>area
        event = <uint16_t>((q.avail_idx & ~(q.size - 1)) + (off_wrap & 0x7FFF))
        if (off_wrap >> 15) != _pk_wrap(q, q.avail_idx):
            event = <uint16_t>(event - q.size)
        kick = _need_event(event, q.avail_idx, q.kicked_idx)
    else:
        kick = True
    q.kicked_idx = q.avail_idx
    if kick:
        eventfd_signal(q.kick_fd)
        q.stats.kicks += 1
    else:
        q.stats.kicks_suppressed += 1
    return kick


cdef bint vdrv_flush(vdrv_queue_t *q) noexcept nogil:
    """Publish the avail entries written since the last flush and kick the device if it asked
    for it.  Returns True if it kicked."""
    cdef bint kick
    if q.avail_idx == q.published_idx:
        return False
    if q.packed:
        return _vdrv_flush_packed(q)
    vhd_store_u16(&q.avail[1], q.avail_idx)
    q.published_idx = q.avail_idx
    q.stats.publishes += 1
    vhd_full_fence()
    if q.event_idx:
        kick = _need_event(vhd_load_u16(_drv_avail_event(q)), q.avail_idx, q.kicked_idx)
    else:
        kick = not (vhd_load_u16(_drv_used_flags(q)) & VRING_USED_F_NO_NOTIFY)
    q.kicked_idx = q.avail_idx
    if kick:
        eventfd_signal(q.kick_fd)
        q.stats.kicks += 1
    else:
        q.stats.kicks_suppressed += 1
    return kick


cdef void vdrv_set_interrupts(vdrv_queue_t *q, bint wanted) noexcept nogil:
    """Ask for interrupts (before sleeping on call_fd) or tell the device not to send them
    (polling).  With EVENT_IDX a poller keeps used_event half a ring of indexes ahead."""
    cdef uint16_t flags
    if q.packed:
        # The driver event area: ENABLE / DISABLE, or DESC at the next used position (EVENT_IDX).
        flags = (VRING_PACKED_EVENT_F_DESC if q.event_idx else VRING_PACKED_EVENT_F_ENABLE) if wanted \
            else VRING_PACKED_EVENT_F_DISABLE
        if flags != q.avail_flags or (wanted and q.event_idx and q.used_event != q.last_used_idx):
            q.avail_flags = flags
            q.used_event = q.last_used_idx
            vhd_store_u32(<uint32_t *>q.avail, _pk_off_wrap(q, q.last_used_idx) | (<uint32_t>flags << 16))
        return
    if q.event_idx:
        if wanted:
            q.used_event = q.last_used_idx
        elif <uint16_t>(q.used_event - q.last_used_idx) < 0x4000:
            q.used_event = <uint16_t>(q.last_used_idx + 0x8000)
        else:
            return
        vhd_store_u16(_drv_used_event(q), q.used_event)
    else:
        # Store only on a change: every store takes the avail ring's cache line from the device.
        flags = 0 if wanted else VRING_AVAIL_F_NO_INTERRUPT
        if flags != q.avail_flags:
            q.avail_flags = flags
            vhd_store_u16(&q.avail[0], flags)


cdef inline bint _pk_is_used(vdrv_queue_t *q, uint16_t pos) noexcept nogil:
    cdef uint16_t flags = vhd_load_u16(_pk_flags(&q.pdesc[pos & (q.size - 1)]))
    cdef uint16_t wrap = _pk_wrap(q, pos)
    return (((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == wrap
            and ((flags & VRING_PACKED_DESC_F_USED) != 0) == wrap)


cdef inline bint vdrv_has_used(vdrv_queue_t *q) noexcept nogil:
    if q.packed:
        return q.inflight > 0 and _pk_is_used(q, q.last_used_idx)
    return vhd_load_u16(_drv_used_idx(q)) != q.last_used_idx


cdef bint vdrv_arm(vdrv_queue_t *q) noexcept nogil:
    """Enable interrupts before sleeping; True if completions arrived meanwhile (don't sleep)."""
    vdrv_set_interrupts(q, True)
    vhd_full_fence()
    return vdrv_has_used(q)


# ---------------------------------------------------------------------------------------------
# Devices: a bdev_io_t as a virtio-blk or virtio-scsi request
# ---------------------------------------------------------------------------------------------
cdef int _vdrv_data_segs(vdrv_queue_t *q, vdrv_slot_t *slot, bdev_io_t *io, uint32_t writable,
                    vdrv_seg_t *segs, int max_segs) noexcept nogil:
    """The data buffers of a read/write: the I/O's own buffers when they lie in driver memory,
    else the slot's bounce buffer.  Returns the segment count or -errno."""
    cdef int n = 0, k, i
    cdef uint8_t *bounce
    for i in range(io.iovcnt):
        k = hva_to_segs(q.mem, <uint8_t *>io.iov[i].iov_base, io.iov[i].iov_len, writable,
                        &segs[n], max_segs - n)
        if k < 0:
            n = -1
            break
        n += k
    if n >= 0:
        return n
    if io.length > q.bounce_bytes:
        return -EFAULT
    bounce = slot.area + AREA_BOUNCE_OFF
    if not writable:
        iov_to_buf(io.iov, io.iovcnt, 0, bounce, io.length)
    slot.bounced = 1
    q.stats.bounced += 1
    segs[0].gpa = slot.area_gpa + AREA_BOUNCE_OFF
    segs[0].len = <uint32_t>io.length
    segs[0].writable = writable
    return 1 if io.length else 0


cdef int _vdrv_blk_ranges(vdrv_queue_t *q, vdrv_slot_t *slot, bdev_io_t *io) noexcept nogil:
    """Write the discard / write-zeroes segments; returns their count or -errno."""
    cdef uint8_t *p = slot.area + AREA_RANGES_OFF
    cdef uint32_t i, n = io.nranges if io.nranges else 1
    cdef uint64_t off, length
    if n > VDRV_MAX_RANGES:
        return -E2BIG
    for i in range(n):
        off = io.ranges[i].offset if io.nranges else io.offset
        length = io.ranges[i].length if io.nranges else io.length
        if (off | length) & 511 or (length >> 9) > 0xFFFFFFFFUL:
            return -EINVAL
        (<uint64_t *>(p + 16 * i))[0] = off >> 9
        (<uint32_t *>(p + 16 * i + 8))[0] = <uint32_t>(length >> 9)
        (<uint32_t *>(p + 16 * i + 12))[0] = 0
    return <int>n


cdef int _vdrv_build_blk(vdrv_queue_t *q, vdrv_slot_t *slot, bdev_io_t *io, vdrv_seg_t *segs) noexcept nogil:
    """Segments of a virtio-blk request: header, data, status.  Count or -errno."""
    cdef uint8_t *hdr = slot.area + AREA_REQ_OFF
    cdef uint32_t type
    cdef int n = 1, k
    if io.op == OP_READ:
        type = BLK_T_IN
    elif io.op == OP_WRITE:
        type = BLK_T_OUT
    elif io.op == OP_FLUSH:
        type = BLK_T_FLUSH
    elif io.op == OP_UNMAP:
        type = BLK_T_DISCARD
    elif io.op == OP_WRITE_ZEROES:
        type = BLK_T_WRITE_ZEROES
    else:
        return -EOPNOTSUPP
    (<uint32_t *>hdr)[0] = type
    (<uint32_t *>(hdr + 4))[0] = 0
    (<uint64_t *>(hdr + 8))[0] = io.offset >> 9 if type != BLK_T_FLUSH else 0
    segs[0].gpa = slot.area_gpa + AREA_REQ_OFF
    segs[0].len = 16
    segs[0].writable = 0
    if type == BLK_T_IN or type == BLK_T_OUT:
        k = _vdrv_data_segs(q, slot, io, type == BLK_T_IN, &segs[1], VDRV_MAX_DATA_SEGS)
        if k < 0:
            return k
        n += k
    elif type == BLK_T_DISCARD or type == BLK_T_WRITE_ZEROES:
        k = _vdrv_blk_ranges(q, slot, io)
        if k < 0:
            return k
        segs[1].gpa = slot.area_gpa + AREA_RANGES_OFF
        segs[1].len = <uint32_t>(16 * k)
        segs[1].writable = 0
        n += 1
    slot.area[AREA_RESP_OFF] = 0xFF        # a device that never writes the status fails the I/O
    segs[n].gpa = slot.area_gpa + AREA_RESP_OFF
    segs[n].len = 1
    segs[n].writable = 1
    return n + 1


cdef int _vdrv_build_scsi(vdrv_queue_t *q, vdrv_slot_t *slot, bdev_io_t *io, vdrv_seg_t *segs) noexcept nogil:
    """Segments of a virtio-scsi command: request, data-out | response, data-in.  Count or
    -errno.  READ(16)/WRITE(16), SYNCHRONIZE CACHE(10), UNMAP."""
    cdef uint8_t *req = slot.area + AREA_REQ_OFF
    cdef uint8_t *cdb = req + 19
    cdef uint8_t *lst
    cdef uint32_t bs = q.block_size
    cdef int n = 1, k
    if bs == 0 or (io.offset | io.length) % bs:
        return -EINVAL
    memset(req, 0, SCSI_REQ_BYTES)
    memcpy(req, q.lun, 8)
    q.scsi_tag += 1
    (<uint64_t *>(req + 8))[0] = q.scsi_tag
    segs[0].gpa = slot.area_gpa + AREA_REQ_OFF
    segs[0].len = SCSI_REQ_BYTES
    segs[0].writable = 0
    if io.op == OP_READ or io.op == OP_WRITE:
        if io.length // bs > 0xFFFFFFFFUL:
            return -EINVAL
        cdb[0] = 0x88 if io.op == OP_READ else 0x8A
        _put_be64(cdb + 2, io.offset // bs)
        _put_be32(cdb + 10, <uint32_t>(io.length // bs))
    elif io.op == OP_FLUSH:
        cdb[0] = 0x35
    elif io.op == OP_UNMAP:
        if io.nranges > 1 or io.length // bs > 0xFFFFFFFFUL:
            return -EINVAL
        cdb[0] = 0x42
        _put_be16(cdb + 7, 24)
        lst = slot.area + AREA_RANGES_OFF
        memset(lst, 0, 24)
        _put_be16(lst, 22)
        _put_be16(lst + 2, 16)
        _put_be64(lst + 8, (io.ranges[0].offset if io.nranges else io.offset) // bs)
        _put_be32(lst + 16, <uint32_t>((io.ranges[0].length if io.nranges else io.length) // bs))
        segs[1].gpa = slot.area_gpa + AREA_RANGES_OFF
        segs[1].len = 24
        segs[1].writable = 0
        n = 2
    else:
        return -EOPNOTSUPP
    if io.op == OP_WRITE:
        k = _vdrv_data_segs(q, slot, io, 0, &segs[n], VDRV_MAX_DATA_SEGS)
        if k < 0:
            return k
        n += k
    memset(slot.area + AREA_RESP_OFF, 0, SCSI_RESP_BYTES)
    slot.area[AREA_RESP_OFF + 11] = 0xFF    # response: a device that never answers fails the I/O
    segs[n].gpa = slot.area_gpa + AREA_RESP_OFF
    segs[n].len = SCSI_RESP_BYTES
    segs[n].writable = 1
    n += 1
    if io.op == OP_READ:
        k = _vdrv_data_segs(q, slot, io, 1, &segs[n], VDRV_MAX_DATA_SEGS)
        if k < 0:
            return k
        n += k
    return n


cdef int vdrv_submit(vdrv_queue_t *q, bdev_io_t *io) noexcept nogil:
    """Put a bdev I/O on a blk or scsi queue (published by the next vdrv_flush).  Like
    bdev_submit, io.cb runs exactly once when accepted: 0 = pending (vdrv_poll completes it),
    1 = already failed (callback ran).  -EAGAIN: no room now, nothing done, retry after a poll."""
    cdef vdrv_seg_t segs[VDRV_MAX_CHAIN]
    cdef vdrv_slot_t *slot
    cdef int n, rc
    if q.broken:
        bdev_io_finish(io, -EIO)
        return 1
    slot = vdrv_slot_get(q)
    if slot == NULL:
        return -EAGAIN
    if io.iovcnt > VDRV_MAX_DATA_SEGS:
        n = -E2BIG
    elif q.device == VDRV_DEV_BLK:
        n = _vdrv_build_blk(q, slot, io, segs)
    elif q.device == VDRV_DEV_SCSI:
        n = _vdrv_build_scsi(q, slot, io, segs)
    else:
        n = -EOPNOTSUPP
    if n < 0:
        vdrv_slot_put(q, slot)
        bdev_io_finish(io, n)
        return 1
    rc = vdrv_add_chain(q, slot, segs, n, -1)
    if rc < 0:
        vdrv_slot_put(q, slot)
        if rc == -EAGAIN:
            return rc
        bdev_io_finish(io, rc)
        return 1
    slot.io = io
    io.submit_tick = slot.submit_tick
    return 0


cdef int32_t _vdrv_blk_status(vdrv_slot_t *slot) noexcept nogil:
    cdef uint8_t status = slot.area[AREA_RESP_OFF]
    if status == 0:
        return 0
    if status == 2:
        return -EOPNOTSUPP
    return -EIO


cdef int32_t _vdrv_scsi_status(vdrv_slot_t *slot) noexcept nogil:
    cdef uint8_t *resp = slot.area + AREA_RESP_OFF
    if resp[11] == 0 and resp[10] == 0:       # response OK, status GOOD
        return 0
    return -EIO


cdef void _vdrv_complete(vdrv_queue_t *q, vdrv_slot_t *slot) noexcept nogil:
    cdef bdev_io_t *io = slot.io
    cdef int32_t status
    if io == NULL:
        slot.done = 1
        q.done_slots[q.ndone] = <uint16_t>(slot - q.slots)
        q.ndone += 1
        return
    status = _vdrv_blk_status(slot) if q.device == VDRV_DEV_BLK else _vdrv_scsi_status(slot)
    if status == 0 and slot.bounced and io.op == OP_READ:
        buf_to_iov(io.iov, io.iovcnt, 0, slot.area + AREA_BOUNCE_OFF, io.length)
    vdrv_slot_put(q, slot)
    bdev_io_finish(io, status)


cdef int _vdrv_poll_packed(vdrv_queue_t *q, int budget) noexcept nogil:
    """vdrv_poll on a packed ring: used descriptors at the used position, each naming its slot
    (buffer id); the position advances by that request's descriptor count."""
    cdef vring_packed_desc_t *d
    cdef uint16_t buffer_id
    cdef vdrv_slot_t *slot
    cdef int n = 0
    while n < budget and q.inflight > 0 and _pk_is_used(q, q.last_used_idx):
        d = &q.pdesc[q.last_used_idx & (q.size - 1)]
        buffer_id = d.id
        if buffer_id >= q.nslots or not q.slots[buffer_id].busy or q.slots[buffer_id].done:
            q.broken = 1
            return -1
        slot = &q.slots[buffer_id]
        slot.used_len = d.len
        q.last_used_idx = <uint16_t>(q.last_used_idx + slot.ndesc)
        q.num_free += slot.ndesc
        q.inflight -= 1
        q.stats.completed += 1
        _vdrv_complete(q, slot)
        n += 1
    if not q.interrupts:
        vdrv_set_interrupts(q, False)
    return n


cdef int vdrv_poll(vdrv_queue_t *q, int budget) noexcept nogil:
    """Complete up to budget used entries: free their descriptors, then finish each request
    (io.cb for bdev I/O — it may submit again — or the done list for caller-posted chains).
    Returns the number completed, or -1 if the device broke the ring."""
    cdef uint16_t used_idx, id16
    cdef uint32_t id, length
    cdef vring_used_elem_t *e
    cdef vdrv_slot_t *slot
    cdef uint16_t s
    cdef int n = 0
    if q.broken:
        return -1
    if q.packed:
        return _vdrv_poll_packed(q, budget)
    used_idx = vhd_load_u16(_drv_used_idx(q))
    if <uint16_t>(used_idx - q.last_used_idx) > q.inflight:
        q.broken = 1
        return -1
    while q.last_used_idx != used_idx and n < budget:
        e = _drv_used_elem(q, q.last_used_idx)
        id = e.id
        length = e.len
        if id >= q.size or q.head_slot[id] == VDRV_NO_SLOT:
            q.broken = 1
            return -1
        id16 = <uint16_t>id
        s = q.head_slot[id16]
        q.head_slot[id16] = VDRV_NO_SLOT
        slot = &q.slots[s]
        q.desc_next[slot.tail] = q.free_head
        q.free_head = slot.head
        q.num_free += slot.ndesc
        q.last_used_idx += 1
        q.inflight -= 1
        q.stats.completed += 1
        slot.used_len = length
        _vdrv_complete(q, slot)
        n += 1
    if not q.interrupts:
        vdrv_set_interrupts(q, False)
    return n


cdef int vdrv_fail_inflight(vdrv_queue_t *q, int32_t status) noexcept nogil:
    """The device broke the ring: nothing on it will complete.  Fail every bdev I/O still on it
    (its callback runs) so callers never wait forever; returns how many were failed."""
    cdef uint16_t s
    cdef vdrv_slot_t *slot
    cdef bdev_io_t *io
    cdef int n = 0
    for s in range(q.nslots):
        slot = &q.slots[s]
        if slot.busy and slot.io != NULL and not slot.done:
            io = slot.io
            vdrv_slot_put(q, slot)
            bdev_io_finish(io, status)
            n += 1
    q.inflight = 0
    return n


cdef int vdrv_wait(vdrv_queue_t **queues, uint32_t nqueues, int timeout_ms) noexcept nogil:
    """Sleep until one of the queues' call eventfds fires or timeout_ms pass (interrupts must be
    armed).  Returns the number of queues signalled, 0 on timeout, -errno on failure."""
    cdef pollfd fds[64]
    cdef uint32_t i, n = 0
    cdef int rc
    for i in range(nqueues):
        if queues[i].call_fd >= 0 and n < 64:
            fds[n].fd = queues[i].call_fd
            fds[n].events = POLLIN
            fds[n].revents = 0
            n += 1
    if n == 0:
        return -EINVAL
    rc = poll(fds, n, timeout_ms)
    if rc < 0:
        return -errno
    for i in range(nqueues):
        if queues[i].call_fd >= 0:
            queues[i].stats.waits += 1
            queues[i].stats.interrupts += eventfd_drain(queues[i].call_fd)
    return rc


# ---------------------------------------------------------------------------------------------
# Load generator: QD requests in flight per queue for a duration, without the GIL
# ---------------------------------------------------------------------------------------------
cdef inline uint64_t _rand(vdrv_load_t *L) noexcept nogil:
    # xorshift64*: fast, and good enough to spread offsets and pick read or write
    cdef uint64_t x = L.rng
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    L.rng = x
    return x * <uint64_t>0x2545F4914F6CDD1D


cdef inline void _load_prepare(vdrv_load_t *L, vdrv_load_io_t *c) noexcept nogil:
    cdef uint64_t r = _rand(L)
    c.io.op = OP_READ if (r >> 32) % 100 < L.read_pct else OP_WRITE
    c.io.offset = L.offset_base + (r % L.span_blocks) * L.block_bytes
    c.io.length = L.block_bytes


cdef inline void _load_submit(vdrv_load_t *L, vdrv_load_io_t *c) noexcept nogil:
    cdef int rc
    _load_prepare(L, c)
    rc = vdrv_submit(c.q, &c.io)
    if rc == -EAGAIN:
        c.next_pending = L.pending
        L.pending = c


cdef void _load_io_done(bdev_io_t *io) noexcept nogil:
    cdef vdrv_load_io_t *c = <vdrv_load_io_t *>io
    cdef vdrv_load_t *L = c.load
    cdef vdrv_load_result_t *res = &L.res
    cdef uint64_t lat
    if L.measuring and not L.stopping:
        lat = vhd_ticks() - io.submit_tick
        res.ops += 1
        if io.status != 0:
            res.errors += 1
        elif io.op == OP_READ:
            res.read_ops += 1
            res.bytes_read += io.length
        else:
            res.write_ops += 1
            res.bytes_written += io.length
        res.lat_sum_ticks += lat
        if lat > res.lat_max_ticks:
            res.lat_max_ticks = lat
        if res.lat_min_ticks == 0 or lat < res.lat_min_ticks:
            res.lat_min_ticks = lat
        res.hist[hist_bucket(lat)] += 1
    if not L.stopping and (io.status == 0 or not c.q.broken):
        _load_submit(L, c)


cdef inline uint32_t _load_inflight(vdrv_load_t *L) noexcept nogil:
    cdef uint32_t i, n = 0
    for i in range(L.nqueues):
        n += L.queues[i].inflight
    return n


cdef int vdrv_load_run(vdrv_load_t *L) noexcept nogil:
    """Keep qd requests in flight on every queue until the duration ends (or L.stop is set),
    then wait for the last completions.  Returns 0, or -EIO if a queue broke."""
    cdef uint32_t i, k
    cdef uint64_t now, start, end, measure_from
    cdef int got, n, timeout_ms
    cdef vdrv_load_io_t *c
    cdef vdrv_load_io_t *retry
    cdef vdrv_queue_t *q
    cdef bint armed_pending
    start = vhd_ticks()
    measure_from = start + L.ramp_ticks
    end = measure_from + L.duration_ticks
    L.measuring = L.ramp_ticks == 0
    L.stopping = 0
    L.res.start_tick = start
    for i in range(L.nqueues):
        L.queues[i].interrupts = L.interrupts
        vdrv_set_interrupts(L.queues[i], L.interrupts)
        for k in range(L.qd):
            _load_submit(L, &L.ios[i * L.qd + k])
        vdrv_flush(L.queues[i])
    while True:
        got = 0
        for i in range(L.nqueues):
            q = L.queues[i]
            n = vdrv_poll(q, LOAD_POLL_BUDGET)
            if n < 0:
                L.stopping = 1
                L.res.end_tick = vhd_ticks()
                return -EIO
            got += n
        if L.pending != NULL:
            retry = L.pending
            L.pending = NULL
            while retry != NULL:
                c = retry
                retry = retry.next_pending
                if not L.stopping:
                    _load_submit(L, c)
        for i in range(L.nqueues):
            vdrv_flush(L.queues[i])
        L.res.passes += 1
        now = vhd_ticks()
        if not L.measuring and now >= measure_from:
            memset(&L.res, 0, sizeof(vdrv_load_result_t))
            L.res.start_tick = now
            L.measuring = 1
        if not L.stopping and (now >= end or vhd_load_u32(&L.stop)):
            L.stopping = 1
            L.res.end_tick = now
            end = now
        if L.stopping:
            if _load_inflight(L) == 0:
                break
            if now - end > L.drain_ticks:
                L.res.lost = _load_inflight(L)
                break
        if got:
            continue
        L.res.empty_passes += 1
        if not L.interrupts:
            vhd_cpu_relax()
            continue
        armed_pending = False
        for i in range(L.nqueues):
            if vdrv_arm(L.queues[i]):
                armed_pending = True
        if not armed_pending:
            timeout_ms = 100
            vdrv_wait(L.queues, L.nqueues, timeout_ms)
    return 0


# ---------------------------------------------------------------------------------------------
# Python faces: DriverMemory (our guest memory), DriverQueue (one ring), LoadGenerator
# ---------------------------------------------------------------------------------------------
cdef class DriverMemory:
    """The memory a front-end shares with a back-end: one memfd, mapped MAP_SHARED here, and
    announced as ``nregions`` regions of equal size (guest physical addresses from 0, our own
    mapping address as userspace_addr, offsets into the same fd).  Regions are adjacent, so a
    buffer may straddle two of them (the back-end must split it).

    ``alloc``/``free`` hand out ranges (first fit); ``read``/``write`` copy bytes by gpa.
    """
    cdef guest_mem_t *mem
    cdef uint8_t *base
    cdef readonly uint64_t size
    cdef readonly int fd
    cdef list _free
    cdef dict _used

    def __cinit__(self, uint64_t size_bytes, uint32_t nregions=1, str name="vhostd-initiator",
                  bint hugepages=False):
        cdef uint64_t region
        cdef uint64_t page = (2 << 20) if hugepages else 4096
        cdef uint32_t i
        cdef void *p
        self.fd = -1
        if nregions == 0 or nregions > 8:
            raise ValueError("between 1 and 8 memory regions (SET_MEM_TABLE's limit)")
        region = (size_bytes + nregions * page - 1) // (nregions * page) * page
        if region == 0:
            raise ValueError("memory size must be positive")
        self.size = region * nregions
        self.mem = <guest_mem_t *>calloc(1, sizeof(guest_mem_t))
        if self.mem == NULL:
            raise MemoryError()
        # hugepages: 2 MiB pages from the hugetlb pool, as QEMU's memory-backend-memfd,hugetlb=on
        # gives a guest.  The back-end then maps each region 2 MiB-aligned, which SPDK's vhost
        # needs: it registers whole 2 MiB pages around every region for its address translation.
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | ((os.MFD_HUGETLB | os.MFD_HUGE_2MB) if hugepages else 0))
        os.ftruncate(self.fd, self.size)
        p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "mmap of driver memory failed")
        self.base = <uint8_t *>p
        for i in range(nregions):
            self.mem.regions[i].gpa = i * region
            self.mem.regions[i].size = region
            self.mem.regions[i].uaddr = <uint64_t>self.base + i * region
            self.mem.regions[i].hva = self.base + i * region
        self.mem.nregions = nregions
        self._free = [(0, self.size)]
        self._used = {}

    @property
    def regions(self):
        """(guest_phys_addr, memory_size, userspace_addr, mmap_offset) of each region; each is
        sent with ``fd``."""
        return [(self.mem.regions[i].gpa, self.mem.regions[i].size, self.mem.regions[i].uaddr,
                 self.mem.regions[i].gpa) for i in range(self.mem.nregions)]

    def alloc(self, uint64_t length, uint64_t align=64):
        """A free range of length bytes aligned to align; returns its gpa (MemoryError if none)."""
        if length == 0:
            length = 1
        for k, (start, size) in enumerate(self._free):
            addr = (start + align - 1) // align * align
            if addr + length <= start + size:
                pieces = []
                if addr > start:
                    pieces.append((start, addr - start))
                if addr + length < start + size:
                    pieces.append((addr + length, start + size - addr - length))
                self._free[k:k + 1] = pieces
                self._used[addr] = length
                return addr
        raise MemoryError("driver memory exhausted (%d bytes wanted)" % length)

    def free(self, uint64_t gpa):
        """Give back a range from alloc()."""
        length = self._used.pop(gpa)
        self._free.append((gpa, length))
        self._free.sort()
        merged = []
        for start, size in self._free:
            last = len(merged) - 1
            if last >= 0 and merged[last][0] + merged[last][1] == start:
                merged[last] = (merged[last][0], merged[last][1] + size)
            else:
                merged.append((start, size))
        self._free = merged

    cdef uint8_t *ptr(self, uint64_t gpa, uint64_t length) except NULL:
        if self.base == NULL:
            raise ValueError("driver memory is closed")
        if gpa > self.size or length > self.size - gpa:
            raise ValueError("range [%#x, +%#x) is outside driver memory" % (gpa, length))
        return self.base + gpa

    def hva(self, uint64_t gpa):
        """Our address of a guest-physical address."""
        return <size_t>self.ptr(gpa, 0)

    def read(self, uint64_t gpa, uint64_t length):
        cdef uint8_t *p = self.ptr(gpa, length)
        return (<char *>p)[:length]

    def write(self, uint64_t gpa, const uint8_t[:] data):
        cdef uint8_t *p = self.ptr(gpa, data.shape[0])
        if data.shape[0]:
            memcpy(p, &data[0], data.shape[0])

    def fill(self, uint64_t gpa, uint64_t length, uint8_t value=0):
        memset(self.ptr(gpa, length), value, length)

    def close(self):
        """Unmap and close the memfd (queues on it must be gone)."""
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.mem != NULL:
            self.mem.nregions = 0

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
        if self.fd >= 0:
            close(self.fd)
        free(self.mem)


INDIRECT_NEVER = VDRV_INDIRECT_NEVER
INDIRECT_AUTO = VDRV_INDIRECT_AUTO
INDIRECT_ALWAYS = VDRV_INDIRECT_ALWAYS
DEVICE_RAW = VDRV_DEV_RAW
DEVICE_BLK = VDRV_DEV_BLK
DEVICE_SCSI = VDRV_DEV_SCSI
OPS = {"read": OP_READ, "write": OP_WRITE, "flush": OP_FLUSH, "unmap": OP_UNMAP,
       "write_zeroes": OP_WRITE_ZEROES}


def split_ring_layout(uint16_t size):
    """Bytes and alignment of (desc, avail, used) of a split ring of this size (virtio 1.x
    2.7): desc 16 B per entry aligned 16, avail 6 + 2 B per entry aligned 2, used 6 + 8 B per
    entry aligned 4 (the last u16 of avail/used are used_event/avail_event)."""
    return ((vring_desc_bytes(size), 16), (vring_avail_bytes(size), 2), (vring_used_bytes(size), 4))


def histogram_bucket(uint64_t value):
    """Latency-histogram bucket of a value (ticks) and the smallest value of that bucket."""
    cdef uint32_t b = hist_bucket(value)
    return b, hist_bucket_low(b)


cdef void _sync_driver_io_done(bdev_io_t *io) noexcept nogil:
    (<int *>io.cb_arg)[0] = 1


cdef class DriverQueue:
    """The driver side of one split virtqueue laid out in DriverMemory.

    Three ways to use it: ``add_chain`` + ``flush`` + ``poll``/``wait`` for requests built in
    Python (device layers); ``run_io`` for one bdev-style I/O through the C path (vdrv_submit);
    the raw methods (``write_desc``, ``put_avail``, ``set_avail_idx``, ``read_used``,
    ``poll_raw``) that bypass every check, for hostile tests — a queue used raw should not be
    used the other ways afterwards.
    """
    cdef vdrv_queue_t *q
    cdef readonly DriverMemory memory
    cdef readonly uint64_t desc_gpa
    cdef readonly uint64_t avail_gpa
    cdef readonly uint64_t used_gpa
    cdef readonly uint64_t slots_gpa

    def __cinit__(self, DriverMemory memory, uint16_t index, uint16_t size, *, bint event_idx=False,
                  bint indirect=False, int indirect_mode=VDRV_INDIRECT_AUTO,
                  uint32_t bounce_bytes=0, int device=VDRV_DEV_RAW, uint16_t nslots=0, bint packed=False):
        cdef vdrv_queue_t *q
        cdef uint32_t i
        cdef size_t desc_bytes, avail_bytes, used_bytes
        if size == 0 or size > 32768 or (size & (size - 1)):
            raise ValueError("queue size %d is not a power of two up to 32768" % size)
        if nslots == 0 or nslots > size:
            nslots = size
        self.q = q = <vdrv_queue_t *>calloc(1, sizeof(vdrv_queue_t))
        if q == NULL:
            raise MemoryError()
        q.kick_fd = -1
        q.call_fd = -1
        q.desc_next = <uint16_t *>calloc(size, 2)
        q.head_slot = <uint16_t *>calloc(size, 2)
        q.done_slots = <uint16_t *>calloc(nslots, 2)
        q.slots = <vdrv_slot_t *>calloc(nslots, sizeof(vdrv_slot_t))
        if q.desc_next == NULL or q.head_slot == NULL or q.done_slots == NULL or q.slots == NULL:
            raise MemoryError()
        self.memory = memory
        q.mem = memory.mem
        q.size = size
        q.index = index
        q.nslots = nslots
        q.event_idx = event_idx
        q.indirect = indirect
        q.indirect_mode = indirect_mode
        q.device = device
        q.bounce_bytes = (bounce_bytes + 4095) // 4096 * 4096
        q.slot_bytes = AREA_BOUNCE_OFF + q.bounce_bytes if q.bounce_bytes else AREA_MIN_BYTES
        q.packed = packed
        # Packed: the descriptor ring, the driver and the device event suppression areas.
        desc_bytes = vring_desc_bytes(size)
        avail_bytes = 4 if packed else vring_avail_bytes(size)
        used_bytes = 4 if packed else vring_used_bytes(size)
        # Each ring starts on its own cache line: the driver writes desc/avail, the device used.
        self.desc_gpa = memory.alloc(desc_bytes, 4096)
        self.avail_gpa = memory.alloc(avail_bytes, 64)
        self.used_gpa = memory.alloc(used_bytes, 64)
        self.slots_gpa = memory.alloc(<uint64_t>q.slot_bytes * nslots, 4096)
        memory.fill(self.desc_gpa, desc_bytes)
        memory.fill(self.avail_gpa, avail_bytes)
        memory.fill(self.used_gpa, used_bytes)
        q.desc = <vring_desc_t *>memory.ptr(self.desc_gpa, 0)
        q.pdesc = <vring_packed_desc_t *>q.desc if packed else NULL
        q.avail = <uint16_t *>memory.ptr(self.avail_gpa, 0)
        q.used = memory.ptr(self.used_gpa, 0)
        for i in range(nslots):
            q.slots[i].area_gpa = self.slots_gpa + <uint64_t>i * q.slot_bytes
            q.slots[i].area = memory.ptr(q.slots[i].area_gpa, 0)
        vdrv_reset(q, 0, 0)

    def close(self):
        """Give the ring memory back (the back-end must have stopped the queue)."""
        if self.q == NULL:
            return
        for gpa in (self.desc_gpa, self.avail_gpa, self.used_gpa, self.slots_gpa):
            self.memory.free(gpa)
        self._release()

    cdef void _release(self):
        if self.q != NULL:
            free(self.q.desc_next)
            free(self.q.head_slot)
            free(self.q.done_slots)
            free(self.q.slots)
            free(self.q)
            self.q = NULL

    def __dealloc__(self):
        self._release()

    cdef vdrv_queue_t *c(self) except NULL:
        if self.q == NULL:
            raise ValueError("queue is closed")
        return self.q

    # -- configuration ---------------------------------------------------------------------
    def addresses(self):
        """(desc, used, avail) as our virtual addresses — SET_VRING_ADDR's fields, in its order."""
        return (self.memory.hva(self.desc_gpa), self.memory.hva(self.used_gpa),
                self.memory.hva(self.avail_gpa))

    def set_fds(self, int kick_fd=-1, int call_fd=-1):
        """The eventfds of this queue (the caller owns them)."""
        self.c().kick_fd = kick_fd
        self.q.call_fd = call_fd

    def configure(self, *, event_idx=None, indirect=None, indirect_mode=None, interrupts=None):
        """Change negotiated ring features or the completion mode (between runs)."""
        cdef vdrv_queue_t *q = self.c()
        if event_idx is not None:
            q.event_idx = event_idx
        if indirect is not None:
            q.indirect = indirect
        if indirect_mode is not None:
            q.indirect_mode = indirect_mode
        if interrupts is not None:
            q.interrupts = interrupts
        vdrv_set_interrupts(q, q.interrupts)

    def set_scsi_target(self, bytes lun, uint32_t block_size):
        """The LUN (8 bytes) and logical block size vdrv_submit addresses on a scsi queue."""
        if len(lun) != 8:
            raise ValueError("a LUN is 8 bytes")
        memcpy(self.c().lun, <const char *>lun, 8)
        self.q.block_size = block_size

    def reset(self, uint16_t avail_idx=0, uint16_t used_idx=0):
        """Forget every request; the ring restarts at these indexes."""
        vdrv_reset(self.c(), avail_idx, used_idx)

    @property
    def packed(self):
        return bool(self.c().packed)

    @property
    def packed_base(self):
        """SET_VRING_BASE's value for a packed ring at its current positions: avail position and
        wrap counter in bits 0-15, used ones in 16-31 (0x80008000 for a fresh ring)."""
        cdef vdrv_queue_t *q = self.c()
        return _pk_off_wrap(q, q.avail_idx) | (<uint32_t>_pk_off_wrap(q, q.last_used_idx) << 16)

    # -- state -----------------------------------------------------------------------------
    @property
    def index(self):
        return self.c().index

    @property
    def size(self):
        return self.c().size

    @property
    def avail_idx(self):
        """Next avail index we will write (== the published one after flush())."""
        return self.c().avail_idx

    @property
    def last_used_idx(self):
        return self.c().last_used_idx

    @property
    def used_idx(self):
        """used.idx as the device last wrote it."""
        return vhd_load_u16(_drv_used_idx(self.c()))

    @property
    def inflight(self):
        return self.c().inflight

    @property
    def num_free(self):
        return self.c().num_free

    @property
    def broken(self):
        return bool(self.c().broken)

    @property
    def event_idx(self):
        return bool(self.c().event_idx)

    @property
    def address(self):
        """Address of the vdrv_queue_t (for C users such as a reactor)."""
        return <size_t>self.c()

    def stats(self):
        cdef vdrv_queue_stats_t s = self.c().stats
        return {"submitted": s.submitted, "completed": s.completed, "publishes": s.publishes,
                "kicks": s.kicks, "kicks_suppressed": s.kicks_suppressed, "waits": s.waits,
                "interrupts": s.interrupts, "bounced": s.bounced}

    # -- requests built by the caller ------------------------------------------------------
    def add_chain(self, segments, indirect=None):
        """Put a chain [(gpa, length, device_writable)] on the ring (published by flush());
        returns its head descriptor.  indirect: None = the queue's mode, False/True = force.
        BlockingIOError if the ring is full."""
        cdef vdrv_queue_t *q = self.c()
        cdef vdrv_seg_t segs[VDRV_MAX_CHAIN]
        cdef vdrv_slot_t *slot
        cdef int n = len(segments), rc, k
        if n == 0 or n > VDRV_MAX_CHAIN:
            raise ValueError("a chain has 1 to %d buffers" % VDRV_MAX_CHAIN)
        if q.broken:
            raise OSError(EIO, "queue %d is broken" % q.index)
        for k, (gpa, length, writable) in enumerate(segments):
            segs[k].gpa = gpa
            segs[k].len = length
            segs[k].writable = 1 if writable else 0
        slot = vdrv_slot_get(q)
        if slot == NULL:
            raise BlockingIOError("queue %d: every request slot is in use" % q.index)
        rc = vdrv_add_chain(q, slot, segs, n, -1 if indirect is None else (1 if indirect else 0))
        if rc < 0:
            vdrv_slot_put(q, slot)
            if rc == -EAGAIN:
                raise BlockingIOError("queue %d: not enough free descriptors" % q.index)
            raise ValueError("queue %d cannot hold a chain of %d buffers" % (q.index, n))
        return slot.head

    def flush(self):
        """Publish added chains; True if the device was kicked."""
        return vdrv_flush(self.c())

    def poll(self, int budget=65536):
        """Completions since the last call: [(head, used_len)] of chains from add_chain()
        (bdev I/Os complete through their callback).  OSError if the device broke the ring."""
        cdef vdrv_queue_t *q = self.c()
        cdef vdrv_slot_t *slot
        cdef uint16_t i
        if vdrv_poll(q, budget) < 0:
            raise OSError(EIO, "queue %d: the device returned an invalid used entry" % q.index)
        done = []
        for i in range(q.ndone):
            slot = &q.slots[q.done_slots[i]]
            done.append((slot.head, slot.used_len))
            vdrv_slot_put(q, slot)
        q.ndone = 0
        return done

    def wait(self, double timeout_s=5.0):
        """poll(), sleeping on the call eventfd until something completes; TimeoutError after
        timeout_s (the device has not used the requests)."""
        cdef vdrv_queue_t *q = self.c()
        cdef int rc, timeout_ms
        deadline = time.monotonic() + timeout_s
        was_interrupts = q.interrupts
        q.interrupts = 1
        try:
            while True:
                done = self.poll()
                if done:
                    return done
                if vdrv_arm(q):
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("queue %d: no completion within %.1f s" % (q.index, timeout_s))
                if q.call_fd < 0:
                    time.sleep(min(left, 0.0002))
                    continue
                timeout_ms = <int>(min(left, 0.05) * 1000) + 1
                with nogil:
                    rc = vdrv_wait(&q, 1, timeout_ms)
        finally:
            q.interrupts = was_interrupts
            vdrv_set_interrupts(q, was_interrupts)

    def run_io(self, str op, uint64_t offset, object data=None, uint64_t length=0,
               double timeout_s=5.0):
        """One bdev-style I/O through vdrv_submit (the C path a bdev uses): read returns bytes,
        the others None.  data (write) and the read buffer are Python memory, so they go
        through the bounce buffer (the queue needs bounce_bytes).  OSError with the errno the
        I/O completed with."""
        cdef vdrv_queue_t *q = self.c()
        cdef bdev_io_t io
        cdef iovec iov
        cdef range_t rng
        cdef int done = 0, rc
        cdef bytearray buf
        cdef const uint8_t[:] view
        memset(&io, 0, sizeof(io))
        io.op = OPS[op]
        io.offset = offset
        io.cb = _sync_driver_io_done
        io.cb_arg = &done
        if io.op == OP_WRITE:
            view = data
            length = view.shape[0]
            buf = bytearray(data)
        else:
            buf = bytearray(length if io.op == OP_READ else 0)
        io.length = length
        if io.op == OP_READ or io.op == OP_WRITE:
            iov.iov_base = <char *>buf if length else NULL
            iov.iov_len = length
            io.iov = &iov
            io.iovcnt = 1
        rc = vdrv_submit(q, &io)
        if rc == -EAGAIN:
            raise BlockingIOError("queue %d is full" % q.index)
        vdrv_flush(q)
        deadline = time.monotonic() + timeout_s
        while not done:
            if vdrv_poll(q, 65536) < 0:
                raise OSError(EIO, "queue %d: the device returned an invalid used entry" % q.index)
            if done:
                break
            if time.monotonic() > deadline:
                # The request stays on the ring: the queue is unusable for this I/O's buffers.
                q.broken = 1
                raise TimeoutError("queue %d: I/O not completed within %.1f s" % (q.index, timeout_s))
            if vdrv_arm(q):
                continue
            if q.call_fd >= 0:
                with nogil:
                    vdrv_wait(&q, 1, 10)
            else:
                time.sleep(0.0001)
        vdrv_set_interrupts(q, q.interrupts)
        if io.status < 0:
            raise OSError(-io.status, os.strerror(-io.status))
        return bytes(buf) if io.op == OP_READ else None

    # -- raw access for hostile tests ------------------------------------------------------
    def write_desc(self, uint32_t index, uint64_t addr, uint32_t length, uint16_t flags,
                   uint16_t next=0, table_gpa=None):
        """Write a descriptor as given: in the ring's table, or entry index of a table at
        table_gpa (an indirect table the caller allocated)."""
        cdef vring_desc_t *d
        if table_gpa is None:
            if index >= self.c().size:
                raise IndexError("descriptor %d beyond the ring" % index)
            d = &self.q.desc[index]
        else:
            d = <vring_desc_t *>self.memory.ptr(table_gpa + 16 * index, 16)
        d.addr = addr
        d.len = length
        d.flags = flags
        d.next = next

    def read_desc(self, uint16_t index):
        cdef vring_desc_t d = self.c().desc[index % self.q.size]
        return (d.addr, d.len, d.flags, d.next)

    def put_avail(self, uint16_t head, bint publish=True):
        """Write head into the next avail slot (no check: any value) and optionally publish."""
        cdef vdrv_queue_t *q = self.c()
        q.avail[2 + q.avail_idx % q.size] = head
        q.avail_idx += 1
        if publish:
            vhd_store_u16(&q.avail[1], q.avail_idx)
            q.published_idx = q.avail_idx

    def set_avail_idx(self, uint16_t value):
        """Store any value in avail.idx (and take it as our own)."""
        cdef vdrv_queue_t *q = self.c()
        q.avail_idx = value
        q.published_idx = value
        vhd_store_u16(&q.avail[1], value)

    def set_avail_flags(self, uint16_t flags):
        self.c().avail_flags = flags
        vhd_store_u16(&self.q.avail[0], flags)

    def set_used_event(self, uint16_t value):
        vhd_store_u16(_drv_used_event(self.c()), value)

    @property
    def used_flags(self):
        return vhd_load_u16(_drv_used_flags(self.c()))

    @property
    def avail_event(self):
        return vhd_load_u16(_drv_avail_event(self.c()))

    def read_used(self, uint16_t idx):
        """The used element at ring index idx (taken modulo the size): (id, len)."""
        cdef vring_used_elem_t *e = _drv_used_elem(self.c(), idx)
        return (e.id, e.len)

    def poll_raw(self):
        """Used elements written since the last call, unchecked: [(id, len)]."""
        cdef vdrv_queue_t *q = self.c()
        cdef uint16_t idx = vhd_load_u16(_drv_used_idx(q))
        out = []
        while q.last_used_idx != idx:
            e = _drv_used_elem(q, q.last_used_idx)
            out.append((e.id, e.len))
            q.last_used_idx += 1
        return out

    def kick(self):
        """Signal the kick eventfd regardless of the device's wishes."""
        eventfd_signal(self.c().kick_fd)


cdef class LoadGenerator:
    """A fixed workload on blk or scsi DriverQueues: qd requests in flight per queue, random
    block-aligned offsets, reads with probability read_pct %, for duration_s (after ramp_s that
    is not measured).  ``run()`` releases the GIL for the whole run; ``snapshot()`` (from
    another thread) reads the live counters; ``stop()`` ends a run early."""
    cdef vdrv_load_t L
    cdef list queues
    cdef DriverMemory memory
    cdef list buffers

    def __cinit__(self, queues, uint32_t qd, uint32_t block_bytes, uint32_t read_pct,
                  uint64_t span_blocks, double duration_s, *, double ramp_s=0.0,
                  bint interrupts=False, uint64_t seed=0x9E3779B97F4A7C15, uint64_t offset_base=0,
                  double drain_s=5.0):
        cdef DriverQueue dq
        cdef uint32_t i, k, nq = len(queues)
        cdef vdrv_load_io_t *c
        cdef uint64_t rate = tick_rate()
        if nq == 0 or qd == 0 or block_bytes == 0 or span_blocks == 0 or read_pct > 100:
            raise ValueError("need queues, qd > 0, block_bytes > 0, span_blocks > 0, read_pct ≤ 100")
        self.queues = list(queues)
        self.buffers = []
        self.L.queues = <vdrv_queue_t **>calloc(nq, sizeof(vdrv_queue_t *))
        self.L.ios = <vdrv_load_io_t *>calloc(nq * qd, sizeof(vdrv_load_io_t))
        if self.L.queues == NULL or self.L.ios == NULL:
            raise MemoryError()
        for i in range(nq):
            dq = self.queues[i]
            if dq.c().device == VDRV_DEV_RAW:
                raise ValueError("queue %d is not a blk or scsi queue" % dq.q.index)
            if qd > dq.q.nslots:
                raise ValueError("qd %d exceeds the %d request slots of queue %d" % (qd, dq.q.nslots, dq.q.index))
            self.memory = dq.memory
            self.L.queues[i] = dq.q
            for k in range(qd):
                c = &self.L.ios[i * qd + k]
                gpa = dq.memory.alloc(block_bytes, 4096)
                self.buffers.append(gpa)
                c.iov.iov_base = dq.memory.ptr(gpa, block_bytes)
                c.iov.iov_len = block_bytes
                c.io.iov = &c.iov
                c.io.iovcnt = 1
                c.io.cb = _load_io_done
                c.io.cb_arg = c
                c.load = &self.L
                c.q = dq.q
        self.L.nqueues = nq
        self.L.qd = qd
        self.L.block_bytes = block_bytes
        self.L.read_pct = read_pct
        self.L.span_blocks = span_blocks
        self.L.offset_base = offset_base
        self.L.duration_ticks = <uint64_t>(duration_s * rate)
        self.L.ramp_ticks = <uint64_t>(ramp_s * rate)
        self.L.drain_ticks = <uint64_t>(drain_s * rate)
        self.L.interrupts = interrupts
        self.L.rng = seed if seed else 1

    def run(self):
        """Run the workload to its end (GIL released).  OSError if a queue broke."""
        cdef int rc
        for dq in self.queues:
            (<DriverQueue>dq).c()
        with nogil:
            rc = vdrv_load_run(&self.L)
        if rc < 0:
            raise OSError(-rc, "a queue was broken by the device during the run")

    def stop(self):
        vhd_store_u32(&self.L.stop, 1)

    def snapshot(self):
        """Live counters (another thread may be running the load)."""
        cdef vdrv_load_result_t *r = &self.L.res
        return {"ops": r.ops, "errors": r.errors, "bytes": r.bytes_read + r.bytes_written,
                "measuring": bool(self.L.measuring), "start_tick": r.start_tick,
                "now_tick": vhd_ticks()}

    def result(self):
        """Counters of the finished run; latencies in ticks (see tick_rate()), the histogram as
        {bucket low value: count}."""
        cdef vdrv_load_result_t *r = &self.L.res
        cdef uint32_t b
        hist = {}
        for b in range(VDRV_HIST_BUCKETS):
            if r.hist[b]:
                hist[hist_bucket_low(b)] = r.hist[b]
        return {"ops": r.ops, "read_ops": r.read_ops, "write_ops": r.write_ops,
                "bytes_read": r.bytes_read, "bytes_written": r.bytes_written, "errors": r.errors,
                "lat_sum_ticks": r.lat_sum_ticks, "lat_min_ticks": r.lat_min_ticks,
                "lat_max_ticks": r.lat_max_ticks, "elapsed_ticks": r.end_tick - r.start_tick,
                "passes": r.passes, "empty_passes": r.empty_passes, "lost": r.lost,
                "histogram": hist, "tick_rate": tick_rate()}

    def close(self):
        """Give the data buffers back to driver memory."""
        for gpa in self.buffers:
            self.memory.free(gpa)
        self.buffers = []

    def __dealloc__(self):
        free(self.L.queues)
        free(self.L.ios)


def virtio_disk(queues, uint32_t block_size, uint64_t num_blocks, bint readonly=False, backend=None):
    """A Disk served by another vhost-user target through our front-end: I/O goes out on the
    given DriverQueues (blk or scsi, with bounce buffers as large as the largest I/O), one queue
    per I/O engine that uses the disk.  ``backend`` is kept alive with the disk (the front-end
    connection)."""
    cdef Disk d
    cdef virtio_bdev_t *v
    cdef DriverQueue dq
    cdef uint32_t i
    if not queues:
        raise ValueError("a virtio disk needs at least one queue")
    Disk._check_geometry(block_size, num_blocks)
    d = Disk.__new__(Disk)
    v = <virtio_bdev_t *>calloc(1, sizeof(virtio_bdev_t))
    if v == NULL:
        raise MemoryError()
    v.queues = <vdrv_queue_t **>calloc(len(queues), sizeof(vdrv_queue_t *))
    v.owners = <io_ctx_t **>calloc(len(queues), sizeof(io_ctx_t *))
    if v.queues == NULL or v.owners == NULL:
        free(v.queues)
        free(v.owners)
        free(v)
        raise MemoryError()
    for i, dq in enumerate(queues):
        v.queues[i] = dq.q
    v.nqueues = len(queues)
    d.bdev.kind = BDEV_VIRTIO
    d.bdev.virtio = v
    d.bdev.block_size = block_size
    d.bdev.num_blocks = num_blocks
    d.bdev.readonly = readonly
    d.kind = "virtio"
    d.backend = (backend, list(queues))
    return d

