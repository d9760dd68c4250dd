/**
 * Worker thread of the fuzz harness (fuzz.test.ts): builds small valid
 * images in a scratch directory (tmpfs), then for each case applies one
 * seeded mutation to one image file in place, runs open/read/describe/check
 * and (every eighth case) a read-write open + write, checks the outcome and
 * restores the file. Publishes the current case number in shared memory so
 * the main thread can detect a hang and terminate the worker.
 */
import { closeSync, copyFileSync, ftruncateSync, openSync, readFileSync, statSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { parentPort, workerData } from "node:worker_threads";
import { spawnSync } from "node:child_process";
import { DiskError, type DiskFormat } from "../../../src/storage/block-device.js";
import { createDisk, openDisk } from "../../../src/storage/open.js";
import { checkDisk, infoDisk } from "../../../src/storage/tools/index.js";
import { vhdTargets, vhdxTargets, type Target } from "./fuzz-targets.js";
import { seededBytes } from "./oracle.js";

/** Host-mapped memory for readHost (the path virtio-blk and IDE DMA take), where libc loads. */
const hostMemory = await (async () => {
  try {
    const libc = await import("../../../src/hypervisor/libc.js");
    const view = libc.alignedBuffer(64 * 1024);
    return { view, address: Number(libc.addressOfView(view)) };
  } catch {
    return undefined;
  }
})();

export interface FuzzWorkerInput {
  readonly dir: string;
  readonly seed: number;
  readonly first: number;
  readonly count: number;
  readonly progress: SharedArrayBuffer;
}

export interface FuzzWorkerReport {
  readonly cases: number;
  readonly opened: number;
  readonly rejected: number;
  readonly codes: Record<string, number>;
  /** Milliseconds spent per phase. */
  readonly times: Record<string, number>;
  readonly failures: string[];
  readonly images: string[];
}

const KiB = 1024;
const MiB = 1024 * KiB;

interface Image {
  readonly name: string;
  readonly path: string;
  readonly format: DiskFormat;
  readonly pristine: Uint8Array;
  /** pristine plus the current case's mutation. */
  readonly work: Uint8Array;
  readonly targets: Target[];
  /** Largest growth a small write may cause (two blocks, as it may straddle a boundary, plus metadata). */
  readonly growthSlack: number;
}

function tryCreate(path: string, format: DiskFormat, spec: Parameters<typeof createDisk>[2], fallback: Parameters<typeof createDisk>[2]): void {
  try {
    createDisk(path, format, spec);
  } catch {
    createDisk(path, format, fallback);
  }
}

function fill(path: string, writes: [number, number, number][]): void {
  const dev = openDisk(path);
  for (const [off, len, seed] of writes) dev.write(off, seededBytes(seed, len));
  dev.close();
}

function image(name: string, path: string, format: DiskFormat, growthSlack: number, pristine = readFileSync(path)): Image {
  const bytes = new Uint8Array(pristine);
  writeFileSync(path + ".pristine", bytes);
  return { name, path, format, pristine: bytes, work: new Uint8Array(bytes), targets: format === "vhd" ? vhdTargets(bytes) : vhdxTargets(bytes), growthSlack };
}

function buildImages(dir: string): Image[] {
  const out: Image[] = [];
  const vhdDyn = join(dir, "dyn.vhd");
  tryCreate(vhdDyn, "vhd", { type: "dynamic", size: 4 * MiB, blockSize: 512 * KiB }, { type: "dynamic", size: 4 * MiB });
  fill(vhdDyn, [[0, 8192, 1], [700 * KiB, 4096, 2]]);
  out.push(image("vhd dynamic", vhdDyn, "vhd", 4 * MiB + 64 * KiB));
  const vhdFixed = join(dir, "fixed.vhd");
  createDisk(vhdFixed, "vhd", { type: "fixed", size: MiB });
  fill(vhdFixed, [[4096, 4096, 3]]);
  out.push(image("vhd fixed", vhdFixed, "vhd", 0));
  const vhdBase = join(dir, "base.vhd");
  tryCreate(vhdBase, "vhd", { type: "dynamic", size: 4 * MiB, blockSize: 512 * KiB }, { type: "dynamic", size: 4 * MiB });
  fill(vhdBase, [[0, 4096, 4]]);
  const vhdDiff = join(dir, "diff.vhd");
  createDisk(vhdDiff, "vhd", { type: "differencing", parentPath: vhdBase });
  fill(vhdDiff, [[512, 1024, 5]]);
  out.push(image("vhd differencing", vhdDiff, "vhd", 4 * MiB + 64 * KiB));
  const qvhd = join(dir, "qemu.vhd");
  spawnSync("qemu-img", ["create", "-q", "-f", "vpc", "-o", "subformat=dynamic", qvhd, "4M"]);
  spawnSync("qemu-io", ["-f", "vpc", "-c", "write -P 7 0 4k", qvhd]);
  out.push(image("vhd by qemu", qvhd, "vhd", 4 * MiB + 64 * KiB));

  const vhdxDyn = join(dir, "dyn.vhdx");
  createDisk(vhdxDyn, "vhdx", { type: "dynamic", size: 4 * MiB, blockSize: MiB });
  fill(vhdxDyn, [[0, 8192, 6], [2 * MiB + 512, 4096, 7]]);
  out.push(image("vhdx dynamic", vhdxDyn, "vhdx", 3 * MiB));
  // A snapshot taken after flush but before close may hold a live log.
  const vhdxLive = join(dir, "live.vhdx");
  createDisk(vhdxLive, "vhdx", { type: "dynamic", size: 4 * MiB, blockSize: MiB });
  const live = openDisk(vhdxLive);
  live.write(MiB, seededBytes(8, 8192));
  live.flush();
  const snapshot = readFileSync(vhdxLive);
  live.close();
  writeFileSync(vhdxLive, snapshot);
  out.push(image("vhdx live log", vhdxLive, "vhdx", 3 * MiB, snapshot));
  const vhdxBase = join(dir, "base.vhdx");
  createDisk(vhdxBase, "vhdx", { type: "dynamic", size: 4 * MiB, blockSize: MiB });
  const vhdxDiff = join(dir, "diff.vhdx");
  createDisk(vhdxDiff, "vhdx", { type: "differencing", parentPath: vhdxBase });
  fill(vhdxDiff, [[4096, 4096, 9]]);
  out.push(image("vhdx differencing", vhdxDiff, "vhdx", 3 * MiB));
  const qvhdx = join(dir, "qemu.vhdx");
  spawnSync("qemu-img", ["create", "-q", "-f", "vhdx", "-o", "block_size=1M", qvhdx, "4M"]);
  spawnSync("qemu-io", ["-f", "vhdx", "-c", "write -P 9 0 4k", qvhdx]);
  out.push(image("vhdx by qemu", qvhdx, "vhdx", 3 * MiB));
  return out;
}

/** xorshift32 per case. */
class Rng {
  private x: number;
  constructor(seed: number) {
    this.x = (seed ^ 0xa5a5a5a5) >>> 0 || 1;
    for (let i = 0; i < 4; i++) this.next();
  }
  next(): number {
    let x = this.x;
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    this.x = x >>> 0;
    return this.x;
  }
  below(n: number): number {
    return n <= 1 ? 0 : this.next() % n;
  }
}

interface Mutation {
  readonly description: string;
  /** Bytes of the mutated file (length may differ from pristine). */
  readonly length: number;
  /** Range of the file that differs from pristine (for restore). */
  readonly from: number;
  readonly to: number;
}

function mutate(img: Image, work: Uint8Array, rng: Rng): Mutation {
  const size = img.pristine.length;
  const anywhere = rng.below(10) === 0;
  const t: Target = anywhere ? { name: "anywhere", offset: 0, length: size, bigEndian: img.format === "vhd" } : img.targets[rng.below(img.targets.length)]!;
  const at = t.offset + rng.below(Math.max(1, t.length));
  const kind = rng.below(10);
  let from = at;
  let to = at;
  let description: string;
  if (kind === 8) {
    const choices = [t.offset + rng.below(t.length), rng.below(size), size - 1 - rng.below(4096), size - 512, t.offset];
    const len = Math.max(0, Math.min(size - 1, choices[rng.below(choices.length)]!));
    return { description: `truncate to ${len} (in ${t.name})`, length: len, from: len, to: size };
  }
  if (kind === 9) {
    const extra = 1 + rng.below(rng.below(2) === 0 ? 4096 : 3 * MiB);
    const appended = rng.below(2) === 0 ? seededBytes(rng.next(), extra) : new Uint8Array(extra);
    return { description: `append ${extra} bytes`, length: size + extra, from: size, to: size + extra, ...{ appended } } as Mutation & { appended: Uint8Array };
  }
  const end = Math.min(size, t.offset + t.length);
  if (kind <= 2) {
    const bits = 1 + rng.below(4);
    for (let i = 0; i < bits; i++) {
      const o = Math.min(end - 1, at + rng.below(8));
      work[o]! ^= 1 << rng.below(8);
      to = Math.max(to, o + 1);
    }
    description = `flip ${bits} bits near ${at}`;
  } else if (kind <= 4) {
    const n = Math.min(end - at, 1 + rng.below(32));
    work.set(seededBytes(rng.next(), n), at);
    to = at + n;
    description = `${n} random bytes at ${at}`;
  } else if (kind <= 6) {
    const width = [2, 4, 8][rng.below(3)]!;
    const o = Math.max(t.offset, Math.min(end - width, at - ((at - t.offset) % width)));
    const values = [0n, 1n, 0x7fn, 0x80n, 0xffn, 0x7fffn, 0x8000n, 0xffffn, 0x7fffffffn, 0x80000000n, 0xffffffffn, 0x100000000n, BigInt(size), BigInt(size + 1), BigInt(size - 512), 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n, BigInt(rng.next())];
    const value = values[rng.below(values.length)]! & ((1n << BigInt(width * 8)) - 1n);
    const be = rng.below(10) === 0 ? !t.bigEndian : t.bigEndian;
    const v = new DataView(work.buffer, work.byteOffset, work.byteLength);
    if (o < 0 || o + width > size) return { description: "no-op", length: size, from: 0, to: 0 };
    if (width === 2) v.setUint16(o, Number(value), !be);
    else if (width === 4) v.setUint32(o, Number(value), !be);
    else v.setBigUint64(o, value, !be);
    from = o;
    to = o + width;
    description = `u${width * 8}${be ? "be" : "le"}=${value} at ${o}`;
  } else {
    const n = Math.min(end - at, 1 + rng.below(512));
    work.fill(0, at, at + n);
    to = at + n;
    description = `zero ${n} bytes at ${at}`;
  }
  if (t.reseal !== undefined && rng.below(2) === 0) {
    t.reseal(work);
    from = Math.min(from, t.offset);
    to = Math.max(to, Math.min(size, t.offset + 64 * KiB));
    description += " (checksum resealed)";
  }
  return { description: `${description} in ${t.name}`, length: size, from, to: Math.min(size, to) };
}

function writeRange(path: string, bytes: Uint8Array, from: number, to: number): void {
  if (to <= from) return;
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, bytes, from, to - from, from);
  } finally {
    closeSync(fd);
  }
}

function run(input: FuzzWorkerInput): FuzzWorkerReport {
  const images = buildImages(input.dir);
  const progress = new Int32Array(input.progress);
  const codes: Record<string, number> = {};
  const failures: string[] = [];
  let opened = 0;
  let rejected = 0;
  const times: Record<string, number> = {};
  let mark = performance.now();
  const lap = (name: string): void => {
    const now = performance.now();
    times[name] = (times[name] ?? 0) + now - mark;
    mark = now;
  };
  for (let i = input.first; i < input.first + input.count; i++) {
    Atomics.store(progress, 0, i);
    const img = images[i % images.length]!;
    const rng = new Rng(Math.imul(input.seed, 0x9e3779b1) ^ Math.imul(i, 0x85ebca6b));
    const work = img.work; // mutated in place, restored below
    const m = mutate(img, work, rng) as Mutation & { appended?: Uint8Array };
    // Apply to the file.
    if (m.length < img.pristine.length) ftruncateFile(img.path, m.length);
    else if (m.appended !== undefined) writeRange(img.path, Buffer.concat([work, m.appended]), m.from, m.to);
    else writeRange(img.path, work, m.from, m.to);
    const expected = m.appended !== undefined ? Buffer.concat([work, m.appended]) : work.subarray(0, m.length);
    const where = `case ${i} (${img.name}: ${m.description})`;
    const caught = (op: string, e: unknown): void => {
      if (e instanceof DiskError && (e.message.includes(img.path) || e.message.includes(img.path.split("/").pop()!))) {
        codes[e.code] = (codes[e.code] ?? 0) + 1;
        return;
      }
      if (failures.length < 25) failures.push(`${where}: ${op} threw ${e instanceof Error ? `${e.constructor.name}: ${e.message.split("\n")[0]}` : String(e)}`);
    };
    let ok = true;
    const stBefore = statSync(img.path, { bigint: true });
    lap("mutate");
    try {
      const dev = openDisk(img.path, { readOnly: true });
      try {
        const buf = new Uint8Array(64 * KiB);
        dev.read(0, buf);
        dev.read(Math.max(0, dev.size - 4096), buf.subarray(0, 4096));
        const off = rng.below(Math.max(1, dev.size - 9000));
        dev.read(off, buf.subarray(0, 9000));
        if (hostMemory !== undefined && dev.readHost !== undefined) {
          // Straight into host memory: where it is taken, it must read what the block-by-block path read.
          const n = Math.min(9000, dev.size - off);
          hostMemory.view.fill(0xc3);
          if (dev.readHost(off, Float64Array.of(hostMemory.address), Uint32Array.of(n), 1) && Buffer.compare(hostMemory.view.subarray(0, n), buf.subarray(0, n)) !== 0 && failures.length < 25)
            failures.push(`${where}: readHost at ${off} read other bytes than read()`);
        }
        dev.allocation(0, dev.size);
      } finally {
        dev.close();
      }
      opened++;
    } catch (e) {
      ok = false;
      caught("read-only open/read", e);
    }
    lap("open+read");
    try {
      infoDisk(img.path);
    } catch (e) {
      caught("describe", e);
    }
    lap("describe");
    try {
      checkDisk(img.path);
    } catch (e) {
      caught("check", e);
    }
    lap("check");
    if (!ok) rejected++;
    // Read-only use must not change a byte: no write may even touch the file
    // (ctime/mtime/size unchanged, checked every case), and every tenth case
    // compares the whole content.
    const st = statSync(img.path, { bigint: true });
    if (st.ctimeNs !== stBefore.ctimeNs || st.mtimeNs !== stBefore.mtimeNs || Number(st.size) !== expected.length) {
      if (failures.length < 25) failures.push(`${where}: read-only open/describe/check wrote to the file (${expected.length} -> ${st.size} bytes)`);
    } else if (i % 10 === 0) {
      const now = readFileSync(img.path);
      if (Buffer.compare(now, expected) !== 0 && failures.length < 25) failures.push(`${where}: read-only open/describe/check changed the file content`);
    }
    lap("verify");
    if (i % 8 === 0) {
      const before = statSync(img.path).size;
      try {
        const dev = openDisk(img.path);
        try {
          if (dev.size > 0) {
            const len = Math.min(dev.size, 1 + rng.below(8192));
            dev.write(rng.below(dev.size - len + 1), seededBytes(i, len));
            dev.flush();
          }
        } finally {
          dev.close();
        }
      } catch (e) {
        caught("read-write open/write", e);
      }
      // The file may grow by about a block; it may lose bytes appended after the
      // image's end (VHD moves its footer to the end of the data), never image bytes.
      const after = statSync(img.path).size;
      const valid = img.pristine.length;
      if (after < Math.min(before, valid) || after > Math.max(before, valid) + img.growthSlack) {
        if (failures.length < 25) failures.push(`${where}: read-write open + small write changed the file size ${before} -> ${after} (image ${valid} bytes, allowed growth ${img.growthSlack})`);
      }
      // Restore everything.
      work.set(img.pristine);
      copyFileSync(img.path + ".pristine", img.path);
    } else {
      if (m.to > m.from && m.length === img.pristine.length) work.set(img.pristine.subarray(m.from, m.to), m.from);
      if (m.length !== img.pristine.length) {
        ftruncateFile(img.path, img.pristine.length);
        writeRange(img.path, img.pristine, Math.min(m.from, img.pristine.length), img.pristine.length);
      } else writeRange(img.path, img.pristine, m.from, m.to);
    }
    lap("rw+restore");
  }
  for (const k of Object.keys(times)) times[k] = Math.round(times[k]!);
  return { cases: input.count, opened, rejected, codes, failures, times, images: images.map((x) => `${x.name} (${x.pristine.length} bytes, ${x.targets.length} targets)`) };
}

function ftruncateFile(path: string, length: number): void {
  const fd = openSync(path, "r+");
  try {
    ftruncateSync(fd, length);
  } finally {
    closeSync(fd);
  }
}

if (parentPort !== null) {
  const input = workerData as FuzzWorkerInput;
  try {
    const report = run(input);
    parentPort.postMessage({ report });
  } catch (e) {
    parentPort.postMessage({ error: e instanceof Error ? e.stack ?? e.message : String(e) });
  }
}
