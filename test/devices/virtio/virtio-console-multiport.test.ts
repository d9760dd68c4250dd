/**
 * virtio-console with named ports (MULTIPORT, QEMU's virtio-serial): the
 * control handshake as Linux's virtio_console makes it, per-port streams,
 * the guest's open/close gating the host stream, host connects and hang-ups
 * announced, hostile control messages, saved state.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { featureBit, VIRTIO_STATUS as S } from "../../../src/devices/virtio/pci-transport.js";
import {
  VIRTIO_CONSOLE_BAD_ID as BAD_ID,
  VIRTIO_CONSOLE_CONFIG as K,
  VIRTIO_CONSOLE_EVENT as E,
  VIRTIO_CONSOLE_F,
  createVirtioConsole,
  type VirtioConsoleDevice,
} from "../../../src/devices/virtio/virtio-console.js";
import type { SavedDeviceState } from "../../../src/devices/dependencies.js";
import { TestVirtioDriver, makeServices, placeDevice, type TestServices } from "./virtio-driver.js";
import { FakeByteStream } from "./fake-byte-stream.js";

const MiB = 1 << 20;
const ALL = (1n << 64n) - 1n;
const NAMES = ["org.qemu.guest_agent.0", "partis.kvp"];

interface Rig {
  services: TestServices;
  dev: VirtioConsoleDevice;
  drv: TestVirtioDriver;
  /** Next free guest buffer address. */
  next: number;
}

function make(opts: { want?: bigint; names?: string[]; services?: TestServices } = {}): Rig {
  const services = opts.services ?? makeServices(MiB);
  const dev = createVirtioConsole("serial0", services, { ports: opts.names ?? NAMES, queueSize: 64 });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: opts.want ?? ALL }), true);
  return { services, dev, drv, next: 0x80000 };
}

function buffer(r: Rig, len: number): number {
  const at = r.next;
  r.next += Math.max(0x100, len + 0xff) & ~0xff;
  return at;
}

/** Post `n` control receive buffers of `len` bytes (Linux posts PAGE_SIZE ones). */
function postControl(r: Rig, n: number, len = 4096): void {
  const q = r.drv.queues[2]!;
  for (let i = 0; i < n; i++) q.add([{ addr: buffer(r, len), len, write: true }]);
  q.kick();
}

/** The driver's control message (control transmitq, queue 3). */
function tell(r: Rig, id: number, event: number, value: number, bytes = 8): void {
  const at = buffer(r, bytes);
  const m = new Uint8Array(8);
  const v = new DataView(m.buffer);
  v.setUint32(0, id, true);
  v.setUint16(4, event, true);
  v.setUint16(6, value, true);
  r.services.memory.write(at, m.subarray(0, Math.min(8, bytes)));
  const q = r.drv.queues[3]!;
  q.add([{ addr: at, len: bytes, write: false }]);
  q.kick();
  assert.deepEqual(q.takeUsed().map((u) => u.len), [0], "every control message is used");
}

interface Heard {
  id: number;
  event: number;
  value: number;
  name?: string;
}

/** The device's control messages since the last call, decoded from the control receive buffers. */
function heard(r: Rig): Heard[] {
  const q = r.drv.queues[2]!;
  const out: Heard[] = [];
  for (const u of q.takeUsed()) {
    // Descriptor u.id's address, from the driver's table.
    const d = r.services.memory.read(q.desc + u.id * 16, 16);
    const addr = new DataView(d.buffer, d.byteOffset).getUint32(0, true);
    if (u.len === 0) {
      out.push({ id: -1, event: -1, value: -1 });
      continue;
    }
    const m = r.services.memory.read(addr, u.len);
    const v = new DataView(m.buffer, m.byteOffset, u.len);
    const h: Heard = { id: v.getUint32(0, true), event: v.getUint16(4, true), value: v.getUint16(6, true) };
    if (h.event === E.portName) h.name = Buffer.from(m.subarray(8)).toString("latin1");
    out.push(h);
  }
  return out;
}

/** The whole handshake Linux makes, up to every port ready. */
function handshake(r: Rig): void {
  postControl(r, 16);
  tell(r, BAD_ID, E.deviceReady, 1);
  assert.deepEqual(heard(r), [
    { id: 1, event: E.deviceAdd, value: 0 },
    { id: 2, event: E.deviceAdd, value: 0 },
  ]);
  tell(r, 1, E.portReady, 1);
  tell(r, 2, E.portReady, 1);
}

function rxQueue(r: Rig, port: number) {
  return r.drv.queues[2 * port + 2]!;
}
function txQueue(r: Rig, port: number) {
  return r.drv.queues[2 * port + 3]!;
}

function send(r: Rig, port: number, text: string): void {
  const b = Buffer.from(text, "latin1");
  const at = buffer(r, b.length);
  r.services.memory.write(at, b);
  const q = txQueue(r, port);
  q.add([{ addr: at, len: b.length, write: false }]);
  q.kick();
}

function postRx(r: Rig, port: number, n: number, len = 64): number[] {
  const q = rxQueue(r, port);
  const at: number[] = [];
  for (let i = 0; i < n; i++) {
    const a = buffer(r, len);
    at.push(a);
    q.add([{ addr: a, len, write: true }]);
  }
  q.kick();
  return at;
}

test("virtio-serial: MULTIPORT offered with max_nr_ports = named ports + port 0, two queues per port plus the control pair", () => {
  const r = make();
  assert.ok((r.drv.offeredFeatures() & featureBit(VIRTIO_CONSOLE_F.multiport)) !== 0n);
  assert.equal(r.drv.deviceConfig(K.maxNrPorts, 4), 3);
  assert.equal(r.drv.r16(0x12), 8, "num_queues: ports 0-2 and the control queues");
  const single = createVirtioConsole("con0", makeServices(MiB));
  assert.equal(single.console.namedPorts, 0);
  assert.equal(single.backend.features & featureBit(VIRTIO_CONSOLE_F.multiport), 0n, "a console without named ports offers no MULTIPORT");
});

test("virtio-serial: bad port sets are refused when the device is made", () => {
  const services = makeServices(MiB);
  assert.throws(() => createVirtioConsole("s", services, { ports: ["a", "a"] }), /given twice/);
  assert.throws(() => createVirtioConsole("s", services, { ports: ["has space"] }), /not 1-127/);
  assert.throws(() => createVirtioConsole("s", services, { ports: [".hidden"] }), /not 1-127/);
  assert.throws(() => createVirtioConsole("s", services, { ports: ["x".repeat(128)] }), /not 1-127/);
  assert.throws(() => createVirtioConsole("s", services, { ports: Array.from({ length: 32 }, (_, i) => `p${i}`) }), /at most 31/);
});

test("virtio-serial: DEVICE_READY -> DEVICE_ADD per port; PORT_READY -> PORT_NAME, and PORT_OPEN(1) only for a port whose host side is connected", () => {
  const r = make();
  const s1 = new FakeByteStream(41);
  r.dev.connectPort(1, s1);
  assert.deepEqual(heard(r), [], "nothing said before the driver is ready");
  handshake(r);
  assert.deepEqual(heard(r), [
    { id: 1, event: E.portName, value: 1, name: "org.qemu.guest_agent.0" },
    { id: 1, event: E.portOpen, value: 1 },
    { id: 2, event: E.portName, value: 1, name: "partis.kvp" },
  ]);
  assert.ok(r.services.msi.count(3) > 0, "control receiveq vector (queue 2's, vector 3 as the test driver sets them)");
});

test("virtio-serial: host bytes wait in the stream until the guest opens the port; guest output reaches the port's own stream", () => {
  const r = make();
  const s1 = new FakeByteStream(41);
  const s2 = new FakeByteStream(42);
  r.dev.connectPort(1, s1);
  r.dev.connectPort(2, s2);
  handshake(r);
  heard(r);
  const at = postRx(r, 1, 2);
  s1.input.push(...Buffer.from("early"));
  r.services.loop.fire(41);
  assert.equal(rxQueue(r, 1).takeUsed().length, 0, "port 1 not open in the guest: nothing delivered");
  assert.equal(r.services.loop.active(41), 0, "and the stream is not polled");
  assert.equal(s1.input.length, 5, "the bytes wait in the stream");
  tell(r, 1, E.portOpen, 1);
  assert.equal(r.dev.console.guestOpen(1), true);
  assert.deepEqual(rxQueue(r, 1).takeUsed(), [{ id: 0, len: 5 }]);
  assert.equal(Buffer.from(r.services.memory.read(at[0]!, 5)).toString(), "early");
  assert.equal(r.services.loop.active(41), 1, "polled while open with a buffer left");
  s1.input.push(...Buffer.from("more"));
  r.services.loop.fire(41);
  assert.equal(rxQueue(r, 1).takeUsed()[0]!.len, 4);
  // Output per port.
  send(r, 1, "to-agent");
  send(r, 2, "to-kvp");
  assert.equal(s1.text(), "to-agent");
  assert.equal(s2.text(), "to-kvp");
  assert.equal(txQueue(r, 1).takeUsed().length, 1);
  // Port 2 is not open in the guest: its host bytes are not read.
  postRx(r, 2, 1);
  s2.input.push(65);
  r.services.loop.fire(42);
  assert.equal(rxQueue(r, 2).takeUsed().length, 0);
  // The guest closes port 1: polling stops, bytes wait again.
  tell(r, 1, E.portOpen, 0);
  assert.equal(r.services.loop.active(41), 0);
  s1.input.push(66);
  r.services.loop.fire(41);
  assert.equal(s1.input.length, 1);
});

test("virtio-serial: a host that connects or hangs up later is announced with PORT_OPEN(1/0)", () => {
  const r = make();
  handshake(r);
  assert.deepEqual(heard(r).map((h) => [h.id, h.event]), [
    [1, E.portName],
    [2, E.portName],
  ]);
  const s = new FakeByteStream(42);
  r.dev.connectPort(2, s);
  assert.deepEqual(heard(r), [{ id: 2, event: E.portOpen, value: 1 }]);
  tell(r, 2, E.portOpen, 1);
  postRx(r, 2, 1);
  s.closed = true;
  r.services.loop.fire(42);
  assert.deepEqual(heard(r), [{ id: 2, event: E.portOpen, value: 0 }], "the peer's hang-up, seen on a read");
  assert.equal(r.dev.console.counters.peerClosed, 1);
  r.dev.connectPort(2, new FakeByteStream(43));
  r.dev.connectPort(2, undefined);
  assert.deepEqual(heard(r).map((h) => h.value), [1, 0]);
});

test("virtio-serial: with no control buffers the device keeps what it has to say as bits (a DEVICE_READY storm does not grow it) and says it when buffers come", () => {
  const r = make();
  for (let i = 0; i < 50; i++) tell(r, BAD_ID, E.deviceReady, 1);
  r.dev.connectPort(1, new FakeByteStream(41)); // not ready yet: nothing to say about it
  assert.deepEqual(heard(r), []);
  postControl(r, 1);
  assert.deepEqual(heard(r), [{ id: 1, event: E.deviceAdd, value: 0 }]);
  postControl(r, 8);
  assert.deepEqual(heard(r), [{ id: 2, event: E.deviceAdd, value: 0 }], "each port added once");
  tell(r, 1, E.portReady, 1);
  assert.deepEqual(heard(r).map((h) => h.event), [E.portName, E.portOpen]);
});

test("virtio-serial: hostile control messages are counted and change nothing; a port that failed is told nothing; a control buffer too small for its message comes back empty", () => {
  const r = make();
  postControl(r, 2); // both taken by DEVICE_ADD
  tell(r, BAD_ID, E.deviceReady, 1);
  assert.equal(heard(r).length, 2);
  const c = r.dev.console.counters;
  tell(r, 1, E.portOpen, 1, 7); // short
  tell(r, 0, E.portOpen, 1); // port 0 is not a named port
  tell(r, 3, E.portReady, 1); // no port 3
  tell(r, 0x7fffffff, E.portOpen, 1);
  tell(r, 1, E.deviceAdd, 1); // a device's message, not a driver's
  tell(r, 1, E.portName, 1);
  tell(r, 1, 99, 1);
  assert.equal(c.controlBad, 7);
  assert.equal(r.dev.console.guestOpen(1), false);
  assert.equal(r.drv.status() & S.needsReset, 0);
  // Port 1 gets ready with no control buffer left (its name waits), then the driver says it failed after all.
  tell(r, 1, E.portReady, 1);
  tell(r, 1, E.portReady, 0);
  assert.equal(c.portsFailed, 1);
  postControl(r, 1);
  assert.deepEqual(heard(r), [], "a port that failed is told nothing, not even what was waiting for it");
  // Port 2's name goes into the spare buffer; then a buffer too small for a message (4 bytes for PORT_OPEN's 8).
  tell(r, 2, E.portReady, 1);
  assert.deepEqual(heard(r), [{ id: 2, event: E.portName, value: 1, name: "partis.kvp" }]);
  r.drv.queues[2]!.add([{ addr: buffer(r, 4), len: 4, write: true }]);
  r.dev.connectPort(2, new FakeByteStream(42));
  assert.deepEqual(heard(r), [{ id: -1, event: -1, value: -1 }]);
  assert.equal(c.controlDropped, 1);
});

test("virtio-serial: a driver without MULTIPORT sees port 0 only (a console with no host side); control queue notifications are ignored", () => {
  const r = make({ want: ALL & ~featureBit(VIRTIO_CONSOLE_F.multiport) });
  const s = new FakeByteStream(41);
  r.dev.connectPort(1, s);
  r.dev.barWrite(0, 0x3000, 2, 3); // notify queue 3 through the notify region: nothing to do
  r.drv.queues[0]!.add([{ addr: 0x90000, len: 8, write: true }]);
  r.drv.queues[0]!.kick();
  assert.equal(r.drv.queues[0]!.takeUsed().length, 0, "port 0 has no stream");
  assert.equal(r.dev.console.counters.controlBad, 0);
  assert.throws(() => r.dev.connectPort(0, s), /not a named port/);
  assert.throws(() => r.dev.connectPort(3, s), /no port 3/);
});

test("virtio-serial: reset forgets the guest's open ports and what was still to say; the handshake runs again", () => {
  const r = make();
  const s = new FakeByteStream(41);
  r.dev.connectPort(1, s);
  handshake(r);
  tell(r, 1, E.portOpen, 1);
  postRx(r, 1, 1);
  assert.equal(r.services.loop.active(41), 1);
  r.drv.reset();
  assert.equal(r.dev.console.guestOpen(1), false);
  assert.equal(r.services.loop.active(41), 0);
  assert.equal(r.drv.init({ want: ALL }), true);
  r.next = 0xa0000;
  handshake(r);
  assert.deepEqual(heard(r).map((h) => [h.id, h.event, h.value]), [
    [1, E.portName, 1],
    [1, E.portOpen, 1],
    [2, E.portName, 1],
  ]);
});

test("virtio-serial: saved state keeps which ports the guest has open and what it has still to be told; a restored device tells each known port's host state again", () => {
  const r = make();
  handshake(r);
  heard(r);
  tell(r, 1, E.portOpen, 1);
  const saved = r.dev.save();
  const backend = saved.backend as unknown as Record<string, unknown>;
  assert.deepEqual(backend.ports, [
    { name: NAMES[0], ready: true, guestOpen: true, say: 0 },
    { name: NAMES[1], ready: true, guestOpen: false, say: 0 },
  ]);
  // A second device over the same RAM, as after a restore, with new host streams.
  const dev2 = createVirtioConsole("serial0", r.services, { ports: NAMES, queueSize: 64 });
  placeDevice(dev2);
  const s1 = new FakeByteStream(51);
  dev2.connectPort(1, s1);
  dev2.restore(saved);
  assert.equal(dev2.console.guestOpen(1), true);
  const r2: Rig = { ...r, dev: dev2 };
  postControl(r2, 4);
  assert.deepEqual(heard(r2), [
    { id: 1, event: E.portOpen, value: 1 },
    { id: 2, event: E.portOpen, value: 0 },
  ]);
  postRx(r2, 1, 1);
  s1.input.push(...Buffer.from("after"));
  r.services.loop.fire(51);
  assert.equal(rxQueue(r2, 1).takeUsed().pop()?.len, 5, "the restored open port reads its new stream");
  // Shapes that do not fit are refused.
  const other = createVirtioConsole("serial0", makeServices(MiB), { ports: ["x"] });
  assert.throws(() => other.console.restore(saved.backend as SavedDeviceState), /not this device's/);
  const bads: Record<string, unknown>[] = [
    { ...backend, version: 1 },
    { ...backend, ports: "none" },
    { ...backend, multiport: "yes" },
    { ...backend, ports: [{ ...(backend.ports as object[])[0], say: 8 }, (backend.ports as object[])[1]] },
    { ...backend, ports: [{ ...(backend.ports as object[])[0], guestOpen: 1 }, (backend.ports as object[])[1]] },
    { ...backend, ports: [null, (backend.ports as object[])[1]] },
  ];
  for (const b of bads) assert.throws(() => dev2.console.restore(b as unknown as SavedDeviceState), /saved virtio-console state/, JSON.stringify(b).slice(0, 120));
  // A v1 state (counters only, before named ports) restores a one-port console, not a device with named ports.
  const v1 = { kind: "virtio-console", version: 1, rxBytes: 1, txBytes: 2, txDropped: 0, peerClosed: 0 };
  createVirtioConsole("con0", makeServices(MiB)).console.restore(v1);
  assert.throws(() => dev2.console.restore(v1), /is not virtio-console v2/);
});
