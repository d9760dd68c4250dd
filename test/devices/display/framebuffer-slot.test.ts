/**
 * The framebuffer as a KVM memory slot (Partition.mapDeviceMemory) on this
 * host's /dev/kvm: a hand-assembled 64-bit guest draws into FRAMEBUFFER_GPA
 * and reads what the host drew, with no MMIO exits; the dirty log shows the
 * pages it touched; after unmapDeviceMemory the same write is an MMIO exit.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { KvmSystem } from "../../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition, PartitionConfigError } from "../../../src/hypervisor/partition.js";
import { DeviceMemory, DeviceMemoryError } from "../../../src/hypervisor/device-memory.js";
import * as libc from "../../../src/hypervisor/libc.js";
import { VirtualProcessor, type VcpuExit } from "../../../src/hypervisor/virtual-processor.js";
import { FRAMEBUFFER_GPA, LinearFramebuffer } from "../../../src/devices/display/linear-framebuffer.js";
import { CODE_GPA, code, enterLongMode, imm32, writeLongModeTables } from "../../hypervisor/guests.js";
import { assertDirtyPages, noKvm } from "../../fixtures/kvm.js";

const RAM = [{ gpa: 0, length: 2 << 20, fileOffset: 0 }];

function describe(exit: VcpuExit): string {
  return JSON.stringify(exit, (_k, v: unknown) => (typeof v === "bigint" ? `0x${v.toString(16)}` : v instanceof Uint8Array ? Array.from(v) : v));
}

/** A partition with 2 MiB of RAM, page tables for 4 GiB (the framebuffer sits just below 4 GiB) and one vCPU in long mode. */
function withGuest(bytes: Uint8Array, body: (vp: VirtualProcessor, p: Partition) => void): void {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: RAM });
  p.setTssAddr(DEFAULT_TSS_GPA);
  const vp = VirtualProcessor.create(p, 0);
  try {
    vp.setCpuid(sys.supportedCpuid());
    writeLongModeTables(p, 4);
    p.guestMemory.write(CODE_GPA, bytes);
    enterLongMode(vp);
    body(vp, p);
  } finally {
    vp.close();
    p.destroy();
    sys.close();
  }
}

test("guest draws into the mapped framebuffer without exits; host sees the pixels, guest sees the host's", { skip: noKvm }, () => {
  const guest = code(
    [0xbb, ...imm32(FRAMEBUFFER_GPA)], //             mov ebx, 0xfc000000
    [0xc7, 0x03, ...imm32(0x00ff0000)], //            mov dword [rbx], 0x00ff0000       (0,0) red
    [0xc7, 0x43, 0x04, ...imm32(0x0000ff00)], //      mov dword [rbx+4], 0x0000ff00     (1,0) green
    [0xc7, 0x83, ...imm32(4096 * 767 + 4092), ...imm32(0x000000ff)], // mov dword [rbx+0x2ffffc], 0xff  (1023,767) blue
    [0x8b, 0x8b, ...imm32(4096 * 100)], //            mov ecx, [rbx+0x64000]           (0,100): drawn by the host
    [0x89, 0xc8], //                                  mov eax, ecx
    [0xe6, 0x80], //                                  out 0x80, al
    [0xc7, 0x43, 0x08, ...imm32(0x00123456)], //      mov dword [rbx+8], 0x123456      after unmap: an MMIO exit
    [0xf4], //                                        hlt
  );
  withGuest(guest, (vp, p) => {
    const fb = LinearFramebuffer.create();
    try {
      const slot = p.mapDeviceMemory(fb.gpa, fb.memory, { logDirty: true });
      assert.ok(slot >= RAM.length, "device slots come after the RAM slots");
      assert.deepEqual(p.deviceMemorySlots(), [{ slot, gpa: FRAMEBUFFER_GPA, size: 3 << 20 }]);
      assert.ok(p.deviceMemoryDirtyLog(slot).every((b) => b === 0));
      fb.pixels().set([0x56, 0x34, 0x12, 0x00], fb.stride * 100); // (0,100) = #123456

      let exit = vp.run();
      assert.equal(exit.reason, "io", `no exit before the OUT: ${describe(exit)}`);
      if (exit.reason !== "io") return;
      assert.equal(exit.data[0], 0x56, "the guest read the host's pixel");
      assert.equal(vp.getRegs().rcx, 0x123456n);
      assert.equal(fb.pixel(0, 0), 0xff0000);
      assert.equal(fb.pixel(1, 0), 0x00ff00);
      assert.equal(fb.pixel(1023, 767), 0x0000ff);
      assert.equal(fb.pixel(2, 0), 0);

      const dirty = p.deviceMemoryDirtyLog(slot);
      assert.equal(dirty.length, 768 / 8);
      assertDirtyPages(dirty, { written: [0, 767], read: [100] }, "framebuffer log");

      p.unmapDeviceMemory(slot);
      assert.deepEqual(p.deviceMemorySlots(), []);
      assert.throws(() => p.unmapDeviceMemory(slot), PartitionConfigError);
      exit = vp.run();
      assert.equal(exit.reason, "mmio", describe(exit));
      if (exit.reason !== "mmio") return;
      assert.deepEqual([exit.gpa, exit.isWrite, Array.from(exit.data)], [FRAMEBUFFER_GPA + 8, true, [0x56, 0x34, 0x12, 0x00]]);
      assert.equal(fb.pixel(2, 0), 0, "unmapped: the write did not reach the framebuffer");
      assert.equal(vp.run().reason, "hlt");
    } finally {
      fb.close();
    }
  });
});

test("a libc view can back a slot too; slots are numbered apart; bad requests are refused", { skip: noKvm }, () => {
  const guest = code(
    [0xbb, ...imm32(0xfd00_0000)], //    mov ebx, 0xfd000000
    [0x8b, 0x03], //                     mov eax, [rbx]
    [0xe6, 0x80], //                     out 0x80, al
    [0xf4], //                           hlt
  );
  withGuest(guest, (vp, p) => {
    const view = libc.alignedBuffer(8192);
    const mem = DeviceMemory.create("test", 4096);
    try {
      view[0] = 0x5a;
      const a = p.mapDeviceMemory(0xfd00_0000, view);
      const b = p.mapDeviceMemory(0xfd10_0000, mem);
      assert.notEqual(a, b);
      assert.ok(a >= RAM.length && b >= RAM.length);
      const exit = vp.run();
      assert.equal(exit.reason, "io", describe(exit));
      if (exit.reason === "io") assert.equal(exit.data[0], 0x5a);

      const code_ = (c: string) => (e: unknown) => e instanceof PartitionConfigError && e.code === c;
      assert.throws(() => p.mapDeviceMemory(0x1000, mem), code_("PARTITION_DEVICE_MEMORY_OVERLAP"), "over RAM");
      assert.throws(() => p.mapDeviceMemory(0xfd00_1000, mem), code_("PARTITION_DEVICE_MEMORY_OVERLAP"), "over another slot");
      assert.throws(() => p.mapDeviceMemory(0xfe00_0800, mem), code_("PARTITION_DEVICE_MEMORY_ALIGNMENT"));
      assert.throws(() => p.mapDeviceMemory(0xfe00_0000, view.subarray(0, 100)), code_("PARTITION_DEVICE_MEMORY_ALIGNMENT"));
      assert.throws(() => p.mapDeviceMemory(0xfe00_0000, view.subarray(16, 16 + 4096)), code_("PARTITION_DEVICE_MEMORY_ALIGNMENT"));
      assert.throws(() => p.mapDeviceMemory(0xfe00_0000, new Uint8Array(4096)), code_("PARTITION_DEVICE_MEMORY_VIEW"));
      assert.throws(() => p.mapDeviceMemory(0xfe00_0000, { fd: mem.fd, offset: 100, size: 4096 }), code_("PARTITION_DEVICE_MEMORY_ALIGNMENT"));
      assert.throws(() => p.deviceMemoryDirtyLog(a), code_("PARTITION_NO_DIRTY_LOG"));
      assert.throws(() => p.deviceMemoryDirtyLog(99), code_("PARTITION_NO_SLOT"));
      const attached = Partition.attach(p.handoff());
      try {
        assert.throws(() => attached.mapDeviceMemory(0xfe00_0000, mem), code_("PARTITION_ATTACHED"));
      } finally {
        attached.destroy();
      }
      p.unmapDeviceMemory(a);
      const c = p.mapDeviceMemory(0xfd00_0000, mem.bytes); // the freed slot number and range are reusable
      assert.equal(c, a);
      p.unmapDeviceMemory(c); // before mem.close() unmaps the view KVM points at
      // b stays mapped: destroy() releases the partition's own mapping.
    } finally {
      mem.close();
      libc.releaseMapping(view);
    }
  });
});

test("DeviceMemory: memfd-backed, page-multiple sizes, attach shares the pages", () => {
  assert.throws(() => DeviceMemory.create("bad", 100), DeviceMemoryError);
  assert.throws(() => DeviceMemory.create("bad", 0), DeviceMemoryError);
  const m = DeviceMemory.create("shared", 8192);
  const other = DeviceMemory.attach(m.handoff());
  try {
    m.bytes[8191] = 7;
    assert.equal(other.bytes[8191], 7);
    assert.equal(m.offset, 0);
  } finally {
    other.close();
    m.close();
    m.close(); // idempotent
  }
  assert.equal(m.isClosed, true);
});
