/**
 * virtio-blk (virtio 1.1 spec 5.2): a block device over a synchronous
 * `BlockDevice`, on the modern virtio-pci transport.
 *
 * Requests (5.2.6): IN, OUT, FLUSH, GET_ID (20-byte serial), DISCARD and
 * WRITE_ZEROES (struct virtio_blk_discard_write_zeroes segments); anything
 * else is VIRTIO_BLK_S_UNSUPP. Features offered: SEG_MAX, BLK_SIZE, TOPOLOGY,
 * FLUSH, MQ (when more than one queue), RO (read-only disk; writes then get
 * IOERR) or DISCARD + WRITE_ZEROES (writable disk). The configuration space
 * (5.2.4) is 0x3c bytes: capacity in 512-byte sectors, seg_max, blk_size,
 * topology, num_queues and the discard / write-zeroes limits.
 *
 * Framing is free (VIRTIO_F_VERSION_1 implies ANY_LAYOUT): the 16-byte header
 * is the first 16 readable bytes, the status the last writable byte. Data
 * moves straight between the BlockDevice and the guest's segment views, with
 * no intermediate copy. A request past the capacity, a length that is not a
 * multiple of the logical sector size or a short header gets IOERR; a
 * BlockDevice error gets IOERR; a chain with no writable byte (nowhere to put
 * the status) is a driver bug: the device then needs a reset.
 *
 * API:
 *   createVirtioBlk(name, disk, services, { queues, serial?, queueSize? }): VirtioPciDevice
 *   (the back end, a VirtioBlk, is `device.backend`; `stats` counts requests)
 */
import type { SavedDeviceState } from "../dependencies.js";
import type { BlockDevice, BlockRequestRing } from "../../storage/block-device.js";
import { GuestSpan, type GuestMemory } from "../../machine/guest-memory.js";
import type { PciDeviceServices } from "../pci/device-thread-services.js";
import { ChainSpans, DescriptorChain, VirtioError, type VirtQueue } from "./queue.js";
import { DeviceAlarm, DiskThrottle, hasDiskIoLimits, type Clock, type DiskIoLimits } from "../io-limits.js";
import { VirtioPciDevice, featureBit, type VirtioBackend, type VirtioTransport } from "./pci-transport.js";

export const VIRTIO_ID_BLOCK = 2;

/** Feature bits (5.2.3). */
export const VIRTIO_BLK_F = {
  sizeMax: 1,
  segMax: 2,
  geometry: 4,
  ro: 5,
  blkSize: 6,
  flush: 9,
  topology: 10,
  configWce: 11,
  mq: 12,
  discard: 13,
  writeZeroes: 14,
} as const;

/** Request types (5.2.6). */
export const VIRTIO_BLK_T = { in: 0, out: 1, flush: 4, getId: 8, getLifetime: 10, discard: 11, writeZeroes: 13, secureErase: 14 } as const;
/** Status values (5.2.6). */
export const VIRTIO_BLK_S = { ok: 0, ioerr: 1, unsupp: 2 } as const;

/** Configuration layout (5.2.4). */
export const VIRTIO_BLK_CONFIG = {
  capacity: 0x00,
  sizeMax: 0x08,
  segMax: 0x0c,
  geometry: 0x10,
  blkSize: 0x14,
  physicalBlockExp: 0x18,
  alignmentOffset: 0x19,
  minIoSize: 0x1a,
  optIoSize: 0x1c,
  writeback: 0x20,
  numQueues: 0x22,
  maxDiscardSectors: 0x24,
  maxDiscardSeg: 0x28,
  discardSectorAlignment: 0x2c,
  maxWriteZeroesSectors: 0x30,
  maxWriteZeroesSeg: 0x34,
  writeZeroesMayUnmap: 0x38,
  size: 0x3c,
} as const;

export const VIRTIO_BLK_ID_BYTES = 20;
const SECTOR = 512;
const MAX_DISCARD_SECTORS = 0x3f_ffff;
const MAX_DISCARD_SEG = 16;
const MAX_WRITE_ZEROES_SECTORS = 32768;
const ZERO_CHUNK = 64 * 1024;
const EMPTY = new Uint8Array(0);
/** write-zeroes segment flag: the device may deallocate the range (5.2.6). */
const VIRTIO_BLK_WRITE_ZEROES_UNMAP = 1;

export interface VirtioBlkOptions {
  /** Request queues (VIRTIO_BLK_F_MQ when > 1): the integrator passes the vCPU count. */
  readonly queues: number;
  /** GET_ID answer (ASCII, at most 20 bytes used). */
  readonly serial?: string;
  /** Maximum queue size (power of two, default 256). */
  readonly queueSize?: number;
  /** Offer packed virtqueues (VIRTIO_F_RING_PACKED). */
  readonly ringPacked?: boolean;
  /**
   * Where reads, writes and flushes go asynchronously (an io_uring), when the
   * disk can queue them: the device thread then never waits for the disk, and
   * up to `ring.entries` requests are in flight. The integrator watches the
   * ring's completions and calls `completeQueued()`.
   */
  readonly ring?: BlockRequestRing;
  /**
   * Writes are stable when they complete (the disk is open with O_DSYNC:
   * cache=writethrough, directsync): the guest is told the disk has no
   * volatile write cache (writeback 0 under VIRTIO_BLK_F_CONFIG_WCE). Else
   * it starts as a write-back cache, which the guest may turn off: writes
   * are then each followed by a flush before they complete.
   */
  readonly writeThrough?: boolean;
  /**
   * Most reads and writes per second and bytes per second (together and per
   * direction; a write-zeroes counts as a write of its range): a request
   * starts only while its limits are not in debt. The others are held by the
   * device, in order per direction and across queues, until its alarm
   * (io-limits.ts); requests of a direction not in debt, flushes and the
   * rest go on meanwhile.
   */
  readonly limits?: DiskIoLimits;
  /** The limits' millisecond clock (tests give their own). */
  readonly clock?: Clock;
}

/** read()/write() result: the request went to the ring and completes later. */
const QUEUED = -1;

/** Queued request kinds (slotKind). */
const QUEUED_READ = 0;
const QUEUED_WRITE = 1;
const QUEUED_FLUSH = 2;
/** A held write-zeroes (HeldRequest.kind; never on the ring). */
const HELD_WRITE_ZEROES = 3;

/**
 * A read, write or write-zeroes a rate limit holds: taken from its queue
 * and not yet done (its buffers are still the guest's). Everything needed to
 * do it later is kept here, since its descriptors cannot be walked again (on
 * a packed ring a used descriptor may already lie over them). Pooled: no
 * object per request once the pool has grown to the most ever held.
 */
class HeldRequest {
  queue = 0;
  head = 0;
  kind = QUEUED_READ;
  pos = 0;
  bytes = 0;
  statusGpa = 0;
  unmap = false;
  spans: ChainSpans | undefined;
}

/** `spans` copied into `kept`, or into a new selection when `kept` is missing or too small (made once, reused after). */
function keptCopy(kept: ChainSpans | undefined, spans: ChainSpans): ChainSpans {
  const into = kept !== undefined && kept.capacity >= spans.count ? kept : new ChainSpans(Math.max(64, 2 ** Math.ceil(Math.log2(spans.count))));
  into.copyFrom(spans);
  return into;
}

/** Guest address of a request's status byte (its last writable byte). */
function statusAddress(chain: DescriptorChain): number {
  const last = chain.writableCount - 1;
  return chain.writableGpa[last]! + chain.writableLen[last]! - 1;
}

/** A 64-bit little-endian sector number at `at` (beyond 2^53 bytes: one that fails every range check). */
function sectorAt(view: DataView, at: number): number {
  const lo = view.getUint32(at, true);
  const hi = view.getUint32(at + 4, true);
  return hi >= 2 ** 21 ? Number.MAX_SAFE_INTEGER : hi * 2 ** 32 + lo;
}

export interface VirtioBlkStats {
  requests: number;
  readBytes: number;
  writtenBytes: number;
  flushes: number;
  errors: number;
  unsupported: number;
  /** Requests that went through the ring (asynchronous) rather than synchronously. */
  queued: number;
  /** Requests a rate limit in debt held until the alarm. */
  throttled: number;
}

export interface VirtioBlkSavedState extends SavedDeviceState {
  readonly kind: "virtio-blk";
  readonly version: 2;
  readonly capacitySectors: number;
  readonly queues: number;
  /** The config space's writeback byte (CONFIG_WCE: the guest may have changed it). */
  readonly writeback: number;
}

export class VirtioBlk implements VirtioBackend {
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly classCode = 0x010000; // mass storage, SCSI (as other hypervisors present virtio-blk)
  readonly features: bigint;
  readonly queueMaxSizes: readonly number[];
  readonly configSize = VIRTIO_BLK_CONFIG.size;
  readonly stats: VirtioBlkStats = { requests: 0, readBytes: 0, writtenBytes: 0, flushes: 0, errors: 0, unsupported: 0, queued: 0, throttled: 0 };
  /** The disk's rate limits (undefined: none). */
  readonly throttle: DiskThrottle | undefined;
  /** Runs the requests a rate limit held (made at attach, with the transport's loop). */
  alarm: DeviceAlarm | undefined;

  private readonly config = new Uint8Array(VIRTIO_BLK_CONFIG.size);
  private readonly serial = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  private transport: VirtioTransport | undefined;
  private readonly chain = new DescriptorChain();
  /** Scratch scatter list for vectored disk I/O (reused per request). */
  private readonly vector: Uint8Array[] = [];
  /** The request's data segments as guest spans, then as host addresses (no object per segment). */
  private readonly spans = new ChainSpans(this.chain.capacity);
  private readonly statusByte = new Uint8Array(1);
  private readonly header = new Uint8Array(16);
  private readonly headerView = new DataView(this.header.buffer);
  private readonly zeros = new Uint8Array(ZERO_CHUNK);
  private readonly sectorSize: number;
  /** Writes are stable when they complete (O_DSYNC disk): no volatile write cache to report or flush. */
  private readonly stableWrites: boolean;

  // Requests in flight on the ring, by slot (the token): no object per request.
  private readonly ring: BlockRequestRing | undefined;
  private readonly freeSlots: Int32Array;
  private freeCount: number;
  private readonly slotQueue: Int32Array;
  private readonly slotHead: Int32Array;
  private readonly slotKind: Uint8Array;
  /** Bytes the request moves (a completion with fewer is redone synchronously). */
  private readonly slotBytes: Float64Array;
  /** Guest address of the request's status byte. */
  private readonly slotStatus: Float64Array;
  /**
   * The request's data spans and disk offset, to redo it from if it comes
   * back short: its descriptors cannot be walked again (on a packed ring a
   * used descriptor may already lie over them). Made when a slot first needs
   * them, grown when a request needs more room, reused after that.
   */
  private readonly slotSpans: (ChainSpans | undefined)[];
  private readonly slotPos: Float64Array;
  private queuedSinceSubmit = false;
  /** Completions are being dropped (device reset). */
  private dropping = false;
  private readonly signalQueue: Uint8Array;
  private readonly statusSpan = new GuestSpan();
  private readonly onCompletion = (slot: number, result: number): void => this.completed(slot, result);
  /** Requests held by a rate limit, oldest first (the first heldCount entries), and their pool. */
  private readonly held: HeldRequest[] = [];
  private heldCount = 0;
  private readonly heldPool: HeldRequest[] = [];
  /** Held requests per direction: [read, write]. A direction with any held holds the next one too (in order). */
  private readonly heldByDirection = new Int32Array(2);

  constructor(
    readonly disk: BlockDevice,
    opts: VirtioBlkOptions,
  ) {
    const n = opts.queues;
    if (!Number.isInteger(n) || n < 1 || n > 256) throw new VirtioError("VIRTIO_BLK_BAD_QUEUES", `virtio-blk: ${n} queues (1..256)`, { path: disk.path });
    const qs = opts.queueSize ?? 256;
    this.queueMaxSizes = new Array<number>(n).fill(qs);
    this.signalQueue = new Uint8Array(n);
    const ring = opts.ring !== undefined && disk.queueHost !== undefined ? opts.ring : undefined;
    this.ring = ring;
    const slots = ring?.entries ?? 0;
    this.freeSlots = new Int32Array(slots);
    for (let i = 0; i < slots; i++) this.freeSlots[i] = slots - 1 - i;
    this.freeCount = slots;
    this.slotQueue = new Int32Array(slots);
    this.slotHead = new Int32Array(slots);
    this.slotKind = new Uint8Array(slots);
    this.slotBytes = new Float64Array(slots);
    this.slotStatus = new Float64Array(slots);
    this.slotSpans = new Array<ChainSpans | undefined>(slots).fill(undefined);
    this.slotPos = new Float64Array(slots);
    this.sectorSize = Math.max(SECTOR, disk.logicalSectorSize);
    let f = featureBit(VIRTIO_BLK_F.segMax) | featureBit(VIRTIO_BLK_F.blkSize) | featureBit(VIRTIO_BLK_F.flush) | featureBit(VIRTIO_BLK_F.topology);
    if (n > 1) f |= featureBit(VIRTIO_BLK_F.mq);
    if (disk.readOnly) f |= featureBit(VIRTIO_BLK_F.ro);
    else f |= featureBit(VIRTIO_BLK_F.discard) | featureBit(VIRTIO_BLK_F.writeZeroes) | featureBit(VIRTIO_BLK_F.configWce);
    this.stableWrites = opts.writeThrough === true;
    this.features = f;
    this.throttle = hasDiskIoLimits(opts.limits) ? new DiskThrottle(opts.limits, opts.clock) : undefined;

    const c = new DataView(this.config.buffer);
    const C = VIRTIO_BLK_CONFIG;
    const sectors = Math.floor(disk.size / SECTOR);
    c.setUint32(C.capacity, sectors % 2 ** 32, true);
    c.setUint32(C.capacity + 4, Math.floor(sectors / 2 ** 32), true);
    c.setUint32(C.segMax, Math.max(1, qs - 2), true);
    c.setUint32(C.blkSize, this.sectorSize, true);
    const ratio = Math.max(1, Math.floor(disk.physicalSectorSize / this.sectorSize));
    c.setUint8(C.physicalBlockExp, Math.round(Math.log2(ratio)));
    c.setUint16(C.minIoSize, 1, true);
    c.setUint8(C.writeback, this.stableWrites ? 0 : 1);
    c.setUint16(C.numQueues, n, true);
    c.setUint32(C.maxDiscardSectors, MAX_DISCARD_SECTORS, true);
    c.setUint32(C.maxDiscardSeg, MAX_DISCARD_SEG, true);
    c.setUint32(C.discardSectorAlignment, Math.max(1, disk.physicalSectorSize / SECTOR), true);
    c.setUint32(C.maxWriteZeroesSectors, MAX_WRITE_ZEROES_SECTORS, true);
    c.setUint32(C.maxWriteZeroesSeg, 1, true);
    // A back end that zeroes without writing (raw: punched holes) may deallocate when the driver allows it.
    c.setUint8(C.writeZeroesMayUnmap, disk.writeZeroes !== undefined ? 1 : 0);
    const s = opts.serial ?? "";
    for (let i = 0; i < Math.min(s.length, VIRTIO_BLK_ID_BYTES); i++) this.serial[i] = s.charCodeAt(i) & 0x7f;
  }

  attach(transport: VirtioTransport): void {
    this.transport = transport;
    if (this.throttle !== undefined) this.alarm = new DeviceAlarm(transport.loop, () => this.runHeldRequests(), this.throttle.clock);
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.config[offset + i]!;
    return v;
  }

  /**
   * The one writable field: writeback (VIRTIO_BLK_F_CONFIG_WCE negotiated),
   * 1 write-back, 0 write-through. Everything else is read-only.
   */
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    if (offset !== VIRTIO_BLK_CONFIG.writeback || size !== 1 || this.disk.readOnly) return;
    if (this.transport === undefined || (this.transport.negotiatedFeatures & featureBit(VIRTIO_BLK_F.configWce)) === 0n) return;
    this.config[VIRTIO_BLK_CONFIG.writeback] = value === 0 ? 0 : 1;
  }

  activate(): void {}

  /** Device reset: requests still in flight finish on the host, but the guest hears of none of them; the write cache mode is the configured one again. */
  reset(): void {
    this.dropHeld();
    this.dropInFlight();
    this.config[VIRTIO_BLK_CONFIG.writeback] = this.stableWrites ? 0 : 1;
  }

  /** The guest turned the write cache off on a disk whose writes are not stable by themselves: each write is flushed before it completes. */
  private get flushEachWrite(): boolean {
    return this.config[VIRTIO_BLK_CONFIG.writeback] === 0 && !this.stableWrites;
  }

  /** Wait for the requests in flight and drop their answers (reset, teardown). */
  private dropInFlight(): void {
    if (this.ring === undefined || this.freeCount === this.freeSlots.length) return;
    this.dropping = true;
    try {
      this.ring.drain(this.onCompletion);
    } finally {
      this.dropping = false;
      this.signalQueue.fill(0);
    }
  }

  /**
   * Before the device's state is saved: every request held or in flight
   * completes into its used ring (held ones regardless of their limits, if
   * the device is active). An inactive device does no DMA: its held
   * requests stay held, and the saved state does not record them, so a VM
   * restored from it never answers them. Only a reset makes such a device
   * work again without re-enabling bus mastering (NEEDS_RESET), and a
   * driver that turned bus mastering off (kexec, shutdown) resets the
   * device before using it; either drops held requests anyway.
   */
  quiesce(): void {
    if (this.heldCount > 0) this.runHeldRequests(true);
    if (this.ring === undefined || this.freeCount === this.freeSlots.length) return;
    this.ring.drain(this.onCompletion);
    this.signalCompleted();
  }

  /** Requests a rate limit holds now. */
  get heldRequests(): number {
    return this.heldCount;
  }

  /** Requests in flight on the ring (0 without one). */
  get queued(): number {
    return this.freeSlots.length - this.freeCount;
  }

  queueNotified(index: number): void {
    const t = this.transport!;
    const q = t.queues[index]!;
    const chain = this.chain;
    // Held requests that waited out an inactive spell (bus mastering off) go before what is new.
    if (this.heldCount > 0 && !this.alarm!.pending) this.runHeldRequests();
    do {
      q.disableNotifications();
      while (q.pop(chain)) {
        if (this.throttle !== undefined && this.hold(q, chain)) continue;
        this.handle(q, chain, true);
      }
    } while (!q.enableNotifications());
    this.submitAndReap();
    this.signalQueue[index] = 0;
    t.signalUsed(index);
    this.signalCompleted();
  }

  /** Hand this batch's queued requests to the kernel, and answer what it has already done. */
  private submitAndReap(): void {
    const ring = this.ring;
    if (ring !== undefined) {
      if (this.queuedSinceSubmit) {
        this.queuedSinceSubmit = false;
        ring.submit();
      }
      // What the kernel did while submitting (here, or earlier in this batch when its iovec area
      // filled) raises no event: answer it now, in this batch's interrupt. Reaping is memory reads.
      if (this.freeCount < this.freeSlots.length) ring.reap(this.onCompletion);
    }
  }

  /**
   * With rate limits: whether the popped request is held (a read, write or
   * write-zeroes whose limits are in debt, or whose direction already has
   * requests held: those go first). Else its cost is charged and the caller
   * does it now. A request that will fail (out of range, malformed) is not
   * held or charged: it is answered at once. Flushes, GET_ID and discards
   * are not limited.
   */
  private hold(q: VirtQueue, chain: DescriptorChain): boolean {
    if (chain.writableBytes < 1 || chain.readFrom(0, this.header) < 16) return false;
    const h = this.headerView;
    const type = h.getUint32(0, true);
    let kind: number;
    let bytes: number;
    let sector: number;
    let unmap = false;
    if (type === VIRTIO_BLK_T.in || type === VIRTIO_BLK_T.out) {
      kind = type === VIRTIO_BLK_T.in ? QUEUED_READ : QUEUED_WRITE;
      if (kind === QUEUED_WRITE && this.disk.readOnly) return false;
      bytes = kind === QUEUED_WRITE ? chain.readableBytes - 16 : chain.writableBytes - 1;
      sector = sectorAt(h, 8);
    } else if (type === VIRTIO_BLK_T.writeZeroes) {
      // One segment (max_write_zeroes_seg is 1), checked as discardOrZero checks it.
      if (this.disk.readOnly || chain.readableBytes !== 32) return false;
      if ((this.transport!.negotiatedFeatures & featureBit(VIRTIO_BLK_F.writeZeroes)) === 0n) return false;
      chain.readFrom(16, this.header);
      const count = h.getUint32(8, true);
      const flags = h.getUint32(12, true);
      if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_UNMAP) !== 0 || count > MAX_WRITE_ZEROES_SECTORS) return false;
      kind = HELD_WRITE_ZEROES;
      bytes = count * SECTOR;
      sector = sectorAt(h, 0);
      unmap = (flags & VIRTIO_BLK_WRITE_ZEROES_UNMAP) !== 0;
    } else return false;
    if (!this.inRange(sector, bytes)) return false;
    const write = kind !== QUEUED_READ;
    const d = write ? 1 : 0;
    const throttle = this.throttle!;
    // Requests held ahead go first: those of its direction, or any when a limit covers both (else a stream of
    // reads could keep taking the shared tokens from an older write).
    if ((throttle.combined ? this.heldCount : this.heldByDirection[d]) === 0) {
      const wait = throttle.delay(write);
      if (wait === 0) {
        throttle.charge(write, bytes);
        return false;
      }
      this.alarm!.set(wait);
    }
    const r = this.heldPool.pop() ?? new HeldRequest();
    r.queue = q.index;
    r.head = chain.head;
    r.kind = kind;
    r.pos = sector * SECTOR;
    r.bytes = bytes;
    r.unmap = unmap;
    r.statusGpa = statusAddress(chain);
    if (kind !== HELD_WRITE_ZEROES) {
      const spans = this.spans;
      spans.select(chain, !write, write ? 16 : 0, bytes);
      r.spans = keptCopy(r.spans, spans);
    }
    this.held[this.heldCount++] = r;
    this.heldByDirection[d]++;
    this.stats.requests++;
    this.stats.throttled++;
    throttle.waits++;
    return true;
  }

  /**
   * The alarm: held requests go, oldest first, each while its limits are not
   * in debt; a direction stops at its first request still in debt (its
   * later ones stay behind it), and the alarm is set for the earliest wait
   * left. `all` (quiesce): every held request goes, charged but not waited
   * for.
   */
  private runHeldRequests(all = false): void {
    const t = this.transport!;
    // Inactive (bus mastering off, NEEDS_RESET): no DMA. They stay held, also through a save, until the device is
    // active again (its queues are notified then) or reset (which drops them).
    if (!t.active) {
      this.alarm!.cancel();
      return;
    }
    const throttle = this.throttle!;
    let blocked = 0; // bit d: direction d is still in debt
    let next = Infinity;
    let kept = 0;
    let i = 0;
    for (; i < this.heldCount && blocked !== 3; i++) {
      const r = this.held[i]!;
      const write = r.kind !== QUEUED_READ;
      const d = write ? 1 : 0;
      if ((blocked & (1 << d)) === 0) {
        const wait = all ? 0 : throttle.delay(write);
        if (wait === 0) {
          throttle.charge(write, r.bytes);
          this.heldByDirection[d]--;
          this.runHeld(r);
          this.heldPool.push(r);
          continue;
        }
        blocked |= 1 << d;
        next = Math.min(next, wait);
      }
      this.held[kept++] = r;
    }
    // Both directions in debt: the rest stay as they are, in order.
    for (; i < this.heldCount; i++) this.held[kept++] = this.held[i]!;
    this.heldCount = kept;
    this.submitAndReap();
    this.signalCompleted();
    if (kept > 0) this.alarm!.set(next);
    else this.alarm!.cancel();
  }

  /** Do a held request now (queued on the ring where it can be), or answer it with the error it met. */
  private runHeld(r: HeldRequest): void {
    const memory = this.transport!.memory;
    this.signalQueue[r.queue] = 1;
    let status: number = VIRTIO_BLK_S.ok;
    try {
      if (r.kind === HELD_WRITE_ZEROES) this.zeroRange(r.pos, r.bytes, r.unmap);
      else {
        const write = r.kind === QUEUED_WRITE;
        this.spans.copyFrom(r.spans!);
        const flushAfter = write && this.flushEachWrite;
        const queued = !flushAfter && r.bytes > 0 ? this.enqueue(r.queue, r.head, r.statusGpa, memory, r.kind, r.pos, r.bytes) : false;
        if (queued === "queued") return;
        if (queued === false) this.transfer(memory, r.pos, write);
        if (flushAfter) {
          this.disk.flush();
          this.stats.flushes++;
        }
        if (write) this.stats.writtenBytes += r.bytes;
        else this.stats.readBytes += r.bytes;
      }
    } catch {
      status = VIRTIO_BLK_S.ioerr;
      this.stats.errors++;
    }
    const span = this.statusSpan;
    if (memory.locate(r.statusGpa, 1, span)) span.view[span.offset] = status;
    this.transport!.queues[r.queue]!.pushUsed(r.head, (status === VIRTIO_BLK_S.ok && r.kind === QUEUED_READ ? r.bytes : 0) + 1);
  }

  /** Drop the held requests unanswered (device reset, teardown) and the alarm with them. */
  private dropHeld(): void {
    for (let i = 0; i < this.heldCount; i++) this.heldPool.push(this.held[i]!);
    this.heldCount = 0;
    this.heldByDirection.fill(0);
    this.alarm?.cancel();
  }

  /** The ring's completions have arrived (its eventfd is readable): finish those requests. */
  completeQueued(): void {
    if (this.ring === undefined) return;
    this.ring.takeEvent();
    this.ring.reap(this.onCompletion);
    this.signalCompleted();
  }

  private signalCompleted(): void {
    const t = this.transport!;
    for (let i = 0; i < this.signalQueue.length; i++) {
      if (this.signalQueue[i] === 0) continue;
      this.signalQueue[i] = 0;
      t.signalUsed(i);
    }
  }

  /** A queued request's completion: `result` is the bytes moved, or a negative errno. */
  private completed(slot: number, result: number): void {
    this.freeSlots[this.freeCount++] = slot;
    if (this.dropping) return;
    const qi = this.slotQueue[slot]!;
    const q = this.transport!.queues[qi]!;
    const head = this.slotHead[slot]!;
    const kind = this.slotKind[slot]!;
    const bytes = this.slotBytes[slot]!;
    this.signalQueue[qi] = 1;
    if (result >= 0 && kind !== QUEUED_FLUSH && result !== bytes) {
      // Short (the file shrank under us, say): do the whole request again, synchronously, from its
      // spans (its buffers are still the guest's to keep: it has not had the request back).
      this.spans.copyFrom(this.slotSpans[slot]!);
      try {
        this.transfer(this.transport!.memory, this.slotPos[slot]!, kind === QUEUED_WRITE);
      } catch {
        result = -1;
      }
    }
    let status: number = VIRTIO_BLK_S.ok;
    if (result < 0) {
      status = VIRTIO_BLK_S.ioerr;
      this.stats.errors++;
    } else if (kind === QUEUED_READ) this.stats.readBytes += bytes;
    else if (kind === QUEUED_WRITE) this.stats.writtenBytes += bytes;
    else this.stats.flushes++;
    const span = this.statusSpan;
    if (this.transport!.memory.locate(this.slotStatus[slot]!, 1, span)) span.view[span.offset] = status;
    q.pushUsed(head, (status === VIRTIO_BLK_S.ok && kind === QUEUED_READ ? bytes : 0) + 1);
  }

  /**
   * The selected spans (or a flush) without waiting for the disk: "done" at
   * once (the page cache took it), "queued" on the ring, or false: do it
   * synchronously.
   */
  private enqueue(queue: number, head: number, statusGpa: number, memory: GuestMemory, kind: number, pos: number, bytes: number): "done" | "queued" | false {
    const ring = this.ring;
    if (ring === undefined || this.freeCount === 0) return false;
    const slot = this.freeSlots[this.freeCount - 1]!;
    const disk = this.disk;
    if (kind === QUEUED_FLUSH) {
      if (disk.queueFlush?.(ring, slot) !== true) return false;
    } else {
      const spans = this.spans;
      if (!spans.toHost(memory)) return false;
      const write = kind === QUEUED_WRITE;
      let r = disk.queueHost!(ring, write, pos, spans.host, spans.len, spans.count, slot);
      if (r === false && this.queuedSinceSubmit) {
        // The batch's scatter lists may have filled the ring's iovec area: hand the batch to the kernel, then try once more.
        this.queuedSinceSubmit = false;
        ring.submit();
        r = disk.queueHost!(ring, write, pos, spans.host, spans.len, spans.count, slot);
      }
      if (r !== "queued") return r;
    }
    this.freeCount--;
    this.stats.queued++;
    this.slotQueue[slot] = queue;
    this.slotHead[slot] = head;
    this.slotKind[slot] = kind;
    this.slotBytes[slot] = bytes;
    this.slotStatus[slot] = statusGpa;
    if (kind !== QUEUED_FLUSH) {
      const spans = this.spans;
      this.slotSpans[slot] = keptCopy(this.slotSpans[slot], spans);
      this.slotPos[slot] = pos;
    }
    this.queuedSinceSubmit = true;
    return "queued";
  }

  /** Release the ring's requests (device teardown): waits for what is in flight, drops what a limit holds; the alarm's timer is closed. */
  closeQueue(): void {
    this.dropHeld();
    this.dropInFlight();
    this.alarm?.close();
  }

  private handle(q: VirtQueue, chain: DescriptorChain, mayQueue: boolean): void {
    if (chain.writableBytes < 1) {
      q.fail("VIRTIO_BLK_NO_STATUS", `request ${chain.head} has no writable byte for its status`);
      return;
    }
    this.stats.requests++;
    const dataIn = chain.writableBytes - 1;
    let status: number = VIRTIO_BLK_S.ok;
    let written = 0;
    if (chain.readFrom(0, this.header) < 16) status = VIRTIO_BLK_S.ioerr;
    else {
      const h = this.headerView;
      const type = h.getUint32(0, true);
      const sector = sectorAt(h, 8);
      try {
        switch (type) {
          case VIRTIO_BLK_T.in:
            status = this.read(q, chain, sector, dataIn, mayQueue);
            if (status === QUEUED) return;
            if (status === VIRTIO_BLK_S.ok) written = dataIn;
            break;
          case VIRTIO_BLK_T.out:
            status = this.write(q, chain, sector, mayQueue);
            if (status === QUEUED) return;
            break;
          case VIRTIO_BLK_T.flush:
            if (mayQueue && this.enqueue(q.index, chain.head, statusAddress(chain), chain.memory!, QUEUED_FLUSH, 0, 0) === "queued") return;
            this.disk.flush();
            this.stats.flushes++;
            break;
          case VIRTIO_BLK_T.getId:
            written = chain.writeTo(0, this.serial, 0, Math.min(VIRTIO_BLK_ID_BYTES, dataIn));
            break;
          case VIRTIO_BLK_T.discard:
          case VIRTIO_BLK_T.writeZeroes:
            status = this.discardOrZero(chain, type === VIRTIO_BLK_T.discard);
            break;
          default:
            status = VIRTIO_BLK_S.unsupp;
        }
      } catch {
        // DiskError (I/O failure) or anything the back end threw: the guest sees an I/O error.
        status = VIRTIO_BLK_S.ioerr;
        written = 0;
      }
    }
    if (status === VIRTIO_BLK_S.ioerr) this.stats.errors++;
    else if (status === VIRTIO_BLK_S.unsupp) this.stats.unsupported++;
    this.statusByte[0] = status;
    chain.writeTo(chain.writableBytes - 1, this.statusByte);
    q.pushUsed(chain.head, written + 1);
  }

  private inRange(sector: number, bytes: number): boolean {
    const offset = sector * SECTOR;
    return offset + bytes <= this.disk.size && offset % this.sectorSize === 0 && bytes % this.sectorSize === 0;
  }

  private read(q: VirtQueue, chain: DescriptorChain, sector: number, bytes: number, mayQueue: boolean): number {
    if (!this.inRange(sector, bytes)) return VIRTIO_BLK_S.ioerr;
    // The data segments: the writable ones, cut to the request's length (the status byte follows).
    this.spans.select(chain, true, 0, bytes);
    const r = mayQueue && bytes > 0 ? this.enqueue(q.index, chain.head, statusAddress(chain), chain.memory!, QUEUED_READ, sector * SECTOR, bytes) : false;
    if (r === "queued") return QUEUED;
    if (r === false) this.transfer(chain.memory!, sector * SECTOR, false);
    this.stats.readBytes += bytes;
    return VIRTIO_BLK_S.ok;
  }

  private write(q: VirtQueue, chain: DescriptorChain, sector: number, mayQueue: boolean): number {
    if (this.disk.readOnly) return VIRTIO_BLK_S.ioerr;
    const bytes = chain.readableBytes - 16;
    if (!this.inRange(sector, bytes)) return VIRTIO_BLK_S.ioerr;
    // The data segments: the readable ones after the 16-byte request header.
    this.spans.select(chain, false, 16, bytes);
    const flushAfter = this.flushEachWrite;
    const r = mayQueue && bytes > 0 && !flushAfter ? this.enqueue(q.index, chain.head, statusAddress(chain), chain.memory!, QUEUED_WRITE, sector * SECTOR, bytes) : false;
    if (r === "queued") return QUEUED;
    if (r === false) this.transfer(chain.memory!, sector * SECTOR, true);
    if (flushAfter) {
      this.disk.flush();
      this.stats.flushes++;
    }
    this.stats.writtenBytes += bytes;
    return VIRTIO_BLK_S.ok;
  }

  /**
   * Move the selected spans to or from the disk at `pos`: one system call
   * straight between guest RAM and the file where both allow it (host-mapped
   * RAM, raw file: preadv/pwritev on host addresses); else one vectored call
   * over views; else segment by segment.
   */
  private transfer(memory: GuestMemory, pos: number, write: boolean): void {
    const disk = this.disk;
    const spans = this.spans;
    const count = spans.count;
    if ((write ? disk.writeHost : disk.readHost) !== undefined && spans.toHost(memory)) {
      if (write ? disk.writeHost!(pos, spans.host, spans.len, count) : disk.readHost!(pos, spans.host, spans.len, count)) return;
    }
    for (let i = 0; i < count; i++) this.vector[i] = memory.tryBytes(spans.gpa[i]!, spans.len[i]!)!;
    const vectored = write ? disk.writeVectored?.(pos, this.vector, count) : disk.readVectored?.(pos, this.vector, count);
    if (vectored !== true) {
      for (let i = 0, at = pos; i < count; i++) {
        if (write) disk.write(at, this.vector[i]!);
        else disk.read(at, this.vector[i]!);
        at += this.vector[i]!.length;
      }
    }
    this.vector.fill(EMPTY, 0, count); // drop the views (they pin guest RAM views for the GC otherwise)
  }

  private discardOrZero(chain: DescriptorChain, discard: boolean): number {
    if (this.disk.readOnly) return VIRTIO_BLK_S.ioerr;
    const f = this.transport!.negotiatedFeatures;
    if ((f & featureBit(discard ? VIRTIO_BLK_F.discard : VIRTIO_BLK_F.writeZeroes)) === 0n) return VIRTIO_BLK_S.unsupp;
    const bytes = chain.readableBytes - 16;
    const segments = bytes / 16;
    if (bytes === 0 || bytes % 16 !== 0) return VIRTIO_BLK_S.ioerr;
    if (segments > (discard ? MAX_DISCARD_SEG : 1)) return VIRTIO_BLK_S.unsupp;
    const h = this.headerView;
    // Check every segment before acting on any.
    for (let pass = 0; pass < 2; pass++) {
      for (let k = 0; k < segments; k++) {
        chain.readFrom(16 + 16 * k, this.header);
        const count = h.getUint32(8, true);
        const flags = h.getUint32(12, true);
        const sector = sectorAt(h, 0);
        if (pass === 0) {
          if (discard ? flags !== 0 : (flags & ~1) !== 0) return VIRTIO_BLK_S.unsupp;
          if (count > (discard ? MAX_DISCARD_SECTORS : MAX_WRITE_ZEROES_SECTORS)) return VIRTIO_BLK_S.ioerr;
          if (!this.inRange(sector, count * SECTOR)) return VIRTIO_BLK_S.ioerr;
          continue;
        }
        if (discard) this.disk.discard(sector * SECTOR, count * SECTOR);
        else this.zeroRange(sector * SECTOR, count * SECTOR, (flags & VIRTIO_BLK_WRITE_ZEROES_UNMAP) !== 0);
      }
    }
    return VIRTIO_BLK_S.ok;
  }

  /** Make [pos, pos+length) read as zeros: without writing them where the disk can, else by writing them. */
  private zeroRange(pos: number, length: number, unmap: boolean): void {
    if (this.disk.writeZeroes?.(pos, length, unmap) !== true) {
      let at = pos;
      let left = length;
      while (left > 0) {
        const n = Math.min(left, ZERO_CHUNK);
        this.disk.write(at, n === ZERO_CHUNK ? this.zeros : this.zeros.subarray(0, n));
        at += n;
        left -= n;
      }
    }
    this.stats.writtenBytes += length;
  }

  save(): VirtioBlkSavedState {
    return { kind: "virtio-blk", version: 2, capacitySectors: Math.floor(this.disk.size / SECTOR), queues: this.queueMaxSizes.length, writeback: this.config[VIRTIO_BLK_CONFIG.writeback]! };
  }
}

/** A virtio-blk PCI function over `disk`. */
export function createVirtioBlk(name: string, disk: BlockDevice, services: PciDeviceServices, opts: VirtioBlkOptions): VirtioPciDevice {
  const blk = new VirtioBlk(disk, opts);
  try {
    return new VirtioPciDevice(name, blk, services, { ringPacked: opts.ringPacked === true });
  } catch (e) {
    blk.closeQueue(); // attach() may have made its rate-limit alarm before the transport failed
    throw e;
  }
}
