# NVMe I/O queues of a vfio-user controller, served on a reactor.  The controller is one vq_t on
# the reactor's list (hold_buffers, no ring of its own) whose service polls the SQ tail doorbells
# in the shared BAR0 doorbell page, fetches 64-byte submissions from guest memory, turns PRPs into
# iovecs (every address translated and bounds-checked here, once), runs Read / Write / Flush /
# Write Zeroes / Dataset Management on the namespaces' bdevs and posts completions with the phase
# tag.  Interrupts go out once per pass per CQ (MSI-X vector eventfds).  The admin queue and queue
# creation stay on the control plane: it fills a queue slot while it is inactive and publishes it
# with a release store of `active`; the reactor stops touching a slot once `active` is 0.

cdef enum:
    NVME_SQE = 64
    NVME_CQE = 16
    NVME_OPC_FLUSH = 0x00
    NVME_OPC_WRITE = 0x01
    NVME_OPC_READ = 0x02
    NVME_OPC_WRITE_ZEROES = 0x08
    NVME_OPC_DSM = 0x09
    # status: SC | SCT << 8 | DNR << 14
    NVME_SC_SUCCESS = 0x00
    NVME_SC_INVALID_OPCODE = 0x01 | 1 << 14
    NVME_SC_INVALID_FIELD = 0x02 | 1 << 14
    NVME_SC_DATA_TRANSFER_ERROR = 0x04
    NVME_SC_INTERNAL = 0x06
    NVME_SC_INVALID_NAMESPACE = 0x0B | 1 << 14
    NVME_SC_INVALID_PRP_OFFSET = 0x13 | 1 << 14
    NVME_SC_LBA_OUT_OF_RANGE = 0x80 | 1 << 14
    NVME_SC_WRITE_FAULT = 0x80 | 2 << 8
    NVME_SC_UNRECOVERED_READ = 0x81 | 2 << 8
    NVME_DSM_DEALLOCATE = 1 << 2
    NVME_POLL_BUDGET = 64


cdef inline uint64_t _le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef int _iov_append(const guest_mem_t *mem, uint64_t gpa, uint64_t length, iovec *iov, int n,
                     int max_iov) noexcept nogil:
    """Append [gpa, gpa+length) to iov[n:], merging with the previous segment when contiguous in
    host memory.  Returns the new count, or -1 if outside guest memory or too many segments."""
    cdef iovec part[4]
    cdef int got, i
    got = gpa_to_iov(mem, gpa, length, part, 4)
    if got < 0:
        return -1
    for i in range(got):
        if n > 0 and <uint8_t *>iov[n - 1].iov_base + iov[n - 1].iov_len == <uint8_t *>part[i].iov_base:
            iov[n - 1].iov_len += part[i].iov_len
            continue
        if n >= max_iov:
            return -1
        iov[n] = part[i]
        n += 1
    return n


cdef int nvme_prp_to_iov(const guest_mem_t *mem, uint64_t prp1, uint64_t prp2, uint64_t length,
                         iovec *iov, int max_iov, uint16_t *status) noexcept nogil:
    """The host segments of a PRP1/PRP2 data pointer of `length` bytes (4 KiB pages).  PRP1 may
    start inside its page (dword aligned); the rest is PRP2 itself when it ends in the next page,
    else PRP2 points to a list of page addresses whose last entry chains to the next list page
    when more entries follow.  Returns the segment count, or -1 with `status` set: Invalid PRP
    Offset for a misaligned entry, Data Transfer Error for memory outside the guest's."""
    cdef uint64_t first, left, entry, list_addr, chunk
    cdef const uint8_t *lst
    cdef uint32_t slot, slots
    cdef int n = 0
    if length == 0:
        return 0
    if prp1 & 3:
        status[0] = NVME_SC_INVALID_PRP_OFFSET
        return -1
    first = NVME_PAGE - (prp1 & (NVME_PAGE - 1))
    if first > length:
        first = length
    n = _iov_append(mem, prp1, first, iov, 0, max_iov)
    if n < 0:
        status[0] = NVME_SC_DATA_TRANSFER_ERROR
        return -1
    left = length - first
    if left == 0:
        return n
    if left <= NVME_PAGE:
        if prp2 & (NVME_PAGE - 1):
            status[0] = NVME_SC_INVALID_PRP_OFFSET
            return -1
        n = _iov_append(mem, prp2, left, iov, n, max_iov)
        if n < 0:
            status[0] = NVME_SC_DATA_TRANSFER_ERROR
        return n
    list_addr = prp2
    if list_addr & 7:
        status[0] = NVME_SC_INVALID_PRP_OFFSET
        return -1
    while left > 0:
        # The entries from list_addr to the end of its page; the last chains if more follow.
        slots = <uint32_t>((NVME_PAGE - (list_addr & (NVME_PAGE - 1))) // 8)
        lst = gpa_to_hva(mem, list_addr, slots * 8)
        if lst == NULL:
            status[0] = NVME_SC_DATA_TRANSFER_ERROR
            return -1
        for slot in range(slots):
            entry = _le64(lst + slot * 8)
            if slot == slots - 1 and left > NVME_PAGE:
                list_addr = entry           # chain to the next list page
                if list_addr & (NVME_PAGE - 1):
                    status[0] = NVME_SC_INVALID_PRP_OFFSET
                    return -1
                break
            if entry & (NVME_PAGE - 1):
                status[0] = NVME_SC_INVALID_PRP_OFFSET
                return -1
            chunk = NVME_PAGE if left > NVME_PAGE else left
            n = _iov_append(mem, entry, chunk, iov, n, max_iov)
            if n < 0:
                status[0] = NVME_SC_DATA_TRANSFER_ERROR
                return -1
            left -= chunk
            if left == 0:
                break
    return n


cdef inline uint32_t _cq_posted(nvme_cq_t *cq) noexcept nogil:
    return (cq.tail + cq.size - cq.head) % cq.size


cdef bint _cq_ring_head(nvme_ctrl_t *c, uint16_t qid) noexcept nogil:
    """Take the host's CQ head doorbell; False (controller fatal) if it is impossible."""
    cdef nvme_cq_t *cq = &c.cqs[qid]
    cdef uint32_t head = vhd_load_u32(&c.doorbells[2 * qid + 1])
    if head == cq.head:
        return True
    if head >= cq.size or (head + cq.size - cq.head) % cq.size > _cq_posted(cq):
        vhd_store_u32(&c.fatal, 1)
        return False
    cq.head = <uint16_t>head
    return True


cdef void _post_completion(nvme_ctrl_t *c, nvme_sq_t *sq, nvme_req_t *req, uint32_t dw0) noexcept nogil:
    """Write the CQE (DW0–DW2, then DW3 with the phase tag in one store) and return the request
    to its SQ.  A request of a deleted (or re-created) queue is only freed."""
    cdef nvme_cq_t *cq
    cdef uint8_t *entry
    cdef uint32_t dw2, dw3
    if req.status:
        c.stats.errors += 1
    if req.ranges != NULL:
        free(req.ranges)
        req.ranges = NULL
    sq.outstanding -= 1
    cq = &c.cqs[sq.cqid]
    if cq.reserved:
        cq.reserved -= 1
    if req.generation == sq.generation and vhd_load_u32(&sq.active) and vhd_load_u32(&cq.active):
        entry = cq.ring + <size_t>cq.tail * NVME_CQE
        dw2 = sq.head | <uint32_t>sq.qid << 16
        dw3 = req.cid | <uint32_t>cq.phase << 16 | <uint32_t>req.status << 17
        memcpy(entry, &dw0, 4)
        memset(entry + 4, 0, 4)
        memcpy(entry + 8, &dw2, 4)
        vhd_store_u32(<uint32_t *>(entry + 12), dw3)
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1
        cq.irq_pending += 1
    else:
        c.stats.dropped += 1
    sq.free_reqs[sq.nfree] = req.index
    sq.nfree += 1


cdef void _nvme_io_done(bdev_io_t *io) noexcept nogil:
    cdef nvme_req_t *req = <nvme_req_t *>io
    if io.status != 0:
        if req.opcode == NVME_OPC_READ:
            req.status = NVME_SC_UNRECOVERED_READ
        elif req.opcode == NVME_OPC_WRITE or req.opcode == NVME_OPC_WRITE_ZEROES:
            req.status = NVME_SC_WRITE_FAULT
        else:
            req.status = NVME_SC_INTERNAL
    _post_completion(req.sq.ctrl, req.sq, req, 0)


cdef void _nvme_submit(vq_t *vq, nvme_req_t *req, nvme_ns_t *ns, uint32_t op, uint64_t offset,
                       uint64_t length, int iovcnt) noexcept nogil:
    cdef bdev_io_t *io = &req.io
    io.bdev = ns.bdev
    io.op = op
    io.offset = offset
    io.length = length
    io.iov = req.iov
    io.iovcnt = iovcnt
    io.cb = _nvme_io_done
    io.cb_arg = req
    io.stats = &ns.stats
    bdev_submit(vq.io, io)


cdef uint16_t _nvme_dsm(nvme_ctrl_t *c, nvme_req_t *req, nvme_ns_t *ns, const uint8_t *sqe,
                        uint32_t *nranges) noexcept nogil:
    """Dataset Management: the deallocate ranges as bdev unmap ranges in req.ranges (malloc)."""
    cdef uint32_t nr = (_le32(sqe + 40) & 0xFF) + 1
    cdef uint32_t i, blocks, n = 0
    cdef uint64_t slba
    cdef uint8_t buf[NVME_MAX_DSM_RANGES * 16]
    cdef uint16_t status = 0
    cdef int cnt
    cnt = nvme_prp_to_iov(c.mem, _le64(sqe + 24), _le64(sqe + 32), nr * 16, req.iov, NVME_MAX_IOV,
                          &status)
    if cnt < 0:
        c.stats.bad_pointers += 1
        return status
    iov_to_buf(req.iov, cnt, 0, buf, nr * 16)
    req.ranges = <range_t *>malloc(nr * sizeof(range_t))
    if req.ranges == NULL:
        return NVME_SC_INTERNAL
    for i in range(nr):
        blocks = _le32(buf + i * 16 + 4)
        slba = _le64(buf + i * 16 + 8)
        if blocks == 0:
            continue
        if slba >= ns.num_blocks or blocks > ns.num_blocks - slba:
            return NVME_SC_LBA_OUT_OF_RANGE
        req.ranges[n].offset = slba << ns.lbads
        req.ranges[n].length = <uint64_t>blocks << ns.lbads
        n += 1
    nranges[0] = n
    return 0


cdef uint16_t _nvme_execute(vq_t *vq, nvme_ctrl_t *c, nvme_req_t *req, const uint8_t *sqe) noexcept nogil:
    """Decode one I/O command and start it; returns a status to complete it with at once, or
    0xFFFF when the bdev completes it (the callback posts the completion)."""
    cdef uint8_t opc = sqe[0]
    cdef uint32_t nsid = _le32(sqe + 4)
    cdef uint64_t slba, nlb, length
    cdef uint32_t cdw12, nranges = 0
    cdef uint16_t status = 0
    cdef nvme_ns_t *ns
    cdef int cnt
    req.opcode = opc
    if sqe[1] != 0:                       # fused operations or SGLs: not supported
        return NVME_SC_INVALID_FIELD
    if opc != NVME_OPC_FLUSH and opc != NVME_OPC_WRITE and opc != NVME_OPC_READ \
            and opc != NVME_OPC_WRITE_ZEROES and opc != NVME_OPC_DSM:
        return NVME_SC_INVALID_OPCODE
    if nsid == 0 or nsid > NVME_MAX_NS or c.ns[nsid].bdev == NULL:
        return NVME_SC_INVALID_NAMESPACE
    ns = &c.ns[nsid]
    if opc == NVME_OPC_FLUSH:
        _nvme_submit(vq, req, ns, OP_FLUSH, 0, 0, 0)
        return 0xFFFF
    if opc == NVME_OPC_DSM:
        if not (_le32(sqe + 44) & NVME_DSM_DEALLOCATE):
            return NVME_SC_SUCCESS        # only hints: nothing to do
        status = _nvme_dsm(c, req, ns, sqe, &nranges)
        if status or nranges == 0:
            return status
        req.io.ranges = req.ranges
        req.io.nranges = nranges
        _nvme_submit(vq, req, ns, OP_UNMAP, 0, 0, 0)
        return 0xFFFF
    slba = _le64(sqe + 40)
    cdw12 = _le32(sqe + 48)
    nlb = (cdw12 & 0xFFFF) + 1
    if slba >= ns.num_blocks or nlb > ns.num_blocks - slba:
        return NVME_SC_LBA_OUT_OF_RANGE
    length = nlb << ns.lbads
    if opc == NVME_OPC_WRITE_ZEROES:
        _nvme_submit(vq, req, ns, OP_WRITE_ZEROES, slba << ns.lbads, length, 0)
        return 0xFFFF
    if length > c.max_transfer:
        return NVME_SC_INVALID_FIELD
    cnt = nvme_prp_to_iov(c.mem, _le64(sqe + 24), _le64(sqe + 32), length, req.iov, NVME_MAX_IOV,
                          &status)
    if cnt < 0:
        c.stats.bad_pointers += 1
        return status
    _nvme_submit(vq, req, ns, OP_READ if opc == NVME_OPC_READ else OP_WRITE, slba << ns.lbads,
                 length, cnt)
    return 0xFFFF


cdef int _nvme_poll_sq(vq_t *vq, nvme_ctrl_t *c, nvme_sq_t *sq) noexcept nogil:
    cdef uint32_t tail = vhd_load_u32(&c.doorbells[2 * sq.qid])
    cdef nvme_cq_t *cq = &c.cqs[sq.cqid]
    cdef nvme_req_t *req
    cdef const uint8_t *sqe
    cdef uint16_t status
    cdef int n = 0
    if tail >= sq.size:
        vhd_store_u32(&c.fatal, 1)
        return 0
    if not _cq_ring_head(c, sq.cqid):
        return 0
    while sq.head != tail and n < NVME_POLL_BUDGET:
        # Never more commands in flight than the CQ has free slots for.
        if _cq_posted(cq) + cq.reserved + 1 >= cq.size or sq.nfree == 0:
            break
        sqe = sq.ring + <size_t>sq.head * NVME_SQE
        sq.nfree -= 1
        req = &sq.reqs[sq.free_reqs[sq.nfree]]
        req.sq = sq
        req.generation = sq.generation
        memcpy(&req.cid, sqe + 2, 2)
        req.status = 0
        req.ranges = NULL
        req.io.ranges = NULL
        req.io.nranges = 0
        sq.head += 1
        if sq.head == sq.size:
            sq.head = 0
        sq.outstanding += 1
        cq.reserved += 1
        c.stats.commands += 1
        n += 1
        status = _nvme_execute(vq, c, req, sqe)
        if status != 0xFFFF:
            req.status = status
            _post_completion(c, sq, req, 0)
    return n


cdef int nvme_service(vq_t *vq, bint check_only) noexcept nogil:
    """The reactor's poll of one controller: interrupts earned since the last pass, then every
    active SQ.  Returns the commands fetched (or, check_only, whether any wait)."""
    cdef nvme_ctrl_t *c = <nvme_ctrl_t *>vq.device
    cdef nvme_sq_t *sq
    cdef nvme_cq_t *cq
    cdef uint32_t qid
    cdef int n = 0
    if check_only:
        return 1                           # the doorbells send no kick: keep polling
    for qid in range(1, NVME_MAX_QUEUES):
        cq = &c.cqs[qid]
        if cq.irq_pending and vhd_load_u32(&cq.active):
            cq.irq_pending = 0
            if cq.ien and cq.vector < NVME_MAX_VECTORS and c.irq_fds[cq.vector] >= 0:
                eventfd_signal(c.irq_fds[cq.vector])
                c.stats.interrupts += 1
    if vhd_load_u32(&c.fatal):
        return 0
    if not vq.stopping:
        for qid in range(1, NVME_MAX_QUEUES):
            sq = &c.sqs[qid]
            if vhd_load_u32(&sq.active):
                n += _nvme_poll_sq(vq, c, sq)
    vq.inflight_count = 0
    for qid in range(1, NVME_MAX_QUEUES):
        if c.sqs[qid].outstanding:
            vq.inflight_count = 1          # a removal waits for every command's completion
            break
    return n


cdef void _nvme_no_handler(vq_t *vq, task_t *task) noexcept nogil:
    pass


cdef class NvmeController:
    """The data-plane state of one NVMe controller's I/O queues (nvme_ctrl_t) and the control
    plane's handle on it: queue slots, namespaces, interrupt fds.  The control plane changes a
    queue slot only while it is inactive, or turns it off; everything else changes while the
    controller is off its reactor (``queue`` removed)."""
    cdef nvme_ctrl_t *c
    cdef readonly VirtQueue queue          # what the reactor polls: its service is this controller
    cdef GuestMemory memory
    cdef uint8_t[::1] doorbells
    cdef dict disks                        # nsid → Disk (kept alive, channels attached)

    def __cinit__(self, GuestMemory memory, uint8_t[::1] doorbells, uint32_t max_transfer):
        cdef int i
        if doorbells.shape[0] < 8 * NVME_MAX_QUEUES:
            raise ValueError("doorbell page too small")
        self.c = <nvme_ctrl_t *>calloc(1, sizeof(nvme_ctrl_t))
        if self.c == NULL:
            raise MemoryError()
        self.memory = memory
        self.doorbells = doorbells
        self.disks = {}
        self.c.mem = memory.mem
        self.c.doorbells = <uint32_t *>&doorbells[0]
        self.c.max_transfer = max_transfer
        for i in range(NVME_MAX_VECTORS):
            self.c.irq_fds[i] = -1
        self.queue = VirtQueue(0)
        self.queue.vq.mem = memory.mem
        self.queue.vq.device = self.c
        self.queue.vq.service = nvme_service
        self.queue.vq.handler = _nvme_no_handler
        self.queue.vq.hold_buffers = 1
        self.queue.device = self

    def set_namespace(self, uint32_t nsid, Disk disk=None):
        """Serve ``disk`` as NSID ``nsid`` (None: the NSID becomes inactive).  Only while the
        controller is off its reactor."""
        cdef nvme_ns_t *ns
        if nsid == 0 or nsid > NVME_MAX_NS:
            raise ValueError("NSID %d outside 1..%d" % (nsid, NVME_MAX_NS))
        ns = &self.c.ns[nsid]
        old = self.disks.pop(nsid, None)
        if old is not None:
            (<Disk>old).detach_channel(&ns.stats)
            memset(ns, 0, sizeof(nvme_ns_t))
        if disk is None:
            return
        ns.bdev = disk.bdev
        ns.lbads = 0
        while (<uint32_t>1 << (ns.lbads + 1)) <= disk.bdev.block_size:
            ns.lbads += 1
        ns.num_blocks = disk.bdev.num_blocks
        disk.attach_channel(&ns.stats, self)
        self.disks[nsid] = disk

    def namespace_disk(self, uint32_t nsid):
        """The Disk served as ``nsid``, or None."""
        return self.disks.get(nsid)

    def set_irq_fds(self, fds):
        """The eventfd of each interrupt vector (None or -1: none).  Only while off its reactor."""
        cdef int i
        for i in range(NVME_MAX_VECTORS):
            fd = fds[i] if i < len(fds) else None
            self.c.irq_fds[i] = -1 if fd is None else fd

    def create_cq(self, uint16_t qid, uint64_t addr, uint16_t entries, uint16_t vector, bint ien):
        """Start posting to CQ ``qid`` (memory checked here: ValueError if not all mapped)."""
        cdef nvme_cq_t *cq
        cdef uint8_t *ring
        if qid == 0 or qid >= NVME_MAX_QUEUES or entries < 2:
            raise ValueError("CQ %d of %d entries" % (qid, entries))
        cq = &self.c.cqs[qid]
        if vhd_load_u32(&cq.active):
            raise ValueError("CQ %d exists" % qid)
        ring = gpa_to_hva(self.c.mem, addr, <uint64_t>entries * NVME_CQE)
        if ring == NULL:
            raise ValueError("CQ %d at %#x is not in guest memory" % (qid, addr))
        cq.ring = ring
        cq.size = entries
        cq.head = cq.tail = 0
        cq.phase = 1
        cq.vector = vector
        cq.ien = ien
        cq.reserved = 0
        cq.irq_pending = 0
        vhd_store_u32(&self.c.doorbells[2 * qid + 1], 0)
        vhd_store_u32(&cq.active, 1)

    def create_sq(self, uint16_t qid, uint64_t addr, uint16_t entries, uint16_t cqid):
        """Start fetching from SQ ``qid`` (memory checked here; its CQ must exist)."""
        cdef nvme_sq_t *sq
        cdef uint8_t *ring
        cdef uint32_t i
        if qid == 0 or qid >= NVME_MAX_QUEUES or entries < 2 or cqid == 0 or cqid >= NVME_MAX_QUEUES:
            raise ValueError("SQ %d of %d entries on CQ %d" % (qid, entries, cqid))
        sq = &self.c.sqs[qid]
        if vhd_load_u32(&sq.active) or not vhd_load_u32(&self.c.cqs[cqid].active):
            raise ValueError("SQ %d exists or CQ %d does not" % (qid, cqid))
        ring = gpa_to_hva(self.c.mem, addr, <uint64_t>entries * NVME_SQE)
        if ring == NULL:
            raise ValueError("SQ %d at %#x is not in guest memory" % (qid, addr))
        if sq.capacity < entries:
            if sq.outstanding:
                raise ValueError("SQ %d still has commands of its previous life" % qid)
            free(sq.reqs)
            free(sq.free_reqs)
            sq.reqs = <nvme_req_t *>calloc(entries, sizeof(nvme_req_t))
            sq.free_reqs = <uint16_t *>calloc(entries, sizeof(uint16_t))
            sq.capacity = entries if sq.reqs != NULL and sq.free_reqs != NULL else 0
            if sq.capacity == 0:
                raise MemoryError()
            sq.nfree = 0
            for i in range(entries):
                sq.reqs[i].index = <uint16_t>i
                sq.free_reqs[sq.nfree] = <uint16_t>i
                sq.nfree += 1
        sq.ctrl = self.c
        sq.ring = ring
        sq.qid = qid
        sq.size = entries
        sq.head = 0
        sq.cqid = cqid
        sq.generation += 1
        vhd_store_u32(&self.c.doorbells[2 * qid], 0)
        vhd_store_u32(&sq.active, 1)

    def delete_sq(self, uint16_t qid):
        """Stop fetching from SQ ``qid``; completions of its commands still in flight are
        dropped (they belong to a deleted queue)."""
        if 0 < qid < NVME_MAX_QUEUES:
            vhd_store_u32(&self.c.sqs[qid].active, 0)

    def delete_cq(self, uint16_t qid):
        if 0 < qid < NVME_MAX_QUEUES:
            vhd_store_u32(&self.c.cqs[qid].active, 0)

    @property
    def fatal(self):
        return bool(vhd_load_u32(&self.c.fatal))

    @property
    def outstanding(self):
        cdef uint32_t qid, total = 0
        for qid in range(1, NVME_MAX_QUEUES):
            total += self.c.sqs[qid].outstanding
        return total

    def stats(self):
        """commands, errors, bad_pointers, interrupts, dropped."""
        return self.c.stats

    def release(self):
        """Detach the namespaces' channels and let go of the doorbell page (the controller is
        off its reactor for good)."""
        for nsid in list(self.disks):
            self.set_namespace(nsid, None)
        self.queue.device = None
        self.queue.vq.device = NULL
        self.c.doorbells = NULL
        self.doorbells = None

    def __dealloc__(self):
        cdef uint32_t qid
        if self.c == NULL:
            return
        for qid in range(NVME_MAX_QUEUES):
            free(self.c.sqs[qid].reqs)
            free(self.c.sqs[qid].free_reqs)
        free(self.c)
        self.c = NULL


def nvme_prp_segments(GuestMemory memory, uint64_t prp1, uint64_t prp2, uint64_t length):
    """The host segments [(address, length)] the data plane's PRP walk finds for a data pointer,
    or the NVMe status (an int: SC | SCT << 8 | DNR << 14) the command would complete with."""
    cdef iovec iov[NVME_MAX_IOV]
    cdef uint16_t status = 0
    cdef int n, i
    n = nvme_prp_to_iov(memory.mem, prp1, prp2, length, iov, NVME_MAX_IOV, &status)
    if n < 0:
        return status
    return [(<size_t>iov[i].iov_base, iov[i].iov_len) for i in range(n)]
