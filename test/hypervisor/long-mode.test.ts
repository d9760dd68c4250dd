/**
 * 64-bit guests at CPL0 (page tables, GDT, EFER/CR0/CR4 through sregs):
 * port I/O, MMIO writes and reads to unmapped guest-physical space, two
 * memory slots (one above 4 GiB), and dirty-page logging.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition } from "../../src/hypervisor/partition.js";
import { VirtualProcessor, type VcpuExit } from "../../src/hypervisor/virtual-processor.js";
import type { RamRange } from "../../src/machine/guest-memory.js";
import { CODE_GPA, code, enterLongMode, imm32, imm64, writeLongModeTables } from "./guests.js";
import { assertDirtyPages, noKvm } from "../fixtures/kvm.js";

const GiB = 2 ** 30;
const FOUR_GIB = 4 * GiB;

function describe(exit: VcpuExit): string {
  return JSON.stringify(exit, (_k, v: unknown) => (typeof v === "bigint" ? `0x${v.toString(16)}` : v instanceof Uint8Array ? Array.from(v) : v));
}

function withLongModeGuest(ranges: RamRange[], gib: number, bytes: Uint8Array, body: (vp: VirtualProcessor, p: Partition) => void): void {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  const vp = VirtualProcessor.create(p, 0);
  try {
    vp.setCpuid(sys.supportedCpuid());
    writeLongModeTables(p, gib);
    p.guestMemory.write(CODE_GPA, bytes);
    enterLongMode(vp);
    body(vp, p);
  } finally {
    vp.close();
    p.destroy();
    sys.close();
  }
}

test("long mode CPL0: OUT, MMIO write, MMIO reads (4 and 8 bytes) and IN reach the guest", { skip: noKvm }, () => {
  const guest = code(
    [0xb0, 0x42], //                  mov al, 0x42
    [0xe6, 0x80], //                  out 0x80, al
    [0xbb, ...imm32(0xd0000000)], //  mov ebx, 0xd0000000   (not RAM: MMIO)
    [0xb8, ...imm32(0x12345678)], //  mov eax, 0x12345678
    [0x89, 0x03], //                  mov [rbx], eax
    [0x8b, 0x4b, 0x08], //            mov ecx, [rbx+8]
    [0x48, 0x8b, 0x73, 0x10], //      mov rsi, [rbx+16]
    [0x66, 0xba, 0x81, 0x00], //      mov dx, 0x81
    [0xed], //                        in eax, dx
    [0x89, 0xc7], //                  mov edi, eax
    [0xf4], //                        hlt
  );
  withLongModeGuest([{ gpa: 0, length: 2 << 20, fileOffset: 0 }], 4, guest, (vp) => {
    const sregs = vp.getSregs();
    assert.equal(sregs.efer & 0x500n, 0x500n);
    assert.equal(sregs.cs.l, 1);

    let exit = vp.run();
    assert.equal(exit.reason, "io", describe(exit));
    if (exit.reason !== "io") return;
    assert.deepEqual([exit.direction, exit.port, exit.size, exit.data[0]], ["out", 0x80, 1, 0x42]);

    exit = vp.run();
    assert.equal(exit.reason, "mmio", describe(exit));
    if (exit.reason !== "mmio") return;
    assert.equal(exit.gpa, 0xd0000000);
    assert.equal(exit.isWrite, true);
    assert.deepEqual(Array.from(exit.data), [0x78, 0x56, 0x34, 0x12]);

    exit = vp.run();
    assert.equal(exit.reason, "mmio", describe(exit));
    if (exit.reason !== "mmio") return;
    assert.deepEqual([exit.gpa, exit.isWrite, exit.data.length], [0xd0000008, false, 4]);
    exit.data.set([0xef, 0xbe, 0xad, 0xde]);

    exit = vp.run();
    assert.equal(exit.reason, "mmio", describe(exit));
    if (exit.reason !== "mmio") return;
    assert.deepEqual([exit.gpa, exit.isWrite, exit.data.length], [0xd0000010, false, 8]);
    new DataView(exit.data.buffer, exit.data.byteOffset, 8).setBigUint64(0, 0x0123456789abcdefn, true);

    exit = vp.run();
    assert.equal(exit.reason, "io", describe(exit));
    if (exit.reason !== "io") return;
    assert.deepEqual([exit.direction, exit.port, exit.size], ["in", 0x81, 4]);
    exit.data.set([0x11, 0x22, 0x33, 0x44]);

    exit = vp.run();
    assert.equal(exit.reason, "hlt", describe(exit));
    const regs = vp.getRegs();
    assert.equal(regs.rcx, 0xdeadbeefn);
    assert.equal(regs.rsi, 0x0123456789abcdefn);
    assert.equal(regs.rdi, 0x44332211n);
  });
});

test("two memory slots: code in slot 0, data in slot 1 above 4 GiB", { skip: noKvm }, () => {
  const guest = code(
    [0x48, 0xbb, ...imm64(BigInt(FOUR_GIB))], // mov rbx, 0x1_0000_0000
    [0x8b, 0x03], //                            mov eax, [rbx]
    [0x83, 0xc0, 0x01], //                      add eax, 1
    [0x89, 0x43, 0x08], //                      mov [rbx+8], eax
    [0xe6, 0x80], //                            out 0x80, al
    [0xf4], //                                  hlt
  );
  const ranges = [
    { gpa: 0, length: 2 << 20, fileOffset: 0 },
    { gpa: FOUR_GIB, length: 1 << 20, fileOffset: 2 << 20 },
  ];
  withLongModeGuest(ranges, 5, guest, (vp, p) => {
    p.guestMemory.write(FOUR_GIB, Uint8Array.of(41, 0, 0, 0));
    const exit = vp.run();
    assert.equal(exit.reason, "io", describe(exit));
    if (exit.reason !== "io") return;
    assert.equal(exit.data[0], 42);
    assert.equal(vp.run().reason, "hlt");
    assert.deepEqual(Array.from(p.guestMemory.bytes(FOUR_GIB + 8, 4)), [42, 0, 0, 0]);
  });
});

test("dirty log: the bitmap shows every page the guest wrote, and no page it did not touch", { skip: noKvm }, () => {
  const guest = code(
    [0x48, 0xbb, ...imm64(BigInt(FOUR_GIB))], //     mov rbx, 0x1_0000_0000
    [0xc6, 0x03, 0x01], //                          mov byte [rbx], 1            page 0
    [0xc6, 0x83, ...imm32(0x3000), 0x01], //        mov byte [rbx+0x3000], 1     page 3
    [0xc6, 0x83, ...imm32(0x11ff8), 0x01], //       mov byte [rbx+0x11ff8], 1    page 17
    [0x8a, 0x83, ...imm32(0x5000)], //              mov al, [rbx+0x5000]         page 5: read only
    [0xe6, 0x80], //                                out 0x80, al
    [0xc6, 0x83, ...imm32(0xff000), 0x01], //       mov byte [rbx+0xff000], 1    page 255
    [0xf4], //                                      hlt
  );
  const ranges = [
    { gpa: 0, length: 2 << 20, fileOffset: 0 },
    { gpa: FOUR_GIB, length: 1 << 20, fileOffset: 2 << 20 },
  ];
  withLongModeGuest(ranges, 5, guest, (vp, p) => {
    p.enableDirtyLog(1);
    assert.equal(p.dirtyLog(1).every((b) => b === 0), true, "nothing dirty before the guest runs");
    const exit = vp.run();
    assert.equal(exit.reason, "io", describe(exit));
    const bitmap = p.dirtyLog(1);
    assert.equal(bitmap.length, 32); // 256 pages
    assertDirtyPages(bitmap, { written: [0, 3, 17], read: [5] }, "first log");
    assert.equal(vp.run().reason, "hlt");
    const second = p.dirtyLog(1);
    const expected2 = new Uint8Array(32);
    expected2[31] = 0x80; // page 255 only: the log was cleared by the first read
    assert.deepEqual(Array.from(second), Array.from(expected2));
    p.enableDirtyLog(1, false);
  });
});
