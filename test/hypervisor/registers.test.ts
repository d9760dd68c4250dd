/**
 * Register state round trips through KVM (what saved state relies on):
 * regs, sregs, FPU, XSAVE, MSRs, local APIC, CPUID, MP state, vCPU events;
 * plus the system-level queries.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition } from "../../src/hypervisor/partition.js";
import { VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";
import { KvmError } from "../../src/hypervisor/errors.js";
import { KVM_CAP, KVM_MP_STATE, REGS_ORDER, type CpuidEntry } from "../../src/hypervisor/kvm-abi.js";
import { enterLongMode, writeLongModeTables } from "./guests.js";
import { noKvm } from "../fixtures/kvm.js";


function withVcpu(opts: { irqchip: boolean }, body: (vp: VirtualProcessor, p: Partition, sys: KvmSystem) => void): void {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 2 << 20, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  if (opts.irqchip) p.createIrqchip();
  const vp = VirtualProcessor.create(p, 0);
  try {
    body(vp, p, sys);
  } finally {
    vp.close();
    p.destroy();
    sys.close();
  }
}

test("system: API version, vCPU mmap size, limits, supported CPUID, MSR list", { skip: noKvm }, () => {
  const sys = KvmSystem.open();
  try {
    assert.equal(sys.apiVersion, 12);
    assert.ok(sys.vcpuMmapSize >= 4096);
    assert.ok(sys.maxVcpus >= 1);
    assert.ok(sys.checkExtension(KVM_CAP.USER_MEMORY) > 0);
    const cpuid = sys.supportedCpuid();
    assert.ok(cpuid.some((e) => e.function === 0), "leaf 0 present");
    assert.ok(cpuid.some((e) => e.function === 0x80000001), "leaf 0x80000001 present");
    const msrs = sys.msrIndexList();
    // EFER travels in sregs, not in the MSR list; STAR and LSTAR are listed.
    assert.ok(msrs.includes(0xc0000081) && msrs.includes(0xc0000082), "STAR/LSTAR in the MSR index list");
  } finally {
    sys.close();
  }
});

test("regs round trip (all 18 registers, full 64-bit values)", { skip: noKvm }, () => {
  withVcpu({ irqchip: false }, (vp) => {
    const regs = vp.getRegs();
    REGS_ORDER.forEach((k, i) => (regs[k] = 0x1111_0000_0000_0000n * BigInt((i % 15) + 1) + BigInt(i)));
    regs.rflags = 0x202n; // only architecturally valid flags survive
    vp.setRegs(regs);
    assert.deepEqual(vp.getRegs(), regs);
  });
});

test("sregs round trip (long-mode segments, descriptor tables, control registers)", { skip: noKvm }, () => {
  withVcpu({ irqchip: false }, (vp, p, sys) => {
    vp.setCpuid(sys.supportedCpuid());
    writeLongModeTables(p);
    const set = enterLongMode(vp);
    const got = vp.getSregs();
    assert.deepEqual(got.cs, set.cs);
    assert.deepEqual(got.ds, set.ds);
    assert.deepEqual(got.gdt, set.gdt);
    assert.equal(got.cr3, set.cr3);
    assert.equal(got.cr4 & 0x20n, 0x20n);
    assert.equal(got.cr0 & 0x80000001n, 0x80000001n);
    assert.equal(got.efer & 0x500n, 0x500n);
    got.idt = { base: 0x3000n, limit: 0xfff };
    got.cr2 = 0xdead000n;
    vp.setSregs(got);
    const again = vp.getSregs();
    assert.deepEqual(again.idt, { base: 0x3000n, limit: 0xfff });
    assert.equal(again.cr2, 0xdead000n);
  });
});

test("fpu round trip (x87 control word, x87 and SSE registers)", { skip: noKvm }, () => {
  withVcpu({ irqchip: false }, (vp) => {
    const fpu = vp.getFpu();
    fpu.fcw = 0x027f;
    fpu.xmm[3] = Uint8Array.from({ length: 16 }, (_, i) => i + 1);
    fpu.xmm[15] = Uint8Array.from({ length: 16 }, (_, i) => 0xf0 + i);
    fpu.fpr[0] = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 0xff, 0x3f, 0, 0, 0, 0, 0, 0]);
    vp.setFpu(fpu);
    const got = vp.getFpu();
    assert.equal(got.fcw, 0x027f);
    assert.deepEqual(Array.from(got.xmm[3]!), Array.from(fpu.xmm[3]!));
    assert.deepEqual(Array.from(got.xmm[15]!), Array.from(fpu.xmm[15]!));
    assert.deepEqual(Array.from(got.fpr[0]!.subarray(0, 10)), Array.from(fpu.fpr[0]!.subarray(0, 10)));
    // KVM quirk (not PVM-specific): KVM_GET_FPU / KVM_SET_FPU do not carry MXCSR;
    // it reads as 0 whatever the guest has. MXCSR travels in the XSAVE area.
    assert.equal(got.mxcsr, 0);
  });
});

test("xsave round trip (MXCSR and SSE state in the legacy region)", { skip: noKvm }, () => {
  withVcpu({ irqchip: false }, (vp, _p, sys) => {
    if (sys.checkExtension(KVM_CAP.XSAVE) === 0) return;
    vp.setCpuid(sys.supportedCpuid());
    const area = vp.getXsave();
    assert.ok(area.byteLength >= 4096);
    const v = new DataView(area.buffer);
    assert.equal(v.getUint32(24, true), 0x1f80, "reset MXCSR");
    v.setUint32(24, 0x7f80, true); // MXCSR: round toward zero
    // XMM1 lives at 160 + 16 in the FXSAVE-format legacy region; XSTATE_BV (offset 512) must
    // name FP|SSE or KVM treats them as in their init state.
    const xmm1 = Uint8Array.from({ length: 16 }, (_, i) => 0x80 + i);
    area.set(xmm1, 176);
    v.setBigUint64(512, v.getBigUint64(512, true) | 3n, true);
    vp.setXsave(area);
    const again = vp.getXsave();
    assert.equal(new DataView(again.buffer).getUint32(24, true), 0x7f80);
    assert.deepEqual(Array.from(again.subarray(176, 192)), Array.from(xmm1));
    assert.deepEqual(Array.from(vp.getFpu().xmm[1]!), Array.from(xmm1));
  });
});

test("msrs round trip; an unknown MSR is refused with its index", { skip: noKvm }, () => {
  withVcpu({ irqchip: false }, (vp, _p, sys) => {
    vp.setCpuid(sys.supportedCpuid());
    const entries = [
      { index: 0x174, data: 0x10n }, // IA32_SYSENTER_CS
      { index: 0xc0000081, data: 0x0023001000000000n }, // STAR
      { index: 0xc0000082, data: 0xffffffff81000000n }, // LSTAR
      { index: 0xc0000102, data: 0xffff888000001000n }, // KERNEL_GS_BASE
    ];
    vp.setMsrs(entries);
    assert.deepEqual(
      vp.getMsrs(entries.map((e) => e.index)),
      entries,
    );
    assert.throws(() => vp.getMsrs([0x174, 0x4b564dff]), /refused MSR 0x4b564dff/);
  });
});

test("lapic round trip (in-kernel irqchip): TPR and LVT timer", { skip: noKvm }, () => {
  withVcpu({ irqchip: true }, (vp) => {
    const lapic = vp.getLapic();
    assert.equal(lapic.byteLength, 1024);
    const v = new DataView(lapic.buffer);
    v.setUint32(0x80, 0x20, true); // TPR
    v.setUint32(0x320, 0x000200ef, true); // LVT timer: periodic, vector 0xef, unmasked
    vp.setLapic(lapic);
    const got = new DataView(vp.getLapic().buffer);
    assert.equal(got.getUint32(0x80, true), 0x20);
    assert.equal(got.getUint32(0x320, true), 0x000200ef);
  });
});

/** Leaves the PVM module overwrites with the host's own values on KVM_SET_CPUID2 (measured here). */
const PVM_FORCED_LEAVES = new Set([0x1, 0x7, 0xd]);
const isPvm = fs.existsSync("/sys/module/kvm_pvm");

/**
 * A leaf without the fields KVM keeps in step with the vCPU's state itself
 * (kvm_update_cpuid_runtime): CPUID.1 ECX.OSXSAVE (CR4) and EDX.APIC (APIC base
 * MSR), CPUID.7.0 ECX.OSPKE (CR4), and the XSAVE area sizes in CPUID.0xD.0/1
 * EBX (XCR0, XSS). Seen on AMD-V: 0xD.0 EBX set as 832 came back 576.
 */
function withoutRuntimeFields(e: CpuidEntry): CpuidEntry {
  if (e.function === 0x1) return { ...e, ecx: (e.ecx & ~(1 << 27)) >>> 0, edx: (e.edx & ~(1 << 9)) >>> 0 };
  if (e.function === 0x7 && e.index === 0) return { ...e, ecx: (e.ecx & ~(1 << 4)) >>> 0 };
  if (e.function === 0xd && (e.index === 0 || e.index === 1)) return { ...e, ebx: 0 };
  return e;
}

test(`cpuid round trip (KVM_SET_CPUID2 / KVM_GET_CPUID2)${isPvm ? "; on PVM leaves 1, 7, 0xD come back as the host's" : ""}`, { skip: noKvm }, () => {
  withVcpu({ irqchip: false }, (vp, _p, sys) => {
    const supported = sys.supportedCpuid();
    const entries = supported.map((e) => {
      if (e.function === 0x80000001) return { ...e, ecx: (e.ecx & ~1) >>> 0 }; // hide LAHF/SAHF in 64-bit mode
      if (e.function === 1) return { ...e, ecx: (e.ecx & ~(1 << 23)) >>> 0 }; // hide POPCNT
      return e;
    });
    vp.setCpuid(entries);
    const got = vp.getCpuid();
    assert.equal(got.length, entries.length);
    for (let i = 0; i < entries.length; i++) {
      const want = entries[i]!;
      const have = got[i]!;
      assert.deepEqual([have.function, have.index], [want.function, want.index]);
      if (isPvm && PVM_FORCED_LEAVES.has(want.function)) continue;
      assert.deepEqual(withoutRuntimeFields(have), withoutRuntimeFields(want), `leaf 0x${want.function.toString(16)}.${want.index}`);
    }
    assert.equal(got.find((e) => e.function === 0x80000001)!.ecx & 1, 0);
    if (!isPvm) assert.equal(got.find((e) => e.function === 1)!.ecx & (1 << 23), 0);
  });
});

test("mp state and vcpu events round trip (in-kernel irqchip)", { skip: noKvm }, () => {
  withVcpu({ irqchip: true }, (vp) => {
    assert.equal(vp.getMpState(), KVM_MP_STATE.RUNNABLE);
    vp.setMpState(KVM_MP_STATE.HALTED);
    assert.equal(vp.getMpState(), KVM_MP_STATE.HALTED);
    vp.setMpState(KVM_MP_STATE.RUNNABLE);
    const ev = vp.getVcpuEvents();
    assert.equal(ev.raw.byteLength, 64);
    vp.setVcpuEvents(ev);
  });
});

test("a failing ioctl throws KvmError with ioctl name, errno name and vm/vcpu context", { skip: noKvm }, () => {
  withVcpu({ irqchip: false }, (vp) => {
    // Without an in-kernel irqchip there is no local APIC to read.
    const err = (() => {
      try {
        vp.getLapic();
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    assert.ok(err instanceof KvmError, String(err));
    assert.equal(err.ioctl, "KVM_GET_LAPIC");
    assert.match(err.errnoName, /^E[A-Z0-9]+$/);
    assert.equal(err.code, "KVM_IOCTL_FAILED");
    assert.equal(err.context.vcpu, 0);
    assert.equal(typeof err.context.vm, "number");
  });
});
