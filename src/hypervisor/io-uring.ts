/**
 * An io_uring (io_uring_setup(2), io_uring_enter(2)): asynchronous file I/O
 * for the device thread, so a disk request never blocks it (the other
 * devices and the vCPUs' forwarded accesses go on while the disk works) and
 * several requests are in flight at once.
 *
 * Scope: vectored reads and writes at host addresses (guest RAM spans) and
 * fsync, which is what virtio-blk needs. Requests the kernel completes while
 * submitting (page-cache hits) are reaped straight after `submit()`, costing
 * no more system calls than a preadv; the others are announced on an
 * eventfd registered with the ring (IORING_REGISTER_EVENTFD), which the
 * device thread's poll loop watches: `takeEvent()`, then `reap()`. The
 * eventfd is signalled for every completion, inline ones included (the
 * loop then finds nothing left to reap): IORING_REGISTER_EVENTFD_ASYNC
 * signals only completions posted by io-wq worker threads, and a buffered
 * read that waits for the disk completes through task work in the
 * submitting thread instead (measured on Linux 6.18: the completion sat
 * unannounced until the thread next entered the kernel).
 *
 * Requires IORING_FEAT_SUBMIT_STABLE (Linux 5.5): the iovec arrays are read
 * by the kernel during submission, so one iovec area serves every batch.
 * `IoUring.open` throws SystemCallError where io_uring is missing or refused
 * (ENOSYS, EPERM under a seccomp policy or kernel.io_uring_disabled): callers
 * then do their I/O synchronously.
 *
 * Ring memory is shared with the kernel: the SQ tail and CQ head are written
 * with Atomics.store (release) and the SQ head and CQ tail read with
 * Atomics.load (acquire), per io_uring(7).
 */
import * as libc from "./libc.js";

const SYS_IO_URING_SETUP = 425;
const SYS_IO_URING_ENTER = 426;
const SYS_IO_URING_REGISTER = 427;

const IORING_OFF_SQ_RING = 0;
const IORING_OFF_CQ_RING = 0x8000000;
const IORING_OFF_SQES = 0x10000000;
const IORING_FEAT_SINGLE_MMAP = 1 << 0;
const IORING_FEAT_SUBMIT_STABLE = 1 << 2;
const IORING_ENTER_GETEVENTS = 1;
const IORING_REGISTER_EVENTFD = 4;

const IORING_OP_READV = 1;
const IORING_OP_WRITEV = 2;
const IORING_OP_FSYNC = 3;
const IORING_FSYNC_DATASYNC = 1;

const SQE_BYTES = 64;
const CQE_BYTES = 16;
const PARAMS_BYTES = 120;

type SyscallFn = (...args: (number | ArrayBufferView | null)[]) => number;
const sys3 = libc.lib.func("syscall", "int64_t", ["int64_t", "int64_t", "void *"]) as SyscallFn;
const sys5 = libc.lib.func("syscall", "int64_t", ["int64_t", "int64_t", "int64_t", "void *", "int64_t"]) as SyscallFn;
const sys7 = libc.lib.func("syscall", "int64_t", ["int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "void *", "int64_t"]) as SyscallFn;

/** One completion: the request's token and its result (bytes, or -errno). */
export type CompletionHandler = (token: number, result: number) => void;

export class IoUring {
  private readonly sqTail: Uint32Array;
  private readonly sqMask: number;
  private readonly cqHead: Uint32Array;
  private readonly cqTail: Uint32Array;
  private readonly cqMask: number;
  private readonly cqes: Uint32Array;
  private readonly sqes: Uint32Array;
  /** Iovec area, as 32-bit words: IOVECS_PER_BATCH entries, reused for each batch (SUBMIT_STABLE). */
  private readonly iov: Uint32Array;
  private readonly iovAddress: number;
  private iovUsed = 0;
  /** SQEs prepared and not yet submitted. */
  private unsubmitted = 0;
  /** Requests submitted whose completion has not been reaped. */
  inFlight = 0;
  private closed = false;

  private constructor(
    private readonly fd: number,
    /** The eventfd the kernel signals for each completion (watch it for readability). */
    readonly eventFd: number,
    readonly entries: number,
    private readonly maps: readonly Uint8Array[],
    p: { sqTail: number; sqMask: number; sqArray: number; cqHead: number; cqTail: number; cqMask: number; cqes: number; sqRing: Uint8Array; cqRing: Uint8Array; sqeRing: Uint8Array },
    iov: Uint8Array,
  ) {
    const u32 = (m: Uint8Array, off: number, n = 1): Uint32Array => new Uint32Array(m.buffer, m.byteOffset + off, n);
    this.sqTail = u32(p.sqRing, p.sqTail);
    this.sqMask = u32(p.sqRing, p.sqMask)[0]!;
    this.cqHead = u32(p.cqRing, p.cqHead);
    this.cqTail = u32(p.cqRing, p.cqTail);
    this.cqMask = u32(p.cqRing, p.cqMask)[0]!;
    this.cqes = u32(p.cqRing, p.cqes, (this.cqMask + 1) * (CQE_BYTES / 4));
    this.sqes = u32(p.sqeRing, 0, entries * (SQE_BYTES / 4));
    // SQ slot i always names SQE i: the array indirection is fixed once.
    const array = u32(p.sqRing, p.sqArray, entries);
    for (let i = 0; i < entries; i++) array[i] = i;
    this.iov = new Uint32Array(iov.buffer, iov.byteOffset, iov.length / 4);
    this.iovAddress = Number(libc.addressOfView(iov));
  }

  /** Most iovec entries one batch of prepared requests may use together. */
  static readonly IOVECS_PER_BATCH = 4096;

  /** A ring of `entries` (a power of two) requests, completions announced on a new eventfd. */
  static open(entries: number): IoUring {
    if (!Number.isInteger(entries) || entries < 1 || entries > 4096 || (entries & (entries - 1)) !== 0) throw new RangeError(`io_uring: ${entries} entries is not a power of two in 1..4096`);
    const params = new Uint8Array(PARAMS_BYTES);
    const fd = sys3(SYS_IO_URING_SETUP, entries, params);
    if (fd < 0) throw libc.lastError("io_uring_setup", { entries });
    const maps: Uint8Array[] = [];
    let eventFd = -1;
    try {
      const pv = new DataView(params.buffer);
      const sqEntries = pv.getUint32(0, true);
      const cqEntries = pv.getUint32(4, true);
      const features = pv.getUint32(20, true);
      if ((features & IORING_FEAT_SUBMIT_STABLE) === 0) throw new libc.SystemCallError("io_uring_setup", libc.Errno.ENOSYS, "ENOSYS", "kernel lacks IORING_FEAT_SUBMIT_STABLE", { features });
      const sq = (i: number): number => pv.getUint32(40 + 4 * i, true); // head, tail, ring_mask, ring_entries, flags, dropped, array
      const cq = (i: number): number => pv.getUint32(80 + 4 * i, true); // head, tail, ring_mask, ring_entries, overflow, cqes
      const sqBytes = sq(6) + sqEntries * 4;
      const cqBytes = cq(5) + cqEntries * CQE_BYTES;
      const prot = libc.PROT_READ | libc.PROT_WRITE;
      let sqRing: Uint8Array;
      let cqRing: Uint8Array;
      if ((features & IORING_FEAT_SINGLE_MMAP) !== 0) {
        sqRing = cqRing = libc.mapSharedFile(fd, IORING_OFF_SQ_RING, Math.max(sqBytes, cqBytes), prot);
        maps.push(sqRing);
      } else {
        sqRing = libc.mapSharedFile(fd, IORING_OFF_SQ_RING, sqBytes, prot);
        maps.push(sqRing);
        cqRing = libc.mapSharedFile(fd, IORING_OFF_CQ_RING, cqBytes, prot);
        maps.push(cqRing);
      }
      const sqeRing = libc.mapSharedFile(fd, IORING_OFF_SQES, sqEntries * SQE_BYTES, prot);
      maps.push(sqeRing);
      const iov = libc.alignedBuffer(IoUring.IOVECS_PER_BATCH * 16);
      maps.push(iov);
      eventFd = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
      const efd = new Int32Array([eventFd]);
      // Signalled for every completion (see the module comment for why not IORING_REGISTER_EVENTFD_ASYNC).
      if (sys5(SYS_IO_URING_REGISTER, fd, IORING_REGISTER_EVENTFD, efd, 1) < 0) throw libc.lastError("io_uring_register", { what: "eventfd" });
      return new IoUring(fd, eventFd, sqEntries, maps, {
        sqTail: sq(1), sqMask: sq(2), sqArray: sq(6),
        cqHead: cq(0), cqTail: cq(1), cqMask: cq(2), cqes: cq(5),
        sqRing, cqRing, sqeRing,
      }, iov);
    } catch (e) {
      for (const m of maps) libc.releaseMapping(m);
      if (eventFd >= 0) libc.close(eventFd);
      libc.close(fd);
      throw e;
    }
  }

  /** Requests that can still be prepared before the ring must be submitted and reaped. */
  get room(): number {
    return this.entries - this.inFlight - this.unsubmitted;
  }

  /** Iovec entries left in this batch (submit() frees them all). */
  get iovecRoom(): number {
    return IoUring.IOVECS_PER_BATCH - this.iovUsed;
  }

  /**
   * Prepare a readv (into guest RAM) or writev (from it) of host spans at
   * `offset` of `fd`. False (nothing prepared) when the ring or this batch's
   * iovec area is full: submit, or do the request another way. RangeError for
   * a span outside memory mapped by this layer.
   */
  prepareVectored(write: boolean, fd: number, offset: number, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): boolean {
    if (this.room === 0 || count > this.iovecRoom || count === 0) return false;
    libc.putHostIovecs(this.iov, this.iovUsed, addresses, lengths, count);
    const sqe = this.nextSqe();
    const w = this.sqes;
    w[sqe] = write ? IORING_OP_WRITEV : IORING_OP_READV; // opcode, flags 0, ioprio 0
    w[sqe + 1] = fd;
    w[sqe + 2] = offset >>> 0;
    w[sqe + 3] = Math.floor(offset / 4294967296);
    const iovAddress = this.iovAddress + this.iovUsed * 16;
    w[sqe + 4] = iovAddress >>> 0;
    w[sqe + 5] = Math.floor(iovAddress / 4294967296);
    w[sqe + 6] = count;
    w[sqe + 7] = 0; // rw_flags
    this.putToken(sqe, token);
    this.iovUsed += count;
    this.publish();
    return true;
  }

  /** Prepare an fdatasync (or fsync) of `fd`. False when the ring is full. */
  prepareFsync(fd: number, dataOnly: boolean, token: number): boolean {
    if (this.room === 0) return false;
    const sqe = this.nextSqe();
    const w = this.sqes;
    w[sqe] = IORING_OP_FSYNC;
    w[sqe + 1] = fd;
    w[sqe + 2] = w[sqe + 3] = w[sqe + 4] = w[sqe + 5] = w[sqe + 6] = 0;
    w[sqe + 7] = dataOnly ? IORING_FSYNC_DATASYNC : 0;
    this.putToken(sqe, token);
    this.publish();
    return true;
  }

  /** Hand every prepared request to the kernel (one io_uring_enter). */
  submit(): void {
    if (this.unsubmitted === 0) return;
    this.enter(this.unsubmitted, 0, 0);
  }

  /** Clear the eventfd's count (it polled readable), before reaping. */
  takeEvent(): void {
    libc.raw.read(this.eventFd, this.efdBuf, 8); // EAGAIN when nothing was signalled: fine
  }

  /** Call `handler` for every completion that has arrived (none waiting: 0); no system call. */
  reap(handler: CompletionHandler): number {
    let n = 0;
    let head = Atomics.load(this.cqHead, 0);
    const tail = Atomics.load(this.cqTail, 0);
    while (head !== tail) {
      const o = (head & this.cqMask) * (CQE_BYTES / 4);
      const token = this.cqes[o]! + this.cqes[o + 1]! * 4294967296;
      const result = this.cqes[o + 2]! | 0;
      head = (head + 1) >>> 0;
      Atomics.store(this.cqHead, 0, head);
      this.inFlight--;
      n++;
      handler(token, result);
    }
    return n;
  }

  /** Submit what is prepared and wait until every request has completed, handing each to `handler`. */
  drain(handler: CompletionHandler): void {
    this.submit();
    while (this.inFlight > 0) {
      if (this.reap(handler) === 0) this.enter(0, 1, IORING_ENTER_GETEVENTS);
    }
    this.takeEvent();
  }

  /** Wait for what is in flight (its completions are dropped), then release the ring. */
  close(): void {
    if (this.closed) return;
    try {
      this.drain(() => {});
    } catch {
      // The ring is going away either way.
    }
    this.closed = true;
    for (const m of this.maps) libc.releaseMapping(m);
    libc.close(this.eventFd);
    libc.close(this.fd);
  }

  private readonly efdBuf = new Uint32Array(2);

  private nextSqe(): number {
    return (Atomics.load(this.sqTail, 0) & this.sqMask) * (SQE_BYTES / 4);
  }

  private putToken(sqe: number, token: number): void {
    const w = this.sqes;
    w[sqe + 8] = token >>> 0;
    w[sqe + 9] = Math.floor(token / 4294967296);
    for (let k = 10; k < 16; k++) w[sqe + k] = 0;
  }

  /** The SQE is written: move the tail past it (the kernel reads it at the next enter; there is no SQ polling thread). */
  private publish(): void {
    Atomics.store(this.sqTail, 0, (Atomics.load(this.sqTail, 0) + 1) >>> 0);
    this.unsubmitted++;
  }

  private enter(toSubmit: number, minComplete: number, flags: number): void {
    for (;;) {
      const r = sys7(SYS_IO_URING_ENTER, this.fd, toSubmit, minComplete, flags, null, 0);
      if (r >= 0) {
        // Every prepared SQE is consumed at once here (no SQPOLL, requests are not linked).
        this.inFlight += r;
        this.unsubmitted -= r;
        // The kernel has read the iovecs of every request it took: the area is free once all are taken.
        if (this.unsubmitted === 0) this.iovUsed = 0;
        if (r === toSubmit || r === 0) return; // r 0: nothing taken now; the next submit() retries
        toSubmit -= r;
        minComplete = 0;
        continue;
      }
      const e = libc.errno();
      if (e === libc.Errno.EINTR) continue;
      if (e === libc.Errno.EAGAIN || e === libc.Errno.EBUSY) {
        // Completions must be reaped first (the CQ is full): the caller's next reap makes room.
        if (minComplete === 0) return;
      }
      throw libc.lastError("io_uring_enter", { toSubmit, minComplete });
    }
  }
}
