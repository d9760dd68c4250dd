/**
 * Port-I/O exit round trip: 100,000 `out` exits of a tiny real-mode guest
 * through VirtualProcessor.run() (TypeScript, koffi), against the same loop
 * in C with raw ioctls (bench/pio-exit/pio-exit.c, compiled here with gcc).
 *
 *   npx tsc -p . && node dist/bench/pio-exit/pio-exit.js [--exits N] [--rounds R]
 *
 * Prints µs/exit for both (best of R alternating rounds, and the median) and
 * the ratio TS / C, by wall clock and by the running thread's CPU time (the
 * latter is what to compare on a shared, loaded machine). Goal: ratio ≤ 1.15.
 */
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition } from "../../src/hypervisor/partition.js";
import { VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";
import { threadCpuTimeNs } from "../../src/hypervisor/libc.js";

/** µs per exit: wall clock, and CPU time of the running thread (robust when other processes share the cores). */
interface Sample {
  wall: number;
  cpu: number;
}

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

const EXITS = arg("exits", 100_000);
const ROUNDS = arg("rounds", 3);

/** Walk up from this file to the repository root (the folder with package.json). */
function repoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!fs.existsSync(path.join(dir, "package.json"))) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error("repository root not found");
    dir = up;
  }
  return dir;
}

function buildC(): string {
  const src = path.join(repoRoot(), "bench", "pio-exit", "pio-exit.c");
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "partis-pio-exit-")), "pio-exit-c");
  execFileSync("gcc", ["-O2", "-o", out, src], { stdio: "inherit" });
  return out;
}

function runC(binary: string): Sample {
  const text = execFileSync(binary, [String(EXITS)], { encoding: "utf8" });
  const m = /c_us_per_exit ([\d.]+) cpu ([\d.]+)/.exec(text);
  if (m === null) throw new Error(`unexpected output from the C benchmark: ${text}`);
  return { wall: Number(m[1]), cpu: Number(m[2]) };
}

function runTs(): Sample {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  const vp = VirtualProcessor.create(p, 0);
  try {
    // mov al, 0 ; loop: out 0x10, al ; inc al ; jmp loop
    p.guestMemory.write(0x1000, Uint8Array.of(0xb0, 0x00, 0xe6, 0x10, 0xfe, 0xc0, 0xeb, 0xfa));
    const s = vp.getSregs();
    for (const seg of [s.cs, s.ds, s.es, s.ss]) {
      seg.base = 0n;
      seg.selector = 0;
    }
    vp.setSregs(s);
    const r = vp.getRegs();
    vp.setRegs({ ...r, rip: 0x1000n, rflags: 2n, rsp: 0xf000n });
    const warmup = Math.floor(EXITS / 10);
    let start = 0n;
    let startCpu = 0n;
    for (let i = 0; i < warmup + EXITS; i++) {
      if (i === warmup) {
        start = process.hrtime.bigint();
        startCpu = threadCpuTimeNs();
      }
      const exit = vp.run();
      if (exit.reason !== "io" || exit.port !== 0x10) throw new Error(`unexpected exit ${exit.reason}`);
    }
    const cpuNs = Number(threadCpuTimeNs() - startCpu);
    const wallNs = Number(process.hrtime.bigint() - start);
    return { wall: wallNs / 1000 / EXITS, cpu: cpuNs / 1000 / EXITS };
  } finally {
    vp.close();
    p.destroy();
    sys.close();
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const binary = buildC();
const c: Sample[] = [];
const ts: Sample[] = [];
for (let round = 0; round < ROUNDS; round++) {
  c.push(runC(binary));
  ts.push(runTs());
  const [cr, tr] = [c[round]!, ts[round]!];
  console.log(
    `round ${round + 1}: C ${cr.wall.toFixed(3)} µs/exit wall, ${cr.cpu.toFixed(3)} cpu; TS ${tr.wall.toFixed(3)} wall, ${tr.cpu.toFixed(3)} cpu`,
  );
}
console.log(`exits per round: ${EXITS}, rounds: ${ROUNDS}, load average: ${os.loadavg().map((l) => l.toFixed(2)).join(" ")}`);
for (const k of ["wall", "cpu"] as const) {
  const cs = c.map((x) => x[k]);
  const tss = ts.map((x) => x[k]);
  const [bc, bt, mc, mt] = [Math.min(...cs), Math.min(...tss), median(cs), median(tss)];
  console.log(
    `${k.padEnd(4)}: C best ${bc.toFixed(3)} median ${mc.toFixed(3)} µs/exit | TS best ${bt.toFixed(3)} median ${mt.toFixed(3)} µs/exit | ` +
      `ratio TS/C best ${(bt / bc).toFixed(3)} median ${(mt / mc).toFixed(3)} (goal ≤ 1.15)`,
  );
}
fs.rmSync(path.dirname(binary), { recursive: true, force: true });
