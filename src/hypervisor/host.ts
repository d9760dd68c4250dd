/**
 * What this host offers for virtualization: CPU virtualization kind (VT-x,
 * AMD-V, or PVM — KVM without hardware virtualization), NX, 64-bit, memory,
 * and whether /dev/kvm is there and usable. `partis host check` prints this.
 *
 * The parsing functions are pure (text in, facts out) so they are tested
 * with sample /proc files; `probeHost()` only gathers the text.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import { KvmSystem } from "./system.js";
import { SystemCallError } from "./errors.js";
import { PartisError } from "../errors.js";

export type VirtualizationKind = "vmx" | "svm" | "pvm" | "unknown";

export interface KvmAvailability {
  present: boolean;
  accessible: boolean;
  /** Why KVM cannot be used, when it cannot. */
  reason?: string;
  apiVersion?: number;
  maxVcpus?: number;
}

export interface HostReport {
  kind: VirtualizationKind;
  /** The CPU has the NX (execute-disable) bit. */
  nx: boolean;
  is64bit: boolean;
  /** `uname -m`. */
  machine: string;
  cpuModel: string;
  logicalCpus: number;
  /** Loaded KVM modules among kvm_intel, kvm_amd, kvm_pvm. */
  kvmModules: string[];
  memTotalBytes: number;
  memAvailableBytes: number;
  /** The kernel's huge-page pools (hugetlbfs), smallest page first; empty without hugetlbfs. */
  hugePagePools: HugePagePool[];
  kvm: KvmAvailability;
}

/** One hugetlbfs pool (/sys/kernel/mm/hugepages/hugepages-<size>kB). */
export interface HugePagePool {
  readonly pageBytes: number;
  /** Pages in the pool (nr_hugepages). */
  readonly total: number;
  /**
   * What a new VM can reserve: pages neither in use nor promised to a mapping
   * (free − resv), plus the surplus pages the kernel may still add on demand
   * (nr_overcommit_hugepages − surplus_hugepages; those can fail to come when
   * memory is fragmented, and the reservation then fails).
   */
  readonly available: number;
}

/**
 * Read the huge-page pools from a sysfs directory laid out as
 * /sys/kernel/mm/hugepages: one `hugepages-<N>kB` directory per page size,
 * holding nr_hugepages, free_hugepages, resv_hugepages and (optionally)
 * nr_overcommit_hugepages and surplus_hugepages.
 */
export function readHugePagePools(dir = "/sys/kernel/mm/hugepages"): HugePagePool[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return [];
  }
  const pools: HugePagePool[] = [];
  for (const name of names) {
    const m = /^hugepages-(\d+)kB$/.exec(name);
    if (m === null) continue;
    const count = (file: string): number | undefined => {
      const t = readText(`${dir}/${name}/${file}`).trim();
      return /^\d+$/.test(t) ? Number(t) : undefined;
    };
    const total = count("nr_hugepages");
    const free = count("free_hugepages");
    const resv = count("resv_hugepages") ?? 0;
    const overcommit = Math.max(0, (count("nr_overcommit_hugepages") ?? 0) - (count("surplus_hugepages") ?? 0));
    if (total === undefined || free === undefined) continue;
    pools.push({ pageBytes: Number(m[1]) * 1024, total, available: Math.max(0, free - resv) + overcommit });
  }
  return pools.sort((a, b) => a.pageBytes - b.pageBytes);
}

export interface CpuInfo {
  flags: Set<string>;
  model: string;
  vendor: string;
  logicalCpus: number;
}

/** Parse /proc/cpuinfo: the flags of the first processor, its model name and vendor, and the processor count. */
export function parseCpuinfo(text: string): CpuInfo {
  let flags: Set<string> | undefined;
  let model = "";
  let vendor = "";
  let logicalCpus = 0;
  for (const line of text.split("\n")) {
    const colon = line.indexOf(":");
    if (colon < 0) continue;
    const key = line.slice(0, colon).trim();
    const value = line.slice(colon + 1).trim();
    if (key === "processor") logicalCpus++;
    else if (key === "flags" && flags === undefined) flags = new Set(value.split(/\s+/).filter((f) => f.length > 0));
    else if (key === "model name" && model === "") model = value;
    else if (key === "vendor_id" && vendor === "") vendor = value;
  }
  return { flags: flags ?? new Set(), model, vendor, logicalCpus };
}

/** Parse /proc/meminfo values (kB) into bytes. */
export function parseMeminfo(text: string): { memTotalBytes: number; memAvailableBytes: number } {
  const get = (name: string): number | undefined => {
    const m = new RegExp(`^${name}:\\s+(\\d+)\\s*kB`, "m").exec(text);
    return m === null ? undefined : Number(m[1]) * 1024;
  };
  const total = get("MemTotal") ?? 0;
  const available = get("MemAvailable") ?? (get("MemFree") ?? 0) + (get("Cached") ?? 0) + (get("Buffers") ?? 0);
  return { memTotalBytes: total, memAvailableBytes: available };
}

/**
 * Decide the virtualization kind. A loaded kvm_pvm module means /dev/kvm is
 * PVM even when the CPU also has vmx/svm (PVM takes over /dev/kvm); otherwise
 * the CPU flag decides.
 */
export function classifyVirtualization(flags: ReadonlySet<string>, kvmModules: readonly string[]): VirtualizationKind {
  if (kvmModules.includes("kvm_pvm")) return "pvm";
  if (flags.has("vmx")) return "vmx";
  if (flags.has("svm")) return "svm";
  return "unknown";
}

/** True for a 64-bit host: `lm` flag, or the machine name. */
export function is64bitHost(flags: ReadonlySet<string>, machine: string): boolean {
  return flags.has("lm") || machine === "x86_64" || machine === "aarch64";
}

export const PVM_EXPLANATION =
  "This host's /dev/kvm is PVM (kvm_pvm: KVM on shadow page tables, without VT-x/AMD-V): guest user mode runs natively, " +
  "but guest kernel mode and real mode go through KVM's instruction emulator, which rejects instructions a stock kernel needs " +
  "(INT n in protected mode, XRSTOR, CMPXCHG16B, POPCNT, ...), so unmodified Linux guests cannot run here; run them inside " +
  "the nested test host (a VT-x/AMD-V guest under QEMU) or on a VT-x/AMD-V host.";

/**
 * Whether stock (unmodified) guests can run on this host: only with VT-x or
 * AMD-V and a usable /dev/kvm. False on PVM (see PVM_EXPLANATION).
 */
export function hostCanRunStockGuests(report: HostReport): boolean {
  return stockGuestVerdict(report).ok;
}

/** `hostCanRunStockGuests` with the sentence that explains the answer. */
export function stockGuestVerdict(report: HostReport): { ok: boolean; why: string } {
  if (!report.kvm.present) return { ok: false, why: report.kvm.reason ?? "/dev/kvm is missing" };
  if (!report.kvm.accessible) return { ok: false, why: report.kvm.reason ?? "/dev/kvm is not accessible" };
  switch (report.kind) {
    case "vmx":
      return { ok: true, why: "Intel VT-x with KVM (kvm_intel)" };
    case "svm":
      return { ok: true, why: "AMD-V with KVM (kvm_amd)" };
    case "pvm":
      return { ok: false, why: PVM_EXPLANATION };
    default:
      return { ok: false, why: "the CPU reports neither VT-x (vmx) nor AMD-V (svm), and no kvm_pvm module is loaded" };
  }
}

function readText(path: string): string {
  try {
    return fs.readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

/**
 * Why the KVM device node is absent, from what the kernel shows: no KVM
 * module; a module loaded that registered no device (kvm_pvm declines to bind
 * on a kernel that is itself a PVM guest: PVM does not nest); or a device the
 * kernel registered (misc "kvm") without its node under /dev.
 */
export function missingKvmReason(path: string, kvmModules: readonly string[], miscRegistered: boolean): string {
  if (path !== "/dev/kvm") return `${path} does not exist`; // a device path of the caller's choosing: the kernel's state says nothing of it
  if (miscRegistered) return `${path} does not exist, though the kernel registered KVM (misc device "kvm"): create it with \`mknod ${path} c 10 232\``;
  if (kvmModules.length === 0) return `${path} does not exist: no KVM module is loaded (load kvm_intel or kvm_amd)`;
  const why = kvmModules.includes("kvm_pvm")
    ? " (kvm_pvm declines on a kernel that is itself a PVM guest: PVM does not nest; `dmesg | grep kvm` tells)"
    : " (`dmesg | grep kvm` tells why: virtualization disabled in the firmware, say)";
  return `${path} does not exist: ${kvmModules.join(", ")} is loaded but registered no KVM device${why}`;
}

function probeKvm(path: string, kvmModules: readonly string[]): KvmAvailability {
  if (!fs.existsSync(path))
    return { present: false, accessible: false, reason: missingKvmReason(path, kvmModules, fs.existsSync("/sys/class/misc/kvm")) };
  try {
    fs.accessSync(path, fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return { present: true, accessible: false, reason: `${path} is not readable and writable by this user (add it to group kvm)` };
  }
  let system: KvmSystem | undefined;
  try {
    system = KvmSystem.open(path);
    return { present: true, accessible: true, apiVersion: system.apiVersion, maxVcpus: system.maxVcpus };
  } catch (e) {
    const why = e instanceof SystemCallError ? `${e.call}: ${e.errnoName}` : e instanceof PartisError ? e.message : String(e);
    return { present: true, accessible: false, reason: `${path} cannot be used: ${why}` };
  } finally {
    system?.close();
  }
}

/** Gather the host report from /proc, /sys and /dev/kvm. */
export function probeHost(kvmPath = "/dev/kvm"): HostReport {
  const cpu = parseCpuinfo(readText("/proc/cpuinfo"));
  const kvmModules = ["kvm_intel", "kvm_amd", "kvm_pvm"].filter((m) => fs.existsSync(`/sys/module/${m}`));
  const mem = parseMeminfo(readText("/proc/meminfo"));
  const machine = os.machine();
  return {
    kind: classifyVirtualization(cpu.flags, kvmModules),
    nx: cpu.flags.has("nx"),
    is64bit: is64bitHost(cpu.flags, machine),
    machine,
    cpuModel: cpu.model,
    logicalCpus: cpu.logicalCpus || os.cpus().length,
    kvmModules,
    memTotalBytes: mem.memTotalBytes || os.totalmem(),
    memAvailableBytes: mem.memAvailableBytes || os.freemem(),
    hugePagePools: readHugePagePools(),
    kvm: probeKvm(kvmPath, kvmModules),
  };
}
