/**
 * What the worker's device thread offers the PCI device models it owns.
 *
 * The device thread (src/worker/device-thread.ts) is one thread that owns every
 * PCI device of a VM: it services their BAR and config accesses (forwarded from
 * the vCPU threads), blocks in poll(2) on their file descriptors (ioeventfds for
 * virtqueue notifications, TAP devices, sockets) and raises their interrupts.
 * A device model is therefore a plain single-threaded object; these services
 * are injected so tests can drive a device with fakes and no KVM.
 */
import type { GuestMemory } from "../../machine/guest-memory.js";
import type { IrqLine } from "../dependencies.js";
import type { MsiSink } from "./msix.js";

/** A registered file-descriptor watch. */
export interface FdWatch {
  close(): void;
}

export interface IoEventLoop {
  /** Call `onReadable` (on the device thread) whenever `fd` polls readable (POLLIN/POLLHUP/POLLERR). */
  watch(fd: number, onReadable: () => void): FdWatch;
  /**
   * Call `onWritable` (on the device thread) whenever `fd` polls writable
   * (POLLOUT/POLLHUP/POLLERR): how a device waits for room in a host socket it
   * filled. Level-triggered, as watch(): close it once nothing waits.
   */
  watchWritable(fd: number, onWritable: () => void): FdWatch;
  /**
   * Run `task` once on the device thread after the access being handled has
   * been answered (the vCPU that made it goes on), before the thread next
   * waits: how an emulated device starts work that must not hold up the vCPU
   * (an IDE DMA transfer). A task deferred twice runs twice.
   */
  defer(task: () => void): void;
}

/**
 * Doorbells written by the guest without a VM exit (KVM ioeventfd). A virtio
 * transport maps each queue's notify address here; when the BAR moves or
 * decoding is turned off it maps the new address or `undefined`.
 */
export interface DoorbellMap {
  /**
   * Deliver guest MMIO writes to [gpa, gpa+length) as `onRing()` calls instead of
   * exits; `gpa` undefined removes the doorbell. `key` identifies it per device.
   */
  mapDoorbell(key: number, gpa: number | undefined, length: number, onRing: () => void): void;
}

/** Everything a PCI device model may be given. */
/**
 * Register values the vCPU threads may answer themselves. An emulated
 * device's register access is a round trip to the device thread (the costly
 * part of the emulated path); a 1-byte port read that has no side effect
 * (IDE Alternate Status, bus-master status) can instead be answered from a
 * value the device thread published, as long as that value is kept current:
 * the device republishes after every change a read could see, and before it
 * raises an interrupt (the guest's handler reads the new values).
 */
export interface PortReadShadow {
  /** A 1-byte read of `port` now returns `value` and has no side effect. */
  publish(port: number, value: number): void;
  /** Reads of `port` go to the device thread again. */
  withdraw(port: number): void;
}

/**
 * Ports whose writes a vCPU may post: queue for the device thread and go on
 * without waiting for it, as a CPU goes on after a posted write. Safe for a
 * device whose writes need no answer and whose effects the guest only learns
 * of through later register reads or interrupts (every later read still sees
 * every earlier write: the device thread applies queued writes first).
 */
export interface PostedWritePorts {
  accept(port: number): void;
  refuse(port: number): void;
}

/**
 * A block of a BAR's ports (`count` from offset `first`) that takes posted
 * writes wherever the BAR decodes: moveTo() refuses the old address's ports
 * and accepts the new one's. Nothing when the device was given no
 * PostedWritePorts.
 */
export class PostedPortWindow {
  private base: number | undefined;
  constructor(
    private readonly posted: PostedWritePorts | undefined,
    private readonly first: number,
    private readonly count: number,
  ) {}

  /** The BAR decodes at `base` now (undefined: nowhere). */
  moveTo(base: number | undefined): void {
    const posted = this.posted;
    if (base === this.base || posted === undefined) return;
    if (this.base !== undefined) for (let i = 0; i < this.count; i++) posted.refuse(this.base + this.first + i);
    if (base !== undefined) for (let i = 0; i < this.count; i++) posted.accept(base + this.first + i);
    this.base = base;
  }
}

export interface PciDeviceServices {
  readonly memory: GuestMemory;
  /** The function's INTx line (the thread ORs lines that share a GSI). */
  readonly intx: IrqLine;
  readonly msi: MsiSink;
  readonly loop: IoEventLoop;
  readonly doorbells: DoorbellMap;
  /** Where the device may publish side-effect-free port reads (none: every read is forwarded). */
  readonly portShadow?: PortReadShadow;
  /** Where the device may accept posted writes (none: every write waits for the device thread). */
  readonly postedWrites?: PostedWritePorts;
}
