/**
 * Seeded fuzz of virtio-net: 100,000 steps of malformed ring states (random
 * descriptors, heads, avail indexes, flags, event indexes, buffers that leave
 * RAM), well-formed traffic in between, random frames from the port, kicks,
 * common-configuration writes and driver resets, with every feature mix. The
 * device must never throw or spin, and must report broken rings as
 * DEVICE_NEEDS_RESET. A second run offers packed virtqueues and drives them
 * the same way (random descriptors made available in the driver's lap, random
 * indirect tables, random event structures, traffic, resets).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { VIRTIO_COMMON as C, VIRTIO_F, VIRTIO_STATUS as S, featureBit } from "../../../src/devices/virtio/pci-transport.js";
import { MAX_PORT_FRAME_BYTES, MemoryPortPair } from "../../../src/devices/net/network-port.js";
import { VIRTIO_NET_F, VIRTIO_NET_HDR_BYTES as HDR, createVirtioNet } from "../../../src/devices/net/virtio-net.js";
import { PackedDriverQueue, TestVirtioDriver, makeServices, placeDevice, type DriverQueue } from "../virtio/virtio-driver.js";
import { SeededRandom } from "../device-fakes.js";

const RAM = 256 * 1024;
const BUF = 0x20000;
const STEPS = 100_000;
const MAC = Uint8Array.from([0x52, 0x54, 0, 0, 0, 1]);

/** A virtio-net on a memory port pair, its test driver, and the host side's events. */
/** Offload features a driver may ask for on a port that carries the header. */
const OFFLOAD_BITS = [VIRTIO_NET_F.csum, VIRTIO_NET_F.guestCsum, VIRTIO_NET_F.guestTso4, VIRTIO_NET_F.guestTso6, VIRTIO_NET_F.guestEcn, VIRTIO_NET_F.hostTso4, VIRTIO_NET_F.hostTso6, VIRTIO_NET_F.hostEcn];

/** Control-queue features a driver may ask for (MQ only with several pairs). */
const CONTROL_BITS = [VIRTIO_NET_F.ctrlRx, VIRTIO_NET_F.ctrlRxExtra, VIRTIO_NET_F.ctrlVlan, VIRTIO_NET_F.guestAnnounce, VIRTIO_NET_F.ctrlMacAddr, VIRTIO_NET_F.mq];

function fuzzBed(seed: number, name: string, ringPacked: boolean, vnetHeader = false, pairCount = 1) {
  const rnd = new SeededRandom(seed);
  const services = makeServices(RAM);
  const pairs = Array.from({ length: pairCount }, (_, i) => new MemoryPortPair(`${name}${i}`, 64, { vnetHeader }));
  const pair = pairs[0]!;
  const dev = createVirtioNet(name, pairCount === 1 ? pair.a : pairs.map((p) => p.a), services, { mac: MAC, queueSize: 16, ringPacked });
  placeDevice(dev);
  const sink = new Uint8Array(MAX_PORT_FRAME_BYTES);
  const frame = new Uint8Array(10_000);
  /** A header's flags and gso_type: mostly ones a driver or a TAP would write, sometimes garbage. */
  const headerStart = (into: Uint8Array, at: number): void => {
    into[at] = rnd.next() < 0.9 ? rnd.pick([0, 1, 2]) : rnd.int(256);
    into[at + 1] = rnd.next() < 0.9 ? rnd.pick([0, 1, 4, 0x81, 0x84]) : rnd.int(256);
  };
  const bed = {
    rnd,
    vnetHeader,
    /** Write a plausible-or-not transmit header at `gpa` (ports that carry the header). */
    txHeader(gpa: number): void {
      const h = new Uint8Array(2);
      headerStart(h, 0);
      services.memory.write(gpa, h);
    },
    services,
    pair,
    dev,
    drv: new TestVirtioDriver(dev, services),
    inits: 0,
    needsReset: 0,
    /** A fresh driver with a random feature mix (packed rings asked for at `packedChance`). */
    init(sizes: readonly number[], packedChance = 0): void {
      bed.drv = new TestVirtioDriver(dev, services);
      let want = featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_NET_F.mac) | featureBit(VIRTIO_NET_F.status);
      if (packedChance > 0 && rnd.next() < packedChance) want |= featureBit(VIRTIO_F.ringPacked);
      if (rnd.next() < 0.6) want |= featureBit(VIRTIO_NET_F.mrgRxbuf);
      if (rnd.next() < 0.5) want |= featureBit(VIRTIO_F.eventIdx);
      if (rnd.next() < 0.5) want |= featureBit(VIRTIO_F.indirectDesc);
      if (vnetHeader) for (const f of OFFLOAD_BITS) if (rnd.next() < 0.6) want |= featureBit(f);
      // The control queue (and what needs it, mostly with it: sometimes without, which FEATURES_OK refuses).
      if (pairCount > 1 && rnd.next() < 0.9) {
        want |= featureBit(VIRTIO_NET_F.ctrlVq);
        for (const f of CONTROL_BITS) if (rnd.next() < 0.7) want |= featureBit(f);
      } else if (pairCount > 1 && rnd.next() < 0.5) want |= featureBit(rnd.pick(CONTROL_BITS));
      bed.drv.init({ want, msix: rnd.next() < 0.7, queueSize: rnd.pick(sizes) });
      bed.inits++;
    },
    /** The host side: a random frame from the peer, the device's port readable, or the peer draining what it was sent. */
    hostEvent(kind: "frame" | "readable" | "drain"): void {
      const p = pairs[rnd.int(pairCount)]!;
      if (kind === "frame") {
        const len = rnd.next() < 0.05 ? rnd.int(10_000) : 14 + rnd.int(1600);
        if (len > 0) {
          for (let i = 0; i < Math.min(len, 32); i++) frame[i] = rnd.int(256);
          if (vnetHeader && len >= 2) headerStart(frame, 0);
          // Some frames to the device's own address, broadcast or 802.1Q tagged (what the filter looks at).
          const at = vnetHeader ? HDR : 0;
          const shape = rnd.next();
          if (len >= at + 18 && shape < 0.3) frame.set(MAC, at);
          else if (len >= at + 18 && shape < 0.4) frame.fill(0xff, at, at + 6);
          if (len >= at + 18 && rnd.next() < 0.2) frame.set([0x81, 0x00, rnd.int(16), rnd.int(256)], at + 12);
          p.b.send(frame.subarray(0, len));
        }
      } else if (kind === "readable") services.loop.fire(p.a.fd);
      else while (p.b.receive(sink) > 0);
    },
    /** Queues the fuzz drives: the first pair, or every queue of a multi-queue device. */
    queuesInPlay: pairCount === 1 ? 2 : 2 * pairCount + 1,
    /** The control queue's index for the current driver's features (-1: none). */
    controlQueue(): number {
      const f = bed.drv.features;
      if ((f & featureBit(VIRTIO_NET_F.ctrlVq)) === 0n) return -1;
      return (f & featureBit(VIRTIO_NET_F.mq)) !== 0n ? 2 * pairCount : 2;
    },
    /** A control command: mostly a real class and command with data of about the right size, its ack byte, sometimes garbage. */
    controlCommand(q: DriverQueue): void {
      const at = BUF + 0x1d000 + rnd.int(16) * 0x80;
      // Most commands as a driver sends them; the rest of random class, command and size.
      const sent = rnd.pick([
        [0, rnd.int(6), rnd.int(2)],
        [0, 0, 0],
        [1, 1, 0x52, 0x54, 0, 0, 0, rnd.next() < 0.5 ? 1 : rnd.int(256)],
        [2, rnd.int(2), rnd.int(256), rnd.int(16)],
        [3, 0],
        [4, 0, 1 + rnd.int(3), 0],
      ]);
      const wellFormed = rnd.next() < 0.6;
      const cls = wellFormed ? sent[0]! : rnd.next() < 0.9 ? rnd.int(6) : rnd.int(256);
      const cmd = wellFormed ? sent[1]! : rnd.next() < 0.9 ? rnd.int(3) : rnd.int(256);
      const size = wellFormed ? sent.length - 2 : rnd.pick([0, 1, 2, 6, 8, 8 + 6 * rnd.int(4), rnd.int(0x70)]);
      const data = new Uint8Array(2 + size);
      if (wellFormed) data.set(sent);
      else for (let i = 2; i < data.length; i++) data[i] = rnd.next() < 0.5 ? rnd.int(4) : rnd.int(256);
      data[0] = cls;
      data[1] = cmd;
      if (!wellFormed && cls === 1 && cmd === 0 && size >= 8) {
        // A MAC table with counts that add up (most of the time).
        const uni = rnd.int(Math.floor((size - 8) / 6) + 1);
        const multi = (size - 8) / 6 - uni;
        data.set([uni, 0, 0, 0], 2);
        if (Number.isInteger(multi) && multi >= 0) data.set([multi, 0, 0, 0], 2 + 4 + 6 * uni);
      }
      services.memory.write(at, data);
      const r = rnd.next();
      if (r < 0.9) q.add([{ addr: at, len: data.length, write: false }, { addr: at + 0x78, len: 1, write: true }]);
      else if (r < 0.95) q.add([{ addr: at, len: data.length, write: false }]);
      else q.add([{ addr: at + 0x78, len: 1 + rnd.int(8), write: true }]);
      // Linux kicks at once and waits for the answer.
      if (rnd.next() < 0.7) q.kick();
    },
    /** A stray common-configuration write (queue registers, status bits) from the current driver. */
    strayRegisterWrite(): void {
      const reg = rnd.pick([C.queueSelect, C.queueSize, C.queueEnable, C.deviceStatus, C.queueMsixVector, C.msixConfig]);
      if (reg === C.deviceStatus) bed.drv.w8(reg, rnd.int(256));
      else bed.drv.w16(reg, rnd.int(0x10000));
    },
    /** After a step: count a device that needs a reset, and sometimes give it a fresh driver. */
    afterStep(init: () => void): void {
      if ((bed.drv.status() & S.needsReset) === 0) return;
      bed.needsReset++;
      if (rnd.next() < 0.2) init();
    },
    /** What every run must show: broken rings reported, traffic in both directions. */
    assertOutcome(extra: Record<string, number> = {}): void {
      const c = dev.net.counters;
      if (process.env["VNET_FUZZ_VERBOSE"] !== undefined) console.log(JSON.stringify({ ...c, needsReset: bed.needsReset, inits: bed.inits, ...extra }));
      assert.ok(bed.needsReset > 0, "broken rings were reported");
      assert.ok(c.rxFrames > 100 && c.txFrames > 100, `traffic flowed: ${JSON.stringify(c)}`);
      for (const p of pairs) p.close();
    },
  };
  return bed;
}

/** 100,000 steps on split virtqueues: random and malformed descriptors, tables and indices, traffic, host frames, stray register writes. */
function splitRun(bed: ReturnType<typeof fuzzBed>): void {
  const { rnd, dev } = bed;
  const init = (): void => bed.init([1, 2, 4, 8, 16]);
  init();

  const randAddr = (): number => {
    const r = rnd.next();
    if (r < 0.7) return BUF + rnd.int(0x1f000);
    if (r < 0.85) return rnd.int(RAM + 0x1000);
    if (r < 0.95) return RAM - rnd.int(64);
    return rnd.int(2 ** 40);
  };
  const randLen = (): number => {
    const r = rnd.next();
    if (r < 0.6) return rnd.int(2048);
    if (r < 0.8) return rnd.int(16);
    if (r < 0.95) return rnd.int(70_000);
    return 0xffff_ffff - rnd.int(4);
  };

  for (let step = 0; step < STEPS; step++) {
    const drv = bed.drv;
    const q = drv.queues[rnd.int(Math.min(drv.queues.length, bed.queuesInPlay))];
    const r = rnd.next();
    if (q === undefined || r < 0.01) {
      init();
    } else if (r < 0.2) {
      // A random descriptor anywhere in the table (or past it through a bad next).
      q.writeDesc(q.desc, rnd.int(q.size), randAddr(), randLen(), rnd.int(8), rnd.int(q.size * 2 + 1));
    } else if (r < 0.3) {
      // A random head published, sometimes with a wild avail index.
      if (rnd.next() < 0.9) q.publish(rnd.int(q.size + 2));
      else {
        q.availIdx = rnd.int(0x10000);
        q.publish(rnd.int(q.size));
      }
    } else if (r < 0.34) {
      // Indirect table with random contents.
      const table = BUF + 0x1e000 + rnd.int(16) * 64;
      const n = 1 + rnd.int(4);
      for (let i = 0; i < n; i++) q.writeDesc(table, i, randAddr(), randLen(), rnd.int(8), rnd.int(6));
      q.writeDesc(q.desc, rnd.int(q.size), table, rnd.next() < 0.8 ? n * 16 : rnd.int(100), 4 | (rnd.next() < 0.1 ? 1 : 0), 0);
      q.publish(rnd.int(q.size));
    } else if (r < 0.5) {
      // Well-formed traffic: receive buffers on receive queues, frames to send on transmit queues, commands on the control queue.
      if (q.index === bed.controlQueue()) bed.controlCommand(q);
      else if (q.index % 2 === 0) q.add([{ addr: BUF + rnd.int(0x1c) * 0x800, len: rnd.pick([64, 256, 1526, 2048]), write: true }]);
      else {
        const at = BUF + rnd.int(0x1c) * 0x800;
        const len = HDR + rnd.int(1500);
        if (bed.vnetHeader) bed.txHeader(at);
        q.add([{ addr: at, len, write: false }]);
      }
    } else if (r < 0.62) {
      q.kick(rnd.next() < 0.3);
    } else if (r < 0.9) {
      bed.hostEvent(r < 0.75 ? "frame" : r < 0.87 ? "readable" : "drain");
    } else if (r < 0.93) {
      if (rnd.next() < 0.5) q.setUsedEvent(rnd.int(0x10000));
      else q.setAvailFlags(rnd.int(2));
    } else if (r < 0.96) {
      bed.strayRegisterWrite();
    } else if (r < 0.98) {
      drv.deviceConfig(rnd.int(12), rnd.pick([1, 2, 4] as const));
    } else {
      dev.pci.configWrite(0x04, 2, rnd.int(8));
    }
    bed.afterStep(init);
  }
}

test("fuzz: 100,000 malformed ring states, frames and resets", () => {
  const bed = fuzzBed(0x7e7_0001, "vnet-fuzz", false);
  splitRun(bed);
  bed.assertOutcome();
});

test("fuzz: 100,000 steps with offloads (a port that carries the header; random offload features; random headers both ways)", () => {
  const bed = fuzzBed(0x7e7_0003, "vnet-fuzz-offload", false, true);
  splitRun(bed);
  const c = bed.dev.net.counters;
  assert.ok(c.txOffloaded > 0 && c.rxOffloaded > 0, `offloaded frames went both ways: ${JSON.stringify(c)}`);
  assert.ok(c.txDropped > 0 && c.rxDropped > 0, "headers asking for offloads not negotiated were dropped");
  bed.assertOutcome();
});

test("fuzz: 100,000 steps with the control queue and three queue pairs (random commands, well-formed and not; pairs switched on and off; frames the filter looks at)", () => {
  const bed = fuzzBed(0x7e7_0004, "vnet-fuzz-mq", false, false, 3);
  splitRun(bed);
  const c = bed.dev.net.counters;
  assert.ok(c.controlOk > 100 && c.controlErr > 100, `commands answered both ways: ${JSON.stringify(c)}`);
  assert.ok(c.rxFiltered > 0, "the filter kept frames from the guest");
  assert.ok(bed.dev.net.queuePairs.frames.every((f) => f.rx > 0 && f.tx > 0), `every pair carried traffic: ${JSON.stringify(bed.dev.net.queuePairs.frames)}`);
  bed.assertOutcome();
});

test("fuzz: 100,000 steps on packed virtqueues (offered; taken at about two inits in three), frames and resets", () => {
  const bed = fuzzBed(0x7e7_0002, "vnet-fuzz-packed", true);
  const { rnd, dev } = bed;
  let packedInits = 0;
  const init = (): void => {
    bed.init([1, 2, 3, 4, 5, 8, 13, 16], 0.67);
    if (bed.drv.packed.length > 0) packedInits++;
  };
  init();
  const randAddr = (): number => (rnd.next() < 0.7 ? BUF + rnd.int(0x1f000) : rnd.next() < 0.5 ? rnd.int(RAM + 0x1000) : rnd.next() < 0.7 ? RAM - rnd.int(64) : rnd.int(2 ** 40));
  const randLen = (): number => (rnd.next() < 0.6 ? rnd.int(2048) : rnd.next() < 0.5 ? rnd.int(16) : rnd.next() < 0.9 ? rnd.int(70_000) : 0xffff_ffff - rnd.int(4));
  /** The device's positions as the driver's (garbage moves them apart). */
  const resync = (pq: PackedDriverQueue): void => {
    const st = dev.queues[pq.index]!.save();
    if (st.packed === undefined) return;
    pq.resync({ availPos: st.lastAvail, availWrap: st.packed.availWrap, usedPos: st.usedIdx, usedWrap: st.packed.usedWrap });
  };

  for (let step = 0; step < STEPS; step++) {
    const drv = bed.drv;
    const q = drv.packed[rnd.int(2)];
    const r = rnd.next();
    if (drv.packed.length === 0 || q === undefined || r < 0.01) {
      init();
    } else if (r < 0.2) {
      // A random descriptor at the driver's position (often made available in its lap) or anywhere in the ring.
      const at = rnd.next() < 0.7 ? q.nextAvail : rnd.int(q.size);
      const flags = rnd.int(8) | (rnd.next() < 0.6 ? PackedDriverQueue.availBits(q.availWrap) : rnd.int(2) << 7 | rnd.int(2) << 15);
      q.writeDesc(q.desc, at, randAddr(), randLen(), flags, rnd.int(0x10000));
    } else if (r < 0.3) {
      // Indirect table with random contents, made available at the driver's position.
      const table = BUF + 0x1e000 + rnd.int(16) * 64;
      const n = 1 + rnd.int(4);
      for (let i = 0; i < n; i++) q.writeDesc(table, i, randAddr(), randLen(), rnd.int(8), rnd.int(6));
      q.writeDesc(q.desc, q.nextAvail, table, rnd.next() < 0.8 ? n * 16 : rnd.int(100), 4 | (rnd.next() < 0.1 ? 1 : 0) | PackedDriverQueue.availBits(q.availWrap), rnd.int(q.size));
    } else if (r < 0.5) {
      // Well-formed traffic: receive buffers on queue 0, frames to send on queue 1.
      resync(q);
      if (q.index === 0) q.add([{ addr: BUF + rnd.int(0x1c) * 0x800, len: rnd.pick([64, 256, 1526, 2048]), write: true }]);
      else q.add([{ addr: BUF + rnd.int(0x1c) * 0x800, len: HDR + rnd.int(1500), write: false }]);
    } else if (r < 0.62) {
      q.kick(rnd.next() < 0.3);
      q.takeUsed();
    } else if (r < 0.9) {
      bed.hostEvent(r < 0.75 ? "frame" : r < 0.87 ? "readable" : "drain");
    } else if (r < 0.95) {
      q.setDriverEvent(rnd.int(4), rnd.int(0x8000), rnd.int(2));
    } else if (r < 0.98) {
      bed.strayRegisterWrite();
    } else {
      dev.pci.configWrite(0x04, 2, rnd.int(8));
    }
    bed.afterStep(init);
  }
  assert.ok(packedInits > bed.inits / 2, `packed rings at ${packedInits} of ${bed.inits} inits`);
  bed.assertOutcome({ packedInits });
});
