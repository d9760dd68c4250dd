/**
 * Small hand-assembled test guests and the CPU state they start in: real mode
 * (flat CS=0) and 64-bit long mode at CPL0 with identity-mapped 2 MiB pages.
 * Imported by the hypervisor tests and the pio-exit benchmark; no side effects.
 */
import type { Partition } from "../../src/hypervisor/partition.js";
import type { Regs, Segment, Sregs, VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";

export const CODE_GPA = 0x1000;
/** Where the long-mode page tables live (PML4, PDPT, then one PD per GiB mapped). */
export const PML4_GPA = 0x10000;
export const GDT_GPA = 0x500;

export function zeroRegs(): Regs {
  return {
    rax: 0n, rbx: 0n, rcx: 0n, rdx: 0n, rsi: 0n, rdi: 0n, rsp: 0n, rbp: 0n,
    r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n,
    rip: 0n, rflags: 2n,
  };
}

/** Real mode with CS=DS=ES=SS=0 (flat first 64 KiB), starting at `rip`. */
export function enterRealMode(vp: VirtualProcessor, rip = CODE_GPA, regs: Partial<Regs> = {}): void {
  const s = vp.getSregs();
  for (const seg of [s.cs, s.ds, s.es, s.ss, s.fs, s.gs]) {
    seg.base = 0n;
    seg.selector = 0;
  }
  vp.setSregs(s);
  vp.setRegs({ ...zeroRegs(), rip: BigInt(rip), rsp: 0xf000n, ...regs });
}

function flatSegment(selector: number, code: boolean): Segment {
  return {
    base: 0n,
    limit: 0xffffffff,
    selector,
    type: code ? 11 : 3, // execute/read accessed : read/write accessed
    present: 1,
    dpl: 0,
    db: code ? 0 : 1,
    s: 1,
    l: code ? 1 : 0,
    g: 1,
    avl: 0,
    unusable: 0,
  };
}

/**
 * Write a GDT (null, 64-bit code 0x08, data 0x10) and identity-mapping page
 * tables for the first `gib` GiB (2 MiB pages) into guest RAM.
 */
export function writeLongModeTables(partition: Partition, gib = 1): void {
  const mem = partition.guestMemory;
  const gdt = new DataView(new ArrayBuffer(24));
  gdt.setBigUint64(8, 0x00af9a000000ffffn, true); // code: P, DPL0, S, type 0xA, L, G
  gdt.setBigUint64(16, 0x00cf92000000ffffn, true); // data: P, DPL0, S, type 0x2, D/B, G
  mem.write(GDT_GPA, new Uint8Array(gdt.buffer));
  const pml4 = new DataView(new ArrayBuffer(4096));
  pml4.setBigUint64(0, BigInt(PML4_GPA + 0x1000) | 0x3n, true); // present | writable
  mem.write(PML4_GPA, new Uint8Array(pml4.buffer));
  const pdpt = new DataView(new ArrayBuffer(4096));
  for (let g = 0; g < gib; g++) {
    const pdGpa = PML4_GPA + 0x2000 + g * 0x1000;
    pdpt.setBigUint64(g * 8, BigInt(pdGpa) | 0x3n, true);
    const pd = new DataView(new ArrayBuffer(4096));
    for (let i = 0; i < 512; i++) pd.setBigUint64(i * 8, (BigInt(g) << 30n) + (BigInt(i) << 21n) + 0x83n, true); // P | W | PS
    mem.write(pdGpa, new Uint8Array(pd.buffer));
  }
  mem.write(PML4_GPA + 0x1000, new Uint8Array(pdpt.buffer));
}

/** 64-bit mode at CPL0: paging on (CR3 = PML4_GPA), PAE, EFER.LME|LMA, flat segments from the GDT. */
export function enterLongMode(vp: VirtualProcessor, rip = CODE_GPA, regs: Partial<Regs> = {}): Sregs {
  const s = vp.getSregs();
  s.cs = flatSegment(0x08, true);
  s.ds = s.es = s.fs = s.gs = s.ss = flatSegment(0x10, false);
  s.tr = { ...flatSegment(0, false), type: 11, s: 0, db: 0, g: 0, limit: 0x67 }; // busy 64-bit TSS
  s.gdt = { base: BigInt(GDT_GPA), limit: 23 };
  s.cr3 = BigInt(PML4_GPA);
  s.cr4 = 0x20n; // PAE
  s.cr0 = 0x80000011n; // PG | ET | PE
  s.efer = 0x500n; // LMA | LME
  vp.setSregs(s);
  vp.setRegs({ ...zeroRegs(), rip: BigInt(rip), rsp: 0x8000n, ...regs });
  return s;
}

/** Concatenate instruction byte groups. */
export function code(...parts: number[][]): Uint8Array {
  return Uint8Array.from(parts.flat());
}

/** Little-endian bytes of a 32-bit immediate. */
export function imm32(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}

/** Little-endian bytes of a 64-bit immediate. */
export function imm64(v: bigint): number[] {
  const out: number[] = [];
  for (let i = 0n; i < 8n; i++) out.push(Number((v >> (8n * i)) & 0xffn));
  return out;
}

/**
 * Run `body` with a watchdog: if it has not returned after `seconds`, a child
 * process sends SIGUSR2 to this process, which makes a KVM_RUN blocked in the
 * kernel (a halted vCPU waiting for an interrupt that never comes) return
 * EINTR, i.e. run() gives "intr" and the test fails instead of hanging.
 * Only the main thread gets a process-directed signal here.
 */
export async function withWatchdog<T>(seconds: number, body: () => T): Promise<T> {
  const { spawn } = await import("node:child_process");
  const onSignal = (): void => {};
  process.on("SIGUSR2", onSignal);
  const child = spawn("sh", ["-c", `sleep ${seconds}; kill -USR2 ${process.pid}`], { stdio: "ignore" });
  try {
    return body();
  } finally {
    child.kill("SIGKILL");
    process.off("SIGUSR2", onSignal);
  }
}
