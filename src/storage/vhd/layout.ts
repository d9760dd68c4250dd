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
  DISK_TYPE_FIXED,
  DYNAMIC_HEADER_SIZE,
  FOOTER_SIZE,
  MAX_VHD_SIZE,
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
  /** End of everything the metadata references (header, BAT, locators, blocks). */
  readonly usedEnd: number;
  /** Where the end footer is (dynamic: where the next block goes). */
  readonly endOffset: number;
  readonly locators: readonly ParentLocator[];
  /** Human-readable remarks (tolerated damage) for check and open. */
  readonly notes: readonly string[];
}

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

export function decodeLocators(fd: number, header: DynamicHeader, fileSize: number): ParentLocator[] {
  const out: ParentLocator[] = [];
  for (const e of header.parentLocators) {
    if (e.platformCode === PLATFORM_NONE || e.platformDataLength === 0) continue;
    if (e.platformDataOffset + e.platformDataLength > fileSize || e.platformDataLength > 65536) continue;
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
  for (const e of header.parentLocators) {
    if (e.platformCode === PLATFORM_NONE) continue;
    usedEnd = Math.max(usedEnd, e.platformDataOffset + Math.max(e.platformDataLength, locatorSpaceBytes(e)));
  }
  const locators = decodeLocators(fd, header, fileSize);
  if (header.parentUnicodeName !== "") locators.push({ kind: "name", path: header.parentUnicodeName });
  // Without a valid end footer, nothing referenced lies past usedEnd: the
  // footer belongs right there (what follows is unpublished or torn).
  const endOffset = alignUp(endDecoded.ok ? Math.max(endAt, usedEnd) : usedEnd, SECTOR);
  return { fileSize, footer, endFooter, copyFooter, header, bat, bitmapSize, usedEnd, endOffset, locators, notes };
}
