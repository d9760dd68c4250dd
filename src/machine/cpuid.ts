/**
 * Per-vCPU CPUID: the host's KVM_GET_SUPPORTED_CPUID list adjusted so a guest sees
 * one package with `vcpuCount` cores, one thread per core, and this vCPU's APIC ID.
 *
 * Leaves touched (Intel SDM vol. 2 "CPUID"; AMD APM vol. 3 appendix E):
 *   1          EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package,
 *              EDX[28] HTT when more than one, ECX[31] hypervisor present
 *   4          EAX[31:26] cores per package - 1, EAX[25:14] threads sharing the cache - 1
 *   0xB, 0x1F  x2APIC topology: SMT level (shift 0, 1 thread), core level
 *              (shift = ceil(log2(vcpuCount)), vcpuCount), then an invalid level; EDX = APIC ID
 *   0x80000008 ECX[7:0] cores - 1, ECX[15:12] APIC ID core bits (AMD)
 *   0x8000001E EAX extended APIC ID, EBX core id / threads per core, ECX node (AMD, when present)
 * Everything else (KVM's 0x40000000 paravirt leaves, 0xD XSAVE sizes which KVM keeps
 * in step with XCR0 itself) is passed through unchanged.
 */
import { PartisError } from "../errors.js";

/** Same shape as struct kvm_cpuid_entry2 (the hypervisor layer defines an identical type). */
export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export class CpuidError extends PartisError {}

export const CPUID_FLAG_SIGNIFICANT_INDEX = 1;
/** The xAPIC ID and the MADT Processor Local APIC entry are 8 bits. */
export const MAX_VCPUS = 255;

export interface CpuidOptions {
  readonly vcpuId: number;
  readonly vcpuCount: number;
  /** Set CPUID.1:ECX[31] (default true). */
  readonly hypervisorBit?: boolean;
  /**
   * Advertise the TSC-deadline LAPIC timer (CPUID.1:ECX[24]). KVM emulates it
   * with the in-kernel LAPIC but leaves it out of KVM_GET_SUPPORTED_CPUID; the
   * VMM sets it when KVM_CAP_TSC_DEADLINE_TIMER is present.
   */
  readonly tscDeadlineTimer?: boolean;
}

const LEVEL_SMT = 1;
const LEVEL_CORE = 2;

/** Bits needed to number `n` items (0 for 1). */
export function idBits(n: number): number {
  let b = 0;
  while (1 << b < n) b++;
  return b;
}

export function cpuidForVcpu(supported: readonly CpuidEntry[], opts: CpuidOptions): CpuidEntry[] {
  const { vcpuId, vcpuCount } = opts;
  if (!Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > MAX_VCPUS)
    throw new CpuidError("CPUID_BAD_VCPU_COUNT", `vCPU count ${vcpuCount} is outside 1..${MAX_VCPUS}`, { vcpuCount });
  if (!Number.isInteger(vcpuId) || vcpuId < 0 || vcpuId >= vcpuCount)
    throw new CpuidError("CPUID_BAD_VCPU_ID", `vCPU id ${vcpuId} is outside 0..${vcpuCount - 1}`, { vcpuId, vcpuCount });
  const apicId = vcpuId;
  const coreBits = idBits(vcpuCount);
  const pow2Cores = 1 << coreBits;
  const maxBasic = supported.find((e) => e.function === 0)?.eax ?? 0;
  const has0x1f = supported.some((e) => e.function === 0x1f);

  const out: CpuidEntry[] = [];
  for (const src of supported) {
    const e: CpuidEntry = { ...src };
    switch (e.function) {
      case 0x1:
        e.ebx = ((e.ebx & 0x0000ffff) | (Math.min(vcpuCount, 255) << 16) | (apicId << 24)) >>> 0;
        e.edx = vcpuCount > 1 ? (e.edx | (1 << 28)) >>> 0 : (e.edx & ~(1 << 28)) >>> 0;
        if (opts.hypervisorBit !== false) e.ecx = (e.ecx | 0x8000_0000) >>> 0;
        if (opts.tscDeadlineTimer === true) e.ecx = (e.ecx | (1 << 24)) >>> 0;
        break;
      case 0x4: {
        const type = e.eax & 0x1f;
        if (type === 0) break;
        const level = (e.eax >>> 5) & 0x7;
        const sharing = level >= 3 ? Math.min(pow2Cores, 4096) - 1 : 0;
        e.eax = ((e.eax & 0x3fff) | (sharing << 14) | ((Math.min(pow2Cores, 64) - 1) << 26)) >>> 0;
        break;
      }
      case 0xb:
      case 0x1f:
        continue; // rebuilt below
      case 0x8000_0008:
        e.ecx = ((e.ecx & ~0xf0ff) | ((vcpuCount - 1) & 0xff) | (coreBits << 12)) >>> 0;
        break;
      case 0x8000_001e:
        e.eax = apicId >>> 0;
        e.ebx = ((e.ebx & ~0xffff) | (vcpuId & 0xff)) >>> 0; // core id, threads per core - 1 = 0
        e.ecx = (e.ecx & ~0x7ff) >>> 0; // node 0, one node per package
        break;
      default:
        break;
    }
    out.push(e);
  }
  const topo = (fn: number): CpuidEntry[] => [
    { function: fn, index: 0, flags: CPUID_FLAG_SIGNIFICANT_INDEX, eax: 0, ebx: 1, ecx: (LEVEL_SMT << 8) | 0, edx: apicId },
    { function: fn, index: 1, flags: CPUID_FLAG_SIGNIFICANT_INDEX, eax: coreBits, ebx: vcpuCount, ecx: (LEVEL_CORE << 8) | 1, edx: apicId },
    { function: fn, index: 2, flags: CPUID_FLAG_SIGNIFICANT_INDEX, eax: 0, ebx: 0, ecx: 2, edx: apicId },
  ];
  if (maxBasic >= 0xb) out.push(...topo(0xb));
  if (has0x1f && maxBasic >= 0x1f) out.push(...topo(0x1f));
  out.sort((a, b) => a.function - b.function || a.index - b.index);
  return out;
}
