/**
 * Motorola MC146818 real-time clock and CMOS RAM at ports 0x70 (index, bit 7
 * = NMI disable) and 0x71 (data), as on every PC. Registers 0x00-0x09 hold
 * the time, date and alarm in BCD or binary (register B DM bit) and in 12- or
 * 24-hour form (register B 24/12 bit); 0x0A-0x0D are status registers A-D;
 * 0x32 is the century (the ACPI FADT's CENTURY field points at it); the rest
 * is battery-backed NVRAM, where firmware finds the memory size (0x15-0x18,
 * 0x30-0x31, 0x34-0x35, 0x5B-0x5D, as SeaBIOS reads them).
 *
 * Time is host time plus an offset the guest sets by writing the time
 * registers (usually under register B's SET bit, which freezes the clock
 * until it is cleared). The clock is always UTC.
 *
 * Interrupts (IRQ 8): the periodic, alarm and update-ended flags in register
 * C are set by `tick()` (called by the worker; `nextEventNs()` says when) and
 * lazily when the guest reads register C, so a polling guest needs no ticks.
 * The line is high while (C flags & B enables) != 0; reading C clears it.
 *
 * DEVNOTE: time is read as monotonic time plus an anchor taken from the
 * wall clock, so the sub-millisecond phase needed for register A's UIP
 * window (the last 244 µs before each second) exists even when the wall
 * clock ticks in whole milliseconds; the anchor is retaken whenever the two
 * drift apart by more than 2 ms (host clock steps).
 *
 * DEVNOTE: the day-of-week register is computed from the date; writes to it
 * are ignored. Time keeps running whatever register A's divider bits say;
 * only the periodic and update interrupts stop unless the divider is 010.
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { MMIO32_HOLE_START } from "../../machine/memory-map.js";
import { structLayout } from "../../machine/shared-state.js";
import type { Clock, IrqLine, SavedDeviceState } from "../dependencies.js";
import { SavedStateReader, readBytewise, writeBytewise, type DeviceState } from "./saved-state.js";

const REG_SECONDS = 0x00;
const REG_SECONDS_ALARM = 0x01;
const REG_MINUTES = 0x02;
const REG_MINUTES_ALARM = 0x03;
const REG_HOURS = 0x04;
const REG_HOURS_ALARM = 0x05;
const REG_DAY_OF_WEEK = 0x06;
const REG_DAY_OF_MONTH = 0x07;
const REG_MONTH = 0x08;
const REG_YEAR = 0x09;
const REG_A = 0x0a;
const REG_B = 0x0b;
const REG_C = 0x0c;
const REG_D = 0x0d;
const REG_CENTURY = 0x32;

const A_UIP = 0x80;
const A_DIVIDER = 0x70;
const A_DIVIDER_RUNNING = 0x20; // 32.768 kHz time base
const A_RATE = 0x0f;

const B_SET = 0x80;
const B_PIE = 0x40;
const B_AIE = 0x20;
const B_UIE = 0x10;
const B_BINARY = 0x04;
const B_24H = 0x02;

const C_IRQF = 0x80;
const C_PF = 0x40;
const C_AF = 0x20;
const C_UF = 0x10;

const D_VRT = 0x80;

/** UIP is set for this long before each second boundary. */
const UIP_WINDOW_MS = 0.244;
/** Re-anchor monotonic time to the wall clock when they differ by more than this. */
const ANCHOR_SLACK_MS = 2;
/** Date's representable range. */
const MAX_TIME_MS = 8.64e15;

export interface CmosRtcConfig {
  /**
   * Guest RAM size, written into the NVRAM memory-size bytes at power-on;
   * split at the 32-bit MMIO hole (`MMIO32_HOLE_START`) as the memory plan does.
   */
  readonly ramBytes?: number;
  /** Or the split itself (these win over `ramBytes`). */
  readonly ramBelow4GiB?: number;
  readonly ramAbove4GiB?: number;
}

export interface CmosRtcSaved extends SavedDeviceState {
  readonly kind: "cmos-rtc";
  readonly version: 1;
  readonly index: number;
  readonly nmiDisabled: boolean;
  /** Guest time minus host wall-clock time, in milliseconds. */
  readonly offsetMs: number;
  /** The frozen guest time while register B's SET bit is on, else null. */
  readonly frozenMs: number | null;
  readonly registerA: number;
  readonly registerB: number;
  /** Pending flags (PF/AF/UF) of register C. */
  readonly registerC: number;
  /** All 128 CMOS bytes (alarm registers and NVRAM; the time registers' slots are unused). */
  readonly cmos: number[];
}

interface TimeFields {
  sec: number;
  min: number;
  hour: number;
  dom: number;
  month: number;
  year: number;
}

export class CmosRtc implements BusDevice {
  static readonly layout = structLayout({
    offsetMs: "f64",
    anchorMs: "f64",
    frozenMs: "f64",
    lastSecond: "f64",
    lastPeriodic: "f64",
    index: "u8",
    nmiDisabled: "u8",
    regA: "u8",
    regB: "u8",
    regC: "u8",
    irqLevel: "u8",
    anchored: "u8",
    poweredOn: "u8",
    cmos: { bytes: 128 },
  });

  readonly regions: readonly IoRegion[] = [{ name: "ports", space: "pio", start: 0x70, length: 2 }];
  private readonly irq: IrqLine;
  private readonly clock: Clock;

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof CmosRtc.layout.fields>,
    deps: { irq: IrqLine; clock: Clock },
    private readonly config: CmosRtcConfig = {},
  ) {
    this.irq = deps.irq;
    this.clock = deps.clock;
  }

  /**
   * The reset signal. The first call (power-on, made by the board before any
   * vCPU runs) also fills the NVRAM and sets register A's time base and
   * 24-hour binary-coded mode; later calls, on machine reset, clear only the
   * interrupt enables and flags, as the chip's RESET pin does, and keep the
   * battery-backed contents.
   */
  reset(): void {
    const s = this.state;
    if (!s.poweredOn) {
      s.poweredOn = 1;
      s.cmos.fill(0);
      s.regA = A_DIVIDER_RUNNING | 0x06; // 1024 Hz periodic rate, as firmware leaves it
      s.regB = B_24H;
      s.offsetMs = 0;
      s.frozenMs = 0;
      s.index = 0;
      s.nmiDisabled = 0;
      this.writeMemorySize();
    }
    s.regB = s.regB & ~(B_PIE | B_AIE | B_UIE | 0x08);
    s.regC = 0;
    s.anchored = 0;
    this.resyncEventTrackers();
    s.irqLevel = 0;
    this.irq.setLevel(false);
  }

  read(_region: string, offset: number, size: AccessSize): number {
    return readBytewise(offset, size, 2, (o) => (o === 0 ? 0xff : this.readData()));
  }

  write(_region: string, offset: number, size: AccessSize, value: number): void {
    writeBytewise(offset, size, 2, value, (o, v) => {
      if (o === 0) {
        this.state.index = v & 0x7f;
        this.state.nmiDisabled = v >> 7;
      } else this.writeData(v);
    });
  }

  /** Whether the guest has masked NMIs through port 0x70 bit 7. */
  nmiDisabled(): boolean {
    return this.state.nmiDisabled !== 0;
  }

  /** Sets the periodic, alarm and update-ended flags that are due and drives IRQ 8. */
  tick(): void {
    this.advance();
    this.updateIrq();
  }

  /** Monotonic time (ns) of the next event that would raise IRQ 8, or null if none is enabled. */
  nextEventNs(): bigint | null {
    const s = this.state;
    if ((s.regA & A_DIVIDER) !== A_DIVIDER_RUNNING) return null;
    const mono = this.clock.monotonicNs();
    let next: bigint | null = null;
    if (s.regB & (B_UIE | B_AIE) && !(s.regB & B_SET)) {
      const now = this.guestMs();
      const toBoundary = 1000 - (((now % 1000) + 1000) % 1000);
      next = mono + BigInt(Math.max(1, Math.ceil(toBoundary * 1e6)));
    }
    const period = this.periodNs();
    if (s.regB & B_PIE && period !== null) {
      const p = (mono / period + 1n) * period;
      if (next === null || p < next) next = p;
    }
    return next;
  }

  /** The level IRQ 8 should have now. */
  irqCondition(): boolean {
    const s = this.state;
    return (s.regC & s.regB & (C_PF | C_AF | C_UF)) !== 0;
  }

  // ---- registers ----

  private readData(): number {
    const s = this.state;
    const idx = s.index;
    switch (idx) {
      case REG_SECONDS: return this.encode(this.fields().sec);
      case REG_MINUTES: return this.encode(this.fields().min);
      case REG_HOURS: return this.encodeHour(this.fields().hour);
      case REG_DAY_OF_WEEK: return this.encode(new Date(this.currentMs()).getUTCDay() + 1);
      case REG_DAY_OF_MONTH: return this.encode(this.fields().dom);
      case REG_MONTH: return this.encode(this.fields().month);
      case REG_YEAR: return this.encode(this.fields().year % 100);
      case REG_CENTURY: return this.encode(Math.floor(this.fields().year / 100) % 100);
      case REG_A: return s.regA | (this.inUpdateWindow() ? A_UIP : 0);
      case REG_B: return s.regB;
      case REG_C: {
        this.advance();
        const c = s.regC | (this.irqCondition() ? C_IRQF : 0);
        s.regC = 0;
        this.updateIrq();
        return c;
      }
      case REG_D: return D_VRT;
      default: return s.cmos[idx]!;
    }
  }

  private writeData(v: number): void {
    const s = this.state;
    const idx = s.index;
    switch (idx) {
      case REG_SECONDS: this.setField((f) => (f.sec = this.decode(v))); return;
      case REG_MINUTES: this.setField((f) => (f.min = this.decode(v))); return;
      case REG_HOURS: this.setField((f) => (f.hour = this.decodeHour(v))); return;
      case REG_DAY_OF_WEEK: return;
      case REG_DAY_OF_MONTH: this.setField((f) => (f.dom = this.decode(v))); return;
      case REG_MONTH: this.setField((f) => (f.month = this.decode(v))); return;
      case REG_YEAR: this.setField((f) => (f.year = Math.floor(f.year / 100) * 100 + this.decode(v))); return;
      case REG_CENTURY: this.setField((f) => (f.year = this.decode(v) * 100 + (f.year % 100))); return;
      case REG_A:
        s.regA = v & ~A_UIP;
        this.resyncEventTrackers();
        return;
      case REG_B: {
        const wasSet = (s.regB & B_SET) !== 0;
        let b = v;
        if (b & B_SET) b &= ~B_UIE; // setting SET clears UIE
        if (!wasSet && b & B_SET) s.frozenMs = this.guestMs();
        if (wasSet && !(b & B_SET)) {
          const delta = s.frozenMs - this.guestMs();
          s.offsetMs = s.offsetMs + delta;
          s.anchorMs = s.anchorMs + delta;
        }
        s.regB = b;
        if (wasSet !== ((b & B_SET) !== 0)) this.resyncEventTrackers();
        this.updateIrq();
        return;
      }
      case REG_C:
      case REG_D:
        return; // read-only
      default:
        s.cmos[idx] = v;
    }
  }

  // ---- time ----

  /** Guest time (ms since the epoch, UTC), running. */
  private guestMs(): number {
    const s = this.state;
    const wall = this.clock.wallClockMs() + s.offsetMs;
    const mono = Number(this.clock.monotonicNs()) / 1e6;
    if (s.anchored) {
      const t = mono + s.anchorMs;
      if (Math.abs(t - wall) <= ANCHOR_SLACK_MS) return t;
    }
    s.anchorMs = wall - mono;
    s.anchored = 1;
    return wall;
  }

  /** The time the registers show: frozen while SET is on. */
  private currentMs(): number {
    return this.state.regB & B_SET ? this.state.frozenMs : this.guestMs();
  }

  private fields(): TimeFields {
    const d = new Date(this.currentMs());
    return {
      sec: d.getUTCSeconds(),
      min: d.getUTCMinutes(),
      hour: d.getUTCHours(),
      dom: d.getUTCDate(),
      month: d.getUTCMonth() + 1,
      year: d.getUTCFullYear(),
    };
  }

  /** Applies a guest write to one time field; impossible results (NaN, out of Date's range) are ignored. */
  private setField(change: (f: TimeFields) => void): void {
    const s = this.state;
    const base = this.currentMs();
    const f = this.fields();
    change(f);
    const d = new Date(0);
    d.setUTCFullYear(f.year, f.month - 1, f.dom);
    d.setUTCHours(f.hour, f.min, f.sec, 0);
    const t = d.getTime();
    if (!Number.isFinite(t) || Math.abs(t) > MAX_TIME_MS) return;
    if (s.regB & B_SET) {
      s.frozenMs = t;
      return;
    }
    const delta = t - base;
    s.offsetMs = s.offsetMs + delta;
    s.anchorMs = s.anchorMs + delta;
    s.lastSecond = Math.floor(t / 1000);
  }

  private inUpdateWindow(): boolean {
    const s = this.state;
    if (s.regB & B_SET || (s.regA & A_DIVIDER) !== A_DIVIDER_RUNNING) return false;
    const now = this.guestMs();
    const frac = ((now % 1000) + 1000) % 1000;
    return frac >= 1000 - UIP_WINDOW_MS;
  }

  private encode(n: number): number {
    return this.state.regB & B_BINARY ? n : ((Math.floor(n / 10) % 10) << 4) | n % 10;
  }

  private decode(v: number): number {
    return this.state.regB & B_BINARY ? v : (v >> 4) * 10 + (v & 0x0f);
  }

  private encodeHour(h: number): number {
    if (this.state.regB & B_24H) return this.encode(h);
    return this.encode(h % 12 === 0 ? 12 : h % 12) | (h >= 12 ? 0x80 : 0);
  }

  private decodeHour(v: number): number {
    if (this.state.regB & B_24H) return this.decode(v);
    return (this.decode(v & 0x7f) % 12) + (v & 0x80 ? 12 : 0);
  }

  // ---- interrupts ----

  /** Periodic interrupt period for register A's rate, or null when off. */
  private periodNs(): bigint | null {
    const rate = this.state.regA & A_RATE;
    if (rate === 0) return null;
    const shift = rate <= 2 ? rate + 6 : rate - 1; // rates 1 and 2 repeat 256 Hz and 128 Hz
    return (1_000_000_000n << BigInt(shift)) / 32768n;
  }

  private resyncEventTrackers(): void {
    const s = this.state;
    s.lastSecond = Math.floor(this.currentMs() / 1000);
    const p = this.periodNs();
    s.lastPeriodic = p === null ? 0 : Number(this.clock.monotonicNs() / p);
  }

  /** Sets the flags whose events happened since the last call. */
  private advance(): void {
    const s = this.state;
    if ((s.regA & A_DIVIDER) !== A_DIVIDER_RUNNING) return;
    const p = this.periodNs();
    if (p !== null) {
      const n = Number(this.clock.monotonicNs() / p);
      if (n !== s.lastPeriodic) {
        s.lastPeriodic = n;
        s.regC = s.regC | C_PF;
      }
    }
    if (s.regB & B_SET) return;
    const now = this.guestMs();
    const sec = Math.floor(now / 1000);
    if (sec !== s.lastSecond) {
      s.lastSecond = sec;
      let c = s.regC | C_UF;
      if (this.alarmMatches()) c |= C_AF;
      s.regC = c;
    }
  }

  private alarmMatches(): boolean {
    const s = this.state;
    const f = this.fields();
    const match = (alarm: number, current: number) => (alarm & 0xc0) === 0xc0 || alarm === current;
    return (
      match(s.cmos[REG_SECONDS_ALARM]!, this.encode(f.sec)) &&
      match(s.cmos[REG_MINUTES_ALARM]!, this.encode(f.min)) &&
      match(s.cmos[REG_HOURS_ALARM]!, this.encodeHour(f.hour))
    );
  }

  private updateIrq(): void {
    const level = this.irqCondition() ? 1 : 0;
    if (level !== this.state.irqLevel) {
      this.state.irqLevel = level;
      this.irq.setLevel(level === 1);
    }
  }

  private writeMemorySize(): void {
    const cmos = this.state.cmos;
    const total = Math.max(0, this.config.ramBytes ?? 0);
    const below = Math.max(0, this.config.ramBelow4GiB ?? Math.min(total, MMIO32_HOLE_START));
    const above = Math.max(0, this.config.ramAbove4GiB ?? total - Math.min(total, MMIO32_HOLE_START));
    if (below === 0 && above === 0) return;
    const put16 = (at: number, v: number) => {
      cmos[at] = v & 0xff;
      cmos[at + 1] = (v >> 8) & 0xff;
    };
    put16(0x15, 640); // base memory, KiB
    const extKiB = Math.min(0xffff, Math.max(0, Math.floor((below - 0x100000) / 1024)));
    put16(0x17, extKiB);
    put16(0x30, extKiB);
    const above16M = Math.min(0xffff, Math.max(0, Math.floor((below - 0x1000000) / 0x10000)));
    put16(0x34, above16M);
    const high = Math.min(0xffffff, Math.floor(above / 0x10000));
    cmos[0x5b] = high & 0xff;
    cmos[0x5c] = (high >> 8) & 0xff;
    cmos[0x5d] = (high >> 16) & 0xff;
  }

  // ---- saved state ----

  save(): CmosRtcSaved {
    const s = this.state;
    return {
      kind: "cmos-rtc",
      version: 1,
      index: s.index,
      nmiDisabled: s.nmiDisabled !== 0,
      offsetMs: s.offsetMs,
      frozenMs: s.regB & B_SET ? s.frozenMs : null,
      registerA: s.regA,
      registerB: s.regB,
      registerC: s.regC,
      cmos: Array.from(s.cmos),
    };
  }

  restore(saved: unknown): void {
    const r: SavedStateReader = new SavedStateReader(this.name, saved, "cmos-rtc", 1);
    const index = r.int("index", 0, 0x7f);
    const nmiDisabled = r.bool("nmiDisabled");
    const offsetMs = r.number("offsetMs");
    if (Math.abs(offsetMs) > 2 * MAX_TIME_MS) r.fail("offsetMs out of range");
    const regA = r.int("registerA", 0, 0x7f);
    const regB = r.int("registerB", 0, 0xff);
    const regC = r.int("registerC", 0, 0xff);
    if (regC & ~(C_PF | C_AF | C_UF)) r.fail("registerC holds bits other than PF/AF/UF");
    const frozenRaw = (saved as { frozenMs?: unknown }).frozenMs;
    let frozenMs = 0;
    if (regB & B_SET) {
      frozenMs = r.number("frozenMs");
      if (Math.abs(frozenMs) > MAX_TIME_MS) r.fail("frozenMs out of range");
    } else if (frozenRaw !== null) r.fail("frozenMs must be null unless register B's SET bit is on");
    const cmos = r.bytes("cmos", 128, 128);
    const s = this.state;
    s.poweredOn = 1;
    s.index = index;
    s.nmiDisabled = nmiDisabled ? 1 : 0;
    s.offsetMs = offsetMs;
    s.frozenMs = frozenMs;
    s.regA = regA;
    s.regB = regB;
    s.regC = regC;
    s.cmos.set(cmos);
    s.anchored = 0;
    this.resyncEventTrackers();
    const level = this.irqCondition();
    s.irqLevel = level ? 1 : 0;
    this.irq.setLevel(level);
  }
}
