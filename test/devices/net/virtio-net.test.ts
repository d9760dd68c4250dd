import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { VIRTIO_F, VIRTIO_STATUS as S, featureBit } from "../../../src/devices/virtio/pci-transport.js";
import { DatagramPairPort, MAX_PORT_FRAME_BYTES, MemoryPortPair, type NetworkPort } from "../../../src/devices/net/network-port.js";
import { VIRTIO_NET_CONFIG as K, VIRTIO_NET_F, VIRTIO_NET_HDR_BYTES as HDR, VIRTIO_NET_HDR_F, VIRTIO_NET_HDR_GSO, createVirtioNet, type VirtioNetDevice } from "../../../src/devices/net/virtio-net.js";
import { TestVirtioDriver, makeServices, placeDevice, type DriverQueue, type TestServices } from "../virtio/virtio-driver.js";

const MAC = Uint8Array.from([0x52, 0x54, 0x00, 0x00, 0x00, 0xa0]);
const PEER = Uint8Array.from([0x52, 0x54, 0x00, 0x00, 0x00, 0xb0]);
const BASE = featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.indirectDesc) | featureBit(VIRTIO_F.eventIdx);
const MRG = featureBit(VIRTIO_NET_F.mrgRxbuf);
const NET = featureBit(VIRTIO_NET_F.mac) | featureBit(VIRTIO_NET_F.status);
const RXQ = 0;
const TXQ = 1;
/** Buffer area in test RAM (rings are allocated below it). */
const BUF = 0x40000;

function frame(len: number, seed: number, dst = PEER, src = MAC): Uint8Array {
  const f = new Uint8Array(len);
  f.set(dst, 0);
  f.set(src, 6);
  f[12] = 0x08;
  f[13] = 0x00;
  for (let i = 14; i < len; i++) f[i] = (i * 31 + seed * 7) & 0xff;
  return f;
}

interface Rig {
  services: TestServices;
  dev: VirtioNetDevice;
  drv: TestVirtioDriver;
  /** The other end of the cable. */
  wire: NetworkPort & { pending?: number };
  port: NetworkPort & { pending?: number };
  rx: DriverQueue;
  tx: DriverQueue;
  /** Poll reports the device's port readable. */
  pump(): void;
}

function make(opts: { want?: bigint; queueSize?: number; port?: "memory" | "none" | "vnet-header" } = {}): Rig {
  const services = makeServices(1 << 20);
  const pair = new MemoryPortPair("vnet", 256, { vnetHeader: opts.port === "vnet-header" });
  const port = opts.port === "none" ? undefined : pair.a;
  const dev = createVirtioNet("vnet0", port, services, { mac: MAC, ...(opts.queueSize !== undefined ? { queueSize: opts.queueSize } : {}) });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: opts.want ?? (BASE | NET | MRG) }), true);
  return {
    services,
    dev,
    drv,
    wire: pair.b,
    port: pair.a,
    rx: drv.queues[RXQ]!,
    tx: drv.queues[TXQ]!,
    pump: () => {
      for (let i = 0; i < 100 && pair.a.pending > 0 && services.loop.active(pair.a.fd) > 0; i++) services.loop.fire(pair.a.fd);
    },
  };
}

/** Post `count` receive buffers of `size` bytes each (one writable descriptor) at slots from `slot`. */
function postRx(r: Rig, count: number, size: number, slot = 0): number[] {
  const heads: number[] = [];
  for (let i = 0; i < count; i++) heads.push(r.rx.add([{ addr: BUF + (slot + i) * 0x800 * Math.ceil(size / 0x800), len: size, write: true }]));
  return heads;
}

function bufAddr(size: number, slot: number): number {
  return BUF + slot * 0x800 * Math.ceil(size / 0x800);
}

/** Reassemble received frames from the used ring (mergeable-aware). */
function takeFrames(r: Rig, size: number, slotOf: (head: number) => number): { header: Uint8Array; data: Uint8Array; buffers: number }[] {
  const used = r.rx.takeUsed();
  const out: { header: Uint8Array; data: Uint8Array; buffers: number }[] = [];
  let i = 0;
  while (i < used.length) {
    const firstAt = bufAddr(size, slotOf(used[i]!.id));
    const header = r.services.memory.read(firstAt, HDR);
    const n = header[10]! | (header[11]! << 8);
    const parts: Uint8Array[] = [r.services.memory.read(firstAt + HDR, used[i]!.len - HDR)];
    for (let k = 1; k < n; k++) parts.push(r.services.memory.read(bufAddr(size, slotOf(used[i + k]!.id)), used[i + k]!.len));
    const total = parts.reduce((a, p) => a + p.length, 0);
    const data = new Uint8Array(total);
    let o = 0;
    for (const p of parts) {
      data.set(p, o);
      o += p.length;
    }
    out.push({ header, data, buffers: n });
    i += Math.max(n, 1);
  }
  return out;
}

/** The used ring holds exactly frame `f`, spread over buffers of `size` bytes. */
function expectOneFrame(r: Rig, size: number, f: Uint8Array): void {
  const got = takeFrames(r, size, (h) => h);
  assert.equal(got.length, 1);
  assert.equal(got[0]!.buffers, Math.ceil((f.length + HDR) / size));
  assert.deepEqual([...got[0]!.data], [...f]);
}

function wireFrames(port: NetworkPort): Uint8Array[] {
  const out: Uint8Array[] = [];
  const buf = new Uint8Array(MAX_PORT_FRAME_BYTES);
  for (let n; (n = port.receive(buf)) > 0; ) out.push(buf.slice(0, n));
  return out;
}

test("identity and configuration: 1af4:1041, Ethernet class, MAC and link status, offered features", () => {
  const r = make();
  assert.equal(r.dev.pci.configRead(2, 2), 0x1041);
  assert.equal(r.dev.pci.configRead(0x08, 4) >>> 8, 0x020000);
  const offered = r.drv.offeredFeatures();
  for (const f of [VIRTIO_NET_F.mac, VIRTIO_NET_F.status, VIRTIO_NET_F.mrgRxbuf]) assert.ok((offered & featureBit(f)) !== 0n, `feature ${f}`);
  for (const f of [VIRTIO_NET_F.csum, VIRTIO_NET_F.hostTso4, VIRTIO_NET_F.mq, VIRTIO_NET_F.mtu]) assert.equal(offered & featureBit(f), 0n, `no feature ${f}`);
  assert.deepEqual(Array.from({ length: 6 }, (_, i) => r.drv.deviceConfig(K.mac + i, 1)), [...MAC]);
  assert.equal(r.drv.deviceConfig(K.status, 2), 1, "link up");
  assert.equal(r.drv.deviceConfig(K.maxVirtqueuePairs, 2), 1);
  r.dev.barWrite(0, 0x2000, 1, 0x99);
  assert.equal(r.drv.deviceConfig(K.mac, 1), MAC[0], "MAC read-only");
  const before = r.services.msi.count(0);
  r.dev.net.setLinkUp(false);
  assert.equal(r.drv.deviceConfig(K.status, 2), 0);
  assert.equal(r.services.msi.count(0), before + 1, "configuration interrupt");
  assert.equal(make({ port: "none" }).drv.deviceConfig(K.status, 2), 0, "no port: link down");
});

test("transmit: header skipped, frame gathered from any layout (one descriptor, split, indirect) to the port", () => {
  const r = make();
  const mem = r.services.memory;
  const frames = [frame(60, 1), frame(1514, 2), frame(342, 3)];
  // 1: header and frame in one descriptor.
  queueTx(r, BUF, new Uint8Array(HDR), frames[0]!);
  // 2: header alone, then the frame in three pieces.
  mem.write(BUF + 0x1000, new Uint8Array(HDR));
  const f1 = frames[1]!;
  mem.write(BUF + 0x2000, f1.subarray(0, 100));
  mem.write(BUF + 0x3000, f1.subarray(100, 1000));
  mem.write(BUF + 0x4000, f1.subarray(1000));
  r.tx.add([
    { addr: BUF + 0x1000, len: HDR, write: false },
    { addr: BUF + 0x2000, len: 100, write: false },
    { addr: BUF + 0x3000, len: 900, write: false },
    { addr: BUF + 0x4000, len: 514, write: false },
  ]);
  // 3: indirect, header split across descriptors.
  mem.write(BUF + 0x5000, new Uint8Array(5));
  mem.write(BUF + 0x5100, new Uint8Array(HDR - 5));
  mem.write(BUF + 0x5200, frames[2]!);
  r.tx.add(
    [
      { addr: BUF + 0x5000, len: 5, write: false },
      { addr: BUF + 0x5100, len: HDR - 5, write: false },
      { addr: BUF + 0x5200, len: 342, write: false },
    ],
    { indirectAt: BUF + 0x6000 },
  );
  r.tx.kick();
  const sent = wireFrames(r.wire);
  assert.equal(sent.length, 3);
  for (let i = 0; i < 3; i++) assert.deepEqual([...sent[i]!], [...frames[i]!]);
  const used = r.tx.takeUsed();
  assert.equal(used.length, 3);
  assert.ok(used.every((u) => u.len === 0));
  assert.ok(r.services.msi.count(TXQ + 1) >= 1, "transmit interrupt");
  assert.equal(r.dev.net.counters.txFrames, 3);
  assert.equal(r.dev.net.counters.txBytes, 60 + 1514 + 342);
});

test("receive without MRG_RXBUF: one buffer per frame, num_buffers 1, frames in order", () => {
  const r = make({ want: BASE | NET });
  const size = 1526;
  postRx(r, 8, size);
  r.rx.kick();
  const sent = [frame(60, 1, MAC, PEER), frame(1514, 2, MAC, PEER), frame(42, 3, MAC, PEER)];
  for (const f of sent) r.wire.send(f);
  r.pump();
  const got = takeFrames(r, size, (h) => h);
  assert.equal(got.length, 3);
  for (let i = 0; i < 3; i++) {
    assert.deepEqual([...got[i]!.data], [...sent[i]!]);
    assert.equal(got[i]!.buffers, 1);
    assert.deepEqual([...got[i]!.header.subarray(0, 10)], new Array(10).fill(0));
  }
  assert.ok(r.services.msi.count(RXQ + 1) >= 1, "receive interrupt");
  // A frame longer than the buffer is dropped; the buffer serves the next one.
  r.wire.send(frame(1600, 4, MAC, PEER));
  r.wire.send(frame(100, 5, MAC, PEER));
  r.pump();
  const next = takeFrames(r, size, (h) => h);
  assert.equal(next.length, 1);
  assert.equal(next[0]!.data.length, 100);
  assert.equal(r.dev.net.counters.rxDropped, 1);
});

test("receive with MRG_RXBUF: a frame spread over several small buffers, num_buffers counts them", () => {
  const r = make();
  const size = 256;
  postRx(r, 32, size);
  r.rx.kick();
  const f = frame(1514, 9, MAC, PEER);
  r.wire.send(f);
  r.wire.send(frame(100, 10, MAC, PEER));
  r.pump();
  const got = takeFrames(r, size, (h) => h);
  assert.equal(got.length, 2);
  assert.equal(got[0]!.buffers, Math.ceil((1514 + HDR) / size));
  assert.deepEqual([...got[0]!.data], [...f]);
  assert.equal(got[1]!.buffers, 1);
  assert.equal(got[1]!.data.length, 100);
});

test("no receive buffers: the frame is held, the port is not read, nothing is lost; buffers resume delivery", () => {
  const r = make();
  r.wire.send(frame(200, 1, MAC, PEER));
  r.wire.send(frame(300, 2, MAC, PEER));
  r.services.loop.fire(r.port.fd);
  assert.equal(r.services.loop.active(r.port.fd), 0, "stopped polling the port");
  assert.equal(r.port.pending, 1, "the second frame waits in the port");
  assert.equal(r.dev.net.counters.rxWaits, 1);
  // With EVENT_IDX the device asked to hear about the next buffer.
  assert.equal(r.rx.availEvent(), r.rx.availIdx);
  postRx(r, 4, 1526);
  r.rx.kick();
  const got = takeFrames(r, 1526, (h) => h);
  assert.deepEqual(got.map((g) => g.data.length), [200, 300]);
  assert.equal(r.services.loop.active(r.port.fd), 1, "polling again");
});

/** Two 256-byte receive buffers posted, then a 1514-byte frame from the wire: it waits (mergeable) holding both. */
function frameWaitingForBuffers(r: Rig, seed: number): Uint8Array {
  postRx(r, 2, 256);
  r.rx.kick();
  const f = frame(1514, seed, MAC, PEER);
  r.wire.send(f);
  r.pump();
  return f;
}

test("mergeable frame with too few buffers waits with the chains it has, completes when more arrive", () => {
  const r = make();
  const size = 256;
  const f = frameWaitingForBuffers(r, 5);
  assert.equal(r.rx.usedIdx(), 0, "nothing used yet");
  assert.equal(r.services.loop.active(r.port.fd), 0);
  assert.equal(r.rx.availEvent(), r.rx.availIdx, "notification requested at the driver's current index");
  postRx(r, 3, size, 2);
  r.rx.kick();
  assert.equal(r.rx.usedIdx(), 0, "still short");
  postRx(r, 4, size, 5);
  r.rx.kick();
  expectOneFrame(r, size, f);
});

test("a frame waiting for buffers when the device is saved: its chains are given back, and it lands from its first chain later", () => {
  const r = make();
  const size = 256;
  const f = frameWaitingForBuffers(r, 6);
  assert.equal(r.dev.queues[RXQ]!.nextAvail, 2, "two chains held for the waiting frame");
  r.services.loop.work.immediate = false; // the device thread runs deferred work after the current request
  const saved = r.dev.save();
  assert.equal(saved.queues[RXQ]!.queue.lastAvail, 0, "given back before the queue's state was taken");
  assert.equal(r.services.loop.work.run(), 1, "placing the frame again was deferred past the save");
  assert.equal(r.dev.queues[RXQ]!.nextAvail, 2, "the frame took its chains again");
  assert.equal(r.rx.availEvent(), r.rx.availIdx, "and asked to hear of the driver's next buffer");
  postRx(r, 5, size, 2);
  r.rx.kick();
  expectOneFrame(r, size, f);
  assert.equal(r.dev.net.counters.rxDropped, 0);
});

test("receive chains of two descriptors fill the queue at half as many chains: a frame bigger than all of them is dropped, not waited for", () => {
  const r = make({ queueSize: 8 });
  for (let i = 0; i < 4; i++) r.rx.add([{ addr: bufAddr(256, 2 * i), len: 64, write: true }, { addr: bufAddr(256, 2 * i + 1), len: 64, write: true }]);
  r.rx.kick();
  r.wire.send(frame(1514, 7, MAC, PEER)); // 1526 bytes with the header: the 4 chains hold 512
  r.wire.send(frame(100, 8, MAC, PEER));
  r.pump();
  assert.equal(r.dev.net.counters.rxDropped, 1, "the big frame is dropped");
  const got = takeFrames(r, 256, (h) => h); // chain i starts at descriptor 2i, in slot 2i
  assert.deepEqual(got.map((g) => g.data.length), [100], "the next frame is delivered in the chains given back");
});

test("two devices back to back over an in-memory pair", () => {
  const services = makeServices(1 << 20);
  const pair = new MemoryPortPair("b2b");
  const a = createVirtioNet("a", pair.a, services, { mac: MAC });
  placeDevice(a);
  const da = new TestVirtioDriver(a, services);
  assert.equal(da.init({ want: BASE | NET | MRG }), true);
  const servicesB = makeServices(1 << 20);
  const b = createVirtioNet("b", pair.b, servicesB, { mac: PEER });
  placeDevice(b);
  const db = new TestVirtioDriver(b, servicesB);
  assert.equal(db.init({ want: BASE | NET | MRG }), true);
  const rxb = db.queues[RXQ]!;
  for (let i = 0; i < 16; i++) rxb.add([{ addr: BUF + i * 0x800, len: 1526 + 10, write: true }]);
  rxb.kick();
  const f = frame(1000, 3, PEER, MAC);
  services.memory.write(BUF, new Uint8Array(HDR));
  services.memory.write(BUF + HDR, f);
  da.queues[TXQ]!.add([{ addr: BUF, len: HDR + f.length, write: false }]);
  da.queues[TXQ]!.kick();
  servicesB.loop.fire(pair.b.fd);
  const used = rxb.takeUsed();
  assert.equal(used.length, 1);
  assert.equal(used[0]!.len, HDR + 1000);
  assert.deepEqual([...servicesB.memory.read(BUF + HDR, 1000)], [...f]);
});

test("back to back over an AF_UNIX datagram pair: frames sent straight from guest RAM; either end may restart and is reached at once", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "partis-vnet-"));
  const pa = DatagramPairPort.open(path.join(dir, "a"), path.join(dir, "b"));
  let pb = DatagramPairPort.open(path.join(dir, "b"), path.join(dir, "a"));
  try {
    // A's RAM is host-mapped in 64 KiB chunks, so a descriptor across a chunk boundary is two spans.
    const sa = makeServices(1 << 20, 1 << 16, true);
    const a = createVirtioNet("a", pa, sa, { mac: MAC });
    placeDevice(a);
    const da = new TestVirtioDriver(a, sa);
    da.init({ want: BASE | NET | MRG });
    // A's receive side: buffers for what B sends back.
    for (let i = 0; i < 8; i++) da.queues[RXQ]!.add([{ addr: 0x80000 + i * 0x800, len: 1536, write: true }]);
    da.queues[RXQ]!.kick();
    const receivedByA = (): Uint8Array[] => {
      sa.loop.fire(pa.fd);
      return da.queues[RXQ]!.takeUsed().map((u) => sa.memory.read(0x80000 + u.id * 0x800 + HDR, u.len - HDR));
    };
    let sendFromB: (f: Uint8Array) => void = () => {};
    const attachB = (port: DatagramPairPort) => {
      const sb = makeServices(1 << 20);
      const b = createVirtioNet("b", port, sb, { mac: PEER });
      placeDevice(b);
      const db = new TestVirtioDriver(b, sb);
      db.init({ want: BASE | NET | MRG });
      for (let i = 0; i < 8; i++) db.queues[RXQ]!.add([{ addr: BUF + i * 0x800, len: 1536, write: true }]);
      db.queues[RXQ]!.kick();
      sendFromB = (f) => {
        sb.memory.write(0x80000, new Uint8Array(HDR));
        sb.memory.write(0x80000 + HDR, f);
        db.queues[TXQ]!.add([{ addr: 0x80000, len: HDR + f.length, write: false }]);
        db.queues[TXQ]!.kick();
      };
      /** Frames B's guest received, in order. */
      return (): Uint8Array[] => {
        sb.loop.fire(port.fd);
        return db.queues[RXQ]!.takeUsed().map((u) => sb.memory.read(BUF + u.id * 0x800 + HDR, u.len - HDR));
      };
    };
    let receivedByB = attachB(pb);
    const txq = da.queues[TXQ]!;
    const sent: Uint8Array[] = [];
    /** Frame i, in one of three layouts: whole, header apart and the frame in pieces, or across A's chunk boundary. */
    const transmit = (i: number) => {
      const f = frame(64 + ((i * 300) % 1400), i, PEER, MAC);
      sent.push(f);
      const at = BUF + (i % 8) * 0x2000;
      if (i % 3 === 0) {
        sa.memory.write(at, new Uint8Array(HDR));
        sa.memory.write(at + HDR, f);
        txq.add([{ addr: at, len: HDR + f.length, write: false }]);
      } else if (i % 3 === 1) {
        sa.memory.write(at, new Uint8Array(HDR));
        sa.memory.write(at + 0x100, f.subarray(0, 20));
        sa.memory.write(at + 0x800, f.subarray(20));
        txq.add([
          { addr: at, len: HDR, write: false },
          { addr: at + 0x100, len: 20, write: false },
          { addr: at + 0x800, len: f.length - 20, write: false },
        ]);
      } else {
        const start = (1 << 16) - HDR - 30; // the frame's 31st byte is the first of the next chunk
        sa.memory.write(start, new Uint8Array(HDR));
        sa.memory.write(start + HDR, f);
        txq.add([{ addr: start, len: HDR + f.length, write: false }]);
      }
    };
    for (let i = 0; i < 5; i++) transmit(i);
    txq.kick();
    const got = receivedByB();
    assert.equal(got.length, 5);
    for (let i = 0; i < 5; i++) assert.deepEqual([...got[i]!], [...sent[i]!], `frame ${i}`);
    assert.equal(a.net.counters.txFrames, 5);
    assert.equal(a.net.counters.txZeroCopy, 5, "every frame straight from guest RAM");

    // B goes away: frames are dropped and counted, A stays usable.
    pb.close();
    transmit(5);
    txq.kick();
    assert.equal(a.net.counters.txDropped, 1);
    assert.equal(pa.counters.txNoPeer, 1);
    // B comes back and speaks first: A hears it at once.
    pb = DatagramPairPort.open(path.join(dir, "b"), path.join(dir, "a"));
    receivedByB = attachB(pb);
    const hello = frame(100, 77, MAC, PEER);
    sendFromB(hello);
    assert.deepEqual(receivedByA().map((f) => [...f]), [[...hello]], "the restarted end reaches the other before it has sent anything");
    assert.equal(pb.counters.txNoPeer, 0);
    // And A reaches the new B.
    sent.length = 0;
    for (let i = 6; i < 9; i++) transmit(i);
    txq.kick();
    const again = receivedByB();
    assert.equal(again.length, 3);
    for (let i = 0; i < 3; i++) assert.deepEqual([...again[i]!], [...sent[i]!], `frame ${i + 6}`);
    assert.equal(a.net.counters.txZeroCopy, 8);
    assert.equal(txq.takeUsed().length, 9, "every chain completes, sent or dropped");
  } finally {
    pa.close();
    pb.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("no port: transmit completes and counts drops; link down", () => {
  const r = make({ port: "none" });
  r.services.memory.write(BUF, new Uint8Array(HDR + 60));
  r.tx.add([{ addr: BUF, len: HDR + 60, write: false }]);
  r.tx.kick();
  assert.equal(r.tx.takeUsed().length, 1);
  assert.equal(r.dev.net.counters.txDropped, 1);
});

test("protocol errors: a receive chain without room for the header, a transmit chain shorter than it -> DEVICE_NEEDS_RESET", () => {
  const r = make();
  r.rx.add([{ addr: BUF, len: 8, write: true }]);
  r.rx.kick();
  r.wire.send(frame(60, 1, MAC, PEER));
  r.pump();
  assert.ok((r.drv.status() & S.needsReset) !== 0);
  assert.match(r.dev.lastError ?? "", /VIRTIO_NET_BAD_RX_BUFFER/);
  const t = make();
  t.tx.add([{ addr: BUF, len: 6, write: false }]);
  t.tx.kick();
  assert.ok((t.drv.status() & S.needsReset) !== 0);
  assert.match(t.dev.lastError ?? "", /VIRTIO_NET_BAD_TX_BUFFER/);
  // The driver resets and starts again: the device works.
  t.drv.init({ want: BASE | NET | MRG });
  t.services.memory.write(BUF, new Uint8Array(HDR + 60));
  t.drv.queues[TXQ]!.add([{ addr: BUF, len: HDR + 60, write: false }]);
  t.drv.queues[TXQ]!.kick();
  assert.equal(wireFrames(t.wire).length, 1);
});

test("device reset while a frame is held: the watch goes, the next driver sees fresh frames", () => {
  const r = make();
  r.wire.send(frame(100, 1, MAC, PEER));
  r.services.loop.fire(r.port.fd);
  assert.equal(r.services.loop.active(r.port.fd), 0);
  r.drv.reset();
  assert.equal(r.dev.net.counters.rxDropped, 1, "the held frame is dropped at reset");
  r.drv.init({ want: BASE | NET });
  const rx = r.drv.queues[RXQ]!;
  rx.add([{ addr: BUF, len: 1526, write: true }]);
  rx.kick();
  r.wire.send(frame(120, 2, MAC, PEER));
  r.pump();
  const used = rx.takeUsed();
  assert.equal(used.length, 1);
  assert.equal(used[0]!.len, HDR + 120);
  const saved = r.dev.save();
  assert.equal(saved.backend?.kind, "virtio-net");
});

/** A virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers. */
function vnetHeader(flags: number, gso: number, gsoSize = 0, numBuffers = 0): Uint8Array {
  const h = new Uint8Array(HDR);
  const v = new DataView(h.buffer);
  h[0] = flags;
  h[1] = gso;
  v.setUint16(2, gso !== 0 ? 54 : 0, true);
  v.setUint16(4, gsoSize, true);
  v.setUint16(6, flags & VIRTIO_NET_HDR_F.needsCsum ? 34 : 0, true);
  v.setUint16(8, flags & VIRTIO_NET_HDR_F.needsCsum ? 16 : 0, true);
  v.setUint16(10, numBuffers, true);
  return h;
}

/** Put header + frame for transmit at `at` (one descriptor) on the transmit queue. */
function queueTx(r: Rig, at: number, header: Uint8Array, f: Uint8Array): void {
  r.services.memory.write(at, header);
  r.services.memory.write(at + HDR, f);
  r.tx.add([{ addr: at, len: HDR + f.length, write: false }]);
}

const OFFLOADS = [VIRTIO_NET_F.csum, VIRTIO_NET_F.guestCsum, VIRTIO_NET_F.guestTso4, VIRTIO_NET_F.guestTso6, VIRTIO_NET_F.guestEcn, VIRTIO_NET_F.hostTso4, VIRTIO_NET_F.hostTso6, VIRTIO_NET_F.hostEcn];
const bits = (...fs: number[]): bigint => fs.reduce((a, f) => a | featureBit(f), 0n);

test("offloads on a port that carries the header: offered, the guest's choice handed to the port, headers passed through both ways, what was not negotiated dropped", () => {
  const r = make({ port: "vnet-header", want: BASE | NET | MRG | bits(VIRTIO_NET_F.csum, VIRTIO_NET_F.hostTso4, VIRTIO_NET_F.guestCsum, VIRTIO_NET_F.guestTso4) });
  const offered = r.drv.offeredFeatures();
  for (const f of OFFLOADS) assert.notEqual(offered & featureBit(f), 0n, `offload feature ${f} offered`);
  assert.deepEqual((r.port as MemoryPortPair["a"]).receiveOffloads, { csum: true, tso4: true, tso6: false, ecn: false }, "what the guest takes, told to the port");
  // Transmit: a TSO frame with a partial checksum goes out with its header, byte for byte.
  const big = frame(20_000, 1);
  const tso = vnetHeader(VIRTIO_NET_HDR_F.needsCsum, VIRTIO_NET_HDR_GSO.tcpv4, 1448);
  queueTx(r, BUF, tso, big);
  // One asking for TSO over IPv6, which the guest did not negotiate: dropped.
  queueTx(r, BUF + 0x8000, vnetHeader(VIRTIO_NET_HDR_F.needsCsum, VIRTIO_NET_HDR_GSO.tcpv6, 1428), frame(3000, 2));
  // A plain frame (flags 0, GSO none).
  queueTx(r, BUF + 0x9000, vnetHeader(0, 0), frame(60, 3));
  r.tx.kick();
  const out = wireFrames(r.wire);
  assert.equal(out.length, 2);
  assert.deepEqual([...out[0]!.subarray(0, HDR)], [...tso], "the guest's header, as written");
  assert.deepEqual([...out[0]!.subarray(HDR)], [...big]);
  assert.equal(out[1]!.length, HDR + 60);
  const c = r.dev.net.counters;
  assert.equal(c.txFrames, 2);
  assert.equal(c.txBytes, 20_060, "frame bytes, headers not counted");
  assert.equal(c.txOffloaded, 1);
  assert.equal(c.txDropped, 1);
  // Receive: the port's header reaches the guest with num_buffers filled in, the frame spread over 4 KiB buffers.
  const size = 4096;
  postRx(r, 16, size);
  r.rx.kick();
  const gro = frame(30_000, 4, MAC, PEER);
  const inHdr = vnetHeader(VIRTIO_NET_HDR_F.needsCsum, VIRTIO_NET_HDR_GSO.tcpv4, 1448, 0xbeef);
  r.wire.send(Uint8Array.from([...inHdr, ...gro]));
  r.wire.send(Uint8Array.from([...vnetHeader(VIRTIO_NET_HDR_F.needsCsum, VIRTIO_NET_HDR_GSO.tcpv6, 1428), ...frame(2000, 5, MAC, PEER)])); // not negotiated
  r.wire.send(Uint8Array.from([...vnetHeader(VIRTIO_NET_HDR_F.dataValid, 0), ...frame(100, 6, MAC, PEER)]));
  r.wire.send(new Uint8Array(HDR + 3)); // shorter than a header and an Ethernet header
  r.pump();
  const got = takeFrames(r, size, (h) => h);
  assert.equal(got.length, 2);
  assert.equal(got[0]!.buffers, Math.ceil((HDR + gro.length) / size));
  assert.deepEqual([...got[0]!.header.subarray(0, 10)], [...inHdr.subarray(0, 10)], "flags, GSO type and sizes as the port gave them");
  assert.deepEqual([...got[0]!.data], [...gro]);
  assert.equal(got[1]!.header[0], VIRTIO_NET_HDR_F.dataValid, "DATA_VALID kept: the guest has GUEST_CSUM");
  assert.equal(got[1]!.buffers, 1);
  assert.equal(c.rxOffloaded, 1);
  assert.equal(c.rxDropped, 2);
  assert.equal(c.rxBytes, 30_100);
  // A reset takes the offloads back from the port.
  r.drv.reset();
  assert.deepEqual((r.port as MemoryPortPair["a"]).receiveOffloads, { csum: false, tso4: false, tso6: false, ecn: false });
});

test("offloads not negotiated on a port that carries the header: partial checksums and GSO refused both ways, DATA_VALID cleared", () => {
  const r = make({ port: "vnet-header", want: BASE | NET });
  assert.deepEqual((r.port as MemoryPortPair["a"]).receiveOffloads, { csum: false, tso4: false, tso6: false, ecn: false });
  queueTx(r, BUF, vnetHeader(VIRTIO_NET_HDR_F.needsCsum, 0), frame(100, 1));
  queueTx(r, BUF + 0x1000, Uint8Array.of(0x80, 0, ...new Array(HDR - 2).fill(0)), frame(100, 2)); // an unknown flag
  queueTx(r, BUF + 0x2000, vnetHeader(0, 0), frame(100, 3));
  r.tx.kick();
  assert.equal(wireFrames(r.wire).length, 1, "only the frame without offloads");
  assert.equal(r.dev.net.counters.txDropped, 2);
  postRx(r, 4, 1526);
  r.rx.kick();
  r.wire.send(Uint8Array.from([...vnetHeader(VIRTIO_NET_HDR_F.needsCsum, 0), ...frame(100, 4, MAC, PEER)]));
  r.wire.send(Uint8Array.from([...vnetHeader(VIRTIO_NET_HDR_F.dataValid, 0), ...frame(100, 5, MAC, PEER)]));
  r.pump();
  const got = takeFrames(r, 1526, (h) => h);
  assert.equal(got.length, 1);
  assert.equal(got[0]!.header[0], 0, "DATA_VALID cleared for a guest without GUEST_CSUM");
  assert.equal(got[0]!.buffers, 1);
  assert.deepEqual([...got[0]!.data], [...frame(100, 5, MAC, PEER)]);
  assert.equal(r.dev.net.counters.rxDropped, 1);
});

test("interrupts through INTx when MSI-X is off", () => {
  const services = makeServices(1 << 20);
  const pair = new MemoryPortPair("intx");
  const dev = createVirtioNet("vnet-intx", pair.a, services, { mac: MAC });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: BASE | NET | MRG, msix: false }), true);
  drv.queues[RXQ]!.add([{ addr: BUF, len: 1526, write: true }]);
  drv.queues[RXQ]!.kick();
  pair.b.send(frame(80, 1, MAC, PEER));
  services.loop.fire(pair.a.fd);
  assert.equal(services.intx.level, true);
  assert.equal(dev.barRead(0, 0x1000, 1), 1, "ISR: queue interrupt");
  assert.equal(services.intx.level, false);
});
