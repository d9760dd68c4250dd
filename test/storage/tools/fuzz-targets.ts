/**
 * Where the interesting bytes of a VHD or VHDX file are (footers, headers,
 * BATs, region tables, metadata, log, parent locators), found by a minimal
 * parse of a valid image, and how to re-seal a structure's checksum after
 * mutating it so mutations reach past the first integrity check.
 */

export interface Target {
  readonly name: string;
  readonly offset: number;
  readonly length: number;
  /** Re-seal the checksum of the structure containing this target (applied to the whole file buffer). */
  readonly reseal?: (file: Uint8Array) => void;
  /** Byte order of the integer fields in this structure. */
  readonly bigEndian: boolean;
}

const dv = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);

// ---- VHD -----------------------------------------------------------------

function vhdChecksum(file: Uint8Array, start: number, length: number, at: number): void {
  const v = dv(file);
  if (start + length > file.length) return;
  v.setUint32(at, 0);
  let sum = 0;
  for (let i = start; i < start + length; i++) sum = (sum + file[i]!) >>> 0;
  v.setUint32(at, ~sum >>> 0);
}

export function vhdTargets(file: Uint8Array): Target[] {
  const v = dv(file);
  const size = file.length;
  const footerAt = size - 512;
  const t: Target[] = [
    { name: "vhd footer", offset: footerAt, length: 512, bigEndian: true, reseal: (f) => vhdChecksum(f, f.length - 512, 512, f.length - 512 + 64) },
  ];
  const diskType = v.getUint32(footerAt + 60);
  if (diskType === 3 || diskType === 4) {
    t.push({ name: "vhd footer copy", offset: 0, length: 512, bigEndian: true, reseal: (f) => vhdChecksum(f, 0, 512, 64) });
    const hdr = Number(v.getBigUint64(footerAt + 16));
    t.push({ name: "vhd dynamic header", offset: hdr, length: 1024, bigEndian: true, reseal: (f) => vhdChecksum(f, hdr, 1024, hdr + 36) });
    const bat = Number(v.getBigUint64(hdr + 16));
    const entries = v.getUint32(hdr + 28);
    t.push({ name: "vhd bat", offset: bat, length: Math.min(entries * 4, size - bat), bigEndian: true });
    for (let i = 0; i < 8; i++) {
      const e = hdr + 576 + i * 24;
      const code = v.getUint32(e);
      if (code === 0) continue;
      const off = Number(v.getBigUint64(e + 16));
      const len = v.getUint32(e + 8);
      if (off + len <= size) t.push({ name: `vhd parent locator ${i}`, offset: off, length: Math.max(1, len), bigEndian: true });
    }
    const blockSize = v.getUint32(hdr + 32);
    for (let i = 0; i < Math.min(entries, 64); i++) {
      const sector = v.getUint32(bat + i * 4);
      if (sector !== 0xffffffff && sector * 512 < size) {
        t.push({ name: "vhd block bitmap", offset: sector * 512, length: Math.min(512, size - sector * 512), bigEndian: true });
        t.push({ name: "vhd block data", offset: sector * 512 + 512, length: Math.min(blockSize, 4096), bigEndian: true });
        break;
      }
    }
  }
  return t;
}

// ---- VHDX ----------------------------------------------------------------

const CRC32C_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[i] = c >>> 0;
  }
  return table;
})();

function crc32c(b: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < b.length; i++) c = CRC32C_TABLE[(c ^ b[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function vhdxChecksum(file: Uint8Array, start: number, length: number): void {
  if (start + length > file.length) return;
  const v = dv(file);
  v.setUint32(start + 4, 0, true);
  v.setUint32(start + 4, crc32c(file.subarray(start, start + length)), true);
}

function guidAt(file: Uint8Array, at: number): string {
  return Buffer.from(file.subarray(at, at + 16)).toString("hex");
}

const BAT_GUID = Buffer.from([0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08]).toString("hex");
const METADATA_GUID = Buffer.from([0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e]).toString("hex");

export function vhdxTargets(file: Uint8Array): Target[] {
  const v = dv(file);
  const K = 1024;
  const t: Target[] = [{ name: "vhdx file identifier", offset: 0, length: 512, bigEndian: false }];
  for (const at of [64 * K, 128 * K]) {
    t.push({ name: `vhdx header @${at / K}K`, offset: at, length: 128, bigEndian: false, reseal: (f) => vhdxChecksum(f, at, 4096) });
  }
  for (const at of [192 * K, 256 * K]) {
    const count = Math.min(v.getUint32(at + 8, true), 16);
    t.push({ name: `vhdx region table @${at / K}K`, offset: at, length: 16 + 32 * count, bigEndian: false, reseal: (f) => vhdxChecksum(f, at, 64 * K) });
  }
  // Log, from the header with the higher sequence number.
  const h = v.getBigUint64(64 * K + 8, true) >= v.getBigUint64(128 * K + 8, true) ? 64 * K : 128 * K;
  const logLength = v.getUint32(h + 68, true);
  const logOffset = Number(v.getBigUint64(h + 72, true));
  if (logOffset > 0 && logOffset < file.length) {
    t.push({ name: "vhdx log", offset: logOffset, length: Math.min(logLength, 64 * K, file.length - logOffset), bigEndian: false });
    const entryLength = v.getUint32(logOffset + 8, true);
    if (file[logOffset] === 0x6c && entryLength >= 4096 && entryLength <= logLength)
      t.push({ name: "vhdx log entry", offset: logOffset, length: Math.min(entryLength, 8 * K), bigEndian: false, reseal: (f) => vhdxChecksum(f, logOffset, entryLength) });
  }
  const rt = 192 * K;
  const count = Math.min(v.getUint32(rt + 8, true), 16);
  for (let i = 0; i < count; i++) {
    const e = rt + 16 + 32 * i;
    const guid = guidAt(file, e);
    const off = Number(v.getBigUint64(e + 16, true));
    const len = v.getUint32(e + 24, true);
    if (off >= file.length) continue;
    if (guid === BAT_GUID) t.push({ name: "vhdx bat", offset: off, length: Math.min(len, 4096, file.length - off), bigEndian: false });
    if (guid === METADATA_GUID) {
      const items = Math.min(v.getUint16(off + 10, true), 64);
      t.push({ name: "vhdx metadata table", offset: off, length: 32 + 32 * items, bigEndian: false });
      for (let k = 0; k < items; k++) {
        const item = off + 32 + 32 * k;
        const io = v.getUint32(item + 16, true);
        const il = v.getUint32(item + 20, true);
        if (off + io + il <= file.length && il > 0) t.push({ name: "vhdx metadata item", offset: off + io, length: Math.min(il, 1024), bigEndian: false });
      }
    }
  }
  return t;
}
