/**
 * Raw disk images: the file is the disk, byte for byte. Also the I/O core of
 * pass-through host block devices (src/storage/passthrough.ts), which differ
 * only in how the size and sector sizes are learned.
 *
 * DEVNOTE (what Node's fs cannot do, and what we do instead):
 * - Sparse create: ftruncate, so "fixed" and "dynamic" raw files are both
 *   sparse; nothing is preallocated.
 * - discard: punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE, through
 *   src/hypervisor/libc.ts): the host file system frees the space and the
 *   range reads as zeros, so a guest's fstrim shrinks the image. Where the
 *   file system or device cannot (EOPNOTSUPP) or the punch fails (ENOSPC,
 *   EPERM, EIO), discard does nothing (it is only a hint in the contract)
 *   and `notes` says so once per cause.
 * - writeZeroes: punches a hole when the caller allows deallocation, else
 *   (or when holes are refused) fallocate ZERO_RANGE; false (the caller
 *   writes zeros) where neither works; an I/O error is a DiskError.
 * - allocation: SEEK_DATA/SEEK_HOLE map the file's holes, reported
 *   "unallocated" (a raw disk has no parent: they read as zeros). Block
 *   devices answer that they are all data, so everything is "allocated"
 *   there, as where SEEK_DATA is not supported at all.
 *   describe() reports the space actually used (st_blocks) as allocatedBytes.
 * Without libc (koffi missing), discard is a no-op and everything is
 * "allocated", as before these existed.
 * - O_DIRECT: requested with `direct` (cache=none, directsync). The file
 *   system says what it needs (statx STATX_DIOALIGN: buffer address
 *   alignment, offset and length alignment; 4096 and the sector size where
 *   it does not say). Transfers between guest RAM and the file whose spans
 *   meet it (readHost/writeHost/queueHost: every page-aligned guest I/O)
 *   go straight to the device, no copy, and once one such transfer has
 *   worked, on the io_uring without trying first: a direct read or write
 *   always waits for the device. Everything else (JS buffers, spans not
 *   aligned) goes through an aligned bounce buffer, taken from
 *   `alignedBuffer` (src/hypervisor/libc.ts) when that module loads, else
 *   found by probing offsets of an over-allocated ArrayBuffer with a direct
 *   read. When the file system refuses O_DIRECT (EINVAL on open or on I/O),
 *   the disk falls back to buffered I/O and records why in `notes`.
 *   `directIoCounts` says which way transfers went.
 * - O_DSYNC with `writeThrough` (cache=writethrough, directsync); flush()
 *   does nothing with `ignoreFlush` (cache=unsafe).
 * - A file whose length is not a multiple of 512 is seen rounded down.
 */
import * as fs from "node:fs";
import { DiskError, type AllocationExtent, type BlockDevice, type DiskType, type HostIoQueue, type OpenOptions } from "./block-device.js";
import type { CheckFinding, CreateSpec, DiskDescription, DiskFormatDriver } from "./format-driver.js";

const SECTOR = 512;
/** Largest raw disk we create: 64 TiB (same as VHDX); the file system decides the real limit. */
const MAX_RAW_SIZE = 64 * 1024 ** 4;
const BOUNCE_BYTES = 1024 * 1024;

type AlignedBufferFn = (bytes: number, alignment?: number) => Uint8Array;
type DirectAlignmentFn = (fd: number) => { memory: number; offset: number } | undefined;
/** `directIoAlignment` (statx STATX_DIOALIGN) from src/hypervisor/libc.ts. */
let libcDirectAlignment: DirectAlignmentFn | undefined;
type VectoredFn = (fd: number, views: readonly Uint8Array[], count: number, offset: number) => number;
type HostVectoredFn = (fd: number, addresses: Float64Array, lengths: Uint32Array, count: number, offset: number) => number;

/** `alignedBuffer` from src/hypervisor/libc.ts, when it is present and koffi loads. */
let libcAlignedBuffer: AlignedBufferFn | undefined;
type FallocateFn = (fd: number, mode: number, offset: number, length: number) => void;
type SeekFn = (fd: number, offset: number, what: "data" | "hole") => number;
/** fallocate and SEEK_DATA/SEEK_HOLE from the same module (hole punching, zeroing, the allocation map). */
let libcSpace: { fallocate: FallocateFn; seek: SeekFn; punchHole: number; zeroRange: number } | undefined;
/** preadv/pwritev over host-mapped views (guest RAM), from the same module. */
let libcVectored: { preadv: VectoredFn; pwritev: VectoredFn; preadvHost: HostVectoredFn; pwritevHost: HostVectoredFn; iovMax: number } | undefined;
type FlaggedHostFn = (write: boolean, fd: number, addresses: Float64Array, lengths: Uint32Array, count: number, offset: number, flags: number) => number;
/** preadv2/pwritev2 with RWF_NOWAIT, and errno (queueHost: try at once, queue what would wait). */
let libcNowait: { transfer: FlaggedHostFn; flag: number; errno: () => number; EAGAIN: number } | undefined;
try {
  // A literal specifier, so the bundle (scripts/bundle.mjs) carries the module; typed loosely: any part may be missing.
  const mod = (await import("../hypervisor/libc.js")) as unknown as {
    alignedBuffer?: unknown;
    directIoAlignment?: unknown;
    preadv?: unknown;
    pwritev?: unknown;
    preadvHost?: unknown;
    transferHostWithFlags?: unknown;
    RWF_NOWAIT?: unknown;
    errno?: unknown;
    Errno?: { EAGAIN: number };
    pwritevHost?: unknown;
    IOV_MAX?: unknown;
    fallocate?: unknown;
    seekDataOrHole?: unknown;
    FALLOC_FL?: { keepSize: number; punchHole: number; zeroRange: number };
  };
  if (typeof mod.fallocate === "function" && typeof mod.seekDataOrHole === "function" && mod.FALLOC_FL !== undefined)
    libcSpace = {
      fallocate: mod.fallocate as FallocateFn,
      seek: mod.seekDataOrHole as SeekFn,
      punchHole: mod.FALLOC_FL.punchHole | mod.FALLOC_FL.keepSize,
      zeroRange: mod.FALLOC_FL.zeroRange | mod.FALLOC_FL.keepSize,
    };
  if (typeof mod.alignedBuffer === "function") libcAlignedBuffer = mod.alignedBuffer as AlignedBufferFn;
  if (typeof mod.directIoAlignment === "function") libcDirectAlignment = mod.directIoAlignment as DirectAlignmentFn;
  if (typeof mod.transferHostWithFlags === "function" && typeof mod.errno === "function" && typeof mod.RWF_NOWAIT === "number" && mod.Errno !== undefined)
    libcNowait = { transfer: mod.transferHostWithFlags as FlaggedHostFn, flag: mod.RWF_NOWAIT, errno: mod.errno as () => number, EAGAIN: mod.Errno.EAGAIN };
  if (typeof mod.preadv === "function" && typeof mod.pwritev === "function" && typeof mod.preadvHost === "function" && typeof mod.pwritevHost === "function")
    libcVectored = {
      preadv: mod.preadv as VectoredFn,
      pwritev: mod.pwritev as VectoredFn,
      preadvHost: mod.preadvHost as HostVectoredFn,
      pwritevHost: mod.pwritevHost as HostVectoredFn,
      iovMax: Number(mod.IOV_MAX) || 1024,
    };
} catch {
  libcAlignedBuffer = undefined;
  libcDirectAlignment = undefined;
  libcVectored = undefined;
  libcSpace = undefined;
  libcNowait = undefined;
}

function errnoOf(e: unknown): string | undefined {
  return typeof e === "object" && e !== null && "code" in e ? String((e as { code: unknown }).code) : undefined;
}

/** pread that fills `buf` completely; bytes past end of file read as zeros. */
export function preadFully(fd: number, buf: Uint8Array, position: number): void {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) {
      buf.fill(0, done);
      return;
    }
    done += n;
  }
}

export function pwriteFully(fd: number, buf: Uint8Array, position: number): void {
  let done = 0;
  while (done < buf.length) {
    done += fs.writeSync(fd, buf, done, buf.length - done, position + done);
  }
}

/**
 * A file opened with O_DIRECT: what its transfers must be aligned to, and
 * aligned bounce I/O for those that are not: every such request is widened
 * to `alignment`-aligned offsets and lengths (read-modify-write for
 * unaligned writes).
 */
export class DirectIo {
  private bounce: Uint8Array;
  /**
   * @param alignment file offsets and lengths
   * @param memoryAlignment buffer addresses (every span of a vectored transfer)
   */
  constructor(
    private readonly fd: number,
    readonly alignment: number,
    readonly memoryAlignment: number,
    bounce: Uint8Array,
  ) {
    this.bounce = bounce;
  }

  /** Whether a vectored transfer of host spans at `offset` meets O_DIRECT's alignment (then it needs no bounce). */
  fits(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    if (offset % this.alignment !== 0) return false;
    const a = this.alignment;
    const m = this.memoryAlignment;
    for (let i = 0; i < count; i++) if (lengths[i]! % a !== 0 || addresses[i]! % m !== 0) return false;
    return true;
  }

  /** Aligned bounce memory, or undefined when none can be found (then use buffered I/O). */
  static findBounce(fd: number, alignment: number): Uint8Array | undefined {
    if (libcAlignedBuffer !== undefined) {
      try {
        return libcAlignedBuffer(BOUNCE_BYTES, Math.max(alignment, 4096));
      } catch {
        // fall through to probing
      }
    }
    const raw = new Uint8Array(BOUNCE_BYTES + 4096);
    for (let skip = 0; skip < 4096; skip += 16) {
      try {
        fs.readSync(fd, raw, skip, alignment, 0);
        return raw.subarray(skip, skip + BOUNCE_BYTES);
      } catch (e) {
        if (errnoOf(e) !== "EINVAL") return undefined;
      }
    }
    return undefined;
  }

  read(offset: number, buf: Uint8Array): void {
    const a = this.alignment;
    let pos = offset;
    let out = 0;
    while (out < buf.length) {
      const start = Math.floor(pos / a) * a;
      const skip = pos - start;
      const span = Math.min(this.bounce.length, Math.ceil((skip + buf.length - out) / a) * a);
      const chunk = this.bounce.subarray(0, span);
      preadFully(this.fd, chunk, start);
      const n = Math.min(span - skip, buf.length - out);
      buf.set(chunk.subarray(skip, skip + n), out);
      out += n;
      pos += n;
    }
  }

  write(offset: number, buf: Uint8Array): void {
    const a = this.alignment;
    let pos = offset;
    let done = 0;
    while (done < buf.length) {
      const start = Math.floor(pos / a) * a;
      const skip = pos - start;
      const span = Math.min(this.bounce.length, Math.ceil((skip + buf.length - done) / a) * a);
      const chunk = this.bounce.subarray(0, span);
      const n = Math.min(span - skip, buf.length - done);
      if (skip !== 0 || n !== span) {
        // Partial head or tail sector: read what is there first.
        preadFully(this.fd, chunk, start);
      }
      chunk.set(buf.subarray(done, done + n), skip);
      pwriteFully(this.fd, chunk, start);
      done += n;
      pos += n;
    }
  }
}

export interface RawDiskConfig {
  readonly path: string;
  readonly fd: number;
  readonly size: number;
  readonly type: Extract<DiskType, "raw" | "passthrough">;
  readonly readOnly: boolean;
  readonly logicalSectorSize: number;
  readonly physicalSectorSize: number;
  readonly direct: DirectIo | undefined;
  /** How to reopen without O_DIRECT if direct I/O fails at run time. */
  readonly reopenBuffered: (() => number) | undefined;
  readonly notes: string[];
  /** flush() does nothing (cache=unsafe). */
  readonly ignoreFlush?: boolean;
  /** The descriptor belongs to someone else (an image format's file, see payloadOf): close() neither flushes nor closes it. */
  readonly borrowed?: boolean;
}

export class RawDisk implements BlockDevice {
  readonly path: string;
  readonly format = "raw" as const;
  readonly type: Extract<DiskType, "raw" | "passthrough">;
  readonly size: number;
  readonly logicalSectorSize: number;
  readonly physicalSectorSize: number;
  readonly readOnly: boolean;
  readonly parent: BlockDevice | undefined = undefined;
  /** Why direct I/O is not in use although asked for, and similar remarks. */
  readonly notes: string[];
  private fd: number;
  private direct: DirectIo | undefined;
  private readonly reopenBuffered: (() => number) | undefined;
  private readonly borrowed: boolean;
  private readonly ignoreFlush: boolean;
  private closed = false;
  /** A straight (unbounced) O_DIRECT transfer has worked: aligned ones may now be queued without a try. */
  private directProven = false;
  /** The O_DIRECT descriptor replaced after an EINVAL: kept open until close(), as queued requests may still name it. */
  private retiredFd: number | undefined;
  /**
   * Transfers under O_DIRECT: `straight` between the caller's memory (guest
   * RAM) and the device, queued ones included; `bounced` through the
   * aligned bounce buffer.
   */
  readonly directIoCounts = { straight: 0, bounced: 0 };

  constructor(config: RawDiskConfig) {
    this.path = config.path;
    this.fd = config.fd;
    this.size = config.size;
    this.type = config.type;
    this.readOnly = config.readOnly;
    this.logicalSectorSize = config.logicalSectorSize;
    this.physicalSectorSize = config.physicalSectorSize;
    this.direct = config.direct;
    this.reopenBuffered = config.reopenBuffered;
    this.notes = config.notes;
    this.borrowed = config.borrowed === true;
    this.ignoreFlush = config.ignoreFlush === true;
  }

  /**
   * The file of an image format (VHD, VHDX) seen as raw bytes, for the
   * payload ranges the format has mapped to one contiguous file extent: its
   * readHost/writeHost/queueHost/queueFlush move guest data with no copy and
   * without waiting for the disk, exactly as for a raw image. Offsets are file
   * offsets; the format checks ranges against the virtual disk first. The
   * descriptor stays the format's: close() only stops further use. `direct`:
   * the file is open with O_DIRECT (the format's own DirectIo), so only
   * aligned spans go straight (no EINVAL fallback here: the format opened
   * and probed the file).
   */
  static payloadOf(path: string, fd: number, readOnly: boolean, direct?: DirectIo): RawDisk {
    return new RawDisk({ path, fd, size: Number.MAX_SAFE_INTEGER, type: "raw", readOnly, logicalSectorSize: SECTOR, physicalSectorSize: 4096, direct, reopenBuffered: undefined, notes: [], borrowed: true });
  }

  /** Whether I/O currently bypasses the page cache. */
  get directIo(): boolean {
    return this.direct !== undefined;
  }

  private checkRange(offset: number, length: number, op: string): void {
    if (this.closed) throw new DiskError("DISK_CLOSED", `${op} after close`, this.path);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.size) {
      throw new DiskError("OUT_OF_RANGE", `${op} of ${length} bytes at offset ${offset} is outside the disk (size ${this.size})`, this.path, { offset, length });
    }
  }

  private withDirectFallback(op: () => void, buffered: () => void): void {
    if (this.direct === undefined) return buffered();
    try {
      op();
      this.directIoCounts.bounced++;
    } catch (e) {
      if (!this.dropDirect(e)) throw e;
      buffered();
    }
  }

  /**
   * After a failed O_DIRECT call: when it failed with EINVAL (the file system
   * refused after all), go on with buffered I/O and say so; true then.
   */
  private dropDirect(e: unknown): boolean {
    // Node's fs errors carry the errno name as `code`, libc's SystemCallError as `errnoName`.
    const named = typeof e === "object" && e !== null && "errnoName" in e ? String((e as { errnoName: unknown }).errnoName) : undefined;
    const code = named ?? errnoOf(e);
    if (code !== "EINVAL" || this.reopenBuffered === undefined || this.direct === undefined) return false;
    this.retiredFd = this.fd;
    this.fd = this.reopenBuffered();
    this.direct = undefined;
    this.notes.push("O_DIRECT I/O failed with EINVAL; using buffered I/O");
    return true;
  }

  read(offset: number, buf: Uint8Array): void {
    this.checkRange(offset, buf.length, "read");
    if (buf.length === 0) return;
    this.withDirectFallback(
      () => this.direct!.read(offset, buf),
      () => preadFully(this.fd, buf, offset),
    );
  }

  write(offset: number, buf: Uint8Array): void {
    this.checkRange(offset, buf.length, "write");
    if (this.readOnly) throw new DiskError("DISK_READ_ONLY", "write to a read-only disk", this.path, { offset });
    if (buf.length === 0) return;
    this.withDirectFallback(
      () => this.direct!.write(offset, buf),
      () => pwriteFully(this.fd, buf, offset),
    );
  }

  /**
   * One preadv/pwritev over the segments, or undefined (nothing done) when this
   * disk uses O_DIRECT bounce buffers or a segment is not host-mapped memory
   * (libc refuses those before any system call, with a RangeError).
   */
  private vectored(offset: number, segments: readonly Uint8Array[], count: number, write: boolean): number | undefined {
    if (libcVectored === undefined || this.direct !== undefined || count > libcVectored.iovMax) return undefined;
    let total = 0;
    for (let i = 0; i < count; i++) total += segments[i]!.length;
    this.checkRange(offset, total, write ? "write" : "read");
    if (write && this.readOnly) throw new DiskError("DISK_READ_ONLY", "write to a read-only disk", this.path, { offset });
    if (total === 0) return 0;
    let n: number;
    try {
      n = (write ? libcVectored.pwritev : libcVectored.preadv)(this.fd, segments, count, offset);
    } catch (e) {
      if (e instanceof RangeError) return undefined;
      throw e;
    }
    if (n < total) this.finishShort(offset, segments, count, n, write);
    return total;
  }

  /**
   * One preadv/pwritev over host spans; false (the caller redoes it another
   * way) when not possible or short. Under O_DIRECT only spans that meet its
   * alignment (the others take the bounce buffer).
   */
  private host(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number, write: boolean): boolean {
    if (libcVectored === undefined || count > libcVectored.iovMax) return false;
    const direct = this.direct;
    if (direct !== undefined && !direct.fits(offset, addresses, lengths, count)) return false;
    // The checks stay written out here and in queueHost: moved into a shared helper, they cost 16 bytes
    // of garbage per request (V8 boxed the sum), measured with bench/devices/virtqueue-host.js.
    let total = 0;
    for (let i = 0; i < count; i++) total += lengths[i]!;
    this.checkRange(offset, total, write ? "write" : "read");
    if (write && this.readOnly) throw new DiskError("DISK_READ_ONLY", "write to a read-only disk", this.path, { offset });
    if (total === 0) return true;
    let n: number;
    try {
      n = (write ? libcVectored.pwritevHost : libcVectored.preadvHost)(this.fd, addresses, lengths, count, offset);
    } catch (e) {
      if (e instanceof RangeError) return false;
      if (direct !== undefined && this.dropDirect(e)) return this.host(offset, addresses, lengths, count, write);
      throw e;
    }
    if (direct !== undefined) {
      this.directProven = true;
      this.directIoCounts.straight++;
    }
    return n === total;
  }

  readHost(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    return this.host(offset, addresses, lengths, count, false);
  }

  writeHost(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    return this.host(offset, addresses, lengths, count, true);
  }

  /**
   * Whether this file's reads (index 0) and writes (1) can be tried without
   * waiting (RWF_NOWAIT): undefined until tried, false where the file system
   * cannot say (tmpfs on older kernels, some writes): those stay synchronous.
   */
  private readonly nowait: [boolean | undefined, boolean | undefined] = [undefined, undefined];

  /**
   * The transfer at once if the page cache can take it without waiting (one
   * preadv2/pwritev2 with RWF_NOWAIT: as cheap as the synchronous path), else
   * queued on `queue` (the disk would have made the device thread wait).
   * Files whose file system cannot try without waiting are not queued at all:
   * false, and the caller does it synchronously, as before. Under O_DIRECT,
   * aligned spans are queued without a try (below).
   */
  queueHost(queue: HostIoQueue, write: boolean, offset: number, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): "done" | "queued" | false {
    const direct = this.direct;
    const nw = libcNowait;
    const which = write ? 1 : 0;
    if (this.closed || count > (libcVectored?.iovMax ?? 1024)) return false;
    if (direct !== undefined) {
      // O_DIRECT: aligned spans straight onto the queue (a direct transfer always waits for the device, so
      // there is nothing to try at once), once a synchronous one has shown the file system takes them. Where
      // its alignment is coarser than the disk's sectors, a guest write of a few sectors bounces as a
      // read-modify-write of the aligned block around it, which could undo a neighbouring write still in
      // flight on the queue: such disks keep every direct transfer synchronous.
      if (direct.alignment > this.logicalSectorSize || !this.directProven || !direct.fits(offset, addresses, lengths, count)) return false;
    } else if (nw === undefined || this.nowait[which] === false) return false;
    let total = 0;
    for (let i = 0; i < count; i++) total += lengths[i]!;
    this.checkRange(offset, total, write ? "write" : "read");
    if (write && this.readOnly) throw new DiskError("DISK_READ_ONLY", "write to a read-only disk", this.path, { offset });
    if (total === 0) return false;
    if (direct === undefined) {
      let n: number;
      try {
        n = nw!.transfer(write, this.fd, addresses, lengths, count, offset, nw!.flag);
      } catch (e) {
        if (e instanceof RangeError) return false; // a span not mapped by the FFI layer: the views path takes it
        throw e;
      }
      if (n === total) {
        this.nowait[which] = true;
        return "done";
      }
      if (n >= 0) return false; // partly done: the caller redoes the whole request synchronously
      const e = nw!.errno();
      if (e !== nw!.EAGAIN) {
        // EOPNOTSUPP (the file system cannot try without waiting) or a real error the synchronous path will report.
        if (this.nowait[which] === undefined) this.nowait[which] = false;
        return false;
      }
      this.nowait[which] = true;
    }
    let queued: boolean;
    try {
      queued = queue.prepareVectored(write, this.fd, offset, addresses, lengths, count, token);
    } catch (e) {
      if (e instanceof RangeError) return false; // a span not mapped by the FFI layer
      throw e;
    }
    if (!queued) return false;
    if (direct !== undefined) this.directIoCounts.straight++;
    return "queued";
  }

  /**
   * fsync on the ring, for files whose reads or writes can wait for a disk
   * (O_DIRECT ones, and those where RWF_NOWAIT has said so: not tmpfs, whose
   * fsync does nothing). Not with `ignoreFlush`: flush() returns at once.
   */
  queueFlush(queue: HostIoQueue, token: number): boolean {
    if (this.closed || this.readOnly || this.ignoreFlush || (!this.directProven && this.nowait[0] !== true && this.nowait[1] !== true)) return false;
    return queue.prepareFsync(this.fd, false, token);
  }

  readVectored(offset: number, segments: readonly Uint8Array[], count: number): boolean {
    return this.vectored(offset, segments, count, false) !== undefined;
  }

  writeVectored(offset: number, segments: readonly Uint8Array[], count: number): boolean {
    return this.vectored(offset, segments, count, true) !== undefined;
  }

  /** Complete a short vectored transfer segment by segment (end of file reads as zeros). */
  private finishShort(offset: number, segments: readonly Uint8Array[], count: number, done: number, write: boolean): void {
    let pos = 0;
    for (let i = 0; i < count; i++) {
      const v = segments[i]!;
      const end = pos + v.length;
      if (end > done) {
        const from = Math.max(0, done - pos);
        const part = from === 0 ? v : v.subarray(from);
        if (write) pwriteFully(this.fd, part, offset + pos + from);
        else preadFully(this.fd, part, offset + pos + from);
      }
      pos = end;
    }
  }

  /** fsync (nothing with `ignoreFlush`, cache=unsafe). */
  flush(): void {
    if (this.closed || this.readOnly || this.ignoreFlush) return;
    fs.fsyncSync(this.fd);
  }

  /**
   * Punch a hole: the host frees the space and the range reads as zeros. A
   * hint: where the host refuses or fails (unsupported, ENOSPC, EPERM, EIO),
   * nothing happens but a note (once per cause).
   */
  discard(offset: number, length: number): void {
    this.checkRange(offset, length, "discard");
    if (this.readOnly || length === 0) return;
    this.fallocate(libcSpace?.punchHole, "punch hole", offset, length, false);
  }

  /**
   * Make [offset, offset+length) read as zeros without writing them: a hole
   * when `deallocate` is allowed (ZERO_RANGE if holes are refused), else
   * zeroed extents (ZERO_RANGE). False, having done nothing, where the host
   * cannot: the caller writes zeros. Throws DiskError on an I/O error.
   */
  writeZeroes(offset: number, length: number, deallocate: boolean): boolean {
    this.checkRange(offset, length, "write zeroes");
    if (this.readOnly) throw new DiskError("DISK_READ_ONLY", "write to a read-only disk", this.path, { offset });
    if (length === 0) return true;
    if (deallocate && this.fallocate(libcSpace?.punchHole, "punch hole", offset, length, true)) return true;
    return this.fallocate(libcSpace?.zeroRange, "zero range", offset, length, true);
  }

  /** fallocate modes this file refused as unsupported: not tried again. */
  private readonly refused = new Set<number>();
  /** Failures already noted (kind:errno). */
  private readonly noted = new Set<string>();

  /**
   * fallocate(mode) over the range: true when done. False where the host does
   * not support the mode (remembered) or, for ENOSPC/EPERM and for callers
   * that only hint (`strict` false), any failure; each cause is noted once.
   * Other failures of a strict caller throw DiskError.
   */
  private fallocate(mode: number | undefined, kind: "punch hole" | "zero range", offset: number, length: number, strict: boolean): boolean {
    if (libcSpace === undefined || mode === undefined || this.refused.has(mode)) return false;
    try {
      libcSpace.fallocate(this.fd, mode, offset, length);
      return true;
    } catch (e) {
      const code = String((e as { errnoName?: unknown }).errnoName ?? "?");
      const unsupported = ["EOPNOTSUPP", "ENOTSUP", "EINVAL", "ENODEV", "ENOSYS"].includes(code);
      if (!unsupported && strict && code !== "ENOSPC" && code !== "EPERM")
        throw new DiskError("DISK_IO", `${kind} of ${length} bytes at offset ${offset} failed: ${(e as Error).message}`, this.path, { offset, length });
      if (unsupported) this.refused.add(mode);
      if (!this.noted.has(`${kind}:${code}`)) {
        this.noted.add(`${kind}:${code}`);
        this.notes.push(`${kind} ${unsupported ? "is not supported here" : "failed"} (${code}): ${kind === "punch hole" ? "discards do nothing, zeroing falls back" : "zeros are written instead"}`);
      }
      return false;
    }
  }

  /** Data as "allocated", holes as "unallocated" (SEEK_DATA/SEEK_HOLE); all "allocated" where the host cannot tell. */
  allocation(offset: number, length: number): AllocationExtent[] {
    this.checkRange(offset, length, "allocation");
    if (length === 0) return [];
    const whole: AllocationExtent[] = [{ offset, length, state: "allocated" }];
    if (libcSpace === undefined) return whole;
    const end = offset + length;
    const out: AllocationExtent[] = [];
    const push = (from: number, to: number, state: AllocationExtent["state"]) => {
      if (to <= from) return;
      const last = out[out.length - 1];
      if (last !== undefined && last.state === state && last.offset + last.length === from) out[out.length - 1] = { offset: last.offset, length: to - last.offset, state };
      else out.push({ offset: from, length: to - from, state });
    };
    try {
      let pos = offset;
      while (pos < end) {
        const data = libcSpace.seek(this.fd, pos, "data");
        if (data < 0 || data >= end) {
          push(pos, end, "unallocated");
          break;
        }
        push(pos, data, "unallocated");
        const hole = libcSpace.seek(this.fd, data, "hole");
        const stop = hole < 0 ? end : Math.min(hole, end);
        if (data < pos || stop <= data) return whole; // a file system whose answers do not advance: trust none of them
        push(data, stop, "allocated");
        pos = stop;
      }
    } catch {
      return whole; // EINVAL: SEEK_DATA/SEEK_HOLE not supported here
    }
    return out;
  }

  close(): void {
    if (this.closed) return;
    if (this.borrowed) {
      this.closed = true;
      return;
    }
    try {
      this.flush();
    } finally {
      this.closed = true;
      fs.closeSync(this.fd);
      if (this.retiredFd !== undefined) fs.closeSync(this.retiredFd);
    }
  }
}

/**
 * Open `path` with O_DIRECT when asked and possible, O_DSYNC with
 * `writeThrough`. Returns the descriptor, the direct I/O helper (undefined
 * when buffered), and notes on any fallback. `alignment` (the disk's
 * logical sector size) is raised to what the file system says O_DIRECT
 * needs, where it says (statx); buffer addresses are then held to its
 * memory alignment, else to 4096. A direct descriptor has read one aligned
 * block already: one the file system refuses with EINVAL is given up here.
 */
export function openFileForDisk(
  path: string,
  readOnly: boolean,
  wantDirect: boolean,
  alignment: number,
  writeThrough = false,
): { fd: number; direct: DirectIo | undefined; reopenBuffered: () => number; notes: string[] } {
  const base = (readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | (writeThrough && !readOnly ? fs.constants.O_DSYNC : 0);
  const reopenBuffered = (): number => fs.openSync(path, base);
  const notes: string[] = [];
  const openErr = (e: unknown): never => {
    throw new DiskError("DISK_OPEN_FAILED", `cannot open: ${(e as Error).message}`, path, { errno: errnoOf(e) });
  };
  if (wantDirect) {
    const O_DIRECT = fs.constants.O_DIRECT;
    if (O_DIRECT === undefined) {
      notes.push("O_DIRECT is not available on this platform; using buffered I/O");
    } else {
      let fd: number | undefined;
      try {
        fd = fs.openSync(path, base | O_DIRECT);
      } catch (e) {
        if (errnoOf(e) !== "EINVAL") openErr(e);
        notes.push("the file system refused O_DIRECT; using buffered I/O");
      }
      if (fd !== undefined) {
        const said = libcDirectAlignment?.(fd);
        const offsetAlignment = Math.max(alignment, said?.offset ?? 0);
        const memoryAlignment = said?.memory ?? 4096;
        const bounce = DirectIo.findBounce(fd, offsetAlignment);
        if (bounce !== undefined) {
          // One aligned read through the bounce buffer: a file system that takes the flag and then refuses
          // the I/O (EINVAL) is caught here, rather than in a guest request.
          const direct = new DirectIo(fd, offsetAlignment, memoryAlignment, bounce);
          try {
            direct.read(0, new Uint8Array(offsetAlignment));
            return { fd, direct, reopenBuffered, notes };
          } catch (e) {
            fs.closeSync(fd);
            if (errnoOf(e) !== "EINVAL") openErr(e);
            notes.push("O_DIRECT I/O failed with EINVAL; using buffered I/O");
          }
        } else {
          fs.closeSync(fd);
          notes.push("no aligned buffer could be found for O_DIRECT; using buffered I/O");
        }
      }
    }
  }
  try {
    return { fd: reopenBuffered(), direct: undefined, reopenBuffered, notes };
  } catch (e) {
    return openErr(e);
  }
}

function requireSize(path: string, size: number | undefined, max: number, format: string): number {
  if (size === undefined || !Number.isSafeInteger(size) || size <= 0) {
    throw new DiskError("BAD_SIZE", `a ${format} disk needs a positive size in bytes (got ${size})`, path);
  }
  if (size % SECTOR !== 0) throw new DiskError("BAD_SIZE", `size ${size} is not a multiple of ${SECTOR} bytes`, path, { size });
  if (size > max) throw new DiskError("DISK_TOO_LARGE", `size ${size} exceeds the ${format} maximum of ${max} bytes`, path, { size, max });
  return size;
}

function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

export function openRaw(path: string, options: OpenOptions = {}): RawDisk {
  const readOnly = options.readOnly === true;
  const { fd, direct, reopenBuffered, notes } = openFileForDisk(path, readOnly, options.direct === true, SECTOR, options.writeThrough === true);
  const st = fs.fstatSync(fd);
  const size = Math.floor(st.size / SECTOR) * SECTOR;
  if (size !== st.size) notes.push(`file length ${st.size} is not a multiple of ${SECTOR}; the last ${st.size - size} bytes are not part of the disk`);
  return new RawDisk({ path, fd, size, type: "raw", readOnly, logicalSectorSize: SECTOR, physicalSectorSize: 4096, direct, reopenBuffered, notes, ignoreFlush: options.ignoreFlush === true });
}

export const rawDriver: DiskFormatDriver = {
  format: "raw",
  maxSize: MAX_RAW_SIZE,

  /** Raw is the fallback: anything not claimed by another format is raw. */
  probe(): boolean {
    return true;
  },

  open(path: string, options?: OpenOptions): BlockDevice {
    return openRaw(path, options);
  },

  create(path: string, spec: CreateSpec): void {
    if (spec.type === "differencing") throw new DiskError("UNSUPPORTED", "raw disks cannot be differencing disks", path);
    if (spec.logicalSectorSize !== undefined && spec.logicalSectorSize !== SECTOR) {
      throw new DiskError("UNSUPPORTED", `raw disks here have ${SECTOR}-byte logical sectors`, path);
    }
    const size = requireSize(path, spec.size, MAX_RAW_SIZE, "raw");
    let fd: number;
    try {
      fd = fs.openSync(path, "wx");
    } catch (e) {
      throw new DiskError("DISK_CREATE_FAILED", `cannot create: ${(e as Error).message}`, path, { errno: errnoOf(e) });
    }
    try {
      fs.ftruncateSync(fd, size);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  },

  describe(path: string): DiskDescription {
    const st = fs.statSync(path);
    return {
      path,
      format: "raw",
      type: "raw",
      virtualSize: Math.floor(st.size / SECTOR) * SECTOR,
      fileSize: st.size,
      logicalSectorSize: SECTOR,
      physicalSectorSize: 4096,
      allocatedBytes: Math.min(st.size, st.blocks * 512),
    };
  },

  check(path: string): CheckFinding[] {
    const st = fs.statSync(path);
    const findings: CheckFinding[] = [];
    if (st.size % SECTOR !== 0) {
      findings.push({ severity: "warning", offset: st.size, message: `file length ${st.size} is not a multiple of ${SECTOR}; the tail is not part of the disk` });
    }
    return findings;
  },

  /** Grow: extend sparsely. Shrink: only when the cut tail reads as zeros. */
  resize(path: string, newSize: number): void {
    requireSize(path, newSize, MAX_RAW_SIZE, "raw");
    const fd = fs.openSync(path, "r+");
    try {
      const size = fs.fstatSync(fd).size;
      if (newSize < size) {
        const buf = new Uint8Array(BOUNCE_BYTES);
        for (let pos = newSize; pos < size; pos += buf.length) {
          const n = Math.min(buf.length, size - pos);
          preadFully(fd, buf.subarray(0, n), pos);
          if (!isZero(buf.subarray(0, n))) {
            throw new DiskError("SHRINK_WOULD_LOSE_DATA", `cannot shrink to ${newSize}: data at or after offset ${pos}`, path, { offset: pos });
          }
        }
      }
      fs.ftruncateSync(fd, newSize);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  },

  setParent(path: string): void {
    throw new DiskError("UNSUPPORTED", "raw disks have no parent", path);
  },
};
