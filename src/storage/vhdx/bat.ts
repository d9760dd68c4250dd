/**
 * Block Allocation Table (MS-VHDX 2.4, 2.5): 64-bit entries, state in bits
 * 0-2 and FileOffsetMB in bits 20-63, one sector-bitmap entry interleaved
 * after every `chunkRatio` payload entries, where
 * chunkRatio = 2^23 * logicalSectorSize / blockSize.
 */
import { MiB } from "./host-file.js";

export const PAYLOAD_BLOCK_NOT_PRESENT = 0;
export const PAYLOAD_BLOCK_UNDEFINED = 1;
export const PAYLOAD_BLOCK_ZERO = 2;
export const PAYLOAD_BLOCK_UNMAPPED = 3;
export const PAYLOAD_BLOCK_FULLY_PRESENT = 6;
export const PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7;
export const SB_BLOCK_NOT_PRESENT = 0;
export const SB_BLOCK_PRESENT = 6;

export const SECTOR_BITMAP_BLOCK_SIZE = MiB;

export class BatGeometry {
  readonly chunkRatio: number;
  readonly payloadBlocks: number;
  readonly bitmapBlocks: number;
  /** Entries the BAT must hold (spec 2.5: differencing disks cover the last bitmap entry). */
  readonly entryCount: number;
  /** Bytes of virtual disk one sector bitmap block describes. */
  readonly chunkSize: number;

  constructor(readonly virtualSize: number, readonly blockSize: number, readonly logicalSectorSize: number, readonly hasParent: boolean) {
    this.chunkRatio = (2 ** 23 * logicalSectorSize) / blockSize;
    this.chunkSize = 2 ** 23 * logicalSectorSize;
    this.payloadBlocks = Math.ceil(virtualSize / blockSize);
    this.bitmapBlocks = Math.ceil(this.payloadBlocks / this.chunkRatio);
    this.entryCount = hasParent
      ? this.bitmapBlocks * (this.chunkRatio + 1)
      : this.payloadBlocks + Math.floor((this.payloadBlocks - 1) / this.chunkRatio);
  }

  payloadIndex(block: number): number {
    return block + Math.floor(block / this.chunkRatio);
  }

  bitmapIndex(chunk: number): number {
    return chunk * (this.chunkRatio + 1) + this.chunkRatio;
  }

  /** Bytes the BAT region needs, rounded up to 1 MiB. */
  regionBytes(): number {
    return Math.ceil((this.entryCount * 8) / MiB) * MiB;
  }
}

/** The in-memory BAT: exactly the entries the geometry needs, read from the BAT region. */
export class BatTable {
  constructor(readonly bytes: Buffer) {}

  get length(): number {
    return this.bytes.length / 8;
  }

  state(index: number): number {
    return this.bytes[index * 8]! & 7;
  }

  /** File offset in bytes (FileOffsetMB * 1 MiB). */
  offset(index: number): number {
    const lo = this.bytes.readUInt32LE(index * 8);
    const hi = this.bytes.readUInt32LE(index * 8 + 4);
    return (hi * 4096 + (lo >>> 20)) * MiB;
  }

  reservedBits(index: number): number {
    return (this.bytes.readUInt32LE(index * 8) >>> 3) & 0x1ffff;
  }

  set(index: number, state: number, fileOffset: number): void {
    const mb = fileOffset / MiB;
    this.bytes.writeUInt32LE((((mb % 4096) << 20) | state) >>> 0, index * 8);
    this.bytes.writeUInt32LE(Math.floor(mb / 4096), index * 8 + 4);
  }
}

export interface FileSpan {
  readonly start: number;
  readonly end: number;
  readonly what: string;
}

/**
 * Every problem with the BAT entries: invalid states, blocks outside the
 * file, inside the header section or another structure, or overlapping each
 * other. Open refuses the first one; check() reports them all.
 */
export function batProblems(geo: BatGeometry, bat: BatTable, fileSize: number, structures: readonly FileSpan[], limit = 100): { index: number; message: string }[] {
  const out: { index: number; message: string }[] = [];
  const spans: { start: number; end: number; index: number }[] = [];
  const cr = geo.chunkRatio;
  for (let i = 0; i < geo.entryCount && out.length < limit; i++) {
    const isBitmap = i % (cr + 1) === cr;
    const st = bat.state(i);
    const size = isBitmap ? MiB : geo.blockSize;
    const label = isBitmap ? `sector bitmap entry ${i}` : `payload entry ${i} (block ${i - Math.floor(i / (cr + 1))})`;
    let present: boolean;
    if (isBitmap) {
      if (st !== SB_BLOCK_NOT_PRESENT && st !== SB_BLOCK_PRESENT) { out.push({ index: i, message: `${label} has invalid state ${st}` }); continue; }
      if (st === SB_BLOCK_PRESENT && !geo.hasParent) { out.push({ index: i, message: `${label} is present in a disk without a parent` }); continue; }
      present = st === SB_BLOCK_PRESENT;
    } else {
      if (st === 4 || st === 5) { out.push({ index: i, message: `${label} has reserved state ${st}` }); continue; }
      if (st === PAYLOAD_BLOCK_PARTIALLY_PRESENT && !geo.hasParent) { out.push({ index: i, message: `${label} is PARTIALLY_PRESENT in a disk without a parent` }); continue; }
      present = st === PAYLOAD_BLOCK_FULLY_PRESENT || st === PAYLOAD_BLOCK_PARTIALLY_PRESENT;
      if (st === PAYLOAD_BLOCK_PARTIALLY_PRESENT) {
        const sb = geo.bitmapIndex(Math.floor((i - Math.floor(i / (cr + 1))) / cr));
        if (sb >= bat.length || bat.state(sb) !== SB_BLOCK_PRESENT) { out.push({ index: i, message: `${label} is PARTIALLY_PRESENT but its sector bitmap block is not present` }); continue; }
      }
    }
    if (!present) continue;
    const off = bat.offset(i);
    if (off < MiB) { out.push({ index: i, message: `${label} points into the header section (offset ${off})` }); continue; }
    if (off + size > fileSize) { out.push({ index: i, message: `${label} at offset ${off} extends past the end of the file (${fileSize} bytes)` }); continue; }
    const hit = structures.find((s) => off < s.end && s.start < off + size);
    if (hit) { out.push({ index: i, message: `${label} at offset ${off} overlaps the ${hit.what}` }); continue; }
    spans.push({ start: off, end: off + size, index: i });
  }
  spans.sort((a, b) => a.start - b.start);
  for (let k = 1; k < spans.length && out.length < limit; k++) {
    if (spans[k]!.start < spans[k - 1]!.end) out.push({ index: spans[k]!.index, message: `BAT entries ${spans[k - 1]!.index} and ${spans[k]!.index} overlap at file offset ${spans[k]!.start}` });
  }
  return out;
}
