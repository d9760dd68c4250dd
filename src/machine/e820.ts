/**
 * The BIOS e820 memory map handed to Linux in boot_params (Linux boot protocol,
 * Documentation/arch/x86/zero-page.rst: e820_table at 0x2d0, 20-byte entries
 * {u64 addr, u64 size, u32 type}, count at 0x1e8, at most 128 entries).
 *
 *   [0, 0x9FC00)               RAM
 *   [0x9FC00, 0xA0000)         reserved (EBDA)
 *   [0xE0000, 0x100000)        ACPI (tables and RSDP)
 *   [0x100000, lowRamEnd)      RAM
 *   [0xFEC00000, +4K)          reserved (IOAPIC)
 *   [0xFEE00000, +1M)          reserved (local APIC)
 *   [4 GiB, highRamEnd)        RAM
 *
 * DEVNOTE: the PCI windows are never in the e820 map: Linux takes them from the
 * host bridge's _CRS, and a reserved e820 entry inside a window would make it clip
 * the window.
 */
import { ACPI_AREA_END, ACPI_AREA_START, EBDA_START, KERNEL_LOAD_ADDR, LEGACY_RAM_END, type MemoryPlan } from "./memory-map.js";

export const E820_RAM = 1;
export const E820_RESERVED = 2;
export const E820_ACPI = 3;
export const E820_NVS = 4;
export const E820_UNUSABLE = 5;

export const E820_MAX_ENTRIES_ZEROPAGE = 128;
export const E820_ENTRY_SIZE = 20;

export interface E820Entry {
  readonly addr: number;
  readonly size: number;
  readonly type: number;
}

export function e820Table(plan: MemoryPlan): E820Entry[] {
  const t: E820Entry[] = [
    { addr: 0, size: EBDA_START, type: E820_RAM },
    { addr: EBDA_START, size: LEGACY_RAM_END - EBDA_START, type: E820_RESERVED },
    { addr: ACPI_AREA_START, size: ACPI_AREA_END - ACPI_AREA_START, type: E820_ACPI },
  ];
  if (plan.lowRamEnd > KERNEL_LOAD_ADDR) t.push({ addr: KERNEL_LOAD_ADDR, size: plan.lowRamEnd - KERNEL_LOAD_ADDR, type: E820_RAM });
  t.push({ addr: plan.ioapic.start, size: plan.ioapic.size, type: E820_RESERVED });
  t.push({ addr: plan.lapic.start, size: plan.lapic.size, type: E820_RESERVED });
  for (const r of plan.ram) if (r.gpa >= 2 ** 32) t.push({ addr: r.gpa, size: r.length, type: E820_RAM });
  return t;
}

/** Encode entries in the boot_params layout (20 bytes each, little-endian). */
export function encodeE820(entries: readonly E820Entry[]): Uint8Array {
  const out = new Uint8Array(entries.length * E820_ENTRY_SIZE);
  const dv = new DataView(out.buffer);
  entries.forEach((e, i) => {
    const o = i * E820_ENTRY_SIZE;
    dv.setBigUint64(o, BigInt(e.addr), true);
    dv.setBigUint64(o + 8, BigInt(e.size), true);
    dv.setUint32(o + 16, e.type, true);
  });
  return out;
}
