/**
 * The boot processor's state for the Linux 64-bit boot protocol
 * (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode with
 * paging, an identity map covering the kernel, zero page and command line, a GDT
 * with flat __BOOT_CS (0x10, execute/read) and __BOOT_DS (0x18, read/write), CS =
 * __BOOT_CS, DS = ES = SS = __BOOT_DS, interrupts off, RSI = boot_params.
 *
 * Plain data, no KVM types: the hypervisor layer turns it into KVM_SET_SREGS,
 * KVM_SET_REGS and KVM_SET_MSRS.
 */
import type { GuestMemory } from "./guest-memory.js";
import type { LinuxBootInfo } from "./linux-boot.js";
import { BOOT_GDT_ENTRIES, PD_ADDR, PD_COUNT, PDPT_ADDR, type MemoryPlan } from "./memory-map.js";

export interface SegmentState {
  readonly base: bigint;
  /** Byte-granular limit, as KVM_SET_SREGS expects (0xffffffff for a flat 4 GiB segment with G=1). */
  readonly limit: number;
  readonly selector: number;
  readonly type: number;
  readonly present: number;
  readonly dpl: number;
  readonly db: number;
  readonly s: number;
  readonly l: number;
  readonly g: number;
  readonly avl: number;
  readonly unusable: number;
}

export interface DescriptorTableState {
  readonly base: bigint;
  readonly limit: number;
}

export interface BootCpuState {
  readonly regs: { readonly rip: bigint; readonly rsi: bigint; readonly rsp: bigint; readonly rflags: bigint };
  readonly segments: {
    readonly cs: SegmentState;
    readonly ds: SegmentState;
    readonly es: SegmentState;
    readonly fs: SegmentState;
    readonly gs: SegmentState;
    readonly ss: SegmentState;
    readonly tr: SegmentState;
    readonly ldt: SegmentState;
  };
  readonly gdt: DescriptorTableState;
  readonly idt: DescriptorTableState;
  readonly cr0: bigint;
  readonly cr3: bigint;
  readonly cr4: bigint;
  readonly efer: bigint;
  readonly msrs: readonly { readonly index: number; readonly value: bigint }[];
}

export const BOOT_CS = 0x10;
export const BOOT_DS = 0x18;
export const BOOT_TSS = 0x20;

export const CR0_PE = 1n << 0n;
export const CR0_ET = 1n << 4n;
export const CR0_NE = 1n << 5n;
export const CR0_PG = 1n << 31n;
export const CR4_PAE = 1n << 5n;
export const EFER_LME = 1n << 8n;
export const EFER_LMA = 1n << 10n;

export const MSR_IA32_TSC = 0x10;
export const MSR_IA32_SYSENTER_CS = 0x174;
export const MSR_IA32_SYSENTER_ESP = 0x175;
export const MSR_IA32_SYSENTER_EIP = 0x176;
export const MSR_IA32_MISC_ENABLE = 0x1a0;
export const MSR_MTRR_DEF_TYPE = 0x2ff;
export const MSR_STAR = 0xc0000081;
export const MSR_LSTAR = 0xc0000082;
export const MSR_CSTAR = 0xc0000083;
export const MSR_SYSCALL_MASK = 0xc0000084;
export const MSR_KERNEL_GS_BASE = 0xc0000102;

export const MISC_ENABLE_FAST_STRING = 1n;
/** MTRRs enabled (bit 11), fixed-range MTRRs disabled, default type write-back (6). */
export const MTRR_DEF_TYPE_WB_ENABLED = 0x806n;

/** GDT descriptors (8 bytes each; the 64-bit TSS descriptor takes two slots). */
export const GDT_CODE64 = 0x00af9b000000ffffn; // G, L, P, DPL0, S, type 0xb (execute/read, accessed)
export const GDT_DATA = 0x00cf93000000ffffn; // G, D/B, P, DPL0, S, type 0x3 (read/write, accessed)
const TSS_LIMIT = 0x67;
export const GDT_TSS64_LOW = 0x00008b0000000000n | BigInt(TSS_LIMIT); // P, type 0xb (busy 64-bit TSS), base 0

export function bootGdt(): bigint[] {
  const gdt = [0n, GDT_CODE64, GDT_CODE64, GDT_DATA, GDT_TSS64_LOW, 0n];
  if (gdt.length !== BOOT_GDT_ENTRIES) throw new Error("boot GDT size mismatch");
  return gdt;
}

/** Identity page tables: PML4 -> one PDPT -> PD_COUNT page directories of 2 MiB pages. */
export const IDENTITY_MAP_BYTES = PD_COUNT * 512 * 2 * 1024 * 1024;

export function writeBootTables(memory: GuestMemory, plan: MemoryPlan): void {
  const gdt = new Uint8Array(BOOT_GDT_ENTRIES * 8);
  const gdv = new DataView(gdt.buffer);
  bootGdt().forEach((d, i) => gdv.setBigUint64(i * 8, d, true));
  memory.write(plan.gdt, gdt);
  memory.write(plan.idt, new Uint8Array(8));

  const pml4 = new Uint8Array(4096);
  new DataView(pml4.buffer).setBigUint64(0, BigInt(PDPT_ADDR) | 0x3n, true); // P, RW
  memory.write(plan.pml4, pml4);
  const pdpt = new Uint8Array(4096);
  const pdptv = new DataView(pdpt.buffer);
  for (let i = 0; i < PD_COUNT; i++) pdptv.setBigUint64(i * 8, BigInt(PD_ADDR + i * 4096) | 0x3n, true);
  memory.write(PDPT_ADDR, pdpt);
  for (let i = 0; i < PD_COUNT; i++) {
    const pd = new Uint8Array(4096);
    const pdv = new DataView(pd.buffer);
    for (let j = 0; j < 512; j++) pdv.setBigUint64(j * 8, (BigInt(i * 512 + j) << 21n) | 0x83n, true); // P, RW, PS
    memory.write(PD_ADDR + i * 4096, pd);
  }
}

function flatSegment(selector: number, code: boolean): SegmentState {
  return {
    base: 0n,
    limit: 0xffffffff,
    selector,
    type: code ? 0xb : 0x3,
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

export function longModeBootState(plan: MemoryPlan, info: Pick<LinuxBootInfo, "entry64" | "bootParams">): BootCpuState {
  const data = flatSegment(BOOT_DS, false);
  const tr: SegmentState = {
    base: 0n, limit: TSS_LIMIT, selector: BOOT_TSS, type: 0xb, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0,
  };
  const ldt: SegmentState = {
    base: 0n, limit: 0, selector: 0, type: 0x2, present: 0, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 1,
  };
  return {
    regs: { rip: BigInt(info.entry64), rsi: BigInt(info.bootParams), rsp: BigInt(plan.stackPointer), rflags: 0x2n },
    segments: { cs: flatSegment(BOOT_CS, true), ds: data, es: data, fs: data, gs: data, ss: data, tr, ldt },
    gdt: { base: BigInt(plan.gdt), limit: BOOT_GDT_ENTRIES * 8 - 1 },
    idt: { base: BigInt(plan.idt), limit: 0 },
    cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
    cr3: BigInt(plan.pml4),
    cr4: CR4_PAE,
    efer: EFER_LME | EFER_LMA,
    msrs: [
      { index: MSR_IA32_TSC, value: 0n },
      { index: MSR_IA32_MISC_ENABLE, value: MISC_ENABLE_FAST_STRING },
      { index: MSR_MTRR_DEF_TYPE, value: MTRR_DEF_TYPE_WB_ENABLED },
      { index: MSR_IA32_SYSENTER_CS, value: 0n },
      { index: MSR_IA32_SYSENTER_ESP, value: 0n },
      { index: MSR_IA32_SYSENTER_EIP, value: 0n },
      { index: MSR_STAR, value: 0n },
      { index: MSR_LSTAR, value: 0n },
      { index: MSR_CSTAR, value: 0n },
      { index: MSR_SYSCALL_MASK, value: 0n },
      { index: MSR_KERNEL_GS_BASE, value: 0n },
    ],
  };
}
