import { test } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConsoleOutputFlusher, ConsoleOutputRing } from "../../src/worker/console-output.js";

function expected(total: number): Uint8Array {
  const b = new Uint8Array(total);
  for (let i = 0; i < total; i++) b[i] = i % 251;
  return b;
}

async function until(cond: () => boolean, what: string, limitMs = 10_000): Promise<void> {
  const end = Date.now() + limitMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`gave up waiting: ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

test("console output from another thread reaches the descriptor complete and in order, through a ring much smaller than it", async () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-console-"));
  const path = join(dir, "out");
  const fd = openSync(path, "w");
  try {
    const ring = ConsoleOutputRing.create(256); // the writer wraps it and waits for room thousands of times
    const flusher = new ConsoleOutputFlusher(ring, fd);
    flusher.start();
    const total = 200_000;
    const w = new Worker(new URL("./console-writer-thread.js", import.meta.url), { workerData: { ring: ring.buffer, total } });
    await new Promise<void>((resolve, reject) => {
      w.once("message", () => resolve());
      w.once("error", reject);
    });
    await w.terminate();
    flusher.finish();
    assert.equal(flusher.failure, undefined);
    assert.deepEqual(new Uint8Array(readFileSync(path)), expected(total));
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a flusher that went idle is woken by the next byte, without a final flush", async () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-console-"));
  const path = join(dir, "out");
  const fd = openSync(path, "w");
  const ring = ConsoleOutputRing.create(1024);
  // No periodic look while idle: only the writer's wake-up can get the bytes out.
  const flusher = new ConsoleOutputFlusher(ring, fd, { idleCheckMs: 3_600_000 });
  try {
    flusher.start();
    const sink = ring.writer();
    sink.write(Uint8Array.of(0x41, 0x42));
    await until(() => statSync(path).size === 2, "the first two bytes");
    // Idle now (nothing came for a while): a single byte must wake the flusher again.
    await new Promise((r) => setTimeout(r, 50));
    sink.write(Uint8Array.of(0x43));
    await until(() => statSync(path).size === 3, "the byte written after the flusher went idle");
    assert.equal(readFileSync(path, "latin1"), "ABC");
  } finally {
    flusher.finish();
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a reader that stops reading fills the ring; closing it releases the writer and the rest is dropped", async () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-console-"));
  const fifo = join(dir, "fifo");
  assert.equal(spawnSync("mkfifo", [fifo]).status, 0);
  // Read-write, so opening does not wait for a reader; nobody reads it: the pipe fills (64 KiB).
  const fd = openSync(fifo, "r+");
  const ring = ConsoleOutputRing.create(4096);
  const flusher = new ConsoleOutputFlusher(ring, fd);
  try {
    flusher.start();
    const total = 200_000;
    const w = new Worker(new URL("./console-writer-thread.js", import.meta.url), { workerData: { ring: ring.buffer, total } });
    const done = new Promise<void>((resolve, reject) => {
      w.once("message", () => resolve());
      w.once("error", reject);
    });
    // The pipe and then the ring fill up; the writer waits for room (a guest would be slowed, not lose output).
    await until(() => ring.pending === ring.capacity, "a full ring");
    let finished = false;
    void done.then(() => (finished = true));
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(finished, false, "the writer went on with the ring full");
    ring.close();
    await done;
    await w.terminate();
    flusher.finish(); // waits for the reader a bounded time, then drops what is left
    assert.equal(ring.pending, 0);
    // What did get through is the stream's start, in order.
    const got = new Uint8Array(1000);
    assert.equal(readSync(fd, got, 0, got.length, null), got.length);
    assert.deepEqual(got, expected(1000));
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});
