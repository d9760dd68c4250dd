/**
 * Boot benchmark: time from process start to the guest's init marker, and the
 * VMM's memory overhead, Partis vs QEMU (-enable-kvm, -M microvm and -M q35),
 * with the same kernel, initrd, command line, memory and vCPUs, median of N
 * runs each, side by side on one host.
 *
 * On a PVM host run it inside the nested test host (timings there are
 * TCG-scaled: compare only side by side):
 *   node dist/partis/partis.js host nested -- node dist/bench/boot/boot-time.js --runs 5 [--warmup 1]
 * On a VT-x/AMD-V host run it directly.
 *
 * Memory overhead = VmRSS − RssShmem of the VMM process once the guest is at
 * its shell: guest RAM is a memfd in both (QEMU is given a memfd backend), so
 * RssShmem is exactly the guest RAM touched and the rest is the VMM's own.
 * For Partis the figure is the `partis run` process, which is the VM's process.
 * Partis runs as users run it: the bundled CLI (dist/partis/partis.js, from
 * scripts/bundle.mjs); the row "partis-unbundled" runs tsc's output
 * (dist/src/cli/main.js, ~100 module files) to show what the bundle is worth.
 *
 * Partis boots the kernel unpacked on the host by default (--kernel-unpack
 * auto: src/images/kernel-unpack.ts); the row "partis --kernel-unpack guest"
 * boots the same bzImage the way QEMU does, the guest decompressing it, to
 * show what each part is worth.
 *
 * `--hugepages` adds two rows with guest RAM on the host's reserved 2 MiB
 * pages (hugetlbfs): Partis `--hugepages` and QEMU q35 with a hugetlb memfd.
 * The bench grows the 2 MiB pool for them (root) and puts it back at the end.
 * hugetlb pages are not in VmRSS, so the overhead column means the same there.
 * `--only KEY,...` runs only some rows (keys: partis, partis-worker, partis-native,
 * partis-native-main, partis-unbundled, partis-keep-pages, partis-unpack-guest, partis-hugepages,
 * qemu-microvm, qemu-q35, qemu-q35-hugetlb); the first row run is the one the
 * ratios are taken against. The row partis is the default (`--vcpu-threads
 * auto`, which is native-main for this guest: it has no IDE drive or NE2000);
 * the rows partis-worker, partis-native and partis-native-main
 * (`--vcpu-threads worker|native|native-main`),
 * partis-unbundled and partis-keep-pages (PARTIS_KEEP_PROGRAM_PAGES=1: the
 * program files' start-up pages stay resident: src/hypervisor/program-pages.ts)
 * run only when named. `--cpus N` gives every VMM N vCPUs
 * (default 1). `--settle MS` (default 1500) is how long after the marker
 * memory is read. `--isolates` asks each Partis VM for its state report
 * right after (SIGQUIT: src/worker/state-report.ts) and prints, per run,
 * what each thread's V8 isolate holds: where the private memory went.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync, existsSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { prepareDefaultGuest, GUEST_READY_MARKER } from "../../src/images/default-guest.js";
import { readHugePagePools } from "../../src/hypervisor/host.js";
import { readVmmMemory } from "./vmm-memory.js";

/** The bundled CLI (scripts/bundle.mjs), what users run; the row `partis-unbundled` runs tsc's output instead. */
const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const UNBUNDLED_CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const args = process.argv.slice(2);
const runs = Number(args[args.indexOf("--runs") + 1] ?? 5) || 5;
/** Untimed rounds first (page cache, the nested host's first process starts), for every VMM alike. */
const warmup = args.includes("--warmup") ? Number(args[args.indexOf("--warmup") + 1]) : 1;
const hugepages = args.includes("--hugepages");
const only = args.includes("--only") ? new Set((args[args.indexOf("--only") + 1] ?? "").split(",")) : undefined;
const POOL_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const memory = "256M";
/** `--settle MS`: from the marker to reading memory (the guest sits at its shell meanwhile). */
const settleMs = args.includes("--settle") ? Number(args[args.indexOf("--settle") + 1]) : 1500;
if (!Number.isSafeInteger(settleMs) || settleMs < 0) throw new Error(`--settle: ${args[args.indexOf("--settle") + 1]} is not a number of milliseconds`);
/** `--isolates`: each Partis run's state report lines about memory (the process, each V8 isolate). */
const isolates = args.includes("--isolates");
/** `--cpus N` (default 1): vCPUs of every VMM. */
const cpus = args.includes("--cpus") ? Number(args[args.indexOf("--cpus") + 1]) : 1;
if (!Number.isSafeInteger(cpus) || cpus < 1) throw new Error(`--cpus: ${args[args.indexOf("--cpus") + 1]} is not a vCPU count`);
const append = "console=ttyS0 panic=-1 quiet";
const TIMEOUT_MS = 180_000;

interface Sample {
  readonly ms: number;
  readonly overheadKiB: number;
  /** The private part of it (RssAnon): what each further VM costs; the rest is program text shared by every process of the VMM. */
  readonly privateKiB: number;
  /** Of the private memory, what transparent huge pages hold (AnonHugePages): 2 MiB each, however little of one is in use. */
  readonly hugeKiB: number;
  /** `--isolates`: the VM's state report lines about memory (Partis only). */
  readonly memoryReport?: readonly string[];
}

function childPids(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** The memory lines of a state report: the process's, and one per V8 isolate (main, vCPU threads, device thread). */
const MEMORY_REPORT = /partis-vm: report: ((?:process: |[\w ]+: V8 heap ).*)/g;

function once(command: string, argv: string[], vmmPid: (c: ChildProcess) => number, env?: NodeJS.ProcessEnv, askReport = false): Promise<Sample> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(command, argv, { stdio: ["pipe", "pipe", "pipe"], ...(env === undefined ? {} : { env: { ...process.env, ...env } }) });
    let out = "";
    let done = false;
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      for (const p of childPids(child.pid!)) {
        try {
          process.kill(p, "SIGKILL");
        } catch {}
      }
      reject(new Error(`${command}: no marker after ${TIMEOUT_MS / 1000} s\n${out.slice(-2000)}`));
    }, TIMEOUT_MS);
    child.stdout!.on("data", (d: Buffer) => {
      if (done) return;
      out += d.toString("latin1");
      if (out.includes(GUEST_READY_MARKER)) {
        done = true;
        const ms = Number(process.hrtime.bigint() - t0) / 1e6;
        // Let the guest settle at its shell, then read memory (and, asked for, the VM's own account of it).
        setTimeout(async () => {
          const pid = vmmPid(child);
          const { overheadKiB, privateKiB, hugeKiB } = readVmmMemory(pid);
          let sample: Sample = { ms, overheadKiB, privateKiB, hugeKiB };
          if (askReport) sample = { ...sample, memoryReport: await memoryReport(child, () => reportText) };
          clearTimeout(timer);
          child.kill("SIGKILL");
          for (const p of childPids(child.pid!)) {
            try {
              process.kill(p, "SIGKILL");
            } catch {}
          }
          child.on("exit", () => resolve(sample));
        }, settleMs);
      }
    });
    let err = "";
    let reportText = "";
    child.stderr!.on("data", (d: Buffer) => {
      const text = d.toString("latin1");
      err = (err + text).slice(-2000);
      if (done && askReport) reportText += text;
    });
    child.on("exit", (code, signal) => {
      if (done) return;
      // Ended before the marker (a refused configuration, a crash): say so now, not at the timeout.
      clearTimeout(timer);
      reject(new Error(`${command} ended (${signal ?? `status ${code}`}) before the marker: ${err.trim().split("\n").slice(-3).join(" | ")}`));
    });
    child.on("error", reject);
  });
}

/** SIGQUIT (the VM keeps running), then the report's memory lines once every isolate has answered (at most 5 s). */
async function memoryReport(child: ChildProcess, text: () => string): Promise<string[]> {
  child.kill("SIGQUIT");
  const lines = (): string[] => [...text().matchAll(MEMORY_REPORT)].map((m) => m[1]!);
  const started = Date.now();
  // The main thread writes the process line and its own; each vCPU thread or device thread answers after its kick.
  let seen = -1;
  while (Date.now() - started < 5000) {
    await new Promise((r) => setTimeout(r, 250));
    const n = lines().length;
    if (n >= 2 && n === seen) break;
    seen = n;
  }
  return lines();
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const guest = await prepareDefaultGuest();
  const qemu = "/usr/bin/qemu-system-x86_64";
  if (!existsSync(qemu)) throw new Error("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)");
  const memBackend = ["-object", `memory-backend-memfd,id=ram0,size=${memory}`];
  const common = ["-enable-kvm", "-cpu", "host", "-m", memory, "-smp", String(cpus), "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
    "-kernel", guest.kernel, "-initrd", guest.initrd, "-append", append];
  const partis = (extra: string[], cli = CLI, env?: NodeJS.ProcessEnv) => () =>
    once(process.execPath, [cli, "run", "--kernel", guest.kernel, "--initrd", guest.initrd, "--memory", memory, "--cpus", String(cpus), "--append", append, ...extra], (c) => c.pid!, env, isolates);
  const hugeBackend = ["-object", `memory-backend-memfd,id=ram0,size=${memory},hugetlb=on,hugetlbsize=2M`];
  /** optional: run only when named in --only; huge: only with --hugepages (or named). */
  const all: { key: string; name: string; huge?: true; optional?: true; run: () => Promise<Sample> }[] = [
    { key: "partis", name: "partis", run: partis([]) },
    { key: "partis-worker", optional: true, name: "partis --vcpu-threads worker", run: partis(["--vcpu-threads", "worker"]) },
    { key: "partis-native", optional: true, name: "partis --vcpu-threads native", run: partis(["--vcpu-threads", "native"]) },
    { key: "partis-native-main", optional: true, name: "partis --vcpu-threads native-main", run: partis(["--vcpu-threads", "native-main"]) },
    { key: "partis-unbundled", optional: true, name: "partis, unbundled (tsc's output)", run: partis([], UNBUNDLED_CLI) },
    { key: "partis-keep-pages", optional: true, name: "partis, program pages kept", run: partis([], CLI, { PARTIS_KEEP_PROGRAM_PAGES: "1" }) },
    { key: "partis-unpack-guest", name: "partis --kernel-unpack guest", run: partis(["--kernel-unpack", "guest"]) },
    { key: "partis-hugepages", name: "partis --hugepages", huge: true, run: partis(["--hugepages", "2M"]) },
    { key: "qemu-microvm", name: "qemu -M microvm", run: () => once(qemu, ["-M", "microvm,memory-backend=ram0", ...memBackend, ...common], (c) => c.pid!) },
    { key: "qemu-q35", name: "qemu -M q35", run: () => once(qemu, ["-M", "q35,memory-backend=ram0", ...memBackend, ...common], (c) => c.pid!) },
    { key: "qemu-q35-hugetlb", name: "qemu -M q35, hugetlb RAM", huge: true, run: () => once(qemu, ["-M", "q35,memory-backend=ram0", ...hugeBackend, ...common], (c) => c.pid!) },
  ];
  const configs = all.filter((c) => (only !== undefined ? only.has(c.key) : (hugepages || c.huge !== true) && c.optional !== true));
  if (configs.length === 0) throw new Error(`--only: none of ${[...(only ?? [])].join(", ")} is a row (${all.map((c) => c.key).join(", ")})`);
  let restorePool: (() => void) | undefined;
  if (configs.some((c) => c.huge)) {
    // One VM at a time: the pool needs one guest's RAM in 2 MiB pages.
    const need = parseInt(memory, 10) / 2;
    const before = readFileSync(POOL_2M, "utf8").trim();
    const available = () => readHugePagePools().find((p) => p.pageBytes === 2 << 20)?.available ?? 0;
    const have = available();
    if (have < need) writeFileSync(POOL_2M, String(Number(before) + need - have));
    restorePool = () => writeFileSync(POOL_2M, before);
    if (available() < need) {
      restorePool();
      throw new Error(`the 2 MiB huge-page pool holds ${available()} available pages; the hugetlb rows need ${need}`);
    }
    for (const c of configs)
      if (c.huge) {
        const run = c.run;
        c.run = () => {
          const now = available();
          if (now < need) return Promise.reject(new Error(`only ${now} of ${need} huge pages available before this run`));
          return run();
        };
      }
  }
  try {
    await measure(configs);
  } finally {
    restorePool?.();
  }
}

async function measure(configs: { name: string; run: () => Promise<Sample> }[]): Promise<void> {
  const results: Record<string, Sample[]> = {};
  const failures: Record<string, number[]> = {};
  for (let i = 0; i < warmup; i++)
    for (const c of configs) {
      const s = await c.run().catch((e: unknown) => e);
      process.stderr.write(`${c.name} warm-up ${i + 1}: ${s instanceof Error ? "FAILED" : `${(s as Sample).ms.toFixed(0)} ms (not counted)`}\n`);
    }
  // Interleave the configurations so drift in the host affects all alike.
  for (let i = 0; i < runs; i++) {
    for (const c of configs) {
      try {
        const s = await c.run();
        (results[c.name] ??= []).push(s);
        process.stderr.write(`${c.name} run ${i + 1}: ${s.ms.toFixed(0)} ms, overhead ${(s.overheadKiB / 1024).toFixed(1)} MiB (private ${(s.privateKiB / 1024).toFixed(1)}, huge pages ${(s.hugeKiB / 1024).toFixed(0)})\n`);
        for (const line of s.memoryReport ?? []) process.stderr.write(`  ${line}\n`);
      } catch (e) {
        // A stalled boot is reported and left out of the median, not fatal to the whole run.
        (failures[c.name] ??= []).push(i + 1);
        process.stderr.write(`${c.name} run ${i + 1}: FAILED (${(e instanceof Error ? e.message : String(e)).split("\n")[0]})\n`);
      }
    }
  }
  const first = results[configs[0]!.name];
  if (first === undefined) throw new Error(`no ${configs[0]!.name} run succeeded`);
  const partisMs = median(first.map((s) => s.ms));
  console.log(`| VMM | median start→marker (ms) | runs (ms) | VMM overhead RSS (MiB, median) | of which private (RssAnon) | of which huge pages (MiB, median) | ${configs[0]!.name} ÷ this |`);
  console.log(`|---|---|---|---|---|---|---|`);
  for (const c of configs) {
    const xs = results[c.name];
    if (xs === undefined) {
      console.log(`| ${c.name} | all runs failed | | | | | |`);
      continue;
    }
    const ms = median(xs.map((s) => s.ms));
    const ov = median(xs.map((s) => s.overheadKiB)) / 1024;
    const priv = median(xs.map((s) => s.privateKiB)) / 1024;
    const huge = median(xs.map((s) => s.hugeKiB)) / 1024;
    const failed = failures[c.name] ? ` (failed: run ${failures[c.name]!.join(", ")})` : "";
    console.log(`| ${c.name} | ${ms.toFixed(0)} | ${xs.map((s) => s.ms.toFixed(0)).join(", ")}${failed} | ${ov.toFixed(1)} | ${priv.toFixed(1)} | ${huge.toFixed(0)} | ${(partisMs / ms).toFixed(2)} |`);
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
