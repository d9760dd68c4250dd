/**
 * Dirty logs: images left with a log entry written but not applied, by QEMU
 * (qemu-io stopped under gdb at the flush after its log write, then killed),
 * by a Partis commit stopped after its log write (test fault), and by a
 * Partis process killed with SIGKILL while writing and flushing.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { DiskError } from "../../../src/storage/block-device.js";
import { vhdxDriver, VhdxDisk } from "../../../src/storage/vhdx/index.js";
import { hasTool, MiB, QEMU, run, tempDir } from "./fixtures.js";

const dir = tempDir("log");
const here = nodePath.dirname(fileURLToPath(import.meta.url));

function readAt(path: string, off: number, len: number, readOnly: boolean): Buffer {
  const d = VhdxDisk.open(path, { readOnly });
  try {
    const b = Buffer.alloc(len);
    d.read(off, b);
    return b;
  } finally {
    d.close();
  }
}

test("QEMU-made dirty log: read-only in-memory replay, read-write replay, QEMU agrees afterwards", { skip: QEMU && hasTool("gdb") ? false : "needs qemu-io and gdb" }, () => {
  const p = nodePath.join(dir, "qemu-dirty.vhdx");
  run("qemu-img", ["create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=1M", p, "16M"]);
  // qemu-io's fdatasync calls for one allocating write: 2 (open: headers), 1 (payload),
  // 2 (headers: new LogGuid), then the flush after the log entry. Stop at that 6th
  // call and kill: the entry is in the file, the BAT update is not.
  spawnSync("gdb", ["-q", "-batch", "-ex", "set breakpoint pending on", "-ex", "break fdatasync", "-ex", "run", "-ex", "ignore 1 4", "-ex", "continue", "-ex", "kill",
    "--args", "qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 1M 64k", p], { stdio: "ignore", timeout: 60000 });
  const info = spawnSync("qemu-img", ["info", p], { encoding: "utf8" });
  assert.match(info.stderr + info.stdout, /replay/i, "QEMU should see a log that needs replay");
  assert.equal(vhdxDriver.describe(p).logReplayNeeded, true);
  assert.ok(vhdxDriver.check(p).some((f) => f.severity === "error" && /log needs replay/.test(f.message)));
  const before = fs.readFileSync(p);
  assert.ok(readAt(p, MiB, 64 * 1024, true).equals(Buffer.alloc(64 * 1024, 0x5a)));
  assert.ok(fs.readFileSync(p).equals(before), "read-only open must not write");
  assert.ok(readAt(p, MiB, 64 * 1024, false).equals(Buffer.alloc(64 * 1024, 0x5a)));
  assert.equal(vhdxDriver.describe(p).logReplayNeeded, false);
  run("qemu-img", ["check", "-f", "vhdx", p]);
  run("qemu-io", ["-f", "vhdx", "-r", "-c", "read -P 0x5a 1M 64k", p]);
});

test("Partis-made dirty log (commit stopped after the log write) replays; check --repair replays", () => {
  for (const mode of ["open", "repair"] as const) {
    const p = nodePath.join(dir, `partis-dirty-${mode}.vhdx`);
    vhdxDriver.create(p, { type: "dynamic", size: 8 * MiB, blockSize: MiB });
    const d = VhdxDisk.open(p);
    d.write(2 * MiB + 100, Buffer.alloc(3000, 0x3c));
    d.fault = { afterLogWrite: true };
    assert.throws(() => d.flush(), /test fault/);
    // Abandon the handle the way a crash would (no close: LogGuid stays set).
    (d.image.file as unknown as { close(): void }).close();
    assert.equal(vhdxDriver.describe(p).logReplayNeeded, true);
    if (QEMU) assert.notEqual(spawnSync("qemu-img", ["info", p]).status, 0, "QEMU refuses a dirty image");
    assert.ok(readAt(p, 2 * MiB + 100, 3000, true).equals(Buffer.alloc(3000, 0x3c)));
    if (mode === "open") assert.ok(readAt(p, 2 * MiB + 100, 3000, false).equals(Buffer.alloc(3000, 0x3c)));
    else {
      const found = vhdxDriver.check(p, { repair: true });
      assert.ok(found.some((f) => f.severity === "repaired" && /replay/.test(f.message)), JSON.stringify(found));
    }
    assert.equal(vhdxDriver.describe(p).logReplayNeeded, false);
    assert.deepEqual(vhdxDriver.check(p), []);
    if (QEMU) run("qemu-io", ["-f", "vhdx", "-r", "-c", "read -P 0x3c 2097252 3000", p]);
  }
});

test("no crash leaves a LogGuid with nothing to replay: a session's first change, and its first log entry not yet named in the header, leave an image that opens clean", () => {
  for (const when of ["after the first change", "after the log entry, before the header names it"] as const) {
    const p = nodePath.join(dir, `partis-window-${when === "after the first change" ? "change" : "entry"}.vhdx`);
    vhdxDriver.create(p, { type: "dynamic", size: 8 * MiB, blockSize: MiB });
    const d = VhdxDisk.open(p);
    d.write(3 * MiB, Buffer.alloc(4096, 0x77)); // allocates a block: FileWriteGuid/DataWriteGuid change at once, the BAT waits for the commit
    if (when === "after the log entry, before the header names it") {
      d.fault = { afterLogEntry: true };
      assert.throws(() => d.flush(), /test fault/);
    }
    // Abandon the handle as a crash would.
    (d.image.file as unknown as { close(): void }).close();
    assert.equal(vhdxDriver.describe(p).logReplayNeeded, false, `${when}: the header names no log`);
    assert.deepEqual(vhdxDriver.check(p).filter((f) => f.severity === "error"), [], when);
    // The BAT entry never committed: the block reads as never written (its payload is unreferenced space).
    assert.ok(readAt(p, 3 * MiB, 4096, false).equals(Buffer.alloc(4096)), when);
    if (QEMU) run("qemu-img", ["check", "-f", "vhdx", p]);
  }
});

test("a full log ring starts again under a new LogGuid: the header drops the old one first and names the new one once its first entry is stable; every write survives reopening", () => {
  const p = nodePath.join(dir, "partis-ring-wrap.vhdx");
  vhdxDriver.create(p, { type: "dynamic", size: 256 * MiB, blockSize: MiB });
  const d = VhdxDisk.open(p);
  const guids = new Set<string>();
  // Each flush commits one entry; 1 MiB of log holds fewer entries than this, so the ring starts again.
  for (let i = 0; i < 200; i++) {
    d.write(i * MiB, Buffer.alloc(512, (i % 250) + 1));
    d.flush();
    guids.add(Buffer.from(d.image.header.logGuid).toString("hex"));
  }
  assert.ok(guids.size > 1, `the log started again (${guids.size} LogGuids)`);
  // A crash right after a new log's entry, before the header names it: the previous log is already void.
  d.write(201 * MiB, Buffer.alloc(512, 0x99));
  d.fault = { afterLogEntry: true };
  assert.throws(() => d.flush(), /test fault/);
  (d.image.file as unknown as { close(): void }).close();
  const r = VhdxDisk.open(p);
  try {
    const b = Buffer.alloc(512);
    for (let i = 0; i < 200; i++) {
      r.read(i * MiB, b);
      assert.ok(b.every((x) => x === (i % 250) + 1), `block ${i}`);
    }
  } finally {
    r.close();
  }
  assert.deepEqual(vhdxDriver.check(p).filter((f) => f.severity === "error"), []);
  if (QEMU) run("qemu-img", ["check", "-f", "vhdx", p]);
});

test("Partis process killed with SIGKILL mid-run: flushed writes survive, image opens and checks clean", async () => {
  const p = nodePath.join(dir, "killed.vhdx");
  vhdxDriver.create(p, { type: "dynamic", size: 64 * MiB, blockSize: MiB });
  const child = spawn(process.execPath, [nodePath.join(here, "killed-writer.js"), p], { stdio: ["ignore", "pipe", "inherit"] });
  let flushed = -1;
  await new Promise<void>((resolve) => {
    child.stdout.on("data", (chunk: Buffer) => {
      for (const line of chunk.toString().split("\n")) if (/^\d+$/.test(line)) flushed = Number(line);
      if (flushed >= 12) child.kill("SIGKILL");
    });
    child.on("exit", () => resolve());
  });
  assert.ok(flushed >= 12);
  const d = VhdxDisk.open(p);
  const b = Buffer.alloc(MiB);
  for (let i = 0; i < 64; i++) {
    d.read(i * MiB, b);
    const expect = i <= flushed ? (i + 1) & 0xff : undefined;
    if (expect !== undefined) assert.ok(b.every((x) => x === expect), `block ${i} lost after flush`);
    else assert.ok(b.every((x) => x === 0) || b.every((x) => x === ((i + 1) & 0xff)), `block ${i} torn`);
  }
  d.close();
  assert.deepEqual(vhdxDriver.check(p).filter((f) => f.severity === "error"), []);
  if (QEMU) run("qemu-img", ["check", "-f", "vhdx", p]);
});

test("corrupt header CRC falls back to the other header; both bad is a clear error", () => {
  const p = nodePath.join(dir, "headers.vhdx");
  vhdxDriver.create(p, { type: "dynamic", size: 4 * MiB, blockSize: MiB });
  const d = VhdxDisk.open(p);
  d.write(0, Buffer.alloc(512, 8));
  d.close();
  const fd = fs.openSync(p, "r+");
  // Corrupt whichever header is current (higher sequence number).
  const seq = (o: number): bigint => { const b = Buffer.alloc(8); fs.readSync(fd, b, 0, 8, o + 8); return b.readBigUInt64LE(0); };
  const cur = seq(128 * 1024) > seq(64 * 1024) ? 128 * 1024 : 64 * 1024;
  fs.writeSync(fd, Buffer.from([0xff]), 0, 1, cur + 100);
  fs.closeSync(fd);
  assert.equal(readAt(p, 0, 512, true)[0], 8);
  const found = vhdxDriver.check(p);
  assert.ok(found.some((f) => f.severity === "error" && f.offset === cur && /CRC/.test(f.message)));
  assert.ok(vhdxDriver.check(p, { repair: true }).some((f) => f.severity === "repaired"));
  assert.deepEqual(vhdxDriver.check(p), []);
  const fd2 = fs.openSync(p, "r+");
  fs.writeSync(fd2, Buffer.from([0xff]), 0, 1, 64 * 1024 + 100);
  fs.writeSync(fd2, Buffer.from([0xff]), 0, 1, 128 * 1024 + 100);
  fs.closeSync(fd2);
  assert.throws(() => VhdxDisk.open(p, { readOnly: true }), (e: unknown) => e instanceof DiskError && e.code === "VHDX_NO_VALID_HEADER" && e.message.includes(p));
});
