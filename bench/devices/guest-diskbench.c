/*
 * In-guest disk benchmark for bench/devices/guest-disk.ts (built there with
 * `gcc -static -O2` and added to the guest initramfs as /bin/diskbench).
 *
 * usage: diskbench DEVICE SEQ_MIB RANDOM_OPS NONCE [WRITE_KIB [REQUEST_KIB [RANDOM_MS]]]
 *
 * On a block device opened with O_DIRECT (the guest page cache is out of the
 * way), queue depth 1, one thread:
 *   seqwrite  WRITE_KIB KiB (default SEQ_MIB MiB) in REQUEST_KIB (default
 *             1024) KiB writes from offset 0, then fdatasync (the flush is
 *             timed apart: "flush ms=")
 *   seqread   SEQ_MIB MiB from offset 0 in 1 MiB reads
 *   randread  RANDOM_OPS 4 KiB reads at pseudo-random 4 KiB-aligned offsets
 *             inside the first SEQ_MIB MiB (xorshift64, fixed seed: every
 *             run reads the same offsets), stopping early once RANDOM_MS
 *             milliseconds have passed (0: no limit; ops= says how many ran)
 * Every 4 KiB block carries its byte offset and NONCE (two little-endian
 * 64-bit words) in its first 16 bytes: the host stamps the first SEQ_MIB MiB
 * of the image that way before the run and the writes rewrite the same
 * stamps, so the reads can check every block whatever was written. "errors="
 * counts the blocks that came back wrong (0 unless the device path corrupts
 * data).
 *
 * Prints one line per pattern:
 *   DISKBENCH-START <pattern>
 *   DISKBENCH <pattern> MiB/s=<x> IOPS=<x> ms=<x> bytes=<n> ops=<n> errors=<n>
 * and DISKBENCH-FAIL <reason> on any error. Exit status 0 when all ran.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024u * 1024u)
#define BLOCK 4096u

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void fail(const char *what, const char *pattern) {
  printf("DISKBENCH-FAIL %s %s: %s\n", pattern, what, strerror(errno));
  fflush(stdout);
  exit(1);
}

static void report(const char *pattern, double ms, uint64_t bytes, uint64_t ops, uint64_t errors) {
  double secs = ms / 1e3;
  printf("DISKBENCH %s MiB/s=%.4g IOPS=%.4g ms=%.3f bytes=%llu ops=%llu errors=%llu\n", pattern,
         secs > 0 ? (double)bytes / MIB / secs : 0.0, secs > 0 ? (double)ops / secs : 0.0, ms,
         (unsigned long long)bytes, (unsigned long long)ops, (unsigned long long)errors);
  fflush(stdout);
}

static void start(const char *pattern) {
  printf("DISKBENCH-START %s\n", pattern);
  fflush(stdout);
}

static void stamp(unsigned char *block, uint64_t offset, uint64_t nonce) {
  memcpy(block, &offset, 8);
  memcpy(block + 8, &nonce, 8);
}

static int stamp_ok(const unsigned char *block, uint64_t offset, uint64_t nonce) {
  uint64_t o, n;
  memcpy(&o, block, 8);
  memcpy(&n, block + 8, 8);
  return o == offset && n == nonce;
}

static uint64_t xorshift64(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s DEVICE SEQ_MIB RANDOM_OPS NONCE [WRITE_KIB [REQUEST_KIB [RANDOM_MS]]]\n", argv[0]);
    return 2;
  }
  const char *dev = argv[1];
  uint64_t seq_mib = strtoull(argv[2], NULL, 10);
  uint64_t random_ops = strtoull(argv[3], NULL, 10);
  uint64_t nonce = strtoull(argv[4], NULL, 10);
  uint64_t write_kib = argc > 5 ? strtoull(argv[5], NULL, 10) : seq_mib * 1024;
  uint64_t request_kib = argc > 6 ? strtoull(argv[6], NULL, 10) : 1024;
  double random_ms = argc > 7 ? strtod(argv[7], NULL) : 0;
  if (write_kib > seq_mib * 1024 || request_kib == 0 || request_kib > 1024 || (request_kib & 3) != 0 || write_kib % request_kib != 0) {
    errno = EINVAL;
    fail("WRITE_KIB must be <= SEQ_MIB MiB and REQUEST_KIB a multiple of 4 up to 1024 dividing it", dev);
  }

  int fd = open(dev, O_RDWR | O_DIRECT);
  if (fd < 0) fail("open", dev);
  uint64_t dev_bytes = 0;
  if (ioctl(fd, BLKGETSIZE64, &dev_bytes) != 0) {
    /* A regular file (for trying the tool on a host). */
    struct stat st;
    if (fstat(fd, &st) != 0) fail("BLKGETSIZE64/fstat", dev);
    dev_bytes = (uint64_t)st.st_size;
  }
  if (seq_mib == 0 || seq_mib * MIB > dev_bytes) {
    errno = EINVAL;
    fail("SEQ_MIB is 0 or larger than the device", dev);
  }
  printf("DISKBENCH-DEVICE %s bytes=%llu\n", dev, (unsigned long long)dev_bytes);

  unsigned char *buf;
  if (posix_memalign((void **)&buf, BLOCK, MIB) != 0) fail("posix_memalign", dev);
  uint64_t seq_bytes = seq_mib * MIB;
  uint64_t write_bytes = write_kib * 1024u;
  uint32_t wsize = (uint32_t)request_kib * 1024u;
  memset(buf, 0, MIB);

  /* Sequential writes (1 MiB unless REQUEST_KIB says otherwise). */
  start("seqwrite");
  double t0 = now_ms();
  for (uint64_t off = 0; off < write_bytes; off += wsize) {
    for (uint32_t b = 0; b < wsize; b += BLOCK) stamp(buf + b, off + b, nonce);
    ssize_t n = pwrite(fd, buf, wsize, (off_t)off);
    if (n != (ssize_t)wsize) {
      if (n >= 0) errno = EIO;
      fail("pwrite", "seqwrite");
    }
  }
  double t1 = now_ms();
  report("seqwrite", t1 - t0, write_bytes, write_bytes / wsize, 0);
  /* Timed after the report line: printing it goes through the serial console (an exit per byte). */
  double tf = now_ms();
  if (fdatasync(fd) != 0) fail("fdatasync", "seqwrite");
  printf("DISKBENCH flush ms=%.1f\n", now_ms() - tf);
  fflush(stdout);

  /* Sequential 1 MiB reads, checked. */
  start("seqread");
  uint64_t errors = 0;
  t0 = now_ms();
  for (uint64_t off = 0; off < seq_bytes; off += MIB) {
    ssize_t n = pread(fd, buf, MIB, (off_t)off);
    if (n != (ssize_t)MIB) {
      if (n >= 0) errno = EIO;
      fail("pread", "seqread");
    }
    for (uint32_t b = 0; b < MIB; b += BLOCK) errors += !stamp_ok(buf + b, off + b, nonce);
  }
  report("seqread", now_ms() - t0, seq_bytes, seq_mib, errors);

  /* Random 4 KiB reads inside the written range, checked. */
  start("randread");
  uint64_t blocks = seq_bytes / BLOCK;
  uint64_t state = 0x9e3779b97f4a7c15ull;
  errors = 0;
  t0 = now_ms();
  uint64_t done = 0;
  for (uint64_t i = 0; i < random_ops; i++) {
    if (random_ms > 0 && (i & 15) == 0 && now_ms() - t0 >= random_ms) break;
    uint64_t off = (xorshift64(&state) % blocks) * BLOCK;
    ssize_t n = pread(fd, buf, BLOCK, (off_t)off);
    if (n != (ssize_t)BLOCK) {
      if (n >= 0) errno = EIO;
      fail("pread", "randread");
    }
    errors += !stamp_ok(buf, off, nonce);
    done++;
  }
  report("randread", now_ms() - t0, done * BLOCK, done, errors);

  close(fd);
  free(buf);
  printf("DISKBENCH-DONE\n");
  fflush(stdout);
  return 0;
}
