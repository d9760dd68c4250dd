/**
 * Fakes for device tests: a recording IRQ line, a manual clock, a collecting
 * byte sink, recorded power requests, a seeded PRNG, a fresh shared state
 * region for a layout, the device thread's deferred work, a port read
 * shadow that keeps what a device published, and the ports that take posted
 * writes.
 */
import type { ByteSink, Clock, IrqLine, PowerControl } from "../../src/devices/dependencies.js";
import type { PortReadShadow, PostedWritePorts } from "../../src/devices/pci/device-thread-services.js";
import type { BlockRequestRing } from "../../src/storage/block-device.js";
import { SharedStateArena, type FieldType, type StructLayout, type Bound } from "../../src/machine/shared-state.js";

export class RecordingIrqLine implements IrqLine {
  level = false;
  /** Every setLevel call, in order. */
  readonly calls: boolean[] = [];
  setLevel(level: boolean): void {
    this.level = level;
    this.calls.push(level);
  }
  /** Rising edges seen so far. */
  rises(): number {
    let n = 0;
    let prev = false;
    for (const l of this.calls) {
      if (l && !prev) n++;
      prev = l;
    }
    return n;
  }
}

export class ManualClock implements Clock {
  constructor(public ns = 0n, public wallMs = Date.UTC(2024, 0, 15, 12, 34, 56)) {}
  monotonicNs(): bigint {
    return this.ns;
  }
  wallClockMs(): number {
    return this.wallMs;
  }
  /** Move both clocks forward. */
  advanceNs(ns: bigint): void {
    this.ns += ns;
    this.wallMs += Number(ns) / 1e6;
  }
}

export class CollectingSink implements ByteSink {
  readonly bytes: number[] = [];
  write(bytes: Uint8Array): void {
    this.bytes.push(...bytes);
  }
  text(): string {
    return String.fromCharCode(...this.bytes);
  }
}

export class RecordingPower implements PowerControl {
  readonly powerOffs: string[] = [];
  readonly resets: string[] = [];
  requestPowerOff(source: string): void {
    this.powerOffs.push(source);
  }
  requestReset(source: string): void {
    this.resets.push(source);
  }
  readonly panics: string[] = [];
  reportPanic(reason: string): void {
    this.panics.push(reason);
  }
}

/** Small deterministic PRNG (mulberry32). */
export class SeededRandom {
  constructor(private seed: number) {}
  next(): number {
    let t = (this.seed = (this.seed + 0x6d2b79f5) | 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
}

/** Fresh state for one device, as the board allocates it. */
export function freshState<F extends Record<string, FieldType>>(layout: StructLayout<F>): Bound<F> {
  return SharedStateArena.create(layout.size + 64).allocate(layout);
}

/**
 * The device thread's deferred work (IoEventLoop.defer): held until `run()`,
 * or, when `immediate`, run inside the access that deferred it (a device
 * thread that answers and runs its deferred work before the next access is
 * indistinguishable to a driver that waits for the interrupt or polls status).
 */
export class DeferredWork {
  readonly tasks: (() => void)[] = [];
  constructor(public immediate = true) {}
  defer(task: () => void): void {
    if (this.immediate) task();
    else this.tasks.push(task);
  }
  /** Run what is held (and what that defers); returns how many tasks ran. */
  run(): number {
    let n = 0;
    while (this.tasks.length > 0) {
      this.tasks.shift()!();
      n++;
    }
    return n;
  }
}

/** The port read shadow as a map: port -> the byte a vCPU would answer with (absent: forwarded). */
export class RecordingPortShadow implements PortReadShadow {
  readonly values = new Map<number, number>();
  publish(port: number, value: number): void {
    this.values.set(port, value & 0xff);
  }
  withdraw(port: number): void {
    this.values.delete(port);
  }
}

/** The ports a device accepts posted writes on. */
export class RecordingPostedWritePorts implements PostedWritePorts {
  readonly ports = new Set<number>();
  accept(port: number): void {
    this.ports.add(port);
  }
  refuse(port: number): void {
    this.ports.delete(port);
  }
}

/**
 * A ring that takes requests and does nothing with them; they complete, with
 * the results a test sets, only once it says so (or when drained).
 */
export class ScriptedRing implements BlockRequestRing {
  readonly entries = 4;
  readonly prepared: number[] = [];
  results: number[] = [];
  ready = false;
  prepareVectored(_write: boolean, _fd: number, _offset: number, _a: Float64Array, _l: Uint32Array, _n: number, token: number): boolean {
    if (this.prepared.length >= this.entries) return false;
    this.prepared.push(token);
    return true;
  }
  prepareFsync(_fd: number, _dataOnly: boolean, token: number): boolean {
    return this.prepareVectored(false, 0, 0, new Float64Array(0), new Uint32Array(0), 0, token);
  }
  submit(): void {}
  takeEvent(): void {}
  reap(handler: (token: number, result: number) => void): number {
    if (!this.ready) return 0;
    const all = this.prepared.splice(0);
    all.forEach((token, i) => handler(token, this.results[i] ?? 0));
    return all.length;
  }
  drain(handler: (token: number, result: number) => void): void {
    this.ready = true;
    this.reap(handler);
  }
}
