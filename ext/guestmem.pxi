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
                munmap(self.map_base[i], self.map_len[i])
                for j in range(i, self.mem.nregions - 1):
                    self.mem.regions[j] = self.mem.regions[j + 1]
                    self.map_base[j] = self.map_base[j + 1]
                    self.map_len[j] = self.map_len[j + 1]
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
            munmap(self.map_base[i], self.map_len[i])
        self.mem.nregions = 0

    def __dealloc__(self):
        if self.mem != NULL:
            self.close()
            free(self.mem)
            self.mem = NULL
