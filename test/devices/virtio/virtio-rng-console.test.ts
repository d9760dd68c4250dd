import { test } from "node:test";
import assert from "node:assert/strict";
import { VIRTIO_STATUS as S, featureBit } from "../../../src/devices/virtio/pci-transport.js";
import { createVirtioRng, type VirtioRng } from "../../../src/devices/virtio/virtio-rng.js";
import { VIRTIO_CONSOLE_CONFIG as K, VIRTIO_CONSOLE_F, createVirtioConsole, type HostByteStream } from "../../../src/devices/virtio/virtio-console.js";
import { TestVirtioDriver, makeServices, placeDevice } from "./virtio-driver.js";
import { FakeByteStream } from "./fake-byte-stream.js";
import { closeDescriptor, readFrame, receiveStreamHost, sendStream, sendStreamHost, socketPair } from "../../../src/hypervisor/host-network.js";
import { HostEntropy } from "../../../src/hypervisor/host-entropy.js";

const MiB = 1 << 20;

test("virtio-rng: identity, buffers filled with random bytes, used length", () => {
  const services = makeServices(MiB);
  const dev = createVirtioRng("rng0", services);
  placeDevice(dev);
  assert.equal(dev.pci.configRead(2, 2), 0x1044);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init(), true);
  assert.equal(drv.r16(0x12), 1);
  const q = drv.queues[0]!;
  q.setUsedEvent(0);
  const h = q.add([{ addr: 0x80000, len: 64, write: true }, { addr: 0x90000, len: 32, write: true }]);
  q.kick();
  assert.deepEqual(q.takeUsed(), [{ id: h, len: 96 }]);
  const a = services.memory.read(0x80000, 64);
  assert.ok(a.some((b) => b !== 0));
  assert.ok(services.memory.read(0x90000, 32).some((b) => b !== 0));
  assert.equal(services.msi.count(1), 1);
  // Readable-only chain: nothing to fill, used length 0.
  q.add([{ addr: 0x80000, len: 8, write: false }]);
  q.kick();
  assert.equal(q.takeUsed()[0]!.len, 0);
  // A huge buffer is filled only up to the cap.
  q.add([{ addr: 0x20000, len: 0x60000, write: true }]);
  q.kick();
  assert.equal(q.takeUsed()[0]!.len, 65536);
  assert.equal((dev.backend as VirtioRng).bytesServed, 96 + 65536);
  assert.equal((dev.backend as VirtioRng).bytesInPlace, 0, "plain buffers: filled through views");
});

test("virtio-rng on host-mapped RAM: buffers filled in place from /dev/urandom, across a chunk boundary, up to the cap", (t) => {
  const services = makeServices(MiB, 1 << 16, true);
  const entropy = HostEntropy.open();
  t.after(() => entropy.close());
  const dev = createVirtioRng("rng0", services, { entropy });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init(), true);
  const q = drv.queues[0]!;
  // 64 bytes that straddle the 64 KiB chunk boundary, then 32 more elsewhere.
  const h = q.add([{ addr: 0x10000 - 20, len: 64, write: true }, { addr: 0x90000, len: 32, write: true }]);
  q.kick();
  assert.deepEqual(q.takeUsed(), [{ id: h, len: 96 }]);
  const a = services.memory.read(0x10000 - 20, 64);
  assert.ok(a.subarray(0, 20).some((b) => b !== 0) && a.subarray(20).some((b) => b !== 0), "both sides of the boundary");
  assert.ok(services.memory.read(0x90000, 32).some((b) => b !== 0));
  // Two requests never get the same bytes.
  const h2 = q.add([{ addr: 0x90000, len: 32, write: true }]);
  const before = services.memory.read(0x90000, 32);
  q.kick();
  assert.deepEqual(q.takeUsed(), [{ id: h2, len: 32 }]);
  assert.notDeepEqual(services.memory.read(0x90000, 32), before);
  // A huge buffer is filled only up to the cap: the bytes after it stay zero.
  q.add([{ addr: 0x20000, len: 0x60000, write: true }]);
  q.kick();
  assert.equal(q.takeUsed()[0]!.len, 65536);
  assert.ok(services.memory.read(0x20000 + 65536 - 64, 64).some((b) => b !== 0));
  assert.ok(services.memory.read(0x20000 + 65536, 4096).every((b) => b === 0), "nothing written past the cap");
  assert.equal((dev.backend as VirtioRng).bytesServed, 96 + 32 + 65536);
  assert.equal((dev.backend as VirtioRng).bytesInPlace, 96 + 32 + 65536, "every byte read by the kernel into guest RAM");
});

test("virtio-rng: an entropy source that fails does not leave the request pending; views take over, noted once", () => {
  const services = makeServices(MiB, 1 << 30, true);
  let calls = 0;
  const broken = {
    fillHost(): number {
      calls++;
      throw new Error("readv(/dev/urandom): EIO");
    },
  };
  const dev = createVirtioRng("rng0", services, { entropy: broken });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init(), true);
  const q = drv.queues[0]!;
  for (let i = 0; i < 2; i++) {
    const h = q.add([{ addr: 0x80000 + i * 0x1000, len: 64, write: true }]);
    q.kick();
    assert.deepEqual(q.takeUsed(), [{ id: h, len: 64 }]);
    assert.ok(services.memory.read(0x80000 + i * 0x1000, 64).some((b) => b !== 0));
  }
  const rng = dev.backend as VirtioRng;
  assert.equal(calls, 1, "not tried again");
  assert.equal(rng.bytesInPlace, 0);
  assert.equal(rng.notes.length, 1);
  assert.match(rng.notes[0]!, /EIO/);
});

function makeConsole(opts: { size?: { cols: number; rows: number }; pendingBytes?: number } = {}) {
  const services = makeServices(MiB);
  const dev = createVirtioConsole("con0", services, opts);
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: (1n << 64n) - 1n }), true);
  return { services, dev, drv, rx: drv.queues[0]!, tx: drv.queues[1]! };
}

function send(t: ReturnType<typeof makeConsole>, text: string, at = 0x80000): void {
  const b = Uint8Array.from(text, (c) => c.charCodeAt(0));
  t.services.memory.bytes(at, b.length).set(b);
  t.tx.add([{ addr: at, len: b.length, write: false }]);
  t.tx.setUsedEvent(t.tx.lastUsed);
  t.tx.kick();
}

test("virtio-console: identity and guest -> host output", () => {
  const t = makeConsole();
  assert.equal(t.dev.pci.configRead(2, 2), 0x1043);
  assert.equal(t.drv.r16(0x12), 2);
  const s = new FakeByteStream();
  t.dev.connect(s);
  send(t, "hello, host\n");
  assert.equal(s.text(), "hello, host\n");
  assert.deepEqual(t.tx.takeUsed().map((u) => u.len), [0]);
  assert.equal(t.services.msi.count(2), 1, "transmitq vector");
  assert.equal(t.dev.console.counters.txBytes, 12);
});

test("virtio-console: output without a stream is dropped and counted", () => {
  const t = makeConsole();
  send(t, "lost");
  assert.equal(t.tx.takeUsed().length, 1, "the chain still completes");
  assert.equal(t.dev.console.counters.txDropped, 4);
});

test("virtio-console: short writes keep the rest; the pending buffer is bounded", () => {
  const t = makeConsole({ pendingBytes: 8 });
  const s = new FakeByteStream();
  s.writeLimit = 3;
  t.dev.connect(s);
  send(t, "abcdefgh");
  assert.equal(s.text(), "abc");
  assert.equal(t.dev.console.pendingOutput, 5);
  send(t, "ijklmnop", 0x81000); // flush 3 more, then keep 3 of the new 8 (room 8 - 2 pending... bounded)
  assert.equal(s.text(), "abcdef");
  assert.ok(t.dev.console.pendingOutput <= 8);
  assert.ok(t.dev.console.counters.txDropped > 0);
  s.writeLimit = Infinity;
  t.rx.kick(); // any device event flushes (here: a receiveq notification)
  assert.equal(t.dev.console.pendingOutput, 0);
  assert.equal(s.text().length + t.dev.console.counters.txDropped, 16);
});

test("virtio-console: host -> guest into receive buffers; stalls without buffers and resumes", () => {
  const t = makeConsole();
  const s = new FakeByteStream();
  const mem = t.services.memory;
  // No receive buffers yet: connecting polls the fd; a readable fd with no buffers stops polling.
  t.dev.connect(s);
  s.input.push(...Buffer.from("typed before buffers"));
  t.services.loop.fire(42);
  assert.equal(t.dev.console.polling, false, "no busy polling while the guest has no buffer");
  assert.equal(s.input.length, 20, "bytes stay in the stream");
  assert.equal(t.rx.availEvent(), 0, "asks to be notified about the next buffer");
  // The guest posts two 8-byte buffers: the device reads on.
  t.rx.setUsedEvent(0);
  const h1 = t.rx.add([{ addr: 0x90000, len: 8, write: true }]);
  const h2 = t.rx.add([{ addr: 0x91000, len: 8, write: true }]);
  t.rx.kick();
  assert.deepEqual(t.rx.takeUsed(), [{ id: h1, len: 8 }, { id: h2, len: 8 }]);
  assert.equal(Buffer.from(mem.read(0x90000, 8)).toString(), "typed be");
  assert.equal(Buffer.from(mem.read(0x91000, 8)).toString(), "fore buf");
  assert.equal(s.input.length, 4);
  assert.equal(t.dev.console.polling, false);
  assert.equal(t.services.msi.count(1), 1, "receiveq vector");
  // One big buffer takes the rest; then the stream is empty and the fd is polled again.
  t.rx.setUsedEvent(t.rx.lastUsed);
  const h3 = t.rx.add([{ addr: 0x92000, len: 64, write: true }]);
  t.rx.kick();
  assert.deepEqual(t.rx.takeUsed(), [{ id: h3, len: 4 }]);
  assert.equal(Buffer.from(mem.read(0x92000, 4)).toString(), "fers");
  t.rx.add([{ addr: 0x93000, len: 64, write: true }]);
  t.rx.kick();
  assert.equal(t.dev.console.polling, true);
  assert.equal(t.services.loop.active(42), 1);
  s.input.push(...Buffer.from("ls\n"));
  t.services.loop.fire(42);
  assert.equal(t.rx.takeUsed()[0]!.len, 3);
  assert.equal(t.dev.console.counters.rxBytes, 23);
});

test("virtio-console: peer close disconnects; reconnect works; reset stops polling", () => {
  const t = makeConsole();
  const s = new FakeByteStream();
  t.dev.connect(s);
  t.rx.add([{ addr: 0x90000, len: 8, write: true }]);
  t.rx.kick();
  assert.equal(t.dev.console.polling, true);
  s.closed = true;
  t.services.loop.fire(42);
  assert.equal(t.dev.console.connected, false);
  assert.equal(t.dev.console.counters.peerClosed, 1);
  assert.equal(t.services.loop.active(42), 0);
  assert.equal(t.rx.takeUsed().length, 0, "the buffer stays with the device");
  const s2 = new FakeByteStream();
  s2.input.push(65, 66);
  t.dev.connect(s2);
  assert.deepEqual(t.rx.takeUsed(), [{ id: 0, len: 2 }]);
  t.drv.reset();
  assert.equal(t.services.loop.active(42), 0);
  t.dev.connect(undefined);
  assert.equal(t.dev.console.connected, false);
});

test("virtio-console: size feature and emergency write", () => {
  const t = makeConsole({ size: { cols: 132, rows: 43 } });
  assert.ok((t.drv.offeredFeatures() & featureBit(VIRTIO_CONSOLE_F.size)) !== 0n);
  assert.equal(t.drv.deviceConfig(K.cols, 2), 132);
  assert.equal(t.drv.deviceConfig(K.rows, 2), 43);
  const gen = t.drv.r8(0x15);
  t.dev.console.resize(100, 30);
  assert.equal(t.drv.deviceConfig(K.cols, 2), 100);
  assert.equal(t.drv.r8(0x15), (gen + 1) & 0xff);
  assert.equal(t.services.msi.count(0), 1);
  const s = new FakeByteStream();
  t.dev.connect(s);
  t.dev.barWrite(0, 0x2000 + K.emergWr, 4, 0x21);
  assert.equal(s.text(), "!");
  assert.equal(t.drv.status() & S.needsReset, 0);
});

/** A console stream over one end of a real socket pair, with the vectored calls the worker's channel socket has. */
function socketStream(fd: number): HostByteStream & { readHostCalls: number; writeHostCalls: number } {
  const closedAsDevice = (n: number) => (n > 0 ? n : n < 0 ? 0 : -1);
  const stream = {
    fd,
    readHostCalls: 0,
    writeHostCalls: 0,
    read: (buf: Uint8Array) => closedAsDevice(readFrame(fd, buf)),
    write: (bytes: Uint8Array) => Math.max(0, sendStream(fd, bytes, bytes.length)),
    readHost: (addresses: Float64Array, lengths: Uint32Array, count: number) => {
      stream.readHostCalls++;
      return closedAsDevice(receiveStreamHost(fd, addresses, lengths, count));
    },
    writeHost: (addresses: Float64Array, lengths: Uint32Array, count: number) => {
      stream.writeHostCalls++;
      return Math.max(0, sendStreamHost(fd, addresses, lengths, count));
    },
  };
  return stream;
}

function drain(fd: number): string {
  const buf = new Uint8Array(1 << 16);
  let out = "";
  for (let n; (n = readFrame(fd, buf)) > 0; ) out += Buffer.from(buf.subarray(0, n)).toString("latin1");
  return out;
}

test("virtio-console on host-mapped RAM: one readv/writev per chain between the socket and guest RAM; a full socket keeps the rest", () => {
  const services = makeServices(MiB, 1 << 16, true);
  const dev = createVirtioConsole("con0", services, { pendingBytes: 1 << 20 });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({ want: (1n << 64n) - 1n }), true);
  const [mine, host] = socketPair("stream");
  try {
    const s = socketStream(mine);
    dev.connect(s);
    const mem = services.memory;
    const tx = drv.queues[1]!;
    const rx = drv.queues[0]!;
    // Guest -> host: a chain of three pieces, one across the chunk boundary.
    const put = (at: number, text: string) => mem.write(at, Buffer.from(text, "latin1"));
    put(0x80000, "hello, ");
    put(0x10000 - 3, "host ");
    put(0x81000, "world\n");
    tx.add([
      { addr: 0x80000, len: 7, write: false },
      { addr: 0x10000 - 3, len: 5, write: false },
      { addr: 0x81000, len: 6, write: false },
    ]);
    tx.kick();
    assert.equal(drain(host), "hello, host world\n");
    assert.equal(s.writeHostCalls, 1);
    assert.equal(dev.console.counters.txBytes, 18);

    // Host -> guest: two receive buffers, one across the chunk boundary, filled by one readv.
    const typed = Buffer.from("uname -a\n", "latin1");
    assert.equal(sendStream(host, typed, typed.length), typed.length);
    const h = rx.add([
      { addr: 0x10000 - 4, len: 6, write: true },
      { addr: 0x90000, len: 64, write: true },
    ]);
    rx.kick();
    assert.deepEqual(rx.takeUsed(), [{ id: h, len: 9 }]);
    assert.equal(Buffer.from(mem.read(0x10000 - 4, 6)).toString("latin1") + Buffer.from(mem.read(0x90000, 3)).toString("latin1"), "uname -a\n");
    assert.equal(s.readHostCalls >= 1, true);
    assert.equal(dev.console.counters.rxBytes, 9);

    // A full socket: the chain completes, its bytes wait in the pending buffer and follow in order.
    const filler = new Uint8Array(1 << 16).fill(0x2e);
    let queued = 0;
    for (let n; (n = sendStream(mine, filler, filler.length)) > 0; ) queued += n;
    put(0x82000, "after the flood");
    tx.add([{ addr: 0x82000, len: 15, write: false }]);
    tx.kick();
    assert.equal(tx.takeUsed().length, 2, "both transmit chains completed");
    assert.equal(dev.console.pendingOutput, 15);
    let got = "";
    for (let i = 0; i < 100 && !got.endsWith("after the flood"); i++) {
      got += drain(host);
      rx.kick(); // any device event flushes pending output
    }
    assert.equal(got.length, queued + 15);
    assert.ok(got.endsWith("." + "after the flood"));
    assert.equal(dev.console.pendingOutput, 0);
    assert.equal(dev.console.counters.txDropped, 0);

    // The peer closes: the device, polling with a buffer posted, reads the end of the stream and disconnects.
    rx.add([{ addr: 0x91000, len: 16, write: true }]);
    rx.kick();
    assert.equal(dev.console.polling, true);
    closeDescriptor(host);
    services.loop.fire(mine);
    assert.equal(dev.console.connected, false);
    assert.equal(dev.console.counters.peerClosed, 1);
  } finally {
    closeDescriptor(mine);
  }
});
