/**
 * An open VHD (fixed, dynamic or differencing) as a BlockDevice.
 *
 * Reads go per block through the BAT, then per run of sectors through the
 * block's sector bitmap: set bits read this file, clear bits read the parent
 * (differencing) or zeros (dynamic). Writes allocate blocks at the end of the
 * file, where the footer is, and move the footer behind them.
 *
 * Crash ordering (DEVNOTE). The rule: metadata that makes data visible (a
 * sector bitmap bit, a BAT entry) reaches the file only after that data is
 * durable, so a crash at any point leaves a readable image in which every
 * write completed before the last flush() reads back, and nothing that was
 * visible before is replaced by garbage.
 *  1. Allocating block B: its place is the current end footer position E
 *     (data rounded up to 4 KiB). The footer is first written at the new end
 *     (pwrite past EOF: the file grows and the block's data area is a hole
 *     that reads as zeros). The BAT entry and the new bitmap stay in memory.
 *  2. Data is written into the block (partial sectors whose bit is clear are
 *     completed from the parent or zeros first). Bits are set in memory.
 *  3. flush():  write the bitmaps of blocks allocated since the last flush
 *     (they are not referenced yet) -> fdatasync (data + new bitmaps durable)
 *     -> write changed bitmaps of older blocks, the dirty BAT sectors, and the
 *     end footer if it was missing -> fdatasync.
 * A crash before the second fdatasync leaves the on-disk BAT/bitmaps as of
 * the previous flush: unflushed writes are lost, flushed ones read back. A
 * block allocated but never published is space between the last referenced
 * block and the end footer; check reports it and --repair trims it. A torn
 * or missing end footer is tolerated on open (the copy at offset 0 is used
 * and the end recomputed); check --repair writes it back.
 * close() flushes. Fixed disks write in place; flush() is one fdatasync.
 *
 * discard is a no-op (documented hint): clearing bits would expose the
 * parent in a differencing disk and QEMU ignores bitmaps on read.
 */
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { DiskError, spanTotal, type AllocationExtent, type AllocationState, type BlockDevice, type DiskType, type HostIoQueue, type OpenOptions } from "../block-device.js";
import { MAX_CHAIN_DEPTH, resolveParentPath, verifyParent } from "../chain.js";
import { describeDisk, openDisk } from "../open.js";
import { LayerRouting } from "../layer-routing.js";
import { DirectIo, openFileForDisk, preadFully, pwriteFully, RawDisk } from "../raw.js";
import { loadLayout, type VhdLayout } from "./layout.js";
import {
  BAT_UNALLOCATED,
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  SECTOR,
  alignUp,
  bitIsSet,
  encodeFooter,
  formatUniqueId,
  runEnd,
  setBits,
  vhdTimestamp,
  type VhdFooter,
} from "./spec.js";

/** Options the VHD driver passes down a chain (the paths already open, child first). */
export interface VhdOpenOptions extends OpenOptions {
  readonly ancestry?: readonly string[];
}

/** Data of a new block starts on this boundary (page cache and O_DIRECT friendly). */
const DATA_ALIGNMENT = 4096;
const MAX_CACHED_BITMAPS = 8192;

function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

export class VhdDisk implements BlockDevice {
  readonly path: string;
  readonly format = "vhd" as const;
  readonly type: Extract<DiskType, "fixed" | "dynamic" | "differencing">;
  readonly size: number;
  readonly logicalSectorSize = SECTOR;
  readonly physicalSectorSize = SECTOR;
  readonly readOnly: boolean;
  readonly parent: BlockDevice | undefined;
  /** Footer unique ID (8-4-4-4-12 hex, stored byte order). */
  readonly uniqueId: string;
  readonly footer: VhdFooter;
  /** Remarks from open: tolerated damage, parent time stamp differences. */
  readonly warnings: string[];
  readonly blockSize: number;

  private readonly fd: number;
  /** Guest-RAM transfers straight to a block's data area in this file, or to the parent. */
  private readonly routing: LayerRouting;
  private readonly bat: Uint32Array;
  private readonly batOffset: number;
  private readonly bitmapSize: number;
  private readonly bitmaps = new Map<number, Uint8Array>();
  private readonly dirtyBitmaps = new Set<number>();
  private readonly newBlocks = new Set<number>();
  private readonly dirtyBat = new Set<number>();
  private endOffset: number;
  private endFooterValid: boolean;
  private readonly footerBytes: Uint8Array;
  private closed = false;
  /** O_DIRECT (cache=none, directsync): every read and write of this class through its bounce buffer; payload straight (routing). */
  private readonly directIo: DirectIo | undefined;
  /** cache=unsafe: flushes (the guest's, close's) publish metadata in order but never fdatasync. */
  private readonly ignoreFlush: boolean;
  /** Why O_DIRECT was asked for and is not in use, and similar remarks. */
  readonly notes: readonly string[];

  private constructor(path: string, fd: number, layout: VhdLayout, readOnly: boolean, parent: BlockDevice | undefined, warnings: string[], cache: OpenedCache = { direct: undefined, ignoreFlush: false, notes: [] }) {
    this.path = path;
    this.fd = fd;
    this.directIo = cache.direct;
    this.ignoreFlush = cache.ignoreFlush;
    this.notes = cache.notes;
    this.routing = new LayerRouting(
      RawDisk.payloadOf(path, fd, readOnly, cache.direct),
      (offset, length) => this.payloadAt(offset, length),
      (offset, length) => this.parentHolding(offset, length),
    );
    this.footer = layout.footer;
    this.type = layout.footer.diskType === DISK_TYPE_FIXED ? "fixed" : layout.footer.diskType === DISK_TYPE_DYNAMIC ? "dynamic" : "differencing";
    this.size = layout.footer.currentSize;
    this.readOnly = readOnly;
    this.parent = parent;
    this.uniqueId = formatUniqueId(layout.footer.uniqueId);
    this.warnings = warnings;
    this.bat = layout.bat;
    this.batOffset = layout.header?.tableOffset ?? 0;
    this.bitmapSize = layout.bitmapSize;
    this.blockSize = layout.header?.blockSize ?? 0;
    this.endOffset = layout.endOffset;
    this.endFooterValid = layout.endFooter.state === "ok";
    this.footerBytes = encodeFooter(layout.footer);
  }

  static open(path: string, options: VhdOpenOptions = {}): VhdDisk {
    const readOnly = options.readOnly === true;
    let fd: number;
    try {
      fd = fs.openSync(path, readOnly ? "r" : "r+");
    } catch (e) {
      throw new DiskError("DISK_OPEN_FAILED", `cannot open: ${(e as Error).message}`, path);
    }
    let parent: BlockDevice | undefined;
    try {
      const layout = loadLayout(path, fd);
      const warnings = [...layout.notes];
      let cache: (OpenedCache & { readonly fd: number }) | undefined;
      if (options.direct === true || options.writeThrough === true || options.ignoreFlush === true) {
        // The layout is read buffered (its footer may sit at an unaligned end); the disk then runs on a descriptor with the cache mode's flags.
        cache = openCached(path, readOnly, options);
        fs.closeSync(fd);
        fd = cache.fd;
      }
      if (layout.footer.diskType === DISK_TYPE_DIFFERENCING && options.noParent !== true) {
        const ancestry = [...(options.ancestry ?? []), nodePath.resolve(path)];
        const parentPath = resolveParentPath(path, layout.locators);
        if (ancestry.includes(nodePath.resolve(parentPath)) || ancestry.length >= MAX_CHAIN_DEPTH) {
          throw new DiskError("CHAIN_LOOP", `differencing chain loops back to ${parentPath} or is deeper than ${MAX_CHAIN_DEPTH}`, path);
        }
        const parentOptions: VhdOpenOptions = { readOnly: true, direct: options.direct === true, ancestry };
        parent = openDisk(parentPath, parentOptions);
        const parentId = parent instanceof VhdDisk ? parent.uniqueId : describeDisk(parentPath).uniqueId;
        const stamps: number[] = [vhdTimestamp(fs.statSync(parentPath).mtimeMs)];
        if (parent instanceof VhdDisk) stamps.push(parent.footer.timestamp);
        warnings.push(
          ...verifyParent(path, parentPath, {
            expectedId: formatUniqueId(layout.header!.parentUniqueId),
            actualId: parentId,
            expectedTimestamp: layout.header!.parentTimestamp,
            actualTimestamps: stamps,
          }),
        );
      }
      return new VhdDisk(path, fd, layout, readOnly, parent, warnings, cache);
    } catch (e) {
      parent?.close();
      fs.closeSync(fd);
      throw e;
    }
  }

  private checkRange(offset: number, length: number, op: string): void {
    if (this.closed) throw new DiskError("DISK_CLOSED", `${op} after close`, this.path);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new DiskError("OUT_OF_RANGE", `${op} of ${length} bytes at offset ${offset} is outside the disk (size ${this.size})`, this.path, { offset, length });
    }
  }

  // --- reading --------------------------------------------------------------------------------

  /** What a range not present in this layer reads as: the parent, or zeros. */
  private readBelow(offset: number, out: Uint8Array): void {
    const p = this.parent;
    if (p === undefined) {
      out.fill(0);
      return;
    }
    const inParent = Math.max(0, Math.min(out.length, p.size - offset));
    if (inParent > 0) p.read(offset, out.subarray(0, inParent));
    if (inParent < out.length) out.fill(0, inParent);
  }

  private bitmap(block: number): Uint8Array {
    let b = this.bitmaps.get(block);
    if (b !== undefined) return b;
    if (this.bitmaps.size >= MAX_CACHED_BITMAPS) {
      for (const k of this.bitmaps.keys()) {
        if (!this.dirtyBitmaps.has(k)) this.bitmaps.delete(k);
        if (this.bitmaps.size < MAX_CACHED_BITMAPS / 2) break;
      }
    }
    b = new Uint8Array(this.bitmapSize);
    this.readFileAt(b, this.bat[block]! * SECTOR);
    this.bitmaps.set(block, b);
    return b;
  }

  private blockDataOffset(block: number): number {
    return this.bat[block]! * SECTOR + this.bitmapSize;
  }

  read(offset: number, buf: Uint8Array): void {
    this.checkRange(offset, buf.length, "read");
    if (this.type === "fixed") {
      this.readFileAt(buf, offset);
      return;
    }
    const bs = this.blockSize;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(bs - inBlock, buf.length - done);
      const out = buf.subarray(done, done + n);
      if (this.bat[block] === BAT_UNALLOCATED) {
        this.readBelow(pos, out);
      } else {
        this.readAllocated(block, inBlock, out);
      }
      done += n;
    }
  }

  private readAllocated(block: number, inBlock: number, out: Uint8Array): void {
    const bm = this.bitmap(block);
    const end = inBlock + out.length;
    const lastSector = Math.ceil(end / SECTOR);
    let s = Math.floor(inBlock / SECTOR);
    const base = block * this.blockSize;
    const dataAt = this.blockDataOffset(block);
    while (s < lastSector) {
      const e = runEnd(bm, s, lastSector);
      const from = Math.max(inBlock, s * SECTOR);
      const to = Math.min(end, e * SECTOR);
      const part = out.subarray(from - inBlock, to - inBlock);
      if (bitIsSet(bm, s)) this.readFileAt(part, dataAt + from);
      else this.readBelow(base + from, part);
      s = e;
    }
  }

  // --- writing --------------------------------------------------------------------------------

  private checkWrite(offset: number, length: number): void {
    this.checkRange(offset, length, "write");
    if (this.readOnly) throw new DiskError("DISK_READ_ONLY", "write to a read-only disk", this.path, { offset });
    if (this.type === "differencing" && this.parent === undefined) {
      throw new DiskError("VHD_NO_PARENT", "cannot write a differencing disk opened without its parent", this.path);
    }
  }

  write(offset: number, buf: Uint8Array): void {
    this.checkWrite(offset, buf.length);
    if (this.type === "fixed") {
      this.writeFileAt(buf, offset);
      return;
    }
    const bs = this.blockSize;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(bs - inBlock, buf.length - done);
      this.writeInBlock(block, inBlock, buf.subarray(done, done + n));
      done += n;
    }
  }

  private allocateBlock(block: number): void {
    // Data 4 KiB aligned; everything from here on is past the old end footer.
    const bitmapAt = alignUp(this.endOffset + this.bitmapSize, DATA_ALIGNMENT) - this.bitmapSize;
    const newEnd = bitmapAt + this.bitmapSize + this.blockSize;
    const fileSize = fs.fstatSync(this.fd).size;
    if (fileSize > this.endOffset + SECTOR) {
      // Bytes past the end footer (a block allocated but never published before
      // a crash): drop them so the new block's data area reads as zeros.
      fs.ftruncateSync(this.fd, this.endOffset + SECTOR);
    }
    // Step 1 of the crash ordering: the footer moves first (the file grows).
    this.writeFileAt(this.footerBytes, newEnd);
    this.endOffset = newEnd;
    this.endFooterValid = true;
    this.bat[block] = bitmapAt / SECTOR;
    this.bitmaps.set(block, new Uint8Array(this.bitmapSize));
    this.newBlocks.add(block);
    this.dirtyBitmaps.add(block);
    this.dirtyBat.add(block);
  }

  private writeInBlock(block: number, inBlock: number, data: Uint8Array): void {
    if (this.bat[block] === BAT_UNALLOCATED) {
      // A dynamic disk's unallocated block already reads as zeros.
      if (this.parent === undefined && isZero(data)) return;
      this.allocateBlock(block);
    }
    const bm = this.bitmap(block);
    const end = inBlock + data.length;
    const s0 = Math.floor(inBlock / SECTOR);
    const s1 = Math.ceil(end / SECTOR);
    const dataAt = this.blockDataOffset(block);
    const headPartial = inBlock % SECTOR !== 0;
    const tailPartial = end % SECTOR !== 0;
    const headFill = headPartial && !bitIsSet(bm, s0);
    const tailFill = tailPartial && !bitIsSet(bm, s1 - 1);
    if (headFill || tailFill) {
      // Complete partial sectors whose bit is clear from what they read as now.
      const whole = new Uint8Array((s1 - s0) * SECTOR);
      const base = block * this.blockSize;
      const fillSector = (s: number, into: Uint8Array): void => {
        if (bitIsSet(bm, s)) this.readFileAt(into, dataAt + s * SECTOR);
        else this.readBelow(base + s * SECTOR, into);
      };
      if (headPartial) fillSector(s0, whole.subarray(0, SECTOR));
      if (tailPartial && (s1 - 1 !== s0 || !headPartial)) fillSector(s1 - 1, whole.subarray(whole.length - SECTOR));
      whole.set(data, inBlock - s0 * SECTOR);
      this.writeFileAt(whole, dataAt + s0 * SECTOR);
    } else {
      this.writeFileAt(data, dataAt + inBlock);
    }
    if (setBits(bm, s0, s1)) this.dirtyBitmaps.add(block);
  }

  // --- guest RAM in place (virtio-blk, IDE bus-master DMA) ------------------------------------
  //
  // The common cases go straight between guest RAM and the file, as for a raw
  // image (one preadv/pwritev, or queued on the device's io_uring): a fixed
  // disk's data, a range of one allocated block whose sectors are all present,
  // and, for reads, a range the parent holds entirely. Everything else
  // answers false, having done nothing, and the caller takes the synchronous
  // path above (allocation, bitmap bits to set, partial sectors, zeros).
  // A write that goes straight to the file changes no metadata.

  readHost(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    const length = spanTotal(lengths, count);
    this.checkRange(offset, length, "read");
    return this.routing.readHost(offset, length, addresses, lengths, count);
  }

  writeHost(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    const length = spanTotal(lengths, count);
    this.checkWrite(offset, length);
    return this.routing.writeHost(offset, length, addresses, lengths, count);
  }

  queueHost(queue: HostIoQueue, write: boolean, offset: number, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): "done" | "queued" | false {
    const length = spanTotal(lengths, count);
    if (write) this.checkWrite(offset, length);
    else this.checkRange(offset, length, "read");
    return this.routing.queueHost(queue, write, offset, length, addresses, lengths, count, token);
  }

  /** An fsync on the queue when no metadata is waiting to be published (else flush() does it, synchronously). */
  queueFlush(queue: HostIoQueue, token: number): boolean {
    if (this.closed || this.readOnly || this.ignoreFlush || this.metadataPending()) return false;
    return this.routing.queueFlush(queue, token);
  }

  /** Bitmaps, BAT entries or the end footer not yet written by flush(). */
  private metadataPending(): boolean {
    return this.dirtyBitmaps.size !== 0 || this.dirtyBat.size !== 0 || !this.endFooterValid;
  }

  /** The file offset of `offset` when [offset, offset+length) is in one allocated block with every sector present (fixed: all of it); -1 otherwise. */
  private payloadAt(offset: number, length: number): number {
    if (this.type === "fixed") return offset;
    const bs = this.blockSize;
    const block = Math.floor(offset / bs);
    const inBlock = offset - block * bs;
    if (inBlock + length > bs || this.bat[block] === BAT_UNALLOCATED) return -1;
    const bm = this.bitmap(block);
    const s0 = Math.floor(inBlock / SECTOR);
    const s1 = Math.ceil((inBlock + length) / SECTOR);
    if (!bitIsSet(bm, s0) || runEnd(bm, s0, s1) !== s1) return -1;
    return this.blockDataOffset(block) + inBlock;
  }

  /** The parent, when this layer holds no sector of [offset, offset+length) and the parent holds all of it. */
  private parentHolding(offset: number, length: number): BlockDevice | undefined {
    const p = this.parent;
    if (p === undefined || this.type === "fixed" || offset + length > p.size) return undefined;
    const bs = this.blockSize;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / bs);
      const blockEnd = Math.min(end, (block + 1) * bs);
      if (this.bat[block] !== BAT_UNALLOCATED) {
        const bm = this.bitmap(block);
        const s0 = Math.floor((pos - block * bs) / SECTOR);
        const s1 = Math.ceil((blockEnd - block * bs) / SECTOR);
        if (bitIsSet(bm, s0) || runEnd(bm, s0, s1) !== s1) return undefined;
      }
      pos = blockEnd;
    }
    return p;
  }

  // --- durability -----------------------------------------------------------------------------

  /** Publish pending metadata in the order documented at the top of this file. */
  flush(): void {
    if (this.closed || this.readOnly) return;
    if (!this.metadataPending()) {
      this.sync();
      return;
    }
    // Phase 1: bitmaps of blocks nothing references yet, with the data.
    for (const b of this.newBlocks) this.writeFileAt(this.bitmaps.get(b)!, this.bat[b]! * SECTOR);
    this.sync();
    // Phase 2: the metadata that publishes it.
    for (const b of this.dirtyBitmaps) {
      if (!this.newBlocks.has(b)) this.writeFileAt(this.bitmaps.get(b)!, this.bat[b]! * SECTOR);
    }
    const batSectors = new Set<number>();
    for (const b of this.dirtyBat) batSectors.add(Math.floor((b * 4) / SECTOR));
    for (const s of [...batSectors].sort((a, b) => a - b)) {
      const first = (s * SECTOR) / 4;
      const count = Math.min(SECTOR / 4, this.bat.length - first);
      const out = new Uint8Array(count * 4);
      const view = new DataView(out.buffer);
      for (let i = 0; i < count; i++) view.setUint32(i * 4, this.bat[first + i]!, false);
      this.writeFileAt(out, this.batOffset + s * SECTOR);
    }
    if (!this.endFooterValid) {
      this.writeFileAt(this.footerBytes, this.endOffset);
      if (fs.fstatSync(this.fd).size > this.endOffset + SECTOR) fs.ftruncateSync(this.fd, this.endOffset + SECTOR);
      this.endFooterValid = true;
    }
    this.sync();
    this.newBlocks.clear();
    this.dirtyBitmaps.clear();
    this.dirtyBat.clear();
  }

  /** No-op hint (see the module comment). */
  discard(offset: number, length: number): void {
    this.checkRange(offset, length, "discard");
  }

  allocation(offset: number, length: number): AllocationExtent[] {
    this.checkRange(offset, length, "allocation");
    const out: AllocationExtent[] = [];
    const push = (o: number, l: number, state: AllocationState): void => {
      if (l <= 0) return;
      const last = out[out.length - 1];
      if (last !== undefined && last.state === state && last.offset + last.length === o) {
        out[out.length - 1] = { offset: last.offset, length: last.length + l, state };
      } else out.push({ offset: o, length: l, state });
    };
    if (this.type === "fixed") {
      push(offset, length, "allocated");
      return out;
    }
    const bs = this.blockSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const block = Math.floor(pos / bs);
      const blockEnd = Math.min(end, (block + 1) * bs);
      if (this.bat[block] === BAT_UNALLOCATED) {
        push(pos, blockEnd - pos, "unallocated");
      } else {
        const bm = this.bitmap(block);
        const base = block * bs;
        const lastSector = Math.ceil((blockEnd - base) / SECTOR);
        let s = Math.floor((pos - base) / SECTOR);
        while (s < lastSector) {
          const e = runEnd(bm, s, lastSector);
          const from = Math.max(pos, base + s * SECTOR);
          const to = Math.min(blockEnd, base + e * SECTOR);
          push(from, to - from, bitIsSet(bm, s) ? "allocated" : "unallocated");
          s = e;
        }
      }
      pos = blockEnd;
    }
    return out;
  }

  /** pread of `buf` at `offset` (bytes past the end read as zeros), through the bounce buffer under O_DIRECT. */
  private readFileAt(buf: Uint8Array, offset: number): void {
    if (this.directIo !== undefined) this.directIo.read(offset, buf);
    else preadFully(this.fd, buf, offset);
  }

  /** pwrite of `buf` at `offset`, through the bounce buffer under O_DIRECT. */
  private writeFileAt(buf: Uint8Array, offset: number): void {
    if (this.directIo !== undefined) this.directIo.write(offset, buf);
    else pwriteFully(this.fd, buf, offset);
  }

  /** fdatasync, except with cache=unsafe. */
  private sync(): void {
    if (!this.ignoreFlush) fs.fdatasyncSync(this.fd);
  }

  close(): void {
    if (this.closed) return;
    try {
      this.flush();
    } finally {
      this.closed = true;
      this.routing.close();
      fs.closeSync(this.fd);
      this.parent?.close();
    }
  }
}

/** What a VHD runs on under a cache mode other than writeback. */
interface OpenedCache {
  readonly direct: DirectIo | undefined;
  readonly ignoreFlush: boolean;
  readonly notes: string[];
}

/** The VHD file with the cache mode's flags (O_DIRECT, O_DSYNC; openFileForDisk gives up a direct descriptor the file system refuses, with a note). */
function openCached(path: string, readOnly: boolean, options: OpenOptions): OpenedCache & { readonly fd: number } {
  const { fd, direct, notes } = openFileForDisk(path, readOnly, options.direct === true, SECTOR, options.writeThrough === true);
  return { fd, direct, ignoreFlush: options.ignoreFlush === true, notes };
}
