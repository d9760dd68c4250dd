/**
 * A VM running inside a worker process: the partition (KVM VM with in-kernel
 * irqchip and PIT), guest RAM loaded with the kernel, initrd, boot tables and
 * ACPI tables, the board, and the virtual processors' threads (one per vCPU,
 * or with `vcpuThreads: "native"` one for all: vcpu-thread.ts; with
 * "native-main" none, this thread handling their exits: main-thread-vcpus.ts).
 *
 * The worker's main thread owns lifecycle: it feeds console input into COM1,
 * presses the ACPI power button on a host shutdown request, and waits for the
 * shared power state to record how the VM ended.
 */
import { readdirSync, readFileSync } from "node:fs";
import type { Worker } from "node:worker_threads";
import { KvmSystem } from "../hypervisor/system.js";
import { KVM_CAP } from "../hypervisor/kvm-abi.js";
import { Partition } from "../hypervisor/partition.js";
import { VcpuKicker, installKickHandler } from "../hypervisor/virtual-processor.js";
import { planMemory, type MemoryPlan } from "../machine/memory-map.js";
import { loadLinux } from "../machine/linux-boot.js";
import { openUnpackedKernel, readKernelHead } from "../images/kernel-file.js";
import { longModeBootState, writeBootTables } from "../machine/boot-cpu.js";
import { cpuidForVcpu } from "../machine/cpuid.js";
import { buildAcpiTables } from "../machine/acpi/build.js";
import { SharedStateArena, type MachineLock } from "../machine/shared-state.js";
import { systemClock } from "../devices/dependencies.js";
import { Board } from "./board.js";
import { PowerState } from "./power-state.js";
import { ConsoleOutputFlusher, ConsoleOutputRing, FINAL_FLUSH_MS } from "./console-output.js";
import type { HostedVcpu, VcpuStartMessage, VcpuThreadData, VcpuThreadMessage } from "./vcpu-thread.js";
import { kvmDevicePath, vcpuThreadsFor, type VmConfig, type VmOutcome } from "./vm-config.js";
import { PartisError } from "../errors.js";
import { bootTrace } from "./boot-trace.js";
import { DeviceMailbox } from "./device-mailbox.js";
import { LinearFramebuffer } from "../devices/display/linear-framebuffer.js";
import { encodeScreenInfo } from "../devices/display/screen-info.js";
import { writeFileSync } from "node:fs";
import { planPci } from "./device-plan.js";
import { IDE_COMPAT_PORTS, PCI_IO_WINDOW } from "./device-forwarding.js";
import type { DeviceThreadData, DeviceThreadMessage } from "./device-thread.js";
import { deviceThread, vcpuThread, type PrestartedThreads } from "./thread-prestart.js";
import { StateReportRequest, describeIsolateMemory, describeProcessMemory, writeReport } from "./state-report.js";
import { releaseProgramPages } from "../hypervisor/program-pages.js";
import { MainThreadVcpus } from "./main-thread-vcpus.js";
import { DeviceForwarder } from "./device-forwarding.js";

/** Console input queued for the guest beyond which its source is paused (RunningVm.consoleInput). */
export const MAX_PENDING_INPUT = 64 * 1024;

/** Where console input comes from (process.stdin): paused while the guest is behind. */
export interface ConsoleInputSource {
  pause(): unknown;
  resume(): unknown;
  readonly destroyed?: boolean;
}

/** Identity-map and TSS pages for Intel hosts: top of the 32-bit space, below the BIOS. */
const IDENTITY_MAP_ADDR = 0xfffb_c000;
const TSS_ADDR = 0xfffb_d000;

export class VmStartError extends PartisError {}

export interface RunningVmOptions {
  /** Where console output goes (a file descriptor). */
  readonly consoleFd: number;
  /** Threads the worker started before the configuration came (thread-prestart.ts); what is not used is ended. */
  readonly prestarted?: PrestartedThreads;
}

export class RunningVm {
  private readonly threads: Worker[] = [];
  private readonly kickers: VcpuKicker[] = [];
  /**
   * Kickers whose thread has ended (its 'exit' came). Node joins a worker's thread
   * before emitting 'exit', and a joined thread's pthread_t may already name
   * another thread: such a vCPU is never signalled again.
   */
  private readonly endedKickers = new Set<VcpuKicker>();
  /** The board lock, taken when this thread touches devices (console input, power button). */
  private readonly lock: MachineLock;
  private readonly startGate = new Int32Array(new SharedArrayBuffer(4));
  private vcpusReady = 0;
  private deviceThread: Worker | undefined;
  /** "native-main": the vCPUs this thread serves. */
  private mainVcpus: MainThreadVcpus | undefined;
  private mainVcpusStart: VcpuStartMessage | undefined;
  private devicesReady = true;
  private mailbox: DeviceMailbox | undefined;
  private readonly deviceStop = new Int32Array(new SharedArrayBuffer(4));
  private readonly report = StateReportRequest.create();
  private framebuffer: LinearFramebuffer | undefined;
  private readonly pendingInput: Uint8Array[] = [];
  private pendingInputBytes = 0;
  private inputTimer: NodeJS.Timeout | undefined;
  /** Sources paused until the console input queue empties (or the VM stops). */
  private pausedSources: ConsoleInputSource[] = [];
  readonly outcome: Promise<VmOutcome>;
  /** COM1's output: vCPU threads append, this thread writes it to the console fd. */
  private readonly consoleOutput: ConsoleOutputFlusher;

  private constructor(
    readonly config: VmConfig,
    readonly plan: MemoryPlan,
    private readonly system: KvmSystem,
    private readonly partition: Partition,
    private readonly board: Board,
    private readonly power: PowerState,
    consoleRing: ConsoleOutputRing,
    consoleFd: number,
  ) {
    this.lock = board.arena.lock();
    this.consoleOutput = new ConsoleOutputFlusher(consoleRing, consoleFd, {
      // A THRE interrupt still owed for bytes COM1 sent (uart16550.ts): raise it, for a driver
      // that waits for it without looking at the UART again. Linux's never needs this.
      afterLook: () => {
        if (board.com1.transmitUnsettled) this.lock.with(() => board.com1.settleTransmit());
      },
    });
    this.consoleOutput.start();
    this.outcome = this.watchPower();
  }

  /**
   * Create the partition and start the vCPU threads first (a thread's start-up,
   * a V8 isolate plus its modules, is the slow part), then load the guest while
   * they come up; the start gate opens once every vCPU is ready and the boot
   * state has been handed over.
   */
  static start(config: VmConfig, options: RunningVmOptions): RunningVm {
    // Before any vCPU thread exists: a kick that reaches one then never ends the process (SIGUSR2's default).
    installKickHandler();
    const system = KvmSystem.open(kvmDevicePath());
    if (config.cpus > system.maxVcpus)
      throw new VmStartError("TOO_MANY_VCPUS", `${config.cpus} vCPUs requested; KVM allows at most ${system.maxVcpus}`, { vm: config.name });
    const plan = planMemory(config.memoryBytes);
    const partition = Partition.create(system, {
      ranges: plan.ram,
      ...(config.hugePageBytes !== undefined ? { hugePageBytes: config.hugePageBytes } : {}),
    });
    let vm: RunningVm | undefined;
    try {
      partition.setTssAddr(TSS_ADDR);
      partition.setIdentityMapAddr(IDENTITY_MAP_ADDR);
      partition.createIrqchip();
      partition.createPit2();

      const arena = SharedStateArena.create();
      const power = PowerState.create();
      const consoleRing = ConsoleOutputRing.create();
      const board = new Board(
        arena,
        {
          irq: (gsi) => ({ setLevel: (level) => partition.setIrqLine(gsi, level) }),
          console: consoleRing.writer(),
          clock: systemClock,
          power: power.control(() => {}),
        },
        { memoryBytes: config.memoryBytes },
        true,
      );
      board.powerOn();

      vm = new RunningVm(config, plan, system, partition, board, power, consoleRing, options.consoleFd);
      vm.prestarted = options.prestarted;
      const supported = system.supportedCpuid();
      const tscDeadlineTimer = system.checkExtension(KVM_CAP.TSC_DEADLINE_TIMER) > 0;
      const handoff = partition.handoff();
      const devices = vm.startDeviceThread(handoff);
      const vcpus = Array.from({ length: config.cpus }, (_, id) => ({
        vcpuId: id,
        cpuid: cpuidForVcpu(supported, { vcpuId: id, vcpuCount: config.cpus, tscDeadlineTimer }),
      }));
      const kind = vcpuThreadsFor(config);
      if (kind === "native-main") vm.createMainThreadVcpus(vcpus, devices);
      // "worker": a thread per vCPU; "native": one thread for all, their native threads its own.
      else for (const group of kind === "worker" ? vcpus.map((v) => [v]) : [vcpus]) {
        vm.spawnVcpus({
          handoff,
          vcpus: group,
          kind,
          deviceState: arena.buffer,
          powerState: power.buffer,
          startGate: vm.startGate.buffer as SharedArrayBuffer,
          report: vm.report.buffer,
          board: { memoryBytes: config.memoryBytes },
          consoleRing: consoleRing.buffer,
          ...(devices === undefined ? {} : { devices }),
        });
      }
      void options.prestarted?.dispose(); // prestarted threads this VM does not need (they end in the background)
      bootTrace("worker", "partition created, threads given their data");

      // While the threads start: the guest.
      const memory = partition.guestMemory;
      // Unpacked on the host: only the bzImage's setup header is needed from it.
      const kernel = config.unpackedKernel === undefined ? readFileSync(config.kernelPath) : readKernelHead(config.kernelPath);
      const initrd = config.initrdPath === undefined ? undefined : readFileSync(config.initrdPath);
      const acpi = buildAcpiTables({ vcpuCount: config.cpus, plan }, memory);
      let screenInfo: Uint8Array | undefined;
      if (config.framebuffer !== undefined) {
        const fb = LinearFramebuffer.create({ width: config.framebuffer.width, height: config.framebuffer.height });
        vm.framebuffer = fb;
        partition.mapDeviceMemory(fb.gpa, fb.memory);
        screenInfo = encodeScreenInfo(fb.screenInfo());
      }
      const unpacked = config.unpackedKernel === undefined ? undefined : openUnpackedKernel(config.unpackedKernel);
      let info: ReturnType<typeof loadLinux>;
      try {
        info = loadLinux(memory, plan, kernel, initrd, config.cmdline, {
          rsdpAddr: acpi.rsdpAddress,
          ...(screenInfo !== undefined ? { screenInfo } : {}),
          ...(unpacked !== undefined ? { unpacked } : {}),
        });
      } finally {
        unpacked?.close();
      }
      bootTrace("worker", "kernel and initrd loaded");
      writeBootTables(memory, plan);
      const boot = longModeBootState(plan, info);
      // The first thread runs vCPU 0, the BSP.
      vm.threads.forEach((t, i) => t.postMessage({ boot: i === 0 ? boot : null, msrs: boot.msrs } satisfies VcpuStartMessage));
      if (vm.mainVcpus !== undefined) vm.mainVcpusStart = { boot, msrs: boot.msrs };
      vm.bootHandedOver = true;
      vm.openGateWhenReady();
      return vm;
    } catch (e) {
      void options.prestarted?.dispose();
      if (vm !== undefined) for (const t of vm.threads) void t.terminate();
      vm?.mainVcpus?.close();
      if (vm?.deviceThread !== undefined) void vm.deviceThread.terminate();
      vm?.consoleOutput.finish();
      partition.destroy();
      vm?.framebuffer?.close();
      system.close();
      throw e;
    }
  }

  private bootHandedOver = false;

  /**
   * The device thread, when the VM has PCI devices: it builds them and gives
   * their BARs addresses while the vCPU threads start. Returns what each vCPU
   * thread needs to forward accesses to it.
   */
  private startDeviceThread(handoff: ReturnType<Partition["handoff"]>): VcpuThreadData["devices"] {
    const specs = this.config.devices ?? [];
    if (specs.length === 0) return undefined;
    const functions = planPci(specs);
    this.mailbox = DeviceMailbox.create(this.config.cpus);
    this.devicesReady = false;
    const data: DeviceThreadData = {
      vmName: this.config.name,
      handoff,
      mailbox: this.mailbox.handoff(),
      devices: specs,
      windows: { mmioStart: this.plan.pciMmio32.start, mmioSize: this.plan.pciMmio32.size, ioStart: 0xc000, ioEnd: PCI_IO_WINDOW.end },
      vcpus: this.config.cpus,
      stop: this.deviceStop.buffer as SharedArrayBuffer,
      report: this.report.buffer,
    };
    const prestarted = this.prestarted?.takeDevices();
    const t = prestarted ?? deviceThread(data);
    if (prestarted !== undefined) prestarted.postMessage(data);
    t.on("message", (m: DeviceThreadMessage) => {
      if (m.type === "ready") {
        bootTrace("worker", "devices ready");
        this.devicesReady = true;
        this.openGateWhenReady();
      } else if (m.type === "error")
        this.power.record(this.devicesReady ? { kind: "crash", reason: `devices: ${m.message}` } : { kind: "failed", reason: `cannot start the devices: ${m.message}` });
      else if (m.type === "stats") {
        if (process.env.PARTIS_STATS === "1") process.stderr.write(`partis-vm: device thread ${JSON.stringify(m.stats)}\n`);
      } else process.stderr.write(`partis-vm: ${this.config.name}: ${m.message}\n`);
    });
    t.on("error", (e) => this.power.record({ kind: "crash", reason: `device thread failed: ${e.message}` }));
    this.deviceThread = t;
    const ide = specs.some((d) => d.kind === "ide-disk" || d.kind === "ide-cdrom");
    return {
      mailbox: this.mailbox.handoff(),
      functions: functions.map((f) => f.bdf),
      ports: { ranges: [[PCI_IO_WINDOW.start, PCI_IO_WINDOW.end - PCI_IO_WINDOW.start], ...(ide ? IDE_COMPAT_PORTS : [])] },
    };
  }

  private openGateWhenReady(): void {
    if (this.bootHandedOver && this.devicesReady && this.vcpusReady === this.config.cpus && Atomics.load(this.startGate, 0) === 0) {
      // Every vCPU exists and is set up, and the BSP has its boot state: let them all run.
      bootTrace("worker", "start gate open");
      Atomics.store(this.startGate, 0, 1);
      Atomics.notify(this.startGate, 0);
      if (this.mainVcpus !== undefined && this.mainVcpusStart !== undefined) this.mainVcpus.start(this.mainVcpusStart);
      // Start-up is over for this process: every thread has loaded its modules. What of the
      // program files only start-up used (linker tables, snapshot, compilers) leaves the RSS.
      if (process.env.PARTIS_KEEP_PROGRAM_PAGES !== "1") setImmediate(() => this.releaseStartupPages());
    }
  }

  /** program-pages.ts: a hint to the kernel; a failure to read smaps changes nothing for the guest. */
  private releaseStartupPages(): void {
    try {
      const r = releaseProgramPages();
      bootTrace("worker", `program pages released (${r.mappings} mappings, ${r.residentKiB} KiB resident)`);
    } catch (e) {
      bootTrace("worker", `program pages kept: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  private prestarted: PrestartedThreads | undefined;

  /** "native-main": every vCPU on a native thread, served by this thread (main-thread-vcpus.ts). */
  private createMainThreadVcpus(vcpus: readonly HostedVcpu[], devices: VcpuThreadData["devices"]): void {
    let forwarder: DeviceForwarder | undefined;
    if (devices !== undefined && this.mailbox !== undefined) {
      // The mailbox slot of vCPU 0, as a "native" thread uses its first vCPU's: this thread's accesses stay in order.
      const requester = this.mailbox.requester(0);
      requester.abandoned = () => !this.power.running;
      forwarder = new DeviceForwarder(requester, devices.ports);
      for (const bdf of devices.functions) this.board.pciHost.attach(bdf, forwarder.configFunction(bdf));
    }
    this.mainVcpus = MainThreadVcpus.create(this.partition, vcpus, { bus: this.board.bus, lock: this.lock, power: this.power, forwarder, report: this.report.buffer });
    this.vcpusReady = vcpus.length;
    bootTrace("worker", `${vcpus.length} vCPU(s) on native threads, served by this thread`);
  }

  /** Start the thread for `data.vcpus` (a prestarted one when there is one). */
  private spawnVcpus(data: VcpuThreadData): void {
    const prestarted = this.prestarted?.takeVcpu();
    const t = prestarted ?? vcpuThread(data);
    if (prestarted !== undefined) prestarted.postMessage(data);
    const kickers: VcpuKicker[] = [];
    let ended = false;
    t.once("exit", () => {
      ended = true;
      for (const k of kickers) this.endedKickers.add(k);
    });
    const [first, last] = [data.vcpus[0]!.vcpuId, data.vcpus[data.vcpus.length - 1]!.vcpuId];
    const what = first === last ? `vCPU ${first}` : `vCPUs ${first}-${last}`;
    t.on("message", (m: VcpuThreadMessage) => {
      if (m.type === "ready") {
        const kicker = VcpuKicker.attach(m.kick);
        kickers.push(kicker);
        this.kickers.push(kicker);
        if (ended) this.endedKickers.add(kicker);
        this.vcpusReady++;
        this.openGateWhenReady();
      }
      if (m.type === "error") this.power.record({ kind: "crash", reason: `vCPU ${m.vcpuId}: ${m.message}` });
      if (m.type === "stopped" && process.env.PARTIS_STATS === "1") process.stderr.write(`partis-vm: vCPU ${m.vcpuId} exits ${JSON.stringify(m.exits)}\n`);
    });
    t.on("error", (e) => this.power.record({ kind: "crash", reason: `${what} thread failed: ${e.message}` }));
    this.threads.push(t);
  }

  private async watchPower(): Promise<VmOutcome> {
    const word = new Int32Array(this.power.buffer, 0, 1);
    for (;;) {
      const o = this.power.outcome();
      if (o !== undefined) return o;
      const w = Atomics.waitAsync(word, 0, 0, 1000);
      if (w.async) await w.value;
    }
  }

  /**
   * Console input from the user: queued, fed to COM1 as the guest drains it.
   * Once MAX_PENDING_INPUT bytes wait for the guest, `source` is paused until
   * the queue empties (a guest that never reads its console must not make the
   * host buffer `cat /dev/zero`).
   */
  consoleInput(bytes: Uint8Array, source?: ConsoleInputSource): void {
    this.pendingInput.push(Uint8Array.from(bytes));
    this.pendingInputBytes += bytes.length;
    this.feedConsole();
    if (source !== undefined && this.pendingInputBytes >= MAX_PENDING_INPUT && this.power.running) {
      source.pause();
      this.pausedSources.push(source);
    }
  }

  private resumeSources(): void {
    for (const s of this.pausedSources.splice(0)) if (s.destroyed !== true) s.resume();
  }

  private feedConsole(): void {
    const lock = this.lock;
    lock.acquire();
    try {
      // Hold input until the guest's driver has enabled receive interrupts:
      // bytes sent before that would be flushed by the driver's FIFO reset.
      while (this.pendingInput.length > 0 && this.board.com1.receiverReady()) {
        const head = this.pendingInput[0]!;
        const n = this.board.com1.receive(head);
        if (n === 0) break;
        this.pendingInputBytes -= n;
        if (n === head.length) this.pendingInput.shift();
        else this.pendingInput[0] = head.subarray(n);
      }
    } finally {
      lock.release();
    }
    if (this.pendingInput.length === 0) this.resumeSources();
    if (this.pendingInput.length > 0 && this.inputTimer === undefined && this.power.running) {
      this.inputTimer = setTimeout(() => {
        this.inputTimer = undefined;
        this.feedConsole();
      }, 10);
    }
  }

  /** Host shutdown request: press the ACPI power button; the guest powers itself off. */
  pressPowerButton(): void {
    this.lock.with(() => this.board.pm.pressPowerButton());
  }

  private stopDeviceThread(): Promise<void> {
    const t = this.deviceThread;
    if (t === undefined || t.threadId < 0) return Promise.resolve();
    const exited = new Promise<void>((resolve) => t.once("exit", () => resolve()));
    Atomics.store(this.deviceStop, 0, 1);
    this.mailbox?.ring();
    return Promise.race([exited, new Promise<void>((r) => setTimeout(() => void t.terminate().then(() => r()), 3000))]);
  }

  /**
   * Ask every thread for its state report (state-report.ts): vCPUs are kicked
   * out of KVM_RUN to answer and go back in; the device thread answers on its
   * doorbell. The VM is not stopped.
   */
  reportState(): void {
    const gate = Atomics.load(this.startGate, 0) === 0 ? "; the start gate is still closed (vCPUs not running yet)" : "";
    writeReport([`VM ${this.config.name}: ${this.config.cpus} vCPU(s), ${this.kickers.length + (this.mainVcpus?.hasStarted === true ? this.mainVcpus.count : 0)} started, power ${this.power.running ? "on" : "off"}, ${this.pendingInputBytes} console input byte(s) waiting for the guest${gate}`, describeProcessMemory(), describeIsolateMemory("main thread")]);
    this.report.request();
    this.kickLiveVcpus();
    this.mailbox?.ring();
  }

  private kickLiveVcpus(): void {
    for (const k of this.kickers) if (!this.endedKickers.has(k)) k.kick();
    this.mainVcpus?.interruptAll();
  }

  /** Pull the plug. */
  stop(reason: string): void {
    this.power.record({ kind: "poweroff", source: reason });
  }

  /**
   * Stop every vCPU thread and release the partition. vCPUs halted inside
   * KVM_RUN (an AP parked by the guest's poweroff, say) are kicked out with
   * immediate_exit + a signal; their loops see the recorded outcome and end.
   * Node joins worker threads at exit, so this must happen before exiting.
   */
  /** PARTIS_STATS=1: CPU time of every thread of this process (utime/stime in clock ticks). */
  private static threadCpu(): string {
    try {
      return readdirSync("/proc/self/task")
        .map((tid) => {
          const stat = readFileSync(`/proc/self/task/${tid}/stat`, "utf8");
          const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
          const comm = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
          return `${tid}:${comm}:${f[11]}u/${f[12]}s/${f[40] ?? "?"}g`;
        })
        .join(" ");
    } catch {
      return "unavailable";
    }
  }

  async teardown(timeoutMs = 5000): Promise<void> {
    if (process.env.PARTIS_STATS === "1") process.stderr.write(`partis-vm: thread CPU ${RunningVm.threadCpu()}\n`);
    if (this.inputTimer !== undefined) clearTimeout(this.inputTimer);
    this.resumeSources();
    if (this.power.running) this.power.record({ kind: "poweroff", source: "teardown" });
    const exited = Promise.all([
      ...this.threads.map((t) => new Promise<void>((resolve) => {
        if (t.threadId < 0) resolve();
        else t.once("exit", () => resolve());
      })),
      // Never started (the gate stayed shut): nothing runs.
      ...(this.mainVcpus?.hasStarted === true ? [this.mainVcpus.stopped] : []),
    ]);
    this.kickLiveVcpus();
    // vCPUs still waiting at the start gate (the devices never came up) pass it, see the outcome and end.
    Atomics.store(this.startGate, 0, 1);
    Atomics.notify(this.startGate, 0);
    const devicesExited = this.stopDeviceThread();
    // The console keeps flowing while the vCPUs stop (their last lines); a reader that takes
    // nothing more must not hold a vCPU waiting for room in the ring: then output is dropped.
    const closeConsole = setTimeout(() => this.consoleOutput.ring.close(), Math.min(FINAL_FLUSH_MS, timeoutMs / 2));
    let timer: NodeJS.Timeout | undefined;
    const ok = await Promise.race([exited.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs)))]);
    clearTimeout(timer);
    clearTimeout(closeConsole);
    this.consoleOutput.finish();
    if (this.consoleOutput.failure !== undefined) process.stderr.write(`partis-vm: ${this.config.name}: ${this.consoleOutput.failure}\n`);
    if (!ok) throw new VmStartError("VCPU_STUCK", `vCPU threads did not stop within ${timeoutMs} ms`, { vm: this.config.name });
    for (const k of this.kickers) k.close();
    if (this.mainVcpus !== undefined) {
      if (process.env.PARTIS_STATS === "1") for (const v of this.mainVcpus.stats()) process.stderr.write(`partis-vm: vCPU ${v.vcpuId} exits ${JSON.stringify(v.exits)}\n`);
      this.mainVcpus.close();
    }
    await devicesExited;
    this.mailbox?.close();
    if (this.framebuffer !== undefined && this.config.screenshotPath !== undefined) {
      try {
        writeFileSync(this.config.screenshotPath, this.framebuffer.snapshotPpm());
      } catch (e) {
        process.stderr.write(`partis-vm: ${this.config.name}: cannot write the screenshot ${this.config.screenshotPath}: ${(e as Error).message}\n`);
      }
    }
    this.partition.destroy();
    this.framebuffer?.close();
    this.system.close();
  }
}
