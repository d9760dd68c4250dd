/**
 * Metadata region (MS-VHDX 2.6): the "metadata" table (64 KiB, up to 2,047
 * entries) and the known system items: File Parameters, Virtual Disk Size,
 * Virtual Disk ID (page 83 data), Logical/Physical Sector Size and the Parent
 * Locator (key/value pairs in UTF-16LE). Unknown items marked required make
 * the file unusable; unknown optional items are kept byte for byte when the
 * region is rewritten (resize, setParent).
 */
import { DiskError } from "../block-device.js";
import { guidEquals, guidToString, knownGuid, type Guid } from "./guid.js";
import { KiB, MiB, TiB } from "./host-file.js";

export const MAX_VIRTUAL_SIZE = 64 * TiB;
export const METADATA_TABLE_SIZE = 64 * KiB;
const SIGNATURE = "metadata";
const MAX_ENTRIES = 2047;

export const FILE_PARAMETERS_GUID = knownGuid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
export const VIRTUAL_DISK_SIZE_GUID = knownGuid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
export const VIRTUAL_DISK_ID_GUID = knownGuid("BECA12AB-B2E6-4523-93EF-C309E000C746");
export const LOGICAL_SECTOR_SIZE_GUID = knownGuid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
export const PHYSICAL_SECTOR_SIZE_GUID = knownGuid("CDA348C7-445D-4471-9CC9-E9885251C556");
export const PARENT_LOCATOR_GUID = knownGuid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
export const VHDX_PARENT_LOCATOR_TYPE = knownGuid("B04AEFB7-D19E-4A81-B789-25B8E9445913");

const FLAG_USER = 1;
const FLAG_VIRTUAL_DISK = 2;
const FLAG_REQUIRED = 4;

export interface ParentLocator {
  readonly type: Guid;
  /** Key/value pairs in file order. */
  readonly entries: ReadonlyArray<readonly [string, string]>;
}

/** A metadata item this implementation does not interpret (kept raw). */
export interface OpaqueItem {
  readonly id: Guid;
  readonly flags: number;
  readonly data: Buffer;
}

export interface VhdxMetadata {
  readonly blockSize: number;
  readonly leaveBlocksAllocated: boolean;
  readonly hasParent: boolean;
  readonly virtualSize: number;
  readonly virtualDiskId: Guid;
  readonly logicalSectorSize: 512 | 4096;
  readonly physicalSectorSize: 512 | 4096;
  readonly parentLocator: ParentLocator | undefined;
  readonly opaque: readonly OpaqueItem[];
}

export function locatorValue(loc: ParentLocator | undefined, key: string): string | undefined {
  return loc?.entries.find(([k]) => k === key)?.[1];
}

export function validBlockSize(n: number): boolean {
  return Number.isInteger(n) && n >= MiB && n <= 256 * MiB && (n & (n - 1)) === 0;
}

/**
 * Decode the metadata table and items from the region image (at least the
 * bytes up to the end of every item; `regionLength` bounds the offsets).
 */
export function decodeMetadata(path: string, region: Buffer, regionLength: number): VhdxMetadata {
  const bad = (msg: string): DiskError => new DiskError("VHDX_BAD_METADATA", msg, path);
  if (region.subarray(0, 8).toString("latin1") !== SIGNATURE) throw bad("metadata table has a bad signature (expected \"metadata\")");
  const count = region.readUInt16LE(10);
  if (count > MAX_ENTRIES) throw bad(`metadata table entry count ${count} exceeds ${MAX_ENTRIES}`);
  const items = new Map<string, Buffer>();
  const opaque: OpaqueItem[] = [];
  const spans: [number, number][] = [];
  let userCount = 0;
  for (let i = 0; i < count; i++) {
    const o = 32 + i * 32;
    const id = Buffer.from(region.subarray(o, o + 16));
    const offset = region.readUInt32LE(o + 16);
    const length = region.readUInt32LE(o + 20);
    const flags = region.readUInt32LE(o + 24);
    const name = guidToString(id);
    if (length > MiB) throw bad(`metadata item ${name} length ${length} exceeds 1 MiB`);
    if (length === 0 ? offset !== 0 : offset < METADATA_TABLE_SIZE || offset + length > regionLength) {
      throw bad(`metadata item ${name} (offset ${offset}, length ${length}) lies outside the metadata region`);
    }
    if (offset + length > region.length) throw bad(`metadata item ${name} lies past the end of the file`);
    for (const [s, e] of spans) if (offset < e && s < offset + length) throw bad(`metadata item ${name} overlaps another item`);
    if (length > 0) spans.push([offset, offset + length]);
    const key = `${name}/${flags & FLAG_USER}`;
    if (items.has(key) || opaque.some((x) => guidEquals(x.id, id) && (x.flags & FLAG_USER) === (flags & FLAG_USER))) {
      throw bad(`metadata item ${name} appears twice`);
    }
    if (flags & FLAG_USER) userCount++;
    const data = Buffer.from(region.subarray(offset, offset + length));
    const known = !(flags & FLAG_USER) && [FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, VIRTUAL_DISK_ID_GUID, LOGICAL_SECTOR_SIZE_GUID, PHYSICAL_SECTOR_SIZE_GUID, PARENT_LOCATOR_GUID].some((g) => guidEquals(g, id));
    if (known) items.set(name, data);
    else if (flags & FLAG_REQUIRED) {
      throw new DiskError("VHDX_UNKNOWN_REQUIRED_METADATA", `unknown metadata item ${name} is marked required; this implementation cannot open the file`, path);
    } else opaque.push({ id, flags, data });
  }
  if (userCount > 1024) throw bad(`${userCount} user metadata items exceed the limit of 1024`);
  const item = (g: Guid, what: string, size: number): Buffer => {
    const d = items.get(guidToString(g));
    if (!d) throw bad(`required metadata item ${what} is missing`);
    if (d.length < size) throw bad(`metadata item ${what} is ${d.length} bytes, expected ${size}`);
    return d;
  };
  const fp = item(FILE_PARAMETERS_GUID, "File Parameters", 8);
  const blockSize = fp.readUInt32LE(0);
  if (!validBlockSize(blockSize)) throw bad(`block size ${blockSize} is not a power of two between 1 MiB and 256 MiB`);
  const bits = fp.readUInt32LE(4);
  const logical = item(LOGICAL_SECTOR_SIZE_GUID, "Logical Sector Size", 4).readUInt32LE(0);
  if (logical !== 512 && logical !== 4096) throw bad(`logical sector size ${logical} is not 512 or 4096`);
  const physical = item(PHYSICAL_SECTOR_SIZE_GUID, "Physical Sector Size", 4).readUInt32LE(0);
  if (physical !== 512 && physical !== 4096) throw bad(`physical sector size ${physical} is not 512 or 4096`);
  const vsize = item(VIRTUAL_DISK_SIZE_GUID, "Virtual Disk Size", 8).readBigUInt64LE(0);
  if (vsize > BigInt(MAX_VIRTUAL_SIZE)) {
    throw new DiskError("VHDX_TOO_LARGE", `virtual size ${vsize} exceeds the VHDX maximum of 64 TiB`, path);
  }
  const virtualSize = Number(vsize);
  if (virtualSize === 0 || virtualSize % logical !== 0) throw bad(`virtual size ${virtualSize} is not a non-zero multiple of the logical sector size ${logical}`);
  const virtualDiskId = Buffer.from(item(VIRTUAL_DISK_ID_GUID, "Virtual Disk ID", 16).subarray(0, 16));
  const hasParent = (bits & 2) !== 0;
  let parentLocator: ParentLocator | undefined;
  const pl = items.get(guidToString(PARENT_LOCATOR_GUID));
  if (pl) parentLocator = decodeParentLocator(path, pl);
  if (hasParent) {
    if (!parentLocator) throw bad("differencing disk (HasParent) without a parent locator");
    if (!guidEquals(parentLocator.type, VHDX_PARENT_LOCATOR_TYPE)) {
      throw new DiskError("VHDX_UNKNOWN_PARENT_LOCATOR", `parent locator type ${guidToString(parentLocator.type)} is not the VHDX locator type`, path);
    }
    if (!locatorValue(parentLocator, "parent_linkage")) throw bad("parent locator has no parent_linkage entry");
  }
  return {
    blockSize,
    leaveBlocksAllocated: (bits & 1) !== 0,
    hasParent,
    virtualSize,
    virtualDiskId,
    logicalSectorSize: logical,
    physicalSectorSize: physical,
    parentLocator,
    opaque,
  };
}

export function decodeParentLocator(path: string, d: Buffer): ParentLocator {
  const bad = (msg: string): DiskError => new DiskError("VHDX_BAD_PARENT_LOCATOR", msg, path);
  if (d.length < 20) throw bad("parent locator is shorter than its 20-byte header");
  const type = Buffer.from(d.subarray(0, 16));
  const count = d.readUInt16LE(18);
  if (20 + count * 12 > d.length) throw bad(`parent locator declares ${count} entries but holds only ${d.length} bytes`);
  const entries: [string, string][] = [];
  for (let i = 0; i < count; i++) {
    const o = 20 + i * 12;
    const ko = d.readUInt32LE(o);
    const vo = d.readUInt32LE(o + 4);
    const kl = d.readUInt16LE(o + 8);
    const vl = d.readUInt16LE(o + 10);
    if (kl === 0 || vl === 0 || kl % 2 || vl % 2 || ko + kl > d.length || vo + vl > d.length || ko === 0 || vo === 0) {
      throw bad(`parent locator entry ${i} has key/value bounds outside the item`);
    }
    const key = d.subarray(ko, ko + kl).toString("utf16le");
    const value = d.subarray(vo, vo + vl).toString("utf16le");
    if (entries.some(([k]) => k === key)) throw bad(`parent locator key ${JSON.stringify(key)} appears twice`);
    entries.push([key, value]);
  }
  return { type, entries };
}

export function encodeParentLocator(loc: ParentLocator): Buffer {
  const strings: Buffer[] = [];
  for (const [k, v] of loc.entries) strings.push(Buffer.from(k, "utf16le"), Buffer.from(v, "utf16le"));
  const head = 20 + loc.entries.length * 12;
  const b = Buffer.alloc(head + strings.reduce((n, s) => n + s.length, 0));
  loc.type.copy(b, 0);
  b.writeUInt16LE(loc.entries.length, 18);
  let at = head;
  const offsets: number[] = [];
  for (const s of strings) {
    offsets.push(at);
    s.copy(b, at);
    at += s.length;
  }
  loc.entries.forEach((_, i) => {
    const o = 20 + i * 12;
    b.writeUInt32LE(offsets[2 * i]!, o);
    b.writeUInt32LE(offsets[2 * i + 1]!, o + 4);
    b.writeUInt16LE(strings[2 * i]!.length, o + 8);
    b.writeUInt16LE(strings[2 * i + 1]!.length, o + 10);
  });
  return b;
}

/** Lay out the table and items into a region image of `regionLength` bytes. */
export function encodeMetadata(path: string, m: VhdxMetadata, regionLength: number): Buffer {
  const u32 = (n: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32LE(n); return b; };
  const fp = Buffer.alloc(8);
  fp.writeUInt32LE(m.blockSize, 0);
  fp.writeUInt32LE((m.leaveBlocksAllocated ? 1 : 0) | (m.hasParent ? 2 : 0), 4);
  const vs = Buffer.alloc(8);
  vs.writeBigUInt64LE(BigInt(m.virtualSize));
  const items: { id: Guid; flags: number; data: Buffer }[] = [
    { id: FILE_PARAMETERS_GUID, flags: FLAG_REQUIRED, data: fp },
    { id: VIRTUAL_DISK_SIZE_GUID, flags: FLAG_REQUIRED | FLAG_VIRTUAL_DISK, data: vs },
    { id: VIRTUAL_DISK_ID_GUID, flags: FLAG_REQUIRED | FLAG_VIRTUAL_DISK, data: Buffer.from(m.virtualDiskId) },
    { id: LOGICAL_SECTOR_SIZE_GUID, flags: FLAG_REQUIRED | FLAG_VIRTUAL_DISK, data: u32(m.logicalSectorSize) },
    { id: PHYSICAL_SECTOR_SIZE_GUID, flags: FLAG_REQUIRED | FLAG_VIRTUAL_DISK, data: u32(m.physicalSectorSize) },
  ];
  if (m.parentLocator) items.push({ id: PARENT_LOCATOR_GUID, flags: FLAG_REQUIRED, data: encodeParentLocator(m.parentLocator) });
  for (const o of m.opaque) items.push({ id: o.id, flags: o.flags, data: o.data });
  const b = Buffer.alloc(regionLength);
  b.write(SIGNATURE, 0, "latin1");
  b.writeUInt16LE(items.length, 10);
  let at = METADATA_TABLE_SIZE;
  items.forEach((it, i) => {
    const o = 32 + i * 32;
    if (at + it.data.length > regionLength) throw new DiskError("VHDX_METADATA_FULL", "metadata items do not fit in the metadata region", path);
    it.id.copy(b, o);
    b.writeUInt32LE(it.data.length ? at : 0, o + 16);
    b.writeUInt32LE(it.data.length, o + 20);
    b.writeUInt32LE(it.flags, o + 24);
    it.data.copy(b, at);
    at += it.data.length;
  });
  return b;
}
