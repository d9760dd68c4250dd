/**
 * `partis run` runs its VM in its own process (like a worker the service
 * would start; see src/worker/running-vm.ts), and the slowest part of a VM's
 * start-up is its threads' (a V8 isolate plus modules, koffi included, per
 * vCPU thread: seconds in the nested test host). So the CLI starts them as
 * the very first thing it does, before it loads its own modules or parses its
 * options, from hints read off the raw command line (how many vCPUs, whether
 * devices are coming); the configuration the VM later gets is what counts
 * (thread-prestart.ts hands out what matches and ends the rest). A `partis
 * run` that ends without a VM (bad input, --help) ends them.
 *
 * Imports only Node built-ins and thread-prestart.ts (itself built-ins only),
 * besides a type.
 */
import { PrestartedThreads } from "../worker/thread-prestart.js";
import type { DeviceOptions } from "./device-options.js";

/**
 * Every device flag of `partis run` (each gives the VM a PCI device): a flag
 * added to DeviceOptions and not here fails to compile. Here, so that reading
 * it loads nothing (run-validation.ts decides from it whether to load the
 * device options' module).
 */
export const DEVICE_FLAGS: Record<keyof DeviceOptions, true> = { disk: true, cdrom: true, nic: true, channel: true, rng: true, vsock: true };

/** The same flags as written on the command line (the device thread is worth starting early). */
const DEVICE_OPTIONS = Object.keys(DEVICE_FLAGS).map((k) => `--${k}`);

/** Above this no VM can have that many vCPUs (the xAPIC ID is 8 bits: machine/cpuid.ts MAX_VCPUS): such a --cpus is bad input, not a hint. */
const MAX_HINTED_VCPUS = 255;

/** `--disk …,if=ide`, `--cdrom` and `--nic …,model=ne2k`: the exit-bound devices of vm-config.ts's EXIT_BOUND_DEVICE_KINDS, as flags. */
function exitBoundFlag(name: string, value: string | undefined): boolean {
  if (name === "--cdrom") return true;
  const options = (value ?? "").split(",").slice(1);
  return (name === "--disk" && options.includes("if=ide")) || (name === "--nic" && options.includes("model=ne2k"));
}

/**
 * Thread hints from `partis run`'s raw arguments: `--cpus N` (else 1) and any
 * device option. With `--vcpu-threads native` one thread runs every vCPU; with
 * `native-main` none does (the main thread serves them); with `auto` (the
 * default) that is decided as vcpuThreadsFor (src/worker/vm-config.ts) will:
 * a worker per vCPU when an exit-bound device is attached, else none.
 */
export function hintsFromArgs(args: readonly string[]): { vcpus: number; devices: boolean } {
  let vcpus = 1;
  let devices = false;
  let exitBound = false;
  let threads = "auto";
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--") break;
    const eq = a.indexOf("=");
    const name = eq > 0 ? a.slice(0, eq) : a;
    // The option's value, written either way (for a flag that takes none, whatever follows: unused).
    const value = eq > 0 ? a.slice(eq + 1) : args[i + 1];
    if (name === "--cpus") {
      const n = Number(value);
      if (Number.isSafeInteger(n) && n >= 1 && n <= MAX_HINTED_VCPUS) vcpus = n;
    } else if (name === "--vcpu-threads") threads = value ?? "auto";
    else if (DEVICE_OPTIONS.includes(name)) {
      devices = true;
      if (exitBoundFlag(name, value)) exitBound = true;
    }
  }
  if (threads === "auto") threads = exitBound ? "worker" : "native-main";
  return { vcpus: threads === "native" ? 1 : threads === "native-main" ? 0 : vcpus, devices };
}

let early: PrestartedThreads | undefined;

/** For `partis run` (not its --help): start the VM's threads now. */
export function startEarlyThreads(argv: readonly string[]): void {
  const args = argv.slice(2);
  if (args[0] !== "run" || args.includes("--help") || args.includes("-h")) return;
  const hints = hintsFromArgs(args.slice(1));
  early = PrestartedThreads.fromHints(hints.vcpus, hints.devices);
}

/** The threads started by startEarlyThreads, once; undefined after that or when none were started. */
export function takeEarlyThreads(): PrestartedThreads | undefined {
  const t = early;
  early = undefined;
  return t;
}

/** End the early threads if nobody took them (a `partis run` that ended without booting); resolves when they are gone. */
export function discardEarlyThreads(): Promise<void> {
  return takeEarlyThreads()?.dispose() ?? Promise.resolve();
}
