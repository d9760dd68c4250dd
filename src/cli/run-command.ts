/**
 * `partis run`: boot a VM in the foreground with its console on the terminal.
 *
 *   partis run [--kernel K] [--initrd I] [--append ...] [--memory 512M] [--cpus N] [--no-reboot]
 *
 * Without --kernel it boots the default guest (stock Debian kernel + busybox
 * initramfs, prepared on first use and cached). On a terminal the console is
 * raw and Ctrl-] quits; otherwise the console reads standard input, so
 * `printf 'nproc\npoweroff\n' | partis run --cpus 4` works in scripts.
 *
 * Exit status: 0 the guest powered off; 3 the guest rebooted under
 * --no-reboot; 4 the guest crashed (triple fault, emulation failure...);
 * 2 bad input (nothing started, nothing changed); 130 quit with Ctrl-] or
 * interrupted. SIGTERM is a host shutdown request: the guest sees its ACPI
 * power button pressed; a second SIGTERM pulls the plug.
 */
import type { ChildProcess } from "node:child_process";
import { spawnWorker, takeEarlyWorker } from "./worker-spawn.js";
import type { Command } from "commander";
import { bootTrace } from "../worker/boot-trace.js";
import { collect, type DeviceOptions } from "./device-options.js";
import { WORKER_EXIT, type ControlEvent, type ControlRequest, type VmConfig, type VmOutcome } from "../worker/vm-config.js";

export const RUN_EXIT = { poweroff: 0, failed: 1, usage: 2, reboot: 3, crash: 4, quit: 130 } as const;

/** Default command line for the default guest and for --kernel without --append. */
export const DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet";

export interface RunOptions extends DeviceOptions {
  framebuffer?: string | boolean;
  screenshot?: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  memory: string;
  cpus: string;
  reboot: boolean;
  name: string;
}

const CTRL_RIGHT_BRACKET = 0x1d;

interface WorkerResult {
  readonly status: number;
  readonly outcome: VmOutcome | undefined;
  readonly error: { code: string; message: string } | undefined;
}

/**
 * A partis-worker process. The first one is started before the CLI has even
 * parsed its options (worker-spawn.ts), so that its start-up overlaps the
 * CLI's own work; it does nothing until it receives "start", and `discard()`
 * ends it when validation fails (nothing is left running).
 */
class WorkerProcess {
  private readonly exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  constructor(readonly child: ChildProcess) {
    this.exit = new Promise((resolve) => this.child.once("exit", (code, signal) => resolve({ code, signal })));
  }

  async discard(): Promise<void> {
    this.child.kill("SIGKILL");
    await this.exit;
  }

  /** Boot the VM in this worker; resolves when the worker exits. */
  run(config: VmConfig, console: ConsoleBridge): Promise<WorkerResult> {
    let outcome: VmOutcome | undefined;
    let error: { code: string; message: string } | undefined;
    this.child.on("message", (m: ControlEvent) => {
      if (m.type === "exited") outcome = m.outcome;
      else if (m.type === "error") error = { code: m.code, message: m.message };
    });
    console.attach(this.child);
    bootTrace("cli", "config validated, start sent");
    if (this.child.connected) this.child.send({ type: "start", config } satisfies ControlRequest);
    return this.exit.then(({ code, signal }) => {
      console.detach();
      return { status: code ?? (signal ? 128 : 1), outcome, error };
    });
  }
}

/**
 * Connects the user's terminal (or standard input) to the current worker's
 * console, across reboots; handles Ctrl-] and host shutdown requests.
 */
class ConsoleBridge {
  private child: ChildProcess | undefined;
  private readonly raw: boolean;
  quitRequested = false;
  private shutdownRequests = 0;

  constructor() {
    this.raw = process.stdin.isTTY === true;
    if (this.raw) process.stdin.setRawMode(true);
    process.stdin.on("data", (d: Buffer) => this.input(d));
    process.stdin.on("end", () => {});
    process.on("SIGTERM", () => this.requestShutdown());
    process.on("SIGINT", () => this.quit());
    process.on("SIGHUP", () => this.quit());
  }

  attach(child: ChildProcess): void {
    this.child = child;
    if (this.shutdownRequests > 0) this.send({ type: "shutdown" });
  }

  detach(): void {
    this.child = undefined;
  }

  private send(m: ControlRequest): void {
    if (this.child?.connected) this.child.send(m);
  }

  private input(d: Buffer): void {
    if (this.raw) {
      const i = d.indexOf(CTRL_RIGHT_BRACKET);
      if (i >= 0) {
        if (i > 0) this.child?.stdin?.write(d.subarray(0, i));
        this.quit();
        return;
      }
    }
    this.child?.stdin?.write(d);
  }

  /** Host shutdown request: the ACPI power button; a second request pulls the plug. */
  requestShutdown(): void {
    this.shutdownRequests++;
    this.send(this.shutdownRequests === 1 ? { type: "shutdown" } : { type: "stop" });
  }

  quit(): void {
    this.quitRequested = true;
    this.send({ type: "stop" });
  }

  close(): void {
    if (this.raw) process.stdin.setRawMode(false);
    process.stdin.pause();
    process.stdin.destroy();
  }
}

export async function runVm(opts: RunOptions): Promise<number> {
  bootTrace("cli", "run: modules loaded");
  const hints = { vcpus: Number(opts.cpus) || 1, devices: [opts.disk, opts.cdrom, opts.nic, opts.channel].some((l) => (l?.length ?? 0) > 0) || opts.rng === true };
  const firstWorker = new WorkerProcess(takeEarlyWorker() ?? spawnWorker(hints));
  let config: VmConfig;
  try {
    const validation = await import("./run-validation.js");
    const host = validation.probeRunHost();
    const guest = opts.kernel === undefined ? await validation.defaultGuest(host) : undefined;
    config = validation.resolveRunConfig(opts, guest, host);
  } catch (e) {
    await firstWorker.discard();
    throw e;
  }
  const bridge = new ConsoleBridge();
  let worker: WorkerProcess | undefined = firstWorker;
  try {
    for (;;) {
      const r = await (worker ?? new WorkerProcess(spawnWorker({ vcpus: config.cpus, devices: (config.devices?.length ?? 0) > 0 }))).run(config, bridge);
      worker = undefined;
      if (bridge.quitRequested) {
        process.stderr.write("\r\npartis run: console closed; VM stopped\r\n");
        return RUN_EXIT.quit;
      }
      if (r.error !== undefined) {
        process.stderr.write(`partis run: ${r.error.message}\n`);
        return r.status === WORKER_EXIT.badConfig ? RUN_EXIT.usage : RUN_EXIT.failed;
      }
      // The reported outcome decides; the worker's exit status is the fallback.
      const kind = r.outcome?.kind ?? (r.status === WORKER_EXIT.poweroff ? "poweroff" : r.status === WORKER_EXIT.reset ? "reset" : r.status === WORKER_EXIT.crash ? "crash" : undefined);
      if (kind === "poweroff") return RUN_EXIT.poweroff;
      if (kind === "reset") {
        if (!opts.reboot) {
          process.stderr.write(`\r\npartis run: guest rebooted (${r.outcome?.kind === "reset" ? r.outcome.source : "reset"}); --no-reboot given, stopping\r\n`);
          return RUN_EXIT.reboot;
        }
        continue;
      }
      if (r.outcome?.kind === "failed") {
        process.stderr.write(`\r\npartis run: ${r.outcome.reason}\r\n`);
        return RUN_EXIT.failed;
      }
      if (kind === "crash") {
        const reason = r.outcome?.kind === "crash" ? r.outcome.reason : "unknown reason";
        process.stderr.write(`\r\npartis run: guest crashed: ${reason}\r\n`);
        return RUN_EXIT.crash;
      }
      process.stderr.write(`\r\npartis run: worker ended unexpectedly (status ${r.status})\r\n`);
      return RUN_EXIT.failed;
    }
  } finally {
    bridge.close();
  }
}

export function registerRunCommand(program: Command): void {
  program
    .command("run")
    .description("boot a VM in the foreground with its console on this terminal (Ctrl-] quits)")
    .option("--kernel <path>", "Linux kernel (bzImage); default: the prepared default guest")
    .option("--initrd <path>", "initial ramdisk")
    .option("--append <cmdline>", `kernel command line (default: "${DEFAULT_APPEND}")`)
    .option("--memory <size>", "guest memory, e.g. 512M, 4G (a bare number is MiB)", "512M")
    .option("--cpus <n>", "virtual processors", "1")
    .option("--no-reboot", "exit (status 3) when the guest reboots instead of restarting it")
    .option("--name <name>", "VM name for messages", "partis-vm")
    .option("--disk <path[,if=virtio|ide][,ro]>", "attach a disk image (raw, VHD, VHDX) or host block device; repeatable", collect)
    .option("--cdrom <iso>", "attach an ISO image as an IDE/ATAPI CD-ROM; repeatable", collect)
    .option("--nic <tap:IF|dgram:LOCAL:PEER|none[,model=virtio|ne2k][,mac=M]>", "attach a network adapter; repeatable", collect)
    .option("--channel <socket>", "a host<->guest byte channel (virtio-console) on a UNIX socket; repeatable", collect)
    .option("--rng", "attach a virtio entropy source")
    .option("--framebuffer [WxH]", "a linear framebuffer the guest console can draw on (default 1024x768)")
    .option("--screenshot <file.ppm>", "write the framebuffer as a PPM image when the VM stops (implies --framebuffer)")
    .action(async (opts: RunOptions) => {
      process.exitCode = await runVm(opts);
    });
}
