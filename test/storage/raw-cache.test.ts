/**
 * Cache modes of disks (`--disk PATH,cache=MODE`): the open flags each
 * mode gives the file (read back from /proc/self/fdinfo), and cache=none's
 * O_DIRECT data path: guest-RAM spans that meet the file system's alignment
 * (statx STATX_DIOALIGN) go straight between memory and the device, also on
 * a real io_uring once one has worked, while misaligned spans and plain
 * buffers go through the bounce buffer; a random mix of every path against
 * an in-memory model, checked through a second, buffered descriptor (the
 * page cache and the device must agree); what cache=unsafe does to a VHD's
 * and a VHDX's flushes. (VHD and VHDX under O_DIRECT: image-host-io.test.ts.)
 *
 * O_DIRECT needs a file system that takes it: the images live in /var/tmp
 * (disk-backed), not in a tmpfs. Where O_DIRECT is refused there, the direct
 * tests are skipped, saying so.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { CACHE_MODES, cacheOpenOptions, DiskError } from "../../src/storage/block-device.js";
import { DirectIo, openRaw, RawDisk } from "../../src/storage/raw.js";
import { openPassthrough } from "../../src/storage/passthrough.js";
import { createDisk, openDisk } from "../../src/storage/open.js";
import { openFlagsOn, rng, scratchDir } from "./tools/oracle.js";

const { IoUring } = await import("../../src/hypervisor/io-uring.js");
const { addressOfView, alignedBuffer, directIoAlignment } = await import("../../src/hypervisor/libc.js");

const MiB = 1024 * 1024;
const SECTOR = 512;
const SIZE = 4 * MiB;
const O_DSYNC = fs.constants.O_DSYNC;
const O_DIRECT = fs.constants.O_DIRECT;

function imageDir(): { dir: string; cleanup: () => void } {
  if (process.env.PARTIS_TEST_TMP === undefined && fs.existsSync("/var/tmp")) {
    const dir = fs.mkdtempSync(path.join("/var/tmp", "partis-cache-"));
    return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
  }
  return scratchDir("cache");
}

const { dir, cleanup } = imageDir();
process.on("exit", cleanup);

/** Why O_DIRECT cannot be tested here, or undefined when it can. */
const noDirect = ((): string | undefined => {
  const probe = path.join(dir, "probe");
  fs.writeFileSync(probe, Buffer.alloc(SECTOR));
  try {
    const fd = fs.openSync(probe, fs.constants.O_RDONLY | O_DIRECT);
    const said = directIoAlignment(fd);
    fs.closeSync(fd);
    return said === undefined ? `the file system under ${dir} does not say its O_DIRECT alignment (statx)` : undefined;
  } catch (e) {
    return `the file system under ${dir} refuses O_DIRECT (${(e as Error).message})`;
  }
})();

let serial = 0;
function freshImage(fill?: (buf: Uint8Array) => void): { file: string; model: Uint8Array } {
  const file = path.join(dir, `disk${serial++}.raw`);
  const model = new Uint8Array(SIZE);
  fill?.(model);
  fs.writeFileSync(file, model);
  return { file, model };
}

/** What the file holds, read through the page cache (a descriptor of its own). */
function buffered(file: string, offset: number, length: number): Uint8Array {
  const fd = fs.openSync(file, "r");
  try {
    const b = new Uint8Array(length);
    fs.readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

function spans(mem: Uint8Array, at: number, lengths: readonly number[]): { addresses: Float64Array; lengths: Uint32Array; count: number } {
  const a = new Float64Array(lengths.length);
  const l = new Uint32Array(lengths.length);
  let pos = at;
  lengths.forEach((n, i) => {
    a[i] = Number(addressOfView(mem.subarray(pos, pos + n)));
    l[i] = n;
    pos += n;
  });
  return { addresses: a, lengths: l, count: lengths.length };
}

test("each cache mode opens the file with its flags: none O_DIRECT, writethrough O_DSYNC, directsync both, writeback and unsafe neither", { skip: noDirect }, () => {
  for (const mode of CACHE_MODES) {
    const { file } = freshImage();
    const disk = openRaw(file, cacheOpenOptions(mode));
    try {
      const flags = openFlagsOn("self", file);
      assert.equal(flags.length, 1, `${mode}: one descriptor on the image`);
      const wantDirect = mode === "none" || mode === "directsync";
      const wantSync = mode === "writethrough" || mode === "directsync";
      assert.equal((flags[0]! & O_DIRECT) !== 0, wantDirect, `${mode}: O_DIRECT`);
      assert.equal((flags[0]! & O_DSYNC) !== 0, wantSync, `${mode}: O_DSYNC`);
      assert.equal(disk.directIo, wantDirect, `${mode}: directIo`);
      assert.deepEqual(disk.notes, [], `${mode}: nothing fell back`);
    } finally {
      disk.close();
    }
  }
  // A host block device's path (here a regular file given as one) takes the same flags.
  const { file } = freshImage();
  const pass = openPassthrough(file, cacheOpenOptions("directsync"));
  try {
    const flags = openFlagsOn("self", file);
    assert.ok((flags[0]! & O_DIRECT) !== 0 && (flags[0]! & O_DSYNC) !== 0, "pass-through, directsync: O_DIRECT|O_DSYNC");
  } finally {
    pass.close();
  }
});

test("cache=none: aligned guest spans go straight to the device, misaligned ones are declined untouched and bounce", { skip: noDirect }, () => {
  const { file, model } = freshImage((b) => b.fill(0x11));
  const disk: RawDisk = openRaw(file, cacheOpenOptions("none"));
  const mem = alignedBuffer(2 * MiB);
  try {
    // Two page-aligned spans, 12 KiB, at a sector-aligned offset.
    mem.fill(0xa1, 0, 12288);
    const s = spans(mem, 0, [4096, 8192]);
    assert.equal(disk.writeHost(8 * SECTOR, s.addresses, s.lengths, s.count), true, "aligned write taken");
    model.fill(0xa1, 8 * SECTOR, 8 * SECTOR + 12288);
    assert.deepEqual(disk.directIoCounts, { straight: 1, bounced: 0 });
    assert.deepEqual(buffered(file, 0, SIZE), model, "the device holds the write (read through the page cache)");

    // A span 8 bytes off the memory alignment: declined, nothing written.
    mem.fill(0xb2, 0, 4096 + 8);
    const off = spans(mem, 8, [4096]);
    assert.equal(disk.writeHost(64 * SECTOR, off.addresses, off.lengths, off.count), false, "misaligned memory declined");
    assert.equal(disk.readHost(64 * SECTOR, off.addresses, off.lengths, off.count), false, "misaligned read declined");
    assert.deepEqual(mem.subarray(8, 4096 + 8), new Uint8Array(4096).fill(0xb2), "a declined read left memory alone");
    assert.deepEqual(buffered(file, 64 * SECTOR, 4096), model.subarray(64 * SECTOR, 64 * SECTOR + 4096), "a declined write left the disk alone");
    // The caller's synchronous path then bounces.
    disk.write(64 * SECTOR, mem.subarray(8, 4096 + 8));
    model.fill(0xb2, 64 * SECTOR, 64 * SECTOR + 4096);
    assert.equal(disk.directIoCounts.bounced, 1);
    // An offset or a length the file system cannot take directly (here 100 bytes): declined as well.
    const short = spans(mem, 0, [100]);
    assert.equal(disk.readHost(0, short.addresses, short.lengths, short.count), false, "a length off the alignment is declined");

    // Reading back straight into guest RAM.
    const back = spans(mem, 4096, [SECTOR, 4096 - SECTOR, 8192]);
    mem.fill(0, 4096, 4096 + 12288);
    assert.equal(disk.readHost(8 * SECTOR, back.addresses, back.lengths, back.count), true);
    assert.deepEqual(mem.subarray(4096, 4096 + 12288), model.subarray(8 * SECTOR, 8 * SECTOR + 12288));
    assert.deepEqual(disk.directIoCounts, { straight: 2, bounced: 1 });
    // Range and read-only checks are the same as buffered ones.
    assert.throws(() => disk.readHost(SIZE, s.addresses, s.lengths, s.count), (e: unknown) => e instanceof DiskError && e.code === "OUT_OF_RANGE");
  } finally {
    disk.close();
  }
  assert.deepEqual(buffered(file, 0, SIZE), model);
});

test("cache=none on an io_uring: queued only once a direct transfer has worked, then without a try; flushes queued too", { skip: noDirect }, () => {
  const { file, model } = freshImage((b) => b.fill(0x5a));
  const disk = openRaw(file, cacheOpenOptions("none"));
  const ring = IoUring.open(8);
  const mem = alignedBuffer(MiB);
  try {
    mem.fill(0xc3, 0, 65536);
    const s = spans(mem, 0, [65536]);
    assert.equal(disk.queueHost(ring, true, 0, s.addresses, s.lengths, s.count, 7), false, "not queued before O_DIRECT has been seen to work");
    assert.equal(disk.queueFlush(ring, 8), false, "no queued flush yet either");
    assert.equal(disk.writeHost(0, s.addresses, s.lengths, s.count), true, "the synchronous direct write proves it");
    model.fill(0xc3, 0, 65536);

    mem.fill(0xd4, 65536, 65536 + 131072);
    const w = spans(mem, 65536, [65536, 65536]);
    assert.equal(disk.queueHost(ring, true, MiB, w.addresses, w.lengths, w.count, 1), "queued");
    model.fill(0xd4, MiB, MiB + 131072);
    assert.equal(disk.queueFlush(ring, 2), true, "a flush on the ring");
    ring.submit();
    const results = new Map<number, number>();
    ring.drain((token, res) => results.set(token, res));
    assert.deepEqual([...results.entries()].sort(), [[1, 131072], [2, 0]]);
    assert.deepEqual(buffered(file, MiB, 131072), model.subarray(MiB, MiB + 131072));

    mem.fill(0, 0, 131072);
    const r = spans(mem, 0, [4096, 126976]);
    assert.equal(disk.queueHost(ring, false, MiB, r.addresses, r.lengths, r.count, 3), "queued");
    ring.submit();
    ring.drain((token, res) => assert.equal(res, 131072, `queued read (token ${token})`));
    assert.deepEqual(mem.subarray(0, 131072), model.subarray(MiB, MiB + 131072));
    const misaligned = spans(mem, 512 + 8, [4096]);
    assert.equal(disk.queueHost(ring, false, 0, misaligned.addresses, misaligned.lengths, misaligned.count, 4), false, "misaligned spans are not queued");
    assert.deepEqual(disk.directIoCounts, { straight: 3, bounced: 0 });
  } finally {
    ring.close();
    disk.close();
  }
});

test("cache=unsafe: flushes are not queued and do nothing; writeback queues them as before", { skip: noDirect }, () => {
  const mem = alignedBuffer(MiB);
  for (const mode of ["unsafe", "writeback"] as const) {
    const { file } = freshImage();
    const disk = openRaw(file, cacheOpenOptions(mode));
    const ring = IoUring.open(4);
    try {
      const s = spans(mem, 0, [4096]);
      // A read tried without waiting (done at once: the fresh file is in the page cache) tells the disk the file system can say whether it would wait.
      const q = disk.queueHost(ring, false, 0, s.addresses, s.lengths, s.count, 1);
      ring.submit();
      ring.drain(() => undefined);
      assert.notEqual(q, false, `${mode}: the write went the ring's way`);
      assert.equal(disk.queueFlush(ring, 2), mode === "writeback", `${mode}: flush queued`);
      ring.submit();
      ring.drain(() => undefined);
    } finally {
      ring.close();
      disk.close();
    }
  }
});

for (const mode of ["none", "directsync"] as const) {
  test(`cache=${mode}: 400 random requests through every path against a model, read back through the page cache`, { skip: noDirect }, () => {
    const r = rng(mode === "none" ? 0xd1ec7 : 0xd1ec8);
    const { file, model } = freshImage((b) => {
      for (let i = 0; i < b.length; i += SECTOR) b.fill((i / SECTOR) & 0xff, i, i + SECTOR);
    });
    const disk = openRaw(file, cacheOpenOptions(mode));
    const ring = IoUring.open(16);
    const mem = alignedBuffer(4 * MiB);
    const outcomes = { straight: 0, queued: 0, declined: 0 };
    try {
      for (let step = 0; step < 400; step++) {
        const sectors = r() < 0.3 ? 1 + Math.floor(r() * 2048) : 1 + Math.floor(r() * 16);
        const length = sectors * SECTOR;
        const offset = Math.floor(r() * (SIZE / SECTOR - sectors)) * SECTOR;
        // Memory: page-aligned, sector-aligned, or off by a few bytes; cut into 1-3 spans at sector edges.
        const shift = [0, 0, 0, SECTOR, 8, 4096 + 24][Math.floor(r() * 6)]!;
        const cut = sectors > 1 && r() < 0.5 ? Math.floor(r() * (sectors - 1) + 1) * SECTOR : length;
        const pieces = cut === length ? [length] : [cut, length - cut];
        const s = spans(mem, shift, pieces);
        const write = r() < 0.5;
        const tag = Math.floor(r() * 256);
        const view = mem.subarray(shift, shift + length);
        if (write) for (let i = 0; i < length; i += SECTOR) view.fill((tag + i / SECTOR) & 0xff, i, i + SECTOR);
        else view.fill(0xee);
        const how = r();
        let done: boolean;
        if (how < 0.4) {
          done = write ? disk.writeHost(offset, s.addresses, s.lengths, s.count) : disk.readHost(offset, s.addresses, s.lengths, s.count);
          if (done) outcomes.straight++;
        } else if (how < 0.8) {
          const q = disk.queueHost(ring, write, offset, s.addresses, s.lengths, s.count, step);
          done = q !== false;
          if (q === "queued") {
            outcomes.queued++;
            ring.submit();
            ring.drain((token, res) => assert.equal(res, length, `step ${token}: queued ${write ? "write" : "read"} of ${length} at ${offset}`));
          }
        } else done = false;
        if (!done) {
          outcomes.declined++;
          if (!write) assert.ok(view.every((b) => b === 0xee), `step ${step}: a declined read left memory alone`);
          if (write) disk.write(offset, view);
          else disk.read(offset, view);
        }
        if (write) model.set(view, offset);
        else assert.deepEqual(view, model.subarray(offset, offset + length), `step ${step}: read of ${length} at ${offset} (memory +${shift})`);
        if (step % 50 === 49) assert.deepEqual(buffered(file, 0, SIZE), model, `step ${step}: the file through the page cache`);
      }
    } finally {
      ring.close();
      disk.close();
    }
    assert.deepEqual(buffered(file, 0, SIZE), model);
    assert.ok(outcomes.straight > 20 && outcomes.queued > 20 && outcomes.declined > 20, `every path taken: ${JSON.stringify(outcomes)}`);
    assert.equal(disk.notes.length, 0, `no fallback: ${disk.notes.join("; ")}`);
  });
}

test("cache=none where the file system's alignment is coarser than the disk's sectors: sector writes read-modify-write correctly, and nothing is queued (a queued neighbour could be undone)", { skip: noDirect }, () => {
  const { file, model } = freshImage((b) => b.fill(0x21));
  const fd = fs.openSync(file, fs.constants.O_RDWR | O_DIRECT);
  // As openFileForDisk builds it for a file system that asks for 4096-byte offsets and lengths.
  const disk = new RawDisk({ path: file, fd, size: SIZE, type: "raw", readOnly: false, logicalSectorSize: SECTOR, physicalSectorSize: 4096, direct: new DirectIo(fd, 4096, 512, alignedBuffer(MiB)), reopenBuffered: undefined, notes: [] });
  const ring = IoUring.open(4);
  const mem = alignedBuffer(MiB);
  try {
    mem.fill(0x42, 0, 8192);
    const whole = spans(mem, 0, [8192]);
    assert.equal(disk.writeHost(4096, whole.addresses, whole.lengths, whole.count), true, "4 KiB-aligned: straight");
    model.fill(0x42, 4096, 4096 + 8192);
    assert.equal(disk.queueHost(ring, true, 4096, whole.addresses, whole.lengths, whole.count, 1), false, "not queued, although aligned and proven");
    assert.equal(disk.queueHost(ring, false, 4096, whole.addresses, whole.lengths, whole.count, 2), false);
    const sector = spans(mem, 0, [SECTOR]);
    assert.equal(disk.writeHost(4096 + SECTOR, sector.addresses, sector.lengths, sector.count), false, "one sector is not a 4 KiB unit: declined");
    mem.fill(0x43, 0, SECTOR);
    disk.write(4096 + SECTOR, mem.subarray(0, SECTOR));
    model.fill(0x43, 4096 + SECTOR, 4096 + 2 * SECTOR);
    assert.deepEqual(disk.directIoCounts, { straight: 1, bounced: 1 });
    assert.deepEqual(buffered(file, 0, SIZE), model, "the read-modify-write kept the sectors around it");
  } finally {
    ring.close();
    disk.close();
  }
});

test("cache=unsafe on VHDX and VHD: no flush is queued; a VHDX's guest flush commits nothing (close does), a VHD's publishes its metadata unsynced", () => {
  const ring = IoUring.open(4);
  try {
    for (const format of ["vhdx", "vhd"] as const) {
      const file = path.join(dir, `unsafe${serial++}.${format}`);
      createDisk(file, format, { type: "dynamic", size: 8 * MiB });
      const disk = openDisk(file, cacheOpenOptions("unsafe"));
      const data = new Uint8Array(64 * 1024).fill(0x7c);
      try {
        disk.write(MiB, data);
        assert.equal(disk.queueFlush!(ring, 1), false, `${format}: no fsync queued`);
        disk.flush();
        const other = openDisk(file, { readOnly: true });
        try {
          const seen = new Uint8Array(data.length);
          other.read(MiB, seen);
          if (format === "vhdx") assert.ok(seen.every((b) => b === 0), "VHDX: the new block's BAT entry is not committed by a guest flush");
          else assert.deepEqual(seen, data, "VHD: the flush published the block (without fdatasync)");
        } finally {
          other.close();
        }
      } finally {
        disk.close();
      }
      const again = openDisk(file, { readOnly: true });
      try {
        const seen = new Uint8Array(data.length);
        again.read(MiB, seen);
        assert.deepEqual(seen, data, `${format}: close committed everything`);
      } finally {
        again.close();
      }
    }
  } finally {
    ring.close();
  }
});
