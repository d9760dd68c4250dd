import { test } from "node:test";
import assert from "node:assert/strict";
import { cpuidForVcpu, CpuidError, type CpuidEntry } from "../../src/machine/cpuid.js";

const e = (fn: number, index: number, eax: number, ebx = 0, ecx = 0, edx = 0, flags = 0): CpuidEntry => ({ function: fn, index, flags, eax, ebx, ecx, edx });

/** A host-like KVM_GET_SUPPORTED_CPUID list (Intel-ish with AMD extended leaves). */
const SUPPORTED: CpuidEntry[] = [
  e(0, 0, 0x1f, 0x756e6547, 0x6c65746e, 0x49656e69),
  e(1, 0, 0x000906ea, 0x00000800, 0x7ffafbff, 0xbfebfbff),
  e(4, 0, 0x1c004121, 0x01c0003f, 0x3f, 0, 1),
  e(4, 1, 0x1c004122, 0x01c0003f, 0x3f, 0, 1),
  e(4, 2, 0x1c004143, 0x00c0003f, 0x3ff, 0, 1),
  e(4, 3, 0x1c03c163, 0x03c0003f, 0x2fff, 6, 1),
  e(4, 4, 0, 0, 0, 0, 1),
  e(0xb, 0, 1, 2, 0x100, 3, 1),
  e(0xb, 1, 4, 12, 0x201, 3, 1),
  e(0xd, 0, 0x7, 0x340, 0x340, 0, 1),
  e(0x1f, 0, 1, 2, 0x100, 3, 1),
  e(0x4000_0000, 0, 0x4000_0001, 0x4b4d564b, 0x564b4d56, 0x4d),
  e(0x4000_0001, 0, 0x01007afb, 0, 0, 0),
  e(0x8000_0000, 0, 0x8000_001e),
  e(0x8000_0008, 0, 0x3027, 0, 0x0000_700b),
  e(0x8000_001e, 0, 7, 0x0102, 0x0305),
];

test("leaf 1: APIC id, logical count, HTT, hypervisor bit", () => {
  const out = cpuidForVcpu(SUPPORTED, { vcpuId: 3, vcpuCount: 6 });
  const l1 = out.find((x) => x.function === 1)!;
  assert.equal(l1.ebx >>> 24, 3);
  assert.equal((l1.ebx >>> 16) & 0xff, 6);
  assert.equal(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
  assert.equal((l1.edx >>> 28) & 1, 1);
  assert.equal(l1.ecx >>> 31, 1);
  const one = cpuidForVcpu(SUPPORTED, { vcpuId: 0, vcpuCount: 1 }).find((x) => x.function === 1)!;
  assert.equal((one.edx >>> 28) & 1, 0);
  // The input list is not modified.
  assert.equal(SUPPORTED[1]!.ebx, 0x800);
});

test("leaves 0xB/0x1F: one thread per core, vcpuCount cores, x2APIC id", () => {
  const out = cpuidForVcpu(SUPPORTED, { vcpuId: 5, vcpuCount: 6 });
  for (const fn of [0xb, 0x1f]) {
    const subs = out.filter((x) => x.function === fn);
    assert.equal(subs.length, 3);
    assert.deepEqual([subs[0]!.eax, subs[0]!.ebx, (subs[0]!.ecx >> 8) & 0xff], [0, 1, 1]);
    assert.deepEqual([subs[1]!.eax, subs[1]!.ebx, (subs[1]!.ecx >> 8) & 0xff, subs[1]!.ecx & 0xff], [3, 6, 2, 1]);
    assert.equal((subs[2]!.ecx >> 8) & 0xff, 0, "terminating invalid level");
    for (const s of subs) assert.equal(s.edx, 5);
    for (const s of subs) assert.equal(s.flags & 1, 1);
  }
});

test("leaf 4 cache sharing and AMD core counts", () => {
  const out = cpuidForVcpu(SUPPORTED, { vcpuId: 2, vcpuCount: 6 });
  const l4 = out.filter((x) => x.function === 4);
  assert.equal(l4.length, 5);
  for (const c of l4.slice(0, 4)) assert.equal((c.eax >>> 26) + 1, 8, "cores per package (power of two)");
  assert.equal(((l4[0]!.eax >>> 14) & 0xfff) + 1, 1, "L1 private");
  assert.equal(((l4[2]!.eax >>> 14) & 0xfff) + 1, 1, "L2 private");
  assert.equal(((l4[3]!.eax >>> 14) & 0xfff) + 1, 8, "L3 shared by the package");
  assert.equal(l4[3]!.eax & 0x3fff, 0x0163 & 0x3fff, "cache type/level kept");
  assert.equal(l4[4]!.eax, 0, "null subleaf untouched");
  const ext8 = out.find((x) => x.function === 0x8000_0008)!;
  assert.equal(ext8.ecx & 0xff, 5);
  assert.equal((ext8.ecx >>> 12) & 0xf, 3);
  assert.equal(ext8.eax, 0x3027, "address sizes kept");
  const ext1e = out.find((x) => x.function === 0x8000_001e)!;
  assert.equal(ext1e.eax, 2);
  assert.equal(ext1e.ebx & 0xffff, 2);
  assert.equal(ext1e.ecx & 0x7ff, 0);
});

test("paravirt and XSAVE leaves pass through; validation", () => {
  const out = cpuidForVcpu(SUPPORTED, { vcpuId: 0, vcpuCount: 2 });
  for (const fn of [0x4000_0000, 0x4000_0001, 0xd]) {
    const a = out.find((x) => x.function === fn)!;
    const b = SUPPORTED.find((x) => x.function === fn)!;
    assert.deepEqual(a, b);
  }
  assert.throws(() => cpuidForVcpu(SUPPORTED, { vcpuId: 2, vcpuCount: 2 }), CpuidError);
  assert.throws(() => cpuidForVcpu(SUPPORTED, { vcpuId: 0, vcpuCount: 0 }), CpuidError);
  assert.throws(() => cpuidForVcpu(SUPPORTED, { vcpuId: 0, vcpuCount: 256 }), CpuidError);
  // Without 0x1F in the host list none is invented.
  const no1f = cpuidForVcpu(SUPPORTED.filter((x) => x.function !== 0x1f), { vcpuId: 0, vcpuCount: 2 });
  assert.equal(no1f.some((x) => x.function === 0x1f), false);
});
