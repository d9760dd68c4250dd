/**
 * VhdxDisk: a VHDX file (fixed, dynamic or differencing) as a BlockDevice.
 *
 * Write ordering (crash safety). Payload data is written in place, never
 * through the log. Metadata (BAT entries, sector bitmap sectors) changes in
 * memory and is committed as a transaction, on flush(), on close() and when
 * enough is pending:
 *   1. fdatasync: payload data, newly allocated blocks and bitmap blocks and
 *      the file extension are stable, and so are the previous transaction's
 *      applied sectors (which step 2 supersedes in the log);
 *   2. write the log entry (tail = itself), fdatasync; when the entry starts
 *      a new log (the first of the session, or the ring is full), it carries
 *      a new LogGuid that the header names only now, once the entry is
 *      stable (a header update, which syncs);
 *   3. write the same sectors to their final places (made stable by the
 *      next step 1, or by close).
 * A crash after 2 replays the entry at the next open; before 2, the
 * un-flushed writes are lost but every BAT entry still points at data it
 * owned. The header never names a LogGuid before an entry carrying it is
 * stable, so no crash leaves a LogGuid with nothing to replay behind it
 * (QEMU's writer can; the reader takes that state as an empty log, and a
 * torn entry under a named LogGuid as a damaged one). Before a full ring starts again at
 * offset 0, the header's LogGuid is cleared (everything logged so far is
 * applied and stable after step 1), so a torn new entry can never expose an
 * older, half-overwritten sequence to replay. Headers are never logged: the
 * first change of a session updates both header copies (new FileWriteGuid,
 * new DataWriteGuid); a clean close commits, flushes and clears LogGuid with
 * another update.
 * New blocks are allocated at the 1 MiB-aligned end of the file (fresh,
 * zero-filled space), never reused, so a stale BAT entry cannot expose
 * another block's data.
 */
import * as nodePath from "node:path";
import { DiskError, type AllocationExtent, type AllocationState, type BlockDevice, type DiskType, type HostIoQueue, type OpenOptions, spanTotal } from "../block-device.js";
import { resolveParentPath, verifyParent } from "../chain.js";
import { describeDisk, openDisk } from "../open.js";
import { LayerRouting } from "../layer-routing.js";
import { RawDisk } from "../raw.js";
import {
  PAYLOAD_BLOCK_FULLY_PRESENT,
  PAYLOAD_BLOCK_PARTIALLY_PRESENT,
  PAYLOAD_BLOCK_UNDEFINED,
  PAYLOAD_BLOCK_UNMAPPED,
  PAYLOAD_BLOCK_ZERO,
  SB_BLOCK_PRESENT,
  SECTOR_BITMAP_BLOCK_SIZE,
} from "./bat.js";
import { guidEquals, guidFromString, guidIsZero, guidToString, newGuid, ZERO_GUID, type Guid } from "./guid.js";
import { MiB } from "./host-file.js";
import { VhdxImage, type HeaderChanges } from "./image.js";
import { LOG_SECTOR, MAX_FILE_OFFSET, VhdxLogWriter, type SectorUpdate } from "./log.js";
import { locatorValue, MAX_VIRTUAL_SIZE } from "./metadata.js";
import { chainLocators, linkageString } from "./parent.js";

const MAX_CHAIN_DEPTH = 256;
/** Real paths of VHDX files being opened (guard against locator loops). */
const opening: string[] = [];

/** Test hook: stop a commit as a crash would, after the log entry is durable (and its LogGuid in the header), or before the header names a new log's LogGuid. */
export interface CommitFault {
  readonly afterLogWrite?: boolean;
  readonly afterLogEntry?: boolean;
}

export class VhdxDisk implements BlockDevice {
  readonly format = "vhdx" as const;
  readonly type: DiskType;
  readonly size: number;
  readonly logicalSectorSize: number;
  readonly physicalSectorSize: number;
  readonly readOnly: boolean;
  readonly parent: BlockDevice | undefined;
  /** Resolved parent path (differencing, when opened with its parent). */
  readonly parentPath: string | undefined;

  private readonly img: VhdxImage;
  /** Guest-RAM transfers straight to this file's payload extents or to the parent (none while a replay overlay patches reads). */
  private readonly routing: LayerRouting;
  private readonly log: VhdxLogWriter | undefined;
  private fileEnd: number;
  private closed = false;
  private renewed = { file: false, data: false };
  private readonly pendingBat = new Set<number>();
  private readonly bitmaps = new Map<number, Buffer>();
  private readonly freshBitmaps = new Set<number>();
  private readonly pendingBitmap = new Map<number, Set<number>>();
  /** Test hook (see CommitFault). */
  fault: CommitFault | undefined;
  /** cache=unsafe: guest flushes neither commit nor sync (metadata still commits through the log when enough is pending, and at close). */
  private readonly ignoreFlush: boolean;

  private constructor(img: VhdxImage, readOnly: boolean, parent: BlockDevice | undefined, parentPath: string | undefined, ignoreFlush = false) {
    this.img = img;
    this.ignoreFlush = ignoreFlush;
    const m = img.metadata;
    this.type = m.hasParent ? "differencing" : m.leaveBlocksAllocated ? "fixed" : "dynamic";
    this.size = m.virtualSize;
    this.logicalSectorSize = m.logicalSectorSize;
    this.physicalSectorSize = m.physicalSectorSize;
    this.readOnly = readOnly;
    this.parent = parent;
    this.parentPath = parentPath;
    this.fileEnd = Math.ceil(img.file.size() / MiB) * MiB;
    const h = img.header;
    this.log = readOnly || h.logLength === 0 ? undefined : new VhdxLogWriter(img.file, h.logOffset, h.logLength);
    const fd = img.file.directDescriptor;
    this.routing = new LayerRouting(
      fd === undefined ? undefined : RawDisk.payloadOf(img.path, fd, readOnly, img.file.directIo),
      (offset, length) => this.payloadAt(offset, length),
      (offset, length) => this.parentHolding(offset, length),
      () => this.beginChange(true),
    );
    // A replay at open already took the session's new FileWriteGuid.
    this.renewed.file = img.logReplayNeeded && !readOnly;
  }

  get path(): string {
    return this.img.path;
  }

  /** Identity a differencing child records as parent_linkage. */
  get dataWriteGuid(): Guid {
    return this.img.header.dataWriteGuid;
  }

  get blockSize(): number {
    return this.img.metadata.blockSize;
  }

  /** The image (for describe/check/resize within this folder). */
  get image(): VhdxImage {
    return this.img;
  }

  static open(path: string, options: OpenOptions & { lenient?: boolean } = {}): VhdxDisk {
    const readOnly = options.readOnly === true;
    const real = nodePath.resolve(path);
    if (opening.includes(real) || opening.length >= MAX_CHAIN_DEPTH) {
      throw new DiskError("CHAIN_LOOP", `differencing chain loops back to ${real} or is deeper than ${MAX_CHAIN_DEPTH}`, path);
    }
    const img = VhdxImage.open(path, readOnly, options.lenient === true, { direct: options.direct === true, writeThrough: options.writeThrough === true });
    let parent: BlockDevice | undefined;
    let parentPath: string | undefined;
    try {
      if (img.metadata.hasParent && options.noParent !== true) {
        if (!readOnly && img.header.logLength === 0) throw new DiskError("VHDX_NO_LOG", "file has no log, so it can only be opened read-only", path);
        opening.push(real);
        try {
          parentPath = resolveParentPath(path, chainLocators(img.metadata.parentLocator));
          parent = openDisk(parentPath, { readOnly: true, direct: options.direct === true });
        } finally {
          opening.pop();
        }
        try {
          VhdxDisk.checkLinkage(img, path, parentPath, parent);
          if (parent.logicalSectorSize !== img.metadata.logicalSectorSize) {
            throw new DiskError("VHDX_PARENT_SECTOR_SIZE", `logical sector size ${img.metadata.logicalSectorSize} differs from parent ${parentPath} (${parent.logicalSectorSize})`, path);
          }
        } catch (e) {
          parent.close();
          throw e;
        }
      }
      if (!readOnly && img.header.logLength === 0) throw new DiskError("VHDX_NO_LOG", "file has no log, so it can only be opened read-only", path);
    } catch (e) {
      img.close();
      throw e;
    }
    return new VhdxDisk(img, readOnly, parent, parentPath, options.ignoreFlush === true);
  }

  /** Remarks on how the file runs (O_DIRECT asked for and refused). */
  get notes(): readonly string[] {
    return this.img.file.notes;
  }

  /** The parent's identity must be parent_linkage (or parent_linkage2). */
  private static checkLinkage(img: VhdxImage, path: string, parentPath: string, parent: BlockDevice): void {
    const loc = img.metadata.parentLocator;
    const expected = locatorValue(loc, "parent_linkage") ?? "";
    const expected2 = locatorValue(loc, "parent_linkage2");
    const actual = parent instanceof VhdxDisk ? linkageString(parent.dataWriteGuid) : describeDisk(parentPath).uniqueId;
    const same = (a: string | undefined, b: string | undefined): boolean => {
      const ga = a === undefined ? undefined : guidFromString(a);
      const gb = b === undefined ? undefined : guidFromString(b);
      return ga !== undefined && gb !== undefined && guidEquals(ga, gb);
    };
    if (same(expected, actual) || same(expected2, actual)) return;
    verifyParent(path, parentPath, { expectedId: expected2 ? `${expected} or ${expected2}` : expected, actualId: actual });
  }

  // ---- BlockDevice ----

  read(offset: number, buf: Uint8Array): void {
    this.checkRange("read", offset, buf.length);
    this.forEachBlock(offset, buf.length, (block, inBlock, at, len) => this.readInBlock(block, inBlock, buf.subarray(at, at + len)));
  }

  write(offset: number, buf: Uint8Array): void {
    this.checkWritable();
    this.checkRange("write", offset, buf.length);
    if (buf.length === 0) return;
    this.beginChange(true);
    this.forEachBlock(offset, buf.length, (block, inBlock, at, len) => this.writeInBlock(block, inBlock, buf.subarray(at, at + len)));
    if (this.pendingSectorCount() >= this.commitThreshold()) this.commit();
  }

  flush(): void {
    this.checkOpen();
    if (this.readOnly || this.ignoreFlush) return;
    if (!this.commit()) this.img.file.sync();
  }

  discard(offset: number, length: number): void {
    this.checkWritable();
    this.checkRange("discard", offset, length);
    const m = this.img.metadata;
    if (m.leaveBlocksAllocated && !m.hasParent) return;
    const bs = m.blockSize;
    const first = Math.ceil(offset / bs);
    const end = offset + length === this.size ? Math.ceil(this.size / bs) : Math.floor((offset + length) / bs);
    for (let b = first; b < end; b++) {
      const idx = this.img.geometry.payloadIndex(b);
      const st = this.img.bat.state(idx);
      if (st === PAYLOAD_BLOCK_UNMAPPED || st === PAYLOAD_BLOCK_ZERO) continue;
      this.beginChange(true);
      // The block's file space is left behind (compact reclaims it); reads return zeros.
      this.setBat(idx, PAYLOAD_BLOCK_UNMAPPED, 0);
    }
    if (this.pendingSectorCount() >= this.commitThreshold()) this.commit();
  }

  allocation(offset: number, length: number): AllocationExtent[] {
    this.checkRange("allocation", offset, length);
    const out: AllocationExtent[] = [];
    const push = (o: number, l: number, state: AllocationState): void => {
      const last = out[out.length - 1];
      if (last && last.state === state && last.offset + last.length === o) out[out.length - 1] = { offset: last.offset, length: last.length + l, state };
      else out.push({ offset: o, length: l, state });
    };
    this.forEachBlock(offset, length, (block, inBlock, at, len) => {
      const st = this.img.bat.state(this.img.geometry.payloadIndex(block));
      const base = offset + at;
      if (st === PAYLOAD_BLOCK_FULLY_PRESENT) push(base, len, "allocated");
      else if (st === PAYLOAD_BLOCK_ZERO || st === PAYLOAD_BLOCK_UNMAPPED) push(base, len, "zero");
      else if (st === PAYLOAD_BLOCK_PARTIALLY_PRESENT) {
        this.forEachSectorRun(block, inBlock, len, (present, runAt, runLen) => push(base + runAt, runLen, present ? "allocated" : "unallocated"));
      } else push(base, len, "unallocated");
    });
    return out;
  }

  close(): void {
    if (this.closed) return;
    try {
      if (!this.readOnly) {
        this.commit();
        this.img.file.sync();
        // Everything applied is stable: the log is empty from here on.
        if (this.log?.active) {
          this.img.updateHeader({ logGuid: ZERO_GUID });
          this.img.updateHeader({});
        }
      }
    } finally {
      this.closed = true;
      this.routing.close();
      this.img.close();
      this.parent?.close();
    }
  }

  // ---- guest RAM in place (virtio-blk, IDE bus-master DMA) ----
  //
  // The common cases go straight between guest RAM and the file, as for a raw
  // image (one preadv/pwritev, or queued on the device's io_uring): a range
  // whose every sector is this layer's (fully present blocks, or partially
  // present ones with the range's bits set) in blocks that follow each other
  // in the file, and, for reads, a range a differencing disk's parent holds
  // entirely. Everything else answers false, having done nothing, and the
  // caller takes the block-by-block path above: allocation, bits to set,
  // ranges mixing this layer's sectors and the parent's, zero and unmapped
  // blocks. A write that goes straight to the file changes no metadata (its
  // block is already allocated and its BAT entry already written or pending
  // in the same transaction), so flush() and the log's ordering cover it as
  // they cover the synchronous path.

  readHost(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    const length = spanTotal(lengths, count);
    this.checkRange("read", offset, length);
    return this.routing.readHost(offset, length, addresses, lengths, count);
  }

  writeHost(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    this.checkWritable();
    const length = spanTotal(lengths, count);
    this.checkRange("write", offset, length);
    return this.routing.writeHost(offset, length, addresses, lengths, count);
  }

  queueHost(queue: HostIoQueue, write: boolean, offset: number, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): "done" | "queued" | false {
    if (write) this.checkWritable();
    const length = spanTotal(lengths, count);
    this.checkRange(write ? "write" : "read", offset, length);
    return this.routing.queueHost(queue, write, offset, length, addresses, lengths, count, token);
  }

  /** An fsync on the queue when no metadata is pending (else flush() commits it, synchronously). */
  queueFlush(queue: HostIoQueue, token: number): boolean {
    if (this.closed || this.readOnly || this.ignoreFlush || this.metadataPending()) return false;
    return this.routing.queueFlush(queue, token);
  }

  /** BAT or sector-bitmap changes not yet committed through the log. */
  private metadataPending(): boolean {
    return this.pendingBat.size !== 0 || this.pendingBitmap.size !== 0 || this.freshBitmaps.size !== 0;
  }

  /**
   * The file offset of `offset` when every sector of [offset, offset+length)
   * is this layer's (fully present blocks, or partially present ones whose
   * sector bitmap has the range's bits set) and the blocks follow each other
   * in the file; -1 otherwise.
   */
  private payloadAt(offset: number, length: number): number {
    const { geometry: geo, bat } = this.img;
    const bs = geo.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    let base = -1;
    for (let b = first; b <= last; b++) {
      const i = geo.payloadIndex(b);
      const st = bat.state(i);
      if (st !== PAYLOAD_BLOCK_FULLY_PRESENT && (st !== PAYLOAD_BLOCK_PARTIALLY_PRESENT || !this.sectorsAre(true, b, offset, length))) return -1;
      if (b === first) base = bat.offset(i);
      else if (bat.offset(i) !== base + (b - first) * bs) return -1;
    }
    return base + (offset - first * bs);
  }

  /**
   * The parent, when this layer holds none of [offset, offset+length)
   * (NOT_PRESENT or UNDEFINED blocks, or partially present ones whose bitmap
   * has the range's bits clear) and the parent holds all of it.
   */
  private parentHolding(offset: number, length: number): BlockDevice | undefined {
    const p = this.parent;
    if (p === undefined || offset + length > p.size) return undefined;
    const { geometry: geo, bat } = this.img;
    const last = Math.floor((offset + length - 1) / geo.blockSize);
    for (let b = Math.floor(offset / geo.blockSize); b <= last; b++) {
      const st = bat.state(geo.payloadIndex(b));
      if (st > PAYLOAD_BLOCK_UNDEFINED && (st !== PAYLOAD_BLOCK_PARTIALLY_PRESENT || !this.sectorsAre(false, b, offset, length))) return undefined;
    }
    return p;
  }

  /** Whether every sector bit of block `block` within [offset, offset+length) is `present`. */
  private sectorsAre(present: boolean, block: number, offset: number, length: number): boolean {
    const geo = this.img.geometry;
    const ls = this.logicalSectorSize;
    const start = Math.max(offset, block * geo.blockSize);
    const end = Math.min(offset + length, (block + 1) * geo.blockSize);
    const bitmap = this.bitmap(Math.floor(block / geo.chunkRatio));
    const base = ((block % geo.chunkRatio) * geo.blockSize) / ls - block * (geo.blockSize / ls);
    const to = base + Math.ceil(end / ls);
    const whole = present ? 0xff : 0;
    for (let bit = base + Math.floor(start / ls); bit < to; ) {
      if ((bit & 7) === 0 && bit + 8 <= to) {
        if (bitmap[bit >>> 3] !== whole) return false;
        bit += 8;
      } else {
        if (((bitmap[bit >>> 3]! & (1 << (bit & 7))) !== 0) !== present) return false;
        bit++;
      }
    }
    return true;
  }

  // ---- reads ----

  private readInBlock(block: number, inBlock: number, out: Uint8Array): void {
    const idx = this.img.geometry.payloadIndex(block);
    const st = this.img.bat.state(idx);
    const virt = block * this.img.metadata.blockSize + inBlock;
    if (st === PAYLOAD_BLOCK_FULLY_PRESENT) this.img.file.read(this.img.bat.offset(idx) + inBlock, out);
    else if (st === PAYLOAD_BLOCK_ZERO || st === PAYLOAD_BLOCK_UNMAPPED) out.fill(0);
    else if (st === PAYLOAD_BLOCK_PARTIALLY_PRESENT) {
      const fileOff = this.img.bat.offset(idx);
      this.forEachSectorRun(block, inBlock, out.length, (present, at, len) => {
        const part = out.subarray(at, at + len);
        if (present) this.img.file.read(fileOff + inBlock + at, part);
        else this.readParent(virt + at, part);
      });
    } else this.readParent(virt, out);
  }

  /** NOT_PRESENT / UNDEFINED data: the parent's, or zeros (also past the parent's end). */
  private readParent(virt: number, out: Uint8Array): void {
    const p = this.parent;
    if (!p || virt >= p.size) {
      out.fill(0);
      return;
    }
    const n = Math.min(out.length, p.size - virt);
    p.read(virt, out.subarray(0, n));
    out.fill(0, n);
  }

  /** Runs of present/absent sectors of a PARTIALLY_PRESENT block over [inBlock, inBlock+len). */
  private forEachSectorRun(block: number, inBlock: number, len: number, fn: (present: boolean, at: number, len: number) => void): void {
    const geo = this.img.geometry;
    const ls = this.logicalSectorSize;
    const bitmap = this.bitmap(Math.floor(block / geo.chunkRatio));
    const base = ((block % geo.chunkRatio) * geo.blockSize) / ls;
    let at = 0;
    while (at < len) {
      const sector = Math.floor((inBlock + at) / ls);
      const bit = base + sector;
      const present = (bitmap[bit >>> 3]! & (1 << (bit & 7))) !== 0;
      let end = Math.min(len, (sector + 1) * ls - inBlock);
      let s = sector + 1;
      while (end < len) {
        const b2 = base + s;
        if (((bitmap[b2 >>> 3]! & (1 << (b2 & 7))) !== 0) !== present) break;
        end = Math.min(len, (s + 1) * ls - inBlock);
        s++;
      }
      fn(present, at, end - at);
      at = end;
    }
  }

  private bitmap(chunk: number): Buffer {
    let b = this.bitmaps.get(chunk);
    if (!b) {
      const idx = this.img.geometry.bitmapIndex(chunk);
      b = Buffer.alloc(SECTOR_BITMAP_BLOCK_SIZE);
      if (this.img.bat.state(idx) === SB_BLOCK_PRESENT) this.img.file.read(this.img.bat.offset(idx), b);
      this.bitmaps.set(chunk, b);
    }
    return b;
  }

  // ---- writes ----

  private writeInBlock(block: number, inBlock: number, data: Uint8Array): void {
    const img = this.img;
    const idx = img.geometry.payloadIndex(block);
    const st = img.bat.state(idx);
    const bs = img.metadata.blockSize;
    if (st === PAYLOAD_BLOCK_FULLY_PRESENT) {
      img.file.write(img.bat.offset(idx) + inBlock, data);
      return;
    }
    if (st === PAYLOAD_BLOCK_PARTIALLY_PRESENT) {
      this.writeSectors(block, img.bat.offset(idx), inBlock, data);
      return;
    }
    const wholeBlock = inBlock === 0 && (data.length === bs || block * bs + data.length === this.size);
    // Block contents read as zeros (no parent, ZERO, UNMAPPED) or are all overwritten: fully present.
    const zeroBased = !img.metadata.hasParent || st === PAYLOAD_BLOCK_ZERO || st === PAYLOAD_BLOCK_UNMAPPED;
    const fileOff = this.allocate(bs);
    if (zeroBased || wholeBlock) {
      img.file.write(fileOff + inBlock, data);
      this.setBat(idx, PAYLOAD_BLOCK_FULLY_PRESENT, fileOff);
    } else {
      this.ensureBitmapBlock(Math.floor(block / img.geometry.chunkRatio));
      this.setBat(idx, PAYLOAD_BLOCK_PARTIALLY_PRESENT, fileOff);
      this.writeSectors(block, fileOff, inBlock, data);
    }
  }

  /** Write into a PARTIALLY_PRESENT block: whole sectors (edges merged with current data), then set their bits. */
  private writeSectors(block: number, fileOff: number, inBlock: number, data: Uint8Array): void {
    const ls = this.logicalSectorSize;
    const start = Math.floor(inBlock / ls) * ls;
    const end = Math.ceil((inBlock + data.length) / ls) * ls;
    let out: Uint8Array = data;
    if (start !== inBlock || end !== inBlock + data.length) {
      const merged = Buffer.alloc(end - start);
      this.readInBlock(block, start, merged.subarray(0, ls));
      if (end - ls > start) this.readInBlock(block, end - ls, merged.subarray(end - start - ls));
      merged.set(data, inBlock - start);
      out = merged;
    }
    this.img.file.write(fileOff + start, out);
    const geo = this.img.geometry;
    const chunk = Math.floor(block / geo.chunkRatio);
    const bitmap = this.bitmap(chunk);
    const base = ((block % geo.chunkRatio) * geo.blockSize) / ls;
    let dirty = this.pendingBitmap.get(chunk);
    if (!dirty) this.pendingBitmap.set(chunk, (dirty = new Set()));
    for (let s = start / ls; s < end / ls; s++) {
      const bit = base + s;
      const mask = 1 << (bit & 7);
      if (!(bitmap[bit >>> 3]! & mask)) {
        bitmap[bit >>> 3] = bitmap[bit >>> 3]! | mask;
        dirty.add(bit >>> 15); // 4 KiB of bitmap = 32768 bits
      }
    }
  }

  private ensureBitmapBlock(chunk: number): void {
    const idx = this.img.geometry.bitmapIndex(chunk);
    if (this.img.bat.state(idx) === SB_BLOCK_PRESENT) return;
    const off = this.allocate(SECTOR_BITMAP_BLOCK_SIZE);
    this.bitmaps.set(chunk, Buffer.alloc(SECTOR_BITMAP_BLOCK_SIZE));
    this.freshBitmaps.add(chunk);
    this.setBat(idx, SB_BLOCK_PRESENT, off);
  }

  /** Fresh space at the end of the file (zero-filled by the extension). */
  allocate(bytes: number): number {
    const off = this.fileEnd;
    if (off + bytes > MAX_FILE_OFFSET) throw new DiskError("VHDX_FILE_TOO_LARGE", "file would grow past the largest offset a VHDX may use", this.path);
    this.fileEnd += bytes;
    this.img.file.truncate(this.fileEnd);
    return off;
  }

  private setBat(index: number, state: number, fileOffset: number): void {
    this.img.bat.set(index, state, fileOffset);
    this.pendingBat.add(Math.floor((index * 8) / LOG_SECTOR));
  }

  // ---- transactions ----

  private pendingSectorCount(): number {
    let n = this.pendingBat.size;
    for (const s of this.pendingBitmap.values()) n += s.size;
    return n;
  }

  private commitThreshold(): number {
    return Math.max(1, Math.floor((this.log?.maxSectorsPerEntry() ?? 1) / 2));
  }

  /**
   * Commit pending metadata through the log (ordering in the module
   * comment). Returns false when nothing was pending.
   */
  commit(): boolean {
    if (this.readOnly || !this.metadataPending()) return false;
    const img = this.img;
    const updates: SectorUpdate[] = [];
    for (const chunk of this.freshBitmaps) {
      // Unreferenced until the BAT entry commits: written directly, like payload.
      img.file.write(img.bat.offset(img.geometry.bitmapIndex(chunk)), this.bitmaps.get(chunk)!);
      this.pendingBitmap.delete(chunk);
    }
    for (const [chunk, sectors] of this.pendingBitmap) {
      const b = this.bitmaps.get(chunk)!;
      const base = img.bat.offset(img.geometry.bitmapIndex(chunk));
      for (const s of [...sectors].sort((x, y) => x - y)) updates.push({ offset: base + s * LOG_SECTOR, data: Buffer.from(b.subarray(s * LOG_SECTOR, (s + 1) * LOG_SECTOR)) });
    }
    for (const s of [...this.pendingBat].sort((x, y) => x - y)) {
      updates.push({ offset: img.regions.bat.fileOffset + s * LOG_SECTOR, data: Buffer.from(img.bat.bytes.subarray(s * LOG_SECTOR, (s + 1) * LOG_SECTOR)) });
    }
    this.freshBitmaps.clear();
    this.pendingBitmap.clear();
    this.pendingBat.clear();
    this.logAndApply(updates);
    return true;
  }

  /** Steps 1-3 of the module comment, split into entries that fit the log. */
  logAndApply(updates: readonly SectorUpdate[]): void {
    const log = this.log!;
    const max = log.maxSectorsPerEntry();
    if (updates.length === 0) {
      this.img.file.sync();
      return;
    }
    for (let i = 0; i < updates.length; i += max) {
      const group = updates.slice(i, i + max);
      this.img.file.sync(); // 1
      const fresh = !log.active || !log.fits(group.length);
      if (fresh) this.startNewLog();
      const size = this.img.file.statSize();
      log.append(group, Math.floor(size / MiB) * MiB, Math.ceil(Math.max(size, this.fileEnd) / MiB) * MiB);
      this.img.file.sync(); // 2
      if (this.fault?.afterLogEntry) throw new DiskError("VHDX_TEST_FAULT", "commit stopped after the log entry, before the header names it (test fault)", this.path);
      if (fresh) this.img.updateHeader({ logGuid: log.currentGuid! }); // 2: the entry is stable, now the header names its log
      if (this.fault?.afterLogWrite) throw new DiskError("VHDX_TEST_FAULT", "commit stopped after the log write (test fault)", this.path);
      for (const u of group) this.img.file.write(u.offset, u.data); // 3
    }
  }

  /**
   * A new log, at ring offset 0, under a new LogGuid the header does not name
   * yet (step 2 names it). A header still naming the old one is cleared first:
   * everything logged under it is applied and stable (step 1), and the new
   * entry is about to overwrite its entries.
   */
  private startNewLog(): void {
    if (!guidIsZero(this.img.header.logGuid)) this.img.updateHeader({ logGuid: ZERO_GUID });
    this.log!.restart(newGuid());
  }

  /**
   * First modification of the session: both header copies get a new
   * FileWriteGuid (and DataWriteGuid when user-visible data changes),
   * before anything else in the file changes. The LogGuid comes with the
   * session's first log entry (logAndApply).
   */
  beginChange(dataChange: boolean): void {
    if (this.renewed.file && (this.renewed.data || !dataChange)) return;
    const changes: HeaderChanges = {};
    if (!this.renewed.file) changes.fileWriteGuid = newGuid();
    if (dataChange && !this.renewed.data) changes.dataWriteGuid = newGuid();
    if (Object.keys(changes).length === 0) return;
    this.img.updateHeader(changes);
    this.img.updateHeader({});
    this.renewed.file = true;
    if (dataChange) this.renewed.data = true;
  }

  // ---- helpers ----

  private forEachBlock(offset: number, length: number, fn: (block: number, inBlock: number, at: number, len: number) => void): void {
    const bs = this.img.metadata.blockSize;
    let at = 0;
    while (at < length) {
      const pos = offset + at;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const len = Math.min(length - at, bs - inBlock);
      fn(block, inBlock, at, len);
      at += len;
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new DiskError("DISK_CLOSED", "disk is closed", this.path);
  }

  private checkWritable(): void {
    this.checkOpen();
    if (this.readOnly) throw new DiskError("DISK_READ_ONLY", "disk is open read-only", this.path);
  }

  private checkRange(op: string, offset: number, length: number): void {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new DiskError("DISK_OUT_OF_RANGE", `${op} of ${length} bytes at ${offset} is outside the ${this.size}-byte disk`, this.path, { offset, length });
    }
  }
}

export function describeGuid(g: Guid): string {
  return guidToString(g);
}

export { MAX_VIRTUAL_SIZE };
