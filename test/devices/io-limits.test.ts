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
import { DeviceAlarm, DiskThrottle, TokenBucket } from "../../src/devices/io-limits.js";
import { HostTimer } from "../../src/hypervisor/host-timer.js";
import { VIRTIO_F, featureBit } from "../../src/devices/virtio/pci-transport.js";
import { VIRTIO_BLK_T, createVirtioBlk, type VirtioBlk } from "../../src/devices/virtio/virtio-blk.js";
import { MAX_PORT_FRAME_BYTES, MemoryPortPair } from "../../src/devices/net/network-port.js";
import { VIRTIO_NET_F, VIRTIO_NET_HDR_BYTES as HDR, createVirtioNet } from "../../src/devices/net/virtio-net.js";
import { TestVirtioDriver, makeServices, placeDevice, type DriverQueue, type TestServices } from "./virtio/virtio-driver.js";
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

// --- virtio-blk ---------------------------------------------------------------------------------

const MiB = 1 << 20;
const BLK_WANT = featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.eventIdx);

function blkRig(limits: ConstructorParameters<typeof DiskThrottle>[0], queues = 1) {
  const clock = new TestClock();
  const services = makeServices(4 * MiB);
  const dev = createVirtioBlk("vblk0", new MemDisk(MiB), services, { queues, limits, clock: clock.now });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: BLK_WANT }), true);
  return { clock, services, dev, drv, blk: dev.backend as VirtioBlk };
}

/** Queue `count` requests (reads of `bytes`, or writes) on `q` and kick once. */
function requests(services: TestServices, q: DriverQueue, count: number, type: number, bytes: number, base = 0): void {
  for (let i = 0; i < count; i++) {
    const at = 0x200000 + (base + i) * 0x10000;
    const h = new Uint8Array(16);
    new DataView(h.buffer).setUint32(0, type, true);
    new DataView(h.buffer).setUint32(8, i * 8, true);
    services.memory.write(at, h);
    const data = { addr: at + 0x100, len: bytes, write: type === VIRTIO_BLK_T.in };
    q.add([{ addr: at, len: 16, write: false }, data, { addr: at + 0xff00, len: 1, write: true }]);
  }
  q.kick();
}

test("virtio-blk over an IOPS limit: requests wait in the ring (notifications off) until the alarm, then go at the rate", () => {
  const r = blkRig({ iops: 10 });
  const q = r.drv.queues[0]!;
  requests(r.services, q, 6, VIRTIO_BLK_T.in, 4096);
  assert.equal(q.takeUsed().length, 2, "the bucket's one and one into debt");
  assert.equal(r.blk.stats.throttled, 1);
  assert.equal(r.blk.alarm?.pending, true);
  assert.equal(r.dev.queues[0]!.save().notificationsEnabled, false, "the guest need not kick a queue that waits");
  // The alarm before the time: nothing more (and the alarm is set again).
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 0);
  r.clock.ms += 100;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 1, "100 ms at 10/s: one more");
  r.clock.ms += 300;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 2, "a full bucket (one) and one into debt");
  r.clock.ms += 200;
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(q.takeUsed().length, 1, "the last");
  assert.equal(r.blk.stats.readBytes, 6 * 4096);
  assert.equal(r.dev.queues[0]!.save().notificationsEnabled, true, "an empty ring: notifications back on");
  // Flushes and GET_ID are not limited.
  requests(r.services, q, 3, VIRTIO_BLK_T.flush, 0, 10);
  assert.equal(q.takeUsed().length, 3);
});

test("virtio-blk: a write bandwidth limit holds writes, not reads on another queue; a reset drops the wait", () => {
  const r = blkRig({ writeBytesPerSecond: 64 * 1024 }, 2);
  const w = r.drv.queues[0]!;
  const rd = r.drv.queues[1]!;
  requests(r.services, w, 4, VIRTIO_BLK_T.out, 16 * 1024);
  assert.equal(w.takeUsed().length, 1, "a 6.4 KiB bucket: the first 16 KiB write goes into debt, the rest wait");
  requests(r.services, rd, 4, VIRTIO_BLK_T.in, 16 * 1024, 8);
  assert.equal(rd.takeUsed().length, 4, "reads are not limited");
  r.clock.ms += 250; // 16 KiB at 64 KiB/s: the debt of ~9.6 KiB is paid in 150 ms
  r.services.loop.fire(r.blk.alarm!.fd);
  assert.equal(w.takeUsed().length, 1);
  assert.equal(r.blk.alarm?.pending, true);
  r.drv.reset();
  assert.equal(r.blk.alarm?.pending, false, "a reset cancels the alarm");
  assert.equal(r.drv.init({ want: BLK_WANT, queues: 2 }), true);
  r.clock.ms += 10_000;
  requests(r.services, r.drv.queues[0]!, 1, VIRTIO_BLK_T.out, 4096);
  assert.equal(r.drv.queues[0]!.takeUsed().length, 1, "the new driver's write goes");
});

// --- virtio-net ---------------------------------------------------------------------------------

test("virtio-net over its rate: transmit chains wait in the ring and the port is left unread until the alarm", () => {
  const clock = new TestClock();
  const services = makeServices(1 << 20);
  const pair = new MemoryPortPair("rate", 256);
  // 200 KB/s: the bucket holds 65,550 bytes (one full-size frame at least).
  const dev = createVirtioNet("vnet0", pair.a, services, { mac: Uint8Array.from([0x52, 0x54, 0, 0, 0, 1]), rateBytesPerSecond: 200_000, clock: clock.now, queueSize: 128 });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_NET_F.mac) | featureBit(VIRTIO_NET_F.mrgRxbuf) }), true);
  const tx = drv.queues[1]!;
  const rx = drv.queues[0]!;
  const sink = new Uint8Array(MAX_PORT_FRAME_BYTES);
  const wireFrames = (): number => {
    let n = 0;
    while (pair.b.receive(sink) > 0) n++;
    return n;
  };
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
