/**
 * The state report of a running VM: what every virtual processor and device
 * is doing right now, written to standard error as `partis-vm: report:` lines.
 * It is how an operator (or a test that gave up waiting) finds out why a guest
 * stopped making progress: a vCPU spinning at one RIP with interrupts off, a
 * vector stuck in a LAPIC's IRR, a virtqueue whose driver posted requests the
 * device never popped, an MSI-X vector left masked with a message pending.
 *
 * `partis run` asks for one on SIGQUIT (`kill -QUIT <pid>`; the VM keeps
 * running). The request is a shared counter: the main thread bumps it and
 * kicks every vCPU out of KVM_RUN (a halted one included) and rings the
 * device thread; each thread writes its lines when it sees a count it has not
 * answered yet, then carries on.
 */
import { readFileSync, writeSync } from "node:fs";
import { getHeapSpaceStatistics, getHeapStatistics } from "node:v8";
import type { VirtualProcessor } from "../hypervisor/virtual-processor.js";
import { KVM_MP_STATE } from "../hypervisor/kvm-abi.js";

export class StateReportRequest {
  private readonly word: Int32Array;
  private answered = 0;

  private constructor(readonly buffer: SharedArrayBuffer) {
    this.word = new Int32Array(buffer, 0, 1);
  }

  static create(): StateReportRequest {
    return new StateReportRequest(new SharedArrayBuffer(4));
  }

  /** The same counter, seen from another thread (each thread answers for itself). */
  static attach(buffer: SharedArrayBuffer): StateReportRequest {
    return new StateReportRequest(buffer);
  }

  /** Ask every thread for its lines; the caller then wakes them. */
  request(): void {
    Atomics.add(this.word, 0, 1);
  }

  /** True once for each request this thread has not answered yet. */
  take(): boolean {
    const n = Atomics.load(this.word, 0);
    if (n === this.answered) return false;
    this.answered = n;
    return true;
  }
}

/** Write report lines to standard error in one write (threads' reports do not interleave mid-line). */
export function writeReport(lines: readonly string[]): void {
  if (lines.length === 0) return;
  try {
    writeSync(2, lines.map((l) => `partis-vm: report: ${l}\n`).join(""));
  } catch {
    /* standard error closed: nobody to tell */
  }
}

const KIB = 1024;
const mib = (bytes: number): string => (bytes / (KIB * KIB)).toFixed(1);

/**
 * The line of one thread's V8 isolate: the memory its heap holds (committed
 * pages, by space: new, old, code, large objects) and how much of it is in
 * use, plus what the isolate allocated with malloc. Every thread that runs
 * JavaScript is an isolate of its own, and in a VM's process they are most
 * of its private memory (docs/benchmarks.md, "Boot"), so this says where it
 * went.
 */
export function describeIsolateMemory(thread: string): string {
  const spaces = new Map<string, number>();
  for (const space of getHeapSpaceStatistics()) {
    const name = space.space_name.replace(/_space$/, "").replace(/_object$/, "");
    if (space.physical_space_size > 0) spaces.set(name, space.physical_space_size);
  }
  const h = getHeapStatistics();
  const bySpace = [...spaces].map(([name, bytes]) => `${name} ${mib(bytes)}`).join(", ");
  return `${thread}: V8 heap ${mib(h.total_physical_size)} MiB committed (${bySpace}), ${mib(h.used_heap_size)} MiB in use, ${mib(h.malloced_memory)} MiB malloc`;
}

/**
 * The line of the VM's process: its resident memory split as the kernel
 * counts it (/proc/self/status): private (RssAnon), program files (RssFile)
 * and shared memory (RssShmem: guest RAM, the kvm_run areas).
 */
export function describeProcessMemory(): string {
  let status: string;
  try {
    status = readFileSync("/proc/self/status", "utf8");
  } catch (e) {
    return `process memory unavailable (${e instanceof Error ? e.message : String(e)})`;
  }
  const field = (text: string, key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(text)?.[1] ?? NaN);
  const m = (key: string): string => (field(status, key) / KIB).toFixed(1);
  let huge = "";
  try {
    // Transparent huge pages in private memory (docs/architecture.md, "Transparent huge pages and the VM's own memory").
    huge = `, ${(field(readFileSync("/proc/self/smaps_rollup", "utf8"), "AnonHugePages") / KIB).toFixed(1)} MiB of the private in huge pages`;
  } catch {
    /* no smaps_rollup (kernels before 4.14) */
  }
  return `process: ${m("VmRSS")} MiB resident: ${m("RssAnon")} private, ${m("RssFile")} program files, ${m("RssShmem")} shared (guest RAM and kvm_run areas)${huge}; ${field(status, "Threads")} threads`;
}

const MP_STATE_NAMES = new Map<number, string>(Object.entries(KVM_MP_STATE).map(([k, v]) => [v, k.toLowerCase()]));

/** The vectors set in one of the LAPIC's 256-bit registers (ISR at 0x100, IRR at 0x200: eight 32-bit words, 16 bytes apart). */
export function lapicVectors(lapic: Uint8Array, base: number): number[] {
  const out: number[] = [];
  const dv = new DataView(lapic.buffer, lapic.byteOffset, lapic.byteLength);
  for (let w = 0; w < 8; w++) {
    const bits = dv.getUint32(base + w * 16, true);
    for (let b = 0; b < 32; b++) if ((bits >>> b) & 1) out.push(w * 32 + b);
  }
  return out;
}

const LAPIC_TPR = 0x80;
const LAPIC_ISR = 0x100;
const LAPIC_IRR = 0x200;

/**
 * A vCPU's line: where it runs (from `where`, the thread's register summary),
 * its run state, interrupt flag, and its LAPIC's in-service and requested
 * vectors, plus its exit counters.
 */
export function describeVcpu(vcpuId: number, vp: VirtualProcessor, where: string, exits: Readonly<Record<string, number>>): string {
  const parts = [`vCPU ${vcpuId}: ${where}`];
  try {
    const mp = vp.getMpState();
    parts.push(`mp_state ${MP_STATE_NAMES.get(mp) ?? mp}`);
  } catch (e) {
    parts.push(`mp_state unavailable (${(e as Error).message})`);
  }
  try {
    const lapic = vp.getLapic();
    const hex = (v: number[]): string => (v.length === 0 ? "-" : v.map((x) => "0x" + x.toString(16)).join(","));
    parts.push(`lapic tpr 0x${lapic[LAPIC_TPR]!.toString(16)} isr ${hex(lapicVectors(lapic, LAPIC_ISR))} irr ${hex(lapicVectors(lapic, LAPIC_IRR))}`);
  } catch (e) {
    parts.push(`lapic unavailable (${(e as Error).message})`);
  }
  try {
    const ev = vp.getVcpuEvents();
    if (ev.interruptInjected !== 0) parts.push(`injecting vector 0x${ev.interruptNr.toString(16)}`);
    if (ev.exceptionInjected !== 0) parts.push(`injecting exception ${ev.exceptionNr}`);
    if (ev.nmiInjected !== 0) parts.push("injecting NMI");
    if (ev.nmiPending !== 0) parts.push("NMI pending");
  } catch {
    /* older KVM: no events */
  }
  parts.push(`exits ${Object.entries(exits).map(([k, v]) => `${k} ${v}`).join(" ")}`);
  return parts.join("; ");
}
