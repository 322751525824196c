# Scatter-gather helpers over iovec arrays (device headers may straddle descriptors: every parse
# goes through these, never through a pointer into the first segment).


cdef size_t iov_total(const iovec *iov, int n) noexcept nogil:
    cdef size_t total = 0
    cdef int i
    for i in range(n):
        total += iov[i].iov_len
    return total


cdef size_t iov_to_buf(const iovec *iov, int n, size_t offset, void *dst, size_t length) noexcept nogil:
    """Copy up to length bytes starting offset bytes into the iovecs; returns bytes copied."""
    cdef size_t done = 0
    cdef size_t chunk
    cdef int i
    for i in range(n):
        if done == length:
            break
        if offset >= iov[i].iov_len:
            offset -= iov[i].iov_len
            continue
        chunk = iov[i].iov_len - offset
        if chunk > length - done:
            chunk = length - done
        memcpy(<uint8_t *>dst + done, <uint8_t *>iov[i].iov_base + offset, chunk)
        done += chunk
        offset = 0
    return done


cdef size_t buf_to_iov(const iovec *iov, int n, size_t offset, const void *src, size_t length) noexcept nogil:
    """Copy up to length bytes into the iovecs starting offset bytes in; returns bytes copied."""
    cdef size_t done = 0
    cdef size_t chunk
    cdef int i
    for i in range(n):
        if done == length:
            break
        if offset >= iov[i].iov_len:
            offset -= iov[i].iov_len
            continue
        chunk = iov[i].iov_len - offset
        if chunk > length - done:
            chunk = length - done
        memcpy(<uint8_t *>iov[i].iov_base + offset, <const uint8_t *>src + done, chunk)
        done += chunk
        offset = 0
    return done


cdef size_t iov_zero(const iovec *iov, int n, size_t offset, size_t length) noexcept nogil:
    """Zero up to length bytes starting offset bytes in; returns bytes zeroed."""
    cdef size_t done = 0
    cdef size_t chunk
    cdef int i
    for i in range(n):
        if done == length:
            break
        if offset >= iov[i].iov_len:
            offset -= iov[i].iov_len
            continue
        chunk = iov[i].iov_len - offset
        if chunk > length - done:
            chunk = length - done
        memset(<uint8_t *>iov[i].iov_base + offset, 0, chunk)
        done += chunk
        offset = 0
    return done


cdef int iov_skip_head(iovec *iov, int n, size_t nbytes) noexcept nogil:
    """Consume nbytes from the front in place; returns the index of the first remaining segment
    (segments before it are used up).  The caller ensures nbytes ≤ iov_total."""
    cdef int i = 0
    while i < n and nbytes > 0:
        if nbytes >= iov[i].iov_len:
            nbytes -= iov[i].iov_len
            iov[i].iov_len = 0
            i += 1
        else:
            iov[i].iov_base = <uint8_t *>iov[i].iov_base + nbytes
            iov[i].iov_len -= nbytes
            nbytes = 0
    while i < n and iov[i].iov_len == 0:
        i += 1
    return i


cdef int iov_trim_tail(iovec *iov, int n, size_t nbytes) noexcept nogil:
    """Drop nbytes from the end in place; returns the new number of segments.  The caller
    ensures nbytes ≤ iov_total."""
    while n > 0 and nbytes > 0:
        if nbytes >= iov[n - 1].iov_len:
            nbytes -= iov[n - 1].iov_len
            n -= 1
        else:
            iov[n - 1].iov_len -= nbytes
            nbytes = 0
    return n


# ---------------------------------------------------------------------------------------------
# Byte order of wire fields: SCSI CDB and parameter fields are big-endian, virtio fields
# little-endian
# ---------------------------------------------------------------------------------------------
cdef inline uint32_t _be16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]

cdef inline uint32_t _be24(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]

cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline uint64_t _be64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)

cdef inline void _put_be16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v

cdef inline void _put_be32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v

cdef inline void _put_be64(uint8_t *p, uint64_t v) noexcept nogil:
    _put_be32(p, <uint32_t>(v >> 32))
    _put_be32(p + 4, <uint32_t>v)

cdef inline void _put_le32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)

cdef inline uint32_t _le32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)
