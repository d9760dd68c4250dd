/**
 * Storage benchmark: 4 KiB "random" write/read and 1 MiB sequential
 * write/read on raw, fixed VHD, dynamic VHD, dynamic VHDX and a 3-deep
 * differencing VHD chain, through Partis's BlockDevice and through
 * `qemu-img bench` on the same kind of file.
 *
 * Equal footing (DEVNOTE):
 *  - Both go through the host page cache: Partis opens files buffered,
 *    qemu-img bench runs with `-t writeback`. qemu's closing flush
 *    (`--flush-interval=<count>`) does not land inside its timed run
 *    (measured: the same time with and without it), so Partis's closing
 *    flush() is timed apart and reported in its own column.
 *  - Queue depth 1 for qemu (`-d 1`): Partis's interface is synchronous.
 *  - qemu-img bench has no random mode, so the "random" pattern is a large
 *    stride that wraps around the image (`-S`): request i is at
 *    (i * STRIDE) mod size. Partis uses the same offsets.
 *  - `sync` runs before every timed run, so none pays for the writeback
 *    of the one before.
 *  - Write tests start from a freshly created image (allocation included);
 *    read tests run on an image filled by a sequential write first.
 *  - qemu 7.2 cannot open differencing VHDs: that row has no qemu numbers.
 *  - Raw and fixed VHD files are created by Partis (sparse, as the raw
 *    and VHD drivers create them), so both pay the same file-system
 *    allocation on first write. One untimed warm-up pass runs first.
 *
 * usage: node dist/bench/storage/disk-io.js [--dir D] [--size-mib 256] [--random-ops 32768] [--repeat 3] [--write-docs]
 */
import { spawnSync } from "node:child_process";
import { cpus, loadavg, totalmem } from "node:os";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createDisk, openDisk } from "../../src/storage/open.js";
import type { BlockDevice, DiskFormat } from "../../src/storage/block-device.js";

const MiB = 1024 * 1024;
const args = process.argv.slice(2);
const argValue = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const SIZE = Number(argValue("--size-mib") ?? 256) * MiB;
const RANDOM_OPS = Number(argValue("--random-ops") ?? 32768);
const STRIDE = 4096 * 2477; // ~9.7 MiB, coprime with the 4 KiB slot count of a power-of-two image
const baseDir = argValue("--dir") ?? "/var/tmp";
mkdirSync(baseDir, { recursive: true });
const dir = mkdtempSync(join(baseDir, "partis-bench-"));

interface Kind {
  readonly label: string;
  readonly format: DiskFormat;
  readonly qemu: "raw" | "vpc" | "vhdx" | undefined;
  /** Create the image (fresh) at path; returns the path to open. */
  readonly make: (path: string) => string;
}

const ALL_KINDS: Kind[] = [
  { label: "raw", format: "raw", qemu: "raw", make: (p) => (createDisk(p, "raw", { type: "fixed", size: SIZE }), p) },
  { label: "fixed VHD", format: "vhd", qemu: "vpc", make: (p) => (createDisk(p, "vhd", { type: "fixed", size: SIZE }), p) },
  { label: "dynamic VHD", format: "vhd", qemu: "vpc", make: (p) => (createDisk(p, "vhd", { type: "dynamic", size: SIZE }), p) },
  { label: "dynamic VHDX", format: "vhdx", qemu: "vhdx", make: (p) => (createDisk(p, "vhdx", { type: "dynamic", size: SIZE }), p) },
  {
    label: "3-deep VHD chain",
    format: "vhd",
    qemu: undefined,
    make: (p) => {
      const base = p + ".base.vhd";
      const mid = p + ".mid.vhd";
      createDisk(base, "vhd", { type: "dynamic", size: SIZE });
      const b = openDisk(base);
      const chunk = new Uint8Array(MiB).fill(0x5a);
      for (let o = 0; o < SIZE; o += 2 * MiB) b.write(o, chunk); // half the base holds data
      b.close();
      createDisk(mid, "vhd", { type: "differencing", parentPath: base });
      const m = openDisk(mid);
      for (let o = MiB; o < SIZE; o += 8 * MiB) m.write(o, chunk);
      m.close();
      createDisk(p, "vhd", { type: "differencing", parentPath: mid });
      return p;
    },
  },
];

type Test = "4K random write" | "4K random read" | "1M sequential write" | "1M sequential read";
const ALL_TESTS: Test[] = ["4K random write", "4K random read", "1M sequential write", "1M sequential read"];
/** --only "dynamic VHDX" / --test "1M sequential write": narrow a run (for investigation; --write-docs needs the full set). */
const KINDS = ALL_KINDS.filter((k) => argValue("--only") === undefined || k.label === argValue("--only"));
const TESTS = ALL_TESTS.filter((t) => argValue("--test") === undefined || t === argValue("--test"));

/** Reads are cheap (page cache): they run READ_REPEAT times as many requests to be measurable. */
const READ_REPEAT = 4;

function plan(test: Test): { bs: number; count: number; step: number; write: boolean } {
  const write = test.endsWith("write");
  const repeat = write ? 1 : READ_REPEAT;
  if (test.startsWith("4K")) return { bs: 4096, count: RANDOM_OPS * repeat, step: STRIDE, write };
  return { bs: MiB, count: (SIZE / MiB) * repeat, step: MiB, write };
}

function offsetOf(i: number, step: number, bs: number): number {
  // qemu-img bench: offset += step; wraps to (offset - size) when past the end.
  let off = 0;
  void bs;
  off = (i * step) % SIZE;
  return off;
}

function fill(path: string): void {
  const d = openDisk(path);
  const buf = new Uint8Array(MiB).fill(0xa5);
  for (let o = 0; o < SIZE; o += MiB) d.write(o, buf);
  d.close();
}

/** Seconds for the requests; the closing flush (writes) is timed apart, as qemu-img bench's is not in its figure. */
function partisRun(path: string, test: Test): { seconds: number; flushSeconds: number } {
  const p = plan(test);
  settle();
  const dev: BlockDevice = openDisk(path);
  const buf = new Uint8Array(p.bs).fill(0x3c);
  const t0 = process.hrtime.bigint();
  if (p.write) {
    for (let i = 0; i < p.count; i++) dev.write(offsetOf(i, p.step, p.bs), buf);
  } else {
    for (let i = 0; i < p.count; i++) dev.read(offsetOf(i, p.step, p.bs), buf);
  }
  const t1 = process.hrtime.bigint();
  if (p.write) dev.flush();
  const t2 = process.hrtime.bigint();
  dev.close();
  return { seconds: Number(t1 - t0) / 1e9, flushSeconds: Number(t2 - t1) / 1e9 };
}

function qemuRun(path: string, fmt: string, test: Test): number {
  const p = plan(test);
  settle();
  const a = ["bench", "-f", fmt, "-t", "writeback", "-d", "1", "-c", String(p.count), "-s", String(p.bs), "-S", String(p.step)];
  if (p.write) a.push("-w", `--flush-interval=${p.count}`);
  a.push(path);
  const r = spawnSync("qemu-img", a, { encoding: "utf8" });
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  if (m === null) throw new Error(`qemu-img ${a.join(" ")}: ${r.stdout}${r.stderr}`);
  return Number(m[1]);
}

/** Write back every dirty page first, so no run pays for the previous one's writeback. */
function settle(): void {
  spawnSync("sync");
}

/** Ops/s for 4K tests, MiB/s for 1M tests. */
function rate(test: Test, seconds: number): number {
  const p = plan(test);
  return test.startsWith("4K") ? p.count / seconds : (p.count * p.bs) / MiB / seconds;
}

const results = new Map<string, { partis: number; qemu: number | undefined; flushMs: number }>();
let n = 0;
// Warm-up (JIT, page cache, file system) so the first row is not penalised; not reported.
{
  const warm = join(dir, "warm.img");
  KINDS[0]!.make(warm);
  void partisRun(warm, "4K random write");
  qemuRun(warm, "raw", "4K random write");
  rmSync(warm, { force: true });
}
const REPEAT = Number(argValue("--repeat") ?? 5);
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
// Kinds run interleaved, in an order rotated each repetition, so no kind always
// follows the same neighbour (page-cache and writeback state carry over).
const samples = new Map<string, { partis: number[]; flush: number[]; qemu: number[] }>();
for (const test of TESTS) {
  for (let r = 0; r < REPEAT; r++) {
    const order = KINDS.slice(r % KINDS.length).concat(KINDS.slice(0, r % KINDS.length));
    for (const kind of order) {
      const key = `${kind.label}|${test}`;
      const sample = samples.get(key) ?? { partis: [], flush: [], qemu: [] };
      samples.set(key, sample);
      const path = join(dir, `img${n++}.${kind.format === "raw" ? "img" : kind.format}`);
      const open = kind.make(path);
      if (!test.endsWith("write")) fill(open);
      const measured = partisRun(open, test);
      sample.partis.push(rate(test, measured.seconds));
      sample.flush.push(measured.flushSeconds * 1000);
      for (const f of [path, path + ".base.vhd", path + ".mid.vhd"]) rmSync(f, { force: true });
      if (kind.qemu !== undefined) {
        const qpath = join(dir, `img${n++}.${kind.format === "raw" ? "img" : kind.format}`);
        kind.make(qpath);
        if (!test.endsWith("write")) fill(qpath);
        sample.qemu.push(rate(test, qemuRun(qpath, kind.qemu, test)));
        rmSync(qpath, { force: true });
      }
    }
  }
  for (const kind of KINDS) {
    const s = samples.get(`${kind.label}|${test}`)!;
    results.set(`${kind.label}|${test}`, { partis: median(s.partis), qemu: s.qemu.length > 0 ? median(s.qemu) : undefined, flushMs: median(s.flush) });
    process.stderr.write(`${kind.label.padEnd(18)} ${test.padEnd(20)} partis ${s.partis.map((x) => x.toFixed(0)).join("/")}  qemu ${s.qemu.map((x) => x.toFixed(0)).join("/") || "n/a"}\n`);
  }
}
rmSync(dir, { recursive: true, force: true });

const fmt = (v: number | undefined): string => (v === undefined ? "n/a" : v >= 100 ? v.toFixed(0) : v.toFixed(1));
const lines: string[] = [];
lines.push("| image | 4K rand write IOPS (qemu) | ×raw | ×qemu | then flush (ms) | 4K rand read IOPS (qemu) | 1M seq write MiB/s (qemu) | 1M seq read MiB/s (qemu) |");
lines.push("|---|---|---|---|---|---|---|---|");
const rawWrite = results.get("raw|4K random write")?.partis ?? NaN;
for (const kind of KINDS) {
  const cell = (t: Test): string => {
    const r = results.get(`${kind.label}|${t}`);
    return r === undefined ? "-" : `${fmt(r.partis)} (${fmt(r.qemu)})`;
  };
  const w = results.get(`${kind.label}|4K random write`) ?? { partis: NaN, qemu: undefined, flushMs: NaN };
  lines.push(`| ${kind.label} | ${cell("4K random write")} | ${(w.partis / rawWrite).toFixed(2)} | ${w.qemu === undefined ? "n/a" : (w.partis / w.qemu).toFixed(2)} | ${w.flushMs.toFixed(0)} | ${cell("4K random read")} | ${cell("1M sequential write")} | ${cell("1M sequential read")} |`);
}
const table = lines.join("\n");
process.stdout.write(table + "\n");

if (args.includes("--write-docs") && KINDS.length === ALL_KINDS.length && TESTS.length === ALL_TESTS.length) {
  const machine = `${cpus().length}-core ${cpus()[0]?.model.trim() ?? "CPU"}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, ${osRelease()}, Node ${process.version}, ${spawnSync("qemu-img", ["--version"], { encoding: "utf8" }).stdout.split("\n")[0]}`;
  const section = [
    "## Storage",
    "",
    `Command: \`npx tsc -p . && node dist/bench/storage/disk-io.js --dir ${baseDir} --write-docs\` (${new Date().toISOString().slice(0, 10)}, one run).`,
    `Machine: ${machine}; images on ${baseDir}; load average at the end ${loadavg().map((l) => l.toFixed(1)).join(" / ")} (the machine is shared: other sessions' test runs and a TCG QEMU were active, so expect ±20 % noise between runs).`,
    "",
    `Image size ${SIZE / MiB} MiB. 4K tests: ${RANDOM_OPS} writes / ${RANDOM_OPS * READ_REPEAT} reads at offsets (i × ${STRIDE}) mod size (a wrapping stride: qemu-img bench has no random mode, both sides use the same offsets); 1M tests: one pass over the image for writes, ${READ_REPEAT} for reads. Each figure is the median of ${REPEAT} runs (fresh image each); image kinds interleaved in an order rotated every repetition, each Partis run followed by its qemu run.`,
    "Partis: BlockDevice through the page cache (buffered fds); the closing flush() of the write tests is timed apart (column \"then flush\"), because qemu-img bench's closing flush is not inside its figure (same time with and without `--flush-interval`). qemu: `qemu-img bench -t writeback -d 1 [-w --flush-interval=<count>] -s <bs> -S <step>` on an identical, separately created file. Write tests start from a fresh image (allocation included); read tests from a fully written one; \`sync\` before every timed run. qemu 7.2 cannot open differencing VHDs, so the chain has no qemu numbers.",
    "",
    table,
    "",
    ...(process.env.BENCH_NOTES !== undefined ? [process.env.BENCH_NOTES, ""] : []),
  ].join("\n");
  const docs = join(process.cwd(), "docs", "benchmarks.md");
  const current = existsSync(docs) ? readFileSync(docs, "utf8") : "# Benchmarks\n\n";
  const start = current.indexOf("## Storage");
  let next = start < 0 ? -1 : current.indexOf("\n## ", start + 1);
  let updated: string;
  if (start < 0) updated = current.trimEnd() + "\n\n" + section;
  else {
    if (next < 0) next = current.length;
    else next += 1;
    updated = current.slice(0, start) + section + (next < current.length ? "\n" + current.slice(next) : "");
  }
  writeFileSync(docs, updated);
}

function osRelease(): string {
  try {
    const m = /PRETTY_NAME="([^"]+)"/.exec(readFileSync("/etc/os-release", "utf8"));
    return m?.[1] ?? "Linux";
  } catch {
    return "Linux";
  }
}
