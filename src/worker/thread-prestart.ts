/**
 * Threads started before the VM's configuration arrives. A thread's start-up
 * (a V8 isolate, then its modules, koffi included) is the slowest part of
 * starting a VM where process and module start-up is expensive (seconds in
 * the nested test host), so the worker starts its vCPU threads, and the
 * device thread when devices are expected, the moment its process starts,
 * from hints on its command line (`--prestart-vcpus N`, `--prestart-devices`).
 * A prestarted thread loads its modules and then waits for its data as the
 * first message on its port; RunningVm hands it over instead of constructing
 * a thread. Hints only ever save time: a thread the VM does not need is
 * terminated, a missing one is started then.
 *
 * This module imports only Node built-ins, so it runs before the worker loads
 * anything else.
 */
import { Worker, type ResourceLimits } from "node:worker_threads";

export const VCPU_THREAD_URL = new URL("./vcpu-thread.js", import.meta.url);
export const DEVICE_THREAD_URL = new URL("./device-thread.js", import.meta.url);
/** A vCPU thread allocates next to nothing after start-up: a small heap keeps its isolate small. */
export const VCPU_THREAD_LIMITS: ResourceLimits = { maxYoungGenerationSizeMb: 1, maxOldGenerationSizeMb: 24 };
/** At most this many vCPU threads are started on a hint (the rest start once the configuration says so). */
export const MAX_PRESTART_VCPUS = 64;

/** The worker's command-line hints for a VM with `vcpus` vCPUs and (maybe) devices. */
export function prestartArgs(vcpus: number, devices: boolean): string[] {
  const n = Number.isSafeInteger(vcpus) && vcpus >= 1 ? Math.min(vcpus, MAX_PRESTART_VCPUS) : 1;
  return ["--prestart-vcpus", String(n), ...(devices ? ["--prestart-devices"] : [])];
}

export function vcpuThread(workerData: unknown): Worker {
  return new Worker(VCPU_THREAD_URL, { workerData, stdout: false, stderr: false, resourceLimits: VCPU_THREAD_LIMITS });
}

export function deviceThread(workerData: unknown): Worker {
  return new Worker(DEVICE_THREAD_URL, { workerData, stdout: false, stderr: false });
}

/** A prestarted thread; `failed` once it reported an error (it is then never handed out). */
interface Prestarted {
  readonly worker: Worker;
  failed: boolean;
}

function prestart(worker: Worker): Prestarted {
  const p: Prestarted = { worker, failed: false };
  // Until it is handed out, nobody else listens: an error here must not take the process down.
  worker.once("error", () => (p.failed = true));
  worker.once("exit", () => (p.failed = true));
  return p;
}

export class PrestartedThreads {
  private readonly vcpus: Prestarted[] = [];
  private devices: Prestarted | undefined;

  /** Start what the hints in `argv` ask for (nothing without hints). */
  static fromArgv(argv: readonly string[]): PrestartedThreads {
    const p = new PrestartedThreads();
    const i = argv.indexOf("--prestart-vcpus");
    const n = i >= 0 ? Number(argv[i + 1]) : 0;
    const count = Number.isSafeInteger(n) && n > 0 ? Math.min(n, MAX_PRESTART_VCPUS) : 0;
    for (let k = 0; k < count; k++) p.vcpus.push(prestart(vcpuThread(null)));
    if (argv.includes("--prestart-devices")) p.devices = prestart(deviceThread(null));
    return p;
  }

  /** A prestarted vCPU thread, waiting for its VcpuThreadData message; undefined when none (healthy) is left. */
  takeVcpu(): Worker | undefined {
    for (let p = this.vcpus.shift(); p !== undefined; p = this.vcpus.shift()) {
      if (!p.failed) return p.worker;
      void p.worker.terminate();
    }
    return undefined;
  }

  /** The prestarted device thread, waiting for its DeviceThreadData message (undefined if none, or it failed). */
  takeDevices(): Worker | undefined {
    const d = this.devices;
    this.devices = undefined;
    if (d === undefined) return undefined;
    if (!d.failed) return d.worker;
    void d.worker.terminate();
    return undefined;
  }

  /** End the threads nobody took. */
  dispose(): void {
    for (const p of this.vcpus.splice(0)) void p.worker.terminate();
    void this.devices?.worker.terminate();
    this.devices = undefined;
  }
}
