# Split virtqueues, device side.  The only code that reads or writes ring memory: pop (avail entry →
# descriptor chain → task with checked iovecs), push (task → used entry), the notification decision
# and the inflight-tracking records.
#
# Ring layout (virtio 1.x §2.7), all little-endian:
#   avail: flags u16, idx u16, ring[size] u16, used_event u16
#   used:  flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16
#
# A guest is untrusted.  Structural corruption (an avail index more than a ring ahead, a head or
# next index out of range, a chain longer than the ring, a head already in flight) makes the ring
# unusable: the queue is marked broken, stops, and its error eventfd is signalled.  A well-formed
# chain with unusable buffers becomes a `bad` task that the device completes with an error status.

from libc.stdlib cimport qsort


cdef inline uint16_t *_avail_idx(vq_t *vq) noexcept nogil:
    return &vq.avail[1]

cdef inline uint16_t *_used_flags(vq_t *vq) noexcept nogil:
    return <uint16_t *>vq.used

cdef inline uint16_t *_used_idx(vq_t *vq) noexcept nogil:
    return <uint16_t *>(vq.used + 2)

cdef inline vring_used_elem_t *_used_elem(vq_t *vq, uint16_t slot) noexcept nogil:
    return <vring_used_elem_t *>(vq.used + 4 + 8 * <size_t>slot)

cdef inline uint16_t *_avail_event(vq_t *vq) noexcept nogil:
    return <uint16_t *>(vq.used + 4 + 8 * <size_t>vq.size)

cdef inline uint16_t _used_event(vq_t *vq) noexcept nogil:
    return vhd_load_u16(&vq.avail[2 + vq.size])


cdef inline size_t vring_desc_bytes(uint16_t size) noexcept nogil:
    return 16 * <size_t>size

cdef inline size_t vring_avail_bytes(uint16_t size) noexcept nogil:
    return 6 + 2 * <size_t>size

cdef inline size_t vring_used_bytes(uint16_t size) noexcept nogil:
    return 6 + 8 * <size_t>size


# ---------------------------------------------------------------------------------------------
# Dirty log (live migration).  Every write the device makes to guest memory is marked after it
# is made (a mark before the write could be cleared by the front-end's sync, which then copies
# the page without it).  With logging off each hook is one branch on vq.log_base.
# ---------------------------------------------------------------------------------------------
cdef enum:
    LOG_PAGE_SHIFT = 12


cdef void vq_log_gpa(vq_t *vq, uint64_t gpa, uint64_t length) noexcept nogil:
    """Mark the guest pages of [gpa, gpa+length)."""
    cdef uint64_t page, last
    if length == 0:
        return
    page = gpa >> LOG_PAGE_SHIFT
    last = (gpa + length - 1) >> LOG_PAGE_SHIFT
    while page <= last:
        if (page >> 3) < vq.log_bytes:
            vhd_or_u8(&vq.log_base[page >> 3], <uint8_t>(1 << (page & 7)))
            vq.log_marks += 1
        page += 1


cdef void vq_log_iov(vq_t *vq, const iovec *iov, int n) noexcept nogil:
    """Mark the guest pages behind host segments (translated from guest addresses at pop)."""
    cdef int i
    cdef uint64_t gpa
    for i in range(n):
        if iov[i].iov_base != NULL and iov[i].iov_len and \
                hva_to_gpa(vq.mem, <const uint8_t *>iov[i].iov_base, &gpa):
            vq_log_gpa(vq, gpa, iov[i].iov_len)


cdef inline void _log_used(vq_t *vq, size_t offset, size_t length) noexcept nogil:
    if vq.log_used:
        vq_log_gpa(vq, vq.log_used_gpa + offset, length)


cdef void _log_task(vq_t *vq, task_t *task) noexcept nogil:
    """A completed request's device-writable buffers (read data, blk status, scsi response)."""
    cdef uint64_t gpa
    vq_log_iov(vq, &task.iov[task.n_readable], task.n_iov - task.n_readable)
    if task.status != NULL and hva_to_gpa(vq.mem, task.status, &gpa):
        vq_log_gpa(vq, gpa, 1)     # blk may trim the status byte off its segment


cdef int vq_apply_log(void *arg) noexcept nogil:
    """On the reactor polling the queue (MB_CALL): switch to the staged dirty-log settings."""
    cdef vq_t *vq = <vq_t *>arg
    vq.log_base = vq.next_log_base
    vq.log_bytes = vq.next_log_bytes
    vq.log_used_gpa = vq.next_log_used_gpa
    vq.log_used = vq.next_log_used
    if vq.log_base != NULL and vq.log_used:
        # Entries pushed before logging began may sit in pages copied long ago; the front-end
        # marks the whole ring at the stop, but a live sync in between must see them too.
        vq_log_gpa(vq, vq.log_used_gpa, vring_used_bytes(vq.size))
    return 0


cdef void vq_mark_broken(vq_t *vq) noexcept nogil:
    """Stop a queue whose ring state cannot be trusted and tell the front-end (error eventfd)."""
    if not vq.broken:
        vq.broken = 1
        eventfd_signal(vq.err_fd)


cdef inline void _task_add_segment(task_t *task, vq_t *vq, uint64_t addr, uint32_t length,
                                   bint writable) noexcept nogil:
    """Translate one descriptor's buffer into the task's iovecs (splitting at region edges)."""
    cdef int n
    if length == 0:
        return
    if not writable and task.n_iov > task.n_readable:
        task.bad = 1          # device-readable buffers must precede device-writable ones
    if task.n_iov >= MAX_IOV:
        # Too many segments: keep the last one so the status byte can still be found.
        task.bad = 1
        task.n_iov = MAX_IOV - 1
        if not writable:
            task.n_readable = task.n_iov
    n = gpa_to_iov(vq.mem, addr, length, &task.iov[task.n_iov], MAX_IOV - task.n_iov)
    if n < 0:
        task.bad = 1
        task.iov[task.n_iov].iov_base = NULL
        task.iov[task.n_iov].iov_len = length
        n = 1
    task.n_iov += n
    if not writable:
        task.n_readable = task.n_iov


cdef int _walk_indirect(vq_t *vq, task_t *task, const vring_desc_t *outer) noexcept nogil:
    """Add the buffers of an indirect table.  0, or -1 if the table is unusable (bad task)."""
    cdef const vring_desc_t *table
    cdef vring_desc_t d
    cdef uint32_t count, i, steps
    if not vq.indirect or outer.len == 0 or outer.len % 16 or outer.len // 16 > 65536:
        return -1
    count = outer.len // 16
    table = <const vring_desc_t *>gpa_to_hva(vq.mem, outer.addr, outer.len)
    if table == NULL:
        return -1
    i = 0
    steps = 0
    while True:
        d = table[i]           # one read of the descriptor: the guest may change it under us
        vhd_compiler_barrier()
        if d.flags & VRING_DESC_F_INDIRECT:
            return -1          # nested indirect tables are forbidden
        _task_add_segment(task, vq, d.addr, d.len, d.flags & VRING_DESC_F_WRITE)
        steps += 1
        if not (d.flags & VRING_DESC_F_NEXT):
            return 0
        if d.next >= count or steps >= count:
            return -1          # out of the table, or a loop
        i = d.next


cdef int _walk_chain(vq_t *vq, task_t *task, uint16_t head) noexcept nogil:
    """Fill task.iov from the chain starting at head.  0 on success (task may be bad), -1 if
    the ring is structurally broken."""
    cdef vring_desc_t d
    cdef uint16_t i = head
    cdef uint32_t steps = 0
    task.n_iov = 0
    task.n_readable = 0
    task.bad = 0
    while True:
        d = vq.desc[i]
        vhd_compiler_barrier()
        steps += 1
        if d.flags & VRING_DESC_F_INDIRECT:
            # An indirect descriptor must be the only one of its chain (virtio 1.x 2.7.5.3.1).
            if (d.flags & VRING_DESC_F_NEXT) or steps > 1 or _walk_indirect(vq, task, &d) < 0:
                task.bad = 1
            return 0
        _task_add_segment(task, vq, d.addr, d.len, d.flags & VRING_DESC_F_WRITE)
        if not (d.flags & VRING_DESC_F_NEXT):
            return 0
        if d.next >= vq.size or steps >= vq.size:
            return -1
        i = d.next


cdef inline void _inflight_mark(vq_t *vq, uint16_t head) noexcept nogil:
    if vq.inflight_desc != NULL:
        vq.inflight_counter += 1
        vq.inflight_desc[head].counter = vq.inflight_counter
        vq.inflight_desc[head].next = 0
        vhd_compiler_barrier()
        vq.inflight_desc[head].inflight = 1


cdef task_t *_task_begin(vq_t *vq, uint16_t head) noexcept nogil:
    """The task of a head being popped, or NULL if that head is already in flight (corruption)."""
    cdef task_t *task = &vq.tasks[head]
    if task.busy:
        return NULL
    task.busy = 1
    task.head = head
    task.used_len = 0
    task.status = NULL
    task.start_tick = vhd_clock()
    return task


cdef int vq_pop(vq_t *vq, task_t **out) noexcept nogil:
    """Fetch the next request: 1 with *out set, 0 if none is available, -1 if the ring broke."""
    cdef uint16_t avail_idx, head
    cdef task_t *task
    if vq.packed_ring:
        return vq_packed_pop(vq, out)
    if vq.resubmit_pos < vq.n_resubmit:
        # Requests in flight when the previous back-end stopped come first, oldest first.
        head = vq.resubmit[vq.resubmit_pos]
        vq.resubmit_pos += 1
    else:
        if vq.avail_cache == vq.last_avail_idx:
            # Caught up with what we last read: one (shared, contended) load for a whole batch.
            avail_idx = vhd_load_u16(_avail_idx(vq))
            if avail_idx == vq.last_avail_idx:
                return 0
            if <uint16_t>(avail_idx - vq.last_avail_idx) > vq.size:
                return -1
            vq.avail_cache = avail_idx
            # The requests just seen are timed from now, not from the start of the pass: a pass
            # that keeps finding requests the driver posted after it began would charge them
            # time they did not wait (4x the client's latency at 4 M IOPS, QD 8).
            vhd_clock_refresh()
        head = vhd_load_u16(&vq.avail[2 + vq.last_avail_idx % vq.size])
        if head >= vq.size:
            return -1
        vq.last_avail_idx += 1
        _inflight_mark(vq, head)
    task = _task_begin(vq, head)
    if task == NULL:
        return -1
    if _walk_chain(vq, task, head) < 0:
        task.busy = 0
        return -1
    vq.inflight_count += 1
    out[0] = task
    return 1


cdef inline void _account(vq_t *vq, task_t *task, bint failed) noexcept nogil:
    cdef vq_stats_t *s = &vq.stats
    cdef uint64_t lat = vhd_ticks() - task.start_tick
    cdef int bucket = 63 - vhd_clz64(lat | 1)
    s.requests += 1
    s.latency_ticks += lat
    if bucket >= LAT_BUCKETS:
        bucket = LAT_BUCKETS - 1
    s.lat_hist[bucket] += 1
    if failed:
        s.errors += 1
        if task.bad:
            s.bad_chains += 1
    elif task.io.op == OP_READ:
        s.read_ops += 1
        s.bytes_read += task.io.length
    elif task.io.op == OP_WRITE:
        s.write_ops += 1
        s.bytes_written += task.io.length
    else:
        s.other_ops += 1


cdef void task_complete(task_t *task, bint failed) noexcept nogil:
    """Return a task's buffers to the driver: the used entry now, the used index at the end of
    the pass (vq_publish), the interrupt decision after that (vq_notify)."""
    cdef vq_t *vq = task.vq
    cdef uint16_t slot
    cdef vring_used_elem_t *elem
    if vq.log_base != NULL:
        _log_task(vq, task)
    if vq.packed_ring:
        vq_packed_push(vq, task)
        _account(vq, task, failed)
        task.busy = 0
        vq.inflight_count -= 1
        vq.need_notify = 1
        return
    slot = vq.used_idx % vq.size
    elem = _used_elem(vq, slot)
    elem.id = task.head
    elem.len = task.used_len
    if vq.log_base != NULL:
        _log_used(vq, 4 + 8 * <size_t>slot, 8)
    vq.used_idx += 1
    if vq.inflight_desc != NULL:
        # The batch is linked twice: in the shared region for a successor's recovery, and in the
        # task, which is what vq_publish follows (the front-end can rewrite the shared copy).
        vq.inflight_desc[task.head].next = vq.batch_head
        task.batch_next = vq.batch_head
        vq.batch_head = task.head
        vq.batch_len += 1
    _account(vq, task, failed)
    task.busy = 0
    vq.inflight_count -= 1
    vq.need_notify = 1


cdef void vq_publish(vq_t *vq) noexcept nogil:
    """Make the used entries written since the last call visible: one store of used.idx per
    batch.  With inflight tracking, the batch is recorded first (last_batch_head, linked by next)
    and its inflight flags cleared after, so a crash in between is repaired on recovery."""
    cdef uint16_t head, k
    if vq.published_used == vq.used_idx:
        return
    if vq.inflight != NULL:
        vq.inflight.last_batch_head = vq.batch_head
    vhd_compiler_barrier()
    vhd_store_u16(_used_idx(vq), vq.used_idx)
    if vq.log_base != NULL:
        _log_used(vq, 2, 2)
    vq.published_used = vq.used_idx
    if vq.inflight_desc != NULL:
        vhd_compiler_barrier()
        head = vq.batch_head
        for k in range(vq.batch_len):
            vq.inflight_desc[head].inflight = 0
            head = vq.tasks[head].batch_next
        vq.batch_len = 0
        vhd_compiler_barrier()
        vq.inflight.used_idx = vq.used_idx


cdef inline bint _need_event(uint16_t event, uint16_t new, uint16_t old) noexcept nogil:
    return <uint16_t>(new - event - 1) < <uint16_t>(new - old)


cdef enum:
    COALESCE_WINDOW_MS = 10       # the request rate is measured over windows this long (as SPDK)
    COALESCE_MAX_WINDOWS = 100    # the gap between interrupts never exceeds 100 windows (1 s)


cdef inline bint _driver_wants_interrupt(vq_t *vq) noexcept nogil:
    """Whether the driver asked for an interrupt for the entries pushed since the last decision
    (EVENT_IDX: used_event crossed; otherwise NO_INTERRUPT clear).  used.idx is published."""
    if vq.packed_ring:
        return vq_packed_driver_wants_interrupt(vq)
    vhd_full_fence()       # the used index must be visible before we read the driver's wishes
    if vq.event_idx:
        return _need_event(_used_event(vq), vq.used_idx, vq.signalled_used)
    return not (vhd_load_u16(&vq.avail[0]) & VRING_AVAIL_F_NO_INTERRUPT)


cdef bint _notify_decided(vq_t *vq, uint64_t now, bint wanted) noexcept nogil:
    vq.need_notify = 0
    vq.signalled_used = vq.used_idx
    if wanted and vq.call_fd >= 0:
        eventfd_signal(vq.call_fd)
        vq.stats.notifications += 1
        vq.last_notify_tick = now
        return True
    vq.stats.suppressed += 1
    return False


cdef void _coalesce_measure(vq_t *vq, uint64_t now) noexcept nogil:
    """Once per rate window, set the gap between interrupts from the requests completed in it:
    base × (rate − threshold) / threshold above the threshold, as SPDK's vhost does, and none at
    or below it (SPDK keeps the last gap there; we drop it so a queue that calmed down is not
    held back)."""
    cdef uint64_t elapsed = now - vq.window_start_tick
    cdef uint64_t count, delay = 0
    if elapsed < vq.coalesce_window_ticks:
        return
    # Called at every pass that pushed entries the driver wants an interrupt for: a window
    # stretched past two lengths means a whole window without any, a quiet queue whose next
    # interrupts go out at once.
    if elapsed >= 2 * vq.coalesce_window_ticks:
        count = 0
    else:
        count = (vq.stats.requests - vq.window_start_requests) * vq.coalesce_window_ticks // elapsed
    if vq.coalesce_threshold and count > vq.coalesce_threshold:
        delay = vq.coalesce_base_ticks * (count - vq.coalesce_threshold) // vq.coalesce_threshold
        if delay > vq.coalesce_window_ticks * COALESCE_MAX_WINDOWS:
            delay = vq.coalesce_window_ticks * COALESCE_MAX_WINDOWS
    vq.coalesce_delay_ticks = delay
    vq.window_start_tick = now
    vq.window_start_requests = vq.stats.requests


cdef int vq_notify(vq_t *vq, uint64_t now) noexcept nogil:
    """Send the interrupt the entries pushed since the last decision earned, unless coalescing
    holds it back: the driver wants it but the previous interrupt went out less than the
    current gap ago.  Returns 1 if an interrupt was sent, -1 if newly pushed entries were held
    back (need_notify stays set: call again at a later pass), 0 otherwise."""
    cdef bint wanted
    if not vq.need_notify:
        return 0
    vq_publish(vq)
    wanted = _driver_wants_interrupt(vq)
    if wanted and vq.coalesce_base_ticks:
        _coalesce_measure(vq, now)
        if now - vq.last_notify_tick < vq.coalesce_delay_ticks:
            if vq.coalesced_used == vq.used_idx:
                return 0
            vq.coalesced_used = vq.used_idx
            vq.stats.coalesced += 1
            return -1
    return 1 if _notify_decided(vq, now, wanted) else 0


cdef bint vq_notify_now(vq_t *vq, uint64_t now) noexcept nogil:
    """Decide at once whether the driver wants an interrupt for the entries pushed since the
    last decision (EVENT_IDX or NO_INTERRUPT), and send it; no coalescing.  True if sent."""
    if not vq.need_notify:
        return False
    vq_publish(vq)
    return _notify_decided(vq, now, _driver_wants_interrupt(vq))


cdef void vq_disable_kicks(vq_t *vq) noexcept nogil:
    """While polling, ask the driver not to kick (NO_NOTIFY; with EVENT_IDX avail_event simply
    stops advancing)."""
    if not vq.notify_enabled:
        return
    vq.notify_enabled = 0
    if vq.packed_ring:
        vq_packed_disable_kicks(vq)
    elif not vq.event_idx:
        vhd_store_u16(_used_flags(vq), VRING_USED_F_NO_NOTIFY)
        if vq.log_base != NULL:
            _log_used(vq, 0, 2)


cdef bint vq_enable_kicks(vq_t *vq) noexcept nogil:
    """Before sleeping, ask the driver to kick for the next request.  Returns True if requests
    arrived meanwhile (then the caller must not sleep)."""
    vq.notify_enabled = 1
    if vq.packed_ring:
        vq_packed_enable_kicks(vq)
    elif vq.event_idx:
        vhd_store_u16(_avail_event(vq), vq.last_avail_idx)
        if vq.log_base != NULL:
            _log_used(vq, 4 + 8 * <size_t>vq.size, 2)
    else:
        vhd_store_u16(_used_flags(vq), 0)
        if vq.log_base != NULL:
            _log_used(vq, 0, 2)
    vhd_full_fence()       # publish the request before re-reading avail.idx
    return vq_has_work(vq)


cdef inline bint vq_has_work(vq_t *vq) noexcept nogil:
    if vq.broken or vq.stopping:
        return False
    if vq.service != NULL and vq.service(vq, True):
        return True
    if vq.hold_buffers:
        return False
    return vq_buffer_available(vq)


cdef inline bint vq_buffer_available(vq_t *vq) noexcept nogil:
    """The driver has posted a buffer we have not popped yet."""
    if vq.packed_ring:
        return vq.resubmit_pos < vq.n_resubmit or vq_packed_buffer_available(vq)
    return vq.resubmit_pos < vq.n_resubmit or vhd_load_u16(_avail_idx(vq)) != vq.last_avail_idx


cdef int vq_poll(vq_t *vq, int budget) noexcept nogil:
    """Pop and start up to budget requests; returns how many were started."""
    cdef task_t *task
    cdef int n = 0
    cdef int rc
    if vq.service != NULL:
        # Runs while stopping or broken too: it completes what its device holds (the drain of
        # a stopping queue waits for that); it pops only from a healthy, running queue.
        n = vq.service(vq, False)
        if vq.hold_buffers:
            return n
    if vq.broken or vq.stopping:
        return n
    while n < budget:
        rc = vq_pop(vq, &task)
        if rc == 0:
            break
        if rc < 0:
            vq_mark_broken(vq)
            break
        vq.handler(vq, task)
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Inflight recovery (vhost-user GET/SET_INFLIGHT_FD, split rings)
# ---------------------------------------------------------------------------------------------
cdef int _cmp_by_counter(const void *a, const void *b) noexcept nogil:
    cdef const uint64_t *x = <const uint64_t *>a
    cdef const uint64_t *y = <const uint64_t *>b
    return -1 if x[0] < y[0] else (1 if x[0] > y[0] else 0)


cdef int vq_recover_inflight(vq_t *vq) noexcept nogil:
    """At queue start with an inflight region: finish an interrupted completion, then queue the
    heads still in flight for resubmission (oldest first) and place last_avail after them.
    Returns the number of heads to resubmit, or -1 on allocation failure."""
    cdef inflight_queue_t *q = vq.inflight
    cdef uint16_t used = vhd_load_u16(_used_idx(vq))
    cdef uint16_t head
    cdef uint32_t i, n = 0
    cdef uint64_t *pairs
    if q == NULL:
        return 0
    if q.version == 0 or q.desc_num != vq.size:
        memset(vq.inflight_desc, 0, sizeof(inflight_desc_t) * vq.size)
        q.version = 1
        q.desc_num = vq.size
        q.used_idx = used
        q.last_batch_head = 0
        vq.inflight_counter = 0
        return 0
    if q.used_idx != used:
        # We died between publishing a batch of used entries and clearing their inflight flags:
        # the batch is linked from last_batch_head.
        head = q.last_batch_head % vq.size
        for i in range(<uint16_t>(used - q.used_idx)):
            vq.inflight_desc[head].inflight = 0
            head = vq.inflight_desc[head].next % vq.size
        q.used_idx = used
    pairs = <uint64_t *>malloc(16 * <size_t>vq.size)
    if pairs == NULL:
        return -1
    vq.inflight_counter = 0
    for i in range(vq.size):
        if vq.inflight_desc[i].counter > vq.inflight_counter:
            vq.inflight_counter = vq.inflight_desc[i].counter
        if vq.inflight_desc[i].inflight:
            pairs[2 * n] = vq.inflight_desc[i].counter
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
    vq.used_idx = vq.published_used = used
    vq.last_avail_idx = vq.avail_cache = <uint16_t>(used + n)
    return <int>n


# ---------------------------------------------------------------------------------------------
# Python face
# ---------------------------------------------------------------------------------------------
cpdef size_t inflight_queue_bytes(uint16_t queue_size):
    """Bytes one queue of queue_size needs in an inflight region: room for either layout (the
    front-end asks for the region before it sets features)."""
    cdef size_t split = sizeof(inflight_queue_t) + sizeof(inflight_desc_t) * <size_t>queue_size
    cdef size_t packed = sizeof(inflight_packed_queue_t) + sizeof(inflight_packed_id_t) * <size_t>queue_size
    return split if split > packed else packed


cdef class VirtQueue:
    """The C state of one virtqueue (vq_t and its task pool) and the control plane's handle on it.

    The control plane configures a queue while no reactor polls it, hands it to a reactor
    (Reactor.add_queue) and changes it again only after the reactor has let go.
    """
    cdef vq_t *vq
    cdef GuestMemory memory       # keeps the mapping alive while the queue points into it
    cdef object device            # keeps the device state alive
    cdef object inflight_map      # mmap of the inflight region, or None
    cdef object log               # the DirtyLog the queue marks (kept alive), or None

    def __cinit__(self, uint16_t index=0):
        self.vq = <vq_t *>calloc(1, sizeof(vq_t))
        if self.vq == NULL:
            raise MemoryError()
        self.vq.index = index
        self.vq.kick_fd = -1
        self.vq.call_fd = -1
        self.vq.err_fd = -1

    def configure(self, GuestMemory memory, uint16_t size, uint64_t desc_uaddr,
                  uint64_t avail_uaddr, uint64_t used_uaddr, uint32_t base,
                  bint event_idx, bint indirect, bint packed=False):
        """Point the queue at its rings (front-end virtual addresses, as SET_VRING_ADDR gives
        them).  ValueError if the size is not a power of two ≤ 1024 or a ring is outside guest
        memory.

        Split ring: base is the next avail index; the used index is read from guest memory (it
        survives a back-end restart).  Packed ring (desc: the descriptor ring, avail: the driver
        event suppression area, used: the device's): base is SET_VRING_BASE's value, the avail
        position in bits 0-14 with its wrap counter in bit 15, and the used position likewise in
        bits 16-31 (0 there: the same as avail)."""
        cdef vq_t *vq = self.vq
        cdef uint8_t *desc
        cdef uint8_t *avail
        cdef uint8_t *used
        cdef uint16_t avail_pos = <uint16_t>base
        cdef uint16_t used_pos = <uint16_t>(base >> 16)
        if size == 0 or size > MAX_QUEUE_SIZE or (size & (size - 1)):
            raise ValueError("queue size %d is not a power of two between 1 and %d" % (size, MAX_QUEUE_SIZE))
        if packed:
            if used_pos == 0:
                used_pos = avail_pos
            if (avail_pos & 0x7FFF) >= size or (used_pos & 0x7FFF) >= size:
                raise ValueError("queue %d: packed base %#x is outside a ring of %d" % (vq.index, base, size))
            desc = uaddr_to_hva(memory.mem, desc_uaddr, 16 * <size_t>size)
            avail = uaddr_to_hva(memory.mem, avail_uaddr, 4)
            used = uaddr_to_hva(memory.mem, used_uaddr, 4)
        else:
            if base > 0xFFFF:
                raise ValueError("queue %d: split-ring base %#x does not fit 16 bits" % (vq.index, base))
            desc = uaddr_to_hva(memory.mem, desc_uaddr, vring_desc_bytes(size))
            avail = uaddr_to_hva(memory.mem, avail_uaddr, vring_avail_bytes(size))
            used = uaddr_to_hva(memory.mem, used_uaddr, vring_used_bytes(size))
        if desc == NULL or avail == NULL or used == NULL:
            raise ValueError("queue %d: a ring lies outside guest memory" % vq.index)
        if (<size_t>desc) % 16 or (<size_t>avail) % (4 if packed else 2) or (<size_t>used) % 4:
            raise ValueError("queue %d: misaligned ring address" % vq.index)
        if vq.tasks == NULL or vq.size != size:
            free(vq.tasks)
            vq.tasks = <task_t *>calloc(size, sizeof(task_t))
            if vq.tasks == NULL:
                raise MemoryError()
        for i in range(size):
            vq.tasks[i].vq = vq
        self.memory = memory
        vq.mem = memory.mem
        vq.packed_ring = packed
        vq.desc = NULL if packed else <vring_desc_t *>desc
        vq.pdesc = <vring_packed_desc_t *>desc if packed else NULL
        vq.avail = <uint16_t *>avail
        vq.used = used
        vq.size = size
        if packed:
            vq.last_avail_idx = vq.avail_cache = _packed_count(vq, avail_pos)
            vq.used_idx = vq.published_used = _packed_count(vq, used_pos)
        else:
            vq.last_avail_idx = vq.avail_cache = <uint16_t>base
            vq.used_idx = vq.published_used = vhd_load_u16(_used_idx(vq))
        vq.signalled_used = vq.coalesced_used = vq.used_idx
        vq.batch_len = 0
        vq.event_idx = event_idx
        vq.indirect = indirect
        vq.broken = 0
        vq.stopping = 0
        vq.need_notify = 0
        vq.inflight_count = 0
        vq.notify_enabled = 1
        vq.n_resubmit = vq.resubmit_pos = 0

    def set_inflight(self, object region, size_t offset):
        """Use a shared inflight-tracking region (a writable buffer, e.g. an mmap) at offset for
        this queue; recover the requests it records as in flight.  Returns how many will be
        resubmitted.  Call after configure()."""
        cdef vq_t *vq = self.vq
        cdef const uint8_t[:] view = region
        cdef int n
        if vq.size == 0:
            raise ValueError("queue not configured")
        if offset + inflight_queue_bytes(vq.size) > <size_t>view.shape[0]:
            raise ValueError("inflight region too small for queue %d" % vq.index)
        self.inflight_map = region
        if vq.packed_ring:
            vq.pinflight = <inflight_packed_queue_t *>(<uint8_t *>&view[0] + offset)
            vq.pinflight_ids = <inflight_packed_id_t *>(<uint8_t *>vq.pinflight + sizeof(inflight_packed_queue_t))
            n = vq_packed_recover_inflight(vq)
        else:
            vq.inflight = <inflight_queue_t *>(<uint8_t *>&view[0] + offset)
            vq.inflight_desc = <inflight_desc_t *>(<uint8_t *>vq.inflight + sizeof(inflight_queue_t))
            n = vq_recover_inflight(vq)
        if n < 0:
            raise MemoryError()
        return n

    def set_log(self, DirtyLog log, uint64_t used_gpa, bint log_used):
        """Stage dirty-log settings: ``log`` (None: logging off) and, if ``log_used``, the used
        ring's guest address.  They take effect at configure() time for a queue no reactor polls
        (apply_log()), or on its reactor through Reactor.post_set_log()."""
        cdef vq_t *vq = self.vq
        self.log = log
        vq.next_log_base = NULL if log is None else log.base
        vq.next_log_bytes = 0 if log is None else log.size_bytes
        vq.next_log_used_gpa = used_gpa
        vq.next_log_used = log_used

    def apply_log(self):
        """Take the staged dirty-log settings now: only while no reactor polls the queue."""
        vq_apply_log(self.vq)

    @property
    def logging(self):
        return self.vq.log_base != NULL

    @property
    def log_marks(self):
        return self.vq.log_marks

    def clear_inflight(self):
        self.vq.inflight = NULL
        self.vq.inflight_desc = NULL
        self.vq.pinflight = NULL
        self.vq.pinflight_ids = NULL
        self.inflight_map = None

    def set_fds(self, int kick_fd=-1, int call_fd=-1, int err_fd=-1):
        """Eventfds the reactor uses (the caller keeps ownership and closes them after detach)."""
        self.vq.kick_fd = kick_fd
        self.vq.call_fd = call_fd
        self.vq.err_fd = err_fd

    def set_coalescing(self, uint32_t delay_base_us, uint32_t iops_threshold):
        """Interrupt coalescing as SPDK's vhost_controller_set_coalescing: while the queue
        completes more than iops_threshold requests per second, interrupts are spaced by
        delay_base_us × (rate − threshold) / threshold; at or below it they go out at once.
        delay_base_us 0 disables.  The control plane may call it while a reactor polls the
        queue: each field is one aligned word, so a pass sees at worst a mix of old and new
        settings, which only changes when one interrupt goes out."""
        cdef vq_t *vq = self.vq
        cdef uint64_t rate = tick_rate()
        if iops_threshold * COALESCE_WINDOW_MS < 1000:
            raise ValueError("iops_threshold must be at least %d" % (1000 // COALESCE_WINDOW_MS))
        vq.coalesce_base_ticks = <uint64_t>delay_base_us * rate // 1000000
        vq.coalesce_threshold = <uint64_t>iops_threshold * COALESCE_WINDOW_MS // 1000
        vq.coalesce_window_ticks = rate * COALESCE_WINDOW_MS // 1000
        vq.coalesce_delay_ticks = 0
        vq.window_start_tick = vhd_ticks()
        vq.window_start_requests = vq.stats.requests

    @property
    def index(self):
        return self.vq.index

    @property
    def size(self):
        return self.vq.size

    @property
    def last_avail_idx(self):
        """Next avail slot to read: GET_VRING_BASE's answer once the queue is stopped."""
        return self.vq.last_avail_idx

    @property
    def used_idx(self):
        return self.vq.used_idx

    @property
    def packed(self):
        return bool(self.vq.packed_ring)

    @property
    def vring_base(self):
        """GET_VRING_BASE's answer once the queue is stopped: split, the next avail index;
        packed, the avail position and wrap counter (bits 0-15) and the used ones (16-31)."""
        cdef vq_t *vq = self.vq
        if not vq.packed_ring:
            return vq.last_avail_idx
        return _packed_off_wrap(vq, vq.last_avail_idx) | (<uint32_t>_packed_off_wrap(vq, vq.used_idx) << 16)

    @property
    def inflight_count(self):
        return self.vq.inflight_count

    @property
    def broken(self):
        return bool(self.vq.broken)

    @property
    def address(self):
        return <size_t>self.vq

    def stats(self):
        """Per-queue counters: requests, ops, bytes, errors, notifications, latency histogram."""
        cdef vq_stats_t s = self.vq.stats
        result = {
            "requests": s.requests, "read_ops": s.read_ops, "write_ops": s.write_ops,
            "other_ops": s.other_ops, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
            "errors": s.errors, "bad_chains": s.bad_chains, "notifications": s.notifications,
            "suppressed": s.suppressed, "coalesced": s.coalesced, "kicks": s.kicks,
            "latency_ticks": s.latency_ticks,
            "latency_histogram": [s.lat_hist[i] for i in range(LAT_BUCKETS)],
        }
        return result

    def __dealloc__(self):
        if self.vq != NULL:
            free(self.vq.tasks)
            free(self.vq.resubmit)
            free(self.vq)
            self.vq = NULL
