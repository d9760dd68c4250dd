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
import { VirtualProcessor, type VcpuKickHandle } from "../hypervisor/virtual-processor.js";
import { setThreadName, threadCpuTimeNs } from "../hypervisor/libc.js";
import type { CpuidEntry } from "../hypervisor/system.js";
import type { BootCpuState } from "../machine/boot-cpu.js";
import { SharedStateArena } from "../machine/shared-state.js";
import { Board, type BoardConfig } from "./board.js";
import { PowerState } from "./power-state.js";
import { ConsoleOutputRing } from "./console-output.js";
import { systemClock } from "../devices/dependencies.js";
import { bootTrace } from "./boot-trace.js";
import { DeviceMailbox, type MailboxHandoff } from "./device-mailbox.js";
import { DeviceForwarder, type ForwardedPorts } from "./device-forwarding.js";
import { applyBootState, createNativeVcpus, DOORBELL_POLLS, NativeVcpuRuns, releaseNativeVcpus, VcpuExitHandler, type ThreadMachine } from "./vcpu-exits.js";
import type { SyscallDoorbell } from "../hypervisor/syscall-thread.js";

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
 *   and one worker for all of them that handles their exits in turn;
 * - "native-main": native threads as "native", their exits handled by the
 *   VM's main thread between its other events (main-thread-vcpus.ts): no
 *   vCPU isolate at all, so no thread of this file.
 */
export type VcpuThreadKind = "worker" | "native" | "native-main";

export interface VcpuThreadData {
  readonly handoff: PartitionHandoff;
  /** The vCPUs this thread runs: one ("worker"), or all of the VM's ("native"). */
  readonly vcpus: readonly HostedVcpu[];
  readonly kind: Exclude<VcpuThreadKind, "native-main">;
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
  const { doorbell, vps } = createNativeVcpus(partition, data.vcpus.map((v) => v.vcpuId));
  try {
    runVcpus(data, partition, vps, doorbell);
  } finally {
    // A vCPU still in KVM_RUN (the loop failed) is kicked out here, without waiting for the main thread to.
    releaseNativeVcpus(vps, doorbell);
  }
}

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
  const handlers = vps.map((vp, i) => new VcpuExitHandler(data.vcpus[i]!.vcpuId, vp, machine, data.report, i === 0 ? `${threadLabel(data)} thread` : undefined));
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
  const runs = new NativeVcpuRuns(handlers, power, timing);
  try {
    runs.startAll();
    while (runs.running > 0) {
      const sequence = doorbell.sequence;
      if (runs.serveFinished() > 0) continue;
      // A bounded sleep: the VM stopping does not ring the doorbell.
      if (!doorbell.poll(sequence, DOORBELL_POLLS)) doorbell.wait(sequence, 200);
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
