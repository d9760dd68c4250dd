/**
 * The machine's power state, shared by every thread of a worker: the first
 * thread to record an outcome (poweroff, reset, crash) wins; the others see it
 * and stop. One Int32 word in a SharedArrayBuffer, plus the reason text.
 */
import type { PowerControl } from "../devices/dependencies.js";
import type { VmOutcome } from "./vm-config.js";

const RUNNING = 0;
const CODES = { poweroff: 1, reset: 2, crash: 3, failed: 4 } as const;
const REASON_BYTES = 1016;

export class PowerState {
  private readonly word: Int32Array;
  private readonly reason: Uint8Array;

  constructor(readonly buffer: SharedArrayBuffer) {
    this.word = new Int32Array(buffer, 0, 2);
    this.reason = new Uint8Array(buffer, 8, REASON_BYTES);
  }

  static create(): PowerState {
    return new PowerState(new SharedArrayBuffer(8 + REASON_BYTES));
  }

  get running(): boolean {
    return Atomics.load(this.word, 0) === RUNNING;
  }

  /** Record an outcome; returns false when another one was recorded first. */
  record(outcome: VmOutcome): boolean {
    if (Atomics.compareExchange(this.word, 0, RUNNING, -1) !== RUNNING) return false;
    const text = outcome.kind === "crash" || outcome.kind === "failed" ? outcome.reason : outcome.source;
    const bytes = new TextEncoder().encode(text).subarray(0, REASON_BYTES);
    this.reason.fill(0);
    this.reason.set(bytes);
    Atomics.store(this.word, 0, CODES[outcome.kind]);
    Atomics.notify(this.word, 0);
    return true;
  }

  outcome(): VmOutcome | undefined {
    const code = Atomics.load(this.word, 0);
    if (code <= 0) return undefined;
    const end = this.reason.indexOf(0);
    const text = new TextDecoder().decode(this.reason.slice(0, end < 0 ? REASON_BYTES : end));
    if (code === CODES.poweroff) return { kind: "poweroff", source: text };
    if (code === CODES.reset) return { kind: "reset", source: text };
    if (code === CODES.failed) return { kind: "failed", reason: text };
    return { kind: "crash", reason: text };
  }

  /** Block until an outcome is recorded (or the timeout passes). */
  wait(timeoutMs: number): VmOutcome | undefined {
    Atomics.wait(this.word, 0, RUNNING, timeoutMs);
    return this.outcome();
  }

  /** The board's PowerControl, recording into this state. */
  control(onChange: () => void): PowerControl {
    return {
      requestPowerOff: (source) => {
        if (this.record({ kind: "poweroff", source })) onChange();
      },
      requestReset: (source) => {
        if (this.record({ kind: "reset", source })) onChange();
      },
      reportPanic: (reason) => {
        if (this.record({ kind: "crash", reason })) onChange();
      },
    };
  }
}
