/**
 * On-disk structures of the VHD format (Microsoft "Virtual Hard Disk Image
 * Format Specification", v1.0): the 512-byte hard disk footer, the 1024-byte
 * dynamic disk header with its eight parent locator entries, the block
 * allocation table (BAT) and the per-block sector bitmap. Everything is
 * big-endian except the W2ru/W2ku locator paths (UTF-16LE).
 *
 * This file only encodes and decodes; it never touches a file.
 */
import { randomBytes } from "node:crypto";

export const SECTOR = 512;
export const FOOTER_SIZE = 512;
export const DYNAMIC_HEADER_SIZE = 1024;
export const FOOTER_COOKIE = "conectix";
export const DYNAMIC_COOKIE = "cxsparse";
export const FORMAT_VERSION = 0x00010000;
export const HEADER_VERSION = 0x00010000;
/** Features: bit 1 ("reserved") must always be set. */
export const FEATURES_RESERVED = 0x00000002;
/** BAT entry of a block that is not allocated. */
export const BAT_UNALLOCATED = 0xffffffff;
/** Data offset of a fixed disk ("no dynamic header"): all 64 bits set. */
export const NO_DATA_OFFSET = 0xffffffffffffffffn;
export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;
/** Largest virtual size: 2040 GiB (the limit Hyper-V and QEMU enforce). */
export const MAX_VHD_SIZE = 2040 * 1024 * 1024 * 1024;

export const DISK_TYPE_FIXED = 2;
export const DISK_TYPE_DYNAMIC = 3;
export const DISK_TYPE_DIFFERENCING = 4;

/**
 * DEVNOTE: creator application "win " (Hyper-V). QEMU 7.2 computes the
 * virtual size from the CHS geometry (which rounds down) for every creator
 * except "win ", "qem2", "d2v ", "CTXS" and "tap\0"; for those it uses the
 * current size. Writing "win " makes qemu-img and Windows see exactly the
 * size we store, for every size, without rounding sizes to CHS multiples.
 */
export const CREATOR_APP = "win ";
/** Creator version 10.0 (what Windows Server 2016+ writes). */
export const CREATOR_VERSION = 0x000a0000;
/** Creator host OS "Wi2k" (Windows); "Mac " is the only other value defined. */
export const CREATOR_HOST_OS = 0x5769326b;

/** Parent locator platform codes (spec: "Platform Code"). */
export const PLATFORM_NONE = 0;
export const PLATFORM_W2RU = 0x57327275; // "W2ru": relative path, UTF-16LE
export const PLATFORM_W2KU = 0x57326b75; // "W2ku": absolute path, UTF-16LE
export const PLATFORM_WI2R = 0x57693272; // "Wi2r": deprecated relative path (ANSI)
export const PLATFORM_WI2K = 0x5769326b; // "Wi2k": deprecated absolute path (ANSI)
export const PLATFORM_MAC = 0x4d616320; // "Mac ": Mac OS alias blob
export const PLATFORM_MACX = 0x4d616358; // "MacX": file URL, UTF-8

/** Seconds between the Unix epoch and 2000-01-01 00:00:00 UTC (the VHD epoch). */
const VHD_EPOCH_UNIX_SECONDS = 946684800;

export function vhdTimestamp(unixMs: number = Date.now()): number {
  const seconds = Math.floor(unixMs / 1000) - VHD_EPOCH_UNIX_SECONDS;
  return Math.max(0, Math.min(0xffffffff, seconds));
}

/** One's complement of the byte sum, with the 4 checksum bytes counted as zero. */
export function vhdChecksum(bytes: Uint8Array, checksumOffset: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (i >= checksumOffset && i < checksumOffset + 4) continue;
    sum = (sum + bytes[i]!) >>> 0;
  }
  return (~sum) >>> 0;
}

export interface Geometry {
  readonly cylinders: number;
  readonly heads: number;
  readonly sectorsPerTrack: number;
}

/** CHS geometry for a size, per the spec's appendix algorithm (caps at 65535/16/255). */
export function chsGeometry(sizeBytes: number): Geometry {
  let total = Math.floor(sizeBytes / SECTOR);
  if (total > 65535 * 16 * 255) total = 65535 * 16 * 255;
  let spt: number;
  let heads: number;
  let cth: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(total / spt);
  } else {
    spt = 17;
    cth = Math.floor(total / spt);
    heads = Math.max(4, Math.floor((cth + 1023) / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(total / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(total / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}

export function newUniqueId(): Uint8Array {
  return new Uint8Array(randomBytes(16));
}

/** 16 bytes as 8-4-4-4-12 lowercase hex, in stored byte order. */
export function formatUniqueId(id: Uint8Array): string {
  const hex = Buffer.from(id).toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export function parseUniqueId(text: string): Uint8Array | undefined {
  const hex = text.replace(/[-{}]/g, "");
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) return undefined;
  return new Uint8Array(Buffer.from(hex, "hex"));
}

function u64(view: DataView, offset: number): bigint {
  return view.getBigUint64(offset, false);
}

/** Byte offset (a number) from a 64-bit field; all-ones stays as "none" (-1). */
function offsetField(view: DataView, offset: number): number {
  const v = u64(view, offset);
  if (v === NO_DATA_OFFSET || v === 0xffffffffn) return -1;
  return Number(v);
}

export interface VhdFooter {
  readonly cookie: string;
  readonly features: number;
  readonly formatVersion: number;
  /** Offset of the dynamic header, or -1 (fixed disks). */
  readonly dataOffset: number;
  readonly timestamp: number;
  readonly creatorApp: string;
  readonly creatorVersion: number;
  readonly creatorHostOs: number;
  readonly originalSize: number;
  readonly currentSize: number;
  readonly geometry: Geometry;
  readonly diskType: number;
  readonly checksum: number;
  readonly uniqueId: Uint8Array;
  readonly savedState: number;
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; reason: string };

export function decodeFooter(bytes: Uint8Array): Decoded<VhdFooter> {
  if (bytes.length < FOOTER_SIZE) return { ok: false, reason: "truncated" };
  const b = bytes.subarray(0, FOOTER_SIZE);
  const view = new DataView(b.buffer, b.byteOffset, FOOTER_SIZE);
  const cookie = Buffer.from(b.subarray(0, 8)).toString("latin1");
  if (cookie !== FOOTER_COOKIE) return { ok: false, reason: `no "conectix" cookie` };
  const checksum = view.getUint32(64, false);
  const computed = vhdChecksum(b, 64);
  if (checksum !== computed) {
    return { ok: false, reason: `checksum mismatch (stored 0x${checksum.toString(16)}, computed 0x${computed.toString(16)})` };
  }
  const diskType = view.getUint32(60, false);
  if (diskType !== DISK_TYPE_FIXED && diskType !== DISK_TYPE_DYNAMIC && diskType !== DISK_TYPE_DIFFERENCING) {
    return { ok: false, reason: `unsupported disk type ${diskType}` };
  }
  const formatVersion = view.getUint32(12, false);
  if (formatVersion >>> 16 !== 1) return { ok: false, reason: `unsupported format version 0x${formatVersion.toString(16)}` };
  return {
    ok: true,
    value: {
      cookie,
      features: view.getUint32(8, false),
      formatVersion,
      dataOffset: offsetField(view, 16),
      timestamp: view.getUint32(24, false),
      creatorApp: Buffer.from(b.subarray(28, 32)).toString("latin1"),
      creatorVersion: view.getUint32(32, false),
      creatorHostOs: view.getUint32(36, false),
      originalSize: Number(u64(view, 40)),
      currentSize: Number(u64(view, 48)),
      geometry: { cylinders: view.getUint16(56, false), heads: b[58]!, sectorsPerTrack: b[59]! },
      diskType,
      checksum,
      uniqueId: new Uint8Array(b.subarray(68, 84)),
      savedState: b[84]!,
    },
  };
}

/** Encode a footer; the checksum is computed here (the field in `footer` is ignored). */
export function encodeFooter(footer: Omit<VhdFooter, "checksum" | "cookie">): Uint8Array {
  const b = new Uint8Array(FOOTER_SIZE);
  const view = new DataView(b.buffer);
  b.set(Buffer.from(FOOTER_COOKIE, "latin1"), 0);
  view.setUint32(8, footer.features, false);
  view.setUint32(12, footer.formatVersion, false);
  view.setBigUint64(16, footer.dataOffset < 0 ? NO_DATA_OFFSET : BigInt(footer.dataOffset), false);
  view.setUint32(24, footer.timestamp >>> 0, false);
  b.set(Buffer.from(footer.creatorApp.padEnd(4, "\0").slice(0, 4), "latin1"), 28);
  view.setUint32(32, footer.creatorVersion >>> 0, false);
  view.setUint32(36, footer.creatorHostOs >>> 0, false);
  view.setBigUint64(40, BigInt(footer.originalSize), false);
  view.setBigUint64(48, BigInt(footer.currentSize), false);
  view.setUint16(56, footer.geometry.cylinders, false);
  b[58] = footer.geometry.heads;
  b[59] = footer.geometry.sectorsPerTrack;
  view.setUint32(60, footer.diskType, false);
  b.set(footer.uniqueId.subarray(0, 16), 68);
  b[84] = footer.savedState;
  view.setUint32(64, vhdChecksum(b, 64), false);
  return b;
}

export interface ParentLocatorEntry {
  readonly platformCode: number;
  /** As stored: the spec says 512-byte sectors; some writers store bytes. */
  readonly platformDataSpace: number;
  readonly platformDataLength: number;
  readonly platformDataOffset: number;
}

export interface DynamicHeader {
  readonly tableOffset: number;
  readonly headerVersion: number;
  readonly maxTableEntries: number;
  readonly blockSize: number;
  readonly checksum: number;
  readonly parentUniqueId: Uint8Array;
  readonly parentTimestamp: number;
  /** Parent Unicode Name (UTF-16BE, NUL-terminated or padded). */
  readonly parentUnicodeName: string;
  /** Always eight entries (unused ones have platform code 0). */
  readonly parentLocators: readonly ParentLocatorEntry[];
}

export function decodeDynamicHeader(bytes: Uint8Array): Decoded<DynamicHeader> {
  if (bytes.length < DYNAMIC_HEADER_SIZE) return { ok: false, reason: "truncated" };
  const b = bytes.subarray(0, DYNAMIC_HEADER_SIZE);
  const view = new DataView(b.buffer, b.byteOffset, DYNAMIC_HEADER_SIZE);
  if (Buffer.from(b.subarray(0, 8)).toString("latin1") !== DYNAMIC_COOKIE) return { ok: false, reason: `no "cxsparse" cookie` };
  const checksum = view.getUint32(36, false);
  const computed = vhdChecksum(b, 36);
  if (checksum !== computed) {
    return { ok: false, reason: `checksum mismatch (stored 0x${checksum.toString(16)}, computed 0x${computed.toString(16)})` };
  }
  const headerVersion = view.getUint32(24, false);
  if (headerVersion >>> 16 !== 1) return { ok: false, reason: `unsupported header version 0x${headerVersion.toString(16)}` };
  const locators: ParentLocatorEntry[] = [];
  for (let i = 0; i < 8; i++) {
    const o = 576 + i * 24;
    locators.push({
      platformCode: view.getUint32(o, false),
      platformDataSpace: view.getUint32(o + 4, false),
      platformDataLength: view.getUint32(o + 8, false),
      platformDataOffset: Number(view.getBigUint64(o + 16, false)),
    });
  }
  return {
    ok: true,
    value: {
      tableOffset: Number(view.getBigUint64(16, false)),
      headerVersion,
      maxTableEntries: view.getUint32(28, false),
      blockSize: view.getUint32(32, false),
      checksum,
      parentUniqueId: new Uint8Array(b.subarray(40, 56)),
      parentTimestamp: view.getUint32(56, false),
      parentUnicodeName: decodeUtf16(b.subarray(64, 576), "be"),
      parentLocators: locators,
    },
  };
}

export function encodeDynamicHeader(h: Omit<DynamicHeader, "checksum" | "headerVersion">): Uint8Array {
  const b = new Uint8Array(DYNAMIC_HEADER_SIZE);
  const view = new DataView(b.buffer);
  b.set(Buffer.from(DYNAMIC_COOKIE, "latin1"), 0);
  view.setBigUint64(8, NO_DATA_OFFSET, false);
  view.setBigUint64(16, BigInt(h.tableOffset), false);
  view.setUint32(24, HEADER_VERSION, false);
  view.setUint32(28, h.maxTableEntries >>> 0, false);
  view.setUint32(32, h.blockSize >>> 0, false);
  b.set(h.parentUniqueId.subarray(0, 16), 40);
  view.setUint32(56, h.parentTimestamp >>> 0, false);
  const name = encodeUtf16(h.parentUnicodeName, "be");
  b.set(name.subarray(0, Math.min(name.length, 512)), 64);
  for (let i = 0; i < 8; i++) {
    const e = h.parentLocators[i];
    if (!e) continue;
    const o = 576 + i * 24;
    view.setUint32(o, e.platformCode >>> 0, false);
    view.setUint32(o + 4, e.platformDataSpace >>> 0, false);
    view.setUint32(o + 8, e.platformDataLength >>> 0, false);
    view.setBigUint64(o + 16, BigInt(e.platformDataOffset), false);
  }
  view.setUint32(36, vhdChecksum(b, 36), false);
  return b;
}

export function encodeUtf16(text: string, endian: "le" | "be"): Uint8Array {
  const le = Buffer.from(text, "utf16le");
  if (endian === "le") return new Uint8Array(le);
  const be = new Uint8Array(le.length);
  for (let i = 0; i + 1 < le.length; i += 2) {
    be[i] = le[i + 1]!;
    be[i + 1] = le[i]!;
  }
  return be;
}

export function decodeUtf16(bytes: Uint8Array, endian: "le" | "be"): string {
  const n = bytes.length & ~1;
  const le = Buffer.alloc(n);
  for (let i = 0; i < n; i += 2) {
    le[i] = endian === "le" ? bytes[i]! : bytes[i + 1]!;
    le[i + 1] = endian === "le" ? bytes[i + 1]! : bytes[i]!;
  }
  const text = le.toString("utf16le");
  const nul = text.indexOf("\0");
  return nul < 0 ? text : text.slice(0, nul);
}

/** Bytes of one block's sector bitmap: one bit per sector, padded to a whole sector. */
export function bitmapBytes(blockSize: number): number {
  const bits = blockSize / SECTOR;
  return Math.ceil(bits / 8 / SECTOR) * SECTOR;
}

/** Sector bitmap bit order is most-significant bit first within each byte. */
export function bitIsSet(bitmap: Uint8Array, sector: number): boolean {
  return ((bitmap[sector >> 3]! >> (7 - (sector & 7))) & 1) === 1;
}

/** Set bits [from, to); returns whether anything changed. */
export function setBits(bitmap: Uint8Array, from: number, to: number): boolean {
  let changed = false;
  let s = from;
  while (s < to) {
    if ((s & 7) === 0 && s + 8 <= to) {
      if (bitmap[s >> 3] !== 0xff) {
        bitmap[s >> 3] = 0xff;
        changed = true;
      }
      s += 8;
      continue;
    }
    const mask = 1 << (7 - (s & 7));
    if ((bitmap[s >> 3]! & mask) === 0) {
      bitmap[s >> 3]! |= mask;
      changed = true;
    }
    s++;
  }
  return changed;
}

/** End (exclusive) of the run of sectors starting at `from` that share its bit, capped at `to`. */
export function runEnd(bitmap: Uint8Array, from: number, to: number): number {
  const state = bitIsSet(bitmap, from);
  const full = state ? 0xff : 0x00;
  let s = from + 1;
  while (s < to) {
    if ((s & 7) === 0 && s + 8 <= to && bitmap[s >> 3] === full) {
      s += 8;
      continue;
    }
    if (bitIsSet(bitmap, s) !== state) break;
    s++;
  }
  return s;
}

export function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}
