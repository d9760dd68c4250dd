/**
 * A small ACPI Machine Language encoder (ACPI 6.x spec, chapter 20 "ACPI Machine
 * Language Specification", and 6.4 "Resource Data Types for ACPI").
 *
 * Every builder returns the encoded bytes of one term; composite terms (Scope,
 * Device, Method, Package, Buffer) take already-encoded children. Names are ACPI
 * paths ("\\_SB.PCI0", "_HID", "^FOO"); each segment is at most 4 characters of
 * A-Z, 0-9, '_' (padded with '_').
 */
import { PartisError } from "../../errors.js";

export class AmlError extends PartisError {}

export const AML = {
  ZERO: 0x00,
  ONE: 0x01,
  ALIAS: 0x06,
  NAME: 0x08,
  BYTE_PREFIX: 0x0a,
  WORD_PREFIX: 0x0b,
  DWORD_PREFIX: 0x0c,
  STRING_PREFIX: 0x0d,
  QWORD_PREFIX: 0x0e,
  SCOPE: 0x10,
  BUFFER: 0x11,
  PACKAGE: 0x12,
  VAR_PACKAGE: 0x13,
  METHOD: 0x14,
  DUAL_NAME_PREFIX: 0x2e,
  MULTI_NAME_PREFIX: 0x2f,
  EXT_PREFIX: 0x5b,
  ROOT_CHAR: 0x5c,
  PARENT_PREFIX: 0x5e,
  LOCAL0: 0x60,
  ARG0: 0x68,
  RETURN: 0xa4,
  ONES: 0xff,
  EXT_DEVICE: 0x82,
} as const;

export function concat(...parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** PkgLength (20.2.4): the encoded length counts itself plus `contentLength`. */
export function pkgLength(contentLength: number): Uint8Array {
  for (let n = 1; n <= 4; n++) {
    const total = contentLength + n;
    const limit = n === 1 ? 0x40 : 1 << (4 + 8 * (n - 1));
    if (total >= limit) continue;
    if (n === 1) return Uint8Array.of(total);
    const out = new Uint8Array(n);
    out[0] = ((n - 1) << 6) | (total & 0x0f);
    for (let i = 1; i < n; i++) out[i] = (total >>> (4 + 8 * (i - 1))) & 0xff;
    return out;
  }
  throw new AmlError("AML_TOO_LONG", `AML object of ${contentLength} bytes exceeds the PkgLength limit`);
}

/** Wrap `content` as opcode(s) + PkgLength + content. */
function withPkg(op: readonly number[], content: Uint8Array): Uint8Array {
  return concat(Uint8Array.from(op), pkgLength(content.length), content);
}

const SEG_RE = /^[A-Z_][A-Z0-9_]{0,3}$/;

function nameSeg(seg: string): Uint8Array {
  if (!SEG_RE.test(seg)) throw new AmlError("AML_BAD_NAME", `invalid ACPI name segment "${seg}"`);
  const s = seg.padEnd(4, "_");
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

/** NameString (20.2.2): "\\_SB.PCI0", "^^FOO", "_HID". */
export function nameString(path: string): Uint8Array {
  let i = 0;
  const prefix: number[] = [];
  if (path.startsWith("\\")) {
    prefix.push(AML.ROOT_CHAR);
    i = 1;
  } else {
    while (path[i] === "^") {
      prefix.push(AML.PARENT_PREFIX);
      i++;
    }
  }
  const rest = path.slice(i);
  const segs = rest === "" ? [] : rest.split(".");
  const encoded = segs.map(nameSeg);
  let body: Uint8Array;
  if (segs.length === 0) body = Uint8Array.of(0x00);
  else if (segs.length === 1) body = encoded[0]!;
  else if (segs.length === 2) body = concat(Uint8Array.of(AML.DUAL_NAME_PREFIX), ...encoded);
  else if (segs.length <= 255) body = concat(Uint8Array.of(AML.MULTI_NAME_PREFIX, segs.length), ...encoded);
  else throw new AmlError("AML_BAD_NAME", "ACPI path has too many segments");
  return concat(Uint8Array.from(prefix), body);
}

/** Integer data object with the smallest encoding (Zero, One, Ones, Byte/Word/DWord/QWord). */
export function integer(value: number | bigint): Uint8Array {
  const v = BigInt(value);
  if (v < 0n || v > 0xffff_ffff_ffff_ffffn) throw new AmlError("AML_BAD_INTEGER", `integer ${v} is outside 0..2^64-1`);
  if (v === 0n) return Uint8Array.of(AML.ZERO);
  if (v === 1n) return Uint8Array.of(AML.ONE);
  if (v === 0xffff_ffff_ffff_ffffn) return Uint8Array.of(AML.ONES);
  const fixed = (prefix: number, bytes: number): Uint8Array => {
    const out = new Uint8Array(1 + bytes);
    out[0] = prefix;
    for (let i = 0; i < bytes; i++) out[1 + i] = Number((v >> BigInt(8 * i)) & 0xffn);
    return out;
  };
  if (v <= 0xffn) return fixed(AML.BYTE_PREFIX, 1);
  if (v <= 0xffffn) return fixed(AML.WORD_PREFIX, 2);
  if (v <= 0xffff_ffffn) return fixed(AML.DWORD_PREFIX, 4);
  return fixed(AML.QWORD_PREFIX, 8);
}

/** DWordConst always four bytes (used for EISA ids, whose width is fixed). */
export function dword(value: number): Uint8Array {
  const out = new Uint8Array(5);
  out[0] = AML.DWORD_PREFIX;
  new DataView(out.buffer).setUint32(1, value >>> 0, true);
  return out;
}

export function string(s: string): Uint8Array {
  const bytes = Uint8Array.from(s, (c) => {
    const code = c.charCodeAt(0);
    if (code < 1 || code > 0x7f) throw new AmlError("AML_BAD_STRING", "AML strings are 7-bit ASCII without NUL");
    return code;
  });
  return concat(Uint8Array.of(AML.STRING_PREFIX), bytes, Uint8Array.of(0));
}

/** Compressed EISA id, e.g. "PNP0A03" → 0x030AD041 (stored as a DWordConst). */
export function eisaIdValue(id: string): number {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new AmlError("AML_BAD_EISAID", `"${id}" is not an EISA id (AAA####)`);
  const c = (i: number) => id.charCodeAt(i) - 0x40;
  const mfg = (c(0) << 10) | (c(1) << 5) | c(2);
  const prod = parseInt(id.slice(3), 16);
  // Bytes in memory: mfg (big-endian), product (big-endian).
  return (((mfg >> 8) & 0xff) | ((mfg & 0xff) << 8) | (((prod >> 8) & 0xff) << 16) | ((prod & 0xff) << 24)) >>> 0;
}

export function eisaId(id: string): Uint8Array {
  return dword(eisaIdValue(id));
}

export function name(path: string, value: Uint8Array): Uint8Array {
  return concat(Uint8Array.of(AML.NAME), nameString(path), value);
}

export function scope(path: string, ...terms: readonly Uint8Array[]): Uint8Array {
  return withPkg([AML.SCOPE], concat(nameString(path), ...terms));
}

export function device(path: string, ...terms: readonly Uint8Array[]): Uint8Array {
  return withPkg([AML.EXT_PREFIX, AML.EXT_DEVICE], concat(nameString(path), ...terms));
}

export function method(path: string, argCount: number, serialized: boolean, ...terms: readonly Uint8Array[]): Uint8Array {
  if (!Number.isInteger(argCount) || argCount < 0 || argCount > 7) throw new AmlError("AML_BAD_METHOD", "a method takes 0..7 arguments");
  const flags = argCount | (serialized ? 0x08 : 0);
  return withPkg([AML.METHOD], concat(nameString(path), Uint8Array.of(flags), ...terms));
}

export function ret(value: Uint8Array): Uint8Array {
  return concat(Uint8Array.of(AML.RETURN), value);
}

/** Package of data objects (up to 255 elements; more becomes a VarPackage). */
export function pkg(...elements: readonly Uint8Array[]): Uint8Array {
  if (elements.length <= 255) return withPkg([AML.PACKAGE], concat(Uint8Array.of(elements.length), ...elements));
  return withPkg([AML.VAR_PACKAGE], concat(integer(elements.length), ...elements));
}

export function buffer(bytes: Uint8Array): Uint8Array {
  return withPkg([AML.BUFFER], concat(integer(bytes.length), bytes));
}

// ---- Resource descriptors (ACPI 6.4) ----

/** End Tag (6.4.2.9): checksum 0 means "treat as valid". */
const END_TAG = Uint8Array.of(0x79, 0x00);

/** ResourceTemplate(): a Buffer of descriptors terminated by an End Tag. */
export function resourceTemplate(...descriptors: readonly Uint8Array[]): Uint8Array {
  return buffer(concat(...descriptors, END_TAG));
}

function le(value: number | bigint, bytes: number): number[] {
  const v = BigInt(value);
  const out: number[] = [];
  for (let i = 0; i < bytes; i++) out.push(Number((v >> BigInt(8 * i)) & 0xffn));
  return out;
}

const RT_MEMORY = 0;
const RT_IO = 1;
const RT_BUS = 2;
/** General flags for a producer window: MinFixed | MaxFixed, positive decode. */
const GF_PRODUCER_FIXED = 0x0c;

interface AddressSpace {
  readonly min: number | bigint;
  readonly max: number | bigint;
}

function addressDescriptor(
  tag: number,
  width: 2 | 4 | 8,
  resourceType: number,
  typeFlags: number,
  { min, max }: AddressSpace,
): Uint8Array {
  const lo = BigInt(min);
  const hi = BigInt(max);
  const limit = (1n << BigInt(8 * width)) - 1n;
  if (lo < 0n || hi < lo || hi > limit) throw new AmlError("AML_BAD_RESOURCE", `address range 0x${lo.toString(16)}-0x${hi.toString(16)} does not fit ${width * 8} bits`);
  const body = [
    resourceType,
    GF_PRODUCER_FIXED,
    typeFlags,
    ...le(0, width), // granularity
    ...le(lo, width),
    ...le(hi, width),
    ...le(0, width), // translation offset
    ...le(hi - lo + 1n, width),
  ];
  return Uint8Array.from([tag, ...le(body.length, 2), ...body]);
}

/** WordBusNumber (6.4.3.5.3), producer, fixed. */
export function wordBusNumber(r: AddressSpace): Uint8Array {
  return addressDescriptor(0x88, 2, RT_BUS, 0, r);
}

/** WordIO (6.4.3.5.3): producer window, ISA and non-ISA ranges (_RNG = 3). */
export function wordIo(r: AddressSpace): Uint8Array {
  return addressDescriptor(0x88, 2, RT_IO, 0x03, r);
}

/** DWordIO (6.4.3.5.2). */
export function dwordIo(r: AddressSpace): Uint8Array {
  return addressDescriptor(0x87, 4, RT_IO, 0x03, r);
}

export type MemoryCacheability = "non-cacheable" | "cacheable" | "write-combining" | "prefetchable";
const MEM_CACHE: Record<MemoryCacheability, number> = { "non-cacheable": 0, cacheable: 1, "write-combining": 2, prefetchable: 3 };

export interface MemoryWindow extends AddressSpace {
  readonly cacheability?: MemoryCacheability;
  readonly readOnly?: boolean;
}

function memFlags(w: MemoryWindow): number {
  return (w.readOnly === true ? 0 : 1) | (MEM_CACHE[w.cacheability ?? "cacheable"] << 1);
}

/** DWordMemory (6.4.3.5.2). */
export function dwordMemory(w: MemoryWindow): Uint8Array {
  return addressDescriptor(0x87, 4, RT_MEMORY, memFlags(w), w);
}

/** QWordMemory (6.4.3.5.1). */
export function qwordMemory(w: MemoryWindow): Uint8Array {
  return addressDescriptor(0x8a, 8, RT_MEMORY, memFlags(w), w);
}

/** IO (6.4.2.5), 16-bit decode. */
export function io(min: number, max: number, alignment: number, length: number): Uint8Array {
  if ([min, max].some((v) => v < 0 || v > 0xffff) || alignment < 0 || alignment > 0xff || length < 0 || length > 0xff)
    throw new AmlError("AML_BAD_RESOURCE", "IO descriptor fields out of range");
  return Uint8Array.of(0x47, 0x01, ...le(min, 2), ...le(max, 2), alignment, length);
}

/** IRQNoFlags (6.4.2.1): ISA IRQs, edge-triggered, active-high, exclusive. */
export function irqNoFlags(...irqs: readonly number[]): Uint8Array {
  let mask = 0;
  for (const i of irqs) {
    if (!Number.isInteger(i) || i < 0 || i > 15) throw new AmlError("AML_BAD_RESOURCE", `ISA IRQ ${i} is outside 0..15`);
    mask |= 1 << i;
  }
  return Uint8Array.of(0x22, ...le(mask, 2));
}

export interface ExtendedInterrupt {
  readonly gsis: readonly number[];
  readonly edge?: boolean;
  readonly activeLow?: boolean;
  readonly shared?: boolean;
}

/** Interrupt (Extended Interrupt descriptor, 6.4.3.6), resource consumer. */
export function interrupt(i: ExtendedInterrupt): Uint8Array {
  if (i.gsis.length < 1 || i.gsis.length > 255) throw new AmlError("AML_BAD_RESOURCE", "an Interrupt descriptor lists 1..255 interrupts");
  const flags = 0x01 | (i.edge === true ? 0x02 : 0) | (i.activeLow === true ? 0x04 : 0) | (i.shared === true ? 0x08 : 0);
  const body = [flags, i.gsis.length, ...i.gsis.flatMap((g) => le(g, 4))];
  return Uint8Array.from([0x89, ...le(body.length, 2), ...body]);
}
