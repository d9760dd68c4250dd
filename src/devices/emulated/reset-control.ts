/**
 * The chipset reset control register at port 0xCF9 (Intel ICH/PCH "RST_CNT"),
 * which the FADT's RESET_REG points at (value 0x06) and Linux's reboot=pci
 * path writes (0x02, then 0x06). Bits 1 (SYS_RST) and 3 (FULL_RST) are kept
 * and read back; setting bit 2 (RST_CPU) resets the machine and reads back 0.
 *
 * DEVNOTE: 0xCF9 lies inside the PCI configuration-address dword (0xCF8). The
 * bus dispatches an access by its first port, so a dword access at 0xCF8 goes
 * to the PCI host bridge and a byte access at 0xCF9 comes here, as on real
 * chipsets, provided the bridge claims only port 0xCF8 for its address register.
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { structLayout } from "../../machine/shared-state.js";
import type { PowerControl, SavedDeviceState } from "../dependencies.js";
import { SavedStateReader, type DeviceState } from "./saved-state.js";

const SYS_RST = 0x02;
const RST_CPU = 0x04;
const FULL_RST = 0x08;
const KEPT = SYS_RST | FULL_RST;

export interface ResetControlSaved extends SavedDeviceState {
  readonly kind: "reset-control";
  readonly version: 1;
  readonly value: number;
}

export class ResetControl implements BusDevice {
  static readonly layout = structLayout({ value: "u8" });

  readonly regions: readonly IoRegion[];
  private readonly power: PowerControl;

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof ResetControl.layout.fields>,
    deps: { power: PowerControl },
    config: { port?: number } = {},
  ) {
    this.power = deps.power;
    this.regions = [{ name: "reset", space: "pio", start: config.port ?? 0xcf9, length: 1 }];
  }

  reset(): void {
    this.state.value = 0;
  }

  read(_region: string, _offset: number, size: AccessSize): number {
    return size === 1 ? this.state.value : 0xffffff00 | this.state.value;
  }

  write(_region: string, _offset: number, _size: AccessSize, value: number): void {
    this.state.value = value & KEPT;
    if (value & RST_CPU) this.power.requestReset("cf9");
  }

  save(): ResetControlSaved {
    return { kind: "reset-control", version: 1, value: this.state.value };
  }

  restore(saved: unknown): void {
    const r = new SavedStateReader(this.name, saved, "reset-control", 1);
    const value = r.int("value", 0, 0xff);
    if (value & ~KEPT) r.fail("value holds bits that are never kept");
    this.state.value = value;
  }
}
