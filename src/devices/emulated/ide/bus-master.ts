/**
 * One channel of an SFF-8038i bus-master IDE engine (SFF-8038i rev 1.0,
 * section 3): the Command register (Start/Stop, Read/Write direction), the
 * Status register (Active, Error and Interrupt; Interrupt and Error are
 * write-one-to-clear; the two "drive DMA capable" bits are plain storage),
 * and the Descriptor Table Pointer, plus the walk of the Physical Region
 * Descriptor table in guest memory (section 2: 8-byte entries of a word-aligned
 * address, a byte count whose 0 means 64 KiB, and End Of Table in bit 31).
 *
 * A transfer first walks the whole table into a list of guest spans (each
 * inside one host mapping chunk), then moves the data in one go: one
 * scatter/gather system call straight between the disk and guest RAM where
 * the device and its back end can (`IdeDevice.dmaHost`: a raw image), else
 * through `GuestMemory.tryBytes` views of each span. A region that does not
 * lie in guest RAM, a table that runs past 8192 entries (a 64 KiB table) or
 * that ends before the device's transfer does, stops the transfer with the
 * Error bit and an aborted command before any data moves; the engine never
 * touches anything but guest RAM.
 *
 * When the transfer runs: as on hardware, not inside the register write that
 * makes it possible (Start set, or the command issued after Start). With a
 * scheduler (the device thread's loop), that write only records the transfer
 * as owed and returns, so the vCPU that wrote it goes on at once; the transfer
 * runs on the device thread right after the access is answered, and ends with
 * the device's interrupt. Until then the guest sees what a drive in the middle
 * of a DMA shows: Active set, DRQ. Clearing Start before it runs leaves the
 * command waiting for the engine, as a drive whose DMA request is not served
 * waits; a device reset or a new command drops it. `settle()` runs an owed
 * transfer at once (before a save). Without a scheduler (tools, some tests)
 * the transfer runs inside the write.
 *
 * With a queue (`DmaQueue`: the controller's io_uring) and a disk that can
 * queue (`IdeDevice.dmaQueue`: a raw image), a transfer the page cache cannot
 * take at once goes on the ring and the device thread goes on; the drive
 * stays mid-transfer (Active, DRQ) until the completion comes back
 * (`complete`), which ends it as a synchronous transfer ends. A completion
 * that came back short is redone synchronously. A drive finishes its DMA
 * before it takes another register write: any write to the channel (command
 * block, Device Control, bus-master registers), a reset, a save or a medium
 * change first waits for the transfer in flight (`awaitFlight`); reads do not
 * wait (they see the drive mid-transfer).
 */
import type { GuestMemory } from "../../../machine/guest-memory.js";
import type { HostIoQueue } from "../../../storage/block-device.js";
import type { DmaOutcome, IdeDevice } from "./ide-device.js";
import type { FieldReader } from "./saved-fields.js";
import { BM, BMCMD, BMST } from "./spec.js";

/** The most PRD entries one transfer may walk (a 64 KiB table). */
export const MAX_PRD_ENTRIES = 8192;
/** Span lists start this long and grow (once) to what a guest's tables need. */
const INITIAL_SPANS = 256;

/** Where deferred work runs: the device thread's loop (IoEventLoop.defer). */
export interface DmaScheduler {
  /** Run `task` once, after the access being handled has been answered. */
  defer(task: () => void): void;
}

/** Where a channel's transfers go when the disk can queue them: one io_uring for the controller, a token per channel. */
export interface DmaQueue {
  readonly io: HostIoQueue;
  /** This channel's completions come back with this token (the owner routes them to `complete`). */
  readonly token: number;
  /** Hand what was prepared to the kernel, then take the completions already there (the kernel may finish a request while taking it). */
  submit(): void;
  /** Wait until every queued transfer has completed, each completion handed to its channel's `complete` meanwhile. */
  drain(): void;
}

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
  /** Transfers moved with one scatter/gather call, and through views (diagnostics). */
  hostTransfers = 0;
  viewTransfers = 0;
  /** Transfers that went on the queue (completed later), and of those, redone synchronously after a short completion. */
  queuedTransfers = 0;
  shortCompletions = 0;
  /** The device whose transfer is on the queue, and how many bytes it moves. */
  private inFlight: IdeDevice | undefined;
  private inFlightBytes = 0;
  /** The walked table ends with the transfer: Active clears when it is done. */
  private tableEnds = false;
  /** The device whose transfer is owed (scheduled, not yet run). */
  private owed: IdeDevice | undefined;
  private readonly settleTask = (): void => this.settle();
  // The current transfer's guest spans (each inside one host mapping chunk) and their host addresses.
  private gpas = new Float64Array(INITIAL_SPANS);
  private lengths = new Uint32Array(INITIAL_SPANS);
  private host = new Float64Array(INITIAL_SPANS);
  private spans = 0;

  constructor(
    private readonly memory: GuestMemory,
    /** Whether the function may master the bus now (PCI command register bit 2). */
    private readonly canMaster: () => boolean,
    private readonly scheduler?: DmaScheduler,
    private readonly queue?: DmaQueue,
  ) {}

  /** A transfer is on the queue. */
  get inFlightNow(): boolean {
    return this.inFlight !== undefined;
  }

  /** For state reports: what the engine is doing. */
  describe(): string {
    const doing = this.inFlight !== undefined ? ", a transfer on the ring" : this.owed !== undefined ? ", a transfer owed" : "";
    return `bus master command 0x${this.command.toString(16)} status 0x${this.status.toString(16)} table 0x${this.prd.toString(16)}${doing}`;
  }

  /**
   * Wait for the transfer on the queue, if any: it ends (data, status,
   * interrupt) before whatever called this goes on.
   */
  awaitFlight(): void {
    if (this.inFlight === undefined) return;
    this.queue!.drain();
    // drain hands every completion over; one that never came is a failed transfer, not a stuck channel.
    if (this.inFlight !== undefined) this.complete(-5);
  }

  reset(): void {
    this.awaitFlight();
    this.command = 0;
    this.status = 0;
    this.prd = 0;
    this.owed = undefined;
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
    this.awaitFlight();
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
   * `device`'s DMA request meets a running engine: run the transfer, at once
   * without a scheduler, else once the current access has been answered.
   */
  run(device: IdeDevice): void {
    if (this.scheduler === undefined) return this.transfer(device);
    const scheduled = this.owed !== undefined;
    this.owed = device; // the latest request: settle() takes it as it then stands
    if (!scheduled) this.scheduler.defer(this.settleTask);
  }

  /**
   * Run the owed transfer now, if its device still asks for it and the engine
   * still runs (a Stop, a reset or a new command in between drop it).
   */
  settle(): void {
    this.awaitFlight();
    const device = this.owed;
    if (device === undefined) return;
    this.owed = undefined;
    if (device.dmaPending && this.ready) this.transfer(device);
  }

  /**
   * Run `device`'s pending transfer through the PRD table and tell the device
   * how it ended. Sets Error on a host-side failure and clears Active unless
   * the table was longer than the transfer.
   */
  private transfer(device: IdeDevice): void {
    device.dmaPending = false;
    let outcome = this.walk(device);
    if (outcome === "done") {
      const moved = this.move(device, true);
      if (moved === "queued") {
        this.inFlight = device;
        this.inFlightBytes = device.dmaLength();
        this.queuedTransfers++;
        this.queue!.submit(); // a completion already there ends the transfer now
        return;
      }
      outcome = moved;
    }
    this.end(device, outcome);
  }

  /** The transfer ended: registers as it left them, then the device's completion (and interrupt). */
  private end(device: IdeDevice, outcome: DmaOutcome): void {
    if (outcome === "host-error") {
      this.hostErrors++;
      this.status = (this.status & ~BMST.active) | BMST.error;
    } else if (this.tableEnds) this.status &= ~BMST.active;
    device.dmaDone(outcome);
  }

  /**
   * The queued transfer's completion (bytes moved, or -errno), from the
   * queue's owner. Short: redone synchronously (reads and writes are
   * idempotent; the spans are still the walked ones).
   */
  complete(result: number): void {
    const device = this.inFlight;
    if (device === undefined) return;
    this.inFlight = undefined;
    let outcome: DmaOutcome;
    if (result === this.inFlightBytes) outcome = "done";
    else if (result < 0) outcome = device.dmaQueueFailed?.(-result) ?? "device-error";
    else {
      this.shortCompletions++;
      const again = this.move(device, false);
      outcome = again === "queued" ? "device-error" : again;
    }
    this.end(device, outcome);
  }

  /** Walk the PRD table into the span list; "done" when it covers the device's transfer. */
  private walk(device: IdeDevice): DmaOutcome {
    this.spans = 0;
    this.tableEnds = false;
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
      const address = ((e[0]! | (e[1]! << 8) | (e[2]! << 16) | (e[3]! << 24)) & 0xffff_fffe) >>> 0;
      const count = (e[4]! | (e[5]! << 8)) & 0xfffe || 0x1_0000;
      const eot = (e[7]! & 0x80) !== 0;
      const n = Math.min(count, total - done);
      if (!this.addRegion(address, n)) return "host-error";
      done += n;
      if (done >= total) {
        this.tableEnds = n === count && eot;
        return "done";
      }
      if (eot) return "host-error"; // the table ends before the transfer does
    }
    this.tableEnds = true;
    return "done";
  }

  /** Append guest region [address, address+n) as spans that each lie in one host mapping chunk; false if not all RAM. */
  private addRegion(address: number, n: number): boolean {
    let a = address;
    let left = n;
    while (left > 0) {
      const c = this.memory.contiguousLength(a, left);
      if (c === 0) return false;
      if (this.spans === this.gpas.length) this.growSpans();
      this.gpas[this.spans] = a;
      this.lengths[this.spans] = c;
      this.spans++;
      a += c;
      left -= c;
    }
    return true;
  }

  private growSpans(): void {
    const size = this.gpas.length * 2;
    const gpas = new Float64Array(size);
    const lengths = new Uint32Array(size);
    gpas.set(this.gpas);
    lengths.set(this.lengths);
    this.gpas = gpas;
    this.lengths = lengths;
    this.host = new Float64Array(size);
  }

  /**
   * Move the walked spans: on the queue where allowed and the disk would
   * wait ("queued"), else one scatter/gather call where possible, else a view
   * per span.
   */
  private move(device: IdeDevice, mayQueue: boolean): DmaOutcome | "queued" {
    const n = this.spans;
    if (n === 0) return "done";
    const queue = mayQueue ? this.queue : undefined;
    const hostPath = device.dmaHost !== undefined || (queue !== undefined && device.dmaQueue !== undefined);
    if (hostPath && this.memory.hostAddresses?.(this.gpas, n, this.host) === true) {
      if (queue !== undefined && device.dmaQueue !== undefined) {
        const r = device.dmaQueue(queue.io, this.host, this.lengths, n, queue.token);
        if (r === "queued") return r; // the caller submits it
        if (r !== undefined) {
          this.hostTransfers++;
          return r;
        }
      }
      const r = device.dmaHost?.(this.host, this.lengths, n);
      if (r !== undefined) {
        this.hostTransfers++;
        return r;
      }
    }
    this.viewTransfers++;
    let offset = 0;
    for (let i = 0; i < n; i++) {
      const view = this.memory.tryBytes(this.gpas[i]!, this.lengths[i]!);
      if (view === undefined) return "host-error";
      if (!device.dmaChunk(view, offset)) return "device-error";
      offset += this.lengths[i]!;
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
      this.awaitFlight();
      this.command = command;
      this.status = status;
      this.prd = prd;
      this.owed = undefined;
    };
  }

  /** The registers; an owed or queued transfer must have been settled first (PiixIde.save does). */
  save(): SavedBusMaster {
    return { command: this.command, status: this.status, prd: this.prd };
  }
}
