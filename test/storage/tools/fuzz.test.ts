/**
 * Fuzz harness for the VHD and VHDX readers: seeded mutations (bit flips,
 * random bytes, boundary integers, zeroed runs, truncation, appended
 * garbage; half of the structure mutations re-seal the checksum) of small
 * valid images, in headers, footers, BATs, region tables, metadata, parent
 * locators and the log. Per case, open/read/describe/check must work or
 * throw a DiskError naming the file; a read-only pass must not write to the
 * file (ctime/mtime/size every case, full content every tenth); a read-write open + small write must keep the file size within
 * one block of growth. Runs in a worker thread watched for hangs (a case
 * taking longer than CASE_TIMEOUT_MS fails the test, naming the case).
 *
 * 10,000 cases by default, 100,000 with PARTIS_LONG_TESTS=1;
 * PARTIS_FUZZ_SEED picks another seed (cases are reproducible by number).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import { scratchDir } from "./oracle.js";
import type { FuzzWorkerInput, FuzzWorkerReport } from "./fuzz-worker.js";

const LONG = process.env.PARTIS_LONG_TESTS === "1";
const CASES = Number(process.env.PARTIS_FUZZ_CASES ?? (LONG ? 100_000 : 10_000));
const SEED = Number(process.env.PARTIS_FUZZ_SEED ?? 20240601);
const CASE_TIMEOUT_MS = 5_000;
const WORKER = join(fileURLToPath(import.meta.url), "..", "fuzz-worker.js");

function runWorker(dir: string, first: number, count: number): Promise<FuzzWorkerReport> {
  const progress = new SharedArrayBuffer(4);
  const view = new Int32Array(progress);
  Atomics.store(view, 0, -1);
  const input: FuzzWorkerInput = { dir, seed: SEED, first, count, progress };
  const worker = new Worker(WORKER, { workerData: input });
  return new Promise((resolve, reject) => {
    let lastCase = -2;
    let since = Date.now();
    const watchdog = setInterval(() => {
      const now = Atomics.load(view, 0);
      if (now !== lastCase) {
        lastCase = now;
        since = Date.now();
      } else if (Date.now() - since > (now < 0 ? 60_000 : CASE_TIMEOUT_MS)) {
        clearInterval(watchdog);
        void worker.terminate();
        reject(new Error(`fuzz case ${now} (seed ${SEED}) ran longer than ${CASE_TIMEOUT_MS} ms: a hang`));
      }
    }, 100);
    worker.on("message", (msg: { report?: FuzzWorkerReport; error?: string }) => {
      clearInterval(watchdog);
      if (msg.report !== undefined) resolve(msg.report);
      else reject(new Error(`fuzz worker failed: ${msg.error}`));
      void worker.terminate();
    });
    worker.on("error", (e) => {
      clearInterval(watchdog);
      reject(e);
    });
  });
}

test(`fuzz: ${CASES} mutated VHD/VHDX images open, read, describe and check safely`, { timeout: LONG ? 3_600_000 : 300_000 }, async () => {
  const shm = existsSync("/dev/shm") ? "/dev/shm" : undefined;
  if (shm !== undefined && process.env.PARTIS_TEST_TMP === undefined) process.env.PARTIS_TEST_TMP = shm;
  const scratch = [scratchDir("fuzz-a"), scratchDir("fuzz-b")];
  try {
    // Two workers (one per core), each on its own copies of the images.
    const half = Math.ceil(CASES / 2);
    const parts = await Promise.all([runWorker(scratch[0]!.dir, 0, half), runWorker(scratch[1]!.dir, half, CASES - half)]);
    const report: FuzzWorkerReport = {
      cases: parts[0]!.cases + parts[1]!.cases,
      opened: parts[0]!.opened + parts[1]!.opened,
      rejected: parts[0]!.rejected + parts[1]!.rejected,
      codes: mergeCounts(parts[0]!.codes, parts[1]!.codes),
      times: mergeCounts(parts[0]!.times, parts[1]!.times),
      failures: [...parts[0]!.failures, ...parts[1]!.failures],
      images: parts[0]!.images,
    };
    const summary = `${report.cases} cases: ${report.opened} opened, ${report.rejected} rejected; codes ${JSON.stringify(report.codes)}; ms ${JSON.stringify(report.times)}; images: ${report.images.join(", ")}`;
    process.stdout.write(`# ${summary}\n`);
    assert.deepEqual(report.failures, [], summary);
    assert.ok(report.opened > 0 && report.rejected > 0, "mutations both pass and fail validation");
  } finally {
    for (const s of scratch) s.cleanup();
  }
});

function mergeCounts(a: Record<string, number>, b: Record<string, number>): Record<string, number> {
  const out = { ...a };
  for (const [k, v] of Object.entries(b)) out[k] = (out[k] ?? 0) + v;
  return out;
}
