/**
 * virtio-vsock under the fuzzer (fuzz-harness.ts): random and malformed ring
 * states on its three queues, packets with plausible and hostile headers
 * (ops, CIDs, ports, lengths, credit), host streams that read short, run dry,
 * fill up and hang up, host programs connecting, and the loop reporting
 * streams readable and writable at random.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { VSOCK_HDR as H, VSOCK_HEADER, VSOCK_OP as OP, createVirtioVsock, type VsockHost, type VsockHostStream } from "../../../src/devices/virtio/virtio-vsock.js";
import { SeededRandom } from "../device-fakes.js";
import { FUZZ_RAM, VirtioFuzzer, dataBuffer, fuzzServices, type FuzzTarget } from "./fuzz-harness.js";
import type { Buffer as Buf } from "./virtio-driver.js";

/** A host stream whose behaviour the fuzzer's PRNG decides. */
class ChaoticStream implements VsockHostStream {
  hungUp = false;
  closed = false;
  written = 0;
  constructor(private readonly r: SeededRandom, readonly fd: number) {}
  read(buf: Uint8Array, length: number): number {
    if (this.closed) throw new Error("read after close");
    if (this.hungUp) return -1;
    const k = this.r.int(30);
    if (k === 0) {
      this.hungUp = true;
      return -1;
    }
    if (k === 1) throw new Error("ECONNRESET");
    if (k < 8) return 0;
    const n = Math.min(length, 1 + this.r.int(6000));
    for (let i = 0; i < n; i += 97) buf[i] = this.r.int(256);
    return n;
  }
  write(_buf: Uint8Array, length: number): number {
    if (this.closed) throw new Error("write after close");
    const k = this.r.int(40);
    if (k === 0) throw new Error("EPIPE");
    const n = k < 10 ? this.r.int(length + 1) : length;
    this.written += n;
    return n;
  }
  /** The host-memory forms: the same outcomes; no bytes are really moved (the fuzz checks the device's own writes). */
  readHost(_a: Float64Array, lengths: Uint32Array, count: number): number {
    let room = 0;
    for (let i = 0; i < count; i++) room += lengths[i]!;
    return this.read(this.sink, Math.min(room, this.sink.length));
  }
  writeHost(_a: Float64Array, lengths: Uint32Array, count: number): number {
    let total = 0;
    for (let i = 0; i < count; i++) total += lengths[i]!;
    return this.write(this.sink, total);
  }
  private readonly sink = new Uint8Array(64 * 1024);
  shutdownWrite(): void {
    if (this.closed) throw new Error("shutdown after close");
  }
  close(): void {
    this.closed = true;
  }
}

for (const hostMapped of [false, true]) test(`virtio-vsock fuzz (100000 steps, seed 0x50c4, ${hostMapped ? "host-mapped RAM: readv/writev" : "plain buffers"})`, { timeout: 120_000 }, () => {
  const rng = new SeededRandom(0x50c4);
  const services = fuzzServices(hostMapped);
  let nextFd = 1000;
  const streams: ChaoticStream[] = [];
  const stream = (): ChaoticStream => {
    const s = new ChaoticStream(rng, nextFd++);
    streams.push(s);
    return s;
  };
  const host: VsockHost = { connect: (port) => (port % 3 === 0 ? undefined : stream()) };
  const dev = createVirtioVsock("vsock-fuzz", host, services, { guestCid: 3, queueSize: 64, bufferBytes: 16 * 1024, maxConnections: 24 });
  // Guest ports, and host ports (services on 1, 2, 4; none on 3; the first ports host programs get; the last one).
  const guestPorts = [1, 2, 1024];
  const hostPorts = [1, 2, 4, 3, 0x40000000, 0x40000001, 0xffffffff];
  let packets = 0;
  let lastRequest: [number, number] | undefined;
  const target: FuzzTarget = {
    dev,
    services,
    consuming: [1],
    request(r: SeededRandom, q: number) {
      if (q === 1) {
        // A packet: mostly what a driver sends, sometimes not.
        const payload = r.int(2) === 0 ? r.int(5000) : 0;
        const m = new Uint8Array(VSOCK_HEADER);
        const v = new DataView(m.buffer);
        v.setUint32(H.srcCid, r.pick([3, 3, 3, 3, 3, 2, r.int(2 ** 32)]), true);
        v.setUint32(H.srcCid + 4, r.int(20) === 0 ? 1 : 0, true);
        v.setUint32(H.dstCid, r.pick([2, 2, 2, 2, 1, 3, r.int(2 ** 32)]), true);
        // Half the packets go to the connection the guest asked for last (to a service, it is open at once).
        const pair: [number, number] = lastRequest !== undefined && r.int(2) === 0 ? lastRequest : [r.pick(guestPorts), r.pick(hostPorts)];
        v.setUint32(H.srcPort, pair[0], true);
        v.setUint32(H.dstPort, pair[1], true);
        v.setUint32(H.len, r.int(8) === 0 ? r.int(2 ** 32) : payload, true);
        v.setUint16(H.type, r.int(10) === 0 ? r.int(4) : 1, true);
        const op = r.pick([OP.request, OP.request, OP.response, OP.rst, OP.shutdown, OP.rw, OP.rw, OP.rw, OP.rw, OP.rw, OP.creditUpdate, OP.creditRequest, r.int(0x10000)]);
        v.setUint16(H.op, op, true);
        if (op === OP.request) lastRequest = pair;
        v.setUint32(H.flags, r.int(5), true);
        v.setUint32(H.bufAlloc, r.pick([0, 4096, 65536, 256 * 1024, r.int(2 ** 32)]), true);
        v.setUint32(H.fwdCnt, r.pick([0, 0, 0, r.int(2 ** 32)]), true);
        packets++;
        const bufs: Buf[] = [{ addr: fuzzer.header(m), len: r.int(10) === 0 ? r.int(VSOCK_HEADER) : VSOCK_HEADER, write: false }];
        if (payload > 0) bufs.push({ addr: r.int(FUZZ_RAM - payload), len: payload, write: false });
        return { bufs };
      }
      if (q === 2) return { bufs: [{ addr: dataBuffer(r, 8), len: r.pick([4, 4, 8, 2]), write: true }] };
      // Receive buffers: Linux's (header, page), one piece, or odd sizes.
      const k = r.int(4);
      const bufs: Buf[] =
        k === 0
          ? [{ addr: dataBuffer(r, VSOCK_HEADER + 4096), len: VSOCK_HEADER + 4096, write: true }]
          : k === 1
            ? [{ addr: dataBuffer(r, 64), len: 1 + r.int(64), write: true }]
            : [
                { addr: dataBuffer(r, VSOCK_HEADER), len: VSOCK_HEADER, write: true },
                { addr: dataBuffer(r, 4096), len: 1 + r.int(4096), write: true },
              ];
      return { bufs };
    },
    extra(r: SeededRandom) {
      const k = r.int(6);
      const live = streams.filter((s) => !s.closed);
      const s = live.length > 0 ? r.pick(live) : undefined;
      if (k < 2 && s !== undefined) services.loop.fire(s.fd);
      else if (k < 4 && s !== undefined) services.loop.fireWritable(s.fd);
      else if (k === 4) dev.vsock.connectFromHost(r.pick(guestPorts), stream());
    },
  };
  const fuzzer = new VirtioFuzzer(target, rng);
  const stats = fuzzer.run(100_000);
  const c = dev.vsock.counters;
  assert.ok(stats.requestsCompleted > 2000, `completed ${stats.requestsCompleted}`);
  assert.ok(stats.malformedDetected > 500, `malformed ${stats.malformedDetected}`);
  assert.ok(packets > 5000 && c.badPackets > 500, `packets ${packets}, bad ${c.badPackets}`);
  assert.ok(c.fromGuest > 50 && c.fromHost > 50 && c.refused > 0 && c.resets > 100, JSON.stringify(c));
  assert.ok(c.rxBytes > 0 && c.txBytes > 0, `${JSON.stringify(c)} ${JSON.stringify(stats)}`);
  assert.ok(dev.vsock.connections <= 24, `at most the limit of connections: ${dev.vsock.connections}`);
  // Every stream the device dropped is closed and no longer watched; a live one has at most one watch each way.
  for (const s of streams) {
    const watched = services.loop.active(s.fd) + services.loop.activeWritable(s.fd);
    if (s.closed) assert.equal(watched, 0, `closed stream ${s.fd} still watched`);
    else assert.ok(services.loop.active(s.fd) <= 1 && services.loop.activeWritable(s.fd) <= 1, `stream ${s.fd}: one watch each way at most`);
  }
  console.log(`virtio-vsock fuzz (${hostMapped ? "host-mapped" : "plain"}): ${JSON.stringify(stats)} ${JSON.stringify(c)} packets ${packets} open ${dev.vsock.connections} streams ${streams.length}`);
});
