/**
 * virtio-net's control queue (virtio 1.2 spec 5.1.6.5) and what it drives:
 * the receive filter (modes, address tables, the device's own address, VLAN
 * ids), multiple queue pairs on multi-queue ports, the announce handshake,
 * receive offloads switched by the driver, the MTU, and the saved state that
 * carries all of it to a restored device.
 */
import { test } from "node:test";
import type { SavedDeviceState } from "../../../src/devices/dependencies.js";
import assert from "node:assert/strict";
import { VIRTIO_F, VIRTIO_STATUS as S, featureBit } from "../../../src/devices/virtio/pci-transport.js";
import { MAX_PORT_FRAME_BYTES, MemoryPortPair, type NetworkPort } from "../../../src/devices/net/network-port.js";
import { MAC_TABLE_ENTRIES } from "../../../src/devices/net/receive-filter.js";
import {
  VIRTIO_NET_CONFIG as K,
  VIRTIO_NET_CTRL as CTRL,
  VIRTIO_NET_F as F,
  VIRTIO_NET_HDR_BYTES as HDR,
  VIRTIO_NET_S_ANNOUNCE,
  createVirtioNet,
  type VirtioNetDevice,
  type VirtioNetOptions,
} from "../../../src/devices/net/virtio-net.js";
import { TestVirtioDriver, makeServices, placeDevice, type DriverQueue, type TestServices } from "../virtio/virtio-driver.js";

const MAC = Uint8Array.from([0x52, 0x54, 0x00, 0x00, 0x00, 0xa0]);
const OTHER = Uint8Array.from([0x52, 0x54, 0x00, 0x00, 0x00, 0xc7]);
const SRC = Uint8Array.from([0x52, 0x54, 0x00, 0x00, 0x00, 0xb0]);
const BROADCAST = Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
const MCAST = Uint8Array.from([0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]);
const MCAST2 = Uint8Array.from([0x33, 0x33, 0x00, 0x00, 0x00, 0x01]);
const bits = (...fs: number[]): bigint => fs.reduce((a, f) => a | featureBit(f), 0n);
const BASE = bits(VIRTIO_F.version1, VIRTIO_F.eventIdx, F.mac, F.status, F.mrgRxbuf);
const CONTROL = bits(F.ctrlVq, F.ctrlRx, F.ctrlRxExtra, F.ctrlVlan, F.guestAnnounce, F.ctrlMacAddr);
/** Receive buffers and transmit frames (rings are allocated below it), and the control command area. */
const BUF = 0x40000;
const CMD = 0xf0000;

/** A port that records the queue enabling a multi-queue TAP would get. */
type QueuePort = NetworkPort & { enabled: boolean | undefined; pending: number };

interface Rig {
  services: TestServices;
  dev: VirtioNetDevice;
  drv: TestVirtioDriver;
  ports: QueuePort[];
  wires: NetworkPort[];
  pairs: MemoryPortPair[];
}

function make(opts: { pairs?: number; want?: bigint; vnet?: boolean; mtu?: number; init?: boolean; rate?: { bytesPerSecond: number; clock: () => number } } = {}): Rig {
  const services = makeServices(1 << 20);
  const pairs = Array.from({ length: opts.pairs ?? 1 }, (_, i) => new MemoryPortPair(`q${i}`, 256, { vnetHeader: opts.vnet === true }));
  const ports = pairs.map((p) =>
    Object.assign(p.a, {
      enabled: undefined as boolean | undefined,
      setQueueEnabled(this: { enabled: boolean | undefined }, on: boolean): void {
        this.enabled = on;
      },
    }),
  );
  const o: VirtioNetOptions = { mac: MAC, queueSize: 64, ...(opts.mtu !== undefined ? { mtu: opts.mtu } : {}), ...(opts.rate !== undefined ? { rateBytesPerSecond: opts.rate.bytesPerSecond, clock: opts.rate.clock } : {}) };
  const dev = createVirtioNet("vnet0", ports.length === 1 ? ports[0] : ports, services, o);
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  if (opts.init !== false) assert.equal(drv.init({ want: opts.want ?? (BASE | CONTROL) }), true);
  return { services, dev, drv, ports, wires: pairs.map((p) => p.b), pairs };
}

/** The control queue's index for the driver's negotiated features. */
function controlQueue(r: Rig): DriverQueue {
  const pairs = (r.drv.features & featureBit(F.mq)) !== 0n ? r.dev.net.queuePairs.max : 1;
  return r.drv.queues[2 * pairs]!;
}

/** Send one control command; the ack byte (or undefined when the device used no buffer). */
function command(r: Rig, cls: number, cmd: number, data: readonly number[] = []): number | undefined {
  const q = controlQueue(r);
  const m = r.services.memory;
  m.write(CMD, Uint8Array.from([cls, cmd, ...data]));
  m.write(CMD + 0x8000, Uint8Array.from([0xee]));
  q.add([
    { addr: CMD, len: 2 + data.length, write: false },
    { addr: CMD + 0x8000, len: 1, write: true },
  ]);
  q.kick();
  const used = q.takeUsed();
  if (used.length === 0) return undefined;
  assert.equal(used.length, 1);
  assert.equal(used[0]!.len, 1, "the device wrote the ack byte");
  return m.read(CMD + 0x8000, 1)[0];
}

const le16 = (v: number): number[] => [v & 0xff, v >> 8];
const le32 = (v: number): number[] => [v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, v >>> 24];
function macTable(uni: readonly Uint8Array[], multi: readonly Uint8Array[]): number[] {
  return [...le32(uni.length), ...uni.flatMap((a) => [...a]), ...le32(multi.length), ...multi.flatMap((a) => [...a])];
}

function ethernet(dst: Uint8Array, opts: { vlan?: number; length?: number; seed?: number } = {}): Uint8Array {
  const len = opts.length ?? 64;
  const f = new Uint8Array(len);
  f.set(dst, 0);
  f.set(SRC, 6);
  let at = 12;
  if (opts.vlan !== undefined) {
    f.set([0x81, 0x00, (opts.vlan >> 8) & 0x0f, opts.vlan & 0xff], 12);
    at = 16;
  }
  f.set([0x08, 0x00], at);
  for (let i = at + 2; i < len; i++) f[i] = (i + (opts.seed ?? 0)) & 0xff;
  return f;
}

/** Where each posted receive buffer is (by queue and head), and how many of a queue's are still posted. */
const posted = new WeakMap<Rig, { addr: Map<string, number>; next: number[]; outstanding: number[] }>();
function book(r: Rig): { addr: Map<string, number>; next: number[]; outstanding: number[] } {
  let b = posted.get(r);
  if (b === undefined) {
    b = { addr: new Map(), next: [0, 0, 0, 0], outstanding: [0, 0, 0, 0] };
    posted.set(r, b);
  }
  return b;
}

/** Post receive buffers on pair `k`'s receive queue (2 KiB each, 32 slots per pair, reused in turn). */
function postRx(r: Rig, k: number, count: number): void {
  const q = r.drv.queues[2 * k]!;
  const b = book(r);
  for (let i = 0; i < count; i++) {
    const addr = BUF + k * 0x10000 + (b.next[k]!++ % 32) * 0x800;
    b.addr.set(`${k}:${q.add([{ addr, len: 0x800, write: true }])}`, addr);
    b.outstanding[k]!++;
  }
  q.kick();
}

/** Frames from the wire of pair `k` through the device; the frames the guest got on receive queue `k` (without headers). */
function deliver(r: Rig, k: number, frames: readonly Uint8Array[]): Uint8Array[] {
  for (const f of frames) assert.equal(r.wires[k]!.send(f), true);
  const port = r.ports[k]!;
  for (let i = 0; i < 100 && port.pending > 0 && r.services.loop.active(port.fd) > 0; i++) r.services.loop.fire(port.fd);
  return received(r, k);
}

/** Frames the guest got on pair `k` since the last call (one buffer each). */
function received(r: Rig, k: number): Uint8Array[] {
  const b = book(r);
  return r.drv.queues[2 * k]!.takeUsed().map((u) => {
    b.outstanding[k]!--;
    const addr = b.addr.get(`${k}:${u.id}`)!;
    return r.services.memory.read(addr + HDR, u.len - HDR);
  });
}

/** Which of `dsts` (by index) reach the guest as frames to those addresses. */
function passing(r: Rig, dsts: readonly Uint8Array[], vlan?: number): number[] {
  // Enough buffers for every frame (those a filtered frame left are still posted).
  postRx(r, 0, Math.max(0, dsts.length - book(r).outstanding[0]!));
  const got = deliver(r, 0, dsts.map((d, i) => ethernet(d, { seed: i, ...(vlan !== undefined ? { vlan } : {}) })));
  return got.map((f) => dsts.findIndex((d, i) => f.subarray(0, 6).every((b, j) => b === d[j]) && f[f.length - 1] === ((f.length - 1 + i) & 0xff)));
}

test("offered features: the control queue and what it carries; MQ only with several ports, the MTU only when set, guest offload control only with offloads", () => {
  const one = make({ init: false }).drv.offeredFeatures();
  for (const f of [F.ctrlVq, F.ctrlRx, F.ctrlRxExtra, F.ctrlVlan, F.guestAnnounce, F.ctrlMacAddr]) assert.notEqual(one & featureBit(f), 0n, `feature ${f}`);
  for (const f of [F.mq, F.mtu, F.ctrlGuestOffloads]) assert.equal(one & featureBit(f), 0n, `no feature ${f}`);
  const r = make({ pairs: 3, vnet: true, mtu: 9000, init: false });
  const many = r.drv.offeredFeatures();
  for (const f of [F.mq, F.mtu, F.ctrlGuestOffloads]) assert.notEqual(many & featureBit(f), 0n, `feature ${f}`);
  assert.equal(r.drv.deviceConfig(K.maxVirtqueuePairs, 2), 3);
  assert.equal(r.drv.deviceConfig(K.mtu, 2), 9000);
  assert.equal(r.dev.barRead(0, 0x12, 2), 7, "3 pairs and a control queue");
  // Features that need the control queue are refused without it (FEATURES_OK does not stick).
  const d = make({ pairs: 2, init: false }).drv;
  const negotiates = (features: bigint): boolean => {
    d.reset();
    d.setStatus(S.acknowledge);
    d.setStatus(S.driver);
    return d.finishInit(features);
  };
  assert.equal(negotiates(BASE | bits(F.mq)), false, "MQ without CTRL_VQ");
  assert.equal(negotiates(BASE | bits(F.ctrlVq, F.ctrlRxExtra)), false, "CTRL_RX_EXTRA without CTRL_RX");
  assert.equal(negotiates(BASE | bits(F.ctrlVq, F.ctrlRx, F.ctrlRxExtra, F.mq)), true);
  for (const bad of [-1, 0, 1.5, 65536]) assert.throws(() => createVirtioNet("m", undefined, makeServices(1 << 16), { mac: MAC, mtu: bad }), /MTU/);
});

test("receive filter: promiscuous until the driver says otherwise, then its own address, the tables, broadcast and the all/no modes", () => {
  const r = make();
  const dsts = [MAC, OTHER, BROADCAST, MCAST, MCAST2];
  assert.deepEqual(passing(r, dsts), [0, 1, 2, 3, 4], "promiscuous after reset");
  assert.equal(command(r, CTRL.rx, 0, [0]), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 2], "own address and broadcast");
  assert.equal(r.dev.net.counters.rxFiltered, 3);
  assert.equal(command(r, CTRL.mac, CTRL.macTableSet, macTable([OTHER], [MCAST2])), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 1, 2, 4], "the tables' addresses too");
  assert.equal(command(r, CTRL.rx, 1, [1]), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 1, 2, 3, 4], "all multicast");
  assert.equal(command(r, CTRL.rx, 3, [1]), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 1, 2], "no multicast wins over all multicast; broadcast is not multicast");
  assert.equal(command(r, CTRL.rx, 5, [1]), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 1], "no broadcast");
  assert.equal(command(r, CTRL.rx, 4, [1]), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [], "no unicast either");
  assert.equal(command(r, CTRL.rx, 0, [1]), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 1, 2, 3, 4], "promiscuous wins over every other mode");
  // Too many addresses: that kind passes unfiltered (best effort, never stricter than asked).
  const many = Array.from({ length: MAC_TABLE_ENTRIES + 1 }, (_, i) => Uint8Array.from([0x52, 0x54, 1, 0, i >> 8, i & 0xff]));
  for (const [mode, on] of [[0, 0], [1, 0], [3, 0], [4, 0], [5, 0]] as const) assert.equal(command(r, CTRL.rx, mode, [on]), CTRL.ok);
  assert.equal(command(r, CTRL.mac, CTRL.macTableSet, macTable(many, [])), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 1, 2], "unicast table overflowed: all unicast; multicast table now empty");
  assert.equal(command(r, CTRL.mac, CTRL.macTableSet, macTable([], [])), CTRL.ok);
  assert.equal(command(r, CTRL.rx, 2, [1]), CTRL.ok);
  assert.deepEqual(passing(r, dsts), [0, 1, 2], "all unicast");
  // A reset brings the promiscuous default back.
  r.drv.init({ want: BASE | CONTROL });
  posted.delete(r);
  assert.deepEqual(passing(r, dsts), [0, 1, 2, 3, 4]);
});

test("MAC_ADDR_SET: the configuration shows the new address, frames to it pass and to the old one not; reset restores the configured MAC", () => {
  const r = make();
  assert.equal(command(r, CTRL.rx, 0, [0]), CTRL.ok);
  assert.equal(command(r, CTRL.mac, CTRL.macAddrSet, [...OTHER]), CTRL.ok);
  assert.deepEqual(Array.from({ length: 6 }, (_, i) => r.drv.deviceConfig(K.mac + i, 1)), [...OTHER]);
  assert.deepEqual(passing(r, [MAC, OTHER]), [1]);
  r.drv.init({ want: BASE | CONTROL });
  posted.delete(r);
  assert.deepEqual(Array.from({ length: 6 }, (_, i) => r.drv.deviceConfig(K.mac + i, 1)), [...MAC], "the configured MAC after reset");
  assert.equal(command(r, CTRL.rx, 0, [0]), CTRL.ok);
  assert.deepEqual(passing(r, [MAC, OTHER]), [0]);
});

test("VLAN filter: tagged frames only for ids in the table, untagged ones unaffected; without CTRL_VLAN every tag passes", () => {
  const r = make();
  assert.equal(command(r, CTRL.rx, 0, [0]), CTRL.ok);
  assert.deepEqual(passing(r, [MAC], 100), [], "the table starts empty");
  assert.deepEqual(passing(r, [MAC]), [0], "untagged");
  assert.equal(command(r, CTRL.vlan, CTRL.vlanAdd, le16(100)), CTRL.ok);
  assert.equal(command(r, CTRL.vlan, CTRL.vlanAdd, le16(4095)), CTRL.ok);
  assert.deepEqual(passing(r, [MAC], 100), [0]);
  assert.deepEqual(passing(r, [MAC], 4095), [0]);
  assert.deepEqual(passing(r, [MAC], 101), []);
  assert.equal(command(r, CTRL.vlan, CTRL.vlanDel, le16(100)), CTRL.ok);
  assert.deepEqual(passing(r, [MAC], 100), []);
  assert.equal(command(r, CTRL.vlan, CTRL.vlanAdd, le16(4096)), CTRL.err, "an id out of range");
  const n = make({ want: BASE | CONTROL & ~bits(F.ctrlVlan) });
  assert.equal(command(n, CTRL.rx, 0, [0]), CTRL.ok);
  assert.deepEqual(passing(n, [MAC], 77), [0]);
  assert.equal(command(n, CTRL.vlan, CTRL.vlanAdd, le16(77)), CTRL.err, "VLAN commands need CTRL_VLAN");
});

test("bad commands: unknown classes and commands, wrong sizes, values out of range and features not negotiated get ERR and change nothing; a chain without the ack byte breaks the queue", () => {
  const r = make({ want: BASE | bits(F.ctrlVq, F.ctrlRx) });
  const before = r.dev.net.filter.save();
  const bad: [number, number, number[]][] = [
    [9, 0, []],
    [CTRL.rx, 6, [1]],
    [CTRL.rx, 0, []],
    [CTRL.rx, 0, [1, 0]],
    [CTRL.rx, 0, [2]],
    [CTRL.rx, 3, [1]], // CTRL_RX_EXTRA not negotiated
    [CTRL.mac, CTRL.macAddrSet, [...OTHER]], // CTRL_MAC_ADDR not negotiated
    [CTRL.mac, 2, []],
    [CTRL.mac, CTRL.macTableSet, [...le32(1), ...MAC]], // no multicast count
    [CTRL.mac, CTRL.macTableSet, [...le32(2), ...MAC, ...le32(0)]], // count beyond the data
    [CTRL.mac, CTRL.macTableSet, [...macTable([MAC], []), 0]], // a byte left over
    [CTRL.mac, CTRL.macTableSet, [...le32(0xffff_ffff), ...le32(0)]],
    [CTRL.announce, CTRL.announceAck, []],
    [CTRL.mq, CTRL.mqVqPairsSet, le16(1)],
    [CTRL.guestOffloads, CTRL.guestOffloadsSet, [0, 0, 0, 0, 0, 0, 0, 0]],
  ];
  for (const [cls, cmd, data] of bad) assert.equal(command(r, cls, cmd, data), CTRL.err, `class ${cls} command ${cmd} data [${data.join(",")}]`);
  assert.deepEqual(r.dev.net.filter.save(), before, "nothing changed");
  assert.equal(r.dev.net.counters.controlErr, bad.length);
  // No room for the ack: a protocol error.
  const q = controlQueue(r);
  r.services.memory.write(CMD, Uint8Array.from([CTRL.rx, 0, 1]));
  q.add([{ addr: CMD, len: 3, write: false }]);
  q.kick();
  assert.notEqual(r.drv.status() & S.needsReset, 0, "DEVICE_NEEDS_RESET");
});

test("multiqueue: the control queue at 2N, one pair until VQ_PAIRS_SET, each pair on its own port both ways, pairs cut back give their buffers back, reset back to one", () => {
  const r = make({ pairs: 3, want: BASE | CONTROL | bits(F.mq) });
  assert.deepEqual(r.ports.map((p) => p.enabled), [true, false, false], "only the first queue until the driver enables more");
  assert.equal(r.dev.net.queuePairs.active, 1);
  for (let k = 0; k < 3; k++) postRx(r, k, 4);
  assert.equal(deliver(r, 1, [ethernet(MAC)]).length, 0, "pair 1's port is not read yet");
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(4)), CTRL.err, "more pairs than the device has");
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(0)), CTRL.err);
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(3)), CTRL.ok);
  assert.deepEqual(r.ports.map((p) => p.enabled), [true, true, true]);
  assert.equal(received(r, 1).length, 1, "the frame waiting on pair 1's port arrives once the pair is on");
  for (let k = 0; k < 3; k++) {
    const got = deliver(r, k, [ethernet(MAC, { seed: k, length: 100 + k })]);
    assert.equal(got.length, 1, `pair ${k} receives from its port`);
    assert.equal(got[0]!.length, 100 + k);
  }
  // Transmit on each pair's queue: out of that pair's port only.
  for (let k = 0; k < 3; k++) {
    const at = 0x80000 + k * 0x1000;
    r.services.memory.write(at + HDR, ethernet(SRC, { length: 200 + k }));
    r.drv.queues[2 * k + 1]!.add([{ addr: at, len: HDR + 200 + k, write: false }]);
    r.drv.queues[2 * k + 1]!.kick();
  }
  const sink = new Uint8Array(MAX_PORT_FRAME_BYTES);
  r.wires.forEach((w, k) => {
    assert.equal(w.receive(sink), 200 + k, `pair ${k}'s frame on its own port`);
    assert.equal(w.receive(sink), 0);
  });
  assert.deepEqual(r.dev.net.queuePairs.frames, [1, 2, 3].map((_, k) => ({ rx: k === 1 ? 2 : 1, tx: 1 })));
  // Cut back to one pair while pair 2 holds a frame spread over chains: they come back to the driver's ring unused.
  const q2 = r.drv.queues[4]!;
  q2.takeUsed();
  assert.equal(deliver(r, 2, [ethernet(MAC, { length: 0x800 * 5 })]).length, 0, "a frame longer than the posted buffers waits on pair 2");
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(1)), CTRL.ok);
  assert.deepEqual(r.ports.map((p) => p.enabled), [true, false, false]);
  assert.equal(r.dev.net.counters.rxDropped, 1, "the held frame is dropped");
  assert.equal(r.dev.queues[4]!.save().lastAvail, r.dev.queues[4]!.save().usedIdx, "the chains it took are given back");
  // Reset: one pair again.
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(2)), CTRL.ok);
  r.drv.init({ want: BASE | CONTROL | bits(F.mq) });
  assert.deepEqual(r.ports.map((p) => p.enabled), [true, false, false]);
  assert.equal(r.dev.net.queuePairs.active, 1);
});

test("VQ_PAIRS_SET that a port refuses: ERR, and the driver keeps the pairs it had, each still receiving", () => {
  const r = make({ pairs: 3, want: BASE | CONTROL | bits(F.mq) });
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(2)), CTRL.ok);
  const third = r.ports[2]!;
  third.setQueueEnabled = (on: boolean): void => {
    if (on) throw new Error("EBUSY");
    third.enabled = false;
  };
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(3)), CTRL.err);
  assert.equal(r.dev.net.queuePairs.active, 2, "the device stays at the pairs the driver still believes in");
  assert.deepEqual(r.ports.map((p) => p.enabled), [true, true, false]);
  for (let k = 0; k < 2; k++) {
    postRx(r, k, 2);
    assert.equal(deliver(r, k, [ethernet(MAC, { seed: k })]).length, 1, `pair ${k} still receives`);
  }
  assert.ok(r.dev.net.notes.some((n) => /EBUSY/.test(n)), "the refusal is noted");
});

test("rate limit over several pairs: the alarm starts at the pair after the one the limit stopped, so a busy pair cannot starve another", () => {
  let now = 1000;
  const r = make({ pairs: 2, want: BASE | CONTROL | bits(F.mq), rate: { bytesPerSecond: 200_000, clock: () => now } });
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(2)), CTRL.ok);
  const sink = new Uint8Array(MAX_PORT_FRAME_BYTES);
  const onWire = (k: number): number => {
    let n = 0;
    while (r.wires[k]!.receive(sink) > 0) n++;
    return n;
  };
  const queueFrames = (k: number, n: number): void => {
    const q = r.drv.queues[2 * k + 1]!;
    for (let i = 0; i < n; i++) q.add([{ addr: 0x80000 + k * 0x8000 + (i % 8) * 0x1000, len: HDR + 1000, write: false }]);
    q.kick();
  };
  queueFrames(0, 60);
  assert.equal(onWire(0), 60, "65,550 bytes in the bucket: all 60 go");
  queueFrames(0, 60);
  assert.equal(onWire(0), 6, "then the bucket is in debt");
  queueFrames(1, 3);
  assert.equal(onWire(1), 0, "pair 1 waits for the alarm too");
  let pair1At = 0;
  for (let alarm = 1; alarm <= 3 && pair1At === 0; alarm++) {
    now += 100; // 20,000 bytes: about 20 frames
    r.services.loop.fire(r.dev.net.alarm!.fd);
    // Pair 0 is kept busy: what it sent is queued again at once.
    const sent0 = onWire(0);
    r.drv.queues[1]!.takeUsed();
    queueFrames(0, sent0);
    if (onWire(1) > 0) pair1At = alarm;
  }
  assert.ok(pair1At >= 1 && pair1At <= 2, `pair 1 got its turn at alarm ${pair1At}`);
});

test("multiqueue offered but not negotiated: the control queue is queue 2 and only the first pair works", () => {
  const r = make({ pairs: 2, want: BASE | CONTROL });
  assert.equal(controlQueue(r).index, 2);
  assert.equal(command(r, CTRL.rx, 0, [0]), CTRL.ok);
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(2)), CTRL.err, "MQ not negotiated");
  assert.deepEqual(passing(r, [MAC, OTHER]), [0]);
  // Queue 3 (pair 1's transmit queue if MQ were on) is not served.
  r.services.memory.write(0x80000 + HDR, ethernet(SRC));
  r.drv.queues[3]!.add([{ addr: 0x80000, len: HDR + 64, write: false }]);
  r.drv.queues[3]!.kick();
  assert.equal(r.drv.queues[3]!.takeUsed().length, 0);
  assert.equal(r.dev.net.counters.txFrames, 0);
});

test("GUEST_ANNOUNCE: announce() sets the status bit with a configuration interrupt, the driver's ack clears it; nothing without the feature", () => {
  const r = make();
  const cfg = r.services.msi.count(0);
  assert.equal(r.dev.net.announce(), true);
  assert.equal(r.drv.deviceConfig(K.status, 2), 1 | VIRTIO_NET_S_ANNOUNCE);
  assert.equal(r.services.msi.count(0), cfg + 1);
  r.dev.net.setLinkUp(false);
  assert.equal(r.drv.deviceConfig(K.status, 2), VIRTIO_NET_S_ANNOUNCE, "link changes keep a pending announce");
  r.dev.net.setLinkUp(true);
  assert.equal(command(r, CTRL.announce, CTRL.announceAck), CTRL.ok);
  assert.equal(r.drv.deviceConfig(K.status, 2), 1);
  assert.equal(command(r, CTRL.announce, 1), CTRL.err);
  const n = make({ want: BASE | (CONTROL & ~bits(F.guestAnnounce)) });
  assert.equal(n.dev.net.announce(), false);
  assert.equal(n.drv.deviceConfig(K.status, 2), 1);
  assert.equal(make({ init: false }).dev.net.announce(), false, "no driver running");
});

test("CTRL_GUEST_OFFLOADS: the driver turns receive offloads off and on at the port, only among those it negotiated", () => {
  const guest = bits(F.guestCsum, F.guestTso4, F.guestTso6);
  const r = make({ vnet: true, want: BASE | CONTROL | bits(F.ctrlGuestOffloads, F.csum) | guest });
  const port = r.ports[0] as unknown as { receiveOffloads: unknown };
  assert.deepEqual(port.receiveOffloads, { csum: true, tso4: true, tso6: true, ecn: false });
  const set = (v: number): number | undefined => command(r, CTRL.guestOffloads, CTRL.guestOffloadsSet, [...le32(v), 0, 0, 0, 0]);
  assert.equal(set(1 << F.guestCsum), CTRL.ok);
  assert.deepEqual(port.receiveOffloads, { csum: true, tso4: false, tso6: false, ecn: false });
  // A TSO frame from the host is no longer taken.
  const gso = new Uint8Array(HDR + 64);
  gso[0] = 1;
  gso[1] = 1;
  gso.set(ethernet(MAC), HDR);
  postRx(r, 0, 1);
  assert.equal(deliver(r, 0, [gso]).length, 0);
  assert.equal(set((1 << F.guestCsum) | (1 << F.guestEcn)), CTRL.err, "ECN was not negotiated");
  assert.equal(command(r, CTRL.guestOffloads, CTRL.guestOffloadsSet, [...le32(0), 1, 0, 0, 0]), CTRL.err, "bits above 31");
  assert.equal(set(Number(guest)), CTRL.ok);
  assert.deepEqual(port.receiveOffloads, { csum: true, tso4: true, tso6: true, ecn: false });
  assert.equal(deliver(r, 0, [gso]).length, 1);
});

test("MTU: received frames longer than the MTU are dropped (tagged ones get 4 bytes more); frames up to it pass", () => {
  const r = make({ mtu: 1000 });
  postRx(r, 0, 8);
  const got = deliver(r, 0, [ethernet(MAC, { length: 1014 }), ethernet(MAC, { length: 1015 }), ethernet(MAC, { length: 1018, vlan: 5 }), ethernet(MAC, { length: 1019, vlan: 5 })]);
  assert.deepEqual(got.map((f) => f.length), [1014, 1018]);
  assert.equal(r.dev.net.counters.rxFiltered, 2);
});

test("saved state: a restored device keeps the filter, address, queue pairs and receive offloads, and asks the guest to announce itself", () => {
  const r = make({ pairs: 2, want: BASE | CONTROL | bits(F.mq) });
  assert.equal(command(r, CTRL.rx, 0, [0]), CTRL.ok);
  assert.equal(command(r, CTRL.mac, CTRL.macAddrSet, [...OTHER]), CTRL.ok);
  assert.equal(command(r, CTRL.mac, CTRL.macTableSet, macTable([SRC], [MCAST])), CTRL.ok);
  assert.equal(command(r, CTRL.vlan, CTRL.vlanAdd, le16(42)), CTRL.ok);
  assert.equal(command(r, CTRL.mq, CTRL.mqVqPairsSet, le16(2)), CTRL.ok);
  const saved = r.dev.save();
  // A second device over the same RAM and ports, as after a restore.
  const dev2 = createVirtioNet("vnet0", r.ports, r.services, { mac: MAC, queueSize: 64 });
  placeDevice(dev2);
  for (const p of r.ports) p.enabled = undefined;
  dev2.restore(saved);
  assert.deepEqual(dev2.net.filter.save(), r.dev.net.filter.save());
  assert.equal(dev2.net.queuePairs.active, 2);
  assert.deepEqual(r.ports.map((p) => p.enabled), [true, true]);
  assert.equal(dev2.barRead(0, 0x2000 + K.status, 2), 1 | VIRTIO_NET_S_ANNOUNCE, "announce asked for");
  assert.deepEqual(Array.from({ length: 6 }, (_, i) => dev2.barRead(0, 0x2000 + K.mac + i, 1)), [...OTHER]);
  // Shapes that do not fit are refused.
  const small = createVirtioNet("small", r.ports[0], makeServices(1 << 20), { mac: MAC });
  placeDevice(small);
  assert.throws(() => small.net.restore({ ...(saved.backend as object), kind: "virtio-net", version: 2, queuePairs: 2 } as SavedDeviceState), /queue pairs/);
  assert.throws(() => small.net.restore({ kind: "virtio-net", version: 1 }), /virtio-net v2/);
});

test("saved state: the restored filter is in force before the first frame the restored device receives; corrupt states are refused and change nothing", () => {
  const r = make();
  assert.equal(command(r, CTRL.rx, 0, [0]), CTRL.ok, "promiscuous off: the device's own address and broadcast only");
  postRx(r, 0, 4);
  const saved = r.dev.save();
  // Frames arrive on the port while the VM is being restored.
  assert.equal(r.wires[0]!.send(ethernet(OTHER, { seed: 1 })), true);
  assert.equal(r.wires[0]!.send(ethernet(MAC, { seed: 2 })), true);
  const dev2 = createVirtioNet("vnet0", r.ports[0], r.services, { mac: MAC, queueSize: 64 });
  placeDevice(dev2);
  dev2.restore(saved);
  const got = received(r, 0);
  assert.equal(got.length, 1, "the frame to another address was filtered, not delivered");
  assert.deepEqual([...got[0]!.subarray(0, 6)], [...MAC]);
  assert.equal(dev2.net.counters.rxFiltered, 1);
  // Corrupt or hostile saved states.
  const before = JSON.stringify(dev2.net.filter.save());
  const b = saved.backend as unknown as Record<string, unknown>;
  const f = b.filter as Record<string, unknown>;
  const corrupt: Record<string, unknown>[] = [
    { ...b, mac: undefined },
    { ...b, mac: [1, 2, 3, 4, 5, 256] },
    { ...b, filter: null },
    { ...b, filter: { ...f, vlans: undefined } },
    { ...b, filter: { ...f, vlans: [4096] } },
    { ...b, filter: { ...f, unicast: [1, 2, 3, 4, 5, "6"] } },
    { ...b, filter: { ...f, multicast: Array(6 * (MAC_TABLE_ENTRIES + 1)).fill(1) } },
    { ...b, filter: { ...f, promiscuous: "yes" } },
    { ...b, guestOffloads: "all" },
    { ...b, announcing: 1 },
  ];
  for (const c of corrupt) {
    assert.throws(() => dev2.net.restore(c as unknown as SavedDeviceState), (e: Error) => e.name === "PciDeviceError" && /saved/.test(e.message), JSON.stringify(c).slice(0, 80));
    assert.equal(JSON.stringify(dev2.net.filter.save()), before, "nothing changed");
  }
});
