/**
 * Seeded fuzzing of a virtio-pci device through its register surface and its
 * rings. RAM (256 KiB) is laid out in zones:
 *
 *   0x00000 guard
 *   0x01000 + 0x1000*q  queue block q (0-3): queue q's desc [+0,+0x400) avail [+0x400,+0x486)
 *                       used [+0x600,+0x806); queue q+4's (4-7, for devices with more queues)
 *                       desc [+0x880,+0xc80) avail [+0xc80,+0xd06) used [+0xd80,+0xf86)
 *   0x05000 guard
 *   0x06000 indirect tables (driver-owned)
 *   0x08000 request headers / outgoing data (driver-owned)
 *   0x0a000 guard
 *   0x0b000 data zone: the only place device-writable descriptors point into RAM
 *   0x3f000 guard (the last page)
 *
 * Device-writable descriptors only ever point into the data zone or out of
 * RAM (straddling its end, or far beyond), and ring addresses written to the
 * registers are the block's own or invalid; so after every device call all of
 * RAM except the used rings and the data zone must be byte-for-byte what it
 * was before the call. Each step is one of: a well-formed request, a request
 * with one definite protocol violation (the device must end up in
 * DEVICE_NEEDS_RESET), random (sanitised) descriptor / ring garbage, a random
 * register access, a random config-space access, or a fresh probe.
 *
 * A device that offers VIRTIO_F_RING_PACKED gets packed rings at about two
 * probes in three (desc at +0, driver event structure at +0x400, device event
 * structure at +0x600; the descriptor ring is then device-writable too, any
 * queue size up to 64). Before each packed step the test driver takes the
 * device's positions as its own (garbage may have moved them), and after each
 * device call it clears the address of every device-writable ring descriptor
 * that points outside the data zone: a used descriptor keeps the address of
 * the driver's descriptor it overwrote, and a NEXT list may run over it.
 */
import assert from "node:assert/strict";
import { VIRTIO_BAR0, VIRTIO_COMMON as C, VIRTIO_F, VIRTIO_STATUS as S, featureBit, type VirtioPciDevice } from "../../../src/devices/virtio/pci-transport.js";
import { SeededRandom } from "../device-fakes.js";
import { PackedDriverQueue, TestVirtioDriver, makeServices, placeDevice, type Buffer, type TestServices } from "./virtio-driver.js";

export const FUZZ_RAM = 0x40000;
export const QUEUE_BLOCK = (q: number): number => 0x1000 + 0x1000 * q;
export const INDIRECT_ZONE = 0x6000;
export const HEADER_ZONE = 0x8000;
export const DATA_ZONE = 0xb000;
export const DATA_END = 0x3f000;
export const MAX_FUZZ_QUEUE = 64;
/** Queues the harness sets up (a device with more has the rest left off). */
export const FUZZ_QUEUES = 8;

/** Where queue q's rings are (see the file's head). */
export function queueRings(q: number): { desc: number; avail: number; used: number } {
  if (q < 4) return { desc: QUEUE_BLOCK(q), avail: QUEUE_BLOCK(q) + 0x400, used: QUEUE_BLOCK(q) + 0x600 };
  const base = QUEUE_BLOCK(q - 4) + 0x880;
  return { desc: base, avail: base + 0x400, used: base + 0x500 };
}

/** Ranges the device may write (used rings of the queues set up, and with packed rings their descriptor rings; the data zone), in order. */
function writableRanges(packed: boolean, queues: number): [number, number][] {
  const r: [number, number][] = [];
  for (let q = 0; q < Math.max(4, Math.min(queues, FUZZ_QUEUES)); q++) {
    const at = queueRings(q);
    if (packed) r.push([at.desc, at.desc + 0x400]);
    r.push([at.used, at.used + 0x206]);
  }
  r.push([DATA_ZONE, DATA_END]);
  return r.sort((x, y) => x[0] - y[0]);
}

function protectedRanges(packed: boolean, queues: number): [number, number][] {
  const out: [number, number][] = [];
  let at = 0;
  for (const [a, b] of writableRanges(packed, queues)) {
    if (a > at) out.push([at, a]);
    at = b;
  }
  if (at < FUZZ_RAM) out.push([at, FUZZ_RAM]);
  return out;
}

export interface ChainSpec {
  readonly bufs: Buffer[];
  /** Check the outcome once the chain was used (the device did not need a reset). */
  readonly check?: (used: { id: number; len: number }) => void;
}

export interface FuzzTarget {
  readonly dev: VirtioPciDevice;
  readonly services: TestServices;
  /** A well-formed request for queue `q` (buffers in the header / data zones). */
  request(rng: SeededRandom, q: number): ChainSpec | undefined;
  /** Queues that consume every available chain at a notification (malformed chains are then always seen). */
  readonly consuming: readonly number[];
  /** An extra device-specific action (host side events); optional. */
  extra?(rng: SeededRandom): void;
  /** After each notification, inside the same checks: finish what the device left in flight (an io_uring's requests). */
  afterKick?(): void;
}

export interface FuzzStats {
  steps: number;
  requestsCompleted: number;
  malformedDetected: number;
  needsReset: number;
  probes: number;
  registerOps: number;
  garbage: number;
}

/** Fuzzing services over FUZZ_RAM of plain buffers, or (hostMapped) of a memfd mapped as the worker maps guest RAM. */
export function fuzzServices(hostMapped = false): TestServices {
  return makeServices(FUZZ_RAM, 1 << 30, hostMapped);
}

const pick = <T,>(rng: SeededRandom, xs: readonly T[]): T => xs[rng.int(xs.length)]!;

/** A random writable buffer: inside the data zone, or out of RAM. */
export function writableBuffer(rng: SeededRandom, maxLen = 4096): { addr: number; len: number } {
  const k = rng.int(20);
  if (k === 0) return { addr: FUZZ_RAM - 1 - rng.int(64), len: 65 + rng.int(4096) }; // straddles the end of RAM
  if (k === 1) return { addr: pick(rng, [2 ** 32, 2 ** 40 + rng.int(4096), 2 ** 53 - 8, 2 ** 63, FUZZ_RAM]), len: 1 + rng.int(maxLen) };
  const len = rng.int(20) === 0 ? 0 : 1 + rng.int(maxLen);
  const addr = DATA_ZONE + rng.int(DATA_END - DATA_ZONE - len);
  return { addr, len };
}

/**
 * Address and length of a random descriptor with `flags` (bit 2 INDIRECT, bit
 * 1 WRITE): a table from `tableAt`, a writable buffer in the data zone or out
 * of RAM, a readable one anywhere.
 */
function sanitisedElement(r: SeededRandom, flags: number, tableAt: () => number): { addr: number; len: number } {
  if ((flags & 4) !== 0) {
    const addr = tableAt();
    let len = r.int(4) === 0 ? r.int(0x10000) : 16 * r.int(70);
    if (addr >= INDIRECT_ZONE && addr < INDIRECT_ZONE + 0x2000) len = Math.min(len, INDIRECT_ZONE + 0x2000 - addr + (r.int(8) === 0 ? 16 : 0));
    return { addr, len };
  }
  if ((flags & 2) !== 0) return writableBuffer(r);
  return {
    addr: r.int(8) === 0 ? pick(r, [2 ** 32, 2 ** 53 + 2, 2 ** 64 - 4096]) : r.int(FUZZ_RAM + 0x1000),
    len: r.int(6) === 0 ? 0xffff_ffff : r.int(0x2000),
  };
}

export function dataBuffer(rng: SeededRandom, len: number): number {
  return DATA_ZONE + rng.int(DATA_END - DATA_ZONE - len);
}

export class VirtioFuzzer {
  readonly drv: TestVirtioDriver;
  readonly stats: FuzzStats = { steps: 0, requestsCompleted: 0, malformedDetected: 0, needsReset: 0, probes: 0, registerOps: 0, garbage: 0 };
  private readonly shadow: Uint8Array;
  private readonly ram: Uint8Array;
  private prot = protectedRanges(false, 4);
  /** Packed rings were negotiated at the last probe. */
  private packed = false;
  /** Probes that negotiated packed rings. */
  packedProbes = 0;
  private readonly pristine: Uint8Array;
  private indirectNext = 0;
  private headerNext = 0;

  constructor(readonly t: FuzzTarget, readonly rng: SeededRandom) {
    placeDevice(t.dev);
    this.drv = new TestVirtioDriver(t.dev, t.services);
    this.ram = t.services.memory.bytes(0, FUZZ_RAM);
    for (let i = 0; i < FUZZ_RAM; i++) this.ram[i] = (i * 131 + 17) & 0xff ^ (i >> 9);
    this.pristine = this.ram.slice();
    this.shadow = new Uint8Array(FUZZ_RAM);
    this.probe();
  }

  /** Device status as the driver reads it. */
  status(): number {
    return this.drv.status();
  }

  private snapshot(): void {
    for (const [a, b] of this.prot) this.shadow.set(this.ram.subarray(a, b), a);
  }

  private verify(what: string): void {
    for (const [a, b] of this.prot) {
      if (Buffer.compare(this.ram.subarray(a, b), this.shadow.subarray(a, b)) !== 0) {
        let i = a;
        while (this.ram[i] === this.shadow[i]) i++;
        assert.fail(`step ${this.stats.steps} (${what}): device wrote protected RAM at 0x${i.toString(16)}`);
      }
    }
  }

  /** Run `fn` (a device interaction) and check RAM outside the writable zones is unchanged. */
  private device(what: string, fn: () => void): void {
    this.snapshot();
    fn();
    this.verify(what);
    if (this.packed) this.scrubRings();
  }

  probe(): void {
    this.stats.probes++;
    // Fresh ring memory, as a driver allocating new rings would have.
    for (let q = 0; q < 4; q++) this.ram.set(this.pristine.subarray(QUEUE_BLOCK(q), QUEUE_BLOCK(q) + 0x1000), QUEUE_BLOCK(q));
    const offered = this.drv.offeredFeatures();
    let want = featureBit(VIRTIO_F.version1);
    for (let b = 0; b < 64; b++) if (b !== 32 && this.rng.int(3) !== 0) want |= 1n << BigInt(b);
    this.packed = (want & offered & featureBit(VIRTIO_F.ringPacked)) !== 0n;
    this.prot = protectedRanges(this.packed, this.t.dev.queues.length);
    if (this.packed) this.packedProbes++;
    const sizes = this.packed ? [1, 2, 3, 4, 5, 8, 13, 16, 32, 64] : [1, 2, 4, 8, 16, 32, 64];
    this.drv.init({
      want: want & offered,
      msix: this.rng.int(4) !== 0,
      queueSize: pick(this.rng, sizes),
      queues: FUZZ_QUEUES,
      ringAt: queueRings,
    });
  }

  /** Packed: the test driver takes the device's ring positions as its own. */
  private resync(q: number): PackedDriverQueue | undefined {
    const pq = this.drv.packed[q];
    if (pq === undefined) return undefined;
    const st = this.t.dev.queues[q]!.save();
    pq.resync({ availPos: st.packed !== undefined ? st.lastAvail : 0, availWrap: st.packed?.availWrap ?? 1, usedPos: st.packed !== undefined ? st.usedIdx : 0, usedWrap: st.packed?.usedWrap ?? 1 });
    return pq;
  }

  /** Packed: no device-writable ring descriptor may keep an address outside the data zone (see the file's head). */
  private scrubRings(): void {
    for (const pq of this.drv.packed) {
      if (pq.desc !== queueRings(pq.index).desc) continue;
      for (let i = 0; i < Math.min(pq.size, 64); i++) {
        const at = pq.desc + 16 * i;
        const flags = this.ram[at + 14]! | (this.ram[at + 15]! << 8);
        if ((flags & 2) === 0 || (flags & 4) !== 0) continue;
        const lo = this.ram[at]! | (this.ram[at + 1]! << 8) | (this.ram[at + 2]! << 16) | (this.ram[at + 3]! << 24);
        const hi = this.ram[at + 4]! | (this.ram[at + 5]! << 8) | (this.ram[at + 6]! << 16) | (this.ram[at + 7]! << 24);
        const addr = (hi >>> 0) * 2 ** 32 + (lo >>> 0);
        if (addr >= FUZZ_RAM || (addr >= DATA_ZONE && addr < DATA_END)) continue;
        this.ram.set([0, 0xb0, 0, 0, 0, 0, 0, 0], at); // DATA_ZONE
      }
    }
  }

  private queueReady(q: number): boolean {
    return this.t.dev.active && this.t.dev.queues[q]?.ready === true;
  }

  private indirectSlot(entries: number): number {
    const bytes = entries * 16;
    if (this.indirectNext + bytes > 0x2000) this.indirectNext = 0;
    const at = INDIRECT_ZONE + this.indirectNext;
    this.indirectNext += Math.ceil(bytes / 16) * 16;
    return at;
  }

  /** Driver-owned scratch (headers, outgoing data); each request starts at its beginning, so none wraps over itself. */
  header(bytes: Uint8Array): number {
    if (this.headerNext + bytes.length > 0x2000) this.headerNext = 0;
    const at = HEADER_ZONE + this.headerNext;
    this.ram.set(bytes, at);
    this.headerNext += Math.ceil(bytes.length / 16) * 16;
    return at;
  }

  private kick(dq: { kick(viaBar: boolean): void }): void {
    this.device("kick", () => {
      dq.kick(this.rng.int(3) === 0);
      this.t.afterKick?.();
    });
  }

  private wellFormed(q: number): void {
    if (this.packed) {
      this.wellFormedPacked(q);
      return;
    }
    const dq = this.drv.queues[q];
    if (dq === undefined) return;
    this.headerNext = 0;
    const spec = this.t.request(this.rng, q);
    if (spec === undefined || spec.bufs.length === 0) return;
    const useIndirect = (this.drv.features & featureBit(VIRTIO_F.indirectDesc)) !== 0n && this.rng.int(3) === 0;
    if (!useIndirect && spec.bufs.length > dq.size) return;
    const ready = this.queueReady(q) && (this.status() & S.needsReset) === 0;
    dq.setUsedEvent(dq.lastUsed);
    const head = dq.add(spec.bufs, useIndirect ? { indirectAt: this.indirectSlot(spec.bufs.length) } : {});
    this.kick(dq);
    const used = dq.takeUsed();
    if (!ready || !this.t.consuming.includes(q) || (this.status() & S.needsReset) !== 0) return;
    // The last entry with that id: an older chain made available with the same head (garbage) may come first.
    const mine = used.findLast((u) => u.id === head);
    assert.ok(mine !== undefined, `step ${this.stats.steps}: well-formed chain ${head} on queue ${q} was not used`);
    const writable = spec.bufs.filter((b) => b.write).reduce((n, b) => n + b.len, 0);
    assert.ok(mine.len <= writable, `used length ${mine.len} > writable ${writable}`);
    spec.check?.(mine);
    this.stats.requestsCompleted++;
  }

  private wellFormedPacked(q: number): void {
    this.headerNext = 0;
    const spec = this.t.request(this.rng, q);
    const pq = this.resync(q);
    if (pq === undefined || spec === undefined || spec.bufs.length === 0) return;
    const useIndirect = (this.drv.features & featureBit(VIRTIO_F.indirectDesc)) !== 0n && this.rng.int(3) === 0;
    if (!useIndirect && spec.bufs.length > pq.size) return;
    const ready = this.queueReady(q) && (this.status() & S.needsReset) === 0;
    pq.setDriverEvent(this.rng.int(4) === 0 ? 1 : 0);
    const id = pq.add(spec.bufs, useIndirect ? { indirectAt: this.indirectSlot(spec.bufs.length) } : {});
    this.kick(pq);
    const used = pq.takeUsed();
    if (!ready || !this.t.consuming.includes(q) || (this.status() & S.needsReset) !== 0) return;
    // The first: the list is at the device's position, and stale descriptors after it may look available too.
    const mine = used.find((u) => u.id === id);
    assert.ok(mine !== undefined, `step ${this.stats.steps}: well-formed packed list ${id} on queue ${q} was not used`);
    const writable = spec.bufs.filter((b) => b.write).reduce((n, b) => n + b.len, 0);
    assert.ok(mine.len <= writable, `used length ${mine.len} > writable ${writable}`);
    spec.check?.(mine);
    this.stats.requestsCompleted++;
  }

  /** One definite protocol violation on a consuming packed queue. */
  private malformedPacked(q: number): void {
    const pq = this.resync(q);
    if (pq === undefined) return;
    const ready = this.queueReady(q);
    const n = pq.size;
    const r = this.rng;
    const kind = r.int(7);
    const NEXT = 1;
    const INDIRECT = 4;
    switch (kind) {
      case 0: // a list longer than the queue: NEXT on every descriptor of the ring
        pq.add(Array.from({ length: n }, () => ({ addr: HEADER_ZONE, len: 16, write: false })), { extraFlags: () => NEXT });
        break;
      case 1: // an indirect descriptor with NEXT (or any indirect one when not negotiated)
        pq.add([{ addr: this.indirectSlot(2), len: 32, write: false }], { extraFlags: () => INDIRECT | NEXT });
        break;
      case 2: // writable buffer straddling the end of RAM
        pq.add([{ addr: FUZZ_RAM - 1 - r.int(16), len: 64, write: true }]);
        break;
      case 3: // readable after writable inside an indirect table
        pq.add([{ addr: DATA_ZONE, len: 8, write: true }, { addr: HEADER_ZONE, len: 8, write: false }], { indirectAt: this.indirectSlot(2) });
        break;
      case 4: // readable after writable in a list
        if (n < 2) return;
        pq.add([{ addr: DATA_ZONE, len: 8, write: true }, { addr: HEADER_ZONE, len: 8, write: false }]);
        break;
      case 5: // indirect table length not a multiple of 16
        pq.add([{ addr: this.indirectSlot(2), len: 24, write: false }], { extraFlags: () => INDIRECT });
        break;
      default: // an indirect descriptor inside a list linked by NEXT
        if (n < 2) return;
        pq.add([{ addr: HEADER_ZONE, len: 8, write: false }, { addr: this.indirectSlot(1), len: 16, write: false }], { extraFlags: (k) => (k === 1 ? INDIRECT : 0) });
    }
    this.kick(pq);
    pq.takeUsed();
    if (ready && this.t.consuming.includes(q)) {
      assert.equal(this.status() & S.needsReset, S.needsReset, `step ${this.stats.steps}: malformed packed kind ${kind} on queue ${q} not detected`);
      assert.ok(this.t.dev.queues[q]!.error !== undefined || this.t.dev.lastError !== undefined);
      this.stats.malformedDetected++;
    }
  }

  /** Packed ring garbage: random (sanitised) descriptors in the ring and the indirect zone, random event structures. */
  private garbagePacked(q: number): void {
    const pq = this.resync(q);
    if (pq === undefined) return;
    this.stats.garbage++;
    const r = this.rng;
    const descriptor = (table: number, i: number): void => {
      let flags = r.int(8) | (r.int(2) << 7) | (r.int(2) << 15);
      if (r.int(3) === 0) flags |= PackedDriverQueue.availBits(pq.availWrap);
      if (r.int(10) === 0) flags |= r.int(0x10000);
      // An indirect table only in the indirect zone or out of RAM: never over the ring, whose used descriptors say WRITE.
      const { addr, len } = sanitisedElement(r, table === pq.desc ? flags : flags & ~4, () => pick(r, [INDIRECT_ZONE + 16 * r.int(0x1f0), INDIRECT_ZONE + r.int(0x1f00), FUZZ_RAM - 16 * r.int(4), 2 ** 40]));
      pq.writeDesc(table, i, addr, len, flags, r.int(0x10000));
    };
    const writes = 1 + r.int(4);
    for (let k = 0; k < writes; k++) {
      switch (r.int(5)) {
        case 0:
        case 1:
          descriptor(pq.desc, r.int(k === 0 ? Math.min(pq.size, 2) : pq.size));
          break;
        case 2:
          descriptor(INDIRECT_ZONE, r.int(0x1f0));
          break;
        case 3:
          pq.setDriverEvent(r.int(4), r.int(0x8000), r.int(2));
          break;
        default:
          this.ram.set([r.int(256), r.int(256), r.int(256), r.int(256)], pq.driver);
      }
    }
    this.kick(pq);
    pq.takeUsed();
  }

  /** One definite protocol violation on a consuming queue. */
  private malformed(q: number): void {
    if (this.packed) {
      this.malformedPacked(q);
      return;
    }
    const dq = this.drv.queues[q];
    if (dq === undefined) return;
    const ready = this.queueReady(q);
    const n = dq.size;
    const h = dq.freeHead;
    const r = this.rng;
    const kind = r.int(7);
    switch (kind) {
      case 0: // loop
        dq.writeDesc(dq.desc, h, DATA_ZONE, 16, 1, h);
        dq.publish(h);
        break;
      case 1: // head out of range
        dq.publish(n + r.int(0x10000 - n));
        break;
      case 2: // avail.idx too far ahead
        dq.availIdx = (dq.availIdx + n + 1 + r.int(1000)) & 0xffff;
        dq.publish(0);
        break;
      case 3: // next out of range
        if (n === 1) return;
        dq.writeDesc(dq.desc, h, DATA_ZONE, 16, 1, n + r.int(100));
        dq.publish(h);
        break;
      case 4: // writable buffer straddling the end of RAM
        dq.writeDesc(dq.desc, h, FUZZ_RAM - 1 - r.int(16), 64, 2, 0);
        dq.publish(h);
        break;
      case 5: {
        // readable after writable (inside an indirect table so any queue size works)
        const t = this.indirectSlot(2);
        dq.writeDesc(t, 0, DATA_ZONE, 8, 3, 1);
        dq.writeDesc(t, 1, HEADER_ZONE, 8, 0, 0);
        dq.writeDesc(dq.desc, h, t, 32, 4, 0);
        dq.publish(h);
        break;
      }
      default: {
        // nested indirect (or any indirect when not negotiated)
        const t = this.indirectSlot(1);
        dq.writeDesc(t, 0, INDIRECT_ZONE, 16, 4, 0);
        dq.writeDesc(dq.desc, h, t, 16, 4, 0);
        dq.publish(h);
      }
    }
    dq.freeHead = (h + 1) % n;
    this.kick(dq);
    dq.takeUsed();
    if (ready && this.t.consuming.includes(q)) {
      assert.equal(this.status() & S.needsReset, S.needsReset, `step ${this.stats.steps}: malformed kind ${kind} on queue ${q} not detected`);
      assert.ok(this.t.dev.queues[q]!.error !== undefined || this.t.dev.lastError !== undefined);
      this.stats.malformedDetected++;
    }
  }

  /** A random descriptor, sanitised so that device-writable memory stays in the data zone. */
  private randomDescriptor(dq: { readonly size: number; writeDesc(table: number, i: number, addr: number, len: number, flags: number, next: number): void }, table: number, i: number): void {
    const r = this.rng;
    let flags = r.int(8);
    if (r.int(10) === 0) flags |= r.int(0x10000) & ~7;
    const { addr, len } = sanitisedElement(r, flags, () => {
      const k = r.int(5);
      return k === 0 ? INDIRECT_ZONE + 16 * r.int(0x200) : k === 1 ? INDIRECT_ZONE + r.int(0x2000) : k === 2 ? QUEUE_BLOCK(r.int(4)) : k === 3 ? FUZZ_RAM - 16 * r.int(4) : 2 ** 40;
    });
    const next = r.int(6) === 0 ? r.int(0x10000) : r.int(Math.max(1, dq.size));
    dq.writeDesc(table, i, addr, len, flags, next);
  }

  private garbage(q: number): void {
    if (this.packed) {
      this.garbagePacked(q);
      return;
    }
    const dq = this.drv.queues[q];
    if (dq === undefined) return;
    this.stats.garbage++;
    const r = this.rng;
    const writes = 1 + r.int(4);
    for (let k = 0; k < writes; k++) {
      switch (r.int(7)) {
        case 0:
        case 1:
          this.randomDescriptor(dq, dq.desc, r.int(dq.size));
          break;
        case 2:
          this.randomDescriptor(dq, INDIRECT_ZONE, r.int(0x200));
          break;
        case 3:
          dq.publish(r.int(3) === 0 ? r.int(0x10000) : r.int(dq.size));
          break;
        case 4:
          dq.setAvailFlags(r.int(4));
          dq.setUsedEvent(r.int(0x10000));
          break;
        case 5: {
          // avail.idx at random (what the device does depends on its distance)
          dq.availIdx = r.int(0x10000);
          dq.publish(r.int(dq.size));
          break;
        }
        default:
          this.ram.set([r.int(256), r.int(256)], dq.avail + 4 + 2 * r.int(dq.size));
      }
    }
    this.kick(dq);
    dq.takeUsed();
  }

  /** A queue-address register value for the selected queue: its own ring, misaligned, or out of RAM. */
  private ringAddress(field: number): number {
    const sel = this.drv.r16(C.queueSelect);
    const rings = queueRings(Math.min(sel, FUZZ_QUEUES - 1));
    const own = field === C.queueDesc ? rings.desc : field === C.queueDriver ? rings.avail : rings.used;
    return pick(this.rng, [own, own + 1, own + 2, FUZZ_RAM - 2, 2 ** 33, 0xffff_fff0]);
  }

  /** One random register access through BAR0/BAR1 (or through the PCI_CFG window). */
  private register(): void {
    this.stats.registerOps++;
    const r = this.rng;
    const dev = this.t.dev;
    const k = r.int(12);
    let bar = 0;
    let offset = 0;
    let size: 1 | 2 | 4 = 4;
    let value = 0;
    let read = false;
    const fields: [number, 1 | 2 | 4][] = [
      [C.deviceFeatureSelect, 4], [C.driverFeatureSelect, 4], [C.driverFeature, 4], [C.msixConfig, 2], [C.deviceStatus, 1],
      [C.queueSelect, 2], [C.queueSize, 2], [C.queueMsixVector, 2], [C.queueEnable, 2], [C.queueDesc, 4], [C.queueDesc + 4, 4],
      [C.queueDriver, 4], [C.queueDriver + 4, 4], [C.queueDevice, 4], [C.queueDevice + 4, 4], [C.numQueues, 2], [C.configGeneration, 1],
    ];
    if (k < 5) {
      const [o, w] = pick(r, fields);
      offset = o;
      size = r.int(8) === 0 ? pick(r, [1, 2, 4] as const) : w;
      switch (o) {
        case C.deviceStatus:
          value = pick(r, [0, 0, 1, 3, 0xb, 0xf, 0x80, 0x40, r.int(256)]);
          break;
        case C.queueSelect:
          value = r.int(6);
          break;
        case C.queueSize:
          value = pick(r, [0, 1, 3, 16, 64, 128, 0xffff, r.int(0x10000)]);
          break;
        case C.queueEnable:
          value = pick(r, [0, 1, 1, 2]);
          break;
        case C.queueDesc:
        case C.queueDriver:
        case C.queueDevice:
          value = this.ringAddress(o);
          value = value % 2 ** 32;
          break;
        case C.queueDesc + 4:
        case C.queueDriver + 4:
        case C.queueDevice + 4:
          value = r.int(4) === 0 ? r.int(2 ** 32) : 0;
          break;
        default:
          value = r.int(8) === 0 ? r.int(2 ** 32) : r.int(8);
      }
    } else if (k === 5) {
      read = true;
      offset = r.int(0x40);
      size = pick(r, [1, 2, 4] as const);
    } else if (k === 6) {
      read = true;
      offset = VIRTIO_BAR0.isr + (r.int(4) === 0 ? r.int(16) : 0);
      size = pick(r, [1, 2, 4] as const);
    } else if (k === 7) {
      read = r.int(2) === 0;
      // Now and then byte 0x20 exactly: virtio-blk's writeback (CONFIG_WCE), the one field a driver may write there.
      offset = VIRTIO_BAR0.device + (r.int(4) === 0 ? 0x20 : r.int(0x80));
      size = pick(r, [1, 2, 4] as const);
      value = pick(r, [0, 1, r.int(2 ** 32)]);
    } else if (k === 8) {
      offset = VIRTIO_BAR0.notify + (r.int(2) === 0 ? 4 * r.int(8) : r.int(0x1000));
      size = pick(r, [1, 2, 4] as const);
      value = r.int(0x10000);
    } else if (k === 9) {
      bar = 1;
      read = r.int(3) === 0;
      offset = r.int(0x1000);
      size = pick(r, [1, 2, 4] as const);
      value = pick(r, [0, 1, 0xfee0_0000, r.int(2 ** 32)]);
    } else if (k === 10) {
      bar = pick(r, [0, 2, 3, 5]);
      read = r.int(2) === 0;
      // Beyond BAR0's registers (random values at random register offsets could aim a ring anywhere).
      offset = pick(r, [bar === 0 ? 0x4000 + r.int(0x10000) : r.int(0x10000), -4, 0x4000, 2 ** 40]);
      size = pick(r, [1, 2, 4] as const);
      value = r.int(2 ** 32);
    } else {
      this.configSpace();
      return;
    }
    this.device("register", () => {
      if (read) dev.barRead(bar, offset, size);
      else if (r.int(10) === 0 && bar === 0 && offset >= 0 && offset < 0x4000) this.viaPciCfg(offset, size, value);
      else dev.barWrite(bar, offset, size, value);
    });
  }

  private pciCfgCap(): number {
    const dev = this.t.dev;
    let p = dev.pci.configRead(0x34, 1);
    while (p !== 0) {
      if (dev.pci.configRead(p, 1) === 0x09 && dev.pci.configRead(p + 3, 1) === 5) return p;
      p = dev.pci.configRead(p + 1, 1);
    }
    return 0;
  }

  private viaPciCfg(offset: number, size: 1 | 2 | 4, value: number): void {
    const dev = this.t.dev;
    const c = this.pciCfgCap();
    dev.pci.configWrite(c + 4, 1, 0);
    dev.pci.configWrite(c + 8, 4, offset);
    dev.pci.configWrite(c + 12, 4, size);
    if (this.rng.int(2) === 0) dev.pci.configRead(c + 16, size);
    else dev.pci.configWrite(c + 16, size, value);
    // Leave the window on a harmless register (random config writes may hit pci_cfg_data later).
    dev.pci.configWrite(c + 8, 4, VIRTIO_BAR0.isr + 4);
  }

  private configSpace(): void {
    const r = this.rng;
    const dev = this.t.dev;
    const k = r.int(5);
    this.device("config space", () => {
      if (k === 0) dev.pci.configWrite(0x04, 2, pick(r, [0x6, 0x7, 0x2, 0x4, 0x406, 0x0, r.int(0x10000)]));
      else if (k === 1) dev.pci.configWrite(this.drv.msixCap || this.drv.findMsixCap(), 4, (pick(r, [0x8000, 0xc000, 0x4000, 0]) << 16) >>> 0);
      else if (k === 2) dev.pci.configRead(r.int(256), pick(r, [1, 2, 4] as const));
      else if (k === 3) {
        // BAR moves (and sizing): doorbells follow.
        const bar = 0x10 + 4 * r.int(6);
        dev.pci.configWrite(bar, 4, pick(r, [0xffff_ffff, 0xe000_0000, 0xd000_0000, 0, r.int(2 ** 32)]));
      } else dev.pci.configWrite(0x40 + r.int(0xc0), pick(r, [1, 2, 4] as const), r.int(2 ** 32));
    });
    if ((dev.pci.command & 0x6) !== 0x6 && r.int(4) !== 0) dev.pci.configWrite(0x04, 2, dev.pci.command | 0x6);
  }

  step(): void {
    this.stats.steps++;
    const r = this.rng;
    const nq = this.packed ? this.drv.packed.length : this.drv.queues.length;
    const st = this.status();
    if ((st & S.needsReset) !== 0) this.stats.needsReset++;
    const q = nq === 0 ? 0 : r.int(nq);
    const k = r.int(100);
    // Random register writes may have renegotiated the other ring layout: the driver's rings no longer match.
    const layoutChanged = (st & S.featuresOk) !== 0 && ((this.t.dev.negotiatedFeatures & featureBit(VIRTIO_F.ringPacked)) !== 0n) !== this.packed;
    if (((st & S.needsReset) !== 0 && r.int(4) === 0) || (st & S.driverOk) === 0 && r.int(3) === 0 || k < 1 || layoutChanged) {
      this.probe();
      return;
    }
    if (k < 45) this.wellFormed(q);
    else if (k < 52) {
      const cq = this.t.consuming.length > 0 ? pick(r, this.t.consuming) : q;
      if (cq < nq) this.malformed(cq);
    } else if (k < 70) this.garbage(q);
    else if (k < 92) this.register();
    else if (this.t.extra !== undefined) this.device("extra", () => this.t.extra!(r));
    else this.register();
  }

  run(steps: number): FuzzStats {
    for (let i = 0; i < steps; i++) {
      try {
        this.step();
      } catch (e) {
        if (e instanceof assert.AssertionError) throw e;
        throw new Error(`step ${this.stats.steps}: the device threw: ${(e as Error).stack ?? String(e)}`);
      }
    }
    return this.stats;
  }
}
