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

test("raw: sparse create, unaligned round trip, bounds, read-only", () => {
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
  d.close();
  assert.throws(() => rawDriver.create(p, { type: "fixed", size: MiB }), (e: unknown) => e instanceof DiskError && e.code === "DISK_CREATE_FAILED");
  assert.throws(() => rawDriver.create(path.join(dir, "x"), { type: "differencing", parentPath: p }), /differencing/);
  const ro = openDisk(p, { readOnly: true });
  assert.throws(() => ro.write(0, new Uint8Array(1)), (e: unknown) => e instanceof DiskError && e.code === "DISK_READ_ONLY");
  ro.close();
  fs.rmSync(dir, { recursive: true });
});

/** qemu-img's map of a raw file: [start, end, data?] runs (the independent oracle for holes). */
function qemuMap(file: string): [number, number, boolean][] {
  const out = execFileSync("qemu-img", ["map", "--output=json", "-f", "raw", file], { encoding: "utf8" });
  const runs: [number, number, boolean][] = [];
  for (const e of JSON.parse(out) as { start: number; length: number; data: boolean }[]) {
    const last = runs[runs.length - 1];
    if (last !== undefined && last[2] === e.data && last[1] === e.start) last[1] += e.length;
    else runs.push([e.start, e.start + e.length, e.data]);
  }
  return runs;
}

test("raw: discard punches a hole (space freed, zeros read), write-zeroes, and the allocation map agrees with qemu-img map", () => {
  const dir = tmpDir();
  const p = path.join(dir, "d.img");
  rawDriver.create(p, { type: "dynamic", size: 8 * MiB });
  const d = openDisk(p) as RawDisk;
  try {
    assert.deepEqual(d.allocation(0, 8 * MiB), [{ offset: 0, length: 8 * MiB, state: "unallocated" }], "a new image is all hole");
    const ones = new Uint8Array(4 * MiB).fill(0x11);
    d.write(MiB, ones);
    d.flush();
    const used = fs.statSync(p).blocks * 512;
    assert.ok(used >= 4 * MiB, `4 MiB written: ${used} bytes used`);
    assert.deepEqual(d.allocation(0, 8 * MiB), [
      { offset: 0, length: MiB, state: "unallocated" },
      { offset: MiB, length: 4 * MiB, state: "allocated" },
      { offset: 5 * MiB, length: 3 * MiB, state: "unallocated" },
    ]);

    // Discard the middle 2 MiB: the host frees it and it reads as zeros; the rest is untouched.
    d.discard(2 * MiB, 2 * MiB);
    d.flush();
    assert.deepEqual(d.notes.filter((n) => n.includes("punch hole")), [], "this file system punches holes");
    assert.ok(fs.statSync(p).blocks * 512 <= used - 2 * MiB, "2 MiB given back to the host");
    const back = new Uint8Array(4 * MiB);
    d.read(MiB, back);
    assert.ok(back.subarray(0, MiB).every((b) => b === 0x11));
    assert.ok(back.subarray(MiB, 3 * MiB).every((b) => b === 0));
    assert.ok(back.subarray(3 * MiB).every((b) => b === 0x11));
    const map = d.allocation(0, 8 * MiB);
    assert.deepEqual(map, [
      { offset: 0, length: MiB, state: "unallocated" },
      { offset: MiB, length: MiB, state: "allocated" },
      { offset: 2 * MiB, length: 2 * MiB, state: "unallocated" },
      { offset: 4 * MiB, length: MiB, state: "allocated" },
      { offset: 5 * MiB, length: 3 * MiB, state: "unallocated" },
    ]);
    assert.deepEqual(qemuMap(p), map.map((e) => [e.offset, e.offset + e.length, e.state === "allocated"]), "qemu-img map sees the same holes");
    // A window of the map starts and ends where asked.
    assert.deepEqual(d.allocation(MiB + 512, MiB), [
      { offset: MiB + 512, length: MiB - 512, state: "allocated" },
      { offset: 2 * MiB, length: 512, state: "unallocated" },
    ]);

    // write-zeroes with deallocation allowed: a hole; without: zeros, the range stays allocated.
    assert.equal(d.writeZeroes(4 * MiB, 512 * 1024, true), true);
    d.read(4 * MiB, back.subarray(0, MiB));
    assert.ok(back.subarray(0, 512 * 1024).every((b) => b === 0) && back.subarray(512 * 1024, MiB).every((b) => b === 0x11));
    assert.equal(d.allocation(4 * MiB, 512 * 1024)[0]!.state, "unallocated");
    const zeroRange = d.writeZeroes(MiB, 4096, false);
    if (zeroRange) {
      d.read(MiB, back.subarray(0, 8192));
      assert.ok(back.subarray(0, 4096).every((b) => b === 0) && back.subarray(4096, 8192).every((b) => b === 0x11));
    } else assert.ok(d.notes.some((n) => n.includes("zero range")), "a refused ZERO_RANGE is noted");
    assert.throws(() => d.writeZeroes(8 * MiB - 512, 1024, true), (e: unknown) => e instanceof DiskError && e.code === "OUT_OF_RANGE");
  } finally {
    d.close();
  }
  const ro = openDisk(p, { readOnly: true }) as RawDisk;
  ro.discard(0, MiB); // a hint: ignored on a read-only disk
  assert.throws(() => ro.writeZeroes(0, MiB, true), (e: unknown) => e instanceof DiskError && e.code === "DISK_READ_ONLY");
  ro.close();
  fs.rmSync(dir, { recursive: true });
});

const TMPFS_MAGIC = 0x01021994;
const shmIsTmpfs = fs.existsSync("/dev/shm") && fs.statfsSync("/dev/shm").type === TMPFS_MAGIC;

test("raw on tmpfs (no ZERO_RANGE there): write-zeroes without deallocation falls back, noted once; holes still work", { skip: shmIsTmpfs ? false : "/dev/shm is not tmpfs" }, () => {
  const dir = fs.mkdtempSync("/dev/shm/partis-raw-");
  try {
    const p = path.join(dir, "d.img");
    rawDriver.create(p, { type: "dynamic", size: 2 * MiB });
    const d = openDisk(p) as RawDisk;
    d.write(0, new Uint8Array(MiB).fill(7));
    assert.equal(d.writeZeroes(0, 4096, false), false, "ZERO_RANGE refused: the caller writes zeros");
    assert.equal(d.writeZeroes(4096, 4096, false), false);
    assert.equal(d.notes.length, 1, "noted once");
    assert.match(d.notes[0]!, /^zero range is not supported here \(E(OPNOTSUPP|NOTSUP)\): zeros are written instead$/);
    assert.equal(d.writeZeroes(8192, 4096, true), true, "a hole is still fine");
    d.discard(MiB - 4096, 4096);
    const back = new Uint8Array(MiB);
    d.read(0, back);
    assert.ok(back.subarray(0, 8192).every((b) => b === 7), "nothing zeroed by the refused calls");
    assert.ok(back.subarray(8192, 12288).every((b) => b === 0));
    assert.ok(back.subarray(MiB - 4096).every((b) => b === 0));
    assert.deepEqual(
      d.allocation(0, 2 * MiB).map((e) => [e.offset, e.length, e.state]),
      [
        [0, 8192, "allocated"],
        [8192, 4096, "unallocated"],
        [12288, MiB - 4096 - 12288, "allocated"],
        [MiB - 4096, MiB + 4096, "unallocated"],
      ],
    );
    d.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
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

test("raw: queueHost never waits for the disk: done at once, or queued and completed by the ring, or refused untouched; checks first", async () => {
  const { IoUring } = await import("../../src/hypervisor/io-uring.js");
  const { addressOfView, alignedBuffer } = await import("../../src/hypervisor/libc.js");
  // /var/tmp: a disk-backed file system where there is one (the case that matters), else the temp dir.
  const base = fs.existsSync("/var/tmp") ? "/var/tmp" : os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, "partis-raw-queue-"));
  const ring = IoUring.open(8);
  try {
    const file = path.join(dir, "d.raw");
    rawDriver.create(file, { type: "fixed", size: 8 * MiB });
    const disk = openDisk(file);
    const content = new Uint8Array(8 * MiB);
    for (let i = 0; i < content.length; i += 4096) content.fill((i >> 12) & 0xff, i, i + 4096);
    disk.write(0, content);
    disk.flush();
    // Drop the file's pages from the page cache where dd can (GNU dd: iflag=nocache), so some reads would wait.
    try {
      execFileSync("dd", [`if=${file}`, "iflag=nocache", "count=0"], { stdio: "ignore" });
    } catch {
      /* the reads then come from the cache: still a valid run of the contract below */
    }
    const mem = alignedBuffer(64 * 4096);
    const outcomes = new Map<string, number>();
    const completions = new Map<number, number>();
    for (let k = 0; k < 64; k++) {
      const at = (k * 37 % 2048) * 4096;
      const span = mem.subarray(k * 4096, (k + 1) * 4096);
      span.fill(0xee);
      const r = disk.queueHost!(ring, false, at, Float64Array.of(Number(addressOfView(span))), Uint32Array.of(4096), 1, k);
      outcomes.set(String(r), (outcomes.get(String(r)) ?? 0) + 1);
      if (r === "queued") ring.submit();
      if (r === false) disk.read(at, span); // refused untouched: the caller does it synchronously
      if (ring.room === 0) ring.drain((t, res) => completions.set(t, res));
    }
    ring.drain((t, res) => completions.set(t, res));
    for (const [, res] of completions) assert.equal(res, 4096);
    assert.equal(completions.size, outcomes.get("queued") ?? 0, "every queued read completed once");
    for (let k = 0; k < 64; k++) {
      const at = (k * 37 % 2048) * 4096;
      assert.deepEqual(mem.subarray(k * 4096, (k + 1) * 4096), content.subarray(at, at + 4096), `block ${k}`);
    }
    console.log(`raw queueHost outcomes on ${base}: ${JSON.stringify(Object.fromEntries(outcomes))}`);
    // Checks come first: past the end, and writes to a read-only disk, throw and queue nothing.
    assert.throws(() => disk.queueHost!(ring, false, 8 * MiB, Float64Array.of(Number(addressOfView(mem))), Uint32Array.of(4096), 1, 99), DiskError);
    disk.close();
    const ro = openDisk(file, { readOnly: true });
    assert.throws(() => ro.queueHost!(ring, true, 0, Float64Array.of(Number(addressOfView(mem))), Uint32Array.of(4096), 1, 98), DiskError);
    assert.equal(ring.inFlight, 0);
    assert.equal(ring.room, 8);
    ro.close();
  } finally {
    ring.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
