/**
 * The console's output side: bytes the guest writes to COM1, on their way to
 * a file descriptor (the VM process's stdout, which `partis run` leaves on the
 * user's terminal or pipe).
 *
 * The UART transmits from whichever thread runs the guest's OUT: a vCPU
 * thread, with the machine lock held. Writing each byte to the descriptor
 * there cost a system call per byte on the vCPU's exit path, and a terminal
 * or pipe reader a wake-up per byte. Instead the writers append to a ring in
 * shared memory (ConsoleOutputRing.writer, a ByteSink) and the main thread
 * writes the ring out in batches (ConsoleOutputFlusher):
 *
 * - An idle flusher sleeps on the ring's state word; the first byte after a
 *   quiet spell wakes it (one futex wake), so a typed character's echo goes
 *   out at once.
 * - While output keeps coming, the flusher stays awake and looks again every
 *   FLUSH_INTERVAL_MS, and writers append without waking anyone: a burst
 *   (a kernel log, `dmesg`) costs the vCPU no system call per byte.
 * - A full ring makes the writer wait for room (the guest is slowed, output
 *   is never dropped), unless the ring is closed: the VM is being torn down.
 *
 * Writers must be serialised (the machine lock does it for the UART). The
 * ring's positions are free-running 32-bit counters.
 */
import type { ByteSink } from "../devices/dependencies.js";
import * as libc from "../hypervisor/libc.js";
import { bootTrace } from "./boot-trace.js";

/** Ring size: at least a screenful of a kernel log, small next to guest RAM. */
export const CONSOLE_RING_BYTES = 64 * 1024;
/**
 * How often an awake flusher looks again while output keeps coming: a
 * terminal redraws no faster, and each look costs the main thread a timer,
 * a poll(2) and a write(2). (1 ms was measured in the nested test host,
 * where a guest's `dmesg` arrives at well under a byte per millisecond: the
 * main thread then spent more CPU than the vCPU saved.)
 */
export const FLUSH_INTERVAL_MS = 10;
/** How long teardown waits for a reader that takes no more output before dropping the rest. */
export const FINAL_FLUSH_MS = 2000;

// Header words (Int32), then the data bytes.
const WRITE = 0;
const READ = 1;
const STATE = 2;
const CLOSED = 3;
const HEADER_BYTES = 16;

// STATE values.
const IDLE = 0; // the flusher sleeps until a writer wakes it
const AWAKE = 1; // the flusher will look again by itself

/** POLLERR | POLLHUP | POLLNVAL: write then, to learn why. */
const POLL_GONE = 0x008 | 0x010 | 0x020;

const sleepWord = new Int32Array(new SharedArrayBuffer(4));

export class ConsoleOutputRing {
  private readonly header: Int32Array;
  private readonly data: Uint8Array;
  readonly capacity: number;

  private constructor(readonly buffer: SharedArrayBuffer) {
    this.header = new Int32Array(buffer, 0, HEADER_BYTES / 4);
    this.data = new Uint8Array(buffer, HEADER_BYTES);
    this.capacity = this.data.length;
    if (this.capacity < 2 || (this.capacity & (this.capacity - 1)) !== 0) throw new RangeError(`console ring of ${this.capacity} bytes: not a power of two`);
  }

  static create(capacity = CONSOLE_RING_BYTES): ConsoleOutputRing {
    return new ConsoleOutputRing(new SharedArrayBuffer(HEADER_BYTES + capacity));
  }

  /** The same ring in another thread (the buffer comes in its thread data). */
  static attach(buffer: SharedArrayBuffer): ConsoleOutputRing {
    return new ConsoleOutputRing(buffer);
  }

  /** Bytes written and not yet taken by the flusher. */
  get pending(): number {
    return (Atomics.load(this.header, WRITE) - Atomics.load(this.header, READ)) >>> 0;
  }

  get closed(): boolean {
    return Atomics.load(this.header, CLOSED) !== 0;
  }

  /** A sink for one writer thread. */
  writer(): ByteSink {
    let first = true;
    return {
      write: (bytes: Uint8Array): void => {
        if (first) {
          first = false;
          bootTrace("console", "first byte from the guest");
        }
        this.append(bytes);
      },
    };
  }

  /** Append `bytes`, waiting for room while the ring is full; dropped once the ring is closed. */
  append(bytes: Uint8Array): void {
    const h = this.header;
    const mask = this.capacity - 1;
    let off = 0;
    while (off < bytes.length) {
      if (Atomics.load(h, CLOSED) !== 0) return;
      const w = Atomics.load(h, WRITE);
      const r = Atomics.load(h, READ);
      const free = this.capacity - ((w - r) >>> 0);
      if (free === 0) {
        this.wakeFlusher();
        Atomics.wait(h, READ, r, 10);
        continue;
      }
      const n = Math.min(free, bytes.length - off);
      const at = w & mask;
      const d = this.data;
      if (n <= 16) {
        // One byte per OUT from the UART: no view for that.
        for (let k = 0; k < n; k++) d[(at + k) & mask] = bytes[off + k]!;
      } else {
        const first = Math.min(n, this.capacity - at);
        d.set(bytes.subarray(off, off + first), at);
        if (first < n) d.set(bytes.subarray(off + first, off + n), 0);
      }
      // Publish the bytes, then look at the flusher's state (both sequentially consistent: a
      // flusher going idle re-reads WRITE after storing IDLE, so one of the two sees the other).
      Atomics.store(h, WRITE, (w + n) | 0);
      off += n;
      this.wakeFlusher();
    }
  }

  private wakeFlusher(): void {
    const h = this.header;
    if (Atomics.load(h, STATE) === IDLE && Atomics.compareExchange(h, STATE, IDLE, AWAKE) === IDLE) Atomics.notify(h, STATE);
  }

  /** The oldest pending bytes up to the end of the ring (the rest, after a wrap, once these are consumed), for the flusher. */
  pendingView(): Uint8Array | undefined {
    const r = Atomics.load(this.header, READ);
    const n = (Atomics.load(this.header, WRITE) - r) >>> 0;
    if (n === 0) return undefined;
    const at = r & (this.capacity - 1);
    return this.data.subarray(at, at + Math.min(n, this.capacity - at));
  }

  /** Mark `n` pending bytes as taken and let a writer waiting for room go on. */
  consume(n: number): void {
    Atomics.store(this.header, READ, (Atomics.load(this.header, READ) + n) | 0);
    Atomics.notify(this.header, READ);
  }

  /** Flusher side: going to sleep. True when it may (nothing arrived meanwhile). */
  enterIdle(): boolean {
    Atomics.store(this.header, STATE, IDLE);
    if (this.pending === 0) return true;
    Atomics.store(this.header, STATE, AWAKE);
    return false;
  }

  /** Flusher side: resolves when a writer wakes it (or after `timeoutMs`). */
  async waitForOutput(timeoutMs: number): Promise<void> {
    const w = Atomics.waitAsync(this.header, STATE, IDLE, timeoutMs);
    if (w.async) await w.value;
    Atomics.store(this.header, STATE, AWAKE);
  }

  /** No more output is taken: writers return at once (teardown, when the reader may never drain). */
  close(): void {
    Atomics.store(this.header, CLOSED, 1);
    Atomics.notify(this.header, READ);
    Atomics.notify(this.header, STATE); // an idle flusher's loop ends
  }
}

/** Most bytes per write(2): a pipe that polls writable takes this much without blocking. */
const WRITE_CHUNK = 4096;

/**
 * The main thread's half: writes the ring to `fd`, never blocking the event
 * loop: it writes only while poll(2) says the descriptor takes more (stdout
 * may be a blocking pipe or terminal, whose flags are shared with other
 * processes and not changed here), at most WRITE_CHUNK bytes at a time. A
 * reader that is behind is retried on a timer (the ring fills, and then the
 * guest waits); one that is gone (EPIPE) or a descriptor that fails takes no
 * more output (the guest must not stall on a console nobody reads).
 */
export class ConsoleOutputFlusher {
  private running = false;
  private timer: NodeJS.Timeout | undefined;
  private discarding = false;
  private readonly pollFds = new Int32Array(2);
  /** Set when writing failed for good: what happened, once (the caller reports it). */
  failure: string | undefined;

  private readonly idleCheckMs: number;
  private readonly afterLook: (() => void) | undefined;

  /**
   * @param options.idleCheckMs how long an idle flusher sleeps without a wake-up before it looks
   *   anyway (so a lost wake-up could only delay output; tests make it long to prove the wake-up works)
   * @param options.afterLook called each time the flusher has looked at the ring (at most
   *   FLUSH_INTERVAL_MS apart while output flows): the UART's owed THRE interrupt is settled there
   */
  constructor(
    readonly ring: ConsoleOutputRing,
    private readonly fd: number,
    options: { readonly idleCheckMs?: number; readonly afterLook?: () => void } = {},
  ) {
    this.idleCheckMs = options.idleCheckMs ?? 1000;
    this.afterLook = options.afterLook;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    void this.loop();
  }

  private async loop(): Promise<void> {
    while (this.running) {
      const progress = this.writeSome();
      if (!this.running) return;
      this.afterLook?.();
      if (progress === "blocked" || this.ring.pending > 0 || progress === "wrote") {
        // Output is flowing (or the reader is behind): look again shortly, writers need not wake us.
        await new Promise<void>((resolve) => (this.timer = setTimeout(resolve, progress === "blocked" ? 5 : FLUSH_INTERVAL_MS)));
        this.timer = undefined;
        continue;
      }
      if (!this.ring.enterIdle()) continue;
      await this.ring.waitForOutput(this.idleCheckMs);
    }
  }

  /** Write what is pending now, without blocking. */
  private writeSome(): "wrote" | "empty" | "blocked" {
    let wrote = false;
    for (;;) {
      const v = this.ring.pendingView();
      if (v === undefined) return wrote ? "wrote" : "empty";
      if (this.discarding) {
        this.ring.consume(v.length);
        continue;
      }
      this.pollFds[0] = this.fd;
      this.pollFds[1] = libc.POLLOUT;
      const ready = libc.poll(this.pollFds, 1, 0);
      if (ready === 0) return "blocked";
      if (ready < 0) continue; // EINTR
      const revents = this.pollFds[1]! >>> 16;
      if ((revents & libc.POLLOUT) === 0 && (revents & POLL_GONE) === 0) return "blocked";
      const len = Math.min(v.length, WRITE_CHUNK);
      const n = libc.raw.write(this.fd, v, len);
      if (n > 0) {
        this.ring.consume(n);
        wrote = true;
        continue;
      }
      const e = n < 0 ? libc.errno() : 0;
      if (e === libc.Errno.EINTR) continue;
      if (e === libc.Errno.EAGAIN) return "blocked";
      // EPIPE (the reader went away) or a real failure: drop console output from here on.
      if (e !== libc.Errno.EPIPE) this.failure ??= `console output to fd ${this.fd} failed (${libc.lastError("write", { fd: this.fd }).message}); further output is dropped`;
      this.discarding = true;
    }
  }

  /**
   * Write out everything pending before returning (teardown: the VM's last
   * lines come before what the host prints about its end). Waits for a slow
   * reader up to FINAL_FLUSH_MS, then drops the rest; afterwards writers drop
   * their output.
   */
  finish(): void {
    this.running = false;
    if (this.timer !== undefined) clearTimeout(this.timer);
    const deadline = Date.now() + FINAL_FLUSH_MS;
    while (this.writeSome() === "blocked" && Date.now() < deadline) Atomics.wait(sleepWord, 0, 0, 2);
    this.ring.close();
    this.discarding = true;
    this.writeSome();
  }
}
