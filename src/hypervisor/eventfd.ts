/**
 * An eventfd(2): a 64-bit counter in the kernel that KVM signals (ioeventfd)
 * or listens to (irqfd). `signal()` adds to it; `take()` reads and resets it.
 */
import * as libc from "./libc.js";

/**
 * Counts are plain numbers (exact up to 2^53): signalling and taking are on
 * the device thread's per-request path, where a BigInt per call was garbage.
 */
export class EventFd {
  /** The 8-byte counter as two 32-bit halves (little-endian). */
  private readonly buf = new Uint32Array(2);
  private closed = false;

  private constructor(
    readonly fd: number,
    /** Created with EFD_NONBLOCK: take() returns 0n instead of waiting. */
    readonly nonBlocking: boolean,
  ) {}

  static create(opts: { nonBlocking?: boolean; semaphore?: boolean; initial?: number } = {}): EventFd {
    const nonBlocking = opts.nonBlocking ?? true;
    let flags = libc.EFD_CLOEXEC;
    if (nonBlocking) flags |= libc.EFD_NONBLOCK;
    if (opts.semaphore === true) flags |= libc.EFD_SEMAPHORE;
    return new EventFd(libc.eventfd(opts.initial ?? 0, flags), nonBlocking);
  }

  /**
   * Use an eventfd created elsewhere in this process (another thread's, by fd
   * number). The borrower never closes it.
   */
  static borrow(fd: number, nonBlocking = true): EventFd {
    const e = new EventFd(fd, nonBlocking);
    e.closed = true;
    return e;
  }

  /** Add `n` (default 1) to the counter, waking whoever waits on it (KVM for an irqfd). */
  signal(n = 1): void {
    this.buf[0] = n % 4294967296;
    this.buf[1] = Math.floor(n / 4294967296);
    libc.write(this.fd, this.buf, 8);
  }

  /** Read and reset the counter (0 when non-blocking and nothing was signalled). */
  take(): number {
    const r = libc.raw.read(this.fd, this.buf, 8);
    if (r < 0) {
      const e = libc.errno();
      if (e === libc.Errno.EAGAIN) return 0;
      throw libc.lastError("read", { fd: this.fd, what: "eventfd" });
    }
    return this.buf[1]! * 4294967296 + this.buf[0]!;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    libc.close(this.fd);
  }
}
