/**
 * One IDE channel (cable): two device positions sharing the command block
 * (8 ports) and the control block (Alternate Status / Device Control), the
 * channel's INTRQ line and its bus-master engine. ATA-6 section 5 and 9:
 *
 * - command block writes (registers 1-6) reach both devices; the DEV bit of
 *   the Device register selects which one answers reads and takes commands;
 * - a command written to an absent device is ignored, except EXECUTE DEVICE
 *   DIAGNOSTIC, which always runs on the channel;
 * - INTRQ = the selected device's pending interrupt, unless nIEN is set in
 *   Device Control; reading Status (not Alternate Status) or writing Command
 *   clears the pending interrupt;
 * - SRST held in Device Control keeps both devices BSY; releasing it runs the
 *   reset protocol (signatures, diagnostic code), selecting device 0;
 * - writing any command block register clears Device Control HOB.
 *
 * A channel with no device at all reads FFh everywhere (a floating bus), which
 * is how drivers find it empty.
 */
import type { IrqLine } from "../../dependencies.js";
import type { BusMasterChannel } from "./bus-master.js";
import type { DeviceHost, IdeDevice, SavedIdeDevice } from "./ide-device.js";
import type { FieldReader } from "./saved-fields.js";
import { CMD, DC, DEV, REG, ST, BMST } from "./spec.js";

export interface SavedIdeChannel {
  readonly control: number;
  readonly select: number;
  readonly line: boolean;
  readonly devices: readonly SavedIdeDevice[];
}

export class IdeChannel implements DeviceHost {
  /** Device Control as last written (nIEN, SRST, HOB). */
  control = 0;
  /** The selected device (Device register DEV bit). */
  select: 0 | 1 = 0;
  private line = false;
  readonly devices: [IdeDevice, IdeDevice];

  constructor(
    readonly index: 0 | 1,
    private readonly irq: IrqLine,
    readonly busMaster: BusMasterChannel,
    makeDevice: (unit: 0 | 1, host: DeviceHost) => IdeDevice,
    /** Wakes the channel after a delay (rate-limited disks only): `set(ms)` keeps the earlier time. */
    private readonly timer?: { set(ms: number): void },
  ) {
    this.devices = [makeDevice(0, this), makeDevice(1, this)];
  }

  private get empty(): boolean {
    return !this.devices[0].present && !this.devices[1].present;
  }

  private get selected(): IdeDevice {
    return this.devices[this.select];
  }

  /** Power-on / board reset. */
  reset(): void {
    this.busMaster.awaitFlight();
    this.control = 0;
    this.select = 0;
    this.busMaster.reset();
    for (const d of this.devices) d.powerOn();
    this.resetDevices();
    this.line = true; // force the line low
    this.updateIrq();
  }

  // DeviceHost -------------------------------------------------------------

  raiseIrq(device: IdeDevice): void {
    device.irqPending = true;
    if (device === this.selected && (this.control & DC.nien) === 0) this.busMaster.status |= BMST.interrupt;
    this.updateIrq();
  }

  dmaRequest(device: IdeDevice): void {
    if (device === this.selected && this.busMaster.ready) this.busMaster.run(device);
  }

  wakeAfter(ms: number): void {
    this.timer?.set(ms);
  }

  /** The timer fired (or a save is coming: `force`): held commands start where their limits allow; the timer is set again for the rest. */
  resumeHeld(force = false): void {
    let wait = Infinity;
    for (const d of this.devices) {
      const w = d.resumeHeld(force);
      if (w > 0) wait = Math.min(wait, w);
    }
    if (wait !== Infinity) this.timer?.set(wait);
  }

  private updateIrq(): void {
    const level = (this.control & DC.nien) === 0 && this.selected.irqPending;
    if (level !== this.line) {
      this.line = level;
      this.irq.setLevel(level);
    }
  }

  // Register access --------------------------------------------------------

  /** Command block read (offset 0-7), 1, 2 or 4 bytes. */
  readCommandBlock(offset: number, size: 1 | 2 | 4): number {
    if (offset === REG.data) {
      if (this.empty) return size === 4 ? 0xffff_ffff : size === 2 ? 0xffff : 0xff;
      return this.selected.dataRead(size);
    }
    // Wider accesses to the byte registers read consecutive registers.
    let v = 0;
    for (let i = 0; i < size; i++) v |= this.readByteRegister(offset + i) << (8 * i);
    return v >>> 0;
  }

  /** A string read of the data port: see IdeDevice.dataReadString (0 when the channel is empty). */
  readDataString(size: 2 | 4, count: number, into: Uint8Array, at: number): number {
    if (this.empty) return 0;
    return this.selected.dataReadString(size, count, into, at);
  }

  private readByteRegister(offset: number): number {
    if (this.empty || offset > 7) return 0xff;
    const d = this.selected;
    if (offset === REG.statusCommand) {
      if (!d.present) return 0;
      const s = d.status;
      if (d.irqPending) {
        d.irqPending = false;
        this.updateIrq();
      }
      return s;
    }
    return d.readRegister(offset, (this.control & DC.hob) !== 0);
  }

  /** Command block write (offset 0-7), 1, 2 or 4 bytes. */
  writeCommandBlock(offset: number, size: 1 | 2 | 4, value: number): void {
    this.busMaster.awaitFlight(); // a drive finishes its DMA before it takes a write
    if (offset === REG.data) {
      this.selected.dataWrite(size, value);
      return;
    }
    for (let i = 0; i < size; i++) this.writeByteRegister(offset + i, (value >>> (8 * i)) & 0xff);
  }

  private writeByteRegister(offset: number, value: number): void {
    if (offset > 7) return;
    // While the selected device is busy (a command held by its rate limit, SRST asserted) the command block registers ignore
    // writes, a device reselect included, as QEMU's do: of commands only EXECUTE DEVICE DIAGNOSTIC gets through
    // (command()), and SRST through Device Control.
    if (offset !== REG.statusCommand && !this.empty && (this.selected.status & ST.bsy) !== 0) return;
    this.control &= ~DC.hob;
    if (offset === REG.statusCommand) {
      this.command(value);
      return;
    }
    this.devices[0].writeRegister(offset, value);
    this.devices[1].writeRegister(offset, value);
    if (offset === REG.device) {
      this.select = (value & DEV.dev) !== 0 ? 1 : 0;
      this.updateIrq();
    }
  }

  private command(cmd: number): void {
    const d = this.selected;
    if (cmd === CMD.executeDiagnostic) {
      if (!this.empty) this.diagnose();
      return;
    }
    if (!d.present || (d.status & ST.bsy) !== 0) return;
    d.irqPending = false;
    this.updateIrq();
    d.command(cmd);
  }

  /** EXECUTE DEVICE DIAGNOSTIC: both devices report their signature; device 0 interrupts. */
  private diagnose(): void {
    this.resetDevices();
    this.raiseIrq(this.devices[0]);
  }

  /** Both devices run the reset protocol; device 0 ends up selected. */
  private resetDevices(): void {
    for (const d of this.devices) {
      d.beginReset();
      d.writeRegister(REG.device, 0);
      d.completeReset();
    }
    this.select = 0;
  }

  /**
   * Status as a read of the Status register would return it now, or -1 when
   * that read has a side effect (it acknowledges a pending interrupt).
   */
  peekStatus(): number {
    if (this.empty) return 0xff;
    const d = this.selected;
    if (!d.present) return 0;
    return d.irqPending ? -1 : d.status;
  }

  /** Alternate Status: Status without side effects. */
  readControl(): number {
    if (this.empty) return 0xff;
    const d = this.selected;
    return d.present ? d.status : 0;
  }

  /** Device Control: nIEN, SRST (reset on its falling edge), HOB. */
  writeControl(value: number): void {
    this.busMaster.awaitFlight();
    const before = this.control;
    this.control = value & (DC.hob | DC.srst | DC.nien);
    if ((value & DC.srst) !== 0 && (before & DC.srst) === 0) {
      for (const d of this.devices) d.beginReset();
    } else if ((value & DC.srst) === 0 && (before & DC.srst) !== 0) {
      this.resetDevices();
    }
    this.updateIrq();
  }

  /** The bus-master engine was started: run the selected device's pending DMA. */
  busMasterStarted(): void {
    const d = this.selected;
    if (d.dmaPending && this.busMaster.ready) this.busMaster.run(d);
  }

  /**
   * Check a saved channel (its registers, bus-master engine and both devices
   * with their command-set parts); returns the function that loads it and
   * re-drives the INTRQ line to match.
   */
  checkSaved(r: FieldReader): () => void {
    const control = r.int("control", 0, 0xff);
    if ((control & ~(DC.hob | DC.srst | DC.nien)) !== 0) r.fail("reserved Device Control bits set");
    const select = r.int("select", 0, 1) as 0 | 1;
    r.bool("line");
    const bm = this.busMaster.checkSaved(r.child("busMaster"));
    const devices = r.children("devices", 2);
    const disks = r.children("disks", 2);
    const cdroms = r.children("cdroms", 2);
    const applies = this.devices.map((d, u) => {
      const dr = devices[u];
      if (dr === null || dr === undefined) return r.fail(`device ${u} is missing`);
      const specific = d.kind === "disk" ? disks[u]! : d.kind === "cdrom" ? cdroms[u]! : (disks[u] ?? cdroms[u] ?? null);
      return d.checkSaved(dr, specific);
    });
    return () => {
      this.control = control;
      this.select = select;
      bm();
      for (const a of applies) a();
      const level = (this.control & DC.nien) === 0 && this.selected.irqPending;
      this.line = !level;
      this.updateIrq();
    };
  }

  save(): SavedIdeChannel {
    return { control: this.control, select: this.select, line: this.line, devices: this.devices.map((d) => d.saveDevice()) };
  }
}
