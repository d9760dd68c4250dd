/**
 * Interrupts through the in-kernel irqchip: an eventfd bound to a GSI with
 * irqfd, and KVM_IRQ_LINE, both delivered to a real-mode guest through the
 * in-kernel 8259 PIC; the guest's interrupt handler (an IVT entry) reports
 * with an OUT. Also: a signal makes a halted vCPU's run() return "intr".
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition } from "../../src/hypervisor/partition.js";
import { VirtualProcessor, type VcpuExit } from "../../src/hypervisor/virtual-processor.js";
import { EventFd } from "../../src/hypervisor/eventfd.js";
import { CODE_GPA, code, enterLongMode, enterRealMode, withWatchdog, writeLongModeTables } from "./guests.js";
import { noKvm } from "../fixtures/kvm.js";


function describe(exit: VcpuExit): string {
  return JSON.stringify(exit, (_k, v: unknown) => (typeof v === "bigint" ? `0x${v.toString(16)}` : v instanceof Uint8Array ? Array.from(v) : v));
}

const IRQ = 5;
const VECTOR = 0x20 + IRQ;
const HANDLER = 0x1020;

/** Programs the master PIC (vector base 0x20, only IRQ5 unmasked), says "ready" on port 0x80, then sti; hlt loop. */
const PIC_GUEST = code(
  [0xfa], //                  cli
  [0xb0, 0x11, 0xe6, 0x20], // ICW1: edge, cascade, ICW4 needed
  [0xb0, 0x20, 0xe6, 0x21], // ICW2: vector base 0x20
  [0xb0, 0x04, 0xe6, 0x21], // ICW3: slave on IRQ2
  [0xb0, 0x01, 0xe6, 0x21], // ICW4: 8086 mode
  [0xb0, 0xdf, 0xe6, 0x21], // OCW1: mask all but IRQ5
  [0xb0, 0x01, 0xe6, 0x80], // out 0x80, 1   ("ready")
  [0xfb], //                  sti
  [0xf4], //                  idle: hlt
  [0xeb, 0xfd], //            jmp idle
);
/** Interrupt handler at HANDLER: EOI, then report the vector on port 0x81, iret. */
const PIC_HANDLER = code(
  [0xb0, 0x20, 0xe6, 0x20], // out 0x20, 0x20  (non-specific EOI)
  [0xb0, VECTOR, 0xe6, 0x81], // out 0x81, VECTOR
  [0xcf], //                  iret
);

function withPicGuest(body: (vp: VirtualProcessor, p: Partition) => void): void {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  try {
    p.createIrqchip();
    const vp = VirtualProcessor.create(p, 0);
    try {
      p.guestMemory.write(CODE_GPA, PIC_GUEST);
      p.guestMemory.write(HANDLER, PIC_HANDLER);
      const ivt = new DataView(p.guestMemory.bytes(VECTOR * 4, 4).buffer, p.guestMemory.bytes(VECTOR * 4, 4).byteOffset, 4);
      ivt.setUint16(0, HANDLER, true); // offset
      ivt.setUint16(2, 0, true); // segment
      enterRealMode(vp);
      // Run up to the "ready" OUT: PIC programmed, interrupts still off.
      const ready = vp.run();
      assert.equal(ready.reason, "io", describe(ready));
      if (ready.reason !== "io") return;
      assert.deepEqual([ready.port, ready.data[0]], [0x80, 1]);
      body(vp, p);
    } finally {
      vp.close();
    }
  } finally {
    p.destroy();
    sys.close();
  }
}

function expectHandlerReport(vp: VirtualProcessor): void {
  const exit = vp.run();
  assert.notEqual(exit.reason, "intr", "no interrupt arrived before the watchdog fired");
  assert.equal(exit.reason, "io", describe(exit));
  if (exit.reason !== "io") return;
  assert.deepEqual([exit.port, exit.data[0]], [0x81, VECTOR]);
}

test("irqfd: writing the eventfd raises the GSI; the guest's IVT handler runs", { skip: noKvm }, async () => {
  await withWatchdog(10, () =>
    withPicGuest((vp, p) => {
      const efd = EventFd.create();
      try {
        p.irqfd(IRQ, efd.fd);
        efd.signal();
        expectHandlerReport(vp);
        // A second edge after EOI is delivered again.
        efd.signal();
        expectHandlerReport(vp);
        p.removeIrqfd(IRQ, efd.fd);
      } finally {
        efd.close();
      }
    }),
  );
});

test("KVM_IRQ_LINE: an edge on the GSI reaches the guest", { skip: noKvm }, async () => {
  await withWatchdog(10, () =>
    withPicGuest((vp, p) => {
      p.setIrqLine(IRQ, true);
      p.setIrqLine(IRQ, false);
      expectHandlerReport(vp);
    }),
  );
});

test("a signal makes run() of a halted vCPU return intr", { skip: noKvm }, async () => {
  await withWatchdog(1, () =>
    withPicGuest((vp) => {
      // No interrupt is raised: the vCPU halts in the kernel until the watchdog's signal.
      assert.equal(vp.run().reason, "intr");
    }),
  );
});

test("MSIs reach the local APIC: KVM_SIGNAL_MSI, and irqfd on a GSI routed to an MSI", { skip: noKvm }, async () => {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  try {
    p.createIrqchip();
    const vp = VirtualProcessor.create(p, 0);
    const efd = EventFd.create();
    try {
      p.guestMemory.write(CODE_GPA, code([0xfb], [0xf4], [0xeb, 0xfd])); // sti; idle: hlt; jmp idle
      const handlers: [number, number][] = [
        [0x30, 0x1020],
        [0x40, 0x1030],
      ];
      for (const [vector, at] of handlers) {
        p.guestMemory.write(at, code([0xb0, vector, 0xe6, 0x81], [0xcf])); // out 0x81, vector; iret
        const ivt = p.guestMemory.bytes(vector * 4, 4);
        new DataView(ivt.buffer, ivt.byteOffset, 4).setUint32(0, at, true); // segment 0 : offset
      }
      // Software-enable the local APIC (SVR bit 8) from outside: a real-mode guest cannot reach 0xfee00000.
      const lapic = vp.getLapic();
      const lv = new DataView(lapic.buffer);
      lv.setUint32(0xf0, lv.getUint32(0xf0, true) | 0x100, true);
      vp.setLapic(lapic);
      enterRealMode(vp);

      await withWatchdog(10, () => {
        // Fixed delivery, physical destination APIC 0, vector 0x30.
        assert.ok(p.signalMsi(0xfee00000, 0x30) > 0, "MSI accepted");
        let exit = vp.run();
        assert.equal(exit.reason, "io", describe(exit));
        if (exit.reason !== "io") return;
        assert.deepEqual([exit.port, exit.data[0]], [0x81, 0x30]);

        p.setGsiRouting([{ gsi: 24, kind: "msi", addressLo: 0xfee00000, addressHi: 0, data: 0x40 }]);
        p.irqfd(24, efd.fd);
        efd.signal();
        exit = vp.run();
        assert.equal(exit.reason, "io", describe(exit));
        if (exit.reason !== "io") return;
        assert.deepEqual([exit.port, exit.data[0]], [0x81, 0x40]);
        p.removeIrqfd(24, efd.fd);
      });
    } finally {
      efd.close();
      vp.close();
    }
  } finally {
    p.destroy();
    sys.close();
  }
});

test("long mode CPL0: an MSI is delivered through the IDT; iretq returns to the halted loop", { skip: noKvm }, async () => {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 2 << 20, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  try {
    p.createIrqchip();
    const vp = VirtualProcessor.create(p, 0);
    try {
      vp.setCpuid(sys.supportedCpuid());
      writeLongModeTables(p);
      p.guestMemory.write(CODE_GPA, code([0xfb], [0xf4], [0xeb, 0xfd])); // sti; idle: hlt; jmp idle
      const IDT = 0x3000;
      for (const [vector, at] of [
        [0x30, 0x1020],
        [0x40, 0x1030],
      ] as const) {
        p.guestMemory.write(at, code([0xb0, vector, 0xe6, 0x81], [0x48, 0xcf])); // out 0x81, vector; iretq
        // 64-bit interrupt gate: offset 15..0, selector 0x08, IST 0, type 0x8E (present, DPL0, interrupt gate), offset 31..16, 63..32.
        const gate = new DataView(new ArrayBuffer(16));
        gate.setUint16(0, at & 0xffff, true);
        gate.setUint16(2, 0x08, true);
        gate.setUint8(5, 0x8e);
        gate.setUint16(6, at >>> 16, true);
        p.guestMemory.write(IDT + vector * 16, new Uint8Array(gate.buffer));
      }
      const s = enterLongMode(vp);
      vp.setSregs({ ...s, idt: { base: BigInt(IDT), limit: 0xfff } });
      const lapic = vp.getLapic();
      const lv = new DataView(lapic.buffer);
      lv.setUint32(0xf0, lv.getUint32(0xf0, true) | 0x100, true); // SVR: APIC software-enabled
      vp.setLapic(lapic);

      await withWatchdog(10, () => {
        for (const vector of [0x30, 0x40]) {
          assert.ok(p.signalMsi(0xfee00000, vector) > 0);
          const exit = vp.run();
          assert.equal(exit.reason, "io", describe(exit));
          if (exit.reason !== "io") return;
          assert.deepEqual([exit.port, exit.data[0]], [0x81, vector]);
          // Interrupt frame: SS, RSP, RFLAGS, CS, RIP pushed on the 0x8000 stack.
          assert.equal(vp.getRegs().rsp, 0x8000n - 40n);
        }
      });
    } finally {
      vp.close();
    }
  } finally {
    p.destroy();
    sys.close();
  }
});
