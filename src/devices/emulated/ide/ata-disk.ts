/**
 * An ATA hard disk (ATA/ATAPI-7 volume 1): the commands a PC guest (Linux
 * libata, firmware) issues to a PATA disk, over PIO and bus-master DMA.
 *
 * - IDENTIFY DEVICE (6.17), SET FEATURES transfer mode / write cache /
 *   look-ahead (6.49), SET MULTIPLE MODE (6.51), INITIALIZE DEVICE PARAMETERS,
 *   CHECK POWER MODE / IDLE / STANDBY / SLEEP, FLUSH CACHE (EXT), SEEK,
 *   RECALIBRATE, READ VERIFY SECTOR(S) (EXT);
 * - READ/WRITE SECTOR(S) (EXT): PIO, one sector a DRQ block, INTRQ before each
 *   data-in block and after each data-out block (ATA-7 vol 2 PIO protocols);
 * - READ/WRITE MULTIPLE (EXT): the same with blocks of the SET MULTIPLE count;
 * - READ/WRITE DMA (EXT): data moved by the channel's bus-master engine,
 *   INTRQ at completion.
 *
 * Addresses are LBA28, LBA48 (the EXT commands, HOB registers) or CHS through
 * the current translation. A range past the capacity aborts with IDNF; writes
 * to a read-only back end abort (ABRT); a back-end read failure reports UNC.
 * Anything else aborts (ERR, ABRT), as does DEVICE RESET (packet devices only).
 * Sectors are 512 bytes whatever the back end's logical sector size.
 *
 * Rate limits (a DiskThrottle: IOPS and bandwidth, io-limits.ts): a read or
 * write command whose limits are in debt is held with BSY set, before any
 * data moves, until the channel wakes the disk (`resumeHeld`); its cost (one
 * operation, all its sectors) is charged when it starts. A command that will
 * fail (out of range, read-only) is not held or charged.
 */
import { DiskError, type BlockDevice, type HostIoQueue } from "../../../storage/block-device.js";
import { buildIdentifyDevice, DEFAULT_HEADS, DEFAULT_SPT, MAX_MULTIPLE, type AtaIdentity } from "./identify.js";
import { IdeDevice, Pio, type DeviceHost, type DmaOutcome } from "./ide-device.js";
import type { FieldReader } from "./saved-fields.js";
import { ATA_SECTOR, CMD, DEV, ER, SETF, ST } from "./spec.js";
import type { DiskThrottle } from "../../io-limits.js";

/** What the current PIO DRQ blocks are for. */
const Job = { none: 0, identify: 1, read: 2, write: 3 } as const;
type Job = (typeof Job)[keyof typeof Job];

const READY = ST.drdy | ST.dsc;

/** What a rate limit holds: nothing, a PIO read or write command, a DMA command. */
const Held = { none: 0, pioRead: 1, pioWrite: 2, dma: 3 } as const;
type Held = (typeof Held)[keyof typeof Held];

export interface SavedAtaDisk {
  readonly multiCount: number;
  readonly writeCache: boolean;
  readonly lookAhead: boolean;
  readonly heads: number;
  readonly sectorsPerTrack: number;
  readonly mwdma: number;
  readonly udma: number;
  readonly standby: boolean;
  readonly job: number;
  readonly lba: number;
  readonly left: number;
  readonly blockSectors: number;
  readonly dmaLba: number;
  readonly dmaSectors: number;
  readonly dmaWrite: boolean;
  readonly lba48: boolean;
}

export class AtaDisk extends IdeDevice {
  readonly kind = "disk" as const;
  /** Capacity in 512-byte sectors. */
  readonly sectors: number;
  /** The most recent back-end failure (reported to the guest as a command error). */
  lastBackendError: unknown;
  /** Read and write commands a rate limit held (PARTIS_STATS). */
  throttled = 0;
  /** The command a rate limit holds now (BSY set until it starts). */
  private held: Held = Held.none;

  // Settings (power-on defaults; kept across SRST).
  multiCount = MAX_MULTIPLE;
  writeCache = true;
  lookAhead = true;
  heads = DEFAULT_HEADS;
  sectorsPerTrack = DEFAULT_SPT;
  mwdma = -1;
  udma = -1;
  standby = false;

  // PIO transfer in progress.
  private job: Job = Job.none;
  /** Next sector of the PIO transfer. */
  private lba = 0;
  /** Sectors left, the current block included. */
  private left = 0;
  /** Sectors in the current block. */
  private blockSectors = 0;
  private lba48 = false;

  // DMA transfer waiting for / running on the bus-master engine.
  private dmaLba = 0;
  private dmaSectors = 0;
  private dmaWrite = false;

  /**
   * @param stableWrites the disk's writes are stable when they complete (O_DSYNC: cache=writethrough,
   *   directsync): the drive powers on with its write cache off (IDENTIFY word 85) and adds no flushes.
   */
  constructor(
    unit: 0 | 1,
    host: DeviceHost,
    private readonly disk: BlockDevice,
    private readonly identity: AtaIdentity,
    private readonly stableWrites = false,
    /** The disk's rate limits (none: every command starts at once). */
    private readonly throttle: DiskThrottle | undefined = undefined,
  ) {
    super(unit, host, MAX_MULTIPLE * ATA_SECTOR);
    this.sectors = Math.floor(disk.size / ATA_SECTOR);
    this.writeCache = !stableWrites;
  }

  /** The guest turned the write cache off (SET FEATURES 0x82) on a disk whose writes are not stable by themselves. */
  private get flushEachWrite(): boolean {
    return !this.writeCache && !this.stableWrites;
  }

  get physicalSectorSize(): number {
    return this.disk.physicalSectorSize;
  }

  powerOn(): void {
    this.multiCount = MAX_MULTIPLE;
    this.writeCache = !this.stableWrites;
    this.lookAhead = true;
    this.heads = DEFAULT_HEADS;
    this.sectorsPerTrack = DEFAULT_SPT;
    this.mwdma = -1;
    this.udma = -1;
    this.standby = false;
  }

  completeReset(): void {
    this.cancelTransfer();
    this.setSignature(0x00, 0x00);
    this.status = READY;
  }

  /** Also forgets the command the transfer belonged to (a reset, SRST included, or a new command). */
  protected override cancelTransfer(): void {
    super.cancelTransfer();
    this.job = Job.none;
    this.held = Held.none;
  }

  /** Whether a read or write of `sectors` must wait for its limits: then it is held (BSY) and the channel asked to wake the disk; else its cost is charged. */
  private mustWait(write: boolean, sectors: number, what: Held): boolean {
    const t = this.throttle;
    if (t === undefined) return false;
    const wait = t.delay(write);
    if (wait === 0) {
      t.charge(write, sectors * ATA_SECTOR);
      return false;
    }
    this.held = what;
    this.status = ST.bsy;
    this.throttled++;
    t.waits++;
    this.host.wakeAfter(wait);
    return true;
  }

  override resumeHeld(force = false): number {
    const held = this.held;
    if (held === Held.none) return 0;
    const write = held === Held.pioWrite || (held === Held.dma && this.dmaWrite);
    const t = this.throttle!;
    if (!force) {
      const wait = t.delay(write);
      if (wait > 0) return wait;
    }
    this.held = Held.none;
    t.charge(write, (held === Held.dma ? this.dmaSectors : this.left) * ATA_SECTOR);
    this.status = READY;
    if (held === Held.dma) this.requestDma();
    else if (held === Held.pioRead) this.loadReadBlock();
    else this.startPio(Pio.out, Math.min(this.blockSectors, this.left) * ATA_SECTOR);
    return 0;
  }

  command(cmd: number): void {
    this.cancelTransfer();
    this.error = 0;
    switch (cmd) {
      case CMD.identify:
        buildIdentifyDevice(this.buffer, this.identity, this);
        this.job = Job.identify;
        this.startPio(Pio.in, ATA_SECTOR);
        this.raise();
        return;
      case CMD.readSectors:
      case CMD.readSectorsNoRetry:
        return this.startPioCommand(false, false, 1);
      case CMD.readSectorsExt:
        return this.startPioCommand(false, true, 1);
      case CMD.readMultiple:
        return this.startPioCommand(false, false, this.multiCount);
      case CMD.readMultipleExt:
        return this.startPioCommand(false, true, this.multiCount);
      case CMD.writeSectors:
      case CMD.writeSectorsNoRetry:
        return this.startPioCommand(true, false, 1);
      case CMD.writeSectorsExt:
        return this.startPioCommand(true, true, 1);
      case CMD.writeMultiple:
        return this.startPioCommand(true, false, this.multiCount);
      case CMD.writeMultipleExt:
        return this.startPioCommand(true, true, this.multiCount);
      case CMD.readDma:
      case CMD.readDmaNoRetry:
        return this.startDmaCommand(false, false);
      case CMD.readDmaExt:
        return this.startDmaCommand(false, true);
      case CMD.writeDma:
      case CMD.writeDmaNoRetry:
        return this.startDmaCommand(true, false);
      case CMD.writeDmaExt:
        return this.startDmaCommand(true, true);
      case CMD.readVerify:
      case CMD.readVerifyNoRetry:
      case CMD.readVerifyExt: {
        const r = this.range(cmd === CMD.readVerifyExt);
        if (r !== undefined) this.finish(r.lba + r.count - 1, cmd === CMD.readVerifyExt);
        return;
      }
      case CMD.seek: {
        const lba = this.address(false);
        if (lba === undefined || lba >= this.sectors) return this.abort(ER.idnf);
        return this.complete();
      }
      case CMD.setMultiple: {
        const n = this.nsect;
        if (n > MAX_MULTIPLE || (n & (n - 1)) !== 0) return this.abort(ER.abrt);
        this.multiCount = n;
        return this.complete();
      }
      case CMD.setFeatures:
        return this.setFeatures();
      case CMD.initializeParams: {
        const spt = this.nsect;
        if (spt === 0) return this.abort(ER.abrt);
        this.sectorsPerTrack = spt;
        this.heads = (this.device & 0x0f) + 1;
        return this.complete();
      }
      case CMD.flushCache:
      case CMD.flushCacheExt:
        if (!this.flush()) return this.abort(ER.abrt);
        return this.complete();
      case CMD.checkPowerMode:
        this.nsect = this.standby ? 0x00 : 0xff;
        return this.complete();
      case CMD.idle:
      case CMD.idleImmediate:
        this.standby = false;
        return this.complete();
      case CMD.standby:
      case CMD.standbyImmediate:
      case CMD.sleep:
        this.standby = true;
        return this.complete();
      default:
        if (cmd >= CMD.recalibrate && cmd <= CMD.recalibrate + 0x0f) return this.complete();
        return this.abort(ER.abrt);
    }
  }

  private setFeatures(): void {
    switch (this.feature) {
      case SETF.enableWriteCache:
        this.writeCache = true;
        return this.complete();
      case SETF.disableWriteCache:
        if (!this.flush()) return this.abort(ER.abrt);
        this.writeCache = false;
        return this.complete();
      case SETF.enableLookAhead:
        this.lookAhead = true;
        return this.complete();
      case SETF.disableLookAhead:
        this.lookAhead = false;
        return this.complete();
      case SETF.enableRevertDefaults:
      case SETF.disableRevertDefaults:
        return this.complete();
      case SETF.transferMode: {
        const mode = this.nsect;
        if (mode <= 0x01 || (mode >= 0x08 && mode <= 0x0c)) {
          // PIO default / flow-control modes 0-4: DMA settings stay as they are.
        } else if (mode >= 0x20 && mode <= 0x22) {
          this.mwdma = mode - 0x20;
          this.udma = -1;
        } else if (mode >= 0x40 && mode <= 0x45) {
          this.udma = mode - 0x40;
          this.mwdma = -1;
        } else return this.abort(ER.abrt);
        return this.complete();
      }
      default:
        return this.abort(ER.abrt);
    }
  }

  // Addressing -------------------------------------------------------------

  /** Starting sector from the registers, or undefined for an impossible CHS address. */
  private address(ext: boolean): number | undefined {
    if (ext)
      return (
        this.hobLbah * 2 ** 40 + this.hobLbam * 2 ** 32 + this.hobLbal * 2 ** 24 + ((this.lbah << 16) | (this.lbam << 8) | this.lbal)
      );
    if ((this.device & DEV.lba) !== 0) return (this.device & 0x0f) * 2 ** 24 + ((this.lbah << 16) | (this.lbam << 8) | this.lbal);
    const cyl = (this.lbah << 8) | this.lbam;
    const head = this.device & 0x0f;
    const sector = this.lbal;
    if (sector === 0 || sector > this.sectorsPerTrack || head >= this.heads) return undefined;
    return (cyl * this.heads + head) * this.sectorsPerTrack + sector - 1;
  }

  /** The command's sector range, or undefined after aborting with IDNF. */
  private range(ext: boolean): { lba: number; count: number } | undefined {
    const lba = this.address(ext);
    const count = ext ? ((this.hobNsect << 8) | this.nsect) || 0x1_0000 : this.nsect || 0x100;
    if (lba === undefined || lba + count > this.sectors) {
      this.abort(ER.idnf);
      return undefined;
    }
    return { lba, count };
  }

  // PIO --------------------------------------------------------------------

  private startPioCommand(write: boolean, ext: boolean, blockSectors: number): void {
    if (blockSectors === 0) return this.abort(ER.abrt); // multiple mode disabled
    if (write && this.disk.readOnly) return this.abort(ER.abrt);
    const r = this.range(ext);
    if (r === undefined) return;
    this.lba = r.lba;
    this.left = r.count;
    this.lba48 = ext;
    this.blockSectors = blockSectors;
    this.job = write ? Job.write : Job.read;
    this.standby = false;
    if (this.mustWait(write, r.count, write ? Held.pioWrite : Held.pioRead)) return;
    if (write) this.startPio(Pio.out, Math.min(blockSectors, this.left) * ATA_SECTOR);
    else this.loadReadBlock();
  }

  /** Read the next data-in block and offer it (INTRQ). */
  private loadReadBlock(): void {
    const n = Math.min(this.blockSectors, this.left);
    try {
      this.disk.read(this.lba * ATA_SECTOR, this.buffer.subarray(0, n * ATA_SECTOR));
    } catch (e) {
      this.lastBackendError = e;
      this.setLba(this.lba, this.lba48);
      return this.abort(ER.unc);
    }
    this.startPio(Pio.in, n * ATA_SECTOR);
    this.raise();
  }

  protected blockDone(): void {
    switch (this.job) {
      case Job.identify:
        this.job = Job.none;
        this.status = READY;
        return;
      case Job.read: {
        const n = Math.min(this.blockSectors, this.left);
        this.lba += n;
        this.left -= n;
        if (this.left > 0) return this.loadReadBlock();
        this.job = Job.none;
        this.setLba(this.lba - 1, this.lba48);
        this.status = READY; // no interrupt after the last data-in block
        return;
      }
      case Job.write: {
        const n = Math.min(this.blockSectors, this.left);
        try {
          this.disk.write(this.lba * ATA_SECTOR, this.buffer.subarray(0, n * ATA_SECTOR));
        } catch (e) {
          this.lastBackendError = e;
          this.setLba(this.lba, this.lba48);
          return this.abort(ER.abrt);
        }
        this.lba += n;
        this.left -= n;
        if (this.left > 0) {
          this.startPio(Pio.out, Math.min(this.blockSectors, this.left) * ATA_SECTOR);
          return this.raise();
        }
        this.job = Job.none;
        if (this.flushEachWrite && !this.flush()) return this.abort(ER.abrt);
        this.finish(this.lba - 1, this.lba48);
        return;
      }
      default:
        this.status = READY;
    }
  }

  // DMA --------------------------------------------------------------------

  private startDmaCommand(write: boolean, ext: boolean): void {
    if (write && this.disk.readOnly) return this.abort(ER.abrt);
    const r = this.range(ext);
    if (r === undefined) return;
    this.dmaLba = r.lba;
    this.dmaSectors = r.count;
    this.dmaWrite = write;
    this.lba48 = ext;
    this.standby = false;
    if (this.mustWait(write, r.count, Held.dma)) return;
    this.requestDma();
  }

  private requestDma(): void {
    this.dmaPending = true;
    this.status = READY | ST.drq;
    this.host.dmaRequest(this);
  }

  dmaLength(): number {
    return this.dmaSectors * ATA_SECTOR;
  }

  dmaToMemory(): boolean {
    return !this.dmaWrite;
  }

  dmaChunk(view: Uint8Array, offset: number): boolean {
    try {
      if (this.dmaWrite) this.disk.write(this.dmaLba * ATA_SECTOR + offset, view);
      else this.disk.read(this.dmaLba * ATA_SECTOR + offset, view);
      return true;
    } catch (e) {
      this.lastBackendError = e;
      return false;
    }
  }

  override dmaHost(addresses: Float64Array, lengths: Uint32Array, count: number): DmaOutcome | undefined {
    const disk = this.disk;
    const move = this.dmaWrite ? disk.writeHost : disk.readHost;
    if (move === undefined) return undefined;
    try {
      return move.call(disk, this.dmaLba * ATA_SECTOR, addresses, lengths, count) ? "done" : undefined;
    } catch (e) {
      this.lastBackendError = e;
      return "device-error";
    }
  }

  override dmaQueue(queue: HostIoQueue, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): DmaOutcome | "queued" | undefined {
    const disk = this.disk;
    if (disk.queueHost === undefined) return undefined;
    try {
      const r = disk.queueHost(queue, this.dmaWrite, this.dmaLba * ATA_SECTOR, addresses, lengths, count, token);
      return r === false ? undefined : r;
    } catch (e) {
      this.lastBackendError = e;
      return "device-error";
    }
  }

  override dmaQueueFailed(errno: number): DmaOutcome {
    const offset = this.dmaLba * ATA_SECTOR;
    this.lastBackendError = new DiskError("DISK_IO", `${this.dmaWrite ? "write" : "read"} of ${this.dmaLength()} bytes at ${offset} failed (errno ${errno})`, this.disk.path, { offset, errno });
    return "device-error";
  }

  dmaDone(outcome: DmaOutcome): void {
    if (outcome === "done") {
      if (this.dmaWrite && this.flushEachWrite && !this.flush()) return this.abort(ER.abrt);
      return this.finish(this.dmaLba + this.dmaSectors - 1, this.lba48);
    }
    this.abort(outcome === "device-error" && !this.dmaWrite ? ER.unc : ER.abrt);
  }

  // Completion -------------------------------------------------------------

  private flush(): boolean {
    try {
      this.disk.flush();
      return true;
    } catch (e) {
      this.lastBackendError = e;
      return false;
    }
  }

  /** Completion registers hold the last sector of the range (ATA-7 "normal outputs"). */
  private setLba(lba: number, ext: boolean): void {
    this.lbal = lba & 0xff;
    this.lbam = (lba >>> 8) & 0xff;
    this.lbah = (lba >>> 16) & 0xff;
    if (ext) {
      const high = Math.floor(lba / 2 ** 24);
      this.hobLbal = high & 0xff;
      this.hobLbam = (high >>> 8) & 0xff;
      this.hobLbah = (high >>> 16) & 0xff;
    } else if ((this.device & DEV.lba) !== 0) this.device = (this.device & 0xf0) | ((lba / 2 ** 24) & 0x0f);
  }

  private finish(lastLba: number, ext: boolean): void {
    if ((this.device & DEV.lba) !== 0 || ext) this.setLba(lastLba, ext);
    this.complete();
  }

  private complete(): void {
    this.cancelTransfer();
    this.error = 0;
    this.status = READY;
    this.raise();
  }

  private abort(error: number): void {
    this.cancelTransfer();
    this.error = error;
    this.status = READY | ST.err;
    this.raise();
  }

  saveDisk(): SavedAtaDisk {
    return {
      multiCount: this.multiCount,
      writeCache: this.writeCache,
      lookAhead: this.lookAhead,
      heads: this.heads,
      sectorsPerTrack: this.sectorsPerTrack,
      mwdma: this.mwdma,
      udma: this.udma,
      standby: this.standby,
      job: this.job,
      lba: this.lba,
      left: this.left,
      blockSectors: this.blockSectors,
      dmaLba: this.dmaLba,
      dmaSectors: this.dmaSectors,
      dmaWrite: this.dmaWrite,
      lba48: this.lba48,
    };
  }

  checkSaved(r: FieldReader, d: FieldReader | null): () => void {
    if (d === null) r.fail("no disk state for a disk");
    const base = this.checkDevice(r);
    const multiCount = d.int("multiCount", 0, MAX_MULTIPLE);
    if ((multiCount & (multiCount - 1)) !== 0) d.fail("multiple count is not a power of two");
    const writeCache = d.bool("writeCache");
    const lookAhead = d.bool("lookAhead");
    const heads = d.int("heads", 1, 16);
    const sectorsPerTrack = d.int("sectorsPerTrack", 1, 255);
    const mwdma = d.int("mwdma", -1, 2);
    const udma = d.int("udma", -1, 5);
    const standby = d.bool("standby");
    const job = d.int("job", 0, 3) as Job;
    const lba = d.int("lba", 0, this.sectors);
    const left = d.int("left", 0, 0x1_0000);
    const blockSectors = d.int("blockSectors", 0, MAX_MULTIPLE);
    const dmaLba = d.int("dmaLba", 0, this.sectors);
    const dmaSectors = d.int("dmaSectors", 0, 0x1_0000);
    const dmaWrite = d.bool("dmaWrite");
    const lba48 = d.bool("lba48");
    const expectPio = job === Job.none ? Pio.none : job === Job.write ? Pio.out : Pio.in;
    if (base.pio !== expectPio) d.fail("the PIO direction does not match the command");
    if (job === Job.identify && base.end !== ATA_SECTOR) d.fail("an IDENTIFY block that is not one sector");
    if (job === Job.read || job === Job.write) {
      if (blockSectors === 0 || left === 0 || lba + left > this.sectors) d.fail("a PIO transfer outside the disk");
      if (base.end !== Math.min(blockSectors, left) * ATA_SECTOR) d.fail("a PIO block of the wrong size");
    }
    if (base.dmaPending && (dmaSectors === 0 || dmaLba + dmaSectors > this.sectors)) d.fail("a DMA transfer outside the disk");
    return () => {
      base.apply();
      this.held = Held.none; // a saved disk holds nothing (save() starts a held command first)
      this.multiCount = multiCount;
      this.writeCache = writeCache;
      this.lookAhead = lookAhead;
      this.heads = heads;
      this.sectorsPerTrack = sectorsPerTrack;
      this.mwdma = mwdma;
      this.udma = udma;
      this.standby = standby;
      this.job = job;
      this.lba = lba;
      this.left = left;
      this.blockSectors = blockSectors;
      this.dmaLba = dmaLba;
      this.dmaSectors = dmaSectors;
      this.dmaWrite = dmaWrite;
      this.lba48 = lba48;
    };
  }
}
