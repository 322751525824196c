# Guest memory: the regions a front-end shares over vhost-user, mapped MAP_SHARED, and the only
# functions that turn a guest address into a host pointer.  Every translation checks that the whole
# [addr, addr+len) lies inside mapped regions; nothing else in the data plane computes a pointer from
# a guest-supplied address.

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int PROT_NONE
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    int MAP_PRIVATE
    int MAP_ANONYMOUS
    int MAP_NORESERVE
    int MAP_FIXED
    void *MAP_FAILED

cdef enum:
    GUARD_BYTES = 2 * 1024 * 1024

# A front-end owns the files behind guest memory (and the inflight region): it can truncate them
# under us, and the next access to a page past the new end raises SIGBUS, which would end the
# daemon and every other controller with it.  Every shared mapping of front-end memory is
# registered here; a SIGBUS inside one replaces the faulting page with a private zero page (the
# access then completes, on memory the front-end threw away) and marks the mapping truncated, so
# the control plane can close that connection: the handler writes to an eventfd the control
# plane watches (set_sigbus_notify_fd), so that happens at once, not at the front-end's next
# message.  A SIGBUS anywhere else goes to the previous handler, as before.
cdef extern from *:
    """
    #include <errno.h>
    #include <signal.h>
    #include <stdint.h>
    #include <unistd.h>
    #include <string.h>
    #include <sys/mman.h>
    #define VHD_GUARD_SLOTS 4096
    typedef struct { uintptr_t start, end, page; int truncated; } vhd_guard_t;
    static vhd_guard_t vhd_guards[VHD_GUARD_SLOTS];
    static struct sigaction vhd_old_sigbus;
    static int vhd_sigbus_installed;
    static uint64_t vhd_sigbus_fixups;
    static int vhd_sigbus_notify_fd = -1;

    static void vhd_sigbus_notify(void) {
        /* write(2) is async-signal-safe; errno is the interrupted code's. */
        int fd = __atomic_load_n(&vhd_sigbus_notify_fd, __ATOMIC_ACQUIRE);
        uint64_t one = 1;
        int saved = errno;
        if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
            /* The counter is full or the fd went away: the next message still finds the mark. */
        }
        errno = saved;
    }

    static void vhd_sigbus(int sig, siginfo_t *info, void *context) {
        uintptr_t addr = (uintptr_t)info->si_addr;
        int i;
        (void)context;
        if (info->si_code > 0) {
            for (i = 0; i < VHD_GUARD_SLOTS; i++) {
                uintptr_t start = __atomic_load_n(&vhd_guards[i].start, __ATOMIC_ACQUIRE);
                uintptr_t end = __atomic_load_n(&vhd_guards[i].end, __ATOMIC_ACQUIRE);
                if (start <= addr && addr < end) {
                    uintptr_t page = vhd_guards[i].page;
                    void *at = (void *)(addr & ~(page - 1));
                    if (mmap(at, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                             -1, 0) == MAP_FAILED)
                        break;
                    __atomic_store_n(&vhd_guards[i].truncated, 1, __ATOMIC_RELEASE);
                    __atomic_fetch_add(&vhd_sigbus_fixups, 1, __ATOMIC_RELAXED);
                    vhd_sigbus_notify();
                    return;
                }
            }
        }
        /* Not front-end memory: restore the previous disposition; the faulting access repeats
           and gets it (a signal sent with kill() is raised again). */
        sigaction(SIGBUS, &vhd_old_sigbus, NULL);
        if (info->si_code <= 0)
            raise(sig);
    }

    static int vhd_sigbus_install(void) {
        struct sigaction sa;
        if (vhd_sigbus_installed)
            return 0;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = vhd_sigbus;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &vhd_old_sigbus) != 0)
            return -1;
        vhd_sigbus_installed = 1;
        return 0;
    }

    /* Control plane only (one thread, under the GIL). */
    static int vhd_guard_add(uintptr_t start, uintptr_t length, uintptr_t page) {
        int i;
        for (i = 0; i < VHD_GUARD_SLOTS; i++) {
            if (vhd_guards[i].end == 0) {
                vhd_guards[i].page = page;
                vhd_guards[i].truncated = 0;
                __atomic_store_n(&vhd_guards[i].start, start, __ATOMIC_RELEASE);
                __atomic_store_n(&vhd_guards[i].end, start + length, __ATOMIC_RELEASE);
                return i;
            }
        }
        return -1;
    }
    static void vhd_guard_remove(int slot) {
        if (slot < 0 || slot >= VHD_GUARD_SLOTS)
            return;
        __atomic_store_n(&vhd_guards[slot].end, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&vhd_guards[slot].start, 0, __ATOMIC_RELEASE);
    }
    static int vhd_guard_truncated(int slot) {
        if (slot < 0 || slot >= VHD_GUARD_SLOTS)
            return 0;
        return __atomic_load_n(&vhd_guards[slot].truncated, __ATOMIC_ACQUIRE);
    }
    static uint64_t vhd_sigbus_fixup_count(void) { return __atomic_load_n(&vhd_sigbus_fixups, __ATOMIC_RELAXED); }
    static void vhd_sigbus_set_notify_fd(int fd) { __atomic_store_n(&vhd_sigbus_notify_fd, fd, __ATOMIC_RELEASE); }
    """
    int vhd_sigbus_install()
    int vhd_guard_add(size_t start, size_t length, size_t page)
    void vhd_guard_remove(int slot)
    int vhd_guard_truncated(int slot)
    uint64_t vhd_sigbus_fixup_count()
    void vhd_sigbus_set_notify_fd(int fd)

if vhd_sigbus_install() != 0:
    raise OSError(errno, "cannot install the SIGBUS handler for guest memory")


def guard_mapping(object buffer):
    """Register a shared mapping of front-end memory that is not guest RAM (an mmap of the
    inflight region): a SIGBUS inside it is survived.  Returns a handle for unguard_mapping()
    and mapping_truncated()."""
    cdef const uint8_t[:] view = buffer
    cdef int slot
    if view.shape[0] == 0:
        return -1
    slot = vhd_guard_add(<size_t>&view[0], <size_t>view.shape[0], 4096)
    if slot < 0:
        raise ValueError("too many guarded mappings")
    return slot


def unguard_mapping(int handle):
    vhd_guard_remove(handle)


def mapping_truncated(int handle):
    """True if the front-end truncated the file under the mapping and we touched a lost page."""
    return bool(vhd_guard_truncated(handle))


def set_sigbus_notify_fd(int fd):
    """Have every survived SIGBUS in front-end memory add 1 to this eventfd (-1: none)."""
    vhd_sigbus_set_notify_fd(fd)


def sigbus_fixups():
    """How many SIGBUS faults in front-end memory were survived since the module was loaded."""
    return vhd_sigbus_fixup_count()

cdef extern from "<sys/stat.h>" nogil:
    struct stat:
        off_t st_size
        long st_blksize
        unsigned int st_mode
    int fstat(int fd, stat *buf)


cdef inline uint8_t *gpa_to_hva(const guest_mem_t *mem, uint64_t gpa, uint64_t length) noexcept nogil:
    """Host pointer for [gpa, gpa+length) if it lies inside one region, else NULL."""
    cdef uint32_t i
    cdef const mem_region_t *r
    cdef uint64_t off
    for i in range(mem.nregions):
        r = &mem.regions[i]
        if gpa >= r.gpa:
            off = gpa - r.gpa
            if off < r.size:
                if length <= r.size - off:
                    return r.hva + off
                return NULL
    return NULL


cdef int gpa_to_iov(const guest_mem_t *mem, uint64_t gpa, uint64_t length,
                    iovec *iov, int max_iov) noexcept nogil:
    """Append the host segments of [gpa, gpa+length) to iov, splitting where the buffer crosses
    from one region into the next.  Returns the number of segments written, or -1 if any byte is
    outside guest memory or more than max_iov segments would be needed."""
    cdef int n = 0
    cdef uint32_t i
    cdef const mem_region_t *r
    cdef uint64_t off, chunk
    cdef bint found
    if gpa + length < gpa:      # wraps around the address space
        return -1
    while length > 0:
        found = False
        for i in range(mem.nregions):
            r = &mem.regions[i]
            if gpa >= r.gpa and gpa - r.gpa < r.size:
                off = gpa - r.gpa
                chunk = r.size - off
                if chunk > length:
                    chunk = length
                if n >= max_iov:
                    return -1
                iov[n].iov_base = r.hva + off
                iov[n].iov_len = chunk
                n += 1
                gpa += chunk
                length -= chunk
                found = True
                break
        if not found:
            return -1
    return n


cdef inline uint8_t *uaddr_to_hva(const guest_mem_t *mem, uint64_t uaddr, uint64_t length) noexcept nogil:
    """Host pointer for a front-end virtual address range (vring addresses), or NULL."""
    cdef uint32_t i
    cdef const mem_region_t *r
    cdef uint64_t off
    for i in range(mem.nregions):
        r = &mem.regions[i]
        if uaddr >= r.uaddr:
            off = uaddr - r.uaddr
            if off < r.size:
                if length <= r.size - off:
                    return r.hva + off
                return NULL
    return NULL


cdef class GuestMemory:
    """The memory table of one vhost-user session: each region's fd mapped MAP_SHARED.

    Built from (guest_phys_addr, memory_size, userspace_addr, mmap_offset, fd) tuples.  The fds
    are not kept (the caller closes them).  Regions that overlap, are empty, or reach beyond the
    end of their fd are refused (touching a page past the end of a memfd would raise SIGBUS).
    The mappings live until close(); the control plane calls it only after every reactor has let
    go of the queues that use this table.
    """
    cdef guest_mem_t *mem
    cdef void *map_base[MAX_MEM_REGIONS]
    cdef size_t map_len[MAX_MEM_REGIONS]
    cdef int guard[MAX_MEM_REGIONS]         # SIGBUS guard slot of each region's mapping

    def __cinit__(self):
        self.mem = <guest_mem_t *>calloc(1, sizeof(guest_mem_t))
        if self.mem == NULL:
            raise MemoryError()

    def __init__(self, regions=()):
        for gpa, size, uaddr, mmap_offset, fd in regions:
            self.add_region(gpa, size, uaddr, mmap_offset, fd)

    def add_region(self, uint64_t gpa, uint64_t size, uint64_t uaddr, uint64_t mmap_offset, int fd):
        """Map one region (ADD_MEM_REG, or one entry of SET_MEM_TABLE)."""
        cdef stat st
        cdef uint32_t i
        cdef mem_region_t *r
        cdef size_t length, page
        cdef void *base
        if self.mem.nregions >= MAX_MEM_REGIONS:
            raise ValueError("too many memory regions (at most %d)" % MAX_MEM_REGIONS)
        if size == 0:
            raise ValueError("memory region of size 0")
        if gpa + size < gpa or uaddr + size < uaddr or mmap_offset + size < mmap_offset:
            raise ValueError("memory region wraps around the address space")
        for i in range(self.mem.nregions):
            r = &self.mem.regions[i]
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise ValueError("memory region [%#x, +%#x) overlaps another" % (gpa, size))
            if uaddr < r.uaddr + r.size and r.uaddr < uaddr + size:
                raise ValueError("memory region user address [%#x, +%#x) overlaps another" % (uaddr, size))
        if fstat(fd, &st) != 0:
            raise OSError(errno, "fstat of memory region fd failed")
        if (st.st_mode & 0o170000) == 0o100000 or st.st_size > 0:
            # Regular files and memfds have a size: the mapping must not pass it.
            if <uint64_t>st.st_size < mmap_offset + size:
                raise ValueError("memory region [%#x, +%#x) at offset %#x exceeds its fd (%d bytes)"
                                 % (gpa, size, mmap_offset, st.st_size))
        page = st.st_blksize if st.st_blksize > 4096 else 4096
        length = <size_t>(mmap_offset + size)
        length = (length + page - 1) // page * page
        # The region sits between two inaccessible guard areas: an access that strays past its
        # edges faults at once instead of touching whatever the process mapped next to it.
        reserved = mmap(NULL, length + 2 * GUARD_BYTES, PROT_NONE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if reserved == MAP_FAILED:
            raise OSError(errno, "cannot reserve address space for a memory region")
        base = mmap(<uint8_t *>reserved + GUARD_BYTES, length, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_FIXED, fd, 0)
        if base == MAP_FAILED:
            err = errno
            munmap(reserved, length + 2 * GUARD_BYTES)
            raise OSError(err, "mmap of memory region failed")
        i = self.mem.nregions
        self.guard[i] = vhd_guard_add(<size_t>base, length, page)
        if self.guard[i] < 0:
            munmap(reserved, length + 2 * GUARD_BYTES)
            raise ValueError("too many guarded mappings")
        self.map_base[i] = reserved
        self.map_len[i] = length + 2 * GUARD_BYTES
        r = &self.mem.regions[i]
        r.gpa = gpa
        r.size = size
        r.uaddr = uaddr
        r.hva = <uint8_t *>base + mmap_offset
        self.mem.nregions = i + 1

    def remove_region(self, uint64_t gpa, uint64_t size, uint64_t uaddr):
        """Unmap the region matching gpa, size and uaddr (REM_MEM_REG); KeyError if none does."""
        cdef uint32_t i, j
        for i in range(self.mem.nregions):
            r = &self.mem.regions[i]
            if r.gpa == gpa and r.size == size and r.uaddr == uaddr:
                vhd_guard_remove(self.guard[i])
                munmap(self.map_base[i], self.map_len[i])
                for j in range(i, self.mem.nregions - 1):
                    self.mem.regions[j] = self.mem.regions[j + 1]
                    self.map_base[j] = self.map_base[j + 1]
                    self.map_len[j] = self.map_len[j + 1]
                    self.guard[j] = self.guard[j + 1]
                self.mem.nregions -= 1
                return
        raise KeyError("no memory region at gpa %#x size %#x uaddr %#x" % (gpa, size, uaddr))

    @property
    def regions(self):
        """(gpa, size, uaddr) of each mapped region."""
        return [(self.mem.regions[i].gpa, self.mem.regions[i].size, self.mem.regions[i].uaddr)
                for i in range(self.mem.nregions)]

    def __len__(self):
        return self.mem.nregions

    @property
    def truncated(self):
        """True once the front-end truncated a region's file under us and a lost page was
        touched (it now reads zeros): the session must end."""
        cdef uint32_t i
        for i in range(self.mem.nregions):
            if vhd_guard_truncated(self.guard[i]):
                return True
        return False

    def translate(self, uint64_t gpa, uint64_t length):
        """Host segments of a guest range as (host address, length) pairs, or None if any byte is
        outside guest memory (for tests)."""
        cdef iovec iov[MAX_IOV]
        cdef int n = gpa_to_iov(self.mem, gpa, length, iov, MAX_IOV)
        if n < 0:
            return None
        return [(<size_t>iov[k].iov_base, iov[k].iov_len) for k in range(n)]

    def read(self, uint64_t gpa, uint64_t length):
        """Copy guest bytes out (tests and the initiator); ValueError if outside guest memory."""
        cdef iovec iov[MAX_IOV]
        cdef int n = gpa_to_iov(self.mem, gpa, length, iov, MAX_IOV)
        if n < 0:
            raise ValueError("guest range [%#x, +%#x) is outside guest memory" % (gpa, length))
        return b"".join([(<char *>iov[k].iov_base)[:iov[k].iov_len] for k in range(n)])

    def write(self, uint64_t gpa, const uint8_t[:] data):
        """Copy bytes into guest memory (tests and the initiator)."""
        cdef iovec iov[MAX_IOV]
        cdef int n = gpa_to_iov(self.mem, gpa, data.shape[0], iov, MAX_IOV)
        cdef size_t done = 0
        if n < 0:
            raise ValueError("guest range [%#x, +%#x) is outside guest memory" % (gpa, data.shape[0]))
        for k in range(n):
            if iov[k].iov_len:
                memcpy(iov[k].iov_base, &data[done], iov[k].iov_len)
            done += iov[k].iov_len

    def close(self):
        """Unmap every region.  The caller guarantees no reactor still uses this table."""
        cdef uint32_t i
        if self.mem == NULL:
            return
        for i in range(self.mem.nregions):
            vhd_guard_remove(self.guard[i])
            munmap(self.map_base[i], self.map_len[i])
        self.mem.nregions = 0

    def __dealloc__(self):
        if self.mem != NULL:
            self.close()
            free(self.mem)
            self.mem = NULL


cdef inline bint hva_to_gpa(const guest_mem_t *mem, const uint8_t *hva, uint64_t *gpa) noexcept nogil:
    """The guest address of a host pointer into a mapped region (the dirty log needs it for
    buffers translated at pop time).  False if the pointer is outside every region."""
    cdef uint32_t i
    cdef const mem_region_t *r
    for i in range(mem.nregions):
        r = &mem.regions[i]
        if r.hva <= hva and <uint64_t>(hva - r.hva) < r.size:
            gpa[0] = r.gpa + <uint64_t>(hva - r.hva)
            return True
    return False


cdef class DirtyLog:
    """The dirty-page bitmap of a live migration (SET_LOG_BASE): ``size_bytes`` of the fd at
    ``offset``, mapped MAP_SHARED; bit ``page % 8`` of byte ``page // 8`` stands for the guest
    page at ``page * 4096``.  The fd is not kept.  The mapping is guarded as guest memory is (a
    front-end that truncates the file costs it its session, not the daemon); close() only after
    no queue points into it."""
    cdef uint8_t *base
    cdef size_t map_len
    cdef void *map_base
    cdef readonly uint64_t size_bytes
    cdef int guard

    def __cinit__(self, int fd, uint64_t size_bytes, uint64_t offset):
        cdef stat st
        cdef size_t length
        self.guard = -1
        if size_bytes == 0:
            raise ValueError("dirty log of size 0")
        if offset + size_bytes < offset:
            raise ValueError("dirty log wraps around")
        if fstat(fd, &st) != 0:
            raise OSError(errno, "fstat of the dirty log fd failed")
        if (st.st_mode & 0o170000) == 0o100000 or st.st_size > 0:
            if <uint64_t>st.st_size < offset + size_bytes:
                raise ValueError("dirty log [%#x, +%#x) exceeds its fd (%d bytes)"
                                 % (offset, size_bytes, st.st_size))
        length = <size_t>((offset + size_bytes + 4095) // 4096 * 4096)
        self.map_base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if self.map_base == MAP_FAILED:
            self.map_base = NULL
            raise OSError(errno, "mmap of the dirty log failed")
        self.map_len = length
        self.guard = vhd_guard_add(<size_t>self.map_base, length, 4096)
        if self.guard < 0:
            munmap(self.map_base, length)
            self.map_base = NULL
            raise ValueError("too many guarded mappings")
        self.base = <uint8_t *>self.map_base + offset
        self.size_bytes = size_bytes

    @property
    def truncated(self):
        return self.guard >= 0 and bool(vhd_guard_truncated(self.guard))

    def dirty_pages(self):
        """Page numbers whose bit is set (tests)."""
        cdef uint64_t i
        cdef int b
        pages = []
        if self.base == NULL:
            return pages
        for i in range(self.size_bytes):
            if self.base[i]:
                for b in range(8):
                    if self.base[i] & (1 << b):
                        pages.append(i * 8 + b)
        return pages

    def close(self):
        if self.map_base != NULL:
            vhd_guard_remove(self.guard)
            self.guard = -1
            munmap(self.map_base, self.map_len)
            self.map_base = NULL
            self.base = NULL

    def __dealloc__(self):
        self.close()
