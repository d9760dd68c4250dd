/**
 * Intel 8042 PS/2 keyboard controller at ports 0x60 (data) and 0x64
 * (status/command), with an AT keyboard behind it and no auxiliary (mouse)
 * device. Covers what Linux's i8042 and atkbd drivers and firmware use:
 * command byte (0x20/0x60), self-test 0xAA → 0x55, interface tests 0xAB/0xA9,
 * port enable/disable (0xAD/0xAE/0xA7/0xA8), output port (0xD0/0xD1), A20
 * (0xDD/0xDF), output-port pulse (0xF0-0xFF: 0xFE resets the machine), and
 * the keyboard commands of the atkbd probe (GET ID, reset, LEDs, typematic,
 * scanning on/off, scancode set).
 *
 * IRQ 1 is driven while the output buffer holds a keyboard/controller byte
 * and the command byte enables keyboard interrupts; IRQ 12 likewise for
 * auxiliary bytes (only the timeout replies of the absent mouse).
 *
 * DEVNOTE (no aux device): the AUX loop command (0xD3) echoes its byte
 * without the AUXDATA status bit, so Linux's i8042_check_aux() sees the loop
 * fail and, in its IRQ-delivery test, fails again at once and concludes that
 * there is no AUX port: no 500 ms timeouts. Bytes sent to the aux device
 * (0xD4) answer 0xFE with the timeout status bit, as a controller does when
 * nothing is plugged in.
 *
 * DEVNOTE: a controller command that produces a reply discards whatever was
 * still queued in the output buffer, so a reply a driver gave up on (above)
 * never lands in the next command's answer.
 */
import type { AccessSize, BusDevice, IoRegion } from "../../machine/bus.js";
import { structLayout } from "../../machine/shared-state.js";
import type { IrqLine, PowerControl, SavedDeviceState } from "../dependencies.js";
import { SavedStateReader, type DeviceState } from "./saved-state.js";

const QUEUE_SIZE = 16;

// Status register.
const STR_OBF = 0x01;
const STR_SYS = 0x04;
const STR_CMD = 0x08; // last write was to the command port
const STR_KEYLOCK = 0x10; // 1 = keyboard not inhibited
const STR_AUXDATA = 0x20;
const STR_TIMEOUT = 0x40;

// Command byte.
const CTR_KBDINT = 0x01;
const CTR_AUXINT = 0x02;
const CTR_SYS = 0x04;
const CTR_KBDDIS = 0x10;
const CTR_AUXDIS = 0x20;
const CTR_XLATE = 0x40;

// Output port.
const OUT_RESET = 0x01; // 0 = hold the CPU in reset
const OUT_A20 = 0x02;

const KBD_ACK = 0xfa;
const KBD_RESEND = 0xfe;
const KBD_BAT_OK = 0xaa;

/** Queue entry flags (status bits reported while the byte is at the head). */
const FROM_AUX = STR_AUXDATA;
const WITH_TIMEOUT = STR_TIMEOUT;

export interface I8042Saved extends SavedDeviceState {
  readonly kind: "i8042";
  readonly version: 1;
  readonly commandByte: number;
  readonly outputPort: number;
  /** Controller command awaiting its data byte (0 = none). */
  readonly pendingCommand: number;
  /** Keyboard command awaiting its argument (0 = none). */
  readonly keyboardPendingCommand: number;
  readonly keyboardScanning: boolean;
  readonly scancodeSet: number;
  readonly lastWriteWasCommand: boolean;
  readonly lastData: number;
  /** Output queue, oldest first: [byte, flags] pairs; flags 0x20 = aux, 0x40 = timeout. */
  readonly output: Array<[number, number]>;
}

export class I8042 implements BusDevice {
  static readonly layout = structLayout({
    commandByte: "u8",
    outputPort: "u8",
    pendingCommand: "u8",
    kbdPending: "u8",
    kbdScanning: "u8",
    scancodeSet: "u8",
    lastWasCommand: "u8",
    lastData: "u8",
    qHead: "u8",
    qCount: "u8",
    irq1Level: "u8",
    irq12Level: "u8",
    qData: { bytes: QUEUE_SIZE },
    qFlags: { bytes: QUEUE_SIZE },
  });

  readonly regions: readonly IoRegion[] = [
    { name: "data", space: "pio", start: 0x60, length: 1 },
    { name: "command", space: "pio", start: 0x64, length: 1 },
  ];
  private readonly kbdIrq: IrqLine;
  private readonly auxIrq: IrqLine;
  private readonly power: PowerControl;

  constructor(
    readonly name: string,
    private readonly state: DeviceState<typeof I8042.layout.fields>,
    deps: { kbdIrq: IrqLine; auxIrq: IrqLine; power: PowerControl },
  ) {
    this.kbdIrq = deps.kbdIrq;
    this.auxIrq = deps.auxIrq;
    this.power = deps.power;
  }

  /**
   * Power-on state, as firmware leaves it: keyboard interrupt on, system
   * flag set, translation on, A20 enabled. The board calls it once (power-on,
   * before any vCPU runs) and on every machine reset.
   */
  reset(): void {
    const s = this.state;
    s.commandByte = CTR_KBDINT | CTR_SYS | CTR_XLATE;
    s.outputPort = OUT_RESET | OUT_A20;
    s.pendingCommand = 0;
    s.kbdPending = 0;
    s.kbdScanning = 1;
    s.scancodeSet = 2;
    s.lastWasCommand = 0;
    s.lastData = 0;
    s.qHead = 0;
    s.qCount = 0;
    s.qData.fill(0);
    s.qFlags.fill(0);
    s.irq1Level = 0;
    s.irq12Level = 0;
    this.kbdIrq.setLevel(false);
    this.auxIrq.setLevel(false);
  }

  read(region: string, _offset: number, _size: AccessSize): number {
    if (region === "command") return this.status();
    const s = this.state;
    if (s.qCount > 0) {
      s.lastData = s.qData[s.qHead]!;
      s.qHead = (s.qHead + 1) % QUEUE_SIZE;
      s.qCount = s.qCount - 1;
      this.updateIrqs();
    }
    return s.lastData;
  }

  write(region: string, _offset: number, _size: AccessSize, value: number): void {
    const v = value & 0xff;
    if (region === "command") {
      this.state.lastWasCommand = 1;
      this.controllerCommand(v);
    } else {
      this.state.lastWasCommand = 0;
      this.dataByte(v);
    }
    this.updateIrqs();
  }

  /** Scancode bytes from the host keyboard; returns how many were queued (none while scanning is off). */
  keyboardInput(bytes: Uint8Array): number {
    if (!this.state.kbdScanning || this.state.commandByte & CTR_KBDDIS) return 0;
    const n = Math.min(bytes.length, QUEUE_SIZE - this.state.qCount);
    for (let i = 0; i < n; i++) this.enqueue(bytes[i]!, 0);
    this.updateIrqs();
    return n;
  }

  /** The level IRQ 1 should have now. */
  keyboardIrqCondition(): boolean {
    const s = this.state;
    return s.qCount > 0 && !(s.qFlags[s.qHead]! & FROM_AUX) && (s.commandByte & CTR_KBDINT) !== 0;
  }

  /** The level IRQ 12 should have now. */
  auxIrqCondition(): boolean {
    const s = this.state;
    return s.qCount > 0 && (s.qFlags[s.qHead]! & FROM_AUX) !== 0 && (s.commandByte & CTR_AUXINT) !== 0;
  }

  private status(): number {
    const s = this.state;
    let st = STR_KEYLOCK;
    if (s.qCount > 0) st |= STR_OBF | (s.qFlags[s.qHead]! & (STR_AUXDATA | STR_TIMEOUT));
    if (s.commandByte & CTR_SYS) st |= STR_SYS;
    if (s.lastWasCommand) st |= STR_CMD;
    return st;
  }

  private controllerCommand(cmd: number): void {
    const s = this.state;
    s.pendingCommand = 0;
    if (cmd >= 0x20 && cmd <= 0x3f) {
      // Read controller RAM: byte 0 is the command byte; the rest reads 0.
      this.reply(cmd === 0x20 ? s.commandByte : 0);
      return;
    }
    if (cmd >= 0x60 && cmd <= 0x7f) {
      s.pendingCommand = cmd;
      return;
    }
    if (cmd >= 0xf0) {
      // Pulse output-port lines whose bit is 0 in the low nibble; bit 0 is the reset line.
      if (!(cmd & 0x01)) this.power.requestReset("i8042");
      return;
    }
    switch (cmd) {
      case 0xa7: s.commandByte = s.commandByte | CTR_AUXDIS; return;
      case 0xa8: s.commandByte = s.commandByte & ~CTR_AUXDIS; return;
      case 0xa9: this.reply(0x00); return; // aux interface test: OK (the loop test is what fails)
      case 0xaa:
        s.commandByte = s.commandByte | CTR_SYS;
        this.reply(0x55);
        return;
      case 0xab: this.reply(0x00); return; // keyboard interface test: OK
      case 0xad: s.commandByte = s.commandByte | CTR_KBDDIS; return;
      case 0xae: s.commandByte = s.commandByte & ~CTR_KBDDIS; return;
      case 0xc0: this.reply(0x80); return; // input port: keyboard not inhibited
      case 0xd0: {
        let port = s.outputPort;
        if (s.qCount > 0) port |= s.qFlags[s.qHead]! & FROM_AUX ? 0x20 : 0x10;
        this.reply(port);
        return;
      }
      case 0xd1:
      case 0xd2:
      case 0xd3:
      case 0xd4:
        s.pendingCommand = cmd;
        return;
      case 0xdd: s.outputPort = s.outputPort & ~OUT_A20; return;
      case 0xdf: s.outputPort = s.outputPort | OUT_A20; return;
      default:
        return; // unknown commands are ignored
    }
  }

  private dataByte(v: number): void {
    const s = this.state;
    const cmd = s.pendingCommand;
    s.pendingCommand = 0;
    if (cmd === 0) {
      this.keyboardCommand(v);
      return;
    }
    if (cmd === 0x60) {
      s.commandByte = v;
      return;
    }
    if (cmd > 0x60 && cmd <= 0x7f) return; // other controller RAM bytes: not kept
    switch (cmd) {
      case 0xd1:
        s.outputPort = v | OUT_RESET;
        if (!(v & OUT_RESET)) this.power.requestReset("i8042");
        return;
      case 0xd2: this.reply(v); return; // as if from the keyboard
      case 0xd3: this.reply(v); return; // aux loop: see DEVNOTE, reported without AUXDATA
      case 0xd4:
        this.enqueue(KBD_RESEND, FROM_AUX | WITH_TIMEOUT); // no aux device
        return;
    }
  }

  /** A byte written to port 0x60 with no controller command pending goes to the keyboard. */
  private keyboardCommand(v: number): void {
    const s = this.state;
    const pending = s.kbdPending;
    if (pending !== 0) {
      s.kbdPending = 0;
      if (pending === 0xf0) {
        if (v === 0) {
          this.enqueue(KBD_ACK, 0);
          this.enqueue(s.scancodeSet, 0);
          return;
        }
        if (v >= 1 && v <= 3) s.scancodeSet = v;
      }
      this.enqueue(KBD_ACK, 0); // LED state / typematic rate / set number accepted
      return;
    }
    switch (v) {
      case 0xed: // set LEDs
      case 0xf3: // typematic rate
      case 0xf0: // scancode set
        s.kbdPending = v;
        this.enqueue(KBD_ACK, 0);
        return;
      case 0xee: this.enqueue(0xee, 0); return; // echo
      case 0xf2: // get ID: MF2 keyboard; 0x83 reads as 0x41 through translation
        this.enqueue(KBD_ACK, 0);
        this.enqueue(0xab, 0);
        this.enqueue(s.commandByte & CTR_XLATE ? 0x41 : 0x83, 0);
        return;
      case 0xf4: s.kbdScanning = 1; this.enqueue(KBD_ACK, 0); return;
      case 0xf5: s.kbdScanning = 0; this.enqueue(KBD_ACK, 0); return; // disable and set defaults
      case 0xf6: s.kbdScanning = 1; this.enqueue(KBD_ACK, 0); return; // set defaults
      case 0xf7: case 0xf8: case 0xf9: case 0xfa:
        this.enqueue(KBD_ACK, 0);
        return;
      case 0xff: // reset and self-test (BAT)
        s.kbdScanning = 1;
        s.scancodeSet = 2;
        this.enqueue(KBD_ACK, 0);
        this.enqueue(KBD_BAT_OK, 0);
        return;
      default:
        this.enqueue(KBD_RESEND, 0);
        return;
    }
  }

  /** A controller reply replaces whatever was still queued (see DEVNOTE). */
  private reply(byte: number): void {
    this.state.qCount = 0;
    this.state.qHead = 0;
    this.enqueue(byte, 0);
  }

  private enqueue(byte: number, flags: number): void {
    const s = this.state;
    if (s.qCount >= QUEUE_SIZE) return; // overflow: dropped, as the keyboard's own buffer would
    const at = (s.qHead + s.qCount) % QUEUE_SIZE;
    s.qData[at] = byte;
    s.qFlags[at] = flags;
    s.qCount = s.qCount + 1;
  }

  private updateIrqs(): void {
    const s = this.state;
    const l1 = this.keyboardIrqCondition() ? 1 : 0;
    if (l1 !== s.irq1Level) {
      s.irq1Level = l1;
      this.kbdIrq.setLevel(l1 === 1);
    }
    const l12 = this.auxIrqCondition() ? 1 : 0;
    if (l12 !== s.irq12Level) {
      s.irq12Level = l12;
      this.auxIrq.setLevel(l12 === 1);
    }
  }

  save(): I8042Saved {
    const s = this.state;
    const output: Array<[number, number]> = [];
    for (let i = 0; i < s.qCount; i++) {
      const at = (s.qHead + i) % QUEUE_SIZE;
      output.push([s.qData[at]!, s.qFlags[at]!]);
    }
    return {
      kind: "i8042",
      version: 1,
      commandByte: s.commandByte,
      outputPort: s.outputPort,
      pendingCommand: s.pendingCommand,
      keyboardPendingCommand: s.kbdPending,
      keyboardScanning: s.kbdScanning !== 0,
      scancodeSet: s.scancodeSet,
      lastWriteWasCommand: s.lastWasCommand !== 0,
      lastData: s.lastData,
      output,
    };
  }

  restore(saved: unknown): void {
    const r: SavedStateReader = new SavedStateReader(this.name, saved, "i8042", 1);
    const commandByte = r.int("commandByte", 0, 0xff);
    const outputPort = r.int("outputPort", 0, 0xff);
    if (!(outputPort & OUT_RESET)) r.fail("output port holds the CPU in reset");
    const pendingCommand = r.int("pendingCommand", 0, 0xff);
    if (pendingCommand !== 0 && !(pendingCommand >= 0x60 && pendingCommand <= 0x7f) && !(pendingCommand >= 0xd1 && pendingCommand <= 0xd4))
      r.fail("pendingCommand is not a command that takes a data byte");
    const kbdPending = r.int("keyboardPendingCommand", 0, 0xff);
    if (kbdPending !== 0 && kbdPending !== 0xed && kbdPending !== 0xf3 && kbdPending !== 0xf0)
      r.fail("keyboardPendingCommand is not a keyboard command that takes an argument");
    const scanning = r.bool("keyboardScanning");
    const scancodeSet = r.int("scancodeSet", 1, 3);
    const lastWasCommand = r.bool("lastWriteWasCommand");
    const lastData = r.int("lastData", 0, 0xff);
    const out = (saved as { output?: unknown }).output;
    if (!Array.isArray(out) || out.length > QUEUE_SIZE) r.fail("output is not a list of at most 16 entries");
    const entries: Array<[number, number]> = [];
    for (const e of out as unknown[]) {
      if (!Array.isArray(e) || e.length !== 2) r.fail("output entry is not a [byte, flags] pair");
      const [b, f] = e as unknown[];
      if (typeof b !== "number" || !Number.isInteger(b) || b < 0 || b > 0xff) r.fail("output byte out of range");
      if (typeof f !== "number" || !Number.isInteger(f) || (f & ~(FROM_AUX | WITH_TIMEOUT)) !== 0) r.fail("output flags invalid");
      entries.push([b, f]);
    }
    const s = this.state;
    s.commandByte = commandByte;
    s.outputPort = outputPort;
    s.pendingCommand = pendingCommand;
    s.kbdPending = kbdPending;
    s.kbdScanning = scanning ? 1 : 0;
    s.scancodeSet = scancodeSet;
    s.lastWasCommand = lastWasCommand ? 1 : 0;
    s.lastData = lastData;
    s.qHead = 0;
    s.qCount = 0;
    s.qData.fill(0);
    s.qFlags.fill(0);
    for (const [b, f] of entries) this.enqueue(b, f);
    const l1 = this.keyboardIrqCondition();
    const l12 = this.auxIrqCondition();
    s.irq1Level = l1 ? 1 : 0;
    s.irq12Level = l12 ? 1 : 0;
    this.kbdIrq.setLevel(l1);
    this.auxIrq.setLevel(l12);
  }
}
