/**
 * Seeded fuzz of the PIIX IDE model through its guest-visible surface: legacy
 * ports (any region, offset and width), BAR4 bus-master registers, config
 * space, PRD tables of every shape in a small RAM, and well-formed command
 * sequences mixed in so that the deep paths (PIO blocks, DMA, packets) run.
 * Checks: no exception, guest memory only through bounds-checked views, data
 * pointers inside their buffers, errors reported through status bits, and
 * the port read shadow (what vCPUs answer without asking the device thread)
 * equal to real reads after every step, with Status never published while
 * the interrupt it would acknowledge is raised. A third seed runs with the
 * disk on a ring (as a raw image on an io_uring): transfers are queued, done
 * at once or refused at random, and complete at random points (during
 * submit, on a later step, when a write or a save waits for them), whole,
 * short or failed; the fake ring moves their data through the same checked
 * views, so a queued span outside RAM is caught too.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkedGuestMemory, type GuestMemory, type GuestSpan, type RamRange } from "../../../src/machine/guest-memory.js";
import { PiixIde } from "../../../src/devices/emulated/ide/piix-ide.js";
import { DiskError, type BlockRequestRing, type HostIoQueue } from "../../../src/storage/block-device.js";
import { DeviceBus } from "../../../src/worker/device-bus.js";
import { MAILBOX_OP } from "../../../src/worker/device-mailbox.js";
import { DeferredWork, RecordingIrqLine, RecordingPortShadow, SeededRandom } from "../device-fakes.js";
import { MemoryDisk, checkPortShadow, fakeServices, pattern } from "./ide-test-driver.js";

const RANGES: RamRange[] = [
  { gpa: 0, length: 256 * 1024, fileOffset: 0 },
  { gpa: 0x10_0000, length: 64 * 1024, fileOffset: 256 * 1024 },
];

/** GuestMemory that lets the device use only tryBytes, and checks every view it hands out. */
class GuardedMemory implements GuestMemory {
  forbidden = 0;
  views = 0;
  refused = 0;
  /** Hand out fake host addresses (gpa + FAKE_HOST), as host-mapped RAM would: the ring variant. */
  fakeHost = false;
  constructor(private readonly inner: ChunkedGuestMemory) {}
  hostAddresses(gpas: Float64Array, count: number, out: Float64Array): boolean {
    if (!this.fakeHost) return false;
    for (let i = 0; i < count; i++) {
      if (this.inner.contiguousLength(gpas[i]!, 1) === 0) return false;
      out[i] = gpas[i]! + FAKE_HOST;
    }
    return true;
  }
  get ranges(): readonly RamRange[] {
    return this.inner.ranges;
  }
  get size(): number {
    return this.inner.size;
  }
  tryBytes(gpa: number, length: number): Uint8Array | undefined {
    const v = this.inner.tryBytes(gpa, length);
    if (v === undefined) {
      this.refused++;
      return undefined;
    }
    this.views++;
    const inside = RANGES.some((r) => gpa >= r.gpa && gpa + length <= r.gpa + r.length);
    if (!inside || v.length !== length) this.forbidden++;
    return v;
  }
  locate(gpa: number, length: number, out: GuestSpan): boolean {
    if (!this.inner.locate(gpa, length, out)) {
      this.refused++;
      return false;
    }
    this.views++;
    const inside = RANGES.some((r) => gpa >= r.gpa && gpa + length <= r.gpa + r.length);
    if (!inside || out.offset + length > out.view.length) this.forbidden++;
    return true;
  }
  contiguousLength(gpa: number, length: number): number {
    return this.inner.contiguousLength(gpa, length);
  }
  bytes(gpa: number, length: number): Uint8Array {
    this.forbidden++;
    return this.inner.bytes(gpa, length);
  }
  write(gpa: number, data: Uint8Array): void {
    this.forbidden++;
    this.inner.write(gpa, data);
  }
  read(gpa: number, length: number): Uint8Array {
    this.forbidden++;
    return this.inner.read(gpa, length);
  }
}

/** Never dereferenced: the fuzz ring turns these back into guest addresses and moves data through checked views. */
const FAKE_HOST = 2 ** 40;

interface FuzzRequest {
  readonly write: boolean;
  readonly offset: number;
  readonly spans: readonly (readonly [number, number])[];
  readonly token: number;
  ready: boolean;
}

/** Move a queued transfer's data (guest spans from fake host addresses) through checked views; bytes moved or -errno. */
function moveQueued(memory: GuestMemory, disk: MemoryDisk, r: { write: boolean; offset: number; spans: readonly (readonly [number, number])[] }): number {
  let at = r.offset;
  try {
    for (const [gpa, length] of r.spans) {
      const view = memory.tryBytes(gpa, length);
      if (view === undefined) return -14;
      if (r.write) disk.write(at, view);
      else disk.read(at, view);
      at += length;
    }
  } catch {
    return -5;
  }
  return at - r.offset;
}

/** A ring that completes at random: during submit, when the test fires its event, or when drained; whole, short or failed. */
class FuzzRing implements BlockRequestRing {
  readonly entries = 4;
  readonly pending: FuzzRequest[] = [];
  completed = { whole: 0, short: 0, failed: 0, duringSubmit: 0 };
  constructor(
    private readonly rnd: SeededRandom,
    private readonly memory: GuestMemory,
    private readonly disk: MemoryDisk,
  ) {}
  prepareVectored(write: boolean, _fd: number, offset: number, a: Float64Array, l: Uint32Array, n: number, token: number): boolean {
    if (this.pending.length >= this.entries) return false;
    const spans: [number, number][] = [];
    for (let i = 0; i < n; i++) spans.push([a[i]! - FAKE_HOST, l[i]!]);
    this.pending.push({ write, offset, spans, token, ready: false });
    return true;
  }
  prepareFsync(): boolean {
    return false;
  }
  submit(): void {
    if (this.rnd.next() < 0.3) {
      for (const r of this.pending) r.ready = true;
      this.completed.duringSubmit++;
    }
  }
  takeEvent(): void {}
  /** The kernel finished everything queued (the eventfd would fire). */
  finishAll(): void {
    for (const r of this.pending) r.ready = true;
  }
  reap(handler: (token: number, result: number) => void): number {
    let n = 0;
    for (let i = 0; i < this.pending.length; ) {
      const r = this.pending[i]!;
      if (!r.ready) {
        i++;
        continue;
      }
      this.pending.splice(i, 1);
      let result = moveQueued(this.memory, this.disk, r);
      const x = this.rnd.next();
      if (result > 1 && x < 0.2) {
        result = this.rnd.int(result);
        this.completed.short++;
      } else if (x < 0.3) {
        result = -5;
        this.completed.failed++;
      } else this.completed.whole++;
      handler(r.token, result);
      n++;
    }
    return n;
  }
  drain(handler: (token: number, result: number) => void): void {
    this.finishAll();
    this.reap(handler);
  }
}

/** The in-memory disk, able to queue as a raw image can: checks first, then queued, done at once or refused, at random. */
class QueueingDisk extends MemoryDisk {
  ring: FuzzRing | undefined;
  memory: GuestMemory | undefined;
  rnd: SeededRandom | undefined;
  queueHost(queue: HostIoQueue, write: boolean, offset: number, a: Float64Array, l: Uint32Array, n: number, token: number): "done" | "queued" | false {
    let total = 0;
    for (let i = 0; i < n; i++) total += l[i]!;
    if (offset < 0 || offset + total > this.size) throw new DiskError("DISK_RANGE", `range ${offset}+${total} is past the end`, this.path, { offset });
    if (write && this.readOnly) throw new DiskError("DISK_READ_ONLY", "read-only", this.path);
    const x = this.rnd!.next();
    if (x < 0.15) return false;
    if (x < 0.3) {
      const spans: [number, number][] = [];
      for (let i = 0; i < n; i++) spans.push([a[i]! - FAKE_HOST, l[i]!]);
      if (moveQueued(this.memory!, this, { write, offset, spans }) !== total) throw new DiskError("DISK_IO", "failed at once", this.path, { offset });
      return "done";
    }
    return queue.prepareVectored(write, -1, offset, a, l, n, token) ? "queued" : false;
  }
}

const ATA_COMMANDS = [
  0x00, 0x08, 0x10, 0x20, 0x21, 0x24, 0x25, 0x29, 0x30, 0x31, 0x34, 0x35, 0x39, 0x40, 0x41, 0x42, 0x70, 0x90, 0x91, 0xa0, 0xa1,
  0xc4, 0xc5, 0xc6, 0xc8, 0xc9, 0xca, 0xcb, 0xe0, 0xe1, 0xe2, 0xe3, 0xe5, 0xe6, 0xe7, 0xea, 0xec, 0xef,
];
const PACKET_OPS = [0x00, 0x03, 0x12, 0x1b, 0x1e, 0x25, 0x28, 0x2b, 0x43, 0x46, 0x4a, 0x51, 0x52, 0x5a, 0xa8, 0xbb, 0xbd, 0x55, 0xbe];
const TABLES = [0x1000, 0x3ff8, 0x3fff0, 0x10_fff0];
const REGIONS = ["primary", "secondary", "primary-control", "secondary-control", "bogus"];

/** [seed, disk on a ring, the disk rate-limited (commands held, woken at random steps on a test clock)] */
const SEEDS: readonly (readonly [number, boolean, boolean])[] = [
  [0x1de_5eed, false, false],
  [0x0c0ffee, false, false],
  [0x51ab_ead, true, false],
  [0x11_3175, false, true],
];

for (const [seed, onRing, limited] of SEEDS) test(`fuzz (seed ${seed.toString(16)}${onRing ? ", disk on a ring" : ""}${limited ? ", disk rate-limited" : ""}): 100,000 random port, BAR, config and PRD steps never throw nor leave RAM`, () => {
  const rnd = new SeededRandom(seed);
  let now = 0;
  const inner = new ChunkedGuestMemory(RANGES, (_o, len) => new Uint8Array(len), 32 * 1024);
  const memory = new GuardedMemory(inner);
  const disk = new QueueingDisk(64 * 1024);
  const ring = onRing ? new FuzzRing(rnd, memory, disk) : undefined;
  if (ring !== undefined) {
    memory.fakeHost = true;
    Object.assign(disk, { ring, memory, rnd });
  } else Object.assign(disk, { queueHost: undefined });
  disk.fill(0, pattern(5, 0, 64 * 1024));
  const roDisk = new MemoryDisk(32 * 1024, true);
  const iso = new MemoryDisk(40 * 2048, true);
  iso.fill(0, pattern(6, 0, 40 * 2048));
  const shadow = new RecordingPortShadow();
  const STATUS_PORT = [0x1f7, 0x177] as const;
  const risesWithStatusPublished = [0, 0];
  let rises = 0;
  /** At each rising edge: the raising channel's Status (which would acknowledge it) is not answered from the shadow. */
  class CheckedIrq extends RecordingIrqLine {
    constructor(private readonly channel: 0 | 1) {
      super();
    }
    override setLevel(level: boolean): void {
      if (level && !this.level) {
        rises++;
        const v = shadow.values.get(STATUS_PORT[this.channel]);
        if (v !== undefined && v !== 0xff) risesWithStatusPublished[this.channel]!++;
      }
      super.setLevel(level);
    }
  }
  const irq = [new CheckedIrq(0), new CheckedIrq(1)] as const;
  // DMA transfers run as deferred work, which this fuzz runs at random points: right after the access
  // that started it (as the device thread does), or only after more accesses, a reset, a save.
  const work = new DeferredWork(false);
  const ide = new PiixIde("ide-fuzz", fakeServices(memory, work, shadow), {
    primaryIrq: irq[0],
    secondaryIrq: irq[1],
    drives: [
      { channel: 0, unit: 0, kind: "disk", device: disk, ...(limited ? { limits: { iops: 5, bytesPerSecond: 4096 } } : {}) },
      { channel: 0, unit: 1, kind: "disk", device: roDisk },
      { channel: 1, unit: 0, kind: "cdrom", device: iso },
    ],
    ...(ring !== undefined ? { ring } : {}),
    clock: () => now,
  });
  ide.pci.assignBar(4, 0xc000);
  ide.pci.enableDecoding();
  ide.afterAccess();

  const seen = { stringReads: 0, ataErrors: 0, bmErrors: 0, bmInterrupts: 0, dataWords: 0, checkConditions: 0, deferredRuns: 0, shadowChecks: 0 };
  const small = (): number => (rnd.next() < 0.8 ? rnd.int(8) : rnd.int(256));
  const size = (): 1 | 2 | 4 => rnd.pick([1, 2, 4] as const);
  const cmdRegion = (ch: number): string => (ch === 0 ? "primary" : "secondary");

  const writePrd = (): void => {
    const table = rnd.pick(TABLES);
    const n = 1 + rnd.int(6);
    const eot = rnd.next() < 0.85;
    for (let i = 0; i < n; i++) {
      const at = table + i * 8;
      let addr: number;
      const r = rnd.next();
      if (r < 0.7) addr = 0x8000 + rnd.int(0x30000);
      else if (r < 0.85) addr = 0x10_0000 + rnd.int(0x10000);
      else addr = rnd.int(0x1_0000_0000);
      const count = rnd.next() < 0.6 ? 512 * (1 + rnd.int(8)) : rnd.int(0x10000);
      const entry = [addr & 0xff, (addr >>> 8) & 0xff, (addr >>> 16) & 0xff, addr >>> 24, count & 0xff, count >>> 8, 0, eot && i === n - 1 ? 0x80 : 0];
      const v = inner.tryBytes(at, 8);
      if (v !== undefined) v.set(entry);
    }
  };

  // String reads go through the device bus half the time, as a `rep insw` exit does (whole DRQ blocks at once).
  const bus = new DeviceBus();
  bus.attach(1 << 3, ide);
  const dataBurst = (ch: 0 | 1): void => {
    const region = cmdRegion(ch);
    const width = rnd.pick([2, 2, 4] as const);
    const n = 1 + rnd.int(rnd.next() < 0.5 ? 8 : 600);
    const write = rnd.next() < 0.5;
    if (!write && rnd.next() < 0.5) {
      bus.service({ op: MAILBOX_OP.pioRead, size: width, count: n, address: ch === 0 ? 0x1f0 : 0x170, data: new Uint8Array(n * width) });
      seen.dataWords += n;
      seen.stringReads++;
      return;
    }
    for (let i = 0; i < n; i++) {
      if (write) ide.isaWrite(region, 0, width, rnd.int(0x1_0000_0000));
      else ide.isaRead(region, 0, width);
      seen.dataWords++;
    }
  };

  /** A well-formed command with random parameters (PIO or DMA). */
  const scenario = (): void => {
    const ch = rnd.int(2) as 0 | 1;
    const region = cmdRegion(ch);
    const unit = ch === 0 ? rnd.int(2) : 0;
    const dma = rnd.next() < 0.5;
    if (dma || rnd.next() < 0.5) {
      if (rnd.next() < 0.5) writePrd();
      ide.barWrite(4, ch * 8 + 4, 4, rnd.pick(TABLES));
      ide.barWrite(4, ch * 8, 1, rnd.next() < 0.8 ? 0x08 : 0x00);
    }
    const sane = dma && rnd.next() < 0.8;
    ide.isaWrite(region, 1, 1, sane || rnd.next() < 0.5 ? 1 : small());
    ide.isaWrite(region, 2, 1, sane ? 1 + rnd.int(16) : small());
    ide.isaWrite(region, 3, 1, sane ? rnd.int(64) : small());
    ide.isaWrite(region, 4, 1, sane || rnd.next() < 0.5 ? 0 : rnd.int(256));
    ide.isaWrite(region, 5, 1, sane || rnd.next() < 0.8 ? 0 : rnd.int(256));
    ide.isaWrite(region, 6, 1, 0xe0 | (unit << 4));
    ide.isaWrite(region, 7, 1, dma ? (ch === 1 ? 0xa0 : rnd.pick([0xc8, 0x25, 0xca, 0x35])) : rnd.pick(ATA_COMMANDS));
    if (ch === 1 && rnd.next() < 0.7) {
      // A packet for the CD-ROM.
      const cdb = new Uint8Array(12);
      cdb[0] = rnd.pick(PACKET_OPS);
      for (let i = 1; i < 12; i++) cdb[i] = rnd.next() < 0.7 ? small() : rnd.int(256);
      if (sane) cdb.set([rnd.pick([0x28, 0xa8, 0x12, 0x43, 0x25]), 0, 0, 0, 0, rnd.int(40), 0, 0, 1 + rnd.int(4), 4]);
      for (let i = 0; i < 12; i += 2) ide.isaWrite(region, 0, 2, cdb[i]! | (cdb[i + 1]! << 8));
    }
    if (dma || rnd.next() < 0.3) ide.barWrite(4, ch * 8, 1, ide.barRead(4, ch * 8, 1) | 1);
    if (rnd.next() < 0.5) dataBurst(ch);
  };

  for (let step = 0; step < 100_000; step++) {
    const op = rnd.int(100);
    const ch = rnd.int(2) as 0 | 1;
    if (op < 25) {
      const off = 1 + rnd.int(7);
      const value = off === 7 ? (rnd.next() < 0.8 ? rnd.pick(ATA_COMMANDS) : rnd.int(256)) : off === 6 ? rnd.pick([0xa0, 0xb0, 0xe0, 0xf0, rnd.int(256)]) : small();
      ide.isaWrite(cmdRegion(ch), off, rnd.next() < 0.9 ? 1 : size(), value);
    } else if (op < 38) {
      const v = ide.isaRead(rnd.pick(REGIONS), rnd.int(9), size());
      assert.ok(Number.isInteger(v) && v >= 0 && v <= 0xffff_ffff);
    } else if (op < 48) {
      dataBurst(ch);
    } else if (op < 53) {
      const v = rnd.next() < 0.05 ? 0x04 : rnd.pick([0x00, 0x02, 0x08, 0x80, rnd.int(256)]);
      ide.isaWrite(rnd.pick(REGIONS), rnd.int(2), size(), v);
    } else if (op < 63) {
      const reg = rnd.pick([0, 0, 2, 4, 5, 6, 7, 1, 3]);
      const value = reg === 4 ? rnd.pick(TABLES) : reg === 0 ? rnd.pick([0x00, 0x01, 0x08, 0x09, rnd.int(256)]) : rnd.int(0x1_0000_0000);
      ide.barWrite(rnd.next() < 0.95 ? 4 : rnd.int(6), ch * 8 + reg, reg === 4 ? 4 : size(), value);
    } else if (op < 67) {
      ide.barRead(4, rnd.int(16), 1);
    } else if (op < 77) {
      writePrd();
    } else if (op < 92) {
      scenario();
    } else if (op < 95) {
      const off = rnd.pick([0x04, 0x04, 0x40, 0x42, 0x44, rnd.int(256)]);
      const v = off === 0x04 ? rnd.pick([0x05, 0x05, 0x01, 0x04, 0x07, 0x00]) : off === 0x40 || off === 0x42 ? rnd.pick([0x8000, 0x0000, rnd.int(0x10000)]) : rnd.int(0x1_0000_0000);
      ide.pci.configWrite(off, off === 0x04 || off === 0x40 || off === 0x42 ? 2 : size(), v);
      ide.afterAccess(); // what the device bus does after each config write
      if (rnd.next() < 0.3) {
        ide.pci.configWrite(0x04, 2, 0x05);
        ide.afterAccess();
      }
    } else if (op < 96) {
      ide.reset();
      ide.pci.assignBar(4, 0xc000);
      ide.pci.enableDecoding();
      ide.afterAccess();
    } else if (op < 97) {
      ide.changeMedium(1, 0, rnd.next() < 0.3 ? undefined : iso);
    } else if (op < 98) {
      disk.failReads = rnd.next() < 0.3;
      disk.failWrites = rnd.next() < 0.3;
      iso.failReads = rnd.next() < 0.2;
    } else {
      ide.isaRead(cmdRegion(ch), 7, 1);
    }

    // The device bus ends each request with afterAccess (a step here stands for one request: a burst is
    // one string access). What a vCPU would answer from the shadow now, before the device thread's next turn.
    ide.afterAccess();
    if (rnd.next() < 0.3) seen.shadowChecks += checkPortShadow(ide, shadow, irq, `seed ${seed.toString(16)} step ${step}`);
    if (limited) {
      // Time passes; now and then a channel's alarm expires (early ones included).
      now += rnd.int(4);
      if (rnd.next() < 0.3) {
        ide.channels[rnd.int(2)]!.resumeHeld();
        ide.afterAccess(); // the alarm's wrapper publishes what reads see
      }
    }
    if (rnd.next() < 0.6) seen.deferredRuns += work.run();
    if (ring !== undefined && rnd.next() < 0.3) {
      // The ring's eventfd fired: the device thread's loop calls completeQueued.
      ring.finishAll();
      ide.completeQueued();
    }
    seen.shadowChecks += checkPortShadow(ide, shadow, irq, `seed ${seed.toString(16)} step ${step}, after deferred work`);

    // Every reachable state saves as plain data and restores to itself.
    if (step % 997 === 0) {
      const before = JSON.stringify(ide.save());
      ide.restore(JSON.parse(before));
      assert.equal(JSON.stringify(ide.save()), before, `save/restore round trip at step ${step}`);
    }

    // Invariants.
    for (const c of ide.channels) {
      const bm = c.busMaster;
      assert.equal(bm.prd & 3, 0);
      assert.ok(bm.status >= 0 && bm.status <= 0xff);
      if (bm.status & 0x02) seen.bmErrors++;
      if (bm.status & 0x04) seen.bmInterrupts++;
      for (const d of c.devices) {
        assert.ok(d.pos >= 0 && d.pos <= d.end && d.end <= d.buffer.length, `pointers ${d.pos}/${d.end}/${d.buffer.length}`);
        assert.ok(d.status >= 0 && d.status <= 0xff);
        if (d.present && d.status & 0x01) {
          seen.ataErrors++;
          if (d.kind === "cdrom" && d.error >> 4 !== 0) seen.checkConditions++;
        }
      }
    }
  }
  if (process.env["IDE_FUZZ_STATS"] !== undefined) console.log(JSON.stringify({ ...seen, views: memory.views, refused: memory.refused, bm: ide.channels.map((c) => c.busMaster.hostErrors) }));
  assert.equal(memory.forbidden, 0, "guest memory touched other than through in-range views");
  assert.ok(memory.views > 1000, `DMA ran (${memory.views} views)`);
  assert.ok(memory.refused > 10, "bad PRDs were refused");
  assert.ok(seen.ataErrors > 1000 && seen.bmErrors > 100 && seen.checkConditions > 100, JSON.stringify(seen));
  assert.ok(seen.bmInterrupts > 100);
  assert.ok(seen.stringReads > 1000, `string reads through the bus (${seen.stringReads})`);
  assert.ok(seen.deferredRuns > (limited ? 300 : 1000), `deferred transfers ran (${seen.deferredRuns})`);
  assert.ok(seen.shadowChecks > 100_000, `shadowed reads checked (${seen.shadowChecks})`);
  if (limited) assert.ok(ide.throttled > 200, `commands held by the rate limit (${ide.throttled})`);
  assert.ok(rises > 1000, `interrupts rose (${rises})`);
  assert.deepEqual(risesWithStatusPublished, [0, 0], "an interrupt rose while its channel's Status was still answered from the shadow");
  if (ring !== undefined) {
    const queued = ide.channels[0].busMaster.queuedTransfers;
    const c = ring.completed;
    if (process.env["IDE_FUZZ_STATS"] !== undefined) console.log(JSON.stringify({ queued, ...c, host: ide.channels[0].busMaster.hostTransfers, views: ide.channels[0].busMaster.viewTransfers, errors: ide.channels[0].busMaster.hostErrors }));
    assert.ok(queued > 80 && c.whole > 40 && c.short > 10 && c.failed > 5 && c.duringSubmit > 15, `ring paths ran: ${JSON.stringify({ queued, ...c })}`);
    assert.equal(ide.channels[0].busMaster.shortCompletions, c.short, "every short completion redone");
  }
  const saved = ide.save();
  assert.deepEqual(JSON.parse(JSON.stringify(saved)), saved);
});
