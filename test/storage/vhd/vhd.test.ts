/**
 * VHD driver: round trips against an in-memory model (fixed, dynamic,
 * differencing), checksum verification, parent identity, chains, limits,
 * crash tolerance (missing end footer), resize and setParent.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { createHash } from "node:crypto";
import { DiskError } from "../../../src/storage/block-device.js";
import { createDisk, describeDisk, openDisk } from "../../../src/storage/open.js";
import { VhdDisk, vhdDriver, MAX_VHD_SIZE } from "../../../src/storage/vhd/index.js";
import { chsGeometry, decodeFooter } from "../../../src/storage/vhd/spec.js";
import { rng } from "../tools/oracle.js";

const MiB = 1024 * 1024;

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "partis-vhd-"));
}

function sha(file: string): string {
  return createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

function randomWrites(disk: { write(o: number, b: Uint8Array): void; size: number }, model: Uint8Array, seed: number, count: number, maxLen: number): void {
  const r = rng(seed);
  for (let i = 0; i < count; i++) {
    const len = 1 + Math.floor(r() * maxLen);
    const off = Math.floor(r() * (disk.size - len));
    const buf = new Uint8Array(len);
    for (let k = 0; k < len; k++) buf[k] = Math.floor(r() * 256);
    disk.write(off, buf);
    model.set(buf, off);
  }
}

function assertSameAsModel(disk: { read(o: number, b: Uint8Array): void; size: number }, model: Uint8Array, seed: number): void {
  const whole = new Uint8Array(disk.size);
  disk.read(0, whole);
  assert.ok(Buffer.from(whole).equals(Buffer.from(model)), "full read differs from the model");
  const r = rng(seed);
  for (let i = 0; i < 50; i++) {
    const len = 1 + Math.floor(r() * 70000);
    const off = Math.floor(r() * (disk.size - len));
    const b = new Uint8Array(len);
    disk.read(off, b);
    assert.ok(Buffer.from(b).equals(Buffer.from(model.subarray(off, off + len))), `read at ${off}+${len} differs`);
  }
}

for (const type of ["fixed", "dynamic"] as const) {
  test(`${type}: random unaligned writes match an in-memory model, across reopen`, () => {
    const dir = tmpDir();
    const p = path.join(dir, `${type}.vhd`);
    const size = 12 * MiB + 7 * 512; // not a multiple of the block size
    createDisk(p, "vhd", { type, size, blockSize: type === "dynamic" ? 1 * MiB : undefined });
    const model = new Uint8Array(size);
    let d = openDisk(p);
    assert.equal(d.format, "vhd");
    assert.equal(d.type, type);
    assert.equal(d.size, size);
    randomWrites(d, model, 1, 300, 40000);
    assertSameAsModel(d, model, 2);
    d.close();
    d = openDisk(p, { readOnly: true });
    assertSameAsModel(d, model, 3);
    d.close();
    assert.deepEqual(vhdDriver.check(p), []);
    fs.rmSync(dir, { recursive: true });
  });
}

test("differencing: writes land only in the child, reads fall through, parent bytes unchanged", () => {
  const dir = tmpDir();
  const base = path.join(dir, "base.vhd");
  const child = path.join(dir, "child.vhd");
  const size = 8 * MiB;
  createDisk(base, "vhd", { type: "dynamic", size });
  const model = new Uint8Array(size);
  const b = openDisk(base);
  randomWrites(b, model, 10, 100, 30000);
  b.close();
  const baseHash = sha(base);
  createDisk(child, "vhd", { type: "differencing", parentPath: base });
  const c = openDisk(child);
  assert.equal(c.type, "differencing");
  assert.ok(c.parent !== undefined && c.parent.readOnly);
  assertSameAsModel(c, model, 11);
  randomWrites(c, model, 12, 200, 20000);
  assertSameAsModel(c, model, 13);
  c.close();
  assert.equal(sha(base), baseHash, "parent file changed");
  const again = openDisk(child, { readOnly: true });
  assertSameAsModel(again, model, 14);
  // Allocation of the child alone: something allocated, not everything.
  const ext = again.allocation(0, size);
  assert.ok(ext.some((e) => e.state === "allocated") && ext.some((e) => e.state === "unallocated"));
  again.close();
  assert.deepEqual(vhdDriver.check(child), []);
  fs.rmSync(dir, { recursive: true });
});

test("chain of depth 3: each layer shadows the ones below", () => {
  const dir = tmpDir();
  const a = path.join(dir, "a.vhd");
  const b = path.join(dir, "b.vhd");
  const c = path.join(dir, "c.vhd");
  const size = 4 * MiB;
  createDisk(a, "vhd", { type: "fixed", size });
  const model = new Uint8Array(size);
  let d = openDisk(a);
  d.write(0, new Uint8Array(3 * MiB).fill(0xaa));
  model.fill(0xaa, 0, 3 * MiB);
  d.close();
  createDisk(b, "vhd", { type: "differencing", parentPath: a });
  d = openDisk(b);
  d.write(MiB + 100, new Uint8Array(MiB).fill(0xbb));
  model.fill(0xbb, MiB + 100, 2 * MiB + 100);
  d.close();
  createDisk(c, "vhd", { type: "differencing", parentPath: b, blockSize: 512 * 1024 });
  d = openDisk(c);
  d.write(2 * MiB - 3, new Uint8Array(10).fill(0xcc));
  model.fill(0xcc, 2 * MiB - 3, 2 * MiB + 7);
  assertSameAsModel(d, model, 20);
  assert.equal(d.parent?.parent?.type, "fixed");
  d.close();
  const chainHashes = [sha(a), sha(b)];
  d = openDisk(c, { readOnly: true });
  assertSameAsModel(d, model, 21);
  d.close();
  assert.deepEqual([sha(a), sha(b)], chainHashes);
  fs.rmSync(dir, { recursive: true });
});

test("parent found by relative locator after the chain moves; UUID mismatch refused naming both files", () => {
  const dir = tmpDir();
  const base = path.join(dir, "base.vhd");
  const child = path.join(dir, "child.vhd");
  createDisk(base, "vhd", { type: "dynamic", size: 2 * MiB });
  createDisk(child, "vhd", { type: "differencing", parentPath: base });
  const moved = tmpDir();
  fs.renameSync(base, path.join(moved, "base.vhd"));
  fs.renameSync(child, path.join(moved, "child.vhd"));
  const d = openDisk(path.join(moved, "child.vhd"));
  assert.equal(d.parent?.path, path.join(moved, "base.vhd"));
  d.close();
  // Replace the parent by another disk of the same name.
  fs.rmSync(path.join(moved, "base.vhd"));
  createDisk(path.join(moved, "base.vhd"), "vhd", { type: "dynamic", size: 2 * MiB });
  assert.throws(
    () => openDisk(path.join(moved, "child.vhd")),
    (e: unknown) =>
      e instanceof DiskError &&
      e.code === "PARENT_MISMATCH" &&
      e.message.includes(path.join(moved, "child.vhd")) &&
      e.message.includes(path.join(moved, "base.vhd")),
  );
  // setParent refuses too, unless forced; then the chain opens.
  assert.throws(() => vhdDriver.setParent(path.join(moved, "child.vhd"), path.join(moved, "base.vhd")), /PARENT_MISMATCH|identity/);
  vhdDriver.setParent(path.join(moved, "child.vhd"), path.join(moved, "base.vhd"), { force: true });
  openDisk(path.join(moved, "child.vhd")).close();
  fs.rmSync(dir, { recursive: true });
  fs.rmSync(moved, { recursive: true });
});

test("setParent to a renamed parent with the same identity", () => {
  const dir = tmpDir();
  const base = path.join(dir, "base.vhd");
  const child = path.join(dir, "child.vhd");
  createDisk(base, "vhd", { type: "dynamic", size: 2 * MiB });
  const w = openDisk(base);
  w.write(0, new Uint8Array(512).fill(7));
  w.close();
  createDisk(child, "vhd", { type: "differencing", parentPath: base });
  const sub = path.join(dir, "sub");
  fs.mkdirSync(sub);
  fs.renameSync(base, path.join(sub, "renamed.vhd"));
  assert.throws(() => openDisk(child), (e: unknown) => e instanceof DiskError && e.code === "PARENT_NOT_FOUND");
  vhdDriver.setParent(child, path.join(sub, "renamed.vhd"));
  const d = openDisk(child);
  const b = new Uint8Array(512);
  d.read(0, b);
  assert.equal(b[0], 7);
  d.close();
  const desc = describeDisk(child);
  assert.equal(desc.parentPath, path.join(sub, "renamed.vhd"));
  assert.ok(desc.parentLocators?.some((l) => l.kind === "relative" && l.path === ".\\sub\\renamed.vhd"));
  assert.deepEqual(vhdDriver.check(child), []);
  fs.rmSync(dir, { recursive: true });
});

test("a flipped byte is refused with the file and the structure named", () => {
  const dir = tmpDir();
  const dyn = path.join(dir, "d.vhd");
  createDisk(dyn, "vhd", { type: "dynamic", size: 4 * MiB });
  const fd = fs.openSync(dyn, "r+");
  fs.writeSync(fd, Buffer.from([0x42]), 0, 1, 512 + 40); // inside the dynamic header
  fs.closeSync(fd);
  assert.throws(
    () => openDisk(dyn),
    (e: unknown) => e instanceof DiskError && e.code === "VHD_BAD_HEADER" && e.message.includes(dyn) && /dynamic header at offset 512: checksum/.test(e.message),
  );
  const fixed = path.join(dir, "f.vhd");
  createDisk(fixed, "vhd", { type: "fixed", size: 1 * MiB });
  const fd2 = fs.openSync(fixed, "r+");
  fs.writeSync(fd2, Buffer.from([0x99]), 0, 1, MiB + 100);
  fs.closeSync(fd2);
  assert.throws(
    () => vhdDriver.open(fixed),
    (e: unknown) => e instanceof DiskError && e.code === "VHD_BAD_FOOTER" && e.message.includes(fixed) && e.message.includes(`footer at offset ${MiB}`),
  );
  const findings = vhdDriver.check(fixed);
  assert.equal(findings[0]?.severity, "error");
  fs.rmSync(dir, { recursive: true });
});

test("2040 GiB limit: larger sizes refused; a 2040 GiB dynamic disk stays sparse when written at its end", () => {
  const dir = tmpDir();
  assert.throws(
    () => createDisk(path.join(dir, "big.vhd"), "vhd", { type: "dynamic", size: 2048 * 1024 * MiB }),
    (e: unknown) => e instanceof DiskError && e.code === "VHD_TOO_LARGE" && /2040 GiB/.test(e.message),
  );
  assert.equal(fs.existsSync(path.join(dir, "big.vhd")), false);
  const p = path.join(dir, "max.vhd");
  createDisk(p, "vhd", { type: "dynamic", size: MAX_VHD_SIZE });
  const d = openDisk(p);
  assert.equal(d.size, MAX_VHD_SIZE);
  const data = new Uint8Array(4096).fill(0x77);
  d.write(MAX_VHD_SIZE - 4096, data);
  d.close();
  const st = fs.statSync(p);
  assert.ok(st.blocks * 512 < 16 * MiB, `allocated ${st.blocks * 512} bytes`);
  const r = openDisk(p, { readOnly: true });
  const back = new Uint8Array(8192);
  r.read(MAX_VHD_SIZE - 8192, back);
  assert.ok(back.subarray(0, 4096).every((x) => x === 0) && back.subarray(4096).every((x) => x === 0x77));
  r.close();
  fs.rmSync(dir, { recursive: true });
});

test("missing end footer: open uses the copy at offset 0; check reports, --repair restores", () => {
  const dir = tmpDir();
  const p = path.join(dir, "d.vhd");
  createDisk(p, "vhd", { type: "dynamic", size: 8 * MiB });
  let d = openDisk(p);
  d.write(3 * MiB, new Uint8Array(1000).fill(3));
  d.close();
  const size = fs.statSync(p).size;
  // Simulate a torn footer write (and an interrupted allocation's tail after it).
  fs.truncateSync(p, size - 512);
  fs.appendFileSync(p, new Uint8Array(3000).fill(0xee));
  d = openDisk(p, { readOnly: true });
  assert.ok((d as VhdDisk).warnings.some((w) => /using the copy at offset 0/.test(w)));
  const b = new Uint8Array(1000);
  d.read(3 * MiB, b);
  assert.ok(b.every((x) => x === 3));
  d.close();
  assert.ok(vhdDriver.check(p).some((f) => f.severity === "error"));
  const fixed = vhdDriver.check(p, { repair: true });
  assert.ok(fixed.some((f) => f.severity === "repaired"));
  assert.deepEqual(vhdDriver.check(p), []);
  assert.equal(fs.statSync(p).size, size);
  // Writable open with a missing footer also restores it at the next flush.
  fs.truncateSync(p, size - 512);
  d = openDisk(p);
  d.write(5 * MiB, new Uint8Array(10).fill(5));
  d.close();
  assert.deepEqual(vhdDriver.check(p), []);
  fs.rmSync(dir, { recursive: true });
});

test("unflushed allocation after a crash: flushed data reads back, the leak is trimmed by repair", () => {
  const dir = tmpDir();
  const p = path.join(dir, "d.vhd");
  createDisk(p, "vhd", { type: "dynamic", size: 8 * MiB });
  const d = openDisk(p);
  d.write(0, new Uint8Array(512).fill(1));
  d.flush();
  const snapshot = fs.readFileSync(p);
  // A second allocation whose metadata never reaches the file: emulate the
  // crash by copying the file before flush/close.
  d.write(4 * MiB, new Uint8Array(512).fill(2));
  const crashed = path.join(dir, "crashed.vhd");
  fs.writeFileSync(crashed, fs.readFileSync(p));
  d.close();
  assert.ok(fs.readFileSync(crashed).length > snapshot.length);
  const c = openDisk(crashed);
  const b = new Uint8Array(512);
  c.read(0, b);
  assert.ok(b.every((x) => x === 1));
  c.read(4 * MiB, b);
  assert.ok(b.every((x) => x === 0), "unflushed block must not be visible");
  c.write(6 * MiB, new Uint8Array(512).fill(6));
  c.close();
  assert.ok(vhdDriver.check(crashed).every((f) => f.severity !== "error"));
  const r = openDisk(crashed, { readOnly: true });
  r.read(6 * MiB, b);
  assert.ok(b.every((x) => x === 6));
  r.close();
  fs.rmSync(dir, { recursive: true });
});

test("resize: grow fixed and dynamic (BAT in place and relocated), shrink only an unallocated tail", () => {
  const dir = tmpDir();
  const f = path.join(dir, "f.vhd");
  createDisk(f, "vhd", { type: "fixed", size: 2 * MiB });
  let d = openDisk(f);
  d.write(2 * MiB - 512, new Uint8Array(512).fill(9));
  d.close();
  vhdDriver.resize(f, 3 * MiB);
  d = openDisk(f);
  assert.equal(d.size, 3 * MiB);
  const tail = new Uint8Array(MiB + 512);
  d.read(2 * MiB - 512, tail);
  assert.ok(tail.subarray(0, 512).every((x) => x === 9) && tail.subarray(512).every((x) => x === 0), "old footer must read as zeros");
  d.close();
  assert.throws(() => vhdDriver.resize(f, MiB), /SHRINK|data/);
  vhdDriver.resize(f, 2 * MiB);
  assert.equal(describeDisk(f).virtualSize, 2 * MiB);

  const y = path.join(dir, "y.vhd");
  createDisk(y, "vhd", { type: "dynamic", size: 4 * MiB, blockSize: 64 * 1024 });
  d = openDisk(y);
  d.write(100, new Uint8Array(70000).fill(4));
  d.close();
  // 64 entries (256 bytes) -> 512 entries: past the BAT's sector, blocks follow it: relocation.
  vhdDriver.resize(y, 32 * MiB);
  assert.deepEqual(vhdDriver.check(y), []);
  d = openDisk(y);
  assert.equal(d.size, 32 * MiB);
  d.write(32 * MiB - 10, new Uint8Array(10).fill(8));
  const b = new Uint8Array(70000);
  d.read(100, b);
  assert.ok(b.every((x) => x === 4));
  d.close();
  assert.throws(() => vhdDriver.resize(y, 16 * MiB), /SHRINK|allocated/);
  assert.throws(() => vhdDriver.resize(y, 32 * MiB - 64 * 1024), /allocated/);

  const z = path.join(dir, "z.vhd");
  createDisk(z, "vhd", { type: "dynamic", size: 2 * MiB, blockSize: 64 * 1024 });
  vhdDriver.resize(z, 40 * MiB); // nothing but the footer after the BAT: grows in place
  assert.deepEqual(vhdDriver.check(z), []);
  d = openDisk(z);
  d.write(39 * MiB, new Uint8Array(512).fill(1));
  d.close();
  assert.deepEqual(vhdDriver.check(z), []);
  assert.equal(describeDisk(z).virtualSize, 40 * MiB);
  vhdDriver.resize(z, 39 * MiB + 1024); // keeps the one written sector
  assert.equal(describeDisk(z).virtualSize, 39 * MiB + 1024);
  assert.throws(() => vhdDriver.resize(z, 39 * MiB), /allocated/);
  assert.deepEqual(vhdDriver.check(z), []);
  fs.rmSync(dir, { recursive: true });
});

test("footer fields: creator 'win ', CHS geometry per the spec, checksums", () => {
  const dir = tmpDir();
  const p = path.join(dir, "d.vhd");
  createDisk(p, "vhd", { type: "dynamic", size: 10 * MiB });
  const bytes = fs.readFileSync(p);
  const head = decodeFooter(bytes.subarray(0, 512));
  const end = decodeFooter(bytes.subarray(bytes.length - 512));
  assert.ok(head.ok && end.ok);
  if (!end.ok) return;
  assert.equal(end.value.creatorApp, "win ");
  assert.equal(end.value.currentSize, 10 * MiB);
  assert.equal(end.value.dataOffset, 512);
  assert.deepEqual(chsGeometry(10 * MiB), { cylinders: 301, heads: 4, sectorsPerTrack: 17 });
  assert.deepEqual(chsGeometry(127 * 1024 * MiB), { cylinders: 65278, heads: 16, sectorsPerTrack: 255 });
  fs.rmSync(dir, { recursive: true });
});
