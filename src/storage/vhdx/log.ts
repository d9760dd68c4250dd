/**
 * The VHDX log (MS-VHDX 2.3): a ring of entries, each a "loge" header plus
 * "desc"/"zero" descriptors in 4 KiB descriptor sectors, followed by one
 * "data" sector per data descriptor; CRC-32C over the whole entry.
 *
 * Reading: find the active sequence (2.3.3: newest sequence of valid,
 * consecutive entries whose head's tail lies inside it) and turn it into the
 * list of writes replay performs. The ring may wrap inside an entry (QEMU
 * writes entries that way), so entries are gathered sector by sector.
 *
 * Writing (VhdxLogWriter): every entry's tail is itself. That is sound
 * because the writer's user (vhdx-disk.ts) applies and flushes each entry's
 * updates before the next entry can become durable (the flush that precedes
 * every log write), so an older entry never needs replaying once a newer one
 * exists. When the next entry does not fit before the end of the ring the
 * disk first clears the header's LogGuid (which voids every older entry),
 * and the writer starts again at ring offset 0 under a new LogGuid that the
 * header names once that entry is stable: a torn entry can therefore never
 * damage the newest complete one, and the header never names a log with no
 * complete entry in it.
 */
import { DiskError } from "../block-device.js";
import { crc32cWithZeroField } from "./crc32c.js";
import { guidEquals, type Guid } from "./guid.js";
import type { VhdxHeader } from "./header.js";
import { KiB, MiB, TiB, type HostFile, type ReplayedWrite } from "./host-file.js";

export const LOG_SECTOR = 4 * KiB;
const ENTRY_SIGNATURE = 0x65676f6c; // "loge"
const DATA_DESC_SIGNATURE = 0x63736564; // "desc"
const ZERO_DESC_SIGNATURE = 0x6f72657a; // "zero"
const DATA_SECTOR_SIGNATURE = 0x61746164; // "data"
const HEADER_BYTES = 64;
const DESC_BYTES = 32;
/** Largest log this implementation reads into memory for replay. */
export const MAX_LOG_LENGTH = 256 * MiB;
/** No structure of a valid VHDX lies beyond this file offset (64 TiB payload plus metadata). */
export const MAX_FILE_OFFSET = 128 * TiB;

export interface LogEntry {
  readonly position: number;
  readonly length: number;
  readonly sequence: bigint;
  readonly tail: number;
  readonly flushedFileOffset: number;
  readonly lastFileOffset: number;
  readonly writes: readonly ReplayedWrite[];
}

export interface ActiveSequence {
  readonly entries: readonly LogEntry[];
  readonly head: LogEntry;
}

/** Where log descriptors may write: not the header section, not the log itself. */
export function descriptorTargetProblem(h: VhdxHeader, offset: number, length: number): string | undefined {
  if (offset % LOG_SECTOR !== 0 || length % LOG_SECTOR !== 0) return "is not 4 KiB aligned";
  if (offset < 192 * KiB) return "targets the header section";
  if (offset + length > MAX_FILE_OFFSET) return "targets an offset beyond any valid VHDX structure";
  if (offset < h.logOffset + h.logLength && h.logOffset < offset + length) return "targets the log itself";
  return undefined;
}

function sectorsForDescriptors(n: number): number {
  return Math.ceil((HEADER_BYTES + n * DESC_BYTES) / LOG_SECTOR);
}

/** Parse the entry at `pos` of the ring `log`; undefined when it is not a valid entry. */
export function parseEntry(log: Buffer, pos: number, h: VhdxHeader): LogEntry | undefined {
  const L = log.length;
  if (log.readUInt32LE(pos) !== ENTRY_SIGNATURE) return undefined;
  const length = log.readUInt32LE(pos + 8);
  if (length < LOG_SECTOR || length % LOG_SECTOR !== 0 || length > L) return undefined;
  const sectors = length / LOG_SECTOR;
  const entry = Buffer.alloc(length);
  for (let i = 0; i < sectors; i++) {
    const src = (pos + i * LOG_SECTOR) % L;
    log.copy(entry, i * LOG_SECTOR, src, src + LOG_SECTOR);
  }
  if (entry.readUInt32LE(4) !== crc32cWithZeroField(entry, 4, length)) return undefined;
  const tail = entry.readUInt32LE(12);
  const sequence = entry.readBigUInt64LE(16);
  const count = entry.readUInt32LE(24);
  if (tail % LOG_SECTOR !== 0 || tail >= L || sequence === 0n) return undefined;
  if (!guidEquals(entry.subarray(32, 48), h.logGuid)) return undefined;
  const flushed = entry.readBigUInt64LE(48);
  const last = entry.readBigUInt64LE(56);
  if (flushed > BigInt(MAX_FILE_OFFSET) || last > BigInt(MAX_FILE_OFFSET)) return undefined;
  const descSectors = sectorsForDescriptors(count);
  if (descSectors > sectors) return undefined;
  const writes: ReplayedWrite[] = [];
  let dataSector = descSectors;
  for (let d = 0; d < count; d++) {
    const o = HEADER_BYTES + d * DESC_BYTES;
    const sig = entry.readUInt32LE(o);
    if (entry.readBigUInt64LE(o + 24) !== sequence) return undefined;
    const fileOffset = entry.readBigUInt64LE(o + 16);
    if (fileOffset > BigInt(MAX_FILE_OFFSET)) return undefined;
    if (sig === ZERO_DESC_SIGNATURE) {
      const zl = entry.readBigUInt64LE(o + 8);
      if (zl > BigInt(MAX_FILE_OFFSET)) return undefined;
      if (descriptorTargetProblem(h, Number(fileOffset), Number(zl))) return undefined;
      writes.push({ offset: Number(fileOffset), length: Number(zl), data: undefined });
    } else if (sig === DATA_DESC_SIGNATURE) {
      if (dataSector >= sectors) return undefined;
      if (descriptorTargetProblem(h, Number(fileOffset), LOG_SECTOR)) return undefined;
      const s = entry.subarray(dataSector * LOG_SECTOR, (dataSector + 1) * LOG_SECTOR);
      dataSector++;
      if (s.readUInt32LE(0) !== DATA_SECTOR_SIGNATURE) return undefined;
      const seq = (BigInt(s.readUInt32LE(4)) << 32n) | BigInt(s.readUInt32LE(4092));
      if (seq !== sequence) return undefined;
      const data = Buffer.alloc(LOG_SECTOR);
      entry.copy(data, 0, o + 8, o + 16); // LeadingBytes
      s.copy(data, 8, 8, 4092);
      entry.copy(data, 4092, o + 4, o + 8); // TrailingBytes
      writes.push({ offset: Number(fileOffset), length: LOG_SECTOR, data });
    } else return undefined;
  }
  return { position: pos, length, sequence, tail, flushedFileOffset: Number(flushed), lastFileOffset: Number(last), writes };
}

/**
 * Scan the ring as MS-VHDX 2.3.3 describes and return the active sequence,
 * or undefined when there is none (the caller decides: corrupt file).
 */
export function findActiveSequence(log: Buffer, h: VhdxHeader): ActiveSequence | undefined {
  const L = log.length;
  let candidate: ActiveSequence | undefined;
  let tail = 0;
  let oldTail = 0;
  for (let guard = 0; guard <= L / LOG_SECTOR + 1; guard++) {
    const seq: LogEntry[] = [];
    let pos = tail;
    let covered = 0;
    while (covered < L) {
      const e = parseEntry(log, pos, h);
      if (!e) break;
      if (seq.length > 0 && e.sequence !== seq[seq.length - 1]!.sequence + 1n) break;
      seq.push(e);
      covered += e.length;
      pos = (pos + e.length) % L;
    }
    let valid = false;
    if (seq.length > 0) {
      const head = seq[seq.length - 1]!;
      const t = seq.findIndex((e) => e.position === head.tail);
      if (t >= 0) {
        valid = true;
        if (!candidate || head.sequence > candidate.head.sequence) candidate = { entries: seq.slice(t), head };
      }
    }
    tail = !valid ? (tail + LOG_SECTOR) % L : pos;
    if (tail <= oldTail) break;
    oldTail = tail;
  }
  return candidate;
}

/** Whether any sector of the ring starts an entry header carrying `guid` (valid or not). */
function anyEntryCarries(ring: Buffer, guid: Guid): boolean {
  for (let pos = 0; pos + LOG_SECTOR <= ring.length; pos += LOG_SECTOR) {
    if (ring.readUInt32LE(pos) === ENTRY_SIGNATURE && guidEquals(ring.subarray(pos + 32, pos + 48), guid)) return true;
  }
  return false;
}

/**
 * Read the log ring and find what replay must write. Undefined when no entry
 * in the ring carries the header's LogGuid at all: a writer named the log
 * and stopped before its first entry (QEMU's order, and Partis's before the
 * twelfth session), so nothing was logged and nothing applied under it;
 * there is nothing to replay. Throws when entries carry it but none forms a
 * valid sequence (a damaged log), or the log does not fit the file.
 */
export function readPendingLog(path: string, file: HostFile, h: VhdxHeader): ActiveSequence | undefined {
  if (h.logLength === 0) throw new DiskError("VHDX_BAD_LOG", "LogGuid is set but the log is empty (LogLength 0)", path);
  if (h.logLength > MAX_LOG_LENGTH) throw new DiskError("VHDX_BAD_LOG", `log length ${h.logLength} exceeds the supported ${MAX_LOG_LENGTH}`, path);
  const fileSize = file.statSize();
  if (h.logOffset + h.logLength > fileSize) throw new DiskError("VHDX_BAD_LOG", `log (offset ${h.logOffset}, length ${h.logLength}) extends past the end of the file (${fileSize} bytes)`, path);
  const ring = file.readBuffer(h.logOffset, h.logLength);
  const active = findActiveSequence(ring, h);
  if (!active) {
    if (!anyEntryCarries(ring, h.logGuid)) return undefined;
    throw new DiskError("VHDX_BAD_LOG", "the log needs replay (LogGuid is set) but holds no valid log sequence; the file is corrupt", path);
  }
  if (fileSize < active.head.flushedFileOffset) {
    throw new DiskError("VHDX_TRUNCATED", `file is ${fileSize} bytes but the log says ${active.head.flushedFileOffset} bytes were flushed: the file has been truncated`, path);
  }
  return active;
}

export function sequenceWrites(active: ActiveSequence): ReplayedWrite[] {
  return active.entries.flatMap((e) => e.writes);
}

/**
 * Replay onto the file (read-write open, check --repair). The caller has
 * already done the session header update (new FileWriteGuid) and clears the
 * LogGuid afterwards. Order: write every sector/zero range in sequence
 * order, extend to LastFileOffset, then flush before the header changes.
 */
export function replayOntoFile(file: HostFile, active: ActiveSequence): void {
  for (const w of sequenceWrites(active)) {
    if (w.data) file.write(w.offset, w.data);
    else file.writeZeros(w.offset, w.length);
  }
  if (file.statSize() < active.head.lastFileOffset) file.truncate(active.head.lastFileOffset);
  file.sync();
}

export interface SectorUpdate {
  /** File offset, 4 KiB aligned. */
  readonly offset: number;
  /** Exactly 4 KiB. */
  readonly data: Buffer;
}

export class VhdxLogWriter {
  private position = 0;
  private sequence = 1n;
  private guid: Guid | undefined;

  constructor(private readonly file: HostFile, readonly logOffset: number, readonly logLength: number) {}

  /** Most data sectors one entry can hold in this ring. */
  maxSectorsPerEntry(): number {
    const total = this.logLength / LOG_SECTOR;
    let n = total - 1;
    while (n > 0 && n + sectorsForDescriptors(n) > total) n--;
    return n;
  }

  /** Entries from now on carry `guid` (the caller names it in the header once the first is stable) and start at ring offset 0. */
  restart(guid: Guid): void {
    this.guid = guid;
    this.position = 0;
  }

  get active(): boolean {
    return this.guid !== undefined;
  }

  /** The LogGuid the entries carry now (undefined before the first restart). */
  get currentGuid(): Guid | undefined {
    return this.guid;
  }

  /** Whether an entry of n data sectors fits before the end of the ring. */
  fits(n: number): boolean {
    return this.position + (n + sectorsForDescriptors(n)) * LOG_SECTOR <= this.logLength;
  }

  /** Write one entry (not flushed: the caller flushes before applying). */
  append(updates: readonly SectorUpdate[], flushedFileOffset: number, lastFileOffset: number): void {
    if (!this.guid) throw new Error("VhdxLogWriter.append before restart()");
    const n = updates.length;
    const descSectors = sectorsForDescriptors(n);
    const length = (descSectors + n) * LOG_SECTOR;
    if (this.position + length > this.logLength) throw new Error("log entry does not fit; caller must restart the log");
    const seq = this.sequence++;
    const e = Buffer.alloc(length);
    e.writeUInt32LE(ENTRY_SIGNATURE, 0);
    e.writeUInt32LE(length, 8);
    e.writeUInt32LE(this.position, 12); // tail: this entry itself
    e.writeBigUInt64LE(seq, 16);
    e.writeUInt32LE(n, 24);
    this.guid.copy(e, 32);
    e.writeBigUInt64LE(BigInt(flushedFileOffset), 48);
    e.writeBigUInt64LE(BigInt(lastFileOffset), 56);
    updates.forEach((u, i) => {
      const o = HEADER_BYTES + i * DESC_BYTES;
      e.writeUInt32LE(DATA_DESC_SIGNATURE, o);
      u.data.copy(e, o + 4, 4092, 4096); // TrailingBytes
      u.data.copy(e, o + 8, 0, 8); // LeadingBytes
      e.writeBigUInt64LE(BigInt(u.offset), o + 16);
      e.writeBigUInt64LE(seq, o + 24);
      const s = (descSectors + i) * LOG_SECTOR;
      e.writeUInt32LE(DATA_SECTOR_SIGNATURE, s);
      e.writeUInt32LE(Number(seq >> 32n), s + 4);
      u.data.copy(e, s + 8, 8, 4092);
      e.writeUInt32LE(Number(seq & 0xffffffffn), s + 4092);
    });
    e.writeUInt32LE(crc32cWithZeroField(e, 4), 4);
    this.file.write(this.logOffset + this.position, e);
    // No wrap to 0 here: the next entry restarts the ring with a new LogGuid instead (see fits()).
    this.position += length;
  }
}
