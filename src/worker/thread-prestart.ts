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

export class PrestartedThreads {
  private readonly vcpus: Worker[] = [];
  private devices: Worker | undefined;

  /** Start what the hints in `argv` ask for (nothing without hints). */
  static fromArgv(argv: readonly string[]): PrestartedThreads {
    const p = new PrestartedThreads();
    const i = argv.indexOf("--prestart-vcpus");
    const n = i >= 0 ? Number(argv[i + 1]) : 0;
    const count = Number.isSafeInteger(n) && n > 0 ? Math.min(n, MAX_PRESTART_VCPUS) : 0;
    for (let k = 0; k < count; k++) p.vcpus.push(vcpuThread(null));
    if (argv.includes("--prestart-devices")) p.devices = deviceThread(null);
    return p;
  }

  /** A prestarted vCPU thread, waiting for its VcpuThreadData message; undefined when none is left. */
  takeVcpu(): Worker | undefined {
    return this.vcpus.shift();
  }

  /** The prestarted device thread, waiting for its DeviceThreadData message. */
  takeDevices(): Worker | undefined {
    const d = this.devices;
    this.devices = undefined;
    return d;
  }

  /** End the threads nobody took. */
  dispose(): void {
    for (const t of this.vcpus.splice(0)) void t.terminate();
    void this.devices?.terminate();
    this.devices = undefined;
  }
}
