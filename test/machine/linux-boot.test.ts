import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkedGuestMemory } from "../../src/machine/guest-memory.js";
import { MiB, planMemory } from "../../src/machine/memory-map.js";
import { KernelImageError, LinuxLoadError, loadLinux, parseBzImage } from "../../src/machine/linux-boot.js";

interface FakeKernel {
  version?: number;
  xloadflags?: number;
  initSize?: number;
  payload?: number;
  magic?: boolean;
}

/** A synthetic bzImage with a 2.15 setup header and a patterned payload. */
function fakeBzImage(o: FakeKernel = {}): Uint8Array {
  const setupSects = 4;
  const payload = o.payload ?? 64 * 1024;
  const img = new Uint8Array((setupSects + 1) * 512 + payload);
  const dv = new DataView(img.buffer);
  img[0x1f1] = setupSects;
  dv.setUint32(0x1f4, payload / 16, true);
  dv.setUint16(0x1fe, 0xaa55, true);
  img[0x200] = 0xeb;
  img[0x201] = 0x6a; // header ends at 0x26c
  if (o.magic !== false) dv.setUint32(0x202, 0x53726448, true);
  dv.setUint16(0x206, o.version ?? 0x020f, true);
  img[0x211] = 0x01; // LOADED_HIGH
  dv.setUint32(0x22c, 0x7fffffff, true);
  dv.setUint32(0x230, 0x200000, true);
  img[0x234] = 1;
  dv.setUint16(0x236, o.xloadflags ?? 0x3, true);
  dv.setUint32(0x238, 2047, true);
  dv.setBigUint64(0x258, 0x1000000n, true);
  dv.setUint32(0x260, o.initSize ?? 8 * MiB, true);
  for (let i = 0; i < payload; i++) img[(setupSects + 1) * 512 + i] = (i * 7) & 0xff;
  return img;
}

test("parse: setup header fields", () => {
  const h = parseBzImage(fakeBzImage());
  assert.equal(h.version, 0x020f);
  assert.equal(h.setupSects, 4);
  assert.equal(h.payloadOffset, 5 * 512);
  assert.equal(h.xloadflags & 1, 1);
  assert.equal(h.relocatable, true);
  assert.equal(h.kernelAlignment, 0x200000);
  assert.equal(h.initSize, 8 * MiB);
  assert.equal(h.cmdlineSize, 2047);
  assert.equal(h.initrdAddrMax, 0x7fffffff);
  assert.equal(h.prefAddress, 0x1000000n);
  assert.equal(h.headerEnd, 0x26c);
});

test("parse: rejects non-kernels with the reason", () => {
  const code = (c: string) => (e: unknown) => e instanceof KernelImageError && e.code === c;
  assert.throws(() => parseBzImage(new Uint8Array(100)), code("KERNEL_TOO_SHORT"));
  assert.throws(() => parseBzImage(fakeBzImage({ magic: false })), code("KERNEL_NOT_BZIMAGE"));
  assert.throws(() => parseBzImage(Uint8Array.from([0x7f, 0x45, 0x4c, 0x46, ...new Uint8Array(4096)])), /HdrS/);
  assert.throws(() => parseBzImage(fakeBzImage({ version: 0x0205 })), code("KERNEL_PROTOCOL_TOO_OLD"));
  assert.throws(() => parseBzImage(fakeBzImage({ xloadflags: 0 })), code("KERNEL_NOT_64BIT"));
  assert.throws(() => parseBzImage(fakeBzImage().subarray(0, 5 * 512 + 100)), code("KERNEL_TRUNCATED"));
});

test("load: kernel at 1 MiB, initrd high, cmdline, zero page", () => {
  const plan = planMemory(64 * MiB);
  const mem = ChunkedGuestMemory.anonymous(plan.ram);
  const kernel = fakeBzImage();
  const initrd = new Uint8Array(3 * MiB + 123).fill(0xab);
  const info = loadLinux(mem, plan, kernel, initrd, "console=ttyS0 panic=-1", { rsdpAddr: 0xe0000 });
  assert.equal(info.entry64, 0x100200);
  assert.equal(info.bootParams, 0x7000);
  // Kernel bytes copied verbatim from the payload offset.
  assert.deepEqual(mem.read(0x100000, 4096), kernel.subarray(2560, 2560 + 4096));
  // Decompression span: max(align(1 MiB, 2 MiB), pref 16 MiB) + init_size 8 MiB.
  assert.equal(info.kernelEnd, 24 * MiB);
  assert.ok(info.initrd !== undefined);
  assert.equal(info.initrd.addr % 4096, 0);
  assert.ok(info.initrd.addr + info.initrd.size <= 64 * MiB && info.initrd.addr + info.initrd.size > 64 * MiB - 4096);
  assert.equal(mem.read(info.initrd.addr, 1)[0], 0xab);

  const bp = new DataView(mem.read(0x7000, 4096).buffer);
  assert.equal(bp.getUint32(0x202, true), 0x53726448); // header copied
  assert.equal(bp.getUint8(0x210), 0xff); // type_of_loader
  assert.equal(bp.getUint16(0x1fa, true), 0xffff); // vid_mode
  assert.equal(bp.getUint8(0x211) & 0x81, 0x81); // LOADED_HIGH | CAN_USE_HEAP
  assert.equal(bp.getUint32(0x218, true), info.initrd.addr);
  assert.equal(bp.getUint32(0x21c, true), initrd.length);
  assert.equal(bp.getUint32(0x0c0, true), 0);
  assert.equal(bp.getUint32(0x228, true), 0x20000);
  assert.equal(bp.getBigUint64(0x070, true), 0xe0000n);
  assert.equal(bp.getUint8(0x1ef), 0); // sentinel clear
  const n = bp.getUint8(0x1e8);
  assert.equal(n, 6);
  assert.equal(bp.getUint32(0x2d0 + 20 * 3 + 16, true), 1);
  assert.equal(bp.getBigUint64(0x2d0 + 20 * 3, true), 0x100000n);
  const cmd = mem.read(0x20000, 24);
  assert.equal(new TextDecoder().decode(cmd.subarray(0, 22)), "console=ttyS0 panic=-1");
  assert.equal(cmd[22], 0);
});

test("load: typed errors when things do not fit", () => {
  const plan = planMemory(32 * MiB);
  const mem = ChunkedGuestMemory.anonymous(plan.ram);
  const code = (c: string) => (e: unknown) => e instanceof LinuxLoadError && e.code === c;
  assert.throws(() => loadLinux(mem, plan, fakeBzImage(), new Uint8Array(20 * MiB), ""), code("INITRD_DOES_NOT_FIT"));
  assert.throws(() => loadLinux(mem, plan, fakeBzImage(), new Uint8Array(20 * MiB), ""), /20971520 bytes/);
  assert.throws(() => loadLinux(mem, plan, fakeBzImage({ initSize: 40 * MiB }), undefined, ""), code("KERNEL_DOES_NOT_FIT"));
  assert.throws(() => loadLinux(mem, plan, fakeBzImage(), undefined, "x".repeat(2048)), code("CMDLINE_TOO_LONG"));
  const ok = loadLinux(mem, plan, fakeBzImage(), undefined, "x".repeat(2047));
  assert.equal(ok.initrd, undefined);
});
