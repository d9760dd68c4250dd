/**
 * GUIDs in their Microsoft binary form (MS-VHDX 1.1: Data1..Data3 little
 * endian, Data4 as bytes) and their "8-4-4-4-12" text form.
 */
import { randomBytes } from "node:crypto";

export type Guid = Buffer;

export const ZERO_GUID: Guid = Buffer.alloc(16);

/** Binary form of "2DC27766-F623-4200-9D64-115E9BFD4A08" (braces optional, any case). */
export function guidFromString(text: string): Guid | undefined {
  const m = /^\{?([0-9a-fA-F]{8})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-([0-9a-fA-F]{12})\}?$/.exec(text.trim());
  if (!m) return undefined;
  const b = Buffer.alloc(16);
  b.writeUInt32LE(parseInt(m[1]!, 16), 0);
  b.writeUInt16LE(parseInt(m[2]!, 16), 4);
  b.writeUInt16LE(parseInt(m[3]!, 16), 6);
  Buffer.from(m[4]! + m[5]!, "hex").copy(b, 8);
  return b;
}

export function knownGuid(text: string): Guid {
  const g = guidFromString(text);
  if (!g) throw new Error(`bad GUID literal ${text}`);
  return g;
}

export function guidToString(g: Uint8Array): string {
  const b = Buffer.from(g.buffer, g.byteOffset, 16);
  const h = (n: number, w: number): string => n.toString(16).padStart(w, "0");
  return `${h(b.readUInt32LE(0), 8)}-${h(b.readUInt16LE(4), 4)}-${h(b.readUInt16LE(6), 4)}-${b.subarray(8, 10).toString("hex")}-${b.subarray(10, 16).toString("hex")}`;
}

export function newGuid(): Guid {
  const b = randomBytes(16);
  // RFC 4122 version 4 bits (in the Microsoft byte order of Data3).
  b[7] = (b[7]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  return b;
}

export function guidIsZero(g: Uint8Array): boolean {
  for (let i = 0; i < 16; i++) if (g[i] !== 0) return false;
  return true;
}

export function guidEquals(a: Uint8Array, b: Uint8Array): boolean {
  for (let i = 0; i < 16; i++) if (a[i] !== b[i]) return false;
  return true;
}
