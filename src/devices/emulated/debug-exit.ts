/**
 * A debug-exit port for test guests (QEMU's isa-debug-exit convention): a
 * write of value v asks the board to power off with exit status (v << 1) | 1,
 * so a status of 1 or more always means "the guest wrote the port". The
 * status is kept in shared state for the worker (`exitStatus()`); the power
 * request's source is "debug-exit:<status>". Reads return 0xff... (nothing).
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { structLayout } from "../../machine/shared-state.js";
import type { PowerControl, SavedDeviceState } from "../dependencies.js";
import { SavedStateReader, type DeviceState } from "./saved-state.js";

export interface DebugExitSaved extends SavedDeviceState {
  readonly kind: "debug-exit";
  readonly version: 1;
  /** Exit status requested so far, or null. */
  readonly exitStatus: number | null;
}

export class DebugExit implements BusDevice {
  static readonly layout = structLayout({ status: "u32", written: "u8" });

  readonly regions: readonly IoRegion[];
  private readonly power: PowerControl;

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof DebugExit.layout.fields>,
    deps: { power: PowerControl },
    config: { port?: number; length?: number } = {},
  ) {
    this.power = deps.power;
    this.regions = [{ name: "exit", space: "pio", start: config.port ?? 0x501, length: config.length ?? 2 }];
  }

  reset(): void {
    this.state.status = 0;
    this.state.written = 0;
  }

  /** The exit status the guest asked for, or null if it has not written the port. */
  exitStatus(): number | null {
    return this.state.written ? this.state.status : null;
  }

  read(_region: string, _offset: number, size: AccessSize): number {
    return size === 1 ? 0xff : size === 2 ? 0xffff : 0xffffffff;
  }

  write(_region: string, _offset: number, size: AccessSize, value: number): void {
    const bits = size === 1 ? 0xff : size === 2 ? 0xffff : 0x7fffffff;
    const status = (((value & bits) * 2) | 1) >>> 0;
    this.state.status = status;
    this.state.written = 1;
    this.power.requestPowerOff(`debug-exit:${status}`);
  }

  save(): DebugExitSaved {
    return { kind: "debug-exit", version: 1, exitStatus: this.exitStatus() };
  }

  restore(saved: unknown): void {
    const r = new SavedStateReader(this.name, saved, "debug-exit", 1);
    const raw = (saved as { exitStatus?: unknown }).exitStatus;
    if (raw === null) {
      this.state.written = 0;
      this.state.status = 0;
      return;
    }
    const status = r.int("exitStatus", 1, 0xffffffff);
    if (!(status & 1)) r.fail("exitStatus is always odd");
    this.state.status = status;
    this.state.written = 1;
  }
}
