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
 * ended, a missing one is started then.
 *
 * Ending a thread that is still loading its modules must wait: terminating it
 * while koffi's native module initialises aborts the whole process (a fatal
 * N-API error). So a thread says when its modules are loaded (a shared word
 * its prestart marker carries, not a message: whoever listens to the thread
 * once it is handed out never sees it); until then it is asked to end itself
 * (a `null` first message) rather than terminated, and
 * `dispose()` resolves once every such thread is gone: a process awaits it
 * before `process.exit`.
 *
 * `partis run`, which runs its VM in its own process, starts them the same
 * way from its raw command line (src/cli/early-threads.ts).
 *
 * This module imports only Node built-ins, so it runs before the worker loads
 * anything else.
 */
import { Worker, type MessagePort, type ResourceLimits } from "node:worker_threads";

export const VCPU_THREAD_URL = new URL("./vcpu-thread.js", import.meta.url);
export const DEVICE_THREAD_URL = new URL("./device-thread.js", import.meta.url);
/**
 * A thread's stack: 1.5 MiB (Node's default for a worker is 4), deep enough
 * for ~30,000 plain JavaScript frames, and too small to hold a 2 MiB-aligned
 * range, so a host whose transparent huge pages are "always" (Debian's and
 * RHEL's kernels) can never back it with one 2 MiB page for the few KiB in
 * use (docs/architecture.md, "Transparent huge pages and the VM's own memory").
 */
const THREAD_STACK_MB = 1.5;
/** A vCPU thread allocates next to nothing after start-up: a small heap keeps its isolate small. */
export const VCPU_THREAD_LIMITS: ResourceLimits = { maxYoungGenerationSizeMb: 1, maxOldGenerationSizeMb: 24, stackSizeMb: THREAD_STACK_MB };
/** The device thread's heap grows with its devices and back ends: V8's own heap sizing, the small stack. */
export const DEVICE_THREAD_LIMITS: ResourceLimits = { stackSizeMb: THREAD_STACK_MB };
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
  return new Worker(DEVICE_THREAD_URL, { workerData, stdout: false, stderr: false, resourceLimits: DEVICE_THREAD_LIMITS });
}

/** The workerData of a prestarted thread: word 0 of `loaded` turns 1 once its modules are loaded. */
interface PrestartMarker {
  readonly prestartLoaded: SharedArrayBuffer;
}

function isPrestartMarker(data: unknown): data is PrestartMarker {
  return typeof data === "object" && data !== null && (data as Partial<PrestartMarker>).prestartLoaded instanceof SharedArrayBuffer;
}

/**
 * A thread's data: its workerData when it was started with it; in a
 * prestarted thread, say the modules are loaded and wait for the data as the
 * first message. `null` means the thread is not needed (the caller ends itself).
 */
export async function awaitThreadData<T>(workerData: unknown, port: MessagePort | null): Promise<T | null> {
  if (!isPrestartMarker(workerData)) return workerData as T;
  Atomics.store(new Int32Array(workerData.prestartLoaded), 0, 1);
  if (port === null) return null;
  return (await new Promise((resolve) => port.once("message", resolve))) as T | null;
}

/** A prestarted thread; `failed` once it reported an error or ended (it is then never handed out). */
interface Prestarted {
  readonly worker: Worker;
  failed: boolean;
  /** Word 0: 1 once the thread's modules are loaded. */
  readonly loaded: Int32Array;
  readonly gone: Promise<void>;
}

function prestart(start: (marker: PrestartMarker) => Worker): Prestarted {
  const loaded = new Int32Array(new SharedArrayBuffer(4));
  const worker = start({ prestartLoaded: loaded.buffer as SharedArrayBuffer });
  let p!: Prestarted;
  const gone = new Promise<void>((resolve) =>
    worker.once("exit", () => {
      p.failed = true;
      resolve();
    }),
  );
  p = { worker, failed: false, loaded, gone };
  // Until it is handed out, nobody else listens: an error here must not take the process down.
  worker.once("error", () => (p.failed = true));
  return p;
}

/** End a thread nobody took: at once when it is idle (or dead), else by asking it to end after its start-up. */
function end(p: Prestarted): Promise<void> {
  if (Atomics.load(p.loaded, 0) === 1 || p.failed) void p.worker.terminate();
  else p.worker.postMessage(null);
  return p.gone;
}

export class PrestartedThreads {
  private readonly vcpus: Prestarted[] = [];
  private devices: Prestarted | undefined;
  /** Threads being ended (dispose, failed ones skipped by take*). */
  private readonly ending: Promise<void>[] = [];

  /** Start what the hints in `argv` ask for (nothing without hints). */
  static fromArgv(argv: readonly string[]): PrestartedThreads {
    const i = argv.indexOf("--prestart-vcpus");
    return PrestartedThreads.fromHints(i >= 0 ? Number(argv[i + 1]) : 0, argv.includes("--prestart-devices"));
  }

  /** Start `vcpus` vCPU threads (bounded; nonsense counts start none) and, if asked, the device thread. */
  static fromHints(vcpus: number, devices: boolean): PrestartedThreads {
    const p = new PrestartedThreads();
    const count = Number.isSafeInteger(vcpus) && vcpus > 0 ? Math.min(vcpus, MAX_PRESTART_VCPUS) : 0;
    for (let k = 0; k < count; k++) p.vcpus.push(prestart(vcpuThread));
    if (devices) p.devices = prestart(deviceThread);
    return p;
  }

  /** A prestarted vCPU thread, waiting for its VcpuThreadData message; undefined when none (healthy) is left. */
  takeVcpu(): Worker | undefined {
    for (let p = this.vcpus.shift(); p !== undefined; p = this.vcpus.shift()) {
      if (!p.failed) return p.worker;
      this.ending.push(end(p));
    }
    return undefined;
  }

  /** The prestarted device thread, waiting for its DeviceThreadData message (undefined if none, or it failed). */
  takeDevices(): Worker | undefined {
    const d = this.devices;
    this.devices = undefined;
    if (d === undefined) return undefined;
    if (!d.failed) return d.worker;
    this.ending.push(end(d));
    return undefined;
  }

  /**
   * End the threads nobody took. Resolves when every thread this object ever
   * ended is gone: await it before `process.exit` (see the module comment).
   */
  dispose(): Promise<void> {
    for (const p of this.vcpus.splice(0)) this.ending.push(end(p));
    if (this.devices !== undefined) this.ending.push(end(this.devices));
    this.devices = undefined;
    return Promise.all(this.ending).then(() => {});
  }
}
