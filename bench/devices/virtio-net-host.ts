/**
 * Host-side virtio-net micro-benchmark, no guest: frames go from one
 * virtio-net device's transmit queue through a network port to a second
 * device's receive queue, both driven by a lean in-process driver over
 * "guest RAM" that is a memfd mapping, as in the worker (rings set up the way Linux does, through the BARs,
 * by the test driver; the hot loop then writes the avail rings directly and
 * kicks through the doorbell callbacks, as KVM's ioeventfd would).
 *
 * Ports: the in-memory pair (eventfd-signalled queues) and the AF_UNIX
 * datagram pair (real sockets; a batch stays under net.unix.max_dgram_qlen,
 * so nothing is dropped). Frames: 64 and 1500 bytes. Features as Linux
 * negotiates them here: VERSION_1, EVENT_IDX, MAC, STATUS, MRG_RXBUF.
 *
 * Transmit: ports that can send from host memory (the datagram pair, once
 * connected) get each frame straight from guest RAM (writev); the in-memory
 * pair gets a copy. `--anonymous` puts guest RAM in plain JS buffers instead
 * (no host addresses, so every frame is copied, as before the zero-copy path).
 *
 * Reports frames/s (wall clock), frames per CPU-second (process.cpuUsage,
 * user+system: steadier on a shared machine), Gbit/s of frame bytes, and host
 * CPU per GiB of frames, and JS heap bytes allocated per frame with the
 * collections they caused (bench/heap-meter.ts), as a markdown table. Everything runs on one
 * thread: the numbers are the device model's cost (plus the lean driver's and
 * the port's), not a guest's.
 *
 *   npx tsc -p . && node dist/bench/devices/virtio-net-host.js [--seconds S] [--only memory|dgram] [--anonymous] [--filter]
 * Default: 5 s per case, 4 cases (< 60 s with set-up).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir, cpus, loadavg } from "node:os";
import { join } from "node:path";
import type { PciDeviceServices } from "../../src/devices/pci/device-thread-services.js";
import type { MsiSink } from "../../src/devices/pci/msix.js";
import type { IrqLine } from "../../src/devices/dependencies.js";
import { VIRTIO_F, featureBit } from "../../src/devices/virtio/pci-transport.js";
import { DatagramPairPort, MemoryPortPair, type NetworkPort } from "../../src/devices/net/network-port.js";
import { VIRTIO_NET_CTRL, VIRTIO_NET_F, VIRTIO_NET_HDR_BYTES, createVirtioNet, type VirtioNetDevice } from "../../src/devices/net/virtio-net.js";
import { TestVirtioDriver, makeServices, placeDevice, type DriverQueue, type TestServices } from "../../test/devices/virtio/virtio-driver.js";
import { HeapMeter, type HeapUse } from "../heap-meter.js";

const QUEUE = 256;
const SLOT = 2048;
const BUFFERS = 0x10_0000;
const RAM = 4 << 20;

const nullMsi: MsiSink = { signal: () => {} };
class CountingIrq implements IrqLine {
  setLevel(): void {}
}

const ANONYMOUS = process.argv.includes("--anonymous");

function services(): TestServices {
  const s = makeServices(RAM, 1 << 30, !ANONYMOUS);
  // Interrupts go nowhere (the lean driver reaps the used rings itself).
  return { ...s, intx: new CountingIrq(), msi: nullMsi } as unknown as TestServices;
}

/** The driver side of one queue in the hot loop: typed-array views of the rings. */
class LeanQueue {
  readonly avail: Uint16Array;
  readonly usedWords: Uint32Array;
  readonly usedHalves: Uint16Array;
  availIdx = 0;
  lastUsed = 0;
  private readonly mask: number;
  constructor(
    s: PciDeviceServices,
    readonly q: DriverQueue,
    private readonly kick: () => void,
  ) {
    const a = s.memory.bytes(q.avail, 6 + 2 * q.size);
    this.avail = new Uint16Array(a.buffer, a.byteOffset, 3 + q.size);
    const u = s.memory.bytes(q.used, 8 + 8 * q.size);
    this.usedWords = new Uint32Array(u.buffer, u.byteOffset, 2 + 2 * q.size);
    this.usedHalves = new Uint16Array(u.buffer, u.byteOffset, 4 + 4 * q.size);
    this.mask = q.size - 1;
    this.availIdx = q.availIdx;
  }
  publish(head: number): void {
    this.avail[2 + (this.availIdx & this.mask)] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }
  /** Make the published entries visible and kick when the device asked (EVENT_IDX, vring_need_event). */
  commit(old: number): void {
    Atomics.store(this.avail, 1, this.availIdx);
    const event = Atomics.load(this.usedHalves, 2 + 4 * this.q.size);
    if (((this.availIdx - event - 1) & 0xffff) < ((this.availIdx - old) & 0xffff)) this.kick();
  }
  /** Used entries since the last call: heads into `out`; returns how many. */
  reap(out: Uint16Array): number {
    const idx = Atomics.load(this.usedHalves, 1);
    let n = 0;
    while (this.lastUsed !== idx) {
      out[n++] = this.usedWords[1 + 2 * (this.lastUsed & this.mask)]!;
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return n;
  }
}

interface Case {
  readonly port: "memory" | "dgram";
  readonly frameBytes: number;
}

interface Result extends Case {
  frames: number;
  seconds: number;
  cpuSeconds: number;
  dropped: number;
  /** Frames the sending device handed to its port straight from guest RAM. */
  zeroCopy: number;
  /** JS heap allocated in the measured loop (both VMs' devices and drivers, and the harness). */
  heap: HeapUse;
}

/**
 * `--filter`: the drivers negotiate the control queue and CTRL_RX and turn
 * promiscuous mode off, as Linux does when it opens the interface, so every
 * received frame is matched against the receiving device's address.
 */
const FILTER = process.argv.includes("--filter");

function setUp(name: string, port: NetworkPort, mac: Uint8Array): { s: TestServices; dev: VirtioNetDevice; drv: TestVirtioDriver } {
  const s = services();
  const dev = createVirtioNet(name, port, s, { mac, queueSize: QUEUE });
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, s);
  let want = featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.eventIdx) | featureBit(VIRTIO_NET_F.mac) | featureBit(VIRTIO_NET_F.status) | featureBit(VIRTIO_NET_F.mrgRxbuf);
  if (FILTER) want |= featureBit(VIRTIO_NET_F.ctrlVq) | featureBit(VIRTIO_NET_F.ctrlRx);
  if (!drv.init({ want, msix: true })) throw new Error("feature negotiation failed");
  if (FILTER) {
    // VIRTIO_NET_CTRL_RX_PROMISC off: class, command, data, then the device's ack byte.
    const cmd = 0x30_0000;
    s.memory.write(cmd, Uint8Array.from([VIRTIO_NET_CTRL.rx, 0, 0]));
    const cq = drv.queues[2]!;
    cq.add([
      { addr: cmd, len: 3, write: false },
      { addr: cmd + 16, len: 1, write: true },
    ]);
    cq.kick();
    if (cq.takeUsed().length !== 1 || s.memory.read(cmd + 16, 1)[0] !== VIRTIO_NET_CTRL.ok || dev.net.filter.promiscuous) throw new Error("promiscuous mode was not turned off");
  }
  return { s, dev, drv };
}

function runCase(c: Case, seconds: number): Result {
  const dir = mkdtempSync(join(tmpdir(), "partis-vnet-bench-"));
  let a: NetworkPort;
  let b: NetworkPort;
  let closePorts: () => void;
  if (c.port === "memory") {
    const pair = new MemoryPortPair("bench", 512);
    a = pair.a;
    b = pair.b;
    closePorts = () => pair.close();
  } else {
    const pa = DatagramPairPort.open(join(dir, "a.sock"), join(dir, "b.sock"));
    const pb = DatagramPairPort.open(join(dir, "b.sock"), join(dir, "a.sock"));
    a = pa;
    b = pb;
    closePorts = () => {
      pa.close();
      pb.close();
    };
  }
  const macA = Uint8Array.from([0x52, 0x54, 0, 0, 0, 0xa0]);
  const macB = Uint8Array.from([0x52, 0x54, 0, 0, 0, 0xb0]);
  const A = setUp("vnet-a", a, macA);
  const B = setUp("vnet-b", b, macB);
  const txq = A.drv.queues[1]!;
  const rxq = B.drv.queues[0]!;
  const tx = new LeanQueue(A.s, txq, () => A.s.doorbells.ring(1));
  const rx = new LeanQueue(B.s, rxq, () => B.s.doorbells.ring(0));

  // Descriptor i of each queue names buffer slot i for good.
  const total = VIRTIO_NET_HDR_BYTES + c.frameBytes;
  const frame = new Uint8Array(total);
  frame.set(macB, VIRTIO_NET_HDR_BYTES);
  frame.set(macA, VIRTIO_NET_HDR_BYTES + 6);
  frame[VIRTIO_NET_HDR_BYTES + 12] = 0x88;
  frame[VIRTIO_NET_HDR_BYTES + 13] = 0xb5;
  for (let i = 14; i < c.frameBytes; i++) frame[VIRTIO_NET_HDR_BYTES + i] = i & 0xff;
  for (let i = 0; i < QUEUE; i++) {
    A.s.memory.write(BUFFERS + i * SLOT, frame);
    txq.writeDesc(txq.desc, i, BUFFERS + i * SLOT, total, 0, 0);
    rxq.writeDesc(rxq.desc, i, BUFFERS + i * SLOT, SLOT, 2, 0);
  }
  // All receive buffers up front; transmit heads from a free list.
  let old = rx.availIdx;
  for (let i = 0; i < QUEUE; i++) rx.publish(i);
  rx.commit(old);
  const free = new Uint16Array(QUEUE);
  let freeCount = QUEUE;
  for (let i = 0; i < QUEUE; i++) free[i] = i;
  const reaped = new Uint16Array(QUEUE);
  // A datagram batch stays under the receiver's queue length limit (net.unix.max_dgram_qlen, 10 by default).
  const batch = c.port === "memory" ? 128 : 8;

  let frames = 0;
  const meter = new HeapMeter();
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const deadline = t0 + BigInt(Math.round(seconds * 1e9));
  for (let round = 0; ; round++) {
    if ((round & 63) === 0 && process.hrtime.bigint() >= deadline) break;
    // Guest A queues a batch for transmission and kicks.
    old = tx.availIdx;
    const n = Math.min(batch, freeCount);
    for (let i = 0; i < n; i++) tx.publish(free[--freeCount]!);
    tx.commit(old);
    // The device thread of B sees its port readable.
    B.s.loop.fire(b.fd);
    // Guest B takes the frames and gives the buffers back.
    const got = rx.reap(reaped);
    frames += got;
    old = rx.availIdx;
    for (let i = 0; i < got; i++) rx.publish(reaped[i]!);
    rx.commit(old);
    // Guest A reclaims its transmit buffers.
    const done = tx.reap(reaped);
    for (let i = 0; i < done; i++) free[freeCount++] = reaped[i]!;
  }
  const t1 = process.hrtime.bigint();
  const cpu = process.cpuUsage(cpu0);
  const heap = meter.stop();
  // Check one received frame.
  const sample = B.s.memory.read(BUFFERS + VIRTIO_NET_HDR_BYTES, c.frameBytes);
  for (let i = 0; i < c.frameBytes; i++) if (sample[i] !== frame[VIRTIO_NET_HDR_BYTES + i]) throw new Error(`received frame differs at byte ${i}`);
  const dropped = A.dev.net.counters.txDropped + B.dev.net.counters.rxDropped;
  const sentFrames = A.dev.net.counters.txFrames;
  const zeroCopy = sentFrames === 0 ? 0 : A.dev.net.counters.txZeroCopy / sentFrames;
  A.dev.net.close();
  B.dev.net.close();
  closePorts();
  rmSync(dir, { recursive: true, force: true });
  return { ...c, frames, seconds: Number(t1 - t0) / 1e9, cpuSeconds: (cpu.user + cpu.system) / 1e6, dropped, zeroCopy, heap };
}

function main(): void {
  const args = process.argv.slice(2);
  const secIdx = args.indexOf("--seconds");
  const seconds = secIdx >= 0 ? Number(args[secIdx + 1]) : 5;
  const onlyIdx = args.indexOf("--only");
  const only = onlyIdx >= 0 ? args[onlyIdx + 1] : undefined;
  const cases: Case[] = [];
  for (const port of ["memory", "dgram"] as const) for (const frameBytes of [64, 1500]) if (only === undefined || only === port) cases.push({ port, frameBytes });
  // Warm up the JIT on a short run of each path.
  for (const c of cases) runCase(c, 0.3);
  const results = cases.map((c) => runCase(c, seconds));
  console.log(
    `virtio-net host path, ${cpus()[0]?.model ?? "?"} x${cpus().length}, load ${loadavg()[0]!.toFixed(2)}, node ${process.version}, ${seconds} s per case, guest RAM ${ANONYMOUS ? "in JS buffers" : "a memfd mapping"}\n`,
  );
  console.log("| port | frame bytes | frames/s (wall) | frames per CPU-second | Gbit/s (wall) | host CPU s per GiB | dropped | sent from guest RAM | heap bytes/frame | GCs |");
  console.log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
  for (const r of results) {
    const fps = r.frames / r.seconds;
    const gib = (r.frames * r.frameBytes) / 2 ** 30;
    console.log(
      `| ${r.port === "memory" ? "in-memory pair" : "AF_UNIX datagram pair"} | ${r.frameBytes} | ${Math.round(fps).toLocaleString("en-US")} | ${Math.round(r.frames / r.cpuSeconds).toLocaleString("en-US")} | ${((fps * r.frameBytes * 8) / 1e9).toFixed(2)} | ${(r.cpuSeconds / gib).toFixed(2)} | ${r.dropped} | ${Math.round(r.zeroCopy * 100)} % | ${(r.heap.allocated / Math.max(1, r.frames)).toFixed(1)} | ${r.heap.gcs} |`,
    );
  }
}

main();
