/**
 * virtio-blk request path on this host, no guest: a lean driver lays out a
 * split queue in anonymous "guest RAM", posts virtio-blk requests and rings
 * the queue's doorbell; the real VirtioPciDevice + VirtQueue + VirtioBlk code
 * serves them from a raw image (--format: VHD, VHDX or a fresh VHDX checkpoint
 * over one instead; in /dev/shm by default, so the numbers are
 * the device model's CPU cost, not the disk's).
 *
 * Workloads: 4 KiB random reads; 1 MiB sequential reads and writes (each
 * request an indirect table of 256 x 4 KiB segments, every other page, as a
 * guest's scattered user pages are; --segment-kib changes the size).
 * Guest RAM is a memfd mapping, as in the worker (so raw disks take the
 * one-preadv/pwritev path); --anonymous uses a plain ArrayBuffer instead. Batch size 1 (one kick and one interrupt per request) and
 * 32 (32 requests per kick; EVENT_IDX makes it one interrupt per batch).
 * Reported: requests/s, MiB/s, host CPU seconds per GiB moved
 * (process.cpuUsage, user + system), interrupts per request. A "direct
 * BlockDevice" row per workload (the same I/O into the same guest-RAM
 * buffers, without virtio) shows the floor. The host is shared: expect
 * +-30% run to run; compare rows of one run.
 *
 * --ring: virtio-blk queues its reads and writes on an io_uring (as the
 * worker does where the host allows one) and the driver waits for each
 * batch's completions; without it every request is a synchronous
 * preadv/pwritev on the device thread.
 *
 * --cold drops the host's page cache before each timed loop (root), so that
 * reads wait for the disk: with --ring they are then queued, up to a batch
 * in flight at once; without, one at a time.
 *
 * --packed negotiates packed virtqueues (VIRTIO_F_RING_PACKED) and lays the
 * same requests out as Linux does there: a list of three ring descriptors
 * (4 KiB) or one indirect descriptor (1 MiB), the first made available last;
 * completions found by their USED bit; EVENT_IDX through the driver's event
 * structure.
 *
 * usage: node dist/bench/devices/virtqueue-host.js [--dir /dev/shm] [--size-mib 256] [--seconds 3] [--segment-kib 4] [--anonymous] [--ring] [--cold] [--packed] [--format raw|vhd|vhdx|vhdx-child] [--cache writeback|none|writethrough|directsync|unsafe] [--only <workload name part>]
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { cpus } from "node:os";
import { HeapMeter, type HeapUse } from "../heap-meter.js";
import { ChunkedGuestMemory } from "../../src/machine/guest-memory.js";
import type { BlockDevice } from "../../src/storage/block-device.js";
import { createVirtioBlk, type VirtioBlk } from "../../src/devices/virtio/virtio-blk.js";
import { IoUring } from "../../src/hypervisor/io-uring.js";
import { VIRTIO_COMMON as C, VIRTIO_STATUS as S, type VirtioPciDevice } from "../../src/devices/virtio/pci-transport.js";
import type { PciDeviceServices } from "../../src/devices/pci/device-thread-services.js";
import { cacheModeOption, filledImage, imageFormatOption, memfdGuestRam, option } from "./host-bench-setup.js";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const arg = option;
const args = process.argv.slice(2);
const DIR = arg("--dir", "/dev/shm");
const SIZE = Number(arg("--size-mib", "256")) * MiB;
/** --format raw|vhd|vhdx|vhdx-child: the image the disk is served from (host-bench-setup.ts). */
const FORMAT = imageFormatOption();
/** --cache MODE: open the image as `--disk PATH,cache=MODE` does (none: O_DIRECT; the image must then be on a file system that takes it, e.g. --dir /var/tmp). */
const CACHE = cacheModeOption();
const SECONDS = Number(arg("--seconds", "2.5"));
const SEGMENT = Number(arg("--segment-kib", "4")) * 1024;
const ANONYMOUS = args.includes("--anonymous");
const RING = args.includes("--ring");
/** --cold: drop the host's page cache before each timed loop (root; the image on a real disk, e.g. --dir /var/tmp): reads then wait for the disk. */
const COLD = args.includes("--cold");
/** --packed: packed virtqueues instead of split ones. */
const PACKED = args.includes("--packed");
/** Only the workloads whose name contains this text (e.g. "1 MiB sequential read"). */
const ONLY = arg("--only", "");
if (!(SEGMENT >= 512 && MiB % SEGMENT === 0 && MiB / SEGMENT <= 1024)) throw new Error("--segment-kib must divide 1024 into at most 1024 segments");
const SEGMENTS = MiB / SEGMENT;

const QSIZE = 256;
const BATCH_MAX = 32;
const RAM = 80 * MiB;
// Guest RAM layout.
const DESC = 0x1000;
const AVAIL = DESC + 16 * QSIZE;
const USED = 0x4000;
const HEADERS = 0x10000; // 16 bytes per request slot
const STATUS = 0x20000; // 1 byte per slot
const INDIRECT = 0x40000; // 16 KiB per slot (up to 1024 + 2 descriptors)
const INDIRECT_SLOT = 16 * 1024 + 64;
const DATA = 16 * MiB; // 2 MiB per slot (segments on every other page)

class Bench {
  readonly memory = ANONYMOUS
    ? ChunkedGuestMemory.anonymous([{ gpa: 0, length: RAM, fileOffset: 0 }])
    : memfdGuestRam(RAM);
  readonly dev: VirtioPciDevice;
  private readonly blk: VirtioBlk;
  interrupts = 0;
  private ring: (() => void) | undefined;
  private readonly desc: DataView;
  private readonly descHalves: Uint16Array;
  private readonly avail: Uint16Array;
  private readonly used: Uint16Array;
  private readonly usedWords: Uint32Array;
  private readonly headers: DataView;
  /** All of guest RAM (one chunk), for reading status bytes without a view per request. */
  private readonly ram: Uint8Array;
  private availIdx = 0;
  private lastUsed = 0;
  // Packed: the driver's positions and wrap counters, and whether slots are 1 MiB (one indirect descriptor each).
  private nextAvail = 0;
  private availWrap = 1;
  private nextUsed = 0;
  private usedWrap = 1;
  private big = false;
  private write = false;

  constructor(disk: BlockDevice) {
    const services: PciDeviceServices = {
      memory: this.memory,
      intx: { setLevel: () => {} },
      msi: { signal: () => void this.interrupts++ },
      loop: { watch: () => ({ close: () => {} }), watchWritable: () => ({ close: () => {} }), defer: (task) => task() },
      doorbells: { mapDoorbell: (key, gpa, _len, onRing) => void (key === 0 && gpa !== undefined ? (this.ring = onRing) : undefined) },
    };
    this.dev = createVirtioBlk("bench", disk, services, { queues: 1, queueSize: QSIZE, ringPacked: PACKED, ...(RING ? { ring: IoUring.open(64) } : {}) });
    this.blk = this.dev.backend as VirtioBlk;
    this.dev.pci.assignBar(0, 0xe000_0000);
    this.dev.pci.assignBar(1, 0xe001_0000);
    this.dev.pci.enableDecoding();
    this.dev.pci.onMappingChanged?.();
    const b = this.memory.bytes(0, RAM);
    this.ram = b;
    this.desc = new DataView(b.buffer, DESC, 16 * QSIZE);
    this.descHalves = new Uint16Array(b.buffer, DESC, 8 * QSIZE);
    this.avail = new Uint16Array(b.buffer, AVAIL, 3 + QSIZE);
    this.used = new Uint16Array(b.buffer, USED, 3 + 4 * QSIZE);
    this.usedWords = new Uint32Array(b.buffer, USED, 1 + 2 * QSIZE + 1);
    this.headers = new DataView(b.buffer, HEADERS, 16 * BATCH_MAX);
    this.init();
  }

  private w(o: number, size: 1 | 2 | 4, v: number): void {
    this.dev.barWrite(0, o, size, v);
  }

  /** The Linux probe sequence, MSI-X on, EVENT_IDX + INDIRECT_DESC negotiated. */
  private init(): void {
    const d = this.dev;
    this.w(C.deviceStatus, 1, 0);
    this.w(C.deviceStatus, 1, S.acknowledge | S.driver);
    d.barWrite(0, C.deviceFeatureSelect, 4, 0);
    const lo = d.barRead(0, C.deviceFeature, 4);
    this.w(C.driverFeatureSelect, 4, 0);
    this.w(C.driverFeature, 4, lo & ((1 << 28) | (1 << 29) | (1 << 9) | (1 << 6) | (1 << 2)));
    this.w(C.driverFeatureSelect, 4, 1);
    this.w(C.driverFeature, 4, PACKED ? 1 | 4 : 1); // VERSION_1 (bit 32), RING_PACKED (bit 34)
    this.w(C.deviceStatus, 1, S.acknowledge | S.driver | S.featuresOk);
    // MSI-X: vector 1 for the queue.
    let cap = d.pci.configRead(0x34, 1);
    while (d.pci.configRead(cap, 1) !== 0x11) cap = d.pci.configRead(cap + 1, 1);
    d.barWrite(1, 16, 4, 0xfee0_0000);
    d.barWrite(1, 24, 4, 0x41);
    d.barWrite(1, 28, 4, 0);
    d.pci.configWrite(cap + 2, 2, 0x8000);
    this.w(C.queueSelect, 2, 0);
    this.w(C.queueSize, 2, QSIZE);
    this.w(C.queueDesc, 4, DESC);
    this.w(C.queueDriver, 4, AVAIL);
    this.w(C.queueDevice, 4, USED);
    this.w(C.queueMsixVector, 2, 1);
    this.w(C.queueEnable, 2, 1);
    this.w(C.deviceStatus, 1, S.acknowledge | S.driver | S.featuresOk | S.driverOk);
    if ((d.barRead(0, C.deviceStatus, 1) & S.driverOk) === 0 || this.ring === undefined) throw new Error("virtio-blk did not initialise");
  }

  private setDesc(base: DataView, i: number, addr: number, len: number, flags: number, next: number): void {
    const o = i * 16;
    base.setUint32(o, addr, true);
    base.setUint32(o + 4, 0, true);
    base.setUint32(o + 8, len, true);
    base.setUint16(o + 12, flags, true);
    base.setUint16(o + 14, next, true);
  }

  /** Lay out `batch` request slots once: 4 KiB direct chains, or 1 MiB indirect tables (packed: the tables; lists go in at submit). */
  layout(batch: number, big: boolean, write: boolean): void {
    const b = this.memory.bytes(0, RAM);
    this.big = big;
    this.write = write;
    if (PACKED) {
      for (let s = 0; s < batch; s++) {
        const data = DATA + s * 2 * MiB;
        if (big) {
          const t = new DataView(b.buffer, b.byteOffset + INDIRECT + INDIRECT_SLOT * s, 16 * (SEGMENTS + 2));
          // Packed table entries: id (ignored) where a split one has flags, flags where it has next.
          this.setDesc(t, 0, HEADERS + 16 * s, 16, 0, 0);
          for (let k = 0; k < SEGMENTS; k++) this.setDesc(t, 1 + k, data + k * 2 * SEGMENT, SEGMENT, 0, write ? 0 : 2);
          this.setDesc(t, SEGMENTS + 1, STATUS + s, 1, 0, 2);
        }
        this.headers.setUint32(16 * s, write ? 1 : 0, true);
      }
      return;
    }
    for (let s = 0; s < batch; s++) {
      const head = s * 3;
      const data = DATA + s * 2 * MiB;
      if (!big) {
        this.setDesc(this.desc, head, HEADERS + 16 * s, 16, 1, head + 1);
        this.setDesc(this.desc, head + 1, data, 4096, (write ? 0 : 2) | 1, head + 2);
        this.setDesc(this.desc, head + 2, STATUS + s, 1, 2, 0);
      } else {
        const t = new DataView(b.buffer, b.byteOffset + INDIRECT + INDIRECT_SLOT * s, 16 * (SEGMENTS + 2));
        this.setDesc(t, 0, HEADERS + 16 * s, 16, 1, 1);
        for (let k = 0; k < SEGMENTS; k++) this.setDesc(t, 1 + k, data + k * 2 * SEGMENT, SEGMENT, (write ? 0 : 2) | 1, 2 + k);
        this.setDesc(t, SEGMENTS + 1, STATUS + s, 1, 2, 0);
        this.setDesc(this.desc, head, INDIRECT + INDIRECT_SLOT * s, 16 * (SEGMENTS + 2), 4, 0);
      }
      this.headers.setUint32(16 * s, write ? 1 : 0, true);
    }
  }

  /** Packed: one ring descriptor at the driver's position (id in the high half of the last word, flags in the top half). */
  private putPacked(addr: number, len: number, flags: number, id: number, first: boolean): number {
    const at = this.nextAvail;
    const f = flags | (this.availWrap === 1 ? 1 << 7 : 1 << 15);
    const o = at * 16;
    this.desc.setUint32(o, addr, true);
    this.desc.setUint32(o + 4, 0, true);
    this.desc.setUint32(o + 8, len, true);
    this.desc.setUint16(o + 12, id, true);
    if (!first) this.desc.setUint16(o + 14, f, true);
    if (++this.nextAvail === QSIZE) {
      this.nextAvail = 0;
      this.availWrap ^= 1;
    }
    return f;
  }

  private submitPacked(batch: number, sectors: Float64Array): number {
    const flags16 = this.descHalves;
    for (let s = 0; s < batch; s++) {
      const sec = sectors[s]!;
      this.headers.setUint32(16 * s + 8, sec % 2 ** 32, true);
      this.headers.setUint32(16 * s + 12, Math.floor(sec / 2 ** 32), true);
      const head = this.nextAvail;
      let headFlags: number;
      if (this.big) headFlags = this.putPacked(INDIRECT + INDIRECT_SLOT * s, 16 * (SEGMENTS + 2), 4, s, true);
      else {
        headFlags = this.putPacked(HEADERS + 16 * s, 16, 1, s, true);
        this.putPacked(DATA + s * 2 * MiB, 4096, (this.write ? 0 : 2) | 1, s, false);
        this.putPacked(STATUS + s, 1, 2, s, false);
      }
      Atomics.store(flags16, head * 8 + 7, headFlags); // the list's first descriptor last
    }
    this.ring!();
    if (this.blk.queued > 0) this.blk.quiesce();
    let n = 0;
    const per = this.big ? 1 : 3;
    for (;;) {
      const f = Atomics.load(flags16, this.nextUsed * 8 + 7);
      if (((f >> 15) & 1) !== this.usedWrap || ((f >> 7) & 1) !== this.usedWrap) break;
      const id = flags16[this.nextUsed * 8 + 6]!;
      const status = this.ram[STATUS + id];
      if (status !== 0) throw new Error(`request failed with status ${status}`);
      this.nextUsed += per;
      if (this.nextUsed >= QSIZE) {
        this.nextUsed -= QSIZE;
        this.usedWrap ^= 1;
      }
      n++;
    }
    // Callbacks on: interrupt me at the next completion (the driver event structure, at AVAIL: DESC at the next used position).
    this.avail[0] = this.nextUsed | (this.usedWrap << 15);
    this.avail[1] = 2;
    return n;
  }

  /** Submit `batch` requests at the given sectors, kick once, reap. Returns the completions. */
  submit(batch: number, sectors: Float64Array): number {
    if (PACKED) return this.submitPacked(batch, sectors);
    for (let s = 0; s < batch; s++) {
      const sec = sectors[s]!;
      this.headers.setUint32(16 * s + 8, sec % 2 ** 32, true);
      this.headers.setUint32(16 * s + 12, Math.floor(sec / 2 ** 32), true);
      this.avail[2 + (this.availIdx & (QSIZE - 1))] = s * 3;
      this.availIdx = (this.availIdx + 1) & 0xffff;
    }
    Atomics.store(this.avail, 1, this.availIdx);
    this.ring!();
    // On a ring: wait for the batch (the device thread's poll loop would hear of it through the ring's eventfd).
    if (this.blk.queued > 0) this.blk.quiesce();
    let n = 0;
    const idx = Atomics.load(this.used, 1);
    while (this.lastUsed !== idx) {
      const status = this.ram[STATUS + this.usedWords[1 + 2 * (this.lastUsed & (QSIZE - 1))]! / 3];
      if (status !== 0) throw new Error(`request failed with status ${status}`);
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
      n++;
    }
    // Callbacks on: interrupt me at the next completion (virtqueue_enable_cb with EVENT_IDX).
    this.avail[2 + QSIZE] = this.lastUsed;
    return n;
  }
}

interface Row {
  workload: string;
  batch: number;
  requests: number;
  seconds: number;
  bytes: number;
  cpu: number;
  interrupts: number;
  /** JS heap bytes allocated in the measured loop (harness included) and the collections they caused. */
  heap: HeapUse;
}

function run(bench: Bench, workload: string, batch: number, reqBytes: number, write: boolean, random: boolean): Row {
  bench.layout(batch, reqBytes > 4096, write);
  const slots = SIZE / reqBytes;
  const sectors = new Float64Array(batch);
  let seq = 0;
  let lcg = 12345;
  const nextSector = (): number => {
    if (random) {
      lcg = (Math.imul(lcg, 1103515245) + 12345) >>> 0;
      return (lcg % slots) * (reqBytes / 512);
    }
    const s = (seq % slots) * (reqBytes / 512);
    seq++;
    return s;
  };
  // Warm-up.
  for (let i = 0; i < 50; i++) {
    for (let s = 0; s < batch; s++) sectors[s] = nextSector();
    bench.submit(batch, sectors);
  }
  if (COLD) {
    spawnSync("sync");
    writeFileSync("/proc/sys/vm/drop_caches", "1");
  }
  const irq0 = bench.interrupts;
  const meter = new HeapMeter();
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const deadline = t0 + BigInt(Math.round(SECONDS * 1e9));
  let requests = 0;
  for (;;) {
    for (let s = 0; s < batch; s++) sectors[s] = nextSector();
    requests += bench.submit(batch, sectors);
    if ((requests & 63) < batch && process.hrtime.bigint() >= deadline) break;
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  const heap = meter.stop();
  return { workload, batch, requests, seconds, bytes: requests * reqBytes, cpu: (cpu.user + cpu.system) / 1e6, interrupts: bench.interrupts - irq0, heap };
}

/** The same I/O straight on the BlockDevice, into the same guest-RAM buffers: the floor under the virtio rows. */
function direct(disk: BlockDevice, memory: ChunkedGuestMemory, workload: string, reqBytes: number, write: boolean, random: boolean): Row {
  const buf = memory.bytes(DATA, reqBytes);
  const slots = SIZE / reqBytes;
  let lcg = 12345;
  let seq = 0;
  const meter = new HeapMeter();
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const deadline = t0 + BigInt(Math.round(SECONDS * 1e9));
  let requests = 0;
  while ((requests & 31) !== 0 || process.hrtime.bigint() < deadline) {
    let slot: number;
    if (random) {
      lcg = (Math.imul(lcg, 1103515245) + 12345) >>> 0;
      slot = lcg % slots;
    } else slot = seq++ % slots;
    if (write) disk.write(slot * reqBytes, buf);
    else disk.read(slot * reqBytes, buf);
    requests++;
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  const heap = meter.stop();
  return { workload: `${workload}, direct BlockDevice (no virtio)`, batch: 1, requests, seconds, bytes: requests * reqBytes, cpu: (cpu.user + cpu.system) / 1e6, interrupts: 0, heap };
}

function main(): void {
  const dir = mkdtempSync(join(DIR, "partis-vq-"));
  try {
    const disk = filledImage(dir, SIZE, FORMAT, CACHE);
    const bench = new Bench(disk);
    const rows: Row[] = [];
    const workloads = [
      ["4 KiB random read", 4096, false, true],
      ["1 MiB sequential read", MiB, false, false],
      ["1 MiB sequential write", MiB, true, false],
    ] as const;
    for (const [name, bytes, write, random] of workloads) {
      if (!name.includes(ONLY)) continue;
      rows.push(direct(disk, bench.memory, name, bytes, write, random));
      for (const batch of [1, 32]) rows.push(run(bench, name, batch, bytes, write, random));
    }
    disk.close();
    console.log(`virtio-blk through VirtioPciDevice + VirtQueue (${PACKED ? "packed" : "split"} virtqueue${RING ? ", io_uring" : ""}), ${FORMAT} image${CACHE !== "writeback" ? `, cache=${CACHE}` : ""} in ${DIR} (${SIZE / MiB} MiB), node ${process.version}, ${cpus()[0]?.model ?? "cpu"}\n`);
    console.log("| workload | batch | requests/s | MiB/s | host CPU s/GiB | interrupts/request | heap bytes/request | GCs |");
    console.log("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (const r of rows)
      console.log(
        `| ${r.workload} | ${r.batch} | ${Math.round(r.requests / r.seconds).toLocaleString("en-US")} | ${(r.bytes / MiB / r.seconds).toFixed(0)} | ${(r.cpu / (r.bytes / GiB)).toFixed(3)} | ${(r.interrupts / Math.max(1, r.requests)).toFixed(3)} | ${(r.heap.allocated / Math.max(1, r.requests)).toFixed(1)} | ${r.heap.gcs} |`,
      );
    console.log(`\nvirtio-blk stats: ${JSON.stringify((bench.dev.backend as { stats?: unknown }).stats)}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main();
