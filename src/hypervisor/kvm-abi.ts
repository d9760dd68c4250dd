/**
 * The KVM user-space ABI for x86-64, from include/uapi/linux/kvm.h and
 * arch/x86/include/uapi/asm/kvm.h: ioctl numbers, capability numbers, exit
 * reasons, and struct layouts with encoders/decoders over DataView.
 *
 * Register values that are 64 bits wide are `bigint` (exact); 8/16/32-bit
 * fields are `number`. The layouts are checked against the C headers by
 * test/hypervisor/kvm-abi.test.ts (when gcc and the headers are present).
 */

// --- ioctl numbers ------------------------------------------------------------------------------

const KVMIO = 0xae;
const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;

function ioc(dir: number, nr: number, size: number): number {
  // (dir << 30) overflows int32 in JS bit ops: compute with multiplication.
  return dir * 2 ** 30 + ((size & 0x3fff) << 16) + (KVMIO << 8) + nr;
}
const io = (nr: number): number => ioc(IOC_NONE, nr, 0);
const ior = (nr: number, size: number): number => ioc(IOC_READ, nr, size);
const iow = (nr: number, size: number): number => ioc(IOC_WRITE, nr, size);
const iowr = (nr: number, size: number): number => ioc(IOC_READ | IOC_WRITE, nr, size);

// Struct sizes (bytes), used by the ioctl numbers and the encoders.
export const SIZEOF = {
  kvm_regs: 144,
  kvm_segment: 24,
  kvm_dtable: 16,
  kvm_sregs: 312,
  kvm_fpu: 416,
  kvm_msr_entry: 16,
  kvm_msrs: 8,
  kvm_msr_list: 4,
  kvm_cpuid_entry2: 40,
  kvm_cpuid2: 8,
  kvm_lapic_state: 1024,
  kvm_xsave: 4096,
  kvm_xcrs: 392,
  kvm_mp_state: 4,
  kvm_userspace_memory_region: 32,
  kvm_dirty_log: 16,
  kvm_irq_level: 8,
  kvm_irq_routing: 8,
  kvm_irq_routing_entry: 48,
  kvm_irqfd: 32,
  kvm_ioeventfd: 64,
  kvm_msi: 32,
  kvm_pit_config: 64,
  kvm_vcpu_events: 64,
  kvm_enable_cap: 104,
  kvm_clock_data: 48,
  kvm_run_header: 32,
} as const;

/** ioctl request numbers. System ioctls go to /dev/kvm, VM ioctls to the VM fd, vCPU ioctls to a vCPU fd. */
export const KVM = {
  // system
  GET_API_VERSION: io(0x00),
  CREATE_VM: io(0x01),
  GET_MSR_INDEX_LIST: iowr(0x02, SIZEOF.kvm_msr_list),
  CHECK_EXTENSION: io(0x03),
  GET_VCPU_MMAP_SIZE: io(0x04),
  GET_SUPPORTED_CPUID: iowr(0x05, SIZEOF.kvm_cpuid2),
  GET_MSR_FEATURE_INDEX_LIST: iowr(0x0a, SIZEOF.kvm_msr_list),
  // VM
  CREATE_VCPU: io(0x41),
  GET_DIRTY_LOG: iow(0x42, SIZEOF.kvm_dirty_log),
  SET_USER_MEMORY_REGION: iow(0x46, SIZEOF.kvm_userspace_memory_region),
  SET_TSS_ADDR: io(0x47),
  SET_IDENTITY_MAP_ADDR: iow(0x48, 8),
  CREATE_IRQCHIP: io(0x60),
  IRQ_LINE: iow(0x61, SIZEOF.kvm_irq_level),
  IRQ_LINE_STATUS: iowr(0x67, SIZEOF.kvm_irq_level),
  SET_GSI_ROUTING: iow(0x6a, SIZEOF.kvm_irq_routing),
  IRQFD: iow(0x76, SIZEOF.kvm_irqfd),
  CREATE_PIT2: iow(0x77, SIZEOF.kvm_pit_config),
  SET_BOOT_CPU_ID: io(0x78),
  IOEVENTFD: iow(0x79, SIZEOF.kvm_ioeventfd),
  SET_CLOCK: iow(0x7b, SIZEOF.kvm_clock_data),
  GET_CLOCK: ior(0x7c, SIZEOF.kvm_clock_data),
  SIGNAL_MSI: iow(0xa5, SIZEOF.kvm_msi),
  ENABLE_CAP: iow(0xa3, SIZEOF.kvm_enable_cap),
  // vCPU
  RUN: io(0x80),
  GET_REGS: ior(0x81, SIZEOF.kvm_regs),
  SET_REGS: iow(0x82, SIZEOF.kvm_regs),
  GET_SREGS: ior(0x83, SIZEOF.kvm_sregs),
  SET_SREGS: iow(0x84, SIZEOF.kvm_sregs),
  GET_MSRS: iowr(0x88, SIZEOF.kvm_msrs),
  SET_MSRS: iow(0x89, SIZEOF.kvm_msrs),
  GET_FPU: ior(0x8c, SIZEOF.kvm_fpu),
  SET_FPU: iow(0x8d, SIZEOF.kvm_fpu),
  GET_LAPIC: ior(0x8e, SIZEOF.kvm_lapic_state),
  SET_LAPIC: iow(0x8f, SIZEOF.kvm_lapic_state),
  SET_CPUID2: iow(0x90, SIZEOF.kvm_cpuid2),
  GET_CPUID2: iowr(0x91, SIZEOF.kvm_cpuid2),
  GET_MP_STATE: ior(0x98, SIZEOF.kvm_mp_state),
  SET_MP_STATE: iow(0x99, SIZEOF.kvm_mp_state),
  GET_VCPU_EVENTS: ior(0x9f, SIZEOF.kvm_vcpu_events),
  SET_VCPU_EVENTS: iow(0xa0, SIZEOF.kvm_vcpu_events),
  GET_XSAVE: ior(0xa4, SIZEOF.kvm_xsave),
  SET_XSAVE: iow(0xa5, SIZEOF.kvm_xsave),
  GET_XCRS: ior(0xa6, SIZEOF.kvm_xcrs),
  SET_XCRS: iow(0xa7, SIZEOF.kvm_xcrs),
  GET_XSAVE2: ior(0xcf, SIZEOF.kvm_xsave),
  SET_TSC_KHZ: io(0xa2),
  GET_TSC_KHZ: io(0xa3),
} as const;

export type KvmIoctlName = keyof typeof KVM;

/** The only API version this binding speaks (stable since Linux 2.6.22). */
export const KVM_API_VERSION = 12;

// --- capabilities (KVM_CHECK_EXTENSION) ----------------------------------------------------------

export const KVM_CAP = {
  IRQCHIP: 0,
  HLT: 1,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_VCPUS: 9,
  NR_MEMSLOTS: 10,
  PIT: 11,
  MP_STATE: 14,
  COALESCED_MMIO: 15,
  SYNC_MMU: 16,
  USER_NMI: 22,
  IRQ_ROUTING: 25,
  IRQ_INJECT_STATUS: 26,
  IRQFD: 32,
  PIT2: 33,
  SET_BOOT_CPU_ID: 34,
  PIT_STATE2: 35,
  IOEVENTFD: 36,
  SET_IDENTITY_MAP_ADDR: 37,
  ADJUST_CLOCK: 39,
  INTERNAL_ERROR_DATA: 40,
  VCPU_EVENTS: 41,
  DEBUGREGS: 50,
  ENABLE_CAP: 54,
  XSAVE: 55,
  XCRS: 56,
  TSC_CONTROL: 60,
  GET_TSC_KHZ: 61,
  MAX_VCPUS: 66,
  TSC_DEADLINE_TIMER: 72,
  KVMCLOCK_CTRL: 76,
  SIGNAL_MSI: 77,
  READONLY_MEM: 81,
  IRQFD_RESAMPLE: 82,
  MULTI_ADDRESS_SPACE: 118,
  SPLIT_IRQCHIP: 121,
  IOEVENTFD_ANY_LENGTH: 122,
  MAX_VCPU_ID: 128,
  X2APIC_API: 129,
  IMMEDIATE_EXIT: 136,
  MANUAL_DIRTY_LOG_PROTECT2: 168,
  X86_USER_SPACE_MSR: 188,
  DIRTY_LOG_RING: 192,
  XSAVE2: 208,
} as const;

// --- exits -------------------------------------------------------------------------------------

export const KVM_EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  SET_TPR: 11,
  TPR_ACCESS: 12,
  NMI: 16,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
  IOAPIC_EOI: 26,
  HYPERV: 27,
  X86_RDMSR: 29,
  X86_WRMSR: 30,
  DIRTY_RING_FULL: 31,
  X86_BUS_LOCK: 33,
  NOTIFY: 37,
} as const;

export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

export const KVM_INTERNAL_ERROR = {
  EMULATION: 1,
  SIMUL_EX: 2,
  DELIVERY_EV: 3,
  UNEXPECTED_EXIT_REASON: 4,
} as const;

export const KVM_SYSTEM_EVENT = {
  SHUTDOWN: 1,
  RESET: 2,
  CRASH: 3,
  WAKEUP: 4,
  SUSPEND: 5,
  SEV_TERM: 6,
} as const;

export const KVM_MP_STATE = {
  RUNNABLE: 0,
  UNINITIALIZED: 1,
  INIT_RECEIVED: 2,
  HALTED: 3,
  SIPI_RECEIVED: 4,
} as const;

/**
 * struct kvm_run, the page(s) shared with the kernel per vCPU (mmap of the
 * vCPU fd). Offsets of the fields Partis reads; `EXIT` is the start of the
 * per-reason union.
 */
export const KVM_RUN = {
  REQUEST_INTERRUPT_WINDOW: 0, // u8
  IMMEDIATE_EXIT: 1, // u8
  EXIT_REASON: 8, // u32
  READY_FOR_INTERRUPT_INJECTION: 12, // u8
  IF_FLAG: 13, // u8
  FLAGS: 14, // u16
  CR8: 16, // u64
  APIC_BASE: 24, // u64
  EXIT: 32,
  // io: { u8 direction; u8 size; u16 port; u32 count; u64 data_offset }
  IO_DIRECTION: 32,
  IO_SIZE: 33,
  IO_PORT: 34,
  IO_COUNT: 36,
  IO_DATA_OFFSET: 40,
  // mmio: { u64 phys_addr; u8 data[8]; u32 len; u8 is_write }
  MMIO_PHYS_ADDR: 32,
  MMIO_DATA: 40,
  MMIO_LEN: 48,
  MMIO_IS_WRITE: 52,
  // fail_entry: { u64 hardware_entry_failure_reason; u32 cpu }
  FAIL_ENTRY_REASON: 32,
  FAIL_ENTRY_CPU: 40,
  // hw: { u64 hardware_exit_reason }
  HW_EXIT_REASON: 32,
  // internal: { u32 suberror; u32 ndata; u64 data[16] }
  INTERNAL_SUBERROR: 32,
  INTERNAL_NDATA: 36,
  INTERNAL_DATA: 40,
  // system_event: { u32 type; u32 ndata; u64 data[16] }
  SYSTEM_EVENT_TYPE: 32,
  SYSTEM_EVENT_NDATA: 36,
  SYSTEM_EVENT_DATA: 40,
  // ex: { u32 exception; u32 error_code }
  EX_EXCEPTION: 32,
  EX_ERROR_CODE: 36,
  KVM_VALID_REGS: 288,
  KVM_DIRTY_REGS: 296,
} as const;

// --- memory slots, irq, eventfds -----------------------------------------------------------------

export const KVM_MEM_LOG_DIRTY_PAGES = 1;
export const KVM_MEM_READONLY = 2;

export const KVM_IRQ_ROUTING_IRQCHIP = 1;
export const KVM_IRQ_ROUTING_MSI = 2;
/** irqchip numbers for KVM_IRQ_ROUTING_IRQCHIP on x86. */
export const KVM_IRQCHIP_PIC_MASTER = 0;
export const KVM_IRQCHIP_PIC_SLAVE = 1;
export const KVM_IRQCHIP_IOAPIC = 2;

export const KVM_IRQFD_FLAG_DEASSIGN = 1;
export const KVM_IRQFD_FLAG_RESAMPLE = 2;

export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1;
export const KVM_IOEVENTFD_FLAG_PIO = 2;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 4;

export const KVM_PIT_SPEAKER_DUMMY = 1;

// --- encoders / decoders -------------------------------------------------------------------------

function dv(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** struct kvm_regs: general-purpose registers, rip and rflags. All bigint. */
export interface Regs {
  rax: bigint;
  rbx: bigint;
  rcx: bigint;
  rdx: bigint;
  rsi: bigint;
  rdi: bigint;
  rsp: bigint;
  rbp: bigint;
  r8: bigint;
  r9: bigint;
  r10: bigint;
  r11: bigint;
  r12: bigint;
  r13: bigint;
  r14: bigint;
  r15: bigint;
  rip: bigint;
  rflags: bigint;
}
export const REGS_ORDER = [
  "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
] as const satisfies readonly (keyof Regs)[];

export function decodeRegs(buf: Uint8Array): Regs {
  const v = dv(buf);
  const r = {} as Regs;
  REGS_ORDER.forEach((k, i) => (r[k] = v.getBigUint64(i * 8, true)));
  return r;
}

export function encodeRegs(regs: Regs, buf: Uint8Array = new Uint8Array(SIZEOF.kvm_regs)): Uint8Array {
  const v = dv(buf);
  REGS_ORDER.forEach((k, i) => v.setBigUint64(i * 8, BigInt.asUintN(64, regs[k]), true));
  return buf;
}

/** struct kvm_segment. `type` is the 4-bit descriptor type; flags are 0/1. */
export interface Segment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

/** struct kvm_dtable (GDTR/IDTR). */
export interface DescriptorTable {
  base: bigint;
  limit: number;
}

/** struct kvm_sregs: segment and control registers. 64-bit fields are bigint. */
export interface Sregs {
  cs: Segment;
  ds: Segment;
  es: Segment;
  fs: Segment;
  gs: Segment;
  ss: Segment;
  tr: Segment;
  ldt: Segment;
  gdt: DescriptorTable;
  idt: DescriptorTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
  /** Pending external interrupt bitmap (256 bits as four u64). */
  interruptBitmap: [bigint, bigint, bigint, bigint];
}

const SEGMENTS = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;
const CONTROL = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apicBase"] as const;

function decodeSegment(v: DataView, o: number): Segment {
  return {
    base: v.getBigUint64(o, true),
    limit: v.getUint32(o + 8, true),
    selector: v.getUint16(o + 12, true),
    type: v.getUint8(o + 14),
    present: v.getUint8(o + 15),
    dpl: v.getUint8(o + 16),
    db: v.getUint8(o + 17),
    s: v.getUint8(o + 18),
    l: v.getUint8(o + 19),
    g: v.getUint8(o + 20),
    avl: v.getUint8(o + 21),
    unusable: v.getUint8(o + 22),
  };
}

function encodeSegment(v: DataView, o: number, s: Segment): void {
  v.setBigUint64(o, BigInt.asUintN(64, s.base), true);
  v.setUint32(o + 8, s.limit >>> 0, true);
  v.setUint16(o + 12, s.selector, true);
  v.setUint8(o + 14, s.type);
  v.setUint8(o + 15, s.present);
  v.setUint8(o + 16, s.dpl);
  v.setUint8(o + 17, s.db);
  v.setUint8(o + 18, s.s);
  v.setUint8(o + 19, s.l);
  v.setUint8(o + 20, s.g);
  v.setUint8(o + 21, s.avl);
  v.setUint8(o + 22, s.unusable);
  v.setUint8(o + 23, 0);
}

export function decodeSregs(buf: Uint8Array): Sregs {
  const v = dv(buf);
  const segs = {} as Record<(typeof SEGMENTS)[number], Segment>;
  SEGMENTS.forEach((k, i) => (segs[k] = decodeSegment(v, i * 24)));
  const dt = (o: number): DescriptorTable => ({ base: v.getBigUint64(o, true), limit: v.getUint16(o + 8, true) });
  const ctl = {} as Record<(typeof CONTROL)[number], bigint>;
  CONTROL.forEach((k, i) => (ctl[k] = v.getBigUint64(224 + i * 8, true)));
  return {
    ...segs,
    gdt: dt(192),
    idt: dt(208),
    ...ctl,
    interruptBitmap: [0, 1, 2, 3].map((i) => v.getBigUint64(280 + i * 8, true)) as Sregs["interruptBitmap"],
  };
}

export function encodeSregs(s: Sregs, buf: Uint8Array = new Uint8Array(SIZEOF.kvm_sregs)): Uint8Array {
  const v = dv(buf);
  SEGMENTS.forEach((k, i) => encodeSegment(v, i * 24, s[k]));
  const dt = (o: number, d: DescriptorTable): void => {
    v.setBigUint64(o, BigInt.asUintN(64, d.base), true);
    v.setUint16(o + 8, d.limit, true);
    v.setUint16(o + 10, 0, true);
    v.setUint32(o + 12, 0, true);
  };
  dt(192, s.gdt);
  dt(208, s.idt);
  CONTROL.forEach((k, i) => v.setBigUint64(224 + i * 8, BigInt.asUintN(64, s[k]), true));
  s.interruptBitmap.forEach((w, i) => v.setBigUint64(280 + i * 8, BigInt.asUintN(64, w), true));
  return buf;
}

/** struct kvm_fpu: x87 registers (80-bit values in 16-byte slots), SSE registers, status. */
export interface Fpu {
  /** 8 × 16 bytes (ST0..ST7, 80-bit each, zero-padded). */
  fpr: Uint8Array[];
  fcw: number;
  fsw: number;
  /** Abridged tag word (one bit per register), as FXSAVE stores it. */
  ftwx: number;
  lastOpcode: number;
  lastIp: bigint;
  lastDp: bigint;
  /** 16 × 16 bytes. */
  xmm: Uint8Array[];
  mxcsr: number;
}

export function decodeFpu(buf: Uint8Array): Fpu {
  const v = dv(buf);
  return {
    fpr: Array.from({ length: 8 }, (_, i) => buf.slice(i * 16, i * 16 + 16)),
    fcw: v.getUint16(128, true),
    fsw: v.getUint16(130, true),
    ftwx: v.getUint8(132),
    lastOpcode: v.getUint16(134, true),
    lastIp: v.getBigUint64(136, true),
    lastDp: v.getBigUint64(144, true),
    xmm: Array.from({ length: 16 }, (_, i) => buf.slice(152 + i * 16, 168 + i * 16)),
    mxcsr: v.getUint32(408, true),
  };
}

export function encodeFpu(f: Fpu, buf: Uint8Array = new Uint8Array(SIZEOF.kvm_fpu)): Uint8Array {
  const v = dv(buf);
  buf.fill(0);
  for (let i = 0; i < 8; i++) buf.set((f.fpr[i] ?? new Uint8Array(16)).subarray(0, 16), i * 16);
  v.setUint16(128, f.fcw, true);
  v.setUint16(130, f.fsw, true);
  v.setUint8(132, f.ftwx);
  v.setUint16(134, f.lastOpcode, true);
  v.setBigUint64(136, BigInt.asUintN(64, f.lastIp), true);
  v.setBigUint64(144, BigInt.asUintN(64, f.lastDp), true);
  for (let i = 0; i < 16; i++) buf.set((f.xmm[i] ?? new Uint8Array(16)).subarray(0, 16), 152 + i * 16);
  v.setUint32(408, f.mxcsr, true);
  return buf;
}

/** One MSR value (struct kvm_msr_entry). */
export interface MsrEntry {
  index: number;
  data: bigint;
}

/** struct kvm_msrs with `count` entries (indices only, data zero): for KVM_GET_MSRS. */
export function encodeMsrs(entries: readonly MsrEntry[]): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_msrs + entries.length * SIZEOF.kvm_msr_entry);
  const v = dv(buf);
  v.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    const o = 8 + i * 16;
    v.setUint32(o, e.index >>> 0, true);
    v.setBigUint64(o + 8, BigInt.asUintN(64, e.data), true);
  });
  return buf;
}

export function decodeMsrs(buf: Uint8Array, count: number): MsrEntry[] {
  const v = dv(buf);
  const out: MsrEntry[] = [];
  for (let i = 0; i < count; i++) out.push({ index: v.getUint32(8 + i * 16, true), data: v.getBigUint64(16 + i * 16, true) });
  return out;
}

/** One CPUID leaf as KVM describes it (struct kvm_cpuid_entry2). */
export type CpuidEntry = { function: number; index: number; flags: number; eax: number; ebx: number; ecx: number; edx: number };

/** kvm_cpuid_entry2.flags */
export const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;

export function encodeCpuid2(entries: readonly CpuidEntry[], capacity = entries.length): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_cpuid2 + capacity * SIZEOF.kvm_cpuid_entry2);
  const v = dv(buf);
  v.setUint32(0, capacity, true);
  entries.forEach((e, i) => {
    const o = 8 + i * 40;
    v.setUint32(o, e.function >>> 0, true);
    v.setUint32(o + 4, e.index >>> 0, true);
    v.setUint32(o + 8, e.flags >>> 0, true);
    v.setUint32(o + 12, e.eax >>> 0, true);
    v.setUint32(o + 16, e.ebx >>> 0, true);
    v.setUint32(o + 20, e.ecx >>> 0, true);
    v.setUint32(o + 24, e.edx >>> 0, true);
  });
  return buf;
}

export function decodeCpuid2(buf: Uint8Array): CpuidEntry[] {
  const v = dv(buf);
  const n = v.getUint32(0, true);
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n && 8 + (i + 1) * 40 <= buf.byteLength; i++) {
    const o = 8 + i * 40;
    out.push({
      function: v.getUint32(o, true),
      index: v.getUint32(o + 4, true),
      flags: v.getUint32(o + 8, true),
      eax: v.getUint32(o + 12, true),
      ebx: v.getUint32(o + 16, true),
      ecx: v.getUint32(o + 20, true),
      edx: v.getUint32(o + 24, true),
    });
  }
  return out;
}

/** struct kvm_userspace_memory_region */
export interface MemoryRegion {
  slot: number;
  flags: number;
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
}

export function encodeMemoryRegion(r: MemoryRegion): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_userspace_memory_region);
  const v = dv(buf);
  v.setUint32(0, r.slot, true);
  v.setUint32(4, r.flags, true);
  v.setBigUint64(8, r.guestPhysAddr, true);
  v.setBigUint64(16, r.memorySize, true);
  v.setBigUint64(24, r.userspaceAddr, true);
  return buf;
}

/** struct kvm_dirty_log: slot and the address of the caller's bitmap. */
export function encodeDirtyLog(slot: number, bitmapAddress: bigint): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_dirty_log);
  const v = dv(buf);
  v.setUint32(0, slot, true);
  v.setBigUint64(8, bitmapAddress, true);
  return buf;
}

/** struct kvm_irq_level */
export function encodeIrqLevel(irq: number, level: number): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_irq_level);
  const v = dv(buf);
  v.setUint32(0, irq, true);
  v.setUint32(4, level, true);
  return buf;
}

/** One GSI route: to a pin of an in-kernel irqchip, or to an MSI message. */
export type GsiRoute =
  | { gsi: number; kind: "irqchip"; irqchip: number; pin: number }
  | { gsi: number; kind: "msi"; addressLo: number; addressHi: number; data: number };

/** struct kvm_irq_routing with its entries. */
export function encodeIrqRouting(routes: readonly GsiRoute[]): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_irq_routing + routes.length * SIZEOF.kvm_irq_routing_entry);
  const v = dv(buf);
  v.setUint32(0, routes.length, true);
  routes.forEach((r, i) => {
    const o = 8 + i * 48;
    v.setUint32(o, r.gsi, true);
    if (r.kind === "irqchip") {
      v.setUint32(o + 4, KVM_IRQ_ROUTING_IRQCHIP, true);
      v.setUint32(o + 16, r.irqchip, true);
      v.setUint32(o + 20, r.pin, true);
    } else {
      v.setUint32(o + 4, KVM_IRQ_ROUTING_MSI, true);
      v.setUint32(o + 16, r.addressLo >>> 0, true);
      v.setUint32(o + 20, r.addressHi >>> 0, true);
      v.setUint32(o + 24, r.data >>> 0, true);
    }
  });
  return buf;
}

/** struct kvm_irqfd */
export function encodeIrqfd(fd: number, gsi: number, flags: number, resampleFd = 0): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_irqfd);
  const v = dv(buf);
  v.setUint32(0, fd, true);
  v.setUint32(4, gsi, true);
  v.setUint32(8, flags, true);
  v.setUint32(12, resampleFd, true);
  return buf;
}

/** struct kvm_ioeventfd */
export function encodeIoeventfd(datamatch: bigint, addr: bigint, len: number, fd: number, flags: number): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_ioeventfd);
  const v = dv(buf);
  v.setBigUint64(0, BigInt.asUintN(64, datamatch), true);
  v.setBigUint64(8, addr, true);
  v.setUint32(16, len, true);
  v.setInt32(20, fd, true);
  v.setUint32(24, flags, true);
  return buf;
}

/** struct kvm_msi */
export function encodeMsi(addressLo: number, addressHi: number, data: number, flags = 0, devid = 0): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_msi);
  const v = dv(buf);
  v.setUint32(0, addressLo >>> 0, true);
  v.setUint32(4, addressHi >>> 0, true);
  v.setUint32(8, data >>> 0, true);
  v.setUint32(12, flags, true);
  v.setUint32(16, devid, true);
  return buf;
}

/** struct kvm_pit_config */
export function encodePitConfig(flags: number): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_pit_config);
  dv(buf).setUint32(0, flags, true);
  return buf;
}

/** struct kvm_vcpu_events: kept as raw bytes (saved state), with the fields most callers read. */
export interface VcpuEvents {
  raw: Uint8Array;
  exceptionInjected: number;
  exceptionNr: number;
  interruptInjected: number;
  interruptNr: number;
  nmiInjected: number;
  nmiPending: number;
}

export function decodeVcpuEvents(buf: Uint8Array): VcpuEvents {
  return {
    raw: buf.slice(),
    exceptionInjected: buf[0]!,
    exceptionNr: buf[1]!,
    interruptInjected: buf[8]!,
    interruptNr: buf[9]!,
    nmiInjected: buf[12]!,
    nmiPending: buf[13]!,
  };
}

/** struct kvm_clock_data: the VM's kvmclock in ns. */
export function decodeClock(buf: Uint8Array): { clock: bigint; flags: number } {
  const v = dv(buf);
  return { clock: v.getBigUint64(0, true), flags: v.getUint32(8, true) };
}

export function encodeClock(clock: bigint, flags = 0): Uint8Array {
  const buf = new Uint8Array(SIZEOF.kvm_clock_data);
  const v = dv(buf);
  v.setBigUint64(0, clock, true);
  v.setUint32(8, flags, true);
  return buf;
}
