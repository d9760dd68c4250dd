/**
 * Rate limits (src/devices/io-limits.ts) and the devices that enforce them:
 * the token bucket's arithmetic on a test clock, a disk's buckets per
 * direction, the alarm's real timerfd on a device loop, virtio-blk holding
 * requests in its ring past an IOPS or bandwidth limit until the alarm, and
 * virtio-net holding transmit chains and leaving its port unread past its
 * rate. No test measures time: the clock is the test's, the alarm is fired
 * by hand (and once for real, to see the timerfd expire).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { DeviceAlarm, DiskThrottle, TokenBucket } from "../../src/devices/io-limits.js";
import { HostTimer } from "../../src/hypervisor/host-timer.js";
import { VIRTIO_F, featureBit } from "../../src/devices/virtio/pci-transport.js";
import { VIRTIO_BLK_F, VIRTIO_BLK_T, createVirtioBlk, type VirtioBlk } from "../../src/devices/virtio/virtio-blk.js";
import { MAX_PORT_FRAME_BYTES, MemoryPortPair } from "../../src/devices/net/network-port.js";
import { VIRTIO_NET_F, VIRTIO_NET_HDR_BYTES as HDR, createVirtioNet } from "../../src/devices/net/virtio-net.js";
import { TestVirtioDriver, makeServices, placeDevice, type TestServices } from "./virtio/virtio-driver.js";
import { MemDisk } from "./virtio/mem-disk.js";

class TestClock {
  ms = 1000;
  readonly now = (): number => this.ms;
}

test("token bucket: starts full (a tenth of a second's worth, at least the minimum), a request goes while not in debt, refills at the rate up to full", () => {
  const clock = new TestClock();
  const b = new TokenBucket(100, 1, clock.ms);
  assert.equal(b.capacity, 10);
  for (let i = 0; i < 11; i++) {
    assert.equal(b.ready(clock.ms), true, `request ${i}`);
    b.charge(1);
  }
  assert.equal(b.ready(clock.ms), false, "in debt after a full bucket and one more");
  assert.equal(b.wait(clock.ms), 10, "1 token short at 100/s: 10 ms");
  clock.ms += 10;
  assert.equal(b.ready(clock.ms), true);
  clock.ms += 60_000;
  assert.equal(b.ready(clock.ms), true);
  for (let i = 0; i < 11; i++) b.charge(1);
  assert.equal(b.ready(clock.ms), false, "an idle minute refills only to full");
  // A request larger than the bucket still goes (never stuck), then the debt is paid at the rate.
  const big = new TokenBucket(1000, 1, clock.ms);
  big.charge(1_000_000);
  assert.equal(big.wait(clock.ms), (1_000_000 - 100) * 1000 / 1000);
  assert.equal(new TokenBucket(0.5, 1, 0).capacity, 1, "at least the minimum");
  for (const bad of [0, -1, Infinity, Number.NaN]) assert.throws(() => new TokenBucket(bad, 1, 0), /rate limit/);
});

test("disk throttle: totals count both directions, per-direction limits only their own", () => {
  const clock = new TestClock();
  const t = new DiskThrottle({ iops: 20, writeBytesPerSecond: 10_000 }, clock.now);
  // iops 20: 2 in the bucket, three go (the third into debt).
  for (let i = 0; i < 3; i++) {
    assert.equal(t.delay(i === 1), 0);
    t.charge(i === 1, 512);
  }
  assert.equal(t.delay(false), 50, "reads wait for the shared IOPS bucket");
  assert.equal(t.delay(true), 50);
  clock.ms += 50;
  assert.equal(t.delay(false), 0);
  t.charge(true, 20_000); // write bandwidth: 1,000 bytes in the bucket (minimum 512), now 19,488 bytes... in debt
  clock.ms += 100;
  assert.equal(t.delay(false), 0, "reads do not wait for the write bandwidth");
  assert.ok(t.delay(true) > 1000, `writes do (${t.delay(true)} ms)`);
});

test("host timer: a one-shot timerfd that expires once, reads back its expiry, and stays quiet when disarmed", async () => {
  const timer = HostTimer.create();
  try {
    assert.equal(timer.take(), 0, "not armed: nothing");
    timer.arm(1);
    let n = 0;
    for (let i = 0; i < 400 && n === 0; i++) {
      await new Promise((r) => setTimeout(r, 5));
      n = timer.take();
    }
    assert.equal(n, 1, "it expired once");
    assert.equal(timer.take(), 0, "reading cleared it");
    timer.arm(5);
    timer.disarm();
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(timer.take(), 0, "disarmed before it expired");
  } finally {
    timer.close();
  }
});

test("device alarm: watched on the device loop; set keeps the earlier time; a wakeup after cancel does nothing", () => {
  const services = makeServices(1 << 16);
  let fired = 0;
  const alarm = new DeviceAlarm(services.loop, () => fired++);
  try {
    assert.equal(services.loop.active(alarm.fd), 1, "the loop watches the timer");
    alarm.set(1);
    alarm.set(10_000); // later: the 1 ms alarm stands
    assert.equal(alarm.pending, true);
    services.loop.fire(alarm.fd);
    assert.equal(fired, 1);
    assert.equal(alarm.pending, false);
    alarm.set(1);
    alarm.cancel();
    services.loop.fire(alarm.fd);
    assert.equal(fired, 1);
  } finally {
    alarm.close();
  }
  assert.equal(services.loop.active(alarm.fd), 0, "closed: no longer watched");
});

test("device alarm: a loop that cannot watch its timer leaves no timerfd open", () => {
  const fds = readdirSync("/proc/self/fd").length;
  const loop = {
    watch: (): never => {
      throw new Error("epoll_ctl: no space");
    },
    watchWritable: (): never => {
      throw new Error("epoll_ctl: no space");
    },
    defer: (task: () => void) => task(),
  };
  assert.throws(() => new DeviceAlarm(loop, () => undefined), /no space/);
  assert.equal(readdirSync("/proc/self/fd").length, fds);
});

// --- virtio-blk ---------------------------------------------------------------------------------

const MiB = 1 << 20;
const BLK_WANT = featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.eventIdx);

function blkRig(limits: ConstructorParameters<typeof DiskThrottle>[0], queues = 1, want = BLK_WANT) {
  const clock = new TestClock();
  const services = makeServices(4 * MiB);
  const dev = createVirtioBlk("vblk0", new MemDisk(MiB), services, { queues, limits, clock: clock.now });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want }), true);
  return { clock, services, dev, drv, blk: dev.backend as VirtioBlk };
}

interface TestQueue {
  add(bufs: readonly { addr: number; len: number; write: boolean }[]): number;
  kick(): void;
  takeUsed(): { id: number; len: number }[];
}

/** Fill the disk with a pattern a read can be checked against: byte i is (i >> 9) & 0xff ^ i & 0xff. */
function patterned(disk: MemDisk): MemDisk {
  for (let i = 0; i < disk.size; i++) disk.data[i] = ((i >>> 9) ^ i) & 0xff;
  return disk;
}

/** Request `n` at sector `sector`: its header at 0x200000 + n * 64 KiB, data 0x100 further on, status at 0xff00. */
function request(services: TestServices, q: TestQueue, n: number, type: number, bytes: number, sector: number): { data: number; status: number } {
  const at = 0x200000 + n * 0x10000;
  const h = new Uint8Array(16);
  new DataView(h.buffer).setUint32(0, type, true);
  new DataView(h.buffer).setUint32(8, sector, true);
  services.memory.write(at, h);
  const bufs = [{ addr: at, len: 16, write: false }];
  if (bytes > 0) bufs.push({ addr: at + 0x100, len: bytes, write: type !== VIRTIO_BLK_T.out && type !== VIRTIO_BLK_T.writeZeroes });
  bufs.push({ addr: at + 0xff00, len: 1, write: true });
  q.add(bufs);
  return { data: at + 0x100, status: at + 0xff00 };
}

/** Queue `count` requests (reads of `bytes`, or writes) on `q`, numbered from `base`, and kick once. */
function requests(services: TestServices, q: TestQueue, count: number, type: number, bytes: number, base = 0): void {
  for (let i = 0; i < count; i++) request(services, q, base + i, type, bytes, (base + i) * 8);
  q.kick();
}

/** The read's data is the disk's at `sector`. */
function readBack(services: TestServices, r: { data: number }, sector: number, bytes: number): boolean {
  const got = services.memory.bytes(r.data, bytes);
  for (let i = 0; i < bytes; i++) if (got[i] !== (((sector * 512 + i) >>> 9) ^ (sector * 512 + i)) % 256) return false;
  return true;
}

test("virtio-blk over an IOPS limit: the device holds requests (the ring stays live) until the alarm, then they go at the rate; flushes and GET_ID do not wait", () => {
  const r = blkRig({ iops: 10 });
  patterned(r.blk.disk as MemDisk);
  const q = r.drv.queues[0]!;
  const reads = Array.from({ length: 6 }, (_, i) => request(r.services, q, i, VIRTIO_BLK_T.in, 4096, i * 8));
  q.kick();
  assert.deepEqual(q.takeUsed().map((u) => u.id), [0, 3], "the bucket's one and one into debt (three descriptors each)");
  assert.equal(r.blk.heldRequests, 4);
  assert.equal(r.blk.stats.throttled, 4);
  assert.equal(r.blk.alarm?.pending, true);
  assert.equal(r.dev.queues[0]!.save().notificationsEnabled, true, "the ring is still served (other requests go)");
  // A flush and a GET_ID while reads are held: answered at once.
  request(r.services, q, 10, VIRTIO_BLK_T.flush, 0, 0);
  const id = request(r.services, q, 11, VIRTIO_BLK_T.getId, 20, 0);
  q.kick();
  assert.equal(q.takeUsed().length, 2, "flush and GET_ID are not limited");
  assert.equal(r.services.memory.bytes(id.status, 1)[0], 0);
  // The alarm before the time: nothing more, and the alarm is set again.
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 0);
  assert.equal(r.blk.alarm?.pending, true, "still waiting");
  r.clock.ms += 100;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.deepEqual(q.takeUsed().map((u) => u.len), [4097], "100 ms at 10/s: one more, with its data");
  r.clock.ms += 300;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 2, "a full bucket (one) and one into debt");
  r.clock.ms += 200;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 1, "the last");
  assert.equal(r.blk.heldRequests, 0);
  assert.equal(r.blk.alarm?.pending, false, "nothing held: no alarm");
  assert.equal(r.blk.stats.readBytes, 6 * 4096);
  reads.forEach((rd, i) => {
    assert.equal(r.services.memory.bytes(rd.status, 1)[0], 0, `read ${i} status`);
    assert.ok(readBack(r.services, rd, i * 8, 4096), `read ${i} data`);
  });
});

test("virtio-blk: a write bandwidth limit holds writes, not the reads behind them in the same queue; held writes land in order; a reset drops them", () => {
  const r = blkRig({ writeBytesPerSecond: 64 * 1024 });
  const q = r.drv.queues[0]!;
  // Four writes of 16 KiB to the same place, each a different byte: the last must win.
  for (let i = 0; i < 4; i++) {
    const w = request(r.services, q, i, VIRTIO_BLK_T.out, 16 * 1024, 64);
    r.services.memory.bytes(w.data, 16 * 1024).fill(0x10 + i);
  }
  q.kick();
  assert.equal(q.takeUsed().length, 1, "a 6.4 KiB bucket: the first 16 KiB write goes into debt, the rest are held");
  requests(r.services, q, 4, VIRTIO_BLK_T.in, 16 * 1024, 8);
  assert.equal(q.takeUsed().length, 4, "reads behind the held writes, in the same queue, go");
  r.clock.ms += 150; // the debt of 9.6 KiB paid: one more write
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 1);
  r.clock.ms += 1000;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 1, "one write per refill: each goes into debt");
  r.clock.ms += 1000;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 1);
  assert.equal((r.blk.disk as MemDisk).data[64 * 512 + 100], 0x13, "the held writes went in the order they were made");
  // Held writes and a reset.
  for (let i = 0; i < 3; i++) request(r.services, q, 20 + i, VIRTIO_BLK_T.out, 16 * 1024, 64);
  q.kick();
  assert.equal(r.blk.heldRequests, 3, "the bucket is in debt from the last write");
  const writesBefore = (r.blk.disk as MemDisk).writes;
  r.drv.reset();
  assert.equal(r.blk.heldRequests, 0, "a reset drops what was held");
  assert.equal(r.blk.alarm?.pending, false, "and cancels the alarm");
  r.clock.ms += 10_000;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal((r.blk.disk as MemDisk).writes, writesBefore, "dropped writes are never made");
  assert.equal(r.drv.init({ want: BLK_WANT }), true);
  requests(r.services, r.drv.queues[0]!, 1, VIRTIO_BLK_T.out, 4096);
  assert.equal(r.drv.queues[0]!.takeUsed().length, 1, "the new driver's write goes");
});

test("virtio-blk with several queues: held requests go in the order they came, so a queue kept full cannot starve another", () => {
  const r = blkRig({ iops: 10 }, 2);
  const busy = r.drv.queues[0]!;
  const other = r.drv.queues[1]!;
  requests(r.services, busy, 6, VIRTIO_BLK_T.in, 4096);
  assert.equal(busy.takeUsed().length, 2);
  requests(r.services, other, 1, VIRTIO_BLK_T.in, 4096, 30);
  assert.equal(other.takeUsed().length, 0, "held behind the four of the busy queue");
  let next = 6;
  let otherDoneAt = 0;
  for (let step = 1; step <= 6 && otherDoneAt === 0; step++) {
    r.clock.ms += 100;
    r.services.loop.fire(r.blk.alarm!.fd);
    // The busy queue refills what completed at once (fio at a fixed depth).
    const done = busy.takeUsed().length;
    if (done > 0) requests(r.services, busy, done, VIRTIO_BLK_T.in, 4096, (next += done) - done);
    if (other.takeUsed().length > 0) otherDoneAt = step;
  }
  assert.equal(otherDoneAt, 5, "served after the four held before it, ahead of the busy queue's later ones");
});

test("virtio-blk: a write-zeroes counts as a write of its range, and waits as writes do", () => {
  const r = blkRig({ writeBytesPerSecond: MiB }, 1, BLK_WANT | featureBit(VIRTIO_BLK_F.writeZeroes));
  const disk = r.blk.disk as MemDisk;
  disk.data.fill(0xaa);
  const q = r.drv.queues[0]!;
  const zeroes = (n: number, sector: number, sectors: number): { status: number } => {
    const seg = new Uint8Array(16);
    new DataView(seg.buffer).setUint32(0, sector, true);
    new DataView(seg.buffer).setUint32(8, sectors, true);
    const rq = request(r.services, q, n, VIRTIO_BLK_T.writeZeroes, 16, 0);
    r.services.memory.write(rq.data, seg);
    return rq;
  };
  zeroes(0, 0, 1024); // 512 KiB: goes (the bucket holds 0.1 MiB), about 0.4 MiB into debt
  q.kick();
  assert.equal(q.takeUsed().length, 1);
  assert.equal(disk.data[1000], 0);
  request(r.services, q, 1, VIRTIO_BLK_T.out, 4096, 1200);
  const second = zeroes(2, 1024, 8);
  q.kick();
  assert.equal(q.takeUsed().length, 0, "the write and the second write-zeroes wait for the debt");
  assert.equal(r.blk.heldRequests, 2);
  assert.equal(disk.data[1024 * 512], 0xaa);
  r.clock.ms += 500;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 2);
  assert.equal(r.services.memory.bytes(second.status, 1)[0], 0);
  assert.equal(disk.data[1024 * 512 + 100], 0, "the held write-zeroes zeroed its range");
  assert.equal(disk.data[1032 * 512], 0xaa, "and no more");
  assert.equal(r.blk.stats.writtenBytes, 512 * 1024 + 4096 + 4096);
});

test("virtio-blk with bus mastering off: held requests stay held (no DMA, no alarm, not even for a save) until it is on again, then go", () => {
  const r = blkRig({ iops: 10 });
  patterned(r.blk.disk as MemDisk);
  const q = r.drv.queues[0]!;
  const reads = Array.from({ length: 4 }, (_, i) => request(r.services, q, i, VIRTIO_BLK_T.in, 4096, i * 8));
  q.kick();
  assert.equal(q.takeUsed().length, 2);
  assert.equal(r.blk.heldRequests, 2);
  const statusOf = (i: number): number => r.services.memory.bytes(reads[i]!.status, 1)[0]!;
  r.services.memory.bytes(reads[2]!.status, 1)[0] = 0xee;
  r.dev.pci.configWrite(0x04, 2, r.dev.pci.command & ~4); // kexec's first step: the device may no longer touch RAM
  r.clock.ms += 1000;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 0, "nothing completes while bus mastering is off");
  assert.equal(statusOf(2), 0xee, "and nothing is written to guest memory");
  assert.equal(r.blk.alarm?.pending, false, "no alarm while inactive");
  r.blk.quiesce();
  assert.equal(r.blk.heldRequests, 2, "a save while inactive leaves them held");
  assert.equal(statusOf(2), 0xee);
  r.dev.pci.configWrite(0x04, 2, r.dev.pci.command | 4);
  assert.equal(q.takeUsed().length, 2, "bus mastering on again: the held reads go (the bucket refilled meanwhile)");
  assert.equal(r.blk.heldRequests, 0);
  assert.equal(statusOf(2), 0);
  assert.ok(readBack(r.services, reads[3]!, 24, 4096));
});

test("virtio-blk with a limit on reads and writes together: a read waits behind an older held write, so reads cannot keep the write from the shared tokens", () => {
  const r = blkRig({ iops: 10, writeBytesPerSecond: 64 * 1024 });
  const q = r.drv.queues[0]!;
  requests(r.services, q, 1, VIRTIO_BLK_T.out, 16 * 1024, 0);
  assert.equal(q.takeUsed().length, 1, "the first write goes, its bandwidth bucket into debt");
  requests(r.services, q, 1, VIRTIO_BLK_T.out, 16 * 1024, 1);
  assert.equal(r.blk.heldRequests, 1, "the second write waits for its bandwidth");
  requests(r.services, q, 1, VIRTIO_BLK_T.in, 4096, 2);
  assert.equal(q.takeUsed().length, 0, "a read now, with IOPS to spare, waits behind it");
  assert.equal(r.blk.heldRequests, 2);
  r.clock.ms += 150;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 2, "both go when the write's bandwidth is paid");
  // Without a shared limit, directions stay independent: a read goes past a held write.
  const s = blkRig({ writeBytesPerSecond: 64 * 1024 });
  const sq = s.drv.queues[0]!;
  requests(s.services, sq, 2, VIRTIO_BLK_T.out, 16 * 1024, 0);
  assert.equal(sq.takeUsed().length, 1);
  requests(s.services, sq, 1, VIRTIO_BLK_T.in, 4096, 2);
  assert.equal(sq.takeUsed().length, 1, "the read goes at once");
});

test("virtio-blk: with both directions in debt the alarm stops at once, and the held requests keep their order", () => {
  const r = blkRig({ readIops: 10, writeIops: 10 });
  const q = r.drv.queues[0]!;
  for (let i = 0; i < 8; i++) request(r.services, q, i, i % 2 === 0 ? VIRTIO_BLK_T.in : VIRTIO_BLK_T.out, 4096, i * 8);
  q.kick();
  assert.equal(q.takeUsed().length, 4, "one and one into debt in each direction");
  const disk = r.blk.disk as MemDisk;
  const before = disk.reads + disk.writes;
  r.clock.ms += 50;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 0);
  assert.equal(disk.reads + disk.writes, before);
  r.clock.ms += 100;
  r.services.loop.fire(r.blk.alarm!.fd);
  const done = q.takeUsed().map((u) => u.id);
  assert.equal(done.length, 2, "one more each way");
  r.clock.ms += 100;
  r.services.loop.fire(r.blk.alarm!.fd);
  done.push(...q.takeUsed().map((u) => u.id));
  assert.deepEqual(done, [12, 15, 18, 21], "requests 4-7 (three descriptors each) in the order they came");
});

test("virtio-blk on packed rings: held requests complete later, out of order, with their data (their descriptors are not walked again); quiesce runs what is held", () => {
  const clock = new TestClock();
  const services = makeServices(4 * MiB);
  const disk = patterned(new MemDisk(MiB));
  const dev = createVirtioBlk("vblk0", disk, services, { queues: 1, limits: { iops: 10 }, clock: clock.now, ringPacked: true });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: BLK_WANT | featureBit(VIRTIO_F.ringPacked) }), true);
  const blk = dev.backend as VirtioBlk;
  const q = drv.packed[0]!;
  const reads = Array.from({ length: 5 }, (_, i) => request(services, q, i, VIRTIO_BLK_T.in, 4096, 16 + i * 8));
  q.kick();
  assert.equal(q.takeUsed().length, 2);
  // Requests that go now: their used descriptors are written over the held ones' ring slots.
  for (let i = 0; i < 3; i++) request(services, q, 10 + i, VIRTIO_BLK_T.flush, 0, 0);
  q.kick();
  assert.equal(q.takeUsed().length, 3);
  clock.ms += 100;
  services.loop.fire(blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 1);
  blk.quiesce();
  assert.equal(q.takeUsed().length, 2, "quiesce: everything held is done (before a save)");
  assert.equal(blk.heldRequests, 0);
  assert.equal(blk.alarm?.pending, false);
  reads.forEach((rd, i) => assert.ok(readBack(services, rd, 16 + i * 8, 4096), `read ${i} data`));
  blk.closeQueue();
});

// --- virtio-net ---------------------------------------------------------------------------------

/** A virtio-net at 200 KB/s on a memory port pair (the bucket holds 65,550 bytes: one full-size frame at least), its driver up. */
function netRig(want: bigint) {
  const clock = new TestClock();
  const services = makeServices(1 << 20);
  const pair = new MemoryPortPair("rate", 256);
  const opts = { mac: Uint8Array.from([0x52, 0x54, 0, 0, 0, 1]), rateBytesPerSecond: 200_000, clock: clock.now, queueSize: 128 };
  const dev = createVirtioNet("vnet0", pair.a, services, opts);
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want }), true);
  const sink = new Uint8Array(MAX_PORT_FRAME_BYTES);
  /** Frames that reached the wire since the last call. */
  const wireFrames = (): number => {
    let n = 0;
    while (pair.b.receive(sink) > 0) n++;
    return n;
  };
  return { clock, services, pair, opts, dev, drv, wireFrames };
}

test("virtio-net over its rate: transmit chains wait in the ring and the port is left unread until the alarm", () => {
  const { clock, services, pair, dev, drv, wireFrames } = netRig(featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_NET_F.mac) | featureBit(VIRTIO_NET_F.mrgRxbuf));
  const tx = drv.queues[1]!;
  const rx = drv.queues[0]!;
  for (let i = 0; i < 100; i++) tx.add([{ addr: 0x40000 + (i % 32) * 0x1000, len: HDR + 1000, write: false }]);
  tx.kick();
  assert.equal(wireFrames(), 66, "65,550 bytes: 65 frames of 1,000 and one into debt");
  assert.equal(dev.net.counters.throttled, 1);
  clock.ms += 100; // 20,000 bytes: the debt (450) paid, 19 more frames and one into debt
  services.loop.fire(dev.net.alarm!.fd);
  assert.equal(wireFrames(), 20);
  clock.ms += 1000;
  services.loop.fire(dev.net.alarm!.fd);
  assert.equal(wireFrames(), 14, "the rest");
  assert.equal(tx.takeUsed().length, 100);
  // Receive: frames past the rate stay in the port's queue.
  for (let i = 0; i < 64; i++) rx.add([{ addr: 0x80000 + i * 0x800, len: 0x800, write: true }]);
  rx.kick();
  const f = new Uint8Array(1500);
  f.fill(0xff, 0, 6);
  for (let i = 0; i < 60; i++) assert.equal(pair.b.send(f), true);
  services.loop.fire(pair.a.fd);
  const first = rx.takeUsed().length;
  assert.ok(first >= 43 && first <= 45, `about 65,550 bytes' worth of 1,500-byte frames (${first})`);
  assert.equal(pair.a.pending, 60 - first, "the rest wait on the port");
  assert.equal(services.loop.active(pair.a.fd), 0, "the port is not watched meanwhile");
  clock.ms += 1000;
  services.loop.fire(dev.net.alarm!.fd);
  assert.equal(rx.takeUsed().length, 60 - first);
  dev.net.close();
  pair.close();
});

test("virtio-net saved while its rate limit held transmit chains: the restored device sends them without a kick", () => {
  const { services, pair, opts, dev, drv, wireFrames } = netRig(featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.eventIdx) | featureBit(VIRTIO_NET_F.mac));
  const tx = drv.queues[1]!;
  for (let i = 0; i < 80; i++) tx.add([{ addr: 0x40000 + (i % 32) * 0x1000, len: HDR + 1000, write: false }]);
  tx.kick();
  assert.equal(wireFrames(), 66);
  const saved = dev.save();
  dev.net.close();
  // The restored device (a new process: a full bucket, no alarm pending); the guest does not kick again.
  const dev2 = createVirtioNet("vnet0", pair.a, services, opts);
  placeDevice(dev2);
  dev2.restore(saved);
  assert.equal(wireFrames(), 14, "the chains left in the ring went");
  assert.equal(tx.takeUsed().length, 80);
  dev2.net.close();
  pair.close();
});
