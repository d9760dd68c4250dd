/**
 * Crash safety: a child process (crash-workload.ts) runs random writes on a
 * dynamic VHD, a dynamic VHDX or a differencing child and logs each batch
 * after flush() returned; the parent SIGKILLs it at a random moment. Then
 * the image must open, checkDisk must report no errors (qemu-img check
 * agreeing for VHDX), and every logged write must read back.
 *
 * The workload is a pure function of its seed (plannedWrite), so the batch
 * in flight at the kill is known: its bytes may hold old or new data (the
 * only uncertainty allowed); every other byte must equal the model.
 *
 * A handful of trials by default; 104 with PARTIS_LONG_TESTS=1.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createDisk, openDisk } from "../../../src/storage/open.js";
import { checkDisk } from "../../../src/storage/tools/index.js";
import { plannedWrite, qemuCheck, scratchDir, seededBytes, type PlannedWrite } from "./oracle.js";

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const LONG = process.env.PARTIS_LONG_TESTS === "1";
const TRIALS = LONG ? 104 : 6;
const WORKLOAD = join(fileURLToPath(import.meta.url), "..", "crash-workload.js");
const KINDS = ["vhd-dynamic", "vhdx-dynamic", "vhd-differencing", "vhdx-differencing"] as const;
type Kind = (typeof KINDS)[number];

function prepare(dir: string, kind: Kind): { image: string; baseline: Uint8Array } {
  const format = kind.startsWith("vhdx") ? "vhdx" : "vhd";
  const blockSize = format === "vhdx" ? MiB : 2 * MiB;
  const baseline = new Uint8Array(SIZE);
  if (kind.endsWith("dynamic")) {
    const image = join(dir, `disk.${format}`);
    createDisk(image, format, { type: "dynamic", size: SIZE, blockSize });
    return { image, baseline };
  }
  const base = join(dir, `base.${format}`);
  createDisk(base, format, { type: "dynamic", size: SIZE, blockSize });
  const dev = openDisk(base);
  for (let i = 0; i < 12; i++) {
    const off = (i * 2.5 * MiB) | 0;
    const data = seededBytes(1000 + i, 256 * 1024);
    dev.write(off, data);
    baseline.set(data, off);
  }
  dev.close();
  const image = join(dir, `child.${format}`);
  createDisk(image, format, { type: "differencing", parentPath: base });
  return { image, baseline };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function runUntilKilled(image: string, log: string, seed: number, runMs: number): Promise<void> {
  const child = spawn(process.execPath, [WORKLOAD, image, log, String(seed)], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  const started = Date.now();
  while (!(existsSync(log) && readFileSync(log, "utf8").startsWith("ready"))) {
    if (child.exitCode !== null) throw new Error(`workload exited early (${child.exitCode}): ${stderr}`);
    if (Date.now() - started > 20_000) throw new Error("workload never became ready");
    await sleep(5);
  }
  await sleep(runMs);
  if (child.exitCode !== null) throw new Error(`workload exited early (${child.exitCode}): ${stderr}`);
  child.kill("SIGKILL");
  await exited;
}

function parseLog(log: string, seed: number): PlannedWrite[] {
  const lines = readFileSync(log, "utf8").split("\n").slice(1);
  const writes: PlannedWrite[] = [];
  for (const line of lines) {
    if (line === "") continue;
    const parts = line.split(" ").map(Number);
    if (parts.length !== 4 || parts.some((n) => !Number.isSafeInteger(n))) break; // torn last line
    const [index, offset, length, dataSeed] = parts as [number, number, number, number];
    const w = plannedWrite(seed, index, SIZE);
    assert.deepEqual({ index, offset, length, dataSeed }, { ...w }, "log matches the plan");
    assert.equal(index, writes.length, "log is contiguous");
    writes.push(w);
  }
  return writes;
}

async function trial(kind: Kind, seed: number): Promise<{ logged: number }> {
  const { dir, cleanup } = scratchDir(`crash-${kind}`);
  try {
    const { image, baseline } = prepare(dir, kind);
    const log = join(dir, "writes.log");
    await runUntilKilled(image, log, seed, 40 + (seed * 7919) % 500);
    const logged = parseLog(log, seed);
    const expected = new Uint8Array(baseline);
    for (const w of logged) expected.set(seededBytes(w.dataSeed, w.length), w.offset);
    // The batch in flight (at most 4 writes) may have landed partly.
    const inFlight = [0, 1, 2, 3].map((i) => plannedWrite(seed, logged.length + i, SIZE));
    const dev = openDisk(image);
    const actual = new Uint8Array(SIZE);
    try {
      dev.read(0, actual);
    } finally {
      dev.close();
    }
    if (Buffer.compare(actual, expected) !== 0) {
      const alternatives = inFlight.map((w) => ({ w, data: seededBytes(w.dataSeed, w.length) }));
      for (let i = 0; i < SIZE; i++) {
        if (actual[i] === expected[i]) continue;
        const ok = alternatives.some(({ w, data }) => i >= w.offset && i < w.offset + w.length && data[i - w.offset] === actual[i]);
        if (!ok) {
          const owner = [...logged].reverse().find((w) => i >= w.offset && i < w.offset + w.length);
          assert.fail(`${kind} seed ${seed}: byte ${i} reads ${actual[i]}, expected ${expected[i]} (last logged write covering it: ${owner ? `#${owner.index}` : "none"}; ${logged.length} logged)`);
        }
      }
    }
    const check = checkDisk(image);
    const errors = check.layers.flatMap((l) => l.findings.filter((f) => f.severity === "error").map((f) => `${l.path}: ${f.message}`));
    assert.deepEqual(errors, [], `${kind} seed ${seed}: checkDisk`);
    if (kind === "vhdx-dynamic") {
      const q = qemuCheck(image, "vhdx");
      assert.ok(q.status === 0 || q.status === 3, `qemu-img check (${q.status}): ${q.output}`);
    }
    return { logged: logged.length };
  } finally {
    cleanup();
  }
}

test(`crash safety: ${TRIALS} SIGKILL trials over dynamic VHD/VHDX and differencing children`, { timeout: LONG ? 1_800_000 : 120_000 }, async () => {
  let total = 0;
  for (let t = 0; t < TRIALS; t++) {
    const kind = KINDS[t % KINDS.length]!;
    const seed = 0x5eed0000 + t * 31 + (LONG ? 7 : 0);
    const r = await trial(kind, seed);
    total += r.logged;
  }
  process.stdout.write(`# ${TRIALS} trials, ${total} flushed writes logged and verified\n`);
  assert.ok(total > 0, "some writes were logged before the kills");
});
