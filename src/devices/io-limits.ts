/**
 * Rate limits a device enforces on its guest: a virtual disk's maximum IOPS
 * and bandwidth (Hyper-V's Storage QoS maximum; Proxmox's `iops`, `mbps` and
 * their `_rd`/`_wr` forms) and a NIC's bandwidth (Hyper-V's bandwidth
 * management maximum; Proxmox's `rate`), so one VM cannot take a shared disk
 * or link from the others.
 *
 * Each limit is a token bucket: it fills at the configured rate up to a tenth
 * of a second's worth (at least one operation), and a request may start
 * while the bucket is not in debt; its cost is then taken, possibly into
 * debt. A request larger than the bucket therefore still goes (never stuck),
 * the long-run rate is the configured one, and a burst from idle is the
 * bucket's capacity plus one request. A device that finds a bucket in debt
 * holds the request (virtio-blk: taken from the ring and kept, in order;
 * virtio-net: left in the guest's ring or the port, as on a saturated
 * link) and sets its `DeviceAlarm` for when the bucket will be out of debt,
 * at least MIN_ALARM_MS ahead so that a fast limit wakes the device for a
 * batch, not for each request.
 *
 * Time is a millisecond clock (`performance.now()` unless a test gives its
 * own); nothing here allocates per request.
 */
import { HostTimer } from "../hypervisor/host-timer.js";
import type { FdWatch, IoEventLoop } from "./pci/device-thread-services.js";
import { PciDeviceError } from "./pci/pci-config.js";

/** Milliseconds on a monotonic clock. */
export type Clock = () => number;
export const monotonicClock: Clock = () => performance.now();

/** How much of a second's rate a bucket holds when full. */
const BURST_SECONDS = 0.1;
/** The shortest alarm a device sets (ms): at 100 MiB/s, about 100 KiB per wakeup. */
export const MIN_ALARM_MS = 1;

export class TokenBucket {
  /** Tokens available; negative: in debt. Starts full. */
  private level: number;
  private last: number;
  readonly capacity: number;

  constructor(
    /** Tokens per second (operations, or bytes). */
    readonly rate: number,
    /** The least the bucket holds when full (one operation for an IOPS limit). */
    minimumCapacity: number,
    now: number,
  ) {
    if (!Number.isFinite(rate) || rate <= 0) throw new PciDeviceError("IO_LIMIT_BAD_RATE", `a rate limit is a positive number, not ${rate}`);
    this.capacity = Math.max(minimumCapacity, rate * BURST_SECONDS);
    this.level = this.capacity;
    this.last = now;
  }

  private refill(now: number): void {
    if (now > this.last) {
      this.level = Math.min(this.capacity, this.level + ((now - this.last) * this.rate) / 1000);
      this.last = now;
    }
  }

  /** Whether a request may start now (the bucket is not in debt). */
  ready(now: number): boolean {
    this.refill(now);
    return this.level >= 0;
  }

  /** Take a started request's cost. */
  charge(amount: number): void {
    this.level -= amount;
  }

  /** Milliseconds until the bucket is out of debt (0 when it is). */
  wait(now: number): number {
    this.refill(now);
    return this.level >= 0 ? 0 : (-this.level * 1000) / this.rate;
  }
}

/** A disk's limits; each one given applies (all of them at once). */
export interface DiskIoLimits {
  /** Reads and writes per second, together, and each direction's own. */
  readonly iops?: number;
  readonly readIops?: number;
  readonly writeIops?: number;
  /** Bytes per second read and written, together, and each direction's own. */
  readonly bytesPerSecond?: number;
  readonly readBytesPerSecond?: number;
  readonly writeBytesPerSecond?: number;
}

export function hasDiskIoLimits(l: DiskIoLimits | undefined): l is DiskIoLimits {
  return l !== undefined && Object.values(l).some((v) => v !== undefined);
}

/** The buckets of one disk: a read or write starts when none of those that apply to it is in debt. */
export class DiskThrottle {
  private readonly iops: TokenBucket | undefined;
  private readonly bytes: TokenBucket | undefined;
  /** Per direction: [read, write]. */
  private readonly dirIops: readonly (TokenBucket | undefined)[];
  private readonly dirBytes: readonly (TokenBucket | undefined)[];
  /** Requests that had to wait (a queue stopped for a bucket in debt). */
  waits = 0;

  constructor(
    readonly limits: DiskIoLimits,
    readonly clock: Clock = monotonicClock,
  ) {
    const now = clock();
    const ops = (r: number | undefined): TokenBucket | undefined => (r === undefined ? undefined : new TokenBucket(r, 1, now));
    const bytes = (r: number | undefined): TokenBucket | undefined => (r === undefined ? undefined : new TokenBucket(r, 512, now));
    this.iops = ops(limits.iops);
    this.bytes = bytes(limits.bytesPerSecond);
    this.dirIops = [ops(limits.readIops), ops(limits.writeIops)];
    this.dirBytes = [bytes(limits.readBytesPerSecond), bytes(limits.writeBytesPerSecond)];
  }

  /** Whether a limit covers reads and writes together (iops or bytes per second): then a new request of either direction waits behind any held one. */
  get combined(): boolean {
    return this.iops !== undefined || this.bytes !== undefined;
  }

  /** Milliseconds until a read (`write` false) or write may start; 0: now. */
  delay(write: boolean): number {
    const now = this.clock();
    const d = write ? 1 : 0;
    return Math.max(waitOf(this.iops, now), waitOf(this.bytes, now), waitOf(this.dirIops[d], now), waitOf(this.dirBytes[d], now));
  }

  /** A read or write of `bytes` started. */
  charge(write: boolean, bytes: number): void {
    const d = write ? 1 : 0;
    this.iops?.charge(1);
    this.dirIops[d]?.charge(1);
    this.bytes?.charge(bytes);
    this.dirBytes[d]?.charge(bytes);
  }
}

function waitOf(b: TokenBucket | undefined, now: number): number {
  return b === undefined ? 0 : b.wait(now);
}

/**
 * Wakes a device on its own loop after a delay: a timerfd the loop watches.
 * Setting it while set keeps the earlier time.
 */
export class DeviceAlarm {
  private readonly timer: HostTimer;
  private readonly watch: FdWatch;
  private dueAt = Infinity;

  constructor(
    loop: IoEventLoop,
    private readonly onAlarm: () => void,
    private readonly clock: Clock = monotonicClock,
  ) {
    this.timer = HostTimer.create();
    try {
      this.watch = loop.watch(this.timer.fd, () => this.fired());
    } catch (e) {
      this.timer.close();
      throw e;
    }
  }

  /** The descriptor the loop watches (tests fire it). */
  get fd(): number {
    return this.timer.fd;
  }

  /** Whether the alarm is set. */
  get pending(): boolean {
    return this.dueAt !== Infinity;
  }

  /** Call onAlarm in `ms` milliseconds, at least MIN_ALARM_MS (or at the time already set, when earlier). */
  set(ms: number): void {
    const wait = Math.max(ms, MIN_ALARM_MS);
    const at = this.clock() + wait;
    if (at >= this.dueAt) return;
    this.dueAt = at;
    this.timer.arm(wait);
  }

  /** Whether `bucket` is in debt now; if so, the alarm is set for when it no longer is. */
  waitFor(bucket: TokenBucket): boolean {
    const now = this.clock();
    if (bucket.ready(now)) return false;
    this.set(bucket.wait(now));
    return true;
  }

  cancel(): void {
    if (this.dueAt === Infinity) return;
    this.dueAt = Infinity;
    this.timer.disarm();
  }

  private fired(): void {
    this.timer.take();
    if (this.dueAt === Infinity) return;
    this.dueAt = Infinity;
    this.onAlarm();
  }

  close(): void {
    this.watch.close();
    this.timer.close();
  }
}
