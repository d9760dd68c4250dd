/**
 * Reading a VHD file's structures into a validated layout: which footer is
 * authoritative (end, or the copy at offset 0 when the end one is missing or
 * damaged), the dynamic header, the BAT, the parent locators, and where the
 * next block goes. Shared by open, describe, check, resize and setParent.
 *
 * Errors name the file and the structure with its offset ("dynamic header at
 * offset 512: checksum mismatch ...").
 */
import * as fs from "node:fs";
import { DiskError } from "../block-device.js";
import type { ParentLocator } from "../chain.js";
import { preadFully } from "../raw.js";
import {
  BAT_UNALLOCATED,
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_FIXED,
  DYNAMIC_HEADER_SIZE,
  FOOTER_SIZE,
  MAX_VHD_SIZE,
  PLATFORM_MAC,
  PLATFORM_MACX,
  PLATFORM_NONE,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
  PLATFORM_WI2K,
  PLATFORM_WI2R,
  SECTOR,
  alignUp,
  bitmapBytes,
  decodeDynamicHeader,
  decodeFooter,
  decodeUtf16,
  type DynamicHeader,
  type ParentLocatorEntry,
  type VhdFooter,
} from "./spec.js";

export type FooterState = { state: "ok" } | { state: "missing" | "corrupt"; reason: string };

export interface VhdLayout {
  readonly fileSize: number;
  readonly footer: VhdFooter;
  /** State of the footer at the end of the file and of the copy at offset 0. */
  readonly endFooter: FooterState;
  readonly copyFooter: FooterState;
  /** Present for dynamic and differencing disks. */
  readonly header: DynamicHeader | undefined;
  readonly bat: Uint32Array;
  readonly bitmapSize: number;
  /**
   * End of everything the metadata references (header, BAT, validated
   * locators, blocks). Derived only from validated structures: at most one
   * block past the end of the file.
   */
  readonly usedEnd: number;
  /** Where the end footer is (dynamic: where the next block goes). */
  readonly endOffset: number;
  readonly locators: readonly ParentLocator[];
  /**
   * The parent locator entries in use, validated (differencing disks only;
   * a dynamic disk's locator entries are ignored): where their data space lies.
   */
  readonly locatorEntries: readonly ValidLocator[];
  /** Human-readable remarks (tolerated damage) for check and open. */
  readonly notes: readonly string[];
}

export interface ValidLocator {
  /** Index of the entry in the dynamic header (0..7). */
  readonly index: number;
  readonly entry: ParentLocatorEntry;
  /** Byte range of the entry's data space in the file. */
  readonly start: number;
  readonly end: number;
}

/** Platform codes the spec defines (besides None). */
const KNOWN_PLATFORMS = new Set([PLATFORM_WI2R, PLATFORM_WI2K, PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MAC, PLATFORM_MACX]);
/** Longest locator data accepted (a path; Windows allows 32767 UTF-16 units). */
const MAX_LOCATOR_DATA = 65536;

export function fail(path: string, code: string, message: string, offset?: number): never {
  throw new DiskError(code, message, path, offset === undefined ? {} : { offset });
}

export function readAt(fd: number, offset: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  preadFully(fd, b, offset);
  return b;
}

/** Locator data space in bytes: the spec says sectors, some writers store bytes. */
export function locatorSpaceBytes(e: ParentLocatorEntry): number {
  if (e.platformDataSpace >= SECTOR && e.platformDataSpace % SECTOR === 0) return e.platformDataSpace;
  return e.platformDataSpace * SECTOR;
}

export function platformCodeName(code: number): string {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(code >>> 0);
  return b.toString("latin1").replace(/\0/g, "");
}

export function decodeLocators(fd: number, valid: readonly ValidLocator[]): ParentLocator[] {
  const out: ParentLocator[] = [];
  for (const { entry: e } of valid) {
    if (e.platformDataLength === 0) continue;
    const data = readAt(fd, e.platformDataOffset, e.platformDataLength);
    let kind: string;
    let path: string;
    switch (e.platformCode) {
      case PLATFORM_W2RU:
        kind = "relative";
        path = decodeUtf16(data, "le");
        break;
      case PLATFORM_W2KU:
        kind = "absolute";
        path = decodeUtf16(data, "le");
        break;
      case PLATFORM_WI2R:
        kind = "relative";
        path = Buffer.from(data).toString("latin1").replace(/\0.*$/s, "");
        break;
      case PLATFORM_WI2K:
        kind = "absolute";
        path = Buffer.from(data).toString("latin1").replace(/\0.*$/s, "");
        break;
      case PLATFORM_MACX:
        kind = "absolute";
        path = decodeURIComponent(Buffer.from(data).toString("utf8").replace(/\0.*$/s, "").replace(/^file:\/\/(localhost)?/, ""));
        break;
      default:
        kind = platformCodeName(e.platformCode);
        path = Buffer.from(data).toString("utf8").replace(/\0.*$/s, "");
    }
    out.push({ kind, path });
  }
  return out;
}

/**
 * The parent locator entries of a differencing disk, each validated: a
 * platform code the spec defines, data length within the data space and at
 * most MAX_LOCATOR_DATA, the data space inside the file and clear of the
 * footer copy, the dynamic header, the BAT, the end footer and the other
 * locators. An invalid entry is an error naming the file and the entry.
 */
function validateLocators(
  path: string,
  header: DynamicHeader,
  hdrAt: number,
  batBytes: number,
  fileSize: number,
  endFooterAt: number | undefined,
): ValidLocator[] {
  const limit = endFooterAt ?? fileSize;
  const fixed = [
    { start: 0, end: FOOTER_SIZE, what: "the footer copy at offset 0" },
    { start: hdrAt, end: hdrAt + DYNAMIC_HEADER_SIZE, what: `the dynamic header at offset ${hdrAt}` },
    { start: header.tableOffset, end: header.tableOffset + batBytes, what: `the BAT at offset ${header.tableOffset}` },
  ];
  const out: ValidLocator[] = [];
  header.parentLocators.forEach((e, index) => {
    if (e.platformCode === PLATFORM_NONE) return;
    const entryAt = hdrAt + 576 + index * 24;
    const bad = (why: string): never =>
      fail(path, "VHD_BAD_LOCATOR", `dynamic header at offset ${hdrAt}: parent locator ${index} (platform "${platformCodeName(e.platformCode)}"): ${why}`, entryAt);
    if (!KNOWN_PLATFORMS.has(e.platformCode)) bad(`unknown platform code 0x${(e.platformCode >>> 0).toString(16)}`);
    const space = locatorSpaceBytes(e);
    const start = e.platformDataOffset;
    const end = start + space;
    if (e.platformDataLength > space) bad(`data length ${e.platformDataLength} exceeds its data space of ${space} bytes`);
    if (e.platformDataLength > MAX_LOCATOR_DATA) bad(`data length ${e.platformDataLength} exceeds ${MAX_LOCATOR_DATA} bytes`);
    if (space === 0 && e.platformDataLength === 0) return; // an empty entry: nothing to read or keep clear
    if (!Number.isSafeInteger(end) || start < 0 || end > limit) {
      bad(`data space at offset ${start} (${space} bytes) is not inside the file (${endFooterAt === undefined ? `${fileSize} bytes` : `end footer at ${endFooterAt}`})`);
    }
    for (const m of fixed) {
      if (start < m.end && m.start < end) bad(`data space at offset ${start} (${space} bytes) overlaps ${m.what}`);
    }
    for (const o of out) {
      if (start < o.end && o.start < end) bad(`data space at offset ${start} (${space} bytes) overlaps that of parent locator ${o.index}`);
    }
    out.push({ index, entry: e, start, end });
  });
  return out;
}

export function loadLayout(path: string, fd: number): VhdLayout {
  const fileSize = fs.fstatSync(fd).size;
  if (fileSize < FOOTER_SIZE) fail(path, "VHD_TRUNCATED", `file of ${fileSize} bytes is too small to hold a VHD footer`);
  const notes: string[] = [];
  const endAt = fileSize - FOOTER_SIZE;
  const endDecoded = decodeFooter(readAt(fd, endAt, FOOTER_SIZE));
  const copyDecoded = decodeFooter(readAt(fd, 0, FOOTER_SIZE));
  const endFooter: FooterState = endDecoded.ok
    ? { state: "ok" }
    : { state: endDecoded.reason.startsWith("no ") ? "missing" : "corrupt", reason: endDecoded.reason };
  const copyFooter: FooterState = copyDecoded.ok
    ? { state: "ok" }
    : { state: copyDecoded.reason.startsWith("no ") ? "missing" : "corrupt", reason: copyDecoded.reason };

  let footer: VhdFooter;
  if (endDecoded.ok) {
    footer = endDecoded.value;
  } else if (copyDecoded.ok && copyDecoded.value.diskType !== DISK_TYPE_FIXED) {
    footer = copyDecoded.value;
    notes.push(`footer at offset ${endAt} (end of file): ${endDecoded.reason}; using the copy at offset 0`);
  } else if (!copyDecoded.ok && copyFooter.state === "corrupt" && endFooter.state === "missing") {
    fail(path, "VHD_BAD_FOOTER", `footer copy at offset 0: ${copyDecoded.reason}, and no footer at offset ${endAt} (end of file)`, 0);
  } else {
    fail(path, "VHD_BAD_FOOTER", `footer at offset ${endAt} (end of file): ${endDecoded.reason}`, endAt);
  }

  if (footer.currentSize % SECTOR !== 0) {
    fail(path, "VHD_BAD_FOOTER", `footer: current size ${footer.currentSize} is not a multiple of ${SECTOR}`);
  }
  if (footer.currentSize > MAX_VHD_SIZE) {
    fail(path, "VHD_TOO_LARGE", `virtual size ${footer.currentSize} exceeds the VHD maximum of 2040 GiB (${MAX_VHD_SIZE} bytes)`);
  }

  if (footer.diskType === DISK_TYPE_FIXED) {
    if (fileSize < footer.currentSize + FOOTER_SIZE) {
      fail(path, "VHD_TRUNCATED", `fixed disk of ${footer.currentSize} bytes needs a file of ${footer.currentSize + FOOTER_SIZE} bytes, found ${fileSize}`);
    }
    return {
      fileSize,
      footer,
      endFooter,
      copyFooter,
      header: undefined,
      bat: new Uint32Array(0),
      bitmapSize: 0,
      usedEnd: footer.currentSize,
      endOffset: endAt,
      locators: [],
      locatorEntries: [],
      notes,
    };
  }

  if (endDecoded.ok && copyDecoded.ok && Buffer.compare(readAt(fd, 0, FOOTER_SIZE), readAt(fd, endAt, FOOTER_SIZE)) !== 0) {
    notes.push("the footer copy at offset 0 differs from the footer at the end of the file");
  } else if (endDecoded.ok && !copyDecoded.ok) {
    notes.push(`footer copy at offset 0: ${copyDecoded.reason}`);
  }

  const hdrAt = footer.dataOffset;
  if (hdrAt < 0 || hdrAt % SECTOR !== 0 || hdrAt + DYNAMIC_HEADER_SIZE > fileSize) {
    fail(path, "VHD_BAD_FOOTER", `footer: data offset ${hdrAt} does not point at a dynamic header inside the file`);
  }
  const hdr = decodeDynamicHeader(readAt(fd, hdrAt, DYNAMIC_HEADER_SIZE));
  if (!hdr.ok) fail(path, "VHD_BAD_HEADER", `dynamic header at offset ${hdrAt}: ${hdr.reason}`, hdrAt);
  const header = hdr.value;
  const bs = header.blockSize;
  if (bs < SECTOR || (bs & (bs - 1)) !== 0) {
    fail(path, "VHD_BAD_HEADER", `dynamic header at offset ${hdrAt}: block size ${bs} is not a power of two of at least ${SECTOR}`, hdrAt);
  }
  if (header.maxTableEntries * bs < footer.currentSize) {
    fail(path, "VHD_BAD_HEADER", `dynamic header at offset ${hdrAt}: ${header.maxTableEntries} BAT entries of ${bs} bytes cannot cover ${footer.currentSize} bytes`, hdrAt);
  }
  const batBytes = header.maxTableEntries * 4;
  if (header.tableOffset % SECTOR !== 0 || header.tableOffset + batBytes > fileSize) {
    fail(path, "VHD_BAD_HEADER", `dynamic header at offset ${hdrAt}: BAT at ${header.tableOffset} (${batBytes} bytes) is not inside the file of ${fileSize} bytes`, hdrAt);
  }
  const raw = readAt(fd, header.tableOffset, batBytes);
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const bat = new Uint32Array(header.maxTableEntries);
  const bitmapSize = bitmapBytes(bs);
  let usedEnd = Math.max(hdrAt + DYNAMIC_HEADER_SIZE, alignUp(header.tableOffset + batBytes, SECTOR));
  for (let i = 0; i < bat.length; i++) {
    const e = view.getUint32(i * 4, false);
    bat[i] = e;
    if (e === BAT_UNALLOCATED) continue;
    const at = e * SECTOR;
    if (at + bitmapSize > fileSize) {
      fail(path, "VHD_BAD_BAT", `BAT entry ${i} (at offset ${header.tableOffset + i * 4}) points to offset ${at}, past the end of the file (${fileSize} bytes)`, header.tableOffset + i * 4);
    }
    usedEnd = Math.max(usedEnd, at + bitmapSize + bs);
  }
  // Parent locators mean something only on a differencing disk; elsewhere
  // they are ignored (never read, never counted in the used space).
  const differencing = footer.diskType === DISK_TYPE_DIFFERENCING;
  const locatorEntries = differencing ? validateLocators(path, header, hdrAt, batBytes, fileSize, endDecoded.ok ? endAt : undefined) : [];
  for (const l of locatorEntries) usedEnd = Math.max(usedEnd, l.end);
  const locators = decodeLocators(fd, locatorEntries);
  if (differencing && header.parentUnicodeName !== "") locators.push({ kind: "name", path: header.parentUnicodeName });
  // Without a valid end footer, nothing referenced lies past usedEnd: the
  // footer belongs right there (what follows is unpublished or torn).
  const endOffset = alignUp(endDecoded.ok ? Math.max(endAt, usedEnd) : usedEnd, SECTOR);
  return { fileSize, footer, endFooter, copyFooter, header, bat, bitmapSize, usedEnd, endOffset, locators, locatorEntries, notes };
}
