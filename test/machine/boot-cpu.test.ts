import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkedGuestMemory } from "../../src/machine/guest-memory.js";
import { MiB, planMemory } from "../../src/machine/memory-map.js";
import { BOOT_CS, BOOT_DS, longModeBootState, writeBootTables } from "../../src/machine/boot-cpu.js";

/** Walk the guest's 4-level page tables (2 MiB leaves) like the MMU would. */
function translate(mem: ChunkedGuestMemory, cr3: bigint, va: bigint): bigint | undefined {
  const entry = (table: bigint, index: bigint): bigint =>
    new DataView(mem.read(Number((table & ~0xfffn) + index * 8n), 8).buffer).getBigUint64(0, true);
  const pml4e = entry(cr3, (va >> 39n) & 511n);
  if ((pml4e & 1n) === 0n) return undefined;
  const pdpte = entry(pml4e & 0xffffffffff000n, (va >> 30n) & 511n);
  if ((pdpte & 1n) === 0n) return undefined;
  const pde = entry(pdpte & 0xffffffffff000n, (va >> 21n) & 511n);
  if ((pde & 1n) === 0n || (pde & 0x80n) === 0n) return undefined;
  return (pde & 0xfffffffe00000n) | (va & 0x1fffffn);
}

test("boot tables: GDT descriptors and a 4 GiB identity map", () => {
  const plan = planMemory(64 * MiB);
  const mem = ChunkedGuestMemory.anonymous(plan.ram);
  writeBootTables(mem, plan);
  const gdt = new DataView(mem.read(plan.gdt, 48).buffer);
  assert.equal(gdt.getBigUint64(0, true), 0n);
  const cs = gdt.getBigUint64(BOOT_CS, true);
  const ds = gdt.getBigUint64(BOOT_DS, true);
  assert.equal((cs >> 53n) & 1n, 1n, "L bit on __BOOT_CS");
  assert.equal((cs >> 40n) & 0xfn, 0xbn, "execute/read");
  assert.equal((ds >> 40n) & 0xfn, 0x3n, "read/write");
  assert.equal((ds >> 47n) & 1n, 1n, "present");
  const st = longModeBootState(plan, { entry64: 0x100200, bootParams: plan.zeroPage });
  for (const va of [0n, 0x100200n, 0x7000n, 0x20000n, 0xbfff_f000n, 0xfee0_0000n, 0xffff_ffffn])
    assert.equal(translate(mem, st.cr3, va), va, va.toString(16));
  assert.equal(translate(mem, st.cr3, 0x1_0000_0000n), undefined);
});

test("long-mode BSP state follows the 64-bit boot protocol", () => {
  const plan = planMemory(64 * MiB);
  const st = longModeBootState(plan, { entry64: 0x100200, bootParams: 0x7000 });
  assert.equal(st.regs.rip, 0x100200n);
  assert.equal(st.regs.rsi, 0x7000n);
  assert.equal(st.regs.rflags & 0x200n, 0n, "interrupts disabled");
  assert.equal(st.segments.cs.selector, 0x10);
  assert.equal(st.segments.cs.l, 1);
  assert.equal(st.segments.cs.db, 0);
  for (const s of [st.segments.ds, st.segments.es, st.segments.ss]) {
    assert.equal(s.selector, 0x18);
    assert.equal(s.limit, 0xffffffff);
    assert.equal(s.base, 0n);
  }
  assert.equal(st.segments.tr.type, 0xb);
  assert.equal(st.segments.ldt.unusable, 1);
  assert.equal(st.cr0 & 0x8000_0001n, 0x8000_0001n);
  assert.equal(st.cr4 & 0x20n, 0x20n);
  assert.equal(st.efer, 0x500n);
  assert.equal(st.cr3, BigInt(plan.pml4));
  assert.equal(st.gdt.limit, 47);
  const msr = new Map(st.msrs.map((m) => [m.index, m.value]));
  assert.equal(msr.get(0x2ff), 0x806n);
  assert.equal(msr.get(0x1a0), 1n);
  assert.equal(msr.get(0x10), 0n);
  for (const i of [0x174, 0x175, 0x176, 0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000102]) assert.equal(msr.get(i), 0n);
});
