/**
 * VHD and VHDX images moving data straight between "guest RAM" (host-mapped
 * memory from src/hypervisor/libc) and the file: readHost/writeHost (one
 * preadv/pwritev) and queueHost/queueFlush (a real io_uring), as virtio-blk
 * and the IDE's bus-master engine use them. Each image type gets a random
 * mix of those calls and the synchronous read/write path, against an
 * in-memory model; a call that declines (false) must have done nothing, and
 * the caller's synchronous fallback then does the request. The closed image
 * is then read by qemu-img (the independent oracle) and must equal the model;
 * qemu-img opens neither VHDX nor VHD differencing disks (VHDX: "Operation
 * not supported"; vpc ignores the parent), so those are reopened and read by
 * the synchronous path instead.
 * Six cases run the same with cache=none or directsync (VHD and VHDX,
 * differencing ones over either): the image and its parent held with
 * O_DIRECT, metadata through the bounce buffer, payload straight.
 * Explicit cases pin where each path must and must not be taken: allocated
 * ranges go straight to the file, allocation and blocks that are not one
 * file extent decline, and a differencing disk hands reads of ranges it does
 * not hold to its parent.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { cacheOpenOptions, DiskError, type BlockDevice, type CacheMode, type DiskFormat } from "../../src/storage/block-device.js";
import { createDisk, openDisk } from "../../src/storage/open.js";
import { openFlagsOn, qemuFormat, rng, run, scratchDir } from "./tools/oracle.js";

const MiB = 1024 * 1024;
const SECTOR = 512;
/** Not a multiple of either block size, so the last block is partial. */
const SIZE = 12 * MiB + 7 * SECTOR;

const { IoUring } = await import("../../src/hypervisor/io-uring.js");
const { addressOfView, alignedBuffer } = await import("../../src/hypervisor/libc.js");

/** Host spans over `mem` for [at, at+length): cut into 1-4 pieces, as a guest's scatter list. */
function spansOver(mem: Uint8Array, at: number, length: number, r: () => number): { addresses: Float64Array; lengths: Uint32Array; count: number } {
  const cuts = new Set<number>();
  const pieces = 1 + Math.floor(r() * 4);
  for (let i = 1; i < pieces; i++) cuts.add(Math.floor((r() * length) / SECTOR) * SECTOR);
  const edges = [0, ...[...cuts].filter((c) => c > 0 && c < length).sort((a, b) => a - b), length];
  const addresses = new Float64Array(edges.length - 1);
  const lengths = new Uint32Array(edges.length - 1);
  for (let i = 0; i + 1 < edges.length; i++) {
    addresses[i] = Number(addressOfView(mem.subarray(at + edges[i]!, at + edges[i + 1]!)));
    lengths[i] = edges[i + 1]! - edges[i]!;
  }
  return { addresses, lengths, count: lengths.length };
}

interface Outcomes {
  straight: number;
  queued: number;
  declined: number;
}

/** The base directory for images: disk-backed where possible, so that some requests would wait and are queued. */
function imageDir(label: string): { dir: string; cleanup: () => void } {
  if (process.env.PARTIS_TEST_TMP === undefined && fs.existsSync("/var/tmp")) {
    const dir = fs.mkdtempSync(path.join("/var/tmp", `partis-${label}-`));
    return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
  }
  return scratchDir(label);
}

/** Drop the files' clean pages from the page cache where GNU dd can (iflag=nocache), so that reads would wait and are queued. */
function dropCache(files: readonly string[]): void {
  for (const f of files) run("dd", [`if=${f}`, "iflag=nocache", "count=0"]);
}

/** Random requests through every path against a model; returns how the host paths answered. */
function exercise(disk: BlockDevice, files: readonly string[], model: Uint8Array, seed: number, steps: number): Outcomes {
  const r = rng(seed);
  const ring = IoUring.open(16);
  const mem = alignedBuffer(8 * 2 * MiB);
  const out: Outcomes = { straight: 0, queued: 0, declined: 0 };
  const fill = (at: number, length: number): Uint8Array => {
    const v = mem.subarray(at, at + length);
    const tag = 1 + Math.floor(r() * 254);
    for (let i = 0; i < length; i += SECTOR) v.fill((tag + i / SECTOR) & 0xff, i, i + SECTOR);
    return v;
  };
  const pick = (): { offset: number; length: number } => {
    const big = r() < 0.3;
    const sectors = big ? 1 + Math.floor(r() * ((3 * MiB) / 2 / SECTOR)) : 1 + Math.floor(r() * 16);
    const length = Math.min(sectors * SECTOR, SIZE);
    const offset = Math.floor((r() * (SIZE - length)) / SECTOR) * SECTOR;
    return { offset, length };
  };
  /** A write the disk declined: it must have changed nothing; the caller then writes synchronously. */
  const declinedWrite = (what: string, offset: number, v: Uint8Array): void => {
    out.declined++;
    assert.deepEqual(readBack(disk, offset, v.length), model.subarray(offset, offset + v.length), `a declined ${what} at ${offset} changed nothing`);
    disk.write(offset, v);
  };
  try {
    for (let step = 0; step < steps; step++) {
      const kind = r();
      if (kind < 0.1) {
        const { offset, length } = pick();
        const v = fill(0, length);
        disk.write(offset, v);
        model.set(v, offset);
      } else if (kind < 0.3) {
        const { offset, length } = pick();
        const v = fill(0, length);
        const s = spansOver(mem, 0, length, r);
        if (disk.writeHost!(offset, s.addresses, s.lengths, s.count)) out.straight++;
        else declinedWrite("writeHost", offset, v);
        model.set(v, offset);
      } else if (kind < 0.45) {
        const { offset, length } = pick();
        const v = fill(0, length);
        const s = spansOver(mem, 0, length, r);
        const q = disk.queueHost!(ring, true, offset, s.addresses, s.lengths, s.count, 1);
        if (q === "queued") {
          out.queued++;
          ring.submit();
          ring.drain((token, res) => assert.equal(res, length, `queued write at ${offset} (token ${token})`));
        } else if (q === "done") out.straight++;
        else declinedWrite("queued write", offset, v);
        model.set(v, offset);
      } else if (kind < 0.6) {
        const { offset, length } = pick();
        mem.fill(0xa5, 0, length);
        const s = spansOver(mem, 0, length, r);
        if (disk.readHost!(offset, s.addresses, s.lengths, s.count)) out.straight++;
        else {
          out.declined++;
          assert.ok(mem.subarray(0, length).every((b) => b === 0xa5), `a declined readHost at ${offset} wrote nothing`);
          disk.read(offset, mem.subarray(0, length));
        }
        assert.deepEqual(mem.subarray(0, length), model.subarray(offset, offset + length), `read of ${length} at ${offset}`);
      } else if (kind < 0.9) {
        // A batch of reads in flight together, each into its own 2 MiB of memory.
        if (r() < 0.3) {
          disk.flush();
          dropCache(files);
        }
        const batch = 1 + Math.floor(r() * 8);
        const reqs: { offset: number; length: number; at: number }[] = [];
        for (let k = 0; k < batch; k++) {
          const { offset, length } = pick();
          const at = k * 2 * MiB;
          mem.fill(0x5a, at, at + length);
          const s = spansOver(mem, at, length, r);
          const q = disk.queueHost!(ring, false, offset, s.addresses, s.lengths, s.count, k);
          if (q === "queued") out.queued++;
          else if (q === "done") out.straight++;
          else {
            out.declined++;
            disk.read(offset, mem.subarray(at, at + length));
          }
          reqs.push({ offset, length, at });
        }
        ring.submit();
        ring.drain((token, res) => assert.equal(res, reqs[token]!.length, `queued read ${token}`));
        for (const q of reqs) assert.deepEqual(mem.subarray(q.at, q.at + q.length), model.subarray(q.offset, q.offset + q.length), `batched read of ${q.length} at ${q.offset}`);
      } else if (kind < 0.95) {
        if (disk.queueFlush!(ring, 3)) {
          ring.submit();
          ring.drain((_t, res) => assert.equal(res, 0, "queued flush"));
        } else disk.flush();
      } else disk.flush();
    }
    assert.equal(ring.inFlight, 0);
    return out;
  } finally {
    ring.close();
  }
}

function readBack(disk: BlockDevice, offset: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  disk.read(offset, b);
  return b;
}

/** The whole virtual disk as qemu-img reads it. */
function qemuRead(file: string, format: DiskFormat, dir: string): Buffer {
  const out = path.join(dir, `oracle-${path.basename(file)}.raw`);
  const r = run("qemu-img", ["convert", "-f", qemuFormat(format), "-O", "raw", file, out]);
  assert.equal(r.status, 0, `qemu-img convert: ${r.stderr}`);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

const cases: { name: string; format: DiskFormat; type: "fixed" | "dynamic" | "differencing"; parent?: DiskFormat; blockSize?: number; cache?: CacheMode }[] = [
  { name: "VHD fixed", format: "vhd", type: "fixed" },
  { name: "VHD dynamic", format: "vhd", type: "dynamic" },
  { name: "VHD differencing over a dynamic VHD", format: "vhd", type: "differencing", parent: "vhd" },
  { name: "VHDX dynamic (1 MiB blocks)", format: "vhdx", type: "dynamic", blockSize: MiB },
  { name: "VHDX fixed", format: "vhdx", type: "fixed", blockSize: MiB },
  { name: "VHDX differencing over a dynamic VHD", format: "vhdx", type: "differencing", parent: "vhd", blockSize: MiB },
  { name: "VHDX differencing over a dynamic VHDX", format: "vhdx", type: "differencing", parent: "vhdx", blockSize: 2 * MiB },
  // cache=none: the image (and its parent) open with O_DIRECT; metadata through the bounce buffer, payload straight.
  { name: "VHD dynamic, cache=none", format: "vhd", type: "dynamic", cache: "none" },
  { name: "VHD differencing over a dynamic VHD, cache=directsync", format: "vhd", type: "differencing", parent: "vhd", cache: "directsync" },
  { name: "VHDX differencing over a dynamic VHD, cache=none", format: "vhdx", type: "differencing", parent: "vhd", blockSize: MiB, cache: "none" },
  { name: "VHDX dynamic, cache=none", format: "vhdx", type: "dynamic", blockSize: MiB, cache: "none" },
  { name: "VHDX fixed, cache=directsync", format: "vhdx", type: "fixed", blockSize: MiB, cache: "directsync" },
  { name: "VHDX differencing over a dynamic VHDX, cache=none", format: "vhdx", type: "differencing", parent: "vhdx", blockSize: 2 * MiB, cache: "none" },
];

/** Whether `dir` takes O_DIRECT (cache=none cases need it; a tmpfs before Linux 6.6 does not). */
function takesDirect(dir: string): boolean {
  const probe = path.join(dir, "direct-probe");
  fs.writeFileSync(probe, new Uint8Array(4096));
  try {
    fs.closeSync(fs.openSync(probe, fs.constants.O_RDONLY | fs.constants.O_DIRECT));
    return true;
  } catch {
    return false;
  } finally {
    fs.rmSync(probe);
  }
}

for (const [i, c] of cases.entries()) {
  test(`${c.name}: host-span and queued transfers agree with the synchronous path and with qemu-img`, (t) => {
    const { dir, cleanup } = imageDir("image-host-io");
    try {
      if (c.cache !== undefined && !takesDirect(dir)) {
        t.skip(`${dir} does not take O_DIRECT`);
        return;
      }
      const file = path.join(dir, `disk.${c.format}`);
      const model = new Uint8Array(SIZE);
      if (c.parent !== undefined) {
        const parentFile = path.join(dir, `parent.${c.parent}`);
        createDisk(parentFile, c.parent, { type: "dynamic", size: SIZE, ...(c.parent === "vhdx" ? { blockSize: MiB } : {}) });
        const p = openDisk(parentFile);
        const r = rng(1000 + i);
        // Parent data in scattered pieces, so the child reads a mix of its own blocks, the parent's and zeros.
        for (let k = 0; k < 12; k++) {
          const length = (1 + Math.floor(r() * 1024)) * SECTOR;
          const offset = Math.floor((r() * (SIZE - length)) / SECTOR) * SECTOR;
          const v = new Uint8Array(length).fill(0x30 + k);
          p.write(offset, v);
          model.set(v, offset);
        }
        p.close();
        createDisk(file, c.format, { type: "differencing", parentPath: parentFile, ...(c.blockSize !== undefined ? { blockSize: c.blockSize } : {}) });
      } else createDisk(file, c.format, { type: c.type, size: SIZE, ...(c.blockSize !== undefined ? { blockSize: c.blockSize } : {}) });
      const disk = openDisk(file, cacheOpenOptions(c.cache ?? "writeback"));
      let outcomes: Outcomes;
      try {
        if (c.cache !== undefined) {
          const direct = c.cache === "none" || c.cache === "directsync";
          for (const f of c.parent !== undefined ? [file, path.join(dir, `parent.${c.parent}`)] : [file]) {
            const flags = openFlagsOn("self", f);
            assert.equal(flags.length, 1, `one descriptor on ${f}`);
            assert.equal((flags[0]! & fs.constants.O_DIRECT) !== 0, direct, `${f}: O_DIRECT`);
            if (f === file) assert.equal((flags[0]! & fs.constants.O_DSYNC) !== 0, c.cache === "directsync", `${f}: O_DSYNC`);
          }
          assert.deepEqual(disk.notes, [], "nothing fell back to buffered I/O");
        }
        assert.deepEqual(readBack(disk, 0, SIZE), model, "initial contents");
        outcomes = exercise(disk, c.parent !== undefined ? [file, path.join(dir, `parent.${c.parent}`)] : [file], model, 7 + i, 400);
        assert.deepEqual(readBack(disk, 0, SIZE), model, "contents after the run, through the synchronous path");
      } finally {
        disk.close();
      }
      console.log(`${c.name}: ${JSON.stringify(outcomes)}`);
      assert.ok(outcomes.straight + outcomes.queued > 0, "some requests went straight between memory and the file");
      if (c.type !== "fixed") assert.ok(outcomes.declined > 0, "some requests (allocation, partial blocks) declined to the synchronous path");
      if (c.type === "differencing") {
        const again = openDisk(file, { readOnly: true });
        try {
          assert.deepEqual(readBack(again, 0, SIZE), model, "reopened, the chain reads what the model holds");
        } finally {
          again.close();
        }
      } else assert.ok(Buffer.from(model).equals(qemuRead(file, c.format, dir)), "qemu-img reads what the model holds");
    } finally {
      cleanup();
    }
  });
}

test("VHDX: straight transfers only over one file extent and present sectors; allocation declines untouched; a differencing disk's parent serves what it holds", () => {
  const { dir, cleanup } = imageDir("image-host-io-pin");
  const mem = alignedBuffer(4 * MiB);
  const at = (offset: number, length: number) => ({ a: Float64Array.of(Number(addressOfView(mem.subarray(offset, offset + length)))), l: Uint32Array.of(length) });
  try {
    const base = path.join(dir, "base.vhdx");
    createDisk(base, "vhdx", { type: "dynamic", size: 16 * MiB, blockSize: MiB });
    const d = openDisk(base);
    const one = at(0, 2 * MiB);
    mem.fill(0x11, 0, 2 * MiB);
    assert.equal(d.writeHost!(MiB, one.a, one.l, 1), false, "blocks 1-2 are not allocated: declined");
    assert.deepEqual(readBack(d, MiB, 2 * MiB), new Uint8Array(2 * MiB), "and nothing was written");
    // Blocks 2 then 1 (file order reversed), 5 then 6 (file order kept).
    for (const b of [2, 1, 5, 6]) d.write(b * MiB, new Uint8Array(MiB).fill(0x40 + b));
    mem.fill(0, 0, 2 * MiB);
    assert.equal(d.readHost!(MiB, one.a, one.l, 1), false, "blocks 1 and 2 are not one extent in the file");
    assert.equal(d.readHost!(5 * MiB, one.a, one.l, 1), true, "blocks 5 and 6 follow each other in the file");
    assert.ok(mem.subarray(0, MiB).every((b) => b === 0x45) && mem.subarray(MiB, 2 * MiB).every((b) => b === 0x46));
    mem.fill(0x77, 0, 2 * MiB);
    assert.equal(d.writeHost!(5 * MiB + 512, one.a, Uint32Array.of(MiB), 1), true, "a write inside allocated blocks goes straight to the file");
    assert.ok(readBack(d, 5 * MiB + 512, MiB).every((b) => b === 0x77));
    d.close();

    const child = path.join(dir, "child.vhdx");
    createDisk(child, "vhdx", { type: "differencing", parentPath: base, blockSize: MiB });
    const c = openDisk(child);
    mem.fill(0, 0, MiB);
    const blk = at(0, MiB);
    assert.equal(c.readHost!(2 * MiB, blk.a, blk.l, 1), true, "block 2 is the parent's: the parent reads it");
    assert.ok(mem.subarray(0, MiB).every((b) => b === 0x42));
    c.write(2 * MiB, new Uint8Array(4096).fill(0x99)); // the child now holds part of block 2 (partially present)
    assert.equal(c.readHost!(2 * MiB, blk.a, blk.l, 1), false, "a range partly the child's and partly the parent's declines");
    mem.fill(0, 0, MiB);
    assert.equal(c.readHost!(2 * MiB, blk.a, Uint32Array.of(4096), 1), true, "the child's own sectors of a partially present block read straight");
    assert.ok(mem.subarray(0, 4096).every((b) => b === 0x99));
    assert.equal(c.readHost!(2 * MiB + 4096, blk.a, Uint32Array.of(8192), 1), true, "its clear sectors come from the parent");
    assert.ok(mem.subarray(0, 8192).every((b) => b === 0x42));
    mem.fill(0x98, 0, 4096);
    assert.equal(c.writeHost!(2 * MiB, blk.a, Uint32Array.of(4096), 1), true, "a write over sectors already present goes straight");
    assert.equal(c.writeHost!(2 * MiB, blk.a, Uint32Array.of(8192), 1), false, "one that must set bits declines");
    assert.deepEqual(readBack(c, 2 * MiB, 8192), Uint8Array.from({ length: 8192 }, (_, k) => (k < 4096 ? 0x98 : 0x42)));
    assert.throws(() => c.readHost!(16 * MiB - 512, blk.a, blk.l, 1), DiskError, "past the end");
    c.close();
    assert.throws(() => c.readHost!(0, blk.a, blk.l, 1), DiskError, "after close");
    const ro = openDisk(child, { readOnly: true });
    assert.throws(() => ro.writeHost!(0, blk.a, blk.l, 1), DiskError, "read-only");
    ro.close();
  } finally {
    cleanup();
  }
});

test("VHD: one allocated block with every sector present goes straight to the file; clear bits and block boundaries decline", () => {
  const { dir, cleanup } = imageDir("image-host-io-vhd");
  const mem = alignedBuffer(4 * MiB);
  try {
    const file = path.join(dir, "d.vhd");
    createDisk(file, "vhd", { type: "dynamic", size: 16 * MiB });
    const d = openDisk(file);
    const span = (length: number) => ({ a: Float64Array.of(Number(addressOfView(mem.subarray(0, length)))), l: Uint32Array.of(length) });
    d.write(2 * MiB + 8192, new Uint8Array(8192).fill(0x21)); // block 1: sectors 16-31 present
    mem.fill(0);
    assert.equal(d.readHost!(2 * MiB + 8192, span(8192).a, span(8192).l, 1), true, "present sectors read straight");
    assert.ok(mem.subarray(0, 8192).every((b) => b === 0x21));
    assert.equal(d.readHost!(2 * MiB + 4096, span(8192).a, span(8192).l, 1), false, "some sectors' bits are clear");
    mem.fill(0x33, 0, 4096);
    assert.equal(d.writeHost!(2 * MiB + 4096, span(4096).a, span(4096).l, 1), false, "a write that must set bits declines");
    assert.ok(readBack(d, 2 * MiB + 4096, 4096).every((b) => b === 0), "untouched");
    d.write(0, new Uint8Array(4 * MiB).fill(0x44)); // blocks 0 and 1 (2 MiB each) fully present
    assert.equal(d.readHost!(MiB, span(2 * MiB).a, span(2 * MiB).l, 1), false, "a range across two blocks is not one extent (bitmaps sit between)");
    d.close();
  } finally {
    cleanup();
  }
});
