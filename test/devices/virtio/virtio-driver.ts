/**
 * A test-side virtio-pci driver: lays out split rings (or packed ones, when
 * VIRTIO_F_RING_PACKED is negotiated) in a small anonymous
 * guest RAM and talks to a VirtioPciDevice only through its PCI config space
 * and BARs, in the order Linux's virtio_pci_modern + virtio_ring do (reset,
 * ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue setup, MSI-X vectors,
 * queue_enable, DRIVER_OK). Plus fakes for the device-thread services.
 */
import * as libc from "../../../src/hypervisor/libc.js";
import { ChunkedGuestMemory } from "../../../src/machine/guest-memory.js";
import type { DoorbellMap, FdWatch, IoEventLoop, PciDeviceServices } from "../../../src/devices/pci/device-thread-services.js";
import type { MsiSink } from "../../../src/devices/pci/msix.js";
import { PCI_CAP_ID } from "../../../src/devices/pci/pci-config.js";
import {
  VIRTIO_BAR0,
  VIRTIO_COMMON as C,
  VIRTIO_F,
  VIRTIO_STATUS as S,
  featureBit,
  type VirtioPciDevice,
} from "../../../src/devices/virtio/pci-transport.js";
import { DeferredWork, RecordingIrqLine } from "../device-fakes.js";

export const BAR0 = 0xe000_0000;
export const BAR1 = 0xe001_0000;

export class RecordingMsiSink implements MsiSink {
  readonly messages: { address: number; data: number; vector: number }[] = [];
  signal(address: number, _addressHigh: number, data: number, vector: number): void {
    this.messages.push({ address, data, vector });
  }
  count(vector: number): number {
    return this.messages.filter((m) => m.vector === vector).length;
  }
}

export class FakeDoorbells implements DoorbellMap {
  readonly bells = new Map<number, { gpa: number | undefined; length: number; onRing: () => void }>();
  mapDoorbell(key: number, gpa: number | undefined, length: number, onRing: () => void): void {
    this.bells.set(key, { gpa, length, onRing });
  }
  /** Ring doorbell `key` the way KVM would after a guest write to its address. */
  ring(key: number): boolean {
    const b = this.bells.get(key);
    if (b === undefined || b.gpa === undefined) return false;
    b.onRing();
    return true;
  }
}

export class FakeLoop implements IoEventLoop {
  readonly watches = new Map<number, { handler: () => void; closed: boolean }[]>();
  /** Deferred work (no such device defers any today): run inside the access that defers it. */
  readonly work = new DeferredWork();
  defer(task: () => void): void {
    this.work.defer(task);
  }
  watch(fd: number, onReadable: () => void): FdWatch {
    const w = { handler: onReadable, closed: false };
    const list = this.watches.get(fd) ?? [];
    list.push(w);
    this.watches.set(fd, list);
    return { close: () => void (w.closed = true) };
  }
  readonly writableWatches = new Map<number, { handler: () => void; closed: boolean }[]>();
  watchWritable(fd: number, onWritable: () => void): FdWatch {
    const w = { handler: onWritable, closed: false };
    const list = this.writableWatches.get(fd) ?? [];
    list.push(w);
    this.writableWatches.set(fd, list);
    return { close: () => void (w.closed = true) };
  }
  /** Live writability watches on fd. */
  activeWritable(fd: number): number {
    return (this.writableWatches.get(fd) ?? []).filter((w) => !w.closed).length;
  }
  /** Poll says fd is writable: run its writability handlers. */
  fireWritable(fd: number): void {
    for (const w of [...(this.writableWatches.get(fd) ?? [])]) if (!w.closed) w.handler();
  }
  /** Live watches on fd. */
  active(fd: number): number {
    return (this.watches.get(fd) ?? []).filter((w) => !w.closed).length;
  }
  /** Poll says fd is readable: run its handlers. */
  fire(fd: number): void {
    for (const w of [...(this.watches.get(fd) ?? [])]) if (!w.closed) w.handler();
  }
}

export interface TestServices extends PciDeviceServices {
  readonly memory: ChunkedGuestMemory;
  readonly intx: RecordingIrqLine;
  readonly msi: RecordingMsiSink;
  readonly loop: FakeLoop;
  readonly doorbells: FakeDoorbells;
}

/** RAM at [0, ramBytes) (one range, chunked so buffers can cross host chunks when chunkBytes is small). */
/**
 * Services over `ramBytes` of guest RAM: plain buffers, or (hostMapped) a memfd
 * mapped as the worker maps it, so back ends can take the host-address path.
 */
export function makeServices(ramBytes = 1 << 20, chunkBytes = 1 << 30, hostMapped = false): TestServices {
  const memory = hostMapped
    ? new ChunkedGuestMemory(
        [{ gpa: 0, length: ramBytes, fileOffset: 0 }],
        (off, len) => {
          const fd = libc.memfdCreate("test-guest-ram");
          try {
            libc.ftruncate(fd, ramBytes);
            return libc.mapSharedFile(fd, off, len);
          } finally {
            libc.close(fd);
          }
        },
        chunkBytes,
        (v) => Number(libc.addressOfView(v)),
      )
    : new ChunkedGuestMemory([{ gpa: 0, length: ramBytes, fileOffset: 0 }], (_o, len) => new Uint8Array(len), chunkBytes);
  return { memory, intx: new RecordingIrqLine(), msi: new RecordingMsiSink(), loop: new FakeLoop(), doorbells: new FakeDoorbells() };
}

/** Firmware-style BAR assignment + decoding, then the mapping hook (as the device thread does). */
export function placeDevice(dev: VirtioPciDevice): void {
  dev.pci.assignBar(0, BAR0);
  dev.pci.assignBar(1, BAR1);
  dev.pci.enableDecoding();
  dev.pci.onMappingChanged?.();
}

export interface Buffer {
  readonly addr: number;
  readonly len: number;
  readonly write: boolean;
}

/** Driver side of one split queue. */
export class DriverQueue {
  freeHead = 0;
  numFree: number;
  availIdx = 0;
  lastUsed = 0;
  constructor(
    readonly memory: ChunkedGuestMemory,
    readonly index: number,
    readonly size: number,
    readonly desc: number,
    readonly avail: number,
    readonly used: number,
    private readonly notify: (viaBar: boolean) => void = () => {},
  ) {
    this.numFree = size;
    const m = memory;
    for (let i = 0; i < size; i++) m.bytes(desc + i * 16 + 14, 2).set([(i + 1) & 0xff, ((i + 1) >> 8) & 0xff]);
  }

  private dv(addr: number, len: number): DataView {
    const b = this.memory.bytes(addr, len);
    return new DataView(b.buffer, b.byteOffset, len);
  }

  writeDesc(table: number, i: number, addr: number, len: number, flags: number, next: number): void {
    const d = this.dv(table + i * 16, 16);
    d.setUint32(0, addr % 2 ** 32, true);
    d.setUint32(4, Math.floor(addr / 2 ** 32), true);
    d.setUint32(8, len, true);
    d.setUint16(12, flags, true);
    d.setUint16(14, next, true);
  }

  /** Place a chain (optionally as one indirect table at `indirectAt`) and publish it. Returns the head. */
  add(bufs: readonly Buffer[], opts: { indirectAt?: number; publish?: boolean } = {}): number {
    const head = this.freeHead;
    if (opts.indirectAt !== undefined) {
      bufs.forEach((b, i) => this.writeDesc(opts.indirectAt!, i, b.addr, b.len, (b.write ? 2 : 0) | (i + 1 < bufs.length ? 1 : 0), i + 1));
      this.writeDesc(this.desc, head, opts.indirectAt, bufs.length * 16, 4, 0);
      this.freeHead = (head + 1) % this.size;
      this.numFree -= 1;
    } else {
      let i = head;
      bufs.forEach((b, k) => {
        const next = (i + 1) % this.size;
        this.writeDesc(this.desc, i, b.addr, b.len, (b.write ? 2 : 0) | (k + 1 < bufs.length ? 1 : 0), next);
        if (k + 1 < bufs.length) i = next;
      });
      this.freeHead = (i + 1) % this.size;
      this.numFree -= bufs.length;
    }
    if (opts.publish !== false) this.publish(head);
    return head;
  }

  /** Put `head` in the avail ring and bump avail.idx. */
  publish(head: number): void {
    const a = this.dv(this.avail, 4 + 2 * this.size + 2);
    a.setUint16(4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    a.setUint16(2, this.availIdx, true);
  }

  setAvailFlags(flags: number): void {
    this.dv(this.avail, 2).setUint16(0, flags, true);
  }
  setUsedEvent(v: number): void {
    this.dv(this.avail + 4 + 2 * this.size, 2).setUint16(0, v, true);
  }
  availEvent(): number {
    return this.dv(this.used + 4 + 8 * this.size, 2).getUint16(0, true);
  }
  usedFlags(): number {
    return this.dv(this.used, 2).getUint16(0, true);
  }
  usedIdx(): number {
    return this.dv(this.used + 2, 2).getUint16(0, true);
  }

  /** Used entries since the last call. */
  takeUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    const idx = this.usedIdx();
    while (this.lastUsed !== idx) {
      const e = this.dv(this.used + 4 + 8 * (this.lastUsed % this.size), 8);
      out.push({ id: e.getUint32(0, true), len: e.getUint32(4, true) });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /** Notify the device: through the doorbell when mapped, else a BAR write. */
  kick(viaBar = false): void {
    this.notify(viaBar);
  }
}

/** Packed descriptor flags (2.7). */
const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;
const AVAIL = 1 << 7;
const USED = 1 << 15;

/**
 * Driver side of one packed queue, as Linux's virtio_ring does it: buffer ids
 * from a free list, the id in every descriptor of a list, the first
 * descriptor's flags written last; used descriptors found at the driver's
 * used position by their USED bit, skipping as many descriptors as the id's
 * list took.
 */
export class PackedDriverQueue {
  nextAvail = 0;
  availWrap = 1;
  nextUsed = 0;
  usedWrap = 1;
  numFree: number;
  private freeIds: number[] = [];
  private readonly listLength = new Map<number, number>();
  constructor(
    readonly memory: ChunkedGuestMemory,
    readonly index: number,
    readonly size: number,
    readonly desc: number,
    readonly driver: number,
    readonly device: number,
    private readonly notify: (viaBar: boolean) => void = () => {},
  ) {
    this.numFree = size;
    this.freeIds = Array.from({ length: size }, (_v, i) => size - 1 - i);
  }

  private dv(addr: number, len: number): DataView {
    const b = this.memory.bytes(addr, len);
    return new DataView(b.buffer, b.byteOffset, len);
  }

  /** A packed descriptor at index i of `table` (the ring, or an indirect table). */
  writeDesc(table: number, i: number, addr: number, len: number, flags: number, id: number): void {
    const d = this.dv(table + i * 16, 16);
    d.setUint32(0, addr % 2 ** 32, true);
    d.setUint32(4, Math.floor(addr / 2 ** 32), true);
    d.setUint32(8, len, true);
    d.setUint16(12, id, true);
    d.setUint16(14, flags, true);
  }

  readFlags(i: number): number {
    return this.dv(this.desc + i * 16 + 14, 2).getUint16(0, true);
  }

  /** AVAIL/USED bits that make a descriptor available in lap `wrap`. */
  static availBits(wrap: number): number {
    return wrap === 1 ? AVAIL : USED;
  }

  /**
   * Make `bufs` available as one list (or one indirect table at `indirectAt`);
   * `flagsFor(k)` may add flags to ring descriptor k (malformed lists).
   * Returns the buffer id.
   */
  add(bufs: readonly Buffer[], opts: { indirectAt?: number; extraFlags?: (k: number) => number } = {}): number {
    const id = this.freeIds.pop() ?? 0;
    const first = this.nextAvail;
    let firstFlags = 0;
    const place = (addr: number, len: number, flags: number, k: number): void => {
      const f = flags | PackedDriverQueue.availBits(this.availWrap) | (opts.extraFlags?.(k) ?? 0);
      if (k === 0) {
        firstFlags = f;
        this.writeDesc(this.desc, this.nextAvail, addr, len, this.readFlags(this.nextAvail), id);
      } else this.writeDesc(this.desc, this.nextAvail, addr, len, f, id);
      if (++this.nextAvail === this.size) {
        this.nextAvail = 0;
        this.availWrap ^= 1;
      }
    };
    let count: number;
    if (opts.indirectAt !== undefined) {
      bufs.forEach((b, i) => this.writeDesc(opts.indirectAt!, i, b.addr, b.len, b.write ? WRITE : 0, 0));
      place(opts.indirectAt, bufs.length * 16, INDIRECT, 0);
      count = 1;
    } else {
      bufs.forEach((b, k) => place(b.addr, b.len, (b.write ? WRITE : 0) | (k + 1 < bufs.length ? NEXT : 0), k));
      count = bufs.length;
    }
    this.listLength.set(id, count);
    this.numFree -= count;
    // The first descriptor's flags last: the device never sees half a list.
    this.dv(this.desc + first * 16 + 14, 2).setUint16(0, firstFlags, true);
    return id;
  }

  /** Used descriptors since the last call (by their USED bit at the driver's used position). */
  takeUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    for (let guard = 0; guard < this.size; guard++) {
      const d = this.dv(this.desc + this.nextUsed * 16, 16);
      const flags = d.getUint16(14, true);
      const used = (flags >> 15) & 1;
      const avail = (flags >> 7) & 1;
      if (used !== this.usedWrap || avail !== this.usedWrap) break;
      const id = d.getUint16(12, true);
      out.push({ id, len: d.getUint32(8, true) });
      const count = this.listLength.get(id) ?? 1;
      this.listLength.delete(id);
      this.freeIds.push(id);
      this.numFree += count;
      this.nextUsed += count;
      if (this.nextUsed >= this.size) {
        this.nextUsed -= this.size;
        this.usedWrap ^= 1;
      }
    }
    return out;
  }

  /** The driver event suppression structure (flags: 0 enable, 1 disable, 2 desc). */
  setDriverEvent(flags: number, offset = 0, wrap = 0): void {
    const d = this.dv(this.driver, 4);
    d.setUint16(0, (offset & 0x7fff) | (wrap << 15), true);
    d.setUint16(2, flags, true);
  }

  /** The device event suppression structure. */
  deviceEvent(): { flags: number; offset: number; wrap: number } {
    const d = this.dv(this.device, 4);
    const ow = d.getUint16(0, true);
    return { flags: d.getUint16(2, true) & 3, offset: ow & 0x7fff, wrap: ow >> 15 };
  }

  /** Take the device's positions as the driver's (after garbage the two may disagree); every id free again. */
  resync(device: { availPos: number; availWrap: number; usedPos: number; usedWrap: number }): void {
    this.nextAvail = device.availPos;
    this.availWrap = device.availWrap;
    this.nextUsed = device.usedPos;
    this.usedWrap = device.usedWrap;
    this.listLength.clear();
    this.freeIds = Array.from({ length: this.size }, (_v, i) => this.size - 1 - i);
    this.numFree = this.size;
  }

  kick(viaBar = false): void {
    this.notify(viaBar);
  }
}

export interface InitOptions {
  /** Feature bits the driver wants (intersected with the offer). */
  readonly want?: bigint;
  readonly msix?: boolean;
  /** Queue sizes to use (default: the device maximum). */
  readonly queueSize?: number;
  /** How many queues to set up (default: all). */
  readonly queues?: number;
  /** Where queue i's rings go (default: allocated from the driver's heap). */
  readonly ringAt?: (index: number, size: number) => { desc: number; avail: number; used: number };
}

export class TestVirtioDriver {
  readonly memory: ChunkedGuestMemory;
  /** Split queues (empty when packed ones were negotiated). */
  queues: DriverQueue[] = [];
  /** Packed queues (VIRTIO_F_RING_PACKED negotiated). */
  packed: PackedDriverQueue[] = [];
  features = 0n;
  private next: number;
  msixCap = 0;

  constructor(readonly dev: VirtioPciDevice, readonly services: TestServices, heapStart = 0x1000) {
    this.memory = services.memory;
    this.next = heapStart;
  }

  alloc(bytes: number, align = 16): number {
    const a = Math.ceil(this.next / align) * align;
    this.next = a + bytes;
    if (this.next > this.memory.size) throw new Error("test RAM exhausted");
    return a;
  }

  r8(o: number): number {
    return this.dev.barRead(0, o, 1);
  }
  r16(o: number): number {
    return this.dev.barRead(0, o, 2);
  }
  r32(o: number): number {
    return this.dev.barRead(0, o, 4);
  }
  w8(o: number, v: number): void {
    this.dev.barWrite(0, o, 1, v);
  }
  w16(o: number, v: number): void {
    this.dev.barWrite(0, o, 2, v);
  }
  w32(o: number, v: number): void {
    this.dev.barWrite(0, o, 4, v);
  }
  w64(o: number, v: number): void {
    this.w32(o, v % 2 ** 32);
    this.w32(o + 4, Math.floor(v / 2 ** 32));
  }
  status(): number {
    return this.r8(C.deviceStatus);
  }
  setStatus(bits: number): void {
    this.w8(C.deviceStatus, this.status() | bits);
  }
  deviceConfig(offset: number, size: 1 | 2 | 4): number {
    return this.dev.barRead(0, VIRTIO_BAR0.device + offset, size);
  }
  setDeviceConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    this.dev.barWrite(0, VIRTIO_BAR0.device + offset, size, value);
  }

  findMsixCap(): number {
    let p = this.dev.pci.configRead(0x34, 1);
    while (p !== 0) {
      if (this.dev.pci.configRead(p, 1) === PCI_CAP_ID.msix) return p;
      p = this.dev.pci.configRead(p + 1, 1);
    }
    throw new Error("no MSI-X capability");
  }

  enableMsix(): void {
    this.msixCap = this.findMsixCap();
    const n = (this.dev.pci.configRead(this.msixCap + 2, 2) & 0x7ff) + 1;
    for (let v = 0; v < n; v++) {
      this.dev.barWrite(1, v * 16, 4, 0xfee0_0000);
      this.dev.barWrite(1, v * 16 + 4, 4, 0);
      this.dev.barWrite(1, v * 16 + 8, 4, 0x40 + v);
      this.dev.barWrite(1, v * 16 + 12, 4, 0);
    }
    this.dev.pci.configWrite(this.msixCap + 2, 2, 0x8000);
  }

  reset(): void {
    this.w8(C.deviceStatus, 0);
    let spins = 0;
    while (this.status() !== 0) if (++spins > 1000) throw new Error("device never finished reset");
  }

  offeredFeatures(): bigint {
    this.w32(C.deviceFeatureSelect, 0);
    const lo = this.r32(C.deviceFeature);
    this.w32(C.deviceFeatureSelect, 1);
    const hi = this.r32(C.deviceFeature);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /** The Linux probe sequence. Returns false when FEATURES_OK did not stick. */
  init(opts: InitOptions = {}): boolean {
    this.reset();
    this.setStatus(S.acknowledge);
    this.setStatus(S.driver);
    const offered = this.offeredFeatures();
    const want = opts.want ?? (featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.indirectDesc) | featureBit(VIRTIO_F.eventIdx));
    return this.finishInit(want & offered, opts);
  }

  /** From driver features on (tests that write unusual feature sets call this). */
  finishInit(features: bigint, opts: InitOptions = {}): boolean {
    this.features = features;
    this.w32(C.driverFeatureSelect, 0);
    this.w32(C.driverFeature, Number(features & 0xffff_ffffn));
    this.w32(C.driverFeatureSelect, 1);
    this.w32(C.driverFeature, Number((features >> 32n) & 0xffff_ffffn));
    this.setStatus(S.featuresOk);
    if ((this.status() & S.featuresOk) === 0) return false;
    const msix = opts.msix ?? true;
    if (msix) this.enableMsix();
    if (msix) this.w16(C.msixConfig, 0);
    const n = Math.min(opts.queues ?? this.r16(C.numQueues), this.r16(C.numQueues));
    this.queues = [];
    this.packed = [];
    const packed = (features & featureBit(VIRTIO_F.ringPacked)) !== 0n;
    for (let i = 0; i < n; i++) {
      this.w16(C.queueSelect, i);
      const max = this.r16(C.queueSize);
      const size = Math.min(opts.queueSize ?? max, max);
      this.w16(C.queueSize, size);
      const at = opts.ringAt?.(i, size);
      const kick = (viaBar: boolean): void => {
        if (viaBar || !this.services.doorbells.ring(i)) this.w16(VIRTIO_BAR0.notify + 4 * i, i);
      };
      if (packed) {
        const desc = at?.desc ?? this.alloc(16 * size, 16);
        const driver = at?.avail ?? this.alloc(4, 4);
        const device = at?.used ?? this.alloc(4, 4);
        this.memory.bytes(desc, 16 * size).fill(0);
        this.memory.bytes(driver, 4).fill(0);
        this.memory.bytes(device, 4).fill(0);
        this.w64(C.queueDesc, desc);
        this.w64(C.queueDriver, driver);
        this.w64(C.queueDevice, device);
        if (msix) this.w16(C.queueMsixVector, i + 1);
        this.packed.push(new PackedDriverQueue(this.memory, i, size, desc, driver, device, kick));
        continue;
      }
      const desc = at?.desc ?? this.alloc(16 * size, 16);
      const avail = at?.avail ?? this.alloc(6 + 2 * size, 2);
      const used = at?.used ?? this.alloc(6 + 8 * size, 4);
      // Rings start zeroed (Linux allocates them with dma_alloc_coherent).
      this.memory.bytes(desc, 16 * size).fill(0);
      this.memory.bytes(avail, 6 + 2 * size).fill(0);
      this.memory.bytes(used, 6 + 8 * size).fill(0);
      this.w64(C.queueDesc, desc);
      this.w64(C.queueDriver, avail);
      this.w64(C.queueDevice, used);
      if (msix) this.w16(C.queueMsixVector, i + 1);
      this.queues.push(new DriverQueue(this.memory, i, size, desc, avail, used, kick));
    }
    for (let i = 0; i < n; i++) {
      this.w16(C.queueSelect, i);
      this.w16(C.queueEnable, 1);
    }
    this.setStatus(S.driverOk);
    return true;
  }
}
