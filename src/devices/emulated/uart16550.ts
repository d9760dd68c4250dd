/**
 * NS16550A UART (PC COM port): RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR,
 * SCR and the divisor latch (LCR.DLAB), per the 16550D datasheet register
 * descriptions, with the behaviour Linux's 8250 driver (drivers/tty/serial/8250)
 * depends on: autoconfig's scratch, loopback and FIFO probes, and the THRE
 * interrupt (asserted while IER.ETBEI is set and THR is empty; cleared by an
 * IIR read that reports it or by a THR write).
 *
 * Transmission is instantaneous: a THR write goes straight to `deps.output`
 * (or, in loopback, into the receive FIFO), so LSR.THRE and LSR.TEMT always
 * read 1.
 *
 * DEVNOTE: the THRE interrupt that follows a transmitted byte is raised when
 * the transmitter is next looked at, not at once: at the guest's next UART
 * access other than another THR write, or when the host calls
 * `settleTransmit()` (the worker's console flusher does within
 * FLUSH_INTERVAL_MS of the byte). Raising it per byte cost two interrupt-line
 * changes (a fresh edge) per byte, each a system call, for an interrupt the
 * driver did not need: Linux's handler writes up to 16 bytes, then reads IIR
 * again, which finds THRE pending and goes on, so a whole burst now moves
 * without any line change. A real UART's THRE also comes a byte time after
 * the write, so no driver can count on it being immediate.
 *
 * DEVNOTE: the receive FIFO holds 256 bytes instead of 16 (FIFO and non-FIFO
 * mode alike). A driver drains while LSR.DR is set, so it cannot tell; the
 * larger buffer means fewer console-input round trips. The RX trigger level
 * (1/4/8/14) still decides between "received data available" (IIR 0x4) and
 * the character timeout (IIR 0xC), which is reported as soon as any byte is
 * waiting below the trigger level (no four-character-time delay).
 *
 * DEVNOTE: interrupts reach the line only while MCR.OUT2 is set (the PC
 * gate); Linux sets OUT2 when it opens the port.
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { structLayout } from "../../machine/shared-state.js";
import type { ByteSink, IrqLine, SavedDeviceState } from "../dependencies.js";
import { SavedStateReader, readBytewise, writeBytewise, type DeviceState } from "./saved-state.js";

const RX_SIZE = 256;

// Register offsets.
const REG_DATA = 0; // RBR / THR / DLL
const REG_IER = 1; // IER / DLM
const REG_IIR = 2; // IIR (read) / FCR (write)
const REG_LCR = 3;
const REG_MCR = 4;
const REG_LSR = 5;
const REG_MSR = 6;
const REG_SCR = 7;

const IER_ERBFI = 0x01; // received data available
const IER_ETBEI = 0x02; // THR empty
const IER_ELSI = 0x04; // receiver line status
const IER_EDSSI = 0x08; // modem status

const IIR_NONE = 0x01;
const IIR_MSR = 0x00;
const IIR_THRE = 0x02;
const IIR_RDA = 0x04;
const IIR_RLS = 0x06;
const IIR_TIMEOUT = 0x0c;
const IIR_FIFO_ENABLED = 0xc0;

const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
const FCR_CLEAR_TX = 0x04;
const FCR_TRIGGER = 0xc0;

const LCR_DLAB = 0x80;

const MCR_DTR = 0x01;
const MCR_RTS = 0x02;
const MCR_OUT1 = 0x04;
const MCR_OUT2 = 0x08;
const MCR_LOOP = 0x10;

const LSR_DR = 0x01;
const LSR_OE = 0x02;
const LSR_PE = 0x04;
const LSR_FE = 0x08;
const LSR_BI = 0x10;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;
const LSR_FIFO_ERROR = 0x80;
const LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

const MSR_CTS = 0x10;
const MSR_DSR = 0x20;
const MSR_RI = 0x40;
const MSR_DCD = 0x80;

const TRIGGER_LEVELS = [1, 4, 8, 14] as const;

export interface Uart16550Saved extends SavedDeviceState {
  readonly kind: "uart16550";
  readonly version: 1;
  readonly ier: number;
  readonly lcr: number;
  readonly mcr: number;
  /** LSR error bits (OE/PE/FE/BI) latched until LSR is read. */
  readonly lsrErrors: number;
  /** MSR delta bits (low nibble) latched until MSR is read. */
  readonly msrDeltas: number;
  readonly scr: number;
  /** FIFO enable (bit 0) and RX trigger (bits 6-7). */
  readonly fcr: number;
  readonly divisor: number;
  readonly thrInterruptPending: boolean;
  /** Received bytes not yet read by the guest, oldest first. */
  readonly rx: number[];
}

export class Uart16550 implements BusDevice {
  static readonly layout = structLayout({
    rxCount: "u16",
    rxHead: "u8",
    ier: "u8",
    lcr: "u8",
    mcr: "u8",
    lsrErrors: "u8",
    msrDeltas: "u8",
    scr: "u8",
    fcr: "u8",
    dll: "u8",
    dlm: "u8",
    thrPending: "u8",
    /** The level last driven on the IRQ line (0/1). */
    irqLevel: "u8",
    /** Bytes were transmitted and THR has not been looked at since: THRE is still to be raised. */
    txUnsettled: "u8",
    rx: { bytes: RX_SIZE },
  });

  readonly regions: readonly IoRegion[];
  private readonly irq: IrqLine;
  private readonly output: ByteSink;
  private readonly txByte = new Uint8Array(1);

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof Uart16550.layout.fields>,
    deps: { irq: IrqLine; output: ByteSink },
    config: { base: number },
  ) {
    this.irq = deps.irq;
    this.output = deps.output;
    this.regions = [{ name: "registers", space: "pio", start: config.base, length: 8 }];
  }

  /** Power-on state: everything zero, interrupt line low. */
  reset(): void {
    const s = this.state;
    s.rxCount = 0; s.rxHead = 0; s.ier = 0; s.lcr = 0; s.mcr = 0; s.lsrErrors = 0; s.msrDeltas = 0;
    s.scr = 0; s.fcr = 0; s.dll = 0; s.dlm = 0; s.thrPending = 0; s.txUnsettled = 0;
    s.rx.fill(0);
    s.irqLevel = 0;
    this.irq.setLevel(false);
  }

  read(_region: string, offset: number, size: AccessSize): number {
    return readBytewise(offset, size, 8, (o) => this.readRegister(o));
  }

  write(_region: string, offset: number, size: AccessSize, value: number): void {
    writeBytewise(offset, size, 8, value, (o, v) => this.writeRegister(o, v));
  }

  /**
   * Raise the THRE interrupt owed for bytes already transmitted (see the
   * DEVNOTE above). The host calls it after a short while, so that a driver
   * that waits for the interrupt without touching the UART again is served.
   */
  settleTransmit(): void {
    if (this.settleQuietly()) this.updateIrq();
  }

  /** Whether a THRE interrupt is still owed (the host then calls settleTransmit soon). */
  get transmitUnsettled(): boolean {
    return this.state.txUnsettled !== 0;
  }

  /** THR is empty again: THRE pending, the line not yet updated (the caller does, once). */
  private settleQuietly(): boolean {
    const s = this.state;
    if (s.txUnsettled === 0) return false;
    s.txUnsettled = 0;
    s.thrPending = 1;
    return true;
  }

  // ---- console side (called by the worker with the machine lock held) ----

  /**
   * Whether the guest's driver is listening: receive-data interrupts enabled
   * and Request To Send asserted, as a terminal honouring RTS/CTS flow control
   * would wait for. Console input is held until then, because a driver resets
   * the FIFOs while it opens the port and drops bytes that arrived earlier.
   * Interrupts alone are not enough: Linux's 8250 enables them in startup and
   * only then sets the line (its FCR write enables the FIFO, which clears it);
   * RTS comes last, once the open is complete (tty_port_block_til_ready).
   */
  receiverReady(): boolean {
    const s = this.state;
    return (s.ier & IER_ERBFI) !== 0 && (s.mcr & (MCR_RTS | MCR_LOOP)) === MCR_RTS;
  }

  /** Bytes the receive FIFO can take now (0 in loopback, where the serial input is disconnected). */
  rxFree(): number {
    return this.state.mcr & MCR_LOOP ? 0 : RX_SIZE - this.state.rxCount;
  }

  /** Queue received bytes; returns how many were taken. The caller retries the rest later. */
  receive(bytes: Uint8Array): number {
    const n = Math.min(bytes.length, this.rxFree());
    for (let i = 0; i < n; i++) this.pushRx(bytes[i]!);
    if (n > 0) this.updateIrq();
    return n;
  }

  /** The interrupt condition (before the OUT2 gate), as IIR would report it. */
  interruptId(): number {
    const s = this.state;
    const ier = s.ier;
    if (ier & IER_ELSI && s.lsrErrors & LSR_ERRORS) return IIR_RLS;
    if (ier & IER_ERBFI && s.rxCount > 0) {
      if (!(s.fcr & FCR_ENABLE) || s.rxCount >= TRIGGER_LEVELS[(s.fcr & FCR_TRIGGER) >> 6]!) return IIR_RDA;
      return IIR_TIMEOUT;
    }
    if (ier & IER_ETBEI && s.thrPending) return IIR_THRE;
    if (ier & IER_EDSSI && s.msrDeltas & 0x0f) return IIR_MSR;
    return IIR_NONE;
  }

  /** The level the IRQ line should have now. */
  irqCondition(): boolean {
    return this.interruptId() !== IIR_NONE && (this.state.mcr & MCR_OUT2) !== 0;
  }

  // ---- registers ----

  private readRegister(offset: number): number {
    // Looking at the UART settles a transmission: what is read below sees THRE pending, and the
    // line is updated once, after the read (an IIR read that reports THRE clears it again).
    const settled = this.settleQuietly();
    const v = this.readSettled(offset);
    if (settled) this.updateIrq();
    return v;
  }

  private readSettled(offset: number): number {
    const s = this.state;
    switch (offset) {
      case REG_DATA: {
        if (s.lcr & LCR_DLAB) return s.dll;
        const b = this.popRx();
        this.updateIrq();
        return b;
      }
      case REG_IER:
        return s.lcr & LCR_DLAB ? s.dlm : s.ier;
      case REG_IIR: {
        const id = this.interruptId();
        if (id === IIR_THRE) {
          s.thrPending = 0;
          this.updateIrq();
        }
        return id | (s.fcr & FCR_ENABLE ? IIR_FIFO_ENABLED : 0);
      }
      case REG_LCR:
        return s.lcr;
      case REG_MCR:
        return s.mcr;
      case REG_LSR: {
        let lsr = LSR_THRE | LSR_TEMT | (s.lsrErrors & LSR_ERRORS);
        if (s.rxCount > 0) lsr |= LSR_DR;
        if (s.fcr & FCR_ENABLE && s.lsrErrors & (LSR_PE | LSR_FE | LSR_BI)) lsr |= LSR_FIFO_ERROR;
        if (s.lsrErrors !== 0) {
          s.lsrErrors = 0;
          this.updateIrq();
        }
        return lsr;
      }
      case REG_MSR: {
        const msr = this.modemLines() | (s.msrDeltas & 0x0f);
        if (s.msrDeltas !== 0) {
          s.msrDeltas = 0;
          this.updateIrq();
        }
        return msr;
      }
      case REG_SCR:
        return s.scr;
      default:
        return 0xff;
    }
  }

  private writeRegister(offset: number, value: number): void {
    const s = this.state;
    // Another THR byte joins the transmission in progress; any other write settles it first.
    const settled = !(offset === REG_DATA && !(s.lcr & LCR_DLAB)) && this.settleQuietly();
    this.writeSettled(offset, value);
    if (settled) this.updateIrq();
  }

  private writeSettled(offset: number, value: number): void {
    const s = this.state;
    switch (offset) {
      case REG_DATA:
        if (s.lcr & LCR_DLAB) {
          s.dll = value;
          return;
        }
        this.transmit(value);
        return;
      case REG_IER: {
        if (s.lcr & LCR_DLAB) {
          s.dlm = value;
          return;
        }
        const old = s.ier;
        s.ier = value & 0x0f;
        // Enabling ETBEI while THR is empty (always, here) raises THRE at once.
        if (s.ier & IER_ETBEI && !(old & IER_ETBEI)) s.thrPending = 1;
        this.updateIrq();
        return;
      }
      case REG_IIR: {
        // FCR. Changing the FIFO enable clears both FIFOs.
        const enableChanged = ((s.fcr ^ value) & FCR_ENABLE) !== 0;
        if (enableChanged || value & FCR_CLEAR_RX) {
          s.rxCount = 0;
          s.rxHead = 0;
        }
        if (enableChanged || value & FCR_CLEAR_TX) s.thrPending = 1;
        s.fcr = value & FCR_ENABLE ? value & (FCR_ENABLE | FCR_TRIGGER) : 0;
        this.updateIrq();
        return;
      }
      case REG_LCR:
        s.lcr = value;
        return;
      case REG_MCR: {
        const before = this.modemLines();
        s.mcr = value & 0x1f;
        this.latchModemDeltas(before, this.modemLines());
        this.updateIrq();
        return;
      }
      case REG_LSR:
      case REG_MSR:
        // Factory test registers: writes ignored.
        return;
      case REG_SCR:
        s.scr = value;
        return;
    }
  }

  private transmit(byte: number): void {
    const s = this.state;
    // The write clears a pending THRE interrupt (the line drops if it was up).
    s.thrPending = 0;
    this.updateIrq();
    if (s.mcr & MCR_LOOP) {
      if (s.rxCount >= RX_SIZE) s.lsrErrors |= LSR_OE;
      else this.pushRx(byte);
      // Loopback: THR empty again at once (a fresh edge), as the receive side is looked at anyway.
      s.thrPending = 1;
      this.updateIrq();
      return;
    }
    this.txByte[0] = byte;
    this.output.write(this.txByte); // one buffer for every byte: nothing allocated per OUT
    // THR is empty again; its interrupt is raised when the UART is next looked at (settleTransmit).
    s.txUnsettled = 1;
  }

  /** MSR bits 4-7: from MCR in loopback, else CTS, DSR and DCD asserted (a connected null modem). */
  private modemLines(): number {
    const mcr = this.state.mcr;
    if (!(mcr & MCR_LOOP)) return MSR_CTS | MSR_DSR | MSR_DCD;
    let lines = 0;
    if (mcr & MCR_RTS) lines |= MSR_CTS;
    if (mcr & MCR_DTR) lines |= MSR_DSR;
    if (mcr & MCR_OUT1) lines |= MSR_RI;
    if (mcr & MCR_OUT2) lines |= MSR_DCD;
    return lines;
  }

  private latchModemDeltas(before: number, after: number): void {
    const changed = before ^ after;
    let d = 0;
    if (changed & MSR_CTS) d |= 0x01;
    if (changed & MSR_DSR) d |= 0x02;
    if (before & MSR_RI && !(after & MSR_RI)) d |= 0x04; // trailing edge of RI
    if (changed & MSR_DCD) d |= 0x08;
    this.state.msrDeltas |= d;
  }

  private pushRx(byte: number): void {
    const s = this.state;
    s.rx[(s.rxHead + s.rxCount) % RX_SIZE] = byte;
    s.rxCount = s.rxCount + 1;
  }

  private popRx(): number {
    const s = this.state;
    if (s.rxCount === 0) return 0;
    const b = s.rx[s.rxHead]!;
    s.rxHead = (s.rxHead + 1) % RX_SIZE;
    s.rxCount = s.rxCount - 1;
    return b;
  }

  private updateIrq(): void {
    const level = this.irqCondition() ? 1 : 0;
    if (level !== this.state.irqLevel) {
      this.state.irqLevel = level;
      this.irq.setLevel(level === 1);
    }
  }

  // ---- saved state ----

  save(): Uart16550Saved {
    const s = this.state;
    const rx: number[] = [];
    for (let i = 0; i < s.rxCount; i++) rx.push(s.rx[(s.rxHead + i) % RX_SIZE]!);
    return {
      kind: "uart16550",
      version: 1,
      ier: s.ier,
      lcr: s.lcr,
      mcr: s.mcr,
      lsrErrors: s.lsrErrors,
      msrDeltas: s.msrDeltas,
      scr: s.scr,
      fcr: s.fcr,
      divisor: s.dll | (s.dlm << 8),
      // An unsettled transmission is saved settled: THR is empty, its interrupt pending.
      thrInterruptPending: s.thrPending !== 0 || s.txUnsettled !== 0,
      rx,
    };
  }

  restore(saved: unknown): void {
    const r = new SavedStateReader(this.name, saved, "uart16550", 1);
    const ier = r.int("ier", 0, 0x0f);
    const lcr = r.int("lcr", 0, 0xff);
    const mcr = r.int("mcr", 0, 0x1f);
    const lsrErrors = r.int("lsrErrors", 0, 0xff);
    if (lsrErrors & ~LSR_ERRORS) r.fail("lsrErrors has bits other than OE/PE/FE/BI");
    const msrDeltas = r.int("msrDeltas", 0, 0x0f);
    const scr = r.int("scr", 0, 0xff);
    const fcr = r.int("fcr", 0, 0xff);
    if (fcr & ~(FCR_ENABLE | FCR_TRIGGER) || (fcr & FCR_TRIGGER && !(fcr & FCR_ENABLE)))
      r.fail("fcr holds bits that are never stored");
    const divisor = r.int("divisor", 0, 0xffff);
    const thrPending = r.bool("thrInterruptPending");
    const rx = r.bytes("rx", 0, RX_SIZE);
    const s = this.state;
    s.ier = ier; s.lcr = lcr; s.mcr = mcr; s.lsrErrors = lsrErrors; s.msrDeltas = msrDeltas; s.scr = scr; s.fcr = fcr;
    s.dll = divisor & 0xff; s.dlm = divisor >> 8;
    s.thrPending = thrPending ? 1 : 0;
    s.txUnsettled = 0;
    s.rx.fill(0);
    s.rx.set(rx);
    s.rxHead = 0;
    s.rxCount = rx.length;
    const level = this.irqCondition();
    s.irqLevel = level ? 1 : 0;
    this.irq.setLevel(level);
  }
}
