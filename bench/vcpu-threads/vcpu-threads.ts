/**
 * What a vCPU's thread costs, two ways: a Node worker per vCPU (what Partis
 * runs today: each vCPU thread is a V8 isolate) against a native thread per
 * vCPU with no isolate (src/hypervisor/syscall-thread.ts), driven from one
 * JavaScript thread.
 *
 *   npx tsc -p . && node dist/bench/vcpu-threads/vcpu-threads.js [--vcpus N] [--rounds R] [--exits E]
 *
 * 1. Memory: N vCPUs of a tiny real-mode guest halted in the kernel
 *    (`sti; hlt`, in-kernel irqchip), each on its own thread; RssAnon of the
 *    process before the threads start and a second after, per vCPU. Each
 *    configuration runs in a fresh child process, alternating.
 * 2. Port-I/O exit round trip (the guest of bench/pio-exit): KVM_RUN made
 *    by the JavaScript thread itself (today's vCPU thread), against KVM_RUN
 *    made by a native thread that the JavaScript thread waits for, either
 *    sleeping on a futex or polling briefly first. Wall clock and the
 *    process's CPU time (both threads) per exit.
 */
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import { fileURLToPath } from "node:url";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition, type PartitionHandoff } from "../../src/hypervisor/partition.js";
import { VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";
import { SyscallThread } from "../../src/hypervisor/syscall-thread.js";
import { exitNow } from "../../src/hypervisor/libc.js";
import { CODE_GPA, code, enterRealMode } from "../../test/hypervisor/guests.js";

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

const HALT = code([0xfb], [0xf4], [0xeb, 0xfd]); // sti; idle: hlt; jmp idle
const PIO_LOOP = code([0xb0, 0x00], [0xe6, 0x10], [0xfe, 0xc0], [0xeb, 0xfa]); // mov al,0; out 0x10,al; inc al; jmp

function rssAnonKiB(): number {
  const m = /^RssAnon:\s+(\d+)/m.exec(fs.readFileSync("/proc/self/status", "utf8"));
  return Number(m![1]);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// --- worker side of the "worker per vCPU" configuration -------------------------------------------

interface HaltedVcpuData {
  readonly handoff: PartitionHandoff;
  readonly id: number;
}


/** One memory measurement in this (fresh) process; prints one JSON line and ends the process at once. */
async function child(kind: "workers" | "native", vcpus: number): Promise<void> {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA);
  p.createIrqchip();
  p.guestMemory.write(CODE_GPA, HALT);
  await sleep(300);
  const before = rssAnonKiB();
  if (kind === "workers") {
    const self = fileURLToPath(import.meta.url);
    for (let id = 0; id < vcpus; id++) {
      // The resource limits Partis gives its vCPU threads (src/worker/running-vm.ts).
      const w = new Worker(self, { workerData: { handoff: p.handoff(), id } satisfies HaltedVcpuData, resourceLimits: { maxYoungGenerationSizeMb: 1, maxOldGenerationSizeMb: 16, codeRangeSizeMb: 4, stackSizeMb: 1 } });
      await new Promise<void>((resolve, reject) => {
        w.once("message", () => resolve());
        w.once("error", reject);
      });
    }
  } else {
    for (let id = 0; id < vcpus; id++) {
      const vp = VirtualProcessor.create(p, id, { on: SyscallThread.start({ context: { vcpu: id } }) });
      enterRealMode(vp);
      vp.startRun();
    }
  }
  await sleep(1000);
  const after = rssAnonKiB();
  const tasks = fs.readdirSync("/proc/self/task").length;
  fs.writeSync(1, JSON.stringify({ kind, vcpus, beforeKiB: before, afterKiB: after, tasks }) + "\n");
  exitNow(0); // vCPUs are halted in KVM_RUN: Node's own exit would wait for the workers forever
}

interface ExitSample {
  wallUs: number;
  cpuUs: number;
}

type ExitMode = "js-thread" | "native-sleep" | "native-poll";

/** POLLS checks of the done flag before sleeping on the futex (native-poll). */
const POLLS = 20_000;

function exitRoundTrip(sys: KvmSystem, mode: ExitMode, exits: number): ExitSample {
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA);
  const t = mode === "js-thread" ? undefined : SyscallThread.start();
  const vp = VirtualProcessor.create(p, 0, t === undefined ? {} : { on: t });
  try {
    p.guestMemory.write(CODE_GPA, PIO_LOOP);
    enterRealMode(vp);
    const warmup = Math.floor(exits / 10);
    let start = 0n;
    let cpu0 = process.cpuUsage();
    for (let i = 0; i < warmup + exits; i++) {
      if (i === warmup) {
        start = process.hrtime.bigint();
        cpu0 = process.cpuUsage();
      }
      let exit;
      if (mode === "native-poll") {
        vp.startRun();
        for (let k = 0; k < POLLS && !t!.done; k++);
        exit = vp.finishRun(t!.wait());
      } else exit = vp.run();
      if (exit.reason !== "io" || exit.port !== 0x10) throw new Error(`unexpected exit ${exit.reason}`);
    }
    const wallNs = Number(process.hrtime.bigint() - start);
    const cpu = process.cpuUsage(cpu0);
    return { wallUs: wallNs / 1000 / exits, cpuUs: (cpu.user + cpu.system) / exits };
  } finally {
    vp.close();
    t?.stop();
    p.destroy();
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function main(): void {
  const vcpus = arg("vcpus", 16);
  const rounds = arg("rounds", 3);
  const exits = arg("exits", 50_000);
  const self = fileURLToPath(import.meta.url);

  console.log(`# memory: ${vcpus} halted vCPUs, RssAnon growth per vCPU (KiB), ${rounds} rounds`);
  const perVcpu: Record<string, number[]> = { workers: [], native: [] };
  for (let r = 0; r < rounds; r++) {
    for (const kind of ["workers", "native"] as const) {
      const out = execFileSync(process.execPath, [self, "--child", kind, String(vcpus)], { encoding: "utf8" });
      const m = JSON.parse(out.trim().split("\n").pop()!) as { beforeKiB: number; afterKiB: number; tasks: number };
      const per = (m.afterKiB - m.beforeKiB) / vcpus;
      perVcpu[kind]!.push(per);
      console.log(`round ${r + 1} ${kind.padEnd(7)}: RssAnon ${m.beforeKiB} -> ${m.afterKiB} KiB, ${per.toFixed(0)} KiB per vCPU, ${m.tasks} threads`);
    }
  }

  console.log(`# port-I/O exit round trip: ${exits} exits per run, ${rounds} rounds`);
  const sys = KvmSystem.open();
  const samples: Record<ExitMode, ExitSample[]> = { "js-thread": [], "native-sleep": [], "native-poll": [] };
  try {
    for (let r = 0; r < rounds; r++) {
      for (const mode of ["js-thread", "native-sleep", "native-poll"] as const) {
        const s = exitRoundTrip(sys, mode, exits);
        samples[mode].push(s);
        console.log(`round ${r + 1} ${mode.padEnd(12)}: ${s.wallUs.toFixed(2)} µs/exit wall, ${s.cpuUs.toFixed(2)} µs/exit process CPU`);
      }
    }
  } finally {
    sys.close();
  }

  console.log(`# summary (medians), load average ${os.loadavg().map((l) => l.toFixed(2)).join(" ")}`);
  console.log(`memory per vCPU: worker ${(median(perVcpu["workers"]!) / 1024).toFixed(2)} MiB, native thread ${median(perVcpu["native"]!).toFixed(0)} KiB`);
  const base = median(samples["js-thread"].map((s) => s.wallUs));
  for (const mode of ["js-thread", "native-sleep", "native-poll"] as const) {
    const wall = median(samples[mode].map((s) => s.wallUs));
    const cpu = median(samples[mode].map((s) => s.cpuUs));
    console.log(`exit ${mode.padEnd(12)}: ${wall.toFixed(2)} µs wall (${(wall / base).toFixed(2)}× js-thread), ${cpu.toFixed(2)} µs process CPU`);
  }
}

// Entry: a halted vCPU's worker, a memory-measuring child, or the benchmark itself.
if (!isMainThread && parentPort !== null) {
  const data = workerData as HaltedVcpuData;
  const p = Partition.attach(data.handoff);
  const vp = VirtualProcessor.create(p, data.id);
  enterRealMode(vp);
  parentPort.postMessage("ready");
  vp.run(); // halts in the kernel until the process ends
} else if (process.argv[2] === "--child") {
  await child(process.argv[3] as "workers" | "native", Number(process.argv[4]));
} else if (isMainThread) {
  main();
}
