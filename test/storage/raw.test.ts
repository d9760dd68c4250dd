/**
 * Raw images and pass-through devices: round trips (buffered and O_DIRECT),
 * sizes, create/resize, and a real host block device through a loop device
 * when this host lets us attach one (root + losetup).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { DiskError } from "../../src/storage/block-device.js";
import { rawDriver, RawDisk } from "../../src/storage/raw.js";
import { hostBlockDeviceInfo, openPassthrough } from "../../src/storage/passthrough.js";
import { openDisk, probeFormat } from "../../src/storage/open.js";

const MiB = 1024 * 1024;

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "partis-raw-"));
}

function roundTrip(d: { write(o: number, b: Uint8Array): void; read(o: number, b: Uint8Array): void; size: number }, seed: number): void {
  const model = new Uint8Array(d.size);
  d.read(0, model);
  let x = seed;
  const next = (): number => (x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 4294967296;
  for (let i = 0; i < 100; i++) {
    const len = 1 + Math.floor(next() * 20000);
    const off = Math.floor(next() * (d.size - len));
    const b = new Uint8Array(len).fill(i + 1);
    b[0] = 0xfe;
    d.write(off, b);
    model.set(b, off);
  }
  const back = new Uint8Array(d.size);
  d.read(0, back);
  assert.ok(Buffer.from(back).equals(Buffer.from(model)));
}

test("raw: sparse create, unaligned round trip, bounds, allocation reports all allocated", () => {
  const dir = tmpDir();
  const p = path.join(dir, "d.img");
  rawDriver.create(p, { type: "dynamic", size: 4 * MiB });
  assert.ok(fs.statSync(p).blocks * 512 < MiB, "create must be sparse");
  assert.equal(probeFormat(p), "raw");
  const d = openDisk(p);
  assert.equal(d.format, "raw");
  assert.equal(d.type, "raw");
  assert.equal(d.size, 4 * MiB);
  roundTrip(d, 1);
  assert.throws(() => d.read(4 * MiB - 1, new Uint8Array(2)), (e: unknown) => e instanceof DiskError && e.code === "OUT_OF_RANGE");
  assert.deepEqual(d.allocation(0, 4096), [{ offset: 0, length: 4096, state: "allocated" }]);
  d.discard(0, 4096); // documented no-op
  d.close();
  assert.throws(() => rawDriver.create(p, { type: "fixed", size: MiB }), (e: unknown) => e instanceof DiskError && e.code === "DISK_CREATE_FAILED");
  assert.throws(() => rawDriver.create(path.join(dir, "x"), { type: "differencing", parentPath: p }), /differencing/);
  const ro = openDisk(p, { readOnly: true });
  assert.throws(() => ro.write(0, new Uint8Array(1)), (e: unknown) => e instanceof DiskError && e.code === "DISK_READ_ONLY");
  ro.close();
  fs.rmSync(dir, { recursive: true });
});

test("raw: resize grows sparsely and shrinks only over zeros", () => {
  const dir = tmpDir();
  const p = path.join(dir, "d.img");
  rawDriver.create(p, { type: "fixed", size: 2 * MiB });
  const d = openDisk(p);
  d.write(MiB, new Uint8Array(10).fill(1));
  d.close();
  rawDriver.resize(p, 8 * MiB);
  assert.equal(rawDriver.describe(p).virtualSize, 8 * MiB);
  rawDriver.resize(p, 2 * MiB);
  assert.throws(() => rawDriver.resize(p, MiB), (e: unknown) => e instanceof DiskError && e.code === "SHRINK_WOULD_LOSE_DATA");
  fs.rmSync(dir, { recursive: true });
});

test("raw and pass-through on a regular file with O_DIRECT (or a documented fallback)", () => {
  const dir = tmpDir();
  const p = path.join(dir, "d.img");
  rawDriver.create(p, { type: "fixed", size: 2 * MiB });
  const d = openDisk(p, { direct: true }) as RawDisk;
  roundTrip(d, 2);
  if (!d.directIo) assert.ok(d.notes.length > 0, "a fallback must say why");
  d.close();
  const pt = openPassthrough(p, { direct: true });
  assert.equal(pt.type, "passthrough");
  assert.equal(pt.size, 2 * MiB);
  roundTrip(pt, 3);
  pt.close();
  fs.rmSync(dir, { recursive: true });
});

function loopAvailable(): boolean {
  if (process.getuid?.() !== 0) return false;
  try {
    execFileSync("losetup", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

test("pass-through on a loop device: size from sysfs, O_DIRECT round trip, probe", { skip: loopAvailable() ? false : "needs root and losetup" }, (t) => {
  const dir = tmpDir();
  const backing = path.join(dir, "backing.img");
  fs.writeFileSync(backing, new Uint8Array(0));
  fs.truncateSync(backing, 8 * MiB);
  let dev: string;
  try {
    dev = execFileSync("losetup", ["-f", "--show", backing], { encoding: "utf8" }).trim();
  } catch {
    t.skip("losetup could not attach a loop device here");
    fs.rmSync(dir, { recursive: true });
    return;
  }
  try {
    const info = hostBlockDeviceInfo(dev);
    assert.equal(info.size, 8 * MiB);
    assert.ok(info.logicalSectorSize >= 512);
    assert.equal(probeFormat(dev), "raw");
    const d = openDisk(dev, { direct: true }) as RawDisk;
    assert.equal(d.type, "passthrough");
    assert.equal(d.size, 8 * MiB);
    roundTrip(d, 4);
    d.write(7 * MiB + 3, new Uint8Array([1, 2, 3]));
    d.close();
    const fd = fs.openSync(backing, "r");
    const b = new Uint8Array(3);
    fs.readSync(fd, b, 0, 3, 7 * MiB + 3);
    fs.closeSync(fd);
    assert.deepEqual([...b], [1, 2, 3]);
  } finally {
    execFileSync("losetup", ["-d", dev]);
    fs.rmSync(dir, { recursive: true });
  }
});

test("vectored I/O: a scatter list of host-mapped views in one preadv/pwritev; plain buffers are declined", async () => {
  const { alignedBuffer } = await import("../../src/hypervisor/libc.js");
  const p = path.join(tmpDir(), "vectored.raw");
  rawDriver.create(p, { type: "fixed", size: 2 * MiB });
  const d = rawDriver.open(p, {});
  try {
    const region = alignedBuffer(3 * 4096);
    const segs = [region.subarray(0, 4096), region.subarray(8192, 8192 + 512), region.subarray(4096, 4096 + 1024)];
    segs.forEach((s, i) => s.fill(0x41 + i));
    assert.equal(d.writeVectored!(65536, segs, 3), true);
    const back = new Uint8Array(4096 + 512 + 1024);
    d.read(65536, back);
    assert.ok(back.subarray(0, 4096).every((b) => b === 0x41));
    assert.ok(back.subarray(4096, 4608).every((b) => b === 0x42));
    assert.ok(back.subarray(4608).every((b) => b === 0x43));
    region.fill(0);
    assert.equal(d.readVectored!(65536 + 4096, [segs[1]!, segs[0]!], 2), true);
    assert.ok(segs[1]!.every((b) => b === 0x42), "first 512 bytes of the second write");
    assert.ok(segs[0]!.subarray(0, 1024).every((b) => b === 0x43) && segs[0]!.subarray(1024).every((b) => b === 0), "then the third segment, then zeros");
    assert.equal(d.readVectored!(0, [new Uint8Array(512)], 1), false, "a plain buffer is not host-mapped");
    assert.throws(() => d.readVectored!(2 * MiB - 512, [segs[0]!], 1), DiskError, "past the end");
  } finally {
    d.close();
  }
});
