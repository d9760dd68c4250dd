/**
 * Port-I/O exits through the whole `partis run` stack, per kind of vCPU
 * thread (--vcpu-threads worker | native | native-main): a tiny guest makes
 * N `out` exits to an unclaimed port and powers off through ACPI S5; the
 * run is timed end to end, and again with 1 exit, so the difference over N
 * is what one exit costs there (board lookup, hand-offs between threads,
 * the doorbell). Kinds alternate round by round. PARTIS_STATS stays off:
 * its two clock reads per exit would dominate.
 *
 *   npx tsc -p . && node scripts/bundle.mjs && node dist/bench/vcpu-threads/exit-kinds.js [--exits N] [--rounds R]
 *
 * Runs on this PVM host (the guest is a few CPL0 instructions).
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { makeBzImage } from "../../test/fixtures/bzimage.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const KINDS = ["worker", "native", "native-main"] as const;

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

/** mov dx, 0x80; mov ecx, n; loop: out dx, al; dec ecx; jnz loop; then ACPI S5 (PM1a_CNT 0x604 = SLP_EN | S5) and hlt. */
function guest(n: number): Uint8Array {
  return Uint8Array.from([
    0x66, 0xba, 0x80, 0x00,
    0xb9, n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff,
    0xee, 0xff, 0xc9, 0x75, 0xfb,
    0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef,
    0xf4, 0xeb, 0xfd,
  ]);
}

function timedRun(kernel: string, kind: string): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M", "--vcpu-threads", kind], { input: "", encoding: "utf8" });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== 0) throw new Error(`partis run --vcpu-threads ${kind}: status ${r.status}: ${r.stderr.trim()}`);
  return ms;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

const exits = arg("exits", 200_000);
const rounds = arg("rounds", 4);
const dir = mkdtempSync(join(tmpdir(), "partis-exit-kinds-"));
try {
  const many = join(dir, "many");
  const one = join(dir, "one");
  writeFileSync(many, makeBzImage(guest(exits)));
  writeFileSync(one, makeBzImage(guest(1)));
  const runs: Record<string, { many: number[]; one: number[] }> = {};
  for (let r = 0; r < rounds; r++)
    for (const kind of KINDS) {
      const k = (runs[kind] ??= { many: [], one: [] });
      k.one.push(timedRun(one, kind));
      k.many.push(timedRun(many, kind));
    }
  console.log(`# ${exits} port-I/O exits per run, ${rounds} rounds; µs per exit = (run − 1-exit run) / exits`);
  console.log("| kind | run with exits, median (ms) | 1-exit run, median (ms) | µs per exit (median) | runs (ms) |");
  console.log("|---|---:|---:|---:|---|");
  for (const kind of KINDS) {
    const k = runs[kind]!;
    const us = ((median(k.many) - median(k.one)) * 1000) / exits;
    console.log(`| ${kind} | ${median(k.many).toFixed(0)} | ${median(k.one).toFixed(0)} | ${us.toFixed(1)} | ${k.many.map((v) => v.toFixed(0)).join(", ")} |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
