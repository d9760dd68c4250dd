/**
 * Starting partis-worker processes. `partis run` starts its worker as the
 * very first thing the CLI does, before it loads its own modules or parses
 * its options, so the worker's start-up (a Node process, its modules, its
 * vCPU threads) overlaps everything the CLI does; the worker waits for
 * "start" and is killed when the CLI ends without taking it (bad input:
 * nothing is left running). The worker gets hints from the raw command line
 * (how many vCPU threads to start early, whether devices are coming); the
 * configuration it later receives is what counts.
 *
 * Imports only Node built-ins: it runs before anything else is loaded.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { prestartArgs } from "../worker/thread-prestart.js";

/** Options of `partis run` that give the VM a PCI device (the device thread is worth starting early). */
const DEVICE_OPTIONS = ["--disk", "--cdrom", "--nic", "--channel", "--rng"];

function workerEntry(): string {
  return fileURLToPath(new URL("../worker/main.js", import.meta.url));
}

/** Worker hints from `partis run`'s raw arguments: `--cpus N` (else 1) and any device option. */
export function hintsFromArgs(args: readonly string[]): { vcpus: number; devices: boolean } {
  let vcpus = 1;
  let devices = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--") break;
    const eq = a.indexOf("=");
    const name = eq > 0 ? a.slice(0, eq) : a;
    if (name === "--cpus") {
      const n = Number(eq > 0 ? a.slice(eq + 1) : args[i + 1]);
      if (Number.isSafeInteger(n) && n >= 1) vcpus = n;
    } else if (DEVICE_OPTIONS.includes(name)) devices = true;
  }
  return { vcpus, devices };
}

/** A worker process with its console on stdin/stdout and the control channel on IPC. */
export function spawnWorker(hints: { vcpus: number; devices: boolean }): ChildProcess {
  const child = spawn(process.execPath, [workerEntry(), ...prestartArgs(hints.vcpus, hints.devices)], { stdio: ["pipe", "inherit", "inherit", "ipc"] });
  child.stdin!.on("error", () => {});
  return child;
}

let early: ChildProcess | undefined;

/** For `partis run` (not its --help): start the worker now. */
export function spawnEarlyWorker(argv: readonly string[]): void {
  const args = argv.slice(2);
  if (args[0] !== "run" || args.includes("--help") || args.includes("-h")) return;
  early = spawnWorker(hintsFromArgs(args.slice(1)));
  // Whatever ends the CLI before the worker is taken (bad input, --help, a crash) ends the worker too.
  process.on("exit", () => early?.kill("SIGKILL"));
}

/** The worker started by spawnEarlyWorker, once; undefined after that or when none was started. */
export function takeEarlyWorker(): ChildProcess | undefined {
  const w = early;
  early = undefined;
  return w;
}

/**
 * End the early worker if nobody took it, and wait until it is gone, so that
 * "nothing is left running" already holds when the CLI's exit status is seen.
 */
export async function discardEarlyWorker(): Promise<void> {
  const w = takeEarlyWorker();
  if (w === undefined || w.exitCode !== null || w.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => w.once("exit", () => resolve()));
  w.kill("SIGKILL");
  await Promise.race([gone, new Promise<void>((resolve) => setTimeout(resolve, 2000).unref())]);
}
