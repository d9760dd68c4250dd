/**
 * Host-side virtio-vsock micro-benchmark, no guest: one connection between
 * the test driver (the guest side, over a memfd-mapped "guest RAM" as in the
 * worker) and a real AF_UNIX socket pair (the host program's end read or
 * written in the same thread). Packets as Linux 6.1 makes them: a 44-byte
 * header descriptor and a 4 KiB payload descriptor.
 *
 *  - guest -> host: batches of 32 RW packets on the transmit queue, one
 *    notification per batch; the host end is read dry after each batch; the
 *    guest keeps to its credit (the device's CREDIT_UPDATEs are reaped).
 *  - host -> guest: the host end writes 128 KiB; the loop (poll(2), as the
 *    device thread's) finds it readable; the device fills the guest's
 *    receive buffers (one readv into up to 16 of them); the driver reaps
 *    them, posts them again and tells its credit (CREDIT_UPDATE) as Linux
 *    does.
 *
 * Reports MiB/s (wall clock), host CPU per GiB (process.cpuUsage), and
 * packets/s, as a markdown table. The driver here is the test driver, not a
 * lean one: its cost is in the figures (an upper bound on the device's).
 *
 *   npx tsc -p . && node dist/bench/devices/vsock-host.js [--seconds S]
 */
import { cpus, loadavg } from "node:os";
import { receiveStream, sendStream, socketPair } from "../../src/hypervisor/host-network.js";
import { POLLIN, POLLOUT, poll } from "../../src/hypervisor/libc.js";
import { VSOCK_HDR as H, VSOCK_HEADER, VSOCK_OP as OP, createVirtioVsock, type VsockHostStream } from "../../src/devices/virtio/virtio-vsock.js";
import { socketStream } from "../../src/worker/vsock-host.js";
import { TestVirtioDriver, makeServices, placeDevice } from "../../test/devices/virtio/virtio-driver.js";

const SECONDS = Number(process.argv[process.argv.indexOf("--seconds") + 1] || 5);
const PAYLOAD = 4096;
const BATCH = 32;
const GUEST_BUF_ALLOC = 256 * 1024;
/** What the device offers per connection (its default). */
const DEVICE_BUF_ALLOC = 256 * 1024;

interface Row {
  direction: string;
  mibPerSecond: number;
  cpuPerGiB: number;
  packetsPerSecond: number;
}

/** The device thread's loop, run by hand: one live watch per fd and direction (the test fake keeps every watch ever made). */
class BenchLoop {
  readonly readable = new Map<number, () => void>();
  readonly writable = new Map<number, () => void>();
  watch(fd: number, handler: () => void) {
    this.readable.set(fd, handler);
    return { close: () => void (this.readable.get(fd) === handler && this.readable.delete(fd)) };
  }
  watchWritable(fd: number, handler: () => void) {
    this.writable.set(fd, handler);
    return { close: () => void (this.writable.get(fd) === handler && this.writable.delete(fd)) };
  }
  defer(task: () => void): void {
    task();
  }
  private readonly fds = new Int32Array(2 * 8);
  /** One turn of the device thread's loop: poll the watched descriptors (no wait), run the handlers of those ready; how many ran. */
  fire(): number {
    const handlers: (() => void)[] = [];
    let n = 0;
    for (const [kind, map] of [[POLLIN, this.readable], [POLLOUT, this.writable]] as const)
      for (const [fd, h] of map) {
        this.fds[2 * n] = fd;
        this.fds[2 * n + 1] = kind;
        handlers.push(h);
        n++;
      }
    if (n === 0 || poll(this.fds, n, 0) <= 0) return 0;
    let ran = 0;
    for (let i = 0; i < n; i++)
      if (this.fds[2 * i + 1]! >>> 16 !== 0) {
        handlers[i]!();
        ran++;
      }
    return ran;
  }
}

function rig() {
  const loop = new BenchLoop();
  const services = { ...makeServices(16 << 20, 1 << 30, true), loop } as unknown as ReturnType<typeof makeServices>;
  let hostEnd = -1;
  const dev = createVirtioVsock("vsock-bench", {
    connect: (): VsockHostStream => {
      const [a, b] = socketPair("stream");
      hostEnd = b;
      return socketStream(a);
    },
  }, services, { guestCid: 3, queueSize: 256 });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  if (!drv.init({})) throw new Error("driver init failed");
  const rx = drv.queues[0]!;
  const tx = drv.queues[1]!;
  // Fixed buffers: rx slots (header + page) and tx packets.
  const RX_SLOTS = 64; // 128 of the queue's 256 descriptors
  const rxAt = 0x100000;
  const post = (slot: number): void => {
    rx.add([
      { addr: rxAt + slot * 0x2000, len: VSOCK_HEADER, write: true },
      { addr: rxAt + slot * 0x2000 + 0x1000, len: PAYLOAD, write: true },
    ]);
  };
  for (let i = 0; i < RX_SLOTS; i++) post(i);
  rx.kick();
  const hdrAt = 0x400000;
  const dataAt = 0x500000;
  const header = new Uint8Array(VSOCK_HEADER);
  const v = new DataView(header.buffer);
  const packet = (op: number, len: number, fwdCnt: number, at: number): void => {
    v.setUint32(H.srcCid, 3, true);
    v.setUint32(H.dstCid, 2, true);
    v.setUint32(H.srcPort, 5000, true);
    v.setUint32(H.dstPort, 1234, true);
    v.setUint32(H.len, len, true);
    v.setUint16(H.type, 1, true);
    v.setUint16(H.op, op, true);
    v.setUint32(H.bufAlloc, GUEST_BUF_ALLOC, true);
    v.setUint32(H.fwdCnt, fwdCnt, true);
    services.memory.write(at, header);
  };
  services.memory.write(dataAt, new Uint8Array(PAYLOAD).fill(0x61));
  packet(OP.request, 0, 0, hdrAt);
  tx.add([{ addr: hdrAt, len: VSOCK_HEADER, write: false }]);
  tx.kick();
  tx.takeUsed();
  // The RESPONSE's buffer: posted again.
  if (rx.takeUsed().length !== 1) throw new Error("no RESPONSE");
  post(0);
  rx.kick();
  /** The rx slot a used chain was posted in (from its head descriptor's address). */
  const slotOf = (head: number): number => {
    const d = services.memory.read(rx.desc + head * 16, 8);
    return (new DataView(d.buffer, d.byteOffset).getUint32(0, true) - rxAt) / 0x2000;
  };
  return { services, loop, dev, drv, rx, tx, post, packet, slotOf, hdrAt, dataAt, hostEnd: () => hostEnd, rxAt };
}

/** Start measuring: call the result when done with the bytes and packets moved. */
function measure(direction: string): (bytes: number, packets: number) => Row {
  const start = process.hrtime.bigint();
  const cpu0 = process.cpuUsage();
  return (bytes, packets) => {
    const wall = Number(process.hrtime.bigint() - start) / 1e9;
    const c = process.cpuUsage(cpu0);
    return { direction, mibPerSecond: bytes / wall / 2 ** 20, cpuPerGiB: (c.user + c.system) / 1e6 / (bytes / 2 ** 30), packetsPerSecond: packets / wall };
  };
}

function guestToHost(): Row {
  const r = rig();
  const fd = r.hostEnd();
  const sink = new Uint8Array(1 << 20);
  // One header per batch slot; each packet: header + the shared payload page.
  for (let i = 0; i < BATCH; i++) r.packet(OP.rw, PAYLOAD, 0, r.hdrAt + i * 64);
  let told = 0; // the device's fwd_cnt, a u32 (it wraps after 4 GiB)
  let sent = 0;
  let packets = 0;
  const done = measure("guest -> host");
  const until = Date.now() + SECONDS * 1000;
  while (Date.now() < until) {
    let n = 0;
    while (n < BATCH && DEVICE_BUF_ALLOC - ((sent - told) >>> 0) >= PAYLOAD) {
      r.tx.add([
        { addr: r.hdrAt + n * 64, len: VSOCK_HEADER, write: false },
        { addr: r.dataAt, len: PAYLOAD, write: false },
      ]);
      n++;
      sent += PAYLOAD;
    }
    r.tx.kick();
    r.tx.takeUsed();
    packets += n;
    while (receiveStream(fd, sink, sink.length) > 0);
    // The device's credit updates (and nothing else) come back on rx.
    for (const u of r.rx.takeUsed()) {
      const slot = r.slotOf(u.id);
      const h = r.services.memory.read(r.rxAt + slot * 0x2000, VSOCK_HEADER);
      told = new DataView(h.buffer, h.byteOffset).getUint32(H.fwdCnt, true);
      r.post(slot);
    }
    r.rx.kick();
    if (n === 0) throw new Error(`stalled: sent ${sent}, credit told for ${told}`);
  }
  return done(packets * PAYLOAD, packets);
}

function hostToGuest(): Row {
  const r = rig();
  const fd = r.hostEnd();
  const chunk = new Uint8Array(128 * 1024).fill(0x62);
  let fwd = 0;
  let received = 0;
  let packets = 0;
  const done = measure("host -> guest");
  const until = Date.now() + SECONDS * 1000;
  let hdrSlot = 0;
  while (Date.now() < until) {
    sendStream(fd, chunk, chunk.length);
    // The device thread's loop: woken while the host end has bytes for the guest.
    while (r.loop.fire() > 0) {
      for (const u of r.rx.takeUsed()) {
        received += u.len - VSOCK_HEADER;
        packets++;
        r.post(r.slotOf(u.id));
      }
      r.rx.kick();
      // The guest read what it received: it tells its credit, as Linux does when its free space runs low.
      if (received - fwd >= GUEST_BUF_ALLOC / 2) {
        fwd = received;
        r.packet(OP.creditUpdate, 0, fwd >>> 0, r.hdrAt + (hdrSlot++ % 64) * 64);
        r.tx.add([{ addr: r.hdrAt + ((hdrSlot - 1) % 64) * 64, len: VSOCK_HEADER, write: false }]);
        r.tx.kick();
        r.tx.takeUsed();
      }
    }
  }
  return done(received, packets);
}

const rows = [guestToHost(), hostToGuest()];
console.log(`virtio-vsock host-side bench: ${SECONDS} s per direction, 4 KiB packets, ${cpus().length} CPUs (${cpus()[0]?.model ?? "?"}), load ${loadavg()[0]!.toFixed(2)}`);
console.log("| direction | MiB/s | CPU s/GiB | packets/s |");
console.log("|---|---:|---:|---:|");
for (const r of rows) console.log(`| ${r.direction} | ${r.mibPerSecond.toFixed(1)} | ${r.cpuPerGiB.toFixed(2)} | ${Math.round(r.packetsPerSecond)} |`);
