import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createDisk, openDisk } from "../../../src/storage/open.js";
import type { BlockDevice, BlockRequestRing } from "../../../src/storage/block-device.js";
import { VIRTIO_F, VIRTIO_STATUS as S, featureBit, type VirtioPciDevice } from "../../../src/devices/virtio/pci-transport.js";
import { VIRTIO_BLK_CONFIG as K, VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T, createVirtioBlk, type VirtioBlk } from "../../../src/devices/virtio/virtio-blk.js";
import { IoUring } from "../../../src/hypervisor/io-uring.js";
import { TestVirtioDriver, makeServices, placeDevice, type Buffer, type DriverQueue, type TestServices } from "./virtio-driver.js";
import { MemDisk } from "./mem-disk.js";
import { ScriptedRing } from "../device-fakes.js";

const MiB = 1 << 20;
const HDR = 0x200000;
const DATA = 0x210000;
const STATUS = 0x3f0000;
const INDIRECT = 0x3f8000;

const ALL = featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.indirectDesc) | featureBit(VIRTIO_F.eventIdx) | 0xffff_ffffn;

function make(
  disk: BlockDevice = new MemDisk(MiB),
  opts: { queues?: number; serial?: string; want?: bigint; msix?: boolean; hostMapped?: boolean; chunkBytes?: number; ring?: BlockRequestRing } = {},
) {
  const services = makeServices(4 * MiB, opts.chunkBytes ?? 1 << 30, opts.hostMapped ?? false);
  const dev = createVirtioBlk("vblk0", disk, services, {
    queues: opts.queues ?? 1,
    ...(opts.serial !== undefined ? { serial: opts.serial } : {}),
    ...(opts.ring !== undefined ? { ring: opts.ring } : {}),
  });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: opts.want ?? ALL, msix: opts.msix ?? true }), true);
  return { services, dev, drv, disk, blk: dev.backend as VirtioBlk };
}

interface Req {
  type: number;
  sector?: number;
  out?: Uint8Array;
  inLen?: number;
  /** Split layout: header + data share one readable descriptor; data + status one writable descriptor. */
  merged?: boolean;
  indirect?: boolean;
}

function header(type: number, sector: number): Uint8Array {
  const h = new Uint8Array(16);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, type, true);
  dv.setUint32(8, sector % 2 ** 32, true);
  dv.setUint32(12, Math.floor(sector / 2 ** 32), true);
  return h;
}

/** Place a request without kicking; returns how to read its result. */
function place(mem: TestServices["memory"], q: DriverQueue, r: Req, slot = 0): { head: number; statusAt: number; dataAt: number } {
  const h = header(r.type, r.sector ?? 0);
  const hdrAt = HDR + slot * 0x1000;
  const dataAt = DATA + slot * 0x20000;
  const statusAt = STATUS + slot * 16;
  mem.bytes(statusAt, 1)[0] = 0xee;
  const bufs: Buffer[] = [];
  if (r.merged === true) {
    const out = r.out ?? new Uint8Array(0);
    mem.write(hdrAt, h);
    if (out.length > 0) mem.write(hdrAt + 16, out);
    bufs.push({ addr: hdrAt, len: 16 + out.length, write: false });
    // data-in and status in one writable descriptor
    bufs.push({ addr: dataAt, len: (r.inLen ?? 0) + 1, write: true });
    return { head: q.add(bufs, r.indirect === true ? { indirectAt: INDIRECT + slot * 0x100 } : {}), statusAt: dataAt + (r.inLen ?? 0), dataAt };
  }
  mem.write(hdrAt, h);
  bufs.push({ addr: hdrAt, len: 16, write: false });
  if (r.out !== undefined) {
    mem.write(dataAt, r.out);
    bufs.push({ addr: dataAt, len: r.out.length, write: false });
  }
  if (r.inLen !== undefined && r.inLen > 0) bufs.push({ addr: dataAt, len: r.inLen, write: true });
  bufs.push({ addr: statusAt, len: 1, write: true });
  return { head: q.add(bufs, r.indirect === true ? { indirectAt: INDIRECT + slot * 0x100 } : {}), statusAt, dataAt };
}

function submit(t: ReturnType<typeof make>, r: Req, qi = 0): { status: number; len: number; data: Uint8Array } {
  const q = t.drv.queues[qi]!;
  const mem = t.services.memory;
  const p = place(mem, q, r);
  q.setUsedEvent(q.lastUsed); // callbacks enabled, as virtqueue_enable_cb leaves them
  q.kick();
  const used = q.takeUsed();
  assert.equal(used.length, 1, "one used entry");
  assert.equal(used[0]!.id, p.head);
  q.numFree = q.size;
  return { status: mem.bytes(p.statusAt, 1)[0]!, len: used[0]!.len, data: mem.read(p.dataAt, r.inLen ?? 0) };
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

test("configuration space and features", () => {
  const t = make(new MemDisk(8 * MiB, false, 512, 4096), { queues: 4 });
  const offered = t.drv.offeredFeatures();
  for (const f of [VIRTIO_BLK_F.segMax, VIRTIO_BLK_F.blkSize, VIRTIO_BLK_F.flush, VIRTIO_BLK_F.mq, VIRTIO_BLK_F.discard, VIRTIO_BLK_F.writeZeroes, VIRTIO_BLK_F.topology])
    assert.ok((offered & featureBit(f)) !== 0n, `feature ${f}`);
  assert.equal(offered & featureBit(VIRTIO_BLK_F.ro), 0n);
  assert.equal(t.drv.deviceConfig(K.capacity, 4), 8 * MiB / 512);
  assert.equal(t.drv.deviceConfig(K.capacity + 4, 4), 0);
  assert.equal(t.drv.deviceConfig(K.segMax, 4), 254);
  assert.equal(t.drv.deviceConfig(K.blkSize, 4), 512);
  assert.equal(t.drv.deviceConfig(K.physicalBlockExp, 1), 3);
  assert.equal(t.drv.deviceConfig(K.numQueues, 2), 4);
  assert.equal(t.drv.deviceConfig(K.maxDiscardSeg, 4), 16);
  assert.equal(t.drv.deviceConfig(K.maxWriteZeroesSeg, 4), 1);
  assert.equal(t.drv.r16(0x12), 4, "num_queues in common config");
  assert.equal(t.dev.pci.configRead(2, 2), 0x1042);
  const ro = make(new MemDisk(MiB, true));
  const f2 = ro.drv.offeredFeatures();
  assert.ok((f2 & featureBit(VIRTIO_BLK_F.ro)) !== 0n);
  assert.equal(f2 & featureBit(VIRTIO_BLK_F.discard), 0n);
  assert.equal(f2 & featureBit(VIRTIO_BLK_F.mq), 0n);
});

test("write cache (CONFIG_WCE): write-back by default, write-through for an O_DSYNC disk; the guest turning it off makes each write flushed before it completes; reset restores it", () => {
  const t = make(new MemDisk(MiB));
  const disk = t.disk as MemDisk;
  assert.ok((t.drv.offeredFeatures() & featureBit(VIRTIO_BLK_F.configWce)) !== 0n, "CONFIG_WCE offered");
  assert.equal(t.drv.deviceConfig(K.writeback, 1), 1, "write-back");
  assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 2, out: pattern(4096, 1) }).status, 0);
  assert.equal(disk.flushes, 0, "write-back: a write is not flushed");
  t.drv.setDeviceConfig(K.writeback, 1, 0);
  assert.equal(t.drv.deviceConfig(K.writeback, 1), 0, "the guest turned the write cache off");
  assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 2, out: pattern(4096, 2) }).status, 0);
  assert.equal(disk.flushes, 1, "write-through: the write was flushed before it completed");
  assert.equal(submit(t, { type: VIRTIO_BLK_T.in, sector: 2, inLen: 4096 }).status, 0);
  assert.equal(disk.flushes, 1, "reads are not flushed");
  t.drv.setDeviceConfig(K.capacity, 4, 7);
  t.drv.setDeviceConfig(K.writeback - 1, 2, 0x0101);
  assert.equal(t.drv.deviceConfig(K.capacity, 4), MiB / 512, "every other field is read-only");
  assert.equal(t.drv.deviceConfig(K.writeback, 1), 0, "writeback only through a 1-byte write");
  t.drv.reset();
  assert.equal(t.drv.deviceConfig(K.writeback, 1), 1, "reset: write-back again");
  assert.equal(t.blk.save().writeback, 1);

  // Without CONFIG_WCE negotiated the field cannot be written.
  const plain = make(new MemDisk(MiB), { want: ALL & ~featureBit(VIRTIO_BLK_F.configWce) });
  plain.drv.setDeviceConfig(K.writeback, 1, 0);
  assert.equal(plain.drv.deviceConfig(K.writeback, 1), 1);

  // A disk whose writes are stable by themselves (cache=writethrough, directsync) says so and never adds flushes.
  const services = makeServices(4 * MiB, 1 << 30, false);
  const stableDisk = new MemDisk(MiB);
  const dev = createVirtioBlk("vblk1", stableDisk, services, { queues: 1, writeThrough: true });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: ALL, msix: true }), true);
  assert.equal(drv.deviceConfig(K.writeback, 1), 0, "write-through");
  const w = { services, dev, drv, disk: stableDisk as BlockDevice, blk: dev.backend as VirtioBlk };
  assert.equal(submit(w, { type: VIRTIO_BLK_T.out, sector: 4, out: pattern(512, 3) }).status, 0);
  assert.equal(stableDisk.flushes, 0, "O_DSYNC writes need no flush");
  // Read-only disks offer no write cache to change.
  assert.equal(make(new MemDisk(MiB, true)).drv.offeredFeatures() & featureBit(VIRTIO_BLK_F.configWce), 0n);
});

test("write, read back, flush, get-id", () => {
  const t = make(new MemDisk(MiB), { serial: "PARTIS-DISK-0123456789" });
  const disk = t.disk as MemDisk;
  const data = pattern(8192, 7);
  assert.deepEqual(submit(t, { type: VIRTIO_BLK_T.out, sector: 10, out: data }), { status: 0, len: 1, data: new Uint8Array(0) });
  assert.deepEqual(disk.data.subarray(5120, 5120 + 8192), data);
  const r = submit(t, { type: VIRTIO_BLK_T.in, sector: 10, inLen: 8192 });
  assert.equal(r.status, VIRTIO_BLK_S.ok);
  assert.equal(r.len, 8193);
  assert.deepEqual(r.data, data);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.flush }).status, 0);
  assert.equal(disk.flushes, 1);
  const id = submit(t, { type: VIRTIO_BLK_T.getId, inLen: 20 });
  assert.equal(id.status, 0);
  assert.equal(id.len, 21);
  assert.equal(Buffer.from(id.data).toString("latin1"), "PARTIS-DISK-01234567");
  assert.equal(t.blk.stats.requests, 4);
  assert.ok(t.services.msi.count(1) >= 1, "queue 0 interrupt on vector 1");
});

test("free framing: header+data in one descriptor, data+status in one; indirect", () => {
  const t = make();
  const data = pattern(4096, 3);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 1, out: data, merged: true }).status, 0);
  const r = submit(t, { type: VIRTIO_BLK_T.in, sector: 1, inLen: 4096, merged: true });
  assert.equal(r.status, 0);
  assert.deepEqual(r.data, data);
  const r2 = submit(t, { type: VIRTIO_BLK_T.in, sector: 1, inLen: 4096, indirect: true });
  assert.equal(r2.status, 0);
  assert.deepEqual(r2.data, data);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 9, out: data, indirect: true, merged: true }).status, 0);
  assert.deepEqual((t.disk as MemDisk).data.subarray(9 * 512, 9 * 512 + 4096), data);
});

test("out-of-range and misaligned requests get IOERR; unknown types UNSUPP; short header IOERR", () => {
  const t = make(new MemDisk(MiB));
  const last = MiB / 512;
  assert.equal(submit(t, { type: VIRTIO_BLK_T.in, sector: last - 1, inLen: 512 }).status, 0);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.in, sector: last - 1, inLen: 1024 }).status, VIRTIO_BLK_S.ioerr);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.in, sector: last, inLen: 512 }).status, VIRTIO_BLK_S.ioerr);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 2 ** 60, out: new Uint8Array(512) }).status, VIRTIO_BLK_S.ioerr);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 0, out: new Uint8Array(100) }).status, VIRTIO_BLK_S.ioerr);
  const bad = submit(t, { type: VIRTIO_BLK_T.in, sector: last + 5, inLen: 512 });
  assert.equal(bad.len, 1, "only the status byte written");
  assert.equal(submit(t, { type: 99 }).status, VIRTIO_BLK_S.unsupp);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.getLifetime, inLen: 16 }).status, VIRTIO_BLK_S.unsupp);
  // A 10-byte header.
  const q = t.drv.queues[0]!;
  const mem = t.services.memory;
  mem.bytes(STATUS, 1)[0] = 0xee;
  q.add([{ addr: HDR, len: 10, write: false }, { addr: STATUS, len: 1, write: true }]);
  q.kick();
  assert.equal(q.takeUsed().length, 1);
  assert.equal(mem.bytes(STATUS, 1)[0], VIRTIO_BLK_S.ioerr);
  q.numFree = q.size;
  assert.equal(t.drv.status() & S.needsReset, 0);
  // Back end failure.
  (t.disk as MemDisk).failNext = true;
  assert.equal(submit(t, { type: VIRTIO_BLK_T.in, sector: 0, inLen: 512 }).status, VIRTIO_BLK_S.ioerr);
  assert.equal(t.blk.stats.errors, 7);
});

test("a request with no writable byte makes the device need a reset", () => {
  const t = make();
  const q = t.drv.queues[0]!;
  t.services.memory.bytes(HDR, 16).set(header(VIRTIO_BLK_T.flush, 0));
  q.add([{ addr: HDR, len: 16, write: false }]);
  q.kick();
  assert.equal(t.drv.status() & S.needsReset, S.needsReset);
  assert.equal(t.services.msi.count(0), 1, "config interrupt");
  assert.match(t.dev.lastError ?? "", /VIRTIO_BLK_NO_STATUS/);
});

test("read-only disk: writes, discards and write-zeroes fail with IOERR; reads and flush work", () => {
  const disk = new MemDisk(MiB, true);
  disk.data.set(pattern(512, 1), 512);
  const t = make(disk);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 1, out: new Uint8Array(512) }).status, VIRTIO_BLK_S.ioerr);
  const seg = new Uint8Array(16);
  new DataView(seg.buffer).setUint32(8, 1, true);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.discard, out: seg }).status, VIRTIO_BLK_S.ioerr);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.writeZeroes, out: seg }).status, VIRTIO_BLK_S.ioerr);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.flush }).status, 0);
  const r = submit(t, { type: VIRTIO_BLK_T.in, sector: 1, inLen: 512 });
  assert.equal(r.status, 0);
  assert.deepEqual(r.data, pattern(512, 1));
  assert.equal(disk.writes, 0);
});

function dwz(...segs: [number, number, number][]): Uint8Array {
  const b = new Uint8Array(16 * segs.length);
  const dv = new DataView(b.buffer);
  segs.forEach(([sector, count, flags], i) => {
    dv.setUint32(i * 16, sector, true);
    dv.setUint32(i * 16 + 8, count, true);
    dv.setUint32(i * 16 + 12, flags, true);
  });
  return b;
}

test("discard and write-zeroes", () => {
  const t = make(new MemDisk(MiB));
  const disk = t.disk as MemDisk;
  disk.data.fill(0xab);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.discard, out: dwz([8, 8, 0], [100, 16, 0]) }).status, 0);
  assert.deepEqual(disk.discards, [[4096, 4096], [51200, 8192]]);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.discard, out: dwz([8, 8, 1]) }).status, VIRTIO_BLK_S.unsupp, "unmap flag on discard");
  assert.equal(submit(t, { type: VIRTIO_BLK_T.discard, out: dwz([2047, 2, 0]) }).status, VIRTIO_BLK_S.ioerr, "past the end");
  assert.equal(submit(t, { type: VIRTIO_BLK_T.discard, out: new Uint8Array(20) }).status, VIRTIO_BLK_S.ioerr, "not whole segments");
  const many = dwz(...Array.from({ length: 17 }, (_v, i): [number, number, number] => [i * 8, 8, 0]));
  assert.equal(submit(t, { type: VIRTIO_BLK_T.discard, out: many }).status, VIRTIO_BLK_S.unsupp, "over max_discard_seg");
  assert.equal(disk.discards.length, 2, "nothing discarded by rejected requests");
  assert.equal(submit(t, { type: VIRTIO_BLK_T.writeZeroes, out: dwz([300, 200, 1]) }).status, 0);
  assert.ok(disk.data.subarray(300 * 512, 500 * 512).every((b) => b === 0));
  assert.equal(disk.data[300 * 512 - 1], 0xab);
  assert.equal(disk.data[500 * 512], 0xab);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.writeZeroes, out: dwz([0, 8, 2]) }).status, VIRTIO_BLK_S.unsupp, "reserved flag");
  assert.equal(submit(t, { type: VIRTIO_BLK_T.writeZeroes, out: dwz([0, 8, 0], [16, 8, 0]) }).status, VIRTIO_BLK_S.unsupp, "one segment only");
  // Not negotiated -> UNSUPP.
  const t2 = make(new MemDisk(MiB), { want: featureBit(VIRTIO_F.version1) });
  assert.equal(submit(t2, { type: VIRTIO_BLK_T.discard, out: dwz([0, 8, 0]) }).status, VIRTIO_BLK_S.unsupp);
});

test("multi-queue: every queue serves requests on its own vector", () => {
  const t = make(new MemDisk(MiB), { queues: 3 });
  for (let qi = 0; qi < 3; qi++) {
    assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: qi * 8, out: pattern(4096, qi) }, qi).status, 0);
    assert.deepEqual(submit(t, { type: VIRTIO_BLK_T.in, sector: qi * 8, inLen: 4096 }, qi).data, pattern(4096, qi));
    assert.equal(t.services.msi.count(qi + 1), 2);
  }
});

test("a batch of requests with EVENT_IDX: one kick, one interrupt", () => {
  const t = make(new MemDisk(MiB));
  const q = t.drv.queues[0]!;
  q.setUsedEvent(0);
  const heads: number[] = [];
  for (let i = 0; i < 8; i++) heads.push(place(t.services.memory, q, { type: VIRTIO_BLK_T.out, sector: i * 8, out: pattern(4096, i) }, i).head);
  q.kick();
  assert.deepEqual(q.takeUsed().map((u) => u.id), heads);
  assert.equal(t.services.msi.count(1), 1);
  assert.equal(q.availEvent(), 8);
  for (let i = 0; i < 8; i++) assert.deepEqual((t.disk as MemDisk).data.subarray(i * 4096, i * 4096 + 4096), pattern(4096, i));
});

test("INTx delivery when MSI-X is off", () => {
  const t = make(new MemDisk(MiB), { msix: false });
  assert.equal(submit(t, { type: VIRTIO_BLK_T.flush }).status, 0);
  assert.equal(t.services.intx.level, true);
  assert.equal(t.drv.r8(0x1000), 1);
  assert.equal(t.services.intx.level, false);
});

test("a raw image file", () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-vblk-"));
  try {
    const path = join(dir, "disk.raw");
    createDisk(path, "raw", { type: "fixed", size: 4 * MiB });
    const disk = openDisk(path);
    const t = make(disk);
    const data = pattern(65536, 9);
    assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 2048, out: data }).status, 0);
    assert.equal(submit(t, { type: VIRTIO_BLK_T.flush }).status, 0);
    assert.deepEqual(submit(t, { type: VIRTIO_BLK_T.in, sector: 2048, inLen: 65536 }).data, data);
    assert.equal(submit(t, { type: VIRTIO_BLK_T.in, sector: 8192, inLen: 512 }).status, VIRTIO_BLK_S.ioerr);
    disk.close();
    // The guest's fstrim: a discard gives the space back to the host; write-zeroes with unmap too.
    const disk2 = openDisk(path);
    const t3 = make(disk2);
    assert.equal(submit(t3, { type: VIRTIO_BLK_T.out, sector: 4096, out: pattern(MiB, 3) }).status, 0);
    assert.equal(submit(t3, { type: VIRTIO_BLK_T.flush }).status, 0);
    const used = statSync(path).blocks * 512;
    assert.equal(submit(t3, { type: VIRTIO_BLK_T.discard, out: dwz([4096, 2048, 0]) }).status, 0);
    assert.equal(submit(t3, { type: VIRTIO_BLK_T.writeZeroes, out: dwz([2048, 128, 1]) }).status, 0);
    assert.equal(submit(t3, { type: VIRTIO_BLK_T.flush }).status, 0);
    assert.ok(statSync(path).blocks * 512 <= used - MiB - 65536, `space freed: ${used} -> ${statSync(path).blocks * 512} bytes`);
    assert.ok(submit(t3, { type: VIRTIO_BLK_T.in, sector: 4096, inLen: MiB }).data!.every((b) => b === 0));
    assert.ok(submit(t3, { type: VIRTIO_BLK_T.in, sector: 2048, inLen: 65536 }).data!.every((b) => b === 0));
    assert.deepEqual(
      disk2.allocation(2048 * 512, 3 * MiB).map((e) => e.state),
      ["unallocated"],
      "the written ranges are holes again",
    );
    assert.equal(submit(t3, { type: VIRTIO_BLK_T.out, sector: 2048, out: data }).status, 0);
    disk2.close();
    const ro = openDisk(path, { readOnly: true });
    const t2 = make(ro);
    assert.deepEqual(submit(t2, { type: VIRTIO_BLK_T.in, sector: 2048, inLen: 65536 }).data, data);
    assert.equal(submit(t2, { type: VIRTIO_BLK_T.out, sector: 0, out: data }).status, VIRTIO_BLK_S.ioerr);
    ro.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a raw image on host-mapped guest RAM: each request is one preadv/pwritev on host addresses, also across mapping chunks", () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-vblk-"));
  try {
    const path = join(dir, "disk.raw");
    createDisk(path, "raw", { type: "fixed", size: 4 * MiB });
    const disk = openDisk(path);
    const calls = { readHost: 0, writeHost: 0, readVectored: 0, writeVectored: 0 };
    const spy: BlockDevice = Object.assign(Object.create(disk) as BlockDevice, {
      readHost: (o: number, a: Float64Array, l: Uint32Array, n: number) => (disk.readHost!(o, a, l, n) ? (calls.readHost++, true) : false),
      writeHost: (o: number, a: Float64Array, l: Uint32Array, n: number) => (disk.writeHost!(o, a, l, n) ? (calls.writeHost++, true) : false),
      readVectored: (o: number, v: readonly Uint8Array[], n: number) => (calls.readVectored++, disk.readVectored!(o, v, n)),
      writeVectored: (o: number, v: readonly Uint8Array[], n: number) => (calls.writeVectored++, disk.writeVectored!(o, v, n)),
    });
    // 64 KiB mapping chunks (separate host mappings): a merged 64 KiB write's header+data descriptor runs
    // from 0x200000 over the chunk boundary at 0x210000, so the walk splits it and the host path gets two spans.
    const t = make(spy, { hostMapped: true, chunkBytes: 0x10000 });
    const data = pattern(65536, 5);
    assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 100, out: data }).status, 0);
    assert.deepEqual(submit(t, { type: VIRTIO_BLK_T.in, sector: 100, inLen: 65536 }).data, data);
    // Merged framing: header+data in one readable descriptor (the data starts 16 bytes in), data+status in one writable one.
    const data2 = pattern(8192, 6);
    assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 300, out: data2, merged: true, indirect: true }).status, 0);
    assert.deepEqual(submit(t, { type: VIRTIO_BLK_T.in, sector: 300, inLen: 8192, merged: true }).data, data2);
    const data3 = pattern(65536, 7);
    assert.equal(submit(t, { type: VIRTIO_BLK_T.out, sector: 1000, out: data3, merged: true }).status, 0);
    assert.deepEqual(submit(t, { type: VIRTIO_BLK_T.in, sector: 1000, inLen: 65536, merged: true }).data, data3);
    assert.deepEqual(calls, { readHost: 3, writeHost: 3, readVectored: 0, writeVectored: 0 });
    // What the file holds is what the guest wrote.
    const check = new Uint8Array(65536);
    disk.read(100 * 512, check);
    assert.deepEqual(check, data);
    disk.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("device reset in the middle: queues are forgotten, a new probe works", () => {
  const t = make(new MemDisk(MiB));
  const dev: VirtioPciDevice = t.dev;
  assert.equal(submit(t, { type: VIRTIO_BLK_T.flush }).status, 0);
  t.drv.reset();
  assert.equal(dev.queues[0]!.ready, false);
  assert.equal(t.drv.init({ want: ALL }), true);
  assert.equal(submit(t, { type: VIRTIO_BLK_T.flush }).status, 0);
});

/** Hand over the ring's completions until none is in flight (a kernel worker may still be on one). */
function completeAll(t: ReturnType<typeof make>): void {
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (let i = 0; t.blk.queued > 0; i++) {
    if (i > 5000) throw new Error("requests still in flight after 5 s");
    t.blk.completeQueued();
    if (t.blk.queued > 0) Atomics.wait(pause, 0, 0, 1);
  }
}

/** submit(), for a device on a ring: the answer may come only with the ring's completion. */
function submitQueued(t: ReturnType<typeof make>, r: Req): { status: number; len: number; data: Uint8Array } {
  const q = t.drv.queues[0]!;
  const mem = t.services.memory;
  const p = place(mem, q, r);
  q.setUsedEvent(q.lastUsed);
  q.kick();
  completeAll(t);
  const used = q.takeUsed();
  assert.equal(used.length, 1, "one used entry");
  assert.equal(used[0]!.id, p.head);
  q.numFree = q.size;
  return { status: mem.bytes(p.statusAt, 1)[0]!, len: used[0]!.len, data: mem.read(p.dataAt, r.inLen ?? 0) };
}

function withRawDisk(fn: (disk: BlockDevice, path: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), "partis-vblk-"));
  try {
    const path = join(dir, "disk.raw");
    createDisk(path, "raw", { type: "fixed", size: 4 * MiB });
    const disk = openDisk(path);
    try {
      fn(disk, path);
    } finally {
      disk.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("with a real io_uring: a batch larger than the ring, data written and read back, a flush; every request answered", () => {
  withRawDisk((disk) => {
    const ring = IoUring.open(8);
    try {
      const t = make(disk, { hostMapped: true, ring });
      const q = t.drv.queues[0]!;
      const mem = t.services.memory;
      q.setUsedEvent(q.lastUsed);
      // 12 writes in one kick: at most 8 fit the ring, the rest are done synchronously.
      const placed = Array.from({ length: 12 }, (_, i) => place(mem, q, { type: VIRTIO_BLK_T.out, sector: 64 * i, out: pattern(16384, i) }, i));
      q.kick();
      completeAll(t); // done at once where the page cache took them, else queued and completed later
      assert.equal(q.takeUsed().length, 12);
      for (const p of placed) assert.equal(mem.bytes(p.statusAt, 1)[0], VIRTIO_BLK_S.ok);
      q.numFree = q.size;
      q.setUsedEvent(q.lastUsed);
      const reads = Array.from({ length: 12 }, (_, i) => place(mem, q, { type: VIRTIO_BLK_T.in, sector: 64 * i, inLen: 16384 }, i));
      q.kick();
      completeAll(t);
      const back = q.takeUsed();
      assert.equal(back.length, 12);
      for (const u of back) assert.equal(u.len, 16384 + 1);
      reads.forEach((p, i) => assert.deepEqual(mem.read(p.dataAt, 16384), pattern(16384, i)));
      q.numFree = q.size;
      assert.equal(submitQueued(t, { type: VIRTIO_BLK_T.flush }).status, VIRTIO_BLK_S.ok);
      assert.equal(t.blk.stats.flushes, 1);
      assert.equal(t.blk.stats.errors, 0);
      // What the file holds is what the guest wrote.
      const check = new Uint8Array(16384);
      disk.read(64 * 11 * 512, check);
      assert.deepEqual(check, pattern(16384, 11));
    } finally {
      ring.close();
    }
  });
});

/** The disk, but every transfer and flush goes to the ring (as when the page cache cannot take it at once). */
function alwaysQueued(disk: BlockDevice): BlockDevice {
  return Object.assign(Object.create(disk) as BlockDevice, {
    queueHost: (queue: BlockRequestRing, write: boolean, offset: number, a: Float64Array, l: Uint32Array, n: number, token: number) =>
      queue.prepareVectored(write, -1, offset, a, l, n, token) ? ("queued" as const) : false,
    queueFlush: (queue: BlockRequestRing, token: number) => queue.prepareFsync(-1, false, token),
  });
}

test("requests in flight: answered when they complete; a device reset drops them unanswered; saving state first completes them", () => {
  withRawDisk((disk) => {
    const ring = new ScriptedRing();
    const t = make(alwaysQueued(disk), { hostMapped: true, ring });
    const q = t.drv.queues[0]!;
    const mem = t.services.memory;
    q.setUsedEvent(q.lastUsed);
    // 6 reads in one kick: 4 fit the ring and wait there, 2 are done at once.
    const placed = Array.from({ length: 6 }, (_, i) => place(mem, q, { type: VIRTIO_BLK_T.in, sector: 8 * i, inLen: 4096 }, i));
    q.kick();
    assert.equal(t.blk.queued, 4);
    assert.equal(q.takeUsed().length, 2);
    q.setUsedEvent(q.lastUsed);
    const before = t.services.msi.messages.length;
    t.blk.completeQueued();
    assert.equal(q.takeUsed().length, 0, "nothing is answered before it completes");
    ring.results = [4096, 4096, 4096, 4096];
    ring.ready = true;
    t.blk.completeQueued();
    const used = q.takeUsed();
    assert.equal(used.length, 4);
    for (const u of used) assert.equal(u.len, 4097);
    assert.ok(t.services.msi.messages.length > before, "completions raise the queue's interrupt");
    for (const p of placed) assert.equal(mem.bytes(p.statusAt, 1)[0], VIRTIO_BLK_S.ok);
    assert.equal(t.blk.queued, 0);
    q.numFree = q.size;
    // Saving the device's state completes what is in flight first.
    ring.ready = false;
    ring.results = [512];
    const w = place(mem, q, { type: VIRTIO_BLK_T.out, sector: 0, out: new Uint8Array(512) }, 0);
    q.kick();
    assert.equal(t.blk.queued, 1);
    t.dev.save();
    assert.equal(t.blk.queued, 0);
    assert.equal(q.takeUsed().length, 1);
    assert.equal(mem.bytes(w.statusAt, 1)[0], VIRTIO_BLK_S.ok);
    q.numFree = q.size;
    // A reset drops what is in flight: no status, no used entry.
    ring.ready = false;
    const r = place(mem, q, { type: VIRTIO_BLK_T.in, sector: 0, inLen: 4096 }, 1);
    q.kick();
    assert.equal(t.blk.queued, 1);
    t.drv.reset();
    assert.equal(t.blk.queued, 0);
    assert.equal(mem.bytes(r.statusAt, 1)[0], 0xee, "no status written after the reset");
    assert.equal(t.drv.init({ want: ALL }), true);
  });
});

test("a short completion is redone synchronously from the request's kept spans; a failed one is IOERR", () => {
  withRawDisk((disk) => {
    const data = pattern(8192, 4);
    disk.write(512 * 40, data);
    const ring = new ScriptedRing();
    const t = make(alwaysQueued(disk), { hostMapped: true, ring });
    const q = t.drv.queues[0]!;
    const mem = t.services.memory;
    const a = place(mem, q, { type: VIRTIO_BLK_T.in, sector: 40, inLen: 8192 }, 0);
    const b = place(mem, q, { type: VIRTIO_BLK_T.in, sector: 40, inLen: 8192, merged: true }, 1);
    q.kick();
    assert.equal(t.blk.queued, 2);
    ring.results = [4096, -5]; // the first came back short, the second failed (EIO)
    ring.ready = true;
    t.blk.completeQueued();
    const used = q.takeUsed();
    assert.equal(used.length, 2);
    assert.equal(mem.bytes(a.statusAt, 1)[0], VIRTIO_BLK_S.ok);
    assert.deepEqual(mem.read(a.dataAt, 8192), data, "the redo read the whole request");
    assert.equal(used.find((u) => u.id === a.head)!.len, 8193);
    assert.equal(mem.bytes(b.statusAt, 1)[0], VIRTIO_BLK_S.ioerr);
    assert.equal(used.find((u) => u.id === b.head)!.len, 1);
    assert.equal(t.blk.stats.errors, 1);
  });
});

test("a batch larger than the ring: the batch so far is submitted, the rest done synchronously, and what the kernel did while submitting is answered too", () => {
  withRawDisk((disk) => {
    const ring = IoUring.open(4);
    try {
      // fd -1 on the ring: each request fails at once (EBADF) inside io_uring_enter, which signals no event:
      // only reaping after the submit answers them.
      const t = make(alwaysQueued(disk), { hostMapped: true, ring });
      const q = t.drv.queues[0]!;
      const mem = t.services.memory;
      q.setUsedEvent(q.lastUsed);
      const heads: number[] = [];
      for (let slot = 0; slot < 6; slot++) {
        mem.write(HDR + slot * 0x1000, header(VIRTIO_BLK_T.in, 0));
        mem.bytes(STATUS + slot * 16, 1)[0] = 0xee;
        // 1000 segments of 512 bytes each (all over one buffer): 4 fill the ring; the 5th finds no room even after
        // the 4 are submitted (they completed inline but are not reaped yet) and is done synchronously, as is the 6th.
        const bufs: Buffer[] = [{ addr: HDR + slot * 0x1000, len: 16, write: false }];
        for (let k = 0; k < 1000; k++) bufs.push({ addr: DATA, len: 512, write: true });
        bufs.push({ addr: STATUS + slot * 16, len: 1, write: true });
        heads.push(q.add(bufs, { indirectAt: 0x300000 + slot * 0x4000 }));
      }
      q.kick();
      const used = q.takeUsed();
      assert.equal(used.length, 6, "every request answered in the notification's batch");
      for (let slot = 0; slot < 4; slot++) assert.equal(mem.bytes(STATUS + slot * 16, 1)[0], VIRTIO_BLK_S.ioerr, `queued ${slot}`);
      for (let slot = 4; slot < 6; slot++) assert.equal(mem.bytes(STATUS + slot * 16, 1)[0], VIRTIO_BLK_S.ok, `synchronous ${slot}`);
      assert.equal(t.blk.queued, 0);
      assert.equal(t.blk.stats.queued, 4);
    } finally {
      ring.close();
    }
  });
});
