import { test } from "node:test";
import assert from "node:assert/strict";
import { Ne2kPci, ethernetCrc } from "../../../src/devices/net/ne2k-pci.js";
import { MAX_PORT_FRAME_BYTES, MemoryPortPair } from "../../../src/devices/net/network-port.js";
import { DeviceRestoreError } from "../../../src/devices/emulated/saved-state.js";
import { fakeServices } from "./net-fakes.js";
import { RecordingPostedWritePorts } from "../device-fakes.js";
import * as D from "./ne2k-driver.js";

const MAC = Uint8Array.from([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const OTHER = Uint8Array.from([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
const BROADCAST = Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);

function make(opts: { policy?: "hold" | "drop"; capacity?: number; rate?: number; clock?: () => number } = {}) {
  const services = fakeServices();
  const pair = new MemoryPortPair("ne2k", opts.capacity ?? 256);
  const limit = opts.rate === undefined ? {} : { rateBytesPerSecond: opts.rate, ...(opts.clock !== undefined ? { clock: opts.clock } : {}) };
  const nic = new Ne2kPci("ne2k0", services, pair.a, { mac: MAC, rxFullPolicy: opts.policy ?? "hold", ...limit });
  nic.pci.assignBar(0, 0xc000);
  nic.pci.enableDecoding();
  const drv = new D.Ne2kDriver(nic);
  /** The host side of the cable. */
  const wire = pair.b;
  const deliver = (): void => services.loop.drain(pair.a.fd, () => pair.a.pending > 0);
  return { services, pair, nic, drv, wire, deliver };
}

function ethFrame(dst: Uint8Array, src: Uint8Array, len: number, seed: number): Uint8Array {
  const f = new Uint8Array(len);
  f.set(dst, 0);
  f.set(src, 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  for (let i = 14; i < len; i++) f[i] = (i * 7 + seed * 13) & 0xff;
  return f;
}

function wireFrames(wire: { receive(b: Uint8Array): number }): Uint8Array[] {
  const out: Uint8Array[] = [];
  const buf = new Uint8Array(MAX_PORT_FRAME_BYTES);
  for (let n; (n = wire.receive(buf)) > 0; ) out.push(buf.slice(0, n));
  return out;
}

test("PCI identity: RTL8029 10ec:8029, Ethernet class, 32-byte I/O BAR0, INTA", () => {
  const { nic } = make();
  const c = nic.pci;
  assert.equal(c.configRead(0, 2), 0x10ec);
  assert.equal(c.configRead(2, 2), 0x8029);
  assert.equal(c.configRead(0x08, 4) >>> 8, 0x020000);
  assert.equal(c.configRead(0x3d, 1), 1);
  c.configWrite(0x10, 4, 0xffff_ffff);
  assert.equal(c.configRead(0x10, 4), 0xffe1, "I/O BAR sized 32 bytes");
  c.configWrite(0x10, 4, 0xc000);
  assert.equal(c.mappedAddress(0), 0xc000);
});

test("probe as ne2k-pci does: reset acknowledged, PROM read in word mode gives the MAC, RTL8029 ID", () => {
  const { drv, nic } = make();
  assert.equal(drv.probe(), true);
  assert.deepEqual([...drv.mac], [...MAC]);
  assert.equal(drv.prom[14], 0x57);
  assert.equal(drv.prom[15], 0x57);
  drv.outb(D.NODMA, D.CMD);
  assert.equal(drv.inb(0x0a), 0x50);
  assert.equal(drv.inb(0x0b), 0x43);
  // Byte mode shows the doubled PROM.
  drv.outb(0x48, D.DCR);
  drv.outb(12, D.RBCR0);
  drv.outb(0, D.RBCR1);
  drv.outb(0, D.RSAR0);
  drv.outb(0, D.RSAR1);
  drv.outb(D.RREAD + D.START, D.CMD);
  const bytes = Array.from({ length: 12 }, () => drv.inb(D.DATA));
  assert.deepEqual(bytes, [0x52, 0x52, 0x54, 0x54, 0x00, 0x00, 0x12, 0x12, 0x34, 0x34, 0x56, 0x56]);
  assert.ok((drv.inb(D.ISR) & D.ISR_RDC) !== 0, "count reached zero: remote DMA complete");
  // Stopped after probe: the reset bit shows, no interrupt.
  drv.init(false);
  assert.equal(drv.inb(D.CMD) & 0x03, D.STOP);
  assert.ok((drv.inb(D.ISR) & D.ISR_RESET) !== 0);
  void nic;
});

test("reset port: a read stops the NIC, sets ISR.RST and masks interrupts", () => {
  const { drv, services } = make();
  drv.probe();
  drv.open();
  assert.equal(drv.inb(D.CMD) & 0x03, D.START);
  assert.equal(drv.inb(D.ISR) & D.ISR_RESET, 0);
  drv.inb(D.RESET);
  assert.equal(drv.inb(D.CMD), 0x21);
  assert.equal(drv.inb(D.ISR), D.ISR_RESET);
  drv.outb(D.NODMA + D.PAGE2, D.CMD);
  assert.equal(drv.inb(0x0f), 0, "IMR cleared");
  assert.equal(services.intx.level, false);
});

test("page registers: PAR/CURR/MAR on page 1, PSTART/PSTOP/TPSR/RCR/TCR/DCR/IMR read back on page 2", () => {
  const { drv } = make();
  drv.probe();
  drv.open();
  drv.outb(D.NODMA + D.PAGE1, D.CMD);
  assert.deepEqual(Array.from({ length: 6 }, (_, i) => drv.inb(1 + i)), [...MAC]);
  assert.equal(drv.inb(D.CURR), D.RX_START);
  drv.outb(0xa5, 0x0b);
  assert.equal(drv.inb(0x0b), 0xa5);
  drv.outb(D.NODMA + D.PAGE2, D.CMD);
  assert.equal(drv.inb(0x01), D.RX_START);
  assert.equal(drv.inb(0x02), D.RX_STOP);
  assert.equal(drv.inb(0x04), D.TX_START);
  assert.equal(drv.inb(0x0c), 0x04);
  assert.equal(drv.inb(0x0d), 0x00);
  assert.equal(drv.inb(0x0e), 0x49);
  assert.equal(drv.inb(0x0f), D.ISR_ALL);
  // A 16-bit register access is split into bytes.
  drv.outb(D.NODMA, D.CMD);
  drv.nic.barWrite(0, D.RSAR0, 2, 0x4321);
  assert.equal(drv.nic.barRead(0, D.RSAR0, 2), 0x4321);
});

test("transmit: the frame goes to the port through remote DMA writes (32/16-bit), PTX raises the interrupt", () => {
  const { drv, wire, services } = make();
  drv.probe();
  drv.open();
  const f = ethFrame(OTHER, MAC, 98, 1);
  assert.equal(drv.transmit(f), true);
  const sent = wireFrames(wire);
  assert.equal(sent.length, 1);
  assert.deepEqual([...sent[0]!], [...f]);
  assert.equal(services.intx.level, true);
  assert.equal(drv.inb(D.ISR) & D.ISR_TX, D.ISR_TX);
  drv.interrupt();
  assert.equal(services.intx.level, false);
  assert.equal(drv.stats.txPackets, 1);
  // Odd and short frames: padded to 60 by the driver, odd count rounded up.
  drv.transmit(ethFrame(OTHER, MAC, 41, 2));
  drv.interrupt();
  drv.transmit(ethFrame(OTHER, MAC, 1513, 3));
  drv.interrupt();
  const more = wireFrames(wire);
  assert.deepEqual(more.map((x) => x.length), [60, 1513]);
  assert.deepEqual([...more[1]!], [...ethFrame(OTHER, MAC, 1513, 3)]);
  assert.equal(drv.stats.txPackets, 3);
});

test("transmit: ping-pong buffers, the second queued while the first is on the wire", () => {
  const { drv, wire } = make();
  drv.probe();
  drv.open();
  // Leave the TX interrupt unserviced between the two.
  drv.transmit(ethFrame(OTHER, MAC, 200, 1));
  assert.equal(drv.transmit(ethFrame(OTHER, MAC, 300, 2)), true);
  drv.interrupt();
  drv.interrupt();
  assert.deepEqual(wireFrames(wire).map((x) => x.length), [200, 300]);
  assert.equal(drv.stats.txPackets, 2);
});

test("transmit errors and loopback: zero length aborts (TXE); loopback mode keeps frames off the wire", () => {
  const { drv, wire, nic } = make();
  drv.probe();
  drv.open();
  drv.outb(0, D.TBCR0);
  drv.outb(0, D.TBCR1);
  drv.outb(D.NODMA + D.TRANS + D.START, D.CMD);
  assert.ok((drv.inb(D.ISR) & D.ISR_TX_ERR) !== 0);
  assert.equal(drv.inb(D.TSR) & 0x08, 0x08);
  drv.outb(0xff, D.ISR);
  drv.outb(0x02, D.TCR);
  drv.triggerSend(60, D.TX_START);
  assert.equal(wireFrames(wire).length, 0);
  assert.equal(nic.stats.txLoopback, 1);
  assert.ok((drv.inb(D.ISR) & D.ISR_TX) !== 0);
  // Transmit while stopped does nothing.
  drv.outb(0xff, D.ISR);
  drv.outb(0, D.TCR);
  drv.outb(D.NODMA + D.STOP, D.CMD);
  drv.outb(D.NODMA + D.TRANS + D.STOP, D.CMD);
  assert.equal(drv.inb(D.ISR) & D.ISR_TX, 0);
});

test("receive: unicast to our MAC and broadcast reach the driver intact; short frames are padded to 60", () => {
  const { drv, wire, deliver, services } = make();
  drv.probe();
  drv.open();
  const a = ethFrame(MAC, OTHER, 1514, 1);
  const b = ethFrame(BROADCAST, OTHER, 42, 2);
  wire.send(a);
  wire.send(b);
  deliver();
  assert.equal(services.intx.level, true);
  drv.interrupt();
  assert.equal(services.intx.level, false);
  assert.equal(drv.received.length, 2);
  assert.deepEqual([...drv.received[0]!], [...a]);
  const padded = new Uint8Array(60);
  padded.set(b);
  assert.deepEqual([...drv.received[1]!], [...padded]);
  assert.equal(drv.stats.rxErrors, 0);
  assert.equal(drv.stats.mismatches, 0);
});

test("receive filter: other unicast dropped; promiscuous accepts; multicast by the hash table", () => {
  const { drv, wire, deliver, nic } = make();
  drv.probe();
  drv.open();
  wire.send(ethFrame(OTHER, MAC, 100, 1));
  deliver();
  assert.equal(drv.interrupt(), 0);
  assert.equal(nic.stats.rxFiltered, 1);
  const group = Uint8Array.from([0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]);
  const other = Uint8Array.from([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]);
  // Join the group: the bit its CRC's top six bits select (lib8390 make_mc_bits).
  const crc = ethernetCrc(group);
  drv.mcfilter[crc >>> 29] = drv.mcfilter[crc >>> 29]! | (1 << ((crc >>> 26) & 7));
  drv.rxConfig = 0x04 | 0x08;
  drv.setMulticast();
  const otherBit = ethernetCrc(other) >>> 26;
  assert.notEqual(otherBit, crc >>> 26, "the two groups hash to different bits");
  wire.send(ethFrame(group, OTHER, 80, 2));
  wire.send(ethFrame(other, OTHER, 80, 3));
  deliver();
  drv.interrupt();
  assert.equal(drv.received.length, 1);
  assert.deepEqual([...drv.received[0]!.subarray(0, 6)], [...group]);
  // Promiscuous (IFF_PROMISC: RCR 0x1c, all-ones table).
  drv.mcfilter.fill(0xff);
  drv.rxConfig = 0x04 | 0x18;
  drv.setMulticast();
  wire.send(ethFrame(OTHER, MAC, 70, 4));
  wire.send(ethFrame(other, OTHER, 70, 5));
  deliver();
  drv.interrupt();
  assert.equal(drv.received.length, 3);
  // Broadcast off: not accepted.
  drv.rxConfig = 0;
  drv.setMulticast();
  wire.send(ethFrame(BROADCAST, OTHER, 70, 6));
  deliver();
  drv.interrupt();
  assert.equal(drv.received.length, 3);
});

test("ethernetCrc matches the Ethernet CRC-32 (reflected 0xEDB88320) bit-reversed, uninverted", () => {
  // Reference: the usual reflected CRC-32 (as zlib, before final inversion) is the bit reverse of the MSB-first register.
  const addr = Uint8Array.from([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]);
  let r = 0xffff_ffff;
  for (const b of addr) {
    r ^= b;
    for (let i = 0; i < 8; i++) r = r & 1 ? (r >>> 1) ^ 0xedb8_8320 : r >>> 1;
  }
  let rev = 0;
  for (let i = 0; i < 32; i++) rev = (rev << 1) | ((r >>> i) & 1);
  assert.equal(ethernetCrc(addr), rev >>> 0);
});

test("ring wrap: frames of many sizes go round the ring several times and arrive intact", () => {
  const { drv, wire, deliver } = make();
  drv.probe();
  drv.open();
  const sent: Uint8Array[] = [];
  for (let i = 0; i < 300; i++) {
    const f = ethFrame(MAC, OTHER, 60 + ((i * 397) % 1455), i);
    sent.push(f);
    wire.send(f);
    if (i % 5 === 4) {
      deliver();
      drv.interrupt();
    }
  }
  deliver();
  while (drv.interrupt() > 0);
  assert.equal(drv.received.length, sent.length);
  for (let i = 0; i < sent.length; i++) assert.deepEqual([...drv.received[i]!], [...sent[i]!], `frame ${i}`);
  assert.equal(drv.stats.rxErrors, 0);
  assert.equal(drv.stats.mismatches, 0);
});

test("frames taken one per interrupt go round the ring and on: lib8390's BNRY of PSTART - 1, after a frame that ends at PSTOP, is one page behind PSTART", () => {
  const { drv, wire, deliver, nic } = make();
  drv.probe();
  drv.open();
  // 98-byte frames take one page each: frame 52 ends at PSTOP, and the driver then writes BNRY = PSTART - 1.
  const sent: Uint8Array[] = [];
  for (let i = 0; i < 130; i++) {
    const f = ethFrame(MAC, OTHER, 98, i);
    sent.push(f);
    wire.send(f);
    deliver();
    drv.interrupt();
  }
  assert.equal(drv.received.length, sent.length, JSON.stringify(nic.stats));
  drv.received.forEach((f, i) => assert.deepEqual([...f], [...sent[i]!], `frame ${i}`));
  assert.equal(nic.stats.rxDropped, 0);
  assert.equal(nic.stats.stops, 1, "stopped once, by open()");
  assert.equal(drv.stats.rxOverErrors, 0);
  // Full-size frames too (six pages: the ring of 52 ends on a frame boundary every 26 frames).
  for (let i = 0; i < 60; i++) {
    wire.send(ethFrame(MAC, OTHER, 1514, i));
    deliver();
    drv.interrupt();
  }
  assert.equal(drv.received.length, sent.length + 60);
  assert.equal(nic.stats.rxDropped, 0);
});

test("lengths at page boundaries agree with lib8390's next-page check", () => {
  const { drv, wire, deliver } = make();
  drv.probe();
  drv.open();
  const lens = [244, 247, 248, 249, 250, 251, 252, 253, 255, 256, 500, 504, 505, 508, 1016, 1500, 1514, 1518];
  for (const len of lens) {
    wire.send(ethFrame(MAC, OTHER, len, len));
    deliver();
    drv.interrupt();
  }
  assert.deepEqual(drv.received.map((f) => f.length), lens);
  assert.equal(drv.stats.rxErrors, 0);
  // Longer than 1518: dropped by the receiver.
  wire.send(ethFrame(MAC, OTHER, 1519, 0));
  deliver();
  assert.equal(drv.interrupt(), 0);
});

test("a frame that arrives after ei_receive last read CURR, before it acknowledges PRX, is not left in the ring without an interrupt", () => {
  const { drv, wire, deliver, nic, services } = make();
  drv.probe();
  drv.open();
  const a = ethFrame(MAC, OTHER, 98, 1);
  const b = ethFrame(MAC, OTHER, 98, 2);
  wire.send(a);
  deliver();
  let injected = false;
  drv.beforeReceiveAck = () => {
    if (injected) return;
    injected = true;
    wire.send(b); // the reply that came while the guest was finishing the previous frame
    deliver();
  };
  drv.interrupt();
  // PRX stayed up through the acknowledgement, so ei_interrupt's loop went round again and took the frame.
  assert.equal(drv.received.length, 2);
  assert.deepEqual([...drv.received[1]!], [...b]);
  assert.equal(nic.stats.rxAckRaces, 1);
  assert.equal(services.intx.level, false);
  assert.equal(drv.inb(D.ISR) & D.ISR_RX, 0);

  // A driver that reads ISR and acknowledges before it reads the ring (FreeBSD's ed): no extra interrupt.
  drv.beforeReceiveAck = undefined;
  wire.send(ethFrame(MAC, OTHER, 98, 3));
  deliver();
  assert.equal(services.intx.level, true);
  assert.equal(drv.inb(D.ISR) & D.ISR_RX, D.ISR_RX);
  drv.outb(D.ISR_RX, D.ISR);
  assert.equal(drv.inb(D.ISR) & D.ISR_RX, 0);
  assert.equal(services.intx.level, false);
  assert.equal(nic.stats.rxAckRaces, 1);
  drv.receive();
  assert.equal(drv.received.length, 3);

  // An acknowledgement from a driver that has not looked since the frame came leaves PRX up.
  wire.send(ethFrame(MAC, OTHER, 98, 4));
  deliver();
  drv.outb(D.ISR_RX, D.ISR);
  assert.equal(services.intx.level, true);
  assert.equal(nic.stats.rxAckRaces, 2);
  drv.interrupt();
  assert.equal(drv.received.length, 4);
  assert.equal(services.intx.level, false);
});

test("ring full, policy hold: the receive path pauses, nothing is lost, delivery resumes when BNRY moves", () => {
  const { drv, wire, deliver, nic, pair, services } = make({ policy: "hold" });
  drv.probe();
  drv.open();
  const sent: Uint8Array[] = [];
  for (let i = 0; i < 80; i++) {
    const f = ethFrame(MAC, OTHER, 1000, i);
    sent.push(f);
    wire.send(f);
  }
  deliver();
  assert.ok(nic.stats.rxHeld >= 1);
  assert.ok(pair.a.pending > 0, "frames wait in the port");
  assert.equal(services.loop.watching(pair.a.fd), 0, "not watching while held");
  assert.equal(drv.inb(D.ISR) & D.ISR_OVER, 0, "no overrun reported");
  // A driver that has looked (ISR read) and acknowledges PRX while a frame waits for room: PRX stays, for the
  // ring is still full of frames it has to take.
  assert.equal(drv.inb(D.ISR) & D.ISR_RX, D.ISR_RX);
  drv.outb(D.ISR_RX, D.ISR);
  assert.equal(services.intx.level, true, "PRX stays while a frame is held for room");
  // The driver runs only when the line is up (as the guest's interrupt handler does).
  for (let round = 0; round < 100 && services.intx.level; round++) {
    drv.interrupt();
    deliver();
  }
  assert.equal(drv.received.length, sent.length);
  for (let i = 0; i < sent.length; i++) assert.deepEqual([...drv.received[i]!], [...sent[i]!]);
  assert.equal(services.loop.watching(pair.a.fd), 1);
  assert.equal(drv.stats.rxOverErrors, 0);
});

test("ring full, policy drop: OVW and the missed-packet tally; lib8390's overrun recovery restarts reception", () => {
  const { drv, wire, deliver, nic } = make({ policy: "drop" });
  drv.probe();
  drv.open();
  for (let i = 0; i < 60; i++) wire.send(ethFrame(MAC, OTHER, 1000, i));
  deliver();
  assert.ok((drv.inb(D.ISR) & D.ISR_OVER) !== 0);
  assert.ok(nic.stats.rxDropped > 0);
  const fit = nic.stats.rxFrames;
  drv.outb(D.NODMA, D.CMD);
  const missed = drv.inb(D.CNTR2);
  assert.equal(missed, 60 - fit);
  assert.equal(drv.inb(D.CNTR2), 0, "tally cleared by reading");
  drv.interrupt();
  assert.equal(drv.stats.rxOverErrors, 1);
  // ei_receive takes at most 9 frames per call: the rest wait for the next receive interrupt.
  assert.equal(drv.received.length, Math.min(fit, 9));
  assert.equal(drv.inb(D.ISR), 0);
  // Reception works again.
  wire.send(ethFrame(MAC, OTHER, 300, 99));
  deliver();
  drv.interrupt();
  assert.equal(drv.received.length, fit + 1);
  assert.equal(drv.received[fit]!.length, 300);
  assert.equal(drv.stats.rxErrors, 0);
});

test("missed-packet tally reaching 128 raises the counter interrupt; reading clears it", () => {
  const { drv, wire, deliver, services } = make({ policy: "drop", capacity: 512 });
  drv.probe();
  drv.open();
  drv.outb(0, D.IMR);
  for (let i = 0; i < 250; i++) wire.send(ethFrame(MAC, OTHER, 1400, i));
  deliver();
  drv.outb(D.NODMA, D.CMD);
  assert.ok((drv.inb(D.ISR) & D.ISR_COUNTERS) !== 0);
  drv.outb(D.ISR_COUNTERS, D.IMR);
  assert.equal(services.intx.level, true);
  assert.equal(drv.inb(D.CNTR2), 192, "saturates at 192");
  assert.equal(drv.inb(D.ISR) & D.ISR_COUNTERS, 0);
  assert.equal(services.intx.level, false);
});

test("receiver stopped or in monitor mode: frames are drained from the port and dropped", () => {
  const { drv, wire, deliver, nic, pair } = make();
  drv.probe(); // stopped after probe
  wire.send(ethFrame(MAC, OTHER, 100, 1));
  deliver();
  assert.equal(pair.a.pending, 0);
  assert.equal(nic.stats.rxDropped, 1);
  drv.open();
  drv.outb(0x20, D.RCR); // monitor
  wire.send(ethFrame(MAC, OTHER, 100, 2));
  deliver();
  assert.equal(nic.stats.rxDropped, 2);
  assert.equal(drv.interrupt(), 0);
});

test("INTx: level follows ISR & IMR; the PCI interrupt-disable bit holds the line low; status bit mirrors pending", () => {
  const { drv, wire, deliver, services, nic } = make();
  drv.probe();
  drv.open();
  wire.send(ethFrame(MAC, OTHER, 100, 1));
  deliver();
  assert.equal(services.intx.level, true);
  assert.ok((nic.pci.configRead(0x06, 2) & 0x08) !== 0);
  nic.pci.configWrite(0x04, 2, nic.pci.command | 0x400);
  assert.equal(services.intx.level, false);
  assert.ok((nic.pci.configRead(0x06, 2) & 0x08) !== 0, "still pending");
  nic.pci.configWrite(0x04, 2, nic.pci.command & ~0x400);
  assert.equal(services.intx.level, true);
  drv.outb(0, D.IMR);
  assert.equal(services.intx.level, false);
  drv.outb(D.ISR_ALL, D.IMR);
  drv.interrupt();
  assert.equal(services.intx.level, false);
});

test("no port (cable unplugged): transmit completes, nothing received", () => {
  const services = fakeServices();
  const nic = new Ne2kPci("ne2k1", services, undefined, { mac: MAC });
  const drv = new D.Ne2kDriver(nic);
  drv.probe();
  drv.open();
  drv.transmit(ethFrame(OTHER, MAC, 60, 1));
  drv.interrupt();
  assert.equal(drv.stats.txPackets, 1);
  assert.equal(nic.stats.txDroppedByPort, 1);
  assert.equal(services.loop.watches.length, 0);
});

test("save/restore: a second NIC continues where the first stopped; bad states are rejected", () => {
  const { drv, wire, deliver } = make();
  drv.probe();
  drv.open();
  wire.send(ethFrame(MAC, OTHER, 500, 1));
  deliver();
  const saved = drv.nic.save();
  assert.equal(saved.kind, "ne2k-pci");
  const copy = structuredClone(saved);
  const other = make();
  other.nic.restore(copy);
  assert.equal(other.services.intx.level, true, "pending interrupt re-asserted");
  const drv2 = new D.Ne2kDriver(other.nic);
  drv2.mac = drv.mac;
  drv2.currentPage = drv.currentPage;
  drv2.interrupt();
  assert.equal(drv2.received.length, 1);
  assert.deepEqual([...drv2.received[0]!], [...ethFrame(MAC, OTHER, 500, 1)]);
  assert.throws(() => other.nic.restore({ ...saved, kind: "uart" }), DeviceRestoreError);
  assert.throws(() => other.nic.restore({ ...saved, rsar: 0x10000 }), DeviceRestoreError);
  assert.throws(() => other.nic.restore({ ...saved, ram: [1, 2, 3] }), DeviceRestoreError);
  assert.throws(() => other.nic.restore({ ...saved, cr: 0x24 }), DeviceRestoreError);
});

const RATE = 0.1 * 1024 * 1024; // a bucket of a tenth of a second: 10,485 bytes

function limitedNic() {
  const clock = { ms: 1000 };
  const r = make({ rate: RATE, clock: () => clock.ms });
  const alarmFd = r.services.loop.watches.find((w) => w.fd !== r.pair.a.fd)!.fd;
  r.drv.probe();
  r.drv.open();
  return { ...r, clock, fireAlarm: () => r.services.loop.fire(alarmFd) };
}

test("rate limit: a transmit over it keeps TXP set (no frame, no PTX) until the alarm; receiving leaves frames in the port until then", () => {
  const { drv, wire, deliver, nic, pair, services, clock, fireAlarm } = limitedNic();
  // Seven full frames fit the bucket's 10,485 bytes (the seventh goes into debt); the eighth waits.
  for (let i = 0; i < 7; i++) {
    assert.equal(drv.transmit(ethFrame(OTHER, MAC, 1514, i)), true);
    drv.interrupt();
  }
  assert.equal(wireFrames(wire).length, 7);
  drv.transmit(ethFrame(OTHER, MAC, 1514, 7));
  assert.equal(drv.inb(D.CMD) & D.TRANS, D.TRANS, "TXP reads back set: the wire is busy");
  assert.equal(drv.inb(D.ISR) & D.ISR_TX, 0, "no PTX");
  assert.equal(wireFrames(wire).length, 0);
  assert.equal(nic.stats.throttled, 1);
  drv.outb(D.NODMA + D.START, D.CMD); // a page select or restart keeps TXP
  assert.equal(drv.inb(D.CMD) & D.TRANS, D.TRANS);
  fireAlarm(); // early: the debt is not paid
  assert.equal(wireFrames(wire).length, 0);
  clock.ms += 2; // 113 bytes of debt at 0.1 MiB/s: about 1.1 ms
  fireAlarm();
  assert.deepEqual([...wireFrames(wire)[0]!], [...ethFrame(OTHER, MAC, 1514, 7)], "the held frame goes at the alarm");
  assert.equal(drv.inb(D.CMD) & D.TRANS, 0);
  assert.equal(services.intx.level, true, "with PTX");
  drv.interrupt();
  assert.equal(drv.stats.txPackets, 8);

  // Receive: the bucket (full again after 100 ms) takes seven frames, the rest wait in the port, not dropped.
  clock.ms += 100;
  const sent = Array.from({ length: 10 }, (_, i) => ethFrame(MAC, OTHER, 1514, 20 + i));
  for (const f of sent) wire.send(f);
  deliver();
  assert.equal(nic.stats.rxFrames, 7);
  assert.equal(pair.a.pending, 3, "the rest wait in the port");
  assert.equal(services.loop.watching(pair.a.fd), 0, "which is not read until the alarm");
  drv.interrupt();
  clock.ms += 50;
  fireAlarm();
  assert.equal(services.loop.watching(pair.a.fd), 1);
  deliver();
  drv.interrupt();
  assert.equal(drv.received.length, 10);
  drv.received.forEach((f, i) => assert.deepEqual([...f], [...sent[i]!], `frame ${i}`));
  assert.equal(nic.stats.rxDropped, 0);
  nic.close();
});

test("rate limit: a stop abandons a held transmit (lib8390's overrun recovery sends it again); a save sends it first; a reset drops it", () => {
  const { drv, wire, nic, services, clock, fireAlarm } = limitedNic();
  const fill = (): void => {
    for (let i = 0; i < 7; i++) {
      drv.transmit(ethFrame(OTHER, MAC, 1514, i));
      drv.interrupt();
    }
    wireFrames(wire);
  };
  fill();
  drv.transmit(ethFrame(OTHER, MAC, 1514, 50));
  assert.equal(drv.inb(D.CMD) & D.TRANS, D.TRANS);
  drv.rxOverrun(); // stops the NIC: TXP gone without PTX, so it sends again (held again: still in debt)
  assert.equal(drv.inb(D.CMD) & D.TRANS, D.TRANS);
  clock.ms += 2;
  fireAlarm();
  assert.equal(wireFrames(wire).length, 1, "sent once");
  drv.interrupt();
  // A stop that is not followed by a new TXP: nothing goes at the alarm.
  clock.ms += 100;
  fill();
  drv.transmit(ethFrame(OTHER, MAC, 1514, 53));
  drv.outb(D.NODMA + D.STOP, D.CMD);
  assert.equal(drv.inb(D.CMD) & D.TRANS, 0, "stopped: TXP gone");
  clock.ms += 100;
  fireAlarm();
  assert.equal(wireFrames(wire).length, 0, "the abandoned frame stays off the wire");
  drv.probe(); // what the driver's transmit watchdog would do: start the card afresh
  drv.open();
  // A held transmit whose count the guest then breaks (TBCR 0xffff): it aborts at the alarm, and charges nothing.
  clock.ms += 100;
  fill();
  drv.transmit(ethFrame(OTHER, MAC, 1514, 54));
  drv.outb(0xff, D.TBCR0);
  drv.outb(0xff, D.TBCR1);
  clock.ms += 2;
  fireAlarm();
  assert.equal(drv.inb(D.ISR) & D.ISR_TX_ERR, D.ISR_TX_ERR, "aborted (TXE)");
  assert.equal(wireFrames(wire).length, 0);
  drv.probe();
  drv.open();
  const throttledBefore = nic.stats.throttled;
  drv.transmit(ethFrame(OTHER, MAC, 1514, 55));
  assert.equal(nic.stats.throttled, throttledBefore, "the next frame goes at once: the aborted one took no tokens");
  assert.equal(wireFrames(wire).length, 1);
  drv.interrupt();

  clock.ms += 100;
  fill();
  drv.transmit(ethFrame(OTHER, MAC, 1514, 51));
  const saved = nic.save();
  assert.equal(saved.cr & D.TRANS, 0, "a saved state has no TXP");
  assert.equal(wireFrames(wire).length, 1, "the save sent the held frame");
  const second = make({ rate: RATE, clock: () => clock.ms });
  second.nic.restore(saved);
  assert.equal(second.nic.save().tsr & 0x01, 0x01, "the restored NIC shows the transmit done (PTX)");
  second.nic.close();

  clock.ms += 100;
  fill();
  drv.transmit(ethFrame(OTHER, MAC, 1514, 52));
  drv.resetCard(); // the reset port: the chip stops, TPSR and TBCR as they were
  clock.ms += 100;
  fireAlarm();
  assert.equal(wireFrames(wire).length, 0, "a reset dropped it");
  assert.equal(services.intx.level, false);
  nic.close();
});

test("rate limit: below 0.1 MiB/s a NE2000 is refused (a held frame would outlast lib8390's 200 ms transmit watchdog)", () => {
  const services = fakeServices();
  assert.throws(() => new Ne2kPci("ne2k0", services, undefined, { mac: MAC, rateBytesPerSecond: 50_000 }), /at least/);
  assert.equal(services.loop.watches.length, 0);
});

test("board reset: registers and packet RAM cleared, stopped, line low", () => {
  const { drv, nic, services, wire, deliver } = make();
  drv.probe();
  drv.open();
  wire.send(ethFrame(MAC, OTHER, 500, 1));
  deliver();
  nic.reset();
  assert.equal(services.intx.level, false);
  assert.equal(nic.barRead(0, 0, 1), 0x21);
  const s = nic.save();
  assert.ok(s.ram.every((b) => b === 0));
  assert.equal(s.curr, 0);
  // Works again after a fresh probe.
  assert.equal(drv.probe(), true);
  drv.open();
  wire.send(ethFrame(MAC, OTHER, 64, 2));
  deliver();
  drv.interrupt();
  assert.equal(drv.received.at(-1)!.length, 64);
});

test("posted writes: the remote-DMA data port (BAR0 + 0x10-0x17) where BAR0 decodes now, not the registers; it follows a move of the BAR, goes with I/O decoding off and with a board reset", () => {
  const posted = new RecordingPostedWritePorts();
  const nic = new Ne2kPci("ne2k0", { ...fakeServices(), postedWrites: posted }, undefined, { mac: MAC });
  const ports = (): number[] => [...posted.ports].sort((a, b) => a - b);
  const range = (base: number): number[] => Array.from({ length: 8 }, (_, i) => base + 0x10 + i);
  nic.afterAccess();
  assert.deepEqual(ports(), [], "BAR0 not assigned: nothing posts");
  nic.pci.assignBar(0, 0xc000);
  nic.pci.enableDecoding();
  nic.afterAccess();
  assert.deepEqual(ports(), range(0xc000));
  nic.pci.configWrite(0x10, 4, 0xc101);
  nic.afterAccess();
  assert.deepEqual(ports(), range(0xc100), "the old ports are refused, the new accepted");
  nic.pci.configWrite(0x04, 2, 0);
  nic.afterAccess();
  assert.deepEqual(ports(), [], "I/O decoding off");
  nic.pci.configWrite(0x04, 2, 1);
  nic.afterAccess();
  assert.deepEqual(ports(), range(0xc100));
  nic.reset();
  assert.deepEqual(ports(), [], "a board reset unmaps BAR0");
});
