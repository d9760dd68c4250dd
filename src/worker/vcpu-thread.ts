/**
 * A thread that runs virtual processors (node:worker_threads). It attaches to
 * the worker's partition (mapping guest RAM for itself), creates its vCPUs
 * (KVM requires vCPU ioctls from the creating thread), builds its own view of
 * the board over the shared device state, and runs them: "worker", one vCPU
 * whose KVM_RUN loop is this thread's; "native", every vCPU of the VM, each
 * on a native thread of its own (SyscallThread) that makes its ioctls, this
 * thread handling their exits in turn. Port I/O and MMIO go to the bus under
 * the machine lock; power events and fatal exits are recorded in the shared
 * power state, which stops every thread.
 */
import { awaitThreadData } from "./thread-prestart.js";
import { parentPort, receiveMessageOnPort, workerData } from "node:worker_threads";
import { Partition, type PartitionHandoff } from "../hypervisor/partition.js";
import { VirtualProcessor, type Sregs, type Segment, type VcpuExit, type VcpuKickHandle } from "../hypervisor/virtual-processor.js";
import { setThreadName, threadCpuTimeNs } from "../hypervisor/libc.js";
import { KVM_SYSTEM_EVENT, KVM_INTERNAL_ERROR } from "../hypervisor/kvm-abi.js";
import type { CpuidEntry } from "../hypervisor/system.js";
import type { BootCpuState, SegmentState } from "../machine/boot-cpu.js";
import { SharedStateArena } from "../machine/shared-state.js";
import type { IoBus } from "../machine/bus.js";
import { Board, type BoardConfig } from "./board.js";
import { PowerState } from "./power-state.js";
import { ConsoleOutputRing } from "./console-output.js";
import { systemClock } from "../devices/dependencies.js";
import { bootTrace } from "./boot-trace.js";
import { DeviceMailbox, type MailboxHandoff } from "./device-mailbox.js";
import { DeviceForwarder, type ForwardedPorts } from "./device-forwarding.js";
import { StateReportRequest, describeVcpu, writeReport } from "./state-report.js";
import { SyscallDoorbell, SyscallThread } from "../hypervisor/syscall-thread.js";
import type { MachineLock } from "../machine/shared-state.js";

/** One vCPU a thread runs. */
export interface HostedVcpu {
  readonly vcpuId: number;
  readonly cpuid: readonly CpuidEntry[];
}

/**
 * How vCPUs get their threads (VmConfig.vcpuThreads):
 * - "worker": each vCPU on a thread of its own that is a Node worker (a V8
 *   isolate, ~10 MiB each), which makes KVM_RUN itself and handles its exits;
 * - "native": each vCPU on a native thread without an isolate
 *   (src/hypervisor/syscall-thread.ts, ~44 KiB each) that makes its ioctls,
 *   and one worker for all of them that handles their exits in turn.
 */
export type VcpuThreadKind = "worker" | "native";

export interface VcpuThreadData {
  readonly handoff: PartitionHandoff;
  /** The vCPUs this thread runs: one ("worker"), or all of the VM's ("native"). */
  readonly vcpus: readonly HostedVcpu[];
  readonly kind: VcpuThreadKind;
  readonly deviceState: SharedArrayBuffer;
  readonly powerState: SharedArrayBuffer;
  /**
   * The start gate: every vCPU is created and set up before any runs (the
   * guest's BSP must find its APs present, and the TSCs are written together).
   * Word 0 turns non-zero when the main thread opens the gate.
   */
  readonly startGate: SharedArrayBuffer;
  /** State report requests (state-report.ts): answered after the kick that comes with each. */
  readonly report: SharedArrayBuffer;
  readonly board: BoardConfig;
  /** COM1's output ring (console-output.ts): the main thread writes it out. */
  readonly consoleRing: SharedArrayBuffer;
  /** The device thread, when the VM has PCI devices: its mailbox, functions and ports. */
  readonly devices?: {
    readonly mailbox: MailboxHandoff;
    readonly functions: readonly number[];
    readonly ports: ForwardedPorts;
  };
}

/**
 * The main thread's one message to a vCPU thread, posted before the start gate
 * opens (so it is waiting in the port when the thread passes the gate).
 */
export interface VcpuStartMessage {
  /** Boot state for the BSP (vCPU 0: the first thread has it); APs wait for INIT/SIPI in the in-kernel LAPIC. */
  readonly boot: BootCpuState | null;
  /** MSRs every vCPU starts with (MTRR default type, misc enable...). */
  readonly msrs: readonly { readonly index: number; readonly value: bigint }[];
}

/** Messages from a vCPU thread to the worker's main thread. */
export type VcpuThreadMessage =
  | { readonly type: "ready"; readonly vcpuId: number; readonly kick: VcpuKickHandle }
  | { readonly type: "stopped"; readonly vcpuId: number; readonly exits: Readonly<Record<string, number>> }
  | { readonly type: "error"; readonly vcpuId: number; readonly message: string };

function toSegment(s: SegmentState): Segment {
  return { ...s };
}

function applyBootState(vp: VirtualProcessor, boot: BootCpuState): void {
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
function describeState(vp: VirtualProcessor, afterShutdown = true): string {
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
interface ThreadMachine {
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
class VcpuExitHandler {
  readonly exits: ExitCounts = { io: 0, ioForwarded: 0, mmio: 0, mmioForwarded: 0, hlt: 0, intr: 0, other: 0 };
  /** PARTIS_STATS=1: CPU time of this thread by kind of exit handled (µs), and in KVM_RUN where this thread makes it. */
  readonly spentUs: Record<string, number> = {};
  private readonly report: StateReportRequest;

  constructor(
    readonly vcpuId: number,
    readonly vp: VirtualProcessor,
    private readonly m: ThreadMachine,
    report: SharedArrayBuffer,
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
        if (this.report.take()) writeReport([describeVcpu(this.vcpuId, this.vp, describeState(this.vp, false), exits)]);
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

/** This thread's name in traces and `partis-<name>` in ps: vcpu<N> for one vCPU, vcpus for all. */
function threadLabel(data: VcpuThreadData): string {
  return data.kind === "worker" ? `vcpu${data.vcpus[0]!.vcpuId}` : "vcpus";
}

/**
 * The thread's life: attach, create its vCPUs, run them, and at the end
 * release what this thread holds (vCPU fds and kvm_run mappings, native
 * threads, this thread's mappings of guest RAM). Thread-local finalizers do
 * not run when a thread ends, and these are process-wide: left open, every
 * reboot would keep the old VM (and its guest RAM) alive.
 */
function main(data: VcpuThreadData): void {
  bootTrace(threadLabel(data), "data received");
  setThreadName(`partis-${threadLabel(data)}`);
  const partition = Partition.attach(data.handoff);
  try {
    if (data.kind === "worker") {
      const vp = VirtualProcessor.create(partition, data.vcpus[0]!.vcpuId);
      try {
        runVcpus(data, partition, [vp]);
      } finally {
        vp.close();
      }
    } else runNativeVcpus(data, partition);
  } finally {
    partition.destroy();
  }
}

/** "native": one SyscallThread per vCPU, all driven from here. */
function runNativeVcpus(data: VcpuThreadData, partition: Partition): void {
  const doorbell = SyscallDoorbell.create();
  const threads: SyscallThread[] = [];
  const vps: VirtualProcessor[] = [];
  try {
    for (const { vcpuId } of data.vcpus) {
      const t = SyscallThread.start({ doorbell, context: { vcpu: vcpuId } });
      threads.push(t);
      nameNativeThread(t, `partis-vcpu${vcpuId}`);
      vps.push(VirtualProcessor.create(partition, vcpuId, { on: t }));
    }
    runVcpus(data, partition, vps, doorbell);
  } finally {
    // A vCPU still in KVM_RUN (the loop failed): kick it out here, without waiting for the main
    // thread to; only then can its thread end.
    threads.forEach((t, i) => {
      if (t.busy && !t.done) {
        vps[i]?.interrupt();
        t.wait();
      }
    });
    for (const vp of vps) vp.close();
    for (const t of threads) t.stop();
    doorbell.close();
  }
}

const PR_SET_NAME = 15;
const SYS_prctl = 157;

/** Name a native thread (as seen in ps/top) through the thread itself. */
function nameNativeThread(t: SyscallThread, name: string): void {
  t.scratch.fill(0, 0, 16);
  t.scratch.set(new TextEncoder().encode(name).subarray(0, 15));
  t.call(SYS_prctl, PR_SET_NAME, t.scratchAddress);
}

/**
 * Polls of the doorbell before a "native" thread sleeps on it: exits come in
 * bursts (a driver's run of register accesses), and waking a sleeping thread
 * costs more than an exit (bench/vcpu-threads).
 */
const DOORBELL_POLLS = 5000;

function runVcpus(data: VcpuThreadData, partition: Partition, vps: readonly VirtualProcessor[], doorbell?: SyscallDoorbell): void {
  const port = parentPort!;
  const power = new PowerState(data.powerState);
  for (const [i, vp] of vps.entries()) vp.setCpuid(data.vcpus[i]!.cpuid);

  const arena = new SharedStateArena(data.deviceState);
  const lock = arena.lock();
  const board = new Board(
    arena,
    {
      irq: (gsi) => ({ setLevel: (level) => partition.setIrqLine(gsi, level) }),
      console: ConsoleOutputRing.attach(data.consoleRing).writer(),
      clock: systemClock,
      power: power.control(() => {}),
    },
    data.board,
    false,
  );
  const bus = board.bus;
  let forwarder: DeviceForwarder | undefined;
  if (data.devices !== undefined) {
    // One mailbox slot per thread (that of its first vCPU): this thread's accesses stay in order.
    const requester = DeviceMailbox.attach(data.devices.mailbox).requester(data.vcpus[0]!.vcpuId);
    requester.abandoned = () => !power.running;
    forwarder = new DeviceForwarder(requester, data.devices.ports);
    for (const bdf of data.devices.functions) board.pciHost.attach(bdf, forwarder.configFunction(bdf));
  }
  const machine: ThreadMachine = { bus, lock, forwarder, power };
  const handlers = vps.map((vp, i) => new VcpuExitHandler(data.vcpus[i]!.vcpuId, vp, machine, data.report));
  bootTrace(threadLabel(data), "ready");
  for (const h of handlers) port.postMessage({ type: "ready", vcpuId: h.vcpuId, kick: h.vp.kickHandle() } satisfies VcpuThreadMessage);
  const gate = new Int32Array(data.startGate, 0, 1);
  while (Atomics.load(gate, 0) === 0) Atomics.wait(gate, 0, 0);
  const start = receiveMessageOnPort(port)?.message as VcpuStartMessage | undefined;
  if (start === undefined) throw new Error("start gate opened without a start message");
  for (const h of handlers) {
    h.vp.setMsrs(start.msrs.map((m) => ({ index: m.index, data: m.value })));
    if (start.boot !== null && h.vcpuId === 0) applyBootState(h.vp, start.boot);
  }

  // PARTIS_STATS=1 also splits this thread's CPU time by kind of exit handled (and, where this
  // thread makes KVM_RUN, the time in it: guest and kernel). Two clock reads per exit, so only then.
  const timing = process.env["PARTIS_STATS"] === "1";
  if (doorbell === undefined) {
    const h = handlers[0]!;
    let mark = timing ? threadCpuTimeNs() : 0n;
    while (power.running) {
      const exit = h.vp.run();
      if (timing) {
        const now = threadCpuTimeNs();
        h.spend("inKvmRun", Number(now - mark) / 1000);
        mark = now;
      }
      h.handle(exit);
      if (timing) {
        const now = threadCpuTimeNs();
        h.spend(`${exit.reason}Us`, Number(now - mark) / 1000);
        mark = now;
      }
    }
  } else serveNative(handlers, doorbell, power, timing);
  handlers.forEach((h, i) => port.postMessage({ type: "stopped", vcpuId: h.vcpuId, exits: h.stats(i === 0) } satisfies VcpuThreadMessage));
}

/**
 * Serve vCPUs on native threads: each is in KVM_RUN on its thread while this
 * one waits on their common doorbell; an exit is handled here and the vCPU
 * sent back in. Once the VM stops, a vCPU whose run returns (the main thread
 * kicks them all) is not sent back; this returns when none is left in KVM_RUN.
 */
function serveNative(handlers: readonly VcpuExitHandler[], doorbell: SyscallDoorbell, power: PowerState, timing: boolean): void {
  const threads = handlers.map((h) => h.vp.syscallThread!);
  const inRun = handlers.map(() => false);
  let running = 0;
  let interrupted = false;
  try {
    // The VM may have stopped before its start gate opened (a device that failed): then no vCPU runs.
    for (const [i, h] of handlers.entries()) {
      if (!power.running) break;
      h.vp.startRun();
      inRun[i] = true;
      running++;
    }
    while (running > 0) {
      const sequence = doorbell.sequence;
      let served = 0;
      for (let i = 0; i < handlers.length; i++) {
        const t = threads[i]!;
        if (!inRun[i] || !t.done) continue;
        served++;
        const h = handlers[i]!;
        const mark = timing ? threadCpuTimeNs() : 0n;
        const exit = h.vp.finishRun(t.take());
        h.handle(exit);
        if (timing) h.spend(`${exit.reason}Us`, Number(threadCpuTimeNs() - mark) / 1000);
        if (power.running) h.vp.startRun();
        else {
          inRun[i] = false;
          running--;
        }
      }
      if (served > 0) continue;
      if (!power.running && !interrupted) {
        // Stopped: the main thread kicks the vCPUs it knows; this thread kicks them all itself
        // too, so none is left waiting (an AP halted in the kernel, say) whatever the main thread saw.
        interrupted = true;
        handlers.forEach((h, i) => inRun[i] && h.vp.interrupt());
        continue;
      }
      let polls = 0;
      while (polls < DOORBELL_POLLS && doorbell.sequence === sequence) polls++;
      // A bounded sleep: the VM stopping does not ring the doorbell.
      if (polls === DOORBELL_POLLS) doorbell.wait(sequence, 200);
    }
  } catch (e) {
    // Stop the VM: runNativeVcpus then kicks the vCPUs still in KVM_RUN and ends their threads.
    power.record({ kind: "crash", reason: `vCPUs: ${e instanceof Error ? e.message : String(e)}` });
    throw e;
  }
}

bootTrace("vcpu thread", "modules loaded");
/** Started with its data, or prestarted (thread-prestart.ts): then the data is the first message. */
const threadData = await awaitThreadData<VcpuThreadData>(workerData, parentPort);
// A prestarted thread the VM did not need: end quietly.
if (threadData === null) process.exit(0);
try {
  main(threadData);
} catch (e) {
  const message = e instanceof Error ? e.message : String(e);
  const data = threadData;
  const vcpuId = data.vcpus[0]?.vcpuId ?? 0;
  new PowerState(data.powerState).record({ kind: "crash", reason: `vCPU ${vcpuId}: ${message}` });
  parentPort?.postMessage({ type: "error", vcpuId, message } satisfies VcpuThreadMessage);
}
