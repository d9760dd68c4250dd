/*
 * In-guest disk benchmark for bench/devices/guest-disk.ts (built there with
 * `gcc -static -O2` and added to the guest initramfs as /bin/diskbench).
 *
 * usage: diskbench DEVICE SEQ_MIB RANDOM_OPS NONCE [WRITE_KIB [REQUEST_KIB [RANDOM_MS [QUEUE_DEPTH [QUEUED_OPS]]]]]
 *
 * On a block device opened with O_DIRECT (the guest page cache is out of the
 * way), one thread, queue depth 1 except for randreadq:
 *   seqwrite  WRITE_KIB KiB (default SEQ_MIB MiB) in REQUEST_KIB (default
 *             1024) KiB writes from offset 0, then fdatasync (the flush is
 *             timed apart: "flush ms=")
 *   seqread   SEQ_MIB MiB from offset 0 in 1 MiB reads
 *   randread  RANDOM_OPS 4 KiB reads at pseudo-random 4 KiB-aligned offsets
 *             inside the first SEQ_MIB MiB (xorshift64, fixed seed: every
 *             run reads the same offsets), stopping early once RANDOM_MS
 *             milliseconds have passed (0: no limit; ops= says how many ran)
 *   randreadq QUEUED_OPS (default 4 x RANDOM_OPS) 4 KiB reads as randread,
 *             but QUEUE_DEPTH (default 32; 0 skips the pattern) of them in
 *             flight at once through Linux native AIO (io_submit: what fio's
 *             libaio engine does; no library needed), the same time limit;
 *             "depth=" says the depth. A device with one command slot (IDE)
 *             serves them one by one; a device with a queue (virtio) gets
 *             them in batches.
 * Every 4 KiB block carries its byte offset and NONCE (two little-endian
 * 64-bit words) in its first 16 bytes: the host stamps the first SEQ_MIB MiB
 * of the image that way before the run and the writes rewrite the same
 * stamps, so the reads can check every block whatever was written. "errors="
 * counts the blocks that came back wrong (0 unless the device path corrupts
 * data).
 *
 * Prints one line per pattern:
 *   DISKBENCH-START <pattern>
 *   DISKBENCH <pattern> MiB/s=<x> IOPS=<x> ms=<x> bytes=<n> ops=<n> errors=<n> [depth=<n>]
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
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <sys/syscall.h>
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

static void report_line(const char *pattern, double ms, uint64_t bytes, uint64_t ops, uint64_t errors, const char *extra) {
  double secs = ms / 1e3;
  printf("DISKBENCH %s MiB/s=%.4g IOPS=%.4g ms=%.3f bytes=%llu ops=%llu errors=%llu%s\n", pattern,
         secs > 0 ? (double)bytes / MIB / secs : 0.0, secs > 0 ? (double)ops / secs : 0.0, ms,
         (unsigned long long)bytes, (unsigned long long)ops, (unsigned long long)errors, extra);
  fflush(stdout);
}

static void report(const char *pattern, double ms, uint64_t bytes, uint64_t ops, uint64_t errors) {
  report_line(pattern, ms, bytes, ops, errors, "");
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

/*
 * randreadq: QUEUED_OPS random 4 KiB reads with DEPTH in flight (Linux AIO).
 * Each slot has its own buffer; a completion is checked, then its slot is
 * refilled with the next offset, every refill of one io_getevents batch in
 * one io_submit.
 */
static void queued_random_reads(int fd, uint64_t blocks, uint64_t ops, unsigned depth, double limit_ms, uint64_t nonce) {
  aio_context_t ctx = 0;
  if (syscall(SYS_io_setup, depth, &ctx) != 0) fail("io_setup", "randreadq");
  unsigned char *bufs;
  if (posix_memalign((void **)&bufs, BLOCK, (size_t)depth * BLOCK) != 0) fail("posix_memalign", "randreadq");
  struct iocb *cbs = calloc(depth, sizeof *cbs);
  struct iocb **batch = calloc(depth, sizeof *batch);
  struct io_event *events = calloc(depth, sizeof *events);
  if (cbs == NULL || batch == NULL || events == NULL) fail("calloc", "randreadq");
  uint64_t state = 0x2545f4914f6cdd1dull;
  uint64_t issued = 0, done = 0, errors = 0;
  unsigned inflight = 0, n = 0;
  start("randreadq");
  double t0 = now_ms();
  int stop = 0;
  for (unsigned s = 0; s < depth && issued < ops; s++, issued++) {
    struct iocb *cb = &cbs[s];
    memset(cb, 0, sizeof *cb);
    cb->aio_data = s;
    cb->aio_lio_opcode = IOCB_CMD_PREAD;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)s * BLOCK);
    cb->aio_nbytes = BLOCK;
    cb->aio_offset = (int64_t)((xorshift64(&state) % blocks) * BLOCK);
    batch[n++] = cb;
  }
  while (n > 0 || inflight > 0) {
    if (n > 0) {
      long r = syscall(SYS_io_submit, ctx, (long)n, batch);
      if (r != (long)n) {
        if (r >= 0) errno = EAGAIN;
        fail("io_submit", "randreadq");
      }
      inflight += n;
      n = 0;
    }
    long got = syscall(SYS_io_getevents, ctx, 1L, (long)depth, events, NULL);
    if (got < 0) {
      if (errno == EINTR) continue;
      fail("io_getevents", "randreadq");
    }
    if (!stop && limit_ms > 0 && now_ms() - t0 >= limit_ms) stop = 1;
    for (long i = 0; i < got; i++) {
      struct iocb *cb = &cbs[events[i].data];
      inflight--;
      if (events[i].res != (int64_t)BLOCK) {
        errno = events[i].res < 0 ? (int)-events[i].res : EIO;
        fail("read", "randreadq");
      }
      errors += !stamp_ok((const unsigned char *)(uintptr_t)cb->aio_buf, (uint64_t)cb->aio_offset, nonce);
      done++;
      if (!stop && issued < ops) {
        cb->aio_offset = (int64_t)((xorshift64(&state) % blocks) * BLOCK);
        batch[n++] = cb;
        issued++;
      }
    }
  }
  double ms = now_ms() - t0;
  char extra[32];
  snprintf(extra, sizeof extra, " depth=%u", depth);
  report_line("randreadq", ms, done * BLOCK, done, errors, extra);
  syscall(SYS_io_destroy, ctx);
  free(events);
  free(batch);
  free(cbs);
  free(bufs);
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s DEVICE SEQ_MIB RANDOM_OPS NONCE [WRITE_KIB [REQUEST_KIB [RANDOM_MS [QUEUE_DEPTH [QUEUED_OPS]]]]]\n", argv[0]);
    return 2;
  }
  const char *dev = argv[1];
  uint64_t seq_mib = strtoull(argv[2], NULL, 10);
  uint64_t random_ops = strtoull(argv[3], NULL, 10);
  uint64_t nonce = strtoull(argv[4], NULL, 10);
  uint64_t write_kib = argc > 5 ? strtoull(argv[5], NULL, 10) : seq_mib * 1024;
  uint64_t request_kib = argc > 6 ? strtoull(argv[6], NULL, 10) : 1024;
  double random_ms = argc > 7 ? strtod(argv[7], NULL) : 0;
  uint64_t queue_depth = argc > 8 ? strtoull(argv[8], NULL, 10) : 32;
  uint64_t queued_ops = argc > 9 ? strtoull(argv[9], NULL, 10) : random_ops * 4;
  if (queue_depth > 1024) {
    errno = EINVAL;
    fail("QUEUE_DEPTH must be at most 1024", dev);
  }
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

  if (queue_depth > 0 && queued_ops > 0) queued_random_reads(fd, blocks, queued_ops, (unsigned)queue_depth, random_ms, nonce);

  close(fd);
  free(buf);
  printf("DISKBENCH-DONE\n");
  fflush(stdout);
  return 0;
}
