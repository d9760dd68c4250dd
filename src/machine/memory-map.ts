/**
 * The guest-physical address plan of a Partis x86 board.
 *
 * Layout (all addresses guest-physical):
 *
 *   0x0000_0000 .. 0x0000_0FFF  real-mode IVT / BDA (left zero)
 *   0x0000_0500                 boot GDT (6 entries: null, code64, code64, data, 16-byte TSS)
 *   0x0000_0540                 boot IDT (empty, limit 0)
 *   0x0000_7000                 boot_params ("zero page", 4 KiB)
 *   0x0000_8FF0                 initial stack pointer (grows down, below 0x9000)
 *   0x0000_9000                 PML4, 0xA000 PDPT, 0xB000..0xEFFF four PDs (2 MiB pages, 4 GiB identity)
 *   0x0002_0000 .. 0x0002_FFFF  kernel command line (64 KiB reserved)
 *   0x0009_FC00 .. 0x0009_FFFF  EBDA (reserved in e820)
 *   0x000E_0000 .. 0x000F_FFFF  ACPI tables; the RSDP at 0xE0000 (in the BIOS scan range)
 *   0x0010_0000                 protected-mode kernel (bzImage payload)
 *   ..            lowRamEnd     low RAM ends at min(ram, 0xC000_0000)
 *   0xC000_0000 .. 0xFBFF_FFFF  32-bit PCI MMIO window (960 MiB), not RAM, not in e820
 *   0xFC00_0000 .. 0xFEBF_FFFF  platform MMIO for non-PCI devices (free for the board)
 *   0xFEC0_0000                 IOAPIC (in-kernel), 4 KiB
 *   0xFEE0_0000                 local APIC (in-kernel), 1 MiB reserved
 *   0x1_0000_0000 ..            high RAM (ram - 3 GiB) when ram > 3 GiB
 *   align1G(end of high RAM) .. 64-bit PCI MMIO window (default 64 GiB)
 *
 * DEVNOTE: the 32-bit hole starts at 3 GiB (0xC000_0000), like Firecracker and Cloud
 * Hypervisor, so the 32-bit PCI window is large enough for several framebuffers.
 * The legacy VGA window 0xA0000-0xBFFFF is RAM (one memory slot from 0): a VGA device
 * must expose its framebuffer through a PCI BAR. Low RAM keeps file offset == gpa and
 * high RAM starts at a 1 GiB file offset, so huge pages stay aligned in every slot.
 */
import { PartisError } from "../errors.js";
import type { RamRange } from "./guest-memory.js";

export class MemoryPlanError extends PartisError {}

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Smallest guest this board boots (a Debian kernel plus a small initrd needs more, checked at load). */
export const MIN_RAM_BYTES = 32 * MiB;
/** Largest guest: 1 TiB (addresses stay exact as JS numbers far beyond that). */
export const MAX_RAM_BYTES = 1024 * GiB;
/** RAM size granularity: 2 MiB, so every memory slot can be backed by huge pages. */
export const RAM_GRANULE = 2 * MiB;

/** Fixed low-memory addresses used by the direct Linux boot. */
export const BOOT_GDT_ADDR = 0x500;
export const BOOT_GDT_ENTRIES = 6;
export const BOOT_IDT_ADDR = 0x540;
export const ZERO_PAGE_ADDR = 0x7000;
export const BOOT_STACK_POINTER = 0x8ff0;
export const PML4_ADDR = 0x9000;
export const PDPT_ADDR = 0xa000;
/** First of four page directories (0xB000..0xEFFF): 4 x 512 x 2 MiB = 4 GiB identity map. */
export const PD_ADDR = 0xb000;
export const PD_COUNT = 4;
export const CMDLINE_ADDR = 0x20000;
export const CMDLINE_MAX = 0x10000;
export const EBDA_START = 0x9fc00;
export const LEGACY_RAM_END = 0xa0000;
/** ACPI tables live in the BIOS read-only area so the kernel also finds the RSDP by scanning. */
export const ACPI_AREA_START = 0xe0000;
export const ACPI_AREA_END = 0x100000;
export const RSDP_ADDR = 0xe0000;
export const KERNEL_LOAD_ADDR = 0x100000;

/** The 32-bit hole: everything from here to 4 GiB is MMIO. */
export const MMIO32_HOLE_START = 0xc000_0000;
export const FOUR_GIB = 4 * GiB;
export const PCI_MMIO32_START = 0xc000_0000;
export const PCI_MMIO32_SIZE = 0xfc00_0000 - 0xc000_0000;
export const PLATFORM_MMIO_START = 0xfc00_0000;
export const PLATFORM_MMIO_SIZE = 0xfec0_0000 - 0xfc00_0000;
export const IOAPIC_ADDR = 0xfec0_0000;
export const IOAPIC_SIZE = 0x1000;
export const LAPIC_ADDR = 0xfee0_0000;
export const LAPIC_SIZE = 0x10_0000;
/** Default size of the 64-bit PCI MMIO window above high RAM. */
export const DEFAULT_PCI_MMIO64_SIZE = 64 * GiB;

export interface AddressWindow {
  readonly start: number;
  readonly size: number;
}

export interface MemoryPlan {
  /** Guest RAM in bytes (= size of the backing memfd = sum of `ram` lengths). */
  readonly ramBytes: number;
  /** RAM ranges, packed into the backing memfd in this order. */
  readonly ram: readonly RamRange[];
  /** End of RAM below the 32-bit hole (exclusive). */
  readonly lowRamEnd: number;
  /** End of RAM above 4 GiB (exclusive); 0 when there is no high RAM. */
  readonly highRamEnd: number;
  readonly pciMmio32: AddressWindow;
  readonly pciMmio64: AddressWindow;
  readonly platformMmio: AddressWindow;
  readonly ioapic: AddressWindow;
  readonly lapic: AddressWindow;
  readonly acpiArea: AddressWindow;
  readonly rsdpAddr: number;
  readonly zeroPage: number;
  readonly cmdline: AddressWindow;
  readonly gdt: number;
  readonly idt: number;
  readonly pml4: number;
  readonly stackPointer: number;
  readonly kernelLoad: number;
  /** Guest-physical address width the plan was checked against. */
  readonly physAddrBits: number;
}

export interface MemoryPlanOptions {
  /** Size of the 64-bit PCI window (multiple of 1 GiB); default 64 GiB. */
  readonly pciMmio64Size?: number;
  /**
   * Guest physical address bits (host CPUID 0x80000008 EAX[7:0]); the top of the
   * 64-bit window must stay below 2^bits. Default 39 (smallest common host).
   */
  readonly physAddrBits?: number;
}

const alignUp = (v: number, a: number): number => Math.ceil(v / a) * a;

export function planMemory(ramBytes: number, options: MemoryPlanOptions = {}): MemoryPlan {
  const ctx = { ramBytes };
  if (!Number.isSafeInteger(ramBytes) || ramBytes < MIN_RAM_BYTES)
    throw new MemoryPlanError("MEMORY_TOO_SMALL", `guest RAM ${ramBytes} bytes is below the minimum of ${MIN_RAM_BYTES / MiB} MiB`, ctx);
  if (ramBytes > MAX_RAM_BYTES)
    throw new MemoryPlanError("MEMORY_TOO_LARGE", `guest RAM ${ramBytes / GiB} GiB is above the maximum of ${MAX_RAM_BYTES / GiB} GiB`, ctx);
  if (ramBytes % RAM_GRANULE !== 0)
    throw new MemoryPlanError("MEMORY_NOT_ALIGNED", `guest RAM ${ramBytes} bytes is not a multiple of 2 MiB`, ctx);
  const mmio64Size = options.pciMmio64Size ?? DEFAULT_PCI_MMIO64_SIZE;
  if (!Number.isSafeInteger(mmio64Size) || mmio64Size <= 0 || mmio64Size % GiB !== 0)
    throw new MemoryPlanError("MEMORY_BAD_MMIO64", `64-bit PCI window size ${mmio64Size} is not a positive multiple of 1 GiB`, ctx);
  const physAddrBits = options.physAddrBits ?? 39;
  if (!Number.isInteger(physAddrBits) || physAddrBits < 36 || physAddrBits > 52)
    throw new MemoryPlanError("MEMORY_BAD_PHYS_BITS", `physical address width ${physAddrBits} is outside 36..52`, ctx);

  const lowRamEnd = Math.min(ramBytes, MMIO32_HOLE_START);
  const highBytes = ramBytes - lowRamEnd;
  const ram: RamRange[] = [{ gpa: 0, length: lowRamEnd, fileOffset: 0 }];
  let highRamEnd = 0;
  if (highBytes > 0) {
    ram.push({ gpa: FOUR_GIB, length: highBytes, fileOffset: lowRamEnd });
    highRamEnd = FOUR_GIB + highBytes;
  }
  const mmio64Start = alignUp(Math.max(highRamEnd, FOUR_GIB), GiB);
  const top = mmio64Start + mmio64Size;
  if (top > 2 ** physAddrBits)
    throw new MemoryPlanError(
      "MEMORY_EXCEEDS_PHYS_BITS",
      `guest RAM ${ramBytes / GiB} GiB plus a ${mmio64Size / GiB} GiB 64-bit PCI window ends at 0x${top.toString(16)}, beyond the ${physAddrBits}-bit physical address space`,
      { ...ctx, physAddrBits },
    );

  return {
    ramBytes,
    ram,
    lowRamEnd,
    highRamEnd,
    pciMmio32: { start: PCI_MMIO32_START, size: PCI_MMIO32_SIZE },
    pciMmio64: { start: mmio64Start, size: mmio64Size },
    platformMmio: { start: PLATFORM_MMIO_START, size: PLATFORM_MMIO_SIZE },
    ioapic: { start: IOAPIC_ADDR, size: IOAPIC_SIZE },
    lapic: { start: LAPIC_ADDR, size: LAPIC_SIZE },
    acpiArea: { start: ACPI_AREA_START, size: ACPI_AREA_END - ACPI_AREA_START },
    rsdpAddr: RSDP_ADDR,
    zeroPage: ZERO_PAGE_ADDR,
    cmdline: { start: CMDLINE_ADDR, size: CMDLINE_MAX },
    gdt: BOOT_GDT_ADDR,
    idt: BOOT_IDT_ADDR,
    pml4: PML4_ADDR,
    stackPointer: BOOT_STACK_POINTER,
    kernelLoad: KERNEL_LOAD_ADDR,
    physAddrBits,
  };
}

/**
 * Where to put an initrd of `size` bytes: the highest page-aligned address such that it
 * ends at or below min(maxAddrInclusive + 1, lowRamEnd), and starts at or above `floor`.
 * Returns undefined when it does not fit.
 */
export function initrdPlacement(plan: MemoryPlan, size: number, maxAddrInclusive: number, floor: number): number | undefined {
  const limit = Math.min(maxAddrInclusive + 1, plan.lowRamEnd);
  const start = Math.floor((limit - size) / 4096) * 4096;
  if (size < 0 || start < floor) return undefined;
  return start;
}

/** True when [gpa, gpa+length) lies entirely inside one RAM range of the plan. */
export function isRam(plan: MemoryPlan, gpa: number, length: number): boolean {
  return plan.ram.some((r) => gpa >= r.gpa && gpa + length <= r.gpa + r.length);
}
