/**
 * Header section (MS-VHDX 2.2): the file type identifier at 0 and the two
 * 4 KiB headers at 64 KiB and 128 KiB. The current header is the valid one
 * (signature, CRC-32C, version 1) with the higher sequence number.
 */
import { DiskError } from "../block-device.js";
import { crc32cWithZeroField } from "./crc32c.js";
import { guidIsZero, type Guid } from "./guid.js";
import { KiB, MiB } from "./host-file.js";

export const FILE_SIGNATURE = "vhdxfile";
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
export const HEADER_SIZE = 4 * KiB;
const HEADER_SIGNATURE = 0x64616568; // "head"

export interface VhdxHeader {
  readonly sequenceNumber: bigint;
  readonly fileWriteGuid: Guid;
  readonly dataWriteGuid: Guid;
  readonly logGuid: Guid;
  readonly logVersion: number;
  readonly version: number;
  readonly logLength: number;
  readonly logOffset: number;
}

export function encodeFileIdentifier(creator: string): Buffer {
  const b = Buffer.alloc(64 * KiB);
  b.write(FILE_SIGNATURE, 0, "latin1");
  b.write(creator.slice(0, 255), 8, "utf16le");
  return b;
}

export function isFileIdentifier(head: Uint8Array): boolean {
  return head.length >= 8 && Buffer.from(head.buffer, head.byteOffset, 8).toString("latin1") === FILE_SIGNATURE;
}

export function decodeCreator(b: Buffer): string {
  const raw = b.subarray(8, 8 + 512).toString("utf16le");
  const nul = raw.indexOf("\u0000");
  return nul >= 0 ? raw.slice(0, nul) : raw;
}

export function encodeHeader(h: VhdxHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.writeUInt32LE(HEADER_SIGNATURE, 0);
  b.writeBigUInt64LE(h.sequenceNumber, 8);
  h.fileWriteGuid.copy(b, 16);
  h.dataWriteGuid.copy(b, 32);
  h.logGuid.copy(b, 48);
  b.writeUInt16LE(h.logVersion, 64);
  b.writeUInt16LE(h.version, 66);
  b.writeUInt32LE(h.logLength, 68);
  b.writeBigUInt64LE(BigInt(h.logOffset), 72);
  b.writeUInt32LE(crc32cWithZeroField(b, 4), 4);
  return b;
}

/** Decode one header copy; a string says why it is not valid. */
export function decodeHeader(b: Buffer): VhdxHeader | string {
  if (b.readUInt32LE(0) !== HEADER_SIGNATURE) return "bad signature (expected \"head\")";
  const stored = b.readUInt32LE(4);
  const actual = crc32cWithZeroField(b, 4, HEADER_SIZE);
  if (stored !== actual) return `bad CRC-32C (stored 0x${stored.toString(16)}, computed 0x${actual.toString(16)})`;
  const version = b.readUInt16LE(66);
  if (version !== 1) return `unsupported version ${version} (expected 1)`;
  const logOffset = b.readBigUInt64LE(72);
  if (logOffset > BigInt(Number.MAX_SAFE_INTEGER)) return "log offset out of range";
  return {
    sequenceNumber: b.readBigUInt64LE(8),
    fileWriteGuid: Buffer.from(b.subarray(16, 32)),
    dataWriteGuid: Buffer.from(b.subarray(32, 48)),
    logGuid: Buffer.from(b.subarray(48, 64)),
    logVersion: b.readUInt16LE(64),
    version,
    logLength: b.readUInt32LE(68),
    logOffset: Number(logOffset),
  };
}

export interface HeaderPair {
  readonly headers: readonly [VhdxHeader | string, VhdxHeader | string];
  /** Slot (0: 64 KiB, 1: 128 KiB) of the current header. */
  readonly current: 0 | 1;
}

/** Pick the current header; both invalid is a DiskError naming both problems. */
export function chooseCurrentHeader(path: string, copies: [Buffer, Buffer]): HeaderPair {
  const h0 = decodeHeader(copies[0]);
  const h1 = decodeHeader(copies[1]);
  if (typeof h0 === "string" && typeof h1 === "string") {
    throw new DiskError("VHDX_NO_VALID_HEADER", `no valid VHDX header: header 1 (64 KiB) has ${h0}; header 2 (128 KiB) has ${h1}`, path);
  }
  let current: 0 | 1;
  if (typeof h0 === "string") current = 1;
  else if (typeof h1 === "string") current = 0;
  else current = h1.sequenceNumber > h0.sequenceNumber ? 1 : 0;
  return { headers: [h0, h1], current };
}

/** Checks on the current header's log fields before anything uses them. */
export function validateLogFields(path: string, h: VhdxHeader): void {
  if (h.logVersion !== 0 && !guidIsZero(h.logGuid)) {
    throw new DiskError("VHDX_UNSUPPORTED_LOG", `log version ${h.logVersion} is not supported and the log needs replay`, path);
  }
  if (h.logLength % MiB !== 0) throw new DiskError("VHDX_BAD_HEADER", `log length ${h.logLength} is not a multiple of 1 MiB`, path);
  if (h.logLength > 0 && (h.logOffset % MiB !== 0 || h.logOffset < MiB)) {
    throw new DiskError("VHDX_BAD_HEADER", `log offset ${h.logOffset} is not a 1 MiB multiple at or after 1 MiB`, path);
  }
}
