/**
 * `partis run`: boot a VM in the foreground with its console on the terminal.
 *
 *   partis run [--kernel K] [--initrd I] [--append ...] [--memory 512M] [--hugepages [2M|1G]] [--cpus N]
 *              [--vcpu-threads auto|worker|native|native-main] [--no-reboot]
 *
 * Without --kernel it boots the default guest (stock Debian kernel + busybox
 * initramfs, prepared on first use and cached). On a terminal the console is
 * raw and Ctrl-] quits; otherwise the console reads standard input, so
 * `printf 'nproc\npoweroff\n' | partis run --cpus 4` works in scripts.
 *
 * Exit status: 0 the guest powered off; 3 the guest rebooted under
 * --no-reboot; 4 the guest crashed (triple fault, emulation failure...);
 * 2 bad input (nothing started, nothing changed); 1 the VM could not start
 * (a back end failed, or a reboot could not start again); 130 quit with Ctrl-] or
 * interrupted. SIGTERM is a host shutdown request: the guest sees its ACPI
 * power button pressed; a second SIGTERM pulls the plug. SIGQUIT writes a
 * state report (every vCPU's registers and LAPIC, every device's queues) to
 * standard error and leaves the VM running.
 *
 * The VM runs in this process (its vCPU and device threads are this process's
 * threads, started before the CLI loads its modules: early-threads.ts), as a
 * worker process runs one for the service: one process per VM either way,
 * without a second Node start-up on the boot path.
 */
import type { Command } from "commander";
import { PartisError } from "../errors.js";
import { bootTrace } from "../worker/boot-trace.js";
import type { RunningVm } from "../worker/running-vm.js";
import type { PrestartedThreads } from "../worker/thread-prestart.js";
import type { DeviceOptions } from "./device-options.js";
import { takeEarlyThreads } from "./early-threads.js";
import type { VmConfig, VmOutcome } from "../worker/vm-config.js";

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
  /** `--hugepages [size]`: true (the flag alone: 2M) or the size given. */
  hugepages?: string | boolean;
  cpus: string;
  /** `--vcpu-threads auto|worker|native|native-main` (VmConfig.vcpuThreads; auto leaves it to vcpuThreadsFor). */
  vcpuThreads: string;
  reboot: boolean;
  name: string;
  kernelUnpack: string;
}

const CTRL_RIGHT_BRACKET = 0x1d;
/** Console input kept while no VM is attached (a pasted script is far below this). */
const MAX_HELD_INPUT = 1 << 20;

/** What the console and host requests act on: the running VM. */
type VmControl = Pick<RunningVm, "consoleInput" | "pressPowerButton" | "stop" | "reportState">;

/**
 * Connects the user's terminal (or standard input) to the running VM's
 * console, across reboots; handles Ctrl-] and host shutdown requests.
 */
class ConsoleBridge {
  private vm: VmControl | undefined;
  /** Input that came while no VM was attached (before the first boot, during a reboot): given to the next one. */
  private held: Buffer[] = [];
  private heldBytes = 0;
  private readonly raw: boolean;
  quitRequested = false;
  private shutdownRequests = 0;

  constructor() {
    this.raw = process.stdin.isTTY === true;
    if (this.raw) process.stdin.setRawMode(true);
    process.stdin.on("data", (d: Buffer) => this.input(d));
    process.stdin.on("end", () => {});
    process.stdin.on("error", () => {});
    process.on("SIGTERM", () => this.requestShutdown());
    process.on("SIGINT", () => this.quit());
    process.on("SIGHUP", () => this.quit());
    // `kill -QUIT <pid>`: what every vCPU and device is doing, on standard error (state-report.ts); the VM runs on.
    process.on("SIGQUIT", () => {
      if (this.vm !== undefined) this.vm.reportState();
      else process.stderr.write("partis-vm: report: no VM running (starting or rebooting)\n");
    });
  }

  attach(vm: VmControl): void {
    this.vm = vm;
    if (this.quitRequested) vm.stop("console closed");
    else if (this.shutdownRequests > 0) vm.pressPowerButton();
    for (const d of this.held.splice(0)) vm.consoleInput(d);
    this.heldBytes = 0;
  }

  detach(): void {
    this.vm = undefined;
  }

  private input(d: Buffer): void {
    if (this.raw) {
      const i = d.indexOf(CTRL_RIGHT_BRACKET);
      if (i >= 0) {
        if (i > 0) this.deliver(d.subarray(0, i));
        this.quit();
        return;
      }
    }
    this.deliver(d);
  }

  /** To the VM, or held for the next one (`printf 'cmd\n' | partis run` types before the VM exists); at most MAX_HELD_INPUT bytes are held. */
  private deliver(d: Buffer): void {
    // stdin is paused while the guest is behind (it reads slower than input comes, or not at all).
    if (this.vm !== undefined) this.vm.consoleInput(d, process.stdin);
    else if (this.heldBytes + d.length <= MAX_HELD_INPUT) {
      this.held.push(Buffer.from(d));
      this.heldBytes += d.length;
    }
  }

  /** Host shutdown request: the ACPI power button; a second request pulls the plug. */
  requestShutdown(): void {
    this.shutdownRequests++;
    if (this.shutdownRequests === 1) this.vm?.pressPowerButton();
    else this.vm?.stop("host-stop");
  }

  quit(): void {
    this.quitRequested = true;
    this.vm?.stop("console closed");
  }

  close(): void {
    if (this.raw) process.stdin.setRawMode(false);
    process.stdin.pause();
    process.stdin.destroy();
  }
}

/** commander collector for repeatable flags. */
function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** One boot: the VM's outcome, or why it could not start (`usage`: its configuration was refused). */
type BootResult = { readonly outcome: VmOutcome } | { readonly error: string; readonly usage: boolean };

/**
 * Boot the VM in this process (`partis run` is its VM's process, as a worker
 * is for the service) and wait until it ends. A vCPU thread that cannot be
 * stopped leaves no clean way out: the process then ends at once (libc
 * _exit), since Node would wait for that thread forever.
 */
async function bootOnce(config: VmConfig, bridge: ConsoleBridge, prestarted: PrestartedThreads | undefined): Promise<BootResult> {
  const { RunningVm: Vm } = await import("../worker/running-vm.js");
  let vm: RunningVm;
  try {
    bootTrace("cli", "config validated, VM starting");
    vm = Vm.start(config, { consoleFd: 1, ...(prestarted !== undefined ? { prestarted } : {}) });
    bootTrace("cli", "partition built, guest loaded");
  } catch (e) {
    return { error: e instanceof Error ? e.message : String(e), usage: e instanceof PartisError };
  }
  bridge.attach(vm);
  const outcome = await vm.outcome;
  bridge.detach();
  try {
    await vm.teardown();
  } catch (e) {
    process.stderr.write(`\r\npartis run: ${e instanceof Error ? e.message : String(e)}\r\n`);
    (await import("../hypervisor/libc.js")).exitNow(RUN_EXIT.failed);
  }
  return { outcome };
}

export async function runVm(opts: RunOptions): Promise<number> {
  bootTrace("cli", "run: modules loaded");
  const early = takeEarlyThreads();
  let prestarted = early;
  let config: VmConfig;
  try {
    const validation = await import("./run-validation.js");
    bootTrace("cli", "validation modules loaded");
    const host = validation.probeRunHost();
    const guest = opts.kernel === undefined ? await validation.defaultGuest(host) : undefined;
    const resolved = await validation.resolveRunConfig(opts, guest, host);
    bootTrace("cli", "input checked");
    config = await validation.withUnpackedKernel(resolved, opts);
  } catch (e) {
    await early?.dispose();
    throw e;
  }
  const bridge = new ConsoleBridge();
  try {
    for (let boot = 0; ; boot++) {
      const r = await bootOnce(config, bridge, prestarted);
      prestarted = undefined; // a reboot starts its threads afresh
      if (bridge.quitRequested) {
        process.stderr.write("\r\npartis run: console closed; VM stopped\r\n");
        return RUN_EXIT.quit;
      }
      if ("error" in r) {
        // A refused configuration is bad input (2) only on the first boot; a reboot that cannot
        // start (its huge pages taken meanwhile, a disk gone) is a failure of a VM that ran.
        if (boot > 0) {
          process.stderr.write(`\r\npartis run: the guest rebooted but could not start again: ${r.error}\r\n`);
          return RUN_EXIT.failed;
        }
        process.stderr.write(`partis run: ${r.error}\n`);
        return r.usage ? RUN_EXIT.usage : RUN_EXIT.failed;
      }
      const outcome = r.outcome;
      switch (outcome.kind) {
        case "poweroff":
          return RUN_EXIT.poweroff;
        case "reset":
          if (!opts.reboot) {
            process.stderr.write(`\r\npartis run: guest rebooted (${outcome.source}); --no-reboot given, stopping\r\n`);
            return RUN_EXIT.reboot;
          }
          continue;
        case "failed":
          process.stderr.write(`\r\npartis run: ${outcome.reason}\r\n`);
          return RUN_EXIT.failed;
        case "crash":
          process.stderr.write(`\r\npartis run: guest crashed: ${outcome.reason}\r\n`);
          return RUN_EXIT.crash;
      }
    }
  } finally {
    bridge.close();
    await early?.dispose(); // spares still starting up end first (see thread-prestart.ts)
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
    .option(
      "--hugepages [size]",
      "back guest RAM with the host's reserved huge pages of this size (2M or 1G; default 2M), all reserved at start; pools: /sys/kernel/mm/hugepages (partis host check lists them)",
    )
    .option("--cpus <n>", "virtual processors", "1")
    .option(
      "--vcpu-threads <auto|worker|native|native-main>",
      "worker: each vCPU on a Node worker thread (~10 MiB each; the fastest exits); native: each vCPU on a native thread (~44 KiB each) whose exits one worker handles for all; native-main: native threads whose exits the VM's main thread handles (no worker thread: the least memory); auto: worker when an IDE drive or NE2000 NIC is attached (an exit per register access), else native-main",
      "auto",
    )
    .option(
      "--kernel-unpack <auto|host|guest>",
      "host: decompress the bzImage once on the host (cached) and start the kernel proper: a faster boot, without kernel-image KASLR; guest: the kernel decompresses itself (KASLR); auto: host when this kernel can be unpacked",
      "auto",
    )
    .option("--no-reboot", "exit (status 3) when the guest reboots instead of restarting it")
    .option("--name <name>", "VM name for messages", "partis-vm")
    .option(
      "--disk <path[,if=virtio|ide][,ro][,packed][,cache=MODE][,serial=S][,iops=N][,mbps=N]...>",
      "attach a disk image (raw, VHD, VHDX) or host block device (packed: also offer packed virtqueues; cache: writeback (default), none (O_DIRECT), writethrough, directsync or unsafe; serial: the serial number the guest reads, up to 20 characters; iops, iops_rd, iops_wr, mbps, mbps_rd, mbps_wr: most operations or MiB per second, virtio and IDE disks); repeatable",
      collect,
    )
    .option("--cdrom <iso>", "attach an ISO image as an IDE/ATAPI CD-ROM; repeatable", collect)
    .option(
      "--nic <tap:IF|dgram:LOCAL:PEER|none[,model=virtio|ne2k][,mac=M][,packed][,offload=on|off][,queues=N][,mtu=N][,rate=MiBps]>",
      "attach a network adapter (packed: also offer packed virtqueues; offload: checksum/TSO offloads of a virtio NIC on a TAP, on by default; queues: queue pairs of a virtio NIC on a multi-queue TAP; mtu: the MTU a virtio NIC reports; rate: most MiB per second a virtio NIC moves each way); repeatable",
      collect,
    )
    .option("--channel <socket[,name=NAME]>", "a host<->guest byte channel on a UNIX socket: unnamed, a virtio console (hvcN); named, a port of the virtio-serial device (/dev/virtio-ports/NAME); repeatable", collect)
    .option("--rng", "attach a virtio entropy source")
    .option("--vsock <socket[,cid=N]>", "AF_VSOCK stream sockets (virtio-vsock, guest CID N, default 3): the guest's connections to port P go to the UNIX socket SOCKET_P; host programs connect to SOCKET and write \"CONNECT P\\n\"", collect)
    .option("--framebuffer [WxH]", "a linear framebuffer the guest console can draw on (default 1024x768)")
    .option("--screenshot <file.ppm>", "write the framebuffer as a PPM image when the VM stops (implies --framebuffer)")
    .action(async (opts: RunOptions) => {
      process.exitCode = await runVm(opts);
    });
}
