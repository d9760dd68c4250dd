/**
 * An ATAPI CD/DVD-ROM drive (ATA/ATAPI-7 PACKET feature set, MMC-3 commands)
 * reading 2048-byte blocks from an ISO image (a read-only BlockDevice; the
 * drive may be empty).
 *
 * ATA side: signature 14h/EBh after reset (ATA-7 9.12), IDENTIFY PACKET
 * DEVICE, PACKET, DEVICE RESET, SET FEATURES (transfer mode), CHECK POWER
 * MODE, IDLE/STANDBY/SLEEP; IDENTIFY DEVICE and READ SECTORS abort with the
 * signature in place (how hosts tell a packet device from a disk); anything
 * else aborts.
 *
 * PACKET protocol (ATA-7 vol 2, 11.8-11.9): the command asks for the 12-byte
 * packet with DRQ (CoD=1, IO=0) and no interrupt (accelerated DRQ). Data-in
 * goes by PIO in DRQ blocks no longer than the host's byte count limit (the
 * LBA Mid/High registers at PACKET time), the actual count written back there
 * with IO=1 and an interrupt per block, or by bus-master DMA when Features bit
 * 0 was set. Completion reports IO=1, CoD=1, Status DRDY, with ERR and the
 * sense key in Error bits 7:4 for CHECK CONDITION.
 *
 * Packet commands: TEST UNIT READY, REQUEST SENSE, INQUIRY, MODE SENSE(10),
 * START STOP UNIT (eject/load opens/closes the virtual tray), PREVENT ALLOW
 * MEDIUM REMOVAL, READ CAPACITY, READ(10), READ(12), SEEK(10), READ TOC,
 * GET CONFIGURATION, GET EVENT STATUS NOTIFICATION (polled), READ DISC
 * INFORMATION, READ TRACK INFORMATION, SET CD SPEED, MECHANISM STATUS.
 * Others report ILLEGAL REQUEST / invalid command operation code; media
 * commands without a medium report NOT READY / medium not present; a medium
 * change posts UNIT ATTENTION / medium may have changed and a GESN media event.
 */
import type { BlockDevice } from "../../../storage/block-device.js";
import { buildIdentifyPacket, type AtaIdentity } from "./identify.js";
import { IdeDevice, Pio, type DeviceHost, type DmaOutcome } from "./ide-device.js";
import * as mmc from "./mmc-responses.js";
import type { FieldReader } from "./saved-fields.js";
import { ASC, CD_SECTOR, CMD, ER, IREASON, SCSI, SENSE, SETF, ST } from "./spec.js";

/** Blocks the PIO buffer holds (64 KiB). */
const BUFFER_BLOCKS = 32;
const SENSE_ABORTED_COMMAND = 0x0b;

const Job = { none: 0, identify: 1, packet: 2, data: 3 } as const;
type Job = (typeof Job)[keyof typeof Job];

/** GESN media event codes. */
const MEDIA_EVENT = { none: 0, newMedia: 2, removal: 3 } as const;

export interface SavedAtapiCdrom {
  readonly trayOpen: boolean;
  readonly locked: boolean;
  readonly senseKey: number;
  readonly senseAsc: number;
  readonly unitAttention: boolean;
  readonly mediaEvent: number;
  readonly mwdma: number;
  readonly udma: number;
  readonly job: number;
  readonly limit: number;
  readonly dmaMode: boolean;
  readonly cursor: number;
  readonly fill: number;
  readonly diskLba: number;
  readonly diskBlocksLeft: number;
  readonly dmaFromDisk: boolean;
  readonly dmaBytes: number;
  readonly dmaLba: number;
}

export class AtapiCdrom extends IdeDevice implements mmc.DiscState {
  readonly kind = "cdrom" as const;
  /** The most recent back-end failure (reported to the guest as MEDIUM ERROR). */
  lastBackendError: unknown;

  trayOpen = false;
  locked = false;
  senseKey: number = SENSE.none;
  senseAsc: number = ASC.none;
  unitAttention = false;
  private mediaEvent: number = MEDIA_EVENT.none;
  mwdma = -1;
  udma = -1;

  private readonly cdb = new Uint8Array(12);
  private job: Job = Job.none;
  /** Byte count limit from LBA Mid/High at PACKET time. */
  private limit = 0;
  /** Features bit 0 at PACKET time: data by DMA. */
  private dmaMode = false;
  /** Data-in: next undelivered byte in the buffer, and valid bytes there. */
  private cursor = 0;
  private fill = 0;
  /** Data-in from the disc: next block to load and blocks not loaded yet. */
  private diskLba = 0;
  private diskBlocksLeft = 0;
  // DMA data-in.
  private dmaFromDisk = false;
  private dmaBytes = 0;
  private dmaLba = 0;

  constructor(
    unit: 0 | 1,
    host: DeviceHost,
    private disc: BlockDevice | undefined,
    private readonly identity: AtaIdentity,
  ) {
    super(unit, host, BUFFER_BLOCKS * CD_SECTOR);
  }

  // DiscState ------------------------------------------------------------------

  get medium(): boolean {
    return this.disc !== undefined && !this.trayOpen;
  }
  get blocks(): number {
    return this.disc === undefined ? 0 : Math.floor(this.disc.size / CD_SECTOR);
  }
  get dvd(): boolean {
    return this.blocks > mmc.CD_MAX_BLOCKS;
  }

  /** Insert (a BlockDevice) or remove (undefined) the disc, as a host-side media change. */
  changeMedium(disc: BlockDevice | undefined): void {
    this.disc = disc;
    this.trayOpen = false;
    if (disc !== undefined) {
      this.unitAttention = true;
      this.mediaEvent = MEDIA_EVENT.newMedia;
    } else this.mediaEvent = MEDIA_EVENT.removal;
  }

  // ATA side -------------------------------------------------------------------

  powerOn(): void {
    this.mwdma = -1;
    this.udma = -1;
    this.locked = false;
    this.trayOpen = false;
    this.senseKey = SENSE.none;
    this.senseAsc = ASC.none;
    this.unitAttention = false;
    this.mediaEvent = MEDIA_EVENT.none;
  }

  completeReset(): void {
    this.cancelTransfer();
    this.setSignature(0x14, 0xeb);
    this.status = 0; // DRDY stays clear after reset for packet devices
  }

  /** Also forgets the command the transfer belonged to (a reset, SRST included, or a new command). */
  protected override cancelTransfer(): void {
    super.cancelTransfer();
    this.job = Job.none;
  }

  command(cmd: number): void {
    this.cancelTransfer();
    switch (cmd) {
      case CMD.packet:
        if ((this.feature & 0x02) !== 0) return this.ataAbort(); // overlapped commands are not supported
        this.dmaMode = (this.feature & 0x01) !== 0;
        this.limit = (this.lbah << 8) | this.lbam;
        this.job = Job.packet;
        this.nsect = IREASON.cod;
        this.error = 0;
        this.status = ST.drdy;
        this.startPio(Pio.out, 12);
        return;
      case CMD.identifyPacket:
        buildIdentifyPacket(this.buffer, this.identity, this);
        this.job = Job.identify;
        this.error = 0;
        this.status = ST.drdy;
        this.startPio(Pio.in, 512);
        this.raise();
        return;
      case CMD.identify:
      case CMD.readSectors:
      case CMD.readSectorsNoRetry:
        // A packet device aborts these with its signature in place (ATA-7 6.17).
        this.nsect = 1;
        this.lbal = 1;
        this.lbam = 0x14;
        this.lbah = 0xeb;
        return this.ataAbort();
      case CMD.deviceReset:
        this.completeReset();
        return;
      case CMD.setFeatures: {
        if (this.feature !== SETF.transferMode) return this.ataComplete();
        const mode = this.nsect;
        if (mode <= 0x01 || (mode >= 0x08 && mode <= 0x0c)) return this.ataComplete();
        if (mode >= 0x20 && mode <= 0x22) {
          this.mwdma = mode - 0x20;
          this.udma = -1;
        } else if (mode >= 0x40 && mode <= 0x45) {
          this.udma = mode - 0x40;
          this.mwdma = -1;
        } else return this.ataAbort();
        return this.ataComplete();
      }
      case CMD.checkPowerMode:
        this.nsect = 0xff;
        return this.ataComplete();
      case CMD.idle:
      case CMD.idleImmediate:
      case CMD.standby:
      case CMD.standbyImmediate:
      case CMD.sleep:
        return this.ataComplete();
      default:
        return this.ataAbort();
    }
  }

  private ataComplete(): void {
    this.cancelTransfer();
    this.error = 0;
    this.status = ST.drdy;
    this.raise();
  }

  private ataAbort(): void {
    this.cancelTransfer();
    this.error = ER.abrt;
    this.status = ST.drdy | ST.err;
    this.raise();
  }

  protected blockDone(): void {
    switch (this.job) {
      case Job.identify:
        this.job = Job.none;
        this.status = ST.drdy;
        return;
      case Job.packet:
        this.job = Job.none;
        this.cdb.set(this.buffer.subarray(0, 12));
        this.execute();
        return;
      case Job.data:
        this.nextPioBlock();
        return;
      default:
        this.status = ST.drdy;
    }
  }

  // Packet completion ----------------------------------------------------------

  private good(): void {
    this.cancelTransfer();
    this.senseKey = SENSE.none;
    this.senseAsc = ASC.none;
    this.error = 0;
    this.nsect = IREASON.io | IREASON.cod;
    this.status = ST.drdy;
    this.raise();
  }

  private check(key: number, asc: number): void {
    this.cancelTransfer();
    this.senseKey = key;
    this.senseAsc = asc;
    this.error = (key << 4) | (key === SENSE.illegalRequest || key === SENSE_ABORTED_COMMAND ? ER.abrt : 0);
    this.nsect = IREASON.io | IREASON.cod;
    this.status = ST.drdy | ST.err;
    this.raise();
  }

  private notReady(): void {
    this.check(SENSE.notReady, this.trayOpen ? ASC.noMediumTrayOpen : ASC.noMediumTrayClosed);
  }

  // Data-in --------------------------------------------------------------------

  /** Send buffer[0, min(length, alloc)) to the host. */
  private sendBuffer(length: number, alloc: number): void {
    const n = Math.min(length, alloc);
    if (n <= 0) return this.good();
    if (this.dmaMode) return this.startDma(false, n, 0);
    this.job = Job.data;
    this.cursor = 0;
    this.fill = n;
    this.diskBlocksLeft = 0;
    this.nextPioBlock();
  }

  /** Send `count` blocks of the disc from `lba` (already range-checked). */
  private sendBlocks(lba: number, count: number): void {
    if (count === 0) return this.good();
    if (this.dmaMode) return this.startDma(true, count * CD_SECTOR, lba);
    this.job = Job.data;
    this.cursor = 0;
    this.fill = 0;
    this.diskLba = lba;
    this.diskBlocksLeft = count;
    this.nextPioBlock();
  }

  /** Offer the next PIO DRQ block, loading blocks from the disc as the buffer empties, or complete. */
  private nextPioBlock(): void {
    if (this.cursor >= this.fill) {
      if (this.diskBlocksLeft === 0) return this.good();
      const n = Math.min(this.diskBlocksLeft, BUFFER_BLOCKS);
      if (!this.readDisc(this.diskLba, this.buffer.subarray(0, n * CD_SECTOR))) return;
      this.diskLba += n;
      this.diskBlocksLeft -= n;
      this.cursor = 0;
      this.fill = n * CD_SECTOR;
    }
    // The byte count limit: 0 and FFFFh mean "as much as possible"; blocks that are not the last stay even.
    let limit = this.limit & 0xfffe;
    if (limit === 0 || this.limit === 0xffff) limit = 0xfffe;
    const count = Math.min(this.fill - this.cursor, limit);
    this.lbam = count & 0xff;
    this.lbah = (count >>> 8) & 0xff;
    this.nsect = IREASON.io;
    this.job = Job.data;
    this.status = ST.drdy;
    this.startPioAt(Pio.in, this.cursor, this.cursor + count);
    this.cursor += count;
    this.raise();
  }

  private readDisc(lba: number, into: Uint8Array): boolean {
    const disc = this.disc;
    if (disc === undefined || this.trayOpen) {
      this.notReady();
      return false;
    }
    try {
      disc.read(lba * CD_SECTOR, into);
      return true;
    } catch (e) {
      this.lastBackendError = e;
      this.check(SENSE.mediumError, ASC.unrecoveredRead);
      return false;
    }
  }

  private startDma(fromDisk: boolean, bytes: number, lba: number): void {
    this.dmaFromDisk = fromDisk;
    this.dmaBytes = bytes;
    this.dmaLba = lba;
    this.dmaPending = true;
    this.nsect = IREASON.io;
    this.status = ST.drdy | ST.drq;
    this.host.dmaRequest(this);
  }

  dmaLength(): number {
    return this.dmaBytes;
  }

  dmaToMemory(): boolean {
    return true;
  }

  dmaChunk(view: Uint8Array, offset: number): boolean {
    if (!this.dmaFromDisk) {
      view.set(this.buffer.subarray(offset, offset + view.length));
      return true;
    }
    const disc = this.disc;
    if (disc === undefined) return false;
    try {
      disc.read(this.dmaLba * CD_SECTOR + offset, view);
      return true;
    } catch (e) {
      this.lastBackendError = e;
      return false;
    }
  }

  dmaDone(outcome: DmaOutcome): void {
    if (outcome === "done") return this.good();
    if (outcome === "device-error") return this.check(SENSE.mediumError, ASC.unrecoveredRead);
    this.check(SENSE_ABORTED_COMMAND, ASC.none);
  }

  // Packet commands ------------------------------------------------------------

  private execute(): void {
    const c = this.cdb;
    const op = c[0]!;
    const b = this.buffer;
    if (this.unitAttention && op !== SCSI.inquiry && op !== SCSI.requestSense && op !== SCSI.getEventStatus && op !== SCSI.getConfiguration) {
      this.unitAttention = false;
      return this.check(SENSE.unitAttention, ASC.mediumChanged);
    }
    switch (op) {
      case SCSI.testUnitReady:
        return this.medium ? this.good() : this.notReady();
      case SCSI.requestSense: {
        let key = this.senseKey;
        let asc = this.senseAsc;
        if (this.unitAttention) {
          this.unitAttention = false;
          key = SENSE.unitAttention;
          asc = ASC.mediumChanged;
        }
        const n = mmc.senseData(b, key, asc);
        return this.sendBuffer(n, c[4]!);
      }
      case SCSI.inquiry: {
        const alloc = (c[3]! << 8) | c[4]!;
        if ((c[1]! & 0x01) !== 0) {
          const n = mmc.inquiryVpd(b, c[2]!, this.identity.serial);
          if (n < 0) return this.check(SENSE.illegalRequest, ASC.invalidField);
          return this.sendBuffer(n, alloc);
        }
        if (c[2]! !== 0) return this.check(SENSE.illegalRequest, ASC.invalidField);
        const product = this.identity.model.startsWith("PARTIS ") ? this.identity.model.slice(7) : this.identity.model;
        return this.sendBuffer(mmc.inquiryStandard(b, "PARTIS", product, this.identity.firmware), alloc);
      }
      case SCSI.modeSense10: {
        const pc = c[2]! >>> 6;
        if (pc === 3) return this.check(SENSE.illegalRequest, ASC.savingNotSupported);
        if (c[3]! !== 0) return this.check(SENSE.illegalRequest, ASC.invalidField);
        const n = mmc.modeSense10(b, c[2]! & 0x3f, pc, this);
        if (n < 0) return this.check(SENSE.illegalRequest, ASC.invalidField);
        return this.sendBuffer(n, (c[7]! << 8) | c[8]!);
      }
      case SCSI.startStopUnit: {
        const loej = (c[4]! & 0x02) !== 0;
        const start = (c[4]! & 0x01) !== 0;
        if (loej && !start) {
          if (this.locked) return this.check(SENSE.illegalRequest, ASC.removalPrevented);
          if (!this.trayOpen && this.disc !== undefined) this.mediaEvent = MEDIA_EVENT.removal;
          this.trayOpen = true;
        } else if (loej && start && this.trayOpen) {
          this.trayOpen = false;
          if (this.disc !== undefined) {
            this.unitAttention = true;
            this.mediaEvent = MEDIA_EVENT.newMedia;
          }
        }
        return this.good();
      }
      case SCSI.preventAllow:
        this.locked = (c[4]! & 0x01) !== 0;
        return this.good();
      case SCSI.readCapacity: {
        if (!this.medium) return this.notReady();
        const last = Math.max(0, this.blocks - 1);
        b[0] = (last >>> 24) & 0xff;
        b[1] = (last >>> 16) & 0xff;
        b[2] = (last >>> 8) & 0xff;
        b[3] = last & 0xff;
        b[4] = 0;
        b[5] = 0;
        b[6] = CD_SECTOR >>> 8;
        b[7] = 0;
        return this.sendBuffer(8, 8);
      }
      case SCSI.read10:
      case SCSI.read12: {
        if (!this.medium) return this.notReady();
        const lba = ((c[2]! << 24) | (c[3]! << 16) | (c[4]! << 8) | c[5]!) >>> 0;
        const count = op === SCSI.read10 ? (c[7]! << 8) | c[8]! : ((c[6]! << 24) | (c[7]! << 16) | (c[8]! << 8) | c[9]!) >>> 0;
        if (lba + count > this.blocks) return this.check(SENSE.illegalRequest, ASC.lbaOutOfRange);
        return this.sendBlocks(lba, count);
      }
      case SCSI.seek10: {
        if (!this.medium) return this.notReady();
        const lba = ((c[2]! << 24) | (c[3]! << 16) | (c[4]! << 8) | c[5]!) >>> 0;
        if (lba >= this.blocks) return this.check(SENSE.illegalRequest, ASC.lbaOutOfRange);
        return this.good();
      }
      case SCSI.readToc: {
        if (!this.medium) return this.notReady();
        let format = c[2]! & 0x0f;
        if (format === 0) format = c[9]! >>> 6; // SFF-8020 placed the format in the control byte
        const n = mmc.readToc(b, format, (c[1]! & 0x02) !== 0, c[6]!, this);
        if (n < 0) return this.check(SENSE.illegalRequest, ASC.invalidField);
        return this.sendBuffer(n, (c[7]! << 8) | c[8]!);
      }
      case SCSI.getConfiguration: {
        const rt = c[1]! & 0x03;
        if (rt === 3) return this.check(SENSE.illegalRequest, ASC.invalidField);
        const n = mmc.getConfiguration(b, rt, (c[2]! << 8) | c[3]!, this);
        return this.sendBuffer(n, (c[7]! << 8) | c[8]!);
      }
      case SCSI.getEventStatus: {
        if ((c[1]! & 0x01) === 0) return this.check(SENSE.illegalRequest, ASC.invalidField); // asynchronous mode
        const classes = c[4]!;
        const n = mmc.eventStatus(b, classes, this.mediaEvent, this);
        if ((classes & 0x10) !== 0) this.mediaEvent = MEDIA_EVENT.none;
        return this.sendBuffer(n, (c[7]! << 8) | c[8]!);
      }
      case SCSI.readDiscInfo:
        if (!this.medium) return this.notReady();
        if ((c[1]! & 0x07) !== 0) return this.check(SENSE.illegalRequest, ASC.invalidField);
        return this.sendBuffer(mmc.discInformation(b), (c[7]! << 8) | c[8]!);
      case SCSI.readTrackInfo: {
        if (!this.medium) return this.notReady();
        const number = ((c[2]! << 24) | (c[3]! << 16) | (c[4]! << 8) | c[5]!) >>> 0;
        const n = mmc.trackInformation(b, c[1]! & 0x03, number, this);
        if (n < 0) return this.check(SENSE.illegalRequest, ASC.invalidField);
        return this.sendBuffer(n, (c[7]! << 8) | c[8]!);
      }
      case SCSI.setCdSpeed:
        return this.good();
      case SCSI.mechanismStatus:
        return this.sendBuffer(mmc.mechanismStatus(b, this), (c[8]! << 8) | c[9]!);
      default:
        return this.check(SENSE.illegalRequest, ASC.invalidOpcode);
    }
  }

  saveCdrom(): SavedAtapiCdrom {
    return {
      trayOpen: this.trayOpen,
      locked: this.locked,
      senseKey: this.senseKey,
      senseAsc: this.senseAsc,
      unitAttention: this.unitAttention,
      mediaEvent: this.mediaEvent,
      mwdma: this.mwdma,
      udma: this.udma,
      job: this.job,
      limit: this.limit,
      dmaMode: this.dmaMode,
      cursor: this.cursor,
      fill: this.fill,
      diskLba: this.diskLba,
      diskBlocksLeft: this.diskBlocksLeft,
      dmaFromDisk: this.dmaFromDisk,
      dmaBytes: this.dmaBytes,
      dmaLba: this.dmaLba,
    };
  }

  protected override stagedBytes(): number {
    let n = super.stagedBytes();
    if (this.job === Job.data) n = Math.max(n, this.fill);
    if (this.dmaPending && !this.dmaFromDisk) n = Math.max(n, this.dmaBytes);
    return n;
  }

  checkSaved(r: FieldReader, c: FieldReader | null): () => void {
    if (c === null) r.fail("no CD-ROM state for a CD-ROM");
    const base = this.checkDevice(r);
    const trayOpen = c.bool("trayOpen");
    const locked = c.bool("locked");
    const senseKey = c.int("senseKey", 0, 0x0f);
    const senseAsc = c.int("senseAsc", 0, 0xffff);
    const unitAttention = c.bool("unitAttention");
    const mediaEvent = c.int("mediaEvent", 0, 3);
    const mwdma = c.int("mwdma", -1, 2);
    const udma = c.int("udma", -1, 5);
    const job = c.int("job", 0, 3) as Job;
    const limit = c.int("limit", 0, 0xffff);
    const dmaMode = c.bool("dmaMode");
    const fill = c.int("fill", 0, this.buffer.length);
    const cursor = c.int("cursor", 0, fill);
    const diskLba = c.int("diskLba", 0, 2 ** 33);
    const diskBlocksLeft = c.int("diskBlocksLeft", 0, 2 ** 32);
    const dmaFromDisk = c.bool("dmaFromDisk");
    const dmaBytes = c.int("dmaBytes", 0, 2 ** 44);
    const dmaLba = c.int("dmaLba", 0, 2 ** 32);
    const expectPio = job === Job.none ? Pio.none : job === Job.packet ? Pio.out : Pio.in;
    if (base.pio !== expectPio) c.fail("the PIO direction does not match the phase");
    if (job === Job.identify && base.end !== 512) c.fail("an IDENTIFY block that is not 512 bytes");
    if (job === Job.packet && base.end !== 12) c.fail("a packet that is not 12 bytes");
    if (job === Job.data && (base.end !== cursor || base.end === 0)) c.fail("a data block that does not end at the cursor");
    if (job === Job.data && base.buffered < fill) c.fail("staged data missing from the buffer");
    if (base.dmaPending && (dmaBytes === 0 || (!dmaFromDisk && dmaBytes > base.buffered))) c.fail("an impossible DMA transfer");
    return () => {
      base.apply();
      this.trayOpen = trayOpen;
      this.locked = locked;
      this.senseKey = senseKey;
      this.senseAsc = senseAsc;
      this.unitAttention = unitAttention;
      this.mediaEvent = mediaEvent;
      this.mwdma = mwdma;
      this.udma = udma;
      this.job = job;
      this.limit = limit;
      this.dmaMode = dmaMode;
      this.cursor = cursor;
      this.fill = fill;
      this.diskLba = diskLba;
      this.diskBlocksLeft = diskBlocksLeft;
      this.dmaFromDisk = dmaFromDisk;
      this.dmaBytes = dmaBytes;
      this.dmaLba = dmaLba;
    };
  }
}
