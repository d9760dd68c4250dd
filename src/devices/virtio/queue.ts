/**
 * The device side of a virtio 1.x virtqueue over guest RAM, in either layout:
 * split (virtio 1.1 spec 2.6: descriptor table 2.6.5, indirect descriptors
 * 2.6.5.3, available ring 2.6.6, used ring 2.6.8, notification suppression
 * 2.6.7 / 2.6.10, event index VIRTIO_F_EVENT_IDX) or packed (2.7, negotiated
 * with VIRTIO_F_RING_PACKED: one descriptor ring that the driver makes
 * descriptors available in and the device writes used descriptors back into,
 * each side with its wrap counter; lists linked by NEXT, indirect tables read
 * in sequence; event suppression structures in the driver and device areas).
 * Devices see one API whichever layout the driver chose.
 *
 * API (stable; virtio-net and the other virtio devices build on it):
 *
 *   const q = new VirtQueue(memory, index, maxSize, (q, code, message) => ...);
 *   q.setFeatures({ eventIdx, indirect, packed })  // negotiated ring features, before configure
 *   q.configure(size, desc, driver, device)   // -> boolean; false = error reported
 *   const chain = new DescriptorChain();      // once per device: REUSED for every request
 *   // process a batch, with notifications suppressed while working:
 *   do {
 *     q.disableNotifications();
 *     while (q.pop(chain)) {
 *       ... chain.readableGpa/Len[0..readableCount), chain.writableGpa/Len[0..writableCount)
 *       are checked guest spans; chain.readableSegment(i) / writableSegment(i) make live views,
 *       chain.readFrom / writeTo copy
 *       q.pushUsed(chain.head, bytesWrittenToWritableSegments);   // chain.head: the chain's token
 *       (q.pushUsedBatch(heads, lengths, n): several chains of one request, the first published last)
 *     }
 *   } while (!q.enableNotifications());      // false: buffers arrived meanwhile, go on
 *   if (q.needsInterrupt()) raise the queue's interrupt   (the transport's signalUsed does this)
 *   q.unpop()                                // give back the chain just popped (e.g. nothing to put in it)
 *   q.reset(); q.save(); q.restore(saved)
 *
 * Packed rings: a chain's token (chain.head) is its buffer id plus, above bit
 * 16, the number of ring descriptors it took less one: pushUsed writes the
 * used descriptor with that id and skips the device's position past them
 * (2.7.6), with no table per id to keep or save. A used descriptor may land
 * on descriptors of a chain still in flight (completions out of order), so a
 * popped chain cannot be walked again from the ring: devices keep what they
 * need of it. Queue sizes need not be powers of two (2.7.10.1).
 *
 * A malformed ring (bad head index, next index, a chain longer than the queue
 * (cycle guard), nested or un-negotiated indirect descriptors, a packed
 * indirect descriptor in a list linked by NEXT, a readable descriptor after a
 * writable one, a total length over `maxChainBytes`, a
 * buffer outside RAM, avail.idx more than `size` ahead of the device) does not
 * throw: the queue records `error`, stops (pop returns false, nothing more is
 * written) and calls `onError` once; the transport then sets DEVICE_NEEDS_RESET
 * (2.1.2) and raises a configuration-change interrupt.
 *
 * DEVNOTE: ring fields are read and written through typed arrays over guest
 * RAM (little-endian host assumed: x86-64 / arm64). The used index and the
 * avail_event field are stored with Atomics.store (a full fence on x86-64:
 * V8 emits xchg for sequentially consistent stores), and the avail index and
 * used_event are read with Atomics.load, so the store->load ordering that
 * notification suppression needs (2.6.7.1, 2.6.10.1) holds while vCPUs run
 * concurrently. Views are made once per configure(): the pop/push path
 * allocates nothing (indirect tables and small copies are found with
 * GuestMemory.locate, not through a view).
 */
import { GuestSpan, type GuestMemory } from "../../machine/guest-memory.js";
import { PartisError } from "../../errors.js";

export class VirtioError extends PartisError {}

/** Descriptor flags (2.6.5). */
export const VIRTQ_DESC_F = { next: 1, write: 2, indirect: 4 } as const;
/** Available ring flag: the driver asks for no interrupts (2.6.7). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** Used ring flag: the device asks for no notifications (2.6.10). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;
/** Largest indirect table accepted, in descriptors (same bound Linux and QEMU use for a chain). */
export const MAX_INDIRECT_DESCRIPTORS = 1024;
/** Largest queue size (2.6: a split queue has at most 32768 entries; 2.7: a packed one 2^15). */
export const MAX_QUEUE_SIZE = 32768;
/** Packed descriptor flags (2.7.1): available and used, each compared with a wrap counter. */
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
export const VIRTQ_DESC_F_USED = 1 << 15;
/** Packed event suppression flags (2.7.14): desc_event_flags. */
export const RING_EVENT_FLAGS = { enable: 0, disable: 1, desc: 2 } as const;

/** Negotiated ring features that change the queue's behaviour. */
export interface RingFeatures {
  /** VIRTIO_F_EVENT_IDX (bit 29): used_event / avail_event instead of the flags. */
  readonly eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC (bit 28). */
  readonly indirect: boolean;
  /** VIRTIO_F_RING_PACKED (bit 34): the packed layout (default: split). */
  readonly packed?: boolean;
}

export type QueueErrorHandler = (queue: VirtQueue, code: string, message: string) => void;

/** Saved state of one queue (plain data). */
export interface VirtQueueState {
  readonly size: number;
  readonly desc: number;
  readonly driver: number;
  readonly device: number;
  readonly ready: boolean;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly lastAvail: number;
  readonly usedIdx: number;
  readonly signalledUsed: number;
  readonly signalledValid: boolean;
  readonly notificationsEnabled: boolean;
  readonly error: string | undefined;
  /** Packed layout: lastAvail and usedIdx are ring positions, these their wrap counters (absent: split). */
  readonly packed?: { readonly availWrap: number; readonly usedWrap: number; readonly descriptorsSinceSignal: number; readonly recentPops: readonly number[] };
}

/**
 * One descriptor chain as popped: device-readable segments followed by
 * device-writable ones, each a guest-physical span already checked to lie in
 * RAM (and inside one host mapping chunk). Allocate once and pass to every
 * pop(); the arrays are reused (only [0, count) entries are valid). Nothing is
 * allocated per segment: a live view of a segment is made only when a device
 * asks for one (readableSegment/writableSegment), and bulk I/O goes straight
 * from the spans to the host (GuestMemory.hostAddresses).
 */
export class DescriptorChain {
  /** The chain's token, to hand back in pushUsed (split: its head descriptor's index; packed: see the file's head). */
  head = 0;
  /** Guest-physical address and length of each readable segment. */
  readonly readableGpa: Float64Array;
  readonly readableLen: Uint32Array;
  readableCount = 0;
  /** Total bytes in the readable segments. */
  readableBytes = 0;
  /** Guest-physical address and length of each writable segment. */
  readonly writableGpa: Float64Array;
  readonly writableLen: Uint32Array;
  writableCount = 0;
  /** Total bytes in the writable segments. */
  writableBytes = 0;
  /** Descriptors walked (direct + indirect). */
  descriptors = 0;
  /** Descriptors the chain takes in the queue's own descriptor table or ring (an indirect table's entries not counted). */
  ringDescriptors = 0;
  /** The guest memory the spans are in (set by the queue that fills the chain). */
  memory: GuestMemory | undefined;

  /** @param capacity most segments per direction (a descriptor that spans host mapping chunks takes several). */
  constructor(readonly capacity = MAX_INDIRECT_DESCRIPTORS + 64) {
    this.readableGpa = new Float64Array(capacity);
    this.readableLen = new Uint32Array(capacity);
    this.writableGpa = new Float64Array(capacity);
    this.writableLen = new Uint32Array(capacity);
  }

  clear(): void {
    this.head = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableCount = 0;
    this.writableBytes = 0;
    this.descriptors = 0;
    this.ringDescriptors = 0;
  }

  /** A live view of readable segment `i` (0 <= i < readableCount). */
  readableSegment(i: number): Uint8Array {
    return this.view(this.readableGpa[i]!, this.readableLen[i]!);
  }

  /** A live view of writable segment `i` (0 <= i < writableCount). */
  writableSegment(i: number): Uint8Array {
    return this.view(this.writableGpa[i]!, this.writableLen[i]!);
  }

  private view(gpa: number, len: number): Uint8Array {
    const v = this.memory?.tryBytes(gpa, len);
    if (v === undefined) this.stale(gpa, len);
    return v;
  }

  /** The walk checked every span; a miss means the chain is stale (used after clear or another pop). */
  private stale(gpa: number, len: number): never {
    throw new VirtioError("VIRTQ_STALE_CHAIN", `segment 0x${gpa.toString(16)}+${len} is not RAM`, { gpa, len });
  }

  /** Where a small copy's span is (reused: copies allocate nothing). */
  private readonly span = new GuestSpan();

  /** Copy readable bytes starting at byte `offset` into `dst`; returns bytes copied (short at the end). */
  readFrom(offset: number, dst: Uint8Array, dstOffset = 0, length = dst.length - dstOffset): number {
    return this.copy(false, offset, dst, dstOffset, length);
  }

  /** Copy `src` into the writable segments starting at byte `offset`; returns bytes copied. */
  writeTo(offset: number, src: Uint8Array, srcOffset = 0, length = src.length - srcOffset): number {
    return this.copy(true, offset, src, srcOffset, length);
  }

  /** Copy between `buf` and the readable (toGuest false) or writable (true) segments, from byte `offset` of them. */
  private copy(toGuest: boolean, offset: number, buf: Uint8Array, bufOffset: number, length: number): number {
    const gpas = toGuest ? this.writableGpa : this.readableGpa;
    const lens = toGuest ? this.writableLen : this.readableLen;
    const count = toGuest ? this.writableCount : this.readableCount;
    let done = 0;
    for (let i = 0; i < count && done < length; i++) {
      const segLen = lens[i]!;
      if (offset >= segLen) {
        offset -= segLen;
        continue;
      }
      const n = Math.min(segLen - offset, length - done);
      const at = bufOffset + done;
      const span = this.span;
      if (this.memory === undefined || !this.memory.locate(gpas[i]! + offset, n, span)) this.stale(gpas[i]! + offset, n);
      const v = span.view;
      const o = span.offset;
      if (n <= 32) {
        // Headers, status bytes: byte by byte.
        if (toGuest) for (let k = 0; k < n; k++) v[o + k] = buf[at + k]!;
        else for (let k = 0; k < n; k++) buf[at + k] = v[o + k]!;
      } else if (toGuest) {
        // A whole buffer (a frame into one guest buffer) needs no view; a part needs one (set() copies a whole source).
        v.set(at === 0 && n === buf.length ? buf : buf.subarray(at, at + n), o);
      } else buf.set(v.subarray(o, o + n), at);
      done += n;
      offset = 0;
    }
    return done;
  }
}

/**
 * A part of a chain's readable or writable bytes as guest spans, and on
 * request their host addresses: the scatter list a device hands to one
 * vectored system call (preadv/pwritev, writev, readv, sendmsg). Reused for
 * every request: nothing is allocated.
 */
export class ChainSpans {
  readonly gpa: Float64Array;
  readonly len: Uint32Array;
  /** Host addresses of the spans, after toHost(). */
  readonly host: Float64Array;
  /** Spans selected by the last select() and the append()s after it. */
  count = 0;
  /** The last select() or append() ran out of spans before it had its bytes. */
  full = false;
  /** `host` holds the addresses of the spans selected last (toHost() already ran for them). */
  private translated = false;

  constructor(readonly capacity: number) {
    this.gpa = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
    this.host = new Float64Array(capacity);
  }

  /**
   * Select at most `maxBytes` of the chain's writable (or readable) bytes,
   * from byte `skip` of them (a request header, say). True when that took at
   * most `capacity` spans; false when it needed more: the first `capacity`
   * spans are selected.
   */
  select(chain: DescriptorChain, writable: boolean, skip: number, maxBytes: number): boolean {
    this.clear();
    this.append(chain, writable, skip, maxBytes);
    return !this.full;
  }

  /** Keep only the first `count` spans selected (an append() that did not fit, taken back). */
  truncate(count: number): void {
    this.count = Math.min(count, this.count);
    this.full = false;
    this.translated = false;
  }

  /** No spans selected (append() then starts a new selection). */
  clear(): void {
    this.count = 0;
    this.full = false;
    this.translated = false;
  }

  /**
   * Add at most `maxBytes` of another chain's writable (or readable) bytes,
   * from byte `skip` of them, after the spans selected so far (one readv over
   * several receive buffers): the bytes added, fewer than asked when the
   * chain has fewer or the spans ran out (then `full`).
   */
  append(chain: DescriptorChain, writable: boolean, skip: number, maxBytes: number): number {
    const gpas = writable ? chain.writableGpa : chain.readableGpa;
    const lens = writable ? chain.writableLen : chain.readableLen;
    const n = writable ? chain.writableCount : chain.readableCount;
    let count = this.count;
    let left = maxBytes;
    let taken = 0;
    this.translated = false;
    this.full = false;
    for (let i = 0; i < n && left > 0; i++) {
      const segLen = lens[i]!;
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      if (count === this.capacity) {
        this.full = true;
        break;
      }
      const take = Math.min(segLen - skip, left);
      this.gpa[count] = gpas[i]! + skip;
      this.len[count++] = take;
      left -= take;
      taken += take;
      skip = 0;
    }
    this.count = count;
    return taken;
  }

  /** Take `other`'s selection (spans only: host addresses are translated again on request); `other.count` must fit. */
  copyFrom(other: ChainSpans): void {
    const n = other.count;
    if (n > this.capacity) throw new RangeError(`${n} spans do not fit in ${this.capacity}`);
    // Element by element: subarray() would make two objects per request (the copy is on the queued hot path).
    const gpa = this.gpa;
    const len = this.len;
    for (let i = 0; i < n; i++) {
      gpa[i] = other.gpa[i]!;
      len[i] = other.len[i]!;
    }
    this.count = n;
    this.translated = false;
  }

  /** Translate the selected spans into `host` (once per select()): false when guest RAM is not host-mapped memory. */
  toHost(memory: GuestMemory | undefined): boolean {
    if (this.translated) return true;
    this.translated = memory !== undefined && memory.hostAddresses !== undefined && memory.hostAddresses(this.gpa, this.count, this.host);
    return this.translated;
  }
}

const EMPTY16 = new Uint16Array(0);
const EMPTY32 = new Uint32Array(0);

/** A virtqueue, device side (split or packed layout, as negotiated). */
export class VirtQueue {
  /** Queue size as configured (0 = not configured). */
  size = 0;
  desc = 0;
  driver = 0;
  device = 0;
  /** Configured and usable. */
  ready = false;
  /** The first error seen (a code), until reset. */
  error: string | undefined;
  /** Chains larger than this (sum of descriptor lengths) are malformed. */
  maxChainBytes = 0xffff_ffff;

  private eventIdx = false;
  private indirect = false;
  private packed = false;
  /** Split: the device's shadow of avail.idx. Packed: the ring position the device reads next. */
  private lastAvail = 0;
  /** Split: used.idx. Packed: the ring position of the next used descriptor. */
  private usedIdx = 0;
  // Packed only: the wrap counters (2.7.1), descriptors used since the last interrupt, and where
  // the last chains popped started (position | wrap << 15), so that unpop can give them back.
  private availWrap = 1;
  private usedWrap = 1;
  private descriptorsSinceSignal = 0;
  private popStarts: Uint32Array = EMPTY32;
  private popTop = 0;
  private popDepth = 0;
  private signalledUsed = 0;
  private signalledValid = false;
  private pushedSinceSignal = false;
  private notificationsEnabled = true;
  private mask = 0;

  // Views over the rings (made by configure()).
  private descWords: Uint32Array = EMPTY32;
  private descHalves: Uint16Array = EMPTY16;
  private avail: Uint16Array = EMPTY16;
  private usedWords: Uint32Array = EMPTY32;
  private usedHalves: Uint16Array = EMPTY16;
  /** Packed: the driver's event suppression structure (off_wrap | flags << 16), read in one load. */
  private driverEvent: Uint32Array = EMPTY32;
  /** Packed: the device's, written in one store. */
  private deviceEvent: Uint32Array = EMPTY32;

  // The descriptor being walked (no object per descriptor).
  private dAddr = 0;
  private dLen = 0;
  // Split layout: flags, next. Packed layout: the same two halves are id, flags.
  private dFlags = 0;
  private dNext = 0;

  constructor(
    private readonly memory: GuestMemory,
    readonly index: number,
    readonly maxSize: number,
    private readonly onError: QueueErrorHandler = () => {},
  ) {
    if (!Number.isInteger(maxSize) || maxSize < 1 || maxSize > MAX_QUEUE_SIZE || (maxSize & (maxSize - 1)) !== 0)
      throw new VirtioError("VIRTQ_BAD_MAX_SIZE", `queue ${index}: maximum size ${maxSize} is not a power of two in 1..32768`, { index, maxSize });
  }

  /** The negotiated ring features; call before configure(). */
  setFeatures(f: RingFeatures): void {
    this.eventIdx = f.eventIdx;
    this.indirect = f.indirect;
    this.packed = f.packed === true;
  }

  get features(): RingFeatures {
    return { eventIdx: this.eventIdx, indirect: this.indirect, packed: this.packed };
  }

  /**
   * Validate and map the rings. Split (2.6): size a power of two <= maxSize;
   * desc 16-byte, driver 2-byte, device 4-byte aligned. Packed (2.7.10): any
   * size up to maxSize; desc 16-byte, both event structures 4-byte aligned.
   * Every ring inside RAM. Returns false (after reporting the error) when
   * something is wrong.
   */
  configure(size: number, desc: number, driver: number, device: number): boolean {
    this.ready = false;
    this.size = size;
    this.desc = desc;
    this.driver = driver;
    this.device = device;
    const packed = this.packed;
    if (!Number.isInteger(size) || size < 1 || size > this.maxSize || (!packed && (size & (size - 1)) !== 0))
      return this.fail("VIRTQ_BAD_SIZE", packed ? `packed queue size ${size} is not in 1..${this.maxSize}` : `queue size ${size} is not a power of two in 1..${this.maxSize}`);
    const driverAlign = packed ? 4 : 2;
    if (desc % 16 !== 0 || driver % driverAlign !== 0 || device % 4 !== 0)
      return this.fail("VIRTQ_BAD_ALIGNMENT", `${packed ? "packed " : ""}ring addresses desc 0x${desc.toString(16)} driver 0x${driver.toString(16)} device 0x${device.toString(16)} are misaligned`);
    const ev = this.eventIdx ? 2 : 0;
    const d = this.memory.tryBytes(desc, 16 * size);
    const a = this.memory.tryBytes(driver, packed ? 4 : 4 + 2 * size + ev);
    const u = this.memory.tryBytes(device, packed ? 4 : 4 + 8 * size + ev);
    if (d === undefined || a === undefined || u === undefined)
      return this.fail("VIRTQ_RING_NOT_RAM", "a ring of the queue is not inside guest RAM");
    if (d.byteOffset % 4 !== 0 || a.byteOffset % driverAlign !== 0 || u.byteOffset % 4 !== 0)
      return this.fail("VIRTQ_BAD_ALIGNMENT", "ring host mapping is misaligned");
    this.descWords = new Uint32Array(d.buffer, d.byteOffset, 4 * size);
    this.descHalves = new Uint16Array(d.buffer, d.byteOffset, 8 * size);
    if (packed) {
      this.driverEvent = new Uint32Array(a.buffer, a.byteOffset, 1);
      this.deviceEvent = new Uint32Array(u.buffer, u.byteOffset, 1);
      if (this.popStarts.length !== size) this.popStarts = new Uint32Array(size);
      this.availWrap = this.usedWrap = 1;
      this.descriptorsSinceSignal = 0;
      this.popTop = this.popDepth = 0;
    } else {
      this.avail = new Uint16Array(a.buffer, a.byteOffset, a.length >> 1);
      this.usedWords = new Uint32Array(u.buffer, u.byteOffset, u.length >> 2);
      this.usedHalves = new Uint16Array(u.buffer, u.byteOffset, u.length >> 1);
      this.mask = size - 1;
    }
    this.lastAvail = 0;
    this.usedIdx = 0;
    this.signalledUsed = 0;
    this.signalledValid = false;
    this.pushedSinceSignal = false;
    this.notificationsEnabled = true;
    this.ready = true;
    return true;
  }

  /** Forget the rings (device reset); errors clear. */
  reset(): void {
    this.ready = false;
    this.error = undefined;
    this.size = 0;
    this.desc = this.driver = this.device = 0;
    this.eventIdx = this.indirect = this.packed = false;
    this.lastAvail = this.usedIdx = this.signalledUsed = 0;
    this.availWrap = this.usedWrap = 1;
    this.descriptorsSinceSignal = 0;
    this.popTop = this.popDepth = 0;
    this.driverEvent = this.deviceEvent = EMPTY32;
    this.signalledValid = false;
    this.pushedSinceSignal = false;
    this.notificationsEnabled = true;
    this.descWords = EMPTY32;
    this.descHalves = EMPTY16;
    this.avail = this.usedHalves = EMPTY16;
    this.usedWords = EMPTY32;
  }

  /** Mark the queue broken (also used by devices for protocol errors that warrant a reset). */
  fail(code: string, message: string): false {
    const first = this.error === undefined;
    this.ready = false;
    this.error = code;
    if (first) this.onError(this, code, `queue ${this.index}: ${message}`);
    return false;
  }

  /** Split: the index the device will read next (its shadow of avail.idx). Packed: its ring position. */
  get nextAvail(): number {
    return this.lastAvail;
  }
  get usedIndex(): number {
    return this.usedIdx;
  }

  /**
   * Chains the driver has made available and the device has not popped (0
   * when broken; a bad index breaks the queue). Packed: 1 when a chain is
   * waiting, else 0 (the ring says no more without walking it).
   */
  available(): number {
    if (!this.ready) return 0;
    if (this.packed) return this.packedAvailable() ? 1 : 0;
    const n = (Atomics.load(this.avail, 1) - this.lastAvail) & 0xffff;
    if (n > this.size) {
      this.fail("VIRTQ_BAD_AVAIL_IDX", `avail.idx is ${n} entries ahead of the device (queue size ${this.size})`);
      return 0;
    }
    return n;
  }

  /**
   * Pop the next available chain into `chain`. Returns false when nothing is
   * available or the queue is (now) broken.
   */
  pop(chain: DescriptorChain): boolean {
    chain.clear();
    chain.memory = this.memory;
    if (this.packed) return this.popPacked(chain);
    if (this.available() === 0) return false;
    const head = this.avail[2 + (this.lastAvail & this.mask)]!;
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    if (this.eventIdx && this.notificationsEnabled) Atomics.store(this.usedHalves, 2 + 4 * this.size, this.lastAvail);
    if (head >= this.size) return this.fail("VIRTQ_BAD_HEAD", `avail ring names descriptor ${head} (queue size ${this.size})`);
    chain.head = head;
    return this.walk(chain, head);
  }

  /** Give back the chain returned by the last pop() (it will be popped again). */
  unpop(): void {
    if (!this.ready) return;
    if (this.packed) {
      if (this.popDepth === 0) return;
      this.popDepth--;
      this.popTop = (this.popTop + this.size - 1) % this.size;
      const start = this.popStarts[this.popTop]!;
      this.lastAvail = start & 0x7fff;
      this.availWrap = start >>> 15;
      if (this.eventIdx && this.notificationsEnabled) this.publishAvailEvent();
      return;
    }
    this.lastAvail = (this.lastAvail - 1) & 0xffff;
    if (this.eventIdx && this.notificationsEnabled) Atomics.store(this.usedHalves, 2 + 4 * this.size, this.lastAvail);
  }

  private readDirect(i: number): void {
    const w = this.descWords;
    const o = i * 4;
    this.dAddr = w[o + 1]! * 4294967296 + w[o]!;
    this.dLen = w[o + 2]!;
    this.dFlags = this.descHalves[i * 8 + 6]!;
    this.dNext = this.descHalves[i * 8 + 7]!;
  }

  /** Where the chain's indirect table is (filled by locate: no view per request). */
  private readonly table = new GuestSpan();
  /** The table as 32-bit words of its host chunk, from word tableWord, when it is 4-byte aligned there (the usual case). */
  private tableWords: Uint32Array | undefined;
  private tableWord = 0;

  private readIndirect(i: number): void {
    const w = this.tableWords;
    if (w !== undefined) {
      const o = this.tableWord + i * 4;
      this.dAddr = w[o + 1]! * 4294967296 + w[o]!;
      this.dLen = w[o + 2]!;
      const fn = w[o + 3]!;
      this.dFlags = fn & 0xffff;
      this.dNext = fn >>> 16;
      return;
    }
    const t = this.table.view;
    const o = this.table.offset + i * 16;
    const lo = (t[o]! | (t[o + 1]! << 8) | (t[o + 2]! << 16) | (t[o + 3]! << 24)) >>> 0;
    const hi = (t[o + 4]! | (t[o + 5]! << 8) | (t[o + 6]! << 16) | (t[o + 7]! << 24)) >>> 0;
    this.dAddr = hi * 4294967296 + lo;
    this.dLen = (t[o + 8]! | (t[o + 9]! << 8) | (t[o + 10]! << 16) | (t[o + 11]! << 24)) >>> 0;
    this.dFlags = t[o + 12]! | (t[o + 13]! << 8);
    this.dNext = t[o + 14]! | (t[o + 15]! << 8);
  }

  /**
   * The indirect descriptor just read (dAddr, dLen) names a table: check its
   * length (16..16*MAX_INDIRECT_DESCRIPTORS in steps of 16) and that it lies
   * in RAM, and make it the one readIndirect reads. `where` names the chain
   * for the error.
   */
  private openIndirectTable(where: string): boolean {
    const len = this.dLen;
    if (len === 0 || len % 16 !== 0 || len / 16 > MAX_INDIRECT_DESCRIPTORS)
      return this.fail("VIRTQ_BAD_INDIRECT", `${where}: indirect table length ${len} is not 16..${16 * MAX_INDIRECT_DESCRIPTORS} in steps of 16`);
    const table = this.table;
    if (!this.memory.locate(this.dAddr, len, table)) return this.fail("VIRTQ_BAD_INDIRECT", `${where}: indirect table 0x${this.dAddr.toString(16)}+${len} is not in RAM`);
    this.tableWords = table.words !== undefined && table.offset % 4 === 0 ? table.words : undefined;
    this.tableWord = table.offset >>> 2;
    return true;
  }

  private walk(chain: DescriptorChain, head: number): boolean {
    let i = head;
    let indirect = false;
    let limit = this.size; // cycle guard: a chain never has more descriptors than its table
    let count = 0;
    let total = 0;
    for (;;) {
      if (!indirect) {
        this.readDirect(i);
        chain.ringDescriptors++;
      } else this.readIndirect(i);
      chain.descriptors++;
      if (++count > limit) return this.fail("VIRTQ_CHAIN_LOOP", `descriptor chain at ${head} is longer than its table (${limit}): a loop`);
      const flags = this.dFlags;
      if ((flags & VIRTQ_DESC_F.indirect) !== 0) {
        if (indirect) return this.fail("VIRTQ_NESTED_INDIRECT", `chain at ${head}: indirect descriptor inside an indirect table`);
        if (!this.indirect) return this.fail("VIRTQ_INDIRECT_NOT_NEGOTIATED", `chain at ${head}: indirect descriptor without VIRTIO_F_INDIRECT_DESC`);
        if ((flags & VIRTQ_DESC_F.next) !== 0) return this.fail("VIRTQ_BAD_INDIRECT", `chain at ${head}: indirect descriptor with NEXT set`);
        if (!this.openIndirectTable(`chain at ${head}`)) return false;
        indirect = true;
        limit = this.dLen / 16;
        count = 0;
        i = 0;
        continue;
      }
      const len = this.dLen;
      if (len > 0) {
        total += len;
        if (total > this.maxChainBytes) return this.fail("VIRTQ_CHAIN_TOO_LONG", `chain at ${head} is over ${this.maxChainBytes} bytes`);
        const write = (flags & VIRTQ_DESC_F.write) !== 0;
        if (!write && chain.writableCount > 0) return this.fail("VIRTQ_BAD_ORDER", `chain at ${head}: readable descriptor after a writable one`);
        if (!this.addSegment(chain, this.dAddr, len, write)) return false;
      }
      if ((flags & VIRTQ_DESC_F.next) === 0) return true;
      i = this.dNext;
      if (i >= limit) return this.fail("VIRTQ_BAD_NEXT", `chain at ${head}: next index ${i} is outside its table (${limit})`);
    }
  }

  private addSegment(chain: DescriptorChain, addr: number, len: number, write: boolean): boolean {
    const gpas = write ? chain.writableGpa : chain.readableGpa;
    const lens = write ? chain.writableLen : chain.readableLen;
    let n = write ? chain.writableCount : chain.readableCount;
    if (write) chain.writableBytes += len;
    else chain.readableBytes += len;
    // One span per host mapping chunk the buffer covers (usually one); a gap means it leaves RAM.
    while (len > 0) {
      const run = this.memory.contiguousLength(addr, len);
      if (run === 0) return this.fail("VIRTQ_BUFFER_NOT_RAM", `chain at ${chain.head}: buffer 0x${addr.toString(16)}+${len} is not in RAM`);
      if (n >= chain.capacity) return this.fail("VIRTQ_TOO_MANY_SEGMENTS", `chain at ${chain.head} has more than ${chain.capacity} segments`);
      gpas[n] = addr;
      lens[n] = run;
      n++;
      addr += run;
      len -= run;
    }
    if (write) chain.writableCount = n;
    else chain.readableCount = n;
    return true;
  }

  /** Packed: is the descriptor at the device's position available (AVAIL matches its wrap counter, USED does not)? */
  private packedAvailable(): boolean {
    const f = Atomics.load(this.descHalves, this.lastAvail * 8 + 7);
    const w = this.availWrap;
    return ((f >>> 7) & 1) === w && ((f >>> 15) & 1) !== w;
  }

  /** Packed, with EVENT_IDX: ask to be notified when the descriptor at the device's position is made available. */
  private publishAvailEvent(): void {
    Atomics.store(this.deviceEvent, 0, (RING_EVENT_FLAGS.desc << 16) | (this.availWrap << 15) | this.lastAvail);
  }

  /**
   * pop() for the packed layout (2.7.6, 2.7.7): the list starts at the
   * device's position once its first descriptor is available (the driver
   * makes it available last); NEXT links the following ring descriptors, and
   * the buffer id is in the last one. An indirect descriptor stands alone
   * and its table is read in sequence (only WRITE counts there).
   */
  private popPacked(chain: DescriptorChain): boolean {
    if (!this.ready || !this.packedAvailable()) return false;
    const size = this.size;
    const start = this.lastAvail;
    let pos = start;
    let wrap = this.availWrap;
    let count = 0;
    let total = 0;
    let id = 0;
    for (;;) {
      this.readDirect(pos);
      chain.descriptors++;
      if (++count > size) return this.fail("VIRTQ_CHAIN_LOOP", `packed list at ${start} is longer than the queue (${size})`);
      const here = wrap;
      if (++pos === size) {
        pos = 0;
        wrap ^= 1;
      }
      const flags = this.dNext;
      id = this.dFlags;
      // Every descriptor of a list is made available in its own lap (2.7.6); one that is not (a used
      // descriptor, one left from an older lap) ends nothing: the list is malformed.
      if (count > 1 && (((flags >>> 7) & 1) !== here || ((flags >>> 15) & 1) === here))
        return this.fail("VIRTQ_BAD_NEXT", `list at ${start} continues into descriptor ${(start + count - 1) % size}, which is not available`);
      if ((flags & VIRTQ_DESC_F.indirect) !== 0) {
        if (!this.indirect) return this.fail("VIRTQ_INDIRECT_NOT_NEGOTIATED", `list at ${start}: indirect descriptor without VIRTIO_F_INDIRECT_DESC`);
        if (count > 1 || (flags & VIRTQ_DESC_F.next) !== 0) return this.fail("VIRTQ_BAD_INDIRECT", `list at ${start}: indirect descriptor in a list linked by NEXT`);
        if (!this.openIndirectTable(`list at ${start}`)) return false;
        chain.head = id; // for error messages until the token is set
        for (let k = 0, n = this.dLen / 16; k < n; k++) {
          this.readIndirect(k);
          chain.descriptors++;
          if (!this.packedSegment(chain, start, this.dNext, total)) return false;
          total += this.dLen;
        }
        break;
      }
      chain.head = id;
      if (!this.packedSegment(chain, start, flags, total)) return false;
      total += this.dLen;
      if ((flags & VIRTQ_DESC_F.next) === 0) break;
    }
    this.popStarts[this.popTop] = (this.availWrap << 15) | start;
    this.popTop = this.popTop + 1 === size ? 0 : this.popTop + 1;
    if (this.popDepth < size) this.popDepth++;
    this.lastAvail = pos;
    this.availWrap = wrap;
    chain.head = (count - 1) * 65536 + id;
    chain.ringDescriptors = count;
    if (this.eventIdx && this.notificationsEnabled) this.publishAvailEvent();
    return true;
  }

  /** One packed element (the descriptor just read: dAddr, dLen; `flags`): length, order and RAM checks, then its spans. */
  private packedSegment(chain: DescriptorChain, start: number, flags: number, total: number): boolean {
    const len = this.dLen;
    if (len === 0) return true;
    if (total + len > this.maxChainBytes) return this.fail("VIRTQ_CHAIN_TOO_LONG", `list at ${start} is over ${this.maxChainBytes} bytes`);
    const write = (flags & VIRTQ_DESC_F.write) !== 0;
    if (!write && chain.writableCount > 0) return this.fail("VIRTQ_BAD_ORDER", `list at ${start}: readable descriptor after a writable one`);
    return this.addSegment(chain, this.dAddr, len, write);
  }

  /** Return a chain to the driver: `len` = bytes written into its writable segments. */
  pushUsed(head: number, len: number): void {
    if (!this.ready) return;
    if (this.packed) {
      const at = this.usedIdx;
      const flags = this.usedFlags(len); // before placeUsed: it may turn the wrap counter
      if (!this.placeUsed(head, len)) return;
      // Publish the descriptor: its flags last (a full fence: id and length are visible first).
      Atomics.store(this.descHalves, at * 8 + 7, flags);
      this.pushedSinceSignal = true;
      return;
    }
    this.writeUsedEntry(head, len);
    // Publish the entry (a full fence: the entry is visible before the index, and the index before later loads).
    Atomics.store(this.usedHalves, 1, this.usedIdx);
    this.pushedSinceSignal = true;
  }

  /**
   * Return the chains of one request together (a frame spread over several
   * receive buffers): the driver sees all of them or none. Split: one
   * used.idx update after every entry; packed: the first chain's used
   * descriptor is made visible last (2.7.9).
   */
  pushUsedBatch(heads: Uint32Array, lens: Uint32Array, count: number): void {
    if (!this.ready || count === 0) return;
    if (!this.packed) {
      for (let k = 0; k < count; k++) this.writeUsedEntry(heads[k]!, lens[k]!);
      Atomics.store(this.usedHalves, 1, this.usedIdx);
      this.pushedSinceSignal = true;
      return;
    }
    const first = this.usedIdx;
    const firstFlags = this.usedFlags(lens[0]!);
    if (!this.placeUsed(heads[0]!, lens[0]!)) return;
    for (let k = 1; k < count; k++) {
      const at = this.usedIdx;
      const flags = this.usedFlags(lens[k]!);
      if (!this.placeUsed(heads[k]!, lens[k]!)) return;
      Atomics.store(this.descHalves, at * 8 + 7, flags);
    }
    Atomics.store(this.descHalves, first * 8 + 7, firstFlags);
    this.pushedSinceSignal = true;
  }

  /** Split: the next used-ring entry (not yet published: used.idx is stored by the caller). */
  private writeUsedEntry(head: number, len: number): void {
    const i = this.usedIdx & this.mask;
    this.usedWords[1 + 2 * i] = head;
    this.usedWords[2 + 2 * i] = len >>> 0;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
  }

  /** Packed: a used descriptor's flags at the device's position now (AVAIL and USED = its wrap counter; WRITE when data was written). */
  private usedFlags(len: number): number {
    return (this.usedWrap === 1 ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0) | (len > 0 ? VIRTQ_DESC_F.write : 0);
  }

  /** Packed: write id and length of the chain `head` at the device's position (not its flags) and skip past the chain's descriptors. */
  private placeUsed(head: number, len: number): boolean {
    const skip = Math.floor(head / 65536) + 1;
    if (head < 0 || skip > this.size) return this.fail("VIRTQ_BAD_TOKEN", `chain token ${head} does not come from this queue`);
    const at = this.usedIdx;
    this.descWords[at * 4 + 2] = len >>> 0;
    this.descHalves[at * 8 + 6] = head & 0xffff;
    let next = at + skip;
    if (next >= this.size) {
      next -= this.size;
      this.usedWrap ^= 1;
    }
    this.usedIdx = next;
    this.descriptorsSinceSignal += skip;
    return true;
  }

  /**
   * After a batch of pushUsed(): does the driver want an interrupt now?
   * (2.6.7.2: VRING_AVAIL_F_NO_INTERRUPT, or with EVENT_IDX whether used.idx
   * passed used_event since the last interrupt.) Resets the batch.
   */
  needsInterrupt(): boolean {
    if (!this.ready || !this.pushedSinceSignal) return false;
    this.pushedSinceSignal = false;
    if (this.packed) return this.packedNeedsInterrupt();
    const now = this.usedIdx;
    if (!this.eventIdx) return (Atomics.load(this.avail, 0) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    const old = this.signalledUsed;
    const valid = this.signalledValid;
    this.signalledUsed = now;
    this.signalledValid = true;
    if (!valid) return true;
    const event = Atomics.load(this.avail, 2 + this.size);
    // vring_need_event: the driver asked to hear about entry `event`; did [old, now) cross it?
    return ((now - event - 1) & 0xffff) < ((now - old) & 0xffff);
  }

  /**
   * Packed (2.7.14): the driver's event suppression structure says: never
   * (DISABLE), always (ENABLE; also the reserved value, and DESC without
   * EVENT_IDX), or when the used descriptor at (offset, wrap) was written:
   * did the descriptors used since the last interrupt cover it?
   */
  private packedNeedsInterrupt(): boolean {
    const pushed = this.descriptorsSinceSignal;
    this.descriptorsSinceSignal = 0;
    const valid = this.signalledValid;
    this.signalledValid = true;
    const e = Atomics.load(this.driverEvent, 0);
    const flags = (e >>> 16) & 3;
    if (flags === RING_EVENT_FLAGS.disable) return false;
    if (flags !== RING_EVENT_FLAGS.desc || !this.eventIdx || !valid || pushed >= this.size) return true;
    // An event in the lap before the device's current one is `size` positions further back.
    let event = e & 0x7fff;
    if (((e >>> 15) & 1) !== this.usedWrap) event -= this.size;
    const now = this.usedIdx;
    return ((now - event - 1) & 0xffff) < pushed;
  }

  /** Ask the driver not to notify (while the device is processing anyway). */
  disableNotifications(): void {
    this.notificationsEnabled = false;
    if (this.packed) {
      if (this.ready) Atomics.store(this.deviceEvent, 0, RING_EVENT_FLAGS.disable << 16);
      return;
    }
    if (!this.ready || this.eventIdx) return; // with EVENT_IDX a stale avail_event already suppresses
    Atomics.store(this.usedHalves, 0, VIRTQ_USED_F_NO_NOTIFY);
  }

  /**
   * Ask for notifications again. Returns true when nothing is pending after
   * that (safe to stop), false when buffers arrived (pop again).
   */
  enableNotifications(): boolean {
    this.notificationsEnabled = true;
    if (!this.ready) return true;
    if (this.packed) {
      // A full fence (the store), then look again: a chain made available meanwhile is popped, not missed.
      if (this.eventIdx) this.publishAvailEvent();
      else Atomics.store(this.deviceEvent, 0, RING_EVENT_FLAGS.enable << 16);
      return !this.packedAvailable();
    }
    if (this.eventIdx) Atomics.store(this.usedHalves, 2 + 4 * this.size, this.lastAvail);
    else Atomics.store(this.usedHalves, 0, 0);
    return this.available() === 0;
  }

  /**
   * One line for a state report: where the driver (avail.idx, used_event) and
   * the device (next avail, used.idx, avail_event) are in the rings. Reads
   * only; a queue that looks stuck says why here.
   */
  describe(): string {
    if (!this.ready) return `queue ${this.index}: ${this.error !== undefined ? `broken (${this.error})` : "not ready"}`;
    if (this.packed) {
      const drv = Atomics.load(this.driverEvent, 0);
      const dev = Atomics.load(this.deviceEvent, 0);
      const ev = (v: number): string => `flags ${(v >>> 16) & 3} off ${v & 0x7fff} wrap ${(v >>> 15) & 1}`;
      return [
        `queue ${this.index}: packed, size ${this.size}`,
        `device at ${this.lastAvail} wrap ${this.availWrap} (${this.packedAvailable() ? "a chain waiting" : "nothing waiting"})`,
        `used at ${this.usedIdx} wrap ${this.usedWrap}`,
        `driver event ${ev(drv)}`,
        `device event ${ev(dev)}`,
        `last signalled ${this.signalledValid ? "yes" : "never"}`,
        `notifications ${this.notificationsEnabled ? "on" : "off"}`,
      ].join(", ");
    }
    const availIdx = Atomics.load(this.avail, 1);
    const parts = [
      `queue ${this.index}: size ${this.size}`,
      `avail.idx ${availIdx} flags ${Atomics.load(this.avail, 0)}`,
      `device at ${this.lastAvail} (${(availIdx - this.lastAvail) & 0xffff} unpopped)`,
      `used.idx ${this.usedIdx} flags ${Atomics.load(this.usedHalves, 0)}`,
    ];
    if (this.eventIdx)
      parts.push(`used_event ${Atomics.load(this.avail, 2 + this.size)}`, `avail_event ${Atomics.load(this.usedHalves, 2 + 4 * this.size)}`, `last signalled ${this.signalledValid ? this.signalledUsed : "never"}`);
    parts.push(`notifications ${this.notificationsEnabled ? "on" : "off"}`);
    return parts.join(", ");
  }

  save(): VirtQueueState {
    return {
      size: this.size,
      desc: this.desc,
      driver: this.driver,
      device: this.device,
      ready: this.ready,
      eventIdx: this.eventIdx,
      indirect: this.indirect,
      lastAvail: this.lastAvail,
      usedIdx: this.usedIdx,
      signalledUsed: this.signalledUsed,
      signalledValid: this.signalledValid,
      notificationsEnabled: this.notificationsEnabled,
      error: this.error,
      ...(this.packed ? { packed: { availWrap: this.availWrap, usedWrap: this.usedWrap, descriptorsSinceSignal: this.descriptorsSinceSignal, recentPops: this.recentPops() } } : {}),
    };
  }

  /** Packed: where the chains unpop may still give back started, oldest first. */
  private recentPops(): number[] {
    const out: number[] = [];
    for (let k = this.popDepth; k > 0; k--) out.push(this.popStarts[(this.popTop + this.size - k) % this.size]!);
    return out;
  }

  /** Re-establish a saved queue (rings re-validated against this memory). */
  restore(s: VirtQueueState): boolean {
    this.reset();
    this.setFeatures({ eventIdx: s.eventIdx, indirect: s.indirect, packed: s.packed !== undefined });
    this.size = s.size;
    this.desc = s.desc;
    this.driver = s.driver;
    this.device = s.device;
    if (s.error !== undefined) {
      this.error = s.error;
      return true;
    }
    if (!s.ready) return true;
    if (!this.configure(s.size, s.desc, s.driver, s.device)) return false;
    const p = s.packed;
    if (p !== undefined) {
      if (s.lastAvail >= s.size || s.usedIdx >= s.size || p.recentPops.length > s.size || p.recentPops.some((v) => (v & 0x7fff) >= s.size))
        return this.fail("VIRTQ_BAD_STATE", `saved packed queue positions ${s.lastAvail}/${s.usedIdx} are outside the ring (size ${s.size})`);
      this.availWrap = p.availWrap & 1;
      this.usedWrap = p.usedWrap & 1;
      this.descriptorsSinceSignal = p.descriptorsSinceSignal;
      p.recentPops.forEach((v, k) => (this.popStarts[k] = v & 0xffff));
      this.popDepth = p.recentPops.length;
      this.popTop = this.popDepth % this.size;
    }
    // Positions (split: free-running 16-bit indexes; packed: ring positions, checked above).
    this.lastAvail = s.lastAvail & 0xffff;
    this.usedIdx = s.usedIdx & 0xffff;
    this.signalledUsed = s.signalledUsed & 0xffff;
    this.signalledValid = s.signalledValid;
    this.notificationsEnabled = s.notificationsEnabled;
    return true;
  }
}
