/**
 * PC/AT "system control port B" at port 0x61 (NMI status and speaker
 * control): bits 0-3 are read/write (PIT channel 2 gate, speaker data,
 * parity and I/O channel check disables); bit 4 toggles with the DRAM
 * refresh (every 15.085 µs, from the monotonic clock); bit 5 is PIT channel 2
 * OUT; bits 6-7 (NMI sources) read 0.
 *
 * DEVNOTE: when the board uses KVM's in-kernel PIT with its speaker port,
 * KVM answers port 0x61 itself and this device is never reached. Here the
 * PIT lives elsewhere, so OUT2 (bit 5) simply follows the gate: a PIT-based
 * TSC calibration loop that waits for OUT2 ends at once and Linux discards
 * its result as implausible (then uses kvmclock/CPUID) instead of spinning.
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { structLayout } from "../../machine/shared-state.js";
import type { Clock, SavedDeviceState } from "../dependencies.js";
import { SavedStateReader, type DeviceState } from "./saved-state.js";

const GATE2 = 0x01;
const WRITABLE = 0x0f;
const REFRESH = 0x10;
const OUT2 = 0x20;
const REFRESH_PERIOD_NS = 15_085n;

export interface SystemControlPortBSaved extends SavedDeviceState {
  readonly kind: "system-control-port-b";
  readonly version: 1;
  readonly value: number;
}

export class SystemControlPortB implements BusDevice {
  static readonly layout = structLayout({ value: "u8" });

  readonly regions: readonly IoRegion[] = [{ name: "port-b", space: "pio", start: 0x61, length: 1 }];
  private readonly clock: Clock;

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof SystemControlPortB.layout.fields>,
    deps: { clock: Clock },
  ) {
    this.clock = deps.clock;
  }

  reset(): void {
    this.state.value = 0;
  }

  read(_region: string, _offset: number, size: AccessSize): number {
    let v = this.state.value & WRITABLE;
    if ((this.clock.monotonicNs() / REFRESH_PERIOD_NS) & 1n) v |= REFRESH;
    if (v & GATE2) v |= OUT2;
    return size === 1 ? v : (0xffffff00 | v) >>> 0;
  }

  write(_region: string, _offset: number, _size: AccessSize, value: number): void {
    this.state.value = value & WRITABLE;
  }

  save(): SystemControlPortBSaved {
    return { kind: "system-control-port-b", version: 1, value: this.state.value };
  }

  restore(saved: unknown): void {
    const r = new SavedStateReader(this.name, saved, "system-control-port-b", 1);
    this.state.value = r.int("value", 0, WRITABLE);
  }
}
