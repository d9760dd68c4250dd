/**
 * What a vCPU's exits do, whichever thread handles them (vcpu-thread.ts's
 * threads, or the VM's main thread for "native-main": main-thread-vcpus.ts):
 * port I/O and MMIO to the board's bus under the machine lock or forwarded to
 * the device thread, power events and fatal exits recorded in the shared
 * power state, state reports answered on a kick; the BSP's boot state; and
 * the bookkeeping of vCPUs on native threads served by one thread.
 */
import { VirtualProcessor, type Sregs, type Segment, type VcpuExit } from "../hypervisor/virtual-processor.js";
import type { Partition } from "../hypervisor/partition.js";
import { SyscallDoorbell, SyscallThread } from "../hypervisor/syscall-thread.js";
import { KVM_SYSTEM_EVENT, KVM_INTERNAL_ERROR } from "../hypervisor/kvm-abi.js";
import type { BootCpuState, SegmentState } from "../machine/boot-cpu.js";
import type { IoBus } from "../machine/bus.js";
import type { MachineLock } from "../machine/shared-state.js";
import type { PowerState } from "./power-state.js";
import type { DeviceForwarder } from "./device-forwarding.js";
import { StateReportRequest, describeIsolateMemory, describeVcpu, writeReport } from "./state-report.js";
import { threadCpuTimeNs } from "../hypervisor/libc.js";

function toSegment(s: SegmentState): Segment {
  return { ...s };
}

export function applyBootState(vp: VirtualProcessor, boot: BootCpuState): void {
  const sregs: Sregs = vp.getSregs();
  const seg = boot.segments;
  sregs.cs = toSegment(seg.cs);
  sregs.ds = toSegment(seg.ds);
  sregs.es = toSegment(seg.es);
  sregs.fs = toSegment(seg.fs);
  sregs.gs = toSegment(seg.gs);
  sregs.ss = toSegment(seg.ss);
  sregs.tr = toSegment(seg.tr);
  sregs.ldt = toSegment(seg.ldt);
  sregs.gdt = { ...boot.gdt };
  sregs.idt = { ...boot.idt };
  sregs.cr0 = boot.cr0;
  sregs.cr3 = boot.cr3;
  sregs.cr4 = boot.cr4;
  sregs.efer = boot.efer;
  vp.setSregs(sregs);
  const regs = vp.getRegs();
  for (const k of Object.keys(regs) as (keyof typeof regs)[]) regs[k] = 0n;
  regs.rip = boot.regs.rip;
  regs.rsi = boot.regs.rsi;
  regs.rsp = boot.regs.rsp;
  regs.rflags = boot.regs.rflags;
  vp.setRegs(regs);
  const fpu = vp.getFpu();
  fpu.fcw = 0x37f;
  fpu.mxcsr = 0x1f80;
  vp.setFpu(fpu);
}

/**
 * Service one I/O exit on the bus. `data` is the live kvm_run data area;
 * values are assembled little-endian by hand so nothing is allocated per exit.
 */
function serviceIo(bus: IoBus, exit: Extract<VcpuExit, { reason: "io" }>): void {
  const { data, size, port, count } = exit;
  if (exit.direction === "out") {
    for (let i = 0, off = 0; i < count; i++, off += size) {
      const v = size === 1 ? data[off]! : size === 2 ? data[off]! | (data[off + 1]! << 8) : (data[off]! | (data[off + 1]! << 8) | (data[off + 2]! << 16) | (data[off + 3]! << 24)) >>> 0;
      bus.pioWrite(port, size, v);
    }
  } else {
    for (let i = 0, off = 0; i < count; i++, off += size) {
      const v = bus.pioRead(port, size);
      for (let b = 0; b < size; b++) data[off + b] = (v >>> (8 * b)) & 0xff;
    }
  }
}

function describeFatal(exit: VcpuExit, vcpuId: number): string | undefined {
  switch (exit.reason) {
    case "shutdown":
      return `vCPU ${vcpuId}: triple fault (the guest reset itself through a fatal exception)`;
    case "internal_error": {
      const what = exit.suberror === KVM_INTERNAL_ERROR.EMULATION ? "instruction emulation failed" : `suberror ${exit.suberror}`;
      return `vCPU ${vcpuId}: KVM internal error: ${what} [${exit.data.map((d) => "0x" + d.toString(16)).join(" ")}]`;
    }
    case "fail_entry":
      return `vCPU ${vcpuId}: VM entry failed (hardware reason 0x${exit.hardwareReason.toString(16)})`;
    case "unknown":
      return `vCPU ${vcpuId}: unexpected KVM exit reason ${exit.code}`;
    default:
      return undefined;
  }
}

/**
 * The vCPU's architectural state in one line, for fatal exits: where the guest
 * was (CS:RIP, mode bits, page table root), so a crash report says whether it
 * died in real-mode start-up code, the kernel or user space.
 */
export function describeState(vp: VirtualProcessor, afterShutdown = true): string {
  try {
    const r = vp.getRegs();
    const s = vp.getSregs();
    const h = (v: bigint | number): string => "0x" + v.toString(16);
    const state = `cs=${h(s.cs.selector)} rip=${h(r.rip)} rsp=${h(r.rsp)} rflags=${h(r.rflags)} cr0=${h(s.cr0)} cr2=${h(s.cr2)} cr3=${h(s.cr3)} cr4=${h(s.cr4)} efer=${h(s.efer)} idt=${h(s.idt.base)}/${h(s.idt.limit)}`;
    // KVM on AMD-V re-initialises a vCPU whose guest shut down (the VMCB is undefined after a
    // SHUTDOWN intercept), so what it reports then is the reset state, not where the guest died.
    if (afterShutdown && s.cs.selector === 0xf000 && r.rip === 0xfff0n) return `${state} (the reset state: this host's KVM re-initialised the vCPU, so where it faulted is lost)`;
    return state;
  } catch (e) {
    return `state unavailable (${e instanceof Error ? e.message : String(e)})`;
  }
}

/** What a vCPU's exits are counted as (PARTIS_STATS=1 prints them when the VM stops). */
type ExitCounts = { io: number; ioForwarded: number; mmio: number; mmioForwarded: number; hlt: number; intr: number; other: number };

/** Everything one thread's vCPUs share: the board, its lock, the device forwarder, the power state. */
export interface ThreadMachine {
  readonly bus: IoBus;
  readonly lock: MachineLock;
  readonly forwarder: DeviceForwarder | undefined;
  readonly power: PowerState;
}

/**
 * One vCPU's exit handling: port I/O and MMIO to the bus under the machine
 * lock (or forwarded to the device thread), power events and fatal exits
 * recorded in the shared power state, state reports answered on a kick.
 */
export class VcpuExitHandler {
  readonly exits: ExitCounts = { io: 0, ioForwarded: 0, mmio: 0, mmioForwarded: 0, hlt: 0, intr: 0, other: 0 };
  /** PARTIS_STATS=1: CPU time of this thread by kind of exit handled (µs), and in KVM_RUN where this thread makes it. */
  readonly spentUs: Record<string, number> = {};
  private readonly report: StateReportRequest;

  constructor(
    readonly vcpuId: number,
    readonly vp: VirtualProcessor,
    private readonly m: ThreadMachine,
    report: SharedArrayBuffer,
    /** The name of this thread's isolate, for the first handler of a thread that has one of its own (its report says what the isolate holds). */
    private readonly isolate?: string,
  ) {
    // Each vCPU answers each request once, whichever thread it runs on.
    this.report = StateReportRequest.attach(report);
  }

  handle(exit: VcpuExit): void {
    const { bus, lock, forwarder, power } = this.m;
    const exits = this.exits;
    switch (exit.reason) {
      case "io":
        if (forwarder !== undefined && !bus.claimsPort(exit.port) && forwarder.forwardsPort(exit.port)) {
          exits.ioForwarded++;
          forwarder.portIo(exit.direction === "out", exit.port, exit.size, exit.count, exit.data);
          break;
        }
        exits.io++;
        lock.acquire();
        try {
          serviceIo(bus, exit);
        } finally {
          lock.release();
        }
        break;
      case "mmio":
        if (forwarder !== undefined && !bus.claimsMmio(exit.gpa)) {
          exits.mmioForwarded++;
          forwarder.mmio(exit.isWrite, exit.gpa, exit.data);
          break;
        }
        exits.mmio++;
        lock.acquire();
        try {
          if (exit.isWrite) bus.mmioWrite(exit.gpa, exit.data);
          else bus.mmioRead(exit.gpa, exit.data);
        } finally {
          lock.release();
        }
        break;
      case "hlt":
        exits.hlt++;
        break;
      case "intr":
        exits.intr++;
        // A state report's kick: this vCPU's line, then back into the guest.
        if (this.report.take()) {
          const lines = [describeVcpu(this.vcpuId, this.vp, describeState(this.vp, false), exits)];
          if (this.isolate !== undefined) lines.push(describeIsolateMemory(this.isolate));
          writeReport(lines);
        }
        break;
      case "irq_window_open":
        exits.other++;
        break;
      case "system_event":
        if (exit.type === KVM_SYSTEM_EVENT.SHUTDOWN) power.record({ kind: "poweroff", source: "kvm-system-event" });
        else if (exit.type === KVM_SYSTEM_EVENT.RESET) power.record({ kind: "reset", source: "kvm-system-event" });
        else power.record({ kind: "crash", reason: `vCPU ${this.vcpuId}: guest crash event (KVM system event ${exit.type})` });
        break;
      default: {
        const reason = describeFatal(exit, this.vcpuId);
        power.record({ kind: "crash", reason: `${reason ?? `vCPU ${this.vcpuId}: fatal exit ${exit.reason}`}; ${describeState(this.vp)}` });
      }
    }
  }

  /** Add `us` of this thread's CPU time to `key`. */
  spend(key: string, us: number): void {
    this.spentUs[key] = (this.spentUs[key] ?? 0) + us;
  }

  /**
   * Exit counts and times. The device forwarder's counts belong to the thread
   * (one forwarder for all its vCPUs): only the thread's first vCPU carries them.
   */
  stats(withForwarder: boolean): Record<string, number> {
    const stats: Record<string, number> = { ...this.exits };
    if (withForwarder) {
      stats["ioShadowed"] = this.m.forwarder?.shadowedReads ?? 0;
      stats["ioPosted"] = this.m.forwarder?.postedWrites ?? 0;
    }
    for (const [k, v] of Object.entries(this.spentUs)) stats[k] = Math.round(v);
    return stats;
  }
}

/**
 * Polls of the doorbell before the thread serving native vCPUs waits on it:
 * exits come in bursts (a driver's run of register accesses), and waking a
 * sleeping thread costs more than an exit (bench/vcpu-threads).
 */
export const DOORBELL_POLLS = 5000;

/**
 * Create each vCPU on a native thread of its own (SyscallThread, named
 * partis-vcpu<N>), every thread ringing one doorbell. On failure what was
 * made is released.
 */
export function createNativeVcpus(partition: Partition, vcpuIds: readonly number[]): { doorbell: SyscallDoorbell; vps: VirtualProcessor[] } {
  const doorbell = SyscallDoorbell.create();
  const threads: SyscallThread[] = [];
  const vps: VirtualProcessor[] = [];
  try {
    for (const vcpuId of vcpuIds) {
      const t = SyscallThread.start({ doorbell, context: { vcpu: vcpuId } });
      threads.push(t);
      t.setName(`partis-vcpu${vcpuId}`);
      vps.push(VirtualProcessor.create(partition, vcpuId, { on: t }));
    }
  } catch (e) {
    // A thread whose vCPU could not be made has no vCPU to be released with.
    for (const t of threads.slice(vps.length)) t.stop();
    releaseNativeVcpus(vps, doorbell);
    throw e;
  }
  return { doorbell, vps };
}

/**
 * Release vCPUs made by createNativeVcpus: a run still in flight is kicked
 * and waited for first (only then can its thread end), then the vCPUs, their
 * threads and the doorbell go.
 */
export function releaseNativeVcpus(vps: readonly VirtualProcessor[], doorbell: SyscallDoorbell): void {
  const threads = vps.map((vp) => vp.syscallThread!);
  threads.forEach((t, i) => {
    if (t.busy && !t.done) {
      vps[i]!.interrupt();
      t.wait();
    }
  });
  for (const vp of vps) vp.close();
  for (const t of threads) t.stop();
  doorbell.close();
}

/**
 * vCPUs on native threads (SyscallThread), each in KVM_RUN on its own while
 * one JavaScript thread serves them all ("native": a worker; "native-main":
 * the VM's main thread). Keeps which are in KVM_RUN; the serving thread
 * calls `serveFinished` whenever the doorbell their threads ring has moved.
 */
export class NativeVcpuRuns {
  private readonly threads: readonly SyscallThread[];
  private readonly inRun: boolean[];
  /** vCPUs in KVM_RUN now. */
  running = 0;
  private interrupted = false;

  constructor(
    private readonly handlers: readonly VcpuExitHandler[],
    private readonly power: PowerState,
    /** PARTIS_STATS=1: time each exit's handling (two clock reads per exit). */
    private readonly timing: boolean,
  ) {
    this.threads = handlers.map((h) => h.vp.syscallThread!);
    this.inRun = handlers.map(() => false);
  }

  /** Every vCPU into KVM_RUN; none if the VM stopped before its start gate opened (a device that failed). */
  startAll(): void {
    for (const [i, h] of this.handlers.entries()) {
      if (!this.power.running) break;
      h.vp.startRun();
      this.inRun[i] = true;
      this.running++;
    }
  }

  /**
   * Handle each vCPU whose KVM_RUN has returned and, while the VM runs, send
   * it back in. Returns how many were handled. Once the VM has stopped, the
   * first call that finds nothing to handle kicks every vCPU still in KVM_RUN
   * (an AP halted in the kernel, say) and counts as handling one, so the
   * caller looks again before it sleeps.
   */
  serveFinished(): number {
    const { handlers, threads, inRun, power, timing } = this;
    let served = 0;
    for (let i = 0; i < handlers.length; i++) {
      if (!inRun[i]) continue;
      const t = threads[i]!;
      if (!t.done) continue;
      const h = handlers[i]!;
      served++;
      inRun[i] = false;
      this.running--;
      const mark = timing ? threadCpuTimeNs() : 0n;
      const exit = h.vp.finishRun(t.take());
      h.handle(exit);
      if (timing) h.spend(`${exit.reason}Us`, Number(threadCpuTimeNs() - mark) / 1000);
      if (power.running) {
        h.vp.startRun();
        inRun[i] = true;
        this.running++;
      }
    }
    if (served === 0 && !power.running && !this.interrupted && this.running > 0) {
      this.interrupted = true;
      this.interruptAll();
      return 1;
    }
    return served;
  }

  /** Kick every vCPU in KVM_RUN out of it (immediate_exit and a signal to its thread). */
  interruptAll(): void {
    this.handlers.forEach((h, i) => this.inRun[i] && h.vp.interrupt());
  }
}
