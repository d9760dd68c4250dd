/**
 * One device position on an IDE channel (ATA-6 section 5.2, "device 0 / device
 * 1"): its copy of the command block registers, the PIO data buffer with the
 * current DRQ block, the interrupt-pending flag, and the hooks a command set
 * (ATA disk, ATAPI CD-ROM) fills in. An empty position is an `AbsentDevice`:
 * it keeps register writes (both devices latch every command block write) but
 * ignores commands, and its Status reads as 00h (ATA-6 9.16.1: device 0
 * answers for an absent device 1 with Status 00h).
 *
 * DEVNOTE: every command completes synchronously inside the register access
 * that starts it (or, for DMA, inside the bus-master start write), so BSY is
 * only ever seen while SRST is held, or while a disk's rate limit holds a
 * read or write until the channel wakes it (`wakeAfter`, `resumeHeld`).
 */
import type { HostIoQueue } from "../../../storage/block-device.js";
import type { FieldReader } from "./saved-fields.js";
import { DEV, REG, ST } from "./spec.js";

/** What a device may ask of its channel. */
export interface DeviceHost {
  /** This device asserts INTRQ (pending until Status is read or a command is written). */
  raiseIrq(device: IdeDevice): void;
  /** This device is ready to move data by bus-master DMA. */
  dmaRequest(device: IdeDevice): void;
  /** Call this channel's devices' resumeHeld() in `ms` milliseconds (a rate limit holds a command). */
  wakeAfter(ms: number): void;
}

/** The outcome of a bus-master transfer, as the device sees it. */
export type DmaOutcome = "done" | "host-error" | "device-error";

/** Where the current PIO DRQ block goes when it is done. */
export const Pio = {
  none: 0,
  /** Device to host (data-in). */
  in: 1,
  /** Host to device (data-out). */
  out: 2,
} as const;
export type Pio = (typeof Pio)[keyof typeof Pio];

/** Plain-data registers and transfer position of one device. */
export interface SavedIdeDevice {
  readonly kind: "disk" | "cdrom" | "absent";
  readonly regs: readonly number[];
  readonly irqPending: boolean;
  readonly pio: number;
  readonly pos: number;
  readonly end: number;
  /** The buffer bytes that are state (the PIO block in flight and any data staged behind it). */
  readonly buffer: readonly number[];
  readonly dmaPending: boolean;
}

export abstract class IdeDevice {
  // Command block registers ("hob" = the previous write, read with Device Control HOB set).
  feature = 0;
  hobFeature = 0;
  nsect = 0;
  hobNsect = 0;
  lbal = 0;
  hobLbal = 0;
  lbam = 0;
  hobLbam = 0;
  lbah = 0;
  hobLbah = 0;
  device = 0;
  status = 0;
  error = 0;
  /** The device's INTRQ request (the channel gates it with nIEN and device selection). */
  irqPending = false;

  /** PIO buffer; [pos, end) is the part of the current DRQ block not yet moved. */
  readonly buffer: Uint8Array;
  pos = 0;
  end = 0;
  pio: Pio = Pio.none;
  /** A DMA command waits for the bus-master engine. */
  dmaPending = false;

  abstract readonly kind: "disk" | "cdrom" | "absent";

  constructor(
    readonly unit: 0 | 1,
    protected readonly host: DeviceHost,
    bufferBytes: number,
  ) {
    this.buffer = new Uint8Array(bufferBytes);
  }

  get present(): boolean {
    return this.kind !== "absent";
  }

  /** A host write to command block register 1..6 (both devices latch it). */
  writeRegister(reg: number, value: number): void {
    const v = value & 0xff;
    switch (reg) {
      case REG.errorFeatures:
        this.hobFeature = this.feature;
        this.feature = v;
        break;
      case REG.sectorCount:
        this.hobNsect = this.nsect;
        this.nsect = v;
        break;
      case REG.lbaLow:
        this.hobLbal = this.lbal;
        this.lbal = v;
        break;
      case REG.lbaMid:
        this.hobLbam = this.lbam;
        this.lbam = v;
        break;
      case REG.lbaHigh:
        this.hobLbah = this.lbah;
        this.lbah = v;
        break;
      case REG.device:
        this.device = v;
        break;
    }
  }

  /** A host read of command block register 1..6. */
  readRegister(reg: number, hob: boolean): number {
    switch (reg) {
      case REG.errorFeatures:
        return this.error;
      case REG.sectorCount:
        return hob ? this.hobNsect : this.nsect;
      case REG.lbaLow:
        return hob ? this.hobLbal : this.lbal;
      case REG.lbaMid:
        return hob ? this.hobLbam : this.lbam;
      case REG.lbaHigh:
        return hob ? this.hobLbah : this.lbah;
      case REG.device:
        return this.device;
      default:
        return 0xff;
    }
  }

  /** Data port read of 1, 2 or 4 bytes (little-endian); past the DRQ block end reads zeros. */
  dataRead(size: 1 | 2 | 4): number {
    if (this.pio !== Pio.in) return 0;
    const buf = this.buffer;
    let pos = this.pos;
    const end = this.end;
    let v = 0;
    if (pos < end) v = buf[pos++]!;
    if (size > 1) {
      if (pos < end) v |= buf[pos++]! << 8;
      if (size === 4) {
        if (pos < end) v |= buf[pos++]! << 16;
        if (pos < end) v |= buf[pos++]! << 24;
      }
    }
    this.pos = pos;
    if (pos >= end) this.finishBlock();
    return v >>> 0;
  }

  /**
   * A string read (`rep insw`/`insd`) of up to `count` elements of `size`
   * bytes into `into` at `at`: whole elements of the current DRQ block only,
   * ending the block as the element reads would. Returns how many it moved
   * (0: none here; the caller then reads element by element).
   */
  dataReadString(size: 2 | 4, count: number, into: Uint8Array, at: number): number {
    if (this.pio !== Pio.in) return 0;
    const n = Math.min(count, Math.floor((this.end - this.pos) / size), Math.floor((into.length - at) / size));
    if (n <= 0) return 0;
    const bytes = n * size;
    into.set(this.buffer.subarray(this.pos, this.pos + bytes), at);
    this.pos += bytes;
    if (this.pos >= this.end) this.finishBlock();
    return n;
  }

  /** Data port write of 1, 2 or 4 bytes; bytes past the DRQ block end are dropped. */
  dataWrite(size: 1 | 2 | 4, value: number): void {
    if (this.pio !== Pio.out) return;
    const buf = this.buffer;
    let pos = this.pos;
    const end = this.end;
    for (let i = 0; i < size && pos < end; i++) buf[pos++] = (value >>> (8 * i)) & 0xff;
    this.pos = pos;
    if (pos >= end) this.finishBlock();
  }

  private finishBlock(): void {
    this.pio = Pio.none;
    this.status &= ~ST.drq;
    this.blockDone();
  }

  /** Offer a DRQ block of `buffer[0, length)` to the host (data-in) or ask for one (data-out). */
  protected startPio(direction: typeof Pio.in | typeof Pio.out, length: number): void {
    this.startPioAt(direction, 0, length);
  }

  /** Offer (or ask for) the DRQ block `buffer[start, end)`. */
  protected startPioAt(direction: typeof Pio.in | typeof Pio.out, start: number, end: number): void {
    this.pos = start;
    this.end = end;
    this.pio = direction;
    this.status = (this.status & ~(ST.bsy | ST.err)) | ST.drq;
  }

  /** Drop any transfer in progress (new command, reset). */
  protected cancelTransfer(): void {
    this.pio = Pio.none;
    this.pos = 0;
    this.end = 0;
    this.dmaPending = false;
  }

  protected raise(): void {
    this.host.raiseIrq(this);
  }

  /** SRST asserted: the device is busy until it is released. */
  beginReset(): void {
    this.cancelTransfer();
    this.irqPending = false;
    this.status = ST.bsy;
  }

  /**
   * The channel's wake-up: a command a rate limit held starts if its limits
   * allow it now. Returns the milliseconds it still has to wait (0: nothing
   * held, or it started). `force`: start it regardless (before a save).
   */
  resumeHeld(_force = false): number {
    return 0;
  }

  /** SRST released (or power-on, or EXECUTE DEVICE DIAGNOSTIC): signature, diagnostic code 01h, ready status. */
  abstract completeReset(): void;
  /** Power-on defaults for settings kept across SRST (multiple count, transfer mode, write cache). */
  abstract powerOn(): void;
  /** A command register write addressed to this device. */
  abstract command(cmd: number): void;
  /** The current DRQ block has been moved. */
  protected abstract blockDone(): void;

  // Bus-master DMA client (valid while dmaPending).
  /** Bytes the pending DMA command moves. */
  abstract dmaLength(): number;
  /** Direction of the pending DMA command: true when data goes to guest memory. */
  abstract dmaToMemory(): boolean;
  /** Move `view.length` bytes at byte `offset` of the transfer between the device and `view`; false on a device error. */
  abstract dmaChunk(view: Uint8Array, offset: number): boolean;
  /**
   * Optional: move the whole transfer in one scatter/gather call between the
   * back end and host memory (`addresses`/`lengths`: guest RAM spans, back to
   * back). "done" or "device-error"; undefined when it cannot (the engine then
   * moves the spans with dmaChunk, which redoes the whole transfer).
   */
  dmaHost?(addresses: Float64Array, lengths: Uint32Array, count: number): DmaOutcome | undefined;
  /**
   * Optional: the same, without waiting for the disk: "queued" when it went
   * on `queue` (its completion comes back to the engine with `token`), else
   * as dmaHost ("done" or "device-error" at once; undefined when it cannot,
   * and the engine then moves it synchronously).
   */
  dmaQueue?(queue: HostIoQueue, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): DmaOutcome | "queued" | undefined;
  /** Optional: a queued transfer failed with `errno` (the device keeps the cause); the outcome to report. */
  dmaQueueFailed?(errno: number): DmaOutcome;
  /** The bus-master engine ended the transfer. */
  abstract dmaDone(outcome: DmaOutcome): void;

  /** Write the completion registers of an ATA signature (ATA-6 9.12). */
  protected setSignature(lbam: number, lbah: number): void {
    this.nsect = this.hobNsect = 1;
    this.lbal = this.hobLbal = 1;
    this.lbam = this.hobLbam = lbam;
    this.lbah = this.hobLbah = lbah;
    this.device &= DEV.dev;
    this.error = 0x01;
  }

  /**
   * Check a saved device (as `saveDevice` wrote it) against this position;
   * returns the transfer shape for the subclass's checks and a function that
   * applies it. Nothing changes until the function is called.
   */
  protected checkDevice(r: FieldReader): { pio: Pio; end: number; dmaPending: boolean; buffered: number; apply: () => void } {
    r.oneOf("kind", [this.kind]);
    const regs = r.ints("regs", 13, 13, 0, 0xff);
    const irqPending = r.bool("irqPending");
    const pio = r.int("pio", 0, 2) as Pio;
    const end = r.int("end", 0, this.buffer.length);
    const pos = r.int("pos", 0, end);
    const bytes = r.ints("buffer", pio === Pio.none ? 0 : end, this.buffer.length, 0, 0xff);
    const dmaPending = r.bool("dmaPending");
    if (pio !== Pio.none && dmaPending) r.fail("a PIO block and a DMA transfer at once");
    if (pio !== Pio.none && (regs[11]! & ST.drq) === 0) r.fail("a PIO block without DRQ");
    const apply = (): void => {
      [this.feature, this.hobFeature, this.nsect, this.hobNsect, this.lbal, this.hobLbal] = regs as [number, number, number, number, number, number];
      [this.lbam, this.hobLbam, this.lbah, this.hobLbah, this.device, this.status, this.error] = regs.slice(6) as [number, number, number, number, number, number, number];
      this.irqPending = irqPending;
      this.pio = pio;
      this.pos = pio === Pio.none ? 0 : pos;
      this.end = pio === Pio.none ? 0 : end;
      this.buffer.set(bytes);
      this.dmaPending = dmaPending;
    };
    return { pio, end, dmaPending, buffered: bytes.length, apply };
  }

  /** Check a saved device and its command-set state (`specific`: the disk or CD-ROM part, null for none). */
  abstract checkSaved(r: FieldReader, specific: FieldReader | null): () => void;

  /** Buffer bytes that are state: the current PIO block (subclasses add data staged beyond it). */
  protected stagedBytes(): number {
    return this.pio !== Pio.none ? this.end : 0;
  }

  saveDevice(): SavedIdeDevice {
    const inFlight = this.pio !== Pio.none;
    return {
      kind: this.kind,
      regs: [
        this.feature, this.hobFeature, this.nsect, this.hobNsect, this.lbal, this.hobLbal,
        this.lbam, this.hobLbam, this.lbah, this.hobLbah, this.device, this.status, this.error,
      ],
      irqPending: this.irqPending,
      pio: this.pio,
      pos: inFlight ? this.pos : 0,
      end: inFlight ? this.end : 0,
      buffer: Array.from(this.buffer.subarray(0, this.stagedBytes())),
      dmaPending: this.dmaPending,
    };
  }
}

/** An empty device position: latches register writes, ignores commands, signature FFh/FFh. */
export class AbsentDevice extends IdeDevice {
  readonly kind = "absent" as const;

  constructor(unit: 0 | 1, host: DeviceHost) {
    super(unit, host, 0);
  }

  completeReset(): void {
    this.cancelTransfer();
    this.setSignature(0xff, 0xff);
    this.status = 0;
  }
  powerOn(): void {}
  command(): void {}
  protected blockDone(): void {}
  dmaLength(): number {
    return 0;
  }
  dmaToMemory(): boolean {
    return false;
  }
  dmaChunk(): boolean {
    return false;
  }
  dmaDone(): void {}
  checkSaved(r: FieldReader, specific: FieldReader | null): () => void {
    if (specific !== null) r.fail("command-set state for an empty position");
    const base = this.checkDevice(r);
    if (base.pio !== Pio.none || base.dmaPending) r.fail("a transfer on an empty position");
    return base.apply;
  }
}
