import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { test } from "node:test";
import { DiskError } from "../../../src/storage/block-device.js";
import { vhdxDriver, VhdxDisk } from "../../../src/storage/vhdx/index.js";
import { MiB, rng, tempDir } from "./fixtures.js";

const dir = tempDir("disk");

function exercise(disk: VhdxDisk, model: Buffer, seed: number, count: number): void {
  const r = rng(seed);
  for (let i = 0; i < count; i++) {
    const len = 1 + Math.floor(r() * (r() < 0.2 ? 3 * MiB : 20000));
    const off = Math.floor(r() * (model.length - len));
    const data = Buffer.alloc(len);
    for (let k = 0; k < len; k += 512) data.fill((i * 7 + k) & 0xff, k, Math.min(len, k + 512));
    disk.write(off, data);
    data.copy(model, off);
    if (i % 5 === 0) disk.flush();
  }
}

function assertSame(disk: VhdxDisk, model: Buffer): void {
  const got = Buffer.alloc(model.length);
  disk.read(0, got);
  assert.ok(got.equals(model), "disk content differs from the model");
}

for (const type of ["fixed", "dynamic"] as const) {
  test(`${type}: random unaligned writes match an in-memory model across reopen`, () => {
    const p = nodePath.join(dir, `${type}.vhdx`);
    const size = 24 * MiB + 512 * 3;
    vhdxDriver.create(p, { type, size, blockSize: MiB });
    const model = Buffer.alloc(size);
    let d = VhdxDisk.open(p);
    assert.equal(d.type, type);
    exercise(d, model, 42, 60);
    assertSame(d, model);
    d.close();
    d = VhdxDisk.open(p, { readOnly: true });
    assertSame(d, model);
    d.close();
    assert.deepEqual(vhdxDriver.check(p).filter((f) => f.severity === "error"), []);
  });
}

test("differencing chain of depth 3: reads fall through, writes stay in the child", () => {
  const base = nodePath.join(dir, "chain-base.vhdx");
  const mid = nodePath.join(dir, "chain-mid.vhdx");
  const top = nodePath.join(dir, "chain-top.vhdx");
  const size = 16 * MiB;
  vhdxDriver.create(base, { type: "dynamic", size, blockSize: MiB });
  const model = Buffer.alloc(size);
  let d = VhdxDisk.open(base);
  exercise(d, model, 1, 20);
  d.close();
  const baseBytes = fs.readFileSync(base);
  vhdxDriver.create(mid, { type: "differencing", parentPath: base, blockSize: MiB });
  d = VhdxDisk.open(mid);
  assert.equal(d.type, "differencing");
  assertSame(d, model);
  exercise(d, model, 2, 20);
  d.close();
  vhdxDriver.create(top, { type: "differencing", parentPath: mid });
  d = VhdxDisk.open(top);
  exercise(d, model, 3, 30);
  // A 1-byte write in an untouched block keeps the rest of its sector from the parent.
  d.write(7 * MiB + 3, Buffer.from([0xee]));
  model[7 * MiB + 3] = 0xee;
  assertSame(d, model);
  const alloc = d.allocation(0, size);
  assert.ok(alloc.some((e) => e.state === "allocated") && alloc.some((e) => e.state === "unallocated"));
  d.close();
  assert.ok(fs.readFileSync(base).equals(baseBytes), "base changed");
  d = VhdxDisk.open(top, { readOnly: true });
  assertSame(d, model);
  d.close();
  const desc = vhdxDriver.describe(top);
  assert.equal(desc.type, "differencing");
  assert.equal(desc.parentPath, mid);
  assert.deepEqual(vhdxDriver.check(top).filter((f) => f.severity === "error"), []);
});

test("parent linkage mismatch is refused naming both files", () => {
  const base = nodePath.join(dir, "link-base.vhdx");
  const child = nodePath.join(dir, "link-child.vhdx");
  vhdxDriver.create(base, { type: "dynamic", size: 4 * MiB, blockSize: MiB });
  vhdxDriver.create(child, { type: "differencing", parentPath: base });
  // Writing the parent gives it a new DataWriteGuid.
  const p = VhdxDisk.open(base);
  p.write(0, Buffer.alloc(512, 1));
  p.close();
  assert.throws(() => VhdxDisk.open(child, { readOnly: true }), (e: unknown) => e instanceof DiskError && e.message.includes(base) && e.message.includes(child));
  // setParent without force refuses too; with force it re-links.
  assert.throws(() => vhdxDriver.setParent(child, base), DiskError);
  vhdxDriver.setParent(child, base, { force: true });
  const c = VhdxDisk.open(child, { readOnly: true });
  const b = Buffer.alloc(512);
  c.read(0, b);
  assert.equal(b[0], 1);
  c.close();
});

test("sizes: 64 TiB limit, 16 TiB sparse image written near its end", () => {
  assert.throws(() => vhdxDriver.create(nodePath.join(dir, "huge.vhdx"), { type: "dynamic", size: 64 * 1024 ** 4 + 4096 }), /64 TiB/);
  const p = nodePath.join(dir, "16t.vhdx");
  const size = 16 * 1024 ** 4;
  vhdxDriver.create(p, { type: "dynamic", size });
  const d = VhdxDisk.open(p);
  const data = Buffer.alloc(4096, 0x77);
  d.write(size - 4096 - 1000, data);
  d.close();
  const r = VhdxDisk.open(p, { readOnly: true });
  const back = Buffer.alloc(4096);
  r.read(size - 4096 - 1000, back);
  r.close();
  assert.ok(back.equals(data));
  const st = fs.statSync(p);
  assert.ok(st.blocks * 512 < 128 * MiB, `allocated ${st.blocks * 512} bytes`);
});

test("resize: grow (in place and with BAT relocation), shrink only an unallocated tail", () => {
  const p = nodePath.join(dir, "resize.vhdx");
  vhdxDriver.create(p, { type: "dynamic", size: 8 * MiB, blockSize: MiB });
  let d = VhdxDisk.open(p);
  d.write(MiB, Buffer.alloc(4096, 9));
  d.close();
  vhdxDriver.resize(p, 64 * MiB);
  vhdxDriver.resize(p, 200 * 1024 * MiB); // BAT of 1 MiB blocks no longer fits its region
  d = VhdxDisk.open(p);
  assert.equal(d.size, 200 * 1024 * MiB);
  d.write(d.size - 512, Buffer.alloc(512, 3));
  const b = Buffer.alloc(4096);
  d.read(MiB, b);
  assert.equal(b[4095], 9);
  d.close();
  assert.throws(() => vhdxDriver.resize(p, 4 * MiB), /allocated/);
  d = VhdxDisk.open(p);
  d.discard(d.size - MiB, MiB);
  d.close();
  vhdxDriver.resize(p, 4 * MiB);
  d = VhdxDisk.open(p, { readOnly: true });
  assert.equal(d.size, 4 * MiB);
  d.read(MiB, b);
  assert.equal(b[0], 9);
  d.close();
  assert.deepEqual(vhdxDriver.check(p).filter((f) => f.severity === "error"), []);
});

test("discard makes whole blocks read as zeros", () => {
  const p = nodePath.join(dir, "discard.vhdx");
  vhdxDriver.create(p, { type: "dynamic", size: 8 * MiB, blockSize: MiB });
  const d = VhdxDisk.open(p);
  d.write(0, Buffer.alloc(3 * MiB, 5));
  d.discard(MiB / 2, 2 * MiB);
  const b = Buffer.alloc(3 * MiB);
  d.read(0, b);
  assert.equal(b[0], 5);
  assert.equal(b[MiB], 0);
  assert.equal(b[2 * MiB], 5);
  assert.deepEqual(d.allocation(MiB, MiB), [{ offset: MiB, length: MiB, state: "zero" }]);
  d.close();
});
