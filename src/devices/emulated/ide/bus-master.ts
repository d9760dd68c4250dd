/**
 * One channel of an SFF-8038i bus-master IDE engine (SFF-8038i rev 1.0,
 * section 3): the Command register (Start/Stop, Read/Write direction), the
 * Status register (Active, Error and Interrupt; Interrupt and Error are
 * write-one-to-clear; the two "drive DMA capable" bits are plain storage),
 * and the Descriptor Table Pointer, plus the walk of the Physical Region
 * Descriptor table in guest memory (section 2: 8-byte entries of a word-aligned
 * address, a byte count whose 0 means 64 KiB, and End Of Table in bit 31).
 *
 * Data moves straight between the device and `GuestMemory.tryBytes` views of
 * each region, so guest RAM is the only buffer. A region that does not lie in
 * guest RAM, a table that runs past 8192 entries (a 64 KiB table) or that ends
 * before the device's transfer does, stops the transfer with the Error bit and
 * an aborted command; the engine never touches anything but RAM views.
 *
 * DEVNOTE: the transfer runs to completion inside the register write that makes
 * it possible (Start set, or the command issued after Start), so the Active bit
 * is only seen set afterwards when the table was longer than the transfer (the
 * SFF-8038i "device ended early" case, which drivers accept).
 */
import type { GuestMemory } from "../../../machine/guest-memory.js";
import type { DmaOutcome, IdeDevice } from "./ide-device.js";
import type { FieldReader } from "./saved-fields.js";
import { BM, BMCMD, BMST } from "./spec.js";

/** The most PRD entries one transfer may walk (a 64 KiB table). */
export const MAX_PRD_ENTRIES = 8192;

export interface SavedBusMaster {
  readonly command: number;
  readonly status: number;
  readonly prd: number;
}

export class BusMasterChannel {
  command = 0;
  status = 0;
  /** Descriptor Table Pointer (dword aligned). */
  prd = 0;
  /** Transfers ended by a bad table or unreachable memory (diagnostics). */
  hostErrors = 0;

  constructor(
    private readonly memory: GuestMemory,
    /** Whether the function may master the bus now (PCI command register bit 2). */
    private readonly canMaster: () => boolean,
  ) {}

  reset(): void {
    this.command = 0;
    this.status = 0;
    this.prd = 0;
  }

  get started(): boolean {
    return (this.command & BMCMD.start) !== 0;
  }

  /** Whether a device's DMA request can run now. */
  get ready(): boolean {
    return (this.command & BMCMD.start) !== 0 && (this.status & BMST.active) !== 0;
  }

  readByte(offset: number): number {
    switch (offset) {
      case BM.command:
        return this.command;
      case BM.status:
        return this.status;
      case BM.prdTable:
      case BM.prdTable + 1:
      case BM.prdTable + 2:
      case BM.prdTable + 3:
        return (this.prd >>> (8 * (offset - BM.prdTable))) & 0xff;
      default:
        return 0;
    }
  }

  /** A byte write; returns true when the write set Start (the channel then offers pending DMA). */
  writeByte(offset: number, value: number): boolean {
    const v = value & 0xff;
    switch (offset) {
      case BM.command: {
        const wasStarted = this.started;
        const start = v & BMCMD.start;
        // The direction must not change while the engine runs; keep it.
        const dir = wasStarted && start !== 0 ? this.command & BMCMD.toMemory : v & BMCMD.toMemory;
        this.command = start | dir;
        if (!wasStarted && start !== 0) {
          this.status |= BMST.active;
          return true;
        }
        if (wasStarted && start === 0) this.status &= ~BMST.active;
        return false;
      }
      case BM.status: {
        const clear = v & (BMST.error | BMST.interrupt);
        this.status = ((this.status & ~clear & ~(BMST.drive0Dma | BMST.drive1Dma)) | (v & (BMST.drive0Dma | BMST.drive1Dma))) & 0xff;
        return false;
      }
      case BM.prdTable:
      case BM.prdTable + 1:
      case BM.prdTable + 2:
      case BM.prdTable + 3: {
        const shift = 8 * (offset - BM.prdTable);
        const mask = (0xff << shift) >>> 0;
        this.prd = (((this.prd & ~mask) | (v << shift)) & 0xffff_fffc) >>> 0;
        return false;
      }
      default:
        return false;
    }
  }

  /**
   * Run `device`'s pending transfer through the PRD table and tell the device
   * how it ended. Sets Error on a host-side failure and clears Active unless
   * the table was longer than the transfer.
   */
  run(device: IdeDevice): void {
    device.dmaPending = false;
    const outcome = this.walk(device);
    if (outcome === "host-error") {
      this.hostErrors++;
      this.status = (this.status & ~BMST.active) | BMST.error;
    }
    device.dmaDone(outcome);
  }

  private walk(device: IdeDevice): DmaOutcome {
    if (!this.canMaster()) return "host-error";
    const toMemory = device.dmaToMemory();
    if (((this.command & BMCMD.toMemory) !== 0) !== toMemory) return "host-error";
    const total = device.dmaLength();
    let done = 0;
    let entry = 0;
    while (done < total) {
      if (entry >= MAX_PRD_ENTRIES) return "host-error";
      const e = this.memory.tryBytes(this.prd + entry * 8, 8);
      if (e === undefined) return "host-error";
      entry++;
      const address = (e[0]! | (e[1]! << 8) | (e[2]! << 16) | (e[3]! << 24)) & 0xffff_fffe;
      const count = (e[4]! | (e[5]! << 8)) & 0xfffe || 0x1_0000;
      const eot = (e[7]! & 0x80) !== 0;
      const n = Math.min(count, total - done);
      const moved = this.move(device, address >>> 0, n, done);
      if (moved !== "done") return moved;
      done += n;
      if (done >= total) {
        if (n === count && eot) this.status &= ~BMST.active;
        return "done";
      }
      if (eot) return "host-error"; // the table ends before the transfer does
    }
    this.status &= ~BMST.active;
    return "done";
  }

  /** Move n bytes at guest address `address` (which may cross host mapping chunks). */
  private move(device: IdeDevice, address: number, n: number, offset: number): DmaOutcome {
    const whole = this.memory.tryBytes(address, n);
    if (whole !== undefined) return device.dmaChunk(whole, offset) ? "done" : "device-error";
    let a = address;
    let off = offset;
    let left = n;
    while (left > 0) {
      // Largest prefix that one view covers (binary search; only on this rare path).
      let lo = 0;
      let hi = left;
      while (lo < hi) {
        const mid = (lo + hi + 1) >>> 1;
        if (this.memory.tryBytes(a, mid) !== undefined) lo = mid;
        else hi = mid - 1;
      }
      if (lo === 0) return "host-error";
      if (!device.dmaChunk(this.memory.tryBytes(a, lo)!, off)) return "device-error";
      a += lo;
      off += lo;
      left -= lo;
    }
    return "done";
  }

  /** Check saved registers; returns the function that loads them. */
  checkSaved(r: FieldReader): () => void {
    const command = r.int("command", 0, 0xff);
    const status = r.int("status", 0, 0xff);
    const prd = r.int("prd", 0, 0xffff_ffff);
    if ((command & ~(BMCMD.start | BMCMD.toMemory)) !== 0) r.fail("reserved command bits set");
    if ((status & BMST.simplex) !== 0 || (status & 0x18) !== 0) r.fail("reserved status bits set");
    if ((prd & 3) !== 0) r.fail("descriptor table pointer not dword aligned");
    return () => {
      this.command = command;
      this.status = status;
      this.prd = prd;
    };
  }

  save(): SavedBusMaster {
    return { command: this.command, status: this.status, prd: this.prd };
  }
}
