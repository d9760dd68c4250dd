/**
 * ACPI fixed-hardware power management (ACPI 6.x §4.8): the PM1a event block
 * (PM1_STS + PM1_EN), the PM1a control block and the PM timer, at the ports
 * the FADT announces (src/machine/acpi/build.ts: 0x600, 0x604, 0x608), with
 * the SCI on GSI 9 (level, active high).
 *
 * - PM1_STS (+0, 16 bits): write-1-to-clear. TMR_STS (bit 0) is set each time
 *   the timer's bit 23 changes; PWRBTN_STS (bit 8) by `pressPowerButton()`.
 * - PM1_EN (+2, 16 bits): TMR_EN, GBL_EN, PWRBTN_EN, RTC_EN are kept.
 * - PM1_CNT (0x604, 16 bits): SCI_EN (bit 0) always reads 1 (the FADT has no
 *   SMI_CMD, so the machine is always in ACPI mode); SLP_TYP (bits 10-12) is
 *   kept; SLP_EN (bit 13) is write-only: with SLP_TYP 5 (the DSDT's \_S5) it
 *   powers the machine off. Other sleep types are not offered by the DSDT
 *   and are ignored.
 * - PM_TMR (0x608, 32 bits): 24-bit counter at 3.579545 MHz from the
 *   monotonic clock (FADT TMR_VAL_EXT clear).
 *
 * The SCI is high while (PM1_STS & PM1_EN) != 0. `tick()` (or any PM1 read)
 * notices timer-carry events; the worker need only tick when TMR_EN is set
 * (`nextEventNs()`), which Linux never does.
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { structLayout } from "../../machine/shared-state.js";
import type { Clock, IrqLine, PowerControl, SavedDeviceState } from "../dependencies.js";
import { SavedStateReader, type DeviceState } from "./saved-state.js";

export const PM_TIMER_HZ = 3_579_545n;

const STS_TMR = 0x0001;
const STS_PWRBTN = 0x0100;
const STS_KEPT = STS_TMR | STS_PWRBTN;

const EN_TMR = 0x0001;
const EN_GBL = 0x0020;
const EN_PWRBTN = 0x0100;
const EN_RTC = 0x0400;
const EN_KEPT = EN_TMR | EN_GBL | EN_PWRBTN | EN_RTC;

const CNT_SCI_EN = 0x0001;
const CNT_BM_RLD = 0x0002;
const CNT_SLP_TYP = 0x1c00;
const CNT_SLP_EN = 0x2000;
const CNT_KEPT = CNT_BM_RLD | CNT_SLP_TYP;

const SLP_TYP_S5 = 5;
const TIMER_MASK = 0xffffff;
const TIMER_CARRY = 1n << 23n;

export interface AcpiPmSaved extends SavedDeviceState {
  readonly kind: "acpi-pm";
  readonly version: 1;
  readonly pm1Status: number;
  readonly pm1Enable: number;
  readonly pm1Control: number;
  /** PM timer value (24 bits) at the moment of saving; it resumes from here. */
  readonly timer: number;
}

export class AcpiPm implements BusDevice {
  static readonly layout = structLayout({
    /** Timer ticks = monotonic ticks + tickOffset. */
    tickOffset: "f64",
    /** Timer ticks / 2^23 when last looked at (for TMR_STS). */
    lastCarry: "f64",
    sts: "u16",
    en: "u16",
    cnt: "u16",
    sciLevel: "u8",
  });

  readonly regions: readonly IoRegion[];
  private readonly sci: IrqLine;
  private readonly clock: Clock;
  private readonly power: PowerControl;

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof AcpiPm.layout.fields>,
    deps: { sci: IrqLine; clock: Clock; power: PowerControl },
    config: { pm1EventPort?: number; pm1ControlPort?: number; pmTimerPort?: number } = {},
  ) {
    this.sci = deps.sci;
    this.clock = deps.clock;
    this.power = deps.power;
    this.regions = [
      { name: "pm1-event", space: "pio", start: config.pm1EventPort ?? 0x600, length: 4 },
      { name: "pm1-control", space: "pio", start: config.pm1ControlPort ?? 0x604, length: 2 },
      { name: "pm-timer", space: "pio", start: config.pmTimerPort ?? 0x608, length: 4 },
    ];
  }

  /** Power-on / machine reset: status, enables and control cleared; the timer keeps running. */
  reset(): void {
    const s = this.state;
    s.sts = 0;
    s.en = 0;
    s.cnt = 0;
    s.lastCarry = Number(this.ticks() / TIMER_CARRY);
    s.sciLevel = 0;
    this.sci.setLevel(false);
  }

  read(region: string, offset: number, size: AccessSize): number {
    let reg: number;
    let length: number;
    switch (region) {
      case "pm1-event":
        this.advance();
        this.updateSci();
        reg = this.state.sts | (this.state.en << 16);
        length = 4;
        break;
      case "pm1-control":
        reg = this.state.cnt | CNT_SCI_EN;
        length = 2;
        break;
      case "pm-timer":
        reg = this.timerValue();
        length = 4;
        break;
      default:
        return 0xffffffff;
    }
    return lanes(reg, offset, size, length);
  }

  write(region: string, offset: number, size: AccessSize, value: number): void {
    const s = this.state;
    if (region === "pm1-event") {
      const mask = laneMask(offset, size, 4);
      const v = (value << (8 * offset)) & mask;
      this.advance();
      // Status: write 1 to clear (only the lanes written).
      s.sts = s.sts & ~(v & 0xffff);
      if (mask & 0xffff0000) {
        const enMask = mask >>> 16;
        s.en = ((s.en & ~enMask) | ((v >>> 16) & enMask)) & EN_KEPT;
      }
      this.updateSci();
    } else if (region === "pm1-control") {
      const mask = laneMask(offset, size, 2) & 0xffff;
      const v = (value << (8 * offset)) & mask;
      s.cnt = ((s.cnt & ~mask) | v) & CNT_KEPT;
      if (v & CNT_SLP_EN && ((s.cnt & CNT_SLP_TYP) >> 10) === SLP_TYP_S5) this.power.requestPowerOff("acpi-s5");
    }
    // pm-timer: read-only.
  }

  /** The host's power button: sets PWRBTN_STS (the SCI rises if PWRBTN_EN is set). */
  pressPowerButton(): void {
    this.state.sts = this.state.sts | STS_PWRBTN;
    this.updateSci();
  }

  /** Notices PM timer carries (TMR_STS) and drives the SCI. */
  tick(): void {
    this.advance();
    this.updateSci();
  }

  /** Monotonic time (ns) of the next timer carry when TMR_EN is set, else null. */
  nextEventNs(): bigint | null {
    if (!(this.state.en & EN_TMR)) return null;
    const next = (this.ticks() / TIMER_CARRY + 1n) * TIMER_CARRY;
    const monoTicks = next - BigInt(this.state.tickOffset);
    return (monoTicks * 1_000_000_000n + PM_TIMER_HZ - 1n) / PM_TIMER_HZ;
  }

  /** The level the SCI should have now. */
  sciCondition(): boolean {
    return (this.state.sts & this.state.en) !== 0;
  }

  /** The 24-bit PM timer value now. */
  timerValue(): number {
    return Number(this.ticks() & BigInt(TIMER_MASK));
  }

  private ticks(): bigint {
    const mono = (this.clock.monotonicNs() * PM_TIMER_HZ) / 1_000_000_000n;
    const t = mono + BigInt(this.state.tickOffset);
    return t < 0n ? 0n : t;
  }

  private advance(): void {
    const carry = Number(this.ticks() / TIMER_CARRY);
    if (carry !== this.state.lastCarry) {
      this.state.lastCarry = carry;
      this.state.sts = this.state.sts | STS_TMR;
    }
  }

  private updateSci(): void {
    const level = this.sciCondition() ? 1 : 0;
    if (level !== this.state.sciLevel) {
      this.state.sciLevel = level;
      this.sci.setLevel(level === 1);
    }
  }

  save(): AcpiPmSaved {
    this.advance();
    return {
      kind: "acpi-pm",
      version: 1,
      pm1Status: this.state.sts,
      pm1Enable: this.state.en,
      pm1Control: this.state.cnt,
      timer: this.timerValue(),
    };
  }

  restore(saved: unknown): void {
    const r = new SavedStateReader(this.name, saved, "acpi-pm", 1);
    const sts = r.int("pm1Status", 0, 0xffff);
    if (sts & ~STS_KEPT) r.fail("pm1Status holds bits that are never set");
    const en = r.int("pm1Enable", 0, 0xffff);
    if (en & ~EN_KEPT) r.fail("pm1Enable holds bits that are never kept");
    const cnt = r.int("pm1Control", 0, 0xffff);
    if (cnt & ~CNT_KEPT) r.fail("pm1Control holds bits that are never kept");
    const timer = r.int("timer", 0, TIMER_MASK);
    const s = this.state;
    s.sts = sts;
    s.en = en;
    s.cnt = cnt;
    const mono = (this.clock.monotonicNs() * PM_TIMER_HZ) / 1_000_000_000n;
    // Resume the counter at the saved value, keeping the high bits so it never goes below zero.
    const base = (mono / (1n << 24n) + 1n) << 24n;
    s.tickOffset = Number(base + BigInt(timer) - mono);
    s.lastCarry = Number(this.ticks() / TIMER_CARRY);
    const level = this.sciCondition();
    s.sciLevel = level ? 1 : 0;
    this.sci.setLevel(level);
  }
}

/** Bytes [offset, offset+size) of a little-endian register of `length` bytes; bytes past it read 0xff. */
function lanes(reg: number, offset: number, size: number, length: number): number {
  let v = 0;
  for (let i = 0; i < Math.min(size, 4); i++) {
    const at = offset + i;
    const b = at < length ? (reg >>> (8 * at)) & 0xff : 0xff;
    v |= b << (8 * i);
  }
  return v >>> 0;
}

/** Which bits of a `length`-byte register an access of `size` bytes at `offset` covers. */
function laneMask(offset: number, size: number, length: number): number {
  let m = 0;
  for (let i = 0; i < Math.min(size, 4); i++) if (offset + i < length) m |= 0xff << (8 * (offset + i));
  return m >>> 0;
}
