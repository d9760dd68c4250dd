/**
 * A one-shot monotonic timer as a descriptor (timerfd_create(2),
 * CLOCK_MONOTONIC, non-blocking, close-on-exec): it polls readable once it
 * expires, so the device thread's poll loop can wait for it with the rest of
 * its descriptors. `arm(ms)` (re)starts it, `disarm()` stops it, `take()`
 * reads the expiry count (and clears readability); nothing allocates after
 * construction.
 */
import { lib, close, errno, Errno, lastError, raw } from "./libc.js";

type IntFn<A extends unknown[]> = (...args: A) => number;

const c = {
  create: lib.func("int timerfd_create(int clockid, int flags)") as IntFn<[number, number]>,
  settime: lib.func("int timerfd_settime(int fd, int flags, const void *new_value, void *old_value)") as IntFn<[number, number, BigInt64Array, null]>,
};

const CLOCK_MONOTONIC = 1;
const TFD_NONBLOCK = 0o4000;
const TFD_CLOEXEC = 0o2000000;

export class HostTimer {
  /** struct itimerspec: it_interval (sec, nsec), it_value (sec, nsec). */
  private readonly spec = new BigInt64Array(4);
  private readonly count = new Uint32Array(2);
  private closed = false;

  private constructor(readonly fd: number) {}

  static create(): HostTimer {
    const fd = c.create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0) throw lastError("timerfd_create", { what: "host timer" });
    return new HostTimer(fd);
  }

  /** Expire once, `ms` milliseconds from now (at least 1 µs; 0 or less: at once). */
  arm(ms: number): void {
    const ns = Math.max(1000, Math.round(ms * 1e6));
    this.spec[2] = BigInt(Math.floor(ns / 1e9));
    this.spec[3] = BigInt(ns % 1e9);
    this.set();
  }

  disarm(): void {
    this.spec[2] = 0n;
    this.spec[3] = 0n;
    this.set();
  }

  private set(): void {
    if (this.closed) return;
    if (c.settime(this.fd, 0, this.spec, null) < 0) throw lastError("timerfd_settime", { fd: this.fd, what: "host timer" });
  }

  /** Expiries since the last call (0 when it has not expired): reading makes the descriptor not readable again. */
  take(): number {
    if (this.closed) return 0;
    const r = raw.read(this.fd, this.count, 8);
    if (r < 0) {
      if (errno() === Errno.EAGAIN) return 0;
      throw lastError("read", { fd: this.fd, what: "host timer" });
    }
    return this.count[1]! * 4294967296 + this.count[0]!;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    close(this.fd);
  }
}
