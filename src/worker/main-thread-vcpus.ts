/**
 * vCPUs whose exits the VM's main thread handles (VmConfig.vcpuThreads
 * "native-main"): each vCPU on a native thread of its own (SyscallThread,
 * ~44 KiB) that makes its ioctls, KVM_RUN included, and no Node worker at
 * all. The VM then carries one V8 isolate, the main thread's, where
 * "native" adds one more for the exit-handling thread (~8-10 MiB of private
 * memory) and "worker" one per vCPU.
 *
 * The main thread also runs the VM's event loop (console, power button,
 * device thread messages), so exits are served between its other events:
 * every finished run is handled and its vCPU sent back in; the doorbell is
 * then polled a few thousand times (exits come in bursts) and, when it stays
 * quiet, waited on from a thread of libuv's pool (SyscallDoorbell.waitAsync),
 * the event loop free meanwhile. A long burst yields to the event loop every
 * YIELD_EVERY exits. What an exit does is vcpu-exits.ts, as on the other
 * kinds of thread.
 */
import type { Partition } from "../hypervisor/partition.js";
import type { SyscallDoorbell } from "../hypervisor/syscall-thread.js";
import type { PowerState } from "./power-state.js";
import { applyBootState, createNativeVcpus, DOORBELL_POLLS, NativeVcpuRuns, releaseNativeVcpus, VcpuExitHandler, type ThreadMachine } from "./vcpu-exits.js";
import type { HostedVcpu, VcpuStartMessage } from "./vcpu-thread.js";

/** Exits served in one turn before the event loop gets its turn. */
const YIELD_EVERY = 512;
/** A bounded wait: the VM stopping does not ring the doorbell. */
const WAIT_MS = 200;

/** The board's bus and lock, the device forwarder and the power state, as a vCPU thread has them; and the state report requests. */
export interface MainThreadMachine extends ThreadMachine {
  /** State report requests (state-report.ts). */
  readonly report: SharedArrayBuffer;
}

export class MainThreadVcpus {
  private readonly runs: NativeVcpuRuns;
  private started = false;
  private closed = false;
  private resolveStopped!: () => void;
  /** Settles once the VM has stopped and no vCPU is left in KVM_RUN (or at `close`). */
  readonly stopped = new Promise<void>((resolve) => (this.resolveStopped = resolve));

  private constructor(
    private readonly doorbell: SyscallDoorbell,
    private readonly handlers: readonly VcpuExitHandler[],
    private readonly power: PowerState,
  ) {
    this.runs = new NativeVcpuRuns(handlers, power, process.env["PARTIS_STATS"] === "1");
  }

  /** Create every vCPU on a native thread of its own, with its CPUID; none runs before `start`. */
  static create(partition: Partition, vcpus: readonly HostedVcpu[], machine: MainThreadMachine): MainThreadVcpus {
    const { doorbell, vps } = createNativeVcpus(partition, vcpus.map((v) => v.vcpuId));
    try {
      vps.forEach((vp, i) => vp.setCpuid(vcpus[i]!.cpuid));
    } catch (e) {
      releaseNativeVcpus(vps, doorbell);
      throw e;
    }
    const handlers = vps.map((vp, i) => new VcpuExitHandler(vcpus[i]!.vcpuId, vp, machine, machine.report));
    return new MainThreadVcpus(doorbell, handlers, machine.power);
  }

  /** How many vCPUs this serves. */
  get count(): number {
    return this.handlers.length;
  }

  /** The start gate: MSRs for all, the boot state for vCPU 0, then every vCPU into KVM_RUN. */
  start(start: VcpuStartMessage): void {
    for (const h of this.handlers) {
      h.vp.setMsrs(start.msrs.map((m) => ({ index: m.index, data: m.value })));
      if (start.boot !== null && h.vcpuId === 0) applyBootState(h.vp, start.boot);
    }
    this.started = true;
    this.runs.startAll();
    this.serve();
  }

  /** Kick every vCPU in KVM_RUN out of it. */
  interruptAll(): void {
    if (!this.closed) this.runs.interruptAll();
  }

  /** Each vCPU's exit counts (PARTIS_STATS=1), as the vCPU threads report theirs. */
  stats(): { vcpuId: number; exits: Record<string, number> }[] {
    return this.handlers.map((h, i) => ({ vcpuId: h.vcpuId, exits: h.stats(i === 0) }));
  }

  private readonly serve = (): void => {
    if (this.closed) return;
    const { doorbell, runs } = this;
    let served = 0;
    try {
      for (;;) {
        const sequence = doorbell.sequence;
        const now = runs.serveFinished();
        if (runs.running === 0 && !this.power.running) {
          this.resolveStopped();
          return;
        }
        served += now;
        if (served >= YIELD_EVERY) {
          setImmediate(this.serve);
          return;
        }
        if (now > 0) continue;
        if (doorbell.poll(sequence, DOORBELL_POLLS)) continue;
        doorbell.waitAsync(sequence, WAIT_MS, this.serve);
        return;
      }
    } catch (e) {
      // Stop the VM; the next turn kicks the vCPUs still in KVM_RUN and waits for them.
      this.power.record({ kind: "crash", reason: `vCPUs: ${e instanceof Error ? e.message : String(e)}` });
      setImmediate(this.serve);
    }
  };

  /**
   * Release the vCPUs and their threads: after `stopped` has settled, or
   * before `start` (a VM that never ran). A run still in flight is kicked
   * and waited for first.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // A wait on libuv's pool may still be on the doorbell: a futex wait keys on the address, not
    // the memory, so it ends at its timeout (or at once with EFAULT) and finds this closed.
    releaseNativeVcpus(this.handlers.map((h) => h.vp), this.doorbell);
    this.resolveStopped();
  }

  /** Whether `start` ran (a VM stopped before its gate opened never ran its vCPUs). */
  get hasStarted(): boolean {
    return this.started;
  }
}
