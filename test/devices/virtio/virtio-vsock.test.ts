/**
 * virtio-vsock: the packet protocol as Linux's vmw_vsock_virtio_transport
 * drives it (two-descriptor buffers: a 44-byte header, then a page), against
 * real host streams (AF_UNIX socket pairs): connections both ways, data both
 * ways, credit both ways, shutdown and close, hostile packets, the bounded
 * RST ring, device reset, and the TRANSPORT_RESET event after a restore.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { closeDescriptor, receiveStream, sendStream, shutdownStream, socketPair } from "../../../src/hypervisor/host-network.js";
import {
  VSOCK_FIRST_HOST_PORT,
  VSOCK_HDR as H,
  VSOCK_HEADER,
  VSOCK_OP as OP,
  VSOCK_SHUTDOWN,
  createVirtioVsock,
  type VirtioVsockDevice,
  type VsockHost,
  type VsockHostStream,
} from "../../../src/devices/virtio/virtio-vsock.js";
import { socketStream } from "../../../src/worker/vsock-host.js";
import { TestVirtioDriver, makeServices, placeDevice, type TestServices } from "./virtio-driver.js";

const MiB = 1 << 20;
const GUEST = 3;
const PAGE = 4096;

interface Packet {
  srcCid: number;
  dstCid: number;
  srcPort: number;
  dstPort: number;
  op: number;
  type: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
  payload: Buffer;
}

/** Host services: port -> the test's end of a socket pair per connection the device made. */
class TestHost implements VsockHost {
  readonly services = new Set<number>();
  /** Per connection the device made: the service's end, and the device's (what the loop watches). */
  readonly ends: { port: number; fd: number; deviceFd: number }[] = [];
  /** readv calls the device made into guest RAM (bytes each; 0: nothing waiting). */
  readonly hostReads: number[] = [];
  /** writev calls the device made from guest RAM (bytes the stream took each). */
  readonly hostWrites: number[] = [];
  connect(port: number): VsockHostStream | undefined {
    if (!this.services.has(port)) return undefined;
    const [a, b] = socketPair("stream");
    this.ends.push({ port, fd: b, deviceFd: a });
    const stream = socketStream(a);
    const readHost = stream.readHost!;
    const writeHost = stream.writeHost!;
    return {
      ...stream,
      readHost: (addresses, lengths, count) => {
        const n = readHost(addresses, lengths, count);
        this.hostReads.push(n);
        return n;
      },
      writeHost: (addresses, lengths, count) => {
        const n = writeHost(addresses, lengths, count);
        this.hostWrites.push(n);
        return n;
      },
    };
  }
}

interface Rig {
  services: TestServices;
  host: TestHost;
  dev: VirtioVsockDevice;
  drv: TestVirtioDriver;
  next: number;
  /** rx head -> its header and payload buffers. */
  rxBufs: Map<number, { hdr: number; buf: number }>;
}

function make(opts: { hostMapped?: boolean; bufferBytes?: number; services?: TestServices; rxBuffers?: number } = {}): Rig {
  const services = opts.services ?? makeServices(8 * MiB, 1 << 30, opts.hostMapped ?? false);
  const host = new TestHost();
  const dev = createVirtioVsock("vsock0", host, services, { guestCid: GUEST, queueSize: 64, ...(opts.bufferBytes !== undefined ? { bufferBytes: opts.bufferBytes } : {}) });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({}), true);
  const r: Rig = { services, host, dev, drv, next: 0x100000, rxBufs: new Map() };
  postRx(r, opts.rxBuffers ?? 16);
  return r;
}

function alloc(r: Rig, len: number): number {
  const at = r.next;
  r.next += (len + 0xfff) & ~0xfff;
  return at;
}

/** Receive buffers as Linux 6.1 posts them: a header descriptor, then a page. */
function postRx(r: Rig, n: number, payload = PAGE): void {
  const q = r.drv.queues[0]!;
  for (let i = 0; i < n; i++) {
    const hdr = alloc(r, VSOCK_HEADER);
    const buf = alloc(r, payload);
    const head = q.add([
      { addr: hdr, len: VSOCK_HEADER, write: true },
      { addr: buf, len: payload, write: true },
    ]);
    r.rxBufs.set(head, { hdr, buf });
  }
  q.kick();
}

function header(p: Partial<Packet> & { op: number }, len: number): Uint8Array {
  const m = new Uint8Array(VSOCK_HEADER);
  const v = new DataView(m.buffer);
  v.setUint32(H.srcCid, p.srcCid ?? GUEST, true);
  v.setUint32(H.dstCid, p.dstCid ?? 2, true);
  v.setUint32(H.srcPort, p.srcPort ?? 5000, true);
  v.setUint32(H.dstPort, p.dstPort ?? 1234, true);
  v.setUint32(H.len, len, true);
  v.setUint16(H.type, p.type ?? 1, true);
  v.setUint16(H.op, p.op, true);
  v.setUint32(H.flags, p.flags ?? 0, true);
  v.setUint32(H.bufAlloc, p.bufAlloc ?? 256 * 1024, true);
  v.setUint32(H.fwdCnt, p.fwdCnt ?? 0, true);
  return m;
}

/** The guest sends a packet (header and payload in two descriptors, as Linux does). */
/**
 * Make a packet available on the transmit queue without notifying: the
 * header, then the payload (one descriptor, or `pieces` of `pieceBytes` each
 * in an indirect table). Returns the header's address.
 */
function queuePacket(r: Rig, p: Partial<Packet> & { op: number }, payload: Uint8Array = new Uint8Array(0), lenField = payload.length, pieceBytes = payload.length): number {
  const hdr = alloc(r, VSOCK_HEADER);
  r.services.memory.write(hdr, header(p, lenField));
  const bufs = [{ addr: hdr, len: VSOCK_HEADER, write: false }];
  for (let off = 0; off < payload.length; off += pieceBytes) {
    const piece = payload.subarray(off, off + pieceBytes);
    const at = alloc(r, piece.length);
    r.services.memory.write(at, piece);
    bufs.push({ addr: at, len: piece.length, write: false });
  }
  r.drv.queues[1]!.add(bufs, bufs.length > 2 ? { indirectAt: alloc(r, bufs.length * 16) } : {});
  return hdr;
}

/** The guest sends a packet (header and payload in two descriptors, as Linux does). */
function send(r: Rig, p: Partial<Packet> & { op: number }, payload: Uint8Array = new Uint8Array(0), lenField = payload.length): void {
  queuePacket(r, p, payload, lenField);
  const q = r.drv.queues[1]!;
  q.kick();
  assert.deepEqual(q.takeUsed().map((u) => u.len), [0], "every transmitted packet is used");
}

/** Packets the device put in the receive buffers since the last call. */
function received(r: Rig): Packet[] {
  const out: Packet[] = [];
  for (const u of r.drv.queues[0]!.takeUsed()) {
    const b = r.rxBufs.get(u.id)!;
    r.rxBufs.delete(u.id);
    assert.ok(u.len >= VSOCK_HEADER, `used length ${u.len}`);
    const m = r.services.memory.read(b.hdr, VSOCK_HEADER);
    const v = new DataView(m.buffer, m.byteOffset, VSOCK_HEADER);
    const len = v.getUint32(H.len, true);
    assert.equal(u.len, VSOCK_HEADER + len, "the used length is the header and the payload (Linux drops other packets)");
    out.push({
      srcCid: v.getUint32(H.srcCid, true) + v.getUint32(H.srcCid + 4, true) * 2 ** 32,
      dstCid: v.getUint32(H.dstCid, true) + v.getUint32(H.dstCid + 4, true) * 2 ** 32,
      srcPort: v.getUint32(H.srcPort, true),
      dstPort: v.getUint32(H.dstPort, true),
      op: v.getUint16(H.op, true),
      type: v.getUint16(H.type, true),
      flags: v.getUint32(H.flags, true),
      bufAlloc: v.getUint32(H.bufAlloc, true),
      fwdCnt: v.getUint32(H.fwdCnt, true),
      payload: Buffer.from(r.services.memory.read(b.buf, len)),
    });
  }
  return out;
}

function hostRead(fd: number, max = 1 << 20): { bytes: Buffer; eof: boolean } {
  const buf = new Uint8Array(max);
  let got = 0;
  let eof = false;
  for (;;) {
    const n = receiveStream(fd, buf.subarray(got), max - got);
    if (n === 0) {
      eof = true;
      break;
    }
    if (n < 0) break;
    got += n;
  }
  return { bytes: Buffer.from(buf.subarray(0, got)), eof };
}

function hostWrite(fd: number, bytes: Uint8Array): number {
  const n = sendStream(fd, bytes, bytes.length);
  return n < 0 ? 0 : n;
}

/** The guest connects from port 5000 to host port 1234 (served): the connection and the host's end. */
function connectFromGuest(r: Rig, guestBufAlloc = 256 * 1024): number {
  r.host.services.add(1234);
  send(r, { op: OP.request, bufAlloc: guestBufAlloc });
  const [resp] = received(r);
  assert.equal(resp?.op, OP.response);
  postRx(r, 1);
  return r.host.ends.at(-1)!.fd;
}

for (const hostMapped of [false, true]) {
  const path = hostMapped ? "readv/writev on guest RAM" : "copies through views";
  test(`vsock: the guest connects to a host service; bytes both ways; the guest closes and gets RST (${path})`, () => {
    const r = make({ hostMapped });
    assert.equal(r.drv.deviceConfig(0, 4), GUEST, "guest_cid, low half");
    assert.equal(r.drv.deviceConfig(4, 4), 0, "guest_cid, high half");
    r.host.services.add(1234);
    send(r, { op: OP.request, srcPort: 5000, dstPort: 1234, bufAlloc: 65536 });
    const [resp] = received(r);
    assert.deepEqual(
      { op: resp!.op, src: [resp!.srcCid, resp!.srcPort], dst: [resp!.dstCid, resp!.dstPort], type: resp!.type, len: resp!.payload.length },
      { op: OP.response, src: [2, 1234], dst: [GUEST, 5000], type: 1, len: 0 },
    );
    assert.ok(resp!.bufAlloc > 0, "the device offers a receive buffer");
    assert.equal(r.dev.vsock.connections, 1);
    const fd = r.host.ends[0]!.fd;

    // guest -> host
    const hello = Buffer.from("hello from the guest\n");
    send(r, { op: OP.rw }, hello);
    assert.equal(hostRead(fd).bytes.toString(), hello.toString());

    // host -> guest: the device reads when the loop says the stream is readable
    const big = Buffer.alloc(10000, 0x5a);
    big.write("host says hi");
    assert.equal(hostWrite(fd, big), big.length);
    r.services.loop.fire(r.host.ends[0]!.deviceFd);
    const rw = received(r);
    assert.deepEqual(rw.map((p) => p.op), [OP.rw, OP.rw, OP.rw], "10000 bytes in page-sized packets");
    assert.deepEqual(rw.map((p) => p.payload.length), [4096, 4096, 1808]);
    assert.ok(Buffer.concat(rw.map((p) => p.payload)).equals(big), "the bytes, in order");
    assert.equal(rw.at(-1)!.fwdCnt, hello.length, "fwd_cnt: the guest's bytes handed to the host");
    assert.deepEqual(r.dev.vsock.counters.rxBytes, 10000);

    // The guest closes: SHUTDOWN(RCV|SEND); the device answers RST, the host reads the end of the stream.
    postRx(r, 4);
    send(r, { op: OP.shutdown, flags: VSOCK_SHUTDOWN.rcv | VSOCK_SHUTDOWN.send });
    const [rst] = received(r);
    assert.equal(rst?.op, OP.rst);
    assert.equal(hostRead(fd).eof, true, "the host stream is closed");
    assert.equal(r.dev.vsock.connections, 0);
    closeDescriptor(fd);
  });
}

test("vsock: a port no host service listens on is refused with RST; so are other CIDs and socket types", () => {
  const r = make();
  send(r, { op: OP.request, dstPort: 4321 });
  send(r, { op: OP.request, dstCid: 7, dstPort: 1234 }); // another VM
  send(r, { op: OP.request, type: 2, dstPort: 1234 }); // SOCK_SEQPACKET: not offered
  const got = received(r);
  assert.deepEqual(got.map((p) => [p.op, p.dstPort, p.srcPort]), [
    [OP.rst, 5000, 4321],
    [OP.rst, 5000, 1234],
    [OP.rst, 5000, 1234],
  ]);
  assert.equal(r.dev.vsock.counters.refused, 1);
  assert.equal(r.dev.vsock.connections, 0);
});

test("vsock: a host program connects (CONNECT port): REQUEST to the guest, OK <port> on RESPONSE, bytes both ways; an RST closes it", () => {
  const r = make();
  const [mine, theirs] = socketPair("stream");
  assert.equal(r.dev.vsock.connectFromHost(52, socketStream(theirs)), true);
  const [req] = received(r);
  assert.equal(req?.op, OP.request);
  assert.equal(req!.dstPort, 52);
  assert.equal(req!.srcPort, VSOCK_FIRST_HOST_PORT);
  postRx(r, 1);
  send(r, { op: OP.response, srcPort: 52, dstPort: req!.srcPort });
  assert.equal(hostRead(mine).bytes.toString(), `OK ${VSOCK_FIRST_HOST_PORT}\n`);
  send(r, { op: OP.rw, srcPort: 52, dstPort: req!.srcPort }, Buffer.from("pong"));
  assert.equal(hostRead(mine).bytes.toString(), "pong");
  hostWrite(mine, Buffer.from("ping"));
  for (const fd of [...r.services.loop.watches.keys()]) r.services.loop.fire(fd);
  assert.deepEqual(received(r).map((p) => p.payload.toString()), ["ping"]);
  // A second program gets the next host port; the guest refuses it.
  const [mine2, theirs2] = socketPair("stream");
  r.dev.vsock.connectFromHost(52, socketStream(theirs2));
  postRx(r, 2);
  const [req2] = received(r);
  assert.equal(req2!.srcPort, VSOCK_FIRST_HOST_PORT + 1);
  send(r, { op: OP.rst, srcPort: 52, dstPort: req2!.srcPort });
  assert.deepEqual(hostRead(mine2), { bytes: Buffer.alloc(0), eof: true }, "refused: the program's socket is closed, no OK");
  assert.equal(r.dev.vsock.counters.fromHost, 2);
  assert.equal(r.dev.vsock.connections, 1);
  closeDescriptor(mine);
  closeDescriptor(mine2);
});

for (const hostMapped of [false, true])
test(`vsock: host -> guest keeps to the guest's credit; CREDIT_UPDATE lets more through (${hostMapped ? "readv into guest RAM" : "copies"})`, () => {
  const r = make({ rxBuffers: 32, hostMapped });
  const fd = connectFromGuest(r, 8192);
  const data = Buffer.alloc(20000);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
  hostWrite(fd, data);
  const streamFd = r.host.ends.at(-1)!.deviceFd;
  r.services.loop.fire(streamFd);
  let got = received(r);
  assert.equal(Buffer.concat(got.map((p) => p.payload)).length, 8192, "no more than buf_alloc in flight");
  assert.equal(r.services.loop.active(streamFd), 0, "not polled while the guest has no credit");
  // The guest read 8192 bytes and says so.
  send(r, { op: OP.creditUpdate, bufAlloc: 8192, fwdCnt: 8192 });
  got = got.concat(received(r));
  send(r, { op: OP.creditUpdate, bufAlloc: 8192, fwdCnt: 16384 });
  got = got.concat(received(r));
  const all = Buffer.concat(got.map((p) => p.payload));
  assert.equal(all.length, 20000);
  assert.ok(all.equals(data));
  assert.equal(r.services.loop.active(streamFd), 1, "read dry: polled again");
  closeDescriptor(fd);
});

test("vsock: one readv fills up to 16 receive buffers; buffers it did not reach are given back and used next, in order", () => {
  const r = make({ hostMapped: true, rxBuffers: 20 });
  const fd = connectFromGuest(r); // the RESPONSE took one, posted again: 20
  const data = Buffer.alloc(100_000);
  for (let i = 0; i < data.length; i++) data[i] = (i * 13 + (i >> 8)) & 0xff;
  assert.equal(hostWrite(fd, data), data.length);
  const streamFd = r.host.ends.at(-1)!.deviceFd;
  const reads = r.host.hostReads;
  r.services.loop.fire(streamFd);
  let got = received(r);
  assert.deepEqual(reads, [16 * PAGE, 4 * PAGE], "16 buffers in the first read, the 4 left in the next");
  assert.equal(got.length, 20);
  // More buffers than the bytes left need: one read, the buffers it did not reach given back.
  postRx(r, 8);
  got = got.concat(received(r));
  assert.deepEqual(reads.slice(2), [data.length - 20 * PAGE], "one read for the rest: short, so the socket is polled, not read again");
  assert.deepEqual(got.slice(20).map((p) => p.payload.length), [PAGE, PAGE, PAGE, PAGE, data.length - 24 * PAGE]);
  assert.equal(r.services.loop.active(streamFd), 1, "read dry: polled again");
  const tail = Buffer.from("the end");
  hostWrite(fd, tail);
  r.services.loop.fire(streamFd);
  got = got.concat(received(r));
  assert.deepEqual(got.map((p) => p.op), new Array<number>(26).fill(OP.rw));
  assert.ok(Buffer.concat(got.map((p) => p.payload)).equals(Buffer.concat([data, tail])), "every byte, in order, across batches");
  assert.equal(r.drv.queues[0]!.takeUsed().length, 0, "the 2 buffers never filled are still the guest's");
  assert.equal(r.dev.vsock.counters.rxBytes, data.length + tail.length);
  closeDescriptor(fd);
});

test("vsock: guest -> host output a full host stream does not take is held, flushed on POLLOUT, and credited; an overrun resets", () => {
  const bufferBytes = 256 * 1024;
  const r = make({ bufferBytes, rxBuffers: 16 });
  const fd = connectFromGuest(r);
  const chunk = Buffer.alloc(60000, 0x33);
  // The guest sends as Linux does, never beyond its credit (what the device last told it); the host does not read.
  let told = 0;
  let sent = 0;
  const hear = (): ReturnType<typeof received> => {
    const got = received(r);
    for (const p of got) told = p.fwdCnt;
    postRx(r, got.length);
    return got;
  };
  for (;;) {
    hear();
    const credit = bufferBytes - (sent - told);
    if (credit === 0) break;
    const n = Math.min(credit, chunk.length);
    send(r, { op: OP.rw }, chunk.subarray(0, n));
    sent += n;
  }
  assert.ok(sent >= bufferBytes && told > 0, `sent ${sent}, told ${told}: half-used credit was told`);
  const streamFd = [...r.services.loop.writableWatches.keys()][0]!;
  assert.equal(r.services.loop.activeWritable(streamFd), 1, "the rest is held, waiting for room in the host stream");
  // The host reads; the loop reports room; the held bytes go out and the blocked guest is told its credit.
  let total = 0;
  for (let i = 0; i < 10 && total < sent; i++) {
    total += hostRead(fd, 4 * MiB).bytes.length;
    r.services.loop.fireWritable(streamFd);
  }
  assert.equal(total, sent, "every byte reached the host, once");
  assert.equal(r.services.loop.activeWritable(streamFd), 0, "nothing held: no longer waiting for room");
  const after = hear();
  assert.ok(after.some((p) => p.op === OP.creditUpdate), `a credit update: ${JSON.stringify(after.map((p) => [p.op, p.fwdCnt]))}`);
  assert.ok(sent - told <= bufferBytes / 2, `the blocked guest was told of at least half its buffer again (sent ${sent}, told ${told})`);
  // Overrun: the host stops reading again and the guest ignores its credit.
  for (let i = 0; i < 20 && r.dev.vsock.connections > 0; i++) send(r, { op: OP.rw }, chunk);
  assert.equal(r.dev.vsock.counters.creditOverruns, 1);
  assert.equal(r.dev.vsock.connections, 0);
  assert.ok(hear().some((p) => p.op === OP.rst), "the guest is told RST");
  closeDescriptor(fd);
});

test("vsock: SHUTDOWN(SEND) from the guest shuts the host stream's write side; the host's end of stream is SHUTDOWN(SEND) to the guest", () => {
  const r = make();
  const fd = connectFromGuest(r);
  send(r, { op: OP.rw }, Buffer.from("last words"));
  send(r, { op: OP.shutdown, flags: VSOCK_SHUTDOWN.send });
  assert.deepEqual(hostRead(fd), { bytes: Buffer.from("last words"), eof: true });
  assert.equal(r.dev.vsock.connections, 1, "still open the other way");
  hostWrite(fd, Buffer.from("reply"));
  closeDescriptor(fd);
  // The loop's turns: the reply (a short read: the socket is polled again), then its end.
  let got: Packet[] = [];
  for (let turn = 0; turn < 3; turn++) {
    for (const k of [...r.services.loop.watches.keys()]) r.services.loop.fire(k);
    got = got.concat(received(r));
  }
  assert.deepEqual(got.map((p) => p.op), [OP.rw, OP.shutdown]);
  assert.equal(got[0]!.payload.toString(), "reply");
  // The guest had shut its side too: both flags, so Linux answers RST.
  assert.equal(got[1]!.flags, VSOCK_SHUTDOWN.send | VSOCK_SHUTDOWN.rcv);
  send(r, { op: OP.rst });
  assert.equal(r.dev.vsock.connections, 0);
});

test("vsock: hostile packets are counted and dropped or answered with RST; the device never needs a reset", () => {
  const r = make();
  const fd = connectFromGuest(r);
  const q = r.drv.queues[1]!;
  // Shorter than a header.
  const at = alloc(r, 64);
  q.add([{ addr: at, len: 20, write: false }]);
  q.kick();
  q.takeUsed();
  // Another source CID: not the guest's packet to answer.
  send(r, { op: OP.rw, srcCid: 9 }, Buffer.from("x"));
  assert.equal(r.dev.vsock.counters.badPackets, 2);
  assert.deepEqual(received(r), []);
  // A length beyond the payload: the connection is reset.
  send(r, { op: OP.rw }, Buffer.from("abc"), 4000);
  assert.equal(r.dev.vsock.counters.badPackets, 3);
  assert.deepEqual(received(r).map((p) => p.op), [OP.rst]);
  assert.equal(r.dev.vsock.connections, 0);
  assert.equal(hostRead(fd).eof, true);
  // Packets for no connection: RST (but never an RST for an RST).
  send(r, { op: OP.rw, srcPort: 77 }, Buffer.from("y"));
  send(r, { op: OP.rst, srcPort: 78 });
  send(r, { op: OP.creditRequest, srcPort: 79 });
  assert.deepEqual(received(r).map((p) => [p.op, p.dstPort]), [
    [OP.rst, 77],
    [OP.rst, 79],
  ]);
  // A receive buffer with room for a header only: returned unused.
  const rq = r.drv.queues[0]!;
  rq.add([{ addr: alloc(r, 64), len: VSOCK_HEADER, write: true }]);
  rq.kick();
  send(r, { op: OP.rw, srcPort: 80 }, Buffer.from("z"));
  assert.equal(r.dev.vsock.counters.badRxBuffers, 0, "only looked at when there is something to send");
  assert.equal((r.drv.status() & 0x40) === 0, true, "no DEVICE_NEEDS_RESET");
  closeDescriptor(fd);
});

test("vsock: RSTs the guest provokes while it posts no receive buffers are bounded", () => {
  const r = make({ rxBuffers: 0 });
  for (let i = 0; i < 600; i++) send(r, { op: OP.rw, srcPort: 10000 + i }, Buffer.from("?"));
  assert.equal(r.dev.vsock.counters.resetsDropped, 600 - 512);
  postRx(r, 32); // two descriptors each: the whole queue
  const got = received(r);
  assert.equal(got.length, 32);
  assert.ok(got.every((p, i) => p.op === OP.rst && p.dstPort === 10000 + i), "the oldest first");
});

test("vsock: a device reset closes every host stream", () => {
  const r = make();
  const fd = connectFromGuest(r);
  r.drv.reset();
  assert.equal(hostRead(fd).eof, true);
  assert.equal(r.dev.vsock.connections, 0);
  closeDescriptor(fd);
});

test("vsock: restored, the device tells the guest TRANSPORT_RESET on the event queue; a foreign state is refused", () => {
  const r = make();
  const fd = connectFromGuest(r);
  const ev = r.drv.queues[2]!;
  const evAt = alloc(r, 16);
  r.services.memory.write(evAt, new Uint8Array([0xff, 0xff, 0xff, 0xff]));
  ev.add([{ addr: evAt, len: 4, write: true }]);
  ev.kick();
  assert.deepEqual(ev.takeUsed(), [], "no event while running");
  const saved = r.dev.save();
  // A second device over the same RAM, as after a restore (its host streams are new).
  const dev2 = createVirtioVsock("vsock0", new TestHost(), r.services, { guestCid: GUEST, queueSize: 64 });
  placeDevice(dev2);
  assert.throws(() => dev2.vsock.restore({ kind: "virtio-console", version: 2 }), /not virtio-vsock v1/);
  dev2.restore(saved);
  assert.deepEqual(ev.takeUsed().map((u) => u.len), [4], "one event");
  assert.deepEqual([...r.services.memory.read(evAt, 4)], [0, 0, 0, 0], "TRANSPORT_RESET (id 0)");
  assert.equal(dev2.vsock.connections, 0);
  closeDescriptor(fd);
});

test("vsock: a guest that closes while its output waits for the host: RST at once, the stream closed once drained, or at a device reset", () => {
  for (const end of ["drain", "reset"] as const) {
    const r = make({ rxBuffers: 16 });
    const fd = connectFromGuest(r);
    const chunk = Buffer.alloc(60000, 0x44);
    let sent = 0;
    while (r.services.loop.writableWatches.size === 0 && sent < 240000) {
      send(r, { op: OP.rw }, chunk);
      sent += chunk.length;
    }
    const streamFd = [...r.services.loop.writableWatches.keys()][0]!;
    received(r);
    send(r, { op: OP.shutdown, flags: VSOCK_SHUTDOWN.rcv | VSOCK_SHUTDOWN.send });
    assert.deepEqual(received(r).map((p) => p.op), [OP.rst], "the guest gets its RST at once");
    assert.equal(r.dev.vsock.connections, 0);
    assert.equal(r.services.loop.activeWritable(streamFd), 1, "the held output still waits for the host");
    let got = hostRead(fd, 4 * MiB);
    assert.equal(got.eof, false, "not closed before its output is out");
    if (end === "drain") {
      r.services.loop.fireWritable(streamFd);
      const rest = hostRead(fd, 4 * MiB);
      assert.equal(got.bytes.length + rest.bytes.length, sent, "every byte, then the end");
      got = rest;
    } else {
      r.drv.reset();
      got = hostRead(fd, 4 * MiB);
    }
    assert.equal(got.eof, true, `${end}: the host stream is closed`);
    assert.equal(r.services.loop.activeWritable(streamFd), 0);
    closeDescriptor(fd);
  }
});

test("vsock: a batch's RW packets go out with one writev, in order, before the SHUTDOWN that follows them; a short write keeps the rest in order", () => {
  for (const full of [false, true]) {
    const r = make({ hostMapped: true, rxBuffers: 16 });
    const fd = connectFromGuest(r);
    let filler = 0;
    if (full) {
      // Fill the host socket almost to the top (the host does not read yet), so the batch's write is short.
      const junk = Buffer.alloc(4096, 0x2e);
      while (r.services.loop.writableWatches.size === 0) {
        send(r, { op: OP.rw }, junk);
        filler += junk.length;
      }
      r.services.loop.fireWritable([...r.services.loop.writableWatches.keys()][0]!); // still full: stays held
    }
    const q = r.drv.queues[1]!;
    const parts = Array.from({ length: 6 }, (_, i) => Buffer.alloc(3000 + i * 100, 0x41 + i));
    const hdrs = parts.map((p) => queuePacket(r, { op: OP.rw }, p));
    queuePacket(r, { op: OP.shutdown, flags: VSOCK_SHUTDOWN.send });
    const writes = r.host.hostWrites.length;
    q.kick();
    assert.equal(q.takeUsed().length, 7, "every packet used once the batch is done");
    if (!full) assert.deepEqual(r.host.hostWrites.slice(writes), [parts.reduce((n, p) => n + p.length, 0)], "the 6 payloads in one writev");
    // The guest may reuse its buffers now: scribble over the payloads (kept bytes must have been copied).
    for (const hdr of hdrs) r.services.memory.write(hdr, new Uint8Array(VSOCK_HEADER));
    let got = Buffer.alloc(0);
    for (let i = 0; i < 20; i++) {
      const { bytes, eof } = hostRead(fd, 4 * MiB);
      got = Buffer.concat([got, bytes]);
      if (eof) break;
      const w = [...r.services.loop.writableWatches.keys()][0];
      if (w !== undefined) r.services.loop.fireWritable(w);
    }
    assert.equal(got.length, filler + parts.reduce((n, p) => n + p.length, 0), `${full ? "short write" : "one write"}: every byte`);
    assert.ok(got.subarray(filler).equals(Buffer.concat(parts)), "in order, after the filler");
    closeDescriptor(fd);
  }
});

test("vsock: a batch switching between connections writes each run of one connection's packets in one writev, each stream in order", () => {
  const r = make({ hostMapped: true, rxBuffers: 16 });
  const a = connectFromGuest(r);
  send(r, { op: OP.request, srcPort: 5001 });
  assert.deepEqual(received(r).map((p) => p.op), [OP.response]);
  postRx(r, 1);
  const b = r.host.ends.at(-1)!.fd;
  const q = r.drv.queues[1]!;
  const piece = (c: number, n: number): Buffer => Buffer.alloc(n, c);
  const sent = [
    [5000, piece(0x61, 1000)],
    [5000, piece(0x62, 2000)],
    [5001, piece(0x63, 1500)],
    [5000, piece(0x64, 500)],
    [5001, piece(0x65, 700)],
    [5001, piece(0x66, 800)],
  ] as const;
  for (const [port, data] of sent) queuePacket(r, { op: OP.rw, srcPort: port }, data);
  const writes = r.host.hostWrites.length;
  q.kick();
  assert.equal(q.takeUsed().length, sent.length);
  assert.deepEqual(r.host.hostWrites.slice(writes), [3000, 1500, 500, 1500], "a writev per run of one connection's packets");
  assert.ok(hostRead(a).bytes.equals(Buffer.concat([sent[0][1], sent[1][1], sent[3][1]])));
  assert.ok(hostRead(b).bytes.equals(Buffer.concat([sent[2][1], sent[4][1], sent[5][1]])));
  closeDescriptor(a);
  closeDescriptor(b);
});

test("vsock: a guest that overruns its credit within a batch: what it sent before goes out, then the connection resets", () => {
  const r = make({ hostMapped: true, bufferBytes: 8192 });
  const fd = connectFromGuest(r);
  const q = r.drv.queues[1]!;
  const parts = [Buffer.alloc(4000, 0x31), Buffer.alloc(4000, 0x32), Buffer.alloc(4000, 0x33)];
  for (const p of parts) queuePacket(r, { op: OP.rw }, p);
  q.kick();
  assert.equal(q.takeUsed().length, 3, "every chain used");
  assert.equal(r.dev.vsock.counters.creditOverruns, 1);
  assert.deepEqual(received(r).map((p) => p.op), [OP.rst]);
  const got = hostRead(fd);
  assert.ok(got.bytes.equals(Buffer.concat([parts[0]!, parts[1]!])), "the 8000 bytes within its credit, then the end");
  assert.equal(got.eof, true);
  assert.equal(r.dev.vsock.connections, 0);
  closeDescriptor(fd);
});

test("vsock: a payload in more pieces than one writev takes (copied, not written from guest RAM) keeps its place after the one before", () => {
  const r = make({ hostMapped: true });
  const fd = connectFromGuest(r);
  const q = r.drv.queues[1]!;
  const first = Buffer.alloc(1000, 0x31);
  queuePacket(r, { op: OP.rw }, first);
  // 40 descriptors of 10 bytes (an indirect table: more than the ring's free descriptors).
  const pieces = Array.from({ length: 40 }, (_, i) => Buffer.alloc(10, 0x61 + (i % 26)));
  queuePacket(r, { op: OP.rw }, Buffer.concat(pieces), 400, 10);
  q.kick();
  assert.equal(q.takeUsed().length, 2);
  assert.ok(hostRead(fd).bytes.equals(Buffer.concat([first, ...pieces])), "in the order sent");
  closeDescriptor(fd);
});

/** Send guest data until the host stream (not read) is full and the device holds the rest: the bytes sent. */
function fillHostStream(r: Rig, srcPort = 5000): number {
  const chunk = Buffer.alloc(60000, 0x55);
  let sent = 0;
  const before = r.services.loop.writableWatches.size;
  while (r.services.loop.writableWatches.size === before) {
    send(r, { op: OP.rw, srcPort }, chunk);
    sent += chunk.length;
  }
  return sent;
}

test("vsock: connections the guest closed that still drain to the host count against the limit", () => {
  const services = makeServices(8 * MiB);
  const host = new TestHost();
  host.services.add(1234);
  const dev = createVirtioVsock("vsock0", host, services, { guestCid: GUEST, queueSize: 64, maxConnections: 2 });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({}), true);
  const r: Rig = { services, host, dev, drv, next: 0x100000, rxBufs: new Map() };
  postRx(r, 16);
  for (const port of [5000, 5001]) {
    send(r, { op: OP.request, srcPort: port });
    fillHostStream(r, port);
    send(r, { op: OP.shutdown, srcPort: port, flags: VSOCK_SHUTDOWN.rcv | VSOCK_SHUTDOWN.send });
  }
  assert.equal(dev.vsock.connections, 0);
  assert.equal(dev.vsock.drainingConnections, 2, "both still hold output for their host programs");
  received(r);
  send(r, { op: OP.request, srcPort: 5002 });
  assert.deepEqual(received(r).map((p) => p.op), [OP.rst], "at the limit: refused");
  // One host program reads everything: that connection closes, and there is room again.
  const first = host.ends[0]!.fd;
  const w = [...services.loop.writableWatches.keys()][0]!;
  for (let i = 0; i < 20 && dev.vsock.drainingConnections === 2; i++) {
    hostRead(first, 4 * MiB);
    services.loop.fireWritable(w);
  }
  assert.equal(dev.vsock.drainingConnections, 1);
  postRx(r, 4);
  send(r, { op: OP.request, srcPort: 5003 });
  assert.deepEqual(received(r).map((p) => p.op), [OP.response]);
  for (const e of host.ends) closeDescriptor(e.fd);
});

test("vsock: the guest's last bytes reach the host even when it answers the device's SHUTDOWN(SEND|RCV) with RST while they wait", () => {
  const r = make();
  const fd = connectFromGuest(r);
  const sent = fillHostStream(r);
  send(r, { op: OP.shutdown, flags: VSOCK_SHUTDOWN.send });
  // The host program ends its side too (and keeps reading): the device reads the end of its stream.
  shutdownStream(fd, "write");
  for (const k of [...r.services.loop.watches.keys()]) r.services.loop.fire(k);
  const got = received(r);
  assert.equal(got.at(-1)?.op, OP.shutdown);
  assert.equal(got.at(-1)!.flags, VSOCK_SHUTDOWN.send | VSOCK_SHUTDOWN.rcv);
  // Linux: both sides shut and nothing to read: RST at once.
  send(r, { op: OP.rst });
  assert.equal(r.dev.vsock.connections, 0);
  const w = [...r.services.loop.writableWatches.keys()][0]!;
  let total = 0;
  let eof = false;
  for (let i = 0; i < 20 && !eof; i++) {
    const h = hostRead(fd, 4 * MiB);
    total += h.bytes.length;
    eof = h.eof;
    r.services.loop.fireWritable(w);
  }
  assert.equal(total, sent, "every byte the guest sent");
  assert.equal(eof, true, "then the end of the stream");
  closeDescriptor(fd);
});

test("vsock: a host program's connection the guest does not answer within 2 s is closed (RST to the guest); one answered in time is not", () => {
  let now = 1000;
  const services = makeServices(8 * MiB);
  const dev = createVirtioVsock("vsock0", new TestHost(), services, { guestCid: GUEST, queueSize: 64, clock: () => now });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  assert.equal(drv.init({}), true);
  const r: Rig = { services, host: new TestHost(), dev, drv, next: 0x100000, rxBufs: new Map() };
  postRx(r, 8);
  const [slow, slowTheirs] = socketPair("stream");
  const [quick, quickTheirs] = socketPair("stream");
  dev.vsock.connectFromHost(70, socketStream(slowTheirs));
  now += 1500;
  dev.vsock.connectFromHost(71, socketStream(quickTheirs));
  const reqs = received(r);
  assert.deepEqual(reqs.map((p) => [p.op, p.dstPort]), [
    [OP.request, 70],
    [OP.request, 71],
  ]);
  send(r, { op: OP.response, srcPort: 71, dstPort: reqs[1]!.srcPort });
  now += 600; // the first is 2100 ms old, the second answered
  services.loop.fire(dev.vsock.alarmFd!);
  assert.equal(dev.vsock.counters.connectTimeouts, 1);
  assert.deepEqual(hostRead(slow), { bytes: Buffer.alloc(0), eof: true }, "the unanswered program's socket is closed, no OK");
  assert.equal(hostRead(quick).bytes.toString(), `OK ${reqs[1]!.srcPort}\n`);
  assert.deepEqual(received(r).map((p) => [p.op, p.dstPort]), [[OP.rst, 70]], "the guest is told, should it answer late");
  assert.equal(dev.vsock.connections, 1);
  now += 5000; // long past the second one's deadline: answered, it stays
  services.loop.fire(dev.vsock.alarmFd!);
  assert.equal(dev.vsock.counters.connectTimeouts, 1);
  assert.equal(dev.vsock.connections, 1);
  closeDescriptor(slow);
  closeDescriptor(quick);
  dev.vsock.close();
});
