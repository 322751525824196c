# Ceph RBD images as bdevs, through librbd's C API.  librbd is optional: nothing here links
# against it.  rbd_load() dlopen()s it and fills a table of the few functions we call, declared
# below from librados.h / librbd.h of Ceph 16.2 (the C ABI is stable across releases).
#
# Data path: reads and writes go to rbd_aio_readv/writev on the request's own iovecs (guest
# memory, no bounce buffer).  librbd completes on its own threads: _rbd_complete pushes the
# finished I/O onto the submitting engine's lock-free stack (io_ctx_t.rbd_done) and writes the
# engine's eventfd when the stack was empty, which wakes a sleeping reactor; io_ctx_poll takes the
# stack whole and completes the I/Os on the reactor.  Connect, open, resize and close block for
# seconds: the control plane calls them from a worker thread (the GIL released around each).

from libc.errno cimport ENOENT, ENOTCONN, EBADF

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_GLOBAL

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN

ctypedef void *rados_t
ctypedef void *rados_ioctx_t
ctypedef void *rbd_image_t
ctypedef void *rbd_completion_t
ctypedef void (*rbd_callback_t)(rbd_completion_t c, void *arg) noexcept nogil

cdef struct rbd_api_t:
    int (*rados_create2)(rados_t *cluster, const char *cluster_name, const char *name,
                         uint64_t flags) noexcept nogil
    int (*rados_conf_read_file)(rados_t cluster, const char *path) noexcept nogil
    int (*rados_conf_set)(rados_t cluster, const char *option, const char *value) noexcept nogil
    int (*rados_connect)(rados_t cluster) noexcept nogil
    void (*rados_shutdown)(rados_t cluster) noexcept nogil
    int (*rados_cluster_fsid)(rados_t cluster, char *buf, size_t len) noexcept nogil
    int (*rados_ioctx_create)(rados_t cluster, const char *pool, rados_ioctx_t *io) noexcept nogil
    void (*rados_ioctx_destroy)(rados_ioctx_t io) noexcept nogil
    int (*rbd_open)(rados_ioctx_t io, const char *name, rbd_image_t *image,
                    const char *snap_name) noexcept nogil
    int (*rbd_open_read_only)(rados_ioctx_t io, const char *name, rbd_image_t *image,
                              const char *snap_name) noexcept nogil
    int (*rbd_close)(rbd_image_t image) noexcept nogil
    int (*rbd_get_size)(rbd_image_t image, uint64_t *size) noexcept nogil
    int (*rbd_resize)(rbd_image_t image, uint64_t size) noexcept nogil
    int (*rbd_aio_create_completion)(void *cb_arg, rbd_callback_t complete_cb,
                                     rbd_completion_t *c) noexcept nogil
    ssize_t (*rbd_aio_get_return_value)(rbd_completion_t c) noexcept nogil
    void (*rbd_aio_release)(rbd_completion_t c) noexcept nogil
    int (*rbd_aio_readv)(rbd_image_t image, const iovec *iov, int iovcnt, uint64_t off,
                         rbd_completion_t c) noexcept nogil
    int (*rbd_aio_writev)(rbd_image_t image, const iovec *iov, int iovcnt, uint64_t off,
                          rbd_completion_t c) noexcept nogil
    int (*rbd_aio_flush)(rbd_image_t image, rbd_completion_t c) noexcept nogil
    int (*rbd_aio_discard)(rbd_image_t image, uint64_t off, uint64_t len,
                           rbd_completion_t c) noexcept nogil
    int (*rbd_aio_write_zeroes)(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                                int zero_flags, int op_flags) noexcept nogil

# Symbol names in the order of rbd_api_t's fields.
_RBD_SYMBOLS = (
    b"rados_create2", b"rados_conf_read_file", b"rados_conf_set", b"rados_connect",
    b"rados_shutdown", b"rados_cluster_fsid", b"rados_ioctx_create", b"rados_ioctx_destroy",
    b"rbd_open",
    b"rbd_open_read_only", b"rbd_close", b"rbd_get_size", b"rbd_resize",
    b"rbd_aio_create_completion", b"rbd_aio_get_return_value", b"rbd_aio_release",
    b"rbd_aio_readv", b"rbd_aio_writev", b"rbd_aio_flush", b"rbd_aio_discard",
    b"rbd_aio_write_zeroes",
)

cdef rbd_api_t _rbd
cdef bint _rbd_ready = False
_rbd_soname = None


class RbdUnavailable(OSError):
    """librbd (or a function vhostd needs from it) could not be loaded."""


def rbd_load(str soname="librbd.so.1"):
    """Load librbd (librados comes with it) unless already loaded; returns the soname in use.

    Raises RbdUnavailable with dlopen's or dlsym's message.  A failed load leaves a loaded table
    alone, and the same soname is not opened twice.
    """
    global _rbd_ready, _rbd_soname
    cdef rbd_api_t table
    cdef void **slots = <void **>&table
    cdef void *handle
    cdef void *sym
    cdef char *err
    cdef bytes name = soname.encode()
    cdef Py_ssize_t i
    if _rbd_ready and soname == _rbd_soname:
        return _rbd_soname
    handle = dlopen(name, RTLD_NOW | RTLD_GLOBAL)
    if handle == NULL:
        err = dlerror()
        raise RbdUnavailable(ENOENT, "cannot load %s: %s" % (
            soname, err.decode(errors="replace") if err != NULL else "unknown error"))
    for i, symbol in enumerate(_RBD_SYMBOLS):
        sym = dlsym(handle, <bytes>symbol)
        if sym == NULL:
            raise RbdUnavailable(ENOENT, "%s has no %s" % (soname, (<bytes>symbol).decode()))
        slots[i] = sym
    memcpy(&_rbd, &table, sizeof(rbd_api_t))
    _rbd_ready = True
    _rbd_soname = soname
    return soname


cdef inline void _rbd_need():
    if not _rbd_ready:
        raise RbdUnavailable(ENOENT, "librbd is not loaded")


cdef inline void _rbd_check(int rc, str what) except *:
    if rc < 0:
        raise OSError(-rc, "%s: %s" % (what, os.strerror(-rc)))


# ---------------------------------------------------------------------------------------------
# Per-I/O path
# ---------------------------------------------------------------------------------------------
cdef void _rbd_complete(rbd_completion_t c, void *arg) noexcept nogil:
    """librbd's completion callback, on a librbd thread: record the outcome, give the I/O back to
    the engine that submitted it and wake that engine if it may sleep."""
    cdef bdev_io_t *io = <bdev_io_t *>arg
    cdef io_ctx_t *ctx = io.ctx
    cdef ssize_t ret = _rbd.rbd_aio_get_return_value(c)
    cdef bdev_io_t *head
    _rbd.rbd_aio_release(c)
    if ret < 0:
        io.status = <int32_t>ret
    elif io.op == OP_READ and <uint64_t>ret != io.length:
        io.status = -EIO        # clipped at the image's end: it shrank under us
    if vhd_add_u32_sc(&io.pending, -1) != 0:
        return                  # other ranges of this I/O are still out
    while True:
        head = <bdev_io_t *>vhd_load_ptr(<void **>&ctx.rbd_done)
        io.next_queued = head
        if vhd_cas_ptr(<void **>&ctx.rbd_done, head, io):
            break
    if head == NULL:
        eventfd_signal(ctx.event_fd)


cdef int _rbd_submit_one(rbd_image_t img, bdev_io_t *io, uint32_t i) noexcept nogil:
    cdef rbd_completion_t c
    cdef uint64_t off = io.offset
    cdef uint64_t length = io.length
    cdef int rc = _rbd.rbd_aio_create_completion(io, _rbd_complete, &c)
    if rc < 0:
        return rc
    if io.nranges > 0:
        off = io.ranges[i].offset
        length = io.ranges[i].length
    if io.op == OP_READ:
        rc = _rbd.rbd_aio_readv(img, io.iov, io.iovcnt, io.offset, c)
    elif io.op == OP_WRITE:
        rc = _rbd.rbd_aio_writev(img, io.iov, io.iovcnt, io.offset, c)
    elif io.op == OP_FLUSH:
        rc = _rbd.rbd_aio_flush(img, c)
    elif io.op == OP_UNMAP:
        rc = _rbd.rbd_aio_discard(img, off, length, c)
    else:
        rc = _rbd.rbd_aio_write_zeroes(img, off, <size_t>length, c, 0, 0)
    if rc < 0:
        _rbd.rbd_aio_release(c)
    return rc


cdef int _rbd_start(io_ctx_t *ctx, bdev_io_t *io) noexcept nogil:
    """Hand a validated I/O to librbd (one call per range).  Returns 1 if it already finished
    (librbd refused it), 0 if its completion comes through io_ctx_poll."""
    cdef uint32_t n = 1
    cdef uint32_t i
    cdef int rc
    if (io.op == OP_UNMAP or io.op == OP_WRITE_ZEROES) and io.nranges > 0:
        n = io.nranges
    elif io.op == OP_READ or io.op == OP_WRITE:
        io.nranges = 0
    if io.length == 0 and io.op != OP_FLUSH:
        bdev_io_finish(io, 0)
        return 1
    io.ctx = ctx
    io.status = 0
    io.pending = n
    ctx.rbd_inflight += 1
    for i in range(n):
        rc = _rbd_submit_one(<rbd_image_t>io.bdev.rbd_image, io, i)
        if rc < 0:
            io.status = rc
            # The ranges never submitted will not complete: count them off ourselves.
            if vhd_add_u32_sc(&io.pending, -<int32_t>(n - i)) == 0:
                ctx.rbd_inflight -= 1
                bdev_io_finish(io, rc)
                return 1
            return 0
    return 0


cdef int rbd_ctx_poll(io_ctx_t *ctx) noexcept nogil:
    """Complete every I/O librbd has given back to this engine; returns how many."""
    cdef bdev_io_t *io = <bdev_io_t *>vhd_exchange_ptr(<void **>&ctx.rbd_done, NULL)
    cdef bdev_io_t *ordered = NULL
    cdef bdev_io_t *nxt
    cdef int completed = 0
    while io != NULL:           # the stack is newest first: reverse it
        nxt = io.next_queued
        io.next_queued = ordered
        ordered = io
        io = nxt
    while ordered != NULL:
        io = ordered
        ordered = io.next_queued
        ctx.rbd_inflight -= 1
        bdev_io_finish(io, io.status)
        completed += 1
    return completed


cdef void rbd_ctx_wait(io_ctx_t *ctx, int timeout_ms) noexcept nogil:
    """Block until librbd gives an I/O back to this engine (or timeout_ms passes)."""
    cdef pollfd p
    p.fd = ctx.event_fd
    p.events = POLLIN
    p.revents = 0
    if vhd_load_ptr(<void **>&ctx.rbd_done) == NULL:
        poll(&p, 1, timeout_ms)
    eventfd_drain(ctx.event_fd)


# ---------------------------------------------------------------------------------------------
# Control plane: clusters and images (each call may block; run them off the asyncio loop)
# ---------------------------------------------------------------------------------------------
cdef class RadosCluster:
    """A connection to a Ceph cluster (rados_t) shared by the images opened through it.

    Create it from an unpinned thread: librados' threads inherit the creator's CPU affinity.
    """
    cdef rados_t cluster
    cdef readonly bint connected

    def __cinit__(self, str user_id=None):
        cdef bytes name = ("client." + (user_id or "admin")).encode()
        cdef int rc
        _rbd_need()
        rc = _rbd.rados_create2(&self.cluster, b"ceph", name, 0)
        _rbd_check(rc, "rados_create2")

    def read_config_file(self, path=None):
        """rados_conf_read_file: path, or None for Ceph's default search ($CEPH_CONF,
        /etc/ceph/ceph.conf, ...)."""
        cdef bytes bpath = os.fsencode(path) if path is not None else b""
        cdef const char *cpath = <const char *>bpath if path is not None else NULL
        cdef int rc
        with nogil:
            rc = _rbd.rados_conf_read_file(self.cluster, cpath)
        _rbd_check(rc, "reading %s" % (path or "the default Ceph config"))

    def set(self, str key, str value):
        """rados_conf_set; raises OSError (EINVAL for an unknown key or bad value)."""
        _rbd_check(_rbd.rados_conf_set(self.cluster, key.encode(), value.encode()),
                   "config %s" % key)

    def connect(self):
        """rados_connect: blocks until the monitors answer or client_mount_timeout passes."""
        cdef int rc
        with nogil:
            rc = _rbd.rados_connect(self.cluster)
        _rbd_check(rc, "connecting to the cluster")
        self.connected = True

    @property
    def fsid(self):
        """The cluster's fsid (the same cluster whichever monitor, user or config reached it)."""
        cdef char buf[64]
        cdef int rc
        if not self.connected:
            raise OSError(ENOTCONN, "the cluster is not connected")
        rc = _rbd.rados_cluster_fsid(self.cluster, buf, sizeof(buf))
        _rbd_check(rc, "rados_cluster_fsid")
        return (<bytes>buf).decode()       # NUL-terminated; rc is its length or -errno

    def shutdown(self):
        """rados_shutdown; every image opened through it must be closed first."""
        if self.cluster != NULL:
            with nogil:
                _rbd.rados_shutdown(self.cluster)
            self.cluster = NULL
            self.connected = False

    def __dealloc__(self):
        if self.cluster != NULL:
            _rbd.rados_shutdown(self.cluster)
            self.cluster = NULL


cdef class RbdImage:
    """One open image (rbd_image_t) and its pool's I/O context; open it once per process."""
    cdef rados_ioctx_t ioctx
    cdef rbd_image_t image
    cdef readonly RadosCluster cluster
    cdef readonly str pool_name
    cdef readonly str rbd_name
    cdef readonly bint read_only

    def __cinit__(self, RadosCluster cluster, str pool_name, str rbd_name, bint read_only=False):
        cdef bytes bpool = pool_name.encode()
        cdef bytes bname = rbd_name.encode()
        cdef const char *cpool = bpool
        cdef const char *cname = bname
        cdef int rc
        if not cluster.connected:
            raise OSError(ENOTCONN, "the cluster is not connected")
        self.cluster = cluster
        self.pool_name = pool_name
        self.rbd_name = rbd_name
        self.read_only = read_only
        with nogil:
            rc = _rbd.rados_ioctx_create(cluster.cluster, cpool, &self.ioctx)
        _rbd_check(rc, "pool %s" % pool_name)
        with nogil:
            if read_only:
                rc = _rbd.rbd_open_read_only(self.ioctx, cname, &self.image, NULL)
            else:
                rc = _rbd.rbd_open(self.ioctx, cname, &self.image, NULL)
        if rc < 0:
            self.image = NULL
            self.close()
            _rbd_check(rc, "image %s/%s" % (pool_name, rbd_name))

    @property
    def size_bytes(self):
        cdef uint64_t size = 0
        cdef int rc
        if self.image == NULL:
            raise OSError(EBADF, "the image is closed")
        with nogil:
            rc = _rbd.rbd_get_size(self.image, &size)
        _rbd_check(rc, "rbd_get_size")
        return size

    def resize(self, uint64_t size_bytes):
        cdef int rc
        if self.image == NULL:
            raise OSError(EBADF, "the image is closed")
        with nogil:
            rc = _rbd.rbd_resize(self.image, size_bytes)
        _rbd_check(rc, "rbd_resize")

    def disk(self, uint32_t block_size):
        """A Disk over this image: block_size bytes per block, the image's size rounded down.
        No I/O may be in flight on the Disk when the image is closed."""
        cdef Disk d
        cdef uint64_t size = self.size_bytes
        Disk._check_geometry(block_size, 1)
        if size < block_size:
            raise ValueError("image %s/%s is smaller than one block (%d bytes)"
                             % (self.pool_name, self.rbd_name, block_size))
        d = Disk.__new__(Disk)
        d.bdev.kind = BDEV_RBD
        d.bdev.rbd_image = self.image
        d.bdev.block_size = block_size
        d.bdev.num_blocks = size // block_size
        d.bdev.readonly = self.read_only
        d.kind = "rbd"
        d.backend = self
        return d

    def close(self):
        """rbd_close (flushes and drops the exclusive lock), then the pool's I/O context."""
        if self.image != NULL:
            with nogil:
                _rbd.rbd_close(self.image)
            self.image = NULL
        if self.ioctx != NULL:
            with nogil:
                _rbd.rados_ioctx_destroy(self.ioctx)
            self.ioctx = NULL

    def __dealloc__(self):
        if self.image != NULL:
            _rbd.rbd_close(self.image)
        if self.ioctx != NULL:
            _rbd.rados_ioctx_destroy(self.ioctx)
