import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, mkdtempSync, openSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createVirtioBlk, VIRTIO_BLK_S, VIRTIO_BLK_T, type VirtioBlk } from "../../../src/devices/virtio/virtio-blk.js";
import type { BlockDevice } from "../../../src/storage/block-device.js";
import { createDisk, openDisk } from "../../../src/storage/open.js";
import { IoUring } from "../../../src/hypervisor/io-uring.js";
import { SeededRandom } from "../device-fakes.js";
import { MemDisk } from "./mem-disk.js";
import { VirtioFuzzer, dataBuffer, fuzzServices, type ChainSpec, type FuzzTarget } from "./fuzz-harness.js";
import type { Buffer as Buf } from "./virtio-driver.js";

const DISK = 256 * 1024;
const SECTORS = DISK / 512;

/**
 * `onRing`: a raw file on an io_uring over host-mapped RAM, every request drained after its notification.
 * `limited`: rate limits on a test clock that moves on at each notification; the alarm fires (early or
 * due) half the time, then whatever is still held is done (quiesce), so that every well-formed request
 * is answered and checked after its notification.
 */
function blkTarget(readOnly: boolean, fz: () => VirtioFuzzer, onRing?: { disk: BlockDevice; ring: IoUring }, ringPacked = false, limited?: { rng: SeededRandom }): FuzzTarget {
  const services = fuzzServices(onRing !== undefined);
  const disk = onRing?.disk ?? new MemDisk(DISK, readOnly);
  let now = 0;
  const limits = limited !== undefined ? { limits: { iops: 40, readBytesPerSecond: 60_000, writeBytesPerSecond: 30_000 }, clock: () => now } : {};
  const dev = createVirtioBlk("vblk-fuzz", disk, services, { queues: 2, queueSize: 64, serial: "FUZZ", ringPacked, ...limits, ...(onRing !== undefined ? { ring: onRing.ring } : {}) });
  const blk = dev.backend as VirtioBlk;
  const mem = services.memory;
  const afterLimited = (): void => {
    now += limited!.rng.int(20);
    if (blk.alarm?.pending === true && limited!.rng.int(2) === 0) services.loop.fire(blk.alarm.fd);
    blk.quiesce();
  };
  return {
    dev,
    services,
    consuming: [0, 1],
    ...(onRing !== undefined ? { afterKick: () => blk.quiesce() } : limited !== undefined ? { afterKick: afterLimited } : {}),
    request(rng: SeededRandom): ChainSpec {
      const f = fz();
      const type = rng.pick([0, 0, 0, 1, 1, 1, 4, 8, 11, 13, 10, rng.int(2 ** 32)]);
      const sector = rng.int(10) === 0 ? rng.pick([SECTORS, SECTORS - 1, 2 ** 40, 2 ** 53 / 512, rng.int(2 ** 32)]) : rng.int(SECTORS);
      const len = rng.int(8) === 0 ? rng.int(5000) : 512 * rng.int(9);
      const hdr = new Uint8Array(16);
      const dv = new DataView(hdr.buffer);
      dv.setUint32(0, type, true);
      dv.setUint32(4, rng.int(2 ** 32), true);
      dv.setUint32(8, sector % 2 ** 32, true);
      dv.setUint32(12, Math.floor(sector / 2 ** 32), true);
      const bufs: Buf[] = [];
      const h = f.header(hdr);
      if (rng.int(4) === 0) bufs.push({ addr: h, len: 8, write: false }, { addr: h + 8, len: 8, write: false });
      else bufs.push({ addr: h, len: 16, write: false });
      const split = (total: number, write: boolean): void => {
        let left = total;
        while (left > 0) {
          const n = rng.int(3) === 0 ? Math.min(left, 1 + rng.int(left)) : left;
          bufs.push({ addr: write ? dataBuffer(rng, n) : rng.int(2) === 0 ? dataBuffer(rng, n) : f.header(new Uint8Array(Math.min(n, 0x1000))) , len: write ? n : Math.min(n, 0x1000), write });
          left -= write ? n : Math.min(n, 0x1000);
        }
      };
      if (type === VIRTIO_BLK_T.out) split(len, false);
      if (type === VIRTIO_BLK_T.discard || type === VIRTIO_BLK_T.writeZeroes) {
        const segs = 1 + rng.int(3);
        const b = new Uint8Array(16 * segs);
        const sv = new DataView(b.buffer);
        for (let i = 0; i < segs; i++) {
          sv.setUint32(16 * i, rng.int(SECTORS + 8), true);
          sv.setUint32(16 * i + 8, rng.int(64), true);
          sv.setUint32(16 * i + 12, rng.int(6) === 0 ? rng.int(4) : 0, true);
        }
        bufs.push({ addr: f.header(b), len: b.length, write: false });
      }
      if (type === VIRTIO_BLK_T.in || type === VIRTIO_BLK_T.getId) split(type === VIRTIO_BLK_T.getId ? 20 : len, true);
      const statusAt = dataBuffer(rng, 1);
      bufs.push({ addr: statusAt, len: 1, write: true });
      const dataLen = bufs.filter((b) => !b.write).reduce((n, b) => n + b.len, 0) - 16;
      const inLen = bufs.filter((b) => b.write).reduce((n, b) => n + b.len, 0) - 1;
      return {
        bufs,
        check: (used) => {
          const st = mem.bytes(statusAt, 1)[0]!;
          assert.ok(st === VIRTIO_BLK_S.ok || st === VIRTIO_BLK_S.ioerr || st === VIRTIO_BLK_S.unsupp, `status ${st}`);
          const inRange = (n: number): boolean => sector * 512 + n <= DISK && n % 512 === 0;
          if (type === VIRTIO_BLK_T.in) {
            assert.equal(st, inRange(inLen) ? VIRTIO_BLK_S.ok : VIRTIO_BLK_S.ioerr, "IN status");
            assert.equal(used.len, st === 0 ? inLen + 1 : 1);
          } else if (type === VIRTIO_BLK_T.out) {
            assert.equal(st, !readOnly && inRange(dataLen) ? VIRTIO_BLK_S.ok : VIRTIO_BLK_S.ioerr, "OUT status");
            assert.equal(used.len, 1);
          } else if (type === VIRTIO_BLK_T.flush) assert.equal(st, VIRTIO_BLK_S.ok);
          else if (type === VIRTIO_BLK_T.getId) assert.equal(used.len, 21);
          else if (type !== VIRTIO_BLK_T.discard && type !== VIRTIO_BLK_T.writeZeroes) assert.equal(st, VIRTIO_BLK_S.unsupp);
        },
      };
    },
  };
}

for (const [readOnly, steps, seed, packed] of [[false, 100_000, 0xb10c, false], [true, 20_000, 0xb10d, false], [false, 100_000, 0xb10f, true]] as const) {
  const rings = packed ? ", packed rings offered" : "";
  test(`virtio-blk fuzz (${readOnly ? "read-only" : "writable"} disk${rings}, ${steps} steps, seed ${seed})`, { timeout: 60_000 }, () => {
    const rng = new SeededRandom(seed);
    let fuzzer: VirtioFuzzer | undefined;
    const target = blkTarget(readOnly, () => fuzzer!, undefined, packed);
    fuzzer = new VirtioFuzzer(target, rng);
    const stats = fuzzer.run(steps);
    assert.equal(stats.steps, steps);
    assert.ok(stats.requestsCompleted > steps / 20, `completed ${stats.requestsCompleted}`);
    assert.ok(stats.malformedDetected > steps / 100, `malformed ${stats.malformedDetected}`);
    if (packed) assert.ok(fuzzer.packedProbes > stats.probes / 3, `packed rings at ${fuzzer.packedProbes} of ${stats.probes} probes`);
    console.log(`virtio-blk fuzz${rings}: ${JSON.stringify(stats)}`);
  });
}

test("virtio-blk fuzz with rate limits (requests held, then done by the alarm or quiesce; packed rings offered; 50000 steps, seed 0xb110)", { timeout: 60_000 }, () => {
  const rng = new SeededRandom(0xb110);
  let fuzzer: VirtioFuzzer | undefined;
  const target = blkTarget(false, () => fuzzer!, undefined, true, { rng: new SeededRandom(0xb111) });
  const blk = target.dev.backend as VirtioBlk;
  fuzzer = new VirtioFuzzer(target, rng);
  const stats = fuzzer.run(50_000);
  assert.equal(stats.steps, 50_000);
  assert.ok(blk.stats.throttled > 1000, `held ${blk.stats.throttled}`);
  assert.ok(blk.stats.readBytes > 0 && blk.stats.writtenBytes > 0);
  assert.ok(stats.requestsCompleted > 50_000 / 20, `completed ${stats.requestsCompleted}`);
  assert.ok(stats.malformedDetected > 50_000 / 100, `malformed ${stats.malformedDetected}`);
  assert.equal(blk.heldRequests, 0);
  blk.closeQueue();
  console.log(`virtio-blk fuzz with limits: ${JSON.stringify(stats)} held ${blk.stats.throttled}`);
});

test("virtio-blk fuzz on an io_uring (raw file, host-mapped RAM, 30000 steps, seed 0xb10e)", { timeout: 120_000 }, () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-vblk-fuzz-"));
  const path = join(dir, "disk.raw");
  createDisk(path, "raw", { type: "fixed", size: DISK });
  const raw = openDisk(path);
  // Every transfer and flush goes to the ring (as on a disk whose page cache never has the data), on an fd of the same file.
  const fd = openSync(path, "r+");
  const disk: BlockDevice = Object.assign(Object.create(raw) as BlockDevice, {
    queueHost: (queue: IoUring, write: boolean, offset: number, a: Float64Array, l: Uint32Array, n: number, token: number) =>
      queue.prepareVectored(write, fd, offset, a, l, n, token) ? ("queued" as const) : false,
    queueFlush: (queue: IoUring, token: number) => queue.prepareFsync(fd, false, token),
  });
  const ring = IoUring.open(16);
  try {
    const rng = new SeededRandom(0xb10e);
    let fuzzer: VirtioFuzzer | undefined;
    const target = blkTarget(false, () => fuzzer!, { disk, ring });
    fuzzer = new VirtioFuzzer(target, rng);
    const stats = fuzzer.run(30_000);
    assert.ok(stats.requestsCompleted > 30_000 / 20, `completed ${stats.requestsCompleted}`);
    assert.ok(stats.malformedDetected > 30_000 / 100, `malformed ${stats.malformedDetected}`);
    assert.equal(ring.inFlight, 0);
    const queued = (target.dev.backend as VirtioBlk).stats.queued;
    assert.ok(queued > 30_000 / 50, `requests through the ring: ${queued}`);
    console.log(`virtio-blk fuzz on io_uring: ${JSON.stringify(stats)}`);
  } finally {
    ring.close();
    closeSync(fd);
    raw.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
