/**
 * The one place where Partis calls the C library (through koffi). Everything
 * above this file sees typed functions that either succeed or throw a
 * `SystemCallError` carrying errno, its name, the call and the caller's
 * context. Raw (unchecked) entry points are exported for the vCPU hot path,
 * which checks the return value itself to avoid a closure per call.
 *
 * Memory that C owns (mmaps, aligned buffers) reaches JavaScript as
 * Uint8Arrays over external ArrayBuffers (`koffi.view`): no copies. Such a
 * view must not be used after its mapping is released.
 *
 * DEVNOTE: ioctl, open and fcntl are variadic in C. They are declared here
 * with fixed prototypes (one per argument shape); on x86-64 System V an
 * integer or pointer third argument travels in the same register either way,
 * and the callee's %al (vector-register count) is only used to decide
 * whether to spill XMM registers, which is harmless.
 */
import koffi from "koffi";
import { SystemCallError } from "./errors.js";
import type { ErrorContext } from "../errors.js";

export { SystemCallError } from "./errors.js";

/** The C library, for sibling FFI modules of this layer (tap.ts, sockets.ts) that declare their own prototypes. */
export const lib = koffi.load("libc.so.6");

/** Opaque C pointer as koffi hands it out. */
export type CPointer = unknown;

// --- raw prototypes -------------------------------------------------------------------------

type IntFn<A extends unknown[]> = (...args: A) => number;

const c = {
  open: lib.func("int open(const char *path, int flags, int mode)") as IntFn<[string, number, number]>,
  close: lib.func("int close(int fd)") as IntFn<[number]>,
  exit: lib.func("void _exit(int status)") as (status: number) => void,
  ioctlPtr: lib.func("ioctl", "int", ["int", "unsigned long", "void *"]) as IntFn<[number, number, ArrayBufferView | null]>,
  ioctlInt: lib.func("ioctl", "int", ["int", "unsigned long", "unsigned long"]) as IntFn<[number, number, number | bigint]>,
  mmap: lib.func("void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)") as (
    addr: null,
    length: number,
    prot: number,
    flags: number,
    fd: number,
    offset: number | bigint,
  ) => CPointer,
  munmap: lib.func("int munmap(void *addr, size_t length)") as IntFn<[CPointer, number]>,
  madvise: lib.func("int madvise(void *addr, size_t length, int advice)") as IntFn<[CPointer, number, number]>,
  madviseAt: lib.func("madvise", "int", ["uint64_t", "size_t", "int"]) as IntFn<[bigint, number, number]>,
  memfdCreate: lib.func("int memfd_create(const char *name, unsigned int flags)") as IntFn<[string, number]>,
  ftruncate: lib.func("int ftruncate(int fd, int64_t length)") as IntFn<[number, number | bigint]>,
  fallocate: lib.func("int fallocate(int fd, int mode, int64_t offset, int64_t len)") as IntFn<[number, number, number, number]>,
  lseek: lib.func("int64_t lseek(int fd, int64_t offset, int whence)") as IntFn<[number, number, number]>,
  statx: lib.func("int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf)") as IntFn<[number, string, number, number, ArrayBufferView]>,
  eventfd: lib.func("int eventfd(unsigned int initval, int flags)") as IntFn<[number, number]>,
  read: lib.func("int64_t read(int fd, void *buf, size_t count)") as IntFn<[number, ArrayBufferView, number]>,
  write: lib.func("int64_t write(int fd, const void *buf, size_t count)") as IntFn<[number, ArrayBufferView, number]>,
  pread: lib.func("int64_t pread(int fd, void *buf, size_t count, int64_t offset)") as IntFn<[number, ArrayBufferView, number, number | bigint]>,
  preadv: lib.func("int64_t preadv(int fd, void *iov, int iovcnt, int64_t offset)") as IntFn<[number, ArrayBufferView, number, number]>,
  pwritev: lib.func("int64_t pwritev(int fd, void *iov, int iovcnt, int64_t offset)") as IntFn<[number, ArrayBufferView, number, number]>,
  preadv2: lib.func("int64_t preadv2(int fd, void *iov, int iovcnt, int64_t offset, int flags)") as IntFn<[number, ArrayBufferView, number, number, number]>,
  pwritev2: lib.func("int64_t pwritev2(int fd, void *iov, int iovcnt, int64_t offset, int flags)") as IntFn<[number, ArrayBufferView, number, number, number]>,
  writev: lib.func("int64_t writev(int fd, void *iov, int iovcnt)") as IntFn<[number, ArrayBufferView, number]>,
  readv: lib.func("int64_t readv(int fd, void *iov, int iovcnt)") as IntFn<[number, ArrayBufferView, number]>,
  sendmsg: lib.func("int64_t sendmsg(int fd, const void *msg, int flags)") as IntFn<[number, ArrayBufferView, number]>,
  pwrite: lib.func("int64_t pwrite(int fd, const void *buf, size_t count, int64_t offset)") as IntFn<
    [number, ArrayBufferView, number, number | bigint]
  >,
  strerror: lib.func("const char *strerror(int errnum)") as (errnum: number) => string,
  getpid: lib.func("int getpid()") as IntFn<[]>,
  clockGettime: lib.func("int clock_gettime(int clockid, void *tp)") as IntFn<[number, ArrayBufferView]>,
  gettid: lib.func("int gettid()") as IntFn<[]>,
  prctlName: lib.func("int prctl(int option, const char *name, unsigned long a3, unsigned long a4, unsigned long a5)") as IntFn<[number, string, number, number, number]>,
  poll: lib.func("int poll(void *fds, uint64_t nfds, int timeout)") as IntFn<[ArrayBufferView, number, number]>,
  pthreadSelf: lib.func("uint64_t pthread_self()") as () => bigint | number,
  pthreadKill: lib.func("int pthread_kill(uint64_t thread, int sig)") as IntFn<[bigint, number]>,
  pthreadSigmask: lib.func("int pthread_sigmask(int how, const void *set, void *oldset)") as IntFn<[number, ArrayBufferView | null, ArrayBufferView | null]>,
};

/**
 * Unchecked libc entry points for hot paths (the vCPU run loop). They return
 * the C result; on -1 read `errno()` immediately, before any other FFI call.
 */
export const raw = {
  ioctlInt: c.ioctlInt,
  ioctlPtr: c.ioctlPtr,
  read: c.read,
  write: c.write,
} as const;

// --- errno ----------------------------------------------------------------------------------

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(koffi.os.errno)) {
  // Several names can share a number (EAGAIN/EWOULDBLOCK, EDEADLK/EDEADLOCK): keep the first.
  if (!errnoNames.has(value)) errnoNames.set(value, name);
}

/** errno of the last FFI call made on this thread. */
export function errno(): number {
  return koffi.errno();
}

/** Symbolic name of an errno value ("EINVAL"), or "E?<n>". */
export function errnoName(value: number): string {
  return errnoNames.get(value) ?? `E?${value}`;
}

export function strerror(value: number): string {
  return c.strerror(value);
}

/** errno numbers by name, for callers that test a specific failure (EINTR, EAGAIN...). */
export const Errno = {
  EPERM: koffi.os.errno.EPERM ?? 1,
  ENOENT: koffi.os.errno.ENOENT ?? 2,
  EINTR: koffi.os.errno.EINTR ?? 4,
  EIO: koffi.os.errno.EIO ?? 5,
  E2BIG: koffi.os.errno.E2BIG ?? 7,
  EBADF: koffi.os.errno.EBADF ?? 9,
  EAGAIN: koffi.os.errno.EAGAIN ?? 11,
  ENOMEM: koffi.os.errno.ENOMEM ?? 12,
  EACCES: koffi.os.errno.EACCES ?? 13,
  EFAULT: koffi.os.errno.EFAULT ?? 14,
  EEXIST: koffi.os.errno.EEXIST ?? 17,
  ENXIO: koffi.os.errno.ENXIO ?? 6,
  EINVAL: koffi.os.errno.EINVAL ?? 22,
  ENOSPC: koffi.os.errno.ENOSPC ?? 28,
  EPIPE: koffi.os.errno.EPIPE ?? 32,
  EBUSY: koffi.os.errno.EBUSY ?? 16,
  ENOTTY: koffi.os.errno.ENOTTY ?? 25,
  ENOSYS: koffi.os.errno.ENOSYS ?? 38,
  EOPNOTSUPP: koffi.os.errno.EOPNOTSUPP ?? 95,
} as const;

/** Build the error for a failed call from the current errno. */
export function lastError(call: string, context: ErrorContext = {}): SystemCallError {
  const e = errno();
  return new SystemCallError(call, e, errnoName(e), strerror(e), context);
}

function check(result: number, call: string, context?: ErrorContext): number {
  if (result < 0) throw lastError(call, context);
  return result;
}

// --- constants --------------------------------------------------------------------------------

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_NONBLOCK = 0o4000;
export const O_DIRECT = 0o40000;
export const O_CLOEXEC = 0o2000000;

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const PROT_EXEC = 4;
export const MAP_SHARED = 1;
export const MAP_PRIVATE = 2;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;

export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;
/** A memfd on the kernel's hugetlbfs: pages come from the host's reserved huge-page pool. */
export const MFD_HUGETLB = 4;
/** memfd_create flag selecting the huge-page size (log2 of it, shifted; linux/memfd.h MFD_HUGE_SHIFT). */
export function mfdHugePageSize(pageBytes: number): number {
  const log2 = Math.log2(pageBytes);
  if (!Number.isInteger(log2) || log2 < 16 || log2 > 31) throw new RangeError(`mfdHugePageSize: ${pageBytes} is not a huge-page size`);
  return log2 << 26;
}

export const EFD_SEMAPHORE = 1;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;

const MAP_FAILED = 0xffffffffffffffffn;

// --- file descriptors -------------------------------------------------------------------------

export function open(path: string, flags: number, mode = 0o600): number {
  return check(c.open(path, flags, mode), "open", { path, flags });
}

export function close(fd: number): void {
  check(c.close(fd), "close", { fd });
}

/**
 * ioctl with a pointer argument (a struct in `arg`, which the kernel may read
 * and write) or an integer argument. Returns the (non-negative) result.
 * `name` is used in the error.
 */
export function ioctl(fd: number, request: number, arg: ArrayBufferView | number | bigint | null, name: string, context?: ErrorContext): number {
  const r = arg === null || ArrayBuffer.isView(arg) ? c.ioctlPtr(fd, request, arg) : c.ioctlInt(fd, request, arg);
  return check(r, name, { fd, ...context });
}

export function memfdCreate(name: string, flags = MFD_CLOEXEC): number {
  return check(c.memfdCreate(name, flags), "memfd_create", { name });
}

export function ftruncate(fd: number, length: number | bigint): void {
  check(c.ftruncate(fd, length), "ftruncate", { fd, length });
}

/** fallocate(2) modes (linux/falloc.h). */
export const FALLOC_FL = { keepSize: 0x01, punchHole: 0x02, zeroRange: 0x10 } as const;

/**
 * fallocate(2) on a file or block device: `mode` 0 allocates, PUNCH_HOLE|KEEP_SIZE
 * frees (reads then return zeros), ZERO_RANGE zeroes without writing. Throws
 * SystemCallError (EOPNOTSUPP where the file system cannot: callers fall back).
 */
export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  check(c.fallocate(fd, mode, offset, length), "fallocate", { fd, mode, offset: BigInt(offset), length: BigInt(length) });
}

/** statx(2): AT_EMPTY_PATH (the descriptor itself), STATX_DIOALIGN (Linux 6.1). */
const AT_EMPTY_PATH = 0x1000;
const STATX_DIOALIGN = 0x2000;
/** struct statx: stx_mask at 0, stx_dio_mem_align at 152, stx_dio_offset_align at 156; 256 bytes in all. */
const STATX_BYTES = 256;
const STX_DIO_MEM_ALIGN = 152;
const STX_DIO_OFFSET_ALIGN = 156;

/**
 * What O_DIRECT needs of an open file (statx STATX_DIOALIGN): the alignment
 * of buffer addresses (`memory`) and of file offsets and lengths (`offset`).
 * Undefined where the kernel or the file system does not say (before Linux
 * 6.1, tmpfs, 9p), or says direct I/O is not supported there (zeros).
 */
export function directIoAlignment(fd: number): { memory: number; offset: number } | undefined {
  const buf = new Uint8Array(STATX_BYTES);
  if (c.statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, buf) !== 0) return undefined;
  const v = new DataView(buf.buffer);
  if ((v.getUint32(0, true) & STATX_DIOALIGN) === 0) return undefined;
  const memory = v.getUint32(STX_DIO_MEM_ALIGN, true);
  const offset = v.getUint32(STX_DIO_OFFSET_ALIGN, true);
  return memory === 0 || offset === 0 ? undefined : { memory, offset };
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;

/**
 * lseek(2) SEEK_DATA / SEEK_HOLE: the offset of the next data (or hole) at or
 * after `offset`; -1 when there is none (ENXIO: no data up to the end of the
 * file). Throws SystemCallError otherwise (EINVAL where the file system or
 * device does not support it).
 */
export function seekDataOrHole(fd: number, offset: number, what: "data" | "hole"): number {
  const r = c.lseek(fd, offset, what === "data" ? SEEK_DATA : SEEK_HOLE);
  if (r >= 0) return r;
  if (errno() === Errno.ENXIO) return -1;
  throw lastError("lseek", { fd, offset: BigInt(offset), whence: what === "data" ? "SEEK_DATA" : "SEEK_HOLE" });
}

export function eventfd(initval = 0, flags = EFD_CLOEXEC): number {
  return check(c.eventfd(initval, flags), "eventfd", { initval, flags });
}

/** read(2) into `buf`; returns bytes read (0 at EOF). */
export function read(fd: number, buf: ArrayBufferView, length = buf.byteLength): number {
  if (length > buf.byteLength) throw new RangeError("read: length exceeds buffer");
  const r = c.read(fd, buf, length);
  // The error context is built only on failure: these calls are on per-request paths.
  if (r < 0) throw lastError("read", { fd, length });
  return r;
}

/** write(2) from `buf`; returns bytes written. */
export function write(fd: number, buf: ArrayBufferView, length = buf.byteLength): number {
  if (length > buf.byteLength) throw new RangeError("write: length exceeds buffer");
  const r = c.write(fd, buf, length);
  if (r < 0) throw lastError("write", { fd, length });
  return r;
}

export function pread(fd: number, buf: ArrayBufferView, offset: number | bigint, length = buf.byteLength): number {
  if (length > buf.byteLength) throw new RangeError("pread: length exceeds buffer");
  const r = c.pread(fd, buf, length, offset);
  if (r < 0) throw lastError("pread", { fd, length, offset: BigInt(offset) });
  return r;
}

export function pwrite(fd: number, buf: ArrayBufferView, offset: number | bigint, length = buf.byteLength): number {
  if (length > buf.byteLength) throw new RangeError("pwrite: length exceeds buffer");
  const r = c.pwrite(fd, buf, length, offset);
  if (r < 0) throw lastError("pwrite", { fd, length, offset: BigInt(offset) });
  return r;
}

export const POLLIN = 0x001;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;

/**
 * poll(2) over a caller-owned array of struct pollfd (8 bytes each: int fd,
 * short events, short revents), so a loop polls without allocating. Returns
 * the number of ready entries, 0 on timeout, -1 on EINTR (retry).
 */
export function poll(fds: Int32Array, count: number, timeoutMs: number): number {
  if (count * 2 > fds.length) throw new RangeError("poll: count exceeds the pollfd array");
  const r = c.poll(fds, count, timeoutMs);
  if (r < 0) {
    if (koffi.errno() === Errno.EINTR) return -1;
    throw lastError("poll", { count });
  }
  return r;
}

export function getpid(): number {
  return c.getpid();
}

const CLOCK_THREAD_CPUTIME_ID = 3;
const timespec = new BigInt64Array(2);

/**
 * CPU time consumed by the calling thread, in ns (user + system, which on KVM
 * includes time spent running the guest). Unlike wall time it does not grow
 * while other processes hold the CPU: benchmarks on shared machines use it.
 */
export function threadCpuTimeNs(): bigint {
  check(c.clockGettime(CLOCK_THREAD_CPUTIME_ID, timespec), "clock_gettime", { clock: "CLOCK_THREAD_CPUTIME_ID" });
  return timespec[0]! * 1_000_000_000n + timespec[1]!;
}

/** Kernel thread id of the calling thread (differs per worker_thread). */
export function gettid(): number {
  return c.gettid();
}

/** pthread_t of the calling thread (opaque; only for pthreadKill from another thread of this process). */
const PR_SET_NAME = 15;

/**
 * Name the calling thread (prctl PR_SET_NAME; at most 15 bytes are kept), so
 * `top -H`, `ps -T` and /proc/<pid>/task/<tid>/comm say which thread is a vCPU
 * and which the device thread. Best effort: returns false when refused.
 */
export function setThreadName(name: string): boolean {
  return c.prctlName(PR_SET_NAME, name.slice(0, 15), 0, 0, 0) === 0;
}

/**
 * _exit(2): end the process now with `status`, every thread included, without
 * Node's shutdown (which joins worker threads and so never returns while one
 * is stuck in a system call, a vCPU in KVM_RUN say). Flush what must be seen first.
 */
export function exitNow(status: number): never {
  c.exit(status);
  throw new Error("_exit returned");
}

export function pthreadSelf(): bigint {
  return BigInt(c.pthreadSelf());
}

/** pthread_kill(3): send `signal` to one thread of this process. Returns nothing; throws on failure. */
export function pthreadKill(thread: bigint, signal: number): void {
  const r = c.pthreadKill(thread, signal);
  // pthread_* return the error number instead of setting errno.
  if (r !== 0) throw new SystemCallError("pthread_kill", r, errnoName(r), strerror(r), { signal });
}

const SIG_UNBLOCK = 1;

/** Unblock `signal` for the calling thread (worker threads may start with signals blocked). */
export function unblockSignal(signal: number): void {
  const set = new BigUint64Array(16); // sigset_t: 1024 bits
  set[0] = 1n << BigInt(signal - 1);
  const r = c.pthreadSigmask(SIG_UNBLOCK, set, null);
  if (r !== 0) throw new SystemCallError("pthread_sigmask", r, errnoName(r), strerror(r), { signal });
}

// --- memory mappings --------------------------------------------------------------------------

interface Mapping {
  readonly pointer: CPointer;
  readonly address: bigint;
  /** The same address as a Number (user-space addresses are below 2^47). */
  readonly addressNumber: number;
  readonly length: number;
  released: boolean;
}

/** Mappings made here, by the ArrayBuffer that views them, so they can be released by view. */
const mappings = new WeakMap<ArrayBufferLike, Mapping>();

/**
 * Unmaps a mapping when its view is garbage-collected without an explicit
 * release (nothing can reach the memory any more at that point).
 */
const reclaimer = new FinalizationRegistry<Mapping>((m) => {
  if (!m.released) {
    m.released = true;
    live.delete(m);
    c.munmap(m.pointer, m.length);
  }
});

/** Mappings made here and not yet released: raw host spans must lie inside one of them. */
const live = new Set<Mapping>();
let lastHit: Mapping | undefined;

function insideLiveMapping(address: number, length: number): boolean {
  const h = lastHit;
  if (h !== undefined && !h.released && address >= h.addressNumber && address + length <= h.addressNumber + h.length) return true;
  for (const m of live) {
    if (address >= m.addressNumber && address + length <= m.addressNumber + m.length) {
      lastHit = m;
      return true;
    }
  }
  return false;
}

/** mmap(2). Returns the pointer; throws on MAP_FAILED. */
export function mmap(length: number, prot: number, flags: number, fd: number, offset: number | bigint, context?: ErrorContext): CPointer {
  const p = c.mmap(null, length, prot, flags, fd, offset);
  if (p === null || koffi.address(p) === MAP_FAILED) throw lastError("mmap", { fd, length, offset: BigInt(offset), ...context });
  return p;
}

const MADV_HUGEPAGE = 14;

/**
 * Ask for transparent huge pages on a mapping (madvise MADV_HUGEPAGE). Returns
 * false where the kernel refuses (no THP); a hint, never an error. For a memfd
 * (shmem) mapping it takes effect when /sys/kernel/mm/transparent_hugepage/
 * shmem_enabled is "advise" (or "within_size"/"always").
 */
export function adviseHugePages(pointer: CPointer, length: number): boolean {
  return c.madvise(pointer, length, MADV_HUGEPAGE) === 0;
}

/**
 * madvise(2) over a range given by its address (a mapping this process did
 * not make through this file: program-pages.ts). Returns false where the
 * kernel refuses; the caller decides what that means.
 */
export function adviseRange(address: bigint, length: number, advice: number): boolean {
  return c.madviseAt(address, length, advice) === 0;
}

export function munmap(pointer: CPointer, length: number): void {
  check(c.munmap(pointer, length), "munmap", { length });
}

/** Numeric address of a C pointer (for structs that carry addresses, e.g. userspace_addr). */
export function addressOf(pointer: CPointer): bigint {
  return koffi.address(pointer);
}

/** A Uint8Array over C memory, without copying. */
export function viewOf(pointer: CPointer, length: number): Uint8Array {
  return new Uint8Array(koffi.view(pointer, length));
}

function track(pointer: CPointer, length: number, autoRelease: boolean): Uint8Array {
  const view = viewOf(pointer, length);
  const address = koffi.address(pointer);
  const m: Mapping = { pointer, address, addressNumber: Number(address), length, released: false };
  mappings.set(view.buffer, m);
  if (autoRelease) reclaimer.register(view.buffer, m, m);
  live.add(m);
  return view;
}

/**
 * mmap(MAP_SHARED) of [offset, offset+length) of `fd`, readable and writable,
 * as a live view. Every thread (or process) that maps the same file sees the
 * same bytes. Release with `releaseMapping(view)`; an unreleased mapping is
 * unmapped when its view is garbage-collected.
 */
export function mapSharedFile(fd: number, offset: number, length: number, prot = PROT_READ | PROT_WRITE): Uint8Array {
  const p = mmap(length, prot, MAP_SHARED, fd, offset);
  return track(p, length, true);
}

/**
 * Host memory of at least `bytes` bytes whose start is aligned to `alignment`
 * (a power of two; page alignment at least), zero-filled, usable as an
 * O_DIRECT buffer with Node's fs.readSync/writeSync or `pread`/`pwrite` here.
 * Released by `releaseMapping(view)` or when the view is garbage-collected.
 */
export function alignedBuffer(bytes: number, alignment = 4096): Uint8Array {
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new RangeError(`alignedBuffer: bad size ${bytes}`);
  if (alignment <= 0 || (alignment & (alignment - 1)) !== 0) throw new RangeError(`alignedBuffer: alignment ${alignment} is not a power of two`);
  const page = 4096;
  const length = Math.ceil(bytes / page) * page;
  if (alignment <= page) {
    const p = mmap(length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return track(p, length, true).subarray(0, bytes);
  }
  // Over-allocate, then keep an aligned window. The unaligned head and tail stay
  // mapped (and are released with the whole region): simpler than trimming
  // through pointer arithmetic, which koffi does not offer on raw pointers.
  const total = length + alignment;
  const p = mmap(total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  const whole = track(p, total, true);
  const base = koffi.address(p);
  const skip = Number((BigInt(alignment) - (base % BigInt(alignment))) % BigInt(alignment));
  return whole.subarray(skip, skip + bytes);
}

/** Host address of the first byte of a view made by this module (for O_DIRECT checks, kvm structs). */
export function addressOfView(view: Uint8Array): bigint {
  const m = mappings.get(view.buffer);
  if (m === undefined) throw new RangeError("addressOfView: not a view made by src/hypervisor/libc");
  return m.address + BigInt(view.byteOffset);
}

/** Largest iovec count one preadv/pwritev takes (IOV_MAX). */
export const IOV_MAX = 1024;
/** struct iovec[IOV_MAX] as 32-bit halves: addresses and lengths stay Numbers (no BigInt per segment). */
const iovecWords = new Uint32Array(IOV_MAX * 4);

/** struct iovec i = { address, length } (addresses below 2^53, lengths below 2^32). */
function putIovec(i: number, address: number, length: number): void {
  const w = i * 4;
  iovecWords[w] = address >>> 0;
  iovecWords[w + 1] = Math.floor(address / 4294967296);
  iovecWords[w + 2] = length;
  iovecWords[w + 3] = 0;
}

function fillIovec(views: readonly Uint8Array[], count: number): number {
  if (count > IOV_MAX) throw new RangeError(`vectored I/O: ${count} segments exceed IOV_MAX`);
  let total = 0;
  for (let i = 0; i < count; i++) {
    const v = views[i]!;
    const m = mappings.get(v.buffer);
    if (m === undefined) throw new RangeError("vectored I/O: a segment is not a view made by src/hypervisor/libc");
    putIovec(i, m.addressNumber + v.byteOffset, v.length);
    total += v.length;
  }
  return total;
}

/**
 * preadv(2) into views of memory this module mapped (guest RAM): one system
 * call for a whole scatter list. Returns the bytes read (short at end of file).
 */
export function preadv(fd: number, views: readonly Uint8Array[], count: number, offset: number): number {
  fillIovec(views, count);
  const r = c.preadv(fd, iovecWords, count, offset);
  if (r < 0) throw lastError("preadv", { fd, count, offset: BigInt(offset) });
  return r;
}

/** pwritev(2) from views of memory this module mapped. Returns the bytes written (may be short). */
export function pwritev(fd: number, views: readonly Uint8Array[], count: number, offset: number): number {
  fillIovec(views, count);
  const r = c.pwritev(fd, iovecWords, count, offset);
  if (r < 0) throw lastError("pwritev", { fd, count, offset: BigInt(offset) });
  return r;
}

function fillHostIovec(addresses: Float64Array, lengths: Uint32Array, count: number, w: Uint32Array = iovecWords, firstWord = 0): number {
  if (firstWord + count * 4 > w.length) throw new RangeError(`vectored I/O: ${count} segments exceed the ${(w.length - firstWord) / 4} this call takes`);
  let total = 0;
  // The mapping the last span was in, as plain numbers: spans in a row are almost always in one mapping,
  // and nothing here passes an address (never a small integer) to a call, so nothing is boxed.
  let start = 0;
  let end = -1;
  for (let i = 0; i < count; i++) {
    const address = addresses[i]!;
    const length = lengths[i]!;
    if (address < start || address + length > end) {
      if (!insideLiveMapping(address, length)) throw new RangeError(`vectored I/O: host span 0x${address.toString(16)}+${length} is not memory mapped here`);
      start = lastHit!.addressNumber;
      end = start + lastHit!.length;
    }
    const o = firstWord + i * 4;
    w[o] = address >>> 0;
    w[o + 1] = Math.floor(address / 4294967296);
    w[o + 2] = length;
    w[o + 3] = 0;
    total += length;
  }
  return total;
}

/**
 * Write host spans as struct iovec entries into `target` (32-bit words of
 * memory this module mapped, e.g. an io_uring request's iovec area), from
 * iovec `first` on; returns the bytes they cover. Same checks as preadvHost:
 * every span inside a live mapping (RangeError before anything is written
 * otherwise, for the span that is not).
 */
export function putHostIovecs(target: Uint32Array, first: number, addresses: Float64Array, lengths: Uint32Array, count: number): number {
  return fillHostIovec(addresses, lengths, count, target, first * 4);
}

/**
 * preadv(2) into host spans given as numbers (address, length), e.g. guest RAM
 * addresses from GuestMemory.hostAddresses: no view per segment. Every span must
 * lie inside memory this module mapped and has not released (RangeError,
 * before any system call, otherwise). Returns the bytes read (may be short).
 */
export function preadvHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number, offset: number): number {
  fillHostIovec(addresses, lengths, count);
  const r = c.preadv(fd, iovecWords, count, offset);
  if (r < 0) throw lastError("preadv", { fd, count, offset: BigInt(offset) });
  return r;
}

/** preadv2/pwritev2 flag: fail with EAGAIN instead of waiting for the disk (data not in the page cache). */
export const RWF_NOWAIT = 0x8;

/**
 * preadv2(2) or pwritev2(2) over host spans (see preadvHost) with `flags`
 * (RWF_NOWAIT): the bytes moved, or -1 with errno() telling why (EAGAIN:
 * it would have waited; EOPNOTSUPP: the file system cannot say). Does not
 * throw for a failed call: the caller decides (queue it, or do it blocking).
 */
export function transferHostWithFlags(write: boolean, fd: number, addresses: Float64Array, lengths: Uint32Array, count: number, offset: number, flags: number): number {
  fillHostIovec(addresses, lengths, count);
  return write ? c.pwritev2(fd, iovecWords, count, offset, flags) : c.preadv2(fd, iovecWords, count, offset, flags);
}

/** pwritev(2) from host spans (see preadvHost). Returns the bytes written (may be short). */
export function pwritevHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number, offset: number): number {
  fillHostIovec(addresses, lengths, count);
  const r = c.pwritev(fd, iovecWords, count, offset);
  if (r < 0) throw lastError("pwritev", { fd, count, offset: BigInt(offset) });
  return r;
}

/**
 * writev(2) from host spans (see preadvHost): one packet or frame gathered
 * straight from guest RAM, e.g. to a TAP or a connected datagram socket.
 * Returns the bytes written, or -1 with errno() telling why: the caller
 * decides what a failure means (a dropped frame, a missing peer), so this
 * does not throw for it. Spans outside live mappings throw RangeError before
 * the system call, as for preadvHost.
 */
export function writevHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number): number {
  fillHostIovec(addresses, lengths, count);
  return c.writev(fd, iovecWords, count);
}

/**
 * sendmsg(2)'s struct msghdr, the destination address and the iovecs, in one
 * page this module mapped (so msghdr can hold their addresses), made on first
 * use. Layout: msghdr at 0 (56 bytes), the address at 64 (up to 128 bytes),
 * the iovecs from 192.
 */
let messagePage: { bytes: Uint8Array; words: Uint32Array; iov: Uint32Array; name: Uint8Array | undefined } | undefined;
const MESSAGE_NAME = 64;
const MESSAGE_IOV = 192;
/** Most spans one sendmsgHost takes. */
export const SENDMSG_MAX_SPANS = (4096 - MESSAGE_IOV) / 16;

function message(): NonNullable<typeof messagePage> {
  if (messagePage !== undefined) return messagePage;
  const bytes = alignedBuffer(4096);
  const base = Number(addressOfView(bytes));
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, 1024);
  const put64 = (wordIndex: number, value: number) => {
    words[wordIndex] = value >>> 0;
    words[wordIndex + 1] = Math.floor(value / 4294967296);
  };
  put64(0, base + MESSAGE_NAME); // msg_name
  put64(4, base + MESSAGE_IOV); // msg_iov
  // msg_control, msg_controllen, msg_flags: zero (the page is).
  messagePage = { bytes, words, iov: new Uint32Array(bytes.buffer, bytes.byteOffset + MESSAGE_IOV, SENDMSG_MAX_SPANS * 4), name: undefined };
  return messagePage;
}

/**
 * sendmsg(2) of one datagram to the socket address `name` (its first
 * `nameLength` bytes: a struct sockaddr), gathered from host spans (see
 * writevHost): no copy, and no connect(2) needed. Returns the bytes sent, or
 * -1 with errno() telling why. Spans outside live mappings, or more than
 * SENDMSG_MAX_SPANS, throw RangeError before the call.
 */
export function sendmsgHost(fd: number, name: Uint8Array, nameLength: number, addresses: Float64Array, lengths: Uint32Array, count: number, flags: number): number {
  const m = message();
  if (nameLength > 128 || nameLength > name.length) throw new RangeError(`sendmsg: a ${nameLength}-byte address`);
  if (m.name !== name) {
    // Copied once per address object (a port keeps its own): the next sends to it copy nothing.
    for (let i = 0; i < nameLength; i++) m.bytes[MESSAGE_NAME + i] = name[i]!;
    m.name = name;
  }
  m.words[2] = nameLength; // msg_namelen
  fillHostIovec(addresses, lengths, count, m.iov);
  m.words[6] = count; // msg_iovlen
  m.words[7] = 0;
  return c.sendmsg(fd, m.bytes, flags);
}

/** readv(2) into host spans (see writevHost): the bytes read, or -1 with errno() telling why. */
export function readvHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number): number {
  fillHostIovec(addresses, lengths, count);
  return c.readv(fd, iovecWords, count);
}

/** Unmap the mapping behind a view made by `mapSharedFile` / `alignedBuffer`. Idempotent. */
export function releaseMapping(view: Uint8Array): void {
  const m = mappings.get(view.buffer);
  if (m === undefined) throw new RangeError("releaseMapping: not a view made by src/hypervisor/libc");
  if (m.released) return;
  m.released = true;
  live.delete(m);
  reclaimer.unregister(m);
  munmap(m.pointer, m.length);
}
