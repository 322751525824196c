# Packed virtqueues, device side (virtio 1.1 §2.8): pop, push, the notification decision and the
# kick requests of a queue whose vq_t.packed_ring is set.  vring.pxi's entry points (vq_pop,
# task_complete, vq_notify …) come here for such a queue.
#
# Layout, little-endian:
#   descriptor ring: size × {addr u64, len u32, id u16, flags u16}
#   driver event suppression area (vq.avail), device event suppression area (vq.used):
#       {off_wrap u16 (bit 15: wrap counter), flags u16 (ENABLE / DISABLE / DESC)}
#
# Both sides' positions are kept as free-running 16-bit counts of descriptor slots: the slot is
# count % size and the wrap counter is 1 on even laps (it starts at 1).  Sizes are powers of two
# ≤ 1024, so 65536 is a whole number of laps and the parity survives the 16-bit wrap-around; the
# event-index arithmetic of split rings then works unchanged.
#
# A descriptor at the avail position is available when its AVAIL flag equals the driver's wrap
# counter and its USED flag does not.  A chain is consecutive slots linked by NEXT; its buffer id
# is in its last descriptor.  The device writes one used descriptor per chain {id, len, flags with
# AVAIL = USED = its wrap counter} at the used position, which advances by the chain's length:
# completions may come in any order, the slots are reused in order.
#
# Hostile rings: a chain longer than the ring, a buffer id out of range or already in flight break
# the queue (as split rings); a bad buffer or indirect table makes a `bad` task.  The guest may
# rewrite descriptors while we read them: a chain is measured once (flags and the id) and then
# read once per descriptor into the task; what changed in between only affects that request.


cdef inline uint16_t _packed_slot(vq_t *vq, uint16_t count) noexcept nogil:
    return count & (vq.size - 1)

cdef inline uint16_t _packed_wrap(vq_t *vq, uint16_t count) noexcept nogil:
    return 1 if (count & vq.size) == 0 else 0

cdef inline uint16_t _packed_off_wrap(vq_t *vq, uint16_t count) noexcept nogil:
    """A position as the rings and GET_VRING_BASE carry it: slot, wrap counter in bit 15."""
    return _packed_slot(vq, count) | (_packed_wrap(vq, count) << 15)

cdef inline uint16_t _packed_count(vq_t *vq, uint16_t off_wrap) noexcept nogil:
    """The free-running count of a position given as slot | wrap << 15 (slot < size)."""
    return (off_wrap & 0x7FFF) + (0 if off_wrap & 0x8000 else vq.size)


cdef inline uint16_t *_packed_flags(vring_packed_desc_t *d) noexcept nogil:
    # The ring is 16-byte aligned: the flags of a descriptor are an aligned u16.
    return <uint16_t *>(<uint8_t *>d + 14)


cdef inline bint _packed_desc_available(vq_t *vq, uint16_t count) noexcept nogil:
    cdef uint16_t flags = vhd_load_u16(_packed_flags(&vq.pdesc[_packed_slot(vq, count)]))
    cdef uint16_t wrap = _packed_wrap(vq, count)
    return (((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == wrap
            and ((flags & VRING_PACKED_DESC_F_USED) != 0) != wrap)


cdef int _packed_walk_indirect(vq_t *vq, task_t *task, const vring_packed_desc_t *outer) noexcept nogil:
    """Add the buffers of a packed indirect table: len / 16 descriptors, in order (NEXT is not
    used in a table).  0, or -1 if the table is unusable (bad task)."""
    cdef const vring_packed_desc_t *table
    cdef vring_packed_desc_t d
    cdef uint32_t count, i
    if not vq.indirect or outer.len == 0 or outer.len % 16 or outer.len // 16 > VRING_PACKED_MAX_INDIRECT:
        return -1
    count = outer.len // 16
    table = <const vring_packed_desc_t *>gpa_to_hva(vq.mem, outer.addr, outer.len)
    if table == NULL:
        return -1
    for i in range(count):
        d = table[i]           # one read of the descriptor: the guest may change it under us
        vhd_compiler_barrier()
        if d.flags & VRING_DESC_F_INDIRECT:
            return -1          # nested indirect tables are forbidden
        _task_add_segment(task, vq, d.addr, d.len, d.flags & VRING_DESC_F_WRITE)
    return 0


cdef void _task_reset_iov(task_t *task) noexcept nogil:
    task.n_iov = 0
    task.n_readable = 0
    task.bad = 0


cdef int _packed_add_desc(vq_t *vq, task_t *task, const vring_packed_desc_t *d, uint32_t n) noexcept nogil:
    """Add one (already copied) descriptor of an n-descriptor chain to the task; 1 when it was an
    indirect one (the chain ends there)."""
    if d.flags & VRING_DESC_F_INDIRECT:
        # An indirect descriptor is the whole chain (virtio 1.1 §2.8.19).
        if n != 1 or _packed_walk_indirect(vq, task, d) < 0:
            task.bad = 1
        return 1
    _task_add_segment(task, vq, d.addr, d.len, d.flags & VRING_DESC_F_WRITE)
    return 0


cdef int _packed_resubmit(vq_t *vq, task_t **out) noexcept nogil:
    """The next request the inflight region says was in flight when the previous back-end
    stopped, rebuilt from its copy there (the ring may hold used descriptors in its slots now)."""
    cdef uint16_t buffer_id = vq.resubmit[vq.resubmit_pos]
    cdef inflight_packed_id_t *e = &vq.pinflight_ids[buffer_id]
    cdef uint16_t n = e.ndesc              # read once: the front-end may rewrite the region
    cdef uint16_t k
    cdef vring_packed_desc_t d
    cdef task_t *task
    vq.resubmit_pos += 1
    if n == 0 or n > INFLIGHT_PACKED_DESCS:
        n = 1                              # rewritten since recovery: the request fails below
    task = _task_begin(vq, buffer_id)
    if task == NULL:
        return -1
    task.ndesc = n
    _task_reset_iov(task)
    for k in range(n):
        d = e.desc[k]
        vhd_compiler_barrier()
        if _packed_add_desc(vq, task, &d, n):
            break
    vq.inflight_count += 1
    out[0] = task
    return 1


cdef int vq_packed_pop(vq_t *vq, task_t **out) noexcept nogil:
    """Fetch the next request of a packed ring: 1 with *out set, 0 if none, -1 if the ring broke."""
    cdef uint16_t start = vq.last_avail_idx
    cdef uint16_t flags, buffer_id, k
    cdef uint32_t n = 0
    cdef vring_packed_desc_t d
    cdef task_t *task
    cdef inflight_packed_id_t *record = NULL
    if vq.resubmit_pos < vq.n_resubmit:
        return _packed_resubmit(vq, out)
    if not _packed_desc_available(vq, start):
        return 0
    vhd_clock_refresh()        # timed from when we saw it (see vq_pop)
    # Measure the chain: its length and the id in its last descriptor.  The rest of the chain
    # was written before the head's flags, which the load above acquired.
    while True:
        flags = vq.pdesc[_packed_slot(vq, <uint16_t>(start + n))].flags
        n += 1
        if not (flags & VRING_DESC_F_NEXT):
            break
        if n >= vq.size:
            return -1          # a chain longer than the ring (or a loop through every slot)
    vhd_compiler_barrier()
    buffer_id = vq.pdesc[_packed_slot(vq, <uint16_t>(start + n - 1))].id
    if buffer_id >= vq.size:
        return -1
    task = _task_begin(vq, buffer_id)
    if task == NULL:
        return -1              # that buffer id is in flight already
    task.ndesc = <uint16_t>n
    _task_reset_iov(task)
    if vq.pinflight != NULL:
        record = &vq.pinflight_ids[buffer_id]
        record.inflight = 0
        record.ndesc = <uint16_t>n
        record.avail_after = <uint16_t>(start + n)
    for k in range(<uint16_t>n):
        d = vq.pdesc[_packed_slot(vq, <uint16_t>(start + k))]
        vhd_compiler_barrier()
        if record != NULL and k < INFLIGHT_PACKED_DESCS:
            record.desc[k] = d             # what we used, not a second read of the ring
        if _packed_add_desc(vq, task, &d, n):
            break
    if record != NULL:
        # Recorded, then marked in flight, then the avail position moves: a crash in between
        # is repaired from avail_after (vq_packed_recover_inflight).  Chains too long to copy
        # are not recorded: they cannot be replayed.
        if n <= INFLIGHT_PACKED_DESCS:
            vq.inflight_counter += 1
            record.counter = vq.inflight_counter
            vhd_compiler_barrier()
            record.inflight = 1
        vhd_compiler_barrier()
        vq.pinflight.avail_pos = <uint16_t>(start + n)
    vq.last_avail_idx = <uint16_t>(start + n)
    vq.inflight_count += 1
    out[0] = task
    return 1


cdef void vq_packed_push(vq_t *vq, task_t *task) noexcept nogil:
    """Write the used descriptor of a finished chain at the used position: id and len first, the
    flags (which hand it to the driver) last."""
    cdef vring_packed_desc_t *d = &vq.pdesc[_packed_slot(vq, vq.used_idx)]
    cdef uint16_t flags = (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if _packed_wrap(vq, vq.used_idx) else 0
    cdef inflight_packed_queue_t *q = vq.pinflight
    if q != NULL:
        # A crash while the used descriptor is written leaves pending_* to tell whether it got
        # there (vq_packed_recover_inflight).
        q.pending_used = vq.used_idx
        vhd_compiler_barrier()
        q.pending_id = task.head
        vhd_compiler_barrier()
    cdef uint64_t gpa
    d.id = task.head
    d.len = task.used_len
    vhd_store_u16(_packed_flags(d), flags)
    if vq.log_base != NULL and vq.log_used and hva_to_gpa(vq.mem, <const uint8_t *>d, &gpa):
        vq_log_gpa(vq, gpa, sizeof(vring_packed_desc_t))    # migrating: the ring page is dirty
    vq.used_idx = <uint16_t>(vq.used_idx + task.ndesc)
    vq.published_used = vq.used_idx
    if q != NULL:
        vhd_compiler_barrier()
        vq.pinflight_ids[task.head].inflight = 0
        q.used_pos = vq.used_idx
        vhd_compiler_barrier()
        q.pending_id = INFLIGHT_NO_ID


cdef inline uint32_t _packed_load_event(const void *area) noexcept nogil:
    """An event suppression area as one load: off_wrap in the low half, flags in the high one."""
    return vhd_load_u32(<const uint32_t *>area)


cdef bint vq_packed_driver_wants_interrupt(vq_t *vq) noexcept nogil:
    """The driver's wish for the entries pushed since the last decision, from its event
    suppression area: ENABLE always, DISABLE never, DESC (EVENT_IDX) when the used position
    crossed the descriptor it names."""
    cdef uint32_t area
    cdef uint16_t flags, off_wrap, event
    vhd_full_fence()       # the used descriptors must be visible before we read the driver's wishes
    area = _packed_load_event(vq.avail)
    flags = <uint16_t>(area >> 16)
    if flags == VRING_PACKED_EVENT_F_DISABLE:
        return False
    if flags != VRING_PACKED_EVENT_F_DESC or not vq.event_idx:
        return True
    off_wrap = <uint16_t>area
    # The event descriptor's count: in the used position's lap when the wrap counters agree,
    # else in the lap before (a position the driver set ahead, in the next lap, then lies more
    # than a ring behind and is not crossed).
    event = <uint16_t>((vq.used_idx & ~(vq.size - 1)) + (off_wrap & 0x7FFF))
    if (off_wrap >> 15) != _packed_wrap(vq, vq.used_idx):
        event = <uint16_t>(event - vq.size)
    return _need_event(event, vq.used_idx, vq.signalled_used)


cdef inline void _packed_store_event(vq_t *vq, uint16_t off_wrap, uint16_t flags) noexcept nogil:
    vhd_store_u32(<uint32_t *>vq.used, off_wrap | (<uint32_t>flags << 16))


cdef void vq_packed_disable_kicks(vq_t *vq) noexcept nogil:
    """While polling, ask the driver not to kick (DISABLE; with EVENT_IDX the kick position
    simply stops advancing)."""
    if not vq.event_idx:
        _packed_store_event(vq, 0, VRING_PACKED_EVENT_F_DISABLE)


cdef void vq_packed_enable_kicks(vq_t *vq) noexcept nogil:
    """Ask the driver to kick for the next request: at the next avail position (EVENT_IDX) or
    for any (ENABLE)."""
    if vq.event_idx:
        _packed_store_event(vq, _packed_off_wrap(vq, vq.last_avail_idx), VRING_PACKED_EVENT_F_DESC)
    else:
        _packed_store_event(vq, 0, VRING_PACKED_EVENT_F_ENABLE)


cdef inline bint vq_packed_buffer_available(vq_t *vq) noexcept nogil:
    return _packed_desc_available(vq, vq.last_avail_idx)


# ---------------------------------------------------------------------------------------------
# Inflight recovery of packed rings (our layout of the GET/SET_INFLIGHT_FD region, dataplane.pxd)
# ---------------------------------------------------------------------------------------------
cdef inline uint16_t _ahead(uint16_t pos, uint16_t base) noexcept nogil:
    return <uint16_t>(pos - base)


cdef int vq_packed_recover_inflight(vq_t *vq) noexcept nogil:
    """At queue start with an inflight region: a fresh region takes the positions SET_VRING_BASE
    gave; a used one gives them back (QEMU cannot after a crash), finishes a used descriptor
    being written, and queues the chains still in flight for resubmission, oldest first.
    Returns how many, or -1 on allocation failure.  Every value read from the region is bounded:
    the front-end can rewrite it."""
    cdef inflight_packed_queue_t *q = vq.pinflight
    cdef inflight_packed_id_t *e
    cdef uint16_t used, avail, pending, pending_used, wrap, flags, n_desc
    cdef uint32_t i, n = 0
    cdef uint64_t *pairs
    cdef vring_packed_desc_t d
    if q.version == 0 or q.desc_num != vq.size or q.layout != INFLIGHT_PACKED_LAYOUT:
        memset(vq.pinflight_ids, 0, sizeof(inflight_packed_id_t) * vq.size)
        q.layout = INFLIGHT_PACKED_LAYOUT
        q.desc_num = vq.size
        q.avail_pos = vq.last_avail_idx
        q.used_pos = vq.used_idx
        q.pending_id = INFLIGHT_NO_ID
        vhd_compiler_barrier()
        q.version = 1
        vq.inflight_counter = 0
        return 0
    used = q.used_pos
    pending = q.pending_id
    if pending < vq.size:
        pending_used = q.pending_used
        d = vq.pdesc[_packed_slot(vq, pending_used)]
        wrap = _packed_wrap(vq, pending_used)
        flags = d.flags
        if (d.id == pending and ((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == wrap
                and ((flags & VRING_PACKED_DESC_F_USED) != 0) == wrap):
            # It reached the ring: that request is done.
            vq.pinflight_ids[pending].inflight = 0
            n_desc = vq.pinflight_ids[pending].ndesc
            used = <uint16_t>(pending_used + (n_desc if 0 < n_desc <= vq.size else 1))
        else:
            used = pending_used
    q.pending_id = INFLIGHT_NO_ID
    avail = q.avail_pos
    if _ahead(avail, used) > vq.size:
        avail = used
    pairs = <uint64_t *>malloc(16 * <size_t>vq.size)
    if pairs == NULL:
        return -1
    vq.inflight_counter = 0
    for i in range(vq.size):
        e = &vq.pinflight_ids[i]
        if e.counter > vq.inflight_counter:
            vq.inflight_counter = e.counter
        if not e.inflight:
            continue
        if e.ndesc == 0 or e.ndesc > INFLIGHT_PACKED_DESCS:
            e.inflight = 0
            continue
        # Fetched, marked, but the avail position not yet stored: it is past this chain.
        if _ahead(avail, used) < _ahead(e.avail_after, used) <= vq.size:
            avail = e.avail_after
        pairs[2 * n] = e.counter
        pairs[2 * n + 1] = i
        n += 1
    qsort(pairs, n, 16, _cmp_by_counter)
    if vq.resubmit != NULL:
        free(vq.resubmit)
    vq.resubmit = <uint16_t *>malloc(2 * <size_t>(n if n else 1))
    if vq.resubmit == NULL:
        free(pairs)
        return -1
    for i in range(n):
        vq.resubmit[i] = <uint16_t>pairs[2 * i + 1]
    free(pairs)
    vq.n_resubmit = <uint16_t>n
    vq.resubmit_pos = 0
    vq.last_avail_idx = vq.avail_cache = avail
    vq.used_idx = vq.published_used = vq.signalled_used = vq.coalesced_used = used
    q.avail_pos = avail
    q.used_pos = used
    return <int>n
