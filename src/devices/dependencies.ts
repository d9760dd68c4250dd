/**
 * What a device model is given instead of reaching for globals: interrupt
 * lines, a clock, a byte sink for output, and the board's power controls.
 * Tests pass fakes (a recording IrqLine, a manual clock); the worker passes
 * implementations backed by KVM (KVM_IRQ_LINE / irqfd) and the console.
 */

/** An interrupt line into the interrupt controller (an ISA IRQ / GSI). */
export interface IrqLine {
  /** Drive the line high (true) or low (false). Edge detection is the controller's job. */
  setLevel(level: boolean): void;
}

/** Monotonic and wall-clock time, injected so tests can move it. */
export interface Clock {
  /** Monotonic nanoseconds. */
  monotonicNs(): bigint;
  /** Wall-clock milliseconds since the Unix epoch (the RTC's time base). */
  wallClockMs(): number;
}

export const systemClock: Clock = {
  monotonicNs: () => process.hrtime.bigint(),
  wallClockMs: () => Date.now(),
};

/** Where a device's output bytes go (the console, a log file, a socket). */
export interface ByteSink {
  /** `bytes` is valid only during the call (callers reuse the buffer): copy what must be kept. */
  write(bytes: Uint8Array): void;
}

/** The board's power and reset controls, requested by the guest through a device. */
export interface PowerControl {
  /** The guest asked to power off (ACPI S5, a debug-exit port...). */
  requestPowerOff(source: string): void;
  /** The guest asked to reset the machine (i8042 pulse, ACPI reset register, 0xCF9). */
  requestReset(source: string): void;
  /** The guest reported a crash (a kernel panic through pvpanic): the VM is stopped with `reason`. */
  reportPanic(reason: string): void;
}

/** Every device's saved state is its own plain-data type with a kind and a version. */
export interface SavedDeviceState {
  readonly kind: string;
  readonly version: number;
}
