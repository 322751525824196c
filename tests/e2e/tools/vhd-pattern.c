/*
 * vhd-pattern: writes and checks test data natively, in the e2e guest and on the host.
 *
 * A guest under TCG runs busybox's shell and `seq` at emulated-CPU speed: making 48 MiB of test data
 * that way took minutes on a slow host. This static program makes the same data in a fraction of a
 * second, and the host runs the very same binary to make or check what it expects, so both sides
 * agree byte for byte.
 *
 * The data is a function of a seed and the byte's position: the 8-byte little-endian word at position
 * 8*i is mix(seed, i). Writing or checking at a disk offset uses that offset as the position, so
 * "bytes [a, b) of this disk hold pattern S" means the same however the bytes got there, and a block
 * written to the wrong place, or left stale from an earlier phase (another seed), is caught. The seed
 * "zero" stands for all-zero bytes.
 *
 *   vhd-pattern gen   SEED POS LENGTH                     the bytes at [POS, POS+LENGTH) to stdout
 *   vhd-pattern write SEED PATH OFFSET LENGTH [-b BYTES] [-d] [-f]
 *   vhd-pattern check SEED PATH OFFSET LENGTH [-b BYTES] [-d]
 *   vhd-pattern spin  MIB                                 make MIB MiB in memory (speed calibration)
 *   vhd-pattern hold  SEED PATH OFFSET LENGTH DIR
 *                      keeps [OFFSET, OFFSET+LENGTH) of PATH in its memory across a live migration:
 *                      fills a buffer by CPU, creates DIR/ready; when DIR/read appears, reads the
 *                      range into the buffer with O_DIRECT (only the device writes those pages),
 *                      creates DIR/loaded; when DIR/check appears, checks the buffer as check does
 *   vhd-pattern randread PATH SPAN MILLISECONDS [-b BYTES] [-d]
 *                      reads of BYTES (default 4096) at random aligned offsets in [0, SPAN) for
 *                      MILLISECONDS, then prints "randread PATH ops=N bytes=B ms=T iops=I"
 *
 *   -b  bytes per read/write (default 65536)   -d  O_DIRECT   -f  fsync before exiting
 *
 * Numbers take K, M or G suffixes (powers of 1024). check prints "ok LENGTH" or the first differing
 * position and how many bytes of that chunk differ, and exits 1 on a mismatch; every other failure
 * exits 2 with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_CHUNK_BYTES 65536
#define DEFAULT_RANDREAD_BYTES 4096
#define ALIGN_BYTES 4096

static int zero_seed;

static void die(const char *what)
{
    fprintf(stderr, "vhd-pattern: %s: %s\n", what, errno ? strerror(errno) : "invalid");
    exit(2);
}

static void usage(void)
{
    fputs("usage: vhd-pattern gen SEED POS LENGTH\n"
          "       vhd-pattern write SEED PATH OFFSET LENGTH [-b BYTES] [-d] [-f]\n"
          "       vhd-pattern check SEED PATH OFFSET LENGTH [-b BYTES] [-d]\n"
          "       vhd-pattern spin MIB\n"
          "       vhd-pattern hold SEED PATH OFFSET LENGTH DIR\n"
          "       vhd-pattern randread PATH SPAN MILLISECONDS [-b BYTES] [-d]\n", stderr);
    exit(2);
}

static uint64_t parse_size(const char *text)
{
    char *end;
    errno = 0;
    uint64_t value = strtoull(text, &end, 0);
    if (errno || end == text)
        usage();
    switch (*end) {
    case 'K': case 'k': value <<= 10; end++; break;
    case 'M': case 'm': value <<= 20; end++; break;
    case 'G': case 'g': value <<= 30; end++; break;
    }
    if (*end)
        usage();
    return value;
}

static uint64_t parse_seed(const char *text)
{
    if (strcmp(text, "zero") == 0) {
        zero_seed = 1;
        return 0;
    }
    return parse_size(text);
}

/* A 64-bit finalizer (splitmix64's): every input bit moves every output bit. */
static inline uint64_t mix(uint64_t seed, uint64_t index)
{
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + index * 0xd1b54a32d192ed03ull + 1;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The pattern's bytes at positions [pos, pos + len) into buf. */
static void fill(uint64_t seed, uint64_t pos, unsigned char *buf, size_t len)
{
    if (zero_seed) {
        memset(buf, 0, len);
        return;
    }
    size_t done = 0;
    while (done < len) {
        uint64_t at = pos + done;
        uint64_t word = mix(seed, at >> 3);
        unsigned shift = (unsigned)(at & 7);
        if (shift == 0 && len - done >= 8) {
            memcpy(buf + done, &word, 8);   /* x86 and the guest are little-endian */
            done += 8;
            continue;
        }
        buf[done++] = (unsigned char)(word >> (8 * shift));
    }
}

static unsigned char *chunk_buffer(size_t bytes)
{
    void *buf;
    if (posix_memalign(&buf, ALIGN_BYTES, bytes ? bytes : 1) != 0)
        die("out of memory");
    return buf;
}

static void write_all(int fd, const unsigned char *buf, size_t len, uint64_t offset, int positioned)
{
    while (len > 0) {
        ssize_t n = positioned ? pwrite(fd, buf, len, (off_t)offset) : write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die(positioned ? "write" : "write to stdout");
        buf += n;
        len -= (size_t)n;
        offset += (uint64_t)n;
    }
}

static int cmd_gen(uint64_t seed, uint64_t pos, uint64_t length)
{
    unsigned char *buf = chunk_buffer(DEFAULT_CHUNK_BYTES);
    while (length > 0) {
        size_t n = length < DEFAULT_CHUNK_BYTES ? (size_t)length : DEFAULT_CHUNK_BYTES;
        fill(seed, pos, buf, n);
        write_all(STDOUT_FILENO, buf, n, 0, 0);
        pos += n;
        length -= n;
    }
    return 0;
}

static int open_target(const char *path, int flags, int direct)
{
    int fd = open(path, flags | (direct ? O_DIRECT : 0));
    if (fd < 0)
        die(path);
    return fd;
}

static int cmd_write(uint64_t seed, const char *path, uint64_t offset, uint64_t length,
                     size_t chunk, int direct, int sync)
{
    int fd = open_target(path, O_WRONLY, direct);
    unsigned char *buf = chunk_buffer(chunk);
    while (length > 0) {
        size_t n = length < chunk ? (size_t)length : chunk;
        fill(seed, offset, buf, n);
        write_all(fd, buf, n, offset, 1);
        offset += n;
        length -= n;
    }
    if (sync && fsync(fd) != 0)
        die("fsync");
    if (close(fd) != 0)
        die("close");
    return 0;
}

static int cmd_check(uint64_t seed, const char *path, uint64_t offset, uint64_t length,
                     size_t chunk, int direct)
{
    int fd = open_target(path, O_RDONLY, direct);
    unsigned char *want = chunk_buffer(chunk), *got = chunk_buffer(chunk);
    uint64_t total = length;
    while (length > 0) {
        size_t n = length < chunk ? (size_t)length : chunk;
        ssize_t r = pread(fd, got, n, (off_t)offset);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die("read");
        if (r == 0) {
            printf("short at %" PRIu64 ": the data ends there\n", offset);
            return 1;
        }
        fill(seed, offset, want, (size_t)r);
        if (memcmp(want, got, (size_t)r) != 0) {
            size_t first = 0, bad = 0;
            while (want[first] == got[first])
                first++;
            for (size_t i = first; i < (size_t)r; i++)
                bad += want[i] != got[i];
            printf("mismatch at %" PRIu64 ": %zu of the %zd bytes from %" PRIu64 " differ\n",
                   offset + first, bad, r, offset);
            return 1;
        }
        offset += (uint64_t)r;
        length -= (uint64_t)r;
    }
    printf("ok %" PRIu64 "\n", total);
    return 0;
}

static void touch_file(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || close(fd) != 0)
        die(path);
}

static void wait_file(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    while (access(path, F_OK) != 0)
        usleep(10000);
}

static int cmd_hold(uint64_t seed, const char *path, uint64_t offset, uint64_t length, const char *dir)
{
    int fd = open_target(path, O_RDONLY, 1);
    unsigned char *held = chunk_buffer((size_t)length), *want = chunk_buffer(DEFAULT_CHUNK_BYTES);
    memset(held, 0xEE, (size_t)length);
    touch_file(dir, "ready");
    wait_file(dir, "read");
    for (uint64_t done = 0; done < length;) {
        size_t n = length - done < DEFAULT_CHUNK_BYTES ? (size_t)(length - done) : DEFAULT_CHUNK_BYTES;
        ssize_t r = pread(fd, held + done, n, (off_t)(offset + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r != (ssize_t)n)
            die("read");
        done += n;
    }
    touch_file(dir, "loaded");
    wait_file(dir, "check");
    for (uint64_t done = 0; done < length; done += DEFAULT_CHUNK_BYTES) {
        size_t n = length - done < DEFAULT_CHUNK_BYTES ? (size_t)(length - done) : DEFAULT_CHUNK_BYTES;
        fill(seed, offset + done, want, n);
        if (memcmp(want, held + done, n) != 0) {
            size_t first = 0, bad = 0;
            while (want[first] == held[done + first])
                first++;
            for (size_t i = first; i < n; i++)
                bad += want[i] != held[done + i];
            printf("mismatch at %" PRIu64 ": %zu of the %zu bytes from %" PRIu64 " differ\n",
                   offset + done + first, bad, n, offset + done);
            return 1;
        }
    }
    printf("ok %" PRIu64 "\n", length);
    return 0;
}

static int cmd_spin(uint64_t mib)
{
    unsigned char *buf = chunk_buffer(DEFAULT_CHUNK_BYTES);
    uint64_t sum = 0;
    for (uint64_t pos = 0; pos < mib << 20; pos += DEFAULT_CHUNK_BYTES) {
        fill(1, pos, buf, DEFAULT_CHUNK_BYTES);
        sum += buf[pos % DEFAULT_CHUNK_BYTES];
    }
    printf("spun %" PRIu64 " MiB (%" PRIu64 ")\n", mib, sum);
    return 0;
}

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

/* One read at a time, so that ops per second is the round trip of a request through the device. */
static int cmd_randread(const char *path, uint64_t span, uint64_t ms, size_t chunk, int direct)
{
    uint64_t slots = span / chunk;
    if (slots == 0)
        usage();
    int fd = open_target(path, O_RDONLY, direct);
    unsigned char *buf = chunk_buffer(chunk);
    uint64_t start = monotonic_ns(), end = start + ms * UINT64_C(1000000), now = start, ops = 0;
    while (now < end) {
        uint64_t offset = mix(span, ops) % slots * chunk;
        ssize_t r = pread(fd, buf, chunk, (off_t)offset);
        if (r < 0 && errno == EINTR)
            continue;
        if (r != (ssize_t)chunk)
            die("read");
        ops++;
        now = monotonic_ns();
    }
    uint64_t elapsed_us = (now - start) / 1000;
    uint64_t iops = elapsed_us ? ops * UINT64_C(1000000) / elapsed_us : 0;
    printf("randread %s ops=%" PRIu64 " bytes=%" PRIu64 " ms=%" PRIu64 " iops=%" PRIu64 "\n", path, ops,
           ops * chunk, elapsed_us / 1000, iops);
    return 0;
}

static void parse_io_options(int argc, char **argv, int first, int writing, size_t *chunk, int *direct,
                             int *sync)
{
    for (int i = first; i < argc; i++) {
        if (strcmp(argv[i], "-b") == 0 && i + 1 < argc)
            *chunk = (size_t)parse_size(argv[++i]);
        else if (strcmp(argv[i], "-d") == 0)
            *direct = 1;
        else if (strcmp(argv[i], "-f") == 0 && writing)
            *sync = 1;
        else
            usage();
    }
    if (*chunk == 0)
        usage();
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *cmd = argv[1];
    if (strcmp(cmd, "spin") == 0)
        return argc == 3 ? cmd_spin(parse_size(argv[2])) : (usage(), 2);
    size_t chunk = DEFAULT_CHUNK_BYTES;
    int direct = 0, sync = 0;
    if (strcmp(cmd, "randread") == 0) {
        if (argc < 5)
            usage();
        chunk = DEFAULT_RANDREAD_BYTES;
        parse_io_options(argc, argv, 5, 0, &chunk, &direct, &sync);
        return cmd_randread(argv[2], parse_size(argv[3]), parse_size(argv[4]), chunk, direct);
    }
    uint64_t seed = parse_seed(argv[2]);
    if (strcmp(cmd, "gen") == 0) {
        if (argc != 5)
            usage();
        return cmd_gen(seed, parse_size(argv[3]), parse_size(argv[4]));
    }
    if (strcmp(cmd, "hold") == 0) {
        if (argc != 7)
            usage();
        return cmd_hold(seed, argv[3], parse_size(argv[4]), parse_size(argv[5]), argv[6]);
    }
    int writing = strcmp(cmd, "write") == 0;
    if ((!writing && strcmp(cmd, "check") != 0) || argc < 6)
        usage();
    parse_io_options(argc, argv, 6, writing, &chunk, &direct, &sync);
    uint64_t offset = parse_size(argv[4]), length = parse_size(argv[5]);
    return writing ? cmd_write(seed, argv[3], offset, length, chunk, direct, sync)
                   : cmd_check(seed, argv[3], offset, length, chunk, direct);
}
