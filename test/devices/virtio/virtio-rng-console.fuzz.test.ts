import { test } from "node:test";
import assert from "node:assert/strict";
import { createVirtioRng, type VirtioRng } from "../../../src/devices/virtio/virtio-rng.js";
import { HostEntropy } from "../../../src/hypervisor/host-entropy.js";
import { featureBit } from "../../../src/devices/virtio/pci-transport.js";
import { VIRTIO_CONSOLE_BAD_ID, VIRTIO_CONSOLE_EVENT as E, VIRTIO_CONSOLE_F, createVirtioConsole, type HostByteStream } from "../../../src/devices/virtio/virtio-console.js";
import { SeededRandom } from "../device-fakes.js";
import { FUZZ_RAM, VirtioFuzzer, dataBuffer, fuzzServices, type FuzzTarget } from "./fuzz-harness.js";
import type { Buffer as Buf } from "./virtio-driver.js";

for (const hostMapped of [false, true]) {
  // Host-mapped RAM (as in the worker) takes the in-place path: one readv of /dev/urandom per request.
  test(`virtio-rng fuzz (100000 steps, seed 0x4e6, ${hostMapped ? "host-mapped RAM" : "plain buffers"})`, { timeout: 60_000 }, (t) => {
    const rng = new SeededRandom(0x4e6);
    const services = fuzzServices(hostMapped);
    const entropy = hostMapped ? HostEntropy.open() : undefined;
    t.after(() => entropy?.close());
    const dev = createVirtioRng("rng-fuzz", services, entropy === undefined ? {} : { entropy });
    const target: FuzzTarget = {
      dev,
      services,
      consuming: [0],
      request(r: SeededRandom) {
        const bufs: Buf[] = [];
        if (r.int(5) === 0) bufs.push({ addr: r.int(FUZZ_RAM - 64), len: 1 + r.int(64), write: false });
        const n = 1 + r.int(3);
        for (let i = 0; i < n; i++) {
          const len = 1 + r.int(2048);
          bufs.push({ addr: dataBuffer(r, len), len, write: true });
        }
        const total = bufs.filter((b) => b.write).reduce((s, b) => s + b.len, 0);
        return { bufs, check: (used) => assert.equal(used.len, total) };
      },
    };
    const stats = new VirtioFuzzer(target, rng).run(100_000);
    assert.ok(stats.requestsCompleted > 5000, `completed ${stats.requestsCompleted}`);
    assert.ok(stats.malformedDetected > 1000, `malformed ${stats.malformedDetected}`);
    const backend = dev.backend as VirtioRng;
    if (hostMapped) assert.ok(backend.bytesInPlace > 0 && backend.notes.length === 0, `in place: ${backend.bytesInPlace} bytes, notes ${JSON.stringify(backend.notes)}`);
    console.log(`virtio-rng fuzz (${hostMapped ? "host-mapped" : "plain"}): ${JSON.stringify(stats)}`);
  });
}

/** A host stream whose behaviour the fuzzer's PRNG decides (short reads, EAGAIN, hang-ups, short writes). */
class ChaoticStream implements HostByteStream {
  hungUp = false;
  received = 0;
  constructor(private readonly r: SeededRandom, readonly fd = 77) {}
  read(buf: Uint8Array): number {
    if (this.hungUp) return -1;
    const k = this.r.int(20);
    if (k === 0) {
      this.hungUp = true;
      return -1;
    }
    if (k < 6) return 0;
    const n = Math.min(buf.length, 1 + this.r.int(300));
    for (let i = 0; i < n; i++) buf[i] = this.r.int(256);
    return n;
  }
  write(bytes: Uint8Array): number {
    if (this.hungUp || this.r.int(200) === 0) return -1;
    const n = this.r.int(3) === 0 ? this.r.int(bytes.length + 1) : bytes.length;
    this.received += n;
    return n;
  }
}

test("virtio-console fuzz (100000 steps, seed 0xc0de)", { timeout: 60_000 }, () => {
  const rng = new SeededRandom(0xc0de);
  const services = fuzzServices();
  const dev = createVirtioConsole("con-fuzz", services, { queueSize: 64, pendingBytes: 4096, size: { cols: 80, rows: 25 } });
  let stream = new ChaoticStream(rng);
  dev.connect(stream);
  const target: FuzzTarget = {
    dev,
    services,
    consuming: [1],
    request(r: SeededRandom, q: number) {
      const bufs: Buf[] = [];
      const n = 1 + r.int(3);
      for (let i = 0; i < n; i++) {
        const len = 1 + r.int(1024);
        // transmitq: readable from anywhere in RAM; receiveq: writable in the data zone
        bufs.push(q === 1 ? { addr: r.int(FUZZ_RAM - len), len, write: false } : { addr: dataBuffer(r, len), len, write: true });
      }
      return { bufs };
    },
    extra(r: SeededRandom) {
      const k = r.int(6);
      if (k < 3) services.loop.fire(77);
      else if (k === 3) {
        stream = new ChaoticStream(r);
        dev.connect(stream);
      } else if (k === 4) dev.connect(undefined);
      else dev.console.resize(r.int(300), r.int(100));
    },
  };
  const stats = new VirtioFuzzer(target, rng).run(100_000);
  const c = dev.console.counters;
  assert.ok(stats.requestsCompleted > 2000, `completed ${stats.requestsCompleted}`);
  assert.ok(stats.malformedDetected > 500, `malformed ${stats.malformedDetected}`);
  assert.ok(c.rxBytes > 0 && c.txBytes > 0 && c.peerClosed > 0 && c.txDropped > 0, JSON.stringify(c));
  assert.ok(services.loop.active(77) <= 1, "never more than one watch on the stream");
  console.log(`virtio-console fuzz: ${JSON.stringify(stats)} ${JSON.stringify(c)}`);
});

test("virtio-serial fuzz: named ports and the control queues (100000 steps, seed 0x5e41)", { timeout: 60_000 }, () => {
  const rng = new SeededRandom(0x5e41);
  const services = fuzzServices();
  // Two named ports: 8 queues (port 0, the control pair, ports 1 and 2), all set up by the harness.
  const dev = createVirtioConsole("serial-fuzz", services, { queueSize: 64, pendingBytes: 4096, ports: ["org.qemu.guest_agent.0", "partis.kvp"] });
  const fds = [77, 78, 79];
  const streams = fds.map((fd) => new ChaoticStream(rng, fd));
  dev.connect(streams[0]);
  dev.connectPort(1, streams[1]);
  let controlSent = 0;
  let everOpen = 0;
  const target: FuzzTarget = {
    dev,
    services,
    // Transmit queues (ports 0-2) and the driver's control queue take every chain at a notification;
    // without MULTIPORT only port 0's exist (a driver that sets up the others anyway is not answered on them).
    get consuming() {
      return (dev.negotiatedFeatures & featureBit(VIRTIO_CONSOLE_F.multiport)) !== 0n ? [1, 3, 5, 7] : [1];
    },
    request(r: SeededRandom, q: number) {
      if (q === 3) {
        // A driver's control message: mostly the events and ids Linux sends, sometimes not.
        const m = new Uint8Array(8);
        const v = new DataView(m.buffer);
        v.setUint32(0, r.pick([VIRTIO_CONSOLE_BAD_ID, 0, 1, 2, 1, 2, 3, r.int(2 ** 32)]), true);
        v.setUint16(4, r.pick([E.deviceReady, E.portReady, E.portOpen, E.portOpen, r.int(9), r.int(0x10000)]), true);
        v.setUint16(6, r.pick([0, 1, 1, r.int(0x10000)]), true);
        controlSent++;
        return { bufs: [{ addr: fuzzer.header(m), len: r.int(6) === 0 ? r.int(8) : 8, write: false }] };
      }
      const bufs: Buf[] = [];
      const n = q === 2 ? 1 : 1 + r.int(3);
      for (let i = 0; i < n; i++) {
        const len = 1 + r.int(q === 2 ? 64 : 1024);
        bufs.push(q % 2 === 1 ? { addr: r.int(FUZZ_RAM - len), len, write: false } : { addr: dataBuffer(r, len), len, write: true });
      }
      return { bufs };
    },
    extra(r: SeededRandom) {
      for (let p = 1; p <= 2; p++) if (dev.console.guestOpen(p)) everOpen++;
      const k = r.int(8);
      const port = r.int(3);
      if (k < 4) services.loop.fire(fds[port]!);
      else if (k < 6) {
        streams[port] = new ChaoticStream(r, fds[port]);
        if (port === 0) dev.connect(streams[port]);
        else dev.connectPort(port, streams[port]);
      } else if (k === 6) {
        if (port === 0) dev.connect(undefined);
        else dev.connectPort(port, undefined);
      } else dev.console.resize(r.int(300), r.int(100));
    },
  };
  const fuzzer = new VirtioFuzzer(target, rng);
  const stats = fuzzer.run(100_000);
  const c = dev.console.counters;
  assert.ok(stats.requestsCompleted > 2000, `completed ${stats.requestsCompleted}`);
  assert.ok(stats.malformedDetected > 500, `malformed ${stats.malformedDetected}`);
  assert.ok(controlSent > 1000 && c.controlBad > 100, `control messages ${controlSent}, bad ${c.controlBad}`);
  assert.ok(everOpen > 0, "the guest side opened a named port at some point");
  assert.ok(c.rxBytes > 0 && c.txBytes > 0 && c.peerClosed > 0, JSON.stringify(c));
  for (const fd of fds) assert.ok(services.loop.active(fd) <= 1, `never more than one watch on stream ${fd}`);
  console.log(`virtio-serial fuzz: ${JSON.stringify(stats)} ${JSON.stringify(c)} control ${controlSent} everOpen ${everOpen}`);
});
