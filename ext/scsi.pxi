# virtio-scsi device and SCSI block-device emulation (vhost_user.md §5, §6).
#
# Queues: 0 control (task management, asynchronous notification), 1 event (hot-plug events the
# device hands the driver), 2… requests.  A request is {lun, tag, attributes, CDB} in the
# device-readable part and {response, sense} in the device-writable part, each followed by its
# data (device-readable data-out or device-writable data-in, never both).
#
# The emulation is organized by opcode: scsi_execute() dispatches to one handler per command (or
# family: READ 6/10/12/16 share one decoder), every error goes through scsi_check_condition(), and
# scsi_finish() writes the response.  Commands that move data run on the bdev straight from and
# into guest memory; the others build their data-in in a small buffer.

from libc.errno cimport EIO, ENODEV, EROFS, ERANGE

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

cdef enum:
    # virtio-scsi responses
    VS_OK = 0
    VS_BAD_TARGET = 3
    VS_BUSY = 5
    VS_FAILURE = 9
    VS_FUNCTION_SUCCEEDED = 10
    VS_FUNCTION_REJECTED = 11
    VS_INCORRECT_LUN = 12
    # control queue request types and task-management functions
    VS_T_TMF = 0
    VS_T_AN_QUERY = 1
    VS_T_AN_SUBSCRIBE = 2
    TMF_ABORT_TASK = 0
    TMF_ABORT_TASK_SET = 1
    TMF_CLEAR_ACA = 2
    TMF_CLEAR_TASK_SET = 3
    TMF_I_T_NEXUS_RESET = 4
    TMF_LOGICAL_UNIT_RESET = 5
    TMF_QUERY_TASK = 6
    TMF_QUERY_TASK_SET = 7
    # events
    VS_T_TRANSPORT_RESET = 1
    VS_EVT_RESET_RESCAN = 1
    VS_EVT_RESET_REMOVED = 2
    # wire sizes
    VS_CMD_REQ_BYTES = 51
    VS_CMD_RESP_BYTES = 108
    VS_SENSE_BYTES = 96
    VS_CDB_OFFSET = 19
    VS_TMF_REQ_BYTES = 24
    VS_AN_REQ_BYTES = 16
    VS_AN_RESP_BYTES = 5
    VS_EVENT_BYTES = 16
    VS_RESP_MAX_IOV = 8       # task.scratch holds this many iovecs of the response area
    # SCSI status, sense keys and additional sense codes
    ST_GOOD = 0x00
    ST_CHECK_CONDITION = 0x02
    SK_NO_SENSE = 0x0
    SK_NOT_READY = 0x2
    SK_MEDIUM_ERROR = 0x3
    SK_HARDWARE_ERROR = 0x4
    SK_ILLEGAL_REQUEST = 0x5
    SK_UNIT_ATTENTION = 0x6
    SK_DATA_PROTECT = 0x7
    ASC_NONE = 0x00
    ASC_WRITE_ERROR = 0x0C
    ASC_UNRECOVERED_READ_ERROR = 0x11
    ASC_PARAMETER_LIST_LENGTH_ERROR = 0x1A
    ASC_INVALID_OPCODE = 0x20
    ASC_LBA_OUT_OF_RANGE = 0x21
    ASC_INVALID_FIELD_IN_CDB = 0x24
    ASC_LUN_NOT_SUPPORTED = 0x25
    ASC_INVALID_FIELD_IN_PARAMETER_LIST = 0x26
    ASC_WRITE_PROTECTED = 0x27
    ASC_PARAMETERS_CHANGED = 0x2A
    ASCQ_CAPACITY_DATA_CHANGED = 0x09
    ASC_SAVING_PARAMETERS_NOT_SUPPORTED = 0x39
    ASC_MEDIUM_NOT_PRESENT = 0x3A
    ASC_INTERNAL_TARGET_FAILURE = 0x44
    FIXED_SENSE_BYTES = 18
    # limits we advertise (VPD Block Limits) and enforce
    SCSI_MAX_XFER_BYTES = 4 * 1024 * 1024
    SCSI_MAX_UNMAP_BYTES = 1024 * 1024 * 1024
    SCSI_MAX_UNMAP_DESCRIPTORS = 32
    SCSI_EMU_BUF = 512        # data-in of emulated commands
    NO_TARGET = 0xFF

cdef enum:
    # opcodes
    OPC_TEST_UNIT_READY = 0x00
    OPC_REQUEST_SENSE = 0x03
    OPC_READ_6 = 0x08
    OPC_WRITE_6 = 0x0A
    OPC_INQUIRY = 0x12
    OPC_MODE_SELECT_6 = 0x15
    OPC_MODE_SENSE_6 = 0x1A
    OPC_START_STOP_UNIT = 0x1B
    OPC_READ_CAPACITY_10 = 0x25
    OPC_READ_10 = 0x28
    OPC_WRITE_10 = 0x2A
    OPC_VERIFY_10 = 0x2F
    OPC_SYNCHRONIZE_CACHE_10 = 0x35
    OPC_WRITE_SAME_10 = 0x41
    OPC_UNMAP = 0x42
    OPC_MODE_SELECT_10 = 0x55
    OPC_MODE_SENSE_10 = 0x5A
    OPC_PERSISTENT_RESERVE_IN = 0x5E
    OPC_READ_16 = 0x88
    OPC_WRITE_16 = 0x8A
    OPC_VERIFY_16 = 0x8F
    OPC_SYNCHRONIZE_CACHE_16 = 0x91
    OPC_WRITE_SAME_16 = 0x93
    OPC_SERVICE_ACTION_IN_16 = 0x9E
    SAI_READ_CAPACITY_16 = 0x10
    OPC_REPORT_LUNS = 0xA0
    OPC_READ_12 = 0xA8
    OPC_WRITE_12 = 0xAA


# ---------------------------------------------------------------------------------------------
# Sense and completion
# ---------------------------------------------------------------------------------------------
cdef void scsi_check_condition(task_t *task, uint8_t key, uint8_t asc, uint8_t ascq) noexcept nogil:
    """Complete with CHECK CONDITION and this sense (the one place every error goes through)."""
    task.scsi.status = ST_CHECK_CONDITION
    task.scsi.sense_key = key
    task.scsi.asc = asc
    task.scsi.ascq = ascq
    task.scsi.data_done = 0


cdef void scsi_build_fixed_sense(uint8_t *sense, uint8_t key, uint8_t asc, uint8_t ascq) noexcept nogil:
    """Fixed-format sense data, current error (18 bytes)."""
    memset(sense, 0, FIXED_SENSE_BYTES)
    sense[0] = 0x70
    sense[2] = key & 0x0F
    sense[7] = FIXED_SENSE_BYTES - 8
    sense[12] = asc
    sense[13] = ascq


cdef void scsi_finish(task_t *task) noexcept nogil:
    """Write the virtio-scsi response (response, status, sense, residual) and complete."""
    cdef scsi_cmd_t *c = &task.scsi
    cdef uint8_t resp[VS_CMD_RESP_BYTES]
    cdef scsi_dev_t *dev = <scsi_dev_t *>task.vq.device
    cdef bint failed
    memset(resp, 0, VS_CMD_RESP_BYTES)
    if c.response != VS_OK:
        _put_le32(resp + 4, c.data_len)                   # resid: nothing transferred
        resp[11] = c.response
        c.data_done = 0
    else:
        _put_le32(resp + 4, c.data_len - c.data_done)
        resp[10] = c.status
        if c.status == ST_CHECK_CONDITION:
            _put_le32(resp, FIXED_SENSE_BYTES)
            scsi_build_fixed_sense(resp + 12, c.sense_key, c.asc, c.ascq)
    buf_to_iov(<iovec *>task.scratch, c.resp_niov, 0, resp, VS_CMD_RESP_BYTES)
    if task.vq.log_base != NULL:
        vq_log_iov(task.vq, <iovec *>task.scratch, c.resp_niov)   # the saved response area
    task.used_len = VS_CMD_RESP_BYTES + (c.data_done if c.data_in else 0)
    failed = c.response != VS_OK or c.status != ST_GOOD
    if c.target != NO_TARGET:
        vhd_add_u32_sc(&dev.targets[c.target].inflight, -1)
        c.target = NO_TARGET
    task_complete(task, failed)


cdef void _scsi_io_error(task_t *task, uint32_t op, int32_t status) noexcept nogil:
    if status == -EROFS:
        scsi_check_condition(task, SK_DATA_PROTECT, ASC_WRITE_PROTECTED, 0)
    elif status == -ERANGE:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, 0)
    elif status == -ENODEV:
        scsi_check_condition(task, SK_NOT_READY, ASC_MEDIUM_NOT_PRESENT, 0)
    elif status == -EIO and op == OP_READ:
        scsi_check_condition(task, SK_MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, 0)
    elif status == -EIO:
        scsi_check_condition(task, SK_MEDIUM_ERROR, ASC_WRITE_ERROR, 0)
    else:
        scsi_check_condition(task, SK_HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE, 0)


cdef void _scsi_io_done(bdev_io_t *io) noexcept nogil:
    cdef task_t *task = <task_t *>io.cb_arg
    if io.status == 0:
        if io.op == OP_READ or io.op == OP_WRITE:
            task.scsi.data_done = <uint32_t>io.length
    else:
        _scsi_io_error(task, io.op, io.status)
    scsi_finish(task)


cdef void _scsi_submit(vq_t *vq, task_t *task, scsi_target_t *t, uint32_t op, uint64_t offset,
                       uint64_t length, int first, int count, range_t *ranges=NULL,
                       uint32_t nranges=0) noexcept nogil:
    cdef bdev_io_t *io = &task.io
    io.bdev = t.bdev
    io.op = op
    io.offset = offset
    io.length = length
    io.iov = &task.iov[first] if count else NULL
    io.iovcnt = count
    io.ranges = ranges
    io.nranges = nranges
    io.cb = _scsi_io_done
    io.cb_arg = task
    io.stats = &vq.target_stats[task.scsi.target]
    bdev_submit(vq.io, io)


cdef void _scsi_data_in(task_t *task, const uint8_t *buf, size_t produced, size_t alloc) noexcept nogil:
    """Return emulated data-in: as much as the CDB's allocation length and the buffer allow."""
    cdef scsi_cmd_t *c = &task.scsi
    cdef size_t n = produced if produced < alloc else alloc
    if not c.data_in:
        n = 0
    if n > c.data_len:
        n = c.data_len
    buf_to_iov(&task.iov[c.data_first], c.data_count, 0, buf, n)
    c.data_done = <uint32_t>n


cdef inline bint _lba_range_bad(scsi_target_t *t, uint64_t lba, uint64_t blocks) noexcept nogil:
    return lba > t.bdev.num_blocks or blocks > t.bdev.num_blocks - lba


# ---------------------------------------------------------------------------------------------
# Commands that move data
# ---------------------------------------------------------------------------------------------
cdef void _scsi_read_write(vq_t *vq, task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    """READ / WRITE (6, 10, 12, 16): one decoder of LBA and transfer length."""
    cdef scsi_cmd_t *c = &task.scsi
    cdef uint8_t opcode = cdb[0]
    cdef uint64_t lba, nbytes
    cdef uint32_t blocks
    cdef bint is_write = opcode == OPC_WRITE_6 or opcode == OPC_WRITE_10 or \
        opcode == OPC_WRITE_12 or opcode == OPC_WRITE_16
    cdef int count
    if opcode == OPC_READ_6 or opcode == OPC_WRITE_6:
        lba = _be24(cdb + 1) & 0x1FFFFF
        blocks = cdb[4] if cdb[4] else 256
    elif opcode == OPC_READ_10 or opcode == OPC_WRITE_10:
        lba = _be32(cdb + 2)
        blocks = _be16(cdb + 7)
    elif opcode == OPC_READ_12 or opcode == OPC_WRITE_12:
        lba = _be32(cdb + 2)
        blocks = _be32(cdb + 6)
    else:
        lba = _be64(cdb + 2)
        blocks = _be32(cdb + 10)
    if _lba_range_bad(t, lba, blocks):
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, 0)
        scsi_finish(task)
        return
    if blocks == 0:
        scsi_finish(task)
        return
    nbytes = <uint64_t>blocks * t.bdev.block_size
    if nbytes > SCSI_MAX_XFER_BYTES:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        scsi_finish(task)
        return
    if is_write and (t.readonly or t.bdev.readonly):
        scsi_check_condition(task, SK_DATA_PROTECT, ASC_WRITE_PROTECTED, 0)
        scsi_finish(task)
        return
    if c.data_len < nbytes or (c.data_in == is_write):
        # The guest's buffer is shorter than the CDB's transfer, or goes the wrong way.
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        scsi_finish(task)
        return
    count = iov_trim_tail(&task.iov[c.data_first], c.data_count, c.data_len - nbytes)
    _scsi_submit(vq, task, t, OP_WRITE if is_write else OP_READ, lba * t.bdev.block_size, nbytes,
                 c.data_first, count)


cdef void _scsi_verify(task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    """VERIFY (10, 16) without byte comparison: the medium is always readable."""
    cdef uint64_t lba
    cdef uint32_t blocks
    if (cdb[1] >> 1) & 3:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        return
    if cdb[0] == OPC_VERIFY_10:
        lba = _be32(cdb + 2)
        blocks = _be16(cdb + 7)
    else:
        lba = _be64(cdb + 2)
        blocks = _be32(cdb + 10)
    if _lba_range_bad(t, lba, blocks):
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, 0)


cdef void _scsi_synchronize_cache(vq_t *vq, task_t *task, scsi_target_t *t,
                                  const uint8_t *cdb) noexcept nogil:
    cdef uint64_t lba
    cdef uint32_t blocks
    if cdb[0] == OPC_SYNCHRONIZE_CACHE_10:
        lba = _be32(cdb + 2)
        blocks = _be16(cdb + 7)
    else:
        lba = _be64(cdb + 2)
        blocks = _be32(cdb + 10)
    if _lba_range_bad(t, lba, blocks):
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, 0)
        scsi_finish(task)
        return
    _scsi_submit(vq, task, t, OP_FLUSH, 0, 0, 0, 0)


cdef void _scsi_ws_done(bdev_io_t *io) noexcept nogil:
    cdef task_t *task = <task_t *>io.cb_arg
    if task.scsi.in_submit:
        return                 # completed inside _scsi_ws_run's loop: it carries on
    _scsi_ws_run(task)


cdef void _scsi_ws_run(task_t *task) noexcept nogil:
    """WRITE SAME with a non-zero pattern: writes of up to as many blocks as free iovec slots
    allow, each slot pointing at the pattern, until the range is done or one fails."""
    cdef scsi_cmd_t *c = &task.scsi
    cdef vq_t *vq = task.vq
    cdef scsi_target_t *t = &(<scsi_dev_t *>vq.device).targets[c.target]
    cdef bdev_io_t *io = &task.io
    cdef int first = task.n_iov
    cdef uint32_t per_chunk = (MAX_IOV - first) // c.pattern_count
    cdef uint32_t chunk, k, s
    cdef int finished
    while True:
        if io.status != 0:
            _scsi_io_error(task, OP_WRITE, io.status)
            scsi_finish(task)
            return
        if c.blocks_left == 0:
            scsi_finish(task)
            return
        chunk = c.blocks_left if c.blocks_left < per_chunk else per_chunk
        for k in range(chunk):
            for s in range(c.pattern_count):
                task.iov[first + k * c.pattern_count + s] = task.iov[c.pattern_first + s]
        io.bdev = t.bdev
        io.op = OP_WRITE
        io.offset = c.lba * t.bdev.block_size
        io.length = <uint64_t>chunk * t.bdev.block_size
        io.iov = &task.iov[first]
        io.iovcnt = <int>(chunk * c.pattern_count)
        io.ranges = NULL
        io.nranges = 0
        io.cb = _scsi_ws_done
        io.cb_arg = task
        io.stats = &vq.target_stats[c.target]
        c.lba += chunk
        c.blocks_left -= chunk
        c.in_submit = 1
        finished = bdev_submit(vq.io, io)
        c.in_submit = 0
        if not finished:
            return             # completes later (ring, virtio, QoS queue): _scsi_ws_done resumes


cdef void _scsi_write_same(vq_t *vq, task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    """WRITE SAME (10, 16): one block repeated; all-zero blocks become write-zeroes, or unmap
    with the UNMAP bit (unmapped blocks read back as zeros)."""
    cdef scsi_cmd_t *c = &task.scsi
    cdef uint64_t lba
    cdef uint32_t blocks, bs = t.bdev.block_size
    cdef bint unmap = cdb[1] & 0x08
    cdef bint no_data = cdb[0] == OPC_WRITE_SAME_16 and (cdb[1] & 0x01)
    cdef bint zeros = True
    cdef uint8_t chunk[512]
    cdef uint32_t off, k, n
    if cdb[1] & 0x10:          # ANCHOR
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        scsi_finish(task)
        return
    if cdb[0] == OPC_WRITE_SAME_10:
        lba = _be32(cdb + 2)
        blocks = _be16(cdb + 7)
    else:
        lba = _be64(cdb + 2)
        blocks = _be32(cdb + 10)
    if blocks == 0 or <uint64_t>blocks * bs > SCSI_MAX_UNMAP_BYTES:
        # WSNZ: a zero length ("to the end of the medium") is not supported.
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        scsi_finish(task)
        return
    if _lba_range_bad(t, lba, blocks):
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, 0)
        scsi_finish(task)
        return
    if t.readonly or t.bdev.readonly:
        scsi_check_condition(task, SK_DATA_PROTECT, ASC_WRITE_PROTECTED, 0)
        scsi_finish(task)
        return
    if not no_data:
        if c.data_in or c.data_len < bs:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR, 0)
            scsi_finish(task)
            return
        off = 0
        while off < bs and zeros:
            n = bs - off if bs - off < 512 else 512
            iov_to_buf(&task.iov[c.data_first], c.data_count, off, chunk, n)
            for k in range(n):
                if chunk[k]:
                    zeros = False
                    break
            off += n
    if zeros:
        _scsi_submit(vq, task, t, OP_UNMAP if unmap and t.unmap else OP_WRITE_ZEROES,
                     lba * bs, <uint64_t>blocks * bs, 0, 0)
        return
    c.pattern_first = c.data_first
    c.pattern_count = <uint16_t>iov_trim_tail(&task.iov[c.data_first], c.data_count, c.data_len - bs)
    if task.n_iov + c.pattern_count > MAX_IOV:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
        scsi_finish(task)
        return
    c.lba = lba
    c.blocks_left = blocks
    task.io.status = 0
    _scsi_ws_run(task)


cdef void _scsi_unmap(vq_t *vq, task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    """UNMAP: block descriptors {lba be64, count be32} after an 8-byte header; the ranges go to
    the bdev as one request, staged in the task's free iovec slots."""
    cdef scsi_cmd_t *c = &task.scsi
    cdef uint32_t param_len = _be16(cdb + 7)
    cdef uint8_t hdr[8]
    cdef uint8_t desc[16]
    cdef uint32_t desc_bytes, ndesc, i, nranges = 0
    cdef uint64_t lba
    cdef uint32_t blocks
    cdef range_t *ranges = <range_t *>&task.iov[task.n_iov]
    cdef uint32_t room = MAX_IOV - task.n_iov
    if cdb[1] & 0x01:          # ANCHOR
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        scsi_finish(task)
        return
    if param_len == 0:
        scsi_finish(task)
        return
    if param_len < 8 or c.data_in or c.data_len < param_len:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR, 0)
        scsi_finish(task)
        return
    if t.readonly or t.bdev.readonly:
        scsi_check_condition(task, SK_DATA_PROTECT, ASC_WRITE_PROTECTED, 0)
        scsi_finish(task)
        return
    iov_to_buf(&task.iov[c.data_first], c.data_count, 0, hdr, 8)
    desc_bytes = _be16(hdr + 2)
    if desc_bytes > param_len - 8 or desc_bytes % 16:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR, 0)
        scsi_finish(task)
        return
    ndesc = desc_bytes // 16
    if ndesc > SCSI_MAX_UNMAP_DESCRIPTORS or ndesc > room:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
        scsi_finish(task)
        return
    for i in range(ndesc):
        iov_to_buf(&task.iov[c.data_first], c.data_count, 8 + 16 * i, desc, 16)
        lba = _be64(desc)
        blocks = _be32(desc + 8)
        if _lba_range_bad(t, lba, blocks):
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, 0)
            scsi_finish(task)
            return
        if <uint64_t>blocks * t.bdev.block_size > SCSI_MAX_UNMAP_BYTES:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
            scsi_finish(task)
            return
        if blocks:
            ranges[nranges].offset = lba * t.bdev.block_size
            ranges[nranges].length = <uint64_t>blocks * t.bdev.block_size
            nranges += 1
    if nranges == 0:
        scsi_finish(task)
        return
    _scsi_submit(vq, task, t, OP_UNMAP, 0, 0, 0, 0, ranges, nranges)


# ---------------------------------------------------------------------------------------------
# Emulated commands: data-in built in a buffer
# ---------------------------------------------------------------------------------------------
cdef int _inquiry_standard(scsi_target_t *t, uint8_t *buf) noexcept nogil:
    buf[0] = 0x00              # peripheral qualifier 0, direct-access block device
    buf[2] = 0x06              # SPC-4
    buf[3] = 0x12              # HISUP, response data format 2
    buf[4] = 96 - 5
    buf[7] = 0x02              # CMDQUE
    memcpy(buf + 8, b"VHOSTD  ", 8)
    memcpy(buf + 16, t.product, 16)
    memcpy(buf + 32, b"0001", 4)
    _put_be16(buf + 58, 0x00A0)     # SAM-5
    _put_be16(buf + 60, 0x0460)     # SPC-4
    _put_be16(buf + 62, 0x04C0)     # SBC-3
    return 96


cdef int _hex_digits(const uint8_t *src, int n, uint8_t *dst) noexcept nogil:
    cdef const char *digits = b"0123456789abcdef"
    cdef int i
    for i in range(n):
        dst[2 * i] = digits[src[i] >> 4]
        dst[2 * i + 1] = digits[src[i] & 15]
    return 2 * n


cdef int _inquiry_vpd(task_t *task, scsi_target_t *t, uint8_t page, uint8_t *buf) noexcept nogil:
    """A VPD page into buf: its length, or -1 for a page we do not have."""
    cdef int n, i, off
    cdef uint32_t bs = t.bdev.block_size
    buf[1] = page
    if page == 0x00:           # supported pages
        buf[4] = 0x00
        buf[5] = 0x80
        buf[6] = 0x83
        buf[7] = 0xB0
        buf[8] = 0xB1
        buf[9] = 0xB2
        n = 6
    elif page == 0x80:         # unit serial number
        n = <int>strnlen(t.serial, SCSI_SERIAL_LEN)
        memcpy(buf + 4, t.serial, n)
    elif page == 0x83:         # device identification
        off = 4
        # NAA, locally assigned (3): 60 bits of the uuid
        buf[off] = 0x01        # protocol 0, code set binary
        buf[off + 1] = 0x03    # LU association, designator type NAA
        buf[off + 3] = 8
        memcpy(buf + off + 4, t.uuid, 8)
        buf[off + 4] = 0x30 | (t.uuid[0] & 0x0F)
        off += 12
        # T10 vendor identification: vendor + uuid in hex
        buf[off] = 0x02        # code set ASCII
        buf[off + 1] = 0x01    # LU association, designator type T10 vendor id
        buf[off + 3] = 8 + 32
        memcpy(buf + off + 4, b"VHOSTD  ", 8)
        _hex_digits(t.uuid, 16, buf + off + 12)
        off += 4 + 40
        n = off - 4
    elif page == 0xB0:         # block limits
        n = 0x3C
        buf[4] = 0x01          # WSNZ: WRITE SAME of 0 blocks is not supported
        _put_be16(buf + 6, 1)                                   # optimal transfer granularity
        _put_be32(buf + 8, SCSI_MAX_XFER_BYTES // bs)           # maximum transfer length
        _put_be32(buf + 12, SCSI_MAX_XFER_BYTES // bs)          # optimal transfer length
        _put_be32(buf + 20, SCSI_MAX_UNMAP_BYTES // bs if t.unmap else 0)
        _put_be32(buf + 24, SCSI_MAX_UNMAP_DESCRIPTORS if t.unmap else 0)
        _put_be32(buf + 28, 1)                                  # optimal unmap granularity
        _put_be64(buf + 36, SCSI_MAX_UNMAP_BYTES // bs)         # maximum WRITE SAME length
    elif page == 0xB1:         # block device characteristics
        n = 0x3C
        _put_be16(buf + 4, 1)  # non-rotating medium
    elif page == 0xB2:         # logical block provisioning
        n = 4
        if t.unmap:
            buf[5] = 0x80 | 0x40 | 0x20 | 0x04     # LBPU, LBPWS, LBPWS10, LBPRZ = 1
            buf[6] = 0x02                          # thin provisioned
    else:
        return -1
    _put_be16(buf + 2, <uint32_t>n)
    return n + 4


cdef void _scsi_inquiry(task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    cdef uint8_t buf[SCSI_EMU_BUF]
    cdef int n
    memset(buf, 0, SCSI_EMU_BUF)
    if cdb[1] & 0x02 or (not (cdb[1] & 0x01) and cdb[2] != 0):
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        return
    if cdb[1] & 0x01:
        n = _inquiry_vpd(task, t, cdb[2], buf)
        if n < 0:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
            return
    else:
        n = _inquiry_standard(t, buf)
    _scsi_data_in(task, buf, n, _be16(cdb + 3))


cdef void _scsi_read_capacity_10(task_t *task, scsi_target_t *t) noexcept nogil:
    cdef uint8_t buf[8]
    cdef uint64_t last = t.bdev.num_blocks - 1
    _put_be32(buf, <uint32_t>(last if last < <uint64_t>0xFFFFFFFF else <uint64_t>0xFFFFFFFF))
    _put_be32(buf + 4, t.bdev.block_size)
    _scsi_data_in(task, buf, 8, 8)


cdef void _scsi_read_capacity_16(task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    cdef uint8_t buf[32]
    memset(buf, 0, 32)
    _put_be64(buf, t.bdev.num_blocks - 1)
    _put_be32(buf + 8, t.bdev.block_size)
    if t.unmap:
        buf[14] = 0x80 | 0x40  # LBPME, LBPRZ
    _scsi_data_in(task, buf, 32, _be32(cdb + 10))


cdef int _mode_page(scsi_target_t *t, uint8_t page, uint8_t pc, uint8_t *p) noexcept nogil:
    """One mode page (current or default values; PC=1 changeable: all zeros).  Its length, or
    -1 if we have no such page."""
    if page == 0x08:           # caching
        p[0] = 0x08
        p[1] = 0x12
        if pc != 1:
            p[2] = 0x04        # WCE: a write cache that SYNCHRONIZE CACHE flushes
        return 20
    if page == 0x0A:           # control
        p[0] = 0x0A
        p[1] = 0x0A
        return 12
    if page == 0x1C:           # informational exceptions control
        p[0] = 0x1C
        p[1] = 0x0A
        return 12
    return -1


cdef void _scsi_mode_sense(task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    cdef uint8_t buf[SCSI_EMU_BUF]
    cdef bint six = cdb[0] == OPC_MODE_SENSE_6
    cdef bint dbd = cdb[1] & 0x08
    cdef bint llba = not six and (cdb[1] & 0x10)
    cdef uint8_t pc = cdb[2] >> 6
    cdef uint8_t page = cdb[2] & 0x3F
    cdef uint8_t subpage = cdb[3]
    cdef int hdr = 4 if six else 8
    cdef int bdlen = 0 if dbd else (16 if llba else 8)
    cdef int off, n
    cdef uint64_t nblocks = t.bdev.num_blocks
    memset(buf, 0, SCSI_EMU_BUF)
    if pc == 3:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_SAVING_PARAMETERS_NOT_SUPPORTED, 0)
        return
    off = hdr + bdlen
    if page == 0x3F and (subpage == 0 or subpage == 0xFF):
        off += _mode_page(t, 0x08, pc, buf + off)
        off += _mode_page(t, 0x0A, pc, buf + off)
        off += _mode_page(t, 0x1C, pc, buf + off)
    else:
        n = _mode_page(t, page, pc, buf + off) if subpage == 0 else -1
        if n < 0:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
            return
        off += n
    if bdlen == 8:
        _put_be32(buf + hdr, <uint32_t>(nblocks if nblocks < <uint64_t>0xFFFFFFFF else <uint64_t>0xFFFFFFFF))
        _put_be32(buf + hdr + 4, t.bdev.block_size & 0xFFFFFF)
    elif bdlen == 16:
        _put_be64(buf + hdr, nblocks)
        _put_be32(buf + hdr + 12, t.bdev.block_size)
    if six:
        buf[0] = <uint8_t>(off - 1)
        buf[2] = 0x80 if (t.readonly or t.bdev.readonly) else 0x00
        buf[3] = <uint8_t>bdlen
        _scsi_data_in(task, buf, off, cdb[4])
    else:
        _put_be16(buf, <uint32_t>(off - 2))
        buf[3] = 0x80 if (t.readonly or t.bdev.readonly) else 0x00
        buf[4] = 0x01 if llba else 0x00
        _put_be16(buf + 6, <uint32_t>bdlen)
        _scsi_data_in(task, buf, off, _be16(cdb + 7))


cdef void _scsi_mode_select(task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    """MODE SELECT (6, 10): accept parameters equal to what we have (the caching page with WCE
    set, control and informational-exceptions pages as they come); refuse changes we cannot
    make (write-through, another block size) and saving."""
    cdef scsi_cmd_t *c = &task.scsi
    cdef uint8_t buf[SCSI_EMU_BUF]
    cdef bint six = cdb[0] == OPC_MODE_SELECT_6
    cdef uint32_t param_len = cdb[4] if six else _be16(cdb + 7)
    cdef uint32_t hdr = 4 if six else 8
    cdef uint32_t bdlen, off, plen
    cdef uint8_t code
    if not (cdb[1] & 0x10):    # PF=0: vendor-specific format
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        return
    if param_len == 0:
        return
    if c.data_in or c.data_len < param_len or param_len > SCSI_EMU_BUF or param_len < hdr:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR, 0)
        return
    iov_to_buf(&task.iov[c.data_first], c.data_count, 0, buf, param_len)
    bdlen = buf[3] if six else _be16(buf + 6)
    if bdlen != 0 and bdlen != 8:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
        return
    if hdr + bdlen > param_len:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR, 0)
        return
    if bdlen == 8 and _be24(buf + hdr + 5) != 0 and _be24(buf + hdr + 5) != t.bdev.block_size:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
        return
    off = hdr + bdlen
    while off < param_len:
        code = buf[off] & 0x3F
        if buf[off] & 0x40:    # SPF: subpage format (none of our pages has subpages)
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
            return
        if off + 2 > param_len:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR, 0)
            return
        plen = buf[off + 1] + 2
        if off + plen > param_len:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR, 0)
            return
        if code == 0x08:
            if plen < 3 or not (buf[off + 2] & 0x04) or (buf[off + 2] & 0x01):
                scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
                return
        elif code != 0x0A and code != 0x1C:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, 0)
            return
        off += plen
    if cdb[1] & 0x01:          # SP: save pages
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_SAVING_PARAMETERS_NOT_SUPPORTED, 0)


cdef void _scsi_report_luns(task_t *task, const uint8_t *cdb) noexcept nogil:
    cdef uint8_t buf[16]
    cdef uint32_t alloc = _be32(cdb + 6)
    if cdb[2] > 2 or alloc < 16:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        return
    memset(buf, 0, 16)
    _put_be32(buf, 8)          # one LUN: 0
    _scsi_data_in(task, buf, 16, alloc)


cdef void _scsi_request_sense(task_t *task, const uint8_t *cdb) noexcept nogil:
    cdef uint8_t buf[FIXED_SENSE_BYTES]
    if cdb[1] & 0x01:          # DESC: descriptor format is not supported
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        return
    scsi_build_fixed_sense(buf, SK_NO_SENSE, ASC_NONE, 0)
    _scsi_data_in(task, buf, FIXED_SENSE_BYTES, cdb[4])


cdef void _scsi_persistent_reserve_in(task_t *task, const uint8_t *cdb) noexcept nogil:
    """No reservation support: no keys, no reservation, no capabilities."""
    cdef uint8_t buf[8]
    cdef uint8_t action = cdb[1] & 0x1F
    memset(buf, 0, 8)
    if action == 0x02:         # REPORT CAPABILITIES
        _put_be16(buf, 8)
    elif action > 0x03:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
        return
    _scsi_data_in(task, buf, 8, _be16(cdb + 7))


cdef bint _scsi_unit_attention(task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    """Report a pending unit attention instead of running the command, once (SAM-5 §5.14: the
    one initiator of a virtio-scsi device is its only I_T nexus).  INQUIRY and REPORT LUNS run and
    leave it pending; REQUEST SENSE returns it as its data.  True if the command was answered."""
    cdef uint8_t opcode = cdb[0]
    cdef uint8_t buf[FIXED_SENSE_BYTES]
    cdef uint32_t code
    if opcode == OPC_INQUIRY or opcode == OPC_REPORT_LUNS or \
            (opcode == OPC_REQUEST_SENSE and cdb[1] & 0x01):
        return False
    if vhd_load_u32_sc(&t.unit_attention) == 0:
        return False
    code = vhd_exchange_u32_sc(&t.unit_attention, 0)
    if code == 0:
        return False           # another queue's command reported it meanwhile
    if opcode == OPC_REQUEST_SENSE:
        scsi_build_fixed_sense(buf, SK_UNIT_ATTENTION, <uint8_t>(code >> 8), <uint8_t>code)
        _scsi_data_in(task, buf, FIXED_SENSE_BYTES, cdb[4])
    else:
        scsi_check_condition(task, SK_UNIT_ATTENTION, <uint8_t>(code >> 8), <uint8_t>code)
    scsi_finish(task)
    return True


cdef void scsi_execute(vq_t *vq, task_t *task, scsi_target_t *t, const uint8_t *cdb) noexcept nogil:
    """Run one CDB on LUN 0 of a target: the table from opcode to handler."""
    cdef uint8_t opcode = cdb[0]
    if _scsi_unit_attention(task, t, cdb):
        return
    if opcode == OPC_READ_10 or opcode == OPC_WRITE_10 or opcode == OPC_READ_16 \
            or opcode == OPC_WRITE_16 or opcode == OPC_READ_6 or opcode == OPC_WRITE_6 \
            or opcode == OPC_READ_12 or opcode == OPC_WRITE_12:
        _scsi_read_write(vq, task, t, cdb)
        return
    if opcode == OPC_SYNCHRONIZE_CACHE_10 or opcode == OPC_SYNCHRONIZE_CACHE_16:
        _scsi_synchronize_cache(vq, task, t, cdb)
        return
    if opcode == OPC_WRITE_SAME_10 or opcode == OPC_WRITE_SAME_16:
        _scsi_write_same(vq, task, t, cdb)
        return
    if opcode == OPC_UNMAP:
        _scsi_unmap(vq, task, t, cdb)
        return
    if opcode == OPC_TEST_UNIT_READY or opcode == OPC_START_STOP_UNIT:
        pass
    elif opcode == OPC_INQUIRY:
        _scsi_inquiry(task, t, cdb)
    elif opcode == OPC_READ_CAPACITY_10:
        _scsi_read_capacity_10(task, t)
    elif opcode == OPC_SERVICE_ACTION_IN_16:
        if cdb[1] & 0x1F == SAI_READ_CAPACITY_16:
            _scsi_read_capacity_16(task, t, cdb)
        else:
            scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, 0)
    elif opcode == OPC_MODE_SENSE_6 or opcode == OPC_MODE_SENSE_10:
        _scsi_mode_sense(task, t, cdb)
    elif opcode == OPC_MODE_SELECT_6 or opcode == OPC_MODE_SELECT_10:
        _scsi_mode_select(task, t, cdb)
    elif opcode == OPC_VERIFY_10 or opcode == OPC_VERIFY_16:
        _scsi_verify(task, t, cdb)
    elif opcode == OPC_REPORT_LUNS:
        _scsi_report_luns(task, cdb)
    elif opcode == OPC_REQUEST_SENSE:
        _scsi_request_sense(task, cdb)
    elif opcode == OPC_PERSISTENT_RESERVE_IN:
        _scsi_persistent_reserve_in(task, cdb)
    else:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_INVALID_OPCODE, 0)
    scsi_finish(task)


cdef void _scsi_missing_lun(task_t *task, const uint8_t *cdb) noexcept nogil:
    """A LUN other than 0 of an existing target: INQUIRY says no device there, REPORT LUNS
    works, everything else is LOGICAL UNIT NOT SUPPORTED."""
    cdef uint8_t buf[36]
    if cdb[0] == OPC_INQUIRY and not (cdb[1] & 0x03) and cdb[2] == 0:
        memset(buf, 0, 36)
        buf[0] = 0x7F          # peripheral qualifier 3, device type 0x1F: no LUN here
        buf[2] = 0x06
        buf[3] = 0x12
        buf[4] = 36 - 5
        _scsi_data_in(task, buf, 36, _be16(cdb + 3))
    elif cdb[0] == OPC_REPORT_LUNS:
        _scsi_report_luns(task, cdb)
    else:
        scsi_check_condition(task, SK_ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED, 0)
    scsi_finish(task)


# ---------------------------------------------------------------------------------------------
# Request queues
# ---------------------------------------------------------------------------------------------
cdef bint _scsi_save_response_area(task_t *task, size_t nbytes) noexcept nogil:
    """Save the iovecs of the first nbytes of the device-writable part in task.scratch."""
    cdef iovec *out = <iovec *>task.scratch
    cdef size_t need = nbytes
    cdef int i = task.n_readable
    cdef int n = 0
    while need > 0:
        if i >= task.n_iov or n >= VS_RESP_MAX_IOV or task.iov[i].iov_base == NULL:
            return False
        out[n].iov_base = task.iov[i].iov_base
        out[n].iov_len = task.iov[i].iov_len if task.iov[i].iov_len < need else need
        need -= out[n].iov_len
        n += 1
        i += 1
    task.scsi.resp_niov = <uint8_t>n
    return True


cdef void scsi_request_handle(vq_t *vq, task_t *task) noexcept nogil:
    """A command on a request queue (the queue handler of queues 2…)."""
    cdef scsi_dev_t *dev = <scsi_dev_t *>vq.device
    cdef scsi_cmd_t *c = &task.scsi
    cdef uint8_t req[VS_CMD_REQ_BYTES]
    cdef size_t readable, writable
    cdef int first
    cdef scsi_target_t *t
    cdef uint8_t target
    task.io.op = 0
    task.io.length = 0
    c.target = NO_TARGET
    c.status = ST_GOOD
    c.response = VS_OK
    c.data_len = c.data_done = 0
    c.data_first = c.data_count = 0
    c.data_in = 0
    c.in_submit = 0
    if not _scsi_save_response_area(task, VS_CMD_RESP_BYTES):
        task.used_len = 0      # nowhere to say anything: an unusable request
        task_complete(task, True)
        return
    readable = iov_total(task.iov, task.n_readable)
    writable = iov_total(&task.iov[task.n_readable], task.n_iov - task.n_readable)
    if task.bad or readable < VS_CMD_REQ_BYTES:
        c.response = VS_FAILURE
        scsi_finish(task)
        return
    iov_to_buf(task.iov, task.n_readable, 0, req, VS_CMD_REQ_BYTES)
    if readable > VS_CMD_REQ_BYTES and writable > VS_CMD_RESP_BYTES:
        c.response = VS_FAILURE            # bidirectional commands need VIRTIO_SCSI_F_INOUT
        scsi_finish(task)
        return
    if writable > VS_CMD_RESP_BYTES:
        first = task.n_readable + iov_skip_head(&task.iov[task.n_readable], task.n_iov - task.n_readable,
                                                VS_CMD_RESP_BYTES)
        c.data_first = <uint16_t>first
        c.data_count = <uint16_t>(task.n_iov - first)
        c.data_len = <uint32_t>(writable - VS_CMD_RESP_BYTES)
        c.data_in = 1
    elif readable > VS_CMD_REQ_BYTES:
        first = iov_skip_head(task.iov, task.n_readable, VS_CMD_REQ_BYTES)
        c.data_first = <uint16_t>first
        c.data_count = <uint16_t>(task.n_readable - first)
        c.data_len = <uint32_t>(readable - VS_CMD_REQ_BYTES)
    target = req[1]
    if req[0] != 1 or target >= MAX_SCSI_TARGETS:
        c.response = VS_BAD_TARGET
        scsi_finish(task)
        return
    t = &dev.targets[target]
    # Count ourselves in flight before looking at the target: a removal that marks it REMOVING
    # and then sees no command in flight knows none will reach its bdev.
    vhd_add_u32_sc(&t.inflight, 1)
    c.target = target
    if vhd_load_u32_sc(&t.state) != SCSI_TARGET_ACTIVE:
        c.response = VS_BAD_TARGET
        scsi_finish(task)
        return
    if ((<uint32_t>req[2] << 8 | req[3]) & 0x3FFF) != 0 or req[4] or req[5] or req[6] or req[7]:
        _scsi_missing_lun(task, req + VS_CDB_OFFSET)
        return
    scsi_execute(vq, task, t, req + VS_CDB_OFFSET)


# ---------------------------------------------------------------------------------------------
# Control queue: task management (answered once the LUN has nothing in flight) and
# asynchronous-notification queries (no events supported)
# ---------------------------------------------------------------------------------------------
cdef bint _scsi_idle(scsi_dev_t *dev, uint32_t target) noexcept nogil:
    cdef int i
    if target != NO_TARGET:
        return vhd_load_u32_sc(&dev.targets[target].inflight) == 0
    for i in range(MAX_SCSI_TARGETS):
        if vhd_load_u32_sc(&dev.targets[i].inflight) != 0:
            return False
    return True


cdef void _scsi_ctrl_reply(task_t *task, const uint8_t *resp, uint32_t length) noexcept nogil:
    cdef iovec *w = &task.iov[task.n_readable]
    cdef int nw = task.n_iov - task.n_readable
    if iov_total(w, nw) < length:
        task.used_len = 0
        task_complete(task, True)
        return
    buf_to_iov(w, nw, 0, resp, length)
    task.used_len = length
    task_complete(task, False)


cdef void _scsi_tmf_reply(task_t *task, uint8_t response) noexcept nogil:
    _scsi_ctrl_reply(task, &response, 1)


cdef void scsi_ctrl_handle(vq_t *vq, task_t *task) noexcept nogil:
    """A control-queue request (queue 0)."""
    cdef scsi_dev_t *dev = <scsi_dev_t *>vq.device
    cdef uint8_t req[VS_TMF_REQ_BYTES]
    cdef uint8_t an_resp[VS_AN_RESP_BYTES]
    cdef size_t readable = iov_total(task.iov, task.n_readable)
    cdef uint32_t kind, subtype, wait_target
    cdef const uint8_t *lun
    task.io.op = 0
    task.io.length = 0
    if task.bad or readable < 4:
        task.used_len = 0
        task_complete(task, True)
        return
    iov_to_buf(task.iov, task.n_readable, 0, req, readable if readable < VS_TMF_REQ_BYTES else VS_TMF_REQ_BYTES)
    kind = _le32(req)
    if kind == VS_T_TMF:
        if readable < VS_TMF_REQ_BYTES:
            task.used_len = 0
            task_complete(task, True)
            return
        subtype = _le32(req + 4)
        lun = req + 8
        if lun[0] != 1 or lun[1] >= MAX_SCSI_TARGETS or \
                vhd_load_u32_sc(&dev.targets[lun[1]].state) != SCSI_TARGET_ACTIVE:
            _scsi_tmf_reply(task, VS_BAD_TARGET)
            return
        if subtype == TMF_CLEAR_ACA or subtype > TMF_QUERY_TASK_SET:
            _scsi_tmf_reply(task, VS_FUNCTION_REJECTED)      # no ACA; unknown function
            return
        if ((<uint32_t>lun[2] << 8 | lun[3]) & 0x3FFF) != 0:
            _scsi_tmf_reply(task, VS_INCORRECT_LUN)
            return
        # Aborts, resets and queries all come down to: the affected commands complete (they
        # cannot be recalled from the bdev), then the function is complete and no task with
        # that tag exists any more.
        wait_target = NO_TARGET if subtype == TMF_I_T_NEXUS_RESET else lun[1]
        if _scsi_idle(dev, wait_target):
            _scsi_tmf_reply(task, VS_OK)
        elif dev.nparked < SCSI_MAX_PARKED:
            task.scsi.lba = wait_target
            dev.parked[dev.nparked] = task
            dev.nparked += 1
        else:
            _scsi_tmf_reply(task, VS_BUSY)
    elif kind == VS_T_AN_QUERY or kind == VS_T_AN_SUBSCRIBE:
        memset(an_resp, 0, VS_AN_RESP_BYTES)
        if readable < VS_AN_REQ_BYTES:
            task.used_len = 0
            task_complete(task, True)
            return
        lun = req + 4
        if lun[0] != 1 or lun[1] >= MAX_SCSI_TARGETS or \
                vhd_load_u32_sc(&dev.targets[lun[1]].state) != SCSI_TARGET_ACTIVE:
            an_resp[4] = VS_BAD_TARGET
        else:
            an_resp[4] = VS_OK                 # event_actual 0: no notification class supported
        _scsi_ctrl_reply(task, an_resp, VS_AN_RESP_BYTES)
    else:
        task.used_len = 0
        task_complete(task, True)


cdef int _scsi_ctrl_service(vq_t *vq, bint check_only) noexcept nogil:
    """Answer parked task-management requests whose LUN went idle."""
    cdef scsi_dev_t *dev = <scsi_dev_t *>vq.device
    cdef uint32_t i = 0
    cdef int done = 0
    cdef task_t *task
    if check_only:
        return dev.nparked > 0
    while i < dev.nparked:
        task = dev.parked[i]
        if _scsi_idle(dev, <uint32_t>task.scsi.lba):
            dev.nparked -= 1
            dev.parked[i] = dev.parked[dev.nparked]
            _scsi_tmf_reply(task, VS_OK)
            done += 1
        else:
            i += 1
    return done


# ---------------------------------------------------------------------------------------------
# Event queue: buffers are taken only when an event is waiting for one
# ---------------------------------------------------------------------------------------------
cdef int _scsi_event_service(vq_t *vq, bint check_only) noexcept nogil:
    cdef scsi_dev_t *dev = <scsi_dev_t *>vq.device
    cdef scsi_event_t *ev
    cdef task_t *task
    cdef uint8_t raw[VS_EVENT_BYTES]
    cdef int rc, done = 0
    if dev.events_count == 0 or vq.broken or vq.stopping:
        return 0
    if check_only:
        return vq_buffer_available(vq)
    while dev.events_count > 0:
        rc = vq_pop(vq, &task)
        if rc == 0:
            break
        if rc < 0:
            vq_mark_broken(vq)
            break
        task.io.op = 0
        task.io.length = 0
        if task.bad or task.n_readable != 0 or iov_total(task.iov, task.n_iov) < VS_EVENT_BYTES:
            task.used_len = 0                  # unusable buffer: the event waits for the next
            task_complete(task, True)
            done += 1
            continue
        ev = &dev.events[dev.events_head]
        _put_le32(raw, ev.event | (<uint32_t>0x80000000 if dev.events_missed else <uint32_t>0))
        memcpy(raw + 4, ev.lun, 8)
        _put_le32(raw + 12, ev.reason)
        buf_to_iov(task.iov, task.n_iov, 0, raw, VS_EVENT_BYTES)
        task.used_len = VS_EVENT_BYTES
        dev.events_missed = 0
        dev.events_head = (dev.events_head + 1) % SCSI_MAX_EVENTS
        dev.events_count -= 1
        task_complete(task, False)
        done += 1
    return done


cdef struct scsi_event_msg_t:
    scsi_dev_t *dev
    scsi_event_t event


cdef int _scsi_queue_event(void *arg) noexcept nogil:
    """On the event queue's reactor: keep an event for the next event buffer, or note that one
    was missed when too many are waiting."""
    cdef scsi_event_msg_t *m = <scsi_event_msg_t *>arg
    cdef scsi_dev_t *dev = m.dev
    if dev.events_count >= SCSI_MAX_EVENTS:
        dev.events_missed = 1
        return -ENOSPC
    dev.events[(dev.events_head + dev.events_count) % SCSI_MAX_EVENTS] = m.event
    dev.events_count += 1
    return 0


# ---------------------------------------------------------------------------------------------
# Python face
# ---------------------------------------------------------------------------------------------
cdef class ScsiEventMessage:
    """The argument of an event posted to a reactor (alive until the reactor is done)."""
    cdef scsi_event_msg_t msg
    cdef object device


cdef class ScsiDevice:
    """A virtio-scsi device's data-plane state: its targets (a bdev as LUN 0 each), the events
    waiting for the driver, and the queues it serves."""
    cdef scsi_dev_t *dev
    cdef list disks                # Disk of each target, or None
    cdef list queues               # attached VirtQueues

    def __cinit__(self):
        self.dev = <scsi_dev_t *>calloc(1, sizeof(scsi_dev_t))
        if self.dev == NULL:
            raise MemoryError()
        self.disks = [None] * MAX_SCSI_TARGETS
        self.queues = []

    def set_target(self, int index, Disk disk, bytes serial, bytes product, bytes uuid,
                   bint readonly=False):
        """Make disk LUN 0 of target index (which must be empty)."""
        cdef scsi_target_t *t
        cdef VirtQueue q
        if not 0 <= index < MAX_SCSI_TARGETS:
            raise ValueError("target %d out of range" % index)
        t = &self.dev.targets[index]
        if vhd_load_u32_sc(&t.state) != SCSI_TARGET_EMPTY:
            raise ValueError("target %d is in use" % index)
        if len(uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        t.bdev = disk.bdev
        t.readonly = readonly
        t.unmap = 1
        t.inflight = 0
        t.unit_attention = 0
        memset(t.serial, 0, SCSI_SERIAL_LEN)
        memcpy(t.serial, <char *>serial, min(len(serial), SCSI_SERIAL_LEN))
        memset(t.product, 0x20, 16)
        memcpy(t.product, <char *>product, min(len(product), 16))
        memcpy(t.uuid, <char *>uuid, 16)
        self.disks[index] = disk
        for q in self.queues:
            if q.vq.index >= 2:
                disk.attach_channel(&q.vq.target_stats[index], q)
        vhd_store_u32_sc(&t.state, SCSI_TARGET_ACTIVE)

    def begin_remove(self, int index):
        """No new command reaches target index from now on (they get BAD_TARGET)."""
        vhd_store_u32_sc(&self.dev.targets[index].state, SCSI_TARGET_REMOVING)

    def target_inflight(self, int index):
        """Commands of target index still in flight (a removal waits for 0)."""
        return vhd_load_u32_sc(&self.dev.targets[index].inflight)

    def finish_remove(self, int index):
        """Forget target index (after begin_remove and once nothing is in flight)."""
        cdef scsi_target_t *t = &self.dev.targets[index]
        cdef VirtQueue q
        if vhd_load_u32_sc(&t.state) == SCSI_TARGET_ACTIVE or vhd_load_u32_sc(&t.inflight):
            raise ValueError("target %d is still in use" % index)
        disk = self.disks[index]
        if disk is not None:
            for q in self.queues:
                if q.vq.index >= 2:
                    (<Disk>disk).detach_channel(&q.vq.target_stats[index])
                    memset(&q.vq.target_stats[index], 0, sizeof(io_stats_t))
        self.disks[index] = None
        t.bdev = NULL
        vhd_store_u32_sc(&t.state, SCSI_TARGET_EMPTY)

    def report_capacity_changed(self, int index):
        """The disk of target index changed size: its next command (other than INQUIRY and REPORT
        LUNS) gets UNIT ATTENTION, CAPACITY DATA HAS CHANGED."""
        if not 0 <= index < MAX_SCSI_TARGETS:
            raise ValueError("target %d out of range" % index)
        vhd_store_u32_sc(&self.dev.targets[index].unit_attention,
                         ASC_PARAMETERS_CHANGED << 8 | ASCQ_CAPACITY_DATA_CHANGED)

    def target_state(self, int index):
        return ("empty", "active", "removing")[vhd_load_u32_sc(&self.dev.targets[index].state)]

    def set_events_enabled(self, bint enabled):
        """Whether the driver takes hot-plug events (it acked VIRTIO_SCSI_F_HOTPLUG).  Set while
        the event queue is not polled."""
        self.dev.events_enabled = enabled
        if not enabled:
            self.dev.events_count = 0
            self.dev.events_missed = 0

    @property
    def events_enabled(self):
        return bool(self.dev.events_enabled)

    def post_event(self, Reactor reactor, uint32_t event, uint32_t reason, int target):
        """Queue an event for the driver on the reactor polling the event queue.  Returns the
        mailbox message (its result is -ENOSPC when the event was dropped as missed)."""
        cdef ScsiEventMessage m = ScsiEventMessage()
        m.device = self
        m.msg.dev = self.dev
        m.msg.event.event = event
        m.msg.event.reason = reason
        memset(m.msg.event.lun, 0, 8)
        m.msg.event.lun[0] = 1
        m.msg.event.lun[1] = <uint8_t>target
        # LUN 0 in REPORT LUNS encoding (no 0x40 flat-space bit): Linux adds the device at
        # (lun[2] << 8 | lun[3]), so a flat-space 0x4000 would be past its max_lun.
        return reactor._post(MB_CALL, NULL, -1, m, -1, _scsi_queue_event, &m.msg)

    def attach(self, VirtQueue queue):
        """Make this device the handler of queue (0 control, 1 event, 2… requests)."""
        cdef int i
        queue.vq.device = self.dev
        queue.vq.service = NULL
        queue.vq.hold_buffers = 0
        if queue.vq.index == 0:
            queue.vq.handler = scsi_ctrl_handle
            queue.vq.service = _scsi_ctrl_service
        elif queue.vq.index == 1:
            queue.vq.handler = scsi_request_handle      # never called: buffers are held
            queue.vq.service = _scsi_event_service
            queue.vq.hold_buffers = 1
        else:
            queue.vq.handler = scsi_request_handle
            for i in range(MAX_SCSI_TARGETS):
                memset(&queue.vq.target_stats[i], 0, sizeof(io_stats_t))
                if self.disks[i] is not None:
                    (<Disk>self.disks[i]).attach_channel(&queue.vq.target_stats[i], queue)
        queue.device = self
        self.queues.append(queue)

    def detach(self, VirtQueue queue):
        """Stop accounting queue's I/O (the queue is no longer polled)."""
        cdef int i
        if queue.vq.index >= 2:
            for i in range(MAX_SCSI_TARGETS):
                if self.disks[i] is not None:
                    (<Disk>self.disks[i]).detach_channel(&queue.vq.target_stats[i])
                memset(&queue.vq.target_stats[i], 0, sizeof(io_stats_t))
        if queue in self.queues:
            self.queues.remove(queue)
        queue.vq.device = NULL
        queue.vq.handler = NULL
        queue.vq.service = NULL
        queue.vq.hold_buffers = 0
        queue.device = None

    def __dealloc__(self):
        free(self.dev)
