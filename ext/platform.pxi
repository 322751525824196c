# Machine-level helpers of the data plane: tick counter, memory ordering, eventfds.
# x86 is TSO: publishing ring entries needs only compiler barriers, and a full fence where a store
# must be visible before a following load (vhost_user.md §3.4).

from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    #if defined(__x86_64__) || defined(__i386__)
    #include <x86intrin.h>
    static inline uint64_t vhd_ticks(void) { return __rdtsc(); }
    static inline void vhd_cpu_relax(void) { _mm_pause(); }
    #else
    static inline uint64_t vhd_ticks(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }
    static inline void vhd_cpu_relax(void) { }
    #endif
    /* A reactor reads the TSC at the start of each pass and whenever a queue shows it new
       requests (vq_pop), and lets the per-request code use that value (vhd_clock); any other
       thread gets the TSC itself.  initial-exec: the extension is dlopen()ed, and the default
       TLS model would call __tls_get_addr at every use (35-50 instructions a request under
       callgrind); these 12 bytes fit in the static TLS that glibc keeps for such libraries. */
    static __thread uint64_t vhd_now_tick __attribute__((tls_model("initial-exec")));
    static __thread int vhd_clock_cached __attribute__((tls_model("initial-exec")));
    static inline uint64_t vhd_clock(void) { return vhd_clock_cached ? vhd_now_tick : vhd_ticks(); }
    static inline uint64_t vhd_clock_refresh(void) { return vhd_now_tick = vhd_ticks(); }
    static inline void vhd_clock_cache(int on) { vhd_clock_cached = on; if (on) vhd_now_tick = vhd_ticks(); }
    static inline uint64_t vhd_monotonic_ns(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }
    static inline void vhd_full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline void vhd_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }
    static inline uint16_t vhd_load_u16(const uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void vhd_store_u16(uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint32_t vhd_load_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void vhd_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t vhd_load_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void vhd_store_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int64_t vhd_fetch_add_i64(int64_t *p, int64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    /* Sequentially consistent: a SCSI command counts itself in flight, then checks its target is
       still there; the control plane marks the target removing, then waits for the count. */
    static inline uint32_t vhd_add_u32_sc(uint32_t *p, int32_t v) { return __atomic_add_fetch(p, (uint32_t)v, __ATOMIC_SEQ_CST); }
    static inline uint32_t vhd_load_u32_sc(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void vhd_store_u32_sc(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline uint32_t vhd_exchange_u32_sc(uint32_t *p, uint32_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int vhd_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    static inline void vhd_store_ptr(void **p, void *v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int vhd_cas_ptr(void **p, void *expected, void *desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    static inline void *vhd_load_ptr(void **p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void *vhd_exchange_ptr(void **p, void *v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
    static inline int vhd_clz64(uint64_t v) { return v ? __builtin_clzll(v) : 64; }
    /* The dirty log is shared with the front-end, which clears bits while we set others. */
    static inline void vhd_or_u8(uint8_t *p, uint8_t v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
    """
    uint64_t vhd_ticks() nogil
    uint64_t vhd_clock() nogil
    uint64_t vhd_clock_refresh() nogil
    void vhd_clock_cache(int on) nogil
    uint64_t vhd_monotonic_ns() nogil
    void vhd_cpu_relax() nogil
    void vhd_full_fence() nogil
    void vhd_compiler_barrier() nogil
    uint16_t vhd_load_u16(const uint16_t *p) nogil
    void vhd_store_u16(uint16_t *p, uint16_t v) nogil
    uint32_t vhd_load_u32(const uint32_t *p) nogil
    uint32_t vhd_add_u32_sc(uint32_t *p, int32_t v) nogil
    uint32_t vhd_load_u32_sc(const uint32_t *p) nogil
    void vhd_store_u32_sc(uint32_t *p, uint32_t v) nogil
    uint32_t vhd_exchange_u32_sc(uint32_t *p, uint32_t v) nogil
    void vhd_store_u32(uint32_t *p, uint32_t v) nogil
    uint64_t vhd_load_u64(const uint64_t *p) nogil
    void vhd_store_u64(uint64_t *p, uint64_t v) nogil
    int64_t vhd_fetch_add_i64(int64_t *p, int64_t v) nogil
    int vhd_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) nogil
    void vhd_store_ptr(void **p, void *v) nogil
    int vhd_cas_ptr(void **p, void *expected, void *desired) nogil
    void *vhd_load_ptr(void **p) nogil
    void *vhd_exchange_ptr(void **p, void *v) nogil
    int vhd_clz64(uint64_t v) nogil
    void vhd_or_u8(uint8_t *p, uint8_t v) nogil

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)


cdef inline void eventfd_signal(int fd) noexcept nogil:
    """Add one to an eventfd (a kick, a call or a doorbell); a full counter already wakes the reader."""
    cdef uint64_t one = 1
    if fd >= 0:
        while write(fd, &one, 8) < 0 and errno == EINTR:
            pass


cdef inline uint64_t eventfd_drain(int fd) noexcept nogil:
    """Read and reset a non-blocking eventfd; returns the count it held (0 if none)."""
    cdef uint64_t value = 0
    if fd < 0:
        return 0
    while read(fd, &value, 8) < 0:
        if errno != EINTR:
            return 0
    return value


cdef uint64_t _tick_rate = 0


cdef uint64_t calibrate_tick_rate() noexcept nogil:
    """Measure ticks per second against CLOCK_MONOTONIC_RAW over ~20 ms."""
    cdef uint64_t t0 = vhd_monotonic_ns()
    cdef uint64_t c0 = vhd_ticks()
    cdef uint64_t t1 = t0
    while t1 - t0 < 20000000:
        t1 = vhd_monotonic_ns()
    cdef uint64_t c1 = vhd_ticks()
    return <uint64_t>((<double>(c1 - c0)) * 1e9 / <double>(t1 - t0))


def tick_rate():
    """Ticks per second of every tick counter the data plane reports (the TSC on x86)."""
    global _tick_rate
    if _tick_rate == 0:
        with nogil:
            _tick_rate = calibrate_tick_rate()
    return _tick_rate


def ticks():
    """The current tick counter."""
    return vhd_ticks()
