# Declarations of the vhostd data plane, cimported by _dataplane.pyx: every struct the per-I/O path
# touches.  The code lives in the .pxi parts that _dataplane.pyx includes.  Nothing declared here
# holds a Python object.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stddef cimport size_t
from posix.types cimport off_t


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass


cdef extern from "<liburing.h>" nogil:
    struct io_uring:
        pass
    struct io_uring_sqe:
        pass
    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------
cdef enum:
    MAX_MEM_REGIONS = 32        # GET_MAX_MEM_SLOTS answer; QEMU sends ≤ 8 without mem-slots
    MAX_IOV = 130               # segments per request: seg_max (128) + header + status
    MAX_QUEUE_SIZE = 1024       # largest virtqueue accepted (QEMU's own limit)
    MAX_REACTOR_QUEUES = 1024   # virtqueues one reactor polls
    MAX_SCSI_TARGETS = 8
    LAT_BUCKETS = 40            # latency histogram: bucket b holds [2^b, 2^(b+1)) ticks
    MAILBOX_SIZE = 256
    MAX_CTX_VQUEUES = 16        # virtio-bdev queues one I/O engine may drive


# ---------------------------------------------------------------------------------------------
# Guest memory: the regions a front-end shared with us, and bounds-checked translation
# ---------------------------------------------------------------------------------------------
cdef struct mem_region_t:
    uint64_t gpa            # guest physical address of the first byte
    uint64_t size           # bytes
    uint64_t uaddr          # front-end (QEMU) virtual address of the first byte
    uint8_t *hva            # our mapping of the first byte

cdef struct guest_mem_t:
    uint32_t nregions
    mem_region_t regions[MAX_MEM_REGIONS]


# ---------------------------------------------------------------------------------------------
# Block devices: one struct for every kind, one request type, one submit entry point
# ---------------------------------------------------------------------------------------------
cdef enum bdev_kind_t:
    BDEV_MALLOC = 1
    BDEV_NULL = 2
    BDEV_FILE = 3
    BDEV_VIRTIO = 4          # another vhost-user target, through our own front-end
    BDEV_RBD = 5             # a Ceph RBD image through librbd (loaded at run time, rbd.pxi)

cdef enum bdev_op_t:
    OP_READ = 1
    OP_WRITE = 2
    OP_FLUSH = 3
    OP_UNMAP = 4
    OP_WRITE_ZEROES = 5

cdef struct io_stats_t:
    # One channel's counters (single writer: the thread that owns the channel).  Names follow
    # SPDK's bdev_get_iostat keys.
    uint64_t bytes_read
    uint64_t num_read_ops
    uint64_t bytes_written
    uint64_t num_write_ops
    uint64_t bytes_unmapped
    uint64_t num_unmap_ops
    uint64_t num_flush_ops
    uint64_t read_latency_ticks
    uint64_t max_read_latency_ticks
    uint64_t min_read_latency_ticks
    uint64_t write_latency_ticks
    uint64_t max_write_latency_ticks
    uint64_t min_write_latency_ticks
    uint64_t unmap_latency_ticks
    uint64_t max_unmap_latency_ticks
    uint64_t min_unmap_latency_ticks
    uint64_t failed
    uint64_t qos_queued

cdef struct qos_t:
    # Token buckets, refilled per reactor pass; 0 = unlimited.  Shared by every channel of the
    # bdev: tokens are taken with atomic operations.
    uint64_t ios_per_sec
    uint64_t bytes_per_sec
    uint64_t read_bytes_per_sec
    uint64_t write_bytes_per_sec
    int64_t ios_tokens
    int64_t bytes_tokens
    int64_t read_bytes_tokens
    int64_t write_bytes_tokens
    uint64_t last_refill_tick
    uint32_t enabled

cdef struct vdrv_queue_t
cdef struct io_ctx_t

cdef struct virtio_bdev_t:
    # A bdev served by another vhost-user target.  Each driver queue is used by one thread at a
    # time: an I/O engine claims a free queue the first time it submits (owners[i]) and polls it
    # from then on; on detach every engine lets go (closing) before the queues are freed.
    uint32_t nqueues
    uint32_t closing
    vdrv_queue_t **queues
    io_ctx_t **owners

cdef struct bdev_t:
    uint32_t kind
    uint32_t block_size
    uint64_t num_blocks
    uint32_t readonly
    uint32_t removed         # set by the control plane on hot-remove; new I/O fails (ENODEV)
    uint8_t *data            # malloc: the disk's bytes
    size_t data_len
    int fd                   # file: buffered descriptor
    int fd_direct            # file: O_DIRECT descriptor, or -1
    uint32_t direct_align    # file: alignment O_DIRECT needs for offsets, lengths and buffers
    qos_t qos
    virtio_bdev_t *virtio    # virtio kind: the front-end queues
    void *rbd_image          # rbd kind: the open rbd_image_t (shared by every engine)

cdef struct bdev_io_t
ctypedef void (*bdev_io_cb_t)(bdev_io_t *io) noexcept nogil

cdef struct range_t:
    uint64_t offset          # bytes
    uint64_t length          # bytes

cdef struct bdev_io_t:
    bdev_t *bdev
    uint32_t op
    int32_t status           # 0 or -errno, set before cb runs
    uint64_t offset          # bytes (READ/WRITE/UNMAP/WRITE_ZEROES)
    uint64_t length          # bytes
    iovec *iov               # READ/WRITE data
    int iovcnt
    range_t *ranges          # UNMAP/WRITE_ZEROES with several ranges (nranges > 0), else offset/length
    uint32_t nranges
    uint32_t pending         # sub-operations still in the kernel
    bdev_io_cb_t cb
    void *cb_arg
    io_stats_t *stats        # the channel this I/O is accounted to
    uint64_t submit_tick
    bdev_io_t *next_queued   # io_ctx wait list (submission queue full, or QoS); rbd done list
    io_ctx_t *ctx            # rbd: the engine that submitted it, where its completion goes back

cdef struct io_ctx_t:
    # One thread's I/O engine: an io_uring for file bdevs, and the list of I/Os waiting for room.
    io_uring ring
    int ring_ready
    int event_fd             # signalled by the kernel on completions (for sleeping reactors)
    uint32_t in_kernel       # submitted SQEs not yet completed
    uint32_t unsubmitted     # prepared SQEs not yet handed to the kernel
    bdev_io_t *queued_head
    bdev_io_t *queued_tail
    vdrv_queue_t *vqueues[MAX_CTX_VQUEUES]   # virtio-bdev queues this engine claimed
    virtio_bdev_t *vbdevs[MAX_CTX_VQUEUES]
    uint32_t nvqueues
    # rbd: librbd's threads push finished I/Os here (a lock-free stack; the engine takes it whole)
    # and write event_fd when it was empty
    bdev_io_t *rbd_done
    uint32_t rbd_inflight


# ---------------------------------------------------------------------------------------------
# Split virtqueues
# ---------------------------------------------------------------------------------------------
cdef packed struct vring_desc_t:
    uint64_t addr
    uint32_t len
    uint16_t flags
    uint16_t next

cdef struct vring_used_elem_t:
    uint32_t id
    uint32_t len

cdef enum:
    VRING_DESC_F_NEXT = 1
    VRING_DESC_F_WRITE = 2
    VRING_DESC_F_INDIRECT = 4
    VRING_AVAIL_F_NO_INTERRUPT = 1
    VRING_USED_F_NO_NOTIFY = 1

# Packed virtqueues (virtio 1.1 §2.8): one ring of descriptors that the driver makes available and
# the device marks used in place, each side with a wrap counter; two event suppression areas.
cdef packed struct vring_packed_desc_t:
    uint64_t addr
    uint32_t len
    uint16_t id              # buffer id (the last descriptor of a chain carries it)
    uint16_t flags

cdef enum:
    VRING_PACKED_DESC_F_AVAIL = 0x80
    VRING_PACKED_DESC_F_USED = 0x8000
    VRING_PACKED_EVENT_F_ENABLE = 0
    VRING_PACKED_EVENT_F_DISABLE = 1
    VRING_PACKED_EVENT_F_DESC = 2     # notify at the descriptor off_wrap names (EVENT_IDX)
    VRING_PACKED_MAX_INDIRECT = 65536  # entries of one indirect table

cdef packed struct inflight_desc_t:
    uint8_t inflight
    uint8_t padding[5]
    uint16_t next
    uint64_t counter

cdef packed struct inflight_queue_t:
    uint64_t features
    uint16_t version
    uint16_t desc_num
    uint16_t last_batch_head
    uint16_t used_idx
    # inflight_desc_t desc[desc_num] follows

# Inflight tracking of a packed queue (our layout of the region; the front-end keeps it, never reads
# it).  The ring's descriptors are overwritten by used ones in any order, so each buffer id keeps a
# copy of its chain (up to INFLIGHT_PACKED_DESCS descriptors: Linux sends one indirect descriptor per
# request), and the header keeps both positions, which QEMU cannot give back after a crash.
cdef enum:
    INFLIGHT_PACKED_DESCS = 8
    INFLIGHT_PACKED_LAYOUT = 0x444B4350      # "PCKD"
    INFLIGHT_NO_ID = 0xFFFF

cdef packed struct inflight_packed_id_t:
    uint8_t inflight
    uint8_t padding
    uint16_t ndesc           # slots of the chain (copied below when ≤ INFLIGHT_PACKED_DESCS)
    uint16_t avail_after     # avail position after this chain was fetched
    uint16_t padding2
    uint64_t counter         # fetch order
    vring_packed_desc_t desc[INFLIGHT_PACKED_DESCS]

cdef packed struct inflight_packed_queue_t:
    uint64_t features
    uint16_t version
    uint16_t desc_num
    uint32_t layout          # INFLIGHT_PACKED_LAYOUT
    uint16_t avail_pos       # free-running positions (see vring_packed.pxi)
    uint16_t used_pos
    uint16_t pending_id      # a used descriptor being written: its id (INFLIGHT_NO_ID: none)
    uint16_t pending_used    # and its used position
    # inflight_packed_id_t ids[desc_num] follows

cdef struct vq_stats_t:
    uint64_t requests
    uint64_t read_ops
    uint64_t write_ops
    uint64_t other_ops
    uint64_t bytes_read
    uint64_t bytes_written
    uint64_t errors          # requests completed with an error status
    uint64_t bad_chains      # descriptor chains rejected (bad address, loop, layout)
    uint64_t notifications   # call eventfd writes
    uint64_t suppressed      # interrupt decisions the driver did not want (EVENT_IDX, NO_INTERRUPT)
    uint64_t coalesced       # passes whose completions coalescing held back for a later interrupt
    uint64_t kicks           # kick eventfd wake-ups
    uint64_t latency_ticks
    uint64_t lat_hist[LAT_BUCKETS]

cdef struct task_t
cdef struct vq_t
ctypedef void (*vq_handler_t)(vq_t *vq, task_t *task) noexcept nogil
# A device's own work on a queue, called at every poll of it (check_only: only say whether
# there is any).  Queues whose device decides when to take buffers (the virtio-scsi event queue)
# set hold_buffers: vq_poll then never pops on its own.
ctypedef int (*vq_service_t)(vq_t *vq, bint check_only) noexcept nogil

cdef struct scsi_cmd_t:
    # Per-command state of a virtio-scsi request, kept across an asynchronous bdev I/O.
    uint64_t lba             # WRITE SAME: next block to write
    uint32_t blocks_left     # WRITE SAME: blocks still to write
    uint32_t data_len        # bytes of the guest's data buffer (data-in or data-out)
    uint32_t data_done       # bytes transferred
    uint16_t data_first      # the data buffer: task.iov[data_first : data_first + data_count]
    uint16_t data_count
    uint16_t pattern_first   # WRITE SAME: the one-block pattern in task.iov
    uint16_t pattern_count
    uint8_t target           # 0xFF: no target counted in flight
    uint8_t resp_niov        # segments of the response area, saved in task.scratch
    uint8_t data_in          # the data buffer is device-writable
    uint8_t in_submit        # WRITE SAME: inside the submit loop (completions just record)
    uint8_t status           # SCSI status
    uint8_t response         # virtio-scsi response
    uint8_t sense_key
    uint8_t asc
    uint8_t ascq

cdef struct task_t:
    # One request popped from a virtqueue, from pop to push.  iov holds the chain's buffers in
    # order: n_readable device-readable segments, then the device-writable ones.  When `bad` is
    # set the chain was well-formed but some buffer is unusable (outside guest memory, readable
    # after writable, too many segments): such a segment has iov_base NULL, and the device
    # reports an error through whatever part of the chain is valid.
    vq_t *vq
    uint16_t head            # descriptor id returned in the used ring
    uint16_t n_iov           # segments in iov
    uint16_t n_readable      # the first n_readable segments are device-readable
    uint8_t busy             # popped and not yet pushed
    uint8_t bad              # see above
    uint16_t batch_next      # inflight tracking: the previous head of the unpublished batch
    uint16_t ndesc           # packed ring: descriptor slots the chain took (the used slot advances by it)
    uint32_t used_len        # bytes written into device-writable buffers
    uint32_t dev_u32         # device scratch (blk: request type; scsi: target)
    uint64_t start_tick
    uint8_t *status          # blk: status byte in guest memory
    bdev_io_t io
    range_t range            # blk discard/write-zeroes, scsi unmap (single range)
    uint8_t scratch[128]     # device scratch (scsi: the response area's iovecs)
    scsi_cmd_t scsi
    iovec iov[MAX_IOV]

cdef struct vq_t:
    guest_mem_t *mem
    vring_desc_t *desc
    # split: flags, idx, ring[size], used_event.  packed: the driver event suppression area
    # {off_wrap u16, flags u16}
    uint16_t *avail
    # split: flags u16, idx u16, ring[size] {u32 id, u32 len}, avail_event u16.  packed: the
    # device event suppression area {off_wrap u16, flags u16}
    uint8_t *used
    vring_packed_desc_t *pdesc   # packed: the descriptor ring (desc is NULL)
    uint32_t packed_ring     # VIRTIO_F_RING_PACKED negotiated
    uint16_t size
    uint16_t index           # queue number within its device
    # split: next avail slot we will read; packed: free-running count of descriptor slots
    # consumed (slot = idx % size, wrap counter = 1 on even laps)
    uint16_t last_avail_idx
    uint16_t used_idx        # split: our copy of used->idx; packed: free-running used slots
    uint16_t signalled_used  # used idx at the last notification decision (EVENT_IDX "old")
    uint16_t inflight_count  # popped, not yet pushed
    uint32_t event_idx       # VIRTIO_RING_F_EVENT_IDX negotiated
    uint32_t indirect        # VIRTIO_RING_F_INDIRECT_DESC negotiated
    uint32_t broken          # ring state is invalid: stop fetching until reset
    uint32_t stopping        # no new requests are fetched (GET_VRING_BASE / detach in progress)
    uint32_t need_notify     # used entries pushed since the last notification decision
    uint32_t notify_enabled  # kicks currently requested from the driver (reactor sleeping)
    int kick_fd
    int call_fd
    int err_fd               # signalled when the ring is found broken
    # coalescing (vhost_controller_set_coalescing): the gap between two interrupts adapts to the
    # request rate measured over windows of coalesce_window_ticks
    uint64_t coalesce_base_ticks     # delay_base_us in ticks; 0 = off
    uint64_t coalesce_threshold      # requests per window above which interrupts are spaced
    uint64_t coalesce_window_ticks
    uint64_t coalesce_delay_ticks    # current gap: base × (rate − threshold) / threshold
    uint64_t window_start_tick
    uint64_t window_start_requests   # stats.requests at window_start_tick
    uint64_t last_notify_tick
    uint16_t coalesced_used          # used_idx when coalescing last held completions back
    # inflight tracking region (GET/SET_INFLIGHT_FD), or NULL
    inflight_queue_t *inflight
    inflight_desc_t *inflight_desc
    inflight_packed_queue_t *pinflight       # packed rings: the same region, our packed layout
    inflight_packed_id_t *pinflight_ids
    uint64_t inflight_counter
    uint16_t avail_cache     # avail.idx as last read (reread only when caught up)
    uint16_t published_used  # used.idx as last stored in guest memory
    uint16_t batch_head      # inflight tracking: completions not yet published, linked by next
    uint16_t batch_len
    uint16_t *resubmit       # heads still in flight when the queue started, oldest first
    uint16_t n_resubmit
    uint16_t resubmit_pos
    # dirty log (live migration): a bitmap of guest pages, one bit per 4 KiB, that the device
    # marks after writing guest memory; NULL while logging is off.  Changed only while no
    # reactor polls the queue, or by the reactor itself (mailbox MB_CALL, vq_apply_log).
    uint8_t *log_base
    uint64_t log_bytes       # bitmap bytes: pages beyond log_bytes * 8 are not logged
    uint64_t log_used_gpa    # guest address of the used ring (SET_VRING_ADDR log_guest_addr)
    uint32_t log_used        # writes to the used ring are logged too (VHOST_VRING_F_LOG)
    uint64_t log_marks       # page marks made (stats; counts repeated marks)
    uint8_t *next_log_base   # staged by the control plane for vq_apply_log
    uint64_t next_log_bytes
    uint64_t next_log_used_gpa
    uint32_t next_log_used
    io_ctx_t *io             # the I/O engine of the reactor polling this queue
    # device
    void *device             # blk_dev_t* / scsi_dev_t*
    vq_handler_t handler
    vq_service_t service     # or NULL
    uint32_t hold_buffers    # buffers are popped by service only
    io_stats_t target_stats[MAX_SCSI_TARGETS]   # scsi: one bdev channel per target
    task_t *tasks            # size entries, indexed by head
    vq_stats_t stats
    io_stats_t io_stats      # bdev channel counters for blk queues


# ---------------------------------------------------------------------------------------------
# virtio-blk device
# ---------------------------------------------------------------------------------------------
cdef enum:
    BLK_SERIAL_LEN = 20

cdef struct blk_dev_t:
    bdev_t *bdev
    uint32_t readonly
    uint32_t max_discard_sectors
    uint32_t max_write_zeroes_sectors
    char serial[BLK_SERIAL_LEN]


# ---------------------------------------------------------------------------------------------
# virtio-scsi device: up to MAX_SCSI_TARGETS targets with LUN 0 each
# ---------------------------------------------------------------------------------------------
cdef enum:
    SCSI_TARGET_EMPTY = 0
    SCSI_TARGET_ACTIVE = 1
    SCSI_TARGET_REMOVING = 2     # no new command reaches the bdev; waiting for in-flight ones
    SCSI_MAX_EVENTS = 16         # events kept while the driver has no event buffer posted
    SCSI_MAX_PARKED = 64         # task-management requests waiting for their LUN to go idle
    SCSI_SERIAL_LEN = 32

cdef struct scsi_target_t:
    bdev_t *bdev
    uint32_t state           # SCSI_TARGET_*, stored by the control plane (sequentially consistent)
    uint32_t inflight        # commands past the target check and not yet completed (atomic)
    uint32_t unit_attention  # asc << 8 | ascq of a unit attention to report, 0 none (atomic)
    uint8_t uuid[16]         # the bdev's uuid: VPD 0x83 identifiers derive from it
    uint32_t readonly
    uint32_t unmap           # the bdev supports unmap (thin provisioning)
    char serial[SCSI_SERIAL_LEN]   # VPD 0x80, NUL-padded
    char product[16]               # INQUIRY product identification, space-padded

cdef struct scsi_event_t:
    uint32_t event
    uint32_t reason
    uint8_t lun[8]

cdef struct scsi_dev_t:
    scsi_target_t targets[MAX_SCSI_TARGETS]
    # event queue (touched only by the reactor polling queue 1)
    scsi_event_t events[SCSI_MAX_EVENTS]
    uint32_t events_head
    uint32_t events_count
    uint32_t events_missed   # an event was dropped: the next one carries EVENTS_MISSED
    uint32_t events_enabled  # the driver acked VIRTIO_SCSI_F_HOTPLUG
    # control queue (touched only by the reactor polling queue 0)
    task_t *parked[SCSI_MAX_PARKED]
    uint32_t nparked


# ---------------------------------------------------------------------------------------------
# Reactor: one pinned thread, its queues, its mailbox and its I/O engine
# ---------------------------------------------------------------------------------------------
cdef enum mailbox_op_t:
    MB_ADD_QUEUE = 1
    MB_REMOVE_QUEUE = 2      # stop fetching, wait for in-flight requests, detach
    MB_SET_FDS = 3           # fd → call_fd, fd2 → err_fd
    MB_BARRIER = 4
    MB_STOP = 5
    MB_CALL = 6              # run fn(arg) on the reactor thread

ctypedef int (*reactor_fn_t)(void *arg) noexcept nogil

cdef struct mailbox_msg_t:
    uint32_t op
    uint32_t done            # set (release) by the reactor when finished
    int32_t result
    int32_t fd
    int32_t fd2
    vq_t *vq
    reactor_fn_t fn
    void *arg
    mailbox_msg_t *next_pending

cdef struct reactor_stats_t:
    uint64_t busy_ticks
    uint64_t idle_ticks
    uint64_t poll_passes
    uint64_t sleeps
    uint64_t wakeups
    uint64_t notifications
    uint64_t coalesced

cdef struct reactor_t:
    int lcore
    int epoll_fd
    int wake_fd              # mailbox doorbell
    int ack_fd               # written after a message completes (watched by asyncio)
    uint32_t stop
    uint32_t thread_alive      # reactor_run is executing (set and cleared by the thread)
    pthread_mutex_t *lock
    mailbox_msg_t *inbox[MAILBOX_SIZE]
    uint32_t inbox_head
    uint32_t inbox_tail
    mailbox_msg_t *draining  # REMOVE_QUEUE messages waiting for their queue to drain
    vq_t *queues[MAX_REACTOR_QUEUES]
    uint32_t nqueues
    io_ctx_t io
    uint64_t idle_sleep_ticks   # idle spell after which the reactor sleeps
    uint64_t sleeping_since     # tick the current sleep began, 0 while awake (stats readers)
    reactor_stats_t stats


# ---------------------------------------------------------------------------------------------
# Front-end (driver) side of split virtqueues: vhostd acting as QEMU.  Used by the initiator
# (vhostd/initiator), its load generator (the benchmark) and, through vdrv_submit_*/vdrv_poll,
# by a bdev that consumes another vhost-user target.  Code in initiator.pxi.
# ---------------------------------------------------------------------------------------------
cdef enum:
    VDRV_MAX_DATA_SEGS = 128     # data buffers of one request
    VDRV_MAX_CHAIN = 130         # descriptors of one request: data + header + status
    VDRV_MAX_RANGES = 16         # discard / write-zeroes ranges of one request
    VDRV_HIST_SUB_BITS = 4       # latency histogram: 16 linear sub-buckets per power of two
    VDRV_HIST_BUCKETS = 1024
    VDRV_NO_SLOT = 0xFFFF

cdef enum vdrv_indirect_mode_t:
    VDRV_INDIRECT_NEVER = 0
    VDRV_INDIRECT_AUTO = 1       # only when the ring is short of descriptors
    VDRV_INDIRECT_ALWAYS = 2     # every chain of more than one buffer

cdef enum vdrv_device_t:
    VDRV_DEV_RAW = 0             # requests are chains built by the caller
    VDRV_DEV_BLK = 1
    VDRV_DEV_SCSI = 2

cdef struct vdrv_seg_t:
    uint64_t gpa
    uint32_t len
    uint32_t writable

cdef struct vdrv_slot_t:
    # One request the driver has put on a ring, and its private area in driver memory (indirect
    # table, request header, response, discard ranges, bounce buffer).
    bdev_io_t *io            # the I/O served; NULL for a chain posted by the caller (Python)
    uint8_t *area
    uint64_t area_gpa
    uint64_t submit_tick
    uint32_t used_len
    uint16_t head            # first descriptor on the ring
    uint16_t tail            # last descriptor on the ring (the chain is linked through desc_next)
    uint16_t ndesc           # ring descriptors taken
    uint16_t next_free       # slot free list
    uint8_t busy
    uint8_t done             # completed (caller-posted chains, until collected)
    uint8_t bounced          # data went through the bounce buffer

cdef struct vdrv_queue_stats_t:
    uint64_t submitted
    uint64_t completed
    uint64_t publishes       # avail.idx stores
    uint64_t kicks           # kick eventfd writes
    uint64_t kicks_suppressed
    uint64_t waits           # sleeps on the call eventfd
    uint64_t interrupts      # call eventfd signals received (counted when drained)
    uint64_t bounced

cdef struct vdrv_queue_t:
    guest_mem_t *mem         # driver memory: hva is ours, gpa what descriptors carry
    vring_desc_t *desc
    uint16_t *avail          # flags, idx, ring[size], used_event (packed: the driver event area)
    uint8_t *used            # flags, idx, ring[size] {id, len}, avail_event (packed: the device's)
    # Packed rings: the descriptor ring; avail_idx / last_used_idx are then free-running slot
    # positions (as the device keeps them), the buffer id of a request is its slot index, and the
    # head flags of the first chain since the last flush wait in pending_* (a flush stores them:
    # the device reads the ring in order, so it sees the whole batch at once).
    vring_packed_desc_t *pdesc
    uint32_t packed
    uint16_t pending_pos
    uint16_t pending_flags
    uint32_t has_pending
    uint16_t size
    uint16_t index
    uint16_t *desc_next      # private free-list links (never read back from shared memory)
    uint16_t free_head
    uint16_t num_free
    uint16_t avail_idx       # next avail entry we write (published or not)
    uint16_t published_idx   # avail.idx the device sees
    uint16_t kicked_idx      # avail.idx at the last kick decision (EVENT_IDX "old")
    uint16_t last_used_idx   # next used entry we read
    uint16_t used_event      # what we last wrote to used_event (EVENT_IDX)
    uint16_t avail_flags     # what we last wrote to avail.flags (without EVENT_IDX)
    uint16_t *head_slot      # per descriptor: the slot whose chain starts there, or VDRV_NO_SLOT
    vdrv_slot_t *slots
    uint16_t nslots
    uint16_t free_slot
    uint16_t *done_slots     # caller-posted chains completed, in completion order
    uint16_t ndone
    uint32_t inflight        # requests on the ring, not yet completed
    uint32_t slot_bytes      # stride of the slot areas
    uint32_t bounce_bytes    # bounce buffer per slot (0: buffers must lie in driver memory)
    uint32_t device          # vdrv_device_t
    uint32_t block_size      # scsi: logical block size (LBA units)
    uint8_t lun[8]           # scsi: LUN the I/Os address
    uint64_t scsi_tag
    uint32_t event_idx
    uint32_t indirect        # VIRTIO_RING_F_INDIRECT_DESC negotiated
    uint32_t indirect_mode   # vdrv_indirect_mode_t
    uint32_t interrupts      # completions awaited on call_fd (else polled)
    uint32_t broken          # the device returned an impossible used entry
    int kick_fd
    int call_fd
    vdrv_queue_stats_t stats

cdef struct vdrv_load_t
cdef struct vdrv_load_io_t:
    bdev_io_t io             # first member: the completion callback gets &io
    iovec iov
    vdrv_load_t *load
    vdrv_queue_t *q
    vdrv_load_io_t *next_pending

cdef struct vdrv_load_result_t:
    uint64_t ops
    uint64_t read_ops
    uint64_t write_ops
    uint64_t bytes_read
    uint64_t bytes_written
    uint64_t errors
    uint64_t lat_sum_ticks
    uint64_t lat_min_ticks
    uint64_t lat_max_ticks
    uint64_t start_tick      # measurement window
    uint64_t end_tick
    uint64_t passes          # loop iterations
    uint64_t empty_passes    # iterations that completed nothing
    uint64_t lost            # requests still in flight when draining timed out
    uint64_t hist[VDRV_HIST_BUCKETS]

cdef struct vdrv_load_t:
    vdrv_queue_t **queues
    uint32_t nqueues
    uint32_t qd              # requests kept in flight per queue
    uint32_t block_bytes
    uint32_t read_pct        # 100 = all reads, 0 = all writes
    uint64_t span_blocks     # offsets are random multiples of block_bytes below span_blocks
    uint64_t offset_base
    uint64_t duration_ticks
    uint64_t ramp_ticks      # completions before start+ramp are not counted
    uint64_t drain_ticks     # how long to wait for in-flight requests at the end
    uint64_t rng
    uint32_t interrupts      # wait on call eventfds when idle (else busy-poll)
    uint32_t stop            # set by another thread: end now
    uint32_t measuring
    uint32_t stopping
    vdrv_load_io_t *ios      # nqueues * qd
    vdrv_load_io_t *pending  # could not be submitted (ring full), retried after the next poll
    vdrv_load_result_t res


# ---------------------------------------------------------------------------------------------
# NVMe controller I/O queues (vfio-user): one controller is one entry of a reactor's queue list,
# whose service polls every I/O submission queue of the controller.  Code in nvme.pxi.
# ---------------------------------------------------------------------------------------------
cdef enum:
    NVME_MAX_QUEUES = 32         # queue ids 1..31 (0, the admin queue, stays on the control plane)
    NVME_MAX_NS = 32             # NSIDs 1..32
    NVME_MAX_VECTORS = 64
    NVME_PAGE = 4096
    NVME_MAX_IOV = 160           # PRP pages of one command (MDTS 512 KiB: 129) and region splits
    NVME_MAX_DSM_RANGES = 256

cdef struct nvme_ns_t:
    bdev_t *bdev             # NULL: inactive NSID
    uint32_t lbads           # log2 of the block size
    uint64_t num_blocks
    io_stats_t stats         # this controller's channel on the bdev

cdef struct nvme_cq_t:
    uint8_t *ring            # host pointer of entry 0 (checked once at creation)
    uint32_t active
    uint16_t size
    uint16_t head            # as the host last rang it
    uint16_t tail            # next slot we post
    uint16_t vector
    uint8_t phase
    uint8_t ien
    uint32_t reserved        # commands fetched for this CQ and not yet posted
    uint32_t irq_pending     # entries posted since the last interrupt

cdef struct nvme_sq_t
cdef struct nvme_ctrl_t

cdef struct nvme_req_t:
    bdev_io_t io             # first member: the bdev callback gets &io
    nvme_sq_t *sq
    uint32_t generation      # the SQ's generation at fetch (a re-created queue drops old ones)
    uint16_t cid
    uint16_t index           # in sq.reqs
    uint16_t status          # SC | SCT << 8 | DNR << 14, 0 = success
    uint8_t opcode
    range_t *ranges          # Dataset Management: malloc()ed, freed at completion
    iovec iov[NVME_MAX_IOV]

cdef struct nvme_sq_t:
    uint8_t *ring
    uint32_t active
    uint32_t generation
    uint16_t qid
    uint16_t size
    uint16_t head            # next entry we fetch
    uint16_t cqid
    uint32_t outstanding
    nvme_ctrl_t *ctrl
    nvme_req_t *reqs         # capacity entries, allocated at first creation
    uint16_t *free_reqs      # stack of free indexes
    uint32_t nfree
    uint32_t capacity

cdef struct nvme_stats_t:
    uint64_t commands
    uint64_t errors          # completions with a non-zero status
    uint64_t bad_pointers    # PRPs outside guest memory or malformed
    uint64_t interrupts
    uint64_t dropped         # completions of deleted queues

cdef struct nvme_ctrl_t:
    guest_mem_t *mem
    uint32_t *doorbells      # BAR0 + 0x1000: SQ y tail at [2y], CQ y head at [2y + 1] (DSTRD 0)
    uint32_t fatal           # a hostile doorbell: the control plane reports CSTS.CFS
    uint32_t max_transfer    # bytes (MDTS)
    int irq_fds[NVME_MAX_VECTORS]
    nvme_sq_t sqs[NVME_MAX_QUEUES]
    nvme_cq_t cqs[NVME_MAX_QUEUES]
    nvme_ns_t ns[NVME_MAX_NS + 1]
    nvme_stats_t stats
