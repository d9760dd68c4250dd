/**
 * ACPI table builders (ACPI 6.x spec, chapter 5.2): RSDP, RSDT, XSDT, FADT, FACS,
 * MADT, and the common System Description Table header. Each builder returns the
 * table's bytes with a valid checksum (the sum of all bytes is 0 mod 256).
 */
import { PartisError } from "../../errors.js";

export class AcpiTableError extends PartisError {}

export const OEM_ID = "PARTIS";
export const OEM_TABLE_ID = "PARTISVM";
export const CREATOR_ID = "PRTS";
export const HEADER_SIZE = 36;

/** Sum of bytes mod 256. */
export function byteSum(bytes: Uint8Array, start = 0, end = bytes.length): number {
  let s = 0;
  for (let i = start; i < end; i++) s = (s + bytes[i]!) & 0xff;
  return s;
}

function ascii(out: Uint8Array, offset: number, s: string, width: number): void {
  for (let i = 0; i < width; i++) out[offset + i] = i < s.length ? s.charCodeAt(i) : 0x20;
}

/** Fill the 36-byte header of `table` (whose length is its byte length) and its checksum. */
export function finishTable(table: Uint8Array, signature: string, revision: number): Uint8Array {
  const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  ascii(table, 0, signature, 4);
  dv.setUint32(4, table.length, true);
  table[8] = revision;
  table[9] = 0;
  ascii(table, 10, OEM_ID, 6);
  ascii(table, 16, OEM_TABLE_ID, 8);
  dv.setUint32(24, 1, true);
  ascii(table, 28, CREATOR_ID, 4);
  dv.setUint32(32, 1, true);
  table[9] = (0x100 - byteSum(table)) & 0xff;
  return table;
}

/** A table whose body is `body`, after the header. */
export function sdt(signature: string, revision: number, body: Uint8Array): Uint8Array {
  const t = new Uint8Array(HEADER_SIZE + body.length);
  t.set(body, HEADER_SIZE);
  return finishTable(t, signature, revision);
}

/** RSDP revision 2 (5.2.5.3), 36 bytes. */
export function rsdp(rsdtAddress: number, xsdtAddress: number): Uint8Array {
  const t = new Uint8Array(36);
  const dv = new DataView(t.buffer);
  ascii(t, 0, "RSD PTR ", 8);
  ascii(t, 9, OEM_ID, 6);
  t[15] = 2;
  dv.setUint32(16, rsdtAddress, true);
  dv.setUint32(20, 36, true);
  dv.setBigUint64(24, BigInt(xsdtAddress), true);
  t[8] = (0x100 - byteSum(t, 0, 20)) & 0xff;
  t[32] = (0x100 - byteSum(t)) & 0xff;
  return t;
}

export function rsdt(tables: readonly number[]): Uint8Array {
  const body = new Uint8Array(tables.length * 4);
  const dv = new DataView(body.buffer);
  tables.forEach((a, i) => {
    if (a > 0xffff_ffff) throw new AcpiTableError("ACPI_TABLE_ADDRESS", "RSDT entries are 32-bit");
    dv.setUint32(i * 4, a, true);
  });
  return sdt("RSDT", 1, body);
}

export function xsdt(tables: readonly number[]): Uint8Array {
  const body = new Uint8Array(tables.length * 8);
  const dv = new DataView(body.buffer);
  tables.forEach((a, i) => dv.setBigUint64(i * 8, BigInt(a), true));
  return sdt("XSDT", 1, body);
}

/** FACS (5.2.10), 64 bytes, no checksum; must be 64-byte aligned. */
export function facs(): Uint8Array {
  const t = new Uint8Array(64);
  const dv = new DataView(t.buffer);
  ascii(t, 0, "FACS", 4);
  dv.setUint32(4, 64, true);
  t[32] = 2; // version
  return t;
}

// ---- Generic Address Structure (5.2.3.2) ----
export const GAS_SYSTEM_MEMORY = 0;
export const GAS_SYSTEM_IO = 1;
export interface GenericAddress {
  readonly space: number;
  readonly bitWidth: number;
  readonly bitOffset: number;
  /** 0 undefined, 1 byte, 2 word, 3 dword, 4 qword. */
  readonly accessSize: number;
  readonly address: number;
}

function writeGas(dv: DataView, offset: number, g: GenericAddress): void {
  dv.setUint8(offset, g.space);
  dv.setUint8(offset + 1, g.bitWidth);
  dv.setUint8(offset + 2, g.bitOffset);
  dv.setUint8(offset + 3, g.accessSize);
  dv.setBigUint64(offset + 4, BigInt(g.address), true);
}

export function ioGas(port: number, bytes: number): GenericAddress {
  return { space: GAS_SYSTEM_IO, bitWidth: bytes * 8, bitOffset: 0, accessSize: bytes === 1 ? 1 : bytes === 2 ? 2 : 3, address: port };
}

/** FADT layout (5.2.9, table 5.9), revision 6: 276 bytes. */
export const FADT = {
  LENGTH: 276,
  REVISION: 6,
  MINOR_REVISION: 0,
  FIRMWARE_CTRL: 36,
  DSDT: 40,
  PREFERRED_PM_PROFILE: 45,
  SCI_INT: 46,
  SMI_CMD: 48,
  PM1A_EVT_BLK: 56,
  PM1A_CNT_BLK: 64,
  PM_TMR_BLK: 76,
  GPE0_BLK: 80,
  PM1_EVT_LEN: 88,
  PM1_CNT_LEN: 89,
  PM_TMR_LEN: 91,
  P_LVL2_LAT: 96,
  P_LVL3_LAT: 98,
  CENTURY: 108,
  IAPC_BOOT_ARCH: 109,
  FLAGS: 112,
  RESET_REG: 116,
  RESET_VALUE: 128,
  MINOR_VERSION: 131,
  X_FIRMWARE_CTRL: 132,
  X_DSDT: 140,
  X_PM1A_EVT_BLK: 148,
  X_PM1B_EVT_BLK: 160,
  X_PM1A_CNT_BLK: 172,
  X_PM_TMR_BLK: 208,
  HYPERVISOR_VENDOR: 268,
} as const;

export const FADT_FLAG = {
  WBINVD: 1 << 0,
  PROC_C1: 1 << 2,
  PWR_BUTTON: 1 << 4,
  SLP_BUTTON: 1 << 5,
  FIX_RTC: 1 << 6,
  TMR_VAL_EXT: 1 << 8,
  RESET_REG_SUP: 1 << 10,
  HW_REDUCED_ACPI: 1 << 20,
} as const;

export const IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0;
export const IAPC_BOOT_ARCH_8042 = 1 << 1;

export interface FadtOptions {
  readonly dsdtAddress: number;
  readonly facsAddress: number;
  readonly sciIrq: number;
  readonly pm1aEvtPort: number;
  readonly pm1aCntPort: number;
  readonly pmTimerPort: number;
  readonly resetPort: number;
  readonly resetValue: number;
  /** CMOS index of the century byte (0 = none). */
  readonly centuryCmosIndex: number;
}

export function fadt(o: FadtOptions): Uint8Array {
  const t = new Uint8Array(FADT.LENGTH);
  const dv = new DataView(t.buffer);
  if (o.facsAddress > 0xffff_ffff || o.dsdtAddress > 0xffff_ffff) throw new AcpiTableError("ACPI_TABLE_ADDRESS", "FACS and DSDT must be below 4 GiB");
  dv.setUint32(FADT.FIRMWARE_CTRL, o.facsAddress, true);
  dv.setUint32(FADT.DSDT, o.dsdtAddress, true);
  t[FADT.PREFERRED_PM_PROFILE] = 0; // unspecified
  dv.setUint16(FADT.SCI_INT, o.sciIrq, true);
  dv.setUint32(FADT.SMI_CMD, 0, true); // no SMI command port: ACPI mode is always on
  dv.setUint32(FADT.PM1A_EVT_BLK, o.pm1aEvtPort, true);
  dv.setUint32(FADT.PM1A_CNT_BLK, o.pm1aCntPort, true);
  dv.setUint32(FADT.PM_TMR_BLK, o.pmTimerPort, true);
  t[FADT.PM1_EVT_LEN] = 4;
  t[FADT.PM1_CNT_LEN] = 2;
  t[FADT.PM_TMR_LEN] = 4;
  dv.setUint16(FADT.P_LVL2_LAT, 101, true); // > 100: C2 not supported
  dv.setUint16(FADT.P_LVL3_LAT, 1001, true); // > 1000: C3 not supported
  t[FADT.CENTURY] = o.centuryCmosIndex;
  dv.setUint16(FADT.IAPC_BOOT_ARCH, IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042, true);
  // Fixed-feature power button (PWR_BUTTON clear), no sleep button, 24-bit PM timer.
  dv.setUint32(FADT.FLAGS, FADT_FLAG.WBINVD | FADT_FLAG.PROC_C1 | FADT_FLAG.SLP_BUTTON | FADT_FLAG.FIX_RTC | FADT_FLAG.RESET_REG_SUP, true);
  writeGas(dv, FADT.RESET_REG, ioGas(o.resetPort, 1));
  t[FADT.RESET_VALUE] = o.resetValue;
  t[FADT.MINOR_VERSION] = FADT.MINOR_REVISION;
  dv.setBigUint64(FADT.X_DSDT, BigInt(o.dsdtAddress), true);
  // PM1 event block: two 16-bit registers (status, enable) accessed as words.
  writeGas(dv, FADT.X_PM1A_EVT_BLK, { ...ioGas(o.pm1aEvtPort, 4), accessSize: 2 });
  writeGas(dv, FADT.X_PM1A_CNT_BLK, ioGas(o.pm1aCntPort, 2));
  writeGas(dv, FADT.X_PM_TMR_BLK, ioGas(o.pmTimerPort, 4));
  ascii(t, FADT.HYPERVISOR_VENDOR, "Partis", 8);
  return finishTable(t, "FACP", FADT.REVISION);
}

// ---- MADT (5.2.12) ----
export const MADT_PCAT_COMPAT = 1;
export const MADT_TYPE_LOCAL_APIC = 0;
export const MADT_TYPE_IOAPIC = 1;
export const MADT_TYPE_INTERRUPT_OVERRIDE = 2;
export const MADT_TYPE_LOCAL_APIC_NMI = 4;
/** MPS INTI flags: polarity bits 1:0 (1 active high, 3 active low), trigger bits 3:2 (1 edge, 3 level). */
export const MPS_INTI_CONFORMS = 0x0;
export const MPS_INTI_ACTIVE_HIGH = 0x1;
export const MPS_INTI_ACTIVE_LOW = 0x3;
export const MPS_INTI_EDGE = 0x4;
export const MPS_INTI_LEVEL = 0xc;

export interface InterruptOverride {
  readonly irq: number;
  readonly gsi: number;
  readonly flags: number;
}

export interface MadtOptions {
  readonly localApicAddress: number;
  /** APIC IDs of the vCPUs, in ACPI processor UID order (UID = index). */
  readonly apicIds: readonly number[];
  readonly ioapicId: number;
  readonly ioapicAddress: number;
  readonly ioapicGsiBase: number;
  readonly overrides: readonly InterruptOverride[];
  /** LAPIC input that carries NMI (LINT1 on PCs). */
  readonly nmiLint: number;
}

export function madt(o: MadtOptions): Uint8Array {
  const entries: number[] = [];
  const u16 = (v: number) => [v & 0xff, (v >> 8) & 0xff];
  const u32 = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
  o.apicIds.forEach((id, uid) => {
    if (id > 0xfe || uid > 0xfe) throw new AcpiTableError("ACPI_MADT", "xAPIC IDs and processor UIDs are 8-bit (0..254)");
    entries.push(MADT_TYPE_LOCAL_APIC, 8, uid, id, ...u32(1));
  });
  entries.push(MADT_TYPE_IOAPIC, 12, o.ioapicId, 0, ...u32(o.ioapicAddress), ...u32(o.ioapicGsiBase));
  for (const ov of o.overrides) entries.push(MADT_TYPE_INTERRUPT_OVERRIDE, 10, 0, ov.irq, ...u32(ov.gsi), ...u16(ov.flags));
  entries.push(MADT_TYPE_LOCAL_APIC_NMI, 6, 0xff, ...u16(MPS_INTI_CONFORMS), o.nmiLint);
  const body = new Uint8Array(8 + entries.length);
  const dv = new DataView(body.buffer);
  dv.setUint32(0, o.localApicAddress, true);
  dv.setUint32(4, MADT_PCAT_COMPAT, true);
  body.set(entries, 8);
  return sdt("APIC", 4, body);
}
