/**
 * The device thread's event loop: poll(2) over a changing set of descriptors
 * (readable or writable), and tasks deferred until the access being handled
 * was answered. Nothing is allocated per wake-up. A handler or task that
 * throws is reported (onTaskError) and does not end the loop: a failed
 * handler's watch is dropped, so a descriptor that keeps failing cannot spin it.
 */
import { poll, POLLIN, POLLOUT } from "../hypervisor/libc.js";
import type { FdWatch, IoEventLoop } from "../devices/pci/device-thread-services.js";

interface Watch {
  readonly fd: number;
  /** POLLIN or POLLOUT. */
  readonly events: number;
  readonly handler: () => void;
  closed: boolean;
}

export class PollLoop implements IoEventLoop {
  private watches: Watch[] = [];
  private fds = new Int32Array(16);
  private dirty = true;
  /** Deferred tasks, run in order by runDeferred(); a task may defer more (run in the same pass). */
  private readonly deferred: (() => void)[] = [];

  constructor(private readonly onTaskError: (e: unknown) => void) {}

  defer(task: () => void): void {
    this.deferred.push(task);
  }

  /** Run every deferred task, those they defer included (each fails alone). */
  runDeferred(): void {
    const tasks = this.deferred;
    for (let i = 0; i < tasks.length; i++) {
      try {
        tasks[i]!();
      } catch (e) {
        this.onTaskError(e);
      }
    }
    tasks.length = 0;
  }

  watch(fd: number, onReadable: () => void): FdWatch {
    return this.add(fd, POLLIN, onReadable);
  }

  watchWritable(fd: number, onWritable: () => void): FdWatch {
    return this.add(fd, POLLOUT, onWritable);
  }

  private add(fd: number, events: number, handler: () => void): FdWatch {
    const w: Watch = { fd, events, handler, closed: false };
    this.watches.push(w);
    this.dirty = true;
    return {
      close: () => {
        w.closed = true;
        this.dirty = true;
      },
    };
  }

  private rebuild(): void {
    this.watches = this.watches.filter((w) => !w.closed);
    if (this.fds.length < this.watches.length * 2) this.fds = new Int32Array(this.watches.length * 4);
    this.watches.forEach((w, i) => {
      this.fds[i * 2] = w.fd;
      this.fds[i * 2 + 1] = w.events; // events (low 16 bits), revents cleared
    });
    this.dirty = false;
  }

  /** Wait up to `timeoutMs` (not at all while tasks are deferred) and run the handlers of ready fds. */
  runOnce(timeoutMs: number): void {
    if (this.dirty) this.rebuild();
    const n = this.watches.length;
    const watches = this.watches;
    for (let i = 0; i < n; i++) this.fds[i * 2 + 1] = watches[i]!.events;
    const ready = poll(this.fds, n, this.deferred.length > 0 ? 0 : timeoutMs);
    if (ready <= 0) return;
    for (let i = 0; i < n; i++) {
      const revents = this.fds[i * 2 + 1]! >>> 16;
      if (revents === 0) continue;
      const w = watches[i]!;
      if (w.closed) continue;
      try {
        w.handler();
      } catch (e) {
        // One device's failed handler must not end the thread that serves every device of the VM. Its watch is
        // dropped (a level-triggered fd that keeps failing would otherwise spin the loop) and the failure reported.
        w.closed = true;
        this.dirty = true;
        this.onTaskError(e);
      }
    }
  }
}

