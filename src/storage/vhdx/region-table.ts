/**
 * Region table (MS-VHDX 2.2.3): two 64 KiB copies at 192 KiB and 256 KiB,
 * "regi" signature, CRC-32C, up to 2,047 entries locating the BAT and the
 * metadata region. Unknown regions marked required make the file unusable.
 */
import { DiskError } from "../block-device.js";
import { crc32cWithZeroField } from "./crc32c.js";
import { guidEquals, guidToString, knownGuid, type Guid } from "./guid.js";
import { KiB, MiB } from "./host-file.js";

export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
export const REGION_TABLE_SIZE = 64 * KiB;
const REGION_SIGNATURE = 0x69676572; // "regi"
const MAX_ENTRIES = 2047;

export const BAT_REGION_GUID = knownGuid("2DC27766-F623-4200-9D64-115E9BFD4A08");
export const METADATA_REGION_GUID = knownGuid("8B7CA206-4790-4B9A-B8FE-575F050F886E");

export interface RegionEntry {
  readonly guid: Guid;
  readonly fileOffset: number;
  readonly length: number;
  readonly required: boolean;
}

export interface RegionTable {
  readonly entries: readonly RegionEntry[];
  readonly bat: RegionEntry;
  readonly metadata: RegionEntry;
}

export function encodeRegionTable(entries: readonly RegionEntry[]): Buffer {
  const b = Buffer.alloc(REGION_TABLE_SIZE);
  b.writeUInt32LE(REGION_SIGNATURE, 0);
  b.writeUInt32LE(entries.length, 8);
  entries.forEach((e, i) => {
    const o = 16 + i * 32;
    e.guid.copy(b, o);
    b.writeBigUInt64LE(BigInt(e.fileOffset), o + 16);
    b.writeUInt32LE(e.length, o + 24);
    b.writeUInt32LE(e.required ? 1 : 0, o + 28);
  });
  b.writeUInt32LE(crc32cWithZeroField(b, 4), 4);
  return b;
}

/**
 * Decode and validate one copy. Problems are thrown as DiskError so the open
 * path can report the exact reason; check() catches them per copy.
 */
export function decodeRegionTable(path: string, b: Buffer, which: string): RegionTable {
  const bad = (msg: string): DiskError => new DiskError("VHDX_BAD_REGION_TABLE", `${which}: ${msg}`, path);
  if (b.readUInt32LE(0) !== REGION_SIGNATURE) throw bad("bad signature (expected \"regi\")");
  const stored = b.readUInt32LE(4);
  const actual = crc32cWithZeroField(b, 4, REGION_TABLE_SIZE);
  if (stored !== actual) throw bad(`bad CRC-32C (stored 0x${stored.toString(16)}, computed 0x${actual.toString(16)})`);
  const count = b.readUInt32LE(8);
  if (count > MAX_ENTRIES) throw bad(`entry count ${count} exceeds ${MAX_ENTRIES}`);
  const entries: RegionEntry[] = [];
  let bat: RegionEntry | undefined;
  let metadata: RegionEntry | undefined;
  for (let i = 0; i < count; i++) {
    const o = 16 + i * 32;
    const guid = Buffer.from(b.subarray(o, o + 16));
    const off = b.readBigUInt64LE(o + 16);
    const length = b.readUInt32LE(o + 24);
    const required = (b.readUInt32LE(o + 28) & 1) === 1;
    if (off > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`region ${guidToString(guid)} offset out of range`);
    const fileOffset = Number(off);
    if (fileOffset < MiB || fileOffset % MiB !== 0) throw bad(`region ${guidToString(guid)} offset ${fileOffset} is not a 1 MiB multiple at or after 1 MiB`);
    if (length === 0 || length % MiB !== 0) throw bad(`region ${guidToString(guid)} length ${length} is not a non-zero multiple of 1 MiB`);
    if (entries.some((e) => guidEquals(e.guid, guid))) throw bad(`region ${guidToString(guid)} appears twice`);
    for (const e of entries) {
      if (fileOffset < e.fileOffset + e.length && e.fileOffset < fileOffset + length) {
        throw bad(`regions ${guidToString(e.guid)} and ${guidToString(guid)} overlap`);
      }
    }
    const entry: RegionEntry = { guid, fileOffset, length, required };
    if (guidEquals(guid, BAT_REGION_GUID)) bat = entry;
    else if (guidEquals(guid, METADATA_REGION_GUID)) metadata = entry;
    else if (required) {
      throw new DiskError("VHDX_UNKNOWN_REQUIRED_REGION", `${which}: unknown region ${guidToString(guid)} is marked required; this implementation cannot open the file`, path);
    }
    entries.push(entry);
  }
  if (!bat) throw bad("no BAT region");
  if (!metadata) throw bad("no metadata region");
  return { entries, bat, metadata };
}
