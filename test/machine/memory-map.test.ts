import { test } from "node:test";
import assert from "node:assert/strict";
import {
  GiB,
  MiB,
  MemoryPlanError,
  planMemory,
  initrdPlacement,
  isRam,
  IOAPIC_ADDR,
  LAPIC_ADDR,
} from "../../src/machine/memory-map.js";
import { e820Table, encodeE820, E820_ACPI, E820_RAM, E820_RESERVED } from "../../src/machine/e820.js";

test("small guest: one low range, no high RAM", () => {
  const p = planMemory(512 * MiB);
  assert.deepEqual(p.ram, [{ gpa: 0, length: 512 * MiB, fileOffset: 0 }]);
  assert.equal(p.lowRamEnd, 512 * MiB);
  assert.equal(p.highRamEnd, 0);
  assert.equal(p.pciMmio64.start, 4 * GiB);
});

test("exactly 3 GiB fills low RAM, no high range", () => {
  const p = planMemory(3 * GiB);
  assert.equal(p.ram.length, 1);
  assert.equal(p.lowRamEnd, 0xc000_0000);
});

test("64 GiB guest: 3 GiB low, 61 GiB from 4 GiB, windows above", () => {
  const p = planMemory(64 * GiB);
  assert.deepEqual(p.ram, [
    { gpa: 0, length: 3 * GiB, fileOffset: 0 },
    { gpa: 4 * GiB, length: 61 * GiB, fileOffset: 3 * GiB },
  ]);
  assert.equal(p.ram.reduce((s, r) => s + r.length, 0), 64 * GiB);
  assert.equal(p.highRamEnd, 65 * GiB);
  assert.equal(p.pciMmio64.start, 65 * GiB);
  assert.ok(p.pciMmio64.start + p.pciMmio64.size <= 2 ** p.physAddrBits);
  // The hole holds the PCI window, the IOAPIC and the LAPIC, and none of them is RAM.
  for (const a of [p.pciMmio32.start, IOAPIC_ADDR, LAPIC_ADDR, 0xffff_ffff]) assert.equal(isRam(p, a, 1), false, a.toString(16));
  assert.ok(p.pciMmio32.start >= p.lowRamEnd && p.pciMmio32.start + p.pciMmio32.size <= IOAPIC_ADDR);
  assert.equal(isRam(p, 64 * GiB, 4096), true);
});

test("validation: typed errors", () => {
  assert.throws(() => planMemory(16 * MiB), (e: unknown) => e instanceof MemoryPlanError && e.code === "MEMORY_TOO_SMALL");
  assert.throws(() => planMemory(2048 * GiB), (e: unknown) => e instanceof MemoryPlanError && e.code === "MEMORY_TOO_LARGE");
  assert.throws(() => planMemory(64 * MiB + 4096), (e: unknown) => e instanceof MemoryPlanError && e.code === "MEMORY_NOT_ALIGNED");
  assert.throws(() => planMemory(Number.NaN), MemoryPlanError);
  assert.throws(() => planMemory(600 * GiB), (e: unknown) => e instanceof MemoryPlanError && e.code === "MEMORY_EXCEEDS_PHYS_BITS");
  assert.equal(planMemory(600 * GiB, { physAddrBits: 46 }).highRamEnd, 601 * GiB);
});

test("initrd placement: highest page-aligned fit below the limit", () => {
  const p = planMemory(256 * MiB);
  assert.equal(initrdPlacement(p, 10 * MiB + 1, 0x7fff_ffff, 16 * MiB), 256 * MiB - 10 * MiB - 4096);
  assert.equal(initrdPlacement(p, 4096, 0x37ff_ffff, 0), 256 * MiB - 4096);
  assert.equal(initrdPlacement(p, 300 * MiB, 0x7fff_ffff, 16 * MiB), undefined);
  const big = planMemory(8 * GiB);
  assert.equal(initrdPlacement(big, 4096, 0x7fff_ffff, 0), 0x8000_0000 - 4096);
});

test("e820: legacy holes, ACPI area, RAM from 1 MiB, high RAM", () => {
  const p = planMemory(8 * GiB);
  const t = e820Table(p);
  assert.deepEqual(t[0], { addr: 0, size: 0x9fc00, type: E820_RAM });
  assert.deepEqual(t[1], { addr: 0x9fc00, size: 0x400, type: E820_RESERVED });
  assert.deepEqual(t[2], { addr: 0xe0000, size: 0x20000, type: E820_ACPI });
  assert.deepEqual(t[3], { addr: 0x100000, size: 3 * GiB - 0x100000, type: E820_RAM });
  assert.deepEqual(t.at(-1), { addr: 4 * GiB, size: 5 * GiB, type: E820_RAM });
  // Sorted, non-overlapping; RAM total = guest RAM minus the legacy 384 KiB area.
  for (let i = 1; i < t.length; i++) assert.ok(t[i - 1]!.addr + t[i - 1]!.size <= t[i]!.addr);
  const ram = t.filter((e) => e.type === E820_RAM).reduce((s, e) => s + e.size, 0);
  assert.equal(ram, 8 * GiB - (0x100000 - 0x9fc00));
  // No entry touches the PCI windows.
  for (const e of t) assert.ok(e.addr + e.size <= p.pciMmio32.start || e.addr >= p.pciMmio32.start + p.pciMmio32.size);
  const enc = encodeE820(t);
  const dv = new DataView(enc.buffer);
  assert.equal(enc.length, t.length * 20);
  assert.equal(dv.getBigUint64(20 * (t.length - 1), true), BigInt(4 * GiB));
  assert.equal(dv.getUint32(20 * 2 + 16, true), E820_ACPI);
});
