import { test } from "node:test";
import assert from "node:assert/strict";
import { packKernelSegments, parseKernelElf } from "../../src/machine/kernel-elf.js";
import { KernelImageError } from "../../src/machine/linux-boot.js";
import { KERNEL_ELF_PADDR, makeKernelElf } from "../fixtures/bzimage.js";

test("vmlinux ELF: entry, segments and load span", () => {
  const elf = parseKernelElf(makeKernelElf(Uint8Array.of(0xf4), 2));
  assert.equal(elf.entry, KERNEL_ELF_PADDR);
  assert.equal(elf.segments.length, 1);
  assert.deepEqual(elf.segments[0], { paddr: KERNEL_ELF_PADDR, fileOffset: 4096, fileSize: 3 * 4096, memSize: 5 * 4096 });
  assert.equal(elf.loadStart, KERNEL_ELF_PADDR);
  assert.equal(elf.loadEnd, KERNEL_ELF_PADDR + 5 * 4096);
});

test("vmlinux ELF: zero pages are left out of the packed image", () => {
  const image = makeKernelElf(Uint8Array.of(0x90, 0xf4));
  const { extents, flat } = packKernelSegments(image, parseKernelElf(image));
  // Page 0 (the code), page 1 zero (skipped), page 2 all 0xAB; the memory-only pages are not in the file at all.
  assert.deepEqual(extents, [
    { gpa: KERNEL_ELF_PADDR, offset: 0, length: 4096 },
    { gpa: KERNEL_ELF_PADDR + 2 * 4096, offset: 4096, length: 4096 },
  ]);
  assert.equal(flat.length, 8192);
  assert.deepEqual([...flat.subarray(0, 3)], [0x90, 0xf4, 0]);
  assert.ok(flat.subarray(4096).every((b) => b === 0xab));
});

test("vmlinux ELF: malformed files are refused with the reason", () => {
  const refuse = (image: Uint8Array, re: RegExp): void =>
    assert.throws(() => parseKernelElf(image), (e: unknown) => e instanceof KernelImageError && e.code === "KERNEL_ELF_INVALID" && re.test(e.message));
  const good = (): Uint8Array => makeKernelElf(Uint8Array.of(0xf4));
  const patch = (f: (dv: DataView, b: Uint8Array) => void): Uint8Array => {
    const b = good();
    f(new DataView(b.buffer), b);
    return b;
  };
  refuse(new Uint8Array(10), /not an ELF/);
  refuse(patch((_, b) => (b[4] = 1)), /64-bit little-endian/);
  refuse(patch((dv) => dv.setUint16(18, 3, true)), /x86-64 executable/);
  refuse(patch((dv) => dv.setUint16(56, 0, true)), /program header table/);
  refuse(patch((dv) => dv.setBigUint64(32, 1n << 40n, true)), /program header offset|past the end/);
  refuse(patch((dv) => dv.setBigUint64(64 + 32, 1n << 30n, true)), /more file bytes|past the end/);
  refuse(patch((dv) => dv.setBigUint64(64 + 24, 0x1000n, true)), /outside the kernel's range/);
  refuse(patch((dv) => dv.setBigUint64(24, 0x5000000n, true)), /entry point 0x5000000 is not inside/);
  refuse(patch((dv) => dv.setUint32(64, 4, true)), /no loadable segments/);
  refuse(patch((dv) => dv.setBigUint64(64 + 40, 0xffffffffffffffffn, true)), /out of range/);
});
