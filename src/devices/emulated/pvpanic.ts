/**
 * The paravirtual panic device (QEMU's "pvpanic" ISA device, ACPI id
 * QEMU0001): one I/O port. Reading it returns the events the host understands
 * (bit 0 PANICKED, bit 1 CRASH_LOADED); the guest kernel writes PANICKED from
 * its panic notifier, or CRASH_LOADED when a kdump kernel takes over. Linux
 * drives it with drivers/misc/pvpanic/pvpanic-mmio.c (bound through the DSDT).
 *
 * A panic is reported to the board's power control as a crash, so the run
 * ends with the guest's panic as its reason instead of looking like a reboot
 * (panic=-1). CRASH_LOADED is recorded but not fatal: the kdump kernel runs on.
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { structLayout } from "../../machine/shared-state.js";
import type { PowerControl, SavedDeviceState } from "../dependencies.js";
import type { DeviceState } from "./saved-state.js";

export const PVPANIC_PORT = 0x505;
export const PVPANIC_EVENT = { panicked: 1, crashLoaded: 2 } as const;

export interface PvpanicSaved extends SavedDeviceState {
  readonly kind: "pvpanic";
  readonly version: 1;
  readonly events: number;
}

export class Pvpanic implements BusDevice {
  static readonly layout = structLayout({ events: "u8" });
  readonly regions: readonly IoRegion[];

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof Pvpanic.layout.fields>,
    private readonly deps: { power: PowerControl },
    config: { port?: number } = {},
  ) {
    this.regions = [{ name: "event", space: "pio", start: config.port ?? PVPANIC_PORT, length: 1 }];
  }

  reset(): void {
    this.state.events = 0;
  }

  /** Events the guest has reported since power-on. */
  get events(): number {
    return this.state.events;
  }

  read(_region: string, _offset: number, size: AccessSize): number {
    return size === 1 ? PVPANIC_EVENT.panicked | PVPANIC_EVENT.crashLoaded : size === 2 ? 0xffff : 0xffff_ffff;
  }

  write(_region: string, _offset: number, size: AccessSize, value: number): void {
    if (size !== 1) return;
    const events = value & (PVPANIC_EVENT.panicked | PVPANIC_EVENT.crashLoaded);
    this.state.events = this.state.events | events;
    if ((events & PVPANIC_EVENT.panicked) !== 0) this.deps.power.reportPanic("guest kernel panic (reported through pvpanic)");
  }

  save(): PvpanicSaved {
    return { kind: "pvpanic", version: 1, events: this.state.events };
  }
}
